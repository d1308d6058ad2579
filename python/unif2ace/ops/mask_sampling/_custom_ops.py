"""The torch.library custom ops of the mask-sampling family and their fakes.

``unif2ace::mask_tokens_fwd`` and ``unif2ace::maskgit_step_fwd`` allocate the outputs and call the
``backend`` launcher of ``"mask_sampling.mask_tokens"`` / ``"mask_sampling.maskgit_step"``
(contract in :mod:`unif2ace.ops.mask_sampling._torch`). The fakes give the output shapes to
torch.compile. No autograd: sampling has no gradient.
"""

from __future__ import annotations

import math

import torch

from unif2ace import _backend
from unif2ace.ops._validate import check_finite, check_index_range
from unif2ace.ops.mask_sampling import _cpu, _cuda, _torch, _triton  # noqa: F401  (registration)


@torch.library.custom_op("unif2ace::mask_tokens_fwd", mutates_args=())
def mask_tokens(
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
    launch = _backend.launcher("mask_sampling.mask_tokens", backend)
    launch(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask)
    return out_ids, out_mask


@mask_tokens.register_fake
def _(ids, gamma, n_mask, mask_id, seed, offset, mode, backend):
    return torch.empty_like(ids), ids.new_empty(ids.shape, dtype=torch.bool)


@torch.library.custom_op("unif2ace::maskgit_step_fwd", mutates_args=())
def maskgit_step(
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
    """The step on validated inputs. The data-dependent checks run here, inside the op, so that
    torch.compile does not trace their host syncs: those of ``ids`` and ``mask_len`` when
    ``check_values`` (maskgit_decode checks them at its first step only), those of the logits
    and the supplied noise whenever the value checks are on."""
    if check_values:
        check_step_values("maskgit_step", logits.shape[2], ids, mask_len, mask_id)
    check_step_logits(
        "maskgit_step", logits, uncond, ids, mask_id, guidance, inv_temperature,
        gumbel_noise, choice_noise,
    )  # fmt: skip
    B, L = ids.shape
    outputs = (  # out_ids, out_mask, confidence
        torch.empty_like(ids),
        torch.empty((B, L), dtype=torch.bool, device=ids.device),
        torch.empty((B, L), dtype=torch.float32, device=ids.device),
    )
    scalars = (mask_id, guidance, inv_temperature, choice_temperature, seed, offset)
    launch = _backend.launcher("mask_sampling.maskgit_step", backend)
    launch(logits, uncond, ids, mask_len, *scalars, gumbel_noise, choice_noise, *outputs)
    return outputs


@maskgit_step.register_fake
def _(logits, uncond, ids, *_):
    B, L = ids.shape
    return (
        torch.empty_like(ids),
        ids.new_empty((B, L), dtype=torch.bool),
        ids.new_empty((B, L), dtype=torch.float32),
    )


def check_step_values(op: str, n_cols: int, ids: torch.Tensor, mask_len: torch.Tensor, mask_id):
    """Data-dependent checks of a step (a host sync on GPU; off with unif2ace.set_checks(False)):
    ids in [0, n_cols) or mask_id; mask_len[b] in [0, masked positions of row b]."""
    if not _backend.checks_enabled() or ids.numel() == 0:
        return
    check_index_range(ids, n_cols, op, "ids", ignore_index=mask_id)
    unknown = (ids == mask_id).sum(dim=1)
    bad = (mask_len < 0) | (mask_len > unknown)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{op}: mask_len must be in [0, number of masked positions] per sequence; sequence {b} "
            f"has mask_len = {int(mask_len[b])} with {int(unknown[b])} masked positions"
        )


def check_step_logits(op, logits, uncond, ids, mask_id, guidance, inv_t, gumbel, choice) -> None:
    """Value checks of what a step samples from (off with unif2ace.set_checks(False)): at every
    masked position, ``logits`` and ``uncond_logits`` hold no NaN or +inf, the guided,
    temperature-scaled ``y = ((1 + g)·cond − g·uncond)·(1/T)`` (as the reference computes it)
    holds no NaN or +inf and is not −inf for every token; the supplied noise is finite. Known
    positions are not checked: their logits are never read. Cost: one pass over the logits (and
    a [B, L, K] temporary of y), one host read."""
    if not _backend.checks_enabled() or ids.numel() == 0:
        return
    for name, t in (("gumbel_noise", gumbel), ("choice_noise", choice)):
        if t is not None:
            check_finite(t, op, name)
    unknown = ids == mask_id
    wdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    y = logits.to(wdt)
    named = [("logits", y)] + ([] if uncond is None else [("uncond_logits", uncond.to(wdt))])
    flags = [(~(t < math.inf)).any(-1) for _, t in named]  # NaN or +inf in a row
    if uncond is not None:
        y = (1.0 + guidance) * y - guidance * named[1][1]
    y = y * inv_t
    flags += [(~(y < math.inf)).any(-1), ~(y > -math.inf).any(-1)]
    flags = torch.stack(flags) & unknown
    hit = flags.flatten(1).any(1).tolist()  # the one host read
    if not any(hit):
        return
    i = hit.index(True)
    b, l_ = (int(v) for v in flags[i].nonzero()[0])
    where = f"at masked position (b={b}, l={l_})"
    if i < len(named):
        raise ValueError(
            f"{op}: {named[i][0]} has NaN or +inf {where}; the distribution to sample is undefined "
            "(with unif2ace.set_checks(False) such a token counts as -inf: never sampled)"
        )
    if i == len(named):
        raise ValueError(
            f"{op}: logits give NaN or +inf after guidance and temperature "
            f"(((1 + g)·logits − g·uncond_logits)/T) {where}: -inf in uncond_logits with g > 0, "
            "or beyond float32"
        )
    raise ValueError(f"{op}: logits are -inf for every token {where}: no token can be sampled")
