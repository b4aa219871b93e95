"""Linear probe on frozen features (DINO / EsViT ``eval_linear`` without augmentation).

A ``nn.Linear`` (weights N(0, 0.01), zero bias) is trained on features computed once, with SGD (momentum
0.9, no weight decay, learning rate ``lr * batch_size / 256``) and a per-step cosine schedule to 0; it is
evaluated on the validation features after every epoch and the best top-1 is reported, as the official
code does. Several learning rates train side by side on the same batches (one classifier each), and the
best of them is reported too -- the features are computed once, so a sweep costs little. A classifier whose
weights turn non-finite (a learning rate too large) stops there and is reported as diverged, not ranked;
when every one diverges, a ConfigError says so.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .features import require_finite

__all__ = ["accuracy", "train_linear_probe"]


@torch.no_grad()
def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent (top-5 = top-min(5, classes))."""
    pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = pred == labels[:, None]
    n = max(labels.numel(), 1)
    return 100.0 * float(hit[:, 0].sum()) / n, 100.0 * float(hit.any(1).sum()) / n


def train_linear_probe(
    train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor, val_labels: torch.Tensor,
    num_classes: int, *, epochs: int = 100, lrs: tuple[float, ...] | list[float] = (0.01, 0.1, 1.0),
    batch_size: int = 256, seed: int = 0, device: torch.device | str = "cpu", progress: bool = False,
) -> dict:
    """Train one linear classifier per learning rate; returns the best top-1 over epochs and rates.

    Returns ``{"top1", "top5", "lr", "epoch"`` (of the best classifier and epoch)``, "per_lr": [{"lr",
    "best_top1", "best_top5", "best_epoch", "final_top1", "final_top5", "diverged_epoch"}, ...]}``
    (``diverged_epoch``: None, or the epoch whose end found the classifier's weights non-finite).
    """
    from tqdm import tqdm

    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("the linear probe needs training and validation samples")
    if epochs < 1 or batch_size < 1 or not lrs:
        raise ValueError("epochs and batch_size must be >= 1 and at least one learning rate given")
    if not all(math.isfinite(lr) and lr > 0 for lr in lrs):
        raise ValueError(f"every learning rate must be a finite number > 0, got {list(lrs)}")
    require_finite(train_feats, "training features")
    require_finite(val_feats, "validation features")
    device = torch.device(device)
    x, y = train_feats.float().to(device), train_labels.to(device)
    xv, yv = val_feats.float().to(device), val_labels.to(device)
    gen = torch.Generator().manual_seed(seed)
    heads, opts = nn.ModuleList(), []
    for lr in lrs:
        head = nn.Linear(x.shape[1], num_classes)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=gen)
            head.bias.zero_()
        heads.append(head.to(device))
        head = heads[-1]
        opts.append(torch.optim.SGD(head.parameters(), lr=lr * batch_size / 256.0, momentum=0.9, weight_decay=0.0))
    steps_per_epoch = math.ceil(x.shape[0] / batch_size)
    total = epochs * steps_per_epoch
    per_lr = [{"lr": float(lr), "best_top1": -1.0, "best_top5": 0.0, "best_epoch": 0, "diverged_epoch": None}
              for lr in lrs]
    step = 0
    bar = tqdm(range(epochs), desc="linear probe", unit="epoch", disable=not progress, file=sys.stderr)
    for epoch in bar:
        perm = torch.randperm(x.shape[0], generator=gen).to(device)
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start:start + batch_size]
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine to 0 over all steps
            for head, opt, lr, rec in zip(heads, opts, lrs, per_lr):
                if rec["diverged_epoch"]:
                    continue
                for g in opt.param_groups:
                    g["lr"] = lr * batch_size / 256.0 * scale
                loss = F.cross_entropy(head(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            step += 1
        with torch.no_grad():
            for head, rec in zip(heads, per_lr):
                if rec["diverged_epoch"]:
                    continue
                if not all(bool(torch.isfinite(p).all()) for p in head.parameters()):  # one check per epoch
                    rec["diverged_epoch"] = epoch + 1
                    continue
                top1, top5 = accuracy(head(xv), yv)
                rec["final_top1"], rec["final_top5"] = top1, top5
                if top1 > rec["best_top1"]:
                    rec["best_top1"], rec["best_top5"], rec["best_epoch"] = top1, top5, epoch + 1
        bar.set_postfix(best_top1=f"{max(r['best_top1'] for r in per_lr):.1f}")
    finite = [r for r in per_lr if not r["diverged_epoch"]]
    if not finite:
        where = ", ".join(f"{r['lr']:g} in epoch {r['diverged_epoch']}" for r in per_lr)
        raise ConfigError(f"the linear probe diverged (non-finite weights) at every learning rate ({where}); use "
                          "smaller ones")
    best = max(finite, key=lambda r: r["best_top1"])
    return {"top1": best["best_top1"], "top5": best["best_top5"], "lr": best["lr"], "epoch": best["best_epoch"],
            "epochs": epochs, "batch_size": batch_size, "per_lr": per_lr}
