"""Show-o's attention rules as per-query key limits, for :func:`unif2ace.ops.omni_attention`.

Query ``i`` sees key ``j`` when ``j < limit[i]`` and ``key_valid[j]`` (and always itself):

* **t2i rows** (they hold ``<|t2i|>``): the text rows are causal (``limit = i + 1``); the rows from
  ``<|soi|>`` through ``<|eoi|>`` see the whole row (``limit = L``); no row sees a pad
  (``key_valid = ids != [PAD]``). Show-o's pad rows see the pads before them; here they see only
  themselves. No other row reads a pad, so every other row's output is the same.
* **MMU rows** (they start with ``<|mmu|>``): causal, and every query also sees everything up to and
  including the first ``<|eoi|>`` (``limit = max(i + 1, eoi + 1)``); all keys valid.

Every other row is plain causal. Positions are ``0 … L−1`` (Show-o counts the pads).
"""

from __future__ import annotations

import torch

from unif2ace.showo.vocab import ShowoVocab


def _first(mask: torch.Tensor, default: int) -> torch.Tensor:
    """Index of the first True per row, ``default`` where there is none."""
    L = mask.shape[1]
    idx = torch.arange(L, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, L).amin(1).masked_fill(~mask.any(1), default)


def attention_rule(
    input_ids: torch.Tensor, vocab: ShowoVocab
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(positions, limit, key_valid)``, each ``[B, L]``, of Show-o's rule for every row of
    ``input_ids [B, L]`` (see the module docstring)."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, L], got {list(input_ids.shape)}")
    B, L = input_ids.shape
    dev = input_ids.device
    idx = torch.arange(L, device=dev).expand(B, L)
    causal = idx + 1
    is_t2i = (input_ids == vocab.t2i).any(1, keepdim=True)
    is_mmu = (input_ids[:, :1] == vocab.mmu) if L else is_t2i
    # t2i: soi .. eoi inclusive see the whole row
    soi = _first(input_ids == vocab.soi, L)[:, None]
    eoi = _first(input_ids == vocab.eoi, L - 1)[:, None]
    in_image = (idx >= soi) & (idx <= eoi)
    t2i_limit = torch.where(in_image, L, causal)
    mmu_limit = torch.maximum(causal, eoi + 1)
    limit = torch.where(is_t2i, t2i_limit, torch.where(is_mmu, mmu_limit, causal))
    key_valid = ~(is_t2i & (input_ids == vocab.pad))
    return idx.contiguous(), limit.to(torch.int32), key_valid
