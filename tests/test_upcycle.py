"""UniF²ace from Show-o (``unif2ace.showo.upcycle``) on miniature checkpoints in the released
layout: the "showo" layout collates Show-o's own sequences and its rule gives Show-o's logits; the
upcycled model equals Show-o exactly at initialisation (token MoE = Show-o's MLP, sequence MoE =
identity, logits = Show-o's); a Show-o of another vocabulary or size is refused by name."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from showo_mini import LLM_V, phi_reference, random_phi, write_showo  # noqa: E402

from unif2ace.models import collate, get_config, parameter_count  # noqa: E402
from unif2ace.models.layout import TASK_MMU, TASK_T2I, Example, showo_text  # noqa: E402
from unif2ace.showo import load_showo, showo_logits  # noqa: E402
from unif2ace.showo.upcycle import miniature_paper_config, upcycle_showo  # noqa: E402
from unif2ace.showo.vocab import MAX_TEXT_LEN  # noqa: E402

N = 16  # 4 × 4 codes


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    folder = tmp_path_factory.mktemp("showo")
    write_showo(folder, phi_reference(), num_vq_tokens=N)
    return folder, load_showo(folder)


def _examples(seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(0, LLM_V, (n,), generator=g).tolist()

    def codes():
        return torch.randint(0, 8192, (N,), generator=g)

    return [
        Example(TASK_T2I, codes(), text(7), index=0),
        Example(TASK_T2I, codes(), [], index=1),  # the unconditional row
        Example(TASK_MMU, codes(), text(5), text(4), index=2),
        Example(TASK_MMU, codes(), text(9), text(2), index=3, turns=((text(3), text(2)),)),
        Example(TASK_T2I, codes(), text(140), index=4),  # cut to 128 tokens, ends in EOS
    ]


def test_showo_layout_is_showos_sequences(mini):
    _, model = mini
    cfg, vocab = model.config, model.showo
    assert cfg.layout == "showo" and cfg.special_ids == vocab.layout_ids()
    assert showo_text(cfg, []) == vocab.t2i_text([])
    exs = _examples()
    batch = collate(cfg, exs)
    for b, ex in enumerate(exs):
        ids = batch["input_ids"][b]
        if ex.task == TASK_T2I:
            want = vocab.t2i_prompt([ex.prompt], ex.codes[None])[0]
            assert torch.equal(ids[: want.numel()], want)
            assert ids.numel() == want.numel() or not batch["valid"][b, want.numel() :].any()
            s, e = batch["meta"].prompt[b]
            assert e - s == min(len(ex.prompt), MAX_TEXT_LEN - 3)
        else:
            head = vocab.mmu_prompt(ex.codes, ex.prompt)[0].tolist()
            want = head + ex.answer + [vocab.eos]
            for q, a in ex.turns:
                want += q + a + [vocab.eos]
            n = len(want)
            assert ids[:n].tolist() == want and int(batch["valid"][b].sum()) == n
            # targets: the answers and their EOS, each predicted by the token before it
            tgt = batch["targets"][b]
            learn = [i + 1 for i in range(n - 1) if tgt[i] != -100]
            assert [want[i] for i in learn] == tgt[tgt != -100].tolist()
            assert len(learn) == len(ex.answer) + 1 + sum(len(a) + 1 for _, a in ex.turns)


def test_showo_layout_forward_is_showos_rule(mini):
    """The training path (collate → forward) on layout "showo" equals Show-o's rule
    (``showo_logits``) row by row, at every position Show-o's rule computes the same way
    (its pad rows are the documented exception)."""
    _, model = mini
    cfg = model.config
    exs = _examples(1)
    batch = collate(cfg, exs)
    with torch.no_grad():
        out = model(batch)
    for b in range(len(exs)):
        valid = batch["valid"][b]
        n = int(valid.nonzero().max()) + 1
        ref = showo_logits(model, batch["input_ids"][b : b + 1, :n])[0]
        keep = valid[:n]
        torch.testing.assert_close(out[b, :n][keep], ref[keep], rtol=1e-5, atol=1e-5)


def test_upcycled_model_is_showo_at_init(mini):
    folder, showo = mini
    cfg = miniature_paper_config(showo.config, semantic_dim=24, identity_dim=16)
    model = upcycle_showo(folder, cfg, seed=3).eval()
    assert cfg.token_moe and cfg.seq_moe and cfg.dense_ffn == showo.config.d_ff
    batch = collate(cfg, _examples(2))
    g = torch.Generator().manual_seed(0)
    batch["semantic"] = torch.randn(len(batch["task"]), 24, generator=g)
    batch["identity"] = torch.randn(len(batch["task"]), 16, generator=g)
    with torch.no_grad():
        got = model(batch)
        want = showo({**batch, "semantic": None, "identity": None})
        # exact: the experts add zero, the sequence MoE is the identity
        for layer, ref in zip(model.layers, showo.layers):
            assert not layer.mlp.w_down.any() and not layer.mlp.shared_down.any()
            x = torch.randn(7, cfg.d_model, generator=g)
            y, _ = layer.mlp(x, torch.tensor([0, 1, 0, 1, 1, 0, 0]))
            assert torch.equal(y, ref.mlp(x, None)[0])
            m = torch.randn(3, 5, cfg.d_model, generator=g)
            a, c, _, _ = layer.seq_moe.mixture(
                m, torch.ones(3, 5, dtype=torch.bool), torch.tensor([0, 1, 0]),
                batch["semantic"][:3], batch["identity"][:3],
            )  # fmt: skip
            assert torch.equal(a, torch.ones(3)) and torch.equal(c, torch.zeros(3, cfg.d_model))
    valid = batch["valid"]
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)
    # the dense weights are Show-o's; the experts' up-projections are slices of its fc1
    F_ = cfg.expert_ffn
    fc1 = showo.layers[1].mlp.fc1.weight
    assert torch.equal(model.layers[1].mlp.dense.fc1.weight, fc1)
    assert torch.equal(model.layers[1].mlp.w_up[cfg.routed_experts + 1], fc1[F_ : 2 * F_])


def test_upcycled_model_trains_away_from_showo(mini):
    """A training step moves the experts (their down-projections get the gradient)."""
    folder, showo = mini
    cfg = miniature_paper_config(showo.config, semantic_dim=8, identity_dim=8)
    model = upcycle_showo(folder, cfg).train()
    batch = collate(cfg, _examples(3))
    loss, parts = model(batch, loss=True, step=0, seed=0)
    loss.backward()
    assert torch.isfinite(loss) and float(parts["loss_t2i"]) > 0 and float(parts["loss_mmu"]) > 0
    assert model.layers[0].mlp.w_down.grad.abs().sum() > 0
    assert model.layers[0].mlp.dense.fc1.weight.grad.abs().sum() > 0


def test_other_vocabulary_or_sizes_refused(mini, tmp_path):
    folder, showo = mini
    other = tmp_path / "other"
    phi = random_phi(
        0, vocab_size=50400 + 10 + 8192 + 1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, partial_rotary_factor=0.5,
        qk_layernorm=True,
    )  # fmt: skip
    write_showo(
        other, phi, num_vq_tokens=N, llm_vocab_size=50400, vocab_size=58603, mask_token_id=58602
    )
    cfg = miniature_paper_config(showo.config)
    with pytest.raises(ValueError, match=r"text_vocab: config 50305, checkpoint 50410"):
        upcycle_showo(other, cfg)
    with pytest.raises(ValueError, match=r"n_layers: config 3, checkpoint 2"):
        upcycle_showo(folder, dataclasses.replace(cfg, n_layers=3))
    with pytest.raises(ValueError, match=r"expert_ffn"):
        upcycle_showo(folder, dataclasses.replace(cfg, expert_ffn=64))


def test_paper_config_size():
    """The paper's ~1.8 B: all parameters 1.96 B, active per token 1.79 B (Show-o 1.45 B here)."""
    cfg = get_config("paper")
    n = parameter_count(cfg)
    assert 1.9e9 < n["total"] < 2.0e9 and 1.75e9 < n["active_per_token"] < 1.85e9
    dense = parameter_count(dataclasses.replace(cfg, token_moe=False, seq_moe=False))
    assert dense["total"] == 1_448_176_770  # Show-o's own tensors, as test_showo counts them
