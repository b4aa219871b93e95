"""Weighted k-NN classification on frozen features, as DINO's / EsViT's ``eval_knn``.

Features are L2-normalised; a test sample's k nearest training samples (cosine similarity) vote for their
class with weight ``exp(sim / T)``; the class ranking gives top-1 and top-5. The similarity matrix is built
one block of (test_chunk x train_chunk) at a time with a running top-k merge, so memory stays bounded by
``chunk_size * (train_chunk_size + max k)`` whatever the size of the training bank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .features import require_finite

__all__ = ["format_knn_table", "knn_classify", "topk_neighbours"]


def topk_neighbours(
    queries: torch.Tensor, bank: torch.Tensor, k: int, bank_chunk_size: int = 65536
) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) of the ``k`` largest ``queries @ bank.T`` per row, sorted descending, computed
    over ``bank`` in chunks (ties resolve to the lower bank index)."""
    best_s = queries.new_full((queries.shape[0], 0), float("-inf"))
    best_i = torch.empty((queries.shape[0], 0), dtype=torch.long, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk_size):
        sim = queries @ bank[start:start + bank_chunk_size].T
        s, i = sim.topk(min(k, sim.shape[1]), dim=1)
        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i + start], 1)
        # stable sort on -s keeps earlier (lower-index) entries first among equal similarities
        order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
        best_s, best_i = s.gather(1, order), i.gather(1, order)
    return best_s, best_i


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, test_labels: torch.Tensor,
    ks: list[int] | tuple[int, ...] = (10, 20, 100, 200), T: float = 0.07, num_classes: int | None = None,
    chunk_size: int = 256, train_chunk_size: int = 65536,
) -> list[dict]:
    """Top-1 / top-5 accuracy (percent) of weighted k-NN voting for every ``k`` in ``ks``.

    Returns one dict per k: ``{"k", "neighbours" (k capped at the bank size), "top1", "top5"}``.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("the training bank is empty")
    if test_feats.shape[0] == 0:
        raise ValueError("there are no test samples")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature widths differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")
    if not (math.isfinite(T) and T > 0):
        raise ValueError(f"the temperature must be a finite number > 0, got {T}")
    if not ks or min(ks) < 1:
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    for name, f in (("training", train_feats), ("test", test_feats)):
        require_finite(f, f"{name} features")
    num_classes = int(num_classes if num_classes is not None else
                      max(int(train_labels.max()), int(test_labels.max())) + 1)
    bank = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1)
    train_labels = train_labels.to(bank.device)
    kmax = min(max(ks), bank.shape[0])
    correct = {k: [0, 0] for k in ks}
    for start in range(0, test.shape[0], chunk_size):
        q, y = test[start:start + chunk_size], test_labels[start:start + chunk_size].to(bank.device)
        sims, idx = topk_neighbours(q, bank, kmax, train_chunk_size)
        neigh_labels = train_labels[idx]  # (b, kmax)
        # exp((cos - max cos) / T): the same ranking as exp(cos / T), which overflows to inf for a small T
        weights = ((sims - sims[:, :1]) / T).exp()
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
            votes.scatter_add_(1, neigh_labels[:, :kk], weights[:, :kk])
            # stable ranking: equal votes go to the lower class index
            pred = torch.sort(-votes, dim=1, stable=True).indices[:, :min(5, kk)]  # DINO: top-5 within k
            hit = pred == y[:, None]
            correct[k][0] += int(hit[:, 0].sum())
            correct[k][1] += int(hit.any(dim=1).sum())
    n = test.shape[0]
    return [{"k": k, "neighbours": min(k, kmax), "top1": 100.0 * correct[k][0] / n, "top5": 100.0 * correct[k][1] / n}
            for k in ks]


def format_knn_table(results: list[dict], title: str = "") -> str:
    """Plain-text table of :func:`knn_classify` results."""
    lines = [title] if title else []
    lines.append(f"{'k':>6} {'top-1':>8} {'top-5':>8}")
    for r in results:
        k = f"{r['k']}" if r["neighbours"] == r["k"] else f"{r['k']}*"
        lines.append(f"{k:>6} {r['top1']:>7.2f}% {r['top5']:>7.2f}%")
    if any(r["neighbours"] != r["k"] for r in results):
        lines.append(f"  * k larger than the training bank: all {max(r['neighbours'] for r in results)} samples vote")
    return "\n".join(lines)
