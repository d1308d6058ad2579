"""Sequence layout (Show-o): how text, image tokens and special tokens make one sequence.

* text → image (task 1, generation group)::

      <|pad|>… <|t2i|> prompt <|soi|> image <|eoi|>

  left-padded to a fixed prompt length, so the image sits at the same positions in every t2i row;
  an empty prompt (classifier-free guidance's unconditional branch) is all padding.
* image → text (task 0, understanding group)::

      <|mmu|> <|soi|> image <|eoi|> <|user|> question <|assistant|> answer <|endoftext|> <|pad|>…

  the loss is next-token cross-entropy on ``answer <|endoftext|>``. A caption is the answer to the
  fixed instruction :data:`CAPTION_PROMPT`. A training row may go on with more turns about the
  same image, ``<|user|> question <|assistant|> answer <|endoftext|>`` each (``Example.turns``),
  with the loss on every answer: the image's 256 tokens are paid once for all its questions.

Image codes ``c ∈ [0, K)`` become token ids ``text_vocab + c``; ``c = K`` is the mask token.
:func:`collate` pads a list of :class:`Example` into the tensors the model takes:
``input_ids, valid, is_image, positions, task, pool, prompt, targets`` (see :class:`UniF2ace`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from unif2ace.models import special_tokens as st

CAPTION_PROMPT = "Describe this face in detail."
# captions are decoded greedily without repeating a 3-gram (tiny models otherwise loop on a phrase)
CAPTION_NO_REPEAT_NGRAM = 3
TASK_MMU, TASK_T2I = 0, 1
IGNORE = -100


@dataclass
class Example:
    task: int  # TASK_MMU or TASK_T2I
    codes: torch.Tensor | None  # int64 [image_tokens] image codes; None: all masked (generation)
    prompt: list[int]  # t2i: the prompt's text tokens; mmu: the question's
    answer: list[int] | None = None  # mmu: the answer's text tokens (None when generating)
    semantic: torch.Tensor | None = None  # [semantic_dim]
    identity: torch.Tensor | None = None  # [identity_dim]
    index: int = 0  # sample index (seeds the per-sample noise)
    # mmu: more (question, answer) turns about the same image after the first (a conversation)
    turns: tuple[tuple[list[int], list[int]], ...] = ()


def _row(cfg, ex: Example):
    """(ids, is_image, valid, pool, prompt, targets) lists of one sequence."""
    N, off = cfg.image_tokens, cfg.image_offset
    codes = ex.codes if ex.codes is not None else torch.full((N,), cfg.codebook_size)
    if codes.numel() != N:
        raise ValueError(f"example {ex.index}: {codes.numel()} image tokens, the model takes {N}")
    img = (codes.long() + off).tolist()
    text = list(ex.prompt)[: cfg.max_text_len]
    if ex.task == TASK_T2I:
        pad = cfg.max_text_len - len(text)
        ids = [st.PAD_ID] * pad + [st.T2I_ID] + text + [st.SOI_ID] + img + [st.EOI_ID]
        is_img = [False] * (pad + 2 + len(text)) + [True] * N + [False]
        valid = [False] * pad + [True] * (len(ids) - pad)
        prompt = [False] * (pad + 1) + [True] * len(text) + [False] * (N + 2)
        pool = [v and not m for v, m in zip(valid, is_img)]  # the routing sees the prompt only
        return ids, is_img, valid, pool, prompt, [IGNORE] * len(ids)
    if ex.task != TASK_MMU:
        raise ValueError(f"example {ex.index}: task must be 0 (mmu) or 1 (t2i), got {ex.task}")
    head = [st.MMU_ID, st.SOI_ID] + img + [st.EOI_ID, st.USER_ID] + text + [st.ASSISTANT_ID]
    answer = [] if ex.answer is None else list(ex.answer)[: cfg.max_text_len] + [st.EOT_ID]
    if ex.turns and ex.answer is None:
        raise ValueError(f"example {ex.index}: more turns need the first turn's answer")
    ids, lab = head + answer, [IGNORE] * len(head) + answer  # lab: the answer tokens to learn
    for q, a in ex.turns:
        q, a = list(q)[: cfg.max_text_len], list(a)[: cfg.max_text_len] + [st.EOT_ID]
        if len(ids) + len(q) + len(a) + 2 > cfg.max_seq_len:
            break  # a conversation never outgrows the longest single-turn row
        ids += [st.USER_ID] + q + [st.ASSISTANT_ID] + a
        lab += [IGNORE] * (len(q) + 2) + a
    is_img = [False, False] + [True] * N + [False] * (len(ids) - N - 2)
    pool = [True] * len(head) + [False] * (len(ids) - len(head))  # the first question's context
    # targets[i] = the token position i predicts (i + 1), on answer tokens only
    targets = lab[1:] + [IGNORE]
    return ids, is_img, [True] * len(ids), pool, [False] * len(ids), targets


def collate(cfg, examples: list[Example]) -> dict:
    """Pad examples (right padding; t2i rows are left-padded to a fixed prompt length by
    construction) into the model's batch dict of tensors."""
    rows = [_row(cfg, ex) for ex in examples]
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    out = {
        "input_ids": torch.full((B, L), st.PAD_ID, dtype=torch.long),
        "is_image": torch.zeros(B, L, dtype=torch.bool),
        "valid": torch.zeros(B, L, dtype=torch.bool),
        "pool": torch.zeros(B, L, dtype=torch.bool),
        "prompt": torch.zeros(B, L, dtype=torch.bool),
        "targets": torch.full((B, L), IGNORE, dtype=torch.long),
    }
    for b, r in enumerate(rows):
        n = len(r[0])
        for key, vals in zip(("input_ids", "is_image", "valid", "pool", "prompt", "targets"), r):
            out[key][b, :n] = torch.tensor(vals, dtype=out[key].dtype)
    out["task"] = torch.tensor([ex.task for ex in examples], dtype=torch.long)
    out["index"] = torch.tensor([ex.index for ex in examples], dtype=torch.long)
    out["semantic"] = _stack([ex.semantic for ex in examples], B, cfg.semantic_dim)
    out["identity"] = _stack([ex.identity for ex in examples], B, cfg.identity_dim)
    out["num_tokens"] = int(out["valid"].sum())
    return out


def _stack(vs, B: int, dim: int) -> torch.Tensor:
    out = torch.zeros(B, dim)
    for b, v in enumerate(vs):
        if v is not None:
            if v.numel() != dim:
                raise ValueError(f"embedding of size {v.numel()}, the model takes {dim}")
            out[b] = v.float().view(-1)
    return out


def positions_of(valid: torch.Tensor) -> torch.Tensor:
    """Rotary positions: 0, 1, … over the valid tokens of each row (padding repeats its neighbour)."""
    return (valid.long().cumsum(1) - 1).clamp(min=0)
