"""Losses suite: EsViT's view loss L_V, region loss L_R with its matching, and the matching alone.

Shapes are the Swin-T training step's: B images per GPU in {32, 64}, 2 global crops (49 region tokens)
+ 8 local crops (9 tokens), the teacher sees the 2 global crops, K = 65536 head outputs, D = 768
backbone width, bf16 logits (18 teacher/student pairs).

Scopes (the op inside the timed region): ``view`` = L_V over the 18 pairs; ``region`` = matching + L_R
over the 18 pairs; ``match`` = the 18 argmax matchings alone (forward only, no gradient).

Providers: ours (``esvit_kernels`` with backend triton / cuda / torch), the EsViT-style reference
(``esvit_kernels.reference``: loops over pairs, materialising the similarity matrix, the gathered teacher
rows and the log-softmax), ``torch.compile`` of it, and "stacked" dinov3-style versions that process all
crops at once: one einsum for L_V, one batched matmul + argmax per crop group for the matching, and for
L_R either a batched gather of the teacher rows (``stacked_einsum``) or an einsum of every student row
with every teacher row followed by a gather of the matched scalar (``stacked_scores``, which never
materialises the gathered rows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

import esvit_kernels as ek
from esvit_kernels import reference

from .harness import Record
from .suite import DTYPES, INTERPRETER_MODES, Case, Forward, Provider, RunContext, backend_check, run_cases

STUDENT_TEMP, TEACHER_TEMP = 0.1, 0.04


@dataclass(frozen=True)
class LossShape:
    """One training-step loss: images, head width K, backbone width D, crops and their token counts."""

    batch: int
    k: int
    d: int
    global_crops: int = 2
    local_crops: int = 8
    global_tokens: int = 49
    local_tokens: int = 9

    @property
    def crops(self) -> int:
        return self.global_crops + self.local_crops

    @property
    def pairs(self) -> int:
        return self.global_crops * self.crops - self.global_crops

    @property
    def name(self) -> str:
        return (f"B{self.batch}-K{self.k}-D{self.d}-{self.global_crops}x{self.global_tokens}tok"
                f"+{self.local_crops}x{self.local_tokens}tok")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pairs": self.pairs}


def plan(device: torch.device, quick: bool) -> list[tuple[LossShape, str]]:
    if device.type != "cuda":
        return [(LossShape(2, 512, 32), "fp32")]
    if quick:
        return [(LossShape(32, 65536, 768), "bf16")]
    return [(LossShape(32, 65536, 768), "bf16"), (LossShape(64, 65536, 768), "bf16")]


# ------------------------------------------------------------------------------------------------ inputs


@dataclass
class LossInputs:
    """Head outputs and backbone region tokens of one step; student logits receive gradients."""

    shape: LossShape
    device: torch.device
    s_view: torch.Tensor | None = None  # (S, B, K)
    t_view: torch.Tensor | None = None  # (T, B, K)
    s_region: list[torch.Tensor] | None = None  # [(2, B, 49, K), (8, B, 9, K)]
    s_feats: list[torch.Tensor] | None = None  # [(2, B, 49, D), (8, B, 9, D)]
    t_region: torch.Tensor | None = None  # (T, B, 49, K)
    t_feats: torch.Tensor | None = None  # (T, B, 49, D)
    center: torch.Tensor | None = None  # (1, K) fp32

    def grads(self) -> list[torch.Tensor]:
        return [t for t in [self.s_view, *(self.s_region or [])] if t is not None and t.requires_grad]


def make_inputs(shape: LossShape, dtype: str, scope: str, device: torch.device) -> LossInputs:
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = DTYPES[dtype]
    s = shape

    def rand(*size: int, grad: bool = False, std: float = 1.0, dtype: torch.dtype = dt) -> torch.Tensor:
        t = (torch.randn(*size, generator=g) * std).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    ins = LossInputs(s, device, center=rand(1, s.k, std=0.1, dtype=torch.float32))
    groups = ((s.global_crops, s.global_tokens), (s.local_crops, s.local_tokens))
    if scope == "view":
        ins.s_view = rand(s.crops, s.batch, s.k, grad=True)
        ins.t_view = rand(s.global_crops, s.batch, s.k)
    else:
        ins.s_feats = [rand(v, s.batch, t, s.d) for v, t in groups]
        ins.t_feats = rand(s.global_crops, s.batch, s.global_tokens, s.d)
    if scope == "region":
        ins.s_region = [rand(v, s.batch, t, s.k, grad=True) for v, t in groups]
        ins.t_region = rand(s.global_crops, s.batch, s.global_tokens, s.k)
    return ins


def _pairs(ins: LossInputs) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """(teacher view t, crop index v, student feats, student region logits) for every pair v != t."""
    crops_f = [c for grp in ins.s_feats for c in grp.unbind(0)]
    crops_l = [c for grp in ins.s_region for c in grp.unbind(0)] if ins.s_region else [None] * len(crops_f)
    for t in range(ins.t_feats.shape[0]):
        for v, (f, lg) in enumerate(zip(crops_f, crops_l)):
            if v != t:
                yield t, v, f, lg


# ------------------------------------------------------------------------------------------------ ours


def _ours_view(backend: str):
    def build(ins: LossInputs) -> Forward:
        return Forward(lambda: ek.dino_loss(ins.s_view, ins.t_view, ins.center, student_temp=STUDENT_TEMP,
                                            teacher_temp=TEACHER_TEMP, backend=backend), ins.grads())

    return build


def _ours_region(backend: str):
    """multi_region_loss where the backend has it; else (cuda) region_match + region_loss per pair."""

    def build(ins: LossInputs) -> Forward:
        temps = {"student_temp": STUDENT_TEMP, "teacher_temp": TEACHER_TEMP, "backend": backend}
        if backend in _supported("multi_region_loss"):
            return Forward(lambda: ek.multi_region_loss(ins.s_region, ins.s_feats, ins.t_region, ins.t_feats,
                                                        ins.center, **temps), ins.grads())

        def per_pair() -> torch.Tensor:
            total = 0.0
            for t, _, f, lg in _pairs(ins):
                idx = ek.region_match(f, ins.t_feats[t], backend=backend)
                total = total + ek.region_loss(lg, ins.t_region[t], idx, ins.center, **temps)
            return total / ins.shape.pairs

        return Forward(per_pair, ins.grads())

    return build


def _ours_match(backend: str):
    def build(ins: LossInputs) -> Forward:
        return Forward(lambda: [ek.region_match(f, ins.t_feats[t], backend=backend) for t, _, f, _ in _pairs(ins)])

    return build


def _supported(op: str) -> tuple[str, ...]:
    from esvit_kernels.backends import OP_BACKENDS

    return OP_BACKENDS.get(op, ())


# ------------------------------------------------------------------------------------------------ peers


def _ref_view(compiled: bool):
    def build(ins: LossInputs) -> Forward:
        f = torch.compile(reference.dino_loss, dynamic=False) if compiled else reference.dino_loss
        return Forward(lambda: f(ins.s_view, ins.t_view, ins.center, STUDENT_TEMP, TEACHER_TEMP), ins.grads())

    return build


def _ref_region(compiled: bool):
    def build(ins: LossInputs) -> Forward:
        f = reference.multi_region_loss
        f = torch.compile(f, dynamic=False) if compiled else f
        return Forward(lambda: f(ins.s_region, ins.s_feats, ins.t_region, ins.t_feats, ins.center,
                                 STUDENT_TEMP, TEACHER_TEMP), ins.grads())

    return build


def _ref_match(compiled: bool):
    def matches(s_feats: list[torch.Tensor], t_feats: torch.Tensor) -> list[torch.Tensor]:
        crops = [c for grp in s_feats for c in grp.unbind(0)]
        return [reference.region_match(c, t_feats[t]) for t in range(t_feats.shape[0])
                for v, c in enumerate(crops) if v != t]

    def build(ins: LossInputs) -> Forward:
        f = torch.compile(matches, dynamic=False) if compiled else matches
        return Forward(lambda: f(ins.s_feats, ins.t_feats))

    return build


def stacked_view(s: torch.Tensor, t: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """L_V for all pairs with one einsum: (T, S) cross-entropy matrix, diagonal (same view) excluded."""
    tp = F.softmax((t.float() - center.float()) / TEACHER_TEMP, dim=-1)
    logp = F.log_softmax(s.float() / STUDENT_TEMP, dim=-1)
    ce = -torch.einsum("tbk,sbk->ts", tp, logp) / s.shape[1]
    off = ~torch.eye(t.shape[0], s.shape[0], dtype=torch.bool, device=s.device)
    return ce[off].mean()


def stacked_match(s_feats: list[torch.Tensor], t_feats: torch.Tensor) -> list[torch.Tensor]:
    """Per crop group, every (teacher view, student crop) matching in one batched matmul + argmax:
    (T, V, B, Ts) indices (argmax returns the first maximum: ties go to the lowest teacher index)."""
    tn = F.normalize(t_feats.float(), dim=-1)
    return [torch.einsum("vbsd,tbud->tvbsu", F.normalize(sf.float(), dim=-1), tn).argmax(-1) for sf in s_feats]


def stacked_region(ins: LossInputs, gather_rows: bool) -> torch.Tensor:
    """L_R for all pairs, crop groups stacked. ``gather_rows``: gather the matched teacher rows
    (T, V, B, Ts, K) and reduce; else score every student row against every teacher row over K with one
    einsum (T, V, B, Ts, Tt) and gather the matched score."""
    tp = F.softmax((ins.t_region.float() - ins.center.float()) / TEACHER_TEMP, dim=-1)  # T, B, Tt, K
    n_t = tp.shape[0]
    total, v0 = 0.0, 0
    for sl, idx in zip(ins.s_region, stacked_match(ins.s_feats, ins.t_feats)):
        logp = F.log_softmax(sl.float() / STUDENT_TEMP, dim=-1)  # V, B, Ts, K
        n_v, b, ts, k = logp.shape
        if gather_rows:
            rows = torch.gather(tp[:, None].expand(n_t, n_v, *tp.shape[1:]), 3,
                                idx[..., None].expand(-1, -1, -1, -1, k))
            ce = -(rows * logp[None]).sum(-1)  # T, V, B, Ts
        else:
            scores = torch.einsum("tbuk,vbsk->tvbsu", tp, logp)  # T, V, B, Ts, Tt
            ce = -torch.gather(scores, 4, idx[..., None])[..., 0]
        ce = ce.mean(dim=(2, 3))  # T, V
        valid = torch.arange(n_t, device=ce.device)[:, None] != torch.arange(v0, v0 + n_v, device=ce.device)[None]
        total = total + ce[valid].sum()
        v0 += n_v
    return total / ins.shape.pairs


# ------------------------------------------------------------------------------------------------ registry

_COMPOSED = "cuda has no multi_region_loss kernel: region_match + region_loss (cuda) per pair"
_REF = "EsViT-style reference: loops over the pairs, materialises sim, gathered rows and log-softmax"
_STACK_GATHER = "stacked crops: one matmul+argmax per group, batched gather of the teacher rows"
_STACK_SCORES = "stacked crops: einsum over K of every student/teacher row pair, gather of the matched score"


def _providers() -> dict[str, list[Provider]]:
    def ours(scope: str, build: Callable[[str], Callable], ops: dict[str, str]) -> list[Provider]:
        out = []
        for b in ("triton", "cuda", "torch"):
            if scope == "region" and b == "cuda":
                out.append(Provider(b, "ours", build(b), backend_check(b, "region_match", "region_loss"),
                                    note=_COMPOSED))
            else:
                modes = ("fwd",) if scope == "match" else INTERPRETER_MODES
                out.append(Provider(b, "ours", build(b), backend_check(b, ops[scope], interpreter_modes=modes)))
        return out

    ops = {"view": "dino_loss", "region": "multi_region_loss", "match": "region_match"}
    return {
        "view": ours("view", _ours_view, ops) + [
            Provider("esvit_ref", "peer", _ref_view(False), note=_REF),
            Provider("compiled_ref", "peer", _ref_view(True), compiles=True, note="torch.compile(reference)"),
            Provider("stacked_einsum", "peer", lambda ins: Forward(
                lambda: stacked_view(ins.s_view, ins.t_view, ins.center), ins.grads()),
                note="stacked crops: one einsum over all (teacher, student) pairs"),
        ],
        "region": ours("region", _ours_region, ops) + [
            Provider("esvit_ref", "peer", _ref_region(False), note=_REF),
            Provider("compiled_ref", "peer", _ref_region(True), compiles=True, note="torch.compile(reference)"),
            Provider("stacked_einsum", "peer", lambda ins: Forward(lambda: stacked_region(ins, True), ins.grads()),
                     note=_STACK_GATHER),
            Provider("stacked_scores", "peer", lambda ins: Forward(lambda: stacked_region(ins, False), ins.grads()),
                     note=_STACK_SCORES),
        ],
        "match": ours("match", _ours_match, ops) + [
            Provider("esvit_ref", "peer", _ref_match(False), note=_REF),
            Provider("compiled_ref", "peer", _ref_match(True), compiles=True, note="torch.compile(reference)"),
            Provider("stacked_einsum", "peer", lambda ins: Forward(lambda: stacked_match(ins.s_feats, ins.t_feats)),
                     note="stacked crops: one batched matmul + argmax per crop group"),
        ],
    }


PROVIDERS = _providers()
SCOPE_MODES = {"view": ("fwd", "bwd", "fwd+bwd"), "region": ("fwd", "bwd", "fwd+bwd"), "match": ("fwd",)}


def bytes_min(shape: LossShape, dtype: str, scope: str, mode: str) -> int:
    """Minimum traffic: forward reads every logit (and feature) once; backward reads the student and
    teacher logits again and writes the student gradient; fwd+bwd is the sum. The matching reads the
    features and writes one index per student token and pair."""
    elt = torch.empty((), dtype=DTYPES[dtype]).element_size()
    s = shape
    s_tok = s.global_crops * s.global_tokens + s.local_crops * s.local_tokens
    t_tok = s.global_crops * s.global_tokens
    if scope == "view":
        student, teacher, feats = s.crops * s.batch * s.k * elt, s.global_crops * s.batch * s.k * elt, 0
    else:
        student, teacher = s_tok * s.batch * s.k * elt, t_tok * s.batch * s.k * elt
        feats = (s_tok + t_tok) * s.batch * s.d * elt
    if scope == "match":
        return feats + s.global_crops * s_tok * s.batch * 8
    fwd = student + teacher + feats
    bwd = 2 * student + teacher
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def loss_case(ctx: RunContext, shape: LossShape, dtype: str, scope: str) -> Case:
    """One loss case: every provider of ``scope`` in the scope's modes."""
    return Case(
        suite="losses", scope=scope, shape_name=shape.name, shape=shape.as_dict(), dtype=dtype,
        modes=SCOPE_MODES[scope], make_inputs=lambda: make_inputs(shape, dtype, scope, ctx.device),
        providers=ctx.select(PROVIDERS[scope]), bytes_min=lambda mode: bytes_min(shape, dtype, scope, mode),
    )


def headline_shape(device: torch.device) -> LossShape:
    """gpu-check's headline: the Swin-T step's losses per GPU (B=32, K=65536); the smoke shape on the CPU."""
    return LossShape(32, 65536, 768) if device.type == "cuda" else plan(device, True)[0][0]


def cases(ctx: RunContext) -> Iterator[Case]:
    for shape, dtype in plan(ctx.device, ctx.quick):
        if not ctx.wants(shape.name, dtype):
            continue
        for scope in ("region", "view", "match"):
            yield loss_case(ctx, shape, dtype, scope)


def run(ctx: RunContext) -> Iterator[list[Record]]:
    return run_cases(cases(ctx), ctx)
