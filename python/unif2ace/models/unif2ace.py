"""UniF²ace: a Show-o-style unified transformer with token-level and sequence-level MoE.

Block (Phi-1.5, parallel): ``x + Attn(LN x) + SeqMoE(TokenMoE(LN x))`` — one LayerNorm feeds both
branches; omni-attention (:mod:`unif2ace.models.attention`); the MLP branch is the token MoE of the
token's task group followed by the sequence MoE (:mod:`unif2ace.models.moe`).

Losses (:meth:`UniF2ace.loss`): ``L = L_mmu + L_D3Diff + balance``

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

import torch
import torch.nn as nn

from unif2ace import ops
from unif2ace.io import load_pretrained_state, save_pretrained
from unif2ace.models import special_tokens as st
from unif2ace.models.attention import Attention
from unif2ace.models.config import ModelConfig
from unif2ace.models.layout import TASK_T2I, positions_of
from unif2ace.models.moe import DenseMLP, SequenceMoE, TokenMoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = TokenMoE(cfg) if cfg.token_moe else DenseMLP(cfg)
        self.seq_moe = SequenceMoE(cfg) if cfg.seq_moe else None

    def forward(self, x, ctx: dict, cache: dict | None = None):
        B, L, D = x.shape
        h = self.input_layernorm(x)
        a = self.self_attn(h, ctx["positions"], ctx["is_image"], ctx["key_valid"], cache)
        # the MLP branch runs on the valid tokens only (padding is neither computed nor routed)
        sel = ctx["valid_flat"]
        m_valid, aux = self.mlp(h.reshape(B * L, D)[sel], ctx["group_flat"])
        m = h.new_zeros(B * L, D).index_copy(0, sel, m_valid).view(B, L, D)
        if self.seq_moe is not None:
            if cache is not None:  # the decoder reuses the prefix's mixture for new tokens
                sa, sc, _, aux_seq = self.seq_moe.mixture(
                    m, ctx["pool"], ctx["task"], ctx["semantic"], ctx["identity"]
                )
                cache["seq"] = (sa, sc)
                m = sa[:, None, None] * m + sc[:, None, :]
            else:
                m, aux_seq = self.seq_moe(m, ctx["pool"], ctx["task"], ctx["semantic"], ctx["identity"])
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
        if cfg.code_vector_dim:
            self.code_proj = nn.Linear(cfg.code_vector_dim, cfg.d_model, bias=False)
            self.register_buffer("code_vectors", torch.zeros(cfg.codebook_size, cfg.code_vector_dim))
        # per-entry standardisation of the semantic / identity embeddings the sequence-MoE
        # resamplers read (:meth:`fit_embedding_stats`); the default scales a unit vector's
        # entries to ~1
        for name, dim in (("semantic", cfg.semantic_dim), ("identity", cfg.identity_dim)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_std", torch.full((dim,), dim**-0.5))
        self.reset_parameters()

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
                raise ValueError(f"{name} embeddings for the statistics must be [N >= 2, "
                                 f"{dim}], got {list(e.shape)}")  # fmt: skip
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
    def _context(self, batch: dict, valid: torch.Tensor) -> dict:
        task = batch["task"]
        valid_flat = valid.reshape(-1).nonzero().flatten()
        group = (task == TASK_T2I).long()[:, None].expand_as(valid).reshape(-1)[valid_flat]
        return {
            "positions": positions_of(valid),
            "is_image": batch["is_image"],
            "key_valid": None if bool(valid.all()) else valid,
            "valid_flat": valid_flat,
            "group_flat": group,  # token MoE group: 0 understanding, 1 generation
            "pool": batch["pool"] & valid,
            "task": (task == TASK_T2I).long(),
            "semantic": self.standardize_embeddings("semantic", batch.get("semantic")),
            "identity": self.standardize_embeddings("identity", batch.get("identity")),
        }

    def hidden_states(self, input_ids: torch.Tensor, batch: dict, valid: torch.Tensor | None = None,
                      cache: list[dict] | None = None):  # fmt: skip
        """Final-LayerNorm hidden states ``[B, L, D]`` and the summed balance loss. ``cache``: an
        empty list that receives each layer's keys, values and sequence-MoE mixture (prefill for
        :meth:`decode_step`)."""
        valid = batch["valid"] if valid is None else valid
        ctx = self._context(batch, valid)
        x = self.embed(input_ids, batch["is_image"])
        aux = x.new_zeros(())
        for layer in self.layers:
            c = None
            if cache is not None:
                c = {}
                cache.append(c)
            x, a = layer(x, ctx, c)
            aux = aux + a
        return self.final_layernorm(x), aux

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: list[dict],
                    key_valid: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Append one text token per row (understanding group) to a prefilled ``cache``:
        tokens ``[B]`` at rotary positions ``[B]``; ``key_valid [B, Lc + 1]`` says which cached
        keys (and the new one, last) may be attended. Returns the new hidden state ``[B, D]``."""
        B = tokens.shape[0]
        x = self.embed_tokens(tokens)[:, None]
        group = torch.zeros(B, dtype=torch.long, device=tokens.device)
        for layer, c in zip(self.layers, cache):
            x = layer.decode(x, positions[:, None], c, key_valid, group)
        return self.final_layernorm(x)[:, 0]

    def forward(self, batch: dict, *, loss: bool = False, step: int = 0, seed: int = 0):
        """Full-vocabulary logits ``[B, L, V]`` (tests, small inputs), or with ``loss=True`` the
        training loss and its parts (:meth:`loss`). Training goes through ``forward`` so that
        DDP / FSDP2 wrappers see the call; sampling uses :meth:`image_logits`, and neither builds
        the [B, L, V] logits."""
        if loss:
            return self.loss(batch, step, seed)
        h, _ = self.hidden_states(batch["input_ids"], batch)
        return self.lm_head(h)

    def head_rows(self, part: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the LM head rows scoring ``"text"`` or ``"image"`` tokens."""
        cfg = self.config
        lo, hi = (0, cfg.text_vocab) if part == "text" else (cfg.image_offset, cfg.mask_id)
        return self.lm_head.weight[lo:hi], self.lm_head.bias[lo:hi]

    # --- training ----------------------------------------------------------------------------
    def loss(self, batch: dict, step: int = 0, seed: int = 0) -> tuple[torch.Tensor, dict]:
        """The training loss of a collated batch (see the module docstring) and its parts."""
        cfg = self.config
        ids = batch["input_ids"].clone()
        valid = batch["valid"].clone()
        is_img, task = batch["is_image"], batch["task"]
        t2i_rows = (task == TASK_T2I).nonzero().flatten().tolist()
        n_img = cfg.image_tokens
        times, masks = [], []
        for b in t2i_rows:
            g = torch.Generator().manual_seed(_sample_seed(seed, step, int(batch["index"][b])))
            t = torch.rand(1, generator=g)
            gamma = ops.schedule(t, cfg.schedule).gamma
            codes = ids[b][is_img[b]] - cfg.image_offset  # [N]
            mseed = int(torch.randint(0, 2**62, (1,), generator=g))
            masked, mask = ops.mask_tokens(codes[None], gamma, cfg.codebook_size, seed=mseed)
            ids[b, is_img[b]] = masked[0] + cfg.image_offset
            if float(torch.rand(1, generator=g)) < cfg.cond_drop:  # unconditional for CFG
                drop = batch["prompt"][b]
                ids[b, drop] = st.PAD_ID
                valid[b, drop] = False
            times.append(t)
            masks.append(mask[0])
        h, aux = self.hidden_states(ids, batch, valid)
        D = h.shape[-1]
        zero = h.new_zeros(())
        parts = {"balance": float(aux.detach())}
        loss_t2i = zero
        B = ids.shape[0]
        if t2i_rows:
            rows = torch.tensor(t2i_rows, device=h.device)
            img_h = h[rows][is_img[rows]].view(len(t2i_rows), n_img, D)
            mask = torch.stack(masks)  # [R, N]
            clean = batch["input_ids"][rows][is_img[rows]].view(len(t2i_rows), n_img)
            sv = ops.schedule(torch.cat(times), cfg.schedule)
            # each sequence's mean over its masked tokens, averaged over the batch's B sequences
            per_tok = 1.0 / (mask.sum(1).float() * B)  # [R]
            row_of = mask.nonzero()[:, 0]
            w, bias = self.head_rows("image")
            loss_t2i = ops.d3diff_linear_loss(
                img_h[mask], w, clean[mask] - cfg.image_offset, sv.ratio.float()[row_of],
                (per_tok * cfg.w_ce)[row_of], (per_tok * sv.dsigma.float())[row_of], cfg.alpha,
                bias=bias,
            )  # fmt: skip
            parts["loss_t2i"] = float(loss_t2i.detach()) * B / len(t2i_rows)
        loss_mmu = zero
        tgt = batch["targets"]
        sel = tgt != -100
        if bool(sel.any()):
            w, bias = self.head_rows("text")
            n_ans = sel.sum(1).float()  # [B] answer tokens per row
            # each row's mean over its answer tokens, averaged over the batch's B rows
            row_w = (1.0 / (n_ans.clamp(min=1) * B))[sel.nonzero()[:, 0]]
            loss_mmu = ops.fused_linear_cross_entropy(h[sel], w, tgt[sel], row_w, bias=bias)
            parts["loss_mmu"] = float(loss_mmu.detach()) * B / int((n_ans > 0).sum())
        loss = loss_t2i + loss_mmu + aux
        parts["loss"] = float(loss.detach())
        return loss, parts

    # --- sampling ------------------------------------------------------------------------------
    def image_logits(self, input_ids: torch.Tensor, batch: dict) -> torch.Tensor:
        """Logits over the codebook at the image positions, ``[B, image_tokens, K]``."""
        h, _ = self.hidden_states(input_ids, batch)
        B, _, D = h.shape
        img_h = h[batch["is_image"]].view(B, self.config.image_tokens, D)
        w, bias = self.head_rows("image")
        return img_h @ w.T + bias

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
            raise ValueError(f"{folder}: weights do not fit the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")  # fmt: skip
        return model
