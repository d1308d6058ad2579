"""The D3Diff custom ops: torch.library registration, fakes and autograd.

Every op here runs the row kernel ``"d3diff_loss.fwd"`` through
``_backend.launcher("d3diff_loss.fwd", backend)`` (contract: :mod:`._torch`).

* ``unif2ace::d3diff_loss_fwd`` / ``unif2ace::d3diff_loss_bwd``: the loss on given logits. The
  forward writes only the per-row loss (one read of the logits); the backward recomputes each row's
  log-sum-exp and target logit and writes the gradient, scaled by the incoming per-row gradient,
  in the same call (one more read, one write). Nothing [N, K] is held between forward and backward,
  and the backward allocates only the [N, K] gradient it returns. Precomputing the gradient in the
  forward (Liger-style) has the same peak but keeps that buffer alive from forward to backward and
  needs a scale pass; both were measured (docs/results.md).
* ``unif2ace::d3diff_linear_loss``: the LM head fused with the loss, chunked over rows so that only
  a [C, K] block of logits exists at a time (Liger's fused-linear-CE scheme). It serves
  ``d3diff_linear_loss`` and ``fused_linear_cross_entropy`` (α = 0, ratio and w_se zero).
  reduction="sum": the gradients w.r.t. hidden, weight and bias are accumulated in the forward
  (3 matmuls in all) and scaled in the backward. reduction="none": the forward keeps only the
  inputs and the backward recomputes each chunk with the incoming per-row gradient (4 matmuls, same
  memory).

Autocast: the custom ops register no autocast rule; their bodies run with autocast off, so the
launchers and the LM head's matmuls see the inputs' own dtypes (the public linear losses cast
those to the autocast dtype first, see :func:`unif2ace.ops.d3diff_linear_loss`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from unif2ace import _backend
from unif2ace.ops._validate import check_finite, check_index_range
from unif2ace.ops.d3diff_loss import _cpu, _cuda, _torch, _triton  # noqa: F401  (registration)

KERNEL = "d3diff_loss.fwd"
FUSED_CE = "fused_linear_cross_entropy"


def check_values(op, K, targets, ratio, w_ce, w_se, ignore_index):
    """Data-dependent checks (a host sync on GPU; off with unif2ace.set_checks(False)).

    Run inside the custom ops, so a compiled graph keeps them without a graph break.
    ``fused_linear_cross_entropy`` passes its per-row ``weights`` as ``w_ce`` (ratio and w_se are
    its zeros), so the messages name them as its caller does.
    """
    if not _backend.checks_enabled():
        return
    check_index_range(targets, K, op, "targets", ignore_index=ignore_index)
    check_finite(ratio, op, "ratio", nonnegative=True)
    check_finite(w_ce, op, "weights" if op == FUSED_CE else "w_ce")
    check_finite(w_se, op, "w_se")


def _autocast_off(t: torch.Tensor):
    """Autocast off for ``t``'s device type inside a custom op's body."""
    dev = t.device.type
    if not torch.amp.is_autocast_available(dev):  # e.g. meta tensors
        return nullcontext()
    return torch.autocast(dev, enabled=False)


# ---- d3diff_loss: the loss on given logits -------------------------------------------------------


@torch.library.custom_op("unif2ace::d3diff_loss_fwd", mutates_args=())
def d3diff_loss_fwd(
    logits: torch.Tensor,
    rows: list[torch.Tensor],
    alpha: float,
    ignore_index: int,
    backend: str,
    inplace_backward: bool,
) -> torch.Tensor:
    """Per-row loss [N] fp32 of logits [N, K]; rows = [targets, ratio, w_ce, w_se]."""
    check_values("d3diff_loss", logits.shape[1], *rows, ignore_index)
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    with _autocast_off(logits):
        _backend.launcher(KERNEL, backend)(logits, *rows, alpha, ignore_index, loss, None, None)
    return loss


@d3diff_loss_fwd.register_fake
def _(logits, *_):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


@torch.library.custom_op("unif2ace::d3diff_loss_bwd", mutates_args=())
def d3diff_loss_bwd(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    rows: list[torch.Tensor],
    alpha: float,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """Gradient [N, K] w.r.t. the logits, row n scaled by grad_rows[n]."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    _write_grad(grad, grad_rows, logits, rows, alpha, ignore_index, backend)
    return grad


@d3diff_loss_bwd.register_fake
def _(grad_rows, logits, *_):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _write_grad(grad, grad_rows, logits, rows, alpha, ignore_index, backend):
    """The row kernel writing ``grad``, each row scaled by ``grad_rows`` (its loss is discarded)."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    scale = grad_rows.to(torch.float32).contiguous()
    with _autocast_off(logits):
        _backend.launcher(KERNEL, backend)(logits, *rows, alpha, ignore_index, loss, grad, scale)


def _d3diff_loss_setup(ctx, inputs, output):
    logits, rows, alpha, ignore_index, backend, inplace_backward = inputs
    ctx.args = (alpha, ignore_index, backend)
    ctx.inplace_backward = inplace_backward
    ctx.save_for_backward(logits, *rows)


def _d3diff_loss_backward(ctx, grad_loss):
    logits, *rows = ctx.saved_tensors
    traced = torch.compiler.is_compiling() or type(logits) is not torch.Tensor
    if ctx.inplace_backward and not traced:
        # Opt-in (Liger-style): the gradient overwrites the logits' storage, so backward allocates
        # nothing [N, K]. Traced graphs take the out-of-place op below (same values).
        _write_grad(logits, grad_loss, logits, rows, *ctx.args)
        # The kernel wrote through a raw pointer, which autograd cannot see: bump the version so
        # that a second backward through this graph is refused instead of reading the gradient
        # as if it were the logits.
        torch.autograd.graph.increment_version(logits)
        grad = logits
    else:
        grad = d3diff_loss_bwd(grad_loss, logits, rows, *ctx.args)
    return grad, [None] * len(rows), None, None, None, None


d3diff_loss_fwd.register_autograd(_d3diff_loss_backward, setup_context=_d3diff_loss_setup)


# ---- d3diff_linear_loss / fused_linear_cross_entropy: LM head fused with the loss -----------------


def auto_chunk_rows(N: int, D: int, K: int) -> int:
    """Rows per chunk when the caller gives none: a logits block about the size of the hidden
    states (Liger's rule), a power of two ≥ 64 rows."""
    rows = max(1, (N * D) // max(K, 1))
    return max(64, 1 << (rows - 1).bit_length()) if N > 64 else max(N, 1)


def _linear_chunks(hidden, weight, bias, rows, alpha, ignore_index, chunk, backend, scale, grads):
    """The row kernel chunk by chunk over ``hidden @ weight.T + bias``.

    rows: (targets, ratio, w_ce, w_se); chunk: rows per chunk, 0 for :func:`auto_chunk_rows`;
    scale: None or [N] fp32 multiplying each gradient row; grads: whether to compute them.
    Returns (loss [N], dh, dw, db), the gradients None if not computed (db also without a bias).
    """
    N, D = hidden.shape
    chunk = chunk or auto_chunk_rows(N, D, weight.shape[0])
    launch = _backend.launcher(KERNEL, backend)
    loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
    dh = dw = db = None
    if grads:
        dh = torch.empty_like(hidden)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if bias is not None:
            db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
    for lo in range(0, N, chunk):
        hi = min(lo + chunk, N)
        h = hidden[lo:hi]
        logits = F.linear(h, weight, bias)  # [C, K], the only logits block alive
        grad = logits if grads else None  # the gradient overwrites the logits block
        chunk_scale = None if scale is None else scale[lo:hi]
        chunk_rows = [r[lo:hi] for r in rows]
        launch(logits, *chunk_rows, alpha, ignore_index, loss[lo:hi], grad, chunk_scale)
        if grads:
            torch.mm(grad, weight, out=dh[lo:hi])  # [C, K] @ [K, D]
            dw.addmm_(grad.t().float(), h.float())  # fp32 accumulation across chunks
            if db is not None:
                db += grad.sum(0, dtype=torch.float32)
    if grads:
        dw = dw.to(weight.dtype)
        db = db.to(bias.dtype) if db is not None else None
    return loss, dh, dw, db


@torch.library.custom_op("unif2ace::d3diff_linear_loss", mutates_args=())
def d3diff_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    compute_grad: bool,
    grad_rows: torch.Tensor | None,
    rows: list[torch.Tensor],
    alpha: float,
    ignore_index: int,
    chunk: int,
    backend: str,
    op: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], dh, dw, db) of the fused LM head + loss, ``chunk`` rows at a time (0: the
    op's own choice, :func:`auto_chunk_rows`).

    rows = [targets, ratio, w_ce, w_se]. compute_grad: also the gradients (else dh, dw, db are
    empty), each row scaled by ``grad_rows`` when given (the backward of reduction="none"); db is
    empty without a bias. op: the public op, named in error messages.
    """
    if grad_rows is None:  # a forward; a backward's inputs were checked by its forward
        check_values(op, weight.shape[0], *rows, ignore_index)
    scale = None if grad_rows is None else grad_rows.to(torch.float32).contiguous()
    with torch.no_grad(), _autocast_off(hidden):
        loss, *grads = _linear_chunks(
            hidden, weight, bias, rows, alpha, ignore_index, chunk, backend, scale, compute_grad
        )
    # missing gradients: distinct empty tensors (the outputs of a custom op must not alias)
    return loss, *(g if g is not None else hidden.new_empty(0) for g in grads)


@d3diff_linear_loss.register_fake
def _(hidden, weight, bias, compute_grad, *_):
    loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
    if not compute_grad:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    db = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, torch.empty_like(hidden), torch.empty_like(weight), db


class LinearLoss(torch.autograd.Function):
    """reduction="sum" uses the gradients accumulated in the forward; "none" recomputes them.

    ``apply(hidden, weight, bias, reduction, needs_grad, targets, ratio, w_ce, w_se, alpha,
    ignore_index, chunk, backend, op)``: the rows and the last five as :func:`d3diff_linear_loss`
    takes them (the rows flat: dynamo traces autograd.Function inputs one tensor at a time).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, reduction, needs_grad, *rows_and_args):
        precompute = needs_grad and reduction == "sum"
        rows, args = list(rows_and_args[:4]), rows_and_args[4:]
        loss, dh, dw, db = d3diff_linear_loss(hidden, weight, bias, precompute, None, rows, *args)
        ctx.reduction, ctx.args = reduction, args
        ctx.has_bias = bias is not None
        if precompute:
            ctx.save_for_backward(dh, dw, db)
        else:
            ctx.save_for_backward(hidden, weight, bias, *rows)
        return loss.sum() if reduction == "sum" else loss

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction == "sum":
            dh, dw, db = ctx.saved_tensors
            s = grad_out.to(dh.dtype)
            dh, dw = dh * s, dw * s.to(dw.dtype)
            db = db * s.to(db.dtype) if ctx.has_bias else None
        else:
            hidden, weight, bias, *rows = ctx.saved_tensors
            _, dh, dw, db = d3diff_linear_loss(
                hidden, weight, bias, True, grad_out, rows, *ctx.args
            )
            db = db if ctx.has_bias else None
        return (dh, dw, db) + (None,) * 11
