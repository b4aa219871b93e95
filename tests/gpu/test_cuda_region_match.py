"""CUDA region matching (esvit_cuda::region_match) on a GPU against the reference: the chosen teacher token
is a most-similar one (float64 cosine within rounding of the maximum) and equals the reference's wherever
the best is clear of the runner-up; exact ties go to the lowest index; odd sizes (not multiples of the
32-token / 64-channel tiles), every dtype and mixed dtypes; opcheck; torch.compile(fullgraph=True).
Skipped without a GPU or without the extension."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import esvit_kernels as ek
from esvit_kernels import reference as R

pytestmark = pytest.mark.skipif(not ek.available_backends()["cuda"].available,
                                reason=f"cuda backend unavailable: {ek.available_backends()['cuda'].reason}")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# how far (cosine) the chosen token may sit below the float64 maximum, per input dtype (fp32 accumulation)
SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def _check_match(idx, s, t):
    sim = F.normalize(s.double(), dim=-1) @ F.normalize(t.double(), dim=-1).transpose(1, 2)
    assert idx.dtype == torch.int64 and idx.shape == sim.shape[:2]
    assert int(idx.min()) >= 0 and int(idx.max()) < t.shape[1]
    best = sim.max(-1).values
    chosen = sim.gather(-1, idx[..., None])[..., 0]
    slack = SLACK[s.dtype] if s.dtype == t.dtype else 1e-5
    assert (chosen >= best - slack).all(), f"chosen similarity {(best - chosen).max().item():.3g} below the best"
    top2 = sim.topk(min(2, sim.shape[-1]), -1).values
    clear = (top2[..., 0] - top2[..., -1] > 10 * slack) | (sim.shape[-1] == 1)
    ref = R.region_match(s, t)
    assert torch.equal(idx[clear], ref[clear])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 49, 49, 768), (3, 9, 49, 96), (1, 33, 70, 65), (4, 1, 1, 7), (2, 40, 3, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_region_match(shape, dtype):
    b, ts, tt, d = shape
    s = torch.randn(b, ts, d, device="cuda").to(DTYPES[dtype])
    t = torch.randn(b, tt, d, device="cuda").to(DTYPES[dtype])
    _check_match(ek.region_match(s, t, backend="cuda"), s, t)


def test_mixed_dtypes_and_strided_inputs():
    """The op itself takes mixed dtypes (compared in float32); the public API may insist on one dtype."""
    match = importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_match")
    s = torch.randn(2, 50, 192, device="cuda")[..., ::2]  # strided
    t = torch.randn(2, 49, 96, device="cuda", dtype=torch.bfloat16)
    _check_match(match(s, t), s.float(), t.float())


def test_ties_go_to_the_lowest_index():
    t = torch.randn(3, 70, 64, device="cuda")
    t[:, 41] = t[:, 7]          # exact duplicate, across two 32-token tiles
    t[:, 9] = 2 * t[:, 3]       # a power-of-two multiple normalises to the same vector
    s = torch.stack([t[:, 41], t[:, 9], 3 * t[:, 7]], 1)
    idx = ek.region_match(s, t, backend="cuda")
    assert idx.tolist() == [[7, 3, 7]] * 3
    same = torch.ones(1, 5, 4, device="cuda")  # every teacher token equal
    assert ek.region_match(same[:, :2], same, backend="cuda").tolist() == [[0, 0]]


def test_opcheck_and_compile():
    importlib.import_module("esvit_kernels.ops.cuda_losses").get("region_match")
    s, t = torch.randn(2, 9, 32, device="cuda"), torch.randn(2, 49, 32, device="cuda")
    torch.library.opcheck(torch.ops.esvit_cuda.region_match.default, (s, t))
    f = torch.compile(lambda a, b: ek.region_match(a, b, backend="cuda"), fullgraph=True)
    assert torch.equal(f(s, t), R.region_match(s, t))


def test_sanitizer_region_match():
    """Small case for csrc/tests/sanitize.sh."""
    s, t = torch.randn(2, 35, 70, device="cuda"), torch.randn(2, 33, 70, device="cuda")
    _check_match(ek.region_match(s, t, backend="cuda"), s, t)
