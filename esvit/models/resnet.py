"""ResNet-50 baseline (torchvision, no pretrained weights): pooled final map = view feature, the final
map's positions = region features (no normalisation, as in the official EsViT wrapper of convnets)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["ResNetBackbone"]


class ResNetBackbone(nn.Module):
    """torchvision ResNet without the classifier, returning ``(pooled (B, 2048), map tokens (B, h*w, 2048))``."""

    def __init__(self, depth: int = 50, use_checkpoint: bool = False) -> None:
        super().__init__()
        from torchvision.models import resnet50

        if depth != 50:
            raise ValueError(f"only ResNet-50 is provided, got depth {depth}")
        net = resnet50(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.num_features = net.fc.in_features
        self.use_checkpoint = use_checkpoint

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> final feature map (B, 2048, H/32, W/32)."""
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.use_checkpoint and torch.is_grad_enabled() and self.training:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.forward_map(x).flatten(2).transpose(1, 2)
        return tokens.mean(dim=1), tokens

    def forward_return_n_last_blocks(self, x: torch.Tensor, n: int = 4) -> torch.Tensor:
        """The pooled final feature (2048-d) whatever ``n`` is (convnets are evaluated on it)."""
        return self.forward(x)[0]
