"""Load a released Show-o checkpoint into a :class:`~unif2ace.models.UniF2ace`.

A Show-o folder (``showlab/show-o``, ``show-o-512x512``, ``show-o-w-clip-vit``,
``show-o-w-clip-vit-512x512``) holds ``config.json`` (``_class_name: "Showo"``, ``vocab_size``
58498, ``llm_vocab_size`` 50295, ``codebook_size`` 8192, ``num_vq_tokens`` 256 or 1024,
``w_clip_vit``) and its fp32 weights, ``pytorch_model.safetensors`` (also read:
``model.safetensors``, a ``*.safetensors.index.json`` with its shards, ``pytorch_model.bin``).
Tensor names and what they become here::

    showo.model.embed_tokens.weight                          [V, D]   embed_tokens.weight
    showo.model.layers.{i}.input_layernorm.{weight,bias}     [D]      layers.{i}.input_layernorm
    showo.model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,dense}.{weight,bias}
    showo.model.layers.{i}.self_attn.{q_layernorm,k_layernorm}.{weight,bias}   [Dh]
    showo.model.layers.{i}.mlp.{fc1,fc2}.{weight,bias}       [F, D], [D, F]
    showo.model.final_layernorm.{weight,bias}                [D]
    showo.lm_head.{weight,bias}                              [V, D], [V]
    mm_projector.{0,2}.{weight,bias}   (CLIP-ViT variants)   [D, C], [D, D]

The sizes come from the tensors (heads = D / the q_layernorm width); Phi-1.5's settings that no
shape shows are Show-o's: rotary on half of each head, θ 10000, LayerNorm eps 1e-5, ``gelu_new``.
The vocabulary is Show-o's (:mod:`unif2ace.showo.vocab`): ``text_vocab = llm_vocab_size + 10``
special tokens, then the codebook, then the mask token, which is exactly how
:class:`~unif2ace.models.ModelConfig` lays out its ids. The MoE levels are off.

Everything is checked before anything is loaded: every expected tensor must be there with its
shape, and no unknown tensor may be left over; the error names the tensor and both shapes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unif2ace.io import TensorFolder
from unif2ace.models import ModelConfig, UniF2ace
from unif2ace.showo.vocab import NUM_SPECIAL, ShowoVocab

WEIGHT_FILES = (
    "pytorch_model.safetensors",
    "model.safetensors",
    "pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "pytorch_model.bin",
)
# buffers older checkpoints may carry; they are recomputed, never read
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_LAYER = "showo.model.layers.{i}."


def read_showo_config(folder) -> dict:
    """``folder/config.json``, checked to be a Show-o config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Show-o checkpoint folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (expected a Show-o checkpoint folder: config.json + "
            "pytorch_model.safetensors, e.g. showlab/show-o)"
        )
    conf = json.loads(path.read_text())
    if conf.get("_class_name") != "Showo":
        raise ValueError(
            f"{path}: _class_name {conf.get('_class_name')!r} is not 'Showo' (not a Show-o "
            "checkpoint folder)"
        )
    for key in ("vocab_size", "llm_vocab_size", "codebook_size", "num_vq_tokens"):
        if not isinstance(conf.get(key), int) or conf[key] <= 0:
            raise ValueError(f"{path}: {key} must be a positive integer, got {conf.get(key)!r}")
    want = conf["llm_vocab_size"] + NUM_SPECIAL + conf["codebook_size"] + 1
    if conf["vocab_size"] != want:
        raise ValueError(
            f"{path}: vocab_size {conf['vocab_size']} is not llm_vocab_size "
            f"{conf['llm_vocab_size']} + {NUM_SPECIAL} special tokens + codebook_size "
            f"{conf['codebook_size']} + 1 mask token = {want} (another vocabulary layout)"
        )
    mask = conf.get("mask_token_id", want - 1)
    if mask != want - 1:
        raise ValueError(f"{path}: mask_token_id {mask} is not the last id {want - 1}")
    return conf


def expected_shapes(conf: dict, D: int, n_layers: int, head_dim: int, d_ff: int, clip: int):
    """Show-o tensor name → shape, for a model of these sizes."""
    V = conf["vocab_size"]
    out = {
        "showo.model.embed_tokens.weight": (V, D),
        "showo.model.final_layernorm.weight": (D,),
        "showo.model.final_layernorm.bias": (D,),
        "showo.lm_head.weight": (V, D),
        "showo.lm_head.bias": (V,),
    }
    for i in range(n_layers):
        p = _LAYER.format(i=i)
        for wb in ("weight", "bias"):
            out[f"{p}input_layernorm.{wb}"] = (D,)
            for proj in ("q_proj", "k_proj", "v_proj", "dense"):
                out[f"{p}self_attn.{proj}.{wb}"] = (D, D) if wb == "weight" else (D,)
            for norm in ("q_layernorm", "k_layernorm"):
                out[f"{p}self_attn.{norm}.{wb}"] = (head_dim,)
        out[f"{p}mlp.fc1.weight"], out[f"{p}mlp.fc1.bias"] = (d_ff, D), (d_ff,)
        out[f"{p}mlp.fc2.weight"], out[f"{p}mlp.fc2.bias"] = (D, d_ff), (D,)
    if clip:
        out["mm_projector.0.weight"], out["mm_projector.0.bias"] = (D, clip), (D,)
        out["mm_projector.2.weight"], out["mm_projector.2.bias"] = (D, D), (D,)
    return out


def our_name(name: str) -> str:
    """The :class:`UniF2ace` parameter a Show-o tensor fills."""
    if name.startswith("showo.model."):
        return name[len("showo.model.") :]
    if name.startswith("showo."):
        return name[len("showo.") :]
    return name


def _sizes(conf: dict, tensors: TensorFolder, where: str) -> dict:
    keys = set(tensors.keys())

    def shape(name):
        if name not in keys:
            raise ValueError(f"{where}: missing tensor {name}")
        return tensors.shape(name)

    V, D = shape("showo.model.embed_tokens.weight")
    if V != conf["vocab_size"]:
        raise ValueError(
            f"{where}: showo.model.embed_tokens.weight has {V} rows, config.json says "
            f"vocab_size {conf['vocab_size']}"
        )
    n_layers = 0
    while f"{_LAYER.format(i=n_layers)}input_layernorm.weight" in keys:
        n_layers += 1
    if n_layers == 0:
        raise ValueError(f"{where}: no layers (missing {_LAYER.format(i=0)}input_layernorm.weight)")
    head_dim = shape(f"{_LAYER.format(i=0)}self_attn.q_layernorm.weight")[0]
    if D % head_dim:
        raise ValueError(
            f"{where}: hidden size {D} is not a multiple of the q_layernorm width {head_dim}"
        )
    d_ff = shape(f"{_LAYER.format(i=0)}mlp.fc1.weight")[0]
    clip = 0
    if conf.get("w_clip_vit"):
        clip = shape("mm_projector.0.weight")[1]
    return dict(D=D, n_layers=n_layers, head_dim=head_dim, d_ff=d_ff, clip=clip)


def showo_config(conf: dict, sizes: dict) -> ModelConfig:
    """The :class:`ModelConfig` of a Show-o checkpoint (sizes from its tensors)."""
    D = sizes["D"]
    return ModelConfig(
        name=f"showo-{sizes['n_layers']}x{D}" + ("-clip" if sizes["clip"] else ""),
        text_vocab=conf["llm_vocab_size"] + NUM_SPECIAL,
        codebook_size=conf["codebook_size"],
        image_tokens=conf["num_vq_tokens"],
        max_text_len=128,
        d_model=D,
        n_layers=sizes["n_layers"],
        n_heads=D // sizes["head_dim"],
        d_ff=sizes["d_ff"],
        rotary_frac=0.5,
        rope_theta=10000.0,
        norm_eps=1e-5,
        activation="gelu_tanh",
        qk_norm=True,
        mm_projector_dim=sizes["clip"],
        image_pos_embed=False,
        code_vector_dim=0,
        token_moe=False,
        seq_moe=False,
        alpha=0.0,
        layout="showo",
        special_ids=ShowoVocab.from_config(conf).layout_ids(),
        extra={"source": "showo", "w_clip_vit": bool(sizes["clip"])},
    ).validate()


def open_showo(folder) -> tuple[dict, TensorFolder, ModelConfig, dict]:
    """``(config.json, its tensors, the ModelConfig, Show-o name → shape)`` of a checkpoint
    folder, every tensor's name and shape checked (nothing is loaded yet)."""
    folder = Path(folder)
    conf = read_showo_config(folder)
    tensors = TensorFolder(folder, WEIGHT_FILES)
    where = str(folder / tensors.file)
    sizes = _sizes(conf, tensors, where)
    want = expected_shapes(conf, **sizes)
    have = set(tensors.keys())
    missing = sorted(set(want) - have)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{where}: missing tensor {missing[0]} {list(want[missing[0]])}{more}")
    unknown = sorted(k for k in have - set(want) if not k.endswith(_IGNORED_SUFFIXES))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ValueError(
            f"{where}: unexpected tensor {unknown[0]}{more}; not a Show-o layout this loader knows"
        )
    for name, shape in want.items():
        got = tensors.shape(name)
        if got != shape:
            raise ValueError(
                f"{where}: tensor {name} has shape {list(got)}, expected {list(shape)}"
            )
    return conf, tensors, showo_config(conf, sizes), want


def load_showo(folder, dtype: torch.dtype | None = None, device="cpu") -> UniF2ace:
    """A released Show-o checkpoint as a :class:`UniF2ace` in eval mode (QK-norm on, Show-o's
    vocabulary and layout, MoE levels off), on ``device`` in ``dtype`` (default: the
    checkpoint's).

    The model carries ``model.showo`` (a :class:`ShowoVocab` of the checkpoint) and
    ``model.showo_config`` (its config.json). Raises ``ValueError`` naming the tensor for a
    missing, unknown or wrongly shaped tensor, and ``FileNotFoundError`` for a folder that is not
    a checkpoint, before any weight is loaded."""
    conf, tensors, cfg, want = open_showo(folder)
    embed = "showo.model.embed_tokens.weight"
    first = tensors.get(embed)  # read once: its dtype is the default, then it is copied
    dtype = dtype or first.dtype
    with torch.device("meta"):
        model = UniF2ace(cfg)
    model = model.to(dtype).to_empty(device=device)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in want:
            params[our_name(name)].copy_(first if name == embed else tensors.get(name))
        model.reset_buffers()
    model.showo = ShowoVocab.from_config(conf)
    model.showo_config = conf
    return model.eval()
