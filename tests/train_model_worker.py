"""UniF2ace through the trainer on a synthetic dataset, and its ``torchrun`` entry point:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/train_model_worker.py \
        OUT PARALLEL STEPS [compile] RESULT_JSON
"""

import functools
import json
import os
import sys

import torch

from model_data import examples
from unif2ace.models import ModelConfig, UniF2ace, collate
from unif2ace.pipeline.recipe import model_loss
from unif2ace.train import TrainConfig, train


def model_config():
    # noise_std 0: the noise expert's draw is the one thing not keyed by the sample
    return ModelConfig(
        text_vocab=40,
        codebook_size=23,
        image_tokens=9,
        max_text_len=6,
        d_model=32,
        n_layers=2,
        n_heads=4,
        expert_ffn=16,
        routed_experts=3,
        top_k=2,
        semantic_dim=5,
        identity_dim=4,
        noise_std=0.0,
        balance_coef=0.0,
        seq_balance_coef=0.0,
    ).validate()


def make_dataset(cfg, n=32, seed=3):
    return examples(cfg, n, seed)


loss_fn = functools.partial(model_loss, 5)  # the recipes' loss: eager layout work, dynamic sizes


def run(out, parallel="none", steps=6, stop_after=None, compile=False):
    cfg = model_config()
    torch.manual_seed(0)
    model = UniF2ace(cfg)
    tcfg = TrainConfig(
        out=str(out),
        steps=steps,
        batch_size=8,
        grad_accum=2,
        lr=3e-3,
        warmup_steps=2,
        log_every=1,
        ckpt_every=2,
        progress=False,
        parallel=parallel,
        compile=compile,
    )
    return train(
        model,
        make_dataset(cfg),
        functools.partial(collate, cfg),
        loss_fn,
        tcfg,
        model_config=cfg.to_dict(),
        stop_after=stop_after,
    )


if __name__ == "__main__":
    out, parallel, steps, *how, result = sys.argv[1:]
    torch.set_num_threads(1)
    res = run(out, parallel, int(steps), compile="compile" in how)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(result, "w") as f:
            json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo's threads can abort the process at exit
