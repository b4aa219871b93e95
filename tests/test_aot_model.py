"""The static performance view of ``python -m esvit_kernels._triton.aot``: finding the hot loop in SASS text
(``loop_sass_instructions``) and the ``--model`` arithmetic. Synthetic inputs, no compiler."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from esvit_kernels._triton.aot import LaunchCounts, Machine, hot_loop, predict, sass_loops  # noqa: E402


def _sass(lines: list[str], name: str = "_k") -> str:
    """cuobjdump -sass style text: one instruction per 16 bytes, each followed by its control word."""
    out = ["", "\tcode for sm_90a", f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"']
    for i, text in enumerate(lines):
        out.append(f"        /*{16 * i:04x}*/                   {text} ;{' ' * 20}/* 0x000000000000000 */")
        out.append(f"{' ' * 103}/* 0x000fe20000000000 */")
    return "\n".join(out) + "\n"


def _program() -> str:
    # index: instruction (address = 16 * index)
    lines = ["S2R R0, SR_TID.X"]                       # 0
    lines += ["IMAD R1, R0, R0, RZ"] * 3               # 1-3  outer loop head at 1 (0x10)
    lines += ["LDG.E R2, desc[UR4][R4.64]"]            # 4    inner MMA loop head at 4 (0x40)
    lines += ["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT"]  # 5
    lines += ["CALL.REL.NOINC 0x180"]                  # 6    -> subroutine at 24 (0x180)
    lines += ["IADD3 R3, R3, 0x1, RZ"]                 # 7
    lines += ["@P0 BRA 0x40"]                          # 8    closes the inner loop: 4..8 = 5 instructions
    lines += ["@!P1 BRA 0x10"]                         # 9    closes the outer loop: 1..9 (not innermost)
    lines += ["FADD R5, R5, R6"] * 6                   # 10-15 an MMA-free loop, larger: head 10 (0xa0)
    lines += ["@P2 BRA 0xa0"]                          # 16   10..16 = 7 instructions
    lines += ["@P3 BRA 0x130"]                         # 17   forward branch: no loop
    lines += ["EXIT"]                                  # 18
    lines += ["BRA 0x130"]                             # 19   branches to itself (0x130 = 19 * 16): not a loop
    lines += ["NOP"] * 4                               # 20-23
    lines += ["IMAD.HI.U32 R7, R7, R8, RZ"] * 3        # 24-26 subroutine
    lines += ["RET.REL.NODEC R10 0x0"]                 # 27   subroutine = 24..27 = 4 instructions
    lines += ["BRA 0x1c0"]                             # 28   branch to itself (0x1c0): not a loop
    return _sass(lines)


def test_sass_loops_finds_backward_branches():
    loops = {(lp.head, lp.branch): lp for lp in sass_loops(_program())}
    # 19 branches to 0x130 = 19 * 16: itself -> no loop; 28 to 0x1c0 = 28 * 16: itself -> no loop
    assert set(loops) == {(0x40, 0x80), (0x10, 0x90), (0xA0, 0x100)}
    inner = loops[(0x40, 0x80)]
    assert (inner.instructions, inner.mma, inner.calls, inner.called, inner.issued) == (5, 1, 1, 4, 9)
    assert loops[(0x10, 0x90)].instructions == 9
    assert loops[(0xA0, 0x100)].mma == 0 and loops[(0xA0, 0x100)].instructions == 7


def test_hot_loop_is_the_innermost_loop_with_an_mma():
    # the MMA-free loop is larger and the outer loop larger still: neither is the hot loop
    lp = hot_loop(_program())
    assert (lp.head, lp.branch, lp.instructions) == (0x40, 0x80, 5)


def test_hot_loop_without_mma_takes_the_largest_innermost_loop_and_none_without_loops():
    text = _program().replace("HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT", "FMUL R9, R9, R9")
    lp = hot_loop(text)
    assert (lp.head, lp.instructions, lp.mma) == (0xA0, 7, 0)
    assert hot_loop(_sass(["S2R R0, SR_TID.X", "EXIT", "BRA 0x20"])) is None


def test_two_branches_to_one_head_make_one_loop():
    text = _sass(["NOP", "FADD R1, R1, R1", "@P0 BRA 0x10", "FADD R1, R1, R1", "@P1 BRA 0x10", "EXIT"])
    loops = sass_loops(text)
    assert [(lp.head, lp.branch, lp.instructions) for lp in loops] == [(0x10, 0x40, 4)]


def test_predict_takes_the_largest_bound():
    m = Machine(sms=100, schedulers=4, clock_hz=1e9, copy_bytes_per_s=1e12, mma_flops_per_s=1e15,
                fma_flops_per_s=1e13)
    # bytes: 2e6 B / 1e12 B/s = 2 us; issue: 4 warps x (1000 iterations x 500 + 10 programs x 100) = 2.004e6
    # warp instructions / (100 x 4 x 1e9 per s) = 5.01 us; mma: 1e9 FLOP / 1e15 = 1 us
    c = LaunchCounts(bytes=2_000_000, loop_iterations=1000, programs=10, flops=1_000_000_000)
    p = predict(c, num_warps=4, loop_issued=500, other_instructions=100, machine=m)
    assert p["warp_instructions"] == 2_004_000
    assert p["t_bytes_s"] == pytest.approx(2e-6) and p["t_issue_s"] == pytest.approx(5.01e-6)
    assert p["t_mma_s"] == pytest.approx(1e-6)
    assert p["bound"] == "issue" and p["predicted_s"] == pytest.approx(5.01e-6)
    # fewer instructions: memory binds; fp32 exact dots divide by the FMA peak instead (1e9 / 1e13 = 100 us)
    assert predict(c, 4, 100, 0, m)["bound"] == "bytes"
    fp32 = predict(LaunchCounts(2_000_000, 1000, 10, 1_000_000_000, tensor_cores=False), 4, 100, 0, m)
    assert fp32["bound"] == "mma" and fp32["predicted_s"] == pytest.approx(1e-4)


def test_launch_counts_of_the_swin_t_stage1_forward():
    """The floor bytes of the Swin-T stage-1 forward (B=128, 56x56, C=96, bf16): qkv 231.2 MB + out 77.1 MB
    + lse (8192 windows x 3 heads x 49 x 4 B) = 313.1 MB, from the captured launch (no compile)."""
    import torch

    from esvit_kernels._triton import window_attention as wa
    from esvit_kernels._triton.aot import capture

    with capture(sm_count=132) as launches:  # no arch: nothing is compiled
        wa.aot_cases()["swin_t_stage1_b128"].run(torch.bfloat16)
    fwd = next(r for r in launches if r.name == "_fwd_kernel")
    c = wa.launch_counts(fwd)
    tokens = 128 * 56 * 56
    assert c.bytes == 4 * tokens * 96 * 2 + 128 * 64 * 3 * 49 * 4
    # grid (heads, chunks, query blocks): every (head, block) walks the 128 x 64 windows (tiles) once
    assert fwd.grid[0] == 3 and fwd.grid[2] == 1 and c.programs == 3 * fwd.grid[1]
    assert c.loop_iterations == 3 * 128 * 64
    assert c.flops == c.loop_iterations * 4 * 64 * 64 * 32
