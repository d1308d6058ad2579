"""Triton kernels of the D3Diff score-matching loss.

For one row of logits z[0..K), clean target x0 and ratio a >= 0 (LSE = log sum_y e^{z_y}):

    CE = LSE - z[x0]
    u  = LSE - log K
    SE = a * (CE + e^u - 1 - u)
    l  = w_ce * CE + alpha * w_se * SE                     (the SE term is 0 when alpha * w_se == 0)
    dl/dz_y = w_ce * p_y + alpha * w_se * a * e^{z_y - log K} - (w_ce + alpha * w_se * a) * [y == x0]

with p = softmax(z). csrc/include/unif2ace/d3diff_math.h holds the same math in C++; the public
ops live in ``unif2ace.ops.d3diff_loss``, whose "triton" launcher (``_triton.py``) calls
:func:`d3diff_loss_fwd` here.

Two kernel designs, picked by :func:`_pick_config`:

* row kernel (``splits == 1``): one program per row. Pass 1 streams the row once with an online
  softmax, pass 2 streams it again and writes the gradient (in place when ``grad`` aliases
  ``logits``: every element is read before the same thread overwrites it).
* split-K (``splits > 1``) for a few long rows: ``_d3diff_loss_partial_kernel`` reduces each
  (row, split) slice to (max, sum of exp) and the target logit; ``_d3diff_loss_split_grad_kernel``
  combines a row's partials (SPLITS numbers), finalises the row and writes the gradient of its
  slice. Two launches instead of one, so only worth it when N alone cannot fill the GPU.

Everything is accumulated in fp32. Offsets of a row start are 64-bit (N * K can pass 2^31).
Launch configurations are data (:class:`D3DiffConfig`, :func:`_pick_config`);
:mod:`unif2ace.triton_kernels.d3diff_loss_aot` lists every configuration the launcher can pick and
turns them into ahead-of-time compile jobs (``unif2ace.triton_kernels.aot``,
tests/test_triton_aot.py).

The block sizes below follow the usual rules (16-byte vector loads, 32 bytes of a row per thread
per step, split-K until there are ~2 programs per SM) and compile for sm_80/sm_90 without spills
(tests/test_triton_aot.py records registers); benchmarks/bench_d3diff_loss.py times them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from unif2ace._backend import triton_interpreted
from unif2ace.triton_kernels import _launch
from unif2ace.triton_kernels._lse import _online_lse_update

# -----------------------------------------------------------------------------------------------
# Launch configurations (data, not constants scattered through the code)
# -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class D3DiffConfig:
    """One launch configuration. ``splits == 1`` is the row kernel; ``splits > 1`` is split-K."""

    block_k: int  # columns per loop step (power of 2)
    num_warps: int
    splits: int = 1  # programs per row (power of 2)


# Row kernel: 32 bytes of a row per thread per loop step (two 16-byte vector loads: 8 fp32 or 16
# bf16/fp16 values) and at most 8 KB per program per step, so BLOCK_K = next_pow2(K) clamped to
# [128, 2048] in fp32 and [128, 4096] in 16-bit, num_warps = BLOCK_K * itemsize / 1024 clamped to
# [1, 8]. Larger blocks would only add registers: the online softmax keeps a running (max, sum)
# per lane, so the loop has no cross-warp reduction to amortise (unlike the max/sum-per-block
# form, which wants whole rows in one block). 16 fp32 values per thread on 2 or 4 warps spilled
# registers on sm_80.
_ROW_MIN_BLOCK = 128
_ROW_BYTES_PER_THREAD = 32
_ROW_BYTES_PER_STEP = 8192


# Split-K: smaller programs (1024 columns, 4 warps, 8 values per thread) so a row spreads over
# more SMs; every split gets at least _SPLIT_MIN_STEPS loop steps so the extra launch and the
# partials stay cheap next to the streaming, and splits stop at _SPLIT_MAX (the combine loads
# SPLITS partials per program). 2048 columns on 4 warps spilled registers in the split gradient
# kernel on sm_80 with unaligned fp32 rows.
_SPLIT_BLOCK = 1024
_SPLIT_WARPS = 4
_SPLIT_MIN_STEPS = 2
_SPLIT_MAX = 64
# Split only while N < 2 * #SMs: below that the row kernel leaves SMs idle or running a single
# program, too few loads in flight to hide DRAM latency. Splits are chosen so N * splits >= that.
_SPLIT_BELOW_PROGRAMS_PER_SM = 2

# Under TRITON_INTERPRET=1 each program instance is a Python call and a block is one numpy
# array, so use whole rows (up to 16384 columns) per step and never split.
_INTERPRET_MAX_BLOCK = 16384


def _row_config(K: int, itemsize: int) -> D3DiffConfig:
    max_block = _ROW_BYTES_PER_STEP // itemsize
    block = min(max(triton.next_power_of_2(K), _ROW_MIN_BLOCK), max_block)
    per_thread = _ROW_BYTES_PER_THREAD // itemsize
    warps = min(max(block // (32 * per_thread), 1), 8)
    return D3DiffConfig(block_k=block, num_warps=warps, splits=1)


def _pick_config(
    N: int, K: int, dtype: torch.dtype, interpret: bool, num_sms: int = _launch.DEFAULT_NUM_SMS
) -> D3DiffConfig:
    """The launch configuration for an [N, K] problem with ``dtype`` logits."""
    if interpret:
        block = min(max(triton.next_power_of_2(K), 16), _INTERPRET_MAX_BLOCK)
        return D3DiffConfig(block_k=block, num_warps=4, splits=1)
    row = _row_config(K, dtype.itemsize)
    splits = _launch.split_count(
        N,
        K,
        num_sms,
        block=_SPLIT_BLOCK,
        min_steps=_SPLIT_MIN_STEPS,
        max_splits=_SPLIT_MAX,
        programs_per_sm=_SPLIT_BELOW_PROGRAMS_PER_SM,
    )
    if splits < 2:
        return row
    return D3DiffConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=splits)


def _split_chunk(K: int, splits: int) -> int:
    """Columns per split: K / splits rounded up to 16, so every slice starts 16-element aligned
    (64 bytes in fp32: vector loads stay vector) and no split is empty while splits <= K / 16."""
    return triton.cdiv(triton.cdiv(K, splits), 16) * 16


# The logits dtypes the launcher takes; every one is compiled ahead of time (d3diff_loss_aot).
AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# -----------------------------------------------------------------------------------------------
# Kernels
# -----------------------------------------------------------------------------------------------

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32


@triton.jit
def _expm1_minus_x(u):
    """e^u - 1 - u in fp32 without the cancellation of the direct form near u = 0.

    |u| < 1: Taylor series to u^10 (truncation < 1e-7 relative); otherwise e^u - 1 - u, where the
    result is >= 0.36 so the subtraction loses nothing.
    """
    t = 1.0 + u * (1.0 / 9.0) * (1.0 + u * 0.1)
    t = 1.0 + u * (1.0 / 8.0) * t
    t = 1.0 + u * (1.0 / 7.0) * t
    t = 1.0 + u * (1.0 / 6.0) * t
    t = 1.0 + u * (1.0 / 5.0) * t
    t = 1.0 + u * (1.0 / 4.0) * t
    t = 1.0 + u * (1.0 / 3.0) * t
    series = 0.5 * u * u * t
    return tl.where(tl.abs(u) < 1.0, series, tl.exp(u) - 1.0 - u)


@triton.jit
def _d3diff_finalize_row(
    m, s, zt, in_range, row, ratio_ptr, w_ce_ptr, w_se_ptr, alpha, log_k, scale
):
    """Row loss and gradient coefficients from the row's (max, sum exp, target logit).

    Loads the row's a, w_ce and w_se; ``scale`` multiplies the gradient (1.0 without one).
    Returns (loss, base, c_x, c_t): the gradient of column y is
    ``e^{z_y - base} * c_x - c_t * [y == x0]``. That is w_ce*p_y + alpha*w_se*a*e^{z_y - log K}
    with a single exp per element: base = LSE when the SE term is off, else min(LSE, log K), so
    c_x = c_p*e^{base-LSE} + c_e*e^{base-log K} multiplies only factors <= 1 (no e^u overflow).
    A target outside [0, K) makes the loss and every coefficient NaN.
    """
    a = tl.load(ratio_ptr + row)
    w_ce = tl.load(w_ce_ptr + row)
    w_se = tl.load(w_se_ptr + row)
    lse = m + tl.log(s)
    ce = lse - zt
    u = lse - log_k
    wse = alpha * w_se
    se = a * (ce + _expm1_minus_x(u))
    # alpha * w_se == 0 (mask-only loss) must not turn an overflowing e^u into 0 * inf = NaN.
    loss = w_ce * ce + tl.where(wse != 0.0, wse * se, 0.0)
    c_p = w_ce * scale
    c_e = wse * a * scale
    c_t = (w_ce + wse * a) * scale
    base = tl.where(c_e != 0.0, tl.minimum(lse, log_k), lse)
    c_x = c_p * tl.exp(base - lse) + tl.where(c_e != 0.0, c_e * tl.exp(base - log_k), 0.0)
    nan = float("nan")
    loss = tl.where(in_range, loss, nan)
    c_x = tl.where(in_range, c_x, nan)
    c_t = tl.where(in_range, c_t, nan)
    return loss, base, c_x, c_t


@triton.jit
def _d3diff_write_grad(
    logits_row, grad_row, start, stop, tgt, base, c_x, c_t, BLOCK_K: tl.constexpr
):
    """grad[y] = e^{z_y - base} * c_x - c_t * [y == tgt] for y in [start, stop).

    tgt is an int32 column (-1 for a bad target, whose coefficients are NaN anyway), so the
    per-element compare stays 32-bit.
    """
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(start, stop, BLOCK_K):
        offs = k0 + cols
        mask = offs < stop
        # evict_first: this is the row's last read.
        z = tl.load(logits_row + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        g = tl.exp(z.to(tl.float32) - base) * c_x
        g = tl.where(offs == tgt, g - c_t, g)
        tl.store(grad_row + offs, g.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _d3diff_zero_grad(grad_row, start, stop, BLOCK_K: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    zero = tl.zeros([BLOCK_K], dtype=grad_row.dtype.element_ty)
    for k0 in range(start, stop, BLOCK_K):
        offs = k0 + cols
        tl.store(grad_row + offs, zero, mask=offs < stop)


@triton.jit
def _d3diff_slice_stats(logits_row, start, stop, BLOCK_K: tl.constexpr):
    """(max, sum exp(z - max)) over logits_row[start:stop), fp32, one pass, per-lane online."""
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], -_FLT_MAX, tl.float32)
    s = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        offs = k0 + cols
        # evict_last: the gradient pass reads the row again right after; keep it in L2.
        x = tl.load(
            logits_row + offs, mask=offs < stop, other=float("-inf"), eviction_policy="evict_last"
        )
        m, s = _online_lse_update(m, s, x.to(tl.float32))
    m_row = tl.max(m, axis=0)
    s_row = tl.sum(s * tl.exp(m - m_row), axis=0)
    return m_row, s_row


@triton.jit
def _d3diff_loss_fwd_kernel(
    logits_ptr,  # [N, K], column stride 1
    stride_logits,  # row stride of logits, elements
    targets_ptr,  # [N] int64
    ratio_ptr,  # [N] fp32, a
    w_ce_ptr,  # [N] fp32
    w_se_ptr,  # [N] fp32
    grad_scale_ptr,  # [N] fp32 (read only when HAS_SCALE)
    loss_ptr,  # [N] fp32 out
    grad_ptr,  # [N, K] out, logits' dtype (written only when HAS_GRAD; may alias logits)
    stride_grad,  # row stride of grad, elements
    K,  # columns
    log_k,  # fp32 log K
    alpha,  # fp32
    ignore_index,  # int
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Row kernel: one program per row, grid (N,)."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(targets_ptr + row)
    logits_row = logits_ptr + row * stride_logits
    grad_row = grad_ptr + row * stride_grad
    if tgt == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _d3diff_zero_grad(grad_row, 0, K, BLOCK_K)
    else:
        in_range = (tgt >= 0) & (tgt < K)
        # The target logit is read before any gradient store (in-place safe); masked so a bad
        # target never reads out of bounds.
        zt = tl.load(logits_row + tgt, mask=in_range, other=0.0).to(tl.float32)
        m, s = _d3diff_slice_stats(logits_row, 0, K, BLOCK_K)
        scale = tl.load(grad_scale_ptr + row) if HAS_SCALE else 1.0
        loss, base, c_x, c_t = _d3diff_finalize_row(
            m, s, zt, in_range, row, ratio_ptr, w_ce_ptr, w_se_ptr, alpha, log_k, scale
        )
        tl.store(loss_ptr + row, loss)
        if HAS_GRAD:
            tgt_col = tl.where(in_range, tgt, -1).to(tl.int32)
            _d3diff_write_grad(logits_row, grad_row, 0, K, tgt_col, base, c_x, c_t, BLOCK_K)


@triton.jit
def _d3diff_loss_partial_kernel(
    logits_ptr,  # [N, K], column stride 1
    stride_logits,
    targets_ptr,  # [N] int64
    part_max_ptr,  # [N, num_splits] fp32 out
    part_sum_ptr,  # [N, num_splits] fp32 out
    target_logit_ptr,  # [N] fp32 out (written by the split holding the target)
    K,
    chunk,  # columns per split, a multiple of 16
    num_splits,
    ignore_index,
    BLOCK_K: tl.constexpr,
):
    """Split-K pass 1, grid (N, num_splits): (max, sum exp) of one slice of one row."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    tgt = tl.load(targets_ptr + row)
    if tgt != ignore_index:
        logits_row = logits_ptr + row * stride_logits
        start = split * chunk
        stop = tl.minimum(start + chunk, K)
        m, s = _d3diff_slice_stats(logits_row, start, stop, BLOCK_K)
        tl.store(part_max_ptr + row * num_splits + split, m)
        tl.store(part_sum_ptr + row * num_splits + split, s)
        mine = (tgt >= start) & (tgt < stop)
        zt = tl.load(logits_row + tgt, mask=mine, other=0.0).to(tl.float32)
        tl.store(target_logit_ptr + row, zt, mask=mine)


@triton.jit
def _d3diff_loss_split_grad_kernel(
    logits_ptr,  # [N, K], column stride 1
    stride_logits,
    targets_ptr,  # [N] int64
    ratio_ptr,  # [N] fp32
    w_ce_ptr,  # [N] fp32
    w_se_ptr,  # [N] fp32
    grad_scale_ptr,  # [N] fp32 (read only when HAS_SCALE)
    loss_ptr,  # [N] fp32 out
    grad_ptr,  # [N, K] out (written only when HAS_GRAD; may alias logits)
    stride_grad,
    part_max_ptr,  # [N, SPLITS] fp32, from the partial kernel
    part_sum_ptr,  # [N, SPLITS] fp32
    target_logit_ptr,  # [N] fp32
    K,
    chunk,  # columns per split, a multiple of 16
    log_k,
    alpha,
    ignore_index,
    HAS_GRAD: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Split-K pass 2, grid (N, SPLITS) with a gradient, (N, 1) without: finalise, write."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    tgt = tl.load(targets_ptr + row)
    start = split * chunk
    stop = tl.minimum(start + chunk, K)
    grad_row = grad_ptr + row * stride_grad
    if tgt == ignore_index:
        if split == 0:
            tl.store(loss_ptr + row, 0.0)
        if HAS_GRAD:
            _d3diff_zero_grad(grad_row, start, stop, BLOCK_K)
    else:
        in_range = (tgt >= 0) & (tgt < K)
        parts = row * SPLITS + tl.arange(0, SPLITS)
        pm = tl.load(part_max_ptr + parts)
        ps = tl.load(part_sum_ptr + parts)
        m = tl.max(pm, axis=0)
        s = tl.sum(ps * tl.exp(pm - m), axis=0)
        zt = tl.load(target_logit_ptr + row, mask=in_range, other=0.0)
        scale = tl.load(grad_scale_ptr + row) if HAS_SCALE else 1.0
        loss, base, c_x, c_t = _d3diff_finalize_row(
            m, s, zt, in_range, row, ratio_ptr, w_ce_ptr, w_se_ptr, alpha, log_k, scale
        )
        if split == 0:
            tl.store(loss_ptr + row, loss)
        if HAS_GRAD:
            logits_row = logits_ptr + row * stride_logits
            tgt_col = tl.where(in_range, tgt, -1).to(tl.int32)
            _d3diff_write_grad(logits_row, grad_row, start, stop, tgt_col, base, c_x, c_t, BLOCK_K)


# -----------------------------------------------------------------------------------------------
# Launcher
# -----------------------------------------------------------------------------------------------


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"d3diff_loss_fwd: {msg}")


@_launch.on_tensor_device
def d3diff_loss_fwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ratio: torch.Tensor,
    w_ce: torch.Tensor,
    w_se: torch.Tensor,
    alpha: float,
    ignore_index: int,
    loss: torch.Tensor,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
    *,
    config: D3DiffConfig | None = None,
) -> None:
    """Per-row D3Diff loss and (optionally) its gradient, written into ``loss`` and ``grad``.

    Parameters
    ----------
    logits : [N, K] fp32/bf16/fp16, column stride 1, any row stride (e.g. a column range of a
        wider vocabulary).
    targets : [N] int64, contiguous. ``ignore_index`` rows get loss 0 and gradient 0; a target
        outside [0, K) is never read out of bounds and gives a NaN loss and a NaN gradient row.
    ratio, w_ce, w_se : [N] fp32, contiguous: a, the CE weight, the SE weight of each row.
    alpha : scalar weight of the SE term.
    loss : [N] fp32 out, l per row (see the module docstring).
    grad : None or [N, K] out, the dtype of ``logits``, column stride 1, any row stride; may be
        ``logits`` itself (in-place gradient). None: loss only, the second pass is skipped.
    grad_scale : None or [N] fp32: each gradient row is multiplied by it (the loss is not).
    config : force a launch configuration (tests); None picks one with :func:`_pick_config`.

    Launches asynchronously on the logits' device (made current) and its current stream; no host
    synchronisation.
    """
    _check(logits.dim() == 2, f"logits must be [N, K], got {tuple(logits.shape)}")
    N, K = logits.shape
    _check(logits.dtype in AOT_DTYPES, f"logits dtype {logits.dtype} is not fp32/bf16/fp16")
    _check(K == 1 or logits.stride(1) == 1, "logits must have column stride 1")
    _check(targets.dtype == torch.int64 and targets.is_contiguous(), "targets: contiguous int64")
    for name, t in (("ratio", ratio), ("w_ce", w_ce), ("w_se", w_se), ("loss", loss)):
        _check(
            t.shape == (N,) and t.dtype == torch.float32 and t.is_contiguous(),
            f"{name} must be a contiguous float32 [{N}]",
        )
    _check(targets.shape == (N,), f"targets must be [{N}]")
    if grad is not None:
        _check(grad.shape == (N, K) and grad.dtype == logits.dtype, "grad must match logits")
        _check(K == 1 or grad.stride(1) == 1, "grad must have column stride 1")
    if grad_scale is not None:
        _check(
            grad_scale.shape == (N,)
            and grad_scale.dtype == torch.float32
            and grad_scale.is_contiguous(),
            f"grad_scale must be a contiguous float32 [{N}]",
        )
    if N == 0:
        return
    _check(K > 0, "K must be positive")

    interpret = triton_interpreted()
    if config is None:
        config = _pick_config(N, K, logits.dtype, interpret, _launch.device_num_sms(logits))

    has_grad = grad is not None
    has_scale = grad_scale is not None
    # Unused pointer arguments get a live tensor of the right kind; the constexpr flags compile
    # their loads and stores away.
    grad_arg = grad if has_grad else logits
    scale_arg = grad_scale if has_scale else ratio
    stride_logits = logits.stride(0)
    stride_grad = grad_arg.stride(0)
    log_k = math.log(K)
    alpha = float(alpha)
    ignore_index = int(ignore_index)
    compile_opts = {} if interpret else {"enable_fp_fusion": True}

    # The leading arguments of the row kernel and of the split gradient kernel, in their order.
    io = (logits, stride_logits, targets, ratio, w_ce, w_se, scale_arg, loss, grad_arg, stride_grad)
    opts = dict(BLOCK_K=config.block_k, num_warps=config.num_warps, **compile_opts)
    flags = dict(HAS_GRAD=has_grad, HAS_SCALE=has_scale, **opts)
    if config.splits == 1:
        _d3diff_loss_fwd_kernel[(N,)](*io, K, log_k, alpha, ignore_index, **flags)
        return

    splits = config.splits
    chunk = _split_chunk(K, splits)
    part_max = torch.empty((N, splits), dtype=torch.float32, device=logits.device)
    part_sum = torch.empty((N, splits), dtype=torch.float32, device=logits.device)
    target_logit = torch.empty((N,), dtype=torch.float32, device=logits.device)
    parts = (part_max, part_sum, target_logit)
    _d3diff_loss_partial_kernel[(N, splits)](
        logits, stride_logits, targets, *parts, K, chunk, splits, ignore_index, **opts
    )
    _d3diff_loss_split_grad_kernel[(N, splits if has_grad else 1)](
        *io, *parts, K, chunk, log_k, alpha, ignore_index, SPLITS=splits, **flags
    )
