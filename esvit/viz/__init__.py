"""Pictures of what a backbone learnt: region correspondences across views, last-stage attention maps."""

from .attention import attention_maps, draw_attention, last_block_attention
from .common import load_image
from .correspondence import (
    Correspondence,
    augmented_view,
    correspondence_accuracy,
    draw_correspondence,
    match_regions,
)

__all__ = [
    "Correspondence",
    "attention_maps",
    "augmented_view",
    "correspondence_accuracy",
    "draw_attention",
    "draw_correspondence",
    "last_block_attention",
    "load_image",
    "match_regions",
]
