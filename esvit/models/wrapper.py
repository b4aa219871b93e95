"""Multi-crop wrapper: backbone + view head + region head over a list of crops.

Crops of equal resolution run as one batch (the official wrapper groups *consecutive* crops with
``torch.unique_consecutive`` on their size), the view head runs once on every crop's view feature and the
region head once on every region token; outputs come back per resolution group with the per-crop token
counts the region loss needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["MultiCropOutput", "MultiCropWrapper", "group_crops"]


@dataclass
class MultiCropOutput:
    """Outputs of :class:`MultiCropWrapper` for ``n`` crops of a batch of ``B`` images.

    view_logits: (n, B, K) view-head outputs, crop-major.
    region_logits: per resolution group, (V_g, B, T_g, K) region-head outputs (None without a region head).
    region_feats: per resolution group, (V_g, B, T_g, C) backbone region tokens (after the final norm).
    view_feats: (n, B, C) backbone view features.
    """

    view_logits: torch.Tensor
    region_logits: list[torch.Tensor] | None
    region_feats: list[torch.Tensor]
    view_feats: torch.Tensor

    @property
    def tokens_per_crop(self) -> list[int]:
        return [f.shape[2] for f in self.region_feats for _ in range(f.shape[0])]


def group_crops(crops: list[torch.Tensor]) -> list[tuple[int, int]]:
    """[start, end) of every run of consecutive crops with one spatial size."""
    if not crops:
        raise ValueError("need at least one crop")
    groups, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            groups.append((start, i))
            start = i
    return groups


class MultiCropWrapper(nn.Module):
    """``forward(crops)`` -> :class:`MultiCropOutput`. Parameter names: ``backbone.*``, ``head.*``,
    ``region_head.*`` (the region head is absent when training with the view loss only)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, region_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.region_head = region_head

    def forward(self, crops: list[torch.Tensor] | torch.Tensor) -> MultiCropOutput:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        b = crops[0].shape[0]
        if any(c.shape[0] != b for c in crops):
            raise ValueError(f"every crop must have the same batch size, got {[c.shape[0] for c in crops]}")
        views, feats = [], []
        for start, end in group_crops(crops):
            v = end - start
            view, regions = self.backbone(torch.cat(crops[start:end]) if v > 1 else crops[start])
            views.append(view)
            feats.append(regions.reshape(v, b, regions.shape[1], regions.shape[2]))
        view_feats = torch.cat(views) if len(views) > 1 else views[0]
        view_logits = self.head(view_feats)
        region_logits = None
        if self.region_head is not None:
            flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])
            out = self.region_head(flat)
            region_logits = [o.reshape(*f.shape[:3], -1) for o, f in zip(out.split([f[..., 0].numel() for f in feats]),
                                                                         feats)]
        return MultiCropOutput(
            view_logits=view_logits.reshape(len(crops), b, -1),
            region_logits=region_logits,
            region_feats=feats,
            view_feats=view_feats.reshape(len(crops), b, -1),
        )
