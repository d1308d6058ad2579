"""UniF²ace: a Show-o-style unified transformer with token-level and sequence-level MoE.

Block (Phi-1.5, parallel): ``x + Attn(LN x) + SeqMoE(TokenMoE(LN x))`` — one LayerNorm feeds both
branches; omni-attention (:mod:`unif2ace.models.attention`); the MLP branch is the token MoE of the
token's task group followed by the sequence MoE (:mod:`unif2ace.models.moe`).

Losses (:meth:`UniF2ace.loss`): ``L = w_mmu·L_mmu + w_t2i·L_D3Diff + balance`` (weights 1 by default)

* ``L_D3Diff`` on the t2i rows: per row a time ``t ~ U(0, 1)``, mask ratio ``γ = schedule(t)``,
  image tokens masked by :func:`~unif2ace.ops.mask_tokens`, and the fused
  :func:`~unif2ace.ops.d3diff_linear_loss` over the image rows of the LM head on the masked
  positions (the logits are never materialised). ``alpha = 0`` is Show-o's mask-only loss;
  ``w_ce = 0, alpha = 1`` is SEDD's score entropy alone.
* ``L_mmu``: next-token cross-entropy on the answer / caption tokens by
  :func:`~unif2ace.ops.fused_linear_cross_entropy` (the same fused kernel, α = 0) over the text
  rows of the head.
* the balance losses of both MoE levels.

The loss is a mean over sequences of per-sequence losses (each the mean over its masked image
tokens or its answer tokens), and all randomness of a training step (time, mask, prompt drop) is
drawn per sample from ``(seed, step, sample index)``: a global batch gives the same loss however it
is split over ranks and micro-batches (up to the balance losses, which are batch statistics).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from unif2ace import _backend, ops
from unif2ace.io import load_pretrained_state, save_pretrained
from unif2ace.models.attention import Attention
from unif2ace.models.config import ModelConfig
from unif2ace.models.layout import (
    IGNORE,
    TASK_T2I,
    BatchMeta,
    attention_blocks,
    drop_prompts,
    positions,
)
from unif2ace.models.moe import DenseMLP, SequenceMoE, TokenMoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = TokenMoE(cfg) if cfg.token_moe else DenseMLP(cfg)
        self.seq_moe = SequenceMoE(cfg) if cfg.seq_moe else None

    def forward(self, x, ctx: dict, cache: dict | None = None, past: dict | None = None):
        B, L, D = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn(
            h, ctx["positions"], ctx["limit"], ctx["key_valid"], cache, ctx["span"], past
        )
        # the MLP branch runs on the valid tokens only (padding is neither computed nor routed)
        sel = ctx["valid_flat"]
        if sel is None:  # every token valid (rule_context)
            m, aux = self.mlp(h.reshape(B * L, D), ctx["group_flat"])
            m = m.view(B, L, D)
        else:
            m_valid, aux = self.mlp(h.reshape(B * L, D)[sel], ctx["group_flat"])
            # in m_valid's dtype: under autocast a dense MLP returns the autocast dtype
            m = h.new_zeros(B * L, D, dtype=m_valid.dtype).index_copy(0, sel, m_valid)
            m = m.view(B, L, D)
        if self.seq_moe is not None:
            if cache is not None:  # the decoder reuses the prefix's mixture for new tokens
                sa, sc, _, aux_seq = self.seq_moe.mixture(
                    m, ctx["pool"], ctx["task"], ctx["semantic"], ctx["identity"]
                )
                cache["seq"] = (sa, sc)
                m = sa[:, None, None] * m + sc[:, None, :]
            else:
                m, aux_seq = self.seq_moe(
                    m, ctx["pool"], ctx["task"], ctx["semantic"], ctx["identity"]
                )
            aux = aux + aux_seq
        return x + a + m, aux

    def decode(self, x, positions, cache: dict, key_valid, group_ids):
        """x ``[B, 1, D]``: one appended token per row (see :meth:`UniF2ace.decode_step`)."""
        B, _, D = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn.decode(h, positions, cache, key_valid)
        m, _ = self.mlp(h.reshape(B, D), group_ids)
        m = m.view(B, 1, D)
        if self.seq_moe is not None:
            sa, sc = cache["seq"]
            m = sa[:, None, None] * m + sc[:, None, :]
        return x + a + m


def _sample_seed(seed: int, step: int, index: int) -> int:
    # splitmix-style mix of the three into a 62-bit seed
    z = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & (
        (1 << 64) - 1
    )
    z ^= z >> 31
    return z & ((1 << 62) - 1)


class StepNoise(NamedTuple):
    """The per-sample randomness of the t2i rows of a training step, drawn on the host."""

    values: torch.Tensor  # float32 [3, R] on the CPU: γ(t), the ratio a(t) and σ'(t) per row
    mask_seeds: list[int]  # the Philox seed of each row's mask (ops.mask_tokens)
    num_masked: list[int]  # masked image tokens per row: clamp(round(N·γ), 1, N)
    drop: list[bool]  # whether the row's prompt is dropped (classifier-free guidance)


def draw_noise(cfg: ModelConfig, indices: list[int], step: int, seed: int) -> StepNoise:
    """The noise of the t2i samples ``indices`` at ``step``: per sample, from a CPU generator
    seeded by ``(seed, step, index)``, a time ``t ~ U(0, 1)``, a mask seed and the prompt-drop
    draw; then the schedule at ``t``. Host computation only (plain values and CPU tensors)."""
    times, mask_seeds, drop = [], [], []
    for index in indices:
        g = torch.Generator().manual_seed(_sample_seed(seed, step, index))
        t = torch.rand(1, generator=g)
        mask_seeds.append(int(torch.randint(0, 2**62, (1,), generator=g)))
        drop.append(float(torch.rand(1, generator=g)) < cfg.cond_drop)
        times.append(t)
    if not indices:
        return StepNoise(torch.zeros(3, 0), [], [], [])
    sv = ops.schedule(torch.cat(times), cfg.schedule)
    gamma = sv.gamma
    N = cfg.image_tokens
    # the count of ops.mask_tokens' "count" mode: round half to even of N·γ in float64
    num_masked = [min(max(round(g * N), 1), N) for g in gamma.double().tolist()]
    values = torch.stack([gamma, sv.ratio.float(), sv.dsigma.float()])
    return StepNoise(values, mask_seeds, num_masked, drop)


def _masked_rows(x: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``x[mask]`` (``mask`` over x's first two dims) for a ``count`` known on the host: the
    same elements in the same order, without reading the mask's size back from the device."""
    at = torch.nonzero_static(mask, size=count)
    return x[at[:, 0], at[:, 1]]


_ROW_WIDE = ("positions", "limit", "key_valid", "pool")  # the [B, L] tensors of the context


def mark_dynamic_sizes(prepared: dict) -> dict:
    """Mark the sizes of a :meth:`UniF2ace.prepare_loss` or :meth:`UniF2ace.model_inputs`
    result that change from batch to batch (the sequence length; the valid, masked and answer
    token counts) as dynamic for ``torch.compile`` (``maybe_mark_dynamic``: a size the graph
    needs constant stays constant). Returns ``prepared``."""
    mark = torch._dynamo.maybe_mark_dynamic
    ctx = prepared["ctx"]
    for t in (prepared["ids"], prepared["is_image"], *(ctx.get(k) for k in _ROW_WIDE)):
        if t is not None:
            mark(t, 1)
    for t in (ctx.get("valid_flat"), ctx.get("group_flat")):
        if t is not None:
            mark(t, 0)
    for part in ("t2i", "mmu"):
        for name, t in prepared.get(part, {}).items():
            if name != "scale":
                mark(t, 0)
    return prepared


class UniF2ace(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg.validate()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size)
        if cfg.image_pos_embed:
            self.image_pos = nn.Embedding(cfg.image_tokens, cfg.d_model)
        if cfg.mm_projector_dim:  # Show-o's CLIP-ViT variants (:mod:`unif2ace.showo`)
            D = cfg.d_model
            self.mm_projector = nn.Sequential(
                nn.Linear(cfg.mm_projector_dim, D), nn.GELU(), nn.Linear(D, D)
            )
        if cfg.code_vector_dim:
            self.code_proj = nn.Linear(cfg.code_vector_dim, cfg.d_model, bias=False)
            self.register_buffer(
                "code_vectors", torch.zeros(cfg.codebook_size, cfg.code_vector_dim)
            )
        # per-entry standardisation of the semantic / identity embeddings the sequence-MoE
        # resamplers read (:meth:`fit_embedding_stats`); the default scales a unit vector's
        # entries to ~1
        for name, dim in (("semantic", cfg.semantic_dim), ("identity", cfg.identity_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.full((dim,), dim**-0.5))
        self.reset_parameters()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The buffers' initial values: a model built on the meta device and materialised with
        ``to_empty`` calls this before loading weights (buffers a checkpoint does not hold, like
        the rotary frequencies, would otherwise be uninitialised memory)."""
        for name, dim in (
            ("semantic", self.config.semantic_dim),
            ("identity", self.config.identity_dim),
        ):
            getattr(self, f"{name}_mean").zero_()
            getattr(self, f"{name}_std").fill_(dim**-0.5)
        if self.config.code_vector_dim:
            self.code_vectors.zero_()
        for layer in self.layers:
            layer.self_attn.rotary.reset_buffers()

    def reset_parameters(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, std=0.02)
            elif isinstance(mod, TokenMoE):
                mod.reset_parameters()

    @torch.no_grad()
    def fit_embedding_stats(self, semantic: torch.Tensor, identity: torch.Tensor) -> None:
        """Set the embedding standardisation from training embeddings ``[N, dim]``. The encoders
        give unit vectors that share one mean direction (on SynthFace ~0.8 of their norm); left
        in, it drowns the per-image part and a tiny model trained on VQA never learned to read
        the resampled embeddings (answers were the same with the embeddings shuffled)."""
        pairs = (("semantic", semantic), ("identity", identity))
        for name, e in pairs:  # check both before changing either
            dim = getattr(self, f"{name}_mean").numel()
            if e.ndim != 2 or e.shape[1] != dim or e.shape[0] < 2:
                raise ValueError(
                    f"{name} embeddings for the statistics must be [N >= 2, "
                    f"{dim}], got {list(e.shape)}"
                )
        for name, e in pairs:
            e = e.double()
            sd = e.std(0)
            getattr(self, f"{name}_mean").copy_(e.mean(0))
            getattr(self, f"{name}_std").copy_(sd.clamp(min=float(sd.mean()) * 0.05 + 1e-12))

    @torch.no_grad()
    def set_code_vectors(self, vectors: torch.Tensor) -> None:
        """The image tokenizer's code vector of every codebook entry, ``[codebook_size,
        code_vector_dim]`` (``VQAutoencoder.code_vectors()``); standardised per coordinate."""
        cfg = self.config
        if not cfg.code_vector_dim:
            raise ValueError("this model has code_vector_dim = 0 (no code-vector embedding)")
        want = (cfg.codebook_size, cfg.code_vector_dim)
        if tuple(vectors.shape) != want:
            raise ValueError(f"code vectors must be {list(want)}, got {list(vectors.shape)}")
        v = vectors.double()
        self.code_vectors.copy_((v - v.mean(0)) / v.std(0).clamp(min=1e-6))

    def embed(self, input_ids: torch.Tensor, is_image: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings ``[B, L, D]``: the token table, plus for image tokens (``is_image``,
        each image row holding its ``image_tokens`` codes in raster order) the grid-position and
        code-vector embeddings when the config has them."""
        cfg = self.config
        x = self.embed_tokens(input_ids)
        if is_image is not None and cfg.image_pos_embed:
            pos = (is_image.long().cumsum(1) - 1).clamp(0, cfg.image_tokens - 1)
            x = x + self.image_pos(pos) * is_image[..., None]
        if cfg.code_vector_dim:
            code = input_ids - cfg.image_offset
            is_code = (code >= 0) & (code < cfg.codebook_size)
            vec = self.code_vectors[code.clamp(0, cfg.codebook_size - 1)]
            x = x + self.code_proj(vec) * is_code[..., None]
        return x

    def standardize_embeddings(self, name: str, e: torch.Tensor | None) -> torch.Tensor | None:
        if e is None:
            return None
        mean, std = getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
        return (e.to(mean.dtype) - mean) / std

    def shard_units(self) -> list[nn.Module]:
        """The modules FSDP2 shards one by one (each block)."""
        return list(self.layers)

    # --- forward -----------------------------------------------------------------------------
    def _context(self, batch: dict, meta: BatchMeta) -> dict:
        """Per-forward tensors every layer shares, computed once, with the data-dependent sizes
        and decisions taken from ``meta`` (host values): nothing is read back from the device."""
        task, valid, is_image = batch["task"], batch["valid"], batch["is_image"]
        valid_flat = torch.nonzero_static(valid.reshape(-1), size=meta.num_valid).flatten()
        group = (task == TASK_T2I).long()[:, None].expand_as(valid).reshape(-1)[valid_flat]
        # the layout's rule as per-query limits, from host values (the image spans are
        # contiguous by construction: collate, BatchMeta.of)
        L = is_image.shape[1]
        idx = torch.arange(L, device=is_image.device)
        blocks = attention_blocks(self.config, meta)
        sel = torch.tensor(blocks, dtype=torch.long).reshape(-1, 3).to(idx.device)
        s, e, lim = sel[:, :1], sel[:, 1:2], sel[:, 2:]
        in_block = (idx >= s) & (idx < e)
        b0 = blocks[0] if blocks else None
        # omni_attention's span: every row's block at the same place, seeing itself, no padding
        same = not meta.padded and b0 is not None and b0[1] == b0[2] and len(set(blocks)) == 1
        return {
            "positions": positions(self.config, valid),
            "limit": torch.where(in_block, lim, idx + 1).to(torch.int32),
            "key_valid": valid if meta.padded else None,
            "span": (b0[0], b0[1]) if same and b0[1] > b0[0] else None,
            "valid_flat": valid_flat,
            "group_flat": group,  # token MoE group: 0 understanding, 1 generation
            "pool": batch["pool"] & valid,
            "task": (task == TASK_T2I).long(),
            "semantic": self.standardize_embeddings("semantic", batch.get("semantic")),
            "identity": self.standardize_embeddings("identity", batch.get("identity")),
        }

    def hidden_states(self, input_ids: torch.Tensor, batch: dict, cache: list[dict] | None = None):
        """Final-LayerNorm hidden states ``[B, L, D]`` and the summed balance loss. ``cache``: an
        empty list that receives each layer's keys, values and sequence-MoE mixture (prefill for
        :meth:`decode_step`)."""
        return self.run_inputs(self.model_inputs(input_ids, batch), cache)

    def model_inputs(
        self, input_ids: torch.Tensor, batch: dict, meta: BatchMeta | None = None
    ) -> dict:
        """``{"ids", "is_image", "ctx"}``: the tokens of a forward and its :meth:`_context`,
        built from the batch's host values (``meta``, default ``BatchMeta.of(batch)``). What
        :meth:`run_inputs` takes, and what a compiled forward traces: everything after it sees the
        batch only through tensor sizes."""
        ctx = self._context(batch, meta or BatchMeta.of(batch))
        return {"ids": input_ids, "is_image": batch["is_image"], "ctx": ctx}

    def run_inputs(self, inputs: dict, cache: list[dict] | None = None):
        """:meth:`run_layers` of the embedded :meth:`model_inputs`: hidden states and balance loss."""
        return self.run_layers(self.embed(inputs["ids"], inputs["is_image"]), inputs["ctx"], cache)

    def rule_context(
        self,
        positions: torch.Tensor,
        limit: torch.Tensor,
        key_valid: torch.Tensor | None,
        *,
        group: torch.Tensor | int = 0,
    ) -> dict:
        """The per-forward context of :meth:`run_layers` for an attention rule given directly
        (``positions`` and ``limit [B, L]``, ``key_valid [B, Lk]`` or None, as
        :func:`unif2ace.ops.omni_attention` takes them) instead of a collated batch: every token
        goes through the MLP branch, in token-MoE ``group`` (0 understanding, 1 generation; an
        int or ``[B]``). Only for models without the sequence MoE, which needs a batch's pooling
        and task rows. This is how :mod:`unif2ace.showo` runs Show-o's own layouts."""
        if self.config.seq_moe:
            raise ValueError("rule_context: the sequence MoE needs a collated batch (use forward)")
        B, L = limit.shape
        dev = limit.device
        if isinstance(group, int):
            group = torch.full((B,), group, dtype=torch.long, device=dev)
        return {
            "positions": positions,
            "limit": limit.to(torch.int32),
            "key_valid": key_valid,
            "span": None,
            "valid_flat": None,  # every token goes through the MLP
            "group_flat": group.long()[:, None].expand(B, L).reshape(-1),
        }

    def run_layers(
        self,
        x: torch.Tensor,
        ctx: dict,
        cache: list[dict] | None = None,
        past: list[dict] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings ``x [B, L, D]`` through every block and the final LayerNorm, under
        ``ctx`` (:meth:`_context` or :meth:`rule_context`): the hidden states and the summed
        balance loss. ``cache``: an empty list that receives each layer's keys and values;
        ``past``: each layer's cache of a prefix that x follows (see
        :meth:`unif2ace.models.attention.Attention.forward`)."""
        aux = x.new_zeros(())
        for i, layer in enumerate(self.layers):
            c = None
            if cache is not None:
                c = {}
                cache.append(c)
            x, a = layer(x, ctx, c, None if past is None else past[i])
            aux = aux + a
        return self.final_layernorm(x), aux

    def decode_step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: list[dict],
        key_valid: torch.Tensor,
    ) -> torch.Tensor:
        """Append one text token per row (understanding group) to a prefilled ``cache``:
        tokens ``[B]`` at rotary positions ``[B]``; ``key_valid [B, Lc + 1]`` says which cached
        keys (and the new one, last) may be attended. Returns the new hidden state ``[B, D]``."""
        B = tokens.shape[0]
        x = self.embed_tokens(tokens)[:, None]
        group = torch.zeros(B, dtype=torch.long, device=tokens.device)
        for layer, c in zip(self.layers, cache):
            x = layer.decode(x, positions[:, None], c, key_valid, group)
        return self.final_layernorm(x)[:, 0]

    def forward(
        self,
        batch: dict | None = None,
        *,
        loss: bool = False,
        step: int = 0,
        seed: int = 0,
        noise: StepNoise | None = None,
        prepared: dict | None = None,
    ):
        """Full-vocabulary logits ``[B, L, V]`` (tests, small inputs), or with ``loss=True`` the
        training loss and its parts (:meth:`loss`), or with ``prepared`` (a
        :meth:`prepare_loss` result) :meth:`loss_from` of it. Training goes through ``forward``
        so that DDP / FSDP2 wrappers (and ``torch.compile`` of the wrapped model) see the call;
        sampling uses :meth:`image_logits`, and neither builds the [B, L, V] logits."""
        if prepared is not None:
            return self.loss_from(prepared)
        if batch is None:
            raise TypeError("UniF2ace.forward: pass a batch or prepared=")
        if loss:
            return self.loss(batch, step, seed, noise)
        h, _ = self.hidden_states(batch["input_ids"], batch)
        return self.lm_head(h)

    def head_rows(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the LM head rows scoring ``"text"`` or ``"image"`` tokens."""
        cfg = self.config
        lo, hi = (0, cfg.text_vocab) if part == "text" else (cfg.image_offset, cfg.mask_id)
        return self.lm_head.weight[lo:hi], self.lm_head.bias[lo:hi]

    # --- training ----------------------------------------------------------------------------
    def draw_noise(self, batch: dict, step: int = 0, seed: int = 0) -> StepNoise:
        """The noise :meth:`loss` uses for ``batch`` at ``(step, seed)``: :func:`draw_noise` of
        the batch's t2i rows (host work only). Call it outside ``torch.compile`` and pass the
        result to the compiled :meth:`loss`: the seeded CPU generators it creates cannot be
        traced, and their 64-bit seed mixing must stay out of the graph."""
        meta = BatchMeta.of(batch)
        return draw_noise(self.config, [meta.index[b] for b in meta.t2i_rows], step, seed)

    def loss(
        self, batch: dict, step: int = 0, seed: int = 0, noise: StepNoise | None = None
    ) -> tuple[torch.Tensor, dict]:
        """The training loss of a collated batch (see the module docstring) and its parts
        (detached 0-dim tensors ``loss``, ``balance``, ``loss_t2i``, ``loss_mmu``; read them when
        logging): :meth:`loss_from` of :meth:`prepare_loss`.

        Every tensor of the step lives on the batch's device. The per-sample noise is drawn on
        the host (:meth:`draw_noise`; ``step`` and ``seed`` are used only for it) and moved once;
        which rows are which task, and how many tokens are valid, masked or learned, come from
        ``batch["meta"]`` (:class:`BatchMeta`), so with ``unif2ace.set_checks(False)`` the step
        reads nothing back from the device (the MoE ops' expert sizes aside).

        ``noise``: the step's noise drawn beforehand by :meth:`draw_noise` (the same loss, bit
        for bit). To compile the loss, use :meth:`compile_loss`."""
        return self.loss_from(self.prepare_loss(batch, step, seed, noise))

    def prepare_loss(
        self, batch: dict, step: int = 0, seed: int = 0, noise: StepNoise | None = None
    ) -> dict:
        """Everything of a training step that depends on the batch's layout, as tensors: the
        step's noise applied (image tokens masked, dropped prompts made padding), the attention
        rule and MoE token lists (:meth:`model_inputs`), and for each loss the flat positions of
        the tokens it scores with their targets and weights. The layout's host values
        (``batch["meta"]``) are used here and nowhere after, so :meth:`loss_from` is the same
        traced graph for every batch: only tensor sizes change. No parameter is used."""
        cfg = self.config
        meta = BatchMeta.of(batch)
        ids = batch["input_ids"].clone()
        valid = batch["valid"].clone()
        dev, (B, L) = ids.device, ids.shape
        rows = meta.t2i_rows
        R = len(rows)
        if noise is None:
            noise = draw_noise(cfg, [meta.index[b] for b in rows], step, seed)
        elif len(noise.mask_seeds) != R:
            raise ValueError(
                f"UniF2ace.loss: noise for {len(noise.mask_seeds)} t2i rows, batch has {R}"
            )
        per_row = noise.values.to(dev, non_blocking=True)  # [3, R]: gamma, ratio, dsigma
        masks = []
        for r, b in enumerate(rows):
            s, e = meta.image[b]
            codes = ids[b, s:e] - cfg.image_offset  # [N]
            gamma = per_row[0, r : r + 1]
            masked, mask = ops.mask_tokens(
                codes[None], gamma, cfg.codebook_size, seed=noise.mask_seeds[r]
            )
            ids[b, s:e] = masked[0] + cfg.image_offset
            masks.append(mask[0])
        dropped = [b for r, b in enumerate(rows) if noise.drop[r]]  # unconditional for CFG
        drop_prompts(cfg, ids, valid, meta, dropped)
        out = self.model_inputs(ids, {**batch, "valid": valid}, meta.drop_prompts(dropped))
        if R:
            mask = torch.stack(masks)  # [R, N]
            # each sequence's mean over its masked tokens, averaged over the batch's B sequences
            per_tok = 1.0 / (mask.sum(1).float() * B)  # [R]
            M = sum(noise.num_masked)
            if _backend.checks_enabled():  # reads the mask
                mask = ops.value_check(mask, "count", "UniF2ace.loss", "mask", upper=M)
            at = torch.nonzero_static(mask, size=M)  # [M, 2]
            row_of, col = at[:, 0], at[:, 1]
            # row r's image starts at flat position starts[r] of h.view(B·L, D)
            starts = torch.tensor([b * L + meta.image[b][0] for b in rows])
            flat = starts.to(dev, non_blocking=True)[row_of] + col
            out["t2i"] = {
                "at": flat,
                "target": batch["input_ids"].reshape(-1)[flat] - cfg.image_offset,
                "ratio": per_row[1][row_of],
                "w_ce": (per_tok * cfg.w_ce)[row_of],
                "w_se": (per_tok * per_row[2])[row_of],
                "scale": torch.tensor([B, R], dtype=torch.float64).to(dev, non_blocking=True),
            }
        tgt = batch["targets"]
        n_learn = sum(meta.answer)
        if n_learn:
            sel = tgt != IGNORE
            n_ans = sel.sum(1).float()  # [B] answer tokens per row
            at = torch.nonzero_static(sel, size=n_learn)  # [n_learn, 2]
            n_rows = sum(n > 0 for n in meta.answer)
            out["mmu"] = {
                "at": at[:, 0] * L + at[:, 1],
                "target": tgt[at[:, 0], at[:, 1]],
                # each row's mean over its answer tokens, averaged over the batch's B rows
                "w": (1.0 / (n_ans.clamp(min=1) * B))[at[:, 0]],
                "scale": torch.tensor([B, n_rows], dtype=torch.float64).to(dev, non_blocking=True),
            }
        return out

    def loss_from(self, prepared: dict) -> tuple[torch.Tensor, dict]:
        """The loss and its parts (:meth:`loss`) of a step :meth:`prepare_loss` laid out: the
        model's forward and the fused losses. Its graph depends on the batch only through tensor
        sizes and on whether the step has t2i rows, answer tokens and padding."""
        cfg = self.config
        h, aux = self.run_inputs(prepared)
        h = h.flatten(0, 1)  # [B·L, D]
        zero = h.new_zeros(())
        parts = {"balance": aux.detach()}
        loss_t2i = loss_mmu = zero
        t2i, mmu = prepared.get("t2i"), prepared.get("mmu")
        if t2i is not None:
            w, bias = self.head_rows("image")
            loss_t2i = ops.d3diff_linear_loss(
                h[t2i["at"]],
                w,
                t2i["target"],
                t2i["ratio"],
                t2i["w_ce"],
                t2i["w_se"],
                cfg.alpha,
                bias=bias,
            )
            scale = t2i["scale"]
            parts["loss_t2i"] = loss_t2i.detach().double() * scale[0] / scale[1]
        if mmu is not None:
            w, bias = self.head_rows("text")
            loss_mmu = ops.fused_linear_cross_entropy(
                h[mmu["at"]], w, mmu["target"], mmu["w"], bias=bias
            )
            scale = mmu["scale"]
            parts["loss_mmu"] = loss_mmu.detach().double() * scale[0] / scale[1]
        loss = cfg.w_t2i * loss_t2i + cfg.w_mmu * loss_mmu + aux
        parts["loss"] = loss.detach()
        return loss, parts

    def compile_loss(self, **options):
        """:meth:`loss` with its model part compiled: ``fn(batch, step=0, seed=0, noise=None)``
        runs :meth:`prepare_loss` eagerly (the layout's host values, the step's noise) and
        ``torch.compile(self.loss_from, fullgraph=True, **options)`` on its tensors, with the
        sequence length and the token, masked and answer counts marked dynamic
        (:func:`mark_dynamic_sizes`). One graph then serves every batch of a run: a new one is
        compiled only for a new combination of (t2i rows or not, answer tokens or not, padding
        or not) and for a count of 0 or 1, which torch.compile specialises."""
        core = torch.compile(self.loss_from, **{"fullgraph": True, **options})

        def fn(batch: dict, step: int = 0, seed: int = 0, noise: StepNoise | None = None):
            return core(mark_dynamic_sizes(self.prepare_loss(batch, step, seed, noise)))

        return fn

    # --- sampling ------------------------------------------------------------------------------
    def image_logits(self, input_ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits over the codebook at the image positions, ``[B, image_tokens, K]``."""
        return self.image_logits_from(self.model_inputs(input_ids, batch))

    def image_logits_from(self, inputs: dict) -> torch.Tensor:
        """:meth:`image_logits` of :meth:`model_inputs` built beforehand (what a generation step
        compiles)."""
        h, _ = self.run_inputs(inputs)
        B, _, D = h.shape
        N = self.config.image_tokens
        img_h = _masked_rows(h, inputs["is_image"], B * N).view(B, N, D)
        w, bias = self.head_rows("image")
        return img_h @ w.T + bias

    def compile_image_logits(self, **options):
        """:meth:`image_logits` with the model compiled: ``fn(input_ids, batch)``; the
        :meth:`model_inputs` are built eagerly and ``torch.compile(self.image_logits_from, fullgraph=True,
        **options)`` runs on it with the sequence length and valid-token count dynamic, so the
        decoding steps of one batch, and batches of other prompt lengths, share one graph. Pass
        it to :func:`~unif2ace.models.sampling.generate_images` (``image_logits=``)."""
        core = torch.compile(self.image_logits_from, **{"fullgraph": True, **options})

        def fn(input_ids: torch.Tensor, batch: dict) -> torch.Tensor:
            return core(mark_dynamic_sizes(self.model_inputs(input_ids, batch)))

        return fn

    # --- save / load ---------------------------------------------------------------------------
    def save_pretrained(self, folder) -> None:
        save_pretrained(folder, self, {"model_type": "unif2ace", **self.config.to_dict()})

    @classmethod
    def from_pretrained(cls, folder, expect: ModelConfig | None = None) -> UniF2ace:
        """Load a folder written by :meth:`save_pretrained`. ``expect``: the config the caller
        requires; a checkpoint of another config raises instead of loading partially."""
        state, conf = load_pretrained_state(folder)
        if conf.pop("model_type", None) != "unif2ace":
            raise ValueError(f"{folder}: config.json is not a unif2ace model config")
        cfg = ModelConfig.from_dict(conf, where=f"{Path(folder) / 'config.json'}")
        if expect is not None and expect.to_dict() != cfg.to_dict():
            diff = [k for k, v in expect.to_dict().items() if cfg.to_dict().get(k) != v]
            raise ValueError(
                f"{folder} holds a model of another config ({', '.join(diff)} differ: "
                f"{json.dumps({k: cfg.to_dict()[k] for k in diff})})"
            )
        model = cls(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{folder}: weights do not fit the config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]})"
            )
        return model
