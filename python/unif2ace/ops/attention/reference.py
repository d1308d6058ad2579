"""The plain-PyTorch reference of omni-attention: the oracle of the tests (run it in fp64)."""

from __future__ import annotations

import math

import torch

from unif2ace.ops.attention.rotary import apply_rotary


def limit_mask(
    limit: torch.Tensor, key_valid: torch.Tensor | None = None, n_keys: int | None = None
) -> torch.Tensor:
    """The boolean mask ``[B, Lq, Lk]`` (True = may attend) of the rule
    ``(j < limit[b, i] and key_valid[b, j]) or j == Lk - Lq + i`` for ``limit [B, Lq]`` (integer)
    and ``key_valid [B, Lk]`` (bool or uint8; None: every key valid). ``Lk`` is key_valid's length,
    else ``n_keys``, else ``Lq``; the queries are the last ``Lq`` positions."""
    B, Lq = limit.shape
    Lk = key_valid.shape[1] if key_valid is not None else (Lq if n_keys is None else n_keys)
    j = torch.arange(Lk, device=limit.device)
    allowed = j[None, None, :] < limit[:, :, None].long()
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    own = torch.arange(Lk - Lq, Lk, device=limit.device)
    return allowed | (j[None, :] == own[:, None])[None]


def omni_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Explicit masked softmax in the inputs' dtype: ``softmax(scale · q kᵀ + mask) v`` with the
    mask of :func:`limit_mask`, q and k first turned by ``rotary = (cos, sin) [B, L, half]``.
    ``q [B, Lq, H, Dh]``, ``k, v [B, Lk, H, Dh]`` in, ``[B, Lq, H, Dh]`` out; differentiable
    (the gradient oracle)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if rotary is not None:
        cos, sin = (t[:, :, None] for t in rotary)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
    s = (qt @ kt.transpose(-1, -2)) * scale
    s = s.masked_fill(~limit_mask(limit, key_valid, k.shape[1])[:, None], float("-inf"))
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)
