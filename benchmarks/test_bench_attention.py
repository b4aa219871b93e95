"""pytest-benchmark: window attention (block and core scopes), every provider and mode, on two Swin-T
stage shapes in bf16 on a GPU (the tiny fp32 shape on the CPU)."""

from __future__ import annotations

import pytest

from benchmarks import attention as A
from benchmarks.attention_providers import PROVIDERS
from benchmarks.conftest import DEVICE
from benchmarks.harness import MODES

if DEVICE.type == "cuda":
    CASES = [(s, "bf16") for s in A.swin_stages("SwinT/S", 7, 224, 32) if s.stage in (1, 3)]
else:
    CASES = [(s, "fp32") for s in A.cpu_shapes()]


@pytest.mark.parametrize("mode", [m for m in MODES if m != "step"])
@pytest.mark.parametrize("provider", [p.name for p in PROVIDERS["block"]])
@pytest.mark.parametrize("scope", ["block", "core"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0].name.split(' ')[0]}-{c[1]}")
def test_window_attention(measure, case, scope, provider, mode):
    shape, dtype = case
    prov = {p.name: p for p in PROVIDERS[scope]}[provider]
    measure(prov, A.make_inputs(shape, dtype, scope, DEVICE), mode)
