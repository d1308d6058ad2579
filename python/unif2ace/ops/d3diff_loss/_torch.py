"""The "torch" launcher of the D3Diff row kernel: the executable spec of the launcher contract.

LAUNCHER CONTRACT (kernel ``"d3diff_loss.fwd"``; every backend registers one launcher with this
signature and these effects)::

    d3diff_loss_fwd(logits, targets, ratio, w_ce, w_se, alpha, ignore_index,
                    loss, grad, grad_scale) -> None

* ``logits``  [N, K] float32 / bfloat16 / float16, column stride 1, any row stride ≥ K (e.g. a
  column range of a wider vocabulary). Read only (unless ``grad`` aliases it).
* ``targets`` [N] int64, contiguous: the clean token of each row in [0, K), or ``ignore_index``.
* ``ratio``, ``w_ce``, ``w_se`` [N] float32, contiguous: ``a = (1 − γ)/γ``, the CE weight and the
  score-entropy weight of each row. ``alpha`` (float) weights the score-entropy term.
* ``loss`` [N] float32, written: ``ℓ = w_ce·CE + α·w_se·a·(CE + e^u − 1 − u)`` per row, with
  ``CE = LSE − z[x0]``, ``u = LSE − log K``; the score-entropy term is exactly 0 when
  ``α·w_se = 0`` (even where e^u overflows). 0 for an ignored row.
* ``grad`` None (loss only) or [N, K] in the logits' dtype, column stride 1, written:
  ``∂ℓ/∂z_y = w_ce·p_y + α·w_se·a·e^{z_y − log K} − (w_ce + α·w_se·a)·[y = x0]``, 0 for an ignored
  row. It may be ``logits`` itself: the gradient then overwrites the logits in place.
* ``grad_scale`` None or [N] float32: multiplies each gradient row (not the loss).
* A target outside [0, K) that is not ``ignore_index`` is never read out of bounds: its loss and
  its whole gradient row are NaN; the other rows are unaffected.
* Accumulation in float32 whatever the logits' dtype; no host synchronisation; nothing returned.

The launchers: this module (torch ops), ``_cpu`` (``unif2ace._C``), ``_triton``
(``unif2ace.triton_kernels.d3diff_loss``) and ``_cuda`` (``unif2ace._C_cuda``).
"""

from __future__ import annotations

import math

import torch

from unif2ace import _backend


@_backend.register("d3diff_loss.fwd", "torch")
def d3diff_loss_fwd(
    logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale
):
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
