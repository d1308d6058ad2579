"""Triton kernels of the discrete-diffusion mask sampling ops, and their launchers.

They implement the LAUNCHER CONTRACT in the docstring of
``python/unif2ace/ops/mask_sampling/_torch.py`` (counter layout of the Philox streams, the
Gumbel-from-bits transform, tie rules); the "triton" launchers of that package call
:func:`mask_tokens_fwd` and :func:`maskgit_step_fwd`. The decode step samples a token and a
confidence per position (:mod:`unif2ace.triton_kernels.mask_sampling_step`), then per sequence
re-masks the ``n = clamp(mask_len[b], 0, L)`` positions with the smallest (confidence, l); the
Philox and Gumbel helpers are in :mod:`unif2ace.triton_kernels.mask_sampling_philox`, the compile
jobs in :mod:`unif2ace.triton_kernels.mask_sampling_aot`. This module's kernels:

* ``_select_kernel``: one program per sequence finds the n-th smallest key by bisection on the
  key's bits (32 steps for an order-preserving uint32 of the confidence, 64 for the uint64 Philox
  key of ``mask_tokens``), then masks every key below that threshold plus the first
  ``n − #below`` positions (in l order, an exclusive cumsum) among keys equal to it — exactly the
  lexicographic (key, l) rule. Rows up to BLOCK_L keep the keys in registers; longer rows loop over
  chunks and recompute the keys on every pass.
* ``_bernoulli_kernel``: the elementwise "bernoulli" mode of ``mask_tokens``.

The block sizes compile for sm_80/sm_90 without spills (tests/test_triton_aot.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unif2ace._backend import triton_interpreted
from unif2ace.triton_kernels._launch import device_num_sms, on_tensor_device
from unif2ace.triton_kernels.mask_sampling_philox import _STREAM_MASK, _counter3
from unif2ace.triton_kernels.mask_sampling_step import (
    _COMBINE_ROWS,
    _COMBINE_WARPS,
    StepConfig,
    _maskgit_combine_kernel,
    _maskgit_scan_kernel,
    _pick_step_config,
    _split_chunk,
)

# -----------------------------------------------------------------------------------------------
# Launch configurations
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectConfig:
    """Per-sequence select launch: one program per sequence."""

    block_l: int  # positions held at once (power of 2)
    num_warps: int
    single: bool  # True: the whole row fits (keys stay in registers); False: chunked passes


# Select: a row up to 4096 positions in registers (16 keys per thread at 8 warps); longer rows in
# 4096-position chunks.
_SELECT_MAX_BLOCK = 4096
_SELECT_MIN_BLOCK = 32
# Under TRITON_INTERPRET=1 every tl op costs Python overhead per program: whole rows at once.
_INTERPRET_MAX_BLOCK = 1 << 14


def _pick_select_config(L: int, interpret: bool) -> SelectConfig:
    cap = _INTERPRET_MAX_BLOCK if interpret else _SELECT_MAX_BLOCK
    block = min(max(triton.next_power_of_2(L), _SELECT_MIN_BLOCK), cap)
    warps = 4 if interpret else min(max(block // 512, 1), 8)
    return SelectConfig(block_l=block, num_warps=warps, single=L <= block)


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------


@triton.jit
def _select_keys(conf_ptr, row, b32, offs, valid, seed, offset, KEY_PHILOX: tl.constexpr):
    """Keys of positions ``offs`` of sequence ``row``, ordered as the contract's (key, l) rule.

    Confidence: fp32 mapped to an order-preserving uint32 (−0.0 first turned into +0.0 so the two
    zeros tie, as the float compare says). Philox (mask_tokens "count"): (w0 << 32) | w1 of
    stream 0, counter (0, l, b, 4·offset)."""
    if KEY_PHILOX:
        zero = tl.zeros(offs.shape, dtype=tl.uint32)
        w0, w1, _, _ = tl.philox(
            seed, zero, offs.to(tl.uint32), zero + b32, zero + _counter3(offset, _STREAM_MASK)
        )
        return (w0.to(tl.uint64) << 32) | w1.to(tl.uint64)
    else:
        c = tl.load(conf_ptr + row + offs, mask=valid, other=0.0)
        bits = c.to(tl.uint32, bitcast=True)
        bits = tl.where(bits == 0x80000000, 0, bits)  # −0.0 -> +0.0 (no reliance on x + 0.0)
        return tl.where((bits >> 31) != 0, ~bits, bits | 0x80000000)


@triton.jit
def _select_kernel(
    conf_ptr,  # [B, L] fp32 confidence (KEY_PHILOX == False)
    n_ptr,  # [B] int64: how many positions to mask (clamped to [0, L] here)
    src_ids_ptr,  # [B, L] int64: ids kept where not masked (may be out_ids_ptr itself)
    out_ids_ptr,  # [B, L] int64 out
    out_mask_ptr,  # [B, L] bool out
    L,
    mask_id,
    seed,
    offset,
    KEY_PHILOX: tl.constexpr,
    NBITS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SINGLE: tl.constexpr,
):
    """Grid (B,): mask the n positions with the smallest (key, l) of sequence b.

    Threshold T = the n-th smallest key, built bit by bit from the top: bit i of T is 0 iff at
    least n keys are <= (T with bit i cleared and every lower bit set). Then key < T is masked, and
    among key == T the first n − #(key < T) in l order."""
    bq = tl.program_id(0)
    b32 = bq.to(tl.uint32)
    row = bq.to(tl.int64) * L
    n = tl.minimum(tl.maximum(tl.load(n_ptr + bq), 0), L).to(tl.int32)
    cols = tl.arange(0, BLOCK_L)
    if KEY_PHILOX:
        one = tl.full([], 1, tl.uint64)
        thr = tl.zeros([], dtype=tl.uint64)
    else:
        one = tl.full([], 1, tl.uint32)
        thr = tl.zeros([], dtype=tl.uint32)
    if SINGLE:
        valid = cols < L
        keys = _select_keys(conf_ptr, row, b32, cols, valid, seed, offset, KEY_PHILOX)
        for i in range(NBITS):
            bit = (one << (NBITS - 1 - i)).to(thr.dtype)
            cand = thr | (bit - 1)
            cnt = tl.sum((valid & (keys <= cand)).to(tl.int32), axis=0)
            thr = tl.where(cnt >= n, thr, thr | bit)
        below = valid & (keys < thr)
        eq = valid & (keys == thr)
        need = n - tl.sum(below.to(tl.int32), axis=0)
        rank = tl.cumsum(eq.to(tl.int32), axis=0) - eq.to(tl.int32)
        sel = below | (eq & (rank < need))
        ids = tl.load(src_ids_ptr + row + cols, mask=valid, other=0)
        tl.store(out_ids_ptr + row + cols, tl.where(sel, mask_id, ids), mask=valid)
        tl.store(out_mask_ptr + row + cols, sel, mask=valid)
    else:
        for i in range(NBITS):
            bit = (one << (NBITS - 1 - i)).to(thr.dtype)
            cand = thr | (bit - 1)
            cnt = tl.zeros([], dtype=tl.int32)
            for l0 in range(0, L, BLOCK_L):
                offs = l0 + cols
                valid = offs < L
                keys = _select_keys(conf_ptr, row, b32, offs, valid, seed, offset, KEY_PHILOX)
                cnt += tl.sum((valid & (keys <= cand)).to(tl.int32), axis=0)
            thr = tl.where(cnt >= n, thr, thr | bit)
        n_below = tl.zeros([], dtype=tl.int32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + cols
            valid = offs < L
            keys = _select_keys(conf_ptr, row, b32, offs, valid, seed, offset, KEY_PHILOX)
            n_below += tl.sum((valid & (keys < thr)).to(tl.int32), axis=0)
        need = n - n_below
        eq_before = tl.zeros([], dtype=tl.int32)  # keys == thr at positions < l0
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + cols
            valid = offs < L
            keys = _select_keys(conf_ptr, row, b32, offs, valid, seed, offset, KEY_PHILOX)
            below = valid & (keys < thr)
            eq = valid & (keys == thr)
            rank = eq_before + tl.cumsum(eq.to(tl.int32), axis=0) - eq.to(tl.int32)
            sel = below | (eq & (rank < need))
            eq_before += tl.sum(eq.to(tl.int32), axis=0)
            ids = tl.load(src_ids_ptr + row + offs, mask=valid, other=0)
            tl.store(out_ids_ptr + row + offs, tl.where(sel, mask_id, ids), mask=valid)
            tl.store(out_mask_ptr + row + offs, sel, mask=valid)


@triton.jit
def _bernoulli_kernel(
    ids_ptr,
    gamma_ptr,
    out_ids_ptr,
    out_mask_ptr,
    L,
    mask_id,
    seed,
    offset,
    BLOCK_L: tl.constexpr,
):
    """Grid (B, cdiv(L, BLOCK_L)): masked iff float32(w0 >> 8) < γ_b·2^24 (stream 0, word w0)."""
    bq = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = offs < L
    row = bq.to(tl.int64) * L
    zero = tl.zeros([BLOCK_L], dtype=tl.uint32)
    w0, _, _, _ = tl.philox(
        seed,
        zero,
        offs.to(tl.uint32),
        zero + bq.to(tl.uint32),
        zero + _counter3(offset, _STREAM_MASK),
    )
    gamma = tl.load(gamma_ptr + bq)
    sel = (w0 >> 8).to(tl.int32).to(tl.float32) < gamma * 16777216.0
    ids = tl.load(ids_ptr + row + offs, mask=valid, other=0)
    tl.store(out_ids_ptr + row + offs, tl.where(sel, mask_id, ids), mask=valid)
    tl.store(out_mask_ptr + row + offs, sel, mask=valid)


# -----------------------------------------------------------------------------------------------
# Launchers (the contract's tensor-level signatures; outputs written in place, no host sync)
# -----------------------------------------------------------------------------------------------

_BERNOULLI_BLOCK = 1024
_BERNOULLI_WARPS = 4


def _launch_select(
    conf,
    n,
    src_ids,
    out_ids,
    out_mask,
    L,
    mask_id,
    seed,
    offset,
    key_philox,
    config: SelectConfig | None,
) -> None:
    B = n.shape[0]
    if config is None:
        config = _pick_select_config(L, triton_interpreted())
    _select_kernel[(B,)](
        conf,
        n,
        src_ids,
        out_ids,
        out_mask,
        L,
        int(mask_id),
        int(seed),
        int(offset),
        KEY_PHILOX=key_philox,
        NBITS=64 if key_philox else 32,
        BLOCK_L=config.block_l,
        SINGLE=config.single,
        num_warps=config.num_warps,
    )


@on_tensor_device
def mask_tokens_fwd(
    ids: torch.Tensor,
    gamma: torch.Tensor,
    n_mask: torch.Tensor,
    mask_id: int,
    seed: int,
    offset: int,
    mode: int,
    out_ids: torch.Tensor,
    out_mask: torch.Tensor,
    *,
    select_config: SelectConfig | None = None,
) -> None:
    """Training-time masking (launcher contract in unif2ace.ops.mask_sampling._torch).

    ids int64 [B, L]; gamma fp32 [B] (mode 1); n_mask int64 [B] (mode 0); out_ids int64 [B, L],
    out_mask bool [B, L], all contiguous. mode 0 ("count"): the clamp(n_mask[b], 0, L) positions
    with the smallest (Philox key, l); mode 1 ("bernoulli"): float32(w0 >> 8) < γ·2^24.
    ``select_config`` forces the select launch (tests).
    """
    B, L = ids.shape
    if B == 0 or L == 0:
        return
    if mode == 0:
        _launch_select(
            out_ids, n_mask, ids, out_ids, out_mask, L, mask_id, seed, offset, True, select_config
        )
    elif mode == 1:
        _bernoulli_kernel[(B, triton.cdiv(L, _BERNOULLI_BLOCK))](
            ids,
            gamma,
            out_ids,
            out_mask,
            L,
            int(mask_id),
            int(seed),
            int(offset),
            BLOCK_L=_BERNOULLI_BLOCK,
            num_warps=_BERNOULLI_WARPS,
        )
    else:
        raise ValueError(f"mask_tokens_fwd: mode must be 0 (count) or 1 (bernoulli), got {mode}")


@on_tensor_device
def maskgit_step_fwd(
    logits: torch.Tensor,
    uncond: torch.Tensor | None,
    ids: torch.Tensor,
    mask_len: torch.Tensor,
    mask_id: int,
    guidance: float,
    inv_temperature: float,
    choice_temperature: float,
    seed: int,
    offset: int,
    gumbel_noise: torch.Tensor | None,
    choice_noise: torch.Tensor | None,
    out_ids: torch.Tensor,
    out_mask: torch.Tensor,
    confidence: torch.Tensor,
    *,
    config: StepConfig | None = None,
    select_config: SelectConfig | None = None,
) -> None:
    """One MaskGIT decode step (launcher contract in unif2ace.ops.mask_sampling._torch).

    logits / uncond [B, L, K] (stride(2) == 1, any b/l strides), ids int64 [B, L], mask_len int64
    [B], gumbel_noise fp32 [B, L, K] or None, choice_noise fp32 [B, L] or None; writes out_ids,
    out_mask and confidence ([B, L], contiguous). Three launches at most (scan, combine when split
    over K, select); the only allocation is the split partials. ``config`` / ``select_config``
    force a launch configuration (tests).
    """
    B, L, K = logits.shape
    n_pos = B * L
    if n_pos == 0:
        return
    interpret = triton_interpreted()
    if config is None:
        config = _pick_step_config(n_pos, K, logits.dtype, interpret, device_num_sms(logits))
    has_uncond = uncond is not None
    unc = uncond if has_uncond else logits
    splits, block, rows = config.splits, config.block_k, config.rows
    chunk = _split_chunk(K, splits, block)
    if splits > 1:
        part_f = torch.empty((n_pos, splits, 4), dtype=torch.float32, device=logits.device)
        part_k = torch.empty((n_pos, splits), dtype=torch.int32, device=logits.device)
    else:
        part_f, part_k = confidence, confidence  # never touched
    # Scalars as the reference rounds them: fp32 (1 + g) and g, fp32 1/T, fp32 τ.
    g = float(guidance)
    compile_opts = {} if interpret else {"enable_fp_fusion": False}
    choice = choice_noise if choice_noise is not None else confidence
    # The per-position outputs and per-split partials that the scan writes and the combine merges.
    positions = (out_ids, confidence, part_f, part_k, n_pos, L)
    _maskgit_scan_kernel[(triton.cdiv(n_pos, rows), splits)](
        logits,
        logits.stride(0),
        logits.stride(1),
        unc,
        unc.stride(0),
        unc.stride(1),
        ids,
        gumbel_noise if gumbel_noise is not None else confidence,
        choice,
        *positions,
        K,
        chunk,
        int(mask_id),
        1.0 + g,
        g,
        float(inv_temperature),
        float(choice_temperature),
        int(seed),
        int(offset),
        HAS_UNCOND=has_uncond,
        HAS_NOISE=gumbel_noise is not None,
        HAS_CHOICE_NOISE=choice_noise is not None,
        FAST_LOG=not interpret,
        SPLITS=splits,
        ROWS=rows,
        BLOCK_K=block,
        num_warps=config.num_warps,
        **compile_opts,
    )
    if splits > 1:
        crows = _COMBINE_ROWS if not interpret else max(1, min(256, 4096 // splits))
        _maskgit_combine_kernel[(triton.cdiv(n_pos, crows),)](
            ids,
            choice,
            *positions,
            int(mask_id),
            float(choice_temperature),
            int(seed),
            int(offset),
            HAS_CHOICE_NOISE=choice_noise is not None,
            SPLITS=splits,
            ROWS=crows,
            num_warps=_COMBINE_WARPS,
            **compile_opts,
        )
    _launch_select(
        confidence,
        mask_len,
        out_ids,
        out_ids,
        out_mask,
        L,
        mask_id,
        seed,
        offset,
        False,
        select_config,
    )
