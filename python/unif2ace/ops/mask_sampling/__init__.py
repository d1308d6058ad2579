"""Discrete-diffusion mask sampling: training-time masking and the fused MaskGIT / Show-o decode step.

* :func:`mask_tokens`   — absorbing-diffusion forward process: mask ``clamp(round(L·γ), 1, L)``
  positions per row uniformly without replacement ("count", Show-o), or each position with
  probability γ ("bernoulli", MDLM). :func:`sample_times` draws the times t (uniform/antithetic).
* :func:`maskgit_step`  — one decode step: classifier-free guidance, temperature, Gumbel-max sample,
  confidence, re-mask the ``mask_len`` least confident unknown positions of each sequence.
* :func:`maskgit_decode` — the model-agnostic iterative decode loop around the step.

Layout of the package: this module holds the public functions and their input validation;
``reference`` the plain-PyTorch references and the contract's Philox in torch; ``_custom_ops`` the
torch.library ops, which call the backend's launcher; ``_torch`` (with the LAUNCHER CONTRACT as its
docstring), ``_cpu``, ``_triton`` and ``_cuda`` the launchers, registered in
:mod:`unif2ace._backend` as ``"mask_sampling.mask_tokens"`` and ``"mask_sampling.maskgit_step"``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch

from unif2ace import _backend
from unif2ace.ops import schedules as _schedules
from unif2ace.ops._validate import check_device, check_dtype, check_rows, checked
from unif2ace.ops.mask_sampling import _custom_ops
from unif2ace.ops.mask_sampling.reference import (
    MODES,
    STREAM_CHOICE,
    STREAM_MASK,
    STREAM_SAMPLE,
    gumbel_from_bits,
    mask_tokens_ref,
    maskgit_step_ref,
    philox4x32,
    philox_noise,
)

__all__ = [
    "ANNEALING",
    "MODES",
    "OFFSET_LIMIT",
    "SEED_LIMIT",
    "STREAM_CHOICE",
    "STREAM_MASK",
    "STREAM_SAMPLE",
    "TIME_SAMPLERS",
    "gumbel_from_bits",
    "mask_tokens",
    "mask_tokens_ref",
    "maskgit_decode",
    "maskgit_step",
    "maskgit_step_ref",
    "philox4x32",
    "philox_noise",
    "sample_times",
]

ANNEALING = ("maskgit", "showo")
TIME_SAMPLERS = ("uniform", "antithetic")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
SEED_LIMIT = 1 << 63
OFFSET_LIMIT = 1 << 30


# ---- validation --------------------------------------------------------------------------------


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _check_int(op: str, name: str, v, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(v).__name__}")
    if not lo <= v < hi:
        raise ValueError(f"{op}: {name} must be in [{lo}, {hi}), got {v}")
    return v


def _check_mask_id(op: str, mask_id, dtype: torch.dtype) -> int:
    """``mask_id`` is written into ids of ``dtype``: a value that dtype cannot hold is refused
    (it would wrap to another token)."""
    info = torch.iinfo(dtype)
    try:
        return _check_int(op, "mask_id", mask_id, info.min, info.max + 1)
    except ValueError:  # only the range can fail with a ValueError: say why it is refused
        raise ValueError(
            f"{op}: mask_id = {mask_id} does not fit the ids' dtype {dtype} "
            f"([{info.min}, {info.max}]); use int64 ids or a smaller mask id"
        ) from None


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


def _kernel_view(x: torch.Tensor | None) -> torch.Tensor | None:
    """Column stride 1 (kernels read rows of K contiguous elements); other strides kept."""
    if x is None:
        return None
    if x.shape[2] > 1 and x.stride(2) != 1:
        return x.contiguous()
    return x


# ---- public functions --------------------------------------------------------------------------


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
    _check_mask_id(op, mask_id, ids.dtype)
    seed = _resolve_seed(op, seed)
    offset = _check_int(op, "offset", offset, 0, OFFSET_LIMIT)
    gamma = _per_row(op, "gamma", gamma, B, ids.device, torch.float32)
    if _backend.checks_enabled():  # under torch.compile inside a custom op: no graph break
        gamma = checked(gamma, "unit_interval", op, "gamma")
    name = _backend.resolve(backend, ids.device, op, "mask_sampling.mask_tokens")
    n_mask = (gamma.double() * L).round().clamp(1, L).to(torch.int64)  # half to even
    if B == 0:
        return ids.clone(), torch.zeros_like(ids, dtype=torch.bool)
    ids64 = ids.to(torch.int64).contiguous()
    out, mask = _custom_ops.mask_tokens(
        ids64, gamma, n_mask, int(mask_id), seed, offset, MODES.index(mode), name
    )
    return out.to(ids.dtype), mask


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

    NaN / inf logits. With the value checks on (the default, :func:`unif2ace.set_checks`) a
    ``ValueError`` names the argument and the position: NaN or +inf in ``logits`` or
    ``uncond_logits`` at a masked position, guided and temperature-scaled logits ``y`` that are
    NaN or +inf (−inf in ``uncond_logits`` with g > 0, a float32 overflow), a masked position
    whose ``y`` are −inf for every token, non-finite supplied noise. −inf logits are allowed (a
    token of probability 0); known positions are not checked (never read). The check costs one
    more pass over the logits and one host read per call (every step of :func:`maskgit_decode`);
    it runs inside the custom op, so it is no graph break under torch.compile. With the checks
    off, the result is the same on every backend: a ``y_k`` that is NaN or +inf counts as −inf
    (that token is never sampled; a simple rule every kernel applies in one select, where "+inf
    wins" would leave several +inf columns to float rounding), and a masked position with no
    finite ``y_k`` gets token 0 and confidence −∞ (so it is re-masked first).

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
        Philox key and stream offset (launcher contract in
        :mod:`unif2ace.ops.mask_sampling._torch`). cpu, triton and cuda use the same Philox noise;
        the torch backend uses a torch.Generator seeded from them. None: drawn from torch's
        default generator.
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
    _check_mask_id(op, mask_id, ids.dtype)
    if 0 <= mask_id < K:
        raise ValueError(
            f"{op}: mask_id = {mask_id} is a codebook index in [0, K = {K}); the mask token must lie "
            f"outside the sampled columns (e.g. K)"
        )
    guidance = _check_number(op, "guidance", guidance)
    temperature = _check_number(op, "temperature", temperature, positive=True)
    choice_t = _check_number(op, "choice_temperature", choice_temperature, nonnegative=True)
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
    name = _backend.resolve(backend, logits.device, op, "mask_sampling.maskgit_step")
    check_dtype(op, "logits", logits, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if B == 0:
        empty = torch.empty((0, L), dtype=torch.float32, device=ids.device)
        out = ids.clone(), torch.zeros_like(ids, dtype=torch.bool), empty
        return out if return_confidence else out[:2]
    new_ids, mask, conf = _custom_ops.maskgit_step(
        _kernel_view(logits),
        _kernel_view(uncond_logits),
        ids.to(torch.int64).contiguous(),
        mask_len,
        int(mask_id),
        guidance if uncond_logits is not None else 0.0,
        inv_t,
        choice_t,
        seed,
        offset,
        gumbel_noise.contiguous() if gumbel_noise is not None else None,
        choice_noise.contiguous() if choice_noise is not None else None,
        _check_values,
        name,
    )
    out = new_ids.to(ids.dtype), mask, conf
    return out if return_confidence else out[:2]


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

    ``logits_fn`` maps ids [B, L] to logits [B, L, K] (or to ``(cond, uncond)``, both [B, L, K]);
    ``ids`` [B, L] int holds the known tokens and ``mask_id`` elsewhere. At step s = 0 … steps−1,
    with progress r = (s + 1)/steps:

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
    ``mask_len`` is computed with tensor ops: no host sync per step with the value checks off
    (with them on, each step checks its logits: one host read, see :func:`maskgit_step`).
    """
    op = "maskgit_decode"
    B, L = _check_ids(op, ids)
    _check_int(op, "steps", steps, 1, 1 << 30)
    if annealing not in ANNEALING:
        raise ValueError(f"{op}: annealing must be one of {ANNEALING}, got {annealing!r}")
    if isinstance(schedule, str):
        if schedule not in _schedules.SCHEDULES:
            raise ValueError(f"{op}: schedule must be one of {_schedules.SCHEDULES} or a callable")

        def gamma_of(r: float) -> float:
            t = torch.tensor(1.0 - r, dtype=torch.float64)
            return float(_schedules.schedule(t, schedule).gamma)

    elif callable(schedule):
        gamma_of = schedule
    else:
        raise TypeError(f"{op}: schedule must be a schedule name or a callable r -> γ")
    seed = _resolve_seed(op, seed)
    ratios = [(s + 1) / steps for s in range(steps)]
    tau0 = _check_number(op, "choice_temperature", choice_temperature, nonnegative=True)
    taus = _annealed(annealing, tau0, ratios)
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
            cond,
            ids,
            mask_id,
            mask_len,
            uncond_logits=uncond,
            guidance=guidance,
            temperature=temperature,
            choice_temperature=taus[s],
            seed=seed,
            offset=s % OFFSET_LIMIT,
            backend=backend,
            _check_values=s == 0,  # later ids and mask_len are valid by construction
        )[0]
        if return_history:
            history.append(ids)
    return (ids, history) if return_history else ids
