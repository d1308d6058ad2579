"""Triton kernels of the grouped MoE dispatch (shared/DESIGN.md §6; contract: the comment block at
the top of ``python/unif2ace/ops/moe.py``, §4, §5, §6 and §7).

* ``_route_fwd_kernel`` (contract §1): a [BLOCK_T, BLOCK_E] tile of tokens × all E columns per
  program, scores and keys in fp64 (the C++ kernel's arithmetic, so ties stay ties), each token's
  group a column mask; DeepSeek-V3 subgroup scores by a masked top-2 per subgroup; the top-k as k
  rounds of "largest available key, lowest column among equal keys". Per-program expert counts
  and probability sums go to a [programs, BLOCK_E] workspace that ``_route_reduce_kernel`` sums
  in program order (deterministic, no atomics). E <= 256, k <= 8, n_group <= 32 (else the
  launcher in ops/_moe_gpu.py runs the torch spec).
* ``_permute_kernel``: ``xs[p] = x[sorted_slot[p] // k]``, a [BLOCK_R, BLOCK_D] tile per program.
* ``_combine_kernel``: ``out[t] = Σ_j w[t, j] · src[slot_pos[t·k + j]]``, fp32, j ascending.
* ``_combine_bwd_kernel``: ``grad_src[slot_pos[t·k + j]] = w[t, j] · g[t]`` and
  ``grad_w[t, j] = Σ_d g[t, d] · src[pos, d]`` (a fixed-order tile reduction; each tile of src is
  loaded before the same tile of grad_src is stored, so grad_src may be src).
* ``_grouped_gemm_kernel``: ScatterMoE-style grouped GEMM over the plan's tile map (one program per
  (tile, column block); tile i covers rows [tile_row[i], min(tile_row[i] + BLOCK_M,
  offsets[e + 1])) of expert e = tile_expert[i], unused tiles run a zero-trip loop). ``GATHER``:
  the A rows are gathered from x by token index (sorted_slot[p] // k) while loading the tile, so no
  permuted copy of x is ever written (xs is [0, D]: the backward re-gathers). ``ACT``: 0 none
  (the down projection), 1 gelu (erf), 2 gelu_tanh, 3 silu_glu — the up projection writes the
  pre-activation h (saved for backward) and the activation a = act(h) in the same epilogue; for
  silu_glu one program holds the gate and the up tile of the same columns (two accumulators).
  The routed weights are applied in ``_combine_kernel`` (deterministic, no atomics): the contract
  keeps the unweighted expert outputs for the backward's grad_weights.

fp32 GEMMs use ``input_precision="ieee"`` (no TF32: the fp32 tests compare with float64 at 2e-5).
No GPU has run these kernels yet (none on the machine that wrote them); they compile for sm_80 and
sm_90 without spills (tests/test_triton_aot.py) and are checked under TRITON_INTERPRET=1 against
the torch launchers (tests/test_moe.py).
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows per tile (the plan's block_m, moe._BLOCK_M["triton"]; others: next pow2)
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class RowConfig:
    block_r: int  # rows per program
    block_d: int  # columns per program (permute, combine) / per loop step (combine_bwd)
    num_warps: int


BLOCK_M = 64
# 16-bit: tensor-core tiles 64 x 64 x 32 at 4 warps. fp32 (IEEE, FMA path): 64 x 32 at 8 warps —
# at 64 x 64 / 4 warps the silu_glu variant (two accumulators) needed 255 registers and spilled
# 28-1132 bytes (AOT report, triton 3.9); 64 x 32 / 8 warps: 80 (sm_80) / 146 (sm_90), no spill.
_GEMM = GemmConfig(block_m=BLOCK_M, block_n=64, block_k=32, num_warps=4, num_stages=3)
_GEMM_FP32 = GemmConfig(block_m=BLOCK_M, block_n=32, block_k=32, num_warps=8, num_stages=3)
# 8 warps: at 4 warps ptxas spilled 4-24 bytes in the fp32 combine_bwd / fp16 combine variants.
_ROW = RowConfig(block_r=4, block_d=256, num_warps=8)
# Interpreter: every tl op costs Python overhead per program; bigger tiles, fewer programs.
_ROW_INTERPRET = RowConfig(block_r=64, block_d=512, num_warps=4)


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
# Two tile widths keep the AOT sweep at 24 route compiles (~40 s on 2 cores; 4 widths took 80 s);
# E <= 64 covers UniF²ace (2 groups of 8 routed experts) and Mixtral / Qwen-MoE sizes.
_ROUTE_BLOCK_E = (64, 256)

AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu_glu": 3}


def _interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pick_row_config(interpret: bool) -> RowConfig:
    return _ROW_INTERPRET if interpret else _ROW


def _pick_gemm_config(dtype: torch.dtype) -> GemmConfig:
    return _GEMM_FP32 if dtype == torch.float32 else _GEMM


def _pick_route_config(E: int, interpret: bool) -> RouteConfig:
    block_e = next((b for b in _ROUTE_BLOCK_E if b >= E), 0)
    if not block_e:
        raise ValueError(f"moe_route triton: E = {E} > {ROUTE_MAX_E} columns is not supported")
    # Interpreter: fewer, bigger programs (per-op Python overhead dominates).
    tile = 1 << 14 if interpret else _ROUTE_TILE
    return RouteConfig(block_t=tile // block_e, block_e=block_e, num_warps=4)


def route_supported(E: int, top_k: int, n_group: int) -> bool:
    return E <= ROUTE_MAX_E and top_k <= ROUTE_MAX_K and n_group <= ROUTE_MAX_GROUPS


def aot_configs():
    """Every (kernel kind, configuration, dtype) a GPU launch can pick."""
    for dtype in AOT_DTYPES:
        yield "row", _ROW, dtype
        for be in _ROUTE_BLOCK_E:
            for softmax in (True, False):
                yield ("route", softmax), _pick_route_config(be, False), dtype
        for act in (0, 1, 2, 3):
            for gather in (True, False):
                if act == 0 and gather:
                    continue  # the down projection reads the activation rows directly
                if act != 0 and not gather:
                    continue  # the up projection always gathers
                yield ("gemm", act), _pick_gemm_config(dtype), dtype


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------


@triton.jit
def _permute_kernel(x_ptr, sorted_slot_ptr, xs_ptr, N, D, TOP_K, stride_x,
                    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    slot = tl.load(sorted_slot_ptr + rows, mask=rmask, other=-1)
    ok = rmask & (slot >= 0) & (slot < N)
    tok = tl.where(ok, slot // TOP_K, 0).to(tl.int64)
    cmask = cols < D
    v = tl.load(x_ptr + tok[:, None] * stride_x + cols[None, :], mask=ok[:, None] & cmask[None, :],
                other=0.0)  # fmt: skip
    tl.store(xs_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], v,
             mask=rmask[:, None] & cmask[None, :])  # fmt: skip


@triton.jit
def _combine_kernel(src_ptr, slot_pos_ptr, w_ptr, out_ptr, T, N, D, TOP_K, stride_src,
                    HAS_W: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for j in range(0, TOP_K):
        s = rows.to(tl.int64) * TOP_K + j
        pos = tl.load(slot_pos_ptr + s, mask=rmask, other=-1)
        ok = rmask & (pos >= 0) & (pos < N)
        pos = tl.where(ok, pos, 0).to(tl.int64)
        v = tl.load(src_ptr + pos[:, None] * stride_src + cols[None, :],
                    mask=ok[:, None] & cmask[None, :], other=0.0).to(tl.float32)  # fmt: skip
        if HAS_W:
            w = tl.load(w_ptr + s, mask=ok, other=0.0)
            v = v * w[:, None]
        acc += v
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])  # fmt: skip


@triton.jit
def _combine_bwd_kernel(grad_out_ptr, src_ptr, slot_pos_ptr, w_ptr, grad_src_ptr, grad_w_ptr,
                        T, N, D, TOP_K, stride_go, stride_src,
                        HAS_W: tl.constexpr, HAS_GW: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < T
    for j in range(0, TOP_K):
        s = rows.to(tl.int64) * TOP_K + j
        pos = tl.load(slot_pos_ptr + s, mask=rmask, other=-1)
        ok = rmask & (pos >= 0) & (pos < N)
        pos = tl.where(ok, pos, 0).to(tl.int64)
        if HAS_W:
            w = tl.load(w_ptr + s, mask=ok, other=0.0)
        else:
            w = tl.where(ok, 1.0, 0.0)
        dot = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            m = ok[:, None] & (cols < D)[None, :]
            g = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * stride_go + cols[None, :],
                        mask=m, other=0.0).to(tl.float32)  # fmt: skip
            if HAS_GW:
                v = tl.load(src_ptr + pos[:, None] * stride_src + cols[None, :], mask=m,
                            other=0.0).to(tl.float32)  # fmt: skip
                dot += tl.sum(g * v, axis=1)
            tl.store(grad_src_ptr + pos[:, None] * D + cols[None, :],
                     (g * w[:, None]).to(grad_src_ptr.dtype.element_ty), mask=m)  # fmt: skip
        if HAS_GW:
            tl.store(grad_w_ptr + s, dot, mask=rmask)


@triton.jit
def _gelu(h, TANH: tl.constexpr):
    if TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = 2.0 / (1.0 + tl.exp(-2.0 * u)) - 1.0  # tanh(u)
        return 0.5 * h * (1.0 + t)
    else:
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))


@triton.jit
def _grouped_gemm_kernel(a_ptr, w_ptr, sorted_slot_ptr, offsets_ptr, tile_expert_ptr,
                         tile_row_ptr, h_ptr, act_ptr, N_ROWS, K_DIM, N_OUT, TOP_K, TILE_M, stride_a,
                         stride_we, stride_wn, stride_h, stride_act,
                         GATHER: tl.constexpr, ACT: tl.constexpr, IEEE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):  # fmt: skip
    """h[p, n] = Σ_k A[p, k] · W[e, n, k] for the rows p of tile pid(0), columns of pid(1).

    A[p] = a[sorted_slot[p] // TOP_K] (GATHER) or a[p]. N_OUT: the output columns (F for
    silu_glu, whose W rows [0, F) are the gate and [F, 2F) the up projection). ACT > 0 also
    writes act_ptr[p, n] = act(h) (the up projection's epilogue).
    """
    tile = tl.program_id(0)
    e = tl.load(tile_expert_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    valid = e >= 0
    e_safe = tl.where(valid, e, 0)
    row_end = tl.where(valid, tl.load(offsets_ptr + e_safe + 1), 0)
    k_hi = tl.where(valid, K_DIM, 0)  # unused tile: zero-trip loop, masked stores
    rows = row0 + tl.arange(0, BLOCK_M)
    mmask = (rows < row_end) & (rows < N_ROWS) & (rows < row0 + TILE_M)
    rows_safe = tl.where(mmask, rows, 0)
    if GATHER:
        slot = tl.load(sorted_slot_ptr + rows_safe, mask=mmask, other=0)
        arow = tl.where(mmask & (slot >= 0), slot // TOP_K, 0).to(tl.int64)
    else:
        arow = rows_safe.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = cols < N_OUT
    cols_safe = tl.where(nmask, cols, 0).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + arow[:, None] * stride_a + kk[None, :]
    w_base = w_ptr + e_safe.to(tl.int64) * stride_we
    b_ptrs = w_base + cols_safe[None, :] * stride_wn + kk[:, None]  # [BLOCK_K, BLOCK_N] = W^T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACT == 3:
        b2_ptrs = b_ptrs + N_OUT * stride_wn  # the up rows F + n
        acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_hi, BLOCK_K):
        kmask = (k0 + kk) < K_DIM
        a = tl.load(a_ptrs + k0, mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        if ACT == 3:
            b2 = tl.load(b2_ptrs + k0, mask=kmask[:, None] & nmask[None, :], other=0.0)
            if IEEE:
                acc2 = tl.dot(a, b2, acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(a, b2, acc2)
    om = mmask[:, None] & nmask[None, :]
    r64 = rows_safe.to(tl.int64)[:, None]
    out_ty = h_ptr.dtype.element_ty
    hg = acc.to(out_ty)
    tl.store(h_ptr + r64 * stride_h + cols_safe[None, :], hg, mask=om)
    if ACT == 3:
        hu = acc2.to(out_ty)
        tl.store(h_ptr + r64 * stride_h + N_OUT + cols_safe[None, :], hu, mask=om)
        g = hg.to(tl.float32)  # the activation of the stored (rounded) h, as the backward sees it
        u = hu.to(tl.float32)
        act = g / (1.0 + tl.exp(-g)) * u
        tl.store(act_ptr + r64 * stride_act + cols_safe[None, :], act.to(out_ty), mask=om)
    elif ACT == 1 or ACT == 2:
        act = _gelu(hg.to(tl.float32), ACT == 2)
        tl.store(act_ptr + r64 * stride_act + cols_safe[None, :], act.to(out_ty), mask=om)


@triton.jit
def _route_fwd_kernel(logits_ptr, offsets_ptr, gid_ptr, bias_ptr, ids_ptr, w_ptr, cnt_part_ptr,
                      ps_part_ptr, T, E, G, stride_l, TOP_K, N_GROUP, TOPK_GROUP, scaling,
                      HAS_GID, HAS_BIAS, RENORM, SOFTMAX: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_G: tl.constexpr):  # fmt: skip
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
        p = ex / s[:, None]
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
        q = p / tl.where(ps > 0, ps, 1.0)[:, None]
    qs = tl.sum(tl.where(valid, q, 0.0), axis=0)
    tl.store(ps_part_ptr + pid.to(tl.int64) * BLOCK_E + cols, qs.to(tl.float32))
    tl.store(cnt_part_ptr + pid.to(tl.int64) * BLOCK_E + cols, cnt)


@triton.jit
def _route_reduce_kernel(cnt_part_ptr, ps_part_ptr, counts_ptr, prob_sums_ptr, P, E,
                         STRIDE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
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


# -----------------------------------------------------------------------------------------------
# Launchers (contract §1, §4-§7 of unif2ace.ops.moe)
# -----------------------------------------------------------------------------------------------


def route(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
          topk_group, scaling, ids, weights, counts, prob_sums) -> None:  # fmt: skip
    """Contract §1: one program per BLOCK_T tokens, then a fixed-order reduction of the
    per-program expert partials (no atomics, no host sync). Supports E <= ROUTE_MAX_E,
    top_k <= ROUTE_MAX_K, n_group <= ROUTE_MAX_GROUPS (:func:`route_supported`)."""
    T, E = logits.shape
    cfg = _pick_route_config(E, _interpret())
    P = triton.cdiv(T, cfg.block_t)
    cnt_part = torch.empty(P, cfg.block_e, dtype=torch.int32, device=logits.device)
    ps_part = torch.empty(P, cfg.block_e, dtype=torch.float32, device=logits.device)
    if P:
        _route_fwd_kernel[(P,)](
            logits, group_offsets, group_offsets if group_ids is None else group_ids,
            weights if bias is None else bias, ids, weights, cnt_part, ps_part, T, E,
            group_offsets.numel() - 1, logits.stride(0), top_k, n_group, topk_group,
            float(scaling), int(group_ids is not None), int(bias is not None), int(renormalize),
            SOFTMAX=scoring == "softmax", BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e,
            BLOCK_K=ROUTE_MAX_K, BLOCK_G=ROUTE_MAX_GROUPS,
            num_warps=cfg.num_warps,
        )  # fmt: skip
    _route_reduce_kernel[(triton.cdiv(E, cfg.block_e),)](
        cnt_part, ps_part, counts, prob_sums, P, E, STRIDE=cfg.block_e, BLOCK=cfg.block_e,
        num_warps=cfg.num_warps,
    )  # fmt: skip


def permute(x: torch.Tensor, sorted_slot: torch.Tensor, top_k: int, xs: torch.Tensor) -> None:
    N, D = xs.shape
    if N == 0 or D == 0:
        return
    cfg = _pick_row_config(_interpret())
    grid = (triton.cdiv(N, cfg.block_r), triton.cdiv(D, cfg.block_d))
    _permute_kernel[grid](x, sorted_slot, xs, N, D, top_k, x.stride(0),
                          BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)  # fmt: skip


def combine(src: torch.Tensor, slot_pos: torch.Tensor, weights, out: torch.Tensor) -> None:
    T, D = out.shape
    N = slot_pos.numel()
    if T == 0 or D == 0:
        return
    cfg = _pick_row_config(_interpret())
    grid = (triton.cdiv(T, cfg.block_r), triton.cdiv(D, cfg.block_d))
    _combine_kernel[grid](src, slot_pos, src if weights is None else weights, out, T, N, D,
                          N // T, src.stride(0), HAS_W=weights is not None, BLOCK_R=cfg.block_r,
                          BLOCK_D=cfg.block_d, num_warps=cfg.num_warps)  # fmt: skip


def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights) -> None:
    T, D = grad_out.shape
    N = slot_pos.numel()
    if T == 0:
        return
    if grad_out.dtype != src.dtype:
        grad_out = grad_out.to(src.dtype)
    if D > 1 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    cfg = _pick_row_config(_interpret())
    grid = (triton.cdiv(T, cfg.block_r),)
    _combine_bwd_kernel[grid](
        grad_out, src, slot_pos, src if weights is None else weights, grad_src,
        src if grad_weights is None else grad_weights, T, N, D, N // T, grad_out.stride(0),
        src.stride(0), HAS_W=weights is not None, HAS_GW=grad_weights is not None,
        BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
    )  # fmt: skip


def grouped_gemm(a, w, plan, out, act_out=None, activation=None, gather=False) -> None:
    """out[p] = A[p] @ w[e]^T per tile of the plan (A gathered from a by token when ``gather``);
    with an activation, out is h [N, Fu] and act_out [N, F] = act(h)."""
    N = out.shape[0]
    if N == 0:
        return
    cfg = _pick_gemm_config(a.dtype)
    if plan.block_m < 1 or plan.tile_expert.numel() == 0:
        raise ValueError(
            "moe triton: the plan has no tile map (block_m = 0); make it with "
            "backend='triton' or block_m > 0"
        )
    block_m = max(16, triton.next_power_of_2(plan.block_m))  # == cfg.block_m for the default plan
    code = ACT_CODES[activation]
    n_out = w.shape[1] // 2 if code == 3 else w.shape[1]
    grid = (plan.tile_expert.numel(), triton.cdiv(n_out, cfg.block_n))
    ao = out if act_out is None else act_out
    _grouped_gemm_kernel[grid](
        a, w, plan.sorted_slot, plan.offsets, plan.tile_expert, plan.tile_row, out, ao, N,
        w.shape[2], n_out, plan.top_k, plan.block_m, a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ao.stride(0), GATHER=gather, ACT=code, IEEE=a.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs) -> None:
    """Contract §7: gathered up projection + fused activation, down projection, weighted combine.
    xs is [0, D] (the backward re-gathers)."""
    N = h.shape[0]
    Fd = w_down.shape[2]
    a = h.new_empty(N, Fd)
    grouped_gemm(x, w_up, plan, h, a, activation, gather=True)
    grouped_gemm(a, w_down, plan, out, gather=False)
    combine(out, plan.slot_pos, weights, y)


# -----------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_triton_aot.py)
# -----------------------------------------------------------------------------------------------

_IDX_PTRS = {"sorted_slot_ptr", "slot_pos_ptr", "offsets_ptr", "tile_expert_ptr", "tile_row_ptr"}


_ROUTE_TYPES = {"offsets_ptr": "*i64", "gid_ptr": "*i64", "bias_ptr": "*fp32", "ids_ptr": "*i64",
                "cnt_part_ptr": "*i32", "ps_part_ptr": "*fp32", "counts_ptr": "*i32",
                "prob_sums_ptr": "*fp32", "scaling": "fp32"}  # fmt: skip


def _signature(kernel, dt: str) -> dict[str, str]:
    route = kernel in (_route_fwd_kernel, _route_reduce_kernel)
    out = {}
    for p in inspect.signature(kernel.fn).parameters.values():
        if "constexpr" in str(p.annotation):
            out[p.name] = "constexpr"
        elif route and p.name in _ROUTE_TYPES:
            out[p.name] = _ROUTE_TYPES[p.name]
        elif p.name in _IDX_PTRS:
            out[p.name] = "*i32"
        elif p.name == "grad_w_ptr" or (p.name == "w_ptr" and kernel is not _grouped_gemm_kernel):
            out[p.name] = "*fp32"
        elif p.name.endswith("_ptr"):
            out[p.name] = "*" + dt
        else:
            out[p.name] = "i32"
    return out


def aot_specs(full: bool = False):
    from unif2ace.triton_kernels.aot import AotSpec

    del full  # the default set already has every kernel variant a launcher picks
    for kind, cfg, dtype in aot_configs():
        dt = _TRITON_DTYPE[dtype]
        if kind == "row":
            common = dict(num_warps=cfg.num_warps)
            base = dict(BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d)
            meta = dict(dtype=dt, block_r=cfg.block_r, block_d=cfg.block_d)
            div = ("x_ptr", "xs_ptr", "src_ptr", "out_ptr", "grad_out_ptr", "grad_src_ptr",
                   "sorted_slot_ptr", "slot_pos_ptr", "w_ptr", "grad_w_ptr", "D", "stride_x",
                   "stride_src", "stride_go")  # fmt: skip
            yield AotSpec(name=f"_permute_kernel[{dt}]", kernel=_permute_kernel,
                          signature=_signature(_permute_kernel, dt), constexprs=base,
                          divisible_by_16=div, meta=meta, **common)  # fmt: skip
            for has_w in (True, False):
                yield AotSpec(name=f"_combine_kernel[{dt}-w{int(has_w)}]", kernel=_combine_kernel,
                              signature=_signature(_combine_kernel, dt),
                              constexprs=dict(base, HAS_W=has_w), divisible_by_16=div, meta=meta,
                              **common)  # fmt: skip
            for has_w, has_gw in itertools.product((True, False), (True, False)):
                yield AotSpec(name=f"_combine_bwd_kernel[{dt}-w{int(has_w)}g{int(has_gw)}]",
                              kernel=_combine_bwd_kernel,
                              signature=_signature(_combine_bwd_kernel, dt),
                              constexprs=dict(base, HAS_W=has_w, HAS_GW=has_gw),
                              divisible_by_16=div, meta=meta, **common)  # fmt: skip
        elif kind[0] == "route":
            softmax = kind[1]
            tag = f"{dt}-e{cfg.block_e}-{'softmax' if softmax else 'sigmoid'}"
            yield AotSpec(
                name=f"_route_fwd_kernel[{tag}]", kernel=_route_fwd_kernel,
                signature=_signature(_route_fwd_kernel, dt),
                constexprs=dict(SOFTMAX=softmax, BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e,
                                BLOCK_K=ROUTE_MAX_K, BLOCK_G=ROUTE_MAX_GROUPS),
                num_warps=cfg.num_warps,
                divisible_by_16=("logits_ptr", "offsets_ptr", "gid_ptr", "bias_ptr", "ids_ptr",
                                 "w_ptr", "cnt_part_ptr", "ps_part_ptr"),
                meta=dict(dtype=dt, block_t=cfg.block_t, block_e=cfg.block_e, softmax=softmax),
            )  # fmt: skip
            if dtype == torch.float32 and softmax:  # dtype-free: once per block size
                yield AotSpec(
                    name=f"_route_reduce_kernel[e{cfg.block_e}]", kernel=_route_reduce_kernel,
                    signature=_signature(_route_reduce_kernel, dt),
                    constexprs=dict(STRIDE=cfg.block_e, BLOCK=cfg.block_e),
                    num_warps=cfg.num_warps,
                    divisible_by_16=("cnt_part_ptr", "ps_part_ptr", "counts_ptr",
                                     "prob_sums_ptr"),
                    meta=dict(block_e=cfg.block_e),
                )  # fmt: skip
        else:
            act = kind[1]
            yield AotSpec(
                name=f"_grouped_gemm_kernel[{dt}-act{act}-g{int(act != 0)}]",
                kernel=_grouped_gemm_kernel, signature=_signature(_grouped_gemm_kernel, dt),
                constexprs=dict(GATHER=act != 0, ACT=act, IEEE=dtype == torch.float32,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                divisible_by_16=("a_ptr", "w_ptr", "h_ptr", "act_ptr", "sorted_slot_ptr",
                                 "offsets_ptr", "tile_expert_ptr", "tile_row_ptr", "K_DIM",
                                 "stride_a", "stride_we", "stride_wn", "stride_h", "stride_act"),
                meta=dict(dtype=dt, act=act, block_m=cfg.block_m, block_n=cfg.block_n,
                          block_k=cfg.block_k),
            )  # fmt: skip
