"""The model layer: the omni-attention kernel inside the model, the MoE levels, the loss on every
backend, causality, save/load, sampling and bad input."""

from __future__ import annotations

import pytest
import torch

from model_data import examples, small_cfg
from unif2ace import _backend, ops, use_backend
from unif2ace.models import Example, UniF2ace, collate, get_config, parameter_count
from unif2ace.models.layout import TASK_MMU, TASK_T2I, BatchMeta
from unif2ace.models.sampling import generate_images, generate_text
from unif2ace.models.unif2ace import draw_noise
from unif2ace.train.trainer import _to_device


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------
# the model


def test_configs_and_parameter_count():
    tiny = UniF2ace(get_config("tiny"))
    assert sum(p.numel() for p in tiny.parameters()) == parameter_count(tiny.config)["total"]
    for kw in ({"token_moe": False}, {"seq_moe": False}, {"token_moe": False, "seq_moe": False}):
        cfg = small_cfg(**kw)
        assert sum(p.numel() for p in UniF2ace(cfg).parameters()) == parameter_count(cfg)["total"]
    full = parameter_count(get_config("full"))
    assert 1.6e9 < full["total"] < 2.0e9, full  # the paper's ~1.8B with experts


def test_unknown_config_key():
    with pytest.raises(ValueError, match="n_layer.*did you mean n_layers"):
        get_config("tiny", n_layer=3)
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")


def test_sequence_moe_embedding_experts_follow_the_scale_of_m():
    """The CLIP / Face experts' R(e) is scaled to the RMS of the sequence's own m, so it neither
    vanishes in the residual stream nor dominates it, whatever scale m has."""
    from unif2ace.models.moe import CLIP_SLOT, FACE_SLOT, SequenceMoE

    cfg = small_cfg()
    moe = SequenceMoE(cfg).eval()
    torch.nn.init.zeros_(moe.router.weight)
    moe.router.weight.data[[CLIP_SLOT, FACE_SLOT], 0] = (
        1.0  # understanding rows: CLIP + Face, 1/2 each
    )
    B, L, D = 3, 7, cfg.d_model
    m = torch.randn(B, L, D)
    m[..., 0] = m[..., 0].abs() + 1.0  # pooled feature 0 > 0: CLIP and Face win the top-2
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, 4:] = False
    task = torch.zeros(B, dtype=torch.long)
    sem, ide = torch.randn(B, cfg.semantic_dim), torch.randn(B, cfg.identity_dim)
    with torch.no_grad():
        a1, c1, _, _ = moe.mixture(m, valid, task, sem, ide)
        a2, c2, _, _ = moe.mixture(m * 100.0, valid, task, sem, ide)
        w = torch.sigmoid(moe.mix)
        vf = valid.float()[..., None]
        rms = ((m.pow(2).mean(-1, keepdim=True) * vf).sum(1) / vf.sum(1)).sqrt()
        want = rms * 0.5 * ((1 - w[0]) * moe.clip(sem) + (1 - w[1]) * moe.face(ide))
    torch.testing.assert_close(c1, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a1, 0.5 * (w[0] + w[1]).expand(B))
    torch.testing.assert_close(a2, a1)
    torch.testing.assert_close(c2, c1 * 100.0, rtol=1e-4, atol=1e-3)


def test_embedding_standardisation_is_fitted_saved_and_checked(tmp_path):
    """fit_embedding_stats removes the encoders' shared mean direction: the fitted model sees
    zero-mean, unit-variance entries, the statistics survive save/load, bad shapes raise."""
    cfg = small_cfg()
    model = UniF2ace(cfg)
    g = torch.Generator().manual_seed(3)
    common = torch.randn(cfg.semantic_dim, generator=g)
    sem = torch.nn.functional.normalize(
        4 * common + torch.randn(500, cfg.semantic_dim, generator=g), dim=1
    )
    ide = torch.nn.functional.normalize(torch.randn(500, cfg.identity_dim, generator=g), dim=1)
    raw = model.standardize_embeddings("semantic", sem)
    assert raw.mean(0).abs().mean() > 0.5  # unfitted: the shared direction dominates
    model.fit_embedding_stats(sem, ide)
    z = model.standardize_embeddings("semantic", sem).double()
    torch.testing.assert_close(
        z.mean(0), torch.zeros(cfg.semantic_dim, dtype=torch.float64), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        z.std(0), torch.ones(cfg.semantic_dim, dtype=torch.float64), atol=1e-4, rtol=0
    )
    assert model.standardize_embeddings("identity", None) is None
    model.save_pretrained(tmp_path / "m")
    back = UniF2ace.from_pretrained(tmp_path / "m", expect=cfg)
    torch.testing.assert_close(back.semantic_mean, model.semantic_mean)
    torch.testing.assert_close(back.identity_std, model.identity_std)
    with pytest.raises(ValueError, match=r"semantic embeddings .* must be \[N >= 2"):
        model.fit_embedding_stats(sem[:, :5], ide)
    with pytest.raises(ValueError, match="identity embeddings"):
        model.fit_embedding_stats(sem, ide[:1])


def test_image_position_and_code_vector_embeddings(tmp_path):
    """image_pos_embed adds a learned embedding per grid position and code_vector_dim a linear map
    of the tokenizer's code vector, to image tokens only (never the mask token or text)."""
    cfg = small_cfg(image_pos_embed=True, code_vector_dim=3)
    model = UniF2ace(cfg)
    with pytest.raises(ValueError, match=r"code vectors must be \[37, 3\]"):
        model.set_code_vectors(torch.randn(36, 3))
    with pytest.raises(ValueError, match="code_vector_dim = 0"):
        UniF2ace(small_cfg(code_vector_dim=0)).set_code_vectors(torch.randn(37, 3))
    vec = torch.randn(cfg.codebook_size, 3, dtype=torch.float64) * 5 + 2
    model.set_code_vectors(vec)
    z = ((vec - vec.mean(0)) / vec.std(0)).float()
    torch.testing.assert_close(model.code_vectors, z)
    batch = collate(cfg, examples(cfg, 4))
    ids, is_img = batch["input_ids"].clone(), batch["is_image"]
    row = 1
    where = is_img[row].nonzero().flatten()
    ids[row, where[5]] = cfg.mask_id  # a masked image token: position embedding, no code vector
    got = model.embed(ids, is_img)
    base = model.embed_tokens(ids)
    torch.testing.assert_close(got[~is_img], base[~is_img])
    for k, p in enumerate(where.tolist()):
        want = base[row, p] + model.image_pos.weight[k]
        if k != 5:
            want = want + model.code_proj(z[ids[row, p] - cfg.image_offset])
        torch.testing.assert_close(got[row, p], want)
    loss, _ = model.loss(batch, step=1, seed=0)
    loss.backward()
    assert (
        model.image_pos.weight.grad.abs().sum() > 0 and model.code_proj.weight.grad.abs().sum() > 0
    )
    model.save_pretrained(tmp_path / "m")
    back = UniF2ace.from_pretrained(tmp_path / "m", expect=cfg)
    torch.testing.assert_close(back.code_vectors, model.code_vectors)
    with pytest.raises(ValueError, match="another config"):
        UniF2ace.from_pretrained(tmp_path / "m", expect=small_cfg())


@pytest.mark.parametrize("moe", [(True, True), (False, True), (True, False), (False, False)])
def test_loss_finite_and_every_parameter_gets_a_gradient(moe):
    cfg = small_cfg(token_moe=moe[0], seq_moe=moe[1], cond_drop=0.0, noise_std=0.0)
    model = UniF2ace(cfg)
    loss, parts = model.loss(collate(cfg, examples(cfg, 8)), step=3, seed=1)
    assert torch.isfinite(loss) and parts["loss_t2i"] > 0 and parts["loss_mmu"] > 0
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # the mask-token embedding row is never a target; all parameters get a gradient tensor
    assert not no_grad, no_grad


@pytest.mark.parametrize("backend,experts", [("cpu", None), ("cpu", "silu_glu"), ("triton", None)])
def test_loss_and_gradients_match_the_torch_backend(backend, experts):
    """The whole model with the engine's kernels equals the same model on plain PyTorch ops."""
    cfg = small_cfg(noise_std=0.0, expert_activation=experts)
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 8))
    grads = {}
    for name in ("torch", backend):
        model.zero_grad()
        with use_backend(name):
            loss, parts = model.loss(batch, step=5, seed=2)
            loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    (l0, g0), (l1, g1) = grads["torch"], grads[backend]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for n in g0:
        err = (g1[n] - g0[n]).norm() / g0[n].norm().clamp(min=1e-12)
        assert err < 1e-4, (n, float(err))


@pytest.mark.skipif(_backend.cpu_ext() is None, reason="C++ CPU kernels not built")
def test_attention_kernel_in_the_model_matches_the_torch_backend(monkeypatch):
    """Every layer calls ops.omni_attention: at a head size the C++ kernel takes (16) the engine's
    layers run it with the rotary embedding inside, and the loss and every gradient equal the
    torch backend's (SDPA with the boolean mask, rotary in PyTorch)."""
    calls = {"torch": [], "cpu": []}
    for kernel, backend in (("attention.omni", "torch"), ("attention.omni_fwd", "cpu")):
        fn = _backend.launcher(kernel, backend)
        wrapped = lambda *a, fn=fn, log=calls[backend]: (log.append(1), fn(*a))[1]  # noqa: E731
        monkeypatch.setitem(_backend._LAUNCHERS[kernel], backend, wrapped)
    cfg = small_cfg(n_heads=2, noise_std=0.0)
    assert cfg.head_dim == 16
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 8))
    grads = {}
    for name in ("torch", "cpu"):
        model.zero_grad()
        with use_backend(name):
            loss, _ = model.loss(batch, step=5, seed=2)
            loss.backward()
        grads[name] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls["torch"]) == len(calls["cpu"]) == cfg.n_layers
    (l0, g0), (l1, g1) = grads["torch"], grads["cpu"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for n in g0:
        err = (g1[n] - g0[n]).norm() / g0[n].norm().clamp(min=1e-12)
        assert err < 1e-4, (n, float(err))


def test_answer_tokens_never_change_earlier_positions():
    """Causality of understanding sequences: omni mask + sequence MoE pooled over the context."""
    cfg = small_cfg()
    model = UniF2ace(cfg).eval()
    ex = examples(cfg, 1)[0]
    b1 = collate(cfg, [ex])
    ex2 = Example(
        ex.task, ex.codes, ex.prompt, [a + 1 for a in ex.answer], ex.semantic, ex.identity
    )
    b2 = collate(cfg, [ex2])
    with torch.no_grad():
        l1, l2 = model(b1), model(b2)
    first_answer = b1["targets"][0].ne(-100).nonzero()[0, 0] + 1  # position of answer token 0
    torch.testing.assert_close(l1[0, :first_answer], l2[0, :first_answer])
    assert not torch.allclose(l1[0, first_answer:], l2[0, first_answer:])


def test_a_conversation_row_learns_every_answer_and_keeps_the_first_turn():
    """Extra (question, answer) turns: targets on each answer and its <|endoftext|>, nothing else;
    the first turn's logits are those of the single-turn row (text is causal); rows stop at a turn
    boundary before outgrowing ``max_seq_len``."""
    from unif2ace.models import special_tokens as st

    cfg = small_cfg()
    model = UniF2ace(cfg).eval()
    ex = examples(cfg, 1)[0]
    turns = (([11, 12, 13], [21]), ([14, 15], [22, 23]))
    conv = Example(ex.task, ex.codes, ex.prompt, ex.answer, ex.semantic, ex.identity, turns=turns)
    b1, b2 = collate(cfg, [ex]), collate(cfg, [conv])
    t = b2["targets"][0]
    assert t[t.ne(-100)].tolist() == ex.answer + [st.EOT_ID, 21, st.EOT_ID, 22, 23, st.EOT_ID]
    ids = b2["input_ids"][0].tolist()
    n1 = b1["input_ids"].shape[1]
    assert ids[:n1] == b1["input_ids"][0].tolist()
    assert ids[n1:] == [st.USER_ID, 11, 12, 13, st.ASSISTANT_ID, 21, st.EOT_ID,
                        st.USER_ID, 14, 15, st.ASSISTANT_ID, 22, 23, st.EOT_ID]  # fmt: skip
    for k in range(len(ids) - 1):  # each target is the next input token
        if t[k] != -100:
            assert t[k] == ids[k + 1]
    with torch.no_grad():
        l1, l2 = model(b1), model(b2)
    torch.testing.assert_close(l1[0], l2[0, :n1])
    many = tuple(([11] * 4, [21] * 3) for _ in range(6))  # 10 tokens a turn
    b3 = collate(cfg, [Example(ex.task, ex.codes, ex.prompt, ex.answer, turns=many)])
    assert b3["input_ids"].shape[1] <= cfg.max_seq_len < b3["input_ids"].shape[1] + 10
    assert 2 <= (b3["targets"][0] == st.EOT_ID).sum() < 1 + len(many)
    with pytest.raises(ValueError, match="first turn's answer"):
        collate(cfg, [Example(ex.task, ex.codes, ex.prompt, None, turns=turns)])


def test_image_tokens_are_bidirectional_in_the_model():
    cfg = small_cfg()
    model = UniF2ace(cfg).eval()
    ex = examples(cfg, 2)[1]  # t2i
    codes = ex.codes.clone()
    codes[-1] = (codes[-1] + 1) % cfg.codebook_size
    b1 = collate(cfg, [ex])
    b2 = collate(cfg, [Example(TASK_T2I, codes, ex.prompt)])
    with torch.no_grad():
        d = (model(b1) - model(b2)).abs().sum(-1)[0]
    img = b1["is_image"][0].nonzero().flatten()
    assert (d[img[0]] > 0) and (d[: img[0]] == 0).all()


def test_padding_does_not_change_a_sequence():
    cfg = small_cfg()
    model = UniF2ace(cfg).eval()
    exs = examples(cfg, 4)
    with torch.no_grad():
        alone = model(collate(cfg, [exs[0]]))
        padded = model(collate(cfg, exs))  # exs[0] gets right padding next to longer rows
    n = alone.shape[1]
    torch.testing.assert_close(padded[0, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_save_load_roundtrip_and_wrong_config(tmp_path):
    cfg = small_cfg()
    model = UniF2ace(cfg)
    model.save_pretrained(tmp_path / "m")
    back = UniF2ace.from_pretrained(tmp_path / "m", expect=cfg)
    batch = collate(cfg, examples(cfg, 3))
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(batch), model.eval()(batch))
    with pytest.raises(ValueError, match="another config.*d_model"):
        UniF2ace.from_pretrained(tmp_path / "m", expect=small_cfg(d_model=64))


def test_generate_text_no_repeat_ngram():
    cfg = small_cfg(max_text_len=40)
    model = UniF2ace(cfg)
    with torch.no_grad():  # a head that always prefers the same two tokens: plain greedy loops
        model.lm_head.weight.zero_()
        model.lm_head.bias.copy_(-0.01 * torch.arange(cfg.vocab_size))
        model.lm_head.bias[:9] = -100.0  # special tokens (end of text among them) never win
        model.lm_head.bias[20], model.lm_head.bias[21] = 5.0, 4.0
    codes = torch.randint(0, cfg.codebook_size, (2, cfg.image_tokens))
    plain = generate_text(model, codes, [[30], [31, 32]], max_new_tokens=12)
    assert plain[0] == [20] * 12
    for n in (1, 2, 3):
        for ans in generate_text(
            model, codes, [[30], [31, 32]], max_new_tokens=12, no_repeat_ngram=n
        ):
            grams = [tuple(ans[i : i + n]) for i in range(len(ans) - n + 1)]
            assert len(grams) == len(set(grams)), (n, ans)
            assert len(ans) == 12
    with pytest.raises(ValueError, match="no_repeat_ngram"):
        generate_text(model, codes, [[30], [31]], no_repeat_ngram=-1)


def test_generate_images_and_text():
    cfg = small_cfg()
    model = UniF2ace(cfg)
    codes = generate_images(model, [[10, 11, 12], [13]], steps=4, guidance=1.5, seed=3)
    assert codes.shape == (2, cfg.image_tokens)
    assert int(codes.min()) >= 0 and int(codes.max()) < cfg.codebook_size
    again = generate_images(model, [[10, 11, 12], [13]], steps=4, guidance=1.5, seed=3)
    assert torch.equal(codes, again)
    ans = generate_text(model, codes, [[20, 21], [22]], max_new_tokens=5)
    assert len(ans) == 2 and all(len(a) <= 5 for a in ans)
    # the cached greedy decoder agrees with argmax over full forward passes, token by token
    ans = generate_text(model, codes, [[20, 21], [22, 23, 24]], max_new_tokens=6)
    model.eval()
    for b, q in enumerate([[20, 21], [22, 23, 24]]):
        batch = collate(cfg, [Example(TASK_MMU, codes[b], q, ans[b])])
        with torch.no_grad():
            logits = model(batch)
        n = int(batch["valid"][0].sum())
        head = n - len(ans[b]) - 1  # positions before the answer
        pred = logits[0, head - 1 : n - 2, : cfg.text_vocab].argmax(-1).tolist()
        assert pred == ans[b]


# ------------------------------------------------------------------------------------------------
# host metadata: the step's decisions without device reads (the fake-CUDA harness checks the reads)


def test_collate_meta_describes_the_tensors():
    """``batch["meta"]`` (host values) says what the tensors hold: spans, counts, tasks."""
    cfg = small_cfg()
    exs = examples(cfg, 7) + [Example(TASK_T2I, None, [])]  # an empty prompt too
    batch = collate(cfg, exs)
    meta = batch["meta"]
    derived = BatchMeta.of({k: v for k, v in batch.items() if k != "meta"})  # reads the tensors
    assert meta == derived
    assert meta.t2i_rows == [b for b, ex in enumerate(exs) if ex.task == TASK_T2I]
    assert meta.padded == (not bool(batch["valid"].all()))
    assert batch["num_tokens"] == meta.num_valid == int(batch["valid"].sum())
    for b, (s, e) in enumerate(meta.image):
        assert e - s == cfg.image_tokens and bool(batch["is_image"][b, s:e].all())
    assert meta.prompt[-1] == (0, 0)
    # moved like any batch: tensors to the device, the meta as it is
    moved = _to_device(batch, torch.device("cpu"))
    assert moved["meta"] is meta


@pytest.mark.parametrize("cond_drop", [0.0, 1.0])
def test_loss_from_meta_equals_loss_from_tensors(cond_drop):
    """The loss takes its decisions from the meta; a hand-built batch without one (its meta
    derived from the tensors) gives the same loss and gradients bit for bit. The parts are
    detached 0-dim tensors, read when logging."""
    cfg = small_cfg(cond_drop=cond_drop, noise_std=0.0)
    model = UniF2ace(cfg)
    batch = collate(cfg, examples(cfg, 6))
    got = []
    for b in (batch, {k: v for k, v in batch.items() if k != "meta"}):
        model.zero_grad()
        loss, parts = model.loss(b, step=4, seed=3)
        loss.backward()
        got.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        assert set(parts) == {"loss", "balance", "loss_t2i", "loss_mmu"}
        assert all(
            torch.is_tensor(v) and v.shape == () and not v.requires_grad for v in parts.values()
        )
    assert torch.equal(got[0][0], got[1][0])
    assert all(torch.equal(a, b) for a, b in zip(got[0][1], got[1][1]))


def test_draw_noise_counts_the_masked_tokens_of_mask_tokens():
    """The host count of masked image tokens (the static size of the loss's gather) is the count
    that ops.mask_tokens masks, whatever the time."""
    cfg = small_cfg()
    noise = draw_noise(cfg, list(range(40)), step=2, seed=5)
    codes = torch.zeros(1, cfg.image_tokens, dtype=torch.long)
    for r, n in enumerate(noise.num_masked):
        _, mask = ops.mask_tokens(codes, noise.values[0, r : r + 1], 99, seed=noise.mask_seeds[r])
        assert int(mask.sum()) == n
