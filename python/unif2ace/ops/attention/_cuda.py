"""The "cuda" launcher of omni-attention: flash-attn's kernels for the split layout.

When :func:`~unif2ace.ops.attention._torch.split_span` finds the split layout (every row with the
same image span ``[s, e)``, no padding) and flash-attn takes the tensors (CUDA, fp16 / bf16), the
attention is two ``flash_attn_func`` calls: causal over the whole sequence, then non-causal for the
queries ``[s, e)`` over the keys ``[0, e)``, which overwrites those rows. Otherwise the "torch"
launcher's SDPA (which has its own CUDA kernels). There is no CUDA kernel of the per-query limit
rule yet. Contract: the module docstring of :mod:`unif2ace.ops.attention._torch`.
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
def omni(q, k, v, limit, key_valid, cos, sin, scale):
    with torch.cuda.device(q.device):
        qt, kt, vt = _torch.rotated_heads_first(q, k, v, cos, sin)
        span = _torch.split_span(limit, key_valid) if q.shape[1] == k.shape[1] else None
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
