"""Phi-1.5 attention with Show-o's omni-attention rule, and its rotary position embedding.

Token ``i`` may attend to key ``j`` when

    key_valid[j]  and  (j <= i  or  (is_image[i] and is_image[j]))

or ``j == i`` (one image per row, its tokens one contiguous span ``[s, e)``; padding keys are never
attended; a padding query attends to itself so no row is empty). That is the per-query key limit
``e`` for the image tokens and ``i + 1`` for the others (:func:`unif2ace.ops.omni_limit`; the
model computes it once per forward), so every forward pass is one call of
:func:`unif2ace.ops.omni_attention`, whose backend decides how: the C++ kernel on CPU fp32 (rotary
inside, no copies), SDPA under ``use_backend("torch")`` (two calls when every row has its image at
the same place and no padding, else the boolean mask), flash-attn on CUDA fp16 / bf16 for that same
layout. Whether the batch has that layout the model knows from its host metadata; it passes it as
the op's ``span``, so no layer reads it back from the device. :meth:`Attention.decode` (one new
token against the KV cache) is the same op with one query and the cached keys.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from unif2ace import ops
from unif2ace.ops.attention import apply_rotary


class Rotary(nn.Module):
    """Rotary position embedding on the first ``rot_dim`` dims of each head (Phi-1.5: half of
    them), in the rotate-half convention of transformers' Phi, so Phi checkpoints load unchanged
    (:func:`unif2ace.ops.attention.apply_rotary`)."""

    def __init__(self, rot_dim: int, theta: float):
        super().__init__()
        self.rot_dim, self.theta = rot_dim, theta
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        r = self.rot_dim
        return 1.0 / self.theta ** (torch.arange(0, r, 2, dtype=torch.float32) / r)

    def reset_buffers(self) -> None:
        """Recompute the frequencies (after ``to_empty``: a model built on the meta device)."""
        self.inv_freq = self._inv_freq().to(self.inv_freq.device)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, L, rot_dim / 2]`` (fp32) of ``positions [B, L]``: the ``rotary`` argument
        of :func:`unif2ace.ops.omni_attention`."""
        ang = positions[..., None].float() * self.inv_freq
        return ang.cos(), ang.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x [B, H, L, Dh]`` turned by ``positions [B, L]``."""
        if self.rot_dim == 0:
            return x
        cos, sin = self.tables(positions)
        return apply_rotary(x, cos[:, None], sin[:, None])


class Attention(nn.Module):
    """Phi-1.5 attention: q/k/v/dense projections with bias, optional QK-LayerNorm (Show-o: over
    each head's dimension, affine, before rotary), partial rotary, omni-attention."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.dense = nn.Linear(D, D)
        if cfg.qk_norm:
            self.q_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_layernorm = nn.LayerNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.rotary = Rotary(int(cfg.head_dim * cfg.rotary_frac), cfg.rope_theta)

    def _qkv(self, x: torch.Tensor):
        """q, k, v ``[B, L, H, Dh]`` of x ``[B, L, D]`` (q and k normed, not rotated)."""
        B, L, _ = x.shape
        shape = (B, L, self.n_heads, self.head_dim)
        q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return q, k, v

    def forward(
        self, x, positions, limit, key_valid, cache: dict | None = None, span="auto", past=None
    ):
        """x ``[B, L, D]``; positions, limit (int32, :func:`unif2ace.ops.omni_limit`) and key_valid
        (bool or None) ``[B, L]``. ``cache``: a dict that receives this layer's rotated keys and
        values ``[B, H, L, Dh]`` (prefill). ``span``: the layout as host values, ``(s, e)`` or
        None, as :func:`unif2ace.ops.omni_attention` takes it ("auto": the op reads it).

        ``past``: a cache dict of earlier positions (a prefix computed once, e.g. Show-o's text
        prompt while the image is decoded): x then holds the positions after them, attending to
        the ``Lp`` cached keys and to each other; ``limit`` counts keys from the start of the
        prefix and ``key_valid`` is ``[B, Lp + L]``."""
        B, L, D = x.shape
        q, k, v = self._qkv(x)  # [B, L, H, Dh]
        if cache is None and past is None:  # rotary inside the op (inside the kernel on CPU)
            rot = self.rotary.tables(positions) if self.rotary.rot_dim else None
            o = ops.omni_attention(q, k, v, limit, key_valid, span=span, rotary=rot)
        else:  # the cache keeps the rotated keys
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = self.rotary(q, positions), self.rotary(k, positions)  # [B, H, L, Dh]
            if past is not None:
                k, v = torch.cat([past["k"], k], 2), torch.cat([past["v"], v], 2)
                span = None
            if cache is not None:
                cache["k"], cache["v"] = k, v
            qkv = (t.transpose(1, 2) for t in (q, k, v))
            o = ops.omni_attention(*qkv, limit, key_valid, span=span)
        return self.dense(o.reshape(B, L, D))

    def decode(self, x, positions, cache: dict, key_valid):
        """One new text token per row: x ``[B, 1, D]`` at ``positions [B, 1]``, attending to the
        cached keys (``key_valid [B, Lc]``) and itself; appends its key and value to ``cache``."""
        B, _, D = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x))
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        cache["k"] = torch.cat([cache["k"], k], 2)
        cache["v"] = torch.cat([cache["v"], v], 2)
        Lk = cache["k"].shape[2]
        limit = torch.full((B, 1), Lk, dtype=torch.int32, device=x.device)  # causal: every key
        kt, vt = cache["k"].transpose(1, 2), cache["v"].transpose(1, 2)
        o = ops.omni_attention(q.transpose(1, 2), kt, vt, limit, key_valid, span=None)
        return self.dense(o.reshape(B, 1, D))
