"""Miniature Show-o checkpoints in the released layout (random weights, the real 58,498-token
vocabulary, 2 layers, width 64) and a transformers ``PhiForCausalLM(qk_layernorm=True)`` holding
the same tensors, for the tests of :mod:`unif2ace.showo`."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

V, LLM_V, K = 58498, 50295, 8192
D, LAYERS, HEADS, FF = 64, 2, 4, 128


def random_phi(seed: int = 0, zero_mlp_bias: bool = False, **config):
    """A random transformers ``PhiForCausalLM`` of ``config`` (eager attention, so a 4-D additive
    mask is used as given), its biases and norms perturbed so that they matter."""
    import transformers

    torch.manual_seed(seed)
    conf = transformers.PhiConfig(**config)
    conf._attn_implementation = "eager"
    model = transformers.PhiForCausalLM(conf).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if zero_mlp_bias and ".mlp." in name and name.endswith("bias"):
                p.zero_()
    return model


def phi_reference(seed: int = 0):
    """Show-o's Phi at miniature size: the real vocabulary, QK-LayerNorm."""
    return random_phi(
        seed,
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FF,
        partial_rotary_factor=0.5,
        qk_layernorm=True,
    )


def write_showo(folder, phi, *, num_vq_tokens: int = 16, clip_dim: int = 0, **config):
    """``folder/config.json`` + ``folder/pytorch_model.safetensors`` as Show-o releases them."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {f"showo.{k}": v.detach().clone() for k, v in phi.state_dict().items()}
    if clip_dim:
        g = torch.Generator().manual_seed(5)
        state["mm_projector.0.weight"] = torch.randn(D, clip_dim, generator=g) * 0.1
        state["mm_projector.0.bias"] = torch.randn(D, generator=g) * 0.1
        state["mm_projector.2.weight"] = torch.randn(D, D, generator=g) * 0.1
        state["mm_projector.2.bias"] = torch.randn(D, generator=g) * 0.1
    conf = {
        "_class_name": "Showo",
        "_diffusers_version": "0.25.0",
        "vocab_size": V,
        "llm_vocab_size": LLM_V,
        "llm_model_path": "microsoft/phi-1_5",
        "codebook_size": K,
        "num_vq_tokens": num_vq_tokens,
        "load_from_showo": False,
        "mask_token_id": V - 1,
        "w_clip_vit": bool(clip_dim),
        **config,
    }
    (folder / "config.json").write_text(json.dumps(conf))
    save_file(state, str(folder / "pytorch_model.safetensors"))
    return state


def write_tokenizer(folder):
    """A small byte-level BPE ``tokenizer.json`` with Phi's ``<|endoftext|>`` (ids far below
    Show-o's 50295: the layout takes its special ids from the checkpoint, not the tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["a photo of a smiling woman with curly hair", "USER: \n what is ASSISTANT:"] * 20
    tok.train_from_iterator(text, trainer)
    tok.save(str(folder / "tokenizer.json"))
    return folder
