"""Public ops of unif2ace. Every op takes ``backend=`` and has a plain-PyTorch ``*_ref`` oracle.

D3Diff loss (:mod:`unif2ace.ops.d3diff_loss`): :func:`d3diff_loss`, :func:`d3diff_linear_loss`
and its α = 0 case :func:`fused_linear_cross_entropy` (references ``*_ref``), with the noise
schedules in :mod:`unif2ace.ops.schedules`.

Grouped MoE dispatch (:mod:`unif2ace.ops.moe`): :func:`moe_route`, :func:`moe_plan`,
:func:`moe_permute`, :func:`moe_combine`, :func:`moe_mlp`, :func:`moe_shared_experts`,
:func:`moe_balance_loss`, :func:`moe_z_loss`; the Hugging Face drop-in in
:mod:`unif2ace.ops.moe.hf`.

Omni-attention (:mod:`unif2ace.ops.attention`): :func:`omni_attention` with per-query key limits
(:func:`omni_limit` gives Show-o's), reference :func:`omni_attention_ref`.

Mask sampling: :func:`mask_tokens` (training-time masking), :func:`sample_times`,
:func:`maskgit_step` (the fused decode step) and :func:`maskgit_decode` (the decode loop).

:func:`value_check`: the ops' data-reading checks for a caller's own tensors (a count, a range,
finiteness), trace-friendly: under torch.compile the check runs inside a custom op, no graph break.
"""

import importlib

from unif2ace.ops import schedules
from unif2ace.ops._validate import checked as value_check
from unif2ace.ops.attention import *  # noqa: F403  (each family's __all__ is its public API)
from unif2ace.ops.d3diff_loss import *  # noqa: F403
from unif2ace.ops.mask_sampling import *  # noqa: F403
from unif2ace.ops.moe import *  # noqa: F403
from unif2ace.ops.schedules import DEFAULT_ALPHA, d3diff_weights, schedule

# The families' modules by name: `unif2ace.ops.d3diff_loss` the attribute is the function.
FAMILIES = ("attention", "d3diff_loss", "mask_sampling", "moe")
__all__ = ["DEFAULT_ALPHA", "d3diff_weights", "schedule", "schedules", "value_check"] + [
    name
    for family in FAMILIES
    for name in importlib.import_module(f"unif2ace.ops.{family}").__all__
]
