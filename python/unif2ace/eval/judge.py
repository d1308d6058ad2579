"""The attribute judge: scores images per SynthFace attribute. Used **only for evaluation** (our
VQAScore analogue for generated faces, and the check on image-tokenizer reconstructions); it is never
an input of the model.

It is kept independent of the semantic encoder it could otherwise agree with by construction:
its own architecture (residual blocks with GroupNorm + SiLU and average-pool downsampling, against
the encoder's plain Conv-BN-ReLU stack), its own seed, and its own training data — a SynthFace set
drawn from a different data seed (``data_seed + JUDGE_SEED_OFFSET``), so even its identities are
different people from those of the dataset it judges. It trains with blur/noise augmentation so
that it reads slightly soft images (tokenizer reconstructions, generated samples) like sharp ones.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from unif2ace.data.readers import FaceArrays
from unif2ace.encoders.cnn import AttributeHeads, attribute_loss
from unif2ace.encoders.train import attribute_accuracy, augmented_batch, batched, fit
from unif2ace.io import load_pretrained_state

JUDGE_SEED_OFFSET = 7919


class _ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.n1 = nn.GroupNorm(8, cin)
        self.c1 = nn.Conv2d(cin, cout, 3, 1, 1)
        self.n2 = nn.GroupNorm(8, cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class AttributeJudge(nn.Module):
    """Residual GN/SiLU classifier, 64 px in, one head per category."""

    def __init__(self, width: int = 16, size: int = 64):
        super().__init__()
        self.config = {"kind": "judge", "width": width, "size": size}
        self.size = size
        w = width
        self.stem = nn.Conv2d(3, w, 3, 2, 1)  # 64 -> 32
        # one block at 32 px before any pooling: without it (blocks only at 16/8/4) the judge
        # could not tell a neutral face from a smile, nor thin brows from thick ones
        self.blocks = nn.ModuleList([_ResBlock(w, w), _ResBlock(w, 2 * w), _ResBlock(2 * w, 4 * w)])
        self.norm = nn.GroupNorm(8, 4 * w)
        self.fc = nn.Linear(4 * w * 16, 192)
        self.heads = AttributeHeads(192)

    def forward(self, x):  # [B, 3, H, W] in [-1, 1] -> list of [B, n_c] logits
        return self.heads(self.features(x))

    def features(self, x):  # [B, 3, H, W] in [-1, 1] -> [B, 192] penultimate (pre-head) features
        if x.shape[-1] != self.size:
            x = F.interpolate(
                x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True
            )
        h = self.stem(x)  # [B, w, 32, 32]
        h = self.blocks[0](h)  # 32
        h = self.blocks[1](F.avg_pool2d(h, 2))  # [B, 2w, 16, 16]
        h = self.blocks[2](F.avg_pool2d(h, 2))  # [B, 4w, 8, 8]
        h = F.silu(self.norm(F.avg_pool2d(h, 2))).flatten(1)  # [B, 4w*16]
        return F.silu(self.fc(h))


def train_judge(
    train: FaceArrays,
    steps: int = 2000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 11,
    width: int = 16,
    progress: bool = True,
):
    torch.manual_seed(seed)
    model = AttributeJudge(width, train.images.shape[1])

    def loss_fn(idx, g):
        x, y = augmented_batch(train, idx, g, shift=2, blur=0.2, noise=0.04, sigma=(0.3, 0.7))
        return attribute_loss(model(x), y)

    info = fit(model, loss_fn, len(train.images), steps, batch, lr, seed, "judge", progress)
    return model, info


def load_judge(folder) -> AttributeJudge:
    """A trained judge from its folder (written by ``unif2ace train-judge``), in eval mode."""
    state, cfg = load_pretrained_state(folder)
    judge = AttributeJudge(cfg["width"], cfg["size"])
    judge.load_state_dict(state)
    return judge.eval()


@torch.no_grad()
def judge_accuracy(judge: AttributeJudge, images: np.ndarray, labels: np.ndarray) -> dict:
    """Per-attribute accuracy of the judge on ``uint8 [N, H, W, 3]`` images and their labels."""
    judge.eval()
    return attribute_accuracy(batched(judge, images), labels)


@torch.no_grad()
def judge_predict(judge: AttributeJudge, images: np.ndarray) -> np.ndarray:
    """``int64 [N, C]`` predicted value index per category."""
    judge.eval()
    return torch.stack([lg.argmax(-1) for lg in batched(judge, images)], dim=1).numpy()


@torch.no_grad()
def judge_features(judge: AttributeJudge, images: np.ndarray, batch: int = 256) -> np.ndarray:
    """``float32 [N, F]`` penultimate features (the pooled, projected vector the attribute heads
    read; F = 192) of ``uint8 [N, H, W, 3]`` images: the space of the Fréchet distance
    (:func:`unif2ace.eval.metrics.frechet_distance`)."""
    judge.eval()
    if len(images) == 0:
        return np.zeros((0, judge.heads.linear.in_features), np.float32)
    return batched(judge.features, images, batch).numpy()
