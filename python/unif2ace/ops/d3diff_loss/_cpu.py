"""The "cpu" launcher of the D3Diff row kernel: ``unif2ace._C.d3diff_loss_fwd`` (csrc/cpu).

Contract: the module docstring of :mod:`unif2ace.ops.d3diff_loss._torch`.
"""

from __future__ import annotations

from unif2ace import _backend
from unif2ace.ops.d3diff_loss._native import d3diff_loss_fwd_args


@_backend.register("d3diff_loss.fwd", "cpu")
def d3diff_loss_fwd(*args) -> None:
    _backend.cpu_ext().d3diff_loss_fwd(*d3diff_loss_fwd_args(*args))
