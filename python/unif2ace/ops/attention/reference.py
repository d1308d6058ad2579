"""The plain-PyTorch reference of omni-attention: the oracle of the tests (run it in fp64)."""

from __future__ import annotations

import math

import torch

from unif2ace.ops.attention.rotary import apply_rotary


def limit_mask(limit: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask ``[B, L, L]`` (True = may attend) of the rule
    ``(j < limit[b, i] and key_valid[b, j]) or j == i`` for ``limit [B, L]`` (integer) and
    ``key_valid [B, L]`` (bool or uint8; None: every key valid)."""
    B, L = limit.shape
    idx = torch.arange(L, device=limit.device)
    allowed = idx[None, None, :] < limit[:, :, None].long()
    if key_valid is not None:
        allowed = allowed & key_valid.bool()[:, None, :]
    return allowed | torch.eye(L, dtype=torch.bool, device=limit.device)[None]


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
    ``q, k, v [B, L, H, Dh]`` in, ``[B, L, H, Dh]`` out; differentiable (the gradient oracle)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if rotary is not None:
        cos, sin = (t[:, :, None] for t in rotary)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
    s = (qt @ kt.transpose(-1, -2)) * scale
    s = s.masked_fill(~limit_mask(limit, key_valid)[:, None], float("-inf"))
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)
