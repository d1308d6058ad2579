"""The toy problem of tests/test_train.py, and its ``torchrun`` entry point.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train_worker.py \
        OUT PARALLEL STEPS BATCH ACCUM RESULT_JSON
"""

import json
import os
import sys

import torch
from torch import nn

from unif2ace.train import TrainConfig, train

N_ITEMS, D_IN, D = 64, 8, 16


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):  # [B, D]
        return x + torch.tanh(self.fc(self.norm(x)))


class ToyMLP(nn.Module):
    """embed -> 2 residual blocks -> norm -> head: a regression of one number."""

    def __init__(self, d_in=D_IN, d=D, depth=2):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 1)

    def shard_units(self):
        return list(self.blocks)

    def forward(self, x):  # [B, D_IN] -> [B]
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.norm(h)).sum(-1)  # not squeeze: FSDP2 warns on a view output


def make_dataset(n=N_ITEMS, seed=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D_IN, generator=g)
    y = torch.sin(x @ torch.randn(D_IN, generator=g))
    return [(x[i], y[i]) for i in range(n)]


def collate(items):
    return {
        "x": torch.stack([a for a, _ in items]),
        "y": torch.stack([b for _, b in items]),
        "num_tokens": len(items),
    }


def loss_fn(model, batch, step):
    pred = model(batch["x"])
    loss = torch.nn.functional.mse_loss(pred, batch["y"])
    return loss, {"mae": (pred - batch["y"]).abs().mean().item()}


def make_model(seed=0):
    torch.manual_seed(seed)
    return ToyMLP()


def base_config(out, **kw):
    kw = {
        "out": str(out),
        "steps": 12,
        "batch_size": 8,
        "lr": 3e-2,
        "warmup_steps": 3,
        "clip_grad_norm": 0.5,  # small enough to clip: the clip is part of what is compared
        "log_every": 1,
        "ckpt_every": 3,
        "progress": False,
        **kw,
    }
    return TrainConfig(**kw)


def run(out, model_config=None, stop_after=None, **kw):
    """One in-process training into ``out`` (``base_config`` with ``kw``)."""
    return train(
        make_model(),
        make_dataset(),
        collate,
        loss_fn,
        base_config(out, **kw),
        model_config=model_config if model_config is not None else {"d": D},
        stop_after=stop_after,
    )


def main(argv):
    out, parallel, steps, batch, accum, result = argv
    torch.set_num_threads(1)
    cfg = base_config(
        out, parallel=parallel, steps=int(steps), batch_size=int(batch), grad_accum=int(accum)
    )
    res = train(make_model(), make_dataset(), collate, loss_fn, cfg, model_config={"d": D})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as f:
            json.dump(res, f)


if __name__ == "__main__":
    main(sys.argv[1:])
    # leave without interpreter teardown: gloo's threads can abort the process at exit
    # ("terminate called without an active exception", seen once in CI after a correct run)
    sys.stdout.flush()
    os._exit(0)
