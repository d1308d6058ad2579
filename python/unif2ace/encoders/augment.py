"""Cheap batch augmentations in torch (no torchvision): shift, blur, noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Shift the whole batch by one random offset (replicate padding)."""
    if max_shift <= 0:
        return x
    dx, dy = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=g))
    p = max_shift
    xp = F.pad(x, (p, p, p, p), mode="replicate")
    H, W = x.shape[-2:]
    return xp[..., p + dy : p + dy + H, p + dx : p + dx + W]


def random_blur(x: torch.Tensor, p: float, g: torch.Generator, sigma=(0.4, 1.1)) -> torch.Tensor:
    """Gaussian-blur a random fraction ``p`` of the batch (3×3 kernel, one σ per batch): makes a
    classifier read slightly soft images (e.g. tokenizer reconstructions) the way it reads sharp
    ones."""
    if p <= 0:
        return x
    sel = torch.rand(x.shape[0], generator=g) < p
    if not sel.any():
        return x
    s = float(torch.empty(1).uniform_(*sigma, generator=g))
    k1 = torch.exp(-(torch.tensor([-1.0, 0.0, 1.0]) ** 2) / (2 * s * s))
    k1 = k1 / k1.sum()
    k = (k1[:, None] * k1[None, :]).to(x)
    C = x.shape[1]
    y = F.conv2d(F.pad(x[sel], (1, 1, 1, 1), mode="replicate"), k.expand(C, 1, 3, 3), groups=C)
    out = x.clone()
    out[sel] = y
    return out


def random_noise(x: torch.Tensor, std: float, g: torch.Generator) -> torch.Tensor:
    if std <= 0:
        return x
    s = torch.rand(x.shape[0], 1, 1, 1, generator=g) * std
    return x + s * torch.randn(x.shape, generator=g)
