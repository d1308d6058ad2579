"""Initialise the dense parts of a UniF²ace model from a local Hugging Face Phi-1.5 checkpoint.

A checkpoint folder is what ``transformers.PhiForCausalLM.save_pretrained`` writes: ``config.json``
(``model_type: "phi"``) and ``model.safetensors`` (or ``model.safetensors.index.json`` + shards, or
``pytorch_model.bin``). Tensor names are transformers' (checked against ``PhiForCausalLM`` of
transformers 5.23)::

    model.embed_tokens.weight                                   [V, D]
    model.layers.{i}.input_layernorm.{weight,bias}              [D]
    model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense}.*   [D, D], [D]
    model.layers.{i}.self_attn.{q,k}_layernorm.{weight,bias}    [D / heads]  (qk_layernorm only)
    model.layers.{i}.mlp.fc1.{weight,bias}                      [F, D], [F]
    model.layers.{i}.mlp.fc2.{weight,bias}                      [D, F], [D]
    model.final_layernorm.{weight,bias}                         [D]
    lm_head.{weight,bias}                                       [V, D], [V]

UniF²ace's block is Phi's (parallel attention + MLP behind one LayerNorm, partial rotary in the
rotate-half convention), so these copy one to one; the embedding and the LM head fill the first
``text_vocab`` rows (the image codes and the mask token keep their init). The MLP goes into the
:class:`~unif2ace.models.moe.DenseMLP` when the token MoE is off; when it is on, ``fc1`` / ``fc2``
are copied into every expert of both task groups, shared and routed ("upcycling"), without their
biases (the experts have none). The routers and the sequence MoE keep their init.

With the token MoE and sequence MoE off, the loaded model computes Phi's logits over the text
vocabulary exactly (``tests/test_phi_loader.py``). Upcycled, it does not: the MLP branch becomes
``(shared_experts + 1)·fc2(gelu(fc1 x))`` without the biases (top-k weights renormalised to 1), and
:func:`load_phi`'s report says so.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from unif2ace.io import TensorFolder
from unif2ace.models.config import ModelConfig
from unif2ace.models.layout import IGNORE, TASK_MMU
from unif2ace.models.moe import DenseMLP, TokenMoE

# Phi's hidden_act → ModelConfig.activation (gelu_new and gelu_pytorch_tanh are the same function)
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


def read_phi_config(folder) -> dict:
    """``folder/config.json`` as a dict, checked to be a transformers Phi config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Phi checkpoint folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (expected a PhiForCausalLM.save_pretrained folder)"
        )
    conf = json.loads(path.read_text())
    _check_phi_config(conf, str(path))
    return conf


def _check_phi_config(conf: dict, where: str) -> None:
    mt = conf.get("model_type")
    if mt != "phi":
        hint = ""
        if mt in ("phi-msft", "mixformer-sequential"):
            hint = (
                " (the original Microsoft layout: convert it with transformers' "
                "models/phi/convert_phi_weights_to_hf.py first)"
            )
        raise ValueError(
            f"{where}: model_type {mt!r} is not a transformers Phi config ('phi'){hint}"
        )
    kv = conf.get("num_key_value_heads")
    if kv is not None and kv != conf["num_attention_heads"]:
        raise ValueError(
            f"{where}: num_key_value_heads={kv} != num_attention_heads="
            f"{conf['num_attention_heads']}; UniF²ace's attention has no grouped "
            "KV heads"
        )
    act = conf.get("hidden_act", "gelu_new")
    if act not in _ACTIVATIONS:
        raise ValueError(
            f"{where}: hidden_act {act!r} has no UniF²ace equivalent "
            f"(supported: {', '.join(_ACTIVATIONS)})"
        )
    hd = conf.get("head_dim")
    if hd is not None and hd * conf["num_attention_heads"] != conf["hidden_size"]:
        raise ValueError(f"{where}: head_dim·num_attention_heads != hidden_size is not supported")


def _rope(conf: dict) -> tuple[float, float]:
    """(partial_rotary_factor, rope_theta): transformers 5 nests them in ``rope_parameters``;
    older configs (and microsoft/phi-1_5's own config.json) keep them at the top level."""
    rp = conf.get("rope_parameters") or {}
    if rp.get("rope_type", "default") != "default" or conf.get("rope_scaling"):
        raise ValueError(
            f"rope scaling {rp.get('rope_type') or conf.get('rope_scaling')!r} is not "
            "supported (UniF²ace uses plain rotary)"
        )
    frac = rp.get("partial_rotary_factor", conf.get("partial_rotary_factor", 0.5))
    theta = rp.get("rope_theta", conf.get("rope_theta", 10000.0))
    return float(frac), float(theta)


def config_from_phi(phi_config: dict, **overrides) -> ModelConfig:
    """A :class:`ModelConfig` with Phi's dense sizes: ``d_model, n_layers, n_heads, d_ff,
    rotary_frac, rope_theta, norm_eps, activation`` and ``text_vocab`` = Phi's vocabulary size.
    ``expert_ffn`` defaults to Phi's ``intermediate_size`` (so the MLP can be upcycled into the
    experts). Everything else (``token_moe``, ``seq_moe``, ``codebook_size`` …) comes from
    ``overrides`` or the dataclass defaults; unknown keys raise."""
    _check_phi_config(phi_config, "Phi config")
    frac, theta = _rope(phi_config)
    base = dict(
        name=f"phi-{phi_config['num_hidden_layers']}x{phi_config['hidden_size']}",
        text_vocab=phi_config["vocab_size"],
        d_model=phi_config["hidden_size"],
        n_layers=phi_config["num_hidden_layers"],
        n_heads=phi_config["num_attention_heads"],
        d_ff=phi_config["intermediate_size"],
        expert_ffn=phi_config["intermediate_size"],
        rotary_frac=frac,
        rope_theta=theta,
        norm_eps=float(phi_config.get("layer_norm_eps", 1e-5)),
        activation=_ACTIVATIONS[phi_config.get("hidden_act", "gelu_new")],
        qk_norm=bool(phi_config.get("qk_layernorm", False)),
    )
    return ModelConfig.from_dict({**base, **overrides}, where="config_from_phi")


# ------------------------------------------------------------------------------------------------
# weights
# ------------------------------------------------------------------------------------------------


def load_phi_state(folder) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors by transformers name (safetensors, sharded safetensors or .bin)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Phi checkpoint folder {folder} does not exist")
    tensors = TensorFolder(folder, _WEIGHT_FILES)
    return {k: tensors.get(k) for k in tensors.keys()}


def _check_fits(cfg: ModelConfig, conf: dict) -> None:
    """Settings that shapes cannot reveal (heads, rotary, eps, activation) must agree exactly."""
    frac, theta = _rope(conf)
    want = {
        "n_heads": conf["num_attention_heads"],
        "rotary_frac": frac,
        "rope_theta": theta,
        "norm_eps": float(conf.get("layer_norm_eps", 1e-5)),
        "activation": _ACTIVATIONS[conf.get("hidden_act", "gelu_new")],
        "n_layers": conf["num_hidden_layers"],
        "d_model": conf["hidden_size"],
        "text_vocab": conf["vocab_size"],
        "qk_norm": bool(conf.get("qk_layernorm", False)),
    }
    bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        desc = ", ".join(f"{k}: model {a!r} vs Phi {b!r}" for k, (a, b) in bad.items())
        raise ValueError(
            f"the model's config does not match the Phi checkpoint ({desc}); "
            "build it with config_from_phi(...)"
        )


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str, dst_name: str) -> None:
    """dst ← src (broadcast over leading expert / row-slice dims only where the caller sliced)."""
    if tuple(dst.shape[-src.dim() :]) != tuple(src.shape) or dst.dim() < src.dim():
        raise ValueError(
            f"shape mismatch: Phi tensor {name} {tuple(src.shape)} does not fit "
            f"{dst_name} {tuple(dst.shape)}"
        )
    dst.copy_(src.to(dst.dtype).expand_as(dst))


def _pattern(name: str) -> str:
    return re.sub(r"^layers\.\d+\.", "layers.*.", name)


def load_phi(model: nn.Module, folder, *, strict_dense: bool = True) -> dict:
    """Copy a Phi checkpoint's dense weights into ``model`` (a :class:`UniF2ace`) in place.

    ``strict_dense``: every dense tensor must be in the checkpoint and every checkpoint tensor must
    be used; with False, missing ones keep their init and both lists go into the report. Shape
    mismatches always raise (naming the tensor), as do settings shapes cannot reveal (heads,
    rotary fraction and θ, LayerNorm eps, activation). Returns a report: ``copied`` (Phi names),
    ``dropped`` (Phi tensors read but not used: the MLP biases when upcycling), ``kept_init``
    (UniF²ace parameter patterns left untouched), ``missing``, ``unused``, ``upcycled``, ``notes``.
    """
    folder = Path(folder)
    conf = read_phi_config(folder)
    cfg = model.config
    _check_fits(cfg, conf)
    state = load_phi_state(folder)
    V = conf["vocab_size"]
    tied = conf.get("tie_word_embeddings") and "lm_head.weight" not in state
    if tied and "model.embed_tokens.weight" in state:  # a tied head is saved once
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    params = dict(model.named_parameters())
    written: set[str] = set()
    copied, missing, dropped = [], [], []
    src_dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in state.values()})

    def take(name: str):
        if name in state:
            copied.append(name)
            return state[name]
        missing.append(name)
        return None

    def plain(phi_name: str, ours: str, rows: int | None = None) -> None:
        src = take(phi_name)
        if src is None:
            return
        dst = params[ours]
        if rows is not None:
            if src.shape[0] != rows or dst.shape[0] < rows:
                raise ValueError(
                    f"shape mismatch: Phi tensor {phi_name} {tuple(src.shape)} does "
                    f"not fit the first {rows} rows of {ours} {tuple(dst.shape)}"
                )
            dst = dst[:rows]
        _copy(dst, src, phi_name, ours)
        written.add(ours)

    notes = []
    with torch.no_grad():
        plain("model.embed_tokens.weight", "embed_tokens.weight", V)
        plain("lm_head.weight", "lm_head.weight", V)
        plain("lm_head.bias", "lm_head.bias", V)
        for wb in ("weight", "bias"):
            plain(f"model.final_layernorm.{wb}", f"final_layernorm.{wb}")
        for i, block in enumerate(model.layers):
            p, q = f"model.layers.{i}.", f"layers.{i}."
            for wb in ("weight", "bias"):
                plain(f"{p}input_layernorm.{wb}", f"{q}input_layernorm.{wb}")
                for proj in ("q_proj", "k_proj", "v_proj", "dense"):
                    plain(f"{p}self_attn.{proj}.{wb}", f"{q}self_attn.{proj}.{wb}")
                if cfg.qk_norm:
                    for norm in ("q_layernorm", "k_layernorm"):
                        plain(f"{p}self_attn.{norm}.{wb}", f"{q}self_attn.{norm}.{wb}")
            if isinstance(block.mlp, DenseMLP):
                for fc in ("fc1", "fc2"):
                    for wb in ("weight", "bias"):
                        plain(f"{p}mlp.{fc}.{wb}", f"{q}mlp.{fc}.{wb}")
            elif isinstance(block.mlp, TokenMoE):
                moe = block.mlp
                for fc, names in (
                    ("fc1", ("w_up", "shared_up")),
                    ("fc2", ("w_down", "shared_down")),
                ):
                    src = take(f"{p}mlp.{fc}.weight")
                    if src is not None:
                        for n in names:
                            if getattr(moe, n) is not None:
                                _copy(getattr(moe, n), src, f"{p}mlp.{fc}.weight", f"{q}mlp.{n}")
                                written.add(f"{q}mlp.{n}")
                    if f"{p}mlp.{fc}.bias" in state:
                        dropped.append(f"{p}mlp.{fc}.bias")  # the experts have no bias
            else:
                raise TypeError(f"layer {i}: unknown MLP module {type(block.mlp).__name__}")

    upcycled = bool(cfg.token_moe)
    if upcycled:
        S = cfg.shared_experts
        notes.append(
            f"token MoE upcycled: Phi's fc1/fc2 weights copied into all {2 * cfg.routed_experts} "
            f"routed and {2 * S} shared experts of both groups; fc1/fc2 biases dropped (experts "
            f"have none); routers keep their init. At init the MLP branch is "
            f"{S + 1}·fc2(gelu(fc1 x)) without biases, not Phi's MLP."
        )
    if cfg.seq_moe:
        notes.append("sequence MoE (routers, resamplers, mix) keeps its init")
    if cfg.vocab_size > V:
        notes.append(
            f"embedding / LM-head rows [{V}, {cfg.vocab_size}) (image codes, mask) keep their init"
        )
    unused = sorted(set(state) - set(copied) - set(dropped))
    if strict_dense and (missing or unused):
        raise ValueError(
            f"{folder}: checkpoint does not match the dense model: missing "
            f"{missing[:5]}{' …' if len(missing) > 5 else ''}, unused "
            f"{unused[:5]}{' …' if len(unused) > 5 else ''} (strict_dense=False "
            "loads what fits)"
        )
    kept = []
    for n in params:
        if n not in written and _pattern(n) not in kept:
            kept.append(_pattern(n))
    return {
        "folder": str(folder),
        "phi": {
            k: conf.get(k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
                "hidden_act",
            )
        },
        "source_dtypes": src_dtypes,
        "copied": copied,
        "n_copied": len(copied),
        "kept_init": kept,
        "missing": missing,
        "unused": unused,
        "upcycled": upcycled,
        "dropped": dropped,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------------
# a text-only batch (Phi parity checks, text pre-training)
# ------------------------------------------------------------------------------------------------


def text_batch(ids: torch.Tensor) -> dict:
    """A batch dict for text-only sequences ``ids [B, L]``: understanding task, no image, every
    token valid and pooled, no loss targets."""
    if ids.dim() != 2:
        raise ValueError(f"ids must be [B, L], got shape {tuple(ids.shape)}")
    B, L = ids.shape
    dev = ids.device
    ones = torch.ones(B, L, dtype=torch.bool, device=dev)
    return {
        "input_ids": ids.long(),
        "task": torch.full((B,), TASK_MMU, dtype=torch.long, device=dev),
        "is_image": torch.zeros_like(ones),
        "valid": ones,
        "pool": ones.clone(),
        "prompt": torch.zeros_like(ones),
        "targets": torch.full((B, L), IGNORE, dtype=torch.long, device=dev),
        "index": torch.arange(B, device=dev),
        "semantic": None,
        "identity": None,
        "num_tokens": B * L,
    }
