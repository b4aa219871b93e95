"""pytest-benchmark: EsViT view loss, region loss + matching, and the matching alone at the Swin-T
training shape (B = 32, K = 65536, bf16) on a GPU (a tiny fp32 shape on the CPU)."""

from __future__ import annotations

import pytest

from benchmarks import losses as L
from benchmarks.conftest import DEVICE

SHAPE, DTYPE = L.plan(DEVICE, quick=True)[0]
CASES = [(scope, p.name, mode) for scope, provs in L.PROVIDERS.items() for p in provs
         for mode in L.SCOPE_MODES[scope]]


@pytest.mark.parametrize("scope,provider,mode", CASES, ids=lambda v: str(v))
def test_losses(measure, scope, provider, mode):
    prov = {p.name: p for p in L.PROVIDERS[scope]}[provider]
    measure(prov, L.make_inputs(SHAPE, DTYPE, scope, DEVICE), mode)
