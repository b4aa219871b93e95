"""``esvit make-dataset``: write the generated, labelled ImageFolder (no download needed)."""

from __future__ import annotations

import argparse

HELP = "write a generated, labelled image dataset (ImageFolder of PNGs)"
DESCRIPTION = """\
Write a deterministic, labelled ImageFolder of generated PNG images. --kind textures (default): 10
classes of full-image patterns (stripes, checker, dots, grid, rings, waves, zigzag, blobs, radial, hatch)
with a random orientation, period and phase, in two colour fields that vary smoothly over the image, so
only the pattern is shared by all crops of an image. --kind shapes: each class is a shape x texture pair
(8 shapes x 4 textures, up to 32 classes) with a random colour, position, scale and rotation over a
random background. The same arguments give the same bytes.

Layout: DIR/train/<class>/*.png, DIR/val/<class>/*.png (with --val-fraction > 0), DIR/esvit_dataset.json.
`esvit pretrain --data DIR` trains on DIR/train.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("dir", metavar="DIR", help="output directory (absent or empty)")
    p.add_argument("--num-images", type=int, required=True, help="images in total (train + val)")
    p.add_argument("--num-classes", type=int, required=True, help="classes (textures 1..10, shapes 1..32)")
    p.add_argument("--kind", choices=("textures", "shapes"), default="textures",
                   help="generator: textures (10 pattern classes, default) or shapes (32 shape x texture classes)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of every class held out in val/")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")


def run(args: argparse.Namespace) -> int:
    from ..data.synthetic import make_dataset

    meta = make_dataset(args.dir, args.num_images, args.num_classes, val_fraction=args.val_fraction,
                        image_size=args.image_size, seed=args.seed, kind=args.kind, progress=True)
    counts = meta.get("counts", {})
    print(f"{args.dir}: {meta['num_classes']} classes, {counts.get('train', '?')} train / {counts.get('val', 0)} "
          f"val images of {meta['image_size']} px")
    return 0
