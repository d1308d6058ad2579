"""UniF2ace through the trainer: kill and resume reproduces the loss curve, and 2-process DDP /
FSDP2 on CPU give the loss of one process at the same global batch."""

from __future__ import annotations

import pytest
import torch

import train_model_worker as w
from conftest import GLOO, torchrun_two_cpu_processes
from unif2ace.models import UniF2ace, collate
from unif2ace.train import TrainConfig, train


def test_kill_and_resume_gives_the_same_loss_curve(tmp_path):
    full = w.run(tmp_path / "full", steps=6)
    w.run(tmp_path / "killed", steps=6, stop_after=3)  # "killed" after step 3 (checkpoint at 2)
    resumed = w.run(tmp_path / "killed", steps=6)
    assert resumed["resumed_from"] is not None
    assert resumed["losses"] == full["losses"]


def test_compiled_training_follows_the_eager_curve(tmp_path):
    """``train.compile``: the recipes' loss under torch.compile (Inductor) trains on batches of
    other lengths and layouts step after step, on the eager run's loss curve to rounding."""
    torch._dynamo.reset()
    try:
        compiled = w.run(tmp_path / "compiled", steps=4, compile=True)
    finally:
        torch._dynamo.reset()
    eager = w.run(tmp_path / "eager", steps=4)
    torch.testing.assert_close(compiled["losses"], eager["losses"], rtol=1e-4, atol=1e-6)


def test_compile_with_fsdp2_is_refused(tmp_path):
    with pytest.raises(ValueError, match="train.compile.*FSDP2"):
        TrainConfig(out=str(tmp_path), parallel="fsdp2", compile=True)


def test_resume_with_another_model_config_fails(tmp_path):
    w.run(tmp_path / "a", steps=2)
    cfg = w.model_config()
    cfg.d_model = 64
    with pytest.raises(ValueError, match="another config.*d_model"):
        train(
            UniF2ace(cfg),
            w.make_dataset(cfg),
            lambda b: collate(cfg, b),
            w.loss_fn,
            TrainConfig(out=str(tmp_path / "a"), steps=4, batch_size=8, progress=False),
            model_config=cfg.to_dict(),
        )


@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, parallel):
    multi = torchrun_two_cpu_processes(
        "train_model_worker.py", tmp_path / "result.json", tmp_path / parallel, parallel, 4
    )
    single = w.run(tmp_path / "single", steps=4)
    assert multi["world_size"] == 2
    torch.testing.assert_close(multi["losses"], single["losses"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
def test_two_processes_compiled_match_one(tmp_path):
    """``train.compile`` under DDP (torch.compile of the DDP-wrapped model): the 2-process loss
    curve is the eager single process's."""
    multi = torchrun_two_cpu_processes(
        "train_model_worker.py", tmp_path / "result.json", tmp_path / "ddp", "ddp", 4, "compile"
    )
    single = w.run(tmp_path / "single", steps=4)
    assert multi["world_size"] == 2
    torch.testing.assert_close(multi["losses"], single["losses"], rtol=1e-4, atol=1e-6)
