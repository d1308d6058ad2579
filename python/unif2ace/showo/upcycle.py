"""UniF²ace from a released Show-o checkpoint: the dense weights carried over, the two MoE levels
added so that the model computes exactly Show-o's function at step 0.

What each part starts from (``ModelConfig`` "paper"; the paper does not give its initialisation,
so this is ours):

* embeddings, attention (with QK-norm), LayerNorms, LM head: Show-o's tensors, unchanged;
* ``layers.{i}.mlp.dense`` (``dense_ffn`` = Show-o's MLP width): Show-o's ``mlp.fc1`` / ``fc2``
  with their biases, the path every token of both groups takes;
* the token MoE's experts (each group: ``shared_experts`` + ``routed_experts`` of width
  ``expert_ffn``): up-projections from slices of Show-o's ``fc1`` rows (the FFN split into small
  experts, as the paper's Fig. 3 describes; expert ``e`` of either group takes rows
  ``[e·F, (e+1)·F)``), down-projections **zero**, so they add nothing until trained; the token
  router random (std 0.02; it has no effect while the experts add zero);
* the sequence MoE: router **zero**, so all four experts of a group tie and the top-2 are its two
  Copy experts (ties go to the lower index on every backend), whose mixture is the identity;
  the CLIP / face resamplers random.

Exactly at initialisation, therefore: every token-MoE output equals Show-o's MLP output, every
sequence-MoE layer is the identity (``a = 1``, ``c = 0``), and the logits equal Show-o's on
Show-o's layout (``tests/test_upcycle.py`` checks all three). Training moves away from it through
the experts' down-projections (their gradient is the activations, not zero) and the balance
losses, which push the sequence router off the tie.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from unif2ace.models import ModelConfig, UniF2ace, get_config
from unif2ace.models.moe import N_GROUPS
from unif2ace.showo.checkpoint import open_showo, our_name
from unif2ace.showo.vocab import ShowoVocab

# the fields a Show-o checkpoint fixes (its vocabulary, sizes and layout)
_FIXED = (
    "text_vocab", "codebook_size", "image_tokens", "d_model", "n_layers", "n_heads",
    "rotary_frac", "rope_theta", "norm_eps", "activation", "qk_norm", "layout", "special_ids",
)  # fmt: skip


def showo_fixed(showo_cfg: ModelConfig) -> dict:
    """The config fields a Show-o checkpoint fixes for a model started from it: its vocabulary,
    sizes and layout, its MLP as the dense path, its text length."""
    fixed = {k: getattr(showo_cfg, k) for k in _FIXED}
    return {**fixed, "dense_ffn": showo_cfg.d_ff, "d_ff": showo_cfg.d_ff,
            "max_text_len": showo_cfg.max_text_len}  # fmt: skip


def check_compatible(cfg: ModelConfig, showo_cfg: ModelConfig, where: str) -> None:
    """Raise ``ValueError`` naming every field where ``cfg`` cannot start from this Show-o."""
    diff = {
        k: (getattr(cfg, k), getattr(showo_cfg, k))
        for k in _FIXED
        if getattr(cfg, k) != getattr(showo_cfg, k)
    }
    if cfg.token_moe and cfg.dense_ffn != showo_cfg.d_ff:
        diff["dense_ffn"] = (cfg.dense_ffn, showo_cfg.d_ff)
    if not cfg.token_moe and cfg.d_ff != showo_cfg.d_ff:
        diff["d_ff"] = (cfg.d_ff, showo_cfg.d_ff)
    if cfg.token_moe and cfg.moe_activation == "silu_glu":
        diff["expert_activation"] = (cfg.expert_activation, showo_cfg.activation)
    if cfg.token_moe:
        need = max(cfg.routed_experts, cfg.shared_experts) * cfg.expert_ffn
        if need > showo_cfg.d_ff:
            diff["expert_ffn"] = (f"{cfg.expert_ffn} × {need // cfg.expert_ffn}", showo_cfg.d_ff)
    if showo_cfg.mm_projector_dim:
        diff["mm_projector_dim"] = (cfg.mm_projector_dim, showo_cfg.mm_projector_dim)
    if diff:
        lines = "; ".join(f"{k}: config {a!r}, checkpoint {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"{where}: this Show-o does not fit the model config ({lines}). UniF²ace starts from "
            "a VQ Show-o (show-o, show-o-512x512) with its own vocabulary and sizes"
        )


def upcycle_showo(
    folder, cfg: ModelConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> UniF2ace:
    """A :class:`UniF2ace` of ``cfg`` (token MoE with ``dense_ffn``, sequence MoE) initialised
    from the Show-o checkpoint in ``folder`` as the module docstring says; the new parameters
    that are random come from ``seed``. The model carries ``model.showo`` (its
    :class:`ShowoVocab`). Raises ``ValueError`` before loading anything when the checkpoint and
    ``cfg`` differ in vocabulary, sizes or layout."""
    conf, tensors, showo_cfg, want = open_showo(folder)
    where = str(Path(folder) / tensors.file)
    check_compatible(cfg, showo_cfg, where)
    torch.manual_seed(seed)
    model = UniF2ace(cfg).to(dtype)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in want:
            ours = our_name(name)
            if cfg.token_moe and ".mlp.fc" in ours:
                ours = ours.replace(".mlp.fc", ".mlp.dense.fc")
            params[ours].copy_(tensors.get(name))
        for layer in model.layers:
            if cfg.token_moe:
                _init_experts(layer.mlp, layer.mlp.dense.fc1.weight)
            if cfg.seq_moe:
                layer.seq_moe.router.weight.zero_()
    model.showo = ShowoVocab.from_config(conf)
    return model


def _init_experts(moe, fc1: torch.Tensor) -> None:
    """Up-projections from slices of ``fc1`` rows (expert e: rows ``[e·F, (e+1)·F)``, the same
    for both groups), down-projections zero."""
    F_ = moe.w_up.shape[1]
    for up, down in ((moe.w_up, moe.w_down), (moe.shared_up, moe.shared_down)):
        if up is None:
            continue
        per_group = up.shape[0] // N_GROUPS
        for g in range(N_GROUPS):
            for e in range(per_group):
                up[g * per_group + e].copy_(fc1[e * F_ : (e + 1) * F_])
        down.zero_()


def miniature_paper_config(showo_cfg: ModelConfig, **overrides) -> ModelConfig:
    """The "paper" config resized to a (miniature) Show-o's sizes: its vocabulary, width, depth,
    heads and MLP, with experts of 1/8 of its MLP and embeddings of ``semantic_dim`` /
    ``identity_dim`` (for tests and trials on small checkpoints)."""
    base = {**showo_fixed(showo_cfg), "expert_ffn": max(1, showo_cfg.d_ff // 8)}
    cfg = get_config("paper", **{**base, **overrides})
    return dataclasses.replace(cfg, name="paper-mini")
