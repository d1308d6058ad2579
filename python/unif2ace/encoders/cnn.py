"""Small CNN encoders that stand in for CLIP (semantic) and AntelopeV2 (face identity) on SynthFace.

- :class:`SemanticEncoder` — trained on the attribute labels (one softmax head per category); its
  L2-normalised penultimate features are the "CLIP" embedding the sequence-level MoE consumes.
- :class:`IdentityEncoder` — trained on identity labels with an ArcFace additive angular margin
  (Deng et al. 2019, ``cos(θ + m)``, scale ``s``); its L2-normalised embedding is the face-identity
  embedding. Verification compares embeddings by cosine similarity.

Both read ``float [B, 3, H, W]`` images in ``[-1, 1]`` (see :func:`to_tensor`) at 64 px by default;
other sizes are resized to the encoder's own size first.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unif2ace.data.taxonomy import NUM_VALUES
from unif2ace.io import load_pretrained_state


def to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` -> ``float32 [N, 3, H, W]`` in [-1, 1]."""
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    return x.contiguous()


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class ConvBackbone(nn.Module):
    """Plain VGG-style stack: 64 -> 32 -> 16 -> 8 -> 4, flattened (positions matter: a blue iris
    and a blue background are told apart by where they are), projected to ``dim``."""

    def __init__(self, width: int = 16, dim: int = 256, size: int = 64):
        super().__init__()
        w = width
        self.size = size
        self.features = nn.Sequential(
            _conv_bn(3, w, 2),  # 32
            _conv_bn(w, w, 1),
            _conv_bn(w, 2 * w, 2),  # 16
            _conv_bn(2 * w, 2 * w, 1),
            _conv_bn(2 * w, 4 * w, 2),  # 8
            _conv_bn(4 * w, 4 * w, 2),  # 4
        )
        self.proj = nn.Sequential(nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * w * 16, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, dim]
        return self.forward_with_maps(x)[0]

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(``[B, dim]`` output, the feature map after each conv stage)."""
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        maps = []
        for stage in self.features:
            x = stage(x)
            maps.append(x)
        return self.proj(x), maps


class AttributeHeads(nn.Module):
    """One linear softmax head per taxonomy category."""

    def __init__(self, dim: int, num_values=NUM_VALUES):
        super().__init__()
        self.num_values = tuple(num_values)
        self.linear = nn.Linear(dim, sum(self.num_values))

    def forward(self, h: torch.Tensor) -> list[torch.Tensor]:
        return list(self.linear(h).split(self.num_values, dim=-1))


def attribute_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean over categories of the cross-entropy over images where the attribute is visible
    (label -1 = hidden, ignored)."""
    losses = [
        F.cross_entropy(lg, labels[:, c], ignore_index=-1)
        for c, lg in enumerate(logits)
        if (labels[:, c] >= 0).any()
    ]
    return torch.stack(losses).mean()


class SemanticEncoder(nn.Module):
    """CLIP stand-in: attribute-supervised CNN. ``embed`` -> ``[B, dim]`` unit vectors."""

    def __init__(self, width: int = 16, dim: int = 256, size: int = 64):
        super().__init__()
        self.config = {"kind": "semantic", "width": width, "dim": dim, "size": size}
        self.backbone = ConvBackbone(width, dim, size)
        self.heads = AttributeHeads(dim)

    def forward(self, x):
        return self.heads(F.relu(self.backbone(x)))

    def forward_with_maps(self, x) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(per-category attribute logits, the backbone's feature map after each conv stage)."""
        h, maps = self.backbone.forward_with_maps(x)
        return self.heads(F.relu(h)), maps

    @torch.no_grad()
    def embed(self, x):
        return F.normalize(self.backbone(x), dim=-1)


class ArcFaceHead(nn.Module):
    """ArcFace logits: ``s·cos(θ_y + m)`` for the true class, ``s·cos θ_j`` for the others."""

    def __init__(self, dim: int, num_classes: int, s: float = 30.0, m: float = 0.35):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) * 0.01)
        self.s, self.m = s, m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(emb, dim=-1), F.normalize(self.weight, dim=-1))  # [B, C]
        cos = cos.clamp(-1 + 1e-6, 1 - 1e-6)
        theta = torch.acos(cos.gather(1, labels[:, None]))
        target = torch.cos(theta + self.m)
        # keep the margin monotone when θ + m > π (the "easy margin" fallback of insightface)
        target = torch.where(
            theta + self.m < math.pi,
            target,
            cos.gather(1, labels[:, None]) - self.m * math.sin(self.m),
        )
        logits = cos.scatter(1, labels[:, None], target)
        return logits * self.s


class IdentityEncoder(nn.Module):
    """AntelopeV2 stand-in: identity embedding trained with an ArcFace margin."""

    def __init__(self, width: int = 16, dim: int = 128, size: int = 64):
        super().__init__()
        self.config = {"kind": "identity", "width": width, "dim": dim, "size": size}
        self.backbone = ConvBackbone(width, dim, size)

    def forward(self, x):
        return self.backbone(x)

    @torch.no_grad()
    def embed(self, x):
        return F.normalize(self.backbone(x), dim=-1)


def load_encoder(folder) -> SemanticEncoder | IdentityEncoder:
    """A trained SemanticEncoder or IdentityEncoder from its folder (written by
    ``unif2ace train-encoders``), in eval mode."""
    state, cfg = load_pretrained_state(folder)
    cls = SemanticEncoder if cfg["kind"] == "semantic" else IdentityEncoder
    m = cls(cfg["width"], cfg["dim"], cfg["size"])
    m.load_state_dict(state)
    return m.eval()
