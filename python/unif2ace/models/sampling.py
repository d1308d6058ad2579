"""Sampling from a :class:`~unif2ace.models.UniF2ace`, in token space (the pipeline turns text and
images into tokens and back).

* :func:`generate_images` — text → image codes: MaskGIT / Show-o iterative decoding from an all-mask
  image through :func:`unif2ace.ops.maskgit_decode` (the fused decode step), with classifier-free
  guidance from the same prompts made empty (the model is trained with ``cond_drop``).
* :func:`generate_text` — image (+ question) → answer tokens, greedy, batched, stopping at
  ``<|endoftext|>``, with a key/value cache. The sequence MoE pools over the context only (image +
  question), so its mixture is computed once and the answer never changes earlier positions.
"""

from __future__ import annotations

import torch

from unif2ace import ops
from unif2ace.models.layout import TASK_MMU, TASK_T2I, Example, collate, tokens_of


@torch.no_grad()
def generate_images(
    model,
    prompts: list[list[int]],
    *,
    steps: int = 12,
    guidance: float = 2.0,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    seed: int = 0,
    image_logits=None,
) -> torch.Tensor:
    """Image codes ``int64 [B, image_tokens]`` in ``[0, K)`` for a batch of tokenised prompts.
    ``image_logits``: the model's logits function, ``fn(input_ids, batch)`` (default
    ``model.image_logits``; ``model.compile_image_logits()`` for the compiled one)."""
    cfg = model.config
    image_logits = image_logits or model.image_logits
    K, B = cfg.codebook_size, len(prompts)
    if B == 0:
        return torch.zeros(0, cfg.image_tokens, dtype=torch.long)
    exs = [Example(TASK_T2I, None, list(p)) for p in prompts]
    if guidance > 0:
        exs += [Example(TASK_T2I, None, []) for _ in prompts]
    batch = collate(cfg, exs)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    img = batch["is_image"]
    was_training = model.training
    model.eval()

    def logits_fn(codes: torch.Tensor):
        ids = batch["input_ids"].clone()
        full = torch.cat([codes, codes]) if guidance > 0 else codes
        ids[img] = (full + cfg.image_offset).reshape(-1)
        lg = image_logits(ids, batch).float()
        return (lg[:B], lg[B:]) if guidance > 0 else lg

    init = torch.full((B, cfg.image_tokens), K, dtype=torch.long, device=dev)
    try:
        return ops.maskgit_decode(
            logits_fn,
            init,
            steps,
            mask_id=K,
            guidance=guidance,
            temperature=temperature,
            choice_temperature=choice_temperature,
            seed=seed,
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def generate_text(
    model,
    codes: torch.Tensor,
    questions: list[list[int]],
    *,
    semantic: torch.Tensor | None = None,
    identity: torch.Tensor | None = None,
    max_new_tokens: int = 48,
    no_repeat_ngram: int = 0,
) -> list[list[int]]:
    """Greedy answers (token lists, without ``<|endoftext|>``) to ``questions`` about images given
    by their codes ``[B, image_tokens]`` (and their encoder embeddings for the sequence MoE).

    ``no_repeat_ngram = n > 0``: a token that would repeat an n-gram already in the row's answer is
    never chosen (captions: a small model's greedy decoding otherwise loops on one phrase)."""
    if no_repeat_ngram < 0:
        raise ValueError(f"no_repeat_ngram must be >= 0, got {no_repeat_ngram}")
    cfg = model.config
    B = codes.shape[0]
    if len(questions) != B:
        raise ValueError(f"{len(questions)} questions for {B} images")
    exs = [
        Example(
            TASK_MMU,
            codes[b],
            list(q),
            semantic=None if semantic is None else semantic[b],
            identity=None if identity is None else identity[b],
        )
        for b, q in enumerate(questions)
    ]
    batch = collate(cfg, exs)
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
    w, bias = model.head_rows("text")
    eos = tokens_of(cfg).eos
    was_training = model.training
    model.eval()
    out: list[list[int]] = [[] for _ in range(B)]
    try:
        cache: list[dict] = []
        h, _ = model.hidden_states(batch["input_ids"], batch, cache=cache)  # prefill
        lengths = batch["valid"].sum(1)
        last = h[torch.arange(B, device=dev), lengths - 1]  # [B, D]
        key_valid = batch["valid"]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        for s in range(max_new_tokens):
            logits = last @ w.T + bias
            if no_repeat_ngram:
                _block_repeats(logits, out, no_repeat_ngram)
            nxt = logits.argmax(-1)
            done |= nxt == eos
            toks, fin = torch.stack([nxt, done.long()]).tolist()  # one device -> host read a step
            for b in range(B):
                if not fin[b]:
                    out[b].append(toks[b])
            if all(fin) or s == max_new_tokens - 1:
                break
            key_valid = torch.cat([key_valid, ~done[:, None]], 1)
            last = model.decode_step(nxt, lengths + s, cache, key_valid)
    finally:
        model.train(was_training)
    return out


def _block_repeats(logits: torch.Tensor, out: list[list[int]], n: int) -> None:
    """Set to -inf, per row, the tokens that would complete an n-gram already in ``out[b]``."""
    for b, toks in enumerate(out):
        if len(toks) < n:
            continue
        prefix = tuple(toks[len(toks) - n + 1 :]) if n > 1 else ()
        banned = [
            toks[i + n - 1]
            for i in range(len(toks) - n + 1)
            if tuple(toks[i : i + n - 1]) == prefix
        ]
        if banned:
            logits[b, banned] = float("-inf")
