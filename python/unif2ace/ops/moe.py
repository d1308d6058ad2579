"""Grouped MoE dispatch: routing, permutation plan, permute / combine, expert MLP, balance loss.

UniF²ace's token-level MoE (shared/DESIGN.md §6): G task groups, each with its own routed experts
(global expert id = group offset + local id) plus shared experts; token t is routed top-k among the
experts of group ``group_ids[t]``. The ops are model-agnostic: plain Mixtral / Qwen-MoE softmax
top-k and DeepSeek-V3 group-limited sigmoid routing are special cases (see :mod:`moe_hf` for the
Hugging Face drop-in).

Pipeline (every arrow a public op, each with ``backend=``)::

    router_logits [T, E] --moe_route--> topk_ids [T, k], topk_weights [T, k] (+ counts, prob sums)
    topk_ids --moe_plan--> MoEPlan (expert-sorted order, offsets, tile map)
    x [T, D] --moe_permute--> xs [N = T·k, D] (rows grouped by expert)
    experts: per-expert up projection, activation, down projection  -> out [N, D]
    out --moe_combine(weights)--> y [T, D] = Σ_j w[t, j] · out[slot_pos[t, j]]
    moe_mlp = plan + permute + experts + combine in one custom op with its own backward.

File layout (shared/STYLE.md): the launcher contract, references, launchers per backend, custom ops
with fakes and autograd, public functions.
"""

# ================================================================================================
# LAUNCHER CONTRACT — what a backend ("cpu" C++, "cuda", "triton") implements.
#
# Each op family below has a dict ``_<FAMILY>: {backend: launcher}``. A new backend adds one entry
# per dict (the "torch" entries implement the same contract in torch ops and are the executable
# spec). Launchers take tensors, read them, and write into preallocated outputs (never allocate
# outputs themselves, never return values; all outputs may be poisoned with NaN / -1 before the
# call and every element must be written). No host synchronisation on GPU paths. Inputs have been
# validated by the Python layer (shapes, dtypes, devices, index ranges when checks are on); kernels
# must still never read or write out of bounds for an out-of-range index (clamp or skip it).
# Shape letters: T tokens, E experts (all groups together), G task groups, k top-k, D model dim,
# F expert hidden dim, Fu = 2F (silu_glu: gate rows first, then up rows) or F (gelu, gelu_tanh),
# N = T·k routed rows (slots), slot s = t·k + j (token t's j-th choice).
#
# Index dtypes: topk_ids int64 (torch/HF convention) on input to plan may also be int32;
# every plan array is int32 (N < 2^31 is checked); element offsets inside kernels are 64-bit
# (row · D can pass 2^31).
#
# 1. _ROUTE[b](logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
#              topk_group, scaling, ids, weights, counts, prob_sums)
#    logits  [T, E] float32/bf16/fp16, column stride 1, any row stride (router output).
#    group_offsets int64 [G+1] (contiguous, offsets[0] = 0, offsets[G] ≤ E): group g owns the
#            global experts [offsets[g], offsets[g+1]); a single group [0, E] when not grouped.
#    group_ids int64 [T] or None (None: every token in group 0). bias float32 [E] or None.
#    scoring: "softmax" | "sigmoid"; renormalize: bool; n_group, topk_group: int (0 = off);
#    scaling: float.  Outputs: ids int64 [T, k], weights float32 [T, k], counts int32 [E],
#    prob_sums float32 [E].
#    Per token t with group g, candidates c ∈ [lo, hi) = [offsets[g], offsets[g+1]), n = hi − lo:
#      score_c = softmax over the candidates of z_c (scoring="softmax") or sigmoid(z_c),
#      key_c   = score_c + bias_c (bias 0 when None), COMPUTED IN FLOAT64 (so ties of (z, bias)
#                stay exact ties and near-ties rank the same on every backend).
#      n_group > 0 (DeepSeek-V3): candidates split into n_group equal consecutive subgroups;
#                subgroup score = sum of its two largest keys (its largest if it has one expert);
#                the topk_group best subgroups stay eligible, the rest are masked.
#      ids[t, :] = the k eligible candidates with the largest key, in descending key order;
#                EQUAL KEYS: LOWER EXPERT INDEX FIRST (and it wins a place at the boundary);
#                the same rule for subgroup selection.
#      v_j = score_{ids[t, j]}; weights[t, j] = scaling · v_j / Σ_i v_i   (renormalize)
#                                             = scaling · v_j            (otherwise)
#      counts[e]    = number of slots (t, j) with ids[t, j] = e  (deterministic integer)
#      prob_sums[e] = Σ_t q_{t,e} over tokens whose group contains e, with q = the softmax score
#                (softmax) or score / Σ_candidates score (sigmoid; DeepSeek-V3's normalised
#                affinity). fp32 result; accumulate in fp32 or wider, in a fixed order
#                (run-to-run deterministic for a fixed thread count / grid).
# 2. _ROUTE_BWD[b](logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums, scoring,
#                  renormalize, scaling, grad_logits)
#    grad_weights float32 [T, k] or None, grad_prob_sums float32 [E] or None (None = zero).
#    Writes grad_logits float32 [T, E] contiguous (0 outside each token's group): the exact
#    gradient of weights and prob_sums above w.r.t. logits (the key, bias and group masking are
#    not differentiated: selection is piecewise constant). Per token, with p the scores:
#      g = grad_weights[t], s = scaling, V = Σ_i v_i:
#      renormalize: dv_j = s · (g_j − Σ_i g_i · v_i / V) / V;  otherwise dv_j = s · g_j;
#      dp[ids[t, j]] += dv_j;
#      prob_sums: softmax dp_c += G_c; sigmoid dp_c += (G_c − Σ_c' q_c' G_c') / Σ_c' p_c';
#      softmax dz = p ⊙ (dp − Σ p ⊙ dp); sigmoid dz = dp ⊙ p (1 − p).
# 3. _PLAN[b](ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert,
#             tile_row)
#    ids int32/int64 [T, k] contiguous (N = T·k slots). Outputs, all int32:
#      counts [E]; offsets [E+1] (exclusive scan, offsets[E] = N);
#      sorted_slot [N]: position p → slot s, experts ascending, and WITHIN an expert ascending
#            slot order (a stable counting sort: histogram + scan + scatter, no argsort);
#      slot_pos [N]: the inverse, slot s → position p;
#      tile_expert, tile_row [max_tiles], max_tiles = N // block_m + E: tile i covers rows
#            [tile_row[i], min(tile_row[i] + block_m, offsets[e + 1])) of expert e = tile_expert[i];
#            tiles in expert order; unused entries tile_expert = −1, tile_row = N. block_m = 0:
#            no tiles (the arrays have length 0).
#    An id outside [0, E) must not be written through (CPU raises; GPU: drop the slot).
# 4. _PERMUTE[b](x, sorted_slot, top_k, xs)
#    x [T, D] (column stride 1, any row stride), xs [N, D] contiguous, same dtype:
#      xs[p, :] = x[sorted_slot[p] // top_k, :]
# 5. _COMBINE[b](src, slot_pos, weights, out)
#    src [N, D] (column stride 1), weights float32 [T, k] or None (= 1), out [T, D] contiguous,
#    same dtype as src:  out[t] = Σ_{j = 0..k−1, in this order} weights[t, j] · src[slot_pos[t·k + j]]
#    accumulated in fp32 (deterministic: no atomics). With weights None this is also the backward
#    of _PERMUTE (dx = Σ_j dxs[slot_pos[t·k + j]]).
# 6. _COMBINE_BWD[b](grad_out, src, slot_pos, weights, grad_src, grad_weights)
#    grad_out [T, D], src [N, D], weights float32 [T, k] or None; writes
#      grad_src [N, D] (src's dtype):  grad_src[slot_pos[t·k + j]] = weights[t, j] · grad_out[t]
#      grad_weights float32 [T, k] or None: Σ_d grad_out[t, d] · src[slot_pos[t·k + j], d] (fp32).
#    grad_src may be src itself (read each source row before overwriting it).
# 7. _EXPERTS_FWD[b](x, w_up, w_down, weights, plan, activation, y, h, out, xs)
#    The whole routed MLP forward for one plan (MoEPlan below). x [T, D]; w_up [E, Fu, D];
#    w_down [E, D, F] (both contiguous, x's dtype); weights float32 [T, k] or None;
#    activation "gelu" (erf), "gelu_tanh", "silu_glu" (silu(gate) · up).
#    Writes y [T, D] = combine(out, weights); saves for backward, all in expert-sorted row order:
#      h [N, Fu] the up projection before activation, out [N, D] the expert outputs before
#      weighting, xs [N, D] the gathered input — or xs of shape [0, D] when the backend gathers
#      inside its GEMM (ScatterMoE style: Triton) and re-gathers in backward.
#    Backends with no grouped GEMM of their own may reuse _experts_fwd_composed(permute, combine,
#    act_fwd) / _experts_bwd_composed(permute, combine, combine_bwd, act_bwd): their own
#    permute/combine + torch GEMMs (F.grouped_mm on CUDA: no host sync) — the "cuda" minimum.
# 8. _EXPERTS_BWD[b](grad_y, x, w_up, w_down, weights, plan, activation, h, out, xs,
#                    grad_x, grad_w_up, grad_w_down, grad_weights)
#    Writes grad_x [T, D], grad_w_up [E, Fu, D], grad_w_down [E, D, F] (zero for experts with no
#    rows), grad_weights float32 [T, k] (or None when weights is None). Keyword consume=True
#    (eager autograd only): h, out and xs may be overwritten (reused for dh, d_out, dxs).
# The fakes (torch.compile) fix these shapes: a backend that gathers in-kernel and saves no xs
# adds its name to _GATHERS_IN_KERNEL; its plan row block (tile map) is _BLOCK_M[backend].
# "auto" on CUDA picks the first of _backend.AUTO_ORDER["cuda"] present in these dicts.
# ================================================================================================

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from unif2ace import _backend
from unif2ace.ops._validate import check_device, check_dtype, check_finite, check_index_range

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu_glu")
_SCORING_CODES = {"softmax": 0, "sigmoid": 1}
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


class MoEPlan(NamedTuple):
    """Expert-sorted order of the N = T·k slots (contract §3; every tensor int32).

    counts [E], offsets [E+1], sorted_slot [N] (position → slot t·k + j), slot_pos [N] (slot →
    position), tile_expert / tile_row [N // block_m + E] (empty when block_m = 0), top_k, block_m.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_slot: torch.Tensor
    slot_pos: torch.Tensor
    tile_expert: torch.Tensor
    tile_row: torch.Tensor
    top_k: int
    block_m: int

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self[:6]


class MoERouting(NamedTuple):
    """What :func:`moe_route` returns with ``return_stats=True``.

    topk_ids int64 [T, k]; topk_weights float32 [T, k]; expert_counts int32 [E] (slots per
    expert); prob_sums float32 [E] (Σ over the group's tokens of each expert's routing
    probability; differentiable, feeds :func:`moe_balance_loss`).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_counts: torch.Tensor
    prob_sums: torch.Tensor


# ------------------------------------------------------------------------------------------------
# References: plain PyTorch. The oracle of every backend (in float64), the "torch" backend, and
# the baselines of the benchmark (HF-style loop over experts; F.grouped_mm).
# ------------------------------------------------------------------------------------------------


def _consistent(fn, x: torch.Tensor) -> torch.Tensor:
    """fn(x) elementwise with equal inputs mapped to bit-equal outputs (torch's vectorised and
    scalar loops may round transcendental functions differently; ties must stay ties)."""
    vals, inv = torch.unique(x, return_inverse=True)
    return fn(vals)[inv]


def _group_cols(group_offsets: torch.Tensor, group_ids: torch.Tensor | None, T: int, E: int):
    """Per token: its group's first expert lo [T], the candidate columns [T, nmax] (clamped into
    range) and which of them are real [T, nmax]."""
    offs = group_offsets.to(torch.int64)
    sizes = offs[1:] - offs[:-1]
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
) -> MoERouting:
    """Routing in plain PyTorch (contract §1): masked softmax/sigmoid, float64 keys, stable sort.

    Differentiable w.r.t. ``router_logits`` (weights and prob_sums). Math in fp32, or fp64 for
    fp64 logits. ``group_offsets`` int64 [G+1] (None: one group of all E experts).
    """
    z = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    T, E = z.shape
    if group_offsets is None:
        group_offsets = torch.tensor([0, E], device=z.device)
    lo, cols, valid = _group_cols(group_offsets, group_ids, T, E)
    local = _select(z, cols, valid, scoring, correction_bias, top_k, n_group, topk_group)
    ids = lo[:, None] + local
    p = _route_scores(z, cols, valid, scoring)
    w, prob_sums = _route_outputs(p, lo, cols, valid, ids, scoring, renormalize, scaling, E)
    counts = torch.bincount(ids.reshape(-1), minlength=E).to(torch.int32)
    return MoERouting(ids, w, counts, prob_sums)


def _activate(h: torch.Tensor, activation: str) -> torch.Tensor:
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
        a = _activate(x[tok] @ w_up[e].T, activation)
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
    rule). Its CPU backward needs a contiguous incoming gradient (shared/DESIGN.md §2)."""
    T, k = topk_ids.shape
    E = w_up.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    xs = x[order // k]
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    h = F.grouped_mm(xs, w_up.transpose(1, 2), offs=offs)
    o = F.grouped_mm(_activate(h, activation), w_down.transpose(1, 2), offs=offs)
    if topk_weights is not None:
        o = o * topk_weights.reshape(-1)[order, None].to(o.dtype)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return o[inv].view(T, k, -1).sum(1)


# ------------------------------------------------------------------------------------------------
# Backend launchers (the contract at the top of this file). "torch" entries are the executable
# spec; add "triton" / "cuda" entries to each dict.
# ------------------------------------------------------------------------------------------------


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _route_torch(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
                 topk_group, scaling, ids, weights, counts, prob_sums):  # fmt: skip
    with torch.no_grad():
        r = moe_route_ref(logits, top_k, group_offsets, group_ids, scoring, renormalize, n_group,
                          topk_group, bias, scaling)  # fmt: skip
    ids.copy_(r.topk_ids)
    weights.copy_(r.topk_weights)
    counts.copy_(r.expert_counts)
    prob_sums.copy_(r.prob_sums)


def _route_cpu(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
               topk_group, scaling, ids, weights, counts, prob_sums):  # fmt: skip
    T, E = logits.shape
    _backend.cpu_ext().moe_route_fwd(
        logits.data_ptr(), T, E, logits.stride(0), _backend.DTYPE_CODES[logits.dtype],
        group_offsets.data_ptr(), group_offsets.numel() - 1, _ptr(group_ids), _ptr(bias),
        top_k, _SCORING_CODES[scoring], renormalize, n_group, topk_group, float(scaling),
        ids.data_ptr(), weights.data_ptr(), counts.data_ptr(), prob_sums.data_ptr(),
    )  # fmt: skip


def _route_bwd_torch(logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums, scoring,
                     renormalize, scaling, grad_logits):  # fmt: skip
    """The contract's closed form (a custom op's body runs below autograd: no autograd.grad here),
    over all E columns with each token's group as a mask: no host read of the group sizes, so the
    cuda and triton backends use it too."""
    T, E = logits.shape
    offs = group_offsets.to(torch.int64)
    G = offs.numel() - 1
    gid = (group_ids.clamp(0, G - 1) if group_ids is not None
           else torch.zeros(T, dtype=torch.int64, device=logits.device))  # fmt: skip
    lo, hi = offs[gid][:, None], offs[gid + 1][:, None]
    cols = torch.arange(E, device=logits.device)[None, :]
    valid = (cols >= lo) & (cols < hi)  # [T, E]
    z = logits.double()
    if scoring == "softmax":
        p = torch.softmax(z.masked_fill(~valid, -float("inf")), dim=1)
    else:
        p = torch.sigmoid(z).masked_fill(~valid, 0.0)
    dp = torch.zeros_like(p)
    if grad_prob_sums is not None:
        Gs = grad_prob_sums.double()[None, :].expand(T, E).masked_fill(~valid, 0.0)
        if scoring == "softmax":
            dp += Gs
        else:
            S = p.sum(1, keepdim=True)
            dp += ((Gs - (p / S * Gs).sum(1, keepdim=True)) / S).masked_fill(~valid, 0.0)
    if grad_weights is not None:
        loc = ids.clamp(0, E - 1)
        v, g = p.gather(1, loc), grad_weights.double()
        if renormalize:
            V = v.sum(1, keepdim=True)
            dv = scaling * (g - (g * v).sum(1, keepdim=True) / V) / V
        else:
            dv = scaling * g
        dp.scatter_add_(1, loc, dv)
    if scoring == "softmax":
        dz = p * (dp - (p * dp).sum(1, keepdim=True))
    else:
        dz = dp * p * (1 - p)
    grad_logits.copy_(dz.masked_fill(~valid, 0.0))


def _route_bwd_cpu(logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums, scoring,
                   renormalize, scaling, grad_logits):  # fmt: skip
    T, E = logits.shape
    _backend.cpu_ext().moe_route_bwd(
        logits.data_ptr(), T, E, logits.stride(0), _backend.DTYPE_CODES[logits.dtype],
        group_offsets.data_ptr(), group_offsets.numel() - 1, _ptr(group_ids), ids.data_ptr(),
        ids.shape[1], _SCORING_CODES[scoring], renormalize, float(scaling),
        _ptr(grad_weights), _ptr(grad_prob_sums), grad_logits.data_ptr(),
    )  # fmt: skip


def _plan_torch(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert,
                tile_row):  # fmt: skip
    flat = ids.reshape(-1).to(torch.int64)
    N = flat.numel()
    c = torch.bincount(flat, minlength=num_experts)
    counts.copy_(c)
    offsets[0] = 0
    offsets[1:].copy_(torch.cumsum(c, 0))
    order = torch.argsort(flat, stable=True)
    sorted_slot.copy_(order)
    slot_pos[order] = torch.arange(N, dtype=slot_pos.dtype, device=slot_pos.device)
    if block_m:
        n_tiles = (c + block_m - 1) // block_m
        te = torch.repeat_interleave(torch.arange(num_experts, device=c.device), n_tiles)
        first = torch.cumsum(n_tiles, 0) - n_tiles
        tr = (
            offsets.to(torch.int64)[te]
            + (torch.arange(te.numel(), device=c.device) - first[te]) * block_m
        )
        tile_expert.fill_(-1)
        tile_row.fill_(N)
        tile_expert[: te.numel()] = te.to(torch.int32)
        tile_row[: te.numel()] = tr.to(torch.int32)


def _plan_cpu(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert,
              tile_row):  # fmt: skip
    _backend.cpu_ext().moe_plan(
        ids.data_ptr(), 0 if ids.dtype == torch.int32 else 1, ids.numel(), num_experts, block_m,
        counts.data_ptr(), offsets.data_ptr(), sorted_slot.data_ptr(), slot_pos.data_ptr(),
        _ptr(tile_expert), _ptr(tile_row), tile_expert.numel(),
    )  # fmt: skip


def _permute_torch(x, sorted_slot, top_k, xs):
    xs.copy_(x[sorted_slot.to(torch.int64) // top_k])


def _permute_cpu(x, sorted_slot, top_k, xs):
    T, D = x.shape
    _backend.cpu_ext().moe_permute(
        x.data_ptr(), T, D, x.stride(0), x.element_size(), sorted_slot.data_ptr(),
        sorted_slot.numel(), top_k, xs.data_ptr(),
    )  # fmt: skip


def _combine_torch(src, slot_pos, weights, out):
    T, D = out.shape
    rows = src[slot_pos.to(torch.int64)].float().view(T, -1, D)
    if weights is not None:
        rows = rows * weights[:, :, None]
    out.copy_(rows.sum(1))


def _combine_cpu(src, slot_pos, weights, out):
    T, D = out.shape
    _backend.cpu_ext().moe_combine(
        src.data_ptr(), src.shape[0], D, src.stride(0), _backend.DTYPE_CODES[src.dtype],
        slot_pos.data_ptr(), T, slot_pos.numel() // max(T, 1), _ptr(weights), out.data_ptr(),
    )  # fmt: skip


def _combine_bwd_torch(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    pos = slot_pos.to(torch.int64)
    g = grad_out.float().repeat_interleave(pos.numel() // max(T, 1), dim=0)  # [N, D] slot order
    if grad_weights is not None:
        grad_weights.copy_((g * src[pos].float()).sum(1).view(T, -1))
    if weights is not None:
        g = g * weights.reshape(-1, 1)
    grad_src[pos] = g.to(grad_src.dtype)


def _combine_bwd_cpu(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    _backend.cpu_ext().moe_combine_bwd(
        grad_out.data_ptr(), grad_out.stride(0), src.data_ptr(), src.shape[0], D, src.stride(0),
        _backend.DTYPE_CODES[src.dtype], slot_pos.data_ptr(), T, slot_pos.numel() // max(T, 1),
        _ptr(weights), grad_src.data_ptr(), _ptr(grad_weights),
    )  # fmt: skip


# Expert GEMMs of the composed backends. "loop": one torch.mm per non-empty expert into a slice of
# the grouped buffer (any size, any float dtype; one host read of the offsets). "grouped_mm":
# F.grouped_mm (fp32/bf16, rows 16-byte aligned; no host sync, so the choice on CUDA).
# UNIF2ACE_MOE_GEMM=loop|grouped_mm overrides. Measured on the 2-core EPYC (loaded box, process
# CPU time, 1 thread), whole layer fwd+bwd, fp32, T=2048, D=512, F=1024, 2×(8+1) experts, k=4:
# loop 1.31 s vs grouped_mm 1.39 s; the benchmark's `cpu+grouped_mm` row repeats it at T=8192.
_GEMM = {"cpu": "loop", "cuda": "grouped_mm"}  # per device type


def _gemm_mode(x: torch.Tensor, dims: Sequence[int]) -> str:
    import os

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
        grad_w.copy_(F.grouped_mm(g.T, a, offs=offsets[1:]))
        return
    if len(bounds) < grad_w.shape[0]:
        grad_w.zero_()
    for e, lo, hi in bounds:
        torch.mm(g[lo:hi].T, a[lo:hi], out=grad_w[e])


def _activate_bwd(h, da, activation):
    if activation == "silu_glu":
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        Fh = gate.shape[-1]
        dh[:, :Fh] = torch.ops.aten.silu_backward(da * up, gate)
        dh[:, Fh:] = da * F.silu(gate)
        return dh
    return torch.ops.aten.gelu_backward(
        da, h, approximate="tanh" if activation == "gelu_tanh" else "none"
    )


def _act_fwd_torch(h, activation):
    return _activate(h, activation)


def _act_bwd_torch(h, da, activation, consume=False):
    """(dh, a): the activation's input gradient and its recomputed output."""
    return _activate_bwd(h, da, activation), _activate(h, activation)


# The activations in one C++ pass each way, the backward fused with the recomputation of a.
# Measured on the 2-core EPYC, 1 thread, fp32 (medians of 30):
#   SiLU-GLU, N = 8192 rows, F = 1024 (process CPU time): forward 8 ms vs 36 ms for torch's
#     silu + mul, backward 16 ms vs 146 ms; the whole T = 2048 layer fwd+bwd 1.31 s -> 1.14 s;
#   GELU, N = 5226, F = 256 (the tiny model's routed rows, wall time): tanh form forward 0.33 ms vs
#     1.58 ms for torch's gelu, backward (dh + a) 0.50 ms vs 3.26 ms for gelu_backward + gelu;
#     erf form backward 0.73 ms vs 1.13 ms, but its forward 0.45 ms vs torch's 0.33 ms, so the erf
#     forward stays torch's.
def _act_fwd_cpu(h, activation):
    if activation == "gelu":  # torch's erf GELU forward is the faster one (above)
        return _activate(h, activation)
    N, Fu = h.shape
    Fd = Fu // 2 if activation == "silu_glu" else Fu
    a = h.new_empty(N, Fd)
    ext, code = _backend.cpu_ext(), _backend.DTYPE_CODES[h.dtype]
    if activation == "silu_glu":
        ext.moe_silu_glu_fwd(h.data_ptr(), N, Fd, h.stride(0), code, a.data_ptr())
    else:
        ext.moe_gelu_fwd(h.data_ptr(), N, Fd, h.stride(0), activation == "gelu_tanh", code,
                         a.data_ptr())  # fmt: skip
    return a


def _act_bwd_cpu(h, da, activation, consume=False):
    """(dh, a); consume=True writes dh over h (the saved pre-activation is used up)."""
    N, Fu = h.shape
    Fd = Fu // 2 if activation == "silu_glu" else Fu
    a = h.new_empty(N, Fd)
    dh = h if consume else torch.empty_like(h)
    ext, code = _backend.cpu_ext(), _backend.DTYPE_CODES[h.dtype]
    if activation == "silu_glu":
        ext.moe_silu_glu_bwd(h.data_ptr(), da.data_ptr(), N, Fd, h.stride(0), code,
                             dh.data_ptr(), a.data_ptr())  # fmt: skip
    else:
        ext.moe_gelu_bwd(h.data_ptr(), da.data_ptr(), N, Fd, h.stride(0),
                         activation == "gelu_tanh", code, dh.data_ptr(), a.data_ptr())  # fmt: skip
    return dh, a


def _experts_fwd_composed(permute, combine, act_fwd=_act_fwd_torch):
    """An _EXPERTS_FWD launcher from a backend's permute + combine (+ activation) and torch GEMMs."""

    def fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs):
        D, Fu, Fd = x.shape[1], w_up.shape[1], w_down.shape[2]
        mode = _gemm_mode(x, (D, Fu, Fd))
        bounds = _bounds(plan.offsets) if mode == "loop" else None
        permute(x, plan.sorted_slot, plan.top_k, xs)
        _grouped_linear(xs, w_up, plan.offsets, h, mode, bounds)
        _grouped_linear(act_fwd(h, activation), w_down, plan.offsets, out, mode, bounds)
        combine(out, plan.slot_pos, weights, y)

    return fwd


def _experts_bwd_composed(permute, combine, combine_bwd, act_bwd=_act_bwd_torch):
    """An _EXPERTS_BWD launcher from a backend's permute / combine / combine_bwd (+ activation
    backward) and torch GEMMs."""

    def bwd(grad_y, x, w_up, w_down, weights, plan, activation, h, out, xs,
            grad_x, grad_w_up, grad_w_down, grad_weights, consume=False):  # fmt: skip
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


_ROUTE = {"torch": _route_torch, "cpu": _route_cpu}
_ROUTE_BWD = {"torch": _route_bwd_torch, "cpu": _route_bwd_cpu}
_PLAN = {"torch": _plan_torch, "cpu": _plan_cpu}
_PERMUTE = {"torch": _permute_torch, "cpu": _permute_cpu}
_COMBINE = {"torch": _combine_torch, "cpu": _combine_cpu}
_COMBINE_BWD = {"torch": _combine_bwd_torch, "cpu": _combine_bwd_cpu}
_EXPERTS_FWD = {
    "torch": _experts_fwd_composed(_permute_torch, _combine_torch),
    "cpu": _experts_fwd_composed(_permute_cpu, _combine_cpu, _act_fwd_cpu),
}
_EXPERTS_BWD = {
    "torch": _experts_bwd_composed(_permute_torch, _combine_torch, _combine_bwd_torch),
    "cpu": _experts_bwd_composed(_permute_cpu, _combine_cpu, _combine_bwd_cpu, _act_bwd_cpu),
}
# Row block of the plan's tile map per backend (0 = no tile map: the CPU does not tile).
_BLOCK_M = {"torch": 0, "cpu": 0, "triton": 64, "cuda": 64}
# Backends whose grouped GEMM gathers x rows itself and saves no xs ([0, D]) for backward.
_GATHERS_IN_KERNEL: set[str] = set()

# ---- issue 4: the "cuda" and "triton" entries of every dict above (launchers in
# unif2ace/ops/_moe_gpu.py, kernels in csrc/cuda/moe.cu and triton_kernels/moe.py) ----
from unif2ace.ops import _moe_gpu  # noqa: E402

_moe_gpu.register(globals())


def _xs_rows(backend: str, n: int) -> int:
    return 0 if backend in _GATHERS_IN_KERNEL else n


# ------------------------------------------------------------------------------------------------
# Custom ops (torch.library): fakes for torch.compile, autograd through a backward op each.
# ------------------------------------------------------------------------------------------------

_Opt = torch.Tensor | None


@torch.library.custom_op("unif2ace::moe_route", mutates_args=())
def _moe_route_op(
    logits: torch.Tensor,
    group_offsets: torch.Tensor,
    group_ids: _Opt,
    bias: _Opt,
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    dev = logits.device
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    prob_sums = torch.empty(E, dtype=torch.float32, device=dev)
    _ROUTE[backend](logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
                    topk_group, scaling, ids, weights, counts, prob_sums)  # fmt: skip
    # Float outputs first: opcheck's autograd test sums the outputs into the first one's dtype.
    return weights, prob_sums, ids, counts


@_moe_route_op.register_fake
def _(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group, topk_group,
      scaling, backend):  # fmt: skip
    T, E = logits.shape
    return (
        logits.new_empty(T, top_k, dtype=torch.float32),
        logits.new_empty(E, dtype=torch.float32),
        logits.new_empty(T, top_k, dtype=torch.int64),
        logits.new_empty(E, dtype=torch.int32),
    )


@torch.library.custom_op("unif2ace::moe_route_bwd", mutates_args=())
def _moe_route_bwd_op(
    logits: torch.Tensor,
    group_offsets: torch.Tensor,
    group_ids: _Opt,
    ids: torch.Tensor,
    grad_weights: _Opt,
    grad_prob_sums: _Opt,
    scoring: str,
    renormalize: bool,
    scaling: float,
    backend: str,
) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    _ROUTE_BWD[backend](logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums,
                        scoring, renormalize, scaling, grad)  # fmt: skip
    return grad


@_moe_route_bwd_op.register_fake
def _(logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums, scoring, renormalize,
      scaling, backend):  # fmt: skip
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _route_setup(ctx, inputs, output):
    logits, group_offsets, group_ids = inputs[:3]
    ctx.args = (
        inputs[5],
        inputs[6],
        inputs[9],
        inputs[10],
    )  # scoring, renormalize, scaling, backend
    ctx.save_for_backward(logits, group_offsets, group_ids, output[2])
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _route_backward(ctx, g_weights, g_prob_sums, g_ids, g_counts):
    logits, group_offsets, group_ids, ids = ctx.saved_tensors
    scoring, renormalize, scaling, backend = ctx.args
    f32 = lambda g: None if g is None else g.to(torch.float32).contiguous()
    grad = _moe_route_bwd_op(logits, group_offsets, group_ids, ids, f32(g_weights),
                             f32(g_prob_sums), scoring, renormalize, scaling, backend)  # fmt: skip
    return (grad.to(logits.dtype),) + (None,) * 10


_moe_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def _max_tiles(n: int, num_experts: int, block_m: int) -> int:
    return n // block_m + num_experts if block_m > 0 else 0


@torch.library.custom_op("unif2ace::moe_plan", mutates_args=())
def _moe_plan_op(
    ids: torch.Tensor, num_experts: int, block_m: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n = ids.numel()
    i32 = dict(dtype=torch.int32, device=ids.device)
    nt = _max_tiles(n, num_experts, block_m)
    out = (
        torch.empty(num_experts, **i32), torch.empty(num_experts + 1, **i32),
        torch.empty(n, **i32), torch.empty(n, **i32), torch.empty(nt, **i32), torch.empty(nt, **i32),
    )  # fmt: skip
    _PLAN[backend](ids, num_experts, block_m, *out)
    return out


@_moe_plan_op.register_fake
def _(ids, num_experts, block_m, backend):
    n = ids.numel()
    nt = _max_tiles(n, num_experts, block_m)
    e = lambda *s: ids.new_empty(*s, dtype=torch.int32)
    return e(num_experts), e(num_experts + 1), e(n), e(n), e(nt), e(nt)


@torch.library.custom_op("unif2ace::moe_permute", mutates_args=())
def _moe_permute_op(
    x: torch.Tensor, sorted_slot: torch.Tensor, slot_pos: torch.Tensor, top_k: int, backend: str
) -> torch.Tensor:
    xs = torch.empty(sorted_slot.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    _PERMUTE[backend](x, sorted_slot, top_k, xs)
    return xs


@_moe_permute_op.register_fake
def _(x, sorted_slot, slot_pos, top_k, backend):
    return x.new_empty(sorted_slot.numel(), x.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.args = (inputs[3], inputs[4])


def _permute_backward(ctx, grad_xs):
    (slot_pos,) = ctx.saved_tensors
    top_k, backend = ctx.args
    gx = _moe_combine_op(grad_xs.contiguous(), slot_pos, None, top_k, backend)
    return gx, None, None, None, None


_moe_permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("unif2ace::moe_combine", mutates_args=())
def _moe_combine_op(
    src: torch.Tensor, slot_pos: torch.Tensor, weights: _Opt, top_k: int, backend: str
) -> torch.Tensor:
    out = torch.empty(slot_pos.numel() // top_k, src.shape[1], dtype=src.dtype, device=src.device)
    _COMBINE[backend](src, slot_pos, weights, out)
    return out


@_moe_combine_op.register_fake
def _(src, slot_pos, weights, top_k, backend):
    return src.new_empty(slot_pos.numel() // top_k, src.shape[1])


@torch.library.custom_op("unif2ace::moe_combine_bwd", mutates_args=())
def _moe_combine_bwd_op(
    grad_out: torch.Tensor,
    src: torch.Tensor,
    slot_pos: torch.Tensor,
    weights: _Opt,
    top_k: int,
    need_grad_weights: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_src = torch.empty_like(src)
    T = slot_pos.numel() // top_k
    gw = torch.empty((T, top_k) if need_grad_weights else (0,), dtype=torch.float32,
                     device=src.device)  # fmt: skip
    _COMBINE_BWD[backend](grad_out, src, slot_pos, weights, grad_src,
                          gw if need_grad_weights else None)  # fmt: skip
    return grad_src, gw


@_moe_combine_bwd_op.register_fake
def _(grad_out, src, slot_pos, weights, top_k, need_grad_weights, backend):
    T = slot_pos.numel() // top_k
    return torch.empty_like(src), src.new_empty((T, top_k) if need_grad_weights else (0,),
                                                dtype=torch.float32)  # fmt: skip


def _combine_setup(ctx, inputs, output):
    src, slot_pos, weights, top_k, backend = inputs
    ctx.save_for_backward(src, slot_pos, weights)
    ctx.args = (top_k, backend)


def _combine_backward(ctx, grad_out):
    src, slot_pos, weights = ctx.saved_tensors
    top_k, backend = ctx.args
    need_gw = weights is not None and ctx.needs_input_grad[2]
    gs, gw = _moe_combine_bwd_op(grad_out.contiguous(), src, slot_pos, weights, top_k, need_gw,
                                 backend)  # fmt: skip
    return gs, None, gw if need_gw else None, None, None


_moe_combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


def _plan_of(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m):
    return MoEPlan(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m)


@torch.library.custom_op("unif2ace::moe_mlp_fwd", mutates_args=())
def _moe_mlp_fwd_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: _Opt,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    sorted_slot: torch.Tensor,
    slot_pos: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    save: bool,
    consume: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # consume: the caller never reads the returned h / out / xs (moe_mlp drops them), so the eager
    # backward may reuse them for the gradients (_mlp_bwd_impl).
    T, D = x.shape
    N = sorted_slot.numel()
    plan = _plan_of(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m)
    y = torch.empty_like(x)
    h = x.new_empty(N, w_up.shape[1])
    out = x.new_empty(N, D)
    xs = x.new_empty(_xs_rows(backend, N), D)
    _EXPERTS_FWD[backend](x, w_up, w_down, weights, plan, activation, y, h, out, xs)
    if not save:
        return y, h.new_empty(0, h.shape[1]), out.new_empty(0, D), xs.new_empty(0, D)
    return y, h, out, xs


@_moe_mlp_fwd_op.register_fake
def _(x, w_up, w_down, weights, counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row,
      top_k, block_m, activation, save, consume, backend):  # fmt: skip
    T, D = x.shape
    N = sorted_slot.numel() if save else 0
    return (torch.empty_like(x), x.new_empty(N, w_up.shape[1]), x.new_empty(N, D),
            x.new_empty(_xs_rows(backend, N), D))  # fmt: skip


# The registered backward allocates fresh gradient buffers (what torch.compile traces); eager
# autograd calls _mlp_bwd_impl(consume=True) directly and reuses the saved buffers instead
# (a custom op that mutates them trips AOTAutograd in opcheck: "Node ... was invalid").
@torch.library.custom_op("unif2ace::moe_mlp_bwd", mutates_args=())
def _moe_mlp_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: _Opt,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    sorted_slot: torch.Tensor,
    slot_pos: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    h: torch.Tensor,
    out: torch.Tensor,
    xs: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_of(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m)
    return _mlp_bwd_impl(grad_y, x, w_up, w_down, weights, plan, h, out, xs, activation, backend,
                         consume=False)  # fmt: skip


def _mlp_bwd_impl(grad_y, x, w_up, w_down, weights, plan, h, out, xs, activation, backend,
                  consume):  # fmt: skip
    gx = torch.empty_like(x)
    gwu = torch.empty_like(w_up)
    gwd = torch.empty_like(w_down)
    gw = torch.empty(weights.shape if weights is not None else (0,), dtype=torch.float32,
                     device=x.device)  # fmt: skip
    _EXPERTS_BWD[backend](grad_y, x, w_up, w_down, weights, plan, activation, h, out, xs,
                          gx, gwu, gwd, gw if weights is not None else None, consume=consume)  # fmt: skip
    return gx, gwu, gwd, gw


@_moe_mlp_bwd_op.register_fake
def _(grad_y, x, w_up, w_down, weights, counts, offsets, sorted_slot, slot_pos, tile_expert,
      tile_row, h, out, xs, top_k, block_m, activation, backend):  # fmt: skip
    gw = x.new_empty(weights.shape if weights is not None else (0,), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down), gw


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], *output[1:])
    ctx.args = inputs[10:]  # top_k, block_m, activation, save, consume, backend
    ctx.mark_non_differentiable(*output[1:])
    # Without this autograd fills zero gradients for h, out and xs (N·(2D + Fu) elements) before
    # calling backward: 10 % of the layer's backward time at T = 2048 on the 2-core box.
    ctx.set_materialize_grads(False)
    ctx.used = False


def _mlp_backward(ctx, grad_y, *_):
    x, w_up, w_down, weights, *plan6, h, out, xs = ctx.saved_tensors
    top_k, block_m, activation, save, consume, backend = ctx.args
    if grad_y is None:
        return (None,) * 16
    if not save:
        raise RuntimeError(
            "moe_mlp: no input required grad when the forward ran, so nothing was saved for "
            "backward; call it again with grad enabled"
        )
    grad_y = grad_y.contiguous()
    traced = torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor
        for t in (grad_y, x, h)  # fake / functional tensors: tracing
    )
    if traced or not consume:  # the registered, non-mutating backward op
        gx, gwu, gwd, gw = _moe_mlp_bwd_op(grad_y, x, w_up, w_down, weights, *plan6, h, out, xs,
                                           top_k, block_m, activation, backend)  # fmt: skip
    else:  # eager: reuse the saved buffers for the gradients (once only)
        if ctx.used:
            raise RuntimeError(
                "moe_mlp: backward ran twice through the same graph; the saved activations are "
                "consumed in place to save memory. Call moe_mlp again instead of "
                "retain_graph=True."
            )
        ctx.used = True
        plan = _plan_of(*plan6, top_k, block_m)
        gx, gwu, gwd, gw = _mlp_bwd_impl(grad_y, x, w_up, w_down, weights, plan, h, out, xs,
                                         activation, backend, consume=True)  # fmt: skip
    return (gx, gwu, gwd, gw if weights is not None else None) + (None,) * 12


_moe_mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


@torch.compiler.assume_constant_result  # a Python constant for torch.compile (imports inside)
def _resolve(backend: str | None, device: torch.device, op: str, table: dict) -> str:
    """_backend.resolve restricted to the backends that implement this family (``table``)."""
    if backend is None:
        backend = _backend.get_backend()
    if backend == "auto":
        for name in _backend.AUTO_ORDER.get(device.type, ("torch",)):
            if name in table and _backend.available(name, device):
                return name
        return "torch"
    name = _backend.resolve(backend, device, op)
    if name not in table:
        raise RuntimeError(
            f"{op}: backend {name!r} has no MoE kernels yet (implemented: {sorted(table)})"
        )
    return name


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _group_sizes(E: int, experts_per_group, op: str) -> list[int]:
    """Group sizes from ``experts_per_group`` (None: one group of E; int: equal groups; sequence:
    one size per group). The sizes must add up to E (the router's columns)."""
    if experts_per_group is None:
        return [E]
    if isinstance(experts_per_group, int) and not isinstance(experts_per_group, bool):
        if experts_per_group < 1 or E % experts_per_group:
            raise ValueError(
                f"{op}: experts_per_group={experts_per_group} must be >= 1 and divide the "
                f"E = {E} experts"
            )
        return [experts_per_group] * (E // experts_per_group)
    sizes = [int(s) for s in experts_per_group]
    if not sizes or min(sizes) < 1 or sum(sizes) != E:
        raise ValueError(
            f"{op}: experts_per_group {sizes} must be positive sizes adding up to E = {E}"
        )
    return sizes


def _offsets_tensor(sizes: list[int], device) -> torch.Tensor:
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return torch.tensor(offs, dtype=torch.int64, device=device)


def _check_index_tensor(op, name, t, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    check_device(op, device, **{name: t})


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int | Sequence[int] | None = None,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    scaling: float = 1.0,
    return_stats: bool = False,
    backend: str | None = None,
):
    """Top-k routing: per-token task groups, DeepSeek-V3 group limits, softmax or sigmoid scores.

    Parameters
    ----------
    router_logits : Tensor [T, E], float32 / bfloat16 / float16 (float64 on the torch backend)
        Router scores over all E experts (all task groups side by side; column stride 1).
    top_k : int
        Experts per token, ``1 <= k <=`` the size of every group (and ``<= E``).
    group_ids : Tensor [T], int32/int64, optional
        Task group of each token (UniF²ace: 0 understanding, 1 generation). Required when there
        is more than one group; token t is routed among its group's experts only, and the ids
        returned are global (group offset + local id).
    experts_per_group : int or sequence of int, optional
        Group sizes (adding up to E; an int means equal groups). None: one group of E experts.
    scoring : "softmax" | "sigmoid"
        softmax over the token's group (Mixtral, Qwen-MoE) or elementwise sigmoid (DeepSeek-V3).
    renormalize : bool
        Divide the k chosen scores by their sum (Mixtral: True; Qwen2-MoE: ``norm_topk_prob``).
    n_group, topk_group : int, optional
        DeepSeek-V3 group-limited routing inside each group: split its experts into ``n_group``
        equal subgroups, keep the ``topk_group`` subgroups with the largest sum of their two best
        keys, choose the k experts among those.
    correction_bias : Tensor [E], float, optional
        Added to the scores for the *selection only* (DeepSeek-V3 ``e_score_correction_bias``).
    scaling : float
        Multiplies the weights (DeepSeek-V3 ``routed_scaling_factor``).
    return_stats : bool
        Return a :class:`MoERouting` with the per-expert counts and probability sums too.
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    (topk_ids int64 [T, k], topk_weights float32 [T, k]), or :class:`MoERouting`.

    Selection: key = score (+ bias) in float64, the k largest in descending order, **equal keys →
    lower expert index first** on every backend. ``w_j = scaling · s_j / Σ_i s_i`` (renormalize)
    or ``scaling · s_j``. ``prob_sums[e] = Σ_t q_{t,e}`` over tokens of e's group, q the softmax
    probability (sigmoid: the score divided by the sum over the group). Gradients flow from
    topk_weights and prob_sums to router_logits.
    """
    op = "moe_route"
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(
            f"{op}: router_logits must be a 2-D tensor [T, E], got {_shape(router_logits)}"
        )
    T, E = router_logits.shape
    dev = router_logits.device
    if scoring not in SCORINGS:
        raise ValueError(f"{op}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{op}: top_k must be a positive int, got {top_k!r}")
    if top_k > E:
        raise ValueError(f"{op}: top_k = {top_k} exceeds the number of experts E = {E}")
    sizes = _group_sizes(E, experts_per_group, op)
    if len(sizes) > 1 and group_ids is None:
        raise ValueError(f"{op}: group_ids is required with {len(sizes)} expert groups")
    if top_k > min(sizes):
        g = sizes.index(min(sizes))
        raise ValueError(f"{op}: top_k = {top_k} exceeds the {sizes[g]} experts of group {g}")
    ng = int(n_group or 0)
    tg = int(topk_group or 0)
    if ng:
        if any(s % ng for s in sizes):
            raise ValueError(f"{op}: n_group = {ng} must divide every group's size {sizes}")
        if not 1 <= tg <= ng:
            raise ValueError(f"{op}: topk_group must be in [1, n_group = {ng}], got {topk_group!r}")
        if top_k > tg * (min(sizes) // ng):
            raise ValueError(
                f"{op}: top_k = {top_k} exceeds the {tg * (min(sizes) // ng)} experts of the "
                f"topk_group = {tg} subgroups kept"
            )
    elif topk_group:
        raise ValueError(f"{op}: topk_group needs n_group")
    if group_ids is not None:
        _check_index_tensor(op, "group_ids", group_ids, dev, (T,))
        group_ids = group_ids.to(torch.int64).contiguous()
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (E,):
            raise ValueError(
                f"{op}: correction_bias must have shape [{E}], got {_shape(correction_bias)}"
            )
        if not correction_bias.is_floating_point():
            raise TypeError(f"{op}: correction_bias must be floating, got {correction_bias.dtype}")
        check_device(op, dev, correction_bias=correction_bias)
        correction_bias = correction_bias.detach().to(torch.float32).contiguous()
    name = _resolve(backend, dev, op, _ROUTE)
    check_dtype(
        op, "router_logits", router_logits, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES
    )
    if _backend.checks_enabled():
        if group_ids is not None:
            check_index_range(group_ids, len(sizes), op, "group_ids")
        check_finite(router_logits.detach(), op, "router_logits")
    offsets = _offsets_tensor(sizes, dev)
    if name == "torch":
        r = moe_route_ref(router_logits, top_k, offsets, group_ids, scoring, renormalize, ng, tg,
                          correction_bias, scaling)  # fmt: skip
    else:
        if E > 1 and router_logits.stride(1) != 1:
            router_logits = router_logits.contiguous()
        w, ps, ids, counts = _moe_route_op(router_logits, offsets, group_ids, correction_bias,
                                           top_k, scoring, bool(renormalize), ng, tg,
                                           float(scaling), name)  # fmt: skip
        r = MoERouting(ids, w, counts, ps)
    return r if return_stats else (r.topk_ids, r.topk_weights)


def moe_plan(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    block_m: int | None = None,
    backend: str | None = None,
) -> MoEPlan:
    """Expert-sorted order of the T·k routed slots (contract §3): a stable counting sort.

    Parameters
    ----------
    topk_ids : Tensor [T, k], int32/int64, values in [0, num_experts)
    num_experts : int
    block_m : int, optional
        Rows per tile of the tile→expert map (GPU grouped GEMMs). Default: the backend's own
        (0 on CPU: no tile map).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    :class:`MoEPlan`: counts [E], offsets [E+1], sorted_slot [N], slot_pos [N], tile_expert /
    tile_row [N // block_m + E], all int32 (N = T·k). Within an expert slots keep token order.
    """
    op = "moe_plan"
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"{op}: topk_ids must be a 2-D tensor [T, k], got {_shape(topk_ids)}")
    _check_index_tensor(op, "topk_ids", topk_ids, topk_ids.device)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"{op}: T·k = {topk_ids.numel()} slots must be < 2^31 (int32 plan)")
    name = _resolve(backend, topk_ids.device, op, _PLAN)
    bm = _BLOCK_M.get(name, 0) if block_m is None else int(block_m)
    if bm < 0:
        raise ValueError(f"{op}: block_m must be >= 0, got {block_m}")
    if _backend.checks_enabled():
        check_index_range(topk_ids, num_experts, op, "topk_ids")
    out = _moe_plan_op(topk_ids.contiguous(), num_experts, bm, name)
    return MoEPlan(*out, topk_ids.shape[1], bm)


def moe_permute(x: torch.Tensor, plan: MoEPlan, *, backend: str | None = None) -> torch.Tensor:
    """Gather token rows into expert-sorted order: ``xs[p] = x[sorted_slot[p] // k]``.

    x [T, D] → xs [T·k, D] (rows of expert e at ``offsets[e]:offsets[e+1]``). Backward: each
    token's gradient is the sum of its k rows' gradients.
    """
    op = "moe_permute"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [T, D], got {_shape(x)}")
    if plan.sorted_slot.numel() != x.shape[0] * plan.top_k:
        raise ValueError(f"{op}: the plan has {plan.sorted_slot.numel()} slots but x has "
                         f"{x.shape[0]} tokens × k = {plan.top_k}")  # fmt: skip
    check_device(op, x.device, plan=plan.sorted_slot)
    name = _resolve(backend, x.device, op, _PERMUTE)
    check_dtype(op, "x", x, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return _moe_permute_op(x, plan.sorted_slot, plan.slot_pos, plan.top_k, name)


def moe_combine(
    expert_out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    plan: MoEPlan,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, back in token order.

    ``y[t] = Σ_j w[t, j] · expert_out[slot_pos[t·k + j]]`` (fp32 accumulation, j ascending:
    deterministic). expert_out [T·k, D] in expert-sorted order; topk_weights [T, k] or None (1).
    Gradients flow to expert_out and topk_weights.
    """
    op = "moe_combine"
    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2:
        raise ValueError(
            f"{op}: expert_out must be a 2-D tensor [T·k, D], got {_shape(expert_out)}"
        )
    N = plan.slot_pos.numel()
    k = plan.top_k
    if expert_out.shape[0] != N:
        raise ValueError(f"{op}: expert_out has {expert_out.shape[0]} rows, the plan {N} slots")
    dev = expert_out.device
    check_device(op, dev, plan=plan.slot_pos)
    name = _resolve(backend, dev, op, _COMBINE)
    check_dtype(op, "expert_out", expert_out, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if topk_weights is not None:
        if tuple(topk_weights.shape) != (N // k, k):
            raise ValueError(
                f"{op}: topk_weights must be [{N // k}, {k}], got {list(topk_weights.shape)}"
            )
        check_device(op, dev, topk_weights=topk_weights)
    if name == "torch":
        T, D = N // k, expert_out.shape[1]
        rows = expert_out[plan.slot_pos.long()].view(T, k, D)
        if topk_weights is not None:
            rows = rows * topk_weights[:, :, None].to(rows.dtype)
        return rows.sum(1)
    w = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()
    if expert_out.shape[1] > 1 and expert_out.stride(1) != 1:
        expert_out = expert_out.contiguous()
    return _moe_combine_op(expert_out, plan.slot_pos, w, k, name)


def _check_mlp(op, x, w_up, w_down, topk_ids, topk_weights, activation):
    for nm, t, nd in (("x", x, 2), ("w_up", w_up, 3), ("w_down", w_down, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{op}: {nm} must be a {nd}-D tensor, got {_shape(t)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, D = x.shape
    E, Fu, Dw = w_up.shape
    Fh = Fu // 2 if activation == "silu_glu" else Fu
    if Dw != D or (activation == "silu_glu" and Fu % 2):
        raise ValueError(
            f"{op}: w_up must be [E, {'2F' if activation == 'silu_glu' else 'F'}, D={D}] for "
            f"activation {activation!r}, got {list(w_up.shape)}"
        )
    if tuple(w_down.shape) != (E, D, Fh):
        raise ValueError(
            f"{op}: w_down must be [E={E}, D={D}, F={Fh}] to match w_up {list(w_up.shape)} "
            f"({activation}), got {list(w_down.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must be [T={T}, k], got {list(topk_ids.shape)}")
    _check_index_tensor(op, "topk_ids", topk_ids, x.device)
    check_device(op, x.device, w_up=w_up, w_down=w_down)
    for nm, t in (("w_up", w_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {nm} dtype {t.dtype} differs from x's {x.dtype}")
    if topk_weights is not None:
        if tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(
                f"{op}: topk_weights must have topk_ids' shape {list(topk_ids.shape)}, got "
                f"{list(topk_weights.shape)}"
            )
        if not topk_weights.is_floating_point():
            raise TypeError(f"{op}: topk_weights must be floating, got {topk_weights.dtype}")
        check_device(op, x.device, topk_weights=topk_weights)
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"{op}: T·k = {topk_ids.numel()} slots must be < 2^31")
    if _backend.checks_enabled():
        check_index_range(topk_ids, E, op, "topk_ids")


def moe_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    activation: str = "silu_glu",
    plan: MoEPlan | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed expert MLPs: ``y[t] = Σ_j w[t, j] · W_down[e] act(W_up[e] x[t])``, ``e = ids[t, j]``.

    Parameters
    ----------
    x : Tensor [T, D], float32 / bfloat16 / float16 (float64 on the torch backend)
    w_up : Tensor [E, Fu, D]
        Up projections. ``silu_glu``: Fu = 2F, rows [0, F) the gate and [F, 2F) the up
        projection (transformers' ``gate_up_proj`` layout), ``act = silu(gate) · up``;
        ``gelu`` (erf) / ``gelu_tanh``: Fu = F, ``act = gelu(W_up x)``.
    w_down : Tensor [E, D, F]
    topk_ids : Tensor [T, k], int32/int64, values in [0, E)
    topk_weights : Tensor [T, k], float, or None (every weight 1: shared experts)
    activation : "silu_glu" | "gelu" | "gelu_tanh"
    plan : MoEPlan, optional
        A plan of these ids already computed (:func:`moe_plan`); made here otherwise.
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    Tensor [T, D] in x's dtype. Gradients flow to x, w_up, w_down and topk_weights.

    No bias terms (Mixtral, Qwen-MoE, DeepSeek have none). The torch backend is the loop over
    experts (:func:`moe_mlp_ref`); the others run plan → permute → per-expert GEMMs → combine in
    one custom op that saves the gathered input, the pre-activation and the expert outputs
    (N·(2D + Fu) elements, N = T·k) and recomputes the activation in backward.
    """
    op = "moe_mlp"
    _check_mlp(op, x, w_up, w_down, topk_ids, topk_weights, activation)
    name = _resolve(backend, x.device, op, _EXPERTS_FWD)
    if name == "torch":
        check_dtype(op, "x", x, _FLOAT_DTYPES)
        return moe_mlp_ref(x, w_up, w_down, topk_ids, topk_weights, activation)
    check_dtype(op, "x", x, _KERNEL_DTYPES)
    E = w_up.shape[0]
    if plan is None:
        plan = moe_plan(topk_ids, E, backend=name)
    elif plan.num_experts != E or plan.sorted_slot.numel() != topk_ids.numel():
        raise ValueError(f"{op}: the plan was made for other ids (E, T·k differ)")
    w = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_up, w_down, topk_weights)
    )
    y, *_ = _moe_mlp_fwd_op(x.contiguous(), w_up.contiguous(), w_down.contiguous(), w,
                            *plan.tensors(), plan.top_k, plan.block_m, activation, save, True,
                            name)  # fmt: skip
    return y


def moe_shared_experts(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int = 1,
    activation: str = "silu_glu",
    backend: str | None = None,
) -> torch.Tensor:
    """Shared (always-on) experts of each token's task group, summed with weight 1.

    w_up [G·S, Fu, D], w_down [G·S, D, F]: group g's S shared experts are rows g·S … g·S + S − 1.
    group_ids [T] (None: one group). ``y[t] = Σ_{s<S} W_down[g·S+s] act(W_up[g·S+s] x[t])``,
    g = group_ids[t]: the routed-experts op with fixed ids and no weights (one pass over all
    groups, no per-group Python loop).
    """
    op = "moe_shared_experts"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [T, D], got {_shape(x)}")
    S = int(experts_per_group)
    n = w_up.shape[0] if isinstance(w_up, torch.Tensor) and w_up.dim() == 3 else 0
    if S < 1 or n % S:
        raise ValueError(f"{op}: experts_per_group = {S} must divide the {n} shared experts")
    T = x.shape[0]
    base = torch.arange(S, device=x.device)[None, :]
    if group_ids is None:
        if n != S:
            raise ValueError(f"{op}: group_ids is required with {n // S} groups of shared experts")
        ids = base.expand(T, S).contiguous()
    else:
        _check_index_tensor(op, "group_ids", group_ids, x.device, (T,))
        if _backend.checks_enabled():
            check_index_range(group_ids, n // S, op, "group_ids")
        ids = group_ids.to(torch.int64)[:, None] * S + base
    return moe_mlp(x, w_up, w_down, ids, None, activation=activation, backend=backend)


def moe_balance_loss(
    expert_counts: torch.Tensor,
    prob_sums: torch.Tensor,
    top_k: int,
    *,
    experts_per_group: int | Sequence[int] | None = None,
    coef: float | Sequence[float] = 0.01,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per-group load-balancing loss ``λ_g · E_g · Σ_{i∈g} f_i · P_i`` (Switch / DeepSeek style).

    Parameters
    ----------
    expert_counts : Tensor [E], int   — slots routed to each expert (:class:`MoERouting`)
    prob_sums : Tensor [E], float     — Σ over the group's tokens of each expert's probability
    top_k : int
    experts_per_group : as in :func:`moe_route`
    coef : float or one per group     — λ_g
    reduction : "sum" | "none"        — scalar, or one loss per group [G]

    ``T_g = Σ_{i∈g} counts_i / k`` tokens in group g, ``f_i = counts_i / (k·T_g)`` (fraction of the
    group's assignments, Σ f = 1), ``P_i = prob_sums_i / T_g``. Equals λ_g under perfect balance;
    transformers' Mixtral ``load_balancing_loss_func`` is k times this (its f sums to k). A group
    with no tokens contributes 0. Gradient flows through prob_sums only.
    """
    op = "moe_balance_loss"
    if reduction not in ("sum", "none"):
        raise ValueError(f"{op}: reduction must be 'sum' or 'none', got {reduction!r}")
    E = prob_sums.shape[0]
    if tuple(expert_counts.shape) != (E,) or prob_sums.dim() != 1:
        raise ValueError(f"{op}: expert_counts and prob_sums must both be [E], got "
                         f"{list(expert_counts.shape)} and {list(prob_sums.shape)}")  # fmt: skip
    sizes = _group_sizes(E, experts_per_group, op)
    G = len(sizes)
    coefs = [float(coef)] * G if isinstance(coef, (int, float)) else [float(c) for c in coef]
    if len(coefs) != G:
        raise ValueError(f"{op}: coef has {len(coefs)} entries for {G} groups")
    dev = prob_sums.device
    gidx = torch.repeat_interleave(torch.arange(G, device=dev), torch.tensor(sizes, device=dev))
    p = prob_sums if prob_sums.dtype == torch.float64 else prob_sums.float()
    c = expert_counts.to(p.dtype)
    assign = torch.zeros(G, dtype=p.dtype, device=dev).index_add(0, gidx, c)  # k·T_g
    tokens = assign / top_k
    f = c / assign.clamp_min(1)[gidx]
    P = p / tokens.clamp_min(1.0 / top_k)[gidx]
    per_group = torch.zeros(G, dtype=p.dtype, device=dev).index_add(0, gidx, f * P)
    loss = per_group * torch.tensor(
        [cg * s for cg, s in zip(coefs, sizes)], dtype=p.dtype, device=dev
    )
    return loss.sum() if reduction == "sum" else loss


def moe_z_loss(
    router_logits: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int | Sequence[int] | None = None,
    coef: float = 1e-3,
) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``coef · mean_t (log Σ_{e ∈ group(t)} exp z_{t,e})²``."""
    op = "moe_z_loss"
    T, E = router_logits.shape
    sizes = _group_sizes(E, experts_per_group, op)
    if len(sizes) > 1 and group_ids is None:
        raise ValueError(f"{op}: group_ids is required with {len(sizes)} expert groups")
    _, cols, valid = _group_cols(_offsets_tensor(sizes, router_logits.device), group_ids, T, E)
    z = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    lse = torch.logsumexp(z.gather(1, cols).masked_fill(~valid, -math.inf), dim=1)
    return coef * (lse * lse).mean() if T else z.sum() * 0
