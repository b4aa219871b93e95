"""Fused window attention (Triton, through the interpreter on CPU) against the eager reference: values and
every gradient (qkv / q, k, v, the bias table, the padding vector), fp32 tightly and fp16/bf16 with the
tolerances of conftest.TOL, over odd shapes, padding in both roll orders, shifts, packed small windows,
window = resolution, the split path of large windows, and several head dims."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R

from .conftest import assert_close, requires_triton

pytestmark = requires_triton

# (B, H, W, heads, head_dim, window, shift, roll_before_pad)
MAP_CASES = {
    "swin_shifted": (2, 14, 14, 3, 32, 7, 3, False),
    "swin_plain": (2, 14, 14, 3, 32, 7, 0, False),
    "pad_official": (1, 10, 13, 2, 16, 4, 2, False),
    "pad_timm": (1, 10, 13, 2, 16, 4, 2, True),
    "local96_stage3": (2, 6, 6, 2, 32, 7, 3, False),  # 6x6 map padded into one shifted 7x7 window
    "local96_stage4": (1, 3, 3, 2, 64, 7, 0, False),  # 3x3 map in a 7x7 window, 40 padding tokens
    "window_eq_res": (2, 7, 7, 2, 32, 7, 0, False),
    "non_square": (1, 5, 9, 2, 16, (3, 4), (1, 2), True),
    "w12_split": (1, 13, 12, 1, 16, 12, 6, False),
    "w14_split": (1, 14, 14, 1, 32, 14, 7, False),
    "w2_packed": (2, 6, 6, 2, 16, 2, 1, False),
    "w3_hd24": (1, 9, 8, 1, 24, 3, 1, True),
}
HALF_CASES = ["swin_shifted", "pad_official", "local96_stage4", "w14_split", "w2_packed"]


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _run_map(case, dtype, with_bias=True, with_pad=True, device="cpu", cases=MAP_CASES,
             backend="triton"):
    b, h, w, heads, hd, ws, ss, rbp = cases[case]
    ws, ss = _pair(ws), _pair(ss)
    c = heads * hd
    qkv = torch.randn(b, h, w, 3 * c, device=device).to(dtype).requires_grad_()
    table = (torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads, device=device, requires_grad=True)
             if with_bias else None)
    pad = torch.randn(3 * c, device=device).to(dtype).requires_grad_() if with_pad else None
    out = ek.shifted_window_attention(qkv, num_heads=heads, window_size=ws, shift_size=ss, bias_table=table,
                                      pad_qkv=pad, roll_before_pad=rbp, backend=backend)
    # oracle in fp32 on the same (rounded) inputs
    q32 = qkv.detach().float().requires_grad_()
    p32 = pad.detach().float().requires_grad_() if with_pad else None
    ref = R.shifted_window_attention(q32, heads, ws, ss, table, None, p32, rbp)
    grad = torch.randn_like(ref)
    inputs = [t for t in (qkv, table, pad) if t is not None]
    ref_inputs = [t for t in (q32, table, p32) if t is not None]
    got = torch.autograd.grad(out, inputs, grad.to(dtype), allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, ref_inputs, grad, allow_unused=True, materialize_grads=True)
    return out, ref, got, want, [n for n, t in zip(("dqkv", "dbias", "dpad"), (qkv, table, pad)) if t is not None]


def _check(out, ref, got, want, names, dtype):
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    for g, w_, name in zip(got, want, names):
        if w_.abs().max() == 0:  # e.g. the pad vector of a map without padding
            assert g.abs().max() == 0, name
        else:
            assert_close(g, w_, dtype, name, factor=2.0 if dtype != torch.float32 else 1.0)


@pytest.mark.parametrize("case", list(MAP_CASES))
def test_shifted_fp32(case):
    _check(*_run_map(case, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", HALF_CASES)
def test_shifted_half(case, dtype):
    _check(*_run_map(case, dtype), dtype)


@pytest.mark.parametrize("case", ["pad_official", "swin_shifted"])
def test_shifted_without_bias_or_pad(case):
    _check(*_run_map(case, torch.float32, with_bias=False, with_pad=False), torch.float32)


# (B*nW, nW, heads, head_dim, window, with mask)
WIN_CASES = {
    "w7_mask": (8, 4, 2, 32, 7, True),
    "w7_nomask": (3, 1, 3, 16, 7, False),
    "w3_packed_mask": (12, 3, 2, 16, 3, True),
    "w3x5_mask": (6, 2, 2, 32, (3, 5), True),
    "w14": (2, 1, 1, 64, 14, True),
}


def _run_windows(case, dtype, device="cpu", cases=WIN_CASES, backend="triton"):
    bw, nw, heads, hd, ws, use_mask = cases[case]
    ws = _pair(ws)
    n = ws[0] * ws[1]
    qkv = torch.randn(bw, n, 3, heads, hd, device=device).to(dtype).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # timm's strided views, read in place
    table = torch.randn((2 * ws[0] - 1) * (2 * ws[1] - 1), heads, device=device, requires_grad=True)
    mask = torch.where(torch.rand(nw, n, n, device=device) < 0.3, -100.0, 0.0) if use_mask else None
    out = ek.window_attention(q, k, v, window_size=ws, bias_table=table, mask=mask, backend=backend)
    q32 = qkv.detach().float().requires_grad_()
    ref = R.window_attention(*q32.permute(2, 0, 3, 1, 4).unbind(0), ws, table, mask)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (qkv, table), grad.to(dtype))
    want = torch.autograd.grad(ref, (q32, table), grad)
    return out, ref, got, want, ["dqkv", "dbias"]


@pytest.mark.parametrize("case", list(WIN_CASES))
def test_windows_fp32(case):
    _check(*_run_windows(case, torch.float32), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", ["w7_mask", "w3_packed_mask"])
def test_windows_half(case, dtype):
    _check(*_run_windows(case, dtype), dtype)


def test_windows_layout_output_is_free_to_merge():
    q = torch.randn(4, 2, 49, 16)
    out = ek.window_attention(q, q, q, window_size=7, backend="triton")
    assert out.transpose(1, 2).is_contiguous()  # (B*nW, N, heads*hd) reshape without a copy


def test_bias_gradient_is_deterministic():
    b, h, w, heads, hd = 2, 14, 14, 2, 16
    qkv = torch.randn(b, h, w, 3 * heads * hd, requires_grad=True)
    table = torch.randn(169, heads, requires_grad=True)
    grads = []
    for _ in range(2):
        out = ek.shifted_window_attention(qkv, num_heads=heads, window_size=7, shift_size=3, bias_table=table,
                                          backend="triton")
        grads.append(torch.autograd.grad(out.sum(), table)[0])
    assert torch.equal(grads[0], grads[1])


def test_torch_compile_fullgraph():
    qkv = torch.randn(1, 9, 9, 96, requires_grad=True)
    table = torch.randn(169, 2, requires_grad=True)
    pad = torch.randn(96, requires_grad=True)

    def f(qkv, table, pad):
        return ek.shifted_window_attention(qkv, num_heads=2, window_size=7, shift_size=3, bias_table=table,
                                           pad_qkv=pad, backend="triton").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(qkv, table, pad)
    got = torch.autograd.grad(loss, (qkv, table, pad))
    want = torch.autograd.grad(f(qkv, table, pad), (qkv, table, pad))
    torch.testing.assert_close(loss, f(qkv, table, pad))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ----------------------------------------------------------------------------- drop-in modules / timm


def test_nn_window_attention_loads_timm_state_dict_and_matches():
    from timm.models.swin_transformer import WindowAttention as TimmWA

    timm_wa = TimmWA(32, num_heads=2, window_size=7).eval()
    ours = ek.nn.WindowAttention(32, 7, 2, backend="triton")
    ours.load_state_dict(timm_wa.state_dict())
    official_sd = dict(timm_wa.state_dict(), relative_position_index=R.relative_position_index((7, 7)))
    ek.nn.WindowAttention(32, 7, 2).load_state_dict(official_sd)  # official checkpoints carry the index
    x = torch.randn(4, 49, 32)
    mask = R.shift_mask((14, 14), (7, 7), (3, 3))
    torch.testing.assert_close(ours(x, mask), timm_wa(x, mask), rtol=1e-5, atol=1e-5)


def _small_timm_swin():
    import timm

    return timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16, depths=(2, 2),
        num_heads=(1, 2), window_size=4, num_classes=5, strict_img_size=False, drop_path_rate=0.0,
    )


@pytest.mark.parametrize("size", [32, 36], ids=["multiple", "needs_padding"])
def test_patch_timm_swin_matches_unpatched(size):
    torch.manual_seed(0)
    ref_model = _small_timm_swin().eval()
    with torch.no_grad():  # non-zero qkv biases so padding tokens matter
        for m in ref_model.modules():
            if hasattr(m, "relative_position_bias_table"):
                m.qkv.bias.normal_()
    model = _small_timm_swin().eval()
    model.load_state_dict(ref_model.state_dict())
    ek.patch_timm_swin(model, backend="triton")
    x = torch.randn(2, 3, size, size)
    out, ref = model(x), ref_model(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    ref_grads = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    ek.timm_patch.unpatch_timm_swin(model)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)


def test_patch_timm_swin_rejects_attention_dropout():
    import timm

    m = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, embed_dim=16,
                          depths=(1,), num_heads=(1,), window_size=4, attn_drop_rate=0.1)
    with pytest.raises(ValueError, match="dropout"):
        ek.patch_timm_swin(m)
    with pytest.raises(ValueError, match="no timm SwinTransformerBlock"):
        ek.patch_timm_swin(torch.nn.Linear(2, 2))
