"""The user's path end to end on a small SynthFace run folder: data → train → generate / answer /
caption / evaluate through the ``unif2ace`` command and :class:`Pipeline`, and the clear errors a
user gets for bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from model_data import small_recipe
from unif2ace.cli import main
from unif2ace.cli.data import check_redraw
from unif2ace.models.layout import TASK_MMU, TASK_T2I
from unif2ace.pipeline import Assets, Pipeline, UnifiedDataset, check_images, prepare_split


def _cli(command: str, out, options: str = "", *args) -> int:
    """``unif2ace COMMAND --out OUT OPTIONS... ARGS...``: ``options`` split at spaces, ``args``
    (paths, texts with spaces) as they are."""
    return main([command, "--out", str(out), *options.split(), *map(str, args)])


SMALL = small_recipe(steps=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    assert main(["data-all", "--out", str(root), "--num-images", "120", "--fast", "--quiet"]) == 0
    assert main(["train", "--out", str(root), "--quiet", "--set", *SMALL]) == 0
    return root


def test_train_writes_a_loadable_model_and_log(run):
    assert (run / "model" / "model.safetensors").is_file()
    log = [json.loads(x) for x in (run / "model" / "train" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(np.isfinite(e["loss"]) for e in log)
    # a second call resumes from the final checkpoint: nothing left to do, same model
    assert main(["train", "--out", str(run), "--quiet", "--set", *SMALL]) == 0


def test_pipeline_generate_answer_caption(run):
    pipe = Pipeline.load(run)
    faces = pipe.generate(["A person with short black hair and blue eyes."] * 2, steps=2, seed=0)
    assert faces.shape == (2, 64, 64, 3) and faces.dtype == np.uint8
    answers = pipe.answer(faces, ["What colour is the person's hair?", "Is the person smiling?"])
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert len(pipe.caption(faces[:1])) == 1


def test_cli_generate_answer_caption_evaluate(run, capsys):
    assert _cli("generate", run, "--per-prompt 2 --steps 2 --quiet", "--prompt", "A bald man.") == 0
    grid = run / "samples" / "generate.png"
    assert Image.open(grid).size[0] > 0
    img = run / "face.png"
    Image.open(next((run / "synthface" / "images" / "test").glob("*.png"))).save(img)
    assert _cli("answer", run, "", "--image", img, "--question", "Is the person smiling?") == 0
    assert _cli("caption", run, "", "--image", img) == 0
    assert _cli("evaluate", run, "--n-gen 4 --n-vqa 4 --n-cap 2 --steps 2 --quiet") == 0
    m = json.loads((run / "model" / "eval" / "metrics.json").read_text())
    assert {"generation", "vqa", "caption"} <= set(m)
    assert 0 <= m["generation"]["mean"] <= 1 and 0 <= m["vqa"]["accuracy"] <= 1
    assert (run / "model" / "eval" / "metrics.md").read_text().startswith("| metric |")
    # no generation asked: VQA and captions only (it crashed sizing an empty set of real faces)
    options = "--n-gen 0 --n-vqa 4 --n-cap 2 --quiet"
    assert _cli("evaluate", run, options, "--report", run / "vqa_only") == 0
    m = json.loads((run / "vqa_only" / "metrics.json").read_text())
    assert "generation" not in m and {"vqa", "caption"} <= set(m)


# ------------------------------------------------------------------------------------------------
# bad input


def test_empty_prompt_and_question_without_image(run):
    pipe = Pipeline.load(run)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pipe.generate(["a face", "  "])
    with pytest.raises(ValueError, match="needs an image"):
        pipe.answer(None, ["Is the person smiling?"])
    with pytest.raises(ValueError, match="question 0 is empty"):
        pipe.answer(np.zeros((64, 64, 3), np.uint8), [""])


def test_wrong_image_size_or_mode():
    with pytest.raises(ValueError, match="32x32 px.*64x64"):
        check_images(np.zeros((32, 32, 3), np.uint8), 64)
    with pytest.raises(ValueError, match="mode L, expected RGB"):
        check_images(Image.new("L", (64, 64)), 64)
    with pytest.raises(ValueError, match="uint8"):
        check_images(np.zeros((64, 64, 3), np.float32), 64)


def test_cli_errors(run, tmp_path, capsys):
    img = tmp_path / "small.png"
    Image.new("RGB", (32, 32)).save(img)
    assert main(["answer", "--out", str(run), "--image", str(img), "--question", "Why?"]) == 2
    assert "32x32" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--set", "model.d_modle=8"]) == 2
    assert "did you mean d_model" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--set", "trian.steps=3"]) == 2
    assert "unknown key 'trian'" in capsys.readouterr().err
    # a checkpoint of another config is refused, not loaded partially
    assert main(["train", "--out", str(run), "--quiet", "--set", *SMALL, "model.d_model=64"]) == 2
    assert "another config" in capsys.readouterr().err
    assert main(["evaluate", "--out", str(tmp_path / "nothing")]) == 2
    assert "data-all" in capsys.readouterr().err


def test_demo_fast(tmp_path):
    """The README's main job, as a smoke run (`unif2ace demo --fast`)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--fast", "--quiet"]) == 0
    report = (out / "demo" / "README.md").read_text()
    assert "| VQA exact match |" in report and "chance" in report
    assert Image.open(out / "demo" / "prompts_to_faces.png").size[0] >= 64


def test_training_is_reproducible(run, tmp_path):
    """train.seed fixes the whole run: the initial weights too (torch seeds its default generator
    at random in every process, so an unseeded init differed run to run), the data order, the
    masks and the noise. Another seed gives another run."""

    def losses(name, *extra):
        folder = tmp_path / name
        assert _cli("train", run, "--quiet", "--model-dir", folder, "--set", *SMALL, *extra) == 0
        log = (folder / "train" / "log.jsonl").read_text().splitlines()
        return [(e["loss"], e["grad_norm"]) for e in map(json.loads, log)]

    first = losses("a")
    assert losses("b") == first
    assert losses("c", "train.seed=1") != first


def test_ablate_writes_the_table(run):
    """`unif2ace ablate` on a subset: one model per variant, the variant's override applied, a
    table row each plus the chance row."""
    assert (
        _cli(
            "ablate",
            run,
            "--quiet",
            "--only",
            "0",
            "3",
            "--n-gen",
            "4",
            "--n-vqa",
            "4",
            "--n-cap",
            "2",
            "--set",
            *SMALL,
        )
        == 0
    )
    folder = run / "ablations"
    table = (folder / "table.md").read_text().splitlines()
    assert table[0].startswith("| variant |") and len(table) == 2 + 2 + 1
    assert table[2].startswith("| D3Diff") and table[3].startswith("| no token MoE")
    assert table[4].startswith("| chance |")
    assert set(json.loads((folder / "results.json").read_text())) == {
        "D3Diff (alpha=0.01)",
        "no token MoE",
    }
    assert json.loads((folder / "3" / "config.json").read_text())["token_moe"] is False
    assert json.loads((folder / "0" / "config.json").read_text())["token_moe"] is True


def test_unified_dataset_task_mix(run):
    assets = Assets(run)
    split = prepare_split(assets, "train", progress=False)
    n = len(split.ids)
    per_image = {}
    for i, *_rest in split.vqa:
        per_image[i] = per_image.get(i, 0) + 1
    base = UnifiedDataset(split, assets.tokenizer, vqa_per_image=1)
    twice = UnifiedDataset(split, assets.tokenizer, vqa_per_image=1, t2i_per_image=2)
    count = lambda ds, task, vqa: sum(t == task and bool(js) == vqa for t, _, js in ds.items)  # noqa: E731
    assert count(base, TASK_T2I, False) == n and count(twice, TASK_T2I, False) == 2 * n
    assert count(twice, TASK_MMU, False) == n  # one caption item per image
    assert count(twice, TASK_MMU, True) == sum(min(c, 1) for c in per_image.values())
    only = UnifiedDataset(split, assets.tokenizer, tasks=("caption",))
    assert len(only) == n and all(ex.task == TASK_MMU for ex in (only[0], only[n - 1]))
    with pytest.raises(ValueError, match="subset of t2i, caption, vqa"):
        UnifiedDataset(split, assets.tokenizer, tasks=("t2i", "captions"))
    with pytest.raises(ValueError, match="t2i_per_image"):
        UnifiedDataset(split, assets.tokenizer, t2i_per_image=0)
    with pytest.raises(ValueError, match="vqa_turns"):
        UnifiedDataset(split, assets.tokenizer, vqa_turns=0)


def test_unified_dataset_packs_an_images_questions_into_conversations(run):
    assets = Assets(run)
    split = prepare_split(assets, "train", progress=False)
    ds = UnifiedDataset(split, assets.tokenizer, vqa_per_image=None, tasks=("vqa",), vqa_turns=3)
    per_image: dict[int, list[int]] = {}
    for j, (i, *_rest) in enumerate(split.vqa):
        per_image.setdefault(i, []).append(j)
    assert len(ds) == sum(-(-len(js) // 3) for js in per_image.values())
    seen: dict[int, list[int]] = {}
    first_types = set()
    for n in range(len(ds)):
        _, i, js = ds.items[n]
        assert 1 <= len(js) <= 3 and all(split.vqa[j][0] == i for j in js)
        seen.setdefault(i, []).extend(js)
        first_types.add(split.vqa[js[0]][3])
        ex = ds[n]
        enc = assets.tokenizer.encode
        pairs = [(ex.prompt, ex.answer), *ex.turns]
        assert pairs == [(enc(split.vqa[j][1]), enc(split.vqa[j][2])) for j in js]
    assert {i: sorted(v) for i, v in seen.items()} == per_image  # each question once
    assert first_types == {"open", "yes_no"}  # SynthFace's order alternates; rows do not


def test_vq_perceptual_loss_uses_the_semantic_encoder(run, tmp_path):
    # data-all trains the encoders before the tokenizer, whose perceptual loss reads them
    info = json.loads((run / "vq" / "metrics.json").read_text())
    assert info["train"]["perceptual_weight"] == 0.2
    assert info["perceptual_encoder"] == str(run / "encoders" / "semantic")
    with pytest.raises(SystemExit, match="no model.safetensors"):
        _cli("train-vq", run, "--steps 1 --quiet", "--perceptual", tmp_path)


# ------------------------------------------------------------------------------------------------
# a model bound to the assets it was trained with; a cache that does not load is rebuilt


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("ablations", "samples", "vqa_only"))
    return dst


def test_model_is_bound_to_the_assets_it_was_trained_with(run, tmp_path, capsys):
    from unif2ace.pipeline.assets import AssetMismatch, check_model_assets

    bound = json.loads((run / "model" / "assets.json").read_text())["sha256"]
    names = {"text tokenizer", "image tokenizer", "semantic encoder", "identity encoder"}
    assert names | {"SynthFace data"} == set(bound)
    root = _copy_run(run, tmp_path)
    check_model_assets(root / "model", Assets(root))  # content, not paths: a copy verifies
    # another text tokenizer in the run folder: a resumed train and inference refuse, naming it
    assert _cli("train-text-tokenizer", root, "--vocab-size 500 --quiet") == 0
    capsys.readouterr()
    assert main(["train", "--out", str(root), "--quiet", "--set", *SMALL]) == 2
    err = capsys.readouterr().err
    assert "trained with another text tokenizer" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(AssetMismatch, match=r"model was trained with another text tokenizer"):
        check_model_assets(root / "model", Assets(root))
    with pytest.raises(AssetMismatch, match="another text tokenizer"):  # inference too
        Pipeline.load(root)
    assert _cli("caption", root, "--image", root / "synthface" / "meta.json") == 2
    assert "another text tokenizer" in capsys.readouterr().err
    # a new model folder trains on (and is bound to) the new assets
    assert _cli("train", root, "--quiet", "--model-dir", root / "model2", "--set", *SMALL) == 0
    check_model_assets(root / "model2", Assets(root))


def test_data_all_refuses_to_redraw_a_trained_folder(run, tmp_path, capsys):
    root = _copy_run(run, tmp_path)
    vq = (root / "vq" / "model.safetensors").read_bytes()
    args = ["data-all", "--out", str(root), "--num-images", "120", "--fast", "--quiet"]
    assert main([*args, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "image tokenizer" in err and "trained model" in err
    assert (root / "vq" / "model.safetensors").read_bytes() == vq
    # forced, nothing lets a step keep an old asset: the image tokenizer used to resume its
    # finished training on the old data from its train_state.pt
    assert (root / "vq" / "train_state.pt").is_file()
    check_redraw(root, force=True)
    assert not (root / "vq" / "train_state.pt").exists()


@pytest.mark.slow
def test_data_all_forced_redraws_every_asset(run, tmp_path):
    from unif2ace.pipeline.assets import AssetMismatch, check_model_assets

    root = _copy_run(run, tmp_path)
    before = Assets(root).hashes()
    args = ["data-all", "--out", str(root), "--num-images", "120", "--fast", "--quiet"]
    assert main([*args, "--seed", "3", "--force"]) == 0
    after = Assets(root).hashes()
    assert all(after[k] != before[k] for k in before)
    with pytest.raises(AssetMismatch, match=r"another text tokenizer, image tokenizer"):
        check_model_assets(root / "model", Assets(root))


def test_a_model_data_cache_that_does_not_load_is_rebuilt(run, tmp_path):
    root = _copy_run(run, tmp_path)
    good = prepare_split(Assets(root), "train", progress=False)
    cache = root / "model_data" / "train.pt"
    cache.write_bytes(cache.read_bytes()[: cache.stat().st_size // 2])
    again = prepare_split(Assets(root), "train", progress=False)
    assert again.ids == good.ids and torch.equal(again.codes, good.codes)
    assert torch.load(cache, weights_only=False)["data"].ids == good.ids  # rewritten whole
