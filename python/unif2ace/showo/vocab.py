"""Show-o's vocabulary, its text tokenizer (Phi-1.5's) and the sequences it was trained on.

Ids (``llm_vocab_size`` = 50295 for the released checkpoints)::

    [0, llm_vocab_size)                 Phi-1.5's tokenizer; BOS = EOS = <|endoftext|> (50256)
    llm_vocab_size + 0 … + 9            [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|> <|mmu|>
                                        <|t2v|> <|v2v|> <|lvg|>
    llm_vocab_size + 10 + c             image code c, c in [0, codebook_size)
    vocab_size - 1                      the mask token

Sequences (``N`` image tokens, 256 at 256 px, 1024 at 512 px):

* **t2i**: ``[PAD]·k <|t2i|> BOS prompt EOS <|soi|> image·N <|eoi|>``. The text part is left-padded
  to 129 tokens (Show-o's 128 + the task token); a longer one is cut to 128 tokens and ends in EOS.
  The classifier-free-guidance row is the same builder on the empty prompt.
* **MMU, VQ variants**: ``<|mmu|> <|soi|> image·N <|eoi|> BOS`` then the tokens of
  ``"USER: \\n" + question + " ASSISTANT:"``; the answer follows, ending in EOS.
* **MMU, CLIP-ViT variants**: ``<|mmu|>``, the 28 tokens of :data:`SYSTEM_PROMPT`, ``<|soi|>``,
  576 projected CLIP features, ``<|eoi|>``, then ``"USER: " + question + " ASSISTANT:"`` (no BOS).

Rotary positions are ``0 … L−1``, pads included.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL = (
    "[PAD]",
    "<|soi|>",
    "<|eoi|>",
    "<|sov|>",
    "<|eov|>",
    "<|t2i|>",
    "<|mmu|>",
    "<|t2v|>",
    "<|v2v|>",
    "<|lvg|>",
)
NUM_SPECIAL = len(SPECIAL)
MAX_TEXT_LEN = 129  # the t2i text part: Show-o's max_seq_length 128 + the task token
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SYSTEM_PROMPT_LEN = 28  # its length in Phi-1.5 tokens
CLIP_TOKENS = 576  # ViT-L/14 at 336 px: 24 × 24 patches


@dataclass(frozen=True)
class ShowoVocab:
    """The ids of one Show-o checkpoint's vocabulary (see the module docstring)."""

    llm_vocab_size: int = 50295
    codebook_size: int = 8192
    num_vq_tokens: int = 256
    bos: int = 50256
    eos: int = 50256

    @classmethod
    def from_config(cls, conf: dict) -> ShowoVocab:
        return cls(conf["llm_vocab_size"], conf["codebook_size"], conf["num_vq_tokens"])

    def special(self, name: str) -> int:
        return self.llm_vocab_size + SPECIAL.index(name)

    pad = property(lambda self: self.special("[PAD]"))
    soi = property(lambda self: self.special("<|soi|>"))
    eoi = property(lambda self: self.special("<|eoi|>"))
    t2i = property(lambda self: self.special("<|t2i|>"))
    mmu = property(lambda self: self.special("<|mmu|>"))

    def layout_ids(self) -> dict:
        """The ids ``ModelConfig.special_ids`` takes for layout "showo"."""
        return dict(
            pad=self.pad, soi=self.soi, eoi=self.eoi, t2i=self.t2i, mmu=self.mmu,
            bos=self.bos, eos=self.eos,
        )  # fmt: skip

    @property
    def image_offset(self) -> int:
        return self.llm_vocab_size + NUM_SPECIAL

    @property
    def mask(self) -> int:
        return self.image_offset + self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.mask + 1

    # --- sequences ---------------------------------------------------------------------------
    def t2i_text(self, prompt: list[int]) -> list[int]:
        """The 129-token text part of a t2i sequence for tokenised ``prompt``."""
        text = list(prompt)
        if not text or text[0] != self.bos:
            text = [self.bos] + text
        ids = [self.t2i] + text + [self.eos]
        if len(ids) <= MAX_TEXT_LEN:
            return [self.pad] * (MAX_TEXT_LEN - len(ids)) + ids
        return ids[: MAX_TEXT_LEN - 1] + [self.eos]

    def t2i_prompt(
        self, prompts: list[list[int]], image_codes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """t2i sequences ``int64 [B, 129 + N + 2]``; the image slots hold ``image_codes [B, N]``
        (codes in ``[0, codebook_size]``, ``codebook_size`` meaning masked) or, by default, the
        mask token."""
        N = self.num_vq_tokens
        if image_codes is None:
            image = torch.full((len(prompts), N), self.mask, dtype=torch.long)
        else:
            image = self.code_tokens(image_codes, len(prompts))
        text = torch.tensor([self.t2i_text(p) for p in prompts], dtype=torch.long)
        text = text.view(len(prompts), MAX_TEXT_LEN)
        soi = torch.full((len(prompts), 1), self.soi, dtype=torch.long)
        eoi = torch.full((len(prompts), 1), self.eoi, dtype=torch.long)
        return torch.cat([text, soi, image, eoi], 1)

    def code_tokens(self, codes: torch.Tensor, B: int) -> torch.Tensor:
        """Image codes ``[B, N]`` in ``[0, codebook_size]`` as token ids (``codebook_size``, the
        masked code, becomes the mask token, ``image_offset + codebook_size``)."""
        N, K = self.num_vq_tokens, self.codebook_size
        codes = torch.as_tensor(codes, dtype=torch.long).cpu()
        if tuple(codes.shape) != (B, N):
            raise ValueError(f"image codes must be [{B}, {N}], got {list(codes.shape)}")
        if not bool(((codes >= 0) & (codes <= K)).all()):
            raise ValueError(f"image codes must lie in [0, {K}] ({K}: masked)")
        return codes + self.image_offset

    def mmu_prompt(self, image_codes: torch.Tensor, question: list[int]) -> torch.Tensor:
        """A VQ-variant MMU sequence ``int64 [1, N + 4 + len(question)]`` for one image's codes
        ``[N]`` and the tokens of ``"USER: \\n" + question + " ASSISTANT:"``."""
        image = self.code_tokens(torch.as_tensor(image_codes).reshape(1, -1), 1)[0]
        head = torch.tensor([self.mmu, self.soi], dtype=torch.long)
        tail = torch.tensor([self.eoi, self.bos, *question], dtype=torch.long)
        return torch.cat([head, image, tail])[None]

    def mmu_clip_prompt(self, system: list[int], question: list[int]) -> tuple[torch.Tensor, int]:
        """A CLIP-variant MMU sequence without its image: ids ``[1, L]`` and the position at which
        the projected CLIP features go (after ``<|soi|>``)."""
        ids = [self.mmu, *system, self.soi, self.eoi, *question]
        return torch.tensor(ids, dtype=torch.long)[None], 2 + len(system)


class PhiTokenizer:
    """Phi-1.5's text tokenizer from a local folder holding ``tokenizer.json`` (e.g. a download of
    ``microsoft/phi-1_5``), through the ``tokenizers`` library. No BOS is added (Show-o adds its
    own where its layouts have one)."""

    def __init__(self, folder, vocab: ShowoVocab | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json" if folder.is_dir() else folder
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found (expected Phi-1.5's tokenizer folder with tokenizer.json, "
                "e.g. a download of microsoft/phi-1_5)"
            )
        self.tok = Tokenizer.from_file(str(path))
        eot = self.tok.token_to_id("<|endoftext|>")
        if eot is None:
            raise ValueError(f"{path}: no <|endoftext|> token (not Phi-1.5's tokenizer)")
        self.eos = self.bos = eot
        size = self.tok.get_vocab_size(with_added_tokens=True)
        if vocab is not None and size > vocab.llm_vocab_size:
            raise ValueError(
                f"{path}: the tokenizer has {size} ids, more than the checkpoint's text vocabulary "
                f"({vocab.llm_vocab_size}); it is not the tokenizer the model was trained with"
            )

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
