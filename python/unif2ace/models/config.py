"""Model configs: one dataclass, a registry of named sizes (``tiny``, ``small``, ``full``).

One vocabulary (Show-o): ``[0, text_vocab)`` text tokens with the special tokens first
(:mod:`unif2ace.models.special_tokens`), then ``codebook_size`` image codes, then the mask token::

    image code c  ->  token id text_vocab + c
    mask token    ->  text_vocab + codebook_size

``full`` has Phi-1.5's dense sizes (24 layers, d 2048, 32 heads, rotary on half of each head) with
each block's MLP replaced by the two-group token MoE; :func:`parameter_count` prints its size.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import asdict, dataclass, field

# Show-o's special ids (llm_vocab_size 50295, then [PAD] <|soi|> <|eoi|> <|sov|> <|eov|> <|t2i|>
# <|mmu|> …; BOS = EOS = Phi-1.5's <|endoftext|>), as ShowoVocab.layout_ids gives them
SHOWO_IDS = dict(pad=50295, soi=50296, eoi=50297, t2i=50300, mmu=50301, bos=50256, eos=50256)


@dataclass
class ModelConfig:
    name: str = "tiny"
    # vocabulary and layout
    text_vocab: int = 4096  # text tokenizer size, special tokens included
    codebook_size: int = 1000  # image tokenizer entries
    image_tokens: int = 256  # tokens per image (16×16)
    max_text_len: int = 96  # prompt / answer tokens (longer ones are cut)
    # how sequences are laid out (models/layout.py): "synthface" (this project's special tokens,
    # rotary positions over valid tokens) or "showo" (Show-o's ids, BOS/EOS framing, masks and
    # positions 0 … L−1, pads counted; the ids in ``special_ids``)
    layout: str = "synthface"
    # layout "showo": the ids of pad, soi, eoi, t2i, mmu, bos, eos (``ShowoVocab.layout_ids``)
    special_ids: dict = field(default_factory=dict)
    # Phi-1.5-style decoder
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    rotary_frac: float = 0.5  # Phi-1.5: rotary on the first half of each head
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    d_ff: int = 512  # dense MLP width (token MoE off)
    activation: str = "gelu_tanh"  # Phi's gelu_new
    qk_norm: bool = False  # Show-o: a LayerNorm (affine) over each head's q and k, before rotary
    # Show-o's CLIP-ViT variants: the projector of the vision tower's features into the model
    # (Linear clip_dim→d, GELU, Linear d→d); 0: none
    mm_projector_dim: int = 0
    # image-token input embeddings added to the token table: a learned embedding per grid
    # position (MaskGIT's; rotary alone gives only 1-D offsets), and a learned linear map of the
    # image tokenizer's code vector (FSQ/LFQ coordinates, :meth:`UniF2ace.set_code_vectors`), so
    # codes that decode to similar colours start with similar embeddings
    # (demo recipe, 1050 steps on the same batches: the image-token loss over steps 500–1050 fell
    # from 5.94 to 5.15 with the position embedding and to 4.52 with both)
    image_pos_embed: bool = True
    code_vector_dim: int = 4  # 0: off; training sets it to the tokenizer's code dimension
    # token-level grouped MoE: group 0 understanding, group 1 generation
    token_moe: bool = True
    # > 0: the token MoE also holds a dense MLP of this width (with biases) that every token of
    # both groups goes through, and the experts add to it (the model upcycled from Show-o keeps
    # Show-o's MLP here; showo/upcycle.py)
    dense_ffn: int = 0
    routed_experts: int = 4  # per group
    shared_experts: int = 1  # per group
    top_k: int = 2
    expert_ffn: int = 256
    expert_activation: str | None = None  # None: ``activation``; "silu_glu" for SwiGLU experts
    balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    # sequence-level MoE: understanding (copy, copy, clip, face), generation (copy, copy, zero, noise)
    seq_moe: bool = True
    seq_top_k: int = 2
    semantic_dim: int = 256  # CLIP stand-in embedding size (SemanticEncoder dim)
    identity_dim: int = 128  # face-recognition stand-in embedding size (IdentityEncoder dim)
    noise_std: float = 0.1  # the generation group's noise expert (training only)
    seq_balance_coef: float = 0.01
    # training-time details the model owns
    alpha: float = 0.01  # D3Diff score-entropy weight (0: mask-only, Show-o)
    w_ce: float = 1.0  # D3Diff mask-CE weight (0 with alpha=1: score-only, SEDD)
    schedule: str = "cosine"
    cond_drop: float = 0.1  # prompt dropped for classifier-free guidance
    w_t2i: float = 1.0  # weight of the image loss (D3Diff) in the total
    w_mmu: float = 1.0  # weight of the answer / caption loss in the total
    extra: dict = field(default_factory=dict)  # free-form notes kept in config.json

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + self.codebook_size + 1

    @property
    def image_offset(self) -> int:
        return self.text_vocab

    @property
    def mask_id(self) -> int:
        return self.text_vocab + self.codebook_size

    @property
    def moe_activation(self) -> str:
        return self.expert_activation or self.activation

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def max_seq_len(self) -> int:
        # mmu: <mmu> <soi> image <eoi> <user> question <assistant> answer <eot>
        return self.image_tokens + 2 * self.max_text_len + 8

    def validate(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        rot = int(self.head_dim * self.rotary_frac)
        if rot % 2:
            raise ValueError(f"rotary dims {rot} (head_dim·rotary_frac) must be even")
        if self.token_moe and not 1 <= self.top_k <= self.routed_experts:
            raise ValueError(
                f"top_k={self.top_k} must be in [1, routed_experts={self.routed_experts}]"
            )
        if self.seq_moe and not 1 <= self.seq_top_k <= 4:
            raise ValueError(f"seq_top_k={self.seq_top_k} must be in [1, 4]")
        for name in ("activation", "expert_activation"):
            v = getattr(self, name)
            if v not in ("gelu", "gelu_tanh", "silu_glu") and not (
                name == "expert_activation" and v is None
            ):
                raise ValueError(f"{name} must be gelu, gelu_tanh or silu_glu, got {v!r}")
        if self.mm_projector_dim < 0:
            raise ValueError(f"mm_projector_dim must be >= 0, got {self.mm_projector_dim}")
        if self.layout not in ("synthface", "showo"):
            raise ValueError(f"layout must be synthface or showo, got {self.layout!r}")
        if self.layout == "showo":
            need = ("pad", "soi", "eoi", "t2i", "mmu", "bos", "eos")
            missing = [k for k in need if not isinstance(self.special_ids.get(k), int)]
            if missing:
                raise ValueError(
                    f"layout 'showo' needs special_ids {list(need)}; missing {missing}"
                )
            bad = {k: v for k, v in self.special_ids.items() if not 0 <= v < self.text_vocab}
            if bad:
                raise ValueError(
                    f"special_ids {bad} lie outside the text vocabulary [0, {self.text_vocab})"
                )
        if self.dense_ffn < 0:
            raise ValueError(f"dense_ffn must be >= 0, got {self.dense_ffn}")
        if self.schedule not in ("cosine", "linear", "loglinear"):
            raise ValueError(f"schedule must be cosine, linear or loglinear, got {self.schedule!r}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "model config") -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            k = unknown[0]
            close = difflib.get_close_matches(k, sorted(names), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"{where}: unknown key {k!r}{hint}")
        return cls(**d).validate()


CONFIGS: dict[str, dict] = {
    # trains on a 2-core CPU in minutes (the demo and the CPU tests)
    "tiny": dict(name="tiny"),
    # a laptop GPU / a long CPU run
    "small": dict(
        name="small", d_model=384, n_layers=8, n_heads=6, d_ff=1536, routed_experts=8,
        expert_ffn=768, top_k=2, max_text_len=96,
    ),
    # Phi-1.5 sizes (24 layers, d 2048, 32 heads, head 64, rotary 32, MLP 8192); MAGVIT-v2 codebook
    "full": dict(
        name="full", text_vocab=51200, codebook_size=8192, image_tokens=256, max_text_len=128,
        d_model=2048, n_layers=24, n_heads=32, d_ff=8192, routed_experts=4, shared_experts=1,
        top_k=2, expert_ffn=1024, semantic_dim=768, identity_dim=512,
    ),
    # UniF²ace as the paper builds it from Show-o (arXiv 2503.08120; sources per line, "ours"
    # where the paper is silent). showo/upcycle.py initialises it from a Show-o checkpoint.
    "paper": dict(
        name="paper",
        # Show-o (Phi-1.5 + MAGVIT-v2, 256 px → 16×16 codes of 8192): its sizes, vocabulary,
        # QK-norm and layout, read from showlab/Show-o's config and code
        layout="showo", special_ids=SHOWO_IDS, text_vocab=50305, codebook_size=8192,
        image_tokens=256, max_text_len=128, d_model=2048, n_layers=24, n_heads=32, d_ff=8192,
        qk_norm=True, image_pos_embed=False, code_vector_dim=0, activation="gelu_tanh",
        # token-level MoE in every block, a T2I and an MMU group with shared and routed experts,
        # the FFN split into small experts (§3, Fig. 3). Counts, widths and top-k are ours (the
        # paper gives none): Show-o's MLP stays as the dense part (exactly Show-o at step 0),
        # each group adds 1 shared + 4 routed experts of 256 (1/32 of the MLP), top-2
        token_moe=True, dense_ffn=8192, shared_experts=1, routed_experts=4, expert_ffn=256,
        top_k=2, balance_coef=0.01,
        # sequence-level MoE after the token MoE, MMU: copy/CLIP/face, T2I: copy/zero/noise,
        # top-2 (§3 and its ablation); CLIP ViT-L/14 projections (768) and AntelopeV2 face
        # embeddings (512, InsightFace glintr100) are ours, the encoders Show-o / the paper name
        seq_moe=True, seq_top_k=2, semantic_dim=768, identity_dim=512, seq_balance_coef=0.01,
        # D3Diff α = 0.01 (Table 3); L = L_MMU + L_D3Diff (+ balance), weights 1 (§3); Show-o's
        # cosine mask schedule and 10 % prompt drop for guidance
        alpha=0.01, w_ce=1.0, w_t2i=1.0, w_mmu=1.0, schedule="cosine", cond_drop=0.1,
    ),
}  # fmt: skip


def get_config(name: str, **overrides) -> ModelConfig:
    """A registered config with ``overrides`` applied (unknown keys raise)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)}")
    return ModelConfig.from_dict({**CONFIGS[name], **overrides}, where=f"config {name!r}")


def parameter_count(cfg: ModelConfig) -> dict:
    """Parameters by part, and those active per token (top-k of the routed experts), from the
    config alone (no model is built, so ``full`` is cheap to count)."""
    D, L, V = cfg.d_model, cfg.n_layers, cfg.vocab_size
    attn = 4 * D * D + 4 * D + cfg.qk_norm * 4 * cfg.head_dim
    norm = 2 * D
    fu = 2 if cfg.moe_activation == "silu_glu" else 1
    if cfg.token_moe:
        G = 2
        per_expert = (fu + 1) * cfg.expert_ffn * D
        routed = G * cfg.routed_experts * per_expert
        shared = G * cfg.shared_experts * per_expert
        router = D * G * cfg.routed_experts
        fd = 2 if cfg.activation == "silu_glu" else 1
        dense = cfg.dense_ffn and (fd + 1) * cfg.dense_ffn * D + fd * cfg.dense_ffn + D
        mlp = routed + shared + router + dense
        mlp_active = (cfg.top_k + cfg.shared_experts) * per_expert + router + dense
    else:
        fu = 2 if cfg.activation == "silu_glu" else 1
        mlp = mlp_active = (fu + 1) * cfg.d_ff * D + (fu * cfg.d_ff + D)
    seq = 0
    if cfg.seq_moe:
        seq = (
            2 * 4 * D
            + (cfg.semantic_dim + cfg.identity_dim) * D
            + 2 * (D * D + D)
            + 2 * D
            + 4 * D
            + 2
        )
    blocks = L * (attn + norm + mlp + seq)
    embed = V * D + cfg.image_pos_embed * cfg.image_tokens * D + cfg.code_vector_dim * D
    head = V * D + V + norm
    proj = cfg.mm_projector_dim and (cfg.mm_projector_dim * D + D + D * D + D)
    embed += proj
    total = blocks + embed + head
    active = L * (attn + norm + mlp_active + seq) + embed + head
    return {
        "total": total,
        "active_per_token": active,
        "embedding": embed,
        "head": head,
        "blocks": blocks,
    }
