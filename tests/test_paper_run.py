"""UniF²ace fine-tuned from Show-o end to end through the ``unif2ace`` command, on miniature
released-layout checkpoints (Show-o, MAGVIT-v2 at its released size with random weights, a
Phi-style tokenizer, a small CLIP and a 112×112 face ONNX) and a miniature dataset in
UniF²aceD-1M's layout: ``init`` → ``tokenize-images`` → ``train`` (the loss goes down; a killed run
resumes on the same curve) → ``generate`` / ``answer`` / ``caption`` / ``evaluate``; and the
errors for a face model of another input size and a dataset with other field names."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from onnx_mini import tiny_face_onnx  # noqa: E402
from showo_mini import phi_reference, write_showo, write_tokenizer  # noqa: E402
from test_magvitv2 import random_state, write_checkpoint  # noqa: E402

from conftest import GLOO, torchrun_two_cpu_processes  # noqa: E402
from unif2ace import cli  # noqa: E402
from unif2ace.data.unif2aced import write_mini_unif2aced  # noqa: E402
from unif2ace.pipeline.paper import init_config, train_paper  # noqa: E402
from unif2ace.vq.magvitv2 import MagvitV2Config  # noqa: E402

SETS = ["model.expert_ffn=16", "model.routed_experts=4"]
TRAIN = [
    "train.steps=8", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=1",
    "train.ckpt_every=4", "train.log_every=1", "train.parallel=none",
]  # fmt: skip


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("parts")
    write_showo(root / "showo", phi_reference(), num_vq_tokens=16)  # 64 px
    write_tokenizer(root / "tok")
    write_checkpoint(root / "magvit", random_state(MagvitV2Config()), "model.safetensors")
    clip = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
        image_size=32, patch_size=16, projection_dim=12,
    )  # fmt: skip
    transformers.CLIPVisionModelWithProjection(clip).save_pretrained(root / "clip")
    tiny_face_onnx(root / "face.onnx", 112, dim=8)
    tiny_face_onnx(root / "face96.onnx", 96, dim=8)
    write_mini_unif2aced(root / "data", n_images=4, size=64)
    return root


def _cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def _init(parts, out, *extra):
    return _cli(
        "init", "--from-showo", parts / "showo", "--magvit", parts / "magvit", "--tokenizer",
        parts / "tok", "--clip", parts / "clip", "--face-onnx", parts / "face.onnx",
        "--out", out, "--quiet", "--set", *SETS, *TRAIN, *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def run(parts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert _init(parts, out) == 0
    assert _cli("tokenize-images", "--data", parts / "data", "--out", out, "--quiet") == 0
    return out


def test_init_writes_the_run(run, parts, capsys):
    meta = json.loads((run / "run.json").read_text())
    assert meta["kind"] == "unif2ace-from-showo" and meta["face_onnx"].endswith("face.onnx")
    cfg = init_config(run)
    assert cfg.layout == "showo" and cfg.dense_ffn == 128 and cfg.expert_ffn == 16
    assert (cfg.semantic_dim, cfg.identity_dim) == (12, 8)  # from the encoders
    assert (run / "features" / "train" / "manifest.json").is_file()


def test_train_lowers_the_loss_and_the_run_answers(run, parts, capsys):
    assert _cli("evaluate", "--out", run, "--model-dir", run / "init", "--quiet") == 2
    assert "tokenize-images --split test" in capsys.readouterr().err  # no test split here
    # held-out loss of the initial model on the training split, then train, then again
    before = _eval(run, run / "init", capsys)
    assert _cli("train", "--out", run, "--quiet") == 0
    log = [json.loads(x) for x in (run / "model" / "train" / "log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    after = _eval(run, run / "model", capsys)
    assert after["loss_t2i"] < before["loss_t2i"] and after["loss_mmu"] < before["loss_mmu"]
    # the fine-tuned run generates, answers and captions
    grid = run / "g.png"
    assert _cli("generate", "--out", run, "--prompt", "a smiling woman", "--steps", "2",
                "--grid", grid, "--quiet") == 0  # fmt: skip
    assert grid.is_file()
    capsys.readouterr()
    img = next((parts / "data" / "images").iterdir())
    assert _cli("answer", "--out", run, "--image", img, "--question", "hair?", "--quiet") == 0
    assert isinstance(json.loads(capsys.readouterr().out)["answers"][0]["answer"], str)
    assert _cli("caption", "--out", run, "--image", img, "--quiet") == 0


def test_answers_see_the_features_training_saw(run, monkeypatch):
    """``PaperPipeline.answer`` gives the model what ``tokenize-images`` cached for the image
    (its codes, and its CLIP and face embeddings unstandardised: the model standardises them),
    and the question in Show-o's words."""
    import numpy as np
    from PIL import Image

    from unif2ace.pipeline import paper as paper_mod
    from unif2ace.pipeline.features import FeatureCache

    seen = {}

    def spy(model, codes, questions, **kw):
        seen.update(codes=codes, questions=questions, **kw)
        return [[] for _ in questions]

    monkeypatch.setattr(paper_mod, "generate_text", spy)
    pipe = paper_mod.PaperPipeline(run, run / "init")
    feats = FeatureCache(run / "features" / "train")
    data = feats.check(feats.manifest["dataset_root"])
    img = np.asarray(Image.open(data.path(1)).convert("RGB"))
    pipe.answer([img], ["What is her hair like?"])
    assert torch.equal(seen["codes"], feats.codes[1:2].long())
    torch.testing.assert_close(seen["semantic"], feats.clip[1:2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(seen["identity"], feats.face[1:2], rtol=1e-4, atol=1e-5)
    assert seen["questions"] == [pipe.tok.encode("USER: \nWhat is her hair like? ASSISTANT:")]


def _eval(run, model_dir, capsys) -> dict:
    capsys.readouterr()
    code = _cli("evaluate", "--out", run, "--model-dir", model_dir, "--split", "train", "--quiet")
    assert code == 0
    return json.loads(capsys.readouterr().out)


def _copy_run(run, out):
    """A fresh run folder with ``run``'s initial model, features and recipe (no training)."""
    shutil.copytree(run / "init", out / "init")
    shutil.copytree(run / "features", out / "features")
    for name in ("run.json", "recipe.yaml"):
        shutil.copy(run / name, out / name)
    return out


def test_killed_run_resumes_on_the_same_curve(run, parts, tmp_path):
    """train_paper stopped after step 6 (its checkpoint: step 4) and run again gives the uninterrupted run's losses."""
    from unif2ace.pipeline.recipe import read_recipe

    recipe = read_recipe(run / "recipe.yaml")

    a, b = _copy_run(run, tmp_path / "a"), _copy_run(run, tmp_path / "b")
    whole = train_paper(a, recipe, progress=False)["losses"]
    train_paper(b, recipe, progress=False, stop_after=6)  # checkpoint at step 4
    resumed = train_paper(b, recipe, progress=False)
    assert resumed["resumed_from"] is not None
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(whole))


@pytest.mark.skipif(not GLOO, reason="torch.distributed with gloo is not available")
def test_two_process_fsdp2_equals_one_process(run, tmp_path):
    """The fine-tune from Show-o under FSDP2 on 2 processes (gloo; each rank materialises only
    its shards of ``init/``) gives the 1-process loss curve at the same global batch."""
    from unif2ace.pipeline.recipe import read_recipe

    one, two = _copy_run(run, tmp_path / "one"), _copy_run(run, tmp_path / "two")
    # the balance losses are statistics of each rank's batch (as in every MoE trainer) and the
    # noise expert draws per rank: without them, 2 ranks compute what 1 does
    for r in (one, two):
        conf = json.loads((r / "init" / "config.json").read_text())
        conf.update(balance_coef=0.0, seq_balance_coef=0.0, noise_std=0.0)
        (r / "init" / "config.json").write_text(json.dumps(conf))
    single = train_paper(one, read_recipe(run / "recipe.yaml"), progress=False)["losses"]
    res = torchrun_two_cpu_processes("paper_worker.py", tmp_path / "r.json", two)
    assert len(res["losses"]) == len(single) == 8
    torch.testing.assert_close(
        torch.tensor(res["losses"]), torch.tensor(single), rtol=1e-4, atol=1e-5
    )
    loaded = res["loaded"]
    assert loaded["local_numel"] < 0.55 * loaded["numel"]  # rank 0 holds about half


def test_bad_inputs_are_named(parts, tmp_path, capsys):
    # a face model of another input size: refused at init
    code = _cli(
        "init", "--from-showo", parts / "showo", "--magvit", parts / "magvit", "--tokenizer",
        parts / "tok", "--face-onnx", parts / "face96.onnx", "--out", tmp_path / "r",
        "--quiet", "--set", *SETS,
    )  # fmt: skip
    assert code == 2 and "96×96" in capsys.readouterr().err
    # a dataset with other field names: refused at tokenize-images, naming the fields
    assert _init(parts, tmp_path / "r2") == 0
    data = tmp_path / "other"
    (data / "images").mkdir(parents=True)
    shutil.copy(parts / "data" / "images" / "00000.png", data / "images" / "00000.png")
    (data / "captions.jsonl").write_text(json.dumps({"picture": "images/00000.png", "t": "x"}))
    code = _cli("tokenize-images", "--data", data, "--out", tmp_path / "r2", "--quiet")
    err = capsys.readouterr().err
    assert code == 2 and "image" in err and "picture" in err
    # training before tokenize-images: says what to run
    assert _cli("train", "--out", tmp_path / "r2", "--quiet") == 2
    assert "tokenize-images" in capsys.readouterr().err
