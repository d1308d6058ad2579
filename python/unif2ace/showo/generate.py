"""Show-o's logits, text-to-image decoding and question answering on the engine's ops.

* :func:`showo_logits`: ``[B, L, vocab]`` under Show-o's attention rule for each row
  (:mod:`unif2ace.showo.rules`), one :func:`~unif2ace.ops.omni_attention` call per layer.
* :func:`t2i_generate`: MaskGIT decoding through :func:`~unif2ace.ops.maskgit_decode` (the fused
  sampling step) with Show-o's schedule: step s of T has r = (s+1)/T, re-masks
  ``floor(N·cos(π/2·r))`` of the least confident tokens (clamped to [1, unknown − 1]), samples
  from ``softmax((1+w)·cond − w·uncond)`` over the codebook columns, and takes the confidence
  noise at temperature τ·(1 − r), compounded from step to step as Show-o's code does
  (``annealing="showo"``) or not (``"maskgit"``). The text never attends to the image, so the
  129-token text part of every row (conditional and unconditional) is run once and its keys and
  values are reused at every step: a step runs only the ``N + 2`` image positions, and scores only
  the codebook rows of the LM head at the image positions. ``cached=False`` is the straightforward
  loop Show-o runs (every step the whole sequence, SDPA with a boolean mask, the full-vocabulary
  head), kept as the reference the engine path is measured and tested against.
* :func:`mmu_answer` / :func:`mmu_answer_clip`: greedy answers with a key/value cache (Show-o
  reruns the whole sequence for every new token), stopping at EOS.
"""

from __future__ import annotations

import torch

from unif2ace import _backend, ops
from unif2ace.showo.rules import attention_rule
from unif2ace.showo.vocab import MAX_TEXT_LEN, ShowoVocab


def _vocab(model) -> ShowoVocab:
    vocab = getattr(model, "showo", None)
    if not isinstance(vocab, ShowoVocab):
        raise ValueError("the model is not a Show-o model (load it with unif2ace.showo.load_showo)")
    return vocab


def _device(model) -> torch.device:
    return next(model.parameters()).device


def showo_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, L, vocab_size]`` of a Show-o model for ``input_ids [B, L]``, with Show-o's
    attention rule taken from the ids: rows holding ``<|t2i|>`` the t2i rule, rows starting with
    ``<|mmu|>`` the MMU rule, other rows causal."""
    vocab = _vocab(model)
    input_ids = input_ids.to(_device(model))
    positions, limit, key_valid = attention_rule(input_ids, vocab)
    ctx = model.rule_context(positions, limit, key_valid)
    h, _ = model.run_layers(model.embed_tokens(input_ids), ctx)
    return model.lm_head(h)


@torch.no_grad()
def t2i_generate(
    model,
    prompts: list[list[int]],
    *,
    steps: int = 18,
    guidance: float = 5.0,
    choice_temperature: float = 1.0,
    annealing: str = "showo",
    temperature: float = 1.0,
    seed: int = 0,
    cached: bool = True,
) -> torch.Tensor:
    """Image codes ``int64 [B, N]`` for tokenised prompts (:class:`PhiTokenizer`), see the module
    docstring. ``guidance`` is Show-o's ``guidance_scale`` (0: no unconditional rows);
    ``choice_temperature`` its ``generation_temperature`` (the confidence noise; 1.0);
    ``temperature`` scales the logits sampled from (Show-o: 1). The same ``seed`` gives the same
    codes on the cached and the straightforward path (up to the float differences of the two
    forwards)."""
    vocab = _vocab(model)
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, list) for p in prompts):
        raise TypeError("prompts must be a list of token-id lists (PhiTokenizer.encode each)")
    B, N, K = len(prompts), vocab.num_vq_tokens, vocab.codebook_size
    if B == 0:
        raise ValueError("t2i_generate: no prompts")
    if guidance < 0:
        raise ValueError(f"t2i_generate: guidance must be >= 0, got {guidance}")
    dev = _device(model)
    rows = vocab.t2i_prompt(prompts)
    if guidance > 0:
        rows = torch.cat([rows, vocab.t2i_prompt([[] for _ in prompts])])
    logits_fn = t2i_logits_fn(model, rows.to(dev), cfg=guidance > 0, cached=cached)
    init = torch.full((B, N), K, dtype=torch.long, device=dev)
    return ops.maskgit_decode(
        logits_fn,
        init,
        steps,
        mask_id=K,
        schedule="cosine",
        guidance=guidance,
        temperature=temperature,
        choice_temperature=choice_temperature,
        annealing=annealing,
        seed=seed,
    )


def t2i_logits_fn(model, rows: torch.Tensor, *, cfg: bool, cached: bool = True):
    """The ``logits_fn`` of :func:`~unif2ace.ops.maskgit_decode` for t2i ``rows`` (the conditional
    rows, then with ``cfg`` as many unconditional ones): image codes ``[B, N]`` (``K``: masked) →
    logits ``[B, N, K]`` float32 over the codebook (a ``(cond, uncond)`` pair with ``cfg``)."""
    vocab = _vocab(model)
    N, K = vocab.num_vq_tokens, vocab.codebook_size
    B = rows.shape[0] // 2 if cfg else rows.shape[0]
    P = MAX_TEXT_LEN  # <|soi|> sits at P, the image at [P + 1, P + 1 + N)
    positions, limit, key_valid = attention_rule(rows, vocab)
    w, bias = model.head_rows("image")  # the codebook rows: [image_offset, mask)

    def split(lg: torch.Tensor):
        lg = lg.float()
        return (lg[:B], lg[B:]) if cfg else lg

    if cached:
        ctx = model.rule_context(positions[:, :P], limit[:, :P], key_valid[:, :P])
        past: list[dict] = []
        model.run_layers(model.embed_tokens(rows[:, :P]), ctx, cache=past)
        step_ctx = model.rule_context(positions[:, P:], limit[:, P:], key_valid)
        suffix = rows[:, P:].clone()

        def logits_fn(codes: torch.Tensor):
            suffix[:, 1 : 1 + N] = _tokens(codes, vocab, cfg)
            h, _ = model.run_layers(model.embed_tokens(suffix), step_ctx, past=past)
            return split(h[:, 1 : 1 + N] @ w.T + bias)

        return logits_fn

    ids = rows.clone()
    ctx = model.rule_context(positions, limit, key_valid)
    lo = vocab.image_offset

    def full_logits_fn(codes: torch.Tensor):
        ids[:, P + 1 : P + 1 + N] = _tokens(codes, vocab, cfg)
        with _backend.use_backend("torch"):  # SDPA with the boolean mask, as Show-o
            h, _ = model.run_layers(model.embed_tokens(ids), ctx)
            full = model.lm_head(h)  # [rows, L, vocab_size]
        return split(full[:, P + 1 : P + 1 + N, lo : lo + K])

    return full_logits_fn


def _tokens(codes: torch.Tensor, vocab: ShowoVocab, cfg: bool) -> torch.Tensor:
    """Codes in ``[0, K]`` (K: masked) as token ids, repeated for the unconditional rows. The mask
    token's id is ``image_offset + K``, so one addition maps both."""
    tok = codes + vocab.image_offset
    return torch.cat([tok, tok]) if cfg else tok


def _greedy(model, x: torch.Tensor, limit: torch.Tensor, eos: int, max_new_tokens: int):
    """Greedy decoding after the prefix embeddings ``x [1, L, D]`` (attention ``limit [1, L]``,
    every key valid); the argmax runs over the whole vocabulary, as Show-o's top-k = 1."""
    L = x.shape[1]
    dev = x.device
    positions = torch.arange(L, device=dev)[None]
    cache: list[dict] = []
    h, _ = model.run_layers(x, model.rule_context(positions, limit, None), cache=cache)
    last = h[:, -1]
    out: list[int] = []
    at = torch.arange(L, L + max_new_tokens, device=dev)  # the new tokens' positions
    valid = torch.ones(1, L + max_new_tokens, dtype=torch.bool, device=dev)  # every key
    for t in range(max_new_tokens):
        tok = model.lm_head(last).argmax(-1)  # [1]
        if int(tok) == eos:
            break
        out.append(int(tok))
        if t == max_new_tokens - 1:
            break
        last = model.decode_step(tok, at[t : t + 1], cache, valid[:, : L + t + 1])
    return out


@torch.no_grad()
def mmu_answer(
    model, image_codes: torch.Tensor, question: list[int], *, max_new_tokens: int = 100
) -> list[int]:
    """The greedy answer (token ids, EOS excluded) of a VQ-variant Show-o to the tokens of
    ``"USER: \\n" + question + " ASSISTANT:"`` about an image's codes ``[N]``."""
    vocab = _vocab(model)
    ids = vocab.mmu_prompt(image_codes, question).to(_device(model))
    _, limit, _ = attention_rule(ids, vocab)
    return _greedy(model, model.embed_tokens(ids), limit, vocab.eos, max_new_tokens)


@torch.no_grad()
def mmu_answer_clip(
    model,
    features: torch.Tensor,
    system: list[int],
    question: list[int],
    *,
    max_new_tokens: int = 100,
) -> list[int]:
    """The greedy answer of a CLIP-ViT-variant Show-o: ``features [1, T, C]`` are the vision
    tower's patch features (:func:`unif2ace.showo.clip.clip_features`), ``system`` the tokens of
    :data:`~unif2ace.showo.vocab.SYSTEM_PROMPT`, ``question`` those of
    ``"USER: " + question + " ASSISTANT:"``. Every query sees the whole prefix up to the end of
    the image features, and the rest causally."""
    vocab = _vocab(model)
    if getattr(model, "mm_projector", None) is None:
        raise ValueError("this Show-o checkpoint has no mm_projector (not a CLIP-ViT variant)")
    C = model.config.mm_projector_dim
    if features.dim() != 3 or features.shape[0] != 1 or features.shape[2] != C:
        raise ValueError(f"CLIP features must be [1, T, {C}], got {list(features.shape)}")
    dev = _device(model)
    ids, at = vocab.mmu_clip_prompt(system, question)
    emb = model.embed_tokens(ids.to(dev))
    img = model.mm_projector(features.to(dev, emb.dtype))
    x = torch.cat([emb[:, :at], img, emb[:, at:]], 1)
    L = x.shape[1]
    seen = at + img.shape[1]  # <|mmu|>, the system prompt, <|soi|> and the image
    limit = torch.arange(1, L + 1, device=dev).clamp(min=seen)[None].to(torch.int32)
    return _greedy(model, x, limit, vocab.eos, max_new_tokens)
