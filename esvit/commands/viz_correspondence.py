"""``esvit viz-correspondence``: match an image's regions to those of its flipped, jittered view."""

from __future__ import annotations

import argparse

HELP = "draw region correspondences between an image and its flipped, colour-jittered view"
DESCRIPTION = """\
The paper's "intriguing property": without supervision, the final region features of an image and of an
augmented view of it (horizontal flip + colour jitter, same size) correspond. Every region token of the
image is matched to the view token of highest cosine similarity; the picture shows the two side by side
with a line for each of the --num-lines most confident matches (green: on the mirrored cell, red: not).

Printed: the correspondence accuracy = the fraction of all region tokens whose match is exactly the
mirrored cell (r, w-1-c) (chance = 1 / tokens).

Example:
  esvit viz-correspondence --checkpoint runs/demo/checkpoint.pth --image cat.png --output corr.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..viz.common import add_picture_arguments

    p.add_argument("--num-lines", type=int, default=24, help="matches drawn (most confident first; default 24)")
    p.add_argument("--no-jitter", action="store_true", help="flip only (no colour jitter)")
    add_picture_arguments(p, panel=384)


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..viz.common import model_and_image
    from ..viz.correspondence import augmented_view, draw_correspondence, match_regions

    if args.num_lines < 0:
        raise ConfigError("--num-lines must be >= 0")
    model, x = model_and_image(args)
    view = augmented_view(x.cpu(), seed=args.seed, jitter=not args.no_jitter).to(x.device)
    corr = match_regions(model.backbone, x, view)[0]
    h, w = corr.grid
    title = f"{model.arch}, {model.source}"
    size = draw_correspondence(x.cpu(), view.cpu(), corr, args.output, num_lines=args.num_lines,
                               panel=args.panel_size, title=title)
    print(f"correspondence accuracy {100 * corr.accuracy:.1f}% ({int(corr.correct.sum())} of {h * w} tokens on the "
          f"mirrored cell; chance {100 / (h * w):.1f}%), {model.source}")
    print(f"picture ({size[0]}x{size[1]}) written to {args.output}")
    return 0
