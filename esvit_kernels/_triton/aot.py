"""Compile the Triton kernels for a GPU architecture on a machine that has no GPU.

Every launcher calls :func:`launch` instead of ``kernel[grid](...)``. Inside :func:`capture`, launches are
recorded instead of run; :func:`compile_launch` then compiles a recorded launch with exactly the
specialization Triton's JIT would use (argument types, 16-byte alignment, constexprs, num_warps) for a
chosen target, e.g. sm_90, and :func:`resource_usage` reads registers / spills / shared memory from the
cubin with the ``cuobjdump`` that ships with Triton. This is how CI checks that the compiled (not only the
interpreted) kernels build, and how register pressure is tuned without a GPU:
``python -m esvit_kernels._triton.aot``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import triton

__all__ = ["launch", "capture", "compile_launch", "resource_usage", "Launch"]

_captured: list | None = None


@dataclass
class Launch:
    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))


def launch(kernel, grid, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, or record it while :func:`capture` is active."""
    if _captured is not None:
        _captured.append(Launch(kernel, tuple(grid), args, kwargs))
        return
    kernel[grid](*args, **kwargs)


@contextlib.contextmanager
def capture() -> Iterator[list[Launch]]:
    """Record the launches made inside the block instead of running them."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


def compile_launch(rec: Launch, arch: int = 90):
    """Compile a recorded launch for ``sm_<arch>``; returns Triton's CompiledKernel (asm has ptx, cubin)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = rec.kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("compile_launch needs compiled kernels: run without TRITON_INTERPRET=1 (under the "
                           "interpreter every @triton.jit function, tl.max included, is interpreted)")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*rec.args, **rec.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, rec.kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _cuobjdump() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(compiled) -> dict:
    """Registers per thread, local memory (spills) and static shared memory, from the cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {
        "registers": int(fields["REG"]),
        "local_bytes": int(fields["LOCAL"]),
        "stack_bytes": int(fields["STACK"]),
        "static_shared_bytes": int(fields["SHARED"]),
        "dynamic_shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
    }


def report(arch: int = 90, cases: list[str] | None = None, dtypes: tuple[str, ...] = ("bfloat16", "float32")):
    """Compile every window-attention kernel variant the launchers use at representative shapes."""
    import torch

    from . import window_attention as wa

    rows = []
    for label, fn in wa.representative_launches().items():
        if cases and label not in cases:
            continue
        for dtype in dtypes:
            with capture() as launches:
                fn(getattr(torch, dtype))
            for rec in launches:
                usage = resource_usage(compile_launch(rec, arch))
                rows.append({"case": label, "kernel": rec.name, "dtype": dtype, "arch": arch, **usage})
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    # run as __main__, this file is a second copy of the module: use the package's (the launchers' one)
    from esvit_kernels._triton.aot import report

    parser = argparse.ArgumentParser(description="Compile the Triton kernels for GPU archs; print resources.")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--case", nargs="*", default=None)
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--json", action="store_true", help="one JSON list on stdout")
    args = parser.parse_args(argv)
    rows = [r for arch in args.arch for r in report(arch, args.case, tuple(args.dtype))]
    if args.json:
        print(json.dumps(rows))
        return 0
    print("arch   case                   kernel             dtype     regs spill-B smem-B warps")
    for r in rows:
        spill = r["stack_bytes"] + r["local_bytes"]
        print(f"sm_{r['arch']}  {r['case']:22s} {r['kernel']:18s} {r['dtype']:9s} {r['registers']:4d} {spill:7d} "
              f"{r['dynamic_shared_bytes'] + r['static_shared_bytes']:6d} {r['num_warps']:5d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
