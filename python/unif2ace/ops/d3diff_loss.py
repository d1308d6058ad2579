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

File layout (shared/STYLE.md): the references, the backend launchers, the custom-op registration
with fakes and autograd, then the public functions.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unif2ace import _backend
from unif2ace.ops._validate import (
    check_device,
    check_dtype,
    check_finite,
    check_index_range,
    check_rows,
)

REDUCTIONS = ("sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------
# References: plain PyTorch, written from the formulas. The oracle of every backend (in float64),
# the "torch" backend, and the baseline of the benchmarks.
# ------------------------------------------------------------------------------------------------


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
    """Plain-PyTorch D3Diff loss, term by term from the formulas (fp32 math, fp64 if given fp64)."""
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
    """LM head then loss in plain PyTorch: materialises the full [N, K] logits."""
    logits = F.linear(hidden, weight, bias)
    return d3diff_loss_ref(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, reduction)


# ------------------------------------------------------------------------------------------------
# Backend launchers. One contract for every backend (the C++/CUDA/Triton kernels implement it):
#   logits [N, K] (col stride 1, any row stride), targets int64 [N], ratio/w_ce/w_se fp32 [N]
#   -> loss fp32 [N] (written); grad [N, K] in logits' dtype (written if given, may alias
#   logits); grad_scale fp32 [N] or None multiplies each row's gradient.
# A target outside [0, K) that is not ignore_index gives a NaN row (never an out-of-bounds read).
# ------------------------------------------------------------------------------------------------


def _rows_torch(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale):
    """The launcher contract in torch ops (closed-form gradient); used by the chunked torch path."""
    z = logits.float()
    K = z.shape[1]
    log_k = math.log(K)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < K)
    safe_t = torch.where(in_range, targets, 0)
    lse = torch.logsumexp(z, dim=1)
    ce = lse - z.gather(1, safe_t[:, None]).squeeze(1)
    u = lse - log_k
    wse = alpha * w_se
    se = ratio * (ce + torch.expm1(u) - u)
    row = w_ce * ce + torch.where(wse != 0, wse * se, torch.zeros_like(se))
    bad = valid & ~in_range
    row = torch.where(valid, row, torch.zeros_like(row))
    row = torch.where(bad, torch.full_like(row, float("nan")), row)
    loss.copy_(row)
    if grad is None:
        return
    scale = valid.float() if grad_scale is None else grad_scale * valid.float()
    coef_e = wse * ratio * scale
    g = torch.softmax(z, dim=1).mul_((w_ce * scale)[:, None])
    g += torch.where(coef_e[:, None] != 0, coef_e[:, None] * torch.exp(z - log_k), 0.0)
    g.scatter_add_(1, safe_t[:, None], -((w_ce + wse * ratio) * scale)[:, None])
    g[bad] = float("nan")
    grad.copy_(g)


def _rows_cpu(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale):
    _backend.cpu_ext().d3diff_loss_fwd(
        logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0),
        _backend.DTYPE_CODES[logits.dtype],
        targets.data_ptr(), ratio.data_ptr(), w_ce.data_ptr(), w_se.data_ptr(),
        float(alpha), int(ignore_index),
        loss.data_ptr(),
        0 if grad is None else grad.data_ptr(),
        0 if grad is None else grad.stride(0),
        0 if grad_scale is None else grad_scale.data_ptr(),
    )  # fmt: skip


def _rows_cuda(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale):
    ext = _backend.cuda_ext()
    N, K = logits.shape
    with torch.cuda.device(logits.device):  # the launcher sizes its grid for the current device
        ws_bytes = ext.d3diff_loss_workspace_bytes(N, K)
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.d3diff_loss_fwd(
            logits.data_ptr(), N, K, logits.stride(0), _backend.DTYPE_CODES[logits.dtype],
            targets.data_ptr(), ratio.data_ptr(), w_ce.data_ptr(), w_se.data_ptr(),
            float(alpha), int(ignore_index),
            loss.data_ptr(),
            0 if grad is None else grad.data_ptr(),
            0 if grad is None else grad.stride(0),
            0 if grad_scale is None else grad_scale.data_ptr(),
            workspace.data_ptr(), ws_bytes,
            torch.cuda.current_stream(logits.device).cuda_stream,
        )  # fmt: skip


def _rows_triton(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale):
    from unif2ace.triton_kernels import d3diff_loss as tk

    tk.d3diff_loss_fwd(
        logits, targets, ratio, w_ce, w_se, float(alpha), int(ignore_index), loss, grad, grad_scale
    )


_ROWS = {"torch": _rows_torch, "cpu": _rows_cpu, "cuda": _rows_cuda, "triton": _rows_triton}


def _check_values(logits_or_k, targets, ratio, w_ce, w_se, ignore_index, op):
    """Data-dependent checks (a host sync on GPU; off with unif2ace.set_checks(False))."""
    if not _backend.checks_enabled():
        return
    K = logits_or_k if isinstance(logits_or_k, int) else logits_or_k.shape[-1]
    check_index_range(targets, K, op, "targets", ignore_index=ignore_index)
    check_finite(ratio, op, "ratio", nonnegative=True)
    check_finite(w_ce, op, "w_ce")
    check_finite(w_se, op, "w_se")


# ------------------------------------------------------------------------------------------------
# d3diff_loss: two custom ops. The forward writes only the per-row loss (one read of the logits);
# the backward recomputes each row's log-sum-exp and target logit and writes the gradient, scaled
# by the incoming per-row gradient, in the same call (one more read, one write). Nothing [N, K] is
# held between forward and backward, and backward allocates the one [N, K] gradient it returns.
# Precomputing the gradient in the forward (Liger-style) has the same peak (one [N, K]; measured
# 128 MiB for both at N=4096, K=8192 fp32, vs 512 MiB for the reference) but keeps that buffer
# alive from forward to backward and needs a scale pass; fwd+bwd times were within the noise of
# this shared 2-core machine (533 vs 626 ms, load average ~10).
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("unif2ace::d3diff_loss_fwd", mutates_args=())
def _d3diff_loss_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> torch.Tensor:
    _check_values(logits, targets, ratio, w_ce, w_se, ignore_index, "d3diff_loss")
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _ROWS[backend](logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, None, None)
    return loss


@_d3diff_loss_fwd.register_fake
def _(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, backend, inplace_backward):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("unif2ace::d3diff_loss_bwd", mutates_args=())
def _d3diff_loss_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int,
    backend: str,
    grad_rows: torch.Tensor,
) -> torch.Tensor:
    N, K = logits.shape
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)  # rewritten, discarded
    grad = torch.empty((N, K), dtype=logits.dtype, device=logits.device)
    scale = grad_rows.to(torch.float32).contiguous()
    _ROWS[backend](logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, scale)
    return grad


@_d3diff_loss_bwd.register_fake
def _(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, backend, grad_rows):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _d3diff_loss_setup(ctx, inputs, output):
    logits, targets, ratio, w_ce, w_se, alpha, ignore_index, backend, inplace_backward = inputs
    ctx.args = (alpha, ignore_index, backend)
    ctx.inplace_backward = inplace_backward
    ctx.save_for_backward(logits, targets, ratio, w_ce, w_se)


def _d3diff_loss_backward(ctx, grad_loss):
    logits, targets, ratio, w_ce, w_se = ctx.saved_tensors
    traced = torch.compiler.is_compiling() or type(logits) is not torch.Tensor
    if ctx.inplace_backward and not traced:
        # Opt-in (Liger-style): the gradient overwrites the logits' storage, so backward allocates
        # nothing [N, K]. Traced graphs take the out-of-place op below (same values).
        alpha, ignore_index, backend = ctx.args
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        scale = grad_loss.to(torch.float32).contiguous()
        _ROWS[backend](logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, logits, scale)
        grad = logits
    else:
        grad = _d3diff_loss_bwd(logits, targets, ratio, w_ce, w_se, *ctx.args, grad_loss)
    return grad, None, None, None, None, None, None, None, None


_d3diff_loss_fwd.register_autograd(_d3diff_loss_backward, setup_context=_d3diff_loss_setup)


def _prepare_rows(targets, ratio, w_ce, w_se, N, device, op):
    """Check the per-row tensors and turn them into the kernels' dtypes (int64 / fp32, contiguous)."""
    check_rows(op, N, targets=targets, ratio=ratio, w_ce=w_ce, w_se=w_se)
    check_device(op, device, targets=targets, ratio=ratio, w_ce=w_ce, w_se=w_se)
    if targets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{op}: targets must be int32 or int64, got {targets.dtype}")
    for name, t in (("ratio", ratio), ("w_ce", w_ce), ("w_se", w_se)):
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    as_f32 = lambda t: t.to(torch.float32).contiguous()
    return targets.to(torch.int64).contiguous(), as_f32(ratio), as_f32(w_ce), as_f32(w_se)


def _check_common(alpha, reduction, op):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"{op}: alpha must be a finite number, got {alpha!r}")


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

    Returns
    -------
    Tensor: float32 scalar or [N]. Gradient flows to ``logits`` only.

    Formula: ``ℓ = w_ce·CE + α·w_se·a·(CE + e^u − 1 − u)``, ``CE = LSE − z[x0]``,
    ``u = LSE − log K``. Accumulation in fp32 on every backend. The fused backends read the
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
    name = _backend.resolve(backend, logits.device, op)
    if name == "torch":
        check_dtype(op, "logits", logits, _FLOAT_DTYPES)
        targets, ratio, w_ce, w_se = _prepare_rows(targets, ratio, w_ce, w_se, N, logits.device, op)
        _check_values(logits, targets, ratio, w_ce, w_se, ignore_index, op)
        return d3diff_loss_ref(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, reduction)
    check_dtype(op, "logits", logits, _KERNEL_DTYPES)
    targets, ratio, w_ce, w_se = _prepare_rows(targets, ratio, w_ce, w_se, N, logits.device, op)
    if K > 1 and logits.stride(1) != 1 or N > 1 and logits.stride(0) < K:
        logits = logits.contiguous()  # kernels take column stride 1 and non-overlapping rows
    loss = _d3diff_loss_fwd(
        logits, targets, ratio, w_ce, w_se, float(alpha), int(ignore_index), name,
        bool(inplace_backward),
    )  # fmt: skip
    return loss.sum() if reduction == "sum" else loss


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


# ------------------------------------------------------------------------------------------------
# d3diff_linear_loss: LM head fused with the loss, chunked over rows so only a [C, K] block of
# logits exists at a time (Liger's fused-linear-CE scheme). reduction="sum": the gradients w.r.t.
# hidden, weight and bias are accumulated during the forward (3 matmuls in all) and scaled in
# backward. reduction="none": the forward keeps nothing but the inputs, backward recomputes each
# chunk with the incoming per-row gradient (4 matmuls, same memory).
# ------------------------------------------------------------------------------------------------


def _chunk_rows(N: int, D: int, K: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(int(chunk_size), max(N, 1)))
    # Logits block about the size of the hidden states (Liger's rule), a power of two ≥ 64 rows.
    rows = max(1, (N * D) // max(K, 1))
    return max(64, 1 << (rows - 1).bit_length()) if N > 64 else max(N, 1)


def _linear_chunks(hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
                   backend, grad_scale, want_grads):  # fmt: skip
    """Run the row kernel chunk by chunk; returns (loss [N], dh, dw, db) (grads None if unwanted)."""
    N, D = hidden.shape
    rows_fn = _ROWS[backend]
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if want_grads else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grads else None
    db = (
        torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        if want_grads and bias is not None
        else None
    )
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        h = hidden[lo:hi]
        logits = F.linear(h, weight, bias)  # [C, K], the only logits block alive
        scale = None if grad_scale is None else grad_scale[lo:hi]
        rows_fn(
            logits, targets[lo:hi], ratio[lo:hi], w_ce[lo:hi], w_se[lo:hi], alpha, ignore_index,
            loss[lo:hi], logits if want_grads else None, scale,
        )  # fmt: skip  (gradient written in place over the logits block)
        if want_grads:
            torch.mm(logits, weight, out=dh[lo:hi])  # [C, K] @ [K, D]
            dw.addmm_(logits.t().float(), h.float())  # fp32 accumulation across chunks
            if db is not None:
                db += logits.sum(0, dtype=torch.float32)
    if want_grads:
        dw = dw.to(weight.dtype)
        db = db.to(bias.dtype) if db is not None else None
    return loss, dh, dw, db


@torch.library.custom_op("unif2ace::d3diff_linear_loss_fwd", mutates_args=())
def _d3diff_linear_loss_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int,
    chunk: int,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_values(weight.shape[0], targets, ratio, w_ce, w_se, ignore_index, "d3diff_linear_loss")
    with torch.no_grad():
        loss, dh, dw, db = _linear_chunks(
            hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
            backend, None, compute_grad,
        )  # fmt: skip
    empty = lambda: hidden.new_empty(0)  # outputs must not alias each other
    return (
        loss,
        dh if dh is not None else empty(),
        dw if dw is not None else empty(),
        db if db is not None else empty(),
    )


@_d3diff_linear_loss_fwd.register_fake
def _(hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk, compute_grad,
      backend):  # fmt: skip
    N = hidden.shape[0]
    loss = hidden.new_empty(N, dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), db


@torch.library.custom_op("unif2ace::d3diff_linear_loss_bwd", mutates_args=())
def _d3diff_linear_loss_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int,
    chunk: int,
    backend: str,
    grad_rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        _, dh, dw, db = _linear_chunks(
            hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
            backend, grad_rows.to(torch.float32).contiguous(), True,
        )  # fmt: skip
    return dh, dw, db if db is not None else hidden.new_empty(0)


@_d3diff_linear_loss_bwd.register_fake
def _(hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk, backend,
      grad_rows):  # fmt: skip
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


class _D3DiffLinearLoss(torch.autograd.Function):
    """reduction="sum" uses the gradients accumulated in the forward; "none" recomputes them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
                backend, reduction, needs_grad):  # fmt: skip
        precompute = needs_grad and reduction == "sum"
        loss, dh, dw, db = _d3diff_linear_loss_fwd(
            hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
            precompute, backend,
        )  # fmt: skip
        ctx.reduction, ctx.args = reduction, (alpha, ignore_index, chunk, backend)
        ctx.has_bias = bias is not None
        if precompute:
            ctx.save_for_backward(dh, dw, db)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, ratio, w_ce, w_se)
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    def backward(ctx, grad_out):
        alpha, ignore_index, chunk, backend = ctx.args
        if ctx.reduction == "sum":
            dh, dw, db = ctx.saved_tensors
            s = grad_out.to(dh.dtype)
            dh, dw = dh * s, dw * s.to(dw.dtype)
            db = db * s.to(db.dtype) if ctx.has_bias else None
        else:
            hidden, weight, bias, targets, ratio, w_ce, w_se = ctx.saved_tensors
            dh, dw, db = _d3diff_linear_loss_bwd(
                hidden, weight, bias, targets, ratio, w_ce, w_se, alpha, ignore_index, chunk,
                backend, grad_out,
            )  # fmt: skip
            db = db if ctx.has_bias else None
        return dh, dw, db, None, None, None, None, None, None, None, None, None, None


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
    targets, ratio, w_ce, w_se, alpha, ignore_index, reduction
        As in :func:`d3diff_loss`.
    chunk_size : int, optional
        Rows per block of logits. Default: a block about the size of ``hidden`` (≥ 64 rows).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None
        The row kernel used on each block ("torch" = the same chunking with torch math).

    Returns
    -------
    Tensor: float32 scalar or [N]; gradients flow to hidden, weight and bias.

    Peak extra memory is one [C, K] logits block plus the gradient buffers ([N, D], [K, D] in fp32),
    instead of the [N, K] logits and the loss's temporaries.
    """
    op = "d3diff_linear_loss"
    for name_, t, nd in (("hidden", hidden, 2), ("weight", weight, 2)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{op}: {name_} must be a {nd}-D tensor, got {_shape(t)}")
    N, D = hidden.shape
    K = weight.shape[0]
    if weight.shape[1] != D:
        raise ValueError(f"{op}: weight must be [K, D={D}], got {tuple(weight.shape)}")
    if K == 0:
        raise ValueError(f"{op}: weight has K = 0 rows; the loss needs at least one class")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != K):
        raise ValueError(f"{op}: bias must be [K={K}], got {tuple(bias.shape)}")
    _check_common(alpha, reduction, op)
    name = _backend.resolve(backend, hidden.device, op)
    check_dtype(op, "hidden", hidden, _KERNEL_DTYPES if name != "torch" else _FLOAT_DTYPES)
    check_device(op, hidden.device, weight=weight, **({"bias": bias} if bias is not None else {}))
    for name_, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{op}: {name_} dtype {t.dtype} differs from hidden's {hidden.dtype}")
    targets, ratio, w_ce, w_se = _prepare_rows(targets, ratio, w_ce, w_se, N, hidden.device, op)
    chunk = _chunk_rows(N, D, K, chunk_size)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    return _D3DiffLinearLoss.apply(
        hidden.contiguous(), weight.contiguous(), bias, targets, ratio, w_ce, w_se, float(alpha),
        int(ignore_index), chunk, name, reduction, needs_grad,
    )  # fmt: skip
