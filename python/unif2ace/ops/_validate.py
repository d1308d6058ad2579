"""Input validation shared by every op: one wording for each rule, so users learn it once.

Shape/dtype/device rules raise ``ValueError``/``TypeError`` with the op's name and the offending
argument. Value rules (index ranges, finiteness) read the data and are skipped when
``unif2ace.set_checks(False)`` (see :func:`unif2ace._backend.set_checks`).

Under torch.compile a value rule called directly is a graph break (its ``bool()`` of a tensor is
a host read). :func:`checked` runs one inside the custom op ``unif2ace::value_check`` instead,
which keeps the graph whole: the rule still reads the data (a host synchronisation on a GPU) and
raises the same error, and the op returns a copy of the checked tensor that the caller uses in its
place (so the check is ordered before the use and never dropped as dead code).
"""

from __future__ import annotations

import torch


def check_dtype(op: str, name: str, t: torch.Tensor, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{op}: {name} must be one of ({names}), got {t.dtype}")


def check_rows(op: str, n: int, **tensors: torch.Tensor) -> None:
    """Each tensor is 1-D with ``n`` entries (one per row)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1 or t.shape[0] != n:
            raise ValueError(f"{op}: {name} must have shape [{n}], got {tuple(t.shape)}")


def check_device(op: str, device: torch.device, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but the input is on {device}")


def check_index_range(
    idx: torch.Tensor, upper: int, op: str, name: str, ignore_index: int | None = None
) -> None:
    """Every entry in [0, upper), or equal to ``ignore_index``."""
    if idx.numel() == 0:
        return
    bad = (idx < 0) | (idx >= upper)
    if ignore_index is not None:
        bad &= idx != ignore_index
    if bool(bad.any()):
        first = int(idx[bad][0])
        allowed = f"[0, {upper})" + (f" or {ignore_index}" if ignore_index is not None else "")
        raise ValueError(
            f"{op}: {name} has {int(bad.sum())} entries outside {allowed}, e.g. {first}"
        )


def check_finite(t: torch.Tensor, op: str, name: str, nonnegative: bool = False) -> None:
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{op}: {name} has non-finite entries (nan or inf)")
    if nonnegative and bool((t < 0).any()):
        raise ValueError(f"{op}: {name} must be >= 0, got a minimum of {float(t.min())}")


def check_unit_interval(t: torch.Tensor, op: str, name: str) -> None:
    """Every entry finite and in [0, 1] (times, masked fractions)."""
    if t.numel() and not bool((torch.isfinite(t) & (t >= 0) & (t <= 1)).all()):
        raise ValueError(f"{op}: {name} must be finite and in [0, 1]")


def _apply_rule(t, rule, op, name, upper, ignore_index, nonnegative) -> None:
    if rule == "index_range":
        check_index_range(t, upper, op, name, ignore_index)
    elif rule == "finite":
        check_finite(t.detach(), op, name, nonnegative)
    elif rule == "unit_interval":
        check_unit_interval(t.detach(), op, name)
    elif rule == "count":
        n = int(t.count_nonzero())
        if n != upper:
            raise ValueError(f"{op}: {name} has {n} nonzero entries, expected {upper}")
    else:
        raise ValueError(f"unknown value rule {rule!r}")


@torch.library.custom_op("unif2ace::value_check", mutates_args=())
def _value_check(
    t: torch.Tensor,
    rule: str,
    op: str,
    name: str,
    upper: int,
    ignore_index: int | None,
    nonnegative: bool,
) -> torch.Tensor:
    """A value rule on ``t`` (raises its ValueError), then a copy of ``t``: see :func:`checked`."""
    _apply_rule(t, rule, op, name, upper, ignore_index, nonnegative)
    return t.clone()


@_value_check.register_fake
def _(t, *_):
    return torch.empty_like(t)


def _value_check_backward(ctx, grad):
    return grad, None, None, None, None, None, None


_value_check.register_autograd(_value_check_backward)


def checked(
    t: torch.Tensor,
    rule: str,
    op: str,
    name: str,
    *,
    upper: int = 0,
    ignore_index: int | None = None,
    nonnegative: bool = False,
) -> torch.Tensor:
    """Apply a value rule to ``t`` and return the tensor to use from then on.

    ``rule``: "index_range" (every entry in [0, upper) or ``ignore_index``), "finite" (optionally
    ``nonnegative``), "unit_interval" (finite, in [0, 1]), "count" (exactly ``upper`` nonzero
    entries, e.g. a mask whose size the caller knows on the host). Eager: the rule runs here and ``t``
    itself comes back (no copy). Traced by torch.compile: the rule runs inside the custom op
    ``unif2ace::value_check`` when the compiled graph runs, and its output (a copy of ``t``, the
    gradient passing straight through) comes back: no graph break, one copy of ``t`` and the
    rule's host read per call. The caller decides whether to check at all
    (``_backend.checks_enabled()``)."""
    if torch.compiler.is_compiling():
        return _value_check(t, rule, op, name, upper, ignore_index, nonnegative)
    _apply_rule(t, rule, op, name, upper, ignore_index, nonnegative)
    return t
