"""EsViT's pretraining loss: w_v * L_V + w_r * L_R with two centers, on the fused loss kernels.

Per (teacher view t, student crop v != t) pair the official ``DDINOLoss`` adds 0.5 * view CE + 0.5 *
region CE (each a batch mean), sums over pairs and divides by the number of pairs. Both
:func:`esvit_kernels.dino_loss` and :func:`esvit_kernels.multi_region_loss` already average over the
pairs, so ``w_v * L_V + w_r * L_R`` is exactly that with ``w_v = w_r = 0.5`` (the defaults).

Region matching uses the L2-normalised *backbone* region tokens (after the final LayerNorm), not the head
outputs. Centers: the view center is the EMA (momentum 0.9) of the mean of the teacher's 2B global-crop
view-head outputs, the region center that of the mean over all teacher region-head tokens; both means are
all-reduced across ranks and the centers are updated after the loss (by rebinding, never in place, so a
fused kernel that saved the old center for its backward still sees it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

import esvit_kernels

from .models.wrapper import MultiCropOutput

__all__ = ["EsViTLoss", "LossOutput"]


@dataclass
class LossOutput:
    total: torch.Tensor
    view: torch.Tensor
    region: torch.Tensor | None


class EsViTLoss(nn.Module):
    """View (+ region) DINO loss with its centers (buffers ``center`` and ``region_center``, shape (1, K))."""

    def __init__(
        self, out_dim: int, *, view_weight: float = 0.5, region_weight: float = 0.5, student_temp: float = 0.1,
        center_momentum: float = 0.9, backend: str = "auto",
    ) -> None:
        super().__init__()
        if view_weight <= 0 or region_weight < 0:
            raise ValueError(f"need view_weight > 0 and region_weight >= 0, got {view_weight}, {region_weight}")
        self.view_weight, self.region_weight = float(view_weight), float(region_weight)
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))

    @property
    def use_region(self) -> bool:
        return self.region_weight > 0

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, teacher_temp: float) -> LossOutput:
        """Loss of one step; updates the centers from ``teacher`` afterwards."""
        kw = {"student_temp": self.student_temp, "teacher_temp": float(teacher_temp), "backend": self.backend}
        view = esvit_kernels.dino_loss(student.view_logits, teacher.view_logits, self.center, **kw)
        total = self.view_weight * view
        region = None
        if self.use_region:
            if student.region_logits is None or teacher.region_logits is None:
                raise ValueError("region_weight > 0 needs region-head outputs from student and teacher")
            if len(teacher.region_logits) != 1:
                raise ValueError("the teacher's crops must all have one resolution")
            region = esvit_kernels.multi_region_loss(
                student.region_logits, student.region_feats, teacher.region_logits[0], teacher.region_feats[0],
                self.region_center, **kw,
            )
            total = total + self.region_weight * region
        self.update_centers(teacher)
        return LossOutput(total, view, region)

    @torch.no_grad()
    def update_centers(self, teacher: MultiCropOutput) -> None:
        """EMA of the (all-reduced) batch means of the teacher's view and region head outputs."""
        m = self.center_momentum
        self.center = self.center * m + _global_mean(teacher.view_logits) * (1 - m)
        if self.use_region and teacher.region_logits is not None:
            self.region_center = self.region_center * m + _global_mean(teacher.region_logits[0]) * (1 - m)


def _global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every row of ``x`` (..., K) on every rank -> (1, K) float32."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    total = x.sum(dim=0, keepdim=True)
    count = x.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
        count *= dist.get_world_size()
    return total / count
