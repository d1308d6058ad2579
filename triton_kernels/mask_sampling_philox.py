"""The Philox streams and Gumbel transforms of the mask-sampling contract (the docstring of
``python/unif2ace/ops/mask_sampling/_torch.py``) as ``@triton.jit`` helpers, shared by the decode
step's scan (:mod:`unif2ace.triton_kernels.mask_sampling_step`) and the select / bernoulli kernels
(:mod:`unif2ace.triton_kernels.mask_sampling`).

A Philox counter is (c0, c1, c2, c3) = (column quad k >> 2 or 0, position l, sequence b,
4·offset + stream); stream 0 draws the masks (mask_tokens' keys, the bernoulli draws), stream 1 the
sampled tokens, stream 2 the choice noise of the confidence.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
