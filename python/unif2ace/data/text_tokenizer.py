"""Byte-level BPE text tokenizer (HF ``tokenizers``), trained on SynthFace captions + VQA, with the
model's special tokens (:mod:`unif2ace.models.special_tokens`). A local ``tokenizer.json`` (e.g.
Phi-1.5's) can replace it: :meth:`TextTokenizer.from_file` adds whichever special tokens it lacks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from unif2ace.data.readers import find_split_file, read_records
from unif2ace.io import atomic_write_bytes
from unif2ace.models.special_tokens import EOT, PAD, SPECIAL_TOKENS


class TextTokenizer:
    """Thin wrapper: ``encode``/``decode``, the special token ids, ``save``/``from_file``."""

    def __init__(self, tok):
        self.tok = tok
        missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens(missing)
        self.pad_id = self.token_id(PAD)
        self.eot_id = self.token_id(EOT)

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 2):
        """Train byte-level BPE on ``texts``. Special tokens get ids 0..len(SPECIAL_TOKENS)-1."""
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path) -> TextTokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path) -> None:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        atomic_write_bytes(path, self.tok.to_str(pretty=False).encode())

    # --- use ----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


def synthface_texts(root) -> Iterator[str]:
    """Every caption, question and answer of a SynthFace (or same-layout) folder's train split."""
    caps, _ = read_records(
        find_split_file(root, "captions", "train"), "caption", check_images=False, image_root=root
    )
    for r in caps:
        yield from r.texts
    qa, _ = read_records(
        find_split_file(root, "vqa", "train"), "vqa", check_images=False, image_root=root
    )
    for r in qa:
        yield r.question
        yield r.answer
