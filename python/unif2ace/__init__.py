"""unif2ace: a kernel-first engine for UniF²ace (arXiv 2503.08120).

Ops live in :mod:`unif2ace.ops`; each takes ``backend=`` ("torch", "cpu", "triton", "cuda", "auto").
:class:`~unif2ace.pipeline.Pipeline` (a trained run folder: text → faces, image + question →
answer, image → caption) is also here, loaded on first use: ``from unif2ace import Pipeline``.
"""

import torch  # noqa: F401  (import torch before the extension: one libgomp gets mapped)

from unif2ace import ops
from unif2ace._backend import get_backend, set_backend, set_checks, use_backend

__version__ = "0.1.0"
__all__ = [
    "Pipeline",
    "ops",
    "get_backend",
    "set_backend",
    "set_checks",
    "use_backend",
    "__version__",
]


def __getattr__(name: str):
    """Re-exports of upper layers, imported on first use (PEP 562): ``import unif2ace`` loads the
    ops only; the pipeline, with its models and tokenizers, when ``unif2ace.Pipeline`` is first
    read. The layering test allows upward imports here and only here (tests/test_structure.py)."""
    if name == "Pipeline":
        from unif2ace.pipeline import Pipeline

        globals()[name] = Pipeline
        return Pipeline
    raise AttributeError(f"module 'unif2ace' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
