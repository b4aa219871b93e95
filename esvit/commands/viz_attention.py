"""``esvit viz-attention``: per-head attention maps of the backbone's last stage over an image."""

from __future__ import annotations

import argparse

HELP = "draw the last stage's attention maps, one per head, over an image"
DESCRIPTION = """\
Attention of the last block of the last stage, per head, over the image at the model's crop size. The
fused kernels do not return attention probabilities, so they are recomputed from the block's own weights
with the eager reference math (for Swin at its training resolution the last stage is a single window over
the whole map; ViL's last stage runs full attention). --query mean (default) shows, per position, the
attention it receives averaged over all query positions; --query center the attention of the centre token;
--query cls (ViT; ViL with a global token in its last stage) that of the CLS / first global token.

Example:
  esvit viz-attention --checkpoint runs/demo/checkpoint.pth --image cat.png --output attn.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..viz.attention import QUERIES
    from ..viz.common import add_picture_arguments

    p.add_argument("--query", choices=QUERIES, default="mean", help="which attention rows to show (default mean)")
    p.add_argument("--columns", type=int, default=6, help="panels per row (default 6)")
    add_picture_arguments(p, panel=192)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..viz.attention import attention_maps, draw_attention, last_block_attention
    from ..viz.common import model_and_image

    if args.columns < 1:
        raise ConfigError("--columns must be >= 1")
    model, x = model_and_image(args)
    try:
        probs, grid, has_cls = last_block_attention(model.backbone, x)
        maps = attention_maps(probs, grid, has_cls, args.query)[0].cpu()
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    title = f"{model.arch}, {model.source}: last block, {maps.shape[0]} heads, {grid[0]}x{grid[1]} tokens, " \
            f"query {args.query}"
    size = draw_attention(x.cpu(), maps, args.output, panel=args.panel_size, cols=args.columns, title=title)
    print(f"{maps.shape[0]} attention maps ({grid[0]}x{grid[1]} tokens, query {args.query}) of {model.source}")
    print(f"picture ({size[0]}x{size[1]}) written to {args.output}")
    return 0
