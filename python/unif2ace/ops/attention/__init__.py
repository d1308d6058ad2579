"""Omni-attention with per-query key limits: the attention of Show-o's mixed text / image sequences.

Query ``i`` of row ``b`` may attend to key ``j`` when::

    (j < limit[b, i]  and  key_valid[b, j])  or  j == i

A query always sees itself, so no row is empty. ``limit = i + 1`` is causal attention; Show-o's
omni-attention (text causal, image tokens bidirectional within their image) is ``limit = e`` for
the image tokens ``[s, e)`` of a row and ``i + 1`` elsewhere (:func:`omni_limit`); prefix-LM and
full attention are other limits. Padding queries (``key_valid`` False) see the valid keys before
them and themselves.

Layers: :func:`omni_attention` (here) validates and resolves the backend, then runs that
backend's attention: "torch" (:mod:`._torch`, SDPA) as it is, the others behind custom ops
(:mod:`._custom_ops`): "cpu" the C++ kernels of :mod:`._cpu`, "cuda" flash-attn where it applies
(:mod:`._cuda`).
The launcher contract is the docstring of :mod:`._torch`; :func:`omni_attention_ref`
(:mod:`.reference`) is the oracle; :func:`apply_rotary` (:mod:`.rotary`) is the one rotary
embedding.
"""

from __future__ import annotations

import math

import torch

from unif2ace import _backend
from unif2ace.ops._validate import check_device
from unif2ace.ops.attention import _cpu, _custom_ops, _torch
from unif2ace.ops.attention.reference import limit_mask, omni_attention_ref
from unif2ace.ops.attention.rotary import apply_rotary

__all__ = ["apply_rotary", "limit_mask", "omni_attention", "omni_attention_ref", "omni_limit"]

OP = "omni_attention"
KERNEL = "attention.omni"


def omni_limit(is_image: torch.Tensor) -> torch.Tensor | None:
    """The ``limit`` of Show-o's omni-attention.

    Parameters
    ----------
    is_image : Tensor [B, L] bool
        Which tokens are image tokens; each row's must be one contiguous span ``[s, e)``.

    Returns
    -------
    Tensor [B, L] int32 or None
        ``e`` for the image tokens of a row, ``i + 1`` for the others; None when some row's image
        tokens are not one contiguous span (the rule is then not a per-query limit). That check
        reads ``is_image`` (a host synchronisation on a GPU) and runs only with the value checks
        on (:func:`unif2ace.set_checks`); with them off the spans are taken to be contiguous.
    """
    B, L = is_image.shape
    idx = torch.arange(L, device=is_image.device)
    last = torch.where(is_image, idx, -1).amax(1) if L else is_image.new_zeros(B, dtype=torch.long)
    if _backend.checks_enabled():
        first = torch.where(is_image, idx, L).amin(1) if L else last
        count = is_image.sum(1)
        if not bool(((count == 0) | (last - first + 1 == count)).all()):
            return None
    return torch.where(is_image, (last + 1)[:, None], idx + 1).to(torch.int32)


def _check(q, k, v, limit, key_valid, rotary, span):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{OP}: {name} must be a tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{OP}: q must be [B, L, H, Dh], got shape {tuple(q.shape)}")
    B, L = q.shape[:2]
    Lk = k.shape[1] if k.dim() == 4 else -1
    if (
        k.dim() != 4
        or v.shape != k.shape
        or (k.shape[0], k.shape[2], k.shape[3]) != (B, q.shape[2], q.shape[3])
        or Lk < L
    ):
        raise ValueError(
            f"{OP}: q must be [B, Lq, H, Dh] and k, v [B, Lk, H, Dh] with Lk >= Lq, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[3] < 1:  # the default scale is 1 / sqrt(Dh)
        raise ValueError(f"{OP}: the head size Dh must be >= 1, got shape {tuple(q.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"{OP}: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if not isinstance(limit, torch.Tensor) or limit.shape != (B, L) or limit.is_floating_point():
        got = tuple(limit.shape) if isinstance(limit, torch.Tensor) else type(limit).__name__
        raise ValueError(f"{OP}: limit must be an integer tensor [B, Lq] = [{B}, {L}], got {got}")
    if key_valid is not None and (key_valid.shape != (B, Lk) or key_valid.dtype != torch.bool):
        raise ValueError(
            f"{OP}: key_valid must be a bool tensor [B, Lk] = [{B}, {Lk}], got "
            f"{key_valid.dtype} {tuple(key_valid.shape)}"
        )
    kv = {} if key_valid is None else {"key_valid": key_valid}
    check_device(OP, q.device, k=k, v=v, limit=limit, **kv)
    if rotary is not None:
        if Lk != L:
            raise ValueError(f"{OP}: rotary needs as many queries as keys; rotate q and k first")
        if not isinstance(rotary, (tuple, list)) or len(rotary) != 2:
            raise ValueError(f"{OP}: rotary must be a pair (cos, sin), got {type(rotary).__name__}")
        cos, sin = rotary
        half = cos.shape[-1] if isinstance(cos, torch.Tensor) else -1
        if (
            not isinstance(sin, torch.Tensor)
            or cos.shape != (B, L, half)
            or sin.shape != cos.shape
            or 2 * half > q.shape[-1]
            or not cos.is_floating_point()
        ):
            raise ValueError(
                f"{OP}: rotary (cos, sin) must be two floating tensors [B, L, half] = "
                f"[{B}, {L}, <= {q.shape[-1] // 2}]"
            )
        check_device(OP, q.device, cos=cos, sin=sin)
    if _backend.checks_enabled() and limit.numel() and not torch.compiler.is_compiling():
        lo, hi = map(int, torch.stack(torch.aminmax(limit)).tolist())  # one host sync
        if lo < 0 or hi > Lk:
            raise ValueError(f"{OP}: limit must lie in [0, Lk] = [0, {Lk}], got [{lo}, {hi}]")
    _check_span(span, limit, key_valid, Lk)


def _check_span(span, limit, key_valid, Lk):
    """A span is host values: its form is checked here; whether ``limit`` has its layout reads
    ``limit`` and is checked with the value checks only."""
    if span is None or isinstance(span, str) and span == "auto":
        return
    if (
        not isinstance(span, (tuple, list))
        or len(span) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in span)
    ):
        raise ValueError(f"{OP}: span must be a pair of ints (s, e), None or 'auto', got {span!r}")
    L = limit.shape[1]
    s, e = span
    if not 0 <= s <= e <= L:
        raise ValueError(f"{OP}: span (s, e) must have 0 <= s <= e <= L = {L}, got {(s, e)}")
    if Lk != L or key_valid is not None:
        raise ValueError(
            f"{OP}: a span states that every key is valid and Lq = Lk: pass key_valid=None and "
            f"as many queries as keys (got Lq {L}, Lk {Lk}, key_valid "
            f"{'given' if key_valid is not None else 'None'})"
        )
    if _backend.checks_enabled() and limit.numel() and not torch.compiler.is_compiling():
        idx = torch.arange(L, device=limit.device)
        if not bool((limit == torch.where((idx >= s) & (idx < e), e, idx + 1)).all()):
            raise ValueError(
                f"{OP}: limit is not e = {e} on [s, e) = [{s}, {e}) and i + 1 elsewhere in "
                "every row, as the span says"
            )


def omni_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    limit: torch.Tensor,
    key_valid: torch.Tensor | None = None,
    *,
    span: tuple[int, int] | None | str = "auto",
    scale: float | None = None,
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention under per-query key limits::

        out[b, i, h] = Σ_j softmax_j(scale · q̃[b, i, h] · k̃[b, j, h] + mask[b, i, j]) v[b, j, h]

    with ``mask = 0`` where ``(j < limit[b, i] and key_valid[b, j]) or j == Lk - Lq + i`` and
    ``-inf`` elsewhere; ``q̃, k̃`` are q and k turned by ``rotary`` (:func:`apply_rotary`), or q
    and k. Usually ``Lq = Lk = L``; fewer queries than keys is a decode step against a KV cache
    (the queries are the last ``Lq`` positions, as in flash-attn).

    Parameters
    ----------
    q : Tensor [B, Lq, H, Dh]
    k, v : Tensor [B, Lk, H, Dh], ``Lk >= Lq``
        One floating dtype, any strides (flash-attn's layout; views of ``[B, H, L, Dh]`` work).
    limit : Tensor [B, Lq], integer in ``[0, Lk]``
        Query ``i`` sees the keys ``j < limit[b, i]`` (and itself); :func:`omni_limit` gives
        Show-o's.
    key_valid : Tensor [B, Lk] bool, optional
        Keys that may be attended (False: padding); None means all.
    span : (s, e) ints, None or "auto"
        What the caller knows of the layout, as host values (e.g. from its batch metadata), so
        that the op reads nothing back from the device. ``(s, e)``, ``0 ≤ s ≤ e ≤ L``: every
        row's limits are ``e`` on ``[s, e)`` and ``i + 1`` elsewhere (``s = e``: causal), and
        every key is valid (``key_valid`` must be None, and ``Lq = Lk``); "torch" and "cuda"
        then make the two calls of that layout (see ``backend``). None: no such span (one masked
        call). "auto": the op finds out by reading ``limit`` and ``key_valid`` (a host
        synchronisation on a GPU; none on "cpu", whose kernel needs no span, or with
        ``Lq < Lk``). With the value checks on (:func:`unif2ace.set_checks`), a given span is
        checked against ``limit`` (a read).
    scale : float, optional
        Default ``1 / sqrt(Dh)``.
    rotary : (cos, sin), each Tensor [B, L, half] floating, ``2 · half ≤ Dh``, optional
        The rotary embedding applied to q and k first (inside the kernel on "cpu"); the gradients
        are those of the un-rotated q and k. Only with ``Lq = Lk``.
    backend : None | "auto" | "torch" | "cpu" | "cuda"
        None: the process default ("auto" when that backend has no launcher of this op, e.g.
        "triton"); "auto": "cpu", else "torch" on CPU tensors, "cuda", else "torch" on CUDA
        tensors. "torch": SDPA (with a span two calls, one causal and one for the image
        queries, else the boolean mask); "cpu": the C++ kernel (fp32, head sizes 16/32/64/128,
        ``Lq = Lk``; under "auto" other inputs run "torch"); "cuda": flash-attn for a span (fp16
        / bf16), SDPA otherwise, behind a custom op whose backward runs the forward again under
        autograd.

    Returns
    -------
    Tensor [B, Lq, H, Dh]
        q's dtype; contiguous from "cpu" and "cuda", a transposed view from "torch".
        Differentiable (with respect to q, k and v).
    """
    _check(q, k, v, limit, key_valid, rotary, span)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if backend is None and _backend.get_backend() not in _backend.implemented(KERNEL):
        backend = "auto"  # a process default with no launcher here (triton) is a preference
    name = _backend.resolve(backend, q.device, OP, kernel=KERNEL)
    if name == "cpu" and not (_cpu.supports(q) and k.shape[1] == q.shape[1]):
        if backend not in (None, "auto"):
            raise ValueError(
                f"{OP}: the cpu kernel takes fp32 with head size 16, 32, 64 or 128 and Lq = Lk; "
                f"got {q.dtype}, head size {q.shape[-1]}, Lq {q.shape[1]}, Lk {k.shape[1]}"
            )
        name = "torch"
    if isinstance(span, str):  # "auto"
        detect = name != "cpu" and k.shape[1] == q.shape[1]
        span = _torch.split_span(limit, key_valid) if detect else None
    span = None if span is None else (int(span[0]), int(span[1]))
    cos, sin = (None, None) if rotary is None else rotary
    if name == "torch":  # plain PyTorch: traces and fakes as it is
        return _backend.launcher(KERNEL, name)(q, k, v, limit, key_valid, cos, sin, scale, span)
    return _custom_ops.omni(q, k, v, limit, key_valid, cos, sin, scale, span, name)
