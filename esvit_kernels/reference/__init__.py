"""Eager PyTorch references of every fused op: the oracle of the tests and the ``torch`` backend."""

from .losses import dino_loss, multi_region_loss, region_loss, region_match, teacher_probs
from .neighborhood import global_token_attention, neighborhood_window_attention
from .window import (
    gather_relative_bias,
    relative_position_index,
    shift_mask,
    shift_region_labels,
    shifted_window_attention,
    window_attention,
    window_partition,
    window_reverse,
)

__all__ = [
    "dino_loss",
    "gather_relative_bias",
    "global_token_attention",
    "multi_region_loss",
    "neighborhood_window_attention",
    "region_loss",
    "region_match",
    "relative_position_index",
    "shift_mask",
    "shift_region_labels",
    "shifted_window_attention",
    "teacher_probs",
    "window_attention",
    "window_partition",
    "window_reverse",
]
