"""Triton kernels of the MaskGIT decode step's sample + confidence (the "scan"), launched by
:func:`unif2ace.triton_kernels.mask_sampling.maskgit_step_fwd`.

Per position (b, l) with logits z over K columns, all in fp32:

    y_k  = ((1 + g)·cond_k − g·uncond_k) · (1/T)            (y_k = cond_k · (1/T) without uncond;
                                                             NaN and +inf count as -inf)
    ŷ    = smallest k maximising y_k + G_k                    (Gumbel-max sample)
    conf = y_ŷ − logsumexp_k y_k + τ·G_choice                 (+inf at known positions)

* ``_maskgit_scan_kernel``: one program per ROWS positions (ROWS = 1 on a GPU) streams the
  columns once in BLOCK_K steps, keeping per lane an online (max, sum e^{y − max}) for the
  log-sum-exp and the running (best y + G, its k, its y) for the argmax; Philox words for four
  columns come from one ``tl.philox`` call (the contract puts k >> 2 in counter word c0 and picks
  word k & 3), interleaved back into column order. Known positions run a zero-trip loop (their
  logits are never read). With ``SPLITS == 1`` it writes token + confidence; with ``SPLITS > 1``
  (few positions, long rows) each program covers one column slice and writes partials that
  ``_maskgit_combine_kernel`` merges (max/sum rescaling, argmax ties to the smaller k).

The scan kernel is compiled with ``enable_fp_fusion=False``: the contract asks for
``(1 + g)·cond − g·uncond`` and ``y + G`` rounded exactly as the reference rounds them (no FMA), so
that with supplied noise the sample equals the reference bit for bit. On the Philox path the
per-column Gumbel uses a branch-free form with two ``lg2.approx`` on a GPU (``FAST_LOG``; exact
logs under the interpreter), within ~3e-6 of the contract's values: the contract allows the Philox
path to differ from the explicit ``philox_noise()`` path at rounding-level near-ties. Precise
libdevice logs (three per column, with the log1p branch) would make the scan compute-bound far
below the memory bandwidth. The per-position choice noise keeps the precise transform.

The block sizes follow the usual rules (4 fp32 values per thread and loop step, a 16-byte load; at
least ~2 programs per SM before splitting over K) and compile for sm_80/sm_90 without spills
(tests/test_triton_aot.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unif2ace.triton_kernels._launch import DEFAULT_NUM_SMS, split_count
from unif2ace.triton_kernels._lse import _online_lse_update
from unif2ace.triton_kernels.mask_sampling_philox import (
    _STREAM_CHOICE,
    _STREAM_SAMPLE,
    _counter3,
    _gumbel_from_bits,
    _sample_gumbel_from_bits,
)

# -----------------------------------------------------------------------------------------------
# Launch configuration
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    """Scan launch: ``rows`` positions per program, ``splits`` column slices per position."""

    block_k: int  # columns per loop step (power of 2, >= 4: Philox words come in fours)
    num_warps: int
    splits: int = 1  # power of 2; > 1 adds the combine kernel
    rows: int = 1  # positions per program (1 on a GPU; more under the interpreter)


# Scan: 4 values per thread and step, one Philox call per thread and step (its four words are
# the thread's four columns) and one 16-byte fp32 load. The scan keeps five running values per
# lane; at 8 values per thread ptxas spilled registers in the bf16/sm_90 and 2048-column
# variants (AOT report), at 4 it does not (figures in docs/results.md).
_VALUES_PER_THREAD = 4
_SCAN_MIN_BLOCK = 128
_SCAN_MAX_BLOCK = 1024
# Split over K while the positions give fewer than this many programs per SM, each split keeping
# at least _SPLIT_MIN_STEPS loop steps; the combine loads SPLITS partials per position.
_SPLIT_BLOCK = 512
_SPLIT_WARPS = 4
_SPLIT_MIN_STEPS = 2
_SPLIT_MAX = 64
_SPLIT_BELOW_PROGRAMS_PER_SM = 2
_COMBINE_ROWS = 16
_COMBINE_WARPS = 4

# Under TRITON_INTERPRET=1 every tl op costs Python overhead per program and a block is one numpy
# array: many positions per program, never split unless a test forces it. Larger tiles
# run faster up to ~2^17 elements per tile, with no gain beyond (figures in docs/results.md).
_INTERPRET_ELEMS = 1 << 17
_INTERPRET_SCAN_BLOCK = 1024
_INTERPRET_MAX_ROWS = 256


def _scan_config(K: int) -> StepConfig:
    block = min(max(triton.next_power_of_2(K), _SCAN_MIN_BLOCK), _SCAN_MAX_BLOCK)
    warps = min(max(block // (32 * _VALUES_PER_THREAD), 1), 8)
    return StepConfig(block_k=block, num_warps=warps)


def _pick_step_config(
    n_pos: int, K: int, dtype: torch.dtype, interpret: bool, num_sms: int = DEFAULT_NUM_SMS
) -> StepConfig:
    """Launch configuration of the scan for ``n_pos = B·L`` positions of K columns."""
    del dtype  # same values per thread for fp32 and 16-bit logits until a GPU says otherwise
    if interpret:
        block = min(max(triton.next_power_of_2(K), 16), _INTERPRET_SCAN_BLOCK)
        rows = min(_INTERPRET_ELEMS // block, triton.next_power_of_2(max(n_pos, 1)))
        return StepConfig(block_k=block, num_warps=4, splits=1, rows=min(rows, _INTERPRET_MAX_ROWS))
    base = _scan_config(K)
    splits = split_count(
        n_pos,
        K,
        num_sms,
        block=_SPLIT_BLOCK,
        min_steps=_SPLIT_MIN_STEPS,
        max_splits=_SPLIT_MAX,
        programs_per_sm=_SPLIT_BELOW_PROGRAMS_PER_SM,
    )
    # Chunks are rounded up to whole blocks: halve until the last split still owns columns.
    while splits > 1 and _split_chunk(K, splits, _SPLIT_BLOCK) * (splits - 1) >= K:
        splits //= 2
    if splits < 2:
        return base
    return StepConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=splits)


def _split_chunk(K: int, splits: int, block: int) -> int:
    """Columns per split: a whole number of blocks (so Philox quads never straddle splits)."""
    return triton.cdiv(triton.cdiv(K, splits), block) * block


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32
_NO_K = tl.constexpr(2147483647)  # "no column yet" in the running argmax


@triton.jit
def _scan_columns(
    logits_ptr,
    uncond_ptr,
    gumbel_ptr,
    cond_rows,  # [ROWS] int64: element offset of each position's column 0 in logits
    unc_rows,  # [ROWS] int64: the same in uncond
    noise_rows,  # [ROWS] int64: the same in gumbel
    b32,  # [ROWS] uint32 Philox counter word: the sequence
    l32,  # [ROWS] uint32 Philox counter word: the position
    active,  # [ROWS] bool: position in range and unknown
    start,  # first column
    stop,  # end of the column range (a zero-trip loop when stop == start)
    c_cond,
    c_uncond,
    inv_temp,
    seed,
    ctr3,
    HAS_UNCOND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    FAST_LOG: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One pass over columns [start, stop): per position (max, Σe^{y−max}, best y+G, its k, its y)."""
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([ROWS, BLOCK_K], -_FLT_MAX, tl.float32)
    s = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    best = tl.full([ROWS, BLOCK_K], float("-inf"), tl.float32)
    kbest = tl.full([ROWS, BLOCK_K], _NO_K, tl.int32)
    ybest = tl.full([ROWS, BLOCK_K], float("-inf"), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        offs = k0 + cols
        cmask = active[:, None] & (offs < stop)[None, :]
        x = tl.load(logits_ptr + (cond_rows[:, None] + offs[None, :]), mask=cmask, other=0.0)
        if HAS_UNCOND:
            u = tl.load(uncond_ptr + (unc_rows[:, None] + offs[None, :]), mask=cmask, other=0.0)
            z = x.to(tl.float32) * c_cond - u.to(tl.float32) * c_uncond
        else:
            z = x.to(tl.float32)
        y = z * inv_temp
        # the contract's non-finite policy: NaN and +inf count as -inf (never sampled)
        y = tl.where(cmask & (tl.abs(y) < float("inf")), y, float("-inf"))
        if HAS_NOISE:
            g = tl.load(gumbel_ptr + (noise_rows[:, None] + offs[None, :]), mask=cmask, other=0.0)
        else:
            # counter (k >> 2, l, b, 4·offset + 1), word k & 3: one Philox call per 4 columns.
            # k0 is a multiple of BLOCK_K (>= 4), so the quads line up with the block.
            quad = (k0 // 4 + tl.arange(0, BLOCK_K // 4)).to(tl.uint32)
            zero = tl.zeros([ROWS, BLOCK_K // 4], dtype=tl.uint32)
            w0, w1, w2, w3 = tl.philox(
                seed, zero + quad[None, :], zero + l32[:, None], zero + b32[:, None], zero + ctr3
            )
            bits = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
            g = _sample_gumbel_from_bits(bits, FAST_LOG)
        score = y + g
        upd = score > best  # strict: a lane keeps its first (smallest) k on ties
        best = tl.where(upd, score, best)
        kbest = tl.where(upd, offs, kbest)
        ybest = tl.where(upd, y, ybest)
        m, s = _online_lse_update(m, s, y)
    m_row = tl.max(m, axis=1)
    s_row = tl.sum(s * tl.exp(m - m_row[:, None]), axis=1)
    b_row = tl.max(best, axis=1)
    k_row = tl.min(tl.where(best == b_row[:, None], kbest, _NO_K), axis=1)
    y_row = tl.max(tl.where(kbest == k_row[:, None], ybest, float("-inf")), axis=1)
    return m_row, s_row, b_row, k_row, y_row


@triton.jit
def _finalize(
    m,
    s,
    k_win,
    y_win,
    known,
    ids_val,
    choice_ptr,
    pos,
    b32,
    l32,
    in_range,
    tau,
    seed,
    offset,
    HAS_CHOICE_NOISE: tl.constexpr,
):
    """(token int64, confidence fp32) of ROWS positions from their merged scan state."""
    if HAS_CHOICE_NOISE:
        gc = tl.load(choice_ptr + pos, mask=in_range, other=0.0)
    else:
        zero = tl.zeros(l32.shape, dtype=tl.uint32)
        w0, _, _, _ = tl.philox(seed, zero, l32, b32, zero + _counter3(offset, _STREAM_CHOICE))
        gc = _gumbel_from_bits(w0)
    # Known / out-of-range rows and rows with no finite y (s = 0, y_win = -inf) get finite
    # stand-ins, replaced below: no log(0) or inf - inf warnings from numpy under the interpreter.
    # (y_win - m) - log(s), not y_win - (m + log s): exact for large m (the C++ kernel's order).
    dead = s == 0.0
    inactive = known | (in_range == 0) | dead
    conf = tl.where(inactive, 0.0, y_win - m) - tl.log(tl.where(inactive, 1.0, s))
    conf = tl.where(tau != 0.0, conf + tau * gc, conf)
    token = tl.where(k_win == _NO_K, 0, k_win).to(tl.int64)  # all scores -inf: token 0
    token = tl.where(known, ids_val, token)
    conf = tl.where(dead, float("-inf"), conf)  # no token has a probability: confidence -inf
    conf = tl.where(known, float("inf"), conf)
    return token, conf


@triton.jit
def _maskgit_scan_kernel(
    logits_ptr,  # [B, L, K] fp32/bf16/fp16, column stride 1
    stride_lb,  # element stride of logits over b
    stride_ll,  # element stride of logits over l
    uncond_ptr,  # [B, L, K] like logits (read only when HAS_UNCOND)
    stride_ub,
    stride_ul,
    ids_ptr,  # [B, L] int64
    gumbel_ptr,  # [B, L, K] fp32 contiguous (read only when HAS_NOISE)
    choice_ptr,  # [B, L] fp32 (read only when HAS_CHOICE_NOISE)
    out_ids_ptr,  # [B, L] int64 out: the sampled token (SPLITS == 1)
    conf_ptr,  # [B, L] fp32 out: confidence (SPLITS == 1)
    part_f_ptr,  # [B·L, SPLITS, 4] fp32 out: (max, sum, best score, y at best) (SPLITS > 1)
    part_k_ptr,  # [B·L, SPLITS] int32 out: k at best (SPLITS > 1)
    n_pos,
    L,
    K,
    chunk,  # columns per split, a multiple of BLOCK_K
    mask_id,
    c_cond,
    c_uncond,
    inv_temp,
    tau,
    seed,
    offset,
    HAS_UNCOND: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HAS_CHOICE_NOISE: tl.constexpr,
    FAST_LOG: tl.constexpr,
    SPLITS: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Grid (cdiv(B·L, ROWS), SPLITS): sample + confidence (or partials) of ROWS positions."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    pos = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_range = pos < n_pos
    ids_val = tl.load(ids_ptr + pos, mask=in_range, other=mask_id)
    known = ids_val != mask_id
    active = in_range & (ids_val == mask_id)
    b = pos // L
    l = pos - b * L  # noqa: E741
    b32 = b.to(tl.uint32)
    l32 = l.to(tl.uint32)
    start = split * chunk
    stop = tl.minimum(start + chunk, K)
    # Known positions never read their logits: the loop runs zero times when none is active.
    stop = tl.where(tl.max(active.to(tl.int32), axis=0) > 0, stop, start)
    m, s, best, k_win, y_win = _scan_columns(
        logits_ptr,
        uncond_ptr,
        gumbel_ptr,
        b * stride_lb + l * stride_ll,
        b * stride_ub + l * stride_ul,
        pos * K,
        b32,
        l32,
        active,
        start,
        stop,
        c_cond,
        c_uncond,
        inv_temp,
        seed,
        _counter3(offset, _STREAM_SAMPLE),
        HAS_UNCOND,
        HAS_NOISE,
        FAST_LOG,
        ROWS,
        BLOCK_K,
    )
    if SPLITS == 1:
        token, conf = _finalize(
            m,
            s,
            k_win,
            y_win,
            known,
            ids_val,
            choice_ptr,
            pos,
            b32,
            l32,
            in_range,
            tau,
            seed,
            offset,
            HAS_CHOICE_NOISE,
        )
        tl.store(out_ids_ptr + pos, token, mask=in_range)
        tl.store(conf_ptr + pos, conf, mask=in_range)
    else:
        part = pos * SPLITS + split
        tl.store(part_f_ptr + part * 4 + 0, m, mask=active)
        tl.store(part_f_ptr + part * 4 + 1, s, mask=active)
        tl.store(part_f_ptr + part * 4 + 2, best, mask=active)
        tl.store(part_f_ptr + part * 4 + 3, y_win, mask=active)
        tl.store(part_k_ptr + part, k_win, mask=active)


@triton.jit
def _maskgit_combine_kernel(
    ids_ptr,
    choice_ptr,
    out_ids_ptr,
    conf_ptr,
    part_f_ptr,  # [B·L, SPLITS, 4] fp32 from the scan (written for unknown positions only)
    part_k_ptr,  # [B·L, SPLITS] int32
    n_pos,
    L,
    mask_id,
    tau,
    seed,
    offset,
    HAS_CHOICE_NOISE: tl.constexpr,
    SPLITS: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Grid (cdiv(B·L, ROWS),): merge the SPLITS partials of ROWS positions, finalise."""
    pos = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    in_range = pos < n_pos
    ids_val = tl.load(ids_ptr + pos, mask=in_range, other=mask_id)
    known = ids_val != mask_id
    active = in_range & (ids_val == mask_id)
    b = pos // L
    l = pos - b * L  # noqa: E741
    part = pos[:, None] * SPLITS + tl.arange(0, SPLITS)[None, :]
    pm = active[:, None]
    m = tl.load(part_f_ptr + part * 4 + 0, mask=pm, other=-_FLT_MAX)
    s = tl.load(part_f_ptr + part * 4 + 1, mask=pm, other=0.0)
    best = tl.load(part_f_ptr + part * 4 + 2, mask=pm, other=float("-inf"))
    yb = tl.load(part_f_ptr + part * 4 + 3, mask=pm, other=float("-inf"))
    kb = tl.load(part_k_ptr + part, mask=pm, other=_NO_K)
    m_row = tl.max(m, axis=1)
    s_row = tl.sum(s * tl.exp(m - m_row[:, None]), axis=1)
    b_row = tl.max(best, axis=1)
    k_row = tl.min(tl.where(best == b_row[:, None], kb, _NO_K), axis=1)
    y_row = tl.max(tl.where(kb == k_row[:, None], yb, float("-inf")), axis=1)
    token, conf = _finalize(
        m_row,
        s_row,
        k_row,
        y_row,
        known,
        ids_val,
        choice_ptr,
        pos,
        b.to(tl.uint32),
        l.to(tl.uint32),
        in_range,
        tau,
        seed,
        offset,
        HAS_CHOICE_NOISE,
    )
    tl.store(out_ids_ptr + pos, token, mask=in_range)
    tl.store(conf_ptr + pos, conf, mask=in_range)
