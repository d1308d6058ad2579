"""Plain-PyTorch references of the grouped MoE ops: the oracle of every backend's tests (run in
float64), the body of the "torch" backend, and the baselines of ``benchmarks/bench_moe.py``
(the Hugging Face style loop over experts; ``F.grouped_mm``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unif2ace.ops.moe._types import MoERouting


def _consistent(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) elementwise with equal inputs mapped to bit-equal outputs: on the CPU torch's (and
    Inductor's) vectorised and scalar loops may round transcendental functions differently (ties
    must stay ties), so every run of equal values in sorted order takes the output of its first
    element; elsewhere every element takes the same code path and fn runs directly. Sizes are
    fixed (no torch.unique, whose output size is data): torch.compile traces it whole."""
    if x.device.type != "cpu" or x.numel() == 0:
        return fn(x)
    srt, order = torch.sort(x.reshape(-1))
    idx = torch.arange(srt.numel(), device=x.device)
    starts = torch.cat([srt.new_ones(1, dtype=torch.bool), srt[1:] != srt[:-1]])
    first = torch.where(starts, idx, 0).cummax(0).values  # the start of each element's run
    out = fn(srt)[first]
    return torch.empty_like(out).scatter_(0, order, out).view(x.shape)


def group_cols(
    group_offsets: torch.Tensor,
    group_ids: torch.Tensor | None,
    T: int,
    E: int,
    nmax: int | None = None,
):
    """Per token: its group's first expert lo [T], the candidate columns [T, nmax] (clamped into
    range) and which of them are real [T, nmax]. ``nmax``: the largest group size, read from the
    offsets (a host read) when not given."""
    offs = group_offsets.to(torch.int64)
    sizes = offs[1:] - offs[:-1]
    if nmax is None:
        nmax = int(sizes.max())
    gid = (
        group_ids.to(torch.int64)
        if group_ids is not None
        else torch.zeros(T, dtype=torch.int64, device=offs.device)
    )
    lo, n = offs[gid], sizes[gid]
    ar = torch.arange(nmax, device=offs.device)
    valid = ar[None, :] < n[:, None]
    cols = torch.where(valid, lo[:, None] + ar[None, :], 0).clamp_(max=max(E - 1, 0))
    return lo, cols, valid


def _route_scores(z, cols, valid, scoring):
    """Differentiable scores of the candidates [T, nmax] (0 where not a candidate)."""
    zl = z.gather(1, cols).masked_fill(~valid, -math.inf)
    if scoring == "softmax":
        return torch.softmax(zl, dim=1)
    return torch.sigmoid(zl).masked_fill(~valid, 0.0)


def _route_outputs(p, lo, cols, valid, ids, scoring, renormalize, scaling, E):
    """weights [T, k] and prob_sums [E] from the candidate scores p and the chosen global ids."""
    v = p.gather(1, ids - lo[:, None])
    w = v / v.sum(1, keepdim=True) if renormalize else v
    w = w * scaling
    q = p if scoring == "softmax" else p / p.sum(1, keepdim=True)
    q = q.masked_fill(~valid, 0.0)
    prob_sums = torch.zeros(E, dtype=p.dtype, device=p.device).index_add(
        0, cols.reshape(-1), q.reshape(-1)
    )
    return w, prob_sums


def _select(logits, cols, valid, scoring, bias, top_k, n_group, topk_group):
    """Contract §1 selection: float64 keys, group limit, stable descending order (ties → lower
    index). Returns the chosen local columns [T, k]."""
    zd = logits.detach().to(torch.float64).gather(1, cols).masked_fill(~valid, -math.inf)
    if scoring == "softmax":
        e = _consistent(torch.exp, zd - zd.max(1, keepdim=True).values)
        key = e / e.sum(1, keepdim=True)
    else:
        key = _consistent(torch.sigmoid, zd)
    if bias is not None:
        key = key + bias.detach().to(torch.float64)[cols]
    key = key.masked_fill(~valid, -math.inf)
    T, n = key.shape
    if n_group:
        gs = n // n_group
        kg = key.view(T, n_group, gs).sort(dim=2, descending=True).values
        gscore = kg[:, :, :2].sum(2) if gs > 1 else kg[:, :, 0]
        keep = gscore.sort(dim=1, descending=True, stable=True).indices[:, :topk_group]
        allowed = torch.zeros(T, n_group, dtype=torch.bool, device=key.device)
        allowed.scatter_(1, keep, True)
        key = key.masked_fill(~allowed.repeat_interleave(gs, dim=1), -math.inf)
    return key.sort(dim=1, descending=True, stable=True).indices[:, :top_k]


def moe_route_ref(
    router_logits: torch.Tensor,
    top_k: int,
    group_offsets: torch.Tensor | None = None,
    group_ids: torch.Tensor | None = None,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int = 0,
    topk_group: int = 0,
    correction_bias: torch.Tensor | None = None,
    scaling: float = 1.0,
    *,
    max_group_size: int | None = None,
) -> MoERouting:
    """Routing in plain PyTorch (contract §1): masked softmax/sigmoid, float64 keys, stable sort.

    Differentiable w.r.t. ``router_logits`` (weights and prob_sums). Math in fp32, or fp64 for
    fp64 logits. ``group_offsets`` int64 [G+1] (None: one group of all E experts).
    ``max_group_size``: the largest group (the width of the candidate tiles); given, nothing is
    read back from the device (on a GPU), else it is read from the offsets.
    """
    z = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    T, E = z.shape
    if group_offsets is None:
        group_offsets = torch.tensor([0, E], device=z.device)
        max_group_size = E
    lo, cols, valid = group_cols(group_offsets, group_ids, T, E, max_group_size)
    local = _select(z, cols, valid, scoring, correction_bias, top_k, n_group, topk_group)
    ids = lo[:, None] + local
    p = _route_scores(z, cols, valid, scoring)
    w, prob_sums = _route_outputs(p, lo, cols, valid, ids, scoring, renormalize, scaling, E)
    flat = ids.reshape(-1)  # a histogram of known size (bincount's size would be a host read)
    counts = torch.zeros(E, dtype=torch.int32, device=ids.device)
    counts.index_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    return MoERouting(ids, w, counts, prob_sums)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu_glu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def moe_mlp_ref(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    activation: str = "silu_glu",
) -> torch.Tensor:
    """Routed experts as a loop over experts (Hugging Face Mixtral style): for each expert, gather
    its tokens, ``act(x W_up^T) W_down^T``, weight, ``index_add`` into the output. Autograd by
    PyTorch; computes in x's dtype (use float64 for the oracle)."""
    y = torch.zeros_like(x)
    for e in range(w_up.shape[0]):
        tok, j = torch.where(topk_ids == e)
        if tok.numel() == 0:
            continue
        a = activate(x[tok] @ w_up[e].T, activation)
        o = a @ w_down[e].T
        if topk_weights is not None:
            o = o * topk_weights[tok, j, None].to(o.dtype)
        y = y.index_add(0, tok, o)
    return y


def moe_mlp_grouped_mm(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    activation: str = "silu_glu",
) -> torch.Tensor:
    """Routed experts with ``torch.nn.functional.grouped_mm`` (argsort, gather, two grouped GEMMs,
    weight, un-permute, sum over k): the strongest plain-PyTorch peer, as transformers' own
    "grouped_mm" experts implementation. fp32/bf16 with 16-byte-aligned rows only (a grouped_mm
    rule). Its CPU backward needs a contiguous incoming gradient."""
    T, k = topk_ids.shape
    E = w_up.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    h = F.grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    o = F.grouped_mm(activate(h, activation), w_down.transpose(1, 2), offs=offs)
    if topk_weights is not None:
        o = o * topk_weights.reshape(-1)[order, None].to(o.dtype)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return o[inv].view(T, k, -1).sum(1)
