"""Training that starts from a model folder (``TrainConfig.init_from``), with the model built on the
meta device: the weights after the start are the folder's, the loss curve is that of a model
built normally and loaded with them, two FSDP2 processes (each reading only its own shards) match
one process, a resumed run takes its checkpoint's weights and not the folder's, activation
checkpointing changes neither the loss nor the gradients, and a folder that does not fit the
model is refused before training, naming the tensor and the folder."""

from __future__ import annotations

import json
import math

import pytest
import sharded_worker as w
import torch
from safetensors.torch import load_file, save_file

from conftest import GLOO, torchrun_two_cpu_processes
from unif2ace.models import UniF2ace, collate
from unif2ace.train import TrainConfig, load_checkpoint, load_config, sharded


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for the whole module, its module-scoped runs included: a run with two
    threads sums in another order, and the curves compared here are equal to the bit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def init(tmp_path_factory):
    """A model folder (one safetensors file) and its state."""
    folder = tmp_path_factory.mktemp("init")
    return str(folder), w.write_init_folder(folder)


@pytest.fixture(scope="module")
def single(init, tmp_path_factory):
    """One process, meta model, started from the folder."""
    return w.run(tmp_path_factory.mktemp("single"), init_from=init[0])


def _equal_states(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# ---------------------------------------------------------------------------------------------
# one process


@pytest.mark.parametrize("shards", [1, 2])
def test_a_meta_model_gets_exactly_the_folders_weights(tmp_path, shards):
    state = w.write_init_folder(tmp_path / "init", shards)
    model = w.build(meta=True)
    assert sharded.on_meta(model)
    stats = sharded.materialize(
        model, torch.device("cpu"), sharded.folder_source(tmp_path / "init")
    )
    assert not sharded.on_meta(model)
    _equal_states(model.state_dict(), state)
    # the buffers no checkpoint holds are computed again (rotary frequencies)
    fresh = w.build(meta=False)
    for (name, b), ref in zip(model.named_buffers(), fresh.buffers()):
        if name.endswith("inv_freq"):
            assert torch.equal(b, ref), name
    assert stats.tensors == len(state) and stats.max_read_numel == max(
        v.numel() for v in state.values()
    )


def test_the_trainer_starts_from_the_folders_weights(tmp_path, init):
    folder, state = init
    model = w.build(meta=True)
    res = w.run(tmp_path, model=model, init_from=folder, steps=1, lr=0.0, ckpt_every=1)
    _equal_states(model.state_dict(), state)  # lr 0: the step changed nothing
    assert res["loaded"]["source"] == folder
    assert res["loaded"]["local_numel"] == res["loaded"]["numel"]


def test_meta_start_trains_like_a_built_model_loaded_with_the_weights(tmp_path, init, single):
    folder, state = init
    built = w.build(meta=False, seed=3)
    built.load_state_dict(state)
    plain = w.run(tmp_path / "plain", model=built)
    assert plain["loaded"] is None
    assert single["losses"] == plain["losses"]
    # a model built on a real device with init_from: loaded by the same loader
    loaded = w.run(tmp_path / "loaded", model=w.build(meta=False, seed=4), init_from=folder)
    assert loaded["loaded"] is not None and loaded["losses"] == plain["losses"]


def test_a_killed_run_resumes_from_its_checkpoint_not_the_folder(tmp_path, init, single):
    folder, _ = init
    w.run(tmp_path, init_from=folder, stop_after=3)  # "killed" after step 3 (checkpoint at 2)
    resumed = w.run(tmp_path, init_from=folder)
    assert resumed["resumed_from"] == 2
    assert resumed["loaded"]["source"].endswith("step_0000002/model.safetensors")
    assert resumed["losses"] == single["losses"]


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tmp_path, init):
    folder, state = init
    cfg = w.model_config()
    batch = collate(cfg, w.make_dataset(cfg)[:8])
    grads, calls = [], []
    for ac in (False, True):
        model = w.build(meta=False)
        model.load_state_dict(state)
        if ac:
            assert sharded.checkpoint_activations(model.shard_units()) == cfg.n_layers
            assert sharded.checkpoint_activations(model.shard_units()) == 0  # once only
        seen = []
        model.layers[0].input_layernorm.register_forward_hook(lambda *a, seen=seen: seen.append(1))
        loss, _ = w.loss_fn(model, batch, 0)
        loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        calls.append(len(seen))
        with torch.no_grad():  # evaluation does not recompute (nor checkpoint)
            w.loss_fn(model, batch, 0)
    assert calls == [1, 2]  # the block's forward ran again in backward
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-6, atol=1e-6, msg=k)
    on = w.run(tmp_path / "on", init_from=folder, activation_checkpointing=True)
    off = w.run(tmp_path / "off", init_from=folder)
    torch.testing.assert_close(on["losses"], off["losses"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# folders that do not fit


def _broken_folder(tmp_path, init, change) -> str:
    folder = tmp_path / "broken"
    folder.mkdir()
    state = load_file(f"{init[0]}/model.safetensors")
    change(state)
    save_file(state, str(folder / "model.safetensors"))
    return str(folder)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s.pop("layers.1.mlp.w_up"), r"missing 1 tensor\(s\): layers\.1\.mlp\.w_up"),
        (
            lambda s: s.update({"lm_head.bias": torch.zeros(3)}),
            r"of another shape: lm_head\.bias \(holds \[3\], the model has \[65\]\)",
        ),
        (lambda s: s.update({"extra.weight": torch.zeros(2)}), "does not have: extra.weight"),
    ],
    ids=["missing", "wrong_shape", "unexpected"],
)
def test_a_folder_that_does_not_fit_is_refused_before_training(tmp_path, init, change, message):
    folder = _broken_folder(tmp_path, init, change)
    with pytest.raises(ValueError, match=message) as e:
        w.run(tmp_path / "out", init_from=folder)
    assert str(e.value).startswith(f"{folder}: the weights do not fit the model")
    assert not (tmp_path / "out" / "log.jsonl").exists()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_a_meta_model_needs_weights_and_init_from_a_folder(tmp_path):
    with pytest.raises(ValueError, match="meta device.*set init_from"):
        w.run(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="init_from=.*nowhere.*not a folder"):
        w.run(tmp_path / "b", init_from=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        w.run(tmp_path / "c", init_from=str(tmp_path / "empty"))


def test_config_fields():
    cfg = load_config(None, ["init_from=runs/pre", "activation_checkpointing=true"])
    assert cfg.init_from == "runs/pre" and cfg.activation_checkpointing is True
    assert TrainConfig().init_from is None and TrainConfig().activation_checkpointing is False
    with pytest.raises(ValueError, match="init_from must be a model folder"):
        TrainConfig(init_from=" ")
    with pytest.raises(ValueError, match="activation_checkpointing: expected a bool"):
        load_config(None, ["activation_checkpointing=3"])


# ---------------------------------------------------------------------------------------------
# two processes (gloo): every scenario in one torchrun launch (tests/sharded_worker.py)


@pytest.fixture(scope="module")
def two(init, tmp_path_factory):
    if not GLOO:
        pytest.skip("torch.distributed with gloo is not available")
    root = tmp_path_factory.mktemp("two")
    torchrun_two_cpu_processes("sharded_worker.py", root / "result.json", root, init[0])
    ranks = [json.loads((root / f"result.json.rank{r}.json").read_text()) for r in (0, 1)]
    return root, ranks


@pytest.mark.parametrize("run", ["fsdp2", "fsdp2_ac", "ddp"])
def test_two_processes_from_the_folder_match_one(two, single, run):
    _, ranks = two
    for res in ranks:
        assert res[run]["world_size"] == 2 and res[run]["parallel"] == run.split("_")[0]
        torch.testing.assert_close(res[run]["losses"], single["losses"], rtol=1e-4, atol=1e-6)


def test_each_fsdp2_rank_reads_and_holds_only_its_shards(two, single):
    _, ranks = two
    shapes = [r["local_shapes"] for r in ranks]
    for name, (local0, full) in shapes[0].items():
        local1 = shapes[1][name][0]
        assert local0[1:] == local1[1:] == full[1:], name
        assert local0[0] + local1[0] == full[0], name  # the rows split between the ranks
        assert max(local0[0], local1[0]) == math.ceil(full[0] / 2), name
    largest = max(math.prod(full) for _, full in shapes[0].values())
    total = single["loaded"]["numel"]
    for r, res in enumerate(ranks):
        loaded = res["fsdp2"]["loaded"]
        assert loaded["numel"] == total
        # no rank read any whole sharded tensor, nor held much more than half of the model
        biggest_shard = max(math.prod(local) for local, _ in shapes[r].values())
        assert loaded["max_read_numel"] == biggest_shard < largest
        assert loaded["read_numel"] == loaded["local_numel"] < 0.52 * total
    # DDP: every rank reads (and holds) everything
    assert ranks[0]["ddp"]["loaded"]["local_numel"] == total


def test_two_process_resume_and_final_checkpoint(two, single):
    root, ranks = two
    resumed = ranks[0]["fsdp2_resume"]
    assert resumed["resumed_from"] == 2
    assert resumed["loaded"]["source"].endswith("step_0000002/model.safetensors")
    assert resumed["loaded"]["local_numel"] < 0.52 * resumed["loaded"]["numel"]
    torch.testing.assert_close(resumed["losses"], single["losses"], rtol=1e-4, atol=1e-6)
    # rank 0 wrote the full weights, which a plain model loads
    cfg = w.model_config()
    got = load_checkpoint(root / "fsdp2", UniF2ace(cfg))
    assert got["step"] == 4 and got["model_config"] == cfg.to_dict()
    want = load_checkpoint(single["checkpoint"])["model"]
    for k, v in want.items():
        torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_a_folder_one_rank_cannot_read_stops_every_rank(two):
    _, ranks = two
    assert ranks[0]["one_rank_fails"].startswith("RuntimeError: rank 1 could not start: ")
    assert ranks[1]["one_rank_fails"].startswith("FileNotFoundError: init_from=")
    assert "nowhere" in ranks[0]["one_rank_fails"]
