"""``esvit eval-linear``: linear probe on the frozen backbone."""

from __future__ import annotations

import argparse
import math
import time

HELP = "linear-probe evaluation of a pretrained (or randomly initialised) backbone"
DESCRIPTION = """\
Linear classification on frozen features: Swin the official feature (concat of the mean-pooled tokens
of the last --n-last-blocks blocks, 2304-d for Swin-T/S), ViT the concat of the last blocks' CLS tokens,
ResNet the pooled final map. Features are computed once (centre crops, no augmentation; sharded over the
processes of a torchrun job); a Linear layer per learning rate is trained with SGD (momentum 0.9, no
weight decay, lr x batch/256, cosine to 0) and evaluated after every epoch; the best top-1 is reported.

Examples:
  esvit eval-linear --checkpoint runs/demo/checkpoint.pth --train-data data/train --val-data data/val
  esvit eval-linear --checkpoint CKPT --train-data DS --val-data DS --epochs 100 --lr 0.01 0.1 --json lin.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.runner import add_data_arguments

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--epochs", type=int, default=100, help="training epochs of the classifier (default 100)")
    p.add_argument("--lr", type=float, nargs="+", default=[0.01, 0.1, 1.0],
                   help="learning rates for a batch of 256, one classifier each (default 0.01 0.1 1.0)")
    p.add_argument("--probe-batch-size", type=int, default=256, help="classifier batch size (default 256)")
    p.add_argument("--n-last-blocks", type=int, default=4, help="blocks whose pooled tokens are concatenated")
    add_data_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..distributed import cleanup
    from ..errors import ConfigError
    from ..eval.features import linear_features
    from ..eval.linear import train_linear_probe
    from ..eval.runner import evaluation_setup, features_of, write_json

    if args.epochs < 1 or args.probe_batch_size < 1 or args.n_last_blocks < 1:
        raise ConfigError("--epochs, --probe-batch-size and --n-last-blocks must be >= 1")
    if not all(math.isfinite(lr) and lr > 0 for lr in args.lr):
        raise ConfigError(f"every --lr must be a finite number > 0, got {' '.join(map(str, args.lr))}")
    tic = time.perf_counter()
    env, model, train, val = evaluation_setup(args, {"--json": args.json})
    try:
        fn = linear_features(model.backbone, args.n_last_blocks)
        train_f, train_y = features_of(fn, train, env, args, "train features")
        val_f, val_y = features_of(fn, val, env, args, "val features")
    except ValueError as exc:  # e.g. --n-last-blocks larger than the model
        raise ConfigError(str(exc)) from None
    finally:
        cleanup()
    if not env.is_main:
        return 0
    res = train_linear_probe(train_f, train_y, val_f, val_y, len(train.classes), epochs=args.epochs, lrs=args.lr,
                             batch_size=args.probe_batch_size, seed=args.seed, device=env.device,
                             progress=not args.no_progress)
    seconds = time.perf_counter() - tic
    print(f"linear probe ({model.source}, {model.arch} at {model.crop_size} px, {train_f.shape[1]}-d features, "
          f"{len(train)} train / {len(val)} val images, {len(train.classes)} classes, {args.epochs} epochs)")
    print(f"{'lr':>8} {'best top-1':>11} {'(epoch)':>8} {'top-5':>8} {'final top-1':>12}")
    for r in res["per_lr"]:
        if r["diverged_epoch"]:
            print(f"{r['lr']:>8g}   diverged in epoch {r['diverged_epoch']} (non-finite weights; not ranked): use a "
                  "smaller --lr")
            continue
        print(f"{r['lr']:>8g} {r['best_top1']:>10.2f}% {r['best_epoch']:>8d} {r['best_top5']:>7.2f}% "
              f"{r['final_top1']:>11.2f}%")
    print(f"best: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  (lr {res['lr']:g}, epoch {res['epoch']})")
    if args.json:
        write_json(args.json, res | {
            "arch": model.arch, "source": model.source, "checkpoint": args.checkpoint, "random_init": args.random_init,
            "which": args.which, "crop_size": model.crop_size, "feature_dim": int(train_f.shape[1]),
            "n_last_blocks": args.n_last_blocks, "num_train": len(train), "num_val": len(val),
            "num_classes": len(train.classes), "world_size": env.world_size, "device": str(env.device),
            "backend": model.backend, "seconds": seconds,
        })
        print(f"results written to {args.json}")
    return 0
