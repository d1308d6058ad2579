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
:func:`collate` pads a list of :class:`Example` into the tensors the model takes
(``input_ids, valid, is_image, pool, prompt, targets`` ``[B, L]``, ``task, index`` ``[B]``,
``semantic, identity`` ``[B, dim]``) and the host-side facts about them, ``meta`` (a
:class:`BatchMeta` of plain Python values: which rows are which task, the spans, the counts), from
which a training step takes its decisions without reading device data. Move a batch with
``{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}``.

**Layout "showo"** (``ModelConfig.layout``; the model fine-tuned from the released Show-o), with
Show-o's ids from ``ModelConfig.special_ids``:

* text → image: ``[PAD]… <|t2i|> BOS prompt EOS <|soi|> image <|eoi|>``, the text part left-padded
  to ``max_text_len + 1`` tokens (a longer prompt is cut and still ends in EOS); the unconditional
  row is ``[PAD]… <|t2i|> BOS EOS``.
* image → text: ``<|mmu|> <|soi|> image <|eoi|> BOS question answer EOS``; the question arrives
  already in Show-o's words (``"USER: \\n" + question + " ASSISTANT:"``, tokenised by the data
  layer), more turns follow as ``question answer EOS``.
* attention (Show-o's rules, :func:`attention_blocks`): a t2i row's ``<|soi|> … <|eoi|>`` see the
  whole row; in an MMU row every query sees ``<|mmu|> … <|eoi|>``; the rest is causal; pads are
  never keys. Rotary positions are ``0 … L−1`` with the pads counted (:func:`positions`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from unif2ace.models import special_tokens as st

CAPTION_PROMPT = "Describe this face in detail."
# captions are decoded greedily without repeating a 3-gram (tiny models otherwise loop on a phrase)
CAPTION_NO_REPEAT_NGRAM = 3
TASK_MMU, TASK_T2I = 0, 1
IGNORE = -100


@dataclass(frozen=True)
class Tokens:
    """The special ids a layout writes. Around an MMU question: ``first`` before the first one
    (after ``<|eoi|>``), ``next`` before each later one, ``after`` between a question and its
    answer (empty where the question carries its own words, as Show-o's do)."""

    pad: int
    soi: int
    eoi: int
    t2i: int
    mmu: int
    eos: int
    bos: int | None = None
    first: tuple[int, ...] = ()
    next: tuple[int, ...] = ()
    after: tuple[int, ...] = ()


def tokens_of(cfg) -> Tokens:
    """The special ids of ``cfg.layout``."""
    if cfg.layout == "showo":
        i = cfg.special_ids
        bos = i["bos"]
        return Tokens(i["pad"], i["soi"], i["eoi"], i["t2i"], i["mmu"], i["eos"], bos, (bos,))
    ask, tell = (st.USER_ID,), (st.ASSISTANT_ID,)
    return Tokens(
        st.PAD_ID, st.SOI_ID, st.EOI_ID, st.T2I_ID, st.MMU_ID, st.EOT_ID, None, ask, ask, tell
    )


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


@dataclass(frozen=True)
class BatchMeta:
    """Host-side facts about a batch of ``B`` rows of length ``L``, as plain Python values.

    The model takes every data-dependent decision of a step (which rows are text → image, how many
    tokens are valid, masked or learned, where the image and the prompt sit) from these, never
    from the batch's device tensors, so a step reads nothing back from the device (as flash-attn's
    varlen API takes ``max_seqlen`` as a host int).
    """

    seq_len: int  # L
    task: tuple[int, ...]  # TASK_MMU / TASK_T2I per row
    index: tuple[int, ...]  # sample index per row (seeds its noise)
    image: tuple[tuple[int, int], ...]  # [s, e) of each row's image tokens ((0, 0): none)
    prompt: tuple[tuple[int, int], ...]  # [s, e) of a t2i row's prompt tokens ((0, 0): none)
    valid: tuple[int, ...]  # valid tokens per row
    answer: tuple[int, ...]  # tokens with a next-token target (targets != IGNORE) per row

    @property
    def num_valid(self) -> int:
        return sum(self.valid)

    @property
    def padded(self) -> bool:
        """Whether some token is padding (``valid`` is not all True)."""
        return self.num_valid < len(self.valid) * self.seq_len

    @property
    def t2i_rows(self) -> list[int]:
        return [b for b, t in enumerate(self.task) if t == TASK_T2I]

    def drop_prompts(self, rows: list[int]) -> BatchMeta:
        """The meta after the prompts of ``rows`` became padding (classifier-free guidance)."""
        valid = list(self.valid)
        for b in rows:
            s, e = self.prompt[b]
            valid[b] -= e - s
        return dataclasses.replace(self, valid=tuple(valid))

    @classmethod
    def of(cls, batch: dict) -> BatchMeta:
        """``batch["meta"]``, or for a batch built by hand without it, the meta derived from its
        tensors (this reads them: one device → host copy)."""
        meta = batch.get("meta")
        if meta is not None:
            return meta
        valid, is_img, prompt = batch["valid"], batch["is_image"], batch["prompt"]
        B, L = valid.shape
        idx = torch.arange(L, device=valid.device)

        def spans(m):
            n = m.sum(1)
            first = torch.where(m, idx, L).amin(1) if L else n
            return first, n

        (i0, ni), (p0, np_) = spans(is_img), spans(prompt)
        i1 = torch.where(is_img, idx, -1).amax(1) + 1 if L else ni  # end of each row's image
        host = torch.stack(
            [
                i0,
                ni,
                i1,
                p0,
                np_,
                valid.sum(1),
                (batch["targets"] != IGNORE).sum(1),
                batch["task"],
                batch["index"],
            ]
        ).tolist()  # the one read
        i0, ni, i1, p0, np_, nv, na, task, index = host
        image = tuple((s, s + n) if n else (0, 0) for s, n in zip(i0, ni))
        for b, ((s, e), end) in enumerate(zip(image, i1)):
            if e != s and e != end:  # n image tokens between the first and the last: contiguous
                raise ValueError(f"row {b}: the image tokens must be one contiguous span")
        return cls(
            seq_len=L,
            task=tuple(task),
            index=tuple(index),
            image=image,
            prompt=tuple((s, s + n) if n else (0, 0) for s, n in zip(p0, np_)),
            valid=tuple(nv),
            answer=tuple(na),
        )


def showo_text(cfg, prompt: list[int]) -> list[int]:
    """Layout "showo": the t2i text part ``[PAD]… <|t2i|> BOS prompt EOS`` of ``max_text_len + 1``
    tokens (a longer prompt is cut and still ends in EOS)."""
    t = tokens_of(cfg)
    text = list(prompt)
    if text and text[0] == t.bos:
        text = text[1:]
    ids = [t.t2i, t.bos] + text + [t.eos]
    P = cfg.max_text_len + 1
    if len(ids) > P:
        ids = ids[: P - 1] + [t.eos]
    return [t.pad] * (P - len(ids)) + ids


def _row(cfg, ex: Example):
    """(ids, is_image, valid, pool, prompt, targets) lists of one sequence."""
    N, off = cfg.image_tokens, cfg.image_offset
    codes = ex.codes if ex.codes is not None else torch.full((N,), cfg.codebook_size)
    if codes.numel() != N:
        raise ValueError(f"example {ex.index}: {codes.numel()} image tokens, the model takes {N}")
    img = (codes.long() + off).tolist()
    if ex.task not in (TASK_T2I, TASK_MMU):
        raise ValueError(f"example {ex.index}: task must be 0 (mmu) or 1 (t2i), got {ex.task}")
    if ex.task == TASK_T2I:
        return (_showo_t2i_row if cfg.layout == "showo" else _t2i_row)(cfg, ex, img)
    t = tokens_of(cfg)
    text = list(ex.prompt)[: cfg.max_text_len]
    head = [t.mmu, t.soi] + img + [t.eoi, *t.first] + text + [*t.after]
    answer = [] if ex.answer is None else list(ex.answer)[: cfg.max_text_len] + [t.eos]
    if ex.turns and ex.answer is None:
        raise ValueError(f"example {ex.index}: more turns need the first turn's answer")
    ids, lab = head + answer, [IGNORE] * len(head) + answer  # lab: the answer tokens to learn
    for q, a in ex.turns:
        q = [*t.next] + list(q)[: cfg.max_text_len] + [*t.after]
        a = list(a)[: cfg.max_text_len] + [t.eos]
        if len(ids) + len(q) + len(a) > cfg.max_seq_len:
            break  # a conversation never outgrows the longest single-turn row
        ids += q + a
        lab += [IGNORE] * len(q) + a
    N = cfg.image_tokens
    is_img = [False, False] + [True] * N + [False] * (len(ids) - N - 2)
    pool = [True] * len(head) + [False] * (len(ids) - len(head))  # the first question's context
    # targets[i] = the token position i predicts (i + 1), on answer tokens only
    targets = lab[1:] + [IGNORE]
    return ids, is_img, [True] * len(ids), pool, [False] * len(ids), targets


def _t2i_row(cfg, ex: Example, img: list[int]):
    """A t2i row of layout "synthface" (see the module docstring)."""
    N, text = cfg.image_tokens, list(ex.prompt)[: cfg.max_text_len]
    pad = cfg.max_text_len - len(text)
    ids = [st.PAD_ID] * pad + [st.T2I_ID] + text + [st.SOI_ID] + img + [st.EOI_ID]
    is_img = [False] * (pad + 2 + len(text)) + [True] * N + [False]
    valid = [False] * pad + [True] * (len(ids) - pad)
    prompt = [False] * (pad + 1) + [True] * len(text) + [False] * (N + 2)
    pool = [v and not m for v, m in zip(valid, is_img)]  # the routing sees the prompt only
    return ids, is_img, valid, pool, prompt, [IGNORE] * len(ids)


def _showo_t2i_row(cfg, ex: Example, img: list[int]):
    """A t2i row of layout "showo" (see the module docstring)."""
    t, N = tokens_of(cfg), cfg.image_tokens
    text = showo_text(cfg, ex.prompt)
    pad = text.index(t.t2i)  # the leading pads
    ids = text + [t.soi] + img + [t.eoi]
    P = len(text)
    is_img = [False] * (P + 1) + [True] * N + [False]
    valid = [False] * pad + [True] * (len(ids) - pad)
    prompt = [False] * (pad + 2) + [True] * (P - pad - 3) + [False] * (N + 3)  # BOS … EOS
    pool = [v and not m for v, m in zip(valid, is_img)]
    return ids, is_img, valid, pool, prompt, [IGNORE] * len(ids)


def collate(cfg, examples: list[Example]) -> dict:
    """Pad examples (right padding; t2i rows are left-padded to a fixed prompt length by
    construction) into the model's batch: a dict of CPU tensors, ``num_tokens`` (int) and
    ``meta`` (:class:`BatchMeta`)."""
    rows = [_row(cfg, ex) for ex in examples]
    L = max(len(r[0]) for r in rows)
    B = len(rows)
    out = {
        "input_ids": torch.full((B, L), tokens_of(cfg).pad, dtype=torch.long),
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
    image, prompt = [], []
    for r in rows:
        spans = []
        for m in (r[1], r[4]):  # is_image, prompt: one contiguous span each by construction
            s = m.index(True) if True in m else 0
            spans.append((s, s + sum(m)))
        image.append(spans[0])
        prompt.append(spans[1])
    meta = BatchMeta(
        seq_len=L,
        task=tuple(ex.task for ex in examples),
        index=tuple(ex.index for ex in examples),
        image=tuple(image),
        prompt=tuple(prompt),
        valid=tuple(sum(r[2]) for r in rows),
        answer=tuple(sum(t != IGNORE for t in r[5]) for r in rows),
    )
    out["num_tokens"] = meta.num_valid
    out["meta"] = meta
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


def positions(cfg, valid: torch.Tensor) -> torch.Tensor:
    """The rotary positions of a batch ``[B, L]``: layout "showo" counts every token (Show-o's
    ``0 … L−1``), "synthface" only the valid ones (:func:`positions_of`)."""
    if cfg.layout == "showo":
        return torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return positions_of(valid)


def attention_blocks(cfg, meta: BatchMeta) -> list[tuple[int, int, int]]:
    """Per row ``(s, e, lim)``: queries ``i`` in ``[s, e)`` see the keys before ``lim``, the others
    are causal (``limit = i + 1``); host values from ``meta``.

    "synthface": the image ``[s, e)`` sees itself (``lim = e``). "showo" (Show-o's rules): a t2i
    row's ``<|soi|> … <|eoi|>`` see the whole row (``lim = L``); an MMU row's queries up to its
    ``<|eoi|>`` see ``<|mmu|> … <|eoi|>`` (``[0, eoi + 1)``)."""
    out = []
    for task, (s, e) in zip(meta.task, meta.image):
        if s == e:
            out.append((0, 0, 0))
        elif cfg.layout != "showo":
            out.append((s, e, e))
        elif task == TASK_T2I:
            out.append((s - 1, e + 1, meta.seq_len))
        else:
            out.append((0, e + 1, e + 1))
    return out


def drop_prompts(cfg, ids: torch.Tensor, valid: torch.Tensor, meta: BatchMeta, rows) -> None:
    """Make the prompts of the t2i ``rows`` empty in place (classifier-free guidance's
    unconditional rows): "synthface" turns the prompt tokens into padding; "showo" rewrites the
    text part into :func:`showo_text` of the empty prompt, as Show-o's unconditional row is."""
    if not rows:
        return
    if cfg.layout != "showo":
        for b in rows:
            s, e = meta.prompt[b]
            ids[b, s:e] = st.PAD_ID
            valid[b, s:e] = False
        return
    empty = torch.tensor(showo_text(cfg, []), device=ids.device)
    keep = empty != tokens_of(cfg).pad
    P = empty.numel()
    for b in rows:
        ids[b, :P] = empty
        valid[b, :P] = keep
