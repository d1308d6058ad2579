"""The arguments of ``d3diff_loss_fwd`` common to both native modules: ``unif2ace._C`` (launcher in
``_cpu``) and ``unif2ace._C_cuda`` (``_cuda``, which appends its workspace and stream). Raw
pointers, sizes, row strides and a dtype code, in the order of the bindings (csrc/bindings.cpp,
csrc/bindings_cuda.cpp); the launcher arguments are those of the contract in :mod:`._torch`.
"""

from __future__ import annotations

from unif2ace import _backend


def d3diff_loss_fwd_args(
    logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale
) -> tuple:
    N, K = logits.shape
    return (
        logits.data_ptr(),
        N,
        K,
        logits.stride(0),
        _backend.DTYPE_CODES[logits.dtype],
        targets.data_ptr(),
        ratio.data_ptr(),
        w_ce.data_ptr(),
        w_se.data_ptr(),
        float(alpha),
        int(ignore_index),
        loss.data_ptr(),
        0 if grad is None else grad.data_ptr(),  # 0: no gradient
        0 if grad is None else grad.stride(0),
        0 if grad_scale is None else grad_scale.data_ptr(),  # 0: no scale
    )
