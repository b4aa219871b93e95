"""Process-group set-up for ``torchrun`` (one process per GPU, or several CPU processes on gloo).

``torchrun`` exports RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; with WORLD_SIZE > 1 the
group is initialised from them (``env://``): NCCL when the device is a GPU, gloo on the CPU. A plain
``python -m esvit`` run is a world of one and initialises nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistEnv", "SyncBatchNorm", "all_reduce_mean", "barrier", "cleanup", "convert_sync_batchnorm",
           "init_distributed", "resolve_device"]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" | "gloo" | None (not distributed)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when a GPU is present, else ``cpu``; ``cuda`` -> ``cuda:LOCAL_RANK``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            from .errors import ConfigError

            raise ConfigError(f"train.device is {device!r} but no CUDA device is available (use --device cpu)")
        if device == "cuda":
            device = f"cuda:{local_rank}"
        dev = torch.device(device)
        torch.cuda.set_device(dev)
        return dev
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistEnv:
    """Read the torchrun environment, pick the device, and initialise the process group when needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1:
        return DistEnv(0, 1, 0, dev, None)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistEnv(rank, world, local_rank, dev, backend)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over all ranks (a copy; ``t`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; its gradient is the sum of the ranks' gradients (every rank's loss
    depends on every rank's input through the sum)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on the CPU (gloo) too.

    torch's :class:`torch.nn.SyncBatchNorm` runs on GPUs only (DistributedDataParallel refuses it on the
    CPU). Here the per-channel sum and sum of squares (float64, so the one-pass variance does not cancel)
    are all-reduced, and so are their gradients in the backward pass: batch statistics, running statistics
    and gradients are those one process computes on the whole batch. Without a process group, or in eval
    mode, it is a plain BatchNorm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        x = input.double()
        n = x.new_full((1,), input.numel() // input.shape[1])
        stats = _AllReduceSum.apply(torch.cat([x.sum(dims), (x * x).sum(dims), n]))
        count = float(stats[-1].detach())
        if count < 2:
            raise ValueError(f"SyncBatchNorm needs more than 1 value per channel over all processes, got {count:g}")
        mean, sq = stats[:-1].view(2, -1) / count
        var = sq - mean * mean
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_((var * (count / (count - 1))).to(self.running_var.dtype), m)
        shape = [1, -1] + [1] * (input.dim() - 2)
        y = (input.float() - mean.float().view(shape)) * torch.rsqrt(var.float().view(shape) + self.eps)
        if self.weight is not None:
            y = y * self.weight.view(shape)
        if self.bias is not None:
            y = y + self.bias.view(shape)
        return y.to(input.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` with every BatchNorm layer synchronised over the process group: torch's
    :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`SyncBatchNorm` elsewhere (same parameters, buffers and
    state-dict keys either way)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__ = SyncBatchNorm  # same attributes as every torch BatchNorm: only forward changes
    return module
