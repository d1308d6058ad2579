"""UniF2ace started from a model folder (``TrainConfig.init_from``), for tests/test_sharded_start.py,
and its ``torchrun`` entry point, which runs every 2-process scenario in one launch (one process
group, several trainings) and writes each rank's results to ``RESULT.rank<r>.json``:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sharded_worker.py \
        OUT INIT_FOLDER RESULT_JSON
"""

import functools
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from model_data import examples
from unif2ace.models import UniF2ace, collate
from unif2ace.models.config import get_config
from unif2ace.train import TrainConfig, train


def model_config():
    # noise_std 0 and no balance losses: the loss of a global batch does not depend on how it
    # is split over ranks (see tests/train_model_worker.py). Odd row counts (the 41 + 23 + 1 = 65
    # rows of the embedding and the head, the 9 image positions) give uneven FSDP2 shards
    return get_config(
        "tiny",
        text_vocab=41,
        codebook_size=23,
        image_tokens=9,
        max_text_len=6,
        d_model=36,
        n_layers=2,
        n_heads=4,
        expert_ffn=15,
        routed_experts=3,
        top_k=2,
        semantic_dim=5,
        identity_dim=3,
        noise_std=0.0,
        balance_coef=0.0,
        seq_balance_coef=0.0,
    )


def make_dataset(cfg, n=32, seed=3):
    return examples(cfg, n, seed)


def loss_fn(model, batch, step):
    return model(batch, loss=True, step=step, seed=5)


def write_init_folder(folder, shards: int = 1) -> dict:
    """A "pretrained" model folder: a model of its own seed with non-default embedding statistics
    (persistent buffers the folder must carry), written by save_pretrained; with ``shards > 1``
    as ``model.safetensors.index.json`` and that many files instead. Returns its state."""
    cfg = model_config()
    torch.manual_seed(11)
    model = UniF2ace(cfg)
    model.fit_embedding_stats(torch.randn(20, cfg.semantic_dim), torch.randn(20, cfg.identity_dim))
    model.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if shards > 1:
        folder = Path(folder)
        (folder / "model.safetensors").unlink()
        names = sorted(state)
        weight_map = {}
        for i in range(shards):
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = names[i::shards]
            save_file({k: state[k].contiguous() for k in part}, str(folder / file))
            weight_map.update(dict.fromkeys(part, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return state


def build(meta: bool = True, seed: int = 0) -> UniF2ace:
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return UniF2ace(model_config())
    return UniF2ace(model_config())


def train_config(out, **kw) -> TrainConfig:
    kw = {
        "out": str(out),
        "steps": 4,
        "batch_size": 8,
        "grad_accum": 2,
        "lr": 3e-3,
        "warmup_steps": 2,
        "log_every": 1,
        "ckpt_every": 2,
        "progress": False,
        **kw,
    }
    return TrainConfig(**kw)


def run(out, model=None, stop_after=None, **kw):
    """One training into ``out``: ``model`` (default a fresh meta-device model), the train config
    of ``train_config(out, **kw)``."""
    cfg = model_config()
    return train(
        build() if model is None else model,
        make_dataset(cfg),
        functools.partial(collate, cfg),
        loss_fn,
        train_config(out, **kw),
        model_config=cfg.to_dict(),
        stop_after=stop_after,
    )


def scenarios(out: Path, init: str) -> dict:
    """Every 2-process run of the tests, keyed by name (each into its own folder)."""
    res = {}
    res["fsdp2"] = run(out / "fsdp2", init_from=init, parallel="fsdp2")
    res["fsdp2_ac"] = run(
        out / "fsdp2_ac", init_from=init, parallel="fsdp2", activation_checkpointing=True
    )
    run(out / "fsdp2_resume", init_from=init, parallel="fsdp2", stop_after=3)
    res["fsdp2_resume"] = run(out / "fsdp2_resume", init_from=init, parallel="fsdp2")
    res["ddp"] = run(out / "ddp", init_from=init, parallel="ddp")
    # a folder only rank 0 can read: both ranks fail before training, neither waits for the other
    try:
        bad = init if dist.get_rank() == 0 else str(out / "nowhere")
        run(out / "one_rank_fails", init_from=bad, parallel="fsdp2")
        res["one_rank_fails"] = "trained"
    except (RuntimeError, OSError) as e:
        res["one_rank_fails"] = f"{type(e).__name__}: {e}"
    # the shapes of this rank's shards after fully_shard of a meta model
    model = build()
    run(out / "fsdp2_shapes", model=model, init_from=init, parallel="fsdp2", steps=1)
    res["local_shapes"] = {
        k: [list(v.to_local().shape), list(v.shape)] for k, v in model.named_parameters()
    }
    return res


def main(argv):
    out, init, result = argv
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # held over every run below (train() leaves it as it is)
    rank = dist.get_rank()
    res = scenarios(Path(out), init)
    dist.barrier()
    dist.destroy_process_group()
    Path(f"{result}.rank{rank}.json").write_text(json.dumps(res))
    if rank == 0:
        Path(result).write_text(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo's threads can abort the process at exit
