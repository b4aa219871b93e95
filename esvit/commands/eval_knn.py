"""``esvit eval-knn``: weighted k-NN classification on the frozen teacher backbone's features."""

from __future__ import annotations

import argparse
import math
import time

HELP = "k-NN evaluation of a pretrained (or randomly initialised) backbone"
DESCRIPTION = """\
Weighted k-NN classification as in DINO / EsViT: features of the frozen backbone (the teacher of the
checkpoint by default; Swin: mean-pooled final tokens, ViT: CLS token, ResNet: pooled map), L2-normalised,
at the model's global crop size (Resize crop*256/224 bicubic, CenterCrop crop). Each validation image's k
nearest training images vote with weight exp(cos / T); top-1 and top-5 for every k.

Feature extraction is sharded over the processes of a torchrun job; the similarity matrix is computed in
chunks, so large training banks fit in memory.

Examples:
  esvit eval-knn --checkpoint runs/demo/checkpoint.pth --train-data data/train --val-data data/val
  esvit eval-knn --checkpoint runs/demo/checkpoint.pth --random-init --train-data DS --val-data DS
  torchrun --nproc-per-node 8 -m esvit eval-knn --checkpoint CKPT --train-data /imagenet/train \\
      --val-data /imagenet/val --json knn.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.runner import add_data_arguments

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="neighbours (default 10 20 100 200)")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the exp(cos / T) votes (default 0.07)")
    p.add_argument("--chunk-size", type=int, default=256, help="validation rows per similarity block")
    p.add_argument("--save-features", metavar="PATH", help="also save the features and labels (torch.save)")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..distributed import cleanup
    from ..errors import ConfigError
    from ..eval.features import view_features
    from ..eval.knn import format_knn_table, knn_classify
    from ..eval.runner import evaluation_setup, features_of, write_json

    if min(args.k) < 1 or args.chunk_size < 1:
        raise ConfigError("--k values and --chunk-size must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature > 0):
        raise ConfigError(f"--temperature must be a finite number > 0, got {args.temperature}")
    tic = time.perf_counter()
    env, model, train, val = evaluation_setup(args, {"--json": args.json, "--save-features": args.save_features})
    try:
        fn = view_features(model.backbone)
        train_f, train_y = features_of(fn, train, env, args, "train features")
        val_f, val_y = features_of(fn, val, env, args, "val features")
    finally:
        cleanup()
    if not env.is_main:
        return 0
    if args.save_features:
        torch.save({"train": train_f, "train_labels": train_y, "val": val_f, "val_labels": val_y,
                    "classes": train.classes}, args.save_features)
    results = knn_classify(train_f.to(env.device), train_y, val_f.to(env.device), val_y, args.k, args.temperature,
                           num_classes=len(train.classes), chunk_size=args.chunk_size)
    seconds = time.perf_counter() - tic
    print(format_knn_table(results, f"k-NN ({model.source}, {model.arch} at {model.crop_size} px, "
                                    f"{len(train)} train / {len(val)} val images, {len(train.classes)} classes, "
                                    f"T={args.temperature})"))
    if args.json:
        write_json(args.json, {
            "results": results, "arch": model.arch, "source": model.source, "checkpoint": args.checkpoint,
            "random_init": args.random_init, "which": args.which, "crop_size": model.crop_size,
            "feature_dim": int(train_f.shape[1]), "temperature": args.temperature, "num_train": len(train),
            "num_val": len(val), "num_classes": len(train.classes), "world_size": env.world_size,
            "device": str(env.device), "backend": model.backend, "seconds": seconds,
        })
        print(f"results written to {args.json}")
    return 0
