"""Discrete-diffusion mask sampling: training-time masking and the fused MaskGIT / Show-o decode step.

* :func:`mask_tokens`   — absorbing-diffusion forward process: mask ``clamp(round(L·γ), 1, L)``
  positions per row uniformly without replacement ("count", Show-o), or each position with
  probability γ ("bernoulli", MDLM). :func:`sample_times` draws the times t (uniform/antithetic).
* :func:`maskgit_step`  — one decode step: classifier-free guidance, temperature, Gumbel-max sample,
  confidence, re-mask the ``mask_len`` least confident unknown positions of each sequence.
* :func:`maskgit_decode` — the model-agnostic iterative decode loop around the step.

File layout (shared/STYLE.md): the launcher contract (below), Philox in torch, the references, the
backend launchers, the custom-op registration with fakes, then the public functions.

==================================================================================================
LAUNCHER CONTRACT (stable; the Triton and CUDA kernels implement it — changes are logged at the end
of this block with the time)                                          defined 2026-11-28 01:12 UTC
==================================================================================================

Dispatch dicts in this file map backend name -> launcher: ``_MASK_TOKENS`` and ``_MASKGIT_STEP``,
keys "torch", "cpu", "triton", "cuda". Every launcher has the same tensor-level signature; the
Python op layer validates, converts and allocates before calling it (launchers never allocate
outputs, never validate values, never sync the host).

Triton: module ``unif2ace.triton_kernels.mask_sampling`` (file triton_kernels/mask_sampling.py)
provides the two functions ``mask_tokens_fwd`` and ``maskgit_step_fwd`` with exactly the launcher
signatures below (tensors in, outputs written in place, return None).
CUDA: ``unif2ace._C_cuda`` provides the raw-pointer functions listed at the end; the Python
launchers ``_mask_tokens_cuda`` / ``_maskgit_step_cuda`` here call them.

Randomness: Philox-4x32-10, exactly Triton's ``tl.philox(seed, c0, c1, c2, c3)`` (rounds constants
0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85, 10 rounds), key
``(k0, k1) = (seed & 0xffffffff, seed >> 32)``, counter ``(c0, c1, c2, c3)`` all uint32, output words
``(w0, w1, w2, w3)``. ``seed`` is a Python int in [0, 2**63); ``offset`` an int in [0, 2**30) (the
decode loop passes the step index). Counters (b = sequence, l = position, k = column):

    stream 0, mask_tokens key      counter (0,      l, b, 4*offset + 0)   words w0, w1
    stream 1, sample Gumbel of k   counter (k >> 2, l, b, 4*offset + 1)   word  w[k & 3]
    stream 2, choice Gumbel        counter (0,      l, b, 4*offset + 2)   word  w0

Gumbel from one 32-bit word x (fp32 arithmetic, both tails kept: G reaches ~22.9, not 16.6):
    t = (float(x & 0x7fffffff) + 0.5f) * 2**-32          # uint->fp32 round-to-nearest-even; t in (0, 1/2)
    E = -log1p(-t) if (x >> 31) else -log(t)             # Exp(1) from the uniform u = 1 - t or u = t
    G = -log(E)
(``philox_noise`` below computes these in torch; uniforms are bit-exact across backends, the logs
may differ by an ulp.)

mask_tokens_fwd(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask) -> None
    ids      int64 [B, L] contiguous (values are copied through, never used as indices)
    gamma    float32 [B] contiguous                    (read in "bernoulli" mode)
    n_mask   int64 [B] contiguous                      (read in "count" mode; the op layer computes
                                                        clamp(round(L·γ), 1, L) in float64, round
                                                        half to even; kernels clamp to [0, L])
    mask_id  int; seed int; offset int; mode int: 0 = count, 1 = bernoulli
    out_ids  int64 [B, L] contiguous, written: mask_id where masked, else ids
    out_mask bool [B, L] contiguous, written
  count:     with key(b, l) = (w0 << 32) | w1 (stream 0, uint64), row b masks the n = clamp(n_mask[b],
             0, L) positions with the smallest (key, l) in lexicographic order.
  bernoulli: masked iff  float32(w0 >> 8) < gamma[b] * 16777216.0f   (fp32 compare, exact).
  Integer-only decisions: every backend (torch included) gives the same mask bit for bit.

maskgit_step_fwd(logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature,
                 choice_temperature, seed, offset, gumbel_noise, choice_noise,
                 out_ids, out_mask, confidence) -> None
    logits    [B, L, K] float32 / bfloat16 / float16, stride(2) == 1, strides 0/1 any value >= 0
              (a column range of a larger vocabulary, or an expanded batch, is fine: read only)
    uncond    None, or the same shape and dtype as logits (own strides, stride(2) == 1)
    ids       int64 [B, L] contiguous; known positions are ids != mask_id
    mask_len  int64 [B] contiguous; kernels use n = clamp(mask_len[b], 0, L)
    mask_id   int (outside [0, K)); guidance float g; inv_temperature float32(1/T) > 0;
    choice_temperature float τ >= 0; seed int; offset int
    gumbel_noise  None, or float32 [B, L, K] contiguous: replaces the stream-1 Gumbel noise
    choice_noise  None, or float32 [B, L] contiguous: replaces the stream-2 Gumbel noise
    out_ids     int64 [B, L] contiguous, written
    out_mask    bool  [B, L] contiguous, written (out_mask == (out_ids == mask_id))
    confidence  float32 [B, L] contiguous, written (+inf at known positions)
  Per position, all in fp32:
    known (ids != mask_id): token = ids[b, l], confidence = +inf; logits are not read.
    unknown: z_k = G1·cond_k − G0·uncond_k   (z_k = cond_k when uncond is None), with
               G1 = float32(1 + g), G0 = float32(g) rounded from the Python double g (as torch
               rounds a scalar for fp32 math; the op layer passes g = 0 when uncond is None)
             y_k = z_k · inv_temperature
             ŷ   = the smallest k maximising y_k + G_k
             confidence = (y_ŷ − logsumexp_k y_k) + τ·G_choice     (τ·G_choice skipped when τ == 0)
             token = ŷ
    With gumbel_noise given, ŷ must be computed exactly as argmax(y_k + G_k) (fp32 add, ties to the
    smallest k). On the Philox path a kernel may instead use the equivalent exponential race
    ŷ = argmax_k e^{y_k − m} / E_k (one log per element fewer); it then matches the explicit path fed
    with philox_noise() except at rounding-level near-ties.
  Then per sequence b: the n positions with the smallest (confidence, l) (lexicographic; +inf known
    positions come last, so they are re-masked only if n > number of unknowns) get
    out_ids = mask_id, out_mask = True; every other position gets out_ids = token, out_mask = False.
  NaN logits: results unspecified but every read and write stays in bounds.

CUDA raw-pointer functions in unif2ace._C_cuda (sizes/strides in elements, `stream` =
torch.cuda.current_stream().cuda_stream, ptr 0 = None):
    mask_tokens_fwd(ids_ptr, B, L, gamma_ptr, n_mask_ptr, mask_id, seed, offset, mode,
                    out_ids_ptr, out_mask_ptr, stream)
    maskgit_step_workspace_bytes(B, L, K) -> int
    maskgit_step_fwd(logits_ptr, B, L, K, stride_b, stride_l, dtype,
                     uncond_ptr, ustride_b, ustride_l, ids_ptr, mask_len_ptr, mask_id,
                     guidance, inv_temperature, choice_temperature, seed, offset,
                     gumbel_ptr, choice_ptr, out_ids_ptr, out_mask_ptr, confidence_ptr,
                     workspace_ptr, workspace_bytes, stream)
  (the CPU functions in unif2ace._C have the same arguments without workspace and stream; dtype
  codes as _backend.DTYPE_CODES; seed passed as uint64, offset as uint32, guidance as double,
  inv_temperature and choice_temperature as float.)

Change log:
  01:22 UTC  clarification, no change of meaning: the guidance coefficients are G1 = float32(1 + g)
             and G0 = float32(g) rounded from the double (as torch does), and the raw-pointer
             functions take guidance as a double.
==================================================================================================
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch

from unif2ace import _backend
from unif2ace.ops import schedules as _schedules
from unif2ace.ops._validate import check_device, check_dtype, check_index_range, check_rows

MODES = ("count", "bernoulli")
ANNEALING = ("maskgit", "showo")
TIME_SAMPLERS = ("uniform", "antithetic")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
SEED_LIMIT = 1 << 63
OFFSET_LIMIT = 1 << 30
# Philox streams (counter word c3 = 4·offset + stream), see the contract above.
STREAM_MASK, STREAM_SAMPLE, STREAM_CHOICE = 0, 1, 2


# ------------------------------------------------------------------------------------------------
# Philox-4x32-10 in torch (int64 tensors holding uint32 values): the torch backend of mask_tokens,
# and the noise of the contract for tests (philox_noise). Bit-exact with triton.language.philox.
# int64 products of two uint32 wrap modulo 2^64 (two's complement), which keeps all 64 bits.
# ------------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 of counters (c0, c1, c2, c3) (int64 tensors or ints in [0, 2^32), broadcast)
    under key (seed & 0xffffffff, seed >> 32). Returns 4 int64 tensors in [0, 2^32)."""
    tensors = [c for c in (c0, c1, c2, c3) if isinstance(c, torch.Tensor)]
    like = tensors[0]
    c0, c1, c2, c3 = (
        (
            c.to(torch.int64)
            if isinstance(c, torch.Tensor)
            else torch.full_like(like, c, dtype=torch.int64)
        )
        for c in (c0, c1, c2, c3)
    )
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        pb = c2 * _PHILOX_ROUND_B  # < 2^64: wraps in int64, bits intact
        pa = c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (
            ((pb >> 32) & _M32) ^ c1 ^ k0,
            pb & _M32,
            ((pa >> 32) & _M32) ^ c3 ^ k1,
            pa & _M32,
        )
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def gumbel_from_bits(x: torch.Tensor) -> torch.Tensor:
    """The contract's Gumbel of one 32-bit word (int64 tensor in [0, 2^32)), in float32.

    ``t = (float(x & 0x7fffffff) + 0.5)·2^-32``; ``E = −log1p(−t)`` if the top bit is set, else
    ``−log t``; ``G = −log E``. Both tails are kept: ``G`` ranges over [−3.13, 22.87].
    """
    t = ((x & 0x7FFFFFFF).to(torch.float32) + 0.5) * 2.0**-32
    e = torch.where((x >> 31) != 0, -torch.log1p(-t), -torch.log(t))
    return -torch.log(e)


def philox_noise(seed: int, offset: int, B: int, L: int, K: int, device=None):
    """The Gumbel noise a kernel's Philox path uses: ``(gumbel [B, L, K], choice [B, L])``, float32.

    Feeding these to :func:`maskgit_step` as ``gumbel_noise`` / ``choice_noise`` reproduces the
    seeded step of the cpu/triton/cuda backends (up to rounding-level near-ties). Memory: a few
    int64 [B, L, K] temporaries — a test helper, not for production sizes.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    b = torch.arange(B, device=dev).view(B, 1, 1)
    l_ = torch.arange(L, device=dev).view(1, L, 1)
    kq = torch.arange((K + 3) // 4, device=dev).view(1, 1, -1)
    w = philox4x32(seed, kq + 0 * (b + l_), l_ + 0 * kq, b + 0 * kq, 4 * offset + STREAM_SAMPLE)
    words = torch.stack(w, dim=-1).reshape(B, L, -1)[..., :K]  # column k: word k & 3 of k >> 2
    l2 = torch.arange(L, device=dev).view(1, L).expand(B, L)
    b2 = torch.arange(B, device=dev).view(B, 1).expand(B, L)
    c = philox4x32(seed, torch.zeros_like(l2), l2, b2, 4 * offset + STREAM_CHOICE)[0]
    return gumbel_from_bits(words), gumbel_from_bits(c)


def _mask_keys(seed: int, offset: int, B: int, L: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stream-0 words (w0, w1) for every (b, l): int64 [B, L] each."""
    l2 = torch.arange(L, device=device).view(1, L).expand(B, L)
    b2 = torch.arange(B, device=device).view(B, 1).expand(B, L)
    w0, w1, _, _ = philox4x32(seed, torch.zeros_like(l2), l2, b2, 4 * offset + STREAM_MASK)
    return w0, w1


# ------------------------------------------------------------------------------------------------
# References: plain PyTorch. mask_tokens_ref implements the contract with the torch Philox (so it
# is bit-exact with every backend); maskgit_step_ref is Show-o's / MaskGIT's step written plainly
# (softmax, multinomial or Gumbel-max, gather, sort) — the oracle with supplied noise, the "torch"
# backend (noise from a seeded torch.Generator) and the benchmark baseline.
# ------------------------------------------------------------------------------------------------


def mask_tokens_ref(
    ids: torch.Tensor,
    gamma: torch.Tensor,
    n_mask: torch.Tensor,
    mask_id: int,
    seed: int,
    offset: int = 0,
    mode: str = "count",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masking of the contract in torch ops: ``(masked_ids, mask)``."""
    B, L = ids.shape
    w0, w1 = _mask_keys(seed, offset, B, L, ids.device)
    if mode == "count":
        # Unsigned 64-bit key (w0 << 32 | w1) as a signed int64 with the same order: flip the top
        # bit. A stable sort then breaks equal keys by position.
        key = ((w0 ^ 0x80000000) << 32) | w1
        order = torch.sort(key, dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(
            1, order, torch.arange(L, device=ids.device).expand(B, L)
        )
        mask = rank < n_mask.clamp(0, L).view(B, 1)
    else:
        mask = (w0 >> 8).to(torch.float32) < gamma.to(torch.float32).view(B, 1) * 16777216.0
    return torch.where(mask, torch.full_like(ids, mask_id), ids), mask


def maskgit_step_ref(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_id: int,
    mask_len: torch.Tensor,
    uncond_logits: torch.Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 1.0,
    gumbel_noise: torch.Tensor | None = None,
    choice_noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One MaskGIT / Show-o decode step in plain PyTorch: ``(new_ids, new_mask, confidence)``.

    Math in fp32 (fp64 if ``logits`` is fp64). Without ``gumbel_noise`` the token is drawn with
    ``torch.multinomial`` from the softmax (Show-o); without ``choice_noise`` the confidence noise
    is ``−log(−log u)`` from float64 uniforms (no truncation of the Gumbel tail).
    """
    wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(wdt)
    if uncond_logits is not None:
        z = (1.0 + guidance) * z - guidance * uncond_logits.to(
            wdt
        )  # [B, L, K] classifier-free guidance
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32).to(wdt)  # float32(1/T), as kernels
    z = z * inv_t.item()
    B, L, K = z.shape
    log_p = torch.log_softmax(z, dim=-1)  # [B, L, K]
    if gumbel_noise is None:
        probs = log_p.exp().reshape(B * L, K)
        sampled = torch.multinomial(probs, 1, generator=generator).view(B, L)
    else:
        sampled = torch.argmax(z + gumbel_noise.to(wdt), dim=-1)  # first maximum on ties
    unknown = ids == mask_id
    sampled = torch.where(unknown, sampled, ids)
    selected = log_p.gather(-1, torch.where(unknown, sampled, 0)[..., None]).squeeze(-1)
    if choice_temperature != 0:
        if choice_noise is None:
            u = torch.rand(B, L, dtype=torch.float64, device=z.device, generator=generator)
            choice_noise = -torch.log(-torch.log(u.clamp_min(1e-300)))
        selected = selected + choice_temperature * choice_noise.to(wdt)
    confidence = torch.where(unknown, selected, torch.full_like(selected, math.inf))
    # Re-mask the mask_len least confident positions; a stable sort breaks ties by position.
    order = torch.sort(confidence, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=z.device).expand(B, L))
    remask = rank < mask_len.to(torch.int64).clamp(0, L).view(B, 1)
    new_ids = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
    return new_ids, remask, confidence.to(torch.float32)


# ------------------------------------------------------------------------------------------------
# Backend launchers (the contract at the top of this file).
# ------------------------------------------------------------------------------------------------


def _mask_tokens_torch(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask):
    new_ids, mask = mask_tokens_ref(ids, gamma, n_mask, mask_id, seed, offset, MODES[mode])
    out_ids.copy_(new_ids)
    out_mask.copy_(mask)


def _mask_tokens_cpu(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask):
    B, L = ids.shape
    _backend.cpu_ext().mask_tokens_fwd(
        ids.data_ptr(), B, L, gamma.data_ptr(), n_mask.data_ptr(), int(mask_id), int(seed),
        int(offset), int(mode), out_ids.data_ptr(), out_mask.data_ptr(),
    )  # fmt: skip


def _mask_tokens_cuda(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask):
    B, L = ids.shape
    _backend.cuda_ext().mask_tokens_fwd(
        ids.data_ptr(), B, L, gamma.data_ptr(), n_mask.data_ptr(), int(mask_id), int(seed),
        int(offset), int(mode), out_ids.data_ptr(), out_mask.data_ptr(),
        torch.cuda.current_stream(ids.device).cuda_stream,
    )  # fmt: skip


def _mask_tokens_triton(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask):
    from unif2ace.triton_kernels import mask_sampling as tk

    tk.mask_tokens_fwd(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask)


def _maskgit_step_torch(logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature,
                        choice_temperature, seed, offset, gumbel_noise, choice_noise,
                        out_ids, out_mask, confidence):  # fmt: skip
    """The contract in torch ops: the reference, with a torch.Generator seeded from (seed, offset)
    for whatever noise is not supplied (not the Philox stream: see :func:`philox_noise`)."""
    gen = None
    if gumbel_noise is None or (choice_noise is None and choice_temperature != 0):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_mix_seed(seed, offset))
    new_ids, mask, conf = maskgit_step_ref(
        logits, ids, mask_id, mask_len, uncond, guidance, 1.0 / inv_temperature,
        choice_temperature, gumbel_noise, choice_noise, gen,
    )  # fmt: skip
    out_ids.copy_(new_ids)
    out_mask.copy_(mask)
    confidence.copy_(conf)


def _step_args(logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature,
               choice_temperature, seed, offset, gumbel_noise, choice_noise,
               out_ids, out_mask, confidence):  # fmt: skip
    B, L, K = logits.shape
    has_u = uncond is not None
    return (
        logits.data_ptr(), B, L, K, logits.stride(0), logits.stride(1),
        _backend.DTYPE_CODES[logits.dtype],
        uncond.data_ptr() if has_u else 0,
        uncond.stride(0) if has_u else 0,
        uncond.stride(1) if has_u else 0,
        ids.data_ptr(), mask_len.data_ptr(), int(mask_id),
        float(guidance), float(inv_temperature), float(choice_temperature), int(seed), int(offset),
        gumbel_noise.data_ptr() if gumbel_noise is not None else 0,
        choice_noise.data_ptr() if choice_noise is not None else 0,
        out_ids.data_ptr(), out_mask.data_ptr(), confidence.data_ptr(),
    )  # fmt: skip


def _maskgit_step_cpu(*args):
    _backend.cpu_ext().maskgit_step_fwd(*_step_args(*args))


def _maskgit_step_cuda(*args):
    ext = _backend.cuda_ext()
    logits = args[0]
    B, L, K = logits.shape
    ws_bytes = ext.maskgit_step_workspace_bytes(B, L, K)
    workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
    ext.maskgit_step_fwd(
        *_step_args(*args),
        workspace.data_ptr(),
        ws_bytes,
        torch.cuda.current_stream(logits.device).cuda_stream,
    )


def _maskgit_step_triton(*args):
    from unif2ace.triton_kernels import mask_sampling as tk

    tk.maskgit_step_fwd(*args)


_MASK_TOKENS = {
    "torch": _mask_tokens_torch,
    "cpu": _mask_tokens_cpu,
    "triton": _mask_tokens_triton,
    "cuda": _mask_tokens_cuda,
}
_MASKGIT_STEP = {
    "torch": _maskgit_step_torch,
    "cpu": _maskgit_step_cpu,
    "triton": _maskgit_step_triton,
    "cuda": _maskgit_step_cuda,
}


@torch.compiler.assume_constant_result  # imports a module: a constant for torch.compile
def launcher_available(backend: str) -> bool:
    """Whether this op family's kernels exist for ``backend`` in this build (the backend itself may
    be available for other ops before these kernels land)."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return hasattr(_backend.cpu_ext(), "maskgit_step_fwd")
    if backend == "cuda":
        ext = _backend.cuda_ext()
        return ext is not None and hasattr(ext, "maskgit_step_fwd")
    if backend == "triton":
        try:
            from unif2ace.triton_kernels import mask_sampling as tk
        except Exception:  # noqa: BLE001  (not written yet, or triton missing)
            return False
        return hasattr(tk, "maskgit_step_fwd") and hasattr(tk, "mask_tokens_fwd")
    return False


def _mix_seed(seed: int, offset: int) -> int:
    """A torch.Generator seed from (seed, offset) for the torch backend (splitmix64 finaliser)."""
    x = (seed + 0x9E3779B97F4A7C15 * (offset + 1)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


# ------------------------------------------------------------------------------------------------
# Custom ops (cpu / triton / cuda; the torch backend calls the reference directly). No autograd:
# sampling has no gradient. Fakes give the output shapes for torch.compile.
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("unif2ace::mask_tokens_fwd", mutates_args=())
def _mask_tokens_op(
    ids: torch.Tensor,
    gamma: torch.Tensor,
    n_mask: torch.Tensor,
    mask_id: int,
    seed: int,
    offset: int,
    mode: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out_ids = torch.empty_like(ids)
    out_mask = torch.empty(ids.shape, dtype=torch.bool, device=ids.device)
    _MASK_TOKENS[backend](ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask)
    return out_ids, out_mask


@_mask_tokens_op.register_fake
def _(ids, gamma, n_mask, mask_id, seed, offset, mode, backend):
    return torch.empty_like(ids), ids.new_empty(ids.shape, dtype=torch.bool)


@torch.library.custom_op("unif2ace::maskgit_step_fwd", mutates_args=())
def _maskgit_step_op(
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
    check_values: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if check_values:
        _check_step_values("maskgit_step", logits.shape[2], ids, mask_len, mask_id)
    B, L = ids.shape
    out_ids = torch.empty_like(ids)
    out_mask = torch.empty((B, L), dtype=torch.bool, device=ids.device)
    confidence = torch.empty((B, L), dtype=torch.float32, device=ids.device)
    _MASKGIT_STEP[backend](
        logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature, choice_temperature,
        seed, offset, gumbel_noise, choice_noise, out_ids, out_mask, confidence,
    )  # fmt: skip
    return out_ids, out_mask, confidence


@_maskgit_step_op.register_fake
def _(logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature, choice_temperature, seed,
      offset, gumbel_noise, choice_noise, check_values, backend):  # fmt: skip
    B, L = ids.shape
    return (
        torch.empty_like(ids),
        ids.new_empty((B, L), dtype=torch.bool),
        ids.new_empty((B, L), dtype=torch.float32),
    )


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_int(op: str, name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if not lo <= v < hi:
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}), got {v}")
    return v


def _check_number(op: str, name: str, v, *, positive: bool = False, nonnegative: bool = False):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{op}: {name} must be > 0, got {v}")
    if nonnegative and v < 0:
        raise ValueError(f"{op}: {name} must be >= 0, got {v}")
    return float(v)


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (what the kernels receive), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0] if abs(x) < 3.4e38 else math.inf


def _resolve_seed(op: str, seed) -> int:
    if seed is None:  # a host-side draw from torch's default generator: no device sync
        return int(torch.randint(0, 2**62, (1,)).item())
    return _check_int(op, "seed", seed, 0, SEED_LIMIT)


def _check_ids(op: str, ids) -> tuple[int, int]:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise ValueError(f"{op}: ids must be a 2-D tensor [B, L], got {_shape(ids)}")
    check_dtype(op, "ids", ids, _INDEX_DTYPES)
    B, L = ids.shape
    if L == 0:
        raise ValueError(f"{op}: ids has L = 0 positions; a sequence needs at least one")
    return B, L


def _per_row(op: str, name: str, v, B: int, device, dtype) -> torch.Tensor:
    """A scalar broadcast to [B], or a [B] tensor on ``device``, converted to ``dtype`` (contiguous)."""
    if isinstance(v, torch.Tensor):
        check_rows(op, B, **{name: v})
        check_device(op, device, **{name: v})
        if dtype.is_floating_point and not v.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating tensor, got {v.dtype}")
        if not dtype.is_floating_point and v.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32 or int64, got {v.dtype}")
        return v.to(dtype).contiguous()
    if dtype.is_floating_point:
        _check_number(op, name, v)
    elif isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int or a [B] tensor, got {type(v).__name__}")
    return torch.full((B,), v, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------


def sample_times(
    batch: int,
    *,
    mode: str = "uniform",
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Diffusion times ``t ∈ [eps, 1]`` for a batch, float32 [batch].

    ``"uniform"``: i.i.d. ``t ~ U(eps, 1)``. ``"antithetic"``: MDLM's low-discrepancy sampler, one
    uniform ``u`` shared by the batch, ``t_i = (u/B + i/B) mod 1`` rescaled to ``[eps, 1]`` — each
    ``t_i`` is still uniform, but the batch covers [0, 1] evenly, which lowers the variance of the
    batch-mean loss. Pass ``t`` to :func:`unif2ace.ops.schedule` for γ, σ, σ' and the ratio a.
    """
    if mode not in TIME_SAMPLERS:
        raise ValueError(f"sample_times: mode must be one of {TIME_SAMPLERS}, got {mode!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"sample_times: eps must be in [0, 1), got {eps}")
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=device)
    if mode == "antithetic" and batch > 0:
        u = (
            u[:1] / batch + torch.arange(batch, dtype=torch.float64, device=u.device) / batch
        ) % 1.0
    return ((1.0 - eps) * u + eps).to(torch.float32)


def mask_tokens(
    ids: torch.Tensor,
    gamma: torch.Tensor | float,
    mask_id: int,
    *,
    seed: int | None = None,
    offset: int = 0,
    mode: str = "count",
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorbing-diffusion forward process: replace positions of each sequence by ``mask_id``.

    Parameters
    ----------
    ids : Tensor [B, L], int32 / int64
        Clean tokens (values are copied, never used as indices).
    gamma : Tensor [B] (float) or float
        Masked fraction of each sequence, in [0, 1] (``schedule(t).gamma``).
    mask_id : int
        The mask token.
    seed : int in [0, 2^63), optional
        Philox key; the same (seed, offset) gives the same mask on every call and **every
        backend** (the decision is integer-only). None: drawn from torch's default generator.
    offset : int in [0, 2^30)
        Stream offset (e.g. the training step), so one seed can serve many calls.
    mode : "count" | "bernoulli"
        "count" (Show-o): exactly ``n = clamp(round(L·γ), 1, L)`` positions per row, uniformly
        without replacement — the n smallest Philox keys of the row (ties by position; 64-bit keys
        make ties ~L²/2^65 rare). "bernoulli" (MDLM): each position independently with
        probability γ (to 2^-24).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    (masked_ids [B, L] in ids' dtype, mask [B, L] bool)
    """
    op = "mask_tokens"
    B, L = _check_ids(op, ids)
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {MODES}, got {mode!r}")
    _check_int(op, "mask_id", mask_id, -(2**63), 2**63)
    seed = _resolve_seed(op, seed)
    offset = _check_int(op, "offset", offset, 0, OFFSET_LIMIT)
    gamma = _per_row(op, "gamma", gamma, B, ids.device, torch.float32)
    if _backend.checks_enabled() and B and (not bool(torch.isfinite(gamma).all())
                                            or bool(((gamma < 0) | (gamma > 1)).any())):  # fmt: skip
        raise ValueError(f"{op}: gamma must be finite and in [0, 1]")
    name = _resolve(backend, ids.device, op)
    n_mask = (gamma.double() * L).round().clamp(1, L).to(torch.int64)  # half to even
    if B == 0:
        return ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    ids64 = ids.to(torch.int64).contiguous()
    if name == "torch":
        out, mask = mask_tokens_ref(ids64, gamma, n_mask, mask_id, seed, offset, mode)
    else:
        out, mask = _mask_tokens_op(ids64, gamma, n_mask, int(mask_id), seed, offset,
                                    MODES.index(mode), name)  # fmt: skip
    return out.to(ids.dtype), mask


@torch.compiler.assume_constant_result  # imports modules: a constant for torch.compile
def _resolve(backend, device, op) -> str:
    """Like :func:`unif2ace._backend.resolve`, but "auto" also skips backends whose mask-sampling
    kernels are not in this build; an explicit backend without them is an error."""
    req = backend if backend is not None else _backend.get_backend()
    if req == "auto":
        for name in _backend.AUTO_ORDER.get(device.type, ("torch",)):
            if _backend.available(name, device) and launcher_available(name):
                return name
        return "torch"
    name = _backend.resolve(req, device, op)
    if not launcher_available(name):
        raise RuntimeError(f"{op}: the {name!r} backend has no mask-sampling kernels in this build")
    return name


def _check_step_values(op, logits_k, ids, mask_len, mask_id):
    """Data-dependent checks (a host sync on GPU; off with unif2ace.set_checks(False))."""
    if not _backend.checks_enabled() or ids.numel() == 0:
        return
    check_index_range(ids, logits_k, op, "ids", ignore_index=mask_id)
    unknown = (ids == mask_id).sum(dim=1)
    bad = (mask_len < 0) | (mask_len > unknown)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: mask_len must be in [0, number of masked positions] per sequence; sequence {b} "
            f"has mask_len = {int(mask_len[b])} with {int(unknown[b])} masked positions"
        )


def maskgit_step(
    logits: torch.Tensor,
    ids: torch.Tensor,
    mask_id: int,
    mask_len: torch.Tensor | int,
    *,
    uncond_logits: torch.Tensor | None = None,
    guidance: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    seed: int | None = None,
    offset: int = 0,
    gumbel_noise: torch.Tensor | None = None,
    choice_noise: torch.Tensor | None = None,
    return_confidence: bool = False,
    backend: str | None = None,
    _check_values: bool = True,
):
    """One MaskGIT / Show-o decode step, fused: sample every masked position, re-mask the least
    confident ``mask_len`` of each sequence.

    Per masked position (``ids == mask_id``), in fp32:

    * ``z = (1 + g)·cond − g·uncond`` (classifier-free guidance; ``z = cond`` without uncond)
    * ``y = z / T`` (``temperature``; kernels multiply by ``float32(1/T)``)
    * ``ŷ = argmax_k (y_k + G_k)``, ``G_k`` i.i.d. Gumbel — a sample of ``p = softmax(y)``
    * confidence ``c = log p(ŷ) + τ·G'`` with ``log p(ŷ) = y_ŷ − logsumexp(y)``: the log-probability
      of the sampled token under the **guided, temperature-scaled** distribution it was drawn from
      (Show-o and MaskGIT take it from the same softmax they sample; they sample at T = 1), and
      ``τ = choice_temperature``, ``G'`` one more Gumbel (MaskGIT's ``mask_by_random_topk``).

    Known positions keep their token with confidence +∞. Then in each sequence the ``mask_len[b]``
    positions of lowest confidence (ties: lower position first) become ``mask_id`` again.

    Parameters
    ----------
    logits : Tensor [B, L, K], float32 / bfloat16 / float16 (float64 on the torch backend)
        Conditional logits over the K codebook entries. May be a strided view with column stride 1,
        e.g. Show-o's ``full[:, -(L + 1):-1, lo:lo + K]``; no copy is made.
    ids : Tensor [B, L], int32 / int64
        Current tokens: values in [0, K) or ``mask_id``.
    mask_id : int, outside [0, K)
    mask_len : Tensor [B] (int) or int
        Positions to re-mask per sequence, in [0, number of masked positions of the sequence].
    uncond_logits : Tensor [B, L, K], optional
        Unconditional logits (same shape, dtype and device; own strides).
    guidance : float
        CFG scale g (Show-o's ``guidance_scale``); ignored without ``uncond_logits``.
    temperature : float > 0
        Sampling temperature T (1 = Show-o / MaskGIT).
    choice_temperature : float >= 0
        τ of the confidence noise (MaskGIT default 4.5; :func:`maskgit_decode` anneals it).
    seed, offset : int
        Philox key and stream offset (launcher contract at the top of this module). cpu, triton
        and cuda use the same Philox noise; the torch backend uses a torch.Generator seeded from
        them. None: drawn from torch's default generator.
    gumbel_noise : Tensor [B, L, K] float32, optional; choice_noise : Tensor [B, L] float32, optional
        Supply the noise explicitly (exact cross-backend tests): every backend then returns the
        same ids and mask as :func:`maskgit_step_ref`.
    return_confidence : bool
        Also return the confidence [B, L] float32 (+inf at known positions).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    (new_ids [B, L] in ids' dtype, new_mask [B, L] bool[, confidence [B, L] float32])

    The fused backends read each masked position's logits once (one pass over K: online
    max/sum for ``logsumexp`` and the Gumbel argmax together) and never allocate a [B, L, K]
    tensor; the selection is a per-sequence partial sort of L confidences.
    """
    op = "maskgit_step"
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"{op}: logits must be a 3-D tensor [B, L, K], got {_shape(logits)}")
    B, L, K = logits.shape
    if L == 0:
        raise ValueError(f"{op}: logits has L = 0 positions; a sequence needs at least one")
    if K == 0:
        raise ValueError(f"{op}: logits has K = 0 columns; sampling needs at least one token")
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (B, L):
        raise ValueError(f"{op}: ids must have shape [B, L] = [{B}, {L}], got {_shape(ids)}")
    check_dtype(op, "ids", ids, _INDEX_DTYPES)
    check_device(op, logits.device, ids=ids)
    if uncond_logits is not None:
        if not isinstance(uncond_logits, torch.Tensor) or uncond_logits.shape != logits.shape:
            raise ValueError(
                f"{op}: uncond_logits must have the shape of logits {tuple(logits.shape)}, got "
                f"{_shape(uncond_logits)}"
            )
        check_device(op, logits.device, uncond_logits=uncond_logits)
        if uncond_logits.dtype != logits.dtype:
            raise TypeError(
                f"{op}: uncond_logits dtype {uncond_logits.dtype} differs from logits' {logits.dtype}"
            )
    _check_int(op, "mask_id", mask_id, -(2**63), 2**63)
    if 0 <= mask_id < K:
        raise ValueError(
            f"{op}: mask_id = {mask_id} is a codebook index in [0, K = {K}); the mask token must lie "
            f"outside the sampled columns (e.g. K)"
        )
    guidance = _check_number(op, "guidance", guidance)
    temperature = _check_number(op, "temperature", temperature, positive=True)
    choice_temperature = _check_number(op, "choice_temperature", choice_temperature,
                                       nonnegative=True)  # fmt: skip
    inv_t = _float32(1.0 / temperature)
    if not math.isfinite(inv_t) or inv_t == 0.0:
        raise ValueError(f"{op}: temperature = {temperature} is out of float32 range")
    seed = _resolve_seed(op, seed)
    offset = _check_int(op, "offset", offset, 0, OFFSET_LIMIT)
    mask_len = _per_row(op, "mask_len", mask_len, B, logits.device, torch.int64)
    for nm, t, shp in (
        ("gumbel_noise", gumbel_noise, (B, L, K)),
        ("choice_noise", choice_noise, (B, L)),
    ):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shp:
            raise ValueError(f"{op}: {nm} must have shape {list(shp)}, got {_shape(t)}")
        check_device(op, logits.device, **{nm: t})
        check_dtype(op, nm, t, (torch.float32,))
    name = _resolve(backend, logits.device, op)
    check_dtype(op, "logits", logits, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    out = _maskgit_step_checked(
        logits, ids, mask_id, mask_len, uncond_logits, guidance if uncond_logits is not None else 0.0,
        inv_t, choice_temperature, seed, offset, gumbel_noise, choice_noise, name, _check_values,
    )  # fmt: skip
    return out if return_confidence else out[:2]


def _kernel_view(x: torch.Tensor | None) -> torch.Tensor | None:
    """Column stride 1 (kernels read rows of K contiguous elements); other strides kept."""
    if x is None:
        return None
    if x.shape[2] > 1 and x.stride(2) != 1:
        return x.contiguous()
    return x


def _maskgit_step_checked(logits, ids, mask_id, mask_len, uncond, guidance, inv_t, choice_t, seed,
                          offset, gumbel_noise, choice_noise, name, check_values):  # fmt: skip
    """The step after the shape/dtype validation; value checks here (inside the custom op for the
    kernel backends, so torch.compile does not trace their host syncs)."""
    B, L = ids.shape
    if B == 0:
        empty = torch.empty((0, L), dtype=torch.float32, device=ids.device)
        return ids.clone(), torch.zeros_like(ids, dtype=torch.bool), empty
    ids64 = ids.to(torch.int64).contiguous()
    mask_len = mask_len.to(torch.int64).contiguous()
    gn = gumbel_noise.contiguous() if gumbel_noise is not None else None
    cn = choice_noise.contiguous() if choice_noise is not None else None
    if name == "torch":
        if check_values:
            _check_step_values("maskgit_step", logits.shape[2], ids64, mask_len, mask_id)
        gen = None
        if gn is None or (cn is None and choice_t != 0):
            gen = torch.Generator(device=logits.device)
            gen.manual_seed(_mix_seed(seed, offset))
        new_ids, mask, conf = maskgit_step_ref(
            logits, ids64, mask_id, mask_len, uncond, guidance, 1.0 / inv_t, choice_t, gn, cn, gen
        )
    else:
        new_ids, mask, conf = _maskgit_step_op(
            _kernel_view(logits), _kernel_view(uncond), ids64, mask_len, int(mask_id), guidance,
            inv_t, choice_t, seed, offset, gn, cn, check_values, name,
        )  # fmt: skip
    return new_ids.to(ids.dtype), mask, conf


def _annealed(annealing: str, tau0: float, ratios: list[float]) -> list[float]:
    """Choice temperature per step: MaskGIT τ₀·(1 − r_s); Show-o compounds it, τ_s = τ_{s−1}·(1 − r_s)."""
    if annealing == "maskgit":
        return [tau0 * (1.0 - r) for r in ratios]
    out, tau = [], tau0
    for r in ratios:
        tau = tau * (1.0 - r)
        out.append(tau)
    return out


def maskgit_decode(
    logits_fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]],
    ids: torch.Tensor,
    steps: int,
    *,
    mask_id: int,
    schedule: str | Callable[[float], float] = "cosine",
    guidance: float = 0.0,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    annealing: str = "maskgit",
    seed: int | None = None,
    backend: str | None = None,
    return_history: bool = False,
):
    """Iterative MaskGIT / Show-o decoding, model-agnostic: ``steps`` calls of :func:`maskgit_step`.

    At step s = 0 … steps−1, with progress r = (s + 1)/steps:

    * ``cond, uncond = logits_fn(ids)`` (``logits_fn`` may also return ``cond`` alone);
    * masked fraction after the step ``γ = schedule(1 − r)`` (our schedules run from t = 0 clean to
      t = 1 all masked, so ``"cosine"`` gives MaskGIT's ``cos(π/2·r)`` and ``"linear"`` gives 1 − r);
      or ``schedule(r)`` directly if it is a callable of r;
    * ``mask_len = clamp(floor(N₀·γ), 1, unknown − 1)`` per sequence (MaskGIT; N₀ = masked positions
      at the start, L when decoding from scratch), ``min(·, unknown)`` so a finished sequence is left
      alone, and 0 at the last step, so the loop always ends with no mask token left;
    * choice temperature ``τ_s = τ₀·(1 − r)`` (``annealing="maskgit"``) or Show-o's compounding
      ``τ_s = τ_{s−1}·(1 − r)`` (``annealing="showo"``);
    * Philox offset s, so each step draws fresh noise from one ``seed``.

    Returns the decoded ids [B, L] (and the list of ids after each step if ``return_history``).
    ``mask_len`` is computed with tensor ops: no host sync per step.
    """
    op = "maskgit_decode"
    B, L = _check_ids(op, ids)
    _check_int(op, "steps", steps, 1, 1 << 30)
    if annealing not in ANNEALING:
        raise ValueError(f"{op}: annealing must be one of {ANNEALING}, got {annealing!r}")
    if isinstance(schedule, str):
        if schedule not in _schedules.SCHEDULES:
            raise ValueError(f"{op}: schedule must be one of {_schedules.SCHEDULES} or a callable")
        gamma_of = lambda r: float(
            _schedules.schedule(torch.tensor(1.0 - r, dtype=torch.float64), schedule).gamma
        )  # noqa: E731,E501
    elif callable(schedule):
        gamma_of = schedule
    else:
        raise TypeError(f"{op}: schedule must be a schedule name or a callable r -> γ")
    seed = _resolve_seed(op, seed)
    ratios = [(s + 1) / steps for s in range(steps)]
    taus = _annealed(annealing, _check_number(op, "choice_temperature", choice_temperature,
                                               nonnegative=True), ratios)  # fmt: skip
    n0 = (ids == mask_id).sum(dim=1)  # [B]
    history = []
    for s, r in enumerate(ratios):
        out = logits_fn(ids)
        cond, uncond = out if isinstance(out, tuple) else (out, None)
        unknown = (ids == mask_id).sum(dim=1)
        if s == steps - 1:
            mask_len = torch.zeros_like(unknown)
        else:
            gamma = gamma_of(r)
            if not 0.0 <= gamma <= 1.0:
                raise ValueError(f"{op}: schedule gave γ = {gamma} at r = {r}; must be in [0, 1]")
            mask_len = torch.floor(n0.double() * gamma).to(torch.int64)
            mask_len = torch.minimum(mask_len, unknown - 1).clamp_min(1)
            mask_len = torch.minimum(mask_len, unknown)
        ids = maskgit_step(
            cond, ids, mask_id, mask_len, uncond_logits=uncond, guidance=guidance,
            temperature=temperature, choice_temperature=taus[s], seed=seed, offset=s % OFFSET_LIMIT,
            backend=backend, _check_values=s == 0,  # later ids and mask_len are valid by construction
        )[0]  # fmt: skip
        if return_history:
            history.append(ids)
    return (ids, history) if return_history else ids
