"""The compiled (not only the interpreted) Triton kernels: every variant the launchers use is compiled on
this GPU-less machine (Triton's own ptxas, in subprocesses without TRITON_INTERPRET), at small shapes that
reach every launcher path and at realistic launch shapes (Swin layers at batch 128 sized for a 132-SM
H100/H200, so each program walks many tiles and the tile loop is software-pipelined as on the GPU). Each
cubin's resources are checked against the hardware: shared memory within the architecture's per-block
limit (else the launch fails on a GPU) and no register spills beyond 64 bytes on half-precision paths.

CI compiles the ``ci`` subset (every distinct kernel configuration once) for sm_90 in bf16 and fp32 and
the small cases for sm_80; ``python -m esvit_kernels._triton.aot`` compiles every case and dtype."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("triton")

from esvit_kernels._triton.aot import ARCH_LIMITS  # noqa: E402

FIELDS = {"case", "kernel", "dtype", "arch", "batch", "window", "head_dim", "regs", "spill_bytes", "smem_bytes",
          "num_warps", "blocks_per_sm", "sass_instructions", "loop_sass_instructions", "loop_sass_mma"}
SMALL = ["window_attention/map_w7_shift_pad", "window_attention/map_w14_split", "losses/region_k65536"]


def _compile(args: list[str]) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "esvit_kernels._triton.aot", "--json", "-", *args], env=env,
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    jobs = [["--ci", "--arch", "90", "--dtype", "bfloat16"], ["--ci", "--arch", "90", "--dtype", "float32"],
            ["--arch", "80", "--dtype", "bfloat16", "float32", "--case", *SMALL]]
    with ThreadPoolExecutor(2) as pool:  # the subprocesses compile on both cores
        return [r for rows in pool.map(_compile, jobs) for r in rows]


def test_every_variant_compiles(compiled):
    from esvit_kernels._triton import losses, neighborhood, window_attention
    from esvit_kernels._triton.aot import cases

    got = {(f"{r['module']}/{r['case']}", r["dtype"]) for r in compiled if r["arch"] == 90}
    assert got == {(c, d) for c, case in cases().items() if case.ci for d in ("bfloat16", "float32")}
    kernels = {n for mod in (window_attention, losses, neighborhood) for n in vars(mod) if n.endswith("_kernel")}
    assert {r["kernel"] for r in compiled} == kernels, "a kernel is never launched by the AOT cases"


def test_records_hold_the_resource_fields(compiled):
    for r in compiled:
        assert r.keys() >= FIELDS, FIELDS - r.keys()
        assert r["sass_instructions"] > 100 and r["regs"] > 0 and r["blocks_per_sm"] >= 1, r
    stage1 = [r for r in compiled if r["case"] == "swin_t_stage1_b128" and r["dtype"] == "bfloat16"]
    assert {r["kernel"] for r in stage1} == {"_fwd_kernel", "_bwd_fused_kernel"}
    for r in stage1:  # B=128 on 132 SMs: many tiles per program, the pipelined loop is what is compiled
        assert r["batch"] == 128 and r["window"] == 7 and r["head_dim"] == 32 and r["realistic"]
        assert r["grid"][0] == 3 and r["grid"][1] < 128 * 64, r["grid"]  # (heads, chunks)
    for r in compiled:  # realistic launches walk many tiles: a hot loop (tile or chunk loop) with the dots in it,
        if r["module"] == "window_attention" and r["realistic"]:  # MMAs in half precision (fp32: FMA dots)
            assert 0 < r["loop_sass_instructions"] < r["sass_instructions"], r
            assert (r["loop_sass_mma"] > 0) == (r["dtype"] != "float32"), r


def test_shared_memory_fits_the_hardware(compiled):
    for r in compiled:
        assert r["smem_bytes"] <= ARCH_LIMITS[r["arch"]].smem_per_block, f"shared memory over the limit: {r}"


def test_half_precision_kernels_do_not_spill(compiled):
    # a few spilled registers (<= 64 B per thread) are noise; more means the tiling is too large
    for r in compiled:
        if r["dtype"] != "float32":
            assert r["spill_bytes"] <= 64, f"register spills: {r}"


def test_configuration_that_does_not_fit_falls_back_to_one_stage(compiled):
    """With less shared memory per block than the double-buffered forward needs (as on a smaller GPU), the
    capture records the one-stage candidate, as the launcher picks it on such a GPU."""
    fwd = next(r for r in compiled if r["case"] == "swin_t_stage1_b128" and r["kernel"] == "_fwd_kernel"
               and r["dtype"] == "bfloat16" and r["arch"] == 90)
    assert fwd["num_stages"] == 2
    limit = fwd["smem_bytes"] - 1
    rows = _compile(["--arch", "90", "--dtype", "bfloat16", "--case", "window_attention/swin_t_stage1_b128",
                     "--smem-limit", str(limit)])
    small = next(r for r in rows if r["kernel"] == "_fwd_kernel")
    assert small["num_stages"] == 1 and small["smem_bytes"] <= limit == small["smem_limit"], small
