"""EsViT's pretraining loss: w_v * L_V + w_r * L_R with two centers, on the fused loss kernels.

Per (teacher view t, student crop v != t) pair the official ``DDINOLoss`` adds 0.5 * view CE + 0.5 *
region CE (each a batch mean), sums over pairs and divides by the number of pairs. Both
:func:`esvit_kernels.dino_loss` and :func:`esvit_kernels.multi_region_loss` already average over the
pairs, so ``w_v * L_V + w_r * L_R`` is exactly that with ``w_v = w_r = 0.5`` (the defaults). With
``w_r = 0`` the loss is the official view-only ``DINOLoss``, ``L_V`` at weight 1 whatever ``w_v`` says.

Region matching uses the L2-normalised *backbone* region tokens (after the final LayerNorm), not the head
outputs. Centers: the view center is the EMA (momentum 0.9) of the mean of the teacher's 2B global-crop
view-head outputs, the region center that of the mean over all teacher region-head tokens; both means are
all-reduced across ranks and the centers are updated after the loss (by rebinding, never in place, so a
fused kernel that saved the old center for its backward still sees it). The batch means come out of the
loss kernels' teacher pass (``return_teacher_mean=True``): no second pass, no fp32 copy of the logits.
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
        center_momentum: float = 0.9, backend: str = "auto", region_teacher_temp: float | None = None,
        region_center_momentum: float | None = None,
    ) -> None:
        super().__init__()
        if view_weight <= 0 or region_weight < 0:
            raise ValueError(f"need view_weight > 0 and region_weight >= 0, got {view_weight}, {region_weight}")
        self.region_weight = float(region_weight)
        self.view_weight = float(view_weight) if region_weight > 0 else 1.0  # 'V only': the official DINO loss
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.backend = backend
        # not in the official recipe (None: the region targets share the view's temperature and centre momentum)
        self.region_teacher_temp = None if region_teacher_temp is None else float(region_teacher_temp)
        self.region_center_momentum = self.center_momentum if region_center_momentum is None \
            else float(region_center_momentum)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("region_center", torch.zeros(1, out_dim))

    @property
    def use_region(self) -> bool:
        return self.region_weight > 0

    def forward(self, student: MultiCropOutput, teacher: MultiCropOutput, teacher_temp: float) -> LossOutput:
        """Loss of one step; updates the centers from ``teacher`` afterwards."""
        kw = {"student_temp": self.student_temp, "teacher_temp": float(teacher_temp), "backend": self.backend}
        view, view_mean = esvit_kernels.dino_loss(student.view_logits, teacher.view_logits, self.center,
                                                  return_teacher_mean=True, **kw)
        total = self.view_weight * view
        region = region_mean = None
        if self.use_region:
            if student.region_logits is None or teacher.region_logits is None:
                raise ValueError("region_weight > 0 needs region-head outputs from student and teacher")
            if len(teacher.region_logits) != 1:
                raise ValueError("the teacher's crops must all have one resolution")
            if self.region_teacher_temp is not None:
                kw = kw | {"teacher_temp": self.region_teacher_temp}
            region, region_mean = esvit_kernels.multi_region_loss(
                student.region_logits, student.region_feats, teacher.region_logits[0], teacher.region_feats[0],
                self.region_center, return_teacher_mean=True, **kw,
            )
            total = total + self.region_weight * region
        self.update_centers(view_mean, region_mean)
        return LossOutput(total, view, region)

    @torch.no_grad()
    def update_centers(self, view_mean: torch.Tensor, region_mean: torch.Tensor | None) -> None:
        """EMA of the batch means (1, K) of the teacher's view and region head outputs, averaged over ranks
        (every rank has the same batch size, so the mean of the ranks' means is the global mean)."""
        m = self.center_momentum
        self.center = self.center * m + _rank_mean(view_mean) * (1 - m)
        if region_mean is not None:
            r = self.region_center_momentum
            self.region_center = self.region_center * r + _rank_mean(region_mean) * (1 - r)


def _rank_mean(mean: torch.Tensor) -> torch.Tensor:
    """Average a (1, K) float32 batch mean over the ranks."""
    mean = mean.detach().float().reshape(1, -1)
    if dist.is_available() and dist.is_initialized():
        mean = mean.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
    return mean
