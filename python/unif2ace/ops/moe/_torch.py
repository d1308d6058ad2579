"""The "torch" launchers of the grouped MoE family, and the family's LAUNCHER CONTRACT.

LAUNCHER CONTRACT — what every backend implements: this module ("torch", the executable spec),
_cpu.py (C++), _triton.py, _cuda.py. A backend registers one launcher per kernel below with
``@_backend.register("moe.<kernel>", backend)``; the custom ops (_custom_ops.py) call it through
``_backend.launcher``, and ``_backend.resolve`` picks the backend ("auto": the first of
``_backend.AUTO_ORDER[device type]`` that is available here and registered for the kernel).

Launchers take tensors, read them, and write into preallocated outputs (never allocate outputs
themselves, never return values; all outputs may be poisoned with NaN / -1 before the call and
every element must be written). No host synchronisation on GPU paths. Inputs have been validated
by the Python layer (shapes, dtypes, devices, index ranges when checks are on); kernels must
still never read or write out of bounds for an out-of-range index (clamp or skip it).
Shape letters: T tokens, E experts (all groups together), G task groups, k top-k, D model dim,
F expert hidden dim, Fu = 2F (silu_glu: gate rows first, then up rows) or F (gelu, gelu_tanh),
N = T·k routed rows (slots), slot s = t·k + j (token t's j-th choice).

Index dtypes: topk_ids int64 (torch/HF convention) on input to plan may also be int32;
every plan array is int32 (N < 2^31 is checked); element offsets inside kernels are 64-bit
(row · D can pass 2^31).

1. moe.route(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums)
   opts: RouteOptions (_types.py), the routing choices top_k, scoring, renormalize, n_group,
   topk_group, scaling (the custom op keeps them as flat arguments of its schema and bundles
   them here).
   logits  [T, E] float32/bf16/fp16, column stride 1, any row stride (router output).
   group_offsets int64 [G+1] (contiguous, offsets[0] = 0, offsets[G] ≤ E): group g owns the
           global experts [offsets[g], offsets[g+1]); a single group [0, E] when not grouped.
   group_ids int64 [T] or None (None: every token in group 0). bias float32 [E] or None.
   scoring: "softmax" | "sigmoid"; renormalize: bool; n_group, topk_group: int (0 = off);
   scaling: float.  Outputs: ids int64 [T, k], weights float32 [T, k], counts int32 [E],
   prob_sums float32 [E].
   Per token t with group g, candidates c ∈ [lo, hi) = [offsets[g], offsets[g+1]), n = hi − lo:
     score_c = softmax over the candidates of z_c (scoring="softmax") or sigmoid(z_c),
     key_c   = score_c + bias_c (bias 0 when None), COMPUTED IN FLOAT64 (so ties of (z, bias)
               stay exact ties and near-ties rank the same on every backend).
     n_group > 0 (DeepSeek-V3): candidates split into n_group equal consecutive subgroups;
               subgroup score = sum of its two largest keys (its largest if it has one expert);
               the topk_group best subgroups stay eligible, the rest are masked.
     ids[t, :] = the k eligible candidates with the largest key, in descending key order;
               EQUAL KEYS: LOWER EXPERT INDEX FIRST (and it wins a place at the boundary);
               the same rule for subgroup selection.
     v_j = score_{ids[t, j]}; weights[t, j] = scaling · v_j / Σ_i v_i   (renormalize)
                                            = scaling · v_j            (otherwise)
     counts[e]    = number of slots (t, j) with ids[t, j] = e  (deterministic integer)
     prob_sums[e] = Σ_t q_{t,e} over tokens whose group contains e, with q = the softmax score
               (softmax) or score / Σ_candidates score (sigmoid; DeepSeek-V3's normalised
               affinity). fp32 result; accumulate in fp32 or wider, in a fixed order
               (run-to-run deterministic for a fixed thread count / grid).
2. moe.route_bwd(logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums, scoring,
                 renormalize, scaling, grad_logits)
   grad_weights float32 [T, k] or None, grad_prob_sums float32 [E] or None (None = zero).
   Writes grad_logits float32 [T, E] contiguous (0 outside each token's group): the exact
   gradient of weights and prob_sums above w.r.t. logits (the key, bias and group masking are
   not differentiated: selection is piecewise constant). Per token, with p the scores:
     g = grad_weights[t], s = scaling, V = Σ_i v_i:
     renormalize: dv_j = s · (g_j − Σ_i g_i · v_i / V) / V;  otherwise dv_j = s · g_j;
     dp[ids[t, j]] += dv_j;
     prob_sums: softmax dp_c += G_c; sigmoid dp_c += (G_c − Σ_c' q_c' G_c') / Σ_c' p_c';
     softmax dz = p ⊙ (dp − Σ p ⊙ dp); sigmoid dz = dp ⊙ p (1 − p).
3. moe.plan(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert,
            tile_row)
   ids int32/int64 [T, k] contiguous (N = T·k slots). Outputs, all int32:
     counts [E]; offsets [E+1] (exclusive scan, offsets[E] = N);
     sorted_slot [N]: position p → slot s, experts ascending, and WITHIN an expert ascending
           slot order (a stable counting sort: histogram + scan + scatter, no argsort);
     slot_pos [N]: the inverse, slot s → position p;
     tile_expert, tile_row [max_tiles], max_tiles = N // block_m + E: tile i covers rows
           [tile_row[i], min(tile_row[i] + block_m, offsets[e + 1])) of expert e = tile_expert[i];
           tiles in expert order; unused entries tile_expert = −1, tile_row = N. block_m = 0:
           no tiles (the arrays have length 0).
   An id outside [0, E) must not be written through (CPU raises; GPU: drop the slot).
4. moe.permute(x, sorted_slot, top_k, xs)
   x [T, D] (column stride 1, any row stride), xs [N, D] contiguous, same dtype:
     xs[p, :] = x[sorted_slot[p] // top_k, :]
5. moe.combine(src, slot_pos, weights, out)
   src [N, D] (column stride 1), weights float32 [T, k] or None (= 1), out [T, D] contiguous,
   same dtype as src:  out[t] = Σ_{j = 0..k−1, in this order} weights[t, j] · src[slot_pos[t·k + j]]
   accumulated in fp32 (deterministic: no atomics). With weights None this is also the backward
   of moe.permute (dx = Σ_j dxs[slot_pos[t·k + j]]).
6. moe.combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights)
   grad_out [T, D], src [N, D], weights float32 [T, k] or None; writes
     grad_src [N, D] (src's dtype):  grad_src[slot_pos[t·k + j]] = weights[t, j] · grad_out[t]
     grad_weights float32 [T, k] or None: Σ_d grad_out[t, d] · src[slot_pos[t·k + j], d] (fp32).
   grad_src may be src itself (read each source row before overwriting it).
7. moe.experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs)
   The whole routed MLP forward for one plan (MoEPlan, _types.py). x [T, D]; w_up [E, Fu, D];
   w_down [E, D, F] (both contiguous, x's dtype); weights float32 [T, k] or None;
   activation "gelu" (erf), "gelu_tanh", "silu_glu" (silu(gate) · up).
   Writes y [T, D] = combine(out, weights); saves for backward, all in expert-sorted row order:
     h [N, Fu] the up projection before activation, out [N, D] the expert outputs before
     weighting, xs [N, D] the gathered input — or xs of shape [0, D] when the backend gathers
     inside its GEMM (ScatterMoE style: Triton) and re-gathers in backward.
   Backends with no grouped GEMM of their own may reuse _composed.experts_fwd(permute, combine,
   act_fwd) / _composed.experts_bwd(permute, combine, combine_bwd, act_bwd): their own
   permute/combine + torch GEMMs (F.grouped_mm on CUDA: no host sync) — the "cuda" minimum.
8. moe.experts_bwd(grad_y, x, w_up, w_down, weights, plan, activation, h, out, xs,
                   grad_x, grad_w_up, grad_w_down, grad_weights)
   Writes grad_x [T, D], grad_w_up [E, Fu, D], grad_w_down [E, D, F] (zero for experts with no
   rows), grad_weights float32 [T, k] (or None when weights is None). Keyword consume=True
   (eager autograd only): h, out and xs may be overwritten (reused for dh, d_out, dxs).

The fakes (torch.compile) fix these shapes from two per-backend facts kept in _custom_ops.py:
BLOCK_M[backend], the plan's row block (its tile map), and GATHERS_IN_KERNEL, the backends whose
grouped GEMM gathers x rows itself and saves xs of shape [0, D].
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.moe import _composed
from unif2ace.ops.moe.reference import moe_route_ref


@_backend.register("moe.route", "torch")
def route(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums):
    """The reference; it reads the largest group size from the offsets (one host read per call:
    on a GPU this runs only beyond the triton / cuda kernels' limits)."""
    with torch.no_grad():
        r = moe_route_ref(
            logits,
            opts.top_k,
            group_offsets,
            group_ids,
            opts.scoring,
            opts.renormalize,
            opts.n_group,
            opts.topk_group,
            bias,
            opts.scaling,
        )
    ids.copy_(r.topk_ids)
    weights.copy_(r.topk_weights)
    counts.copy_(r.expert_counts)
    prob_sums.copy_(r.prob_sums)


@_backend.register("moe.route_bwd", "torch")
def route_bwd(
    logits,
    group_offsets,
    group_ids,
    ids,
    grad_weights,
    grad_prob_sums,
    scoring,
    renormalize,
    scaling,
    grad_logits,
):
    """The contract's closed form (a custom op's body runs below autograd: no autograd.grad here),
    over all E columns with each token's group as a mask: no host read of the group sizes, so the
    cuda and triton backends use it too."""
    T, E = logits.shape
    offs = group_offsets.to(torch.int64)
    G = offs.numel() - 1
    gid = (
        group_ids.clamp(0, G - 1)
        if group_ids is not None
        else torch.zeros(T, dtype=torch.int64, device=logits.device)
    )
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


@_backend.register("moe.plan", "torch")
def plan(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row):
    """Every size is known on the host (E, N, max_tiles): no host read on a GPU (the "triton"
    backend's plan). An id outside [0, E) raises on the CPU and is dropped elsewhere (it sorts
    after every expert's rows and is counted nowhere)."""
    flat = ids.reshape(-1).to(torch.int64)
    N = flat.numel()
    ok = (flat >= 0) & (flat < num_experts)
    if flat.device.type == "cpu" and not bool(ok.all()):
        raise ValueError(f"moe_plan: topk_ids has entries outside [0, {num_experts})")
    key = torch.where(ok, flat, num_experts)
    c = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    c = c.index_add_(0, key, torch.ones_like(key))[:num_experts]
    counts.copy_(c)
    offsets[0] = 0
    offsets[1:].copy_(torch.cumsum(c, 0))
    order = torch.argsort(key, stable=True)
    sorted_slot.copy_(order)
    slot_pos[order] = torch.arange(N, dtype=slot_pos.dtype, device=slot_pos.device)
    if block_m:
        # tile i belongs to the expert whose tile range [ends[e] - n_tiles[e], ends[e]) holds i
        n_tiles = (c + block_m - 1) // block_m
        ends = torch.cumsum(n_tiles, 0)
        i = torch.arange(tile_expert.numel(), device=c.device)
        te = torch.searchsorted(ends, i, right=True)
        used = te < num_experts
        e = te.clamp(max=num_experts - 1)
        tr = offsets.to(torch.int64)[e] + (i - (ends[e] - n_tiles[e])) * block_m
        tile_expert.copy_(torch.where(used, te, -1))
        tile_row.copy_(torch.where(used, tr, N))


@_backend.register("moe.permute", "torch")
def permute(x, sorted_slot, top_k, xs):
    xs.copy_(x[sorted_slot.to(torch.int64) // top_k])


@_backend.register("moe.combine", "torch")
def combine(src, slot_pos, weights, out):
    T, D = out.shape
    rows = src[slot_pos.to(torch.int64)].float().view(T, -1, D)
    if weights is not None:
        rows = rows * weights[:, :, None]
    out.copy_(rows.sum(1))


@_backend.register("moe.combine_bwd", "torch")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    pos = slot_pos.to(torch.int64)
    g = grad_out.float().repeat_interleave(pos.numel() // max(T, 1), dim=0)  # [N, D] slot order
    if grad_weights is not None:
        grad_weights.copy_((g * src[pos].float()).sum(1).view(T, -1))
    if weights is not None:
        g = g * weights.reshape(-1, 1)
    grad_src[pos] = g.to(grad_src.dtype)


experts_fwd = _backend.register("moe.experts_fwd", "torch")(_composed.experts_fwd(permute, combine))
experts_bwd = _backend.register("moe.experts_bwd", "torch")(
    _composed.experts_bwd(permute, combine, combine_bwd)
)
