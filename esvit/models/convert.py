"""Load foreign Swin weights into :class:`esvit.models.swin.SwinTransformer`.

Accepted inputs (a path or a state dict):

* official Swin / EsViT backbone state dicts -- our parameter names are theirs; the derived buffers
  (``relative_position_index``, ``attn_mask``) and classifier (``head.*``) are dropped;
* full EsViT training checkpoints (``{"teacher": ..., "student": ...}`` with ``module.`` / ``backbone.``
  prefixes, ``head`` / ``head_dense`` projection heads dropped);
* timm ``SwinTransformer`` state dicts -- timm puts each patch merging at the *start* of the next stage
  (``layers.{i+1}.downsample``) where the official code has it at the end (``layers.{i}.downsample``);
  the sub-grid concatenation order of both is the same, so only the keys move.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CheckpointError

__all__ = ["convert_swin_state_dict", "load_swin_weights"]

_DROP = ("relative_position_index", "attn_mask")


def _unwrap(sd: Mapping, which: str) -> Mapping:
    for key in (which, "model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            return sd[key]
    return sd


def convert_swin_state_dict(state_dict: Mapping[str, torch.Tensor], which: str = "teacher") -> dict[str, torch.Tensor]:
    """Official / EsViT / timm Swin weights -> our backbone's state dict (backbone keys only)."""
    sd = dict(_unwrap(state_dict, which))
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if any(n in k for n in _DROP) or k.startswith(("head.", "head_dense.", "region_head.")):
            continue
        out[k] = v
    is_timm = "layers.0.downsample.reduction.weight" not in out and any(
        re.match(r"layers\.\d+\.downsample\.", k) for k in out
    )
    if is_timm:
        out = {re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k): v
               for k, v in out.items()}
    return out


def load_swin_weights(model: nn.Module, source: str | Mapping[str, torch.Tensor], which: str = "teacher") -> nn.Module:
    """Load official / EsViT / timm Swin weights (a path or a state dict) into ``model``, strictly."""
    if isinstance(source, str):
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except FileNotFoundError as exc:
            raise CheckpointError(f"no such checkpoint: {source}") from exc
        except Exception as exc:
            raise CheckpointError(f"cannot read Swin weights from {source}: {exc}") from exc
    sd = convert_swin_state_dict(source, which)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"these weights do not fit the model ({type(model).__name__}): {exc}") from exc
    return model
