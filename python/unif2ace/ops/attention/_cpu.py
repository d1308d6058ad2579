"""The "cpu" launchers of omni-attention: ``unif2ace._C.omni_attention_fwd`` / ``_bwd``
(``csrc/cpu/attention.cpp``: fp32, head sizes 16/32/64/128, rotary applied inside). The kernel
reads only the keys a block of queries may see instead of masking the full ``L × L`` scores.

Contract: the module docstring of :mod:`unif2ace.ops.attention._torch`.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops._native import desc


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


@_backend.register("attention.omni_fwd", "cpu")
def omni_fwd(q, k, v, limit, key_valid, cos, sin, scale, out, lse):
    _backend.cpu_ext().omni_attention_fwd(
        desc(q),
        desc(k),
        desc(v),
        desc(limit),
        desc(key_valid),
        desc(cos),
        desc(sin),
        scale,
        desc(out),
        desc(lse),
    )


@_backend.register("attention.omni_bwd", "cpu")
def omni_bwd(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale, dq, dk, dv):
    _backend.cpu_ext().omni_attention_bwd(
        desc(q),
        desc(k),
        desc(v),
        desc(out),
        desc(grad_out),
        desc(limit),
        desc(key_valid),
        desc(cos),
        desc(sin),
        scale,
        desc(lse),
        desc(dq),
        desc(dk),
        desc(dv),
    )
