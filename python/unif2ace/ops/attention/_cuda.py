"""The "cuda" launcher of omni-attention: flash-attn's kernels for the split layout.

Given a ``span`` (every row with the same image span ``[s, e)``, no padding: host values from the
caller) and tensors flash-attn takes (CUDA, fp16 / bf16), the attention is two ``flash_attn_func``
calls: causal over the whole sequence, then non-causal for the queries ``[s, e)`` over the keys
``[0, e)``, which overwrites those rows. Otherwise the "torch" launcher's SDPA (which has its own
CUDA kernels). There is no CUDA kernel of the per-query limit rule yet. The launcher is
differentiable through flash-attn's and SDPA's own autograd; the public op runs it inside the
custom op ``unif2ace::omni_attention`` (:mod:`._custom_ops`), so fake tensors and torch.compile
never reach it. Contract: the module docstring of :mod:`unif2ace.ops.attention._torch`.
"""

from __future__ import annotations

import functools

import torch

from unif2ace import _backend
from unif2ace.ops.attention import _torch


@functools.cache
def _flash_attn_func():
    # Imported on first use: flash-attn is heavy and optional (pip install unif2ace[gpu]).
    try:
        from flash_attn import flash_attn_func
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None
    return flash_attn_func


def flash_available(x: torch.Tensor) -> bool:
    """Whether flash-attn is installed and takes ``x`` (CUDA, fp16 / bf16)."""
    return (
        x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _flash_attn_func() is not None
    )


@_backend.register("attention.omni", "cuda")
def omni(q, k, v, limit, key_valid, cos, sin, scale, span):
    with torch.cuda.device(q.device):
        qt, kt, vt = _torch.rotated_heads_first(q, k, v, cos, sin)
        if span is None or not flash_available(q):
            return _torch.sdpa(qt, kt, vt, limit, key_valid, span, scale).transpose(1, 2)
        flash = _flash_attn_func()
        s, e = span
        q, k, v = (x.transpose(1, 2) for x in (qt, kt, vt))  # flash-attn takes [B, L, H, Dh]
        out = flash(q, k, v, softmax_scale=scale, causal=True)
        if e > s:
            img = flash(q[:, s:e], k[:, :e], v[:, :e], softmax_scale=scale, causal=False)
            out = torch.cat([out[:, :s], img, out[:, e:]], dim=1)
        return out
