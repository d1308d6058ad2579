"""The "cpu" launchers of omni-attention: ``unif2ace._C.omni_attention_fwd`` / ``_bwd``
(``csrc/cpu/attention.cpp``: fp32, head sizes 16/32/64/128, rotary applied inside). The kernel
reads only the keys a block of queries may see instead of masking the full ``L × L`` scores.

Contract: the module docstring of :mod:`unif2ace.ops.attention._torch`.
"""

from __future__ import annotations

import torch

from unif2ace import _backend


# A constant of the build (torch.compile must not trace the extension import).
@torch.compiler.assume_constant_result
def _head_size_compiled(head_dim: int) -> bool:
    ext = _backend.cpu_ext()
    return ext is not None and bool(ext.omni_attention_supported(head_dim))


def supports(q: torch.Tensor) -> bool:
    """Whether the C++ kernel takes this query tensor (CPU, fp32, a compiled head size)."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and q.dim() == 4
        and _head_size_compiled(int(q.shape[-1]))
    )


def _arg(t: torch.Tensor) -> tuple[int, int, int, int]:
    return (t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _rope_args(cos, sin) -> tuple[int, int, int]:
    if cos is None:
        return 0, 0, 0
    return cos.data_ptr(), sin.data_ptr(), cos.shape[-1]


@_backend.register("attention.omni_fwd", "cpu")
def omni_fwd(q, k, v, limit, key_valid, cos, sin, scale, out, lse):
    B, L, H, Dh = q.shape
    _backend.cpu_ext().omni_attention_fwd(
        _arg(q),
        _arg(k),
        _arg(v),
        B,
        L,
        H,
        Dh,
        limit.data_ptr(),
        key_valid.data_ptr(),
        *_rope_args(cos, sin),
        scale,
        out.data_ptr(),
        lse.data_ptr(),
    )


@_backend.register("attention.omni_bwd", "cpu")
def omni_bwd(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale, dq, dk, dv):
    B, L, H, Dh = q.shape
    _backend.cpu_ext().omni_attention_bwd(
        _arg(q),
        _arg(k),
        _arg(v),
        _arg(out),
        _arg(grad_out),
        B,
        L,
        H,
        Dh,
        limit.data_ptr(),
        key_valid.data_ptr(),
        *_rope_args(cos, sin),
        scale,
        lse.data_ptr(),
        dq.data_ptr(),
        dk.data_ptr(),
        dv.data_ptr(),
    )
