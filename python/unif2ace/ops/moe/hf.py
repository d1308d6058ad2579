"""Drop-in: run Hugging Face transformers MoE blocks (Mixtral, Qwen2-MoE) through unif2ace's ops.

Two ways, both on the block's own parameters (views, never a copy of the checkpoint):

1. **Experts implementation** (transformers ≥ 5). transformers routes every decorated experts
   module (``@use_experts_implementation``: MixtralExperts, Qwen2MoeExperts, …) through
   ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` chosen by
   ``config._experts_implementation``. :func:`register_hf_experts` adds ``"unif2ace"`` there::

       from unif2ace.ops.moe.hf import register_hf_experts
       register_hf_experts()                       # once per process
       model.set_experts_implementation("unif2ace")
       # or: AutoModelForCausalLM.from_pretrained(path, experts_implementation="unif2ace")

   The model's own router still runs; the experts (plan, permute, grouped GEMMs, combine, and
   their backward) run as :func:`unif2ace.ops.moe_mlp`. Expert weights are ``gate_up_proj
   [E, 2F, D]`` (gate rows first) and ``down_proj [E, D, F]`` — moe_mlp's ``silu_glu`` layout.

2. **Whole block**: :func:`moe_block_forward(block, hidden_states)` runs a
   ``MixtralSparseMoeBlock`` or ``Qwen2MoeSparseMoeBlock`` — router (:func:`moe_route`), experts
   (:func:`moe_mlp`) and, for Qwen2-MoE, the sigmoid-gated shared expert — and returns what the
   block's ``forward`` returns.

transformers is not a dependency of unif2ace: it is imported only when these functions run.
Supported experts: concatenated gate/up, not transposed, no bias, SiLU (``hidden_act`` silu /
swish), no expert parallelism; anything else raises NotImplementedError naming what differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unif2ace.ops.moe import moe_mlp, moe_route

EXPERTS_NAME = "unif2ace"
_SILU_ACTS = ("silu", "swish")


# Expert-module flags these kernels cannot honour: (attribute, its default, why). A flag whose
# default is True is unsupported when explicitly False; one whose default is False when set.
_UNSUPPORTED = (
    ("has_gate", True, "ungated experts (up_proj only)"),
    ("has_bias", False, "expert biases"),
    ("is_transposed", False, "transposed expert weights"),
    ("is_concatenated", True, "interleaved gate/up rows"),
    ("_is_expert_parallel", False, "expert parallelism (sentinel ids)"),
    ("has_post_expert_norm", False, "a post-expert norm"),
)


def _check_experts(experts: torch.nn.Module) -> None:
    why = []
    if not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        why.append("no gate_up_proj / down_proj parameters")
    for name, default, reason in _UNSUPPORTED:
        value = getattr(experts, name, default)
        if (value is False) if default else bool(value):  # a flag off, or a feature on
            why.append(reason)
    act = getattr(getattr(experts, "config", None), "hidden_act", "silu")
    if act not in _SILU_ACTS:
        why.append(f"hidden_act={act!r} (only silu gating)")
    if why:
        raise ValueError(
            f"unif2ace experts: {type(experts).__name__} has " + ", ".join(why) + "; use another "
            "experts_implementation for this model"
        )


def unif2ace_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    backend: str | None = None,
) -> torch.Tensor:
    """An ``ExpertsInterface`` function: ``(experts module, hidden [T, D], ids [T, k], weights
    [T, k]) -> [T, D]``, the module's experts run by :func:`moe_mlp` (silu_glu)."""
    _check_experts(self)
    y = moe_mlp(
        hidden_states,
        self.gate_up_proj,
        self.down_proj,
        top_k_index,
        top_k_weights,
        activation="silu_glu",
        backend=backend,
    )
    return y.to(hidden_states.dtype)


def register_hf_experts(name: str = EXPERTS_NAME, backend: str | None = None) -> str:
    """Register unif2ace's experts forward in transformers' ``ALL_EXPERTS_FUNCTIONS`` as ``name``.

    Then ``model.set_experts_implementation(name)`` (or ``experts_implementation=name`` in
    ``from_pretrained``) sends every decorated experts module through :func:`moe_mlp`.
    ``backend`` pins a unif2ace backend (default: the process default, "auto"). Returns ``name``.
    """
    from transformers.integrations.moe import ExpertsInterface

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return unif2ace_experts_forward(self, hidden_states, top_k_index, top_k_weights, backend)

    forward.__name__ = f"{name}_experts_forward"
    ExpertsInterface.register(name, forward)
    return name


def _block_parts(block: torch.nn.Module):
    """(router weight [E, D], top_k, renormalize, experts, shared expert or None, its gate)."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or not hasattr(gate, "weight"):
        raise ValueError(
            f"moe_block_forward: {type(block).__name__} is not a Mixtral / Qwen2-MoE sparse block "
            "(expects .gate with .weight and .experts)"
        )
    _check_experts(experts)
    top_k = int(getattr(gate, "top_k", getattr(block, "top_k", 0)))
    renormalize = bool(getattr(gate, "norm_topk_prob", True))  # Mixtral always renormalises
    shared = getattr(block, "shared_expert", None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    return gate.weight, top_k, renormalize, experts, shared, shared_gate


def moe_block_forward(
    block: torch.nn.Module, hidden_states: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """Run a transformers Mixtral or Qwen2-MoE sparse MoE block through unif2ace's ops.

    Parameters
    ----------
    block : MixtralSparseMoeBlock | Qwen2MoeSparseMoeBlock (transformers ≥ 5 layout)
    hidden_states : Tensor [B, L, D]
    backend : unif2ace backend for routing and experts

    Returns
    -------
    Tensor [B, L, D], equal to ``block(hidden_states)`` up to floating-point rounding
    (Mixtral training-time jitter noise is not applied). Gradients reach the block's parameters
    (router, experts, shared expert and its gate) and ``hidden_states``.

    Routing: ``softmax(x W_gateᵀ)`` in fp32, top-k, renormalised (Mixtral; Qwen2-MoE when
    ``norm_topk_prob``). Equal router probabilities pick the lower expert index (torch.topk
    leaves that order unspecified).
    """
    router_w, top_k, renormalize, experts, shared, shared_gate = _block_parts(block)
    B, L, D = hidden_states.shape
    x = hidden_states.reshape(-1, D)
    logits = F.linear(x, router_w)
    ids, weights = moe_route(logits, top_k, renormalize=renormalize, backend=backend)
    if hasattr(block.gate, "norm_topk_prob"):  # Qwen2-MoE casts the weights to the router's dtype
        weights = weights.to(logits.dtype)
    y = unif2ace_experts_forward(experts, x, ids, weights, backend)
    if shared is not None:
        s = shared(x)
        if shared_gate is not None:
            s = torch.sigmoid(shared_gate(x)) * s
        y = y + s
    return y.reshape(B, L, D)
