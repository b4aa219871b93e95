"""The benchmark entry point on the CPU: the smoke pass writes a well-formed results file and plots, and the
peers it times compute what the reference computes. Structure only: no timing thresholds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import attention as A
from benchmarks import attention_providers as AP
from benchmarks import losses as L
from benchmarks import report
from benchmarks.suite import BUDGET_REASON
from esvit_kernels import reference as R

REPO = Path(__file__).resolve().parents[1]
STATUSES = {"ok", "skipped", "oom", "error"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--cpu", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("*.json"))
    assert len(files) == 1, files
    return proc.stdout, json.loads(files[0].read_text()), out


def test_smoke_pass_says_it_is_on_the_cpu(smoke):
    stdout, data, _ = smoke
    assert "running the CPU smoke pass" in stdout
    assert "ratio: vs best peer" in stdout


def test_results_metadata(smoke):
    _, data, _ = smoke
    assert data["schema"] == report.SCHEMA
    meta = data["metadata"]
    for key in ("date", "timestamp", "gpu", "device", "torch", "triton", "cuda", "python", "protocol",
                "copy_bandwidth_gbps", "suites", "git", "backends"):
        assert key in meta, key
    assert meta["gpu"] == "cpu" and meta["device"] == "cpu" and meta["smoke"] is True
    assert meta["torch"] == torch.__version__
    assert meta["copy_bandwidth_gbps"] > 0
    assert set(meta["suites"]) == {"attention", "losses", "models"}


def test_every_record_is_a_figure_or_a_reason(smoke):
    _, data, _ = smoke
    records = data["records"]
    assert records
    for r in records:
        for key in ("suite", "scope", "provider", "group", "shape", "shape_name", "dtype", "mode", "status"):
            assert r[key] not in (None, ""), (key, r)
        assert r["status"] in STATUSES, r
        assert r["status"] != "error", f"{r['suite']}/{r['scope']}/{r['provider']}/{r['mode']}: {r['reason']}"
        if r["status"] == "ok":
            t = r["time_ms"]
            assert t["reps"] >= 1 and all(math.isfinite(t[k]) and t[k] > 0 for k in ("median", "p20", "p80", "min"))
            assert t["p20"] <= t["median"] <= t["p80"]
            assert (r["peak_mem_mb"] is None and r["mem_note"]) or r["peak_mem_mb"] > 0
            if r["bytes_min"] is not None:
                assert r["bytes_min"] > 0 and r["bandwidth_gbps"] > 0 and r["roofline_frac"] > 0
        else:
            assert r["reason"], r


def test_every_suite_measured_its_eager_peers(smoke):
    _, data, _ = smoke
    ok = {(r["suite"], r["scope"], r["provider"], r["mode"]) for r in data["records"] if r["status"] == "ok"}
    for scope in ("block", "core"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert ("attention", scope, "eager_ref", mode) in ok
            assert ("attention", scope, "sdpa_default", mode) in ok
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert ("attention", "vil", "eager_unfold", mode) in ok
        assert ("attention", "vil", "sdpa_default", mode) in ok
    assert ("attention", "vil", "triton", "fwd+bwd") in ok
    assert ("attention", "block", "compiled_ref", "fwd+bwd") in ok  # the one CPU compile
    assert ("attention", "layer", "timm", "fwd+bwd") in ok
    for scope in ("view", "region"):
        assert ("losses", scope, "esvit_ref", "fwd+bwd") in ok
        assert ("losses", scope, "stacked_einsum", "fwd+bwd") in ok
    assert ("models", "infer", "timm", "fwd") in ok
    skipped = [r for r in data["records"] if r["provider"] == "cuda" and r["status"] == "skipped"]
    assert skipped and all("cuda" in r["reason"] for r in skipped)


def test_plots_are_pngs(smoke):
    _, _, out = smoke
    pngs = sorted(out.glob("*.png"))
    assert pngs
    for p in pngs:
        head = p.read_bytes()[:24]
        assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR", p
        assert int.from_bytes(head[16:20], "big") > 0 and int.from_bytes(head[20:24], "big") > 0


def test_merge_keeps_figures_over_budget_skips():
    key = {"suite": "s", "scope": "c", "shape_name": "x", "dtype": "bf16", "provider": "p", "mode": "fwd"}
    old = [{**key, "status": "ok", "reason": None}]
    assert report.merge(old, [{**key, "status": "skipped", "reason": BUDGET_REASON}]) == old
    new = [{**key, "status": "ok", "reason": None, "time_ms": {"median": 1.0}}]
    assert report.merge(old, new) == new


# ---------------------------------------------------------------------------------- peers agree (CPU, eager)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return list(torch.autograd.grad(out, leaves, g if out.dim() else None))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape", A.cpu_shapes() + [A.AttnShape("odd", 1, 40, 2, 9, 64, 2, 4, 2, 4)],
                         ids=lambda s: s.name.split(" ")[0])
@pytest.mark.parametrize("scope", ["block", "core"])
def test_attention_peers_match_the_reference(shape, scope):
    cpu = torch.device("cpu")
    ins = A.make_inputs(shape, "fp32", scope, cpu)
    provs = {p.name: p for p in AP.PROVIDERS[scope]}
    ref = provs["eager_ref"].build(ins).fn()
    ref_g = _grads(ref, ins.grads())
    for name in ("torch", "sdpa_default"):
        out = provs[name].build(ins).fn()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        for g, rg in zip(_grads(out, ins.grads()), ref_g):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5, msg=f"{name} grad")
    # FlexAttention's score_mod / mask_mod, run eagerly (forward only on the CPU: inputs detached)
    with torch.no_grad():
        core = AP._flex_core(ins)
        if scope == "core":
            out = core(ins.q.detach(), ins.k.detach(), ins.v.detach())
        else:
            out = AP._block(core, ins)(ins.qkv.detach())
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("shape", A.vil_cpu_shapes() + [A.ViLShape("odd", 1, 40, 2, 11, 32, 2, 3, 2)],
                         ids=lambda s: s.name.split(" ")[0])
def test_vil_peers_match_the_reference(shape):
    ins = A.make_vil_inputs(shape, "fp32", torch.device("cpu"))
    s = shape
    ref = R.neighborhood_window_attention(ins.q, ins.k, ins.v, s.heads, s.window, ins.global_k, ins.global_v,
                                          ins.table, ins.global_bias)
    ref_g = _grads(ref, ins.grads())
    provs = {p.name: p for p in AP.PROVIDERS["vil"]}
    for name in ("torch", "eager_unfold", "sdpa_default"):
        out = provs[name].build(ins).fn()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        for g, rg in zip(_grads(out, ins.grads()), ref_g):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5, msg=f"{name} grad")
    with torch.no_grad():  # FlexAttention's score_mod / block mask, eagerly (forward only on the CPU)
        q, k, v = (t.detach() for t in AP._vil_tokens(ins))
        out = AP._vil_out(AP._vil_flex_fn(ins)(q, k, v), ins)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)


def test_timm_layer_patched_matches_timm():
    ins = A.make_inputs(A.cpu_shapes()[0], "fp32", "layer", torch.device("cpu"))
    ref = AP._layer_timm(ins).fn()
    out = AP._layer_patched("torch")(ins).fn()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scope", ["view", "region"])
def test_loss_peers_match_the_reference(scope):
    ins = L.make_inputs(L.LossShape(2, 128, 16), "fp32", scope, torch.device("cpu"))
    provs = {p.name: p for p in L.PROVIDERS[scope]}
    ref = provs["esvit_ref"].build(ins).fn()
    ref_g = _grads(ref, ins.grads())
    for name in [n for n in ("torch", "stacked_einsum", "stacked_scores") if n in provs]:
        out = provs[name].build(ins).fn()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=name)
        for g, rg in zip(_grads(out, ins.grads()), ref_g):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-7, msg=f"{name} grad")


def test_stacked_matching_matches_the_reference():
    ins = L.make_inputs(L.LossShape(3, 64, 16), "fp32", "match", torch.device("cpu"))
    ref = {p.name: p for p in L.PROVIDERS["match"]}["esvit_ref"].build(ins).fn()
    stacked = L.stacked_match(ins.s_feats, ins.t_feats)  # per group (T, V, B, Ts)
    n_t = ins.t_feats.shape[0]
    per_teacher = [[c for grp in stacked for c in grp[t]] for t in range(n_t)]
    flat = [c for t in range(n_t) for v, c in enumerate(per_teacher[t]) if v != t]
    assert len(flat) == len(ref) == ins.shape.pairs
    assert all(torch.equal(a, b) for a, b in zip(flat, ref))
