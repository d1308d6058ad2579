"""Backend selection shared by every op: names, the process-wide default, what is built here, and
the one launcher registry.

Every public op takes ``backend=`` with one of :data:`BACKENDS`. A backend's launcher for a kernel
registers itself with :func:`register` (``@register("moe.route", "cpu")``); :func:`resolve` turns
``backend=`` into the concrete backend that will run (``"auto"``: the first of
:data:`AUTO_ORDER` that is available on the device *and* has a launcher for the kernel), and
:func:`launcher` returns the function. The process-wide default comes from :func:`set_backend` or
the ``UNIF2ACE_BACKEND`` environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")

# Which concrete backend "auto" picks, per device type, first available wins. Kept as data so a
# measured GPU result changes one line. Triton first on CUDA: the CUDA kernels have not yet run on
# a GPU (README status table); the cuda backend is chosen explicitly until they have.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

# A bad UNIF2ACE_BACKEND is reported when the default is first read (get_backend), not at import:
# `import unif2ace` then works, and the command can say what is wrong in one line.
_state = {"backend": os.environ.get("UNIF2ACE_BACKEND", "auto"), "checks": True}
_state["checks"] = os.environ.get("UNIF2ACE_CHECKS", "1") not in ("0", "false", "False")


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when an op is called with ``backend=None``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    """The process-wide default backend (``"auto"`` unless changed)."""
    if _state["backend"] not in BACKENDS:
        raise ValueError(f"UNIF2ACE_BACKEND={_state['backend']!r} is not one of {BACKENDS}")
    return _state["backend"]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the enclosed code with another default backend."""
    old = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def set_checks(enabled: bool) -> None:
    """Turn the data-dependent input checks on or off (default on).

    Shape, dtype and device checks always run. The *value* checks (an index out of range, a
    non-finite ratio) read the data, which on a GPU is a host synchronisation; turn them off for
    CUDA-graph capture or peak throughput. Kernels still guard every index they load: an
    out-of-range target gives a NaN loss row, never an out-of-bounds read.
    """
    _state["checks"] = bool(enabled)


def checks_enabled() -> bool:
    return _state["checks"]


@functools.cache
def _try_import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def cpu_ext():
    """The C++ CPU module ``unif2ace._C`` or None if it was not built."""
    return _try_import("unif2ace._C")


def cuda_ext():
    """The CUDA module ``unif2ace._C_cuda`` (imported lazily) or None."""
    if not torch.cuda.is_available():
        return None
    return _try_import("unif2ace._C_cuda")


@functools.cache
def triton_available() -> bool:
    """Triton kernels can run: a CUDA device, or the interpreter (TRITON_INTERPRET=1) on CPU."""
    if _try_import("triton") is None:
        return False
    return torch.cuda.is_available() or triton_interpreted()


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` can run tensors that live on ``device``."""
    if backend == "torch":
        return True
    if backend == "cpu":
        return device.type == "cpu" and cpu_ext() is not None
    if backend == "cuda":
        return device.type == "cuda" and cuda_ext() is not None
    if backend == "triton":
        if not triton_available():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    return False


# ---- the launcher registry -------------------------------------------------------------------
# kernel name ("<family>.<kernel>", e.g. "moe.route") -> {backend: launcher}. Each backend's
# launcher module registers its entries when its op family is imported; nothing else writes here.
_LAUNCHERS: dict[str, dict[str, Callable]] = {}


def register(kernel: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: the decorated function is ``backend``'s launcher of ``kernel``.

    A launcher takes tensors, writes into preallocated outputs and returns nothing (each family's
    contract says exactly what); registering a second launcher for the same pair is an error.
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"register({kernel!r}): backend must be one of {BACKENDS[:-1]}")

    def deco(fn: Callable) -> Callable:
        table = _LAUNCHERS.setdefault(kernel, {})
        if backend in table:
            raise RuntimeError(f"{kernel}: a {backend!r} launcher is already registered")
        table[backend] = fn
        return fn

    return deco


def implemented(kernel: str) -> tuple[str, ...]:
    """The backends with a registered launcher for ``kernel``, in :data:`BACKENDS` order."""
    table = _LAUNCHERS.get(kernel, {})
    return tuple(b for b in BACKENDS if b in table)


def launcher(kernel: str, backend: str) -> Callable:
    """The ``backend`` launcher of ``kernel`` (a RuntimeError naming what exists if there is none)."""
    try:
        return _LAUNCHERS[kernel][backend]
    except KeyError:
        raise RuntimeError(
            f"{kernel}: no {backend!r} launcher (registered: {list(implemented(kernel))})"
        ) from None


# Resolution imports extension modules, which torch.compile must not trace: its result is a
# constant of the process (the build and the device do not change under a compiled function).
@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, op: str, kernel: str | None = None) -> str:
    """Turn ``backend`` (None = process default, "auto", or a name) into a concrete backend.

    ``op`` names the public op in messages; ``kernel`` (default ``op``) is the registry entry whose
    launchers count. A kernel with no registered launcher at all (e.g. a whole model step) only
    needs the backend to be available. An explicitly requested backend that cannot run here, or
    has no launcher for the kernel, is an error, never a silent fallback.
    """
    if backend is None:
        backend = get_backend()
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    table = _LAUNCHERS.get(kernel or op)
    if backend != "auto":
        if not available(backend, device):
            raise RuntimeError(
                f"{op}: backend {backend!r} is not available for {device.type} tensors here "
                f"({_why_unavailable(backend, device)})"
            )
        if table is not None and backend not in table:
            raise RuntimeError(
                f"{op}: backend {backend!r} has no launcher for {kernel or op} "
                f"(registered: {list(implemented(kernel or op))})"
            )
        return backend
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if available(name, device) and (table is None or name in table):
            return name
    return "torch"


def _why_unavailable(backend: str, device: torch.device) -> str:
    if backend == "cpu":
        if device.type != "cpu":
            return "the cpu backend takes CPU tensors"
        return "unif2ace._C was not built; reinstall with `pip install -e .`"
    if backend == "cuda":
        if device.type != "cuda":
            return "the cuda backend takes CUDA tensors"
        return "unif2ace._C_cuda was not built (no nvcc at install time, or UNIF2ACE_CUDA=OFF)"
    if backend == "triton":
        if _try_import("triton") is None:
            return "triton is not installed"
        return "triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before import"
    return "unknown"
