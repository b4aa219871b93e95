"""Compiled Triton window attention on a GPU against the reference: every CPU case plus the Swin stage
shapes (small batches), all dtypes, values and all gradients; determinism of the bias gradient."""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek

from ..test_window_attention import MAP_CASES, WIN_CASES, _check, _run_map, _run_windows

BACKENDS = ["triton"]
if ek.available_backends()["cuda"].available:
    BACKENDS.append("cuda")

# Swin-T/B stage shapes at 224 (and 96-px local crops), small batches: (B, H, W, heads, hd, W, shift, rbp)
GPU_MAP_CASES = dict(MAP_CASES)
GPU_MAP_CASES.update({
    "swinT_s1": (4, 56, 56, 3, 32, 7, 3, False),
    "swinT_s2": (4, 28, 28, 6, 32, 7, 3, False),
    "swinT_s3": (4, 14, 14, 12, 32, 7, 3, False),
    "swinT_s4": (4, 7, 7, 24, 32, 7, 0, False),
    "swinT_local_s1": (8, 24, 24, 3, 32, 7, 3, False),
    "swinT_local_s4": (8, 3, 3, 24, 32, 7, 0, False),
    "swinB_w14_s1": (2, 56, 56, 4, 32, 14, 7, False),
    "swinB_w14_s3": (2, 14, 14, 16, 32, 14, 0, False),
    "hd64_w12": (2, 24, 24, 2, 64, 12, 6, True),
})
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(GPU_MAP_CASES))
def test_shifted_gpu(case, dtype, backend):
    torch.manual_seed(0)
    _check(*_run_map(case, DTYPES[dtype], device="cuda", cases=GPU_MAP_CASES, backend=backend), DTYPES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(WIN_CASES))
def test_windows_gpu(case, dtype, backend):
    torch.manual_seed(0)
    _check(*_run_windows(case, DTYPES[dtype], device="cuda", backend=backend), DTYPES[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_deterministic_gpu(backend):
    qkv = torch.randn(8, 56, 56, 288, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    table = torch.randn(169, 3, device="cuda", requires_grad=True)
    grads = []
    for _ in range(3):
        out = ek.shifted_window_attention(qkv, num_heads=3, window_size=7, shift_size=3, bias_table=table,
                                          backend=backend)
        grads.append(torch.autograd.grad(out.float().square().sum(), table)[0])
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_inductor_gpu(backend):
    qkv = torch.randn(2, 14, 14, 96, device="cuda", requires_grad=True)
    table = torch.randn(169, 1, device="cuda", requires_grad=True)

    def f(x, t):
        return ek.shifted_window_attention(x, num_heads=1, window_size=7, shift_size=3, bias_table=t,
                                           backend=backend).square().sum()

    loss = torch.compile(f, fullgraph=True)(qkv, table)
    torch.testing.assert_close(loss, f(qkv, table), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patched_timm_swin_tiny_gpu(backend):
    """Full-size timm Swin-T (224 px, and 232 px which needs padding) patched vs unpatched, bf16 autocast."""
    import timm

    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, strict_img_size=False,
                            drop_path_rate=0.0).cuda().eval()
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, strict_img_size=False,
                              drop_path_rate=0.0).cuda().eval()
    model.load_state_dict(ref.state_dict())
    ek.patch_timm_swin(model, backend=backend)
    for size in (224, 232):
        x = torch.randn(4, 3, size, size, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, want = model(x).float(), ref(x).float()
        rel = (out - want).abs().max() / want.abs().max()
        assert rel < 3e-2, f"{size}px: relative error {rel:.3g}"


# ----------------------------------------------------------------------------- non-finite input, empty rows, B = 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ws", [2, 3, 4, 7])
def test_nonfinite_stays_in_its_window_gpu(ws, dtype, backend):
    from ..test_window_attention_nonfinite import run_map_nonfinite, run_windows_nonfinite

    torch.manual_seed(0)
    run_map_nonfinite(ws, DTYPES[dtype], backend, device="cuda")
    run_windows_nonfinite(ws, DTYPES[dtype], backend, device="cuda")
    if ws == 3:
        run_map_nonfinite(ws, DTYPES[dtype], backend, device="cuda", pad=True)
        run_map_nonfinite(ws, DTYPES[dtype], backend, device="cuda", hd=64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("ws", [3, 7, 8])
def test_empty_rows_gpu(ws, dtype, backend):
    from ..test_window_attention_nonfinite import run_empty_rows

    torch.manual_seed(0)
    run_empty_rows(ws, DTYPES[dtype], backend, device="cuda")


def test_empty_inputs_gpu():
    from ..test_window_attention_errors import check_empty_inputs

    check_empty_inputs(BACKENDS, device="cuda")
