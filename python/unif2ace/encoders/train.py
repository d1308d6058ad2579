"""Training and evaluation of the SynthFace encoders (semantic, identity) and shared helpers used by
the attribute judge: batched inference, per-attribute accuracy, verification ROC-AUC, embedding
cache."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from unif2ace.data.readers import FaceArrays
from unif2ace.data.taxonomy import CATEGORY_NAMES
from unif2ace.encoders.augment import random_blur, random_noise, random_shift
from unif2ace.encoders.cnn import (
    ArcFaceHead,
    IdentityEncoder,
    SemanticEncoder,
    attribute_loss,
    to_tensor,
)
from unif2ace.io import atomic_write_bytes


def _lr_at(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * t))


def fit(
    model: torch.nn.Module,
    loss_fn,
    n: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
    progress: bool = True,
    extra_params=(),
    weight_decay: float = 1e-4,
) -> dict:
    """Generic AdamW + cosine loop: ``loss_fn(idx, g)`` returns the loss of batch ``idx``."""
    g = torch.Generator().manual_seed(seed)
    params = list(model.parameters()) + list(extra_params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    ema = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        idx = torch.randint(0, n, (batch,), generator=g)
        loss = loss_fn(idx, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - t0, "final_loss": ema}


@torch.no_grad()
def batched(fn, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    """Apply ``fn`` to ``uint8 [N, H, W, 3]`` images in batches, concatenating the outputs."""
    outs = [fn(to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)]
    if outs and isinstance(outs[0], (list, tuple)):
        return [torch.cat(parts) for parts in zip(*outs)]
    return torch.cat(outs) if outs else torch.zeros(0)


def attribute_accuracy(logits: list[torch.Tensor], labels: np.ndarray) -> dict:
    """Per-category accuracy over images where the attribute is visible, and their mean."""
    labels = torch.as_tensor(labels)
    per = {}
    for c, name in enumerate(CATEGORY_NAMES):
        m = labels[:, c] >= 0
        if m.any():
            per[name] = float((logits[c][m].argmax(-1) == labels[m, c]).float().mean())
    return {"per_attribute": per, "mean": float(np.mean(list(per.values())))}


def augmented_batch(arrays: FaceArrays, idx, g, shift=2, blur=0.0, noise=0.0, sigma=(0.4, 1.1)):
    """Images ``idx`` as ``[B, 3, H, W]`` in [-1, 1], shifted by up to ``shift`` px, blurred with
    probability ``blur`` (Gaussian ``sigma`` range), with noise of std ``noise``; and their labels
    ``int64 [B, C]``."""
    x = to_tensor(arrays.images[idx.numpy()])
    x = random_shift(x, shift, g)
    x = random_blur(x, blur, g, sigma=sigma)
    x = random_noise(x, noise, g)
    return x, torch.as_tensor(arrays.labels[idx.numpy()])


def train_semantic(
    train: FaceArrays,
    steps: int = 1000,
    batch: int = 64,
    lr: float = 2e-3,
    seed: int = 1,
    width: int = 16,
    dim: int = 256,
    progress: bool = True,
) -> tuple[SemanticEncoder, dict]:
    torch.manual_seed(seed)
    model = SemanticEncoder(width, dim, train.images.shape[1])

    def loss_fn(idx, g):
        x, y = augmented_batch(train, idx, g)
        return attribute_loss(model(x), y)

    info = fit(model, loss_fn, len(train.images), steps, batch, lr, seed, "semantic", progress)
    return model, info


def train_identity(
    train: FaceArrays,
    steps: int = 2000,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 2,
    width: int = 16,
    dim: int = 128,
    margin: float = 0.35,
    scale: float = 30.0,
    progress: bool = True,
) -> tuple[IdentityEncoder, dict]:
    torch.manual_seed(seed)
    ids, labels = np.unique(train.identities, return_inverse=True)
    labels = torch.as_tensor(labels)
    model = IdentityEncoder(width, dim, train.images.shape[1])
    head = ArcFaceHead(dim, len(ids), s=scale, m=margin)

    def loss_fn(idx, g):
        x, _ = augmented_batch(train, idx, g)
        return F.cross_entropy(head(model(x), labels[idx]), labels[idx])

    info = fit(
        model,
        loss_fn,
        len(train.images),
        steps,
        batch,
        lr,
        seed,
        "identity",
        progress,
        extra_params=head.parameters(),
    )
    return model, info


def roc_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U, average ranks for ties)."""
    scores = scores.double().flatten()
    positive = positive.bool().flatten()
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
        ranks = (sums / counts)[inv]
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both positive and negative pairs")
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def verification_auc(embeddings: torch.Tensor, identities: np.ndarray) -> dict:
    """Verification over all image pairs: cosine similarity vs same-identity."""
    e = F.normalize(embeddings.float(), dim=-1)
    sim = e @ e.T
    ident = torch.as_tensor(identities)
    same = ident[:, None] == ident[None, :]
    iu = torch.triu_indices(len(e), len(e), offset=1)
    s, p = sim[iu[0], iu[1]], same[iu[0], iu[1]]
    return {
        "roc_auc": roc_auc(s, p),
        "pairs": int(len(s)),
        "positive_pairs": int(p.sum()),
        "identities": int(len(np.unique(identities))),
    }


def cache_embeddings(path, embeddings: torch.Tensor, ids: list[str], meta: dict | None = None):
    """Write ``{"embeddings": [N, D]}`` to a safetensors file with the image ids in its metadata."""
    md = {"ids": json.dumps(ids), **{k: str(v) for k, v in (meta or {}).items()}}
    atomic_write_bytes(Path(path), save({"embeddings": embeddings.float().contiguous()}, md))


def load_embeddings(path) -> tuple[torch.Tensor, list[str]]:
    with safe_open(str(path), "pt") as f:
        ids = json.loads(f.metadata()["ids"])
        return f.get_tensor("embeddings"), ids
