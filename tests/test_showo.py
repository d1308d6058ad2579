"""Released Show-o checkpoints on the engine, checked on miniature checkpoints in the released
layout: the logits are transformers' ``PhiForCausalLM(qk_layernorm=True)`` with the same tensors
under an explicit additive mask of Show-o's rules; the layouts are Show-o's; the engine's cached
t2i decoding and KV-cache answering equal the straightforward recomputation; bad folders raise
errors that name the tensor."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from showo_mini import LLM_V, V, phi_reference, write_showo, write_tokenizer  # noqa: E402

from unif2ace.ops.attention.reference import limit_mask  # noqa: E402
from unif2ace.showo import (  # noqa: E402
    PhiTokenizer,
    ShowoVocab,
    attention_rule,
    load_showo,
    mmu_answer,
    mmu_answer_clip,
    showo_logits,
    t2i_generate,
)
from unif2ace.showo.generate import t2i_logits_fn  # noqa: E402
from unif2ace.showo.vocab import MAX_TEXT_LEN  # noqa: E402

N = 16  # 4 × 4 codes (64 px)


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    folder = tmp_path_factory.mktemp("showo")
    phi = phi_reference()
    write_showo(folder, phi, num_vq_tokens=N)
    return folder, phi, load_showo(folder)


def _text(g, n):
    return torch.randint(0, LLM_V, (n,), generator=g).tolist()


# --- explicit masks of Show-o's rules (loops over the rules as written, no engine code) ---------
def t2i_mask(ids: list[int], vocab: ShowoVocab) -> torch.Tensor:
    L = len(ids)
    soi, eoi = ids.index(vocab.soi), ids.index(vocab.eoi)
    pads = [j for j in range(L) if ids[j] == vocab.pad]
    last_pad = max(pads, default=-1)
    m = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        for j in range(L):
            if soi <= i <= eoi:  # image rows: everything but pads
                m[i, j] = ids[j] != vocab.pad
            elif i > last_pad:  # text rows after the pads: causal, no pads
                m[i, j] = j <= i and j > last_pad
            else:  # pad rows: causal over the pads
                m[i, j] = j <= i
    return m


def mmu_mask(L: int, eoi: int) -> torch.Tensor:
    m = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m[:, : eoi + 1] = True
    return m


def _additive(m: torch.Tensor) -> torch.Tensor:
    return torch.zeros(m.shape).masked_fill(~m, float("-inf"))[:, None]


def _phi_logits(phi, ids=None, masks=None, embeds=None):
    with torch.no_grad():
        kw = {"inputs_embeds": embeds} if embeds is not None else {"input_ids": ids}
        mask = None if masks is None else _additive(torch.stack(masks))
        return phi(**kw, attention_mask=mask).logits


# --- loading and logits ------------------------------------------------------------------------
def test_loaded_model(mini):
    folder, _, model = mini
    cfg = model.config
    assert cfg.qk_norm and not cfg.token_moe and not cfg.seq_moe and cfg.vocab_size == V
    assert (cfg.text_vocab, cfg.codebook_size, cfg.image_tokens) == (LLM_V + 10, 8192, N)
    assert model.showo.mask == V - 1 and model.showo.image_offset == 50305
    assert not model.training


def test_causal_logits_equal_phi(mini):
    _, phi, model = mini
    ids = torch.randint(0, LLM_V, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = showo_logits(model, ids)
    torch.testing.assert_close(out, _phi_logits(phi, ids), rtol=0, atol=2e-4)


def test_t2i_rule_equals_explicit_mask(mini):
    _, phi, model = mini
    vocab = model.showo
    g = torch.Generator().manual_seed(2)
    prompts = [_text(g, 5), [], _text(g, 200)]  # short, empty (the CFG row), cut at 128
    codes = torch.randint(0, 8192, (3, N), generator=g)
    codes[:, ::3] = 8192  # masked
    ids = vocab.t2i_prompt(prompts, codes)
    masks = [t2i_mask(r.tolist(), vocab) for r in ids]
    _, limit, key_valid = attention_rule(ids, vocab)
    nonpad = ids != vocab.pad
    for b in range(3):  # the rule's mask is the explicit one on every non-pad row
        rows = nonpad[b]
        assert torch.equal(limit_mask(limit, key_valid)[b][rows], masks[b][rows])
    with torch.no_grad():
        out = showo_logits(model, ids)
    ref = _phi_logits(phi, ids, masks)
    torch.testing.assert_close(out[nonpad], ref[nonpad], rtol=0, atol=2e-4)


def test_mmu_rule_equals_explicit_mask(mini):
    _, phi, model = mini
    vocab = model.showo
    g = torch.Generator().manual_seed(3)
    ids = vocab.mmu_prompt(torch.randint(0, 8192, (N,), generator=g), _text(g, 7))
    eoi = ids[0].tolist().index(vocab.eoi)
    with torch.no_grad():
        out = showo_logits(model, ids)
    ref = _phi_logits(phi, ids, [mmu_mask(ids.shape[1], eoi)])
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-4)


def test_layouts():
    v = ShowoVocab()
    assert (v.pad, v.soi, v.eoi, v.t2i, v.mmu, v.image_offset, v.mask) == (
        50295, 50296, 50297, 50300, 50301, 50305, 58497,
    )  # fmt: skip
    empty = v.t2i_text([])
    assert empty == [v.pad] * 126 + [v.t2i, 50256, 50256] and len(empty) == MAX_TEXT_LEN
    short = v.t2i_text([7, 8])
    assert short[-5:] == [v.t2i, 50256, 7, 8, 50256] and short[:-5] == [v.pad] * 124
    assert v.t2i_text([50256, 7]) == v.t2i_text([7])  # an existing BOS is kept, not doubled
    long = v.t2i_text(list(range(300)))
    assert len(long) == MAX_TEXT_LEN and long[:3] == [v.t2i, 50256, 0] and long[-1] == 50256
    assert long[-2] == 125  # t2i + BOS + 126 prompt tokens + EOS
    seq = v.t2i_prompt([[7]], torch.arange(256)[None])
    assert seq.shape == (1, 129 + 256 + 2) and seq[0, 129] == v.soi and seq[0, -1] == v.eoi
    assert torch.equal(seq[0, 130:-1], torch.arange(256) + 50305)
    mmu = v.mmu_prompt(torch.arange(256), [9, 10])
    assert mmu[0, :2].tolist() == [v.mmu, v.soi] and mmu[0, 258:].tolist() == [v.eoi, 50256, 9, 10]
    with pytest.raises(ValueError, match="image codes"):
        v.t2i_prompt([[1]], torch.full((1, 256), 9000))
    assert v.t2i_prompt([[1]])[0, 130:-1].eq(v.mask).all()


# --- generation and answering ------------------------------------------------------------------
def test_cached_t2i_logits_equal_full_recompute(mini):
    _, _, model = mini
    vocab = model.showo
    g = torch.Generator().manual_seed(4)
    prompts = [_text(g, 3), _text(g, 9)]
    rows = torch.cat([vocab.t2i_prompt(prompts), vocab.t2i_prompt([[], []])])
    codes = torch.randint(0, 8192, (2, N), generator=g)
    codes[0, :5] = 8192  # masked
    with torch.no_grad():
        fast = t2i_logits_fn(model, rows, cfg=True, cached=True)(codes)
        slow = t2i_logits_fn(model, rows, cfg=True, cached=False)(codes)
        ref = showo_logits(model, vocab.t2i_prompt(prompts, codes))[:, 130:-1, 50305:-1]
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
    torch.testing.assert_close(fast[0], ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("annealing", ["showo", "maskgit"])
def test_t2i_generate_cached_equals_straightforward(mini, annealing):
    _, _, model = mini
    g = torch.Generator().manual_seed(5)
    prompts = [_text(g, 4), _text(g, 6)]
    kw = dict(steps=6, guidance=5.0, seed=3, annealing=annealing)
    fast = t2i_generate(model, prompts, **kw)
    slow = t2i_generate(model, prompts, cached=False, **kw)
    assert torch.equal(fast, slow)
    assert fast.shape == (2, N) and int(fast.min()) >= 0 and int(fast.max()) < 8192
    assert not torch.equal(fast, t2i_generate(model, prompts, **{**kw, "seed": 4}))
    nocfg = t2i_generate(model, prompts, steps=4, guidance=0.0, seed=3)
    assert torch.equal(
        nocfg, t2i_generate(model, prompts, steps=4, guidance=0.0, seed=3, cached=False)
    )


def _recompute_answer(model, ids, eos, n):
    """Show-o's loop: the whole sequence again for every token, argmax at the end."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            tok = int(showo_logits(model, ids)[0, -1].argmax())
        if tok == eos:
            break
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out


def test_mmu_answer_with_kv_cache_equals_recompute(mini):
    _, _, model = mini
    vocab = model.showo
    g = torch.Generator().manual_seed(6)
    codes, q = torch.randint(0, 8192, (N,), generator=g), _text(g, 5)
    ans = mmu_answer(model, codes, q, max_new_tokens=8)
    assert len(ans) == 8  # random weights: no EOS in 8 tokens
    assert ans == _recompute_answer(model, vocab.mmu_prompt(codes, q), vocab.eos, 8)


def test_clip_variant(tmp_path):
    transformers = pytest.importorskip("transformers")
    phi = phi_reference(seed=1)
    state = write_showo(tmp_path / "showo", phi, num_vq_tokens=N, clip_dim=32)
    model = load_showo(tmp_path / "showo")
    assert model.config.mm_projector_dim == 32
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(1, 9, 32, generator=g)
    system, q = _text(g, 28), _text(g, 6)
    ans = mmu_answer_clip(model, feats, system, q, max_new_tokens=5)
    # reference: Show-o's splice and mask through transformers, token by token
    proj = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    proj.load_state_dict({k[len("mm_projector.") :]: v for k, v in state.items() if "mm_proj" in k})
    ids = [model.showo.mmu, *system, model.showo.soi, model.showo.eoi, *q]
    out = []
    with torch.no_grad():
        img = proj(feats)
        for _ in range(5):
            emb = phi.model.embed_tokens(torch.tensor([ids + out]))
            x = torch.cat([emb[:, :30], img, emb[:, 30:]], 1)
            L = x.shape[1]
            m = torch.tril(torch.ones(L, L, dtype=torch.bool))
            m[:, : 30 + 9] = True  # every row sees the prefix through the image
            out.append(int(_phi_logits(phi, embeds=x, masks=[m])[0, -1].argmax()))
    assert ans == out
    del transformers
    with pytest.raises(ValueError, match=r"CLIP features must be \[1, T, 32\]"):
        mmu_answer_clip(model, torch.randn(1, 9, 16), system, q)


def test_tokenizer(tmp_path):
    tok = PhiTokenizer(write_tokenizer(tmp_path / "tok"), ShowoVocab())
    ids = tok.encode("a photo of a smiling woman")
    assert ids and tok.decode(ids) == "a photo of a smiling woman" and tok.bos == tok.eos
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        PhiTokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="more than the checkpoint's text vocabulary"):
        PhiTokenizer(tmp_path / "tok", ShowoVocab(llm_vocab_size=100))


# --- bad input ---------------------------------------------------------------------------------
def _corrupt(src, dst, *, drop=None, reshape=None, config=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    state = load_file(str(src / "pytorch_model.safetensors"))
    if drop:
        del state[drop]
    if reshape:
        state[reshape] = torch.zeros(3, 3)
    conf = {**json.loads((src / "config.json").read_text()), **(config or {})}
    (dst / "config.json").write_text(json.dumps(conf))
    save_file(state, str(dst / "pytorch_model.safetensors"))
    return dst


def test_bad_checkpoints(mini, tmp_path):
    folder = mini[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_showo(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_showo(tmp_path / "empty")
    cases = [
        (dict(config={"_class_name": "MAGVITv2"}), "not 'Showo'"),
        (dict(config={"vocab_size": 51200}), "vocab_size 51200 is not"),
        (dict(drop="showo.model.layers.1.self_attn.k_layernorm.bias"), "missing tensor "
         r"showo.model.layers.1.self_attn.k_layernorm.bias \[16\]"),
        (dict(reshape="showo.model.layers.0.mlp.fc2.weight"), r"mlp.fc2.weight has shape \[3, 3\], "
         r"expected \[64, 128\]"),
        (dict(reshape="extra.weight"), "unexpected tensor extra.weight"),
    ]  # fmt: skip
    for i, (kw, match) in enumerate(cases):
        bad = _corrupt(folder, tmp_path / f"bad{i}", **kw)
        with pytest.raises(ValueError, match=match):
            load_showo(bad)
    (tmp_path / "bad0" / "pytorch_model.safetensors").unlink()
    (tmp_path / "bad0" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights found"):
        load_showo(tmp_path / "bad0")


def test_dtype_and_other_files(mini, tmp_path):
    folder, _, model = mini
    import shutil

    dst = tmp_path / "m"
    dst.mkdir()
    shutil.copy(folder / "config.json", dst)
    shutil.copy(folder / "pytorch_model.safetensors", dst / "model.safetensors")
    bf = load_showo(dst, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(bf.lm_head.bias, model.lm_head.bias.bfloat16())
    # the rotary frequencies are recomputed, not left as uninitialised memory
    assert torch.equal(
        bf.layers[0].self_attn.rotary.inv_freq, model.layers[0].self_attn.rotary.inv_freq
    )
