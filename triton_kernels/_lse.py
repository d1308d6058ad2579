"""Triton device helpers shared by the row-reduction kernels (d3diff_loss, mask_sampling_step)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _online_lse_update(m, s, x):
    """One step of a per-lane online log-sum-exp: (m, s) -> state of (m, s) plus x, one exp.

    s counts sum exp(x_i - m). A lane whose max does not move adds e^{x-m}; one whose max moves
    rescales by e^{m-x} and adds 1; both are e^{-|x-m|}. m starts at -FLT_MAX (not -inf) so a
    masked x = -inf gives e^{-inf} = 0 rather than e^{nan}; a NaN x makes s NaN (NaN in, NaN out).
    """
    d = x - m
    e = tl.exp(-tl.abs(d))
    up = d > 0.0
    s = tl.where(up, s * e + 1.0, s + e)
    m = tl.where(up, x, m)
    return m, s
