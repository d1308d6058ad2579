"""Masking noise schedules for absorbing discrete diffusion.

A schedule maps time ``t ∈ [0, 1]`` to the masked fraction ``γ(t)`` (the probability a token is the
mask token). With the SEDD total noise ``σ(t)`` defined by ``e^{-σ} = 1 − γ``:

* ``σ(t)  = −log(1 − γ(t))``
* ``σ'(t) = γ'(t) / (1 − γ(t))``
* ``a(t)  = (1 − γ)/γ = 1/(e^σ − 1)``  — the ratio the D3Diff score-entropy term uses.

Schedules (``t`` is clipped to ``[eps, 1 − eps]`` so that ``a`` and ``σ`` stay finite):

* ``"cosine"``     γ = cos(π/2 · (1 − t)) = sin(π/2 · t). Increasing in t (t = 0 clean, t = 1 all
  masked); with t ~ U(0, 1) the mask ratio has exactly the distribution of Show-o's / MaskGIT's
  ``cos(π/2 · r)``, r ~ U(0, 1), since 1 − t is uniform too.
* ``"linear"``     γ = t                   (MDLM's linear masking)
* ``"loglinear"``  σ = −log(1 − (1 − eps)·t), i.e. γ = (1 − eps)·t   (SEDD's log-linear schedule)

Used by the D3Diff loss (:func:`d3diff_weights` gives its per-row weights) and by the MaskGIT
decode loop (:func:`unif2ace.ops.maskgit_decode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unif2ace import _backend
from unif2ace.ops._validate import checked

SCHEDULES = ("cosine", "linear", "loglinear")
DEFAULT_ALPHA = 0.01  # the D3Diff score-entropy weight: the UniF²ace paper's best


@dataclass(frozen=True)
class ScheduleValues:
    """γ(t), σ(t), σ'(t) and a(t) for a batch of times (each the shape of ``t``)."""

    gamma: torch.Tensor
    sigma: torch.Tensor
    dsigma: torch.Tensor
    ratio: torch.Tensor


def schedule(t: torch.Tensor, name: str = "cosine", eps: float = 1e-3) -> ScheduleValues:
    """Evaluate a masking schedule at times ``t`` (any shape, values in [0, 1]).

    Computed in float64 and returned in ``t``'s floating dtype (float32 for integer input). The
    check that ``t`` is finite and in [0, 1] reads it (a host synchronisation on a GPU) and runs
    only with the value checks on (:func:`unif2ace.set_checks`); under torch.compile it runs
    inside a custom op (no graph break).
    """
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    out_dtype = t.dtype if t.is_floating_point() else torch.float32
    t64 = t.to(torch.float64)
    if _backend.checks_enabled():  # under torch.compile inside a custom op: no graph break
        t64 = checked(t64, "unit_interval", "schedule", "t")
    # γ(0) = 0 would make a infinite and γ(1) = 1 would make σ infinite: clip t to [eps, 1 − eps].
    t64 = t64.clamp(min=eps, max=1.0 - eps)
    if name == "cosine":
        gamma = torch.sin(0.5 * math.pi * t64)
        dgamma = 0.5 * math.pi * torch.cos(0.5 * math.pi * t64)
    elif name == "linear":
        gamma = t64
        dgamma = torch.ones_like(t64)
    else:  # loglinear
        gamma = (1.0 - eps) * t64
        dgamma = torch.full_like(t64, 1.0 - eps)
    sigma = -torch.log1p(-gamma)
    dsigma = dgamma / (1.0 - gamma)
    ratio = (1.0 - gamma) / gamma
    cast = lambda x: x.to(out_dtype)
    return ScheduleValues(cast(gamma), cast(sigma), cast(dsigma), cast(ratio))


def d3diff_weights(
    t: torch.Tensor,
    num_masked: torch.Tensor,
    name: str = "cosine",
    eps: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The UniF²ace default per-token weights for :func:`unif2ace.ops.d3diff_loss`.

    ``t``: [B] time of each sequence; ``num_masked``: [B] masked tokens in each sequence.
    Returns per-sequence ``(ratio, w_ce, w_se)``, each [B]; expand them to the sequence's masked
    rows (``x[seq_of_row]``) before calling the loss.

    * ``w_ce = 1 / total masked tokens in the batch`` — Show-o's mean masked cross-entropy;
    * ``w_se = σ'(t) / total masked tokens`` — SEDD's continuous-time ELBO weight, normalised per
      token like the CE term;
    * ``ratio = a(t) = (1 − γ)/γ``.

    With ``alpha = 0.01`` (the paper's best, :data:`DEFAULT_ALPHA`) the loss is the UniF²ace D3Diff
    loss; ``alpha = 0`` is Show-o's masked cross-entropy; ``w_ce = 0, alpha = 1`` is SEDD's
    absorbing score entropy.
    """
    v = schedule(t, name, eps)
    total = num_masked.to(torch.float32).sum().clamp(min=1.0)
    w_ce = torch.full_like(v.ratio, 1.0, dtype=torch.float32) / total
    w_se = v.dsigma.to(torch.float32) / total
    return v.ratio.to(torch.float32), w_ce, w_se
