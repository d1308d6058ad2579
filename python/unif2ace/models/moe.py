"""The two MoE levels of UniF²ace (paper Fig. 3), as thin modules over the public ops.

* :class:`TokenMoE` — token-level grouped MoE. Two task groups (0 understanding, 1 generation),
  each with ``shared_experts`` always-on experts and ``routed_experts`` routed ones, top-k within the
  token's group: :func:`~unif2ace.ops.moe_route` → :func:`~unif2ace.ops.moe_mlp` (grouped GEMM) +
  :func:`~unif2ace.ops.moe_shared_experts`, balance loss per group.
* :class:`SequenceMoE` — sequence-level MoE: one routing decision per *sequence* (mean-pooled
  hidden state), top-2 of four experts of the sequence's task group:

  - understanding: Copy, Copy, CLIP, Face — ``E(x) = x`` or the embedding experts
    ``E(x) = w·x + (1 − w)·R(e)``, with ``e`` the image's semantic (CLIP stand-in) or identity
    (face-recognition stand-in) embedding, ``R`` a small two-layer resampler to ``d_model`` and
    ``w = sigmoid(learned scalar)``;
  - generation: Copy, Copy, Zero, Noise — ``E(x) = x``, ``0``, or ``x + σ·ε`` (ε ~ N(0, I) while
    training; the identity at inference, like dropout). There is no image to embed when
    generating, so this group gets regularising experts instead.

  Every expert is a per-sequence affine map of x, so the mixture is computed as
  ``y = a_b · x + c_b (+ noise)`` per sequence b, without materialising four expert outputs.
* :class:`DenseMLP` — Phi-1.5's MLP (fc1 → gelu_new → fc2), used when token MoE is off.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from unif2ace import ops
from unif2ace.ops.moe.reference import activate

N_GROUPS = 2  # 0: understanding, 1: generation
SEQ_EXPERTS = 4  # per group
# expert slots of the sequence-level MoE: understanding 0..3, generation 4..7
COPY_SLOTS = (0, 1, 4, 5)
CLIP_SLOT, FACE_SLOT, ZERO_SLOT, NOISE_SLOT = 2, 3, 6, 7


class DenseMLP(nn.Module):
    def __init__(self, cfg, width: int | None = None):
        super().__init__()
        fu = 2 if cfg.activation == "silu_glu" else 1
        width = width or cfg.d_ff
        self.fc1 = nn.Linear(cfg.d_model, fu * width)
        self.fc2 = nn.Linear(width, cfg.d_model)
        self.activation = cfg.activation

    def forward(
        self, x: torch.Tensor, group_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc2(activate(self.fc1(x), self.activation)), x.new_zeros(())


class TokenMoE(nn.Module):
    """x ``[T, D]``, group_ids ``[T]`` → (y ``[T, D]``, balance loss).

    With ``cfg.dense_ffn > 0`` a dense MLP (:class:`DenseMLP`, with biases) that every token goes
    through is added to the experts' output: ``y = dense(x) + shared_g(x) + Σ_topk w·E(x)``."""

    def __init__(self, cfg):
        super().__init__()
        D, F_, N, S = cfg.d_model, cfg.expert_ffn, cfg.routed_experts, cfg.shared_experts
        fu = 2 if cfg.moe_activation == "silu_glu" else 1
        self.cfg = cfg
        self.router = nn.Linear(D, N_GROUPS * N, bias=False)
        self.w_up = nn.Parameter(torch.empty(N_GROUPS * N, fu * F_, D))
        self.w_down = nn.Parameter(torch.empty(N_GROUPS * N, D, F_))
        self.shared_up = nn.Parameter(torch.empty(N_GROUPS * S, fu * F_, D)) if S else None
        self.shared_down = nn.Parameter(torch.empty(N_GROUPS * S, D, F_)) if S else None
        self.dense = DenseMLP(cfg, cfg.dense_ffn) if cfg.dense_ffn else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in (self.w_up, self.w_down, self.shared_up, self.shared_down):
            if w is not None:
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[-1]))
        nn.init.normal_(self.router.weight, std=0.02)

    def forward(self, x: torch.Tensor, group_ids: torch.Tensor):
        cfg = self.cfg
        logits = self.router(x).float()  # [T, G·N]
        r = ops.moe_route(
            logits,
            cfg.top_k,
            group_ids=group_ids,
            experts_per_group=cfg.routed_experts,
            return_stats=True,
        )
        y = ops.moe_mlp(
            x,
            self.w_up,
            self.w_down,
            r.topk_ids,
            r.topk_weights.to(x.dtype),
            activation=cfg.moe_activation,
        )
        if self.dense is not None:
            y = y + self.dense(x, group_ids)[0]
        if self.shared_up is not None:
            y = y + ops.moe_shared_experts(
                x,
                self.shared_up,
                self.shared_down,
                group_ids=group_ids,
                experts_per_group=cfg.shared_experts,
                activation=cfg.moe_activation,
            )
        aux = ops.moe_balance_loss(
            r.expert_counts,
            r.prob_sums,
            cfg.top_k,
            experts_per_group=cfg.routed_experts,
            coef=cfg.balance_coef,
        )
        if cfg.z_loss_coef > 0:
            aux = aux + ops.moe_z_loss(
                logits,
                group_ids=group_ids,
                experts_per_group=cfg.routed_experts,
                coef=cfg.z_loss_coef,
            )
        return y, aux


class Resampler(nn.Module):
    """R(e): an embedding of another encoder → a ``d_model`` vector (two layers, GELU, LayerNorm).

    ``e`` arrives standardised per entry by :meth:`UniF2ace.standardize_embeddings` (the encoders'
    unit vectors share one large mean direction); the output is LayerNormed (RMS ~ 1) and
    :class:`SequenceMoE` scales it to the RMS of the sequence's own token-MoE output."""

    def __init__(self, d_in: int, d_model: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_model), nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc2(F.gelu(self.fc1(e))))


class SequenceMoE(nn.Module):
    """m ``[B, L, D]`` (the token MoE's output), valid ``[B, L]``, task ``[B]`` (0/1), semantic
    ``[B, semantic_dim]`` and identity ``[B, identity_dim]`` embeddings, standardised (needed for
    understanding rows; zeros are used where missing) → (y ``[B, L, D]``, balance loss)."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.cfg = cfg
        self.router = nn.Linear(D, N_GROUPS * SEQ_EXPERTS, bias=False)
        nn.init.normal_(self.router.weight, std=0.02)
        self.clip = Resampler(cfg.semantic_dim, D)
        self.face = Resampler(cfg.identity_dim, D)
        self.mix = nn.Parameter(torch.zeros(2))  # logit of w for the CLIP and Face experts

    def mixture(self, m, valid, task, semantic=None, identity=None):
        """Per sequence ``(a [B], c [B, D], noise gate [B], balance loss)`` with
        ``y = a·m + c (+ noise gate·σ·ε)``; cached by the decoder for the tokens it appends."""
        cfg = self.cfg
        B, L, D = m.shape
        vf = valid.to(m.dtype)[..., None]
        pooled = (m * vf).sum(1) / vf.sum(1).clamp(min=1.0)  # [B, D]
        r = ops.moe_route(
            self.router(pooled).float(),
            cfg.seq_top_k,
            group_ids=task,
            experts_per_group=SEQ_EXPERTS,
            return_stats=True,
        )
        gate = m.new_zeros(B, N_GROUPS * SEQ_EXPERTS).scatter(
            1, r.topk_ids, r.topk_weights.to(m.dtype)
        )
        w = torch.sigmoid(self.mix).to(m.dtype)
        if semantic is None:
            semantic = m.new_zeros(B, cfg.semantic_dim)
        if identity is None:
            identity = m.new_zeros(B, cfg.identity_dim)
        copy = gate[:, list(COPY_SLOTS)].sum(1) + gate[:, NOISE_SLOT]
        a = copy + gate[:, CLIP_SLOT] * w[0] + gate[:, FACE_SLOT] * w[1]  # [B]
        # R(e) comes out LayerNormed (RMS ~ 1); scaled to the RMS of the sequence's own ``m``,
        # as ``w·x + (1−w)·R(e)`` mixes like with like (unscaled, R(e) was a small fraction of the
        # residual stream and a tiny model trained on VQA never learned to read it)
        scale = (m.float().pow(2).mean(-1, keepdim=True) * vf).sum(1) / vf.sum(1).clamp(min=1.0)
        scale = scale.sqrt().to(m.dtype).detach()  # [B, 1]
        c = scale * (
            gate[:, CLIP_SLOT, None] * (1 - w[0]) * self.clip(semantic.to(m.dtype))
            + gate[:, FACE_SLOT, None] * (1 - w[1]) * self.face(identity.to(m.dtype))
        )  # [B, D]
        aux = ops.moe_balance_loss(
            r.expert_counts,
            r.prob_sums,
            cfg.seq_top_k,
            experts_per_group=SEQ_EXPERTS,
            coef=cfg.seq_balance_coef,
        )
        return a, c, gate[:, NOISE_SLOT], aux

    def forward(self, m, valid, task, semantic=None, identity=None):
        a, c, noise_gate, aux = self.mixture(m, valid, task, semantic, identity)
        y = a[:, None, None] * m + c[:, None, :]
        if self.training and self.cfg.noise_std > 0:
            y = y + (noise_gate * self.cfg.noise_std)[:, None, None] * torch.randn_like(m)
        return y, aux
