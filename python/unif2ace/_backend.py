"""Backend selection shared by every op: names, the process-wide default, what is built here.

Every public op takes ``backend=`` with one of :data:`BACKENDS`. ``"auto"`` resolves per op and
device through :data:`AUTO_ORDER` (first available wins); the process-wide default comes from
:func:`set_backend` or the ``UNIF2ACE_BACKEND`` environment variable.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
from collections.abc import Iterator

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda", "auto")

# Which concrete backend "auto" picks, per device type, first available wins. Kept as data so a
# measured GPU result changes one line. Triton first on CUDA: the CUDA kernels have not yet run on
# a GPU (README status table); the cuda backend is chosen explicitly until they have.
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}

# dtype codes understood by the C++/CUDA launchers (csrc/include/unif2ace/common.h: DType).
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_state = {"backend": os.environ.get("UNIF2ACE_BACKEND", "auto"), "checks": True}
if _state["backend"] not in BACKENDS:
    raise ValueError(
        f"UNIF2ACE_BACKEND={_state['backend']!r} is not one of {BACKENDS}"
    )
_state["checks"] = os.environ.get("UNIF2ACE_CHECKS", "1") not in ("0", "false", "False")


def set_backend(name: str) -> None:
    """Set the process-wide default backend used when an op is called with ``backend=None``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    """The process-wide default backend (``"auto"`` unless changed)."""
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


# Resolution imports extension modules, which torch.compile must not trace: its result is a
# constant of the process (the build and the device do not change under a compiled function).
@torch.compiler.assume_constant_result
def resolve(backend: str | None, device: torch.device, op: str) -> str:
    """Turn ``backend`` (None = process default, "auto", or a name) into a concrete backend.

    An explicitly requested backend that cannot run here is an error, never a silent fallback.
    """
    if backend is None:
        backend = get_backend()
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        if not available(backend, device):
            raise RuntimeError(
                f"{op}: backend {backend!r} is not available for {device.type} tensors here "
                f"({_why_unavailable(backend, device)})"
            )
        return backend
    for name in AUTO_ORDER.get(device.type, ("torch",)):
        if available(name, device):
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
