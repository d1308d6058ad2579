"""The rotary position embedding: the one implementation the ops and the model share.

Rotate-half convention (transformers' Phi / Llama), on the first ``2 · half`` dims of each head:
elements ``d`` and ``d + half`` (``d < half``) turn by the angle of their position, the other dims
pass through. The C++ omni-attention kernel applies the same rotation inside (``rotary=`` of
:func:`unif2ace.ops.omni_attention`).
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [..., Dh]``::

        out[..., d]        = x[..., d] · cos[..., d] − x[..., d + half] · sin[..., d]
        out[..., d + half] = x[..., d + half] · cos[..., d] + x[..., d] · sin[..., d]
        out[..., 2·half:]  = x[..., 2·half:]

    for ``d < half``, where ``half = cos.shape[-1]`` (``2 · half ≤ Dh``). ``cos, sin [..., half]``
    broadcast against ``x[..., :half]`` (e.g. ``[B, L, 1, half]`` for ``x [B, L, H, Dh]``,
    ``[B, 1, L, half]`` for ``x [B, H, L, Dh]``) and are cast to ``x``'s dtype. Returns a new
    contiguous tensor of ``x``'s shape.
    """
    h = cos.shape[-1]
    c, s = cos.to(x.dtype), sin.to(x.dtype)
    a, b = x[..., :h], x[..., h : 2 * h]
    return torch.cat([a * c - b * s, b * c + a * s, x[..., 2 * h :]], dim=-1)
