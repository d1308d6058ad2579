"""The generic trainer: config loading, LR schedule, exact kill-and-resume, atomic checkpoints,
grad accumulation, and DDP / FSDP2 under torchrun (gloo on CPU) against one process."""

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import train_worker as tw
from conftest import GLOO, torchrun_two_cpu_processes
from unif2ace.train import (
    TrainConfig,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_config,
    load_sections,
    lr_at,
    merge_dataclass,
    train,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, model_config=None, stop_after=None, **kw):
    return tw.run(out, model_config, stop_after, **kw)


def _log_losses(out):
    return [json.loads(s)["loss"] for s in (Path(out) / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# config


@dataclass
class _Inner:
    width: int = 4
    ratio: float = 0.5


@dataclass
class _ModelCfg:
    dim: int = 8
    name: str = "tiny"
    inner: _Inner = field(default_factory=_Inner)
    heads: int | None = None


def test_config_yaml_and_overrides(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("steps: 50\nlr: 1e-3\nbetas: [0.8, 0.9]\nprogress: false\n")
    cfg = load_config(p, ["batch_size=32", "warmup_steps=5", "amp=bf16"])
    assert cfg.steps == 50 and cfg.lr == 1e-3 and cfg.betas == (0.8, 0.9)
    assert cfg.batch_size == 32 and cfg.warmup_steps == 5 and cfg.amp == "bf16"
    assert cfg.progress is False and cfg.seed == TrainConfig().seed
    assert load_config(None, ["lr=2"]).lr == 2.0  # an int is a fine float


def test_config_sections_and_nested(tmp_path):
    p = tmp_path / "run.yaml"
    p.write_text("train:\n  steps: 7\nmodel:\n  dim: 16\n  inner:\n    width: 3\n")
    both = load_sections(
        p, ["model.inner.ratio=0.25", "train.lr=0.1"], {"train": TrainConfig, "model": _ModelCfg}
    )
    assert both["train"].steps == 7 and both["train"].lr == 0.1
    assert both["model"] == _ModelCfg(dim=16, inner=_Inner(width=3, ratio=0.25))
    m = load_config(p, ["model.heads=2"], cls=_ModelCfg, section="model")
    assert m.dim == 16 and m.heads == 2
    with pytest.raises(ValueError, match="unknown section 'modle'.*'model'"):
        load_sections(p, ["modle.dim=3"], {"train": TrainConfig, "model": _ModelCfg})


def test_config_unknown_key(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'lerning_rate'") as e:
        load_config(None, ["lerning_rate=0.1"])
    with pytest.raises(ValueError, match=r"unknown key 'stpes'.*did you mean 'steps'") as e:
        p = tmp_path / "t.yaml"
        p.write_text("stpes: 3\n")
        load_config(p, [])
    assert "t.yaml" in str(e.value)
    with pytest.raises(ValueError, match=r"inner\b.*unknown key 'widht'.*'width'"):
        merge_dataclass(_ModelCfg, {"inner": {"widht": 2}}, where="model")


@pytest.mark.parametrize(
    "item, msg",
    [
        ("steps=1.5", r"TrainConfig\.steps: expected an int, got 1.5"),
        ("steps=true", r"steps: expected an int"),
        ("lr=fast", r"lr: expected a float, got 'fast'"),
        ("progress=1", r"progress: expected a bool"),
        ("out=3", r"out: expected a string"),
        ("betas=[0.9]", r"betas: expected 2 items"),
        ("amp=fp8", r"amp='fp8': expected one of"),
        ("steps", r"not key=value"),
    ],
)
def test_config_bad_values(item, msg):
    with pytest.raises(ValueError, match=msg):
        load_config(None, [item])


# ---------------------------------------------------------------------------------------------
# schedule


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(130)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))  # warm-up rises
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # cosine falls
    assert lrs[60] == pytest.approx(0.55)  # half-way: the mean of lr and min
    assert lrs[110] == pytest.approx(0.1) and lrs[129] == pytest.approx(0.1)
    assert lr_at(0, TrainConfig(steps=5, lr=2.0, warmup_steps=0)) == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------------
# resume, checkpoints


def test_kill_and_resume_is_exact(tmp_path):
    full = _run(tmp_path / "full")
    assert full["step"] == 12 and len(full["losses"]) == 12
    assert full["losses"][-1] < full["losses"][0]

    killed = _run(tmp_path / "killed", stop_after=7)
    assert killed["step"] == 7
    assert [s for s, _ in list_checkpoints(tmp_path / "killed")] == [3, 6]  # no step-7 one
    assert killed["losses"] == full["losses"][:7]

    resumed = _run(tmp_path / "killed")
    assert resumed["resumed_from"] == 6
    assert resumed["losses"] == full["losses"]  # exact, not approximate
    # the killed run's step-7 log line was superseded: one entry per step, equal to the full run
    assert _log_losses(tmp_path / "killed") == _log_losses(tmp_path / "full") == full["losses"]
    a = load_checkpoint(tmp_path / "full")["model"]
    b = load_checkpoint(tmp_path / "killed")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_atomic_checkpoint_ignores_partial(tmp_path):
    out = tmp_path / "run"
    _run(out, stop_after=7)  # checkpoints at 3 and 6
    root = out / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_0000006"
    # a killed write: a temp dir, and a later step folder without its COMPLETE marker
    shutil.copytree(root / "step_0000006", root / ".tmp_step_0000009.12345")
    partial = root / "step_0000009"
    shutil.copytree(root / "step_0000006", partial)
    (partial / "COMPLETE").unlink()
    (partial / "model.safetensors").write_bytes(b"torn")
    assert latest_checkpoint(out) == root / "step_0000006"
    with pytest.raises(FileNotFoundError, match="COMPLETE"):
        load_checkpoint(partial)

    res = _run(out)
    assert res["resumed_from"] == 6 and res["step"] == 12
    assert not (root / ".tmp_step_0000009.12345").exists()
    ck = latest_checkpoint(out)
    assert ck == root / "step_0000012" and (ck / "COMPLETE").is_file()
    assert (root / "latest").read_text().strip() == "step_0000012"
    assert [s for s, _ in list_checkpoints(out)] == [9, 12]  # keep_checkpoints=2


def test_resume_with_another_model_config(tmp_path):
    _run(tmp_path, stop_after=4)  # checkpoint at 3
    with pytest.raises(ValueError, match="another config: key d differs"):
        _run(tmp_path, model_config={"d": 32})
    with pytest.raises(ValueError, match="key extra differs"):
        _run(tmp_path, model_config={"d": tw.D, "extra": 1})


def test_grad_accum_matches_one_batch(tmp_path):
    one = _run(tmp_path / "a1", steps=6, grad_accum=1)
    two = _run(tmp_path / "a2", steps=6, grad_accum=2)
    four = _run(tmp_path / "a4", steps=6, grad_accum=4)
    torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(four["losses"], one["losses"], rtol=1e-6, atol=1e-7)


def test_bad_batch_split(tmp_path):
    with pytest.raises(ValueError, match="divisible by world_size\\*grad_accum = 1\\*3"):
        _run(tmp_path, grad_accum=3)


def test_eval_fn_and_metrics(tmp_path):
    cfg = tw.base_config(tmp_path, steps=6, log_every=2)
    seen = []

    def eval_fn(model, step):
        assert not model.training and not torch.is_grad_enabled()
        seen.append(step)
        return {"val": float(step)}

    res = train(tw.make_model(), tw.make_dataset(), tw.collate, tw.loss_fn, cfg, eval_fn=eval_fn)
    assert seen == [3, 6] and res["eval"] == {"val": 6.0}
    assert res["tokens_per_s"] > 0
    log = [json.loads(s) for s in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 3, 4, 6]
    assert "mae" in log[0]["metrics"] and log[1]["eval"] == {"val": 3.0}


# ---------------------------------------------------------------------------------------------
# torchrun: 2 processes (gloo) against 1 process at the same global batch


@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_two_processes_match_one(tmp_path, parallel):
    steps, batch, accum = 5, 8, 2
    multi = torchrun_two_cpu_processes(
        "train_worker.py",
        tmp_path / "result.json",
        tmp_path / parallel,
        parallel,
        steps,
        batch,
        accum,
    )
    assert multi["world_size"] == 2 and multi["parallel"] == parallel

    single = _run(tmp_path / "single", steps=steps, batch_size=batch)
    torch.testing.assert_close(multi["losses"], single["losses"], rtol=1e-5, atol=1e-6)
    # rank 0 wrote a full checkpoint that one process loads
    ck = load_checkpoint(tmp_path / parallel, tw.make_model())
    assert ck["step"] == steps and ck["model_config"] == {"d": tw.D}
    ref = load_checkpoint(tmp_path / "single")["model"]
    for k, v in ref.items():
        torch.testing.assert_close(ck["model"][k], v, rtol=1e-4, atol=1e-5)


def test_bf16_autocast_on_cpu(tmp_path):
    res = _run(tmp_path, steps=2, amp="bf16")
    assert all(torch.isfinite(torch.tensor(res["losses"])))
