"""Launch configurations of the Triton window attention: the key/query chunks of large windows and wide
fp32 heads (the head dim padded) compute the same values and gradients as the reference; the fallback
candidates and the choice among them (the first that fits the shared-memory limit, a clear error when none
does); strided inputs the kernels must not misread."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R
from esvit_kernels._triton import aot
from esvit_kernels._triton import window_attention as wa

from .conftest import requires_triton
from .test_window_attention import _check, _run_map, _run_windows

# (B, H, W, heads, head_dim, window, shift, roll_before_pad): TILE 256 / 128 with wide heads -> chunked
WIDE = {
    "w12_hd128": (1, 12, 12, 1, 128, 12, 6, False),
    "w9_hd64_pad_timm": (1, 11, 10, 2, 64, 9, 4, True),
    "w7_hd64_fp32_chunks": (1, 9, 9, 1, 64, 7, 3, True),
}


def test_tile_config_chunks_large_windows():
    assert wa.tile_config((7, 7), 32, torch.bfloat16)["BK_FWD"] == 64  # TILE 64: one block
    # TILE 256 in half precision at hd <= 64: 64-row query (key) blocks against 4 chunks of 64 keys (queries)
    # in the forward and dK/dV; dQ keeps 16-row blocks against the whole tile
    w14 = wa.tile_config((14, 14), 32, torch.bfloat16)
    assert (w14["BM_FWD"], w14["BK_FWD"], w14["BN_BWD"], w14["BQ_BWD"]) == (64, 64, 64, 64)
    assert (w14["BM_BWD"], w14["BK_BWD"]) == (16, 256)
    assert wa.tile_config((14, 14), 128, torch.bfloat16)["BK_FWD"] == 64  # TILE 256, hd 128: 4 chunks of 64
    assert wa.tile_config((14, 14), 64, torch.float32)["BQ_BWD"] == 64
    assert wa.tile_config((9, 9), 64, torch.float32)["BK_BWD"] == 32  # TILE 128
    assert wa.tile_config((14, 14), 16, torch.bfloat16)["HD_PAD"] == 32  # hd 16 padded on large tiles
    fp32_wide = wa.tile_config((7, 7), 64, torch.float32)  # fp32 wide heads: chunks of 16, no bias block kept
    assert fp32_wide["BK_BWD"] == 16 and not fp32_wide["PRE_BIAS"]
    assert wa.tile_config((7, 7), 32, torch.float32)["PRE_BIAS"]


@requires_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["w12_hd128", "w9_hd64_pad_timm", "w7_hd64_fp32_chunks"])
def test_chunked_wide_heads(case, dtype):
    _check(*_run_map(case, dtype, cases=WIDE), dtype)


def test_launch_candidates_fall_back_to_one_stage_and_keep_the_chunks():
    """The candidates differ only in pipelining depth (the interpreter ignores num_stages, so their values
    are covered by the chunked and whole-tile tests above); the chunk sizes are the tile config's."""
    cfg = wa.tile_config((12, 12), 128, torch.bfloat16)
    assert wa.launch_candidates(cfg, "fwd") == [{"num_stages": 2, "BK": 64}, {"num_stages": 1, "BK": 64}]
    assert wa.launch_candidates(cfg, "dkv") == [{"num_stages": 2, "BQ": 64}, {"num_stages": 1, "BQ": 64}]
    fused = wa.tile_config((7, 7), 32, torch.bfloat16)
    assert fused["FUSED"] and wa.launch_candidates(fused, "fused") == [{"num_stages": 1}]
    w14 = wa.tile_config((14, 14), 32, torch.bfloat16)  # 64-row blocks of large tiles: one stage
    assert wa.launch_candidates(w14, "fwd") == [{"num_stages": 1, "BK": 64}]
    assert wa.launch_candidates(w14, "dkv") == [{"num_stages": 1, "BQ": 64}]


@requires_triton
def test_windows_layout_chunked():
    cases = {"w14_hd128_mask": (2, 1, 1, 128, 14, True)}
    _check(*_run_windows("w14_hd128_mask", torch.bfloat16, cases=cases), torch.bfloat16)


def test_pick_takes_the_first_candidate_that_fits():
    cands = [{"num_stages": 2, "BK": 256}, {"num_stages": 1, "BK": 256}, {"num_stages": 1, "BK": 64}]
    need = [300_000, 200_000, 100_000]  # shared bytes of each candidate

    def fits(kw):
        n = need[next(i for i, c in enumerate(cands) if c.items() <= kw.items())]
        return n <= 232_448, n, 232_448

    assert aot._pick(wa._fwd_kernel, cands, fits, {"HD": 128}, "sm_90") == cands[1]


def test_pick_says_what_does_not_fit():
    with pytest.raises(aot.SharedMemoryError, match=r"_fwd_kernel: every launch configuration needs more shared "
                                                    r"memory than the 1000 B per block that sm_90 allows"):
        aot._pick(wa._fwd_kernel, [{"num_stages": 2}, {"num_stages": 1}], lambda kw: (False, 5000, 1000), {},
                  "sm_90")


def test_occupancy_from_registers_shared_memory_and_warps():
    assert aot.occupancy(regs=255, smem=20_000, num_warps=8, arch=90) == 1  # 8 warps x 8192 regs
    assert aot.occupancy(regs=64, smem=0, num_warps=4, arch=90) == 8  # 64 warps / SM
    assert aot.occupancy(regs=32, smem=100 * 1024, num_warps=4, arch=90) == 2  # 228 KB / (100 + 1) KB
    assert aot.occupancy(regs=32, smem=0, num_warps=1, arch=90) == 32  # block limit


@requires_triton
def test_strided_pad_vector_is_read_correctly():
    """A pad_qkv view with stride 2 (e.g. a slice of a larger buffer) gives the reference's values and its
    gradient reaches the base tensor."""
    heads, c = 2, 32
    qkv = torch.randn(1, 5, 6, 3 * c, requires_grad=True)
    base = torch.randn(2 * 3 * c, requires_grad=True)
    table = torch.randn(49, heads)
    out = ek.shifted_window_attention(qkv, num_heads=heads, window_size=4, shift_size=2, bias_table=table,
                                      pad_qkv=base[::2], backend="triton")
    base_ref = base.detach().clone().requires_grad_()
    ref = R.shifted_window_attention(qkv, heads, (4, 4), (2, 2), table, None, base_ref[::2], False)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, base, g)[0]
    want = torch.autograd.grad(ref, base_ref, g)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[1::2].abs().max() == 0 and got[::2].abs().max() > 0


def test_offsets_inside_a_sample_must_fit_int32():
    """The kernels add int32 offsets inside one sample to the sample's int64 base: a batch may be huge, one
    sample may not reach 2^31 elements (meta tensors: nothing is allocated)."""
    wa._check_offsets(torch.empty(4096, 56, 56, 288, device="meta"))  # 3.7e9 elements in all: fine
    with pytest.raises(ValueError, match="int32 offsets"):
        wa._check_offsets(torch.empty(2, 4096, 4096, 288, device="meta"))
    with pytest.raises(ValueError, match="int32 offsets"):  # strides count, not only sizes
        wa._check_offsets(torch.empty(2, 64, 64, 3 * 2**20, device="meta")[..., :3])
