"""Public ops of unif2ace. Every op takes ``backend=`` and has a plain-PyTorch ``*_ref`` oracle.

D3Diff loss: :func:`d3diff_loss`, :func:`d3diff_linear_loss` (references ``*_ref``), with the
noise schedules in :mod:`unif2ace.ops.schedules`.
"""

from unif2ace.ops import schedules
from unif2ace.ops.d3diff_loss import (
    d3diff_linear_loss,
    d3diff_linear_loss_ref,
    d3diff_loss,
    d3diff_loss_ref,
)
from unif2ace.ops.schedules import DEFAULT_ALPHA, d3diff_weights, schedule

__all__ = [
    "DEFAULT_ALPHA",
    "d3diff_linear_loss",
    "d3diff_linear_loss_ref",
    "d3diff_loss",
    "d3diff_loss_ref",
    "d3diff_weights",
    "schedule",
    "schedules",
]
