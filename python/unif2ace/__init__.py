"""unif2ace: a kernel-first engine for UniF²ace (arXiv 2503.08120).

Ops live in :mod:`unif2ace.ops`; each takes ``backend=`` ("torch", "cpu", "triton", "cuda", "auto").
"""

import torch  # noqa: F401  (import torch before the extension: one libgomp gets mapped)

from unif2ace import ops
from unif2ace._backend import get_backend, set_backend, set_checks, use_backend

__version__ = "0.1.0"
__all__ = ["ops", "get_backend", "set_backend", "set_checks", "use_backend", "__version__"]
