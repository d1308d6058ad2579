"""The Hugging Face drop-in (unif2ace.ops.moe.hf): tiny random Mixtral and Qwen2-MoE blocks and
models run through unif2ace's ops match their own forward (and gradients). transformers is a
test-only dependency: the module is skipped without it."""

import pytest
import torch

from conftest import rel_err

transformers = pytest.importorskip("transformers")

from unif2ace.ops.moe.hf import (  # noqa: E402
    moe_block_forward,
    register_hf_experts,
    unif2ace_experts_forward,
)

BACKENDS = ["torch", "cpu"]


def tiny_config(kind, **over):
    common = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    if kind == "mixtral":
        cfg = transformers.MixtralConfig(**common, num_local_experts=6, num_experts_per_tok=2)
    else:
        cfg = transformers.Qwen2MoeConfig(
            **common,
            num_experts=6,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=80,
            norm_topk_prob=over.pop("norm_topk_prob", False),
        )
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


def tiny_block(kind, **over):
    cfg = tiny_config(kind, **over)
    if kind == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
    else:
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as Block
    block = Block(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    return block


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "kind,over", [("mixtral", {}), ("qwen2_moe", {}), ("qwen2_moe", {"norm_topk_prob": True})]
)
def test_block_forward_matches(backend, kind, over):
    block = tiny_block(kind, **over)
    x = torch.randn(2, 19, 64, requires_grad=True)
    y_hf = block(x)
    g = torch.randn_like(y_hf)
    grads_hf = torch.autograd.grad(y_hf, [x, *block.parameters()], g)
    y = moe_block_forward(block, x, backend=backend)
    grads = torch.autograd.grad(y, [x, *block.parameters()], g)
    assert y.shape == y_hf.shape
    assert rel_err(y, y_hf) < 1e-5
    for (name, _), a, b in zip([("x", None), *block.named_parameters()], grads, grads_hf):
        assert rel_err(a, b) < 1e-5, name


def test_block_uses_the_weights_in_place():
    """No copy of the checkpoint: changing the block's expert weights changes the output."""
    block = tiny_block("mixtral")
    x = torch.randn(1, 7, 64)
    y0 = moe_block_forward(block, x, backend="cpu")
    with torch.no_grad():
        block.experts.down_proj.mul_(2)
    assert torch.allclose(moe_block_forward(block, x, backend="cpu"), 2 * y0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_experts_implementation_in_a_model(kind):
    """register_hf_experts + set_experts_implementation: a whole tiny causal LM, logits and
    gradients equal to the eager experts."""
    register_hf_experts(backend="cpu")
    cfg = tiny_config(kind)
    cls = transformers.MixtralForCausalLM if kind == "mixtral" else transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 13))
    model.set_experts_implementation("eager")
    out_ref = model(ids).logits
    grads_ref = torch.autograd.grad(
        out_ref.square().sum(), list(model.parameters()), allow_unused=True
    )
    model.set_experts_implementation("unif2ace")
    assert model.config._experts_implementation == "unif2ace"
    out = model(ids).logits
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), allow_unused=True)
    assert rel_err(out, out_ref) < 1e-5
    for a, b in zip(grads, grads_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-4


def test_unsupported_experts_raise():
    block = tiny_block("mixtral", hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        unif2ace_experts_forward(
            block.experts, torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
        )
    with pytest.raises(ValueError, match="not a Mixtral / Qwen2-MoE sparse block"):
        moe_block_forward(torch.nn.Linear(4, 4), torch.randn(1, 2, 4))
