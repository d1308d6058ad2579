"""The "torch" launchers of omni-attention; this docstring is the family's LAUNCHER CONTRACT.

Shapes: ``q, k, v [B, L, H, Dh]`` (flash-attn's layout; any strides with the head dimension
contiguous); ``limit [B, L]`` integer and ``key_valid [B, L]``; query ``i`` of row ``b`` may attend
to key ``j`` when ``(j < limit[b, i] and key_valid[b, j]) or j == i``
(:func:`~unif2ace.ops.attention.reference.limit_mask`). ``"attention.omni"`` also takes fewer
queries than keys (``q [B, Lq, H, Dh]``, ``k, v [B, Lk, H, Dh]``, ``limit [B, Lq]``,
``key_valid [B, Lk]``, no rotary): the queries are the last ``Lq`` positions and query ``i``
always sees key ``Lk - Lq + i`` (a decode step against a KV cache). ``cos, sin [B, L, half]`` (or both None)
turn q and k first (:func:`~unif2ace.ops.attention.rotary.apply_rotary`); gradients are those of
the un-rotated q and k. ``scale`` is a float.

Three kernels::

    "attention.omni"      (q, k, v, limit, key_valid, cos, sin, scale, span) -> out [B, L, H, Dh]
    "attention.omni_fwd"  (q, k, v, limit, key_valid, cos, sin, scale, out, lse) -> None
    "attention.omni_bwd"  (q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale,
                           dq, dk, dv) -> None

* ``"attention.omni"`` is the whole attention, differentiable (autograd through it gives the
  gradients of q, k and v), returning its output (any strides). ``key_valid`` is bool or None,
  ``cos, sin`` as given by the caller. ``span`` is None or a pair of host ints ``(s, e)``: the
  caller's statement that every row's limits are ``e`` on ``[s, e)`` and ``i + 1`` elsewhere and
  that every key is valid (``key_valid`` None, ``Lq = Lk``); a launcher may use it and never
  reads the layout from the tensors. Registered by "torch" (this module: SDPA, which
  :func:`unif2ace.ops.omni_attention` calls as it is), "cuda" (``_cuda``: flash-attn when it
  applies, which the public op runs inside the custom op ``unif2ace::omni_attention``, see
  ``_custom_ops``) and "cpu" (``_custom_ops``: the custom-op pair over the two kernels below).
* ``"attention.omni_fwd"`` / ``"attention.omni_bwd"`` are the kernels behind the custom ops
  ``unif2ace::omni_attention_fwd`` / ``_bwd`` (autograd between them). Inputs as above with
  ``limit`` int32 and ``key_valid`` uint8 ``[B, L]`` contiguous, ``cos, sin`` float32 contiguous.
  The forward writes ``out [B, L, H, Dh]`` (contiguous, q's dtype) and ``lse [B, H, L]`` float32,
  the log-sum-exp of each query's scaled, masked scores; the backward reads them with
  ``grad_out`` (head dimension contiguous) and writes ``dq, dk, dv [B, L, H, Dh]`` (contiguous).
  Every element of every output is written; nothing is returned. Registered by "cpu" (``_cpu``,
  the C++ kernel) and "torch" (this module: the executable spec, explicit softmax).

Backends of ``"attention.omni"``: "torch" runs :func:`torch.nn.functional.scaled_dot_product_attention`
on the ``[B, H, L, Dh]`` views. Given a ``span`` (every row has the same limits, of the form ``e``
on ``[s, e)`` and ``i + 1`` elsewhere, and every key is valid, e.g. a batch of Show-o rows with the
image at the same place and no padding) it makes two calls, one causal over the whole sequence and
one non-causal for the queries ``[s, e)`` over the keys ``[0, e)``, which overwrites those rows;
otherwise one call with the boolean mask. :func:`split_span` finds the span by reading the tensors
(what :func:`unif2ace.ops.omni_attention` does when its caller does not say).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unif2ace import _backend
from unif2ace.ops.attention.reference import limit_mask
from unif2ace.ops.attention.rotary import apply_rotary


def split_span(limit: torch.Tensor, key_valid: torch.Tensor | None) -> tuple[int, int] | None:
    """``(s, e)`` when every key is valid and every row's limits are ``e`` on ``[s, e)`` and
    ``i + 1`` elsewhere (``(0, 0)``: causal), else None. Reads the data (host sync). While
    torch.compile traces, None: a read would break the graph, and the one masked call that None
    asks for computes the same attention (a caller that knows its span passes it instead)."""
    if torch.compiler.is_compiling():
        return None
    B, L = limit.shape
    if B == 0 or L == 0 or (key_valid is not None and not bool(key_valid.all())):
        return None
    row = limit[0].long()
    if not torch.equal(limit, limit[:1].expand_as(limit)):
        return None
    idx = torch.arange(L, device=limit.device)
    off = (row != idx + 1).nonzero()
    if off.numel() == 0:
        return 0, 0
    s = int(off[0])
    e = int(row[s])
    if not torch.equal(row, torch.where((idx >= s) & (idx < e), e, idx + 1)):
        return None
    return s, e


def rotated_heads_first(q, k, v, cos, sin):
    """``q, k, v [B, L, H, Dh]`` as ``[B, H, L, Dh]`` views, q and k turned by ``cos, sin``."""
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if cos is not None:
        c, s = cos[:, None], sin[:, None]
        qt, kt = apply_rotary(qt, c, s), apply_rotary(kt, c, s)
    return qt, kt, vt


def sdpa(qt, kt, vt, limit, key_valid, span, scale):
    """SDPA of ``[B, H, L, Dh]`` inputs: the split of ``span = (s, e)``, or the boolean mask when
    ``span`` is None. Returns ``[B, H, L, Dh]``."""
    if span is None:
        mask = limit_mask(limit, key_valid, kt.shape[2])[:, None]
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    s, e = span
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)
    if e > s:
        img = F.scaled_dot_product_attention(qt[:, :, s:e], kt[:, :, :e], vt[:, :, :e], scale=scale)
        out = torch.cat([out[:, :, :s], img, out[:, :, e:]], dim=2)
    return out


@_backend.register("attention.omni", "torch")
def omni(q, k, v, limit, key_valid, cos, sin, scale, span):
    qt, kt, vt = rotated_heads_first(q, k, v, cos, sin)
    return sdpa(qt, kt, vt, limit, key_valid, span, scale).transpose(1, 2)


# ---- the executable spec of the two kernels (explicit softmax, float32 or wider) ---------------


def _scores(q, k, limit, key_valid, cos, sin, scale):
    """Rotated q, k ``[B, H, L, Dh]`` and the masked scores ``[B, H, L, L]`` in the accumulation
    dtype (float32, or the inputs' if wider)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qt, kt, _ = rotated_heads_first(q.to(acc), k.to(acc), k, cos, sin)
    s = (qt @ kt.transpose(-1, -2)) * scale
    return qt, kt, s.masked_fill(~limit_mask(limit, key_valid)[:, None], float("-inf"))


@_backend.register("attention.omni_fwd", "torch")
def omni_fwd(q, k, v, limit, key_valid, cos, sin, scale, out, lse):
    _, _, s = _scores(q, k, limit, key_valid, cos, sin, scale)
    m = torch.logsumexp(s, dim=-1)  # [B, H, L]; finite: a query always sees itself
    p = torch.exp(s - m[..., None])
    out.copy_((p @ v.transpose(1, 2).to(p.dtype)).transpose(1, 2))
    lse.copy_(m)


@_backend.register("attention.omni_bwd", "torch")
def omni_bwd(q, k, v, out, lse, grad_out, limit, key_valid, cos, sin, scale, dq, dk, dv):
    qt, kt, s = _scores(q, k, limit, key_valid, cos, sin, scale)
    p = torch.exp(s - lse[..., None].to(s.dtype))  # [B, H, L, L]
    go, o, vt = (x.transpose(1, 2).to(s.dtype) for x in (grad_out, out, v))
    dv.copy_((p.transpose(-1, -2) @ go).transpose(1, 2))
    dp = go @ vt.transpose(-1, -2)
    ds = p * (dp - (go * o).sum(-1, keepdim=True)) * scale
    dqt, dkt = ds @ kt, ds.transpose(-1, -2) @ qt  # gradients of the rotated q, k
    if cos is not None:  # the inverse rotation: the angle negated
        c, sn = cos[:, None], -sin[:, None]
        dqt, dkt = apply_rotary(dqt, c, sn), apply_rotary(dkt, c, sn)
    dq.copy_(dqt.transpose(1, 2))
    dk.copy_(dkt.transpose(1, 2))
