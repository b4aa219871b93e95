"""Backbones, heads and the multi-crop wrapper of EsViT.

:func:`create_backbone` builds every architecture of the paper's tables with one contract: ``.num_features``,
``forward(x) -> (view_feature (B, C), region_tokens (B, L, C))`` and ``forward_return_n_last_blocks(x, n)``.
"""

from __future__ import annotations

import math

from torch import nn

from esvit_kernels.nn import WindowAttention

from .convert import convert_swin_state_dict, load_swin_weights
from .cvt import CVT_ARCHS, CvTAttention, CvTTransformer, convert_cvt_state_dict, min_input_size
from .heads import DINOHead
from .resnet import ResNetBackbone
from .swin import SWIN_ARCHS, SwinTransformer
from .vil import VIL_ARCHS, LongformerAttention, VisionLongformer, parse_vil_arch
from .vit import VIT_ARCHS, VisionTransformer
from .wrapper import MultiCropOutput, MultiCropWrapper

__all__ = [
    "ARCHS",
    "CVT_ARCHS",
    "CvTTransformer",
    "DINOHead",
    "MultiCropOutput",
    "MultiCropWrapper",
    "ResNetBackbone",
    "SWIN_ARCHS",
    "SwinTransformer",
    "VIL_ARCHS",
    "VIT_ARCHS",
    "VisionLongformer",
    "VisionTransformer",
    "convert_cvt_state_dict",
    "convert_swin_state_dict",
    "create_backbone",
    "load_swin_weights",
    "min_crop_size",
    "set_backend",
]

ARCHS: tuple[str, ...] = (*SWIN_ARCHS, *VIT_ARCHS, "resnet50", *CVT_ARCHS, *VIL_ARCHS)


def min_crop_size(name: str, patch_size: int = 16) -> int:
    """Smallest crop (pixels) the architecture can embed: one patch (Swin 4, ViT ``patch_size``, ResNet 32,
    CvT one token after its strided token embeddings: 3, ViL the product of its stages' patch sizes: 32,
    vil_micro 16)."""
    if name in SWIN_ARCHS:
        return 4
    if name in CVT_ARCHS:
        a = CVT_ARCHS[name]
        return min_input_size(a.patch_sizes, a.patch_strides, a.patch_paddings)
    if name in VIL_ARCHS:
        return math.prod(s.patch_size for s in parse_vil_arch(VIL_ARCHS[name].arch))
    if name in VIT_ARCHS:
        return patch_size
    return 32


def create_backbone(
    name: str, *, window_size: int = 7, img_size: int = 224, backend: str = "auto",
    drop_path_rate: float | None = None, use_checkpoint: bool = False, **kwargs,
) -> nn.Module:
    """Build a backbone by name: swin_micro | swin_micro_conv | swin_tiny | swin_small | swin_base | deit_small |
    vit_base | resnet50 | cvt_micro | cvt_v4_s1 (and its _rpe, _shift, _rpe_shift variants) | vil_micro |
    vil_2262 | vil_small.

    Args:
        window_size: Swin / CvT window (7 or 14); ignored by the others (a ViL's windows are in its arch
            string).
        img_size: global crop size; fixes Swin's per-stage windows, the ViT position-embedding grid and ViL's
            full-attention bias tables and position-embedding grids (CvT picks its windows per map, as the
            official code).
        backend: window-attention backend for Swin and CvT ("auto" | "triton" | "cuda" | "torch") and ViL's
            sparse attention ("auto" | "triton" | "torch").
        drop_path_rate: None = the architecture's default (0.1 for T, 0.2 for S/B, 0.1 for the ViTs);
            pass 0 for a teacher.
        use_checkpoint: gradient (activation) checkpointing of every block.
        kwargs: overrides of the architecture's fields (Swin: embed_dim, depths, num_heads, mlp_ratio,
            norm_eps, patch_size; ViT: embed_dim, depth, num_heads, patch_size, norm_eps; CvT: the fields of
            :class:`esvit.models.cvt.CvTArch`, e.g. shift, rel_pos_embed; ViL: arch (an official arch string),
            mode (-1 | 0 | 1), share_w, norm_embed, norm_eps).
    """
    if name in SWIN_ARCHS:
        a = SWIN_ARCHS[name]
        spec = {"embed_dim": a.embed_dim, "depths": a.depths, "num_heads": a.num_heads, "stem": a.stem,
                "drop_path_rate": a.drop_path_rate if drop_path_rate is None else drop_path_rate}
        spec.update(kwargs)
        return SwinTransformer(img_size=img_size, window_size=window_size, backend=backend,
                               use_checkpoint=use_checkpoint, **spec)
    if name in VIT_ARCHS:
        a = VIT_ARCHS[name]
        spec = {"embed_dim": a.embed_dim, "depth": a.depth, "num_heads": a.num_heads,
                "drop_path_rate": a.drop_path_rate if drop_path_rate is None else drop_path_rate}
        spec.update(kwargs)
        return VisionTransformer(img_size=img_size, use_checkpoint=use_checkpoint, **spec)
    if name in VIL_ARCHS:
        a = VIL_ARCHS[name]
        spec = {"arch": a.arch, "mode": a.mode,
                "drop_path_rate": a.drop_path_rate if drop_path_rate is None else drop_path_rate}
        spec.update(kwargs)
        return VisionLongformer(img_size=img_size, backend=backend, use_checkpoint=use_checkpoint, **spec)
    if name == "resnet50":
        if kwargs:
            raise ValueError(f"resnet50 takes no architecture overrides, got {sorted(kwargs)}")
        return ResNetBackbone(50, use_checkpoint=use_checkpoint)
    if name in CVT_ARCHS:
        return _cvt(name, window_size=window_size, backend=backend, drop_path_rate=drop_path_rate,
                    use_checkpoint=use_checkpoint, **kwargs)
    raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every fused attention module (Swin's and CvT's window attention, ViL's sparse attention) of
    ``model`` to ``backend`` (weights unchanged)."""
    for m in model.modules():
        if isinstance(m, (WindowAttention, CvTAttention, LongformerAttention)):
            m.backend = backend
    return model


def _cvt(name: str, *, drop_path_rate: float | None = None, **kwargs) -> CvTTransformer:
    """A CvT preset with ``kwargs`` overriding its fields (and window_size, backend, use_checkpoint)."""
    spec = vars(CVT_ARCHS[name]).copy()
    if drop_path_rate is not None:
        spec["drop_path_rate"] = drop_path_rate
    spec.update(kwargs)
    return CvTTransformer(**spec)
