"""Omni-attention (Show-o): text tokens causal, image tokens bidirectional within their image.

Token i may attend to key j when

    key_valid[j]  and  (j <= i  or  (is_image[i] and is_image[j]))

(one image per sequence; padding keys never attended; a padding query attends to itself so no row
is empty). Four ways to compute it, all equal to :func:`omni_attention_ref`:

* the engine's **kernel** (:func:`unif2ace.ops.omni_attention`, C++ on CPU, fp32) when the ops'
  backend resolves to ``cpu`` and every row's image is one contiguous span: the rule is then a
  per-query key limit (the image's end for image tokens, ``i + 1`` for text), and the kernel reads
  only the keys a block of queries may see. :class:`Attention` passes it the projections'
  ``[B, L, H, Dh]`` views and the rotary tables, so q and k are turned inside the kernel and its
  output feeds the dense projection without a copy (a KV-cache prefill rotates in PyTorch, since
  the cache keeps the rotated keys, and calls the kernel without tables). ``use_backend("torch")``
  keeps the SDPA paths below (the baseline of ``benchmarks/bench_e2e.py``);
* **split** — when every row of the batch has its image at the same positions ``[s, e)`` and there is
  no padding: one causal call over the whole sequence, then one non-causal call for the image
  queries over the keys ``[0, e)`` that overwrites rows ``[s, e)``. Text after the image sees the
  whole image causally already; text before it never sees it. With flash-attn installed and CUDA
  fp16/bf16 tensors these are two ``flash_attn_func`` calls; otherwise two SDPA calls.
* **masked** — any layout (padding, images at different places): one SDPA call with the boolean
  mask above.
* the **reference**, plain softmax over the explicit mask (the oracle of the tests).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unif2ace.ops import attention as attention_op

try:  # optional: pip install unif2ace[gpu]
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def omni_mask(is_image: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask ``[B, L, L]`` (True = may attend) of the rule above."""
    B, L = is_image.shape
    idx = torch.arange(L, device=is_image.device)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, L, L]
    allowed = causal | (is_image[:, :, None] & is_image[:, None, :])
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
        allowed = allowed | torch.eye(L, dtype=torch.bool, device=is_image.device)[None]
    return allowed


def omni_attention_ref(q, k, v, is_image, key_valid=None) -> torch.Tensor:
    """Plain masked softmax attention. q, k, v: ``[B, H, L, Dh]``; returns ``[B, H, L, Dh]``."""
    allowed = omni_mask(is_image, key_valid)[:, None]  # [B, 1, L, L]
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def uniform_image_span(is_image: torch.Tensor) -> tuple[int, int] | None:
    """``(s, e)`` when every row's image tokens are exactly positions ``[s, e)``, else None."""
    row = is_image[0]
    if not bool(row.any()):
        return (0, 0) if not bool(is_image.any()) else None
    pos = row.nonzero().flatten()
    s, e = int(pos[0]), int(pos[-1]) + 1
    if e - s != pos.numel():
        return None
    if not torch.equal(is_image, row.expand_as(is_image)):
        return None
    return s, e


def _sdpa_split(q, k, v, s: int, e: int) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if e > s:
        img = F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e])
        out = torch.cat([out[:, :, :s], img, out[:, :, e:]], dim=2)
    return out


def _flash_split(q, k, v, s: int, e: int) -> torch.Tensor:
    # flash-attn takes [B, L, H, Dh]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    out = _flash_attn_func(qt, kt, vt, causal=True)
    if e > s:
        img = _flash_attn_func(qt[:, s:e], kt[:, :e], vt[:, :e], causal=False)
        out = torch.cat([out[:, :s], img, out[:, e:]], dim=1)
    return out.transpose(1, 2)


def flash_available(x: torch.Tensor) -> bool:
    return _flash_attn_func is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


def omni_attention(q, k, v, is_image, key_valid=None, *, impl: str = "auto") -> torch.Tensor:
    """Omni-attention of ``q, k, v [B, H, L, Dh]`` with ``is_image [B, L]`` and optional
    ``key_valid [B, L]``. ``impl``: ``"auto"`` (split when the layout allows, else masked),
    ``"split"``, ``"masked"`` or ``"ref"``. The engine's kernel is chosen by :class:`Attention`,
    which holds the un-rotated projections it takes."""
    if impl == "ref":
        return omni_attention_ref(q, k, v, is_image, key_valid)
    span = None
    if impl in ("auto", "split") and (key_valid is None or bool(key_valid.all())):
        span = uniform_image_span(is_image)
    if impl == "split" and span is None:
        raise ValueError("omni_attention(impl='split') needs one image span shared by all rows and no padding")
    if span is not None:
        return (_flash_split if flash_available(q) else _sdpa_split)(q, k, v, *span)
    allowed = omni_mask(is_image, key_valid)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


# ------------------------------------------------------------------------------------------------
# Rotary position embedding on the first ``rot`` dims of each head (Phi-1.5: half of them), in the
# rotate-half convention of transformers' Phi, so Phi checkpoints load unchanged.
# ------------------------------------------------------------------------------------------------


class Rotary(nn.Module):
    def __init__(self, rot_dim: int, theta: float):
        super().__init__()
        self.rot_dim = rot_dim
        inv = 1.0 / theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim)
        self.register_buffer("inv_freq", inv, persistent=False)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin [B, L, rot_dim / 2]`` (fp32) of ``positions [B, L]``: the ``rotary`` argument
        of :func:`unif2ace.ops.omni_attention`, which turns q and k inside its kernel."""
        ang = positions[..., None].float() * self.inv_freq
        return ang.cos(), ang.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x ``[B, H, L, Dh]``, positions ``[B, L]``."""
        r = self.rot_dim
        if r == 0:
            return x
        ang = positions[:, None, :, None].float() * self.inv_freq  # [B, 1, L, r/2]
        cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
        sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
        xr, xp = x[..., :r], x[..., r:]
        x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
        rotated = torch.cat([-x2, x1], -1)
        return torch.cat([xr * cos + rotated * sin, xp], -1)


class Attention(nn.Module):
    """Phi-1.5 attention: q/k/v/dense projections with bias, partial rotary, omni-attention."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(D, D) for _ in range(3))
        self.dense = nn.Linear(D, D)
        self.rotary = Rotary(int(cfg.head_dim * cfg.rotary_frac), cfg.rope_theta)
        self.impl = "auto"

    def forward(self, x, positions, is_image, key_valid, cache: dict | None = None):
        """``cache``: a dict that receives this layer's rotated keys and values (prefill)."""
        B, L, D = x.shape
        shape = (B, L, self.n_heads, self.head_dim)
        q, k, v = (p(x).view(shape) for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, L, H, Dh]
        limit = None  # set when the engine's kernel runs
        if self.impl == "auto" and attention_op.uses_kernel(q):
            limit = attention_op.omni_limit(is_image)
        if limit is not None and cache is None:  # rotary inside the kernel, no copies
            rot = self.rotary.tables(positions) if self.rotary.rot_dim else None
            o = attention_op.omni_attention(q, k, v, limit, key_valid, rotary=rot)
            return self.dense(o.reshape(B, L, D))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = self.rotary(q, positions), self.rotary(k, positions)  # [B, H, L, Dh]
        if cache is not None:
            cache["k"], cache["v"] = k, v
        if limit is not None:  # prefill: the kernel on the rotated keys the cache keeps
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            o = attention_op.omni_attention(qt, kt, vt, limit, key_valid)
        else:
            o = omni_attention(q, k, v, is_image, key_valid, impl=self.impl).transpose(1, 2)
        return self.dense(o.reshape(B, L, D))

    def decode(self, x, positions, cache: dict, key_valid):
        """One new text token per row: x ``[B, 1, D]`` at ``positions [B, 1]``, attending to the
        cached keys (``key_valid [B, Lc]``) and itself; appends its key and value to ``cache``."""
        B, _, D = x.shape
        shape = (B, 1, self.n_heads, self.head_dim)
        q, k, v = (p(x).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        cache["k"] = torch.cat([cache["k"], k], 2)
        cache["v"] = torch.cat([cache["v"], v], 2)
        o = F.scaled_dot_product_attention(q, cache["k"], cache["v"], attn_mask=key_valid[:, None, None, :])
        return self.dense(o.transpose(1, 2).reshape(B, 1, D))
