"""Triton kernels of the discrete-diffusion mask sampling ops (shared/DESIGN.md §5).

They implement the LAUNCHER CONTRACT at the top of ``python/unif2ace/ops/mask_sampling.py``
(counter layout of the Philox streams, the Gumbel-from-bits transform, tie rules); the public ops
there call :func:`mask_tokens_fwd` and :func:`maskgit_step_fwd`.

Decode step, per position (b, l) with logits z over K columns, all in fp32:

    y_k  = ((1 + g)·cond_k − g·uncond_k) · (1/T)            (y_k = cond_k · (1/T) without uncond)
    ŷ    = smallest k maximising y_k + G_k                    (Gumbel-max sample)
    conf = y_ŷ − logsumexp_k y_k + τ·G_choice                 (+inf at known positions)

then per sequence the ``n = clamp(mask_len[b], 0, L)`` positions with the smallest
(confidence, l) are re-masked. Three kernels:

* ``_maskgit_scan_kernel``: one program per ROWS positions (ROWS = 1 on a GPU) streams the
  columns once in BLOCK_K steps, keeping per lane an online (max, sum e^{y − max}) for the
  log-sum-exp and the running (best y + G, its k, its y) for the argmax; Philox words for four
  columns come from one ``tl.philox`` call (the contract puts k >> 2 in counter word c0 and picks
  word k & 3), interleaved back into column order. Known positions run a zero-trip loop (their
  logits are never read). With ``SPLITS == 1`` it writes token + confidence; with ``SPLITS > 1``
  (few positions, long rows) each program covers one column slice and writes partials that
  ``_maskgit_combine_kernel`` merges (max/sum rescaling, argmax ties to the smaller k).
* ``_select_kernel``: one program per sequence finds the n-th smallest key by bisection on the
  key's bits (32 steps for an order-preserving uint32 of the confidence, 64 for the uint64 Philox
  key of ``mask_tokens``), then masks every key below that threshold plus the first
  ``n − #below`` positions (in l order, an exclusive cumsum) among keys equal to it — exactly the
  lexicographic (key, l) rule. Rows up to BLOCK_L keep the keys in registers; longer rows loop over
  chunks and recompute the keys on every pass.
* ``_bernoulli_kernel``: the elementwise "bernoulli" mode of ``mask_tokens``.

The scan kernel is compiled with ``enable_fp_fusion=False``: the contract asks for
``(1 + g)·cond − g·uncond`` and ``y + G`` rounded exactly as the reference rounds them (no FMA), so
that with supplied noise the sample equals the reference bit for bit. On the Philox path the
per-column Gumbel uses a branch-free form with two ``lg2.approx`` on a GPU (``FAST_LOG``; exact
logs under the interpreter), within ~3e-6 of the contract's values: the contract allows the Philox
path to differ from the explicit ``philox_noise()`` path at rounding-level near-ties. Precise
libdevice logs (three per column, with the log1p branch) would make the scan compute-bound far
below the memory bandwidth. The per-position choice noise keeps the precise transform.

No GPU has run these kernels yet (none on the machines that wrote them); the block sizes follow the
usual rules (4 fp32 values per thread and loop step, a 16-byte load; at least ~2 programs per SM
before splitting over K) and compile for sm_80/sm_90 without spills (tests/test_triton_aot.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# -----------------------------------------------------------------------------------------------
# Launch configurations (data, not constants scattered through the code)
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepConfig:
    """Scan launch: ``rows`` positions per program, ``splits`` column slices per position."""

    block_k: int  # columns per loop step (power of 2, >= 4: Philox words come in fours)
    num_warps: int
    splits: int = 1  # power of 2; > 1 adds the combine kernel
    rows: int = 1  # positions per program (1 on a GPU; more under the interpreter)


@dataclass(frozen=True)
class SelectConfig:
    """Per-sequence select launch: one program per sequence."""

    block_l: int  # positions held at once (power of 2)
    num_warps: int
    single: bool  # True: the whole row fits (keys stay in registers); False: chunked passes


# Scan: 4 values per thread and step, one Philox call per thread and step (its four words are
# the thread's four columns) and one 16-byte fp32 load. The scan keeps five running values per
# lane; at 8 values per thread ptxas needed 128-140 registers and spilled 4-8 bytes in the
# bf16/sm_90 and 2048-column variants (AOT report, triton 3.9), at 4 it needs ~64-70.
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

# Select: a row up to 4096 positions in registers (16 keys per thread at 8 warps); longer rows in
# 4096-position chunks.
_SELECT_MAX_BLOCK = 4096
_SELECT_MIN_BLOCK = 32

# Under TRITON_INTERPRET=1 every tl op costs Python overhead per program and a block is one numpy
# array: many positions per program, never split unless a test forces it. Measured on the 2-core
# dev machine (B·L = 128, K = 8192, guidance, Philox): tiles of 4 x 8192 took 3.4 s, 32 x 8192
# 1.2 s, 128 x 1024 0.6-0.7 s (no gain beyond ~2^17 elements per tile).
_INTERPRET_ELEMS = 1 << 17
_INTERPRET_SCAN_BLOCK = 1024
_INTERPRET_MAX_ROWS = 256
_INTERPRET_MAX_BLOCK = 1 << 14  # select: whole rows

_DEFAULT_NUM_SMS = 132  # H100 SXM; the launcher passes the real count of the tensor's device


def _scan_config(K: int) -> StepConfig:
    block = min(max(triton.next_power_of_2(K), _SCAN_MIN_BLOCK), _SCAN_MAX_BLOCK)
    warps = min(max(block // (32 * _VALUES_PER_THREAD), 1), 8)
    return StepConfig(block_k=block, num_warps=warps)


def _pick_step_config(
    n_pos: int, K: int, dtype: torch.dtype, interpret: bool, num_sms: int = _DEFAULT_NUM_SMS
) -> StepConfig:
    """Launch configuration of the scan for ``n_pos = B·L`` positions of K columns."""
    del dtype  # same values per thread for fp32 and 16-bit logits until a GPU says otherwise
    if interpret:
        block = min(max(triton.next_power_of_2(K), 16), _INTERPRET_SCAN_BLOCK)
        rows = min(_INTERPRET_ELEMS // block, triton.next_power_of_2(max(n_pos, 1)))
        return StepConfig(block_k=block, num_warps=4, splits=1, rows=min(rows, _INTERPRET_MAX_ROWS))
    base = _scan_config(K)
    want = _SPLIT_BELOW_PROGRAMS_PER_SM * num_sms
    if n_pos >= want:
        return base
    max_splits = K // (_SPLIT_MIN_STEPS * _SPLIT_BLOCK)
    if max_splits < 2:
        return base
    splits = min(triton.next_power_of_2(triton.cdiv(want, max(n_pos, 1))), _SPLIT_MAX)
    splits = min(splits, 1 << (max_splits.bit_length() - 1))  # largest power of 2 <= max_splits
    # Chunks are rounded up to whole blocks: halve until the last split still owns columns.
    while splits > 1 and _split_chunk(K, splits, _SPLIT_BLOCK) * (splits - 1) >= K:
        splits //= 2
    if splits < 2:
        return base
    return StepConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=splits)


def _split_chunk(K: int, splits: int, block: int) -> int:
    """Columns per split: a whole number of blocks (so Philox quads never straddle splits)."""
    return triton.cdiv(triton.cdiv(K, splits), block) * block


def _pick_select_config(L: int, interpret: bool) -> SelectConfig:
    cap = _INTERPRET_MAX_BLOCK if interpret else _SELECT_MAX_BLOCK
    block = min(max(triton.next_power_of_2(L), _SELECT_MIN_BLOCK), cap)
    warps = 4 if interpret else min(max(block // 512, 1), 8)
    return SelectConfig(block_l=block, num_warps=warps, single=L <= block)


def _scan_configs() -> list[StepConfig]:
    out, block = [], _SCAN_MIN_BLOCK
    while block <= _SCAN_MAX_BLOCK:
        out.append(_scan_config(block))
        block *= 2
    out += [
        StepConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=1 << i)
        for i in range(1, _SPLIT_MAX.bit_length())
    ]
    return out


def _select_configs() -> list[SelectConfig]:
    out, block = [], _SELECT_MIN_BLOCK
    while block <= _SELECT_MAX_BLOCK:
        out.append(_pick_select_config(block, interpret=False))
        block *= 2
    out.append(_pick_select_config(_SELECT_MAX_BLOCK + 1, interpret=False))  # chunked
    return out


AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def aot_configs() -> Iterator[tuple[str, object, torch.dtype | None]]:
    """Every (kernel family, configuration, logits dtype) a GPU launch can pick.

    ``("scan", StepConfig, dtype)`` (the combine kernel rides along with each split count),
    ``("select", SelectConfig, None)`` and ``("bernoulli", None, None)``.
    """
    for cfg in _scan_configs():
        for dtype in AOT_DTYPES:
            yield "scan", cfg, dtype
    for cfg in _select_configs():
        yield "select", cfg, None
    yield "bernoulli", None, None


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32
_NO_K = tl.constexpr(2147483647)  # "no column yet" in the running argmax
_STREAM_MASK = tl.constexpr(0)
_STREAM_SAMPLE = tl.constexpr(1)
_STREAM_CHOICE = tl.constexpr(2)


@triton.jit
def _counter3(offset, stream: tl.constexpr):
    """Philox counter word c3 = 4·offset + stream (offset < 2^30, so it fits 32 bits). to_tensor:
    the JIT passes an integer argument equal to 1 as a constexpr."""
    return tl.to_tensor(offset).to(tl.uint32) * 4 + stream


@triton.jit
def _gumbel_from_bits(x):
    """Gumbel(0, 1) from 32 random bits, both tails kept (contract: csrc/include/unif2ace/philox.h).

    t = (float(x & 0x7fffffff) + 0.5)·2^-32 ∈ (0, 1/2); E = −log t when the top bit is clear, else
    E = −log1p(−t), evaluated as Goldberg's log(v)·t/(1 − v) with v = 1 − t rounded (exact to a
    few ulp with a correctly rounded log; E = t when v rounds to 1); G = −log E.
    """
    hi = (x >> 31) != 0
    t = ((x & 0x7FFFFFFF).to(tl.int32).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    v = tl.where(hi, 1.0 - t, t)
    lv = tl.log(v)
    d = 1.0 - v  # exact (Sterbenz); > 0 in the top branch unless t < 2^-25
    e_hi = tl.where(d == 0.0, t, tl.div_rn(-lv * t, tl.where(d == 0.0, 1.0, d)))
    e = tl.where(hi, e_hi, -lv)
    return -tl.log(e)


@triton.jit
def _log_fast(x, FAST_LOG: tl.constexpr):
    """ln x: one MUFU lg2.approx on a GPU (FAST_LOG), tl.log (libdevice logf, ~20 instructions)
    otherwise (the interpreter cannot run inline PTX)."""
    if FAST_LOG:
        lg2 = tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
        return lg2 * 0.6931471805599453
    else:
        return tl.log(x)


@triton.jit
def _sample_gumbel_from_bits(x, FAST_LOG: tl.constexpr):
    """The contract's Gumbel of 32 bits in the fast, branch-free form of the sampling race (same as
    fast_gumbel_from_bits in csrc/cuda/mask_sampling.cu): top bit set, E = −log1p(−t) by its series
    below t = 1/8 (8 terms, truncation < 2^-22 relative) else −log(1 − t); top bit clear, E = −log t;
    G = −log E. With exact logs (interpreter) G is within 1e-6 of the contract's; with lg2.approx
    within ~3e-6: the Philox path may then differ from the explicit philox_noise() path only at
    near-ties, as the contract allows. Two logs per column instead of three precise ones."""
    hi = (x >> 31) != 0
    t = ((x & 0x7FFFFFFF).to(tl.int32).to(tl.float32) + 0.5) * 2.3283064365386963e-10
    series = 0.125
    series = series * t + (1.0 / 7.0)
    series = series * t + (1.0 / 6.0)
    series = series * t + 0.2
    series = series * t + 0.25
    series = series * t + (1.0 / 3.0)
    series = series * t + 0.5
    series = (series * t + 1.0) * t
    e_log = -_log_fast(tl.where(hi, 1.0 - t, t), FAST_LOG)
    e = tl.where(hi & (t < 0.125), series, e_log)
    return -_log_fast(e, FAST_LOG)


@triton.jit
def _online_lse_update(m, s, x):
    """Per-lane online log-sum-exp: s counts Σ e^{x_i − m}; one exp per element (see d3diff_loss).
    m starts at −FLT_MAX so a masked x = −inf adds e^{−inf} = 0."""
    d = x - m
    e = tl.exp(-tl.abs(d))
    up = d > 0.0
    s = tl.where(up, s * e + 1.0, s + e)
    m = tl.where(up, x, m)
    return m, s


@triton.jit
def _scan_columns(
    logits_ptr, uncond_ptr, gumbel_ptr,
    cond_rows, unc_rows, noise_rows,  # [ROWS] int64 element offsets of each position's column 0
    b32, l32,  # [ROWS] uint32 Philox counter words (sequence, position)
    active,  # [ROWS] bool: position in range and unknown
    start, stop,  # column range (a zero-trip loop when stop == start)
    c_cond, c_uncond, inv_temp, seed, ctr3,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, FAST_LOG: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
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
        y = tl.where(cmask, z * inv_temp, float("-inf"))
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
    m, s, k_win, y_win, known, ids_val, choice_ptr, pos, b32, l32, in_range, tau, seed, offset,
    HAS_CHOICE_NOISE: tl.constexpr,
):  # fmt: skip
    """(token int64, confidence fp32) of ROWS positions from their merged scan state."""
    if HAS_CHOICE_NOISE:
        gc = tl.load(choice_ptr + pos, mask=in_range, other=0.0)
    else:
        zero = tl.zeros(l32.shape, dtype=tl.uint32)
        w0, _, _, _ = tl.philox(seed, zero, l32, b32, zero + _counter3(offset, _STREAM_CHOICE))
        gc = _gumbel_from_bits(w0)
    # Known / out-of-range rows (s = 0, y_win = -inf) get finite stand-ins, replaced below: no
    # log(0) or inf - inf warnings from numpy under the interpreter.
    inactive = known | (in_range == 0)
    lse = m + tl.log(tl.where(inactive, 1.0, s))
    conf = tl.where(inactive, 0.0, y_win) - lse
    conf = tl.where(tau != 0.0, conf + tau * gc, conf)
    token = tl.where(k_win == _NO_K, 0, k_win).to(tl.int64)  # all scores -inf: argmax is 0
    token = tl.where(known, ids_val, token)
    conf = tl.where(known, float("inf"), conf)
    return token, conf


@triton.jit
def _maskgit_scan_kernel(
    logits_ptr,  # [B, L, K] fp32/bf16/fp16, column stride 1
    stride_lb, stride_ll,  # element strides of logits over b and l
    uncond_ptr,  # [B, L, K] like logits (read only when HAS_UNCOND)
    stride_ub, stride_ul,
    ids_ptr,  # [B, L] int64
    gumbel_ptr,  # [B, L, K] fp32 contiguous (read only when HAS_NOISE)
    choice_ptr,  # [B, L] fp32 (read only when HAS_CHOICE_NOISE)
    out_ids_ptr,  # [B, L] int64 out: the sampled token (SPLITS == 1)
    conf_ptr,  # [B, L] fp32 out: confidence (SPLITS == 1)
    part_f_ptr,  # [B·L, SPLITS, 4] fp32 out: (max, sum, best score, y at best) (SPLITS > 1)
    part_k_ptr,  # [B·L, SPLITS] int32 out: k at best (SPLITS > 1)
    n_pos, L, K,
    chunk,  # columns per split, a multiple of BLOCK_K
    mask_id, c_cond, c_uncond, inv_temp, tau, seed, offset,
    HAS_UNCOND: tl.constexpr, HAS_NOISE: tl.constexpr, HAS_CHOICE_NOISE: tl.constexpr,
    FAST_LOG: tl.constexpr, SPLITS: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
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
        logits_ptr, uncond_ptr, gumbel_ptr,
        b * stride_lb + l * stride_ll, b * stride_ub + l * stride_ul, pos * K,
        b32, l32, active, start, stop,
        c_cond, c_uncond, inv_temp, seed, _counter3(offset, _STREAM_SAMPLE),
        HAS_UNCOND, HAS_NOISE, FAST_LOG, ROWS, BLOCK_K,
    )  # fmt: skip
    if SPLITS == 1:
        token, conf = _finalize(
            m, s, k_win, y_win, known, ids_val, choice_ptr, pos, b32, l32, in_range, tau, seed,
            offset, HAS_CHOICE_NOISE,
        )  # fmt: skip
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
    ids_ptr, choice_ptr, out_ids_ptr, conf_ptr,
    part_f_ptr,  # [B·L, SPLITS, 4] fp32 from the scan (written for unknown positions only)
    part_k_ptr,  # [B·L, SPLITS] int32
    n_pos, L, mask_id, tau, seed, offset,
    HAS_CHOICE_NOISE: tl.constexpr, SPLITS: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
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
        m_row, s_row, k_row, y_row, known, ids_val, choice_ptr, pos, b.to(tl.uint32),
        l.to(tl.uint32), in_range, tau, seed, offset, HAS_CHOICE_NOISE,
    )  # fmt: skip
    tl.store(out_ids_ptr + pos, token, mask=in_range)
    tl.store(conf_ptr + pos, conf, mask=in_range)


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
    L, mask_id, seed, offset,
    KEY_PHILOX: tl.constexpr, NBITS: tl.constexpr, BLOCK_L: tl.constexpr, SINGLE: tl.constexpr,
):  # fmt: skip
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
    ids_ptr, gamma_ptr, out_ids_ptr, out_mask_ptr, L, mask_id, seed, offset,
    BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Grid (B, cdiv(L, BLOCK_L)): masked iff float32(w0 >> 8) < γ_b·2^24 (stream 0, word w0)."""
    bq = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    valid = offs < L
    row = bq.to(tl.int64) * L
    zero = tl.zeros([BLOCK_L], dtype=tl.uint32)
    w0, _, _, _ = tl.philox(
        seed, zero, offs.to(tl.uint32), zero + bq.to(tl.uint32),
        zero + _counter3(offset, _STREAM_MASK),
    )  # fmt: skip
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


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_select(conf, n, src_ids, out_ids, out_mask, L, mask_id, seed, offset, key_philox,
                   config: SelectConfig | None) -> None:  # fmt: skip
    B = n.shape[0]
    if config is None:
        config = _pick_select_config(L, _interpreted())
    _select_kernel[(B,)](
        conf, n, src_ids, out_ids, out_mask, L, int(mask_id), int(seed), int(offset),
        KEY_PHILOX=key_philox, NBITS=64 if key_philox else 32, BLOCK_L=config.block_l,
        SINGLE=config.single, num_warps=config.num_warps,
    )  # fmt: skip


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
    """Training-time masking (launcher contract in unif2ace.ops.mask_sampling).

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
            ids, gamma, out_ids, out_mask, L, int(mask_id), int(seed), int(offset),
            BLOCK_L=_BERNOULLI_BLOCK, num_warps=_BERNOULLI_WARPS,
        )  # fmt: skip
    else:
        raise ValueError(f"mask_tokens_fwd: mode must be 0 (count) or 1 (bernoulli), got {mode}")


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
    """One MaskGIT decode step (launcher contract in unif2ace.ops.mask_sampling).

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
    interpret = _interpreted()
    if config is None:
        num_sms = _DEFAULT_NUM_SMS
        if logits.is_cuda:
            num_sms = _num_sms(logits.device.index or torch.cuda.current_device())
        config = _pick_step_config(n_pos, K, logits.dtype, interpret, num_sms)
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
    _maskgit_scan_kernel[(triton.cdiv(n_pos, rows), splits)](
        logits, logits.stride(0), logits.stride(1), unc, unc.stride(0), unc.stride(1),
        ids, gumbel_noise if gumbel_noise is not None else confidence,
        choice_noise if choice_noise is not None else confidence,
        out_ids, confidence, part_f, part_k,
        n_pos, L, K, chunk, int(mask_id), 1.0 + g, g, float(inv_temperature),
        float(choice_temperature), int(seed), int(offset),
        HAS_UNCOND=has_uncond, HAS_NOISE=gumbel_noise is not None,
        HAS_CHOICE_NOISE=choice_noise is not None, FAST_LOG=not interpret, SPLITS=splits,
        ROWS=rows, BLOCK_K=block, num_warps=config.num_warps, **compile_opts,
    )  # fmt: skip
    if splits > 1:
        crows = _COMBINE_ROWS if not interpret else max(1, min(256, 4096 // splits))
        _maskgit_combine_kernel[(triton.cdiv(n_pos, crows),)](
            ids, choice_noise if choice_noise is not None else confidence, out_ids, confidence,
            part_f, part_k, n_pos, L, int(mask_id), float(choice_temperature), int(seed),
            int(offset), HAS_CHOICE_NOISE=choice_noise is not None, SPLITS=splits, ROWS=crows,
            num_warps=_COMBINE_WARPS, **compile_opts,
        )  # fmt: skip
    _launch_select(
        confidence, mask_len, out_ids, out_ids, out_mask, L, mask_id, seed, offset, False,
        select_config,
    )  # fmt: skip


# -----------------------------------------------------------------------------------------------
# Ahead-of-time compile jobs (unif2ace.triton_kernels.aot, tests/test_triton_aot.py)
# -----------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

# Integer scalars as the JIT specialises them for ordinary sizes (< 2^31: i32); the seed as i64
# (random 63-bit seeds; the full set adds i32 seeds).
_SCAN_SIG = {
    "stride_lb": "i32", "stride_ll": "i32", "stride_ub": "i32", "stride_ul": "i32",
    "ids_ptr": "*i64", "gumbel_ptr": "*fp32", "choice_ptr": "*fp32", "out_ids_ptr": "*i64",
    "conf_ptr": "*fp32", "part_f_ptr": "*fp32", "part_k_ptr": "*i32", "n_pos": "i32", "L": "i32",
    "K": "i32", "chunk": "i32", "mask_id": "i32", "c_cond": "fp32", "c_uncond": "fp32",
    "inv_temp": "fp32", "tau": "fp32", "seed": "i64", "offset": "i32",
}  # fmt: skip
_COMBINE_SIG = {
    "ids_ptr": "*i64", "choice_ptr": "*fp32", "out_ids_ptr": "*i64", "conf_ptr": "*fp32",
    "part_f_ptr": "*fp32", "part_k_ptr": "*i32", "n_pos": "i32", "L": "i32", "mask_id": "i32",
    "tau": "fp32", "seed": "i64", "offset": "i32",
}  # fmt: skip
_SELECT_SIG = {
    "conf_ptr": "*fp32", "n_ptr": "*i64", "src_ids_ptr": "*i64", "out_ids_ptr": "*i64",
    "out_mask_ptr": "*i1", "L": "i32", "mask_id": "i32", "seed": "i64", "offset": "i32",
}  # fmt: skip
_BERNOULLI_SIG = {
    "ids_ptr": "*i64", "gamma_ptr": "*fp32", "out_ids_ptr": "*i64", "out_mask_ptr": "*i1",
    "L": "i32", "mask_id": "i32", "seed": "i64", "offset": "i32",
}  # fmt: skip
# Fresh torch allocations are 16-byte aligned; a logits view at an odd column is not (unaligned
# variant: the logits/uncond pointers and strides lose it).
_ALIGNED_ARGS = (
    "logits_ptr", "uncond_ptr", "stride_lb", "stride_ll", "stride_ub", "stride_ul", "K", "chunk",
    "ids_ptr", "gumbel_ptr", "choice_ptr", "out_ids_ptr", "conf_ptr", "part_f_ptr", "part_k_ptr",
    "conf_ptr", "n_ptr", "src_ids_ptr", "out_mask_ptr", "gamma_ptr",
)  # fmt: skip
_UNALIGNED_ARGS = tuple(
    a for a in _ALIGNED_ARGS
    if a not in ("logits_ptr", "uncond_ptr", "stride_lb", "stride_ll", "stride_ub", "stride_ul")
)  # fmt: skip


def _scan_spec(AotSpec, cfg: StepConfig, dt: str, flags: tuple, aligned: bool, seed_t: str):
    has_u, has_n, has_c = flags
    tag = f"{dt}-bk{cfg.block_k}-w{cfg.num_warps}-s{cfg.splits}" + ("" if aligned else "-unaligned")
    tag += f"-u{int(has_u)}n{int(has_n)}c{int(has_c)}" + ("" if seed_t == "i64" else "-seed32")
    return AotSpec(
        name=f"_maskgit_scan_kernel[{tag}]",
        kernel=_maskgit_scan_kernel,
        signature={
            "logits_ptr": "*" + dt,
            "uncond_ptr": "*" + dt,
            **_SCAN_SIG,
            "seed": seed_t,
            "HAS_UNCOND": "constexpr",
            "HAS_NOISE": "constexpr",
            "HAS_CHOICE_NOISE": "constexpr",
            "FAST_LOG": "constexpr",
            "SPLITS": "constexpr",
            "ROWS": "constexpr",
            "BLOCK_K": "constexpr",
        },  # fmt: skip
        constexprs={
            "HAS_UNCOND": has_u,
            "HAS_NOISE": has_n,
            "HAS_CHOICE_NOISE": has_c,
            "FAST_LOG": True,
            "SPLITS": cfg.splits,
            "ROWS": cfg.rows,
            "BLOCK_K": cfg.block_k,
        },  # fmt: skip
        num_warps=cfg.num_warps,
        divisible_by_16=_ALIGNED_ARGS if aligned else _UNALIGNED_ARGS,
        meta=dict(
            kernel="scan",
            dtype=dt,
            block_k=cfg.block_k,
            num_warps=cfg.num_warps,
            splits=cfg.splits,
            aligned=aligned,
            flags=list(flags),
            seed=seed_t,
        ),  # fmt: skip
        enable_fp_fusion=False,
    )


def _combine_spec(AotSpec, splits: int, has_c: bool, seed_t: str):
    return AotSpec(
        name=f"_maskgit_combine_kernel[s{splits}-c{int(has_c)}"
        + ("" if seed_t == "i64" else "-seed32")
        + "]",
        kernel=_maskgit_combine_kernel,
        signature={
            **_COMBINE_SIG,
            "seed": seed_t,
            "HAS_CHOICE_NOISE": "constexpr",
            "SPLITS": "constexpr",
            "ROWS": "constexpr",
        },  # fmt: skip
        constexprs={"HAS_CHOICE_NOISE": has_c, "SPLITS": splits, "ROWS": _COMBINE_ROWS},
        num_warps=_COMBINE_WARPS,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="combine", splits=splits, seed=seed_t),
        enable_fp_fusion=False,
    )


def _select_spec(AotSpec, cfg: SelectConfig, key_philox: bool, seed_t: str):
    kind = "philox" if key_philox else "conf"
    mode = "single" if cfg.single else "chunked"
    return AotSpec(
        name=f"_select_kernel[{kind}-bl{cfg.block_l}-w{cfg.num_warps}-{mode}"
        + ("" if seed_t == "i64" else "-seed32")
        + "]",
        kernel=_select_kernel,
        signature={
            **_SELECT_SIG,
            "seed": seed_t,
            "conf_ptr": "*i64" if key_philox else "*fp32",
            "KEY_PHILOX": "constexpr",
            "NBITS": "constexpr",
            "BLOCK_L": "constexpr",
            "SINGLE": "constexpr",
        },  # fmt: skip
        constexprs={
            "KEY_PHILOX": key_philox,
            "NBITS": 64 if key_philox else 32,
            "BLOCK_L": cfg.block_l,
            "SINGLE": cfg.single,
        },  # fmt: skip
        num_warps=cfg.num_warps,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="select", block_l=cfg.block_l, single=cfg.single, key=kind, seed=seed_t),
    )


def _bernoulli_spec(AotSpec, seed_t: str):
    return AotSpec(
        name=f"_bernoulli_kernel[bl{_BERNOULLI_BLOCK}-w{_BERNOULLI_WARPS}"
        + ("" if seed_t == "i64" else "-seed32")
        + "]",
        kernel=_bernoulli_kernel,
        signature={**_BERNOULLI_SIG, "seed": seed_t, "BLOCK_L": "constexpr"},
        constexprs={"BLOCK_L": _BERNOULLI_BLOCK},
        num_warps=_BERNOULLI_WARPS,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="bernoulli", block_l=_BERNOULLI_BLOCK, seed=seed_t),
    )


def _in_default_set(family: str, cfg, dtype) -> bool:
    """The default (every-run) AOT subset: ~25 kernels per arch. fp16 compiles like bf16 (only the
    conversion differs); select blocks 32 / 512 / 4096 bracket the register use of the others;
    the combine at the smallest and largest split count. Everything else is in full=True."""
    if family == "scan":
        return dtype != torch.float16 and cfg.splits <= 2
    if family == "combine":
        return cfg.splits in (2, _SPLIT_MAX)
    if family == "select":
        return not cfg.single or cfg.block_l in (_SELECT_MIN_BLOCK, 512, _SELECT_MAX_BLOCK)
    return True


_ALL_FLAGS = [(u, n, c) for u in (True, False) for n in (False, True) for c in (False, True)]
_DEFAULT_FLAGS = (True, False, False)  # guidance, Philox noise: the production path


def aot_specs(full: bool = False):
    """Compile jobs (``unif2ace.triton_kernels.aot.AotSpec``) for the :func:`aot_configs` entries.

    Default (21 kernels per arch, :func:`_in_default_set`): the scan on the production path
    (guidance, Philox noise, aligned rows) at every row block and the smallest split count, fp32
    and bf16 — SPLITS only changes the partial stores, so the larger split counts are left to the
    full set; the combine at 2 and 64 splits; the select in both key kinds at three blocks and
    chunked; the bernoulli kernel. ``full=True`` (~120 per arch): every configuration in every
    dtype; at the row blocks and 2 splits also every (uncond, supplied noise, supplied choice
    noise) flag combination (fp32) and unaligned logits; the combine with supplied choice noise;
    32-bit seeds for one kernel of each family.
    """
    from unif2ace.triton_kernels.aot import AotSpec

    for family, cfg, dtype in aot_configs():
        wanted = full or _in_default_set(family, cfg, dtype)
        if family == "scan":
            dt = _TRITON_DTYPE[dtype]
            if wanted:
                yield _scan_spec(AotSpec, cfg, dt, _DEFAULT_FLAGS, True, "i64")
            if full and cfg.splits <= 2:
                if dtype == torch.float32:
                    for flags in _ALL_FLAGS:
                        if flags != _DEFAULT_FLAGS:
                            yield _scan_spec(AotSpec, cfg, dt, flags, True, "i64")
                yield _scan_spec(AotSpec, cfg, dt, _DEFAULT_FLAGS, False, "i64")
            if full and cfg.block_k == _SCAN_MAX_BLOCK and dtype == torch.float32:
                yield _scan_spec(AotSpec, cfg, dt, _DEFAULT_FLAGS, True, "i32")
            if cfg.splits > 1 and dtype == torch.float32:
                if full or _in_default_set("combine", cfg, None):
                    yield _combine_spec(AotSpec, cfg.splits, False, "i64")
                if full:
                    yield _combine_spec(AotSpec, cfg.splits, True, "i64")
                if full and cfg.splits == 2:
                    yield _combine_spec(AotSpec, cfg.splits, False, "i32")
        elif not wanted:
            continue
        elif family == "select":
            for key_philox in (False, True):
                yield _select_spec(AotSpec, cfg, key_philox, "i64")
                if full and cfg.single and cfg.block_l == 512:
                    yield _select_spec(AotSpec, cfg, key_philox, "i32")
        else:
            yield _bernoulli_spec(AotSpec, "i64")
            if full:
                yield _bernoulli_spec(AotSpec, "i32")
