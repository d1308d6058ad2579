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
"""

from unif2ace.ops import schedules
from unif2ace.ops.attention import omni_attention, omni_attention_ref, omni_limit
from unif2ace.ops.d3diff_loss import (  # D3Diff loss
    d3diff_linear_loss,
    d3diff_linear_loss_ref,
    d3diff_loss,
    d3diff_loss_ref,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)
from unif2ace.ops.mask_sampling import (  # mask sampling
    mask_tokens,
    mask_tokens_ref,
    maskgit_decode,
    maskgit_step,
    maskgit_step_ref,
    sample_times,
)
from unif2ace.ops.moe import (  # grouped MoE dispatch
    MoEPlan,
    MoERouting,
    moe_balance_loss,
    moe_combine,
    moe_mlp,
    moe_mlp_grouped_mm,
    moe_mlp_ref,
    moe_permute,
    moe_plan,
    moe_route,
    moe_route_ref,
    moe_shared_experts,
    moe_z_loss,
)
from unif2ace.ops.schedules import DEFAULT_ALPHA, d3diff_weights, schedule

__all__ = [
    "DEFAULT_ALPHA",
    "d3diff_linear_loss",
    "d3diff_linear_loss_ref",
    "d3diff_loss",
    "d3diff_loss_ref",
    "d3diff_weights",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "mask_tokens",  # mask sampling
    "mask_tokens_ref",
    "maskgit_decode",
    "maskgit_step",
    "maskgit_step_ref",
    "sample_times",
    "MoEPlan",  # grouped MoE dispatch
    "MoERouting",
    "moe_balance_loss",
    "moe_combine",
    "moe_mlp",
    "moe_mlp_grouped_mm",
    "moe_mlp_ref",
    "moe_permute",
    "moe_plan",
    "moe_route",
    "moe_route_ref",
    "moe_shared_experts",
    "moe_z_loss",
    "omni_attention",  # omni-attention
    "omni_attention_ref",
    "omni_limit",
    "schedule",
    "schedules",
]
