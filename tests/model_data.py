"""Small synthetic UniF2ace configs and examples shared by the model tests and the torchrun
worker (tests/train_model_worker.py)."""

from __future__ import annotations

import torch

from unif2ace.models import Example, ModelConfig
from unif2ace.models.layout import TASK_MMU, TASK_T2I


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        text_vocab=50,
        codebook_size=37,
        image_tokens=16,
        max_text_len=9,
        d_model=32,
        n_layers=2,
        n_heads=4,
        d_ff=48,
        expert_ffn=24,
        routed_experts=3,
        top_k=2,
        semantic_dim=8,
        identity_dim=6,
    )
    base.update(kw)
    return ModelConfig(**base).validate()


def examples(cfg, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        codes = torch.randint(0, cfg.codebook_size, (cfg.image_tokens,), generator=g)
        text = torch.randint(9, cfg.text_vocab, (3 + i % 5,), generator=g).tolist()
        if i % 2:
            out.append(Example(TASK_T2I, codes, text, index=i))
        else:
            ans = torch.randint(9, cfg.text_vocab, (2 + i % 3,), generator=g).tolist()
            out.append(
                Example(
                    TASK_MMU,
                    codes,
                    text,
                    ans,
                    torch.randn(cfg.semantic_dim, generator=g),
                    torch.randn(cfg.identity_dim, generator=g),
                    index=i,
                )
            )
    return out


def small_recipe(steps: int = 2) -> list[str]:
    """``--set`` overrides for a seconds-long CLI training on a run folder (1 tiny layer)."""
    return [
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.expert_ffn=32",
        "model.max_text_len=48",
        f"train.steps={steps}",
        "train.batch_size=4",
        "train.ckpt_every=1",
        "train.log_every=1",
    ]
