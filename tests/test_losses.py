"""Fused Triton region matching, region loss L_R and view loss L_V against the eager reference.

Runs the kernels on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``, set by
``make test``); small shapes only. Realistic shapes compiled on a GPU are in ``tests/gpu/``.

Tolerances (max abs error relative to the reference's max magnitude, see ``conftest.rel_err``):

* Loss values: both sides compute in fp32 from the same (possibly bf16/fp16-rounded) inputs and differ
  only in summation order and exp vs exp2 rounding, so ``LOSS_TOL`` is tight at every dtype.
* Student-logit gradients: fp32 is tight. In bf16/fp16 both sides round their fp32 gradient to the
  logits' dtype; two correctly rounded values of slightly different numbers can differ by one ulp, and
  the fused-in-forward path rounds twice when the upstream gradient is not 1, so ``GRAD_TOL`` allows two
  ulps relative to the largest gradient (bf16: 2 * 2^-7, fp16: 2 * 2^-10).
"""

from __future__ import annotations

import pytest
import torch

import esvit_kernels as ek
from esvit_kernels import reference as R

from .conftest import rel_err, requires_triton

LOSS_TOL = 2e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
ST, TT = 0.1, 0.04  # EsViT's student temperature and its lowest teacher temperature

pytestmark = requires_triton


def _close(a: torch.Tensor, b: torch.Tensor, tol: float, name: str) -> None:
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    e = rel_err(a, b)
    assert e <= tol, f"{name}: relative error {e:.3g} > {tol:.3g}"


def _grad_of(fn, x: torch.Tensor, upstream: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, d(upstream * value)/dx) of a scalar function of the leaf x."""
    x = x.detach().clone().requires_grad_(True)
    value = fn(x)
    (value * upstream).backward()
    return value.detach(), x.grad


def _force_two_pass(monkeypatch, two_pass: bool) -> None:
    """Gradient in a second streaming pass (True) or, where the row fits one block, in the forward."""
    if two_pass:
        monkeypatch.setattr("esvit_kernels._triton.losses.FUSED_GRAD_MAX_K", 0)


# ------------------------------------------------------------------------------------------ matching


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _check_match(idx: torch.Tensor, s: torch.Tensor, t: torch.Tensor) -> None:
    """idx must equal the reference wherever the best similarity beats the runner-up by more than the
    rounding of a dot product (1e-4); elsewhere it must still attain the maximum to that precision."""
    ref = R.region_match(s, t)
    sim = _normalize(s.double()) @ _normalize(t.double()).transpose(1, 2)
    top2 = sim.topk(min(2, sim.shape[2]), dim=2).values
    clear = (top2[..., 0] - top2[..., -1] > 1e-4) | (sim.shape[2] == 1)
    assert torch.equal(idx[clear], ref[clear])
    chosen = sim.gather(2, idx.unsqueeze(2)).squeeze(2)
    assert (top2[..., 0] - chosen).max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,ts,tt,d", [(2, 5, 7, 24), (1, 9, 49, 40), (2, 70, 80, 20)])
def test_region_match_random(b, ts, tt, d, dtype):
    s = torch.randn(b, ts, d).to(dtype)
    t = torch.randn(b, tt, d).to(dtype)
    idx = ek.region_match(s, t, backend="triton")
    assert idx.dtype == torch.int64 and idx.shape == (b, ts)
    _check_match(idx, s.float(), t.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_match_ties_resolve_to_lowest_index(dtype):
    """Exact ties: duplicate teacher rows (also 2x-scaled copies and copies in a later 64-token block),
    duplicate student rows, all-zero rows, and the reference's own tie example."""
    torch.manual_seed(1)
    b, ts, tt, d = 2, 70, 80, 24
    t = torch.randn(b, tt, d)
    t[:, 5] = t[:, 2]  # same block
    t[:, 70] = t[:, 2]  # a later block: must not win the tie
    t[:, 9] = 2 * t[:, 3]  # power-of-two scale: the cosine is bit-identical
    t[:, 66] = t[:, 3]
    t[1, 11] = 0.0
    s = torch.randn(b, ts, d)
    s[:, 0] = t[:, 2] + 1e-3 * torch.randn(b, d)  # best match is the tied row 2
    s[:, 1] = t[:, 3]  # ties among 3, 9 and 66
    s[:, 40] = s[:, 1]  # duplicate student rows
    s[:, 69] = s[:, 0]
    s[0, 7] = 0.0  # a zero student row: every similarity is 0 -> index 0
    s, t = s.to(dtype), t.to(dtype)
    idx = ek.region_match(s, t, backend="triton")
    assert idx[:, 0].tolist() == [2, 2] and idx[:, 69].tolist() == [2, 2]
    assert idx[:, 1].tolist() == [3, 3] and idx[:, 40].tolist() == [3, 3]
    assert idx[0, 7].item() == 0
    assert torch.equal(idx, R.region_match(s.float(), t.float()))
    s2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t2 = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
    assert ek.region_match(s2, t2, backend="triton").tolist() == [[1, 0]]


# ------------------------------------------------------------------------------------------ region loss


@pytest.mark.parametrize("two_pass", [False, True], ids=["grad-in-forward", "two-pass"])
@pytest.mark.parametrize(
    "b,ts,tt,k,dtype",
    [
        (2, 3, 5, 333, torch.float32),
        (2, 3, 5, 1000, torch.bfloat16),
        (1, 4, 2, 4097, torch.float32),
        (2, 2, 3, 4097, torch.bfloat16),
        (2, 3, 3, 1000, torch.float16),
    ],
)
def test_region_loss_matches_reference(monkeypatch, b, ts, tt, k, dtype, two_pass):
    _force_two_pass(monkeypatch, two_pass)
    s = (3 * torch.randn(b, ts, k)).to(dtype)
    t = (3 * torch.randn(b, tt, k)).to(dtype)
    c = torch.randn(1, k)  # (1, K) float32 center with half-precision logits, as in training
    m = torch.randint(0, tt, (b, ts), dtype=torch.int32)

    def run(backend):
        return _grad_of(lambda x: ek.region_loss(x, t, m, c, student_temp=ST, teacher_temp=TT, backend=backend),
                        s, upstream=3.0)

    (v, g), (v_ref, g_ref) = run("triton"), run("torch")
    assert v.dtype == torch.float32 and v.dim() == 0 and g.dtype == dtype
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(g, g_ref, GRAD_TOL[dtype], "grad")


def test_region_loss_teacher_and_center_get_no_gradient():
    s = torch.randn(2, 3, 333, requires_grad=True)
    t = torch.randn(2, 4, 333, requires_grad=True)
    c = torch.randn(333, requires_grad=True)
    m = torch.tensor([[0, 3, 1], [2, 2, 0]])
    ek.region_loss(s, t, m, c, student_temp=ST, teacher_temp=TT, backend="triton").backward()
    assert s.grad is not None and t.grad is None and c.grad is None


@pytest.mark.parametrize("temps", [(0.1, 0.04), (0.04, 0.04)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_region_loss_extreme_logits_low_temperature(dtype, temps):
    """Logits of magnitude up to 3e4 at temperature 0.04: x / T ~ 1e6; nothing may overflow."""
    k = 1000
    s = torch.randn(2, 3, k) * 3e3
    s[0, 0, 17] = 3e4
    s[1, 2, :] = -2e4
    t = torch.randn(2, 3, k) * 3e3
    t[0, 1, 5] = 2e4
    s, t = s.to(dtype), t.to(dtype)
    c = torch.randn(k) * 100
    m = torch.tensor([[1, 0, 2], [2, 1, 1]])
    kw = {"student_temp": temps[0], "teacher_temp": temps[1]}
    v, g = _grad_of(lambda x: ek.region_loss(x, t, m, c, **kw, backend="triton"), s)
    v_ref, g_ref = _grad_of(lambda x: ek.region_loss(x, t, m, c, **kw, backend="torch"), s)
    assert torch.isfinite(v) and torch.isfinite(g).all()
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(g, g_ref, GRAD_TOL[dtype], "grad")


def test_region_loss_k65536_near_uniform_teacher_is_not_filtered():
    """DINO's early teacher is near uniform (p ~ 1/65536): every probability must count. With a constant
    teacher row p = 1/K exactly, so the loss is lse(s/ts) - mean(s/ts), computed here in float64."""
    k = 65536
    s = torch.randn(1, 2, k)
    t = torch.full((1, 2, k), 0.25)
    c = torch.zeros(k)
    m = torch.tensor([[1, 0]])
    v, g = _grad_of(lambda x: ek.region_loss(x, t, m, c, student_temp=ST, teacher_temp=TT, backend="triton"), s)
    x = s.double() / ST
    want = (torch.logsumexp(x, -1) - x.mean(-1)).mean()
    want_grad = (torch.softmax(x, -1) - 1.0 / k) / ST / 2
    _close(v, want, LOSS_TOL, "loss")
    _close(g, want_grad, GRAD_TOL[torch.float32], "grad")
    noisy = t + 1e-3 * torch.randn(1, 2, k)  # near-uniform, as after DINO's initialisation
    v = ek.region_loss(s, noisy, m, c, student_temp=ST, teacher_temp=TT, backend="triton")
    _close(v, R.region_loss(s, noisy, m, c, ST, TT), LOSS_TOL, "loss, noisy teacher")


# ------------------------------------------------------------------------------------------ view loss


@pytest.mark.parametrize("two_pass", [False, True], ids=["grad-in-forward", "two-pass"])
@pytest.mark.parametrize(
    "s_crops,t_views,b,k,dtype",
    [
        (4, 2, 3, 333, torch.float32),
        (10, 2, 2, 1000, torch.bfloat16),
        (3, 1, 1, 4097, torch.float32),
        (2, 2, 2, 1000, torch.float16),
        (1, 2, 2, 333, torch.bfloat16),  # more teacher views than student crops: one pair (t=1, v=0)
    ],
)
def test_dino_loss_matches_reference(monkeypatch, s_crops, t_views, b, k, dtype, two_pass):
    _force_two_pass(monkeypatch, two_pass)
    s = (3 * torch.randn(s_crops, b, k)).to(dtype)
    t = (3 * torch.randn(t_views, b, k)).to(dtype)
    c = torch.randn(k)

    def run(backend):
        return _grad_of(lambda x: ek.dino_loss(x, t, c, student_temp=ST, teacher_temp=TT, backend=backend), s,
                        upstream=0.5)

    (v, g), (v_ref, g_ref) = run("triton"), run("torch")
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(g, g_ref, GRAD_TOL[dtype], "grad")


def test_dino_loss_extreme_logits_peaked_teachers():
    """A peaked teacher view next to a near-uniform one: the target of crop v < T sums the other views'
    probabilities directly, so p_v ~ 1 cannot swallow them (q - p_v would)."""
    k, b = 1000, 2
    t = torch.randn(2, b, k)
    t[0, :, 3] = 1e4
    s = torch.randn(5, b, k) * 1e3
    c = torch.zeros(k)
    v, g = _grad_of(lambda x: ek.dino_loss(x, t, c, student_temp=0.04, teacher_temp=0.04, backend="triton"), s)
    v_ref, g_ref = _grad_of(lambda x: ek.dino_loss(x, t, c, student_temp=0.04, teacher_temp=0.04,
                                                   backend="torch"), s)
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(g, g_ref, GRAD_TOL[torch.float32], "grad")


# ------------------------------------------------------------------------------------------ multi-pair


def _multi_inputs(dtype, k, b=2, d=20, tt=4, groups=((2, 4), (3, 2))):
    sl = [(3 * torch.randn(v, b, tg, k)).to(dtype) for v, tg in groups]
    sf = [torch.randn(v, b, tg, d).to(dtype) for v, tg in groups]
    tl = (3 * torch.randn(2, b, tt, k)).to(dtype)
    tf = torch.randn(2, b, tt, d).to(dtype)
    tf[1, :, 1] = tf[1, :, 0]  # a tie inside the multi-pair matching
    return sl, sf, tl, tf, torch.randn(1, k)


@pytest.mark.parametrize("two_pass", [False, True], ids=["grad-in-forward", "two-pass"])
@pytest.mark.parametrize("dtype,k", [(torch.float32, 333), (torch.bfloat16, 1000)])
def test_multi_region_loss_matches_reference(monkeypatch, dtype, k, two_pass):
    _force_two_pass(monkeypatch, two_pass)
    sl, sf, tl, tf, c = _multi_inputs(dtype, k)
    out = {}
    for backend in ("triton", "torch"):
        leaves = [x.detach().clone().requires_grad_(True) for x in sl]
        loss, mean = ek.multi_region_loss(leaves, sf, tl, tf, c, student_temp=ST, teacher_temp=TT,
                                          return_teacher_mean=True, backend=backend)
        (2.0 * loss).backward()
        out[backend] = (loss.detach(), mean, [x.grad for x in leaves])
    (v, mean, grads), (v_ref, mean_ref, grads_ref) = out["triton"], out["torch"]
    _close(v, v_ref, LOSS_TOL, "loss")
    _close(mean, mean_ref, 1e-5, "teacher mean")
    for gi, (g, g_ref) in enumerate(zip(grads, grads_ref)):
        _close(g, g_ref, GRAD_TOL[dtype], f"grad[{gi}]")


def test_multi_region_loss_single_teacher_single_group():
    """T=1 with the teacher view among the crops: its own pair is skipped, the rest are averaged."""
    sl, sf, tl, tf, c = _multi_inputs(torch.float32, 333, groups=((3, 4),))
    tl, tf = tl[:1], tf[:1]
    got = ek.multi_region_loss(sl, sf, tl, tf, c, student_temp=ST, teacher_temp=TT, backend="triton")
    want = ek.multi_region_loss(sl, sf, tl, tf, c, student_temp=ST, teacher_temp=TT, backend="torch")
    _close(got, want, LOSS_TOL, "loss")


@pytest.mark.parametrize("programs", [1, 12])
def test_teacher_mean_from_the_statistics_pass(monkeypatch, programs):
    """The fused center statistic over several row groups (R=20 rows > one 16-row chunk, K=4097 columns
    in 5 blocks) equals the plain mean; so does the view loss's."""
    monkeypatch.setattr("esvit_kernels._triton.losses.STATS_PROGRAMS_CPU", programs)
    k = 4097
    t = torch.randn(2, 2, 5, k).to(torch.bfloat16)
    tf = torch.randn(2, 2, 5, 16).to(torch.bfloat16)
    s = [torch.randn(3, 2, 1, k).to(torch.bfloat16)]
    f = [torch.randn(3, 2, 1, 16).to(torch.bfloat16)]
    kw = {"student_temp": ST, "teacher_temp": TT}
    loss, mean = ek.multi_region_loss(s, f, t, tf, torch.zeros(k), **kw, return_teacher_mean=True, backend="triton")
    want = ek.multi_region_loss(s, f, t, tf, torch.zeros(k), **kw, backend="torch")
    _close(mean, t.float().reshape(-1, k).mean(0, keepdim=True), 1e-5, "region mean")
    _close(loss, want, LOSS_TOL, "loss")
    _, vmean = ek.dino_loss(s[0][:, :, 0], t[:, :, 0], torch.zeros(k), student_temp=ST, teacher_temp=TT,
                            return_teacher_mean=True, backend="triton")
    _close(vmean, t[:, :, 0].float().reshape(-1, k).mean(0, keepdim=True), 1e-5, "view mean")


# ------------------------------------------------------------------------------------------ torch.compile


def test_compile_fullgraph_no_graph_break():
    """The whole loss step (matching, L_R for one pair and for all pairs, L_V, the center means, the
    backward) traces into one graph of custom ops."""
    sl, sf, tl, tf, c = _multi_inputs(torch.float32, 333)
    vs, vt = torch.randn(5, 2, 333), torch.randn(2, 2, 333)

    def step(sl0, sl1, sf0, sf1, tl, tf, c, vs, vt):
        lr, rmean = ek.multi_region_loss([sl0, sl1], [sf0, sf1], tl, tf, c, student_temp=ST, teacher_temp=TT,
                                         return_teacher_mean=True, backend="triton")
        lv, vmean = ek.dino_loss(vs, vt, c, student_temp=ST, teacher_temp=TT, return_teacher_mean=True,
                                 backend="triton")
        m = ek.region_match(sf0[0], tf[1], backend="triton")
        l1 = ek.region_loss(sl0[0], tl[1], m, c, student_temp=ST, teacher_temp=TT, backend="triton")
        return 0.5 * lr + 0.5 * lv + l1, rmean, vmean

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, step):
        leaves = [x.detach().clone().requires_grad_(True) for x in (*sl, vs)]
        loss, rmean, vmean = fn(leaves[0], leaves[1], sf[0], sf[1], tl, tf, c, leaves[2], vt)
        loss.backward()
        results.append((loss, rmean, vmean, [x.grad for x in leaves]))
    (loss, rmean, vmean, grads), (loss_e, rmean_e, vmean_e, grads_e) = results
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(rmean, rmean_e)
    torch.testing.assert_close(vmean, vmean_e)
    for g, ge in zip(grads, grads_e):
        torch.testing.assert_close(g, ge)


# ------------------------------------------------------------------------------------------ errors


def _kw(**extra):
    return {"student_temp": ST, "teacher_temp": TT, "backend": "triton", **extra}


def test_errors_region_loss():
    s, t, c = torch.randn(2, 3, 10), torch.randn(2, 4, 10), torch.randn(10)
    m = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        ek.region_loss(s, torch.randn(2, 4, 11), m, c, **_kw())
    with pytest.raises(ValueError, match="teacher_logits must be"):
        ek.region_loss(s, torch.randn(3, 4, 10), m, c, **_kw())
    with pytest.raises(ValueError, match="match_index must be a tensor of shape"):
        ek.region_loss(s, t, m[:, :2], c, **_kw())
    with pytest.raises(TypeError, match="int64 or int32"):
        ek.region_loss(s, t, m.float(), c, **_kw())
    for bad in (4, -1):
        with pytest.raises(ValueError, match=r"match_index values must lie in \[0, Tt=4\)"):
            ek.region_loss(s, t, torch.full((2, 3), bad), c, **_kw())
    for temp in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="student_temp must be a finite number > 0"):
            ek.region_loss(s, t, m, c, **_kw(student_temp=temp))
        with pytest.raises(ValueError, match="teacher_temp must be a finite number > 0"):
            ek.region_loss(s, t, m, c, **_kw(teacher_temp=temp))
    with pytest.raises(ValueError, match="center must have shape"):
        ek.region_loss(s, t, m, torch.randn(2, 10), **_kw())
    with pytest.raises(TypeError, match="dtype"):
        ek.region_loss(s, t.bfloat16(), m, c, **_kw())
    with pytest.raises(ValueError, match="is on meta"):
        ek.region_loss(s, t.to("meta"), m, c, **_kw())


def test_errors_match_dino_multi():
    with pytest.raises(ValueError, match="must agree on B and D"):
        ek.region_match(torch.randn(2, 3, 8), torch.randn(2, 4, 9), backend="triton")
    with pytest.raises(TypeError, match="dtype"):
        ek.region_match(torch.randn(2, 3, 8), torch.randn(2, 4, 8).half(), backend="triton")
    with pytest.raises(ValueError, match="must have 3 dimensions"):
        ek.region_match(torch.randn(3, 8), torch.randn(4, 8), backend="triton")
    c = torch.randn(10)
    with pytest.raises(ValueError, match="teacher_logits must be"):
        ek.dino_loss(torch.randn(4, 2, 10), torch.randn(2, 3, 10), c, **_kw())
    with pytest.raises(ValueError, match="at least one"):
        ek.dino_loss(torch.randn(1, 2, 10), torch.randn(1, 2, 10), c, **_kw())
    with pytest.raises(TypeError, match="dtype"):
        ek.dino_loss(torch.randn(4, 2, 10), torch.randn(2, 2, 10).bfloat16(), c, **_kw())
    with pytest.raises(ValueError, match="teacher_temp"):
        ek.dino_loss(torch.randn(4, 2, 10), torch.randn(2, 2, 10), c, **_kw(teacher_temp=0))
    sl, sf, tl, tf, c = _multi_inputs(torch.float32, 10)
    with pytest.raises(ValueError, match="group 1"):
        ek.multi_region_loss([sl[0], sl[1][:, :1]], sf, tl, tf, c, **_kw())
    with pytest.raises(ValueError, match="teacher_feats must be"):
        ek.multi_region_loss(sl, sf, tl, tf[:, :, :3], c, **_kw())
    with pytest.raises(TypeError, match="dtype"):
        ek.multi_region_loss(sl, [sf[0], sf[1].half()], tl, tf, c, **_kw())
    with pytest.raises(ValueError, match="same length"):
        ek.multi_region_loss(sl, sf[:1], tl, tf, c, **_kw())


# ------------------------------------------------------------------------------------------ bad values, empty input
# The helpers take a device and a backend list: tests/gpu runs them on the triton and cuda backends.

NAN = float("nan")


def check_region_match_nan(backends=("torch", "triton"), device="cpu"):
    """A NaN similarity wins, lowest index first, as NaN does in torch.max; every backend agrees and stays
    in [0, Tt) (the torch backend used to return Tt, out of range)."""
    s, t = torch.randn(2, 6, 8), torch.randn(2, 70, 8)  # 70 teacher tokens: several blocks / tiles
    t[0, 43, 2] = NAN  # teacher token 43 of image 0: NaN similarity with every student token
    t[0, 50, 0] = NAN  # a later NaN loses the tie
    s[1, 2, 5] = NAN  # student token 2 of image 1: NaN with every teacher token -> the lowest, 0
    s[0, 4, 1] = float("inf")  # normalising inf gives NaN too
    sim = torch.nn.functional.normalize(s.double(), dim=-1) @ torch.nn.functional.normalize(t.double(), dim=-1).mT
    want = sim.argmax(-1)
    want[0] = 43
    want[1, 2] = want[0, 4] = 0
    for backend in backends:
        idx = ek.region_match(s.to(device), t.to(device), backend=backend).cpu()
        assert torch.equal(idx, want), backend


def check_nan_gives_nonfinite_loss(backends=("torch", "triton"), device="cpu"):
    """A NaN from the model (features and logits of one teacher token) makes the training loss non-finite --
    the trainer's non-finite-loss stop -- instead of an out-of-range match index or being matched around."""
    sl, sf, tl, tf, c = (x.to(device) if torch.is_tensor(x) else [y.to(device) for y in x]
                         for x in _multi_inputs(torch.float32, 333))
    tl[0, 1, 2], tf[0, 1, 2] = NAN, NAN
    for backend in backends:
        if backend != "cuda":  # no cuda kernel for the multi-pair loss
            loss = ek.multi_region_loss(sl, sf, tl, tf, c, student_temp=ST, teacher_temp=TT, backend=backend)
            assert not torch.isfinite(loss), backend
        m = ek.region_match(sf[0][0], tf[0], backend=backend)
        assert not torch.isfinite(ek.region_loss(sl[0][0], tl[0], m, c, student_temp=ST, teacher_temp=TT,
                                                 backend=backend)), backend


def check_empty_inputs(backends=("torch", "triton"), device="cpu"):
    """Empty sizes: region_match with B = 0 or Ts = 0 returns an empty (B, Ts) result; every size a loss
    or a matching cannot do without is a ValueError, the same on every backend."""
    def z(*shape):
        return torch.randn(*shape, device=device)

    idx0 = torch.zeros(0, 3, dtype=torch.long, device=device)
    kw = {"student_temp": ST, "teacher_temp": TT}
    bad = {
        "region_match Tt=0": lambda be: ek.region_match(z(2, 3, 8), z(2, 0, 8), backend=be),
        "region_match D=0": lambda be: ek.region_match(z(2, 3, 0), z(2, 5, 0), backend=be),
        "region_loss B=0": lambda be: ek.region_loss(z(0, 3, 6), z(0, 4, 6), idx0, z(6), **kw, backend=be),
        "region_loss Ts=0": lambda be: ek.region_loss(z(2, 0, 6), z(2, 4, 6), idx0.view(2, 0), z(6), **kw,
                                                       backend=be),
        "region_loss Tt=0": lambda be: ek.region_loss(z(2, 3, 6), z(2, 0, 6), idx0.new_zeros(2, 3), z(6), **kw,
                                                       backend=be),
        "region_loss K=0": lambda be: ek.region_loss(z(2, 3, 0), z(2, 4, 0), idx0.new_zeros(2, 3), z(0), **kw,
                                                      backend=be),
    }
    if "cuda" not in backends:  # ops with no cuda kernel
        bad.update({
            "dino_loss B=0": lambda be: ek.dino_loss(z(3, 0, 6), z(2, 0, 6), z(6), **kw, backend=be),
            "dino_loss K=0": lambda be: ek.dino_loss(z(3, 2, 0), z(2, 2, 0), z(0), **kw, backend=be),
        })
        for dim, name in ((1, "B"), (2, "Tt"), (3, "K")):
            shape = [2, 2, 4, 6]
            shape[dim] = 0
            feats = shape[:3] + [5]
            bad[f"multi_region_loss {name}=0"] = lambda be, shape=shape, feats=feats: ek.multi_region_loss(
                [z(3, shape[1], 3, shape[3])], [z(3, shape[1], 3, 5)], z(*shape), z(*feats), z(shape[3]), **kw,
                backend=be)
        bad["multi_region_loss T=0"] = lambda be: ek.multi_region_loss(
            [z(3, 2, 0, 6)], [z(3, 2, 0, 5)], z(2, 2, 4, 6), z(2, 2, 4, 5), z(6), **kw, backend=be)
    for name, fn in bad.items():
        for backend in backends:
            with pytest.raises(ValueError, match="needs .* got "):
                fn(backend)
                pytest.fail(f"{name} on {backend}: no error")
    for backend in backends:
        assert ek.region_match(z(0, 3, 8), z(0, 5, 8), backend=backend).shape == (0, 3)
        assert ek.region_match(z(2, 0, 8), z(2, 5, 8), backend=backend).shape == (2, 0)


def check_center_float64(backends=("torch", "triton"), device="cpu"):
    """README: the center may be any float dtype. A float64 center gives the float32 center's result on every
    backend (each reads the center in float32)."""
    sl, sf, tl, tf, c = (x.to(device) if torch.is_tensor(x) else [y.to(device) for y in x]
                         for x in _multi_inputs(torch.float32, 333))
    m = torch.zeros(2, 4, dtype=torch.long, device=device)
    kw = {"student_temp": ST, "teacher_temp": TT}
    for backend in backends:
        for center in (c, c[0]):
            got = ek.region_loss(sl[0][0], tl[0], m, center.double(), **kw, backend=backend)
            assert torch.equal(got, ek.region_loss(sl[0][0], tl[0], m, center, **kw, backend=backend)), backend
        if backend == "cuda":
            continue
        got = ek.multi_region_loss(sl, sf, tl, tf, c.double(), **kw, backend=backend)
        assert torch.equal(got, ek.multi_region_loss(sl, sf, tl, tf, c, **kw, backend=backend)), backend
        got = ek.dino_loss(sl[1][:, :, 0], tl[:, :, 0], c.double(), **kw, backend=backend)
        assert torch.equal(got, ek.dino_loss(sl[1][:, :, 0], tl[:, :, 0], c, **kw, backend=backend)), backend


def test_region_match_nan_wins_and_stays_in_range():
    check_region_match_nan()


def test_nan_gives_nonfinite_loss_not_an_index_error():
    check_nan_gives_nonfinite_loss()


def test_empty_inputs():
    check_empty_inputs()


def test_center_float64():
    check_center_float64()


def test_center_of_integer_dtype_is_refused():
    s, t, m = torch.randn(2, 3, 10), torch.randn(2, 4, 10), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(TypeError, match="center must be float32, float16, bfloat16 or float64"):
        ek.region_loss(s, t, m, torch.zeros(10, dtype=torch.long), **_kw())


# ------------------------------------------------------------------------------------------ GPU code


