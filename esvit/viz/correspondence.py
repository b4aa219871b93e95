"""The paper's "intriguing property": region features match across views without any supervision.

An image (eval transform: resize + centre crop to the model's crop size) and an augmented view of it at
the same size -- horizontally flipped, then colour-jittered -- go through the backbone; every region token
of the image is matched to the view's token of highest cosine similarity of the final features. The flip
is exact on the token grid, so token (r, c) *should* match token (r, w-1-c).

Correspondence accuracy = the fraction of **all** region tokens of the image whose argmax lands exactly on
the mirrored cell (chance = 1 / tokens). The picture draws the ``num_lines`` most confident matches
(highest cosine similarity), green when they land on the mirrored cell and red when they do not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision import transforms as T

from ..data.augment import IMAGENET_MEAN, IMAGENET_STD
from ..eval.model import token_grid
from ..eval.transforms import denormalize

__all__ = ["Correspondence", "augmented_view", "correspondence_accuracy", "draw_correspondence", "match_regions",
           "match_tokens", "mirrored_index"]


@dataclass
class Correspondence:
    """Matches of one image's region tokens to its augmented view's."""

    grid: tuple[int, int]  # (h, w) token grid
    match: torch.Tensor  # (h*w,) index of the view token each image token matches
    score: torch.Tensor  # (h*w,) cosine similarity of that match
    correct: torch.Tensor  # (h*w,) bool: the match is the mirrored cell

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())

    def top(self, n: int) -> torch.Tensor:
        """Indices of the ``n`` most confident image tokens (highest similarity first)."""
        return torch.sort(-self.score, stable=True).indices[:n]


def mirrored_index(grid: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """(h*w,) index of the horizontally mirrored cell (r, w-1-c) of every row-major cell (r, c)."""
    h, w = grid
    r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return (r * w + (w - 1 - c)).reshape(-1)


def augmented_view(x: torch.Tensor, seed: int = 0, jitter: bool = True) -> torch.Tensor:
    """Horizontal flip plus colour jitter (0.4, 0.4, 0.2, 0.1) of normalised images (B, 3, H, W), same size.
    The jitter of image ``i`` is drawn from ``seed + i`` (reproducible, independent of the batch)."""
    jit = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    out = []
    for i, img in enumerate(denormalize(x)):
        img = img.flip(-1)
        if jitter:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                img = jit(img)
        out.append(norm(img))
    return torch.stack(out)


def match_tokens(a: torch.Tensor, b: torch.Tensor, grid: tuple[int, int]) -> list[Correspondence]:
    """Cosine-argmax match in ``b`` (B, L, C) of every token of ``a`` (B, L, C), both row-major on ``grid``,
    scored against the horizontally mirrored cell (ties go to the lowest index)."""
    sim = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).transpose(1, 2)  # B, L, L
    score, match = sim.max(dim=-1)
    target = mirrored_index(grid, sim.device)
    return [Correspondence(grid, m.cpu(), s.cpu(), (m == target).cpu()) for m, s in zip(match, score)]


@torch.no_grad()
def match_regions(backbone: torch.nn.Module, x: torch.Tensor, view: torch.Tensor) -> list[Correspondence]:
    """Matches of the final region tokens of ``x`` (B, 3, H, W) in those of ``view`` (:func:`match_tokens`)."""
    a, grid = token_grid(backbone, x)
    b, grid_b = token_grid(backbone, view)
    if grid != grid_b:
        raise ValueError(f"the image and its view give different token grids {grid} and {grid_b}")
    return match_tokens(a, b, grid)


def correspondence_accuracy(backbone: torch.nn.Module, x: torch.Tensor, seed: int = 0) -> list[float]:
    """Per-image correspondence accuracy of a batch of normalised images against their flipped, jittered
    views (see the module docstring)."""
    return [c.accuracy for c in match_regions(backbone, x, augmented_view(x, seed))]


def draw_correspondence(
    x: torch.Tensor, view: torch.Tensor, corr: Correspondence, path: str | os.PathLike, *, num_lines: int = 24,
    panel: int = 384, title: str = "",
) -> tuple[int, int]:
    """Write a PNG: the image (left) and its view (right), ``panel`` px each, with the token grid and a line
    for each of the ``num_lines`` most confident matches. Returns the PNG's (width, height) in pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gap, band, dpi = panel // 16, 48, 100
    width, height = 2 * panel + gap, panel + band

    def to_panel(t: torch.Tensor) -> torch.Tensor:
        img = denormalize(t[0] if t.dim() == 4 else t)
        return F.interpolate(img[None], size=(panel, panel), mode="nearest")[0].permute(1, 2, 0)

    canvas = torch.ones(panel, width, 3)
    canvas[:, :panel], canvas[:, panel + gap:] = to_panel(x), to_panel(view)
    h, w = corr.grid
    ch, cw = panel / h, panel / w

    fig = plt.figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, panel / height))
    ax.imshow(canvas.numpy(), extent=(0, width, panel, 0), interpolation="nearest")
    for off in (0, panel + gap):  # token grid
        for i in range(1, h):
            ax.plot([off, off + panel], [i * ch, i * ch], color="white", lw=0.5, alpha=0.5)
        for j in range(1, w):
            ax.plot([off + j * cw, off + j * cw], [0, panel], color="white", lw=0.5, alpha=0.5)
    for i in reversed(corr.top(min(num_lines, h * w)).tolist()):  # strongest drawn last (on top)
        j = int(corr.match[i])
        y0, x0 = (i // w + 0.5) * ch, (i % w + 0.5) * cw
        y1, x1 = (j // w + 0.5) * ch, panel + gap + (j % w + 0.5) * cw
        colour = "#2ca02c" if bool(corr.correct[i]) else "#d62728"
        ax.plot([x0, x1], [y0, y1], color=colour, lw=1.4, alpha=0.9)
        ax.plot([x0, x1], [y0, y1], "o", color=colour, ms=3)
    ax.set_xlim(0, width)
    ax.set_ylim(panel, 0)
    ax.axis("off")
    top = corr.top(min(num_lines, h * w))
    text = (title + "\n" if title else "") + (
        f"correspondence accuracy {100 * corr.accuracy:.1f}% of {h * w} tokens (chance {100 / (h * w):.1f}%); "
        f"lines: {len(top)} most confident, {int(corr.correct[top].sum())} on the mirrored cell (green)")
    fig.text(0.5, 1 - band / height / 2, text, ha="center", va="center", fontsize=8, wrap=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return width, height
