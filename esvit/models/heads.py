"""DINO projection head, used twice by EsViT: once on the view feature, once (a separate head) on every
region token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation ``W = g * v / ||v||`` (row-wise).

    Same parameters and names as ``nn.utils.weight_norm(nn.Linear(in, out, bias=False))`` (``weight_g``
    (out, 1), ``weight_v`` (out, in)) so official DINO / EsViT head weights load unchanged.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        lin = nn.Linear(in_features, out_features, bias=False)  # v gets nn.Linear's default init, as in DINO
        self.weight_v = nn.Parameter(lin.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())

    def extra_repr(self) -> str:
        return f"in_features={self.weight_v.shape[1]}, out_features={self.weight_v.shape[0]}"


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (nlayers-1), Linear to the bottleneck) -> L2-normalise -> weight-normed Linear to K.

    ``norm_last_layer=True`` freezes the last layer's gain at 1 (the official teacher-side default; EsViT's
    Swin-T run trains it, ``norm_last_layer=False``).
    """

    def __init__(
        self, in_dim: int, out_dim: int = 65536, *, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        nlayers: int = 3, use_bn: bool = False, norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            for i in range(nlayers - 1):
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
                layers.append(nn.Linear(hidden_dim, hidden_dim if i < nlayers - 2 else bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
