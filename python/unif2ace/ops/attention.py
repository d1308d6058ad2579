"""Omni-attention with per-query key limits: the attention of Show-o's mixed text / image sequences.

Contract (every backend's)
--------------------------
``q, k, v [B, L, H, Dh]`` (flash-attn's layout; any strides with the head dimension contiguous),
``limit`` integer ``[B, L]`` and ``key_valid`` bool ``[B, L]`` (None: every key valid). Query
``i`` of sequence ``b`` may attend to key ``j`` when::

    (j < limit[b, i]  and  key_valid[b, j])  or  j == i

and the output is ``softmax(scale · q kᵀ + mask) v`` over those keys, ``[B, L, H, Dh]``
(``scale`` default ``1/sqrt(Dh)``). ``rotary = (cos, sin)``, each ``[B, L, half]``, first turns q and
k by the rotary embedding in the rotate-half convention (transformers' Phi / Llama): elements ``d``
and ``d + half`` of each head, ``d < half``, by the angle of that position (:func:`apply_rotary`);
the gradients are those of the un-rotated q and k. A query always sees itself, so no row is empty. With
``limit = i + 1`` this is causal attention; Show-o's omni-attention (text causal, image tokens
bidirectional within their image) is ``limit = e`` for the image tokens ``[s, e)`` of a sequence and
``i + 1`` elsewhere (:func:`omni_limit`); prefix-LM and full attention are other limits. Padding
queries (``key_valid`` False) see the valid keys before them and themselves, as the model's
boolean mask always did.

Backends: ``torch`` is :func:`torch.nn.functional.scaled_dot_product_attention` with the boolean
mask (the plain-PyTorch path, also the fallback for other dtypes and head sizes); ``cpu`` is the
C++ kernel (``csrc/cpu/attention.cpp``, fp32, head sizes 16/32/64/128), which reads only the keys a
block of queries may see instead of masking the full ``L × L`` scores. On CUDA the model keeps its
two flash-attn calls (:mod:`unif2ace.models.attention`); there is no Triton / CUDA kernel of this op
yet. :func:`omni_attention_ref` (explicit softmax, any dtype) is the oracle of the tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from unif2ace import _backend
from unif2ace.ops._validate import check_device

OP = "omni_attention"


def omni_limit(is_image: torch.Tensor) -> torch.Tensor | None:
    """``limit [B, L]`` (int32) of Show-o's omni-attention for ``is_image [B, L]``: the end of the
    image for image tokens, ``i + 1`` for the others. None when a sequence's image tokens are not
    one contiguous span (the rule then is not a per-query limit; use the boolean mask)."""
    B, L = is_image.shape
    idx = torch.arange(L, device=is_image.device)
    last = torch.where(is_image, idx, -1).amax(1) if L else is_image.new_zeros(B, dtype=torch.long)
    first = torch.where(is_image, idx, L).amin(1) if L else last
    count = is_image.sum(1)
    if not bool(((count == 0) | (last - first + 1 == count)).all()):
        return None
    return torch.where(is_image, (last + 1)[:, None], idx + 1).to(torch.int32)


def limit_mask(limit: torch.Tensor, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean mask ``[B, L, L]`` (True = may attend) of the contract's rule."""
    B, L = limit.shape
    idx = torch.arange(L, device=limit.device)
    allowed = idx[None, None, :] < limit[:, :, None].long()
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    return allowed | torch.eye(L, dtype=torch.bool, device=limit.device)[None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding of ``x [B, L, H, Dh]`` by ``cos, sin [B, L, half]``."""
    h = cos.shape[-1]
    c, s = (t[:, :, None, :].to(x.dtype) for t in (cos, sin))
    a, b = x[..., :h], x[..., h : 2 * h]
    return torch.cat([a * c - b * s, b * c + a * s, x[..., 2 * h :]], dim=-1)


def omni_attention_ref(q, k, v, limit, key_valid=None, scale: float | None = None,
                       rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
    """The oracle: explicit masked softmax in the inputs' dtype. ``[B, L, H, Dh]`` in and out."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, L, Dh]
    s = (qt @ kt.transpose(-1, -2)) * scale
    s = s.masked_fill(~limit_mask(limit, key_valid)[:, None], float("-inf"))
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)


def _sdpa(q, k, v, limit, key_valid, scale, rotary):
    if rotary is not None:
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    mask = limit_mask(limit, key_valid)[:, None]
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)


# A constant of the build (torch.compile must not trace the extension import).
@torch.compiler.assume_constant_result
def _kernel_head_size(head_dim: int) -> bool:
    ext = _backend.cpu_ext()
    if ext is None or not hasattr(ext, "omni_attention_supported"):  # None, or an older build
        return False
    return bool(ext.omni_attention_supported(head_dim))


def kernel_supports(q: torch.Tensor) -> bool:
    """Whether the C++ kernel takes this query tensor (CPU, fp32, a compiled head size)."""
    return (
        q.device.type == "cpu" and q.dtype == torch.float32 and q.dim() == 4
        and _kernel_head_size(int(q.shape[-1]))
    )  # fmt: skip


def uses_kernel(q: torch.Tensor, backend: str | None = None) -> bool:
    """Whether :func:`omni_attention` with ``backend`` runs the C++ kernel for ``q``."""
    return _backend.resolve(backend, q.device, OP) == "cpu" and kernel_supports(q)


# ------------------------------------------------------------------------------------------------
# The cpu backend as two custom ops (autograd between them; torch.compile sees fake tensors).
# ------------------------------------------------------------------------------------------------


def _arg(t: torch.Tensor) -> tuple[int, int, int, int]:
    return (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _rope_args(cos, sin) -> tuple[int, int, int]:
    if cos is None:
        return 0, 0, 0
    return cos.data_ptr(), sin.data_ptr(), cos.shape[-1]


@torch.library.custom_op("unif2ace::omni_attention_fwd", mutates_args=())
def _omni_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, limit: torch.Tensor,
              key_valid: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    B, L, H, Dh = q.shape
    out = torch.empty((B, L, H, Dh), dtype=q.dtype)
    lse = torch.empty((B, H, L), dtype=torch.float32)
    _backend.cpu_ext().omni_attention_fwd(
        _arg(q), _arg(k), _arg(v), B, L, H, Dh, limit.data_ptr(), key_valid.data_ptr(),
        *_rope_args(cos, sin), scale, out.data_ptr(), lse.data_ptr(),
    )  # fmt: skip
    return out, lse


@_omni_fwd.register_fake
def _(q, k, v, limit, key_valid, cos, sin, scale):
    B, L, H, Dh = q.shape
    return q.new_empty((B, L, H, Dh)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("unif2ace::omni_attention_bwd", mutates_args=())
def _omni_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, grad_out: torch.Tensor, limit: torch.Tensor,
              key_valid: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    B, L, H, Dh = q.shape
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = (torch.empty((B, L, H, Dh), dtype=q.dtype) for _ in range(3))
    _backend.cpu_ext().omni_attention_bwd(
        _arg(q), _arg(k), _arg(v), _arg(out), _arg(grad_out), B, L, H, Dh, limit.data_ptr(),
        key_valid.data_ptr(), *_rope_args(cos, sin), scale, lse.data_ptr(), dq.data_ptr(),
        dk.data_ptr(), dv.data_ptr(),
    )  # fmt: skip
    return dq, dk, dv


@_omni_bwd.register_fake
def _(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup(ctx, inputs, output):
    q, k, v, limit, key_valid, cos, sin, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, output[0], output[1], limit, key_valid, cos, sin)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, limit, key_valid, cos, sin = ctx.saved_tensors
    dq, dk, dv = _omni_bwd(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, ctx.scale)
    return dq, dk, dv, None, None, None, None, None


_omni_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------------------
# The public op
# ------------------------------------------------------------------------------------------------


def _check(q, k, v, limit, key_valid, rotary):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be [B, L, H, Dh], got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"{OP}: q, k, v must have one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, L = q.shape[:2]
    if not isinstance(limit, torch.Tensor) or limit.shape != (B, L) or limit.is_floating_point():
        got = tuple(limit.shape) if isinstance(limit, torch.Tensor) else type(limit).__name__
        raise ValueError(f"{OP}: limit must be an integer tensor [B, L] = [{B}, {L}], got {got}")
    if key_valid is not None and (key_valid.shape != (B, L) or key_valid.dtype != torch.bool):
        raise ValueError(f"{OP}: key_valid must be a bool tensor [{B}, {L}], got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")  # fmt: skip
    check_device(OP, q.device, k=k, v=v, limit=limit,
                 **({} if key_valid is None else {"key_valid": key_valid}))  # fmt: skip
    if rotary is not None:
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise ValueError(f"{OP}: rotary must be a pair (cos, sin), got {type(rotary).__name__}")
        cos, sin = rotary
        half = cos.shape[-1] if isinstance(cos, torch.Tensor) else -1
        if (not isinstance(sin, torch.Tensor) or cos.shape != (B, L, half) or sin.shape != cos.shape
                or 2 * half > q.shape[-1] or not cos.is_floating_point()):  # fmt: skip
            raise ValueError(f"{OP}: rotary (cos, sin) must be two floating tensors [B, L, half] = "
                             f"[{B}, {L}, <= {q.shape[-1] // 2}]")  # fmt: skip
        check_device(OP, q.device, cos=cos, sin=sin)
    if _backend.checks_enabled() and limit.numel() and not torch.compiler.is_compiling():
        lo, hi = int(limit.min()), int(limit.max())
        if lo < 0 or hi > L:
            raise ValueError(f"{OP}: limit must lie in [0, L] = [0, {L}], got [{lo}, {hi}]")


def omni_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v [B, L, H, Dh]`` under the per-query key ``limit [B, L]`` and the
    key mask ``key_valid [B, L]`` (the module docstring has the rule), q and k first turned by
    ``rotary = (cos, sin)`` when given. Returns ``[B, L, H, Dh]``,
    contiguous from the ``cpu`` backend. ``backend``: None (process default), ``"auto"``,
    ``"torch"`` or ``"cpu"``; under ``"auto"`` inputs the kernel does not take (other dtypes, head
    sizes, devices) run the ``torch`` path."""
    _check(q, k, v, limit, key_valid, rotary)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    name = _backend.resolve(backend, q.device, OP)
    if name == "cpu" and not kernel_supports(q):
        if backend not in (None, "auto"):
            raise ValueError(f"{OP}: the cpu kernel takes fp32 with head size 16, 32, 64 or 128; "
                             f"got {q.dtype}, head size {q.shape[-1]}")  # fmt: skip
        name = "torch"
    if name in ("triton", "cuda"):
        if backend not in (None, "auto"):
            raise ValueError(f"{OP}: no {name} kernel yet; use backend='torch' (or flash-attn)")
        name = "torch"
    if name == "torch":
        return _sdpa(q, k, v, limit, key_valid, scale, rotary)
    B, L = limit.shape
    kv = (torch.ones((B, L), dtype=torch.uint8) if key_valid is None
          else key_valid.to(torch.uint8)).contiguous()  # fmt: skip
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = (None, None) if rotary is None else (t.to(torch.float32).contiguous() for t in rotary)
    out, _ = _omni_fwd(q, k, v, limit.to(torch.int32).contiguous(), kv, cos, sin, scale)
    return out
