"""Eager PyTorch reference for EsViT's region matching, region loss L_R and view (DINO) loss L_V.

Written the way the official ``DDINOLoss`` computes them (materialising the similarity matrix, the
gathered teacher rows and the softmax copies), so the fused kernels have an oracle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["region_match", "region_loss", "dino_loss", "multi_region_loss", "teacher_probs", "teacher_mean"]


def region_match(student_feats: torch.Tensor, teacher_feats: torch.Tensor) -> torch.Tensor:
    """(B, Ts, D), (B, Tt, D) -> (B, Ts) index of the most cosine-similar teacher token.

    Ties resolve to the lowest teacher index (``torch.max`` over dim 2 of the B x Ts x Tt matrix, with a
    stable first-occurrence argmax). A NaN similarity wins, as NaN does in ``torch.max``: the lowest-index
    NaN is chosen (index 0 for a token whose similarities are all NaN), so the result is always in [0, Tt)
    and a NaN feature reaches the loss instead of being matched around.
    """
    s = F.normalize(student_feats.float(), dim=-1)
    t = F.normalize(teacher_feats.float(), dim=-1)
    sim = s @ t.transpose(1, 2)  # B x Ts x Tt
    sim = sim.masked_fill(~sim.isfinite(), float("inf"))  # above every cosine: NaN wins, lowest index first
    best = sim.max(dim=2, keepdim=True).values
    tt = sim.shape[2]
    ar = torch.arange(tt, device=sim.device).expand_as(sim)
    # first index attaining the maximum
    return torch.where(sim == best, ar, tt).min(dim=2).values


def teacher_probs(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((teacher - center) / teacher_temp) over the last dim, in fp32."""
    return F.softmax((teacher_logits.float() - center.float().reshape(-1)) / teacher_temp, dim=-1)


def teacher_mean(teacher_logits: torch.Tensor) -> torch.Tensor:
    """(1, K) float32 mean of every teacher row (all leading dims): the center EMA's batch statistic."""
    k = teacher_logits.shape[-1]
    return teacher_logits.detach().float().reshape(-1, k).mean(dim=0, keepdim=True)


def region_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    match_index: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over (b, i) of -sum_k softmax((t[b, m[b,i]] - c) / tt)_k * log_softmax(s[b, i] / ts)_k."""
    t = teacher_probs(teacher_logits, center, teacher_temp).detach()  # B x Tt x K
    k = t.shape[-1]
    gathered = torch.gather(t, 1, match_index.long().unsqueeze(2).expand(-1, -1, k))  # B x Ts x K
    logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return torch.sum(-gathered * logp, dim=-1).mean()


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """student (S, B, K) crops, teacher (T, B, K) global crops: mean over pairs (t, v != t) of the
    batch-mean cross-entropy between the teacher's centred, sharpened softmax and the student log-softmax."""
    t = teacher_probs(teacher_logits, center, teacher_temp).detach()
    logp = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    total, pairs = 0.0, 0
    for iq in range(t.shape[0]):
        for v in range(logp.shape[0]):
            if v == iq:
                continue
            total = total + torch.sum(-t[iq] * logp[v], dim=-1).mean()
            pairs += 1
    return total / pairs


def multi_region_loss(
    student_logits: Sequence[torch.Tensor],
    student_feats: Sequence[torch.Tensor],
    teacher_logits: torch.Tensor,
    teacher_feats: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Region loss over every (teacher view t, student crop v != t) pair, as the EsViT training step needs.

    student_logits / student_feats: groups of crops of one resolution, in crop order, each
    (V_g, B, T_g, K) / (V_g, B, T_g, D); the first T student crops are the teacher's views.
    teacher_logits (T, B, Tt, K), teacher_feats (T, B, Tt, D). Returns the mean over pairs of
    :func:`region_loss` with the matching of :func:`region_match` on the backbone features.
    """
    crops_l = [c for g in student_logits for c in g.unbind(0)]
    crops_f = [c for g in student_feats for c in g.unbind(0)]
    total, pairs = 0.0, 0
    for iq in range(teacher_logits.shape[0]):
        for v in range(len(crops_l)):
            if v == iq:
                continue
            idx = region_match(crops_f[v], teacher_feats[iq])
            total = total + region_loss(
                crops_l[v], teacher_logits[iq], idx, center, student_temp, teacher_temp
            )
            pairs += 1
    return total / pairs
