"""Plain-PyTorch references of the mask-sampling ops, and the contract's Philox in torch.

* :func:`philox4x32`, :func:`gumbel_from_bits`, :func:`philox_noise`: the random streams of the
  launcher contract (:mod:`unif2ace.ops.mask_sampling._torch`) computed with torch integer ops,
  bit-exact with ``triton.language.philox``. They give the "torch" backend of ``mask_tokens`` and
  the explicit noise of the cross-backend tests.
* :func:`mask_tokens_ref`: the contract's masking in torch ops, so it is bit-exact with every
  backend (the decisions are integer-only).
* :func:`maskgit_step_ref`: Show-o's / MaskGIT's decode step written plainly (softmax, multinomial
  or Gumbel-max, gather, sort): the oracle of the tests with supplied noise, the "torch" backend
  (noise from a seeded ``torch.Generator``) and the benchmark baseline.
"""

from __future__ import annotations

import math

import torch

MODES = ("count", "bernoulli")  # mask_tokens modes; the launchers take the index (0 / 1)
# Philox streams (counter word c3 = 4·offset + stream), see the launcher contract.
STREAM_MASK, STREAM_SAMPLE, STREAM_CHOICE = 0, 1, 2

# Philox-4x32-10 on int64 tensors holding uint32 values. An int64 product of two uint32 wraps
# modulo 2^64 (two's complement), which keeps all 64 bits.
_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox4x32(seed: int, c0, c1, c2, c3, rounds: int = 10):
    """Philox-4x32 of the counters ``(c0, c1, c2, c3)`` under the key
    ``(seed & 0xffffffff, seed >> 32)``.

    The counters are int64 tensors or ints in [0, 2^32), broadcast together (at least one is a
    tensor). Returns the four output words ``(w0, w1, w2, w3)``, int64 tensors in [0, 2^32).
    """
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
    """The contract's Gumbel of one 32-bit word (int64 tensor in [0, 2^32), any shape), float32.

    ``t = (float(x & 0x7fffffff) + 0.5)·2^-32``; ``E = −log1p(−t)`` if the top bit is set, else
    ``−log t``; ``G = −log E``. Both tails are kept: ``G`` ranges over [−3.13, 22.87].
    """
    t = ((x & 0x7FFFFFFF).to(torch.float32) + 0.5) * 2.0**-32
    e = torch.where((x >> 31) != 0, -torch.log1p(-t), -torch.log(t))
    return -torch.log(e)


def philox_noise(seed: int, offset: int, B: int, L: int, K: int, device=None):
    """The Gumbel noise a kernel's Philox path uses: ``(gumbel [B, L, K], choice [B, L])``, float32.

    Column k of position (b, l) is word ``k & 3`` of stream 1 at counter ``(k >> 2, l, b,
    4·offset + 1)``; the choice noise is word 0 of stream 2 at ``(0, l, b, 4·offset + 2)``.
    Feeding these to ``maskgit_step`` as ``gumbel_noise`` / ``choice_noise`` reproduces the seeded
    step of the cpu/triton/cuda backends (up to rounding-level near-ties). Memory: a few int64
    [B, L, K] temporaries — a test helper, not for production sizes.
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


def mask_tokens_ref(
    ids: torch.Tensor,
    gamma: torch.Tensor,
    n_mask: torch.Tensor,
    mask_id: int,
    seed: int,
    offset: int = 0,
    mode: str = "count",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract's masking in torch ops: ``(masked_ids [B, L], mask [B, L] bool)``.

    ``ids`` [B, L] int; ``gamma`` float [B] (read in "bernoulli" mode); ``n_mask`` int [B] (read
    in "count" mode). With the stream-0 words (w0, w1) of (b, l):

    * "count": row b masks the ``clamp(n_mask[b], 0, L)`` positions with the smallest
      ``((w0 << 32) | w1, l)`` (unsigned 64-bit key, ties by position);
    * "bernoulli": masked iff ``float32(w0 >> 8) < gamma[b]·2^24``.
    """
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

    ``logits`` / ``uncond_logits`` [B, L, K]; ``ids`` [B, L] int; ``mask_len`` int [B];
    ``gumbel_noise`` [B, L, K]; ``choice_noise`` [B, L]. With ``y = ((1 + g)·cond − g·uncond) ·
    float32(1/T)`` at the masked positions: token ``ŷ = argmax_k (y_k + G_k)`` (first maximum),
    confidence ``y_ŷ − logsumexp(y) + τ·G'`` (+inf at known positions), then the ``mask_len[b]``
    least confident positions of each row (ties: lower position first) are re-masked. Returns
    new_ids int64 [B, L], new_mask bool [B, L], confidence float32 [B, L].

    Math in fp32 (fp64 if ``logits`` is fp64). Without ``gumbel_noise`` the token is drawn with
    ``torch.multinomial`` from the softmax (Show-o); without ``choice_noise`` the confidence noise
    is ``−log(−log u)`` from float64 uniforms (no truncation of the Gumbel tail).

    Non-finite ``y`` (the launcher contract's policy): NaN and +inf count as −inf (never
    sampled); a masked position with no finite ``y`` takes token 0 with confidence −inf.
    """
    wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(wdt)
    if uncond_logits is not None:  # [B, L, K] classifier-free guidance
        z = (1.0 + guidance) * z - guidance * uncond_logits.to(wdt)
    inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32).to(wdt)  # float32(1/T), as kernels
    z = z * inv_t.item()
    B, L, K = z.shape
    z = torch.where(torch.isfinite(z), z, -math.inf)
    dead = ~(z > -math.inf).any(-1)  # [B, L]: no finite y, nothing to sample
    # such a row samples column 0 with certainty (its confidence is set to -inf below)
    z = torch.where(dead[..., None] & (torch.arange(K, device=z.device) == 0), 0.0, z)
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
    selected = selected.masked_fill(dead, -math.inf)
    confidence = torch.where(unknown, selected, torch.full_like(selected, math.inf))
    # Re-mask the mask_len least confident positions; a stable sort breaks ties by position.
    order = torch.sort(confidence, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(L, device=z.device).expand(B, L))
    remask = rank < mask_len.to(torch.int64).clamp(0, L).view(B, 1)
    new_ids = torch.where(remask, torch.full_like(sampled, mask_id), sampled)
    return new_ids, remask, confidence.to(torch.float32)
