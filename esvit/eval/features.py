"""Frozen-backbone feature extraction, sharded over the ranks of a ``torchrun`` job and gathered in order.

Each rank embeds its :class:`esvit.eval.data.ShardSampler` shard (every image exactly once, no padding
duplicates); the shards are all-gathered (padded to the largest shard for the collective, then trimmed) and
put back in dataset order, so every rank ends with the same (N, C) matrix as a single process would.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

__all__ = ["extract_features", "gather_in_order", "linear_features", "require_finite", "view_features"]


def view_features(backbone: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The k-NN feature: the backbone's view feature (Swin: mean of the final tokens; ViT: CLS; ResNet: pool)."""
    return lambda x: backbone(x)[0]


def linear_features(backbone: torch.nn.Module, n_last_blocks: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear-probe feature: Swin the concat of the mean-pooled tokens of the last ``n`` blocks, ViT the
    concat of the last ``n`` CLS tokens, ResNet the pooled final map."""
    return lambda x: backbone.forward_return_n_last_blocks(x, n_last_blocks)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device | str, num_samples: int,
    progress: bool = False, desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``fn(images)`` of every sample and their labels, float32 on the CPU, in dataset order.

    ``loader`` yields dicts with ``image``, ``label``, ``index`` over this rank's shard; under an initialised
    process group the shards are gathered, so the result is the full (num_samples, C) matrix on every rank.
    """
    from tqdm import tqdm

    device = torch.device(device)
    feats, labels, indices = [], [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False, file=sys.stderr):
        x = batch["image"].to(device, non_blocking=True)
        feats.append(fn(x).float().cpu())
        labels.append(batch["label"])
        indices.append(batch["index"])
    if feats:
        f, y, i = torch.cat(feats), torch.cat(labels), torch.cat(indices)
    else:  # an empty shard (more ranks than samples): the feature width is learnt from the gather
        f, y, i = torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    f, y = gather_in_order(f, y, i, num_samples, device)
    require_finite(f, desc)  # every rank holds the gathered matrix, so every rank stops alike
    return f, y


def require_finite(feats: torch.Tensor, what: str = "features") -> None:
    """Raise a CheckpointError when rows of ``feats`` hold NaN/inf: they would classify at chance without a
    word (the weights were checked when loaded, so the backbone overflows on these inputs)."""
    from ..errors import CheckpointError

    bad = int((~torch.isfinite(feats)).any(dim=1).sum()) if feats.numel() else 0
    if bad:
        raise CheckpointError(f"{bad} of {feats.shape[0]} {what} are not finite (NaN/inf): the backbone overflows on "
                              "these images; evaluate another checkpoint (or in fp32)")


def _all_gather_padded(t: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """All-gather tensors whose first dimension differs between ranks (pad to the largest, trim after)."""
    world = dist.get_world_size()
    backend_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([t.shape[0]], device=backend_device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=backend_device)
    padded[: t.shape[0]] = t.to(backend_device)
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:s].cpu() for o, s in zip(out, sizes)]


def gather_in_order(
    feats: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, num_samples: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put this rank's (features, labels) at their dataset ``indices`` -- after gathering every rank's
    shard when a process group is initialised. Every index in ``[0, num_samples)`` must be covered once."""
    device = torch.device(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        widths: list = [None] * dist.get_world_size()
        dist.all_gather_object(widths, feats.shape[1] if feats.numel() else 0)
        if feats.numel() == 0:
            feats = torch.empty(0, max(widths))
        parts_f = _all_gather_padded(feats, device)
        parts_y = _all_gather_padded(labels, device)
        parts_i = _all_gather_padded(indices, device)
        feats, labels, indices = torch.cat(parts_f), torch.cat(parts_y), torch.cat(parts_i)
    if indices.numel() != num_samples or not torch.equal(indices.sort().values, torch.arange(num_samples)):
        raise RuntimeError(f"feature extraction covered {indices.numel()} samples, expected each of {num_samples} "
                           "exactly once")
    out_f = torch.empty((num_samples, feats.shape[1]), dtype=feats.dtype)
    out_y = torch.empty(num_samples, dtype=torch.long)
    out_f[indices], out_y[indices] = feats, labels
    return out_f, out_y
