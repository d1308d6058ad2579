"""Input validation shared by every op: one wording for each rule, so users learn it once.

Shape/dtype/device rules raise ``ValueError``/``TypeError`` with the op's name and the offending
argument. Value rules (index ranges, finiteness) read the data and are skipped when
``unif2ace.set_checks(False)`` (see :func:`unif2ace._backend.set_checks`).
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
