"""Plain-PyTorch references of the D3Diff loss family, written from the formulas.

They are the oracle of every backend's tests (in float64), what ``backend="torch"`` of
:func:`unif2ace.ops.d3diff_loss` runs, and the baseline of the benchmarks. Each one materialises
the full [N, K] logits and lets autograd differentiate it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def d3diff_loss_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """Plain-PyTorch D3Diff loss, term by term from the formulas (fp32 math, fp64 if given fp64).

    Shapes and meaning as in :func:`unif2ace.ops.d3diff_loss`: logits [N, K], targets / ratio /
    w_ce / w_se [N]; returns a scalar (``"sum"``) or [N] (``"none"``).
    """
    z = logits.float() if logits.dtype != torch.float64 else logits
    K = z.shape[-1]
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, 0).long()

    log_p = torch.log_softmax(z, dim=-1)  # [N, K]
    ce = -log_p.gather(1, safe_t[:, None]).squeeze(1)  # [N]

    # SEDD absorbing score entropy with the scale_by_sigma log-score ŝ = z + log a − log K.
    a = ratio.to(z.dtype)
    log_a = torch.log(a)
    log_score = z + (log_a - math.log(K))[:, None]  # [N, K]
    pos = torch.exp(log_score).sum(-1)  # Σ_y e^{ŝ_y}
    neg = a * log_score.gather(1, safe_t[:, None]).squeeze(1)  # a·ŝ[x0]
    const = torch.where(a > 0, a * (log_a - 1), torch.zeros_like(a))  # a(log a − 1) → 0 at a = 0
    se = pos - torch.where(a > 0, neg, torch.zeros_like(neg)) + const

    wse = alpha * w_se.to(z.dtype)
    row = w_ce.to(z.dtype) * ce + torch.where(wse != 0, wse * se, torch.zeros_like(se))
    row = torch.where(valid, row, torch.zeros_like(row))
    return row.sum() if reduction == "sum" else row


def d3diff_linear_loss_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
) -> torch.Tensor:
    """LM head then :func:`d3diff_loss_ref`: hidden [N, D], weight [K, D], bias [K] or None."""
    logits = F.linear(hidden, weight, bias)
    return d3diff_loss_ref(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, reduction)


def fused_linear_cross_entropy_ref(
    hidden, weight, targets, weights=None, bias=None, ignore_index=-100, reduction="sum"
) -> torch.Tensor:
    """``Σ_rows weights · F.cross_entropy(hidden @ weight.T + bias, targets)`` in plain PyTorch.

    hidden [N, D], weight [V, D], targets [N], weights [N] or None (= 1), bias [V] or None.
    Math in fp32 (fp64 if given fp64); returns a scalar (``"sum"``) or [N] (``"none"``).
    """
    logits = F.linear(hidden, weight, bias)
    z = logits.float() if logits.dtype != torch.float64 else logits
    row = F.cross_entropy(z, targets.long(), ignore_index=ignore_index, reduction="none")
    if weights is not None:
        row = row * weights.to(z.dtype)
    return row.sum() if reduction == "sum" else row
