"""The Phi-1.5 loader: a tiny random transformers Phi saved to disk, loaded into UniF²ace, gives
Phi's logits; the upcycled token MoE runs (and equals Phi's MLP where it should); bad folders,
configs and shapes raise errors that name the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from showo_mini import random_phi  # noqa: E402

from unif2ace.models import UniF2ace  # noqa: E402
from unif2ace.models.phi import (  # noqa: E402
    config_from_phi,
    load_phi,
    load_phi_state,
    read_phi_config,
    text_batch,
)

V, D, LAYERS, HEADS, FF = 97, 64, 2, 4, 128
# image side kept small: only the text rows are compared with Phi
SMALL = dict(codebook_size=11, image_tokens=4, max_text_len=8, semantic_dim=8, identity_dim=6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _phi(zero_mlp_bias=False, qk_layernorm=False):
    return random_phi(
        1,
        zero_mlp_bias,
        qk_layernorm=qk_layernorm,
        vocab_size=V,
        hidden_size=D,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        partial_rotary_factor=0.5,
        intermediate_size=FF,
    )


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phi")
    model = _phi()
    model.save_pretrained(folder)
    return folder, model


def _ids(B=3, L=13):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(2))


def _build(folder, **kw):
    cfg = config_from_phi(read_phi_config(folder), **{**SMALL, **kw})
    return UniF2ace(cfg).eval()


def test_config_from_phi(phi_dir):
    folder, _ = phi_dir
    cfg = config_from_phi(read_phi_config(folder), token_moe=False, seq_moe=False)
    assert (cfg.text_vocab, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.d_ff) == (
        V,
        D,
        LAYERS,
        HEADS,
        FF,
    )
    assert (cfg.rotary_frac, cfg.rope_theta, cfg.norm_eps, cfg.activation) == (
        0.5,
        1e4,
        1e-5,
        "gelu_tanh",
    )
    assert cfg.expert_ffn == FF and not cfg.token_moe and not cfg.seq_moe
    # older configs keep the rotary settings at the top level
    old = {k: v for k, v in read_phi_config(folder).items() if k != "rope_parameters"}
    old.update(partial_rotary_factor=0.25, rope_theta=500.0)
    cfg = config_from_phi(old)
    assert (cfg.rotary_frac, cfg.rope_theta) == (0.25, 500.0)
    with pytest.raises(ValueError, match="unknown key"):
        config_from_phi(read_phi_config(folder), token_moee=False)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_dense_logits_match_phi(phi_dir, tmp_path, fmt):
    folder, phi = phi_dir
    if fmt == "bin":  # the older pytorch_model.bin layout
        shutil.copy(folder / "config.json", tmp_path / "config.json")
        torch.save(phi.state_dict(), tmp_path / "pytorch_model.bin")
        folder = tmp_path
    model = _build(folder, token_moe=False, seq_moe=False)
    report = load_phi(model, folder)
    # embedding, head w + b, final LN w + b; per layer LN 2, attention 8, MLP 4
    assert report["n_copied"] == len(load_phi_state(folder)) == 5 + 14 * LAYERS
    assert not report["missing"] and not report["unused"] and not report["upcycled"]
    # the dense model is all Phi (only extra vocab rows differ) but for the image-token input
    # embeddings Phi has no counterpart of
    assert sorted(report["kept_init"]) == ["code_proj.weight", "image_pos.weight"]
    ids = _ids()
    with torch.no_grad():
        ref = phi(ids).logits
        out = model(text_batch(ids))
    assert out.shape[-1] == model.config.vocab_size
    torch.testing.assert_close(out[..., :V], ref, rtol=0, atol=1e-4)


def test_qk_layernorm_logits_match_phi(tmp_path):
    """Show-o's Phi: a LayerNorm over each head's q and k before rotary (qk_layernorm=True)."""
    phi = _phi(qk_layernorm=True)
    phi.save_pretrained(tmp_path)
    model = _build(tmp_path, token_moe=False, seq_moe=False)
    assert model.config.qk_norm
    report = load_phi(model, tmp_path)
    assert report["n_copied"] == 5 + 18 * LAYERS and not report["unused"]
    ids = _ids()
    with torch.no_grad():
        ref = phi(ids).logits
        out = model(text_batch(ids))
    torch.testing.assert_close(out[..., :V], ref, rtol=0, atol=1e-4)
    # a model without the norms cannot take the checkpoint
    with pytest.raises(ValueError, match="qk_norm"):
        load_phi(_build(tmp_path, token_moe=False, seq_moe=False, qk_norm=False), tmp_path)


def test_upcycled_moe_runs_and_trains(phi_dir):
    folder, _ = phi_dir
    model = _build(folder)  # token MoE + sequence MoE on
    report = load_phi(model, folder)
    assert report["upcycled"] and not report["unused"]
    assert report["dropped"] == [
        f"model.layers.{i}.mlp.{fc}.bias" for i in range(LAYERS) for fc in ("fc1", "fc2")
    ]
    assert any("upcycled" in n and "biases dropped" in n for n in report["notes"])
    assert "layers.*.mlp.router.weight" in report["kept_init"]
    assert "layers.*.seq_moe.router.weight" in report["kept_init"]
    sd = load_phi_state(folder)
    for i, block in enumerate(model.layers):
        fc1, fc2 = sd[f"model.layers.{i}.mlp.fc1.weight"], sd[f"model.layers.{i}.mlp.fc2.weight"]
        for w in (block.mlp.w_up, block.mlp.shared_up):
            assert torch.equal(w, fc1.expand_as(w))
        for w in (block.mlp.w_down, block.mlp.shared_down):
            assert torch.equal(w, fc2.expand_as(w))
    model.train()
    ids = _ids(2, 9)
    batch = text_batch(ids)
    batch["targets"][:, :-1] = ids[:, 1:]
    loss, parts = model.loss(batch)
    assert torch.isfinite(loss) and parts["loss_mmu"] > 0
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".mlp." in n)


@pytest.mark.parametrize("shared", [0, 1])
def test_upcycled_moe_equals_scaled_phi_mlp(tmp_path, shared):
    """Identical experts + renormalised top-k: the MLP branch is (shared + 1)·MLP(x) without the
    biases, whatever the routing. With Phi's MLP biases zero and its fc2 scaled by (shared + 1),
    the upcycled model (sequence MoE off) gives Phi's logits."""
    phi = _phi(zero_mlp_bias=True)
    phi.save_pretrained(tmp_path)
    model = _build(tmp_path, seq_moe=False, shared_experts=shared)
    load_phi(model, tmp_path)
    with torch.no_grad():
        for layer in phi.model.layers:
            layer.mlp.fc2.weight.mul_(shared + 1)
        ids = _ids()
        torch.testing.assert_close(
            model(text_batch(ids))[..., :V], phi(ids).logits, rtol=0, atol=1e-4
        )


# ------------------------------------------------------------------------------------------------
# bad input


def _edited_copy(src, dst, edit):
    """A copy of the checkpoint folder ``src`` in ``dst`` with ``edit(state_dict)`` applied."""
    for f in ("config.json", "model.safetensors"):
        shutil.copy(src / f, dst / f)
    sd = load_file(str(dst / "model.safetensors"))
    edit(sd)
    save_file(sd, str(dst / "model.safetensors"))
    return dst


def test_missing_folder_and_files(phi_dir, tmp_path):
    folder, _ = phi_dir
    model = _build(folder, token_moe=False, seq_moe=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_phi(model, tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_phi(model, tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights found.*model.safetensors"):
        load_phi(model, tmp_path)


def test_not_a_phi_config(phi_dir, tmp_path):
    folder, _ = phi_dir
    conf = read_phi_config(folder)
    for bad, match in [
        ({"model_type": "llama"}, "not a transformers Phi"),
        ({"model_type": "phi-msft"}, "convert_phi_weights_to_hf"),
        ({"num_key_value_heads": 2}, "num_key_value_heads"),
        ({"hidden_act": "relu"}, "hidden_act"),
    ]:
        with pytest.raises(ValueError, match=match):
            config_from_phi({**conf, **bad})
        (tmp_path / "config.json").write_text(json.dumps({**conf, **bad}))
        with pytest.raises(ValueError, match=match):
            read_phi_config(tmp_path)


def test_config_disagrees(phi_dir):
    folder, _ = phi_dir
    # heads, rotary fraction: same shapes, different model; must not load silently
    for kw, name in [
        ({"n_heads": 8}, "n_heads"),
        ({"rotary_frac": 0.25}, "rotary_frac"),
        ({"n_layers": 1}, "n_layers"),
    ]:
        model = _build(folder, token_moe=False, seq_moe=False, **kw)
        with pytest.raises(ValueError, match=f"does not match the Phi checkpoint.*{name}"):
            load_phi(model, folder)


def test_shape_mismatch_names_tensor(phi_dir, tmp_path):
    folder, _ = phi_dir

    def edit(sd):
        sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(D, D + 1)

    _edited_copy(folder, tmp_path, edit)
    model = _build(tmp_path, token_moe=False, seq_moe=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_phi(model, tmp_path)
    # experts narrower than Phi's MLP cannot be upcycled
    model = _build(folder, expert_ffn=FF // 2)
    with pytest.raises(ValueError, match=r"shape mismatch.*model\.layers\.0\.mlp\.fc1\.weight"):
        load_phi(model, folder)


def test_strict_dense(phi_dir, tmp_path):
    folder, _ = phi_dir

    def edit(sd):
        del sd["model.layers.0.mlp.fc2.bias"]
        sd["model.extra.weight"] = torch.zeros(3)

    _edited_copy(folder, tmp_path, edit)
    model = _build(tmp_path, token_moe=False, seq_moe=False)
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.0\.mlp\.fc2\.bias'\]"):
        load_phi(model, tmp_path)
    before = model.layers[0].mlp.fc2.bias.clone()
    report = load_phi(model, tmp_path, strict_dense=False)
    assert report["missing"] == ["model.layers.0.mlp.fc2.bias"]
    assert report["unused"] == ["model.extra.weight"]
    assert torch.equal(model.layers[0].mlp.fc2.bias, before)
    assert "layers.*.mlp.fc2.bias" in report["kept_init"]


def test_text_batch_rejects_1d():
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        text_batch(torch.arange(5))
