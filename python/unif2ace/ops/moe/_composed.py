"""Expert launchers composed from a backend's own permute / combine kernels and torch GEMMs.

Contract §7 / §8 (_torch.py) for backends with no grouped GEMM of their own: "torch" and "cpu"
(CPU tensors), "cuda" (its GEMMs), and "triton" in backward. :func:`experts_fwd` and
:func:`experts_bwd` take the backend's permute / combine / combine_bwd launchers (and optionally
a faster activation) and return its ``moe.experts_fwd`` / ``moe.experts_bwd`` launcher.

The expert GEMMs run one of two ways. "loop": one torch.mm per non-empty expert into a slice of
the grouped buffer (any size, any float dtype; one host read of the offsets per forward and per
backward: the one documented read of the layer, the expert sizes being data). "grouped_mm":
F.grouped_mm (fp32/bf16, rows 16-byte aligned; no host sync, so the choice on CUDA). On CPU the
loop is the faster of the two for the whole layer (docs/results.md; the benchmark's
``cpu+grouped_mm`` row repeats the comparison). ``UNIF2ACE_MOE_GEMM=loop|grouped_mm`` overrides.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from unif2ace.ops.moe.reference import activate

_GEMM = {"cpu": "loop", "cuda": "grouped_mm"}  # per device type


def _gemm_mode(x: torch.Tensor, dims: Sequence[int]) -> str:
    mode = os.environ.get("UNIF2ACE_MOE_GEMM") or _GEMM.get(x.device.type, "loop")
    ok = x.dtype in (torch.float32, torch.bfloat16) and all(
        d * x.element_size() % 16 == 0 for d in dims
    )
    return mode if mode == "loop" or ok else "loop"


def _bounds(offsets: torch.Tensor) -> list[tuple[int, int, int]]:
    o = offsets.tolist()
    return [(e, o[e], o[e + 1]) for e in range(len(o) - 1) if o[e + 1] > o[e]]


def _grouped_linear(a, w, offsets, out, mode, bounds):
    """out[rows of e] = a[rows of e] @ w[e].T for every expert e (rows grouped by offsets)."""
    if mode == "grouped_mm":
        out.copy_(F.grouped_mm(a, w.transpose(1, 2), offs=offsets[1:]))
        return
    for e, lo, hi in bounds:
        torch.mm(a[lo:hi], w[e].T, out=out[lo:hi])


def _grouped_linear_da(g, w, offsets, grad_a, mode, bounds):
    """grad_a[rows of e] = g[rows of e] @ w[e] (the input gradient of _grouped_linear)."""
    if mode == "grouped_mm":
        grad_a.copy_(F.grouped_mm(g, w, offs=offsets[1:]))
        return
    for e, lo, hi in bounds:
        torch.mm(g[lo:hi], w[e], out=grad_a[lo:hi])


def _grouped_linear_dw(g, a, offsets, grad_w, mode, bounds):
    """grad_w[e] = g_eᵀ @ a_e (the weight gradient of _grouped_linear; 0 for empty experts)."""
    if mode == "grouped_mm":
        # F.grouped_mm need not write the blocks of empty groups (its bf16 CUDA path allocates the
        # output with empty_like): zero them here, from the offsets on the device (no host read)
        dw = F.grouped_mm(g.T, a, offs=offsets[1:])
        empty = (offsets[1:] == offsets[:-1])[:, None, None]
        grad_w.copy_(dw.masked_fill_(empty, 0))
        return
    if len(bounds) < grad_w.shape[0]:
        grad_w.zero_()
    for e, lo, hi in bounds:
        torch.mm(g[lo:hi].T, a[lo:hi], out=grad_w[e])


def activate_bwd(h, da, activation, consume=False):
    """(dh, a): the activation's input gradient and its recomputed output, in torch ops
    (``consume`` is accepted for the signature of the fused versions and ignored)."""
    if activation == "silu_glu":
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        Fh = gate.shape[-1]
        dh[:, :Fh] = torch.ops.aten.silu_backward(da * up, gate)
        dh[:, Fh:] = da * F.silu(gate)
    else:
        dh = torch.ops.aten.gelu_backward(
            da, h, approximate="tanh" if activation == "gelu_tanh" else "none"
        )
    return dh, activate(h, activation)


def experts_fwd(permute, combine, act_fwd=activate):
    """A ``moe.experts_fwd`` launcher from a backend's permute + combine (+ activation) and torch
    GEMMs."""

    def fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs):
        D, Fu, Fd = x.shape[1], w_up.shape[1], w_down.shape[2]
        mode = _gemm_mode(x, (D, Fu, Fd))
        bounds = _bounds(plan.offsets) if mode == "loop" else None
        permute(x, plan.sorted_slot, plan.top_k, xs)
        _grouped_linear(xs, w_up, plan.offsets, h, mode, bounds)
        _grouped_linear(act_fwd(h, activation), w_down, plan.offsets, out, mode, bounds)
        combine(out, plan.slot_pos, weights, y)

    return fwd


def experts_bwd(permute, combine, combine_bwd, act_bwd=activate_bwd):
    """A ``moe.experts_bwd`` launcher from a backend's permute / combine / combine_bwd (+ activation
    backward) and torch GEMMs."""

    def bwd(
        grad_y,
        x,
        w_up,
        w_down,
        weights,
        plan,
        activation,
        h,
        out,
        xs,
        grad_x,
        grad_w_up,
        grad_w_down,
        grad_weights,
        consume=False,
    ):
        N, D = out.shape
        Fu, Fd = w_up.shape[1], w_down.shape[2]
        mode = _gemm_mode(x, (D, Fu, Fd))
        bounds = _bounds(plan.offsets) if mode == "loop" else None
        if xs.shape[0] != N:  # a backend that gathers inside its GEMM saved no xs
            xs = x.new_empty(N, D)
            permute(x, plan.sorted_slot, plan.top_k, xs)
        # consume=True (eager autograd, contract §8): the saved buffers are reused for the
        # gradients, d_out over out, dh over h (where the activation backward allows), dxs over
        # xs, instead of three fresh N-row buffers (benchmarks/bench_moe.py: peak memory).
        d_out = out if consume else torch.empty_like(out)
        combine_bwd(grad_y, out, plan.slot_pos, weights, d_out, grad_weights)
        da = out.new_empty(N, Fd)
        _grouped_linear_da(d_out, w_down, plan.offsets, da, mode, bounds)
        dh, a = act_bwd(h, da, activation, consume)
        del da
        _grouped_linear_dw(d_out, a, plan.offsets, grad_w_down, mode, bounds)
        del a, d_out
        _grouped_linear_dw(dh, xs, plan.offsets, grad_w_up, mode, bounds)
        dxs = xs if consume else torch.empty_like(xs)  # xs is not needed after grad_w_up
        _grouped_linear_da(dh, w_up, plan.offsets, dxs, mode, bounds)
        del dh
        combine(dxs, plan.slot_pos, None, grad_x)

    return bwd
