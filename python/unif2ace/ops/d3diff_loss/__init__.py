"""D3Diff score-matching loss: masked cross-entropy + α · discrete score entropy, fused.

UniF²ace trains image tokens with absorbing ("mask") discrete diffusion. For a masked position with
clean token ``x0``, logits ``z ∈ R^K`` over the codebook (mask column excluded), ratio
``a = (1 − γ)/γ`` and ``LSE = log Σ_y e^{z_y}``:

* mask-generative term (Show-o / MaskGIT):  ``CE = LSE − z[x0]``
* score-entropy term (SEDD, absorbing, ``scale_by_sigma`` log-score ``ŝ_y = z_y + log a − log K``),
  with ``u = LSE − log K``:
  ``SE = Σ_y e^{ŝ_y} − a·ŝ[x0] + a(log a − 1) = a·(CE + e^u − 1 − u)``
* per row ``ℓ = w_ce·CE + α·w_se·SE`` (0 for ``target == ignore_index``); loss ``= Σ ℓ``
* ``∂ℓ/∂z_y = w_ce·p_y + α·w_se·a·e^{z_y − log K} − (w_ce + α·w_se·a)·[y = x0]``

Public ops: :func:`d3diff_loss` (on logits), :func:`d3diff_linear_loss` (the LM head fused in,
no [N, K] logits) and :func:`fused_linear_cross_entropy` (its α = 0 case: a weighted
cross-entropy). References in :mod:`.reference`, custom ops in :mod:`._custom_ops`, one launcher
module per backend (contract in :mod:`._torch`); all run the row kernel ``"d3diff_loss.fwd"``.
"""

from __future__ import annotations

import math

import torch

from unif2ace import _backend
from unif2ace.ops._validate import check_device, check_dtype, check_rows
from unif2ace.ops.d3diff_loss._custom_ops import (
    KERNEL,
    LinearLoss,
    check_values,
    d3diff_loss_fwd,
)
from unif2ace.ops.d3diff_loss.reference import (
    d3diff_linear_loss_ref,
    d3diff_loss_ref,
    fused_linear_cross_entropy_ref,
)

__all__ = [
    "d3diff_linear_loss",
    "d3diff_linear_loss_ref",
    "d3diff_loss",
    "d3diff_loss_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
]

REDUCTIONS = ("sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def d3diff_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float = 0.01,
    *,
    ignore_index: int = -100,
    reduction: str = "sum",
    inplace_backward: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """D3Diff loss (masked CE + α · SEDD absorbing score entropy) on logits, fused forward + grad.

    Parameters
    ----------
    logits : Tensor [N, K], float32 / bfloat16 / float16
        Scores over the K codebook entries (mask column excluded). May be a strided view, e.g.
        a column range ``full_logits[:, lo:hi]`` of a larger vocabulary (column stride 1).
    targets : Tensor [N], int32 / int64
        Clean token of each row in [0, K), or ``ignore_index`` (row contributes 0).
    ratio : Tensor [N], float
        ``a = (1 − γ)/γ ≥ 0`` of the row's time (:func:`unif2ace.ops.schedules.schedule`).
    w_ce, w_se : Tensor [N], float
        Per-row weights of the CE and score-entropy terms.
    alpha : float
        Score-entropy weight. UniF²ace default 0.01; 0 gives Show-o's masked CE; ``w_ce = 0``
        gives SEDD's absorbing score entropy exactly (see :func:`schedules.d3diff_weights`).
    reduction : "sum" | "none"
        ``Σ_rows ℓ`` (scalar) or ``ℓ`` per row ([N], float32).
    inplace_backward : bool
        Fused backends only. The backward writes the gradient over the logits' own storage and
        returns it (as Liger's cross-entropy does), so the loss allocates no [N, K] buffer at all.
        Use it when the logits are an intermediate nothing else reads after the loss (e.g. the
        output of an LM head); the logits' values are gone after backward, and a second backward
        through the same graph is refused by autograd's version check.
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None
        ``"torch"`` runs :func:`d3diff_loss_ref` (float64 allowed) under autograd.

    Returns
    -------
    Tensor: float32 scalar or [N]. Gradient flows to ``logits`` only.

    Formula: ``ℓ = w_ce·CE + α·w_se·a·(CE + e^u − 1 − u)``, ``CE = LSE − z[x0]``,
    ``u = LSE − log K``. Accumulation in fp32 on every backend. Autocast: nothing is cast (there
    is no matmul here); the logits are read in their own dtype (e.g. bf16 from an autocast LM
    head), the loss is fp32 and the gradient has the logits' dtype. The fused backends read the
    logits once in the forward (loss only) and once in the backward, which writes the gradient
    scaled by the incoming gradient in the same pass: the returned [N, K] gradient is the only
    [N, K] allocation, and nothing [N, K] is kept between forward and backward.
    """
    op = "d3diff_loss"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"{op}: logits must be a 2-D tensor [N, K], got {_shape(logits)}")
    N, K = logits.shape
    if K == 0:
        raise ValueError(f"{op}: logits has K = 0 columns; the loss needs at least one class")
    _check_common(alpha, reduction, op)
    name = _backend.resolve(backend, logits.device, op, KERNEL)
    check_dtype(op, "logits", logits, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    rows = _prepare_rows(op, N, logits.device, targets, ratio=ratio, w_ce=w_ce, w_se=w_se)
    if name == "torch":
        check_values(op, K, *rows, ignore_index)
        return d3diff_loss_ref(logits, *rows, alpha, ignore_index, reduction)
    if K > 1 and logits.stride(1) != 1 or N > 1 and logits.stride(0) < K:
        logits = logits.contiguous()  # kernels take column stride 1 and non-overlapping rows
    args = (float(alpha), int(ignore_index), name, bool(inplace_backward))
    loss = d3diff_loss_fwd(logits, list(rows), *args)
    return loss.sum() if reduction == "sum" else loss


def d3diff_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float = 0.01,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """D3Diff loss of ``hidden @ weight.T + bias`` without materialising the [N, K] logits.

    Parameters
    ----------
    hidden : Tensor [N, D]; weight : Tensor [K, D]; bias : Tensor [K] or None
        The LM head (for the image codebook: the K rows of the head that score image tokens).
        One dtype for all three: float32 / bfloat16 / float16 (float64 too with "torch").
    targets, ratio, w_ce, w_se, alpha, ignore_index, reduction
        As in :func:`d3diff_loss`: targets [N] int, ratio / w_ce / w_se [N] float.
    chunk_size : int, optional
        Rows per block of logits. Default: a block about the size of ``hidden`` (≥ 64 rows).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None
        The row kernel used on each block ("torch" = the same chunking with torch math).

    Returns
    -------
    Tensor: float32 scalar or [N]; gradients flow to hidden, weight and bias.

    ``loss = Σ_rows ℓ(hidden @ weight.T + bias)`` with ``ℓ`` as in :func:`d3diff_loss`. Peak extra
    memory is one [C, K] logits block plus the gradient buffers ([N, D], [K, D] in fp32), instead
    of the [N, K] logits and the loss's temporaries.
    Autocast: under ``torch.autocast`` for ``hidden``'s device, ``hidden``, ``weight`` and
    ``bias`` are cast to the autocast dtype (as autocast casts ``F.linear``'s inputs; float64 is
    left alone), so the LM head's matmuls run in bf16 / fp16 with fp32 accumulation (tensor
    cores on a GPU), each [C, K] logits block is in that dtype, and the loss and the softmax over
    it are computed in fp32 by the row kernel: the loss is fp32. The casts are differentiable, so
    the gradients reach the inputs in the inputs' own dtypes (fp32 parameters get fp32
    gradients). The op itself runs with autocast off.
    """
    op = "d3diff_linear_loss"
    _check_common(alpha, reduction, op)
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    name = _check_linear(op, hidden, weight, bias, backend)
    N = hidden.shape[0]
    rows = _prepare_rows(op, N, hidden.device, targets, ratio=ratio, w_ce=w_ce, w_se=w_se)
    return _linear_loss(
        op, name, hidden, weight, bias, rows, alpha, ignore_index, reduction, chunk_size
    )


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted cross-entropy of ``hidden @ weight.T + bias`` without materialising the logits.

    ``loss = Σ_n weights[n] · CE_n``, ``CE_n = log Σ_v e^{z_nv} − z_n,targets[n]``,
    ``z = hidden @ weight.T + bias``; rows with ``targets[n] == ignore_index`` contribute 0. With
    ``weights = 1 / (number of non-ignored rows)`` this is ``F.cross_entropy(z, targets)``'s mean.

    Parameters
    ----------
    hidden : Tensor [N, D]
        The rows to score (e.g. the hidden states of the answer tokens).
    weight : Tensor [V, D]; bias : Tensor [V] or None
        The LM head over the V classes. One dtype for ``hidden``, ``weight`` and ``bias``:
        float32 / bfloat16 / float16 (float64 too with ``backend="torch"``).
    targets : Tensor [N], int32 / int64
        The class of each row in [0, V), or ``ignore_index``.
    weights : Tensor [N], float, or None
        Per-row weight of the row's cross-entropy; None means 1 for every row.
    ignore_index : int
        Target value of the rows that are left out (loss and gradient 0).
    reduction : "sum" | "none"
        The weighted sum (float32 scalar) or the weighted per-row losses ([N], float32).
    chunk_size : int, optional
        Rows per block of logits. Default: a block about the size of ``hidden`` (≥ 64 rows).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None
        The row kernel used on each block of logits.

    Returns
    -------
    Tensor: float32 scalar or [N]; gradients flow to hidden, weight and bias (not to weights).

    The same chunked kernel as :func:`d3diff_linear_loss` with α = 0 (its score-entropy term off,
    ratio unused): only a [C, V] block of logits exists at a time, accumulation in float32.
    Under ``torch.autocast`` the matmuls run in the autocast dtype and the loss in fp32, as in
    :func:`d3diff_linear_loss`.
    """
    op = "fused_linear_cross_entropy"
    _check_common(0.0, reduction, op)
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    name = _check_linear(op, hidden, weight, bias, backend)
    N = hidden.shape[0]
    if weights is None:
        weights = torch.ones(N, dtype=torch.float32, device=hidden.device)
    targets, weights = _prepare_rows(op, N, hidden.device, targets, weights=weights)
    # (targets, ratio, w_ce, w_se) with α = 0; two zero tensors: autograd.Function under dynamo
    # refuses the same tensor as two inputs
    zeros = torch.zeros(2, N, dtype=torch.float32, device=hidden.device).unbind()
    rows = (targets, zeros[0], weights, zeros[1])
    return _linear_loss(
        op, name, hidden, weight, bias, rows, 0.0, ignore_index, reduction, chunk_size
    )


# ---- input checks shared by the public ops ----------------------------------------------------


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_common(alpha, reduction, op):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be a finite number, got {alpha!r}")


def _prepare_rows(op, N, device, targets, **floats):
    """Check the per-row tensors and turn them into the kernels' dtypes (int64 / fp32, contiguous).

    Returns ``(targets, *floats)`` in that order.
    """
    check_rows(op, N, targets=targets, **floats)
    check_device(op, device, targets=targets, **floats)
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: targets must be int32 or int64, got {targets.dtype}")
    for name, t in floats.items():
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    f32 = (t.to(torch.float32).contiguous() for t in floats.values())
    return targets.to(torch.int64).contiguous(), *f32


def _autocast_head(hidden, weight, bias):
    """Under autocast for ``hidden``'s device: the floating inputs of the LM head other than
    float64 cast to the autocast dtype (what autocast does to ``F.linear``), else unchanged."""
    if not isinstance(hidden, torch.Tensor):
        return hidden, weight, bias  # _check_linear reports it
    dev = hidden.device.type
    if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point()
        return t.to(dtype) if eligible and t.dtype != torch.float64 else t

    return cast(hidden), cast(weight), cast(bias)


def _check_linear(op, hidden, weight, bias, backend) -> str:
    """Check the LM head's shapes, dtypes and devices; returns the resolved backend."""
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{op}: {name} must be a 2-D tensor, got {_shape(t)}")
    D = hidden.shape[1]
    K = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"{op}: weight must be [K, D={D}], got {tuple(weight.shape)}")
    if K == 0:
        raise ValueError(f"{op}: weight has K = 0 rows; the loss needs at least one class")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != K):
        raise ValueError(f"{op}: bias must be [K={K}], got {tuple(bias.shape)}")
    name = _backend.resolve(backend, hidden.device, op, KERNEL)
    check_dtype(op, "hidden", hidden, _KERNEL_DTYPES if name != "torch" else _FLOAT_DTYPES)
    check_device(op, hidden.device, weight=weight, **({"bias": bias} if bias is not None else {}))
    for name_, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{op}: {name_} dtype {t.dtype} differs from hidden's {hidden.dtype}")
    return name


def _chunk_rows(N: int, chunk_size: int | None) -> int:
    """The custom op's ``chunk``: ``chunk_size`` clamped to ``[1, N]``, or 0 (the op picks from
    the sizes it runs on, so a traced graph does not specialise on N)."""
    if chunk_size is None:
        return 0
    return max(1, min(int(chunk_size), max(N, 1)))


def _linear_loss(
    op, backend, hidden, weight, bias, rows, alpha, ignore_index, reduction, chunk_size
):
    """The chunked custom op under autograd (checked inputs; rows: targets, ratio, w_ce, w_se)."""
    chunk = _chunk_rows(hidden.shape[0], chunk_size)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    args = (float(alpha), int(ignore_index), chunk, backend, op)
    h, w = hidden.contiguous(), weight.contiguous()
    return LinearLoss.apply(h, w, bias, reduction, needs_grad, *rows, *args)
