"""esvit-kernels: fused Triton and CUDA kernels for Swin window attention and EsViT's losses.

Public API (every op takes ``backend="auto" | "triton" | "cuda" | "torch"``):

* :func:`window_attention`, :func:`shifted_window_attention` -- window attention with relative-position
  bias; the shifted version folds pad / roll / partition / mask / reverse into the kernel's addressing.
* :func:`neighborhood_window_attention`, :func:`global_token_attention` -- Vision Longformer's (ViL)
  3x3-window attention with global tokens, the neighbourhood gathered by index arithmetic.
* :func:`region_match`, :func:`region_loss`, :func:`multi_region_loss`, :func:`dino_loss` -- EsViT's
  region matching, region loss L_R and view loss L_V as streaming passes over the logits.
* :mod:`esvit_kernels.nn` -- drop-in ``WindowAttention``; :func:`patch_timm_swin` -- make a timm Swin use
  the fused kernels in place.
* :func:`available_backends` -- which backends run here and why (not); ``python -m esvit_kernels``
  prints it.
"""

from . import nn, reference
from .backends import BackendStatus, BackendUnavailableError, available_backends, resolve_backend
from .functional import (
    dino_loss,
    global_token_attention,
    multi_region_loss,
    neighborhood_window_attention,
    region_loss,
    region_match,
    shifted_window_attention,
    window_attention,
)
from .timm_patch import patch_timm_swin

__version__ = "0.1.0"

__all__ = [
    "BackendStatus",
    "BackendUnavailableError",
    "available_backends",
    "dino_loss",
    "global_token_attention",
    "multi_region_loss",
    "neighborhood_window_attention",
    "nn",
    "patch_timm_swin",
    "reference",
    "region_loss",
    "region_match",
    "resolve_backend",
    "shifted_window_attention",
    "window_attention",
]
