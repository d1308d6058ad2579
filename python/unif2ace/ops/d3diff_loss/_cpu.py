"""The "cpu" launcher of the D3Diff row kernel: ``unif2ace._C.d3diff_loss_fwd`` (csrc/cpu).

Contract: the module docstring of :mod:`unif2ace.ops.d3diff_loss._torch`. The C++ and CUDA
functions take the same arguments, tensors as descriptors (:func:`unif2ace.ops._native.desc`; the
CUDA one adds a workspace and the stream): :func:`fwd_args` builds them for both.
"""

from __future__ import annotations

from unif2ace import _backend
from unif2ace.ops._native import desc


def fwd_args(logits, targets, ratio, w_ce, w_se, alpha, ignore_index, loss, grad, grad_scale):
    """The arguments of ``d3diff_loss_fwd`` from the launcher's (grad, grad_scale: None = none)."""
    return (
        desc(logits),
        desc(targets),
        desc(ratio),
        desc(w_ce),
        desc(w_se),
        float(alpha),
        int(ignore_index),
        desc(loss),
        desc(grad),
        desc(grad_scale),
    )


@_backend.register("d3diff_loss.fwd", "cpu")
def d3diff_loss_fwd(*args) -> None:
    _backend.cpu_ext().d3diff_loss_fwd(*fwd_args(*args))
