"""Triton kernels of MoE routing: contract §1 of ``python/unif2ace/ops/moe/_torch.py`` (its
"triton" launcher: ``ops/moe/_triton.py``).

* ``_route_fwd_kernel``: a [BLOCK_T, BLOCK_E] tile of tokens × all E columns per program, scores
  and keys in fp64 with the C++ and CUDA kernels' arithmetic (softmax ``ex · (1 / Σ ex)``, sigmoid
  ``1 / (1 + exp(−z))``), so ties stay ties and near-ties round alike, each token's group a column
  mask; DeepSeek-V3 subgroup scores by a masked top-2 per subgroup; the top-k as k rounds of
  "largest available key, lowest column among equal keys". Per-program expert counts and
  probability sums go to a [programs, BLOCK_E] workspace.
* ``_route_reduce_kernel``: sums that workspace in program order (deterministic, no atomics).

E <= 256, k <= 8, n_group <= 32 (:func:`route_supported`; else the "triton" launcher runs the
torch spec). The compile jobs are in :mod:`unif2ace.triton_kernels.moe_aot`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unif2ace._backend import triton_interpreted
from unif2ace.triton_kernels._launch import on_device


@dataclass(frozen=True)
class RouteConfig:
    block_t: int  # tokens per program
    block_e: int  # columns (all E experts, every group side by side) per program: >= E
    num_warps: int


# Routing: one program holds a [BLOCK_T, BLOCK_E] tile of fp64 scores / keys over all E columns
# (each token's group a masked slice of it), so per-expert counts and probability sums are column
# sums of the tile. ~1024 elements per program: 8 fp64 per thread and tensor at 4 warps.
ROUTE_MAX_E = 256
ROUTE_MAX_K = 8  # the [BLOCK_T, ROUTE_MAX_K] tiles of the chosen ids / scores
ROUTE_MAX_GROUPS = 32  # DeepSeek-V3 subgroups (n_group) per task group
_ROUTE_TILE = 1024
# Two tile widths keep the AOT sweep (tests/test_triton_aot.py) short: each width is one more
# compile per dtype and scoring. E <= 64 covers UniF²ace (2 groups of 8 routed experts) and
# Mixtral / Qwen-MoE sizes.
_ROUTE_BLOCK_E = (64, 256)


def _pick_route_config(E: int, interpret: bool) -> RouteConfig:
    block_e = next((b for b in _ROUTE_BLOCK_E if b >= E), 0)
    if not block_e:
        raise ValueError(f"moe_route triton: E = {E} > {ROUTE_MAX_E} columns is not supported")
    # Interpreter: fewer, bigger programs (per-op Python overhead dominates).
    tile = 1 << 14 if interpret else _ROUTE_TILE
    return RouteConfig(block_t=tile // block_e, block_e=block_e, num_warps=4)


def route_supported(E: int, top_k: int, n_group: int) -> bool:
    return E <= ROUTE_MAX_E and top_k <= ROUTE_MAX_K and n_group <= ROUTE_MAX_GROUPS


@triton.jit
def _route_fwd_kernel(
    logits_ptr,
    offsets_ptr,
    gid_ptr,
    bias_ptr,
    ids_ptr,
    w_ptr,
    cnt_part_ptr,
    ps_part_ptr,
    T,
    E,
    G,
    stride_l,
    TOP_K,
    N_GROUP,
    TOPK_GROUP,
    scaling,
    HAS_GID,
    HAS_BIAS,
    RENORM,
    SOFTMAX: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Contract §1 for the tokens of program pid(0); writes this program's per-expert partial
    counts and probability sums to row pid(0) of cnt_part / ps_part ([programs, BLOCK_E]).

    Columns are global expert indices; a token's candidates are the columns [lo, hi) of its group,
    so ascending column order is ascending local order (the tie rule). Selection: k rounds of
    "largest available key, lowest column among equal keys" (the stable descending sort's first k).
    """
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    BIG: tl.constexpr = 1 << 30
    rmask = rows < T
    g = tl.zeros((BLOCK_T,), tl.int64)
    if HAS_GID != 0:
        g = tl.load(gid_ptr + rows, mask=rmask, other=0)
    gok = (g >= 0) & (g < G)
    rok = rmask & gok  # a bad group id (checks off): ids 0, weights NaN, never read through
    g = tl.where(gok, g, 0)
    lo = tl.load(offsets_ptr + g, mask=rok, other=0)
    hi = tl.load(offsets_ptr + g + 1, mask=rok, other=0)
    c2 = cols[None, :]
    valid = rok[:, None] & (c2 >= lo[:, None]) & (c2 < hi[:, None]) & (c2 < E)
    z = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_l + c2, mask=valid, other=0.0)
    z = z.to(tl.float32).to(tl.float64)
    NEG_INF = float("-inf")
    if SOFTMAX:
        zm = tl.where(valid, z, NEG_INF)
        m = tl.max(zm, axis=1)
        m = tl.where(rok, m, 0.0)
        ex = tl.where(valid, tl.exp(zm - m[:, None]), 0.0)
        s = tl.sum(ex, axis=1)
        s = tl.where(rok, s, 1.0)
        p = ex * (1.0 / s)[:, None]  # ex · rcp(Σ), the C++ / CUDA form (equal roundings: near-ties)
    else:
        p = tl.where(valid, 1.0 / (1.0 + tl.exp(-z)), 0.0)
    key = p
    if HAS_BIAS != 0:
        key = key + tl.load(bias_ptr + c2, mask=valid, other=0.0).to(tl.float64)
    # DeepSeek-V3 group limit: subgroup score = sum of its two largest keys; keep TOPK_GROUP.
    avail = valid
    if N_GROUP > 0:
        gs = (hi - lo) // N_GROUP
        gs = tl.where(gs > 0, gs, 1)
        sg = (c2 - lo[:, None]) // gs[:, None]
        gcols = tl.arange(0, BLOCK_G)[None, :]
        gscore = tl.full((BLOCK_T, BLOCK_G), NEG_INF, tl.float64)
        for i in range(0, N_GROUP):
            ins = valid & (sg == i)
            a = tl.max(tl.where(ins, key, NEG_INF), axis=1)
            ia = tl.min(tl.where(ins & (key == a[:, None]), c2, BIG), axis=1)
            b = tl.max(tl.where(ins & (c2 != ia[:, None]), key, NEG_INF), axis=1)
            sc = tl.where(gs > 1, a + b, a)
            gscore = tl.where(gcols == i, sc[:, None], gscore)
        gavail = (gcols < N_GROUP) & rok[:, None]
        avail = valid & (c2 < 0)  # all False
        for _r in range(0, TOPK_GROUP):
            gm = tl.max(tl.where(gavail, gscore, NEG_INF), axis=1)
            gi = tl.min(tl.where(gavail & (gscore == gm[:, None]), gcols, BIG), axis=1)
            gi = tl.where(gi == BIG, tl.min(tl.where(gavail, gcols, BIG), axis=1), gi)
            gavail = gavail & (gcols != gi[:, None])
            avail = avail | (valid & (sg == gi[:, None]))
    kcols = tl.arange(0, BLOCK_K)[None, :]
    sel = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    vsel = tl.zeros((BLOCK_T, BLOCK_K), tl.float64)
    cnt = tl.zeros((BLOCK_E,), tl.int32)
    for j in range(0, TOP_K):
        km = tl.max(tl.where(avail, key, NEG_INF), axis=1)
        idx = tl.min(tl.where(avail & (key == km[:, None]), c2, BIG), axis=1)
        # NaN keys (checks off) or all -inf: the lowest available column, never an empty slot
        idx = tl.where(idx == BIG, tl.min(tl.where(avail, c2, BIG), axis=1), idx)
        hit = c2 == idx[:, None]
        v = tl.sum(tl.where(hit & valid, p, 0.0), axis=1)
        avail = avail & ~hit
        cnt += tl.sum((hit & valid).to(tl.int32), axis=0)
        sel = tl.where(kcols == j, tl.where(rok, idx, 0).to(tl.int64)[:, None], sel)
        vsel = tl.where(kcols == j, v[:, None], vsel)
    vs = tl.sum(vsel, axis=1)
    vs = tl.where(rok & (vs > 0), vs, 1.0)  # padding rows: no 0 / 0
    scale = tl.where(RENORM != 0, scaling / vs, scaling + 0.0 * vs)
    w = (vsel * scale[:, None]).to(tl.float32)
    w = tl.where(rok[:, None], w, float("nan"))
    om = rmask[:, None] & (kcols < TOP_K)
    o = rows.to(tl.int64)[:, None] * TOP_K + kcols
    tl.store(ids_ptr + o, sel, mask=om)
    tl.store(w_ptr + o, w, mask=om)
    if SOFTMAX:
        q = p
    else:
        ps = tl.sum(p, axis=1)
        q = p * (1.0 / tl.where(ps > 0, ps, 1.0))[:, None]
    qs = tl.sum(tl.where(valid, q, 0.0), axis=0)
    tl.store(ps_part_ptr + pid.to(tl.int64) * BLOCK_E + cols, qs.to(tl.float32))
    tl.store(cnt_part_ptr + pid.to(tl.int64) * BLOCK_E + cols, cnt)


@triton.jit
def _route_reduce_kernel(
    cnt_part_ptr,
    ps_part_ptr,
    counts_ptr,
    prob_sums_ptr,
    P,
    E,
    STRIDE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """counts[e] = Σ_b cnt_part[b, e], prob_sums[e] = Σ_b ps_part[b, e], b ascending (fixed
    order: run-to-run deterministic for a given grid)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    em = e < E
    c = tl.zeros((BLOCK,), tl.int32)
    s = tl.zeros((BLOCK,), tl.float32)
    for b in range(0, P):
        c += tl.load(cnt_part_ptr + b * STRIDE + e, mask=em, other=0)
        s += tl.load(ps_part_ptr + b * STRIDE + e, mask=em, other=0.0)
    tl.store(counts_ptr + e, c, mask=em)
    tl.store(prob_sums_ptr + e, s, mask=em)


def route(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums) -> None:
    """Contract §1 (``opts``: the RouteOptions of ``unif2ace.ops.moe._types``): one program per
    BLOCK_T tokens, then a fixed-order reduction of the per-program expert partials (no atomics,
    no host sync). Supports E <= ROUTE_MAX_E, top_k <= ROUTE_MAX_K, n_group <= ROUTE_MAX_GROUPS
    (:func:`route_supported`)."""
    T, E = logits.shape
    cfg = _pick_route_config(E, triton_interpreted())
    P = triton.cdiv(T, cfg.block_t)
    cnt_part = torch.empty(P, cfg.block_e, dtype=torch.int32, device=logits.device)
    ps_part = torch.empty(P, cfg.block_e, dtype=torch.float32, device=logits.device)
    with on_device(logits):
        if P:
            _route_fwd_kernel[(P,)](
                logits,
                group_offsets,
                group_offsets if group_ids is None else group_ids,
                weights if bias is None else bias,
                ids,
                weights,
                cnt_part,
                ps_part,
                T,
                E,
                group_offsets.numel() - 1,
                logits.stride(0),
                opts.top_k,
                opts.n_group,
                opts.topk_group,
                float(opts.scaling),
                int(group_ids is not None),
                int(bias is not None),
                int(opts.renormalize),
                SOFTMAX=opts.scoring == "softmax",
                BLOCK_T=cfg.block_t,
                BLOCK_E=cfg.block_e,
                BLOCK_K=ROUTE_MAX_K,
                BLOCK_G=ROUTE_MAX_GROUPS,
                num_warps=cfg.num_warps,
            )
        _route_reduce_kernel[(triton.cdiv(E, cfg.block_e),)](
            cnt_part,
            ps_part,
            counts,
            prob_sums,
            P,
            E,
            STRIDE=cfg.block_e,
            BLOCK=cfg.block_e,
            num_warps=cfg.num_warps,
        )
