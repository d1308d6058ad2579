"""Triton kernels of the grouped MoE dispatch: contract §4-§7 of
``python/unif2ace/ops/moe/_torch.py`` (the "triton" launchers: ``ops/moe/_triton.py``). The
routing kernels (contract §1) are in :mod:`unif2ace.triton_kernels.moe_route`, the compile jobs in
:mod:`unif2ace.triton_kernels.moe_aot`.

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
They compile for sm_80 and sm_90 without spills (tests/test_triton_aot.py) and are checked under
TRITON_INTERPRET=1 against the torch launchers (tests/test_moe.py, tests/test_moe_triton.py);
whether they have run on a GPU: the README's status table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unif2ace._backend import triton_interpreted
from unif2ace.triton_kernels._launch import on_device

# -----------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GemmConfig:
    block_m: int  # rows per tile (the plan's block_m: BLOCK_M["triton"] in ops/moe/_custom_ops.py)
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
# at 64 x 64 / 4 warps the silu_glu variant (two accumulators) runs out of registers and spills;
# 64 x 32 / 8 warps does not (tests/test_triton_aot.py fails on any spill).
_GEMM = GemmConfig(block_m=BLOCK_M, block_n=64, block_k=32, num_warps=4, num_stages=3)
_GEMM_FP32 = GemmConfig(block_m=BLOCK_M, block_n=32, block_k=32, num_warps=8, num_stages=3)
# 8 warps: at 4 warps ptxas spills in the fp32 combine_bwd / fp16 combine variants.
_ROW = RowConfig(block_r=4, block_d=256, num_warps=8)
# Interpreter: every tl op costs Python overhead per program; bigger tiles, fewer programs.
_ROW_INTERPRET = RowConfig(block_r=64, block_d=512, num_warps=4)


ACT_CODES = {None: 0, "gelu": 1, "gelu_tanh": 2, "silu_glu": 3}


def _pick_row_config(interpret: bool) -> RowConfig:
    return _ROW_INTERPRET if interpret else _ROW


def _pick_gemm_config(dtype: torch.dtype) -> GemmConfig:
    return _GEMM_FP32 if dtype == torch.float32 else _GEMM


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------


@triton.jit
def _permute_kernel(
    x_ptr,
    sorted_slot_ptr,
    xs_ptr,
    N,
    D,
    TOP_K,
    stride_x,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    slot = tl.load(sorted_slot_ptr + rows, mask=rmask, other=-1)
    ok = rmask & (slot >= 0) & (slot < N)
    tok = tl.where(ok, slot // TOP_K, 0).to(tl.int64)
    cmask = cols < D
    v = tl.load(
        x_ptr + tok[:, None] * stride_x + cols[None, :],
        mask=ok[:, None] & cmask[None, :],
        other=0.0,
    )
    tl.store(
        xs_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        v,
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _combine_kernel(
    src_ptr,
    slot_pos_ptr,
    w_ptr,
    out_ptr,
    T,
    N,
    D,
    TOP_K,
    stride_src,
    HAS_W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
        v = tl.load(
            src_ptr + pos[:, None] * stride_src + cols[None, :],
            mask=ok[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        if HAS_W:
            w = tl.load(w_ptr + s, mask=ok, other=0.0)
            v = v * w[:, None]
        acc += v
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None] & cmask[None, :],
    )


@triton.jit
def _combine_bwd_kernel(
    grad_out_ptr,
    src_ptr,
    slot_pos_ptr,
    w_ptr,
    grad_src_ptr,
    grad_w_ptr,
    T,
    N,
    D,
    TOP_K,
    stride_go,
    stride_src,
    HAS_W: tl.constexpr,
    HAS_GW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
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
            g = tl.load(
                grad_out_ptr + rows.to(tl.int64)[:, None] * stride_go + cols[None, :],
                mask=m,
                other=0.0,
            ).to(tl.float32)
            if HAS_GW:
                v = tl.load(
                    src_ptr + pos[:, None] * stride_src + cols[None, :], mask=m, other=0.0
                ).to(tl.float32)
                dot += tl.sum(g * v, axis=1)
            tl.store(
                grad_src_ptr + pos[:, None] * D + cols[None, :],
                (g * w[:, None]).to(grad_src_ptr.dtype.element_ty),
                mask=m,
            )
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
def _grouped_gemm_kernel(
    a_ptr,
    w_ptr,
    sorted_slot_ptr,
    offsets_ptr,
    tile_expert_ptr,
    tile_row_ptr,
    h_ptr,
    act_ptr,
    N_ROWS,
    K_DIM,
    N_OUT,
    TOP_K,
    TILE_M,
    stride_a,
    stride_we,
    stride_wn,
    stride_h,
    stride_act,
    GATHER: tl.constexpr,
    ACT: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
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


# -----------------------------------------------------------------------------------------------
# Launchers (contract §4-§7 in unif2ace/ops/moe/_torch.py)
# -----------------------------------------------------------------------------------------------


def _launch_rows(
    kernel, rows: int, D: int, t: torch.Tensor, *args, per_column: bool = True, **flags
):
    """Launch a row kernel over ``rows`` rows (and the D columns in blocks when ``per_column``) on
    ``t``'s device, with the row configuration of this process."""
    cfg = _pick_row_config(triton_interpreted())
    grid = (triton.cdiv(rows, cfg.block_r),)
    if per_column:
        grid += (triton.cdiv(D, cfg.block_d),)
    with on_device(t):
        kernel[grid](
            *args, **flags, BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps
        )


def permute(x: torch.Tensor, sorted_slot: torch.Tensor, top_k: int, xs: torch.Tensor) -> None:
    N, D = xs.shape
    if N == 0 or D == 0:
        return
    _launch_rows(_permute_kernel, N, D, x, x, sorted_slot, xs, N, D, top_k, x.stride(0))


def combine(src: torch.Tensor, slot_pos: torch.Tensor, weights, out: torch.Tensor) -> None:
    T, D = out.shape
    N = slot_pos.numel()
    if T == 0 or D == 0:
        return
    w = src if weights is None else weights
    args = (src, slot_pos, w, out, T, N, D, N // T, src.stride(0))
    _launch_rows(_combine_kernel, T, D, src, *args, HAS_W=weights is not None)


def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights) -> None:
    T, D = grad_out.shape
    N = slot_pos.numel()
    if T == 0:
        return
    if grad_out.dtype != src.dtype:
        grad_out = grad_out.to(src.dtype)
    if D > 1 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    w = src if weights is None else weights
    gw = src if grad_weights is None else grad_weights
    args = (grad_out, src, slot_pos, w, grad_src, gw, T, N, D, N // T)
    _launch_rows(
        _combine_bwd_kernel,
        T,
        D,
        src,
        *args,
        grad_out.stride(0),
        src.stride(0),
        per_column=False,
        HAS_W=weights is not None,
        HAS_GW=grad_weights is not None,
    )


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
    with on_device(a):
        _grouped_gemm_kernel[grid](
            a,
            w,
            plan.sorted_slot,
            plan.offsets,
            plan.tile_expert,
            plan.tile_row,
            out,
            ao,
            N,
            w.shape[2],
            n_out,
            plan.top_k,
            plan.block_m,
            a.stride(0),
            w.stride(0),
            w.stride(1),
            out.stride(0),
            ao.stride(0),
            GATHER=gather,
            ACT=code,
            IEEE=a.dtype == torch.float32,
            BLOCK_M=block_m,
            BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k,
            num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )


def experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs) -> None:
    """Contract §7: gathered up projection + fused activation, down projection, weighted combine.
    xs is [0, D] (the backward re-gathers)."""
    N = h.shape[0]
    Fd = w_down.shape[2]
    a = h.new_empty(N, Fd)
    grouped_gemm(x, w_up, plan, h, a, activation, gather=True)
    grouped_gemm(a, w_down, plan, out, gather=False)
    combine(out, plan.slot_pos, weights, y)
