"""The small types that cross the MoE family's layers: :class:`RouteOptions` (what the routing
launchers are asked for), :class:`MoERouting` (what routing returns) and :class:`MoEPlan` (the
expert-sorted order every later kernel reads)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class RouteOptions(NamedTuple):
    """The routing choices a ``moe.route`` launcher receives (contract §1): top_k; scoring
    "softmax" | "sigmoid"; renormalize; n_group, topk_group (0 = off); scaling."""

    top_k: int
    scoring: str
    renormalize: bool
    n_group: int
    topk_group: int
    scaling: float


class MoEPlan(NamedTuple):
    """Expert-sorted order of the N = T·k slots (contract §3; every tensor int32).

    counts [E], offsets [E+1], sorted_slot [N] (position → slot t·k + j), slot_pos [N] (slot →
    position), tile_expert / tile_row [N // block_m + E] (empty when block_m = 0), top_k, block_m.

    ``source`` / ``source_version``: the ids tensor the plan was made from and its version counter
    at that time (None / -1 when unknown, e.g. a plan made while tracing). ``moe_mlp`` uses them to
    accept a plan of the very ids it is given without re-checking it.
    """

    counts: torch.Tensor
    offsets: torch.Tensor
    sorted_slot: torch.Tensor
    slot_pos: torch.Tensor
    tile_expert: torch.Tensor
    tile_row: torch.Tensor
    top_k: int
    block_m: int
    source: torch.Tensor | None = None
    source_version: int = -1

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self[:6]


class MoERouting(NamedTuple):
    """What :func:`moe_route` returns with ``return_stats=True``.

    topk_ids int64 [T, k]; topk_weights float32 [T, k]; expert_counts int32 [E] (slots per
    expert); prob_sums float32 [E] (Σ over the group's tokens of each expert's routing
    probability; differentiable, feeds :func:`moe_balance_loss`).
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    expert_counts: torch.Tensor
    prob_sums: torch.Tensor
