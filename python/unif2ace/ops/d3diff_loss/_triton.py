"""The "triton" launcher of the D3Diff row kernel: :mod:`unif2ace.triton_kernels.d3diff_loss`,
whose launch function makes the logits' device current (a Triton launch goes to the current
device and its current stream).

Contract: the module docstring of :mod:`unif2ace.ops.d3diff_loss._torch`.
"""

from __future__ import annotations

from unif2ace import _backend


@_backend.register("d3diff_loss.fwd", "triton")
def d3diff_loss_fwd(
    logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale
):
    # Imported here: triton is heavy and optional.
    from unif2ace.triton_kernels import d3diff_loss as tk

    tk.d3diff_loss_fwd(
        logits, targets, ratio, w_ce, w_se, float(alpha), int(ignore_index), loss, grad, grad_scale
    )
