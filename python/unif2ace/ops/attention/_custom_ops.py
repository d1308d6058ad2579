"""The omni-attention custom ops: torch.library registration, fakes and autograd.

Every backend but "torch" (plain PyTorch, which traces and fakes by itself) runs behind custom ops,
so torch.compile and fake tensors see only their fakes and never reach a real kernel
(:func:`omni` chooses):

* the backends with the kernel pair (``"attention.omni_fwd"`` / ``"attention.omni_bwd"``: "cpu"):
  ``unif2ace::omni_attention_fwd`` runs the forward kernel (writing the output and the
  log-sum-exp), ``unif2ace::omni_attention_bwd`` the backward kernel; autograd connects them. The
  "cpu" backend's ``"attention.omni"`` launcher is this pair.
* the others ("cuda", whose ``"attention.omni"`` launcher is flash-attn or SDPA, differentiable
  by their own autograd): ``unif2ace::omni_attention`` runs that launcher without autograd; its
  autograd formula runs the launcher again under autograd and differentiates it (flash-attn's
  and SDPA's own backward kernels). The backward so recomputes the forward once (as activation
  checkpointing does): the price of not reaching into flash-attn's private forward / backward
  functions for the log-sum-exp they exchange, which differ between its versions.

Contract: :mod:`unif2ace.ops.attention._torch`.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.attention import _cpu, _cuda, _torch  # noqa: F401  (registration)


@torch.library.custom_op("unif2ace::omni_attention_fwd", mutates_args=())
def omni_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, H, Dh = q.shape
    out = torch.empty((B, L, H, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _backend.launcher("attention.omni_fwd", backend)(
        q, k, v, limit, key_valid, cos, sin, scale, out, lse
    )
    return out, lse


@omni_fwd.register_fake
def _(q, k, v, limit, key_valid, cos, sin, scale, backend):
    B, L, H, Dh = q.shape
    return q.new_empty((B, L, H, Dh)), q.new_empty((B, H, L), dtype=torch.float32)


@torch.library.custom_op("unif2ace::omni_attention_bwd", mutates_args=())
def omni_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    _backend.launcher("attention.omni_bwd", backend)(
        q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale, dq, dk, dv
    )
    return dq, dk, dv


@omni_bwd.register_fake
def _(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale, backend):
    return tuple(q.new_empty(q.shape) for _ in range(3))


def _setup(ctx, inputs, output):
    q, k, v, limit, key_valid, cos, sin, scale, backend = inputs
    ctx.scale, ctx.backend = scale, backend
    ctx.save_for_backward(q, k, v, output[0], output[1], limit, key_valid, cos, sin)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, limit, key_valid, cos, sin = ctx.saved_tensors
    dq, dk, dv = omni_bwd(
        q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, ctx.scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None, None


omni_fwd.register_autograd(_backward, setup_context=_setup)


def kernel_pair(q, k, v, limit, key_valid, cos, sin, scale, backend: str) -> torch.Tensor:
    """``"attention.omni"`` through the custom ops: the inputs brought to the kernels' contract
    (int32 limit, uint8 key_valid, float32 tables, all contiguous; q, k, v keep their strides
    unless the head dimension is strided), then ``out [B, L, H, Dh]`` (contiguous)."""
    B, L = limit.shape
    kv = torch.ones((B, L), dtype=torch.uint8, device=q.device) if key_valid is None else key_valid
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if cos is not None:
        cos, sin = (t.to(torch.float32).contiguous() for t in (cos, sin))
    limit = limit.to(torch.int32).contiguous()
    out, _ = omni_fwd(q, k, v, limit, kv.to(torch.uint8).contiguous(), cos, sin, scale, backend)
    return out


@_backend.register("attention.omni", "cpu")
def omni_cpu(q, k, v, limit, key_valid, cos, sin, scale, span):
    return kernel_pair(q, k, v, limit, key_valid, cos, sin, scale, "cpu")  # needs no span


# ---- the backends with a whole-attention launcher ("cuda"): one custom op, recomputed backward ----


@torch.library.custom_op("unif2ace::omni_attention", mutates_args=())
def omni_launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor | None,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    scale: float,
    span: list[int] | None,
    backend: str,
) -> torch.Tensor:
    """``out [B, Lq, H, Dh]`` (contiguous) of the backend's ``"attention.omni"`` launcher."""
    launch = _backend.launcher("attention.omni", backend)  # no autograd in a custom op's body
    return launch(q, k, v, limit, key_valid, cos, sin, scale, _span(span)).contiguous()


@omni_launch.register_fake
def _(q, k, v, limit, key_valid, cos, sin, scale, span, backend):
    return q.new_empty(q.shape)


def _span(span: list[int] | None) -> tuple[int, int] | None:
    return None if span is None else (int(span[0]), int(span[1]))


def _launch_setup(ctx, inputs, output):
    q, k, v, limit, key_valid, cos, sin, scale, span, backend = inputs
    ctx.scale, ctx.span, ctx.backend = scale, span, backend
    ctx.save_for_backward(q, k, v, limit, key_valid, cos, sin)


def _launch_backward(ctx, grad_out):
    """The launcher run again under autograd and differentiated: ``dq, dk, dv``. Plain Python, not
    a custom op: autograd is off inside a custom op's body."""
    q, k, v, limit, key_valid, cos, sin = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _backend.launcher("attention.omni", ctx.backend)(
            *leaves, limit, key_valid, cos, sin, ctx.scale, _span(ctx.span)
        )
        dq, dk, dv = torch.autograd.grad(out, leaves, grad_out)
    return dq, dk, dv, None, None, None, None, None, None, None


omni_launch.register_autograd(_launch_backward, setup_context=_launch_setup)


def omni(q, k, v, limit, key_valid, cos, sin, scale, span, backend: str) -> torch.Tensor:
    """``out [B, Lq, H, Dh]`` of a backend other than "torch", behind its custom ops (the module
    docstring); ``span`` None or ``(s, e)`` as the launcher contract says."""
    if backend in _backend.implemented("attention.omni_fwd"):
        return kernel_pair(q, k, v, limit, key_valid, cos, sin, scale, backend)
    span = None if span is None else list(span)
    return omni_launch(q, k, v, limit, key_valid, cos, sin, scale, span, backend)
