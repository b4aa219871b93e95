"""Launching the Triton kernels, and compiling them for a GPU architecture on a machine with no GPU.

Every launcher calls :func:`launch` instead of ``kernel[grid](...)``. ``launch`` takes an ordered list of
*candidates* (keyword overrides such as fewer pipeline stages or smaller key chunks) and runs the first
one whose compiled kernel fits the device's shared memory (the opt-in per-block limit, queried at run
time); the choice is cached per kernel variant and device. Inside :func:`capture`, launches are recorded
instead of run; with ``capture(arch=90, sm_count=132)`` the launchers size their grids for a 132-SM
device and the candidate choice is made against sm_90's limit, exactly as it would be on that GPU.
:func:`compile_launch` then compiles a recorded launch with the specialization Triton's JIT would use
(argument types, 16-byte alignment, constexprs, num_warps) and :func:`resource_usage` reads registers,
spills, shared memory and the SASS instruction count from the cubin with the ``cuobjdump`` that ships
with Triton; :func:`occupancy` turns them into resident blocks per SM. This is how CI checks that the
compiled (not only the interpreted) kernels fit the hardware at realistic launch shapes:
``python -m esvit_kernels._triton.aot [--json PATH]``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton

from ..backends import triton_interpreting

__all__ = ["launch", "capture", "compile_launch", "resource_usage", "occupancy", "sm_count", "Launch",
           "AotCase", "ARCH_LIMITS", "SharedMemoryError"]


class SharedMemoryError(RuntimeError):
    """No launch configuration of a kernel fits the device's shared memory."""


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of an architecture (CUDA programming guide, compute capabilities)."""

    smem_per_block: int  # opt-in maximum dynamic shared memory of one block
    smem_per_sm: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation (sm_80 and later)


ARCH_LIMITS = {
    80: ArchLimits(smem_per_block=163 * 1024, smem_per_sm=164 * 1024),
    86: ArchLimits(smem_per_block=99 * 1024, smem_per_sm=100 * 1024, max_warps_per_sm=48, max_blocks_per_sm=16),
    89: ArchLimits(smem_per_block=99 * 1024, smem_per_sm=100 * 1024, max_warps_per_sm=48, max_blocks_per_sm=24),
    90: ArchLimits(smem_per_block=227 * 1024, smem_per_sm=228 * 1024),
}


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


@dataclass
class _Capture:
    launches: list[Launch] = field(default_factory=list)
    arch: int | None = None
    sm_count: int | None = None
    smem_limit: int | None = None  # overrides the architecture's per-block limit (what-if analysis, tests)


_capturing: _Capture | None = None
_chosen: dict[tuple, int] = {}  # (kernel variant, device) -> index of the candidate that fits


def sm_count(device: torch.device) -> int | None:
    """Multiprocessors the launch grids are sized for: the emulated count inside ``capture(sm_count=...)``,
    the device's own on a GPU, None on the CPU (interpreter)."""
    if _capturing is not None and _capturing.sm_count:
        return _capturing.sm_count
    if device.type == "cuda":
        return _device_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return None


@functools.lru_cache(maxsize=16)
def _device_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _variant_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """What decides the compiled variant's resources: constexprs and launch options, argument dtypes,
    integer arguments equal to 1 (Triton specializes them away) and 16-divisibility (alignment)."""
    spec = []
    for a in args:
        if isinstance(a, torch.Tensor):
            spec.append((a.dtype, a.data_ptr() % 16 == 0))
        elif isinstance(a, int) and not isinstance(a, bool):
            spec.append((a == 1, a % 16 == 0))
        else:
            spec.append(type(a).__name__)
    return (id(kernel), tuple(sorted(kwargs.items())), tuple(spec))


def _shared_bytes_on_device(kernel, grid, args, kwargs) -> int:
    compiled = kernel.warmup(*args, grid=grid, **kwargs)
    return int(compiled.metadata.shared)


def _smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def launch(kernel, grid, *args, candidates: Sequence[dict] | None = None, **kwargs) -> dict:
    """``kernel[grid](*args, **kwargs, **candidate)`` with the first candidate whose shared memory fits the
    device (or, inside :func:`capture`, record it). Returns the candidate used.

    Candidates are keyword overrides in order of preference (the tuned configuration first, then fewer
    stages, then smaller blocks). When none fits, the error names the kernel, what it needs and the limit.
    """
    cands = [dict(c) for c in candidates] if candidates else [{}]
    if _capturing is not None:
        cap = _capturing
        pick = _pick(kernel, cands, lambda kw: _fits_arch(Launch(kernel, tuple(grid), args, kw), cap.arch,
                                                          cap.smem_limit),
                     kwargs, f"sm_{cap.arch}") if cap.arch else cands[0]
        _capturing.launches.append(Launch(kernel, tuple(grid), args, {**kwargs, **pick}))
        return pick
    if len(cands) == 1 or triton_interpreting():
        pick = cands[0]
    else:
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        limit = _smem_limit(device)

        def fits(kw: dict) -> tuple[bool, int, int]:
            need = _shared_bytes_on_device(kernel, grid, args, kw)
            return need <= limit, need, limit

        key_dev = ("cuda", device.index)
        cache_key = (_variant_key(kernel, args, kwargs), key_dev)
        if cache_key in _chosen:
            pick = cands[_chosen[cache_key]]
        else:
            pick = _pick(kernel, cands, fits, kwargs, key_dev)
            _chosen[cache_key] = cands.index(pick)
    kernel[grid](*args, **kwargs, **pick)
    return pick


def _pick(kernel, cands: list[dict], fits: Callable[[dict], tuple[bool, int, int]], kwargs: dict, where) -> dict:
    tried, limit = [], 0
    for c in cands:
        ok, need, limit = fits({**kwargs, **c})
        if ok:
            return c
        tried.append(f"{c or 'default'}: {need} B")
    name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
    raise SharedMemoryError(f"{name}: every launch configuration needs more shared memory than the {limit} B "
                            f"per block that {where} allows ({'; '.join(tried)})")


@contextlib.contextmanager
def capture(arch: int | None = None, sm_count: int | None = None,
            smem_limit: int | None = None) -> Iterator[list[Launch]]:
    """Record the launches made inside the block instead of running them. With ``arch``, each launch's
    candidates are compiled for ``sm_<arch>`` and the first that fits its shared memory (``smem_limit``
    bytes per block, default the architecture's) is recorded, as the device would choose; with
    ``sm_count``, grids are sized for that many multiprocessors."""
    global _capturing
    previous, _capturing = _capturing, _Capture(arch=arch, sm_count=sm_count, smem_limit=smem_limit)
    try:
        yield _capturing.launches
    finally:
        _capturing = previous


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


def _fits_arch(rec: Launch, arch: int, smem_limit: int | None = None) -> tuple[bool, int, int]:
    """Dynamic plus static shared memory of the compiled launch against the per-block limit (the device
    check at run time sees only the dynamic part: this is the stricter of the two)."""
    u = resource_usage(compile_launch(rec, arch))
    need = u["dynamic_shared_bytes"] + u["static_shared_bytes"]
    limit = smem_limit or ARCH_LIMITS[arch].smem_per_block
    return need <= limit, need, limit


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_SASS_LINE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(\S.*?)\s*;", re.M)


def resource_usage(compiled) -> dict:
    """Registers per thread, local memory (spills), shared memory and the static SASS instruction count."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", res))
    instructions = [m for m in _SASS_LINE.findall(sass)]
    return {
        "registers": int(fields["REG"]),
        "local_bytes": int(fields["LOCAL"]),
        "stack_bytes": int(fields["STACK"]),
        "static_shared_bytes": int(fields["SHARED"]),
        "dynamic_shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "sass_instructions": len(instructions),
        "sass_mma": sum(i.split()[0].startswith(("HMMA", "HGMMA", "IMMA")) for i in instructions),
    }


def occupancy(regs: int, smem: int, num_warps: int, arch: int) -> int:
    """Resident blocks per SM from registers (allocated per warp in units of 256), shared memory (plus the
    per-block reservation) and warps, against the architecture's limits."""
    lim = ARCH_LIMITS[arch]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = (lim.regs_per_sm // regs_per_warp) // num_warps
    by_smem = lim.smem_per_sm // (smem + lim.smem_reserved_per_block) if smem else lim.max_blocks_per_sm
    by_warps = lim.max_warps_per_sm // num_warps
    return max(0, min(by_regs, by_smem, by_warps, lim.max_blocks_per_sm))


@dataclass(frozen=True)
class AotCase:
    """A launcher call to compile: ``run(dtype)`` makes the launches; the rest labels the records."""

    run: Callable[[torch.dtype], None]
    batch: int
    window: int | tuple[int, int] | None = None
    head_dim: int | None = None
    realistic: bool = False  # sized like a real Swin layer on a 132-SM grid (many tiles per program)
    ci: bool = True  # part of the CI check (tests/test_triton_aot.py)


REALISTIC_SM_COUNT = 132  # H100 SXM / H200


def cases() -> dict[str, AotCase]:
    """Every kernel module's AOT cases, keyed "module/case"."""
    from . import losses, neighborhood, window_attention

    return {f"{mod.__name__.rsplit('.', 1)[-1]}/{label}": c
            for mod in (window_attention, losses, neighborhood) for label, c in mod.aot_cases().items()}


def report(arch: int = 90, names: list[str] | None = None, dtypes: Sequence[str] = ("bfloat16", "float32"),
           ci_only: bool = False, log: Callable[[str], None] | None = None,
           smem_limit: int | None = None) -> list[dict]:
    """Compile every kernel variant of the selected cases for ``sm_<arch>``; one record per launch."""
    rows = []
    for label, case in cases().items():
        if (names and label not in names) or (ci_only and not case.ci):
            continue
        for dtype in dtypes:
            sms = REALISTIC_SM_COUNT if case.realistic else None
            with capture(arch=arch, sm_count=sms, smem_limit=smem_limit) as launches:
                case.run(getattr(torch, dtype))
            for rec in launches:
                u = resource_usage(compile_launch(rec, arch))
                smem = u["dynamic_shared_bytes"] + u["static_shared_bytes"]
                row = {
                    "case": label.split("/", 1)[1], "module": label.split("/", 1)[0], "kernel": rec.name,
                    "dtype": dtype, "arch": arch, "batch": case.batch,
                    "window": list(case.window) if isinstance(case.window, tuple) else case.window,
                    "head_dim": case.head_dim, "realistic": case.realistic, "grid": list(rec.grid),
                    "num_stages": rec.kwargs.get("num_stages"), "regs": u["registers"],
                    "spill_bytes": u["local_bytes"] + u["stack_bytes"], "smem_bytes": smem,
                    "smem_limit": smem_limit or ARCH_LIMITS[arch].smem_per_block, "num_warps": u["num_warps"],
                    "blocks_per_sm": occupancy(u["registers"], smem, u["num_warps"], arch),
                    "sass_instructions": u["sass_instructions"], "sass_mma": u["sass_mma"],
                }
                rows.append(row)
                if log:
                    log(_fmt(row))
    return rows


_HEADER = ("arch   case                              kernel             dtype     regs spill   smem  warps "
           "blk/SM  sass")


def _fmt(r: dict) -> str:
    return (f"sm_{r['arch']}  {r['case']:33s} {r['kernel']:18s} {r['dtype']:9s} {r['regs']:4d} {r['spill_bytes']:5d} "
            f"{r['smem_bytes']:6d} {r['num_warps']:5d} {r['blocks_per_sm']:6d} {r['sass_instructions']:5d}")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    # run as __main__, this file is a second copy of the module: use the package's (the launchers' one)
    from esvit_kernels._triton.aot import report

    parser = argparse.ArgumentParser(description="Compile the Triton kernels for GPU archs (no GPU needed) "
                                     "and print registers, spills, shared memory, occupancy, SASS size.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--case", nargs="*", default=None, help="module/case names (default: all)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--ci", action="store_true", help="only the cases CI compiles")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--smem-limit", type=int, default=None, metavar="BYTES",
                        help="shared memory per block to choose launch configurations against (default: the "
                        "architecture's opt-in limit); e.g. 101376 for a 99 KB consumer GPU")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the records as a JSON list to PATH ('-' = stdout, no table)")
    args = parser.parse_args(argv)
    if args.list:
        for name, c in cases().items():
            print(f"{name:45s} batch={c.batch} window={c.window} head_dim={c.head_dim} "
                  f"realistic={c.realistic} ci={c.ci}")
        return 0
    quiet = args.json == "-"
    if not quiet:
        print(_HEADER, flush=True)
    log = None if quiet else (lambda s: print(s, flush=True))
    rows = [r for arch in args.arch for r in report(arch, args.case, args.dtype, args.ci, log, args.smem_limit)]
    if args.json == "-":
        json.dump(rows, sys.stdout)
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"{len(rows)} records -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
