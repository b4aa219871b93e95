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
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import triton

from ..backends import triton_interpreting

__all__ = ["launch", "capture", "compile_launch", "resource_usage", "occupancy", "sm_count", "Launch",
           "AotCase", "ARCH_LIMITS", "SharedMemoryError", "SassLoop", "sass_loops", "hot_loop", "Machine",
           "LaunchCounts", "predict"]


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


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(\S.*?)\s*;", re.M)
_MMA_OPS = ("HMMA", "HGMMA", "IMMA")


def _opcode(text: str) -> str:
    """The opcode of one SASS instruction's text, without its predicate (``@!P0 BRA 0x10`` -> ``BRA``)."""
    words = text.split()
    return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]


@dataclass(frozen=True)
class SassLoop:
    """A loop of the SASS: the instructions from the head (a backward branch's target) to that branch.
    ``called`` is the length of the subroutines its CALLs reach (straight-line, head to first RET: e.g.
    the 64-bit division helper), so ``instructions + called`` approximates what one iteration issues."""

    head: int  # byte address of the first instruction
    branch: int  # byte address of the backward branch
    instructions: int
    mma: int
    calls: int
    called: int

    @property
    def issued(self) -> int:
        return self.instructions + self.called


def _sass_instructions(sass: str) -> list[tuple[int, str]]:
    """(address, text) of each instruction of the first function in cuobjdump ``-sass`` output."""
    funcs = re.split(r"^\s*Function\s*:.*$", sass, flags=re.M)
    body = funcs[1] if len(funcs) > 1 else funcs[0]
    return [(int(a, 16), t) for a, t in _SASS_LINE.findall(body)]


def sass_loops(sass: str) -> list[SassLoop]:
    """Every loop of the first function in cuobjdump ``-sass`` text: a branch (``BRA``) to a lower address
    closes a loop whose body runs from the target to the branch; branches to one head are merged (the
    furthest closes it). A branch to itself (the trap after EXIT) is not a loop."""
    ins = _sass_instructions(sass)
    heads: dict[int, int] = {}
    for addr, text in ins:
        if _opcode(text).split(".")[0] != "BRA":
            continue
        targets = re.findall(r"0x([0-9a-f]+)", text)
        if targets and int(targets[-1], 16) < addr:
            head = int(targets[-1], 16)
            heads[head] = max(heads.get(head, addr), addr)
    rets = [a for a, t in ins if _opcode(t).split(".")[0] == "RET"]

    def callee_length(target: int) -> int:
        end = next((r for r in rets if r >= target), None)
        return 0 if end is None else sum(target <= a <= end for a, _ in ins)

    loops = []
    for head, branch in sorted(heads.items()):
        body = [t for a, t in ins if head <= a <= branch]
        calls = [t for t in body if _opcode(t).split(".")[0] == "CALL"]
        called = sum(callee_length(int(re.findall(r"0x([0-9a-f]+)", t)[-1], 16)) for t in calls
                     if re.findall(r"0x([0-9a-f]+)", t))
        loops.append(SassLoop(head, branch, len(body), sum(_opcode(t).startswith(_MMA_OPS) for t in body),
                              len(calls), called))
    return loops


def hot_loop(sass: str) -> SassLoop | None:
    """The hot (tile) loop of a kernel's SASS. Rule: among the *innermost* loops (whose body holds no other
    loop), those with a matrix-multiply instruction (HMMA/HGMMA/IMMA); of these the one with the most
    instructions; with no MMA in any innermost loop, the largest innermost loop; None without loops. In
    the attention kernels that is the tile loop, or the key/query chunk loop inside it where the tile is
    walked in chunks (the loop the dots run in)."""
    loops = sass_loops(sass)
    inner = [lp for lp in loops
             if not any(o is not lp and lp.head <= o.head and o.branch <= lp.branch for o in loops)]
    with_mma = [lp for lp in inner if lp.mma]
    pool = with_mma or inner
    return max(pool, key=lambda lp: (lp.instructions, -lp.head)) if pool else None


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
    instructions = [t for _, t in _SASS_LINE.findall(sass)]
    loop = hot_loop(sass)
    return {
        "registers": int(fields["REG"]),
        "local_bytes": int(fields["LOCAL"]),
        "stack_bytes": int(fields["STACK"]),
        "static_shared_bytes": int(fields["SHARED"]),
        "dynamic_shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
        "sass_instructions": len(instructions),
        "sass_mma": sum(_opcode(i).startswith(_MMA_OPS) for i in instructions),
        # the hot loop (:func:`hot_loop`): static instructions head..backward branch, its MMAs, its CALLs
        # and what those reach (one iteration issues about loop_sass_instructions + loop_sass_called)
        "loop_sass_instructions": loop.instructions if loop else 0,
        "loop_sass_mma": loop.mma if loop else 0,
        "loop_sass_calls": loop.calls if loop else 0,
        "loop_sass_called": loop.called if loop else 0,
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
    model: bool = False  # one of the shapes of the ``--model`` view (Swin-T/S/B stages)


REALISTIC_SM_COUNT = 132  # H100 SXM / H200


@dataclass(frozen=True)
class Machine:
    """What the ``--model`` view divides by. Defaults: an H200 as measured by the first ``make gpu-check``
    (device-to-device copy 4.25 TB/s counting read + write, bf16 matmul 802 TFLOP/s), its 132 SMs with 4
    warp schedulers each issuing one instruction per cycle, the 1.98 GHz boost clock, and the H100/H200
    datasheet's 67 TFLOP/s of fp32 FMA (fp32 dots run as exact FMA dots, not on the tensor cores)."""

    sms: int = REALISTIC_SM_COUNT
    schedulers: int = 4
    clock_hz: float = 1.98e9
    copy_bytes_per_s: float = 4.25e12
    mma_flops_per_s: float = 802e12
    fma_flops_per_s: float = 67e12


@dataclass(frozen=True)
class LaunchCounts:
    """What one launch does, from its arguments (a kernel module's ``launch_counts``): DRAM bytes at the
    floor (each input read once, each output written once), hot-loop iterations over all its programs,
    and the FLOPs its dots execute (padded shapes, as the MMA units run them)."""

    bytes: int
    loop_iterations: int
    programs: int
    flops: int
    tensor_cores: bool = True  # False: fp32 exact dots (FMA)


def predict(counts: LaunchCounts, num_warps: int, loop_issued: int, other_instructions: int,
            machine: Machine = Machine()) -> dict:
    """Predicted time of a launch as the largest of three bounds, in seconds, and which one binds:

    * ``bytes``: ``counts.bytes`` over the copy bandwidth;
    * ``issue``: warp instructions over ``sms x schedulers x clock`` (one instruction per scheduler per
      cycle), where a program's warps each issue ``loop_issued`` per hot-loop iteration plus
      ``other_instructions`` once (the code outside the loop, counted as run once);
    * ``mma``: the dots' FLOPs over the matmul (or, for fp32 exact dots, FMA) peak.

    A lower bound with perfect overlap and no latency: a kernel that waits on its loads (one resident
    program per SM) runs slower than all three."""
    warp_instr = num_warps * (counts.loop_iterations * loop_issued + counts.programs * other_instructions)
    bounds = {
        "bytes": counts.bytes / machine.copy_bytes_per_s,
        "issue": warp_instr / (machine.sms * machine.schedulers * machine.clock_hz),
        "mma": counts.flops / (machine.mma_flops_per_s if counts.tensor_cores else machine.fma_flops_per_s),
    }
    bound = max(bounds, key=bounds.get)
    return {"t_bytes_s": bounds["bytes"], "t_issue_s": bounds["issue"], "t_mma_s": bounds["mma"],
            "predicted_s": bounds[bound], "bound": bound, "warp_instructions": warp_instr}


def cases() -> dict[str, AotCase]:
    """Every kernel module's AOT cases, keyed "module/case"."""
    from . import losses, neighborhood, window_attention

    return {f"{mod.__name__.rsplit('.', 1)[-1]}/{label}": c
            for mod in (window_attention, losses, neighborhood) for label, c in mod.aot_cases().items()}


_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _selected(label: str, names: Sequence[str] | None) -> bool:
    """A case is selected by its full "module/case" label or by the case name alone."""
    return not names or label in names or label.split("/", 1)[1] in names


def report(arch: int = 90, names: list[str] | None = None, dtypes: Sequence[str] = ("bfloat16", "float32"),
           ci_only: bool = False, log: Callable[[str], None] | None = None,
           smem_limit: int | None = None, machine: Machine | None = None, model_only: bool = False) -> list[dict]:
    """Compile every kernel variant of the selected cases for ``sm_<arch>``; one record per launch. With
    ``machine``, records whose kernel module has ``launch_counts`` get the predicted time (:func:`predict`);
    ``model_only`` keeps the cases marked ``model``."""
    rows = []
    for label, case in cases().items():
        if not _selected(label, names) or (ci_only and not case.ci) or (model_only and not case.model):
            continue
        for dtype in dtypes:
            dtype = _DTYPES.get(dtype, dtype)
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
                    **{k: u[k] for k in ("loop_sass_instructions", "loop_sass_mma", "loop_sass_calls",
                                         "loop_sass_called")},
                }
                counts_fn = getattr(sys.modules.get(getattr(getattr(rec.kernel, "fn", rec.kernel), "__module__", "")),
                                    "launch_counts", None)
                counts = counts_fn(rec) if machine is not None and counts_fn else None
                if counts is not None:
                    issued = u["loop_sass_instructions"] + u["loop_sass_called"]
                    row.update(bytes=counts.bytes, loop_iterations=counts.loop_iterations, flops=counts.flops,
                               **predict(counts, u["num_warps"], issued,
                                         u["sass_instructions"] - u["loop_sass_instructions"], machine))
                rows.append(row)
                if log:
                    log(_fmt(row))
    return rows


_HEADER = ("arch   case                              kernel             dtype     regs spill   smem  warps "
           "blk/SM  sass  loop")


def _fmt(r: dict) -> str:
    return (f"sm_{r['arch']}  {r['case']:33s} {r['kernel']:18s} {r['dtype']:9s} {r['regs']:4d} {r['spill_bytes']:5d} "
            f"{r['smem_bytes']:6d} {r['num_warps']:5d} {r['blocks_per_sm']:6d} {r['sass_instructions']:5d} "
            f"{r['loop_sass_instructions']:5d}")


def model_table(rows: list[dict]) -> str:
    """The ``--model`` view: per launch the loop size, bytes, the three bounds and the predicted time (the
    largest), then the sum per case and pass (forward = ``_fwd_kernel``, backward = the rest)."""
    us = 1e6
    lines = [f"{'case':26s} {'kernel':18s} {'dtype':8s} {'regs':>4s} {'blk':>3s} {'loop':>5s} {'+call':>5s} "
             f"{'MB':>7s} {'bytes us':>8s} {'issue us':>8s} {'mma us':>7s} {'pred us':>8s}  bound"]
    totals: dict[tuple, list[float]] = {}
    for r in rows:
        if "predicted_s" not in r:
            continue
        lines.append(f"{r['case']:26s} {r['kernel']:18s} {r['dtype']:8s} {r['regs']:4d} {r['blocks_per_sm']:3d} "
                     f"{r['loop_sass_instructions']:5d} {r['loop_sass_called']:5d} {r['bytes'] / 1e6:7.1f} "
                     f"{r['t_bytes_s'] * us:8.1f} {r['t_issue_s'] * us:8.1f} {r['t_mma_s'] * us:7.1f} "
                     f"{r['predicted_s'] * us:8.1f}  {r['bound']}")
        key = (r["case"], r["dtype"], "fwd" if r["kernel"] == "_fwd_kernel" else "bwd")
        t = totals.setdefault(key, [0.0, 0.0])
        t[0] += r["predicted_s"]
        t[1] += r["t_bytes_s"]
    lines.append("")
    lines.append(f"{'case':26s} {'dtype':8s} pass  {'pred us':>8s} {'floor us':>8s}  floor/pred")
    for (case, dtype, pss), (pred, floor) in totals.items():
        lines.append(f"{case:26s} {dtype:8s} {pss:4s}  {pred * us:8.1f} {floor * us:8.1f}  {floor / pred:9.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json
    import sys

    # run as __main__, this file is a second copy of the module: use the package's (the launchers' one)
    from esvit_kernels._triton.aot import Machine, model_table, report

    parser = argparse.ArgumentParser(description="Compile the Triton kernels for GPU archs (no GPU needed) "
                                     "and print registers, spills, shared memory, occupancy, SASS size.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(ARCH_LIMITS))
    parser.add_argument("--case", nargs="*", default=None, help="module/case names (default: all)")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"],
                        help="bfloat16 / float16 / float32 (or bf16 / fp16 / fp32)")
    parser.add_argument("--ci", action="store_true", help="only the cases CI compiles")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--smem-limit", type=int, default=None, metavar="BYTES",
                        help="shared memory per block to choose launch configurations against (default: the "
                        "architecture's opt-in limit); e.g. 101376 for a 99 KB consumer GPU")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the records as a JSON list to PATH ('-' = stdout, no table)")
    parser.add_argument("--model", action="store_true",
                        help="predicted time per launch (largest of bytes / copy bandwidth, issue-bound "
                        "instructions, MMA time) at the Swin-T/S/B stage shapes (or the --case ones)")
    parser.add_argument("--copy-bw", type=float, default=Machine.copy_bytes_per_s / 1e12, metavar="TB/S",
                        help="copy bandwidth for --model, read + write (default: 4.25, measured on an H200)")
    parser.add_argument("--clock-ghz", type=float, default=Machine.clock_hz / 1e9, help="SM clock for --model")
    parser.add_argument("--mma-tflops", type=float, default=Machine.mma_flops_per_s / 1e12,
                        help="half-precision matmul peak for --model (default: 802, measured on an H200)")
    parser.add_argument("--sms", type=int, default=Machine.sms, help="multiprocessors for --model")
    args = parser.parse_args(argv)
    if args.model and args.dtype == parser.get_default("dtype"):
        args.dtype = ["bfloat16"]
    if args.list:
        for name, c in cases().items():
            print(f"{name:45s} batch={c.batch} window={c.window} head_dim={c.head_dim} "
                  f"realistic={c.realistic} ci={c.ci}")
        return 0
    quiet = args.json == "-"
    if not quiet:
        print(_HEADER, flush=True)
    log = None if quiet else (lambda s: print(s, flush=True))
    machine = Machine(sms=args.sms, clock_hz=args.clock_ghz * 1e9, copy_bytes_per_s=args.copy_bw * 1e12,
                      mma_flops_per_s=args.mma_tflops * 1e12) if args.model else None
    rows = [r for arch in args.arch for r in report(arch, args.case, args.dtype, args.ci, log, args.smem_limit,
                                                     machine, model_only=args.model and not args.case)]
    if args.model and not quiet:
        print()
        print(model_table(rows))
    if args.json == "-":
        json.dump(rows, sys.stdout)
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"{len(rows)} records -> {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
