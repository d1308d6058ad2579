"""Text tokenizer: special tokens at fixed ids, round trip, save/load, a foreign tokenizer.json."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from unif2ace.data.synthface import make_caption, make_vqa, sample_image
from unif2ace.data.text_tokenizer import TextTokenizer
from unif2ace.models import special_tokens as st


@pytest.fixture(scope="module")
def texts():
    out = []
    for i in range(150):
        _, img = sample_image(0, i, 8)
        out.append(make_caption(img["attrs"], img["text_seed"])[0])
        for qa in make_vqa(img["attrs"], img["text_seed"]):
            out += [qa["question"], qa["answer"]]
    return out


@pytest.fixture(scope="module")
def tok(texts):
    return TextTokenizer.train(texts, vocab_size=800)


def test_special_tokens_have_fixed_ids(tok):
    for i, t in enumerate(st.SPECIAL_TOKENS):
        assert tok.token_id(t) == i
    assert tok.pad_id == st.PAD_ID == 0 and tok.token_id(st.SOI) == st.SOI_ID
    assert {st.SOI, st.EOI, st.T2I, st.MMU, st.PAD} <= set(st.SPECIAL_TOKENS)


def test_round_trip_and_compression(tok, texts):
    for t in texts[:50] + ["Ünïcode 😀 is byte-level"]:
        assert tok.decode(tok.encode(t)) == t
    cap = texts[0]
    assert len(tok.encode(cap)) < len(cap) / 3  # BPE learned the caption vocabulary
    ids = tok.encode(f"{st.MMU}{st.SOI}{st.EOI} hi")
    assert ids[:3] == [st.MMU_ID, st.SOI_ID, st.EOI_ID]
    assert tok.decode(ids) == " hi"
    assert tok.encode_batch(texts[:3]) == [tok.encode(t) for t in texts[:3]]


def test_save_and_load(tok, tmp_path, texts):
    tok.save(tmp_path)
    tok2 = TextTokenizer.from_file(tmp_path / "tokenizer.json")
    assert tok2.vocab_size == tok.vocab_size
    assert tok2.encode(texts[3]) == tok.encode(texts[3])
    with pytest.raises(FileNotFoundError):
        TextTokenizer.from_file(tmp_path / "missing.json")


def test_foreign_tokenizer_gets_special_tokens(tmp_path):
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.train_from_iterator(
        ["a red hat", "a blue hat"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"], show_progress=False),
    )
    t.save(str(tmp_path / "tokenizer.json"))
    tok = TextTokenizer.from_file(tmp_path)
    for s in st.SPECIAL_TOKENS:
        assert tok.token_id(s) >= 1  # appended after the foreign vocabulary's own tokens
    assert tok.encode(st.T2I) == [tok.token_id(st.T2I)]
    with pytest.raises(KeyError):
        tok.token_id("<|nope|>")
