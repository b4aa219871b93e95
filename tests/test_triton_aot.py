"""The compiled (not only the interpreted) Triton kernels: every variant the launchers use is compiled for
sm_90 and sm_80 on this GPU-less machine (with Triton's own ptxas, in a subprocess without
TRITON_INTERPRET), and each cubin's resources are checked against the hardware: shared memory within the
per-block limit (else the launch fails on a GPU) and no register spills (beyond a few bytes) on the
half-precision paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block: A100 / H100


def _compile(args: list[str]) -> list[dict]:
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = subprocess.run([sys.executable, "-m", "esvit_kernels._triton.aot", "--json", *args], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    rows = _compile(["--arch", "90"])
    rows += _compile(["--arch", "80", "--case", "map_w7_shift_pad", "map_w14_split"])
    return rows


def test_every_variant_compiles(compiled):
    from esvit_kernels._triton.window_attention import representative_launches

    cases = {(r["case"], r["dtype"]) for r in compiled if r["arch"] == 90}
    assert cases == {(c, d) for c in representative_launches() for d in ("bfloat16", "float32")}
    names = {r["kernel"] for r in compiled}
    assert names == {"_fwd_kernel", "_bwd_fused_kernel", "_bwd_dq_kernel", "_bwd_dkv_kernel"}


def test_shared_memory_fits_the_hardware(compiled):
    for r in compiled:
        smem = r["dynamic_shared_bytes"] + r["static_shared_bytes"]
        assert smem <= SMEM_LIMIT[r["arch"]], f"{r}: {smem} B shared memory > sm_{r['arch']} limit"


def test_half_precision_kernels_do_not_spill(compiled):
    # a few spilled registers (<= 64 B per thread) are noise; more means the tiling is too large
    for r in compiled:
        if r["dtype"] != "float32":
            assert r["stack_bytes"] + r["local_bytes"] <= 64, f"register spills: {r}"
