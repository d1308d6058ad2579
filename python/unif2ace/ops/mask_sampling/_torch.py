"""The "torch" launchers of the mask-sampling kernels: the executable spec of the contract below.

==================================================================================================
LAUNCHER CONTRACT of the mask-sampling family (the torch, C++, Triton and CUDA launchers all
implement it)
==================================================================================================

Kernels in the registry (:mod:`unif2ace._backend`): ``"mask_sampling.mask_tokens"`` and
``"mask_sampling.maskgit_step"``, with a launcher for each of "torch", "cpu", "triton", "cuda".
Every launcher has the same tensor-level signature; the op layer (``__init__``) validates,
converts and allocates, and the custom ops (``_custom_ops``) call the launcher (launchers never
allocate outputs, never validate values, never sync the host).

Triton: module ``unif2ace.triton_kernels.mask_sampling`` (file triton_kernels/mask_sampling.py)
provides the two functions ``mask_tokens_fwd`` and ``maskgit_step_fwd`` with exactly the launcher
signatures below (tensors in, outputs written in place, return None).
CUDA: ``unif2ace._C_cuda`` provides the functions listed at the end; the launchers in
``_cuda`` call them (and the ones in ``_cpu`` call those of ``unif2ace._C``).

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
(``reference.philox_noise`` computes these in torch; uniforms are bit-exact across backends, the
logs may differ by an ulp.)

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
              (a column range of a larger vocabulary, or an expanded batch, is fine: read only);
              the torch launcher also takes float64
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
             y_k = z_k · inv_temperature, then the NON-FINITE POLICY: a y_k that is NaN or +inf
               counts as −inf (never sampled), whatever made it so (NaN or inf logits, −inf
               uncond logits under guidance, an overflow)
             if no y_k is finite: token = 0, confidence = −inf (nothing can be sampled; such a
               position is the first to be re-masked); otherwise
             ŷ   = the smallest k maximising y_k + G_k
             confidence = (y_ŷ − m) − log Σ_k e^{y_k − m}, m = max_k y_k (= y_ŷ − logsumexp_k y_k,
               computed in that order so that it stays exact for large m), + τ·G_choice
               (τ·G_choice skipped when τ == 0)
             token = ŷ
    With gumbel_noise given, ŷ must be computed exactly as argmax(y_k + G_k) (fp32 add, ties to the
    smallest k). On the Philox path a kernel may instead use the equivalent exponential race
    ŷ = argmax_k e^{y_k − m} / E_k (one log per element fewer); it then matches the explicit path fed
    with philox_noise() except at rounding-level near-ties.
  Then per sequence b: the n positions with the smallest (confidence, l) (lexicographic; +inf known
    positions come last, so they are re-masked only if n > number of unknowns) get
    out_ids = mask_id, out_mask = True; every other position gets out_ids = token, out_mask = False.
  So NaN / inf logits give one documented result on every backend (with the value checks on the
  op layer refuses them first, see _custom_ops.check_step_logits). Non-finite supplied noise:
  results unspecified, but every read and write stays in bounds.
  The torch launcher draws whatever noise is not supplied from a torch.Generator seeded from
  (seed, offset), not from the Philox streams (see reference.philox_noise for those).

CUDA functions in unif2ace._C_cuda (every tensor as a descriptor, unif2ace.ops._native.desc; None =
absent; `stream` = torch.cuda.current_stream().cuda_stream; the binding checks each operand's dtype,
shape and strides and raises ValueError naming it):
    mask_tokens_fwd(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask, stream)
    maskgit_step_workspace_bytes(B, L, K) -> int
    maskgit_step_fwd(logits, uncond, ids, mask_len, mask_id, guidance, inv_temperature,
                     choice_temperature, seed, offset, gumbel, choice, out_ids, out_mask,
                     confidence, workspace, stream)
  (the CPU functions in unif2ace._C take the same arguments without workspace and stream; seed
  passed as uint64, offset as uint32, guidance as double, inv_temperature and choice_temperature
  as float.)
==================================================================================================
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.mask_sampling.reference import MODES, mask_tokens_ref, maskgit_step_ref


@_backend.register("mask_sampling.mask_tokens", "torch")
def mask_tokens(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask):
    new_ids, mask = mask_tokens_ref(ids, gamma, n_mask, mask_id, seed, offset, MODES[mode])
    out_ids.copy_(new_ids)
    out_mask.copy_(mask)


@_backend.register("mask_sampling.maskgit_step", "torch")
def maskgit_step(
    logits, uncond, ids, mask_len, mask_id, guidance, inv_t, tau, seed, offset, gumbel, choice, *out
):
    """The reference, with a torch.Generator seeded from (seed, offset) for whatever noise is not
    supplied. Arguments as ``maskgit_step_fwd`` above: ``inv_t`` = inv_temperature, ``tau`` =
    choice_temperature, ``gumbel`` / ``choice`` = the supplied noise, ``out`` = (out_ids,
    out_mask, confidence)."""
    gen = None
    if gumbel is None or (choice is None and tau != 0):
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_mix_seed(seed, offset))
    results = maskgit_step_ref(
        logits, ids, mask_id, mask_len, uncond, guidance, 1.0 / inv_t, tau, gumbel, choice, gen
    )
    for dst, src in zip(out, results, strict=True):
        dst.copy_(src)


def _mix_seed(seed: int, offset: int) -> int:
    """A torch.Generator seed from (seed, offset) (splitmix64 finaliser)."""
    x = (seed + 0x9E3779B97F4A7C15 * (offset + 1)) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)
