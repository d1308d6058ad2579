"""Ordinary mistakes and interruptions at the ``unif2ace`` command and :class:`Pipeline` (issue 23,
items 8-12): every one ends in exit status 2 and one line that says what is wrong and what to do,
never a traceback; a data run is byte-reproducible; a resumed training refuses another recipe.

Most tests call :func:`unif2ace.cli.main` in-process on one small run folder; the few that need a
fresh interpreter (an environment variable read at import, a real Ctrl-C) run ``python -m
unif2ace``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest
import torch
from PIL import Image

from model_data import small_recipe
from unif2ace import _backend
from unif2ace.cli import main
from unif2ace.data.synthface import draw_arrays
from unif2ace.vq.model import VQConfig
from unif2ace.vq.train import train_vq

ROOT = Path(__file__).resolve().parent.parent
SMALL = small_recipe(steps=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv) -> int:
    """``unif2ace ARGV...`` in-process; argparse's own exit (a bad option) is returned as a code."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def one_line_error(capsys, *needles: str) -> str:
    """The error output: one line (argparse's usage line aside), no traceback, holding every
    needle; returned for further checks."""
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if not x.startswith(("usage:", "  "))]
    assert "Traceback" not in err and len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def run_module(*argv, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "unif2ace", *map(str, argv)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small run folder: data-all --fast and a 3-step model (checkpoints at every step)."""
    root = tmp_path_factory.mktemp("run")
    assert cli("data-all", "--out", root, "--num-images", "120", "--fast", "--quiet") == 0
    assert cli("train", "--out", root, "--quiet", "--set", *SMALL) == 0
    return root


# ---------------------------------------------------------------------------------------------
# item 8: a data run gives the same bytes


@pytest.fixture(scope="module")
def faces():
    return draw_arrays(16, seed=5, workers=1).images


TINY_VQ = VQConfig(channels=(8, 16), fsq_levels=(4, 4, 4), decoder_blocks=1)


def test_vq_training_is_byte_reproducible_with_a_budget_that_does_not_bind(faces, tmp_path):
    """The learning rate follows the step count, not the CPU time spent: two runs with the same
    seed and a time budget that the steps fit give byte-identical tokenizers."""
    for name in ("a", "b"):
        train_vq(
            faces,
            TINY_VQ,
            steps=5,
            batch=4,
            out=tmp_path / name,
            progress=False,
            max_minutes=30.0,
            max_cpu_minutes=14.0,
        )
    a, b = ((tmp_path / n / "model.safetensors").read_bytes() for n in "ab")
    assert a == b


def test_a_time_budget_caps_the_step_count_and_says_so(faces, tmp_path):
    """A budget that the steps do not fit plans fewer steps before training (the schedule then
    anneals over those), and the plan is recorded in train_info.json and the state."""
    out = tmp_path / "vq"
    _, info = train_vq(
        faces, TINY_VQ, steps=100_000, batch=4, out=out, progress=False, max_minutes=0.02
    )
    assert info["capped_by"] == "max_minutes" and 1 <= info["steps_planned"] < 100_000
    assert info["steps_done"] <= info["steps_planned"] and info["stopped_early"]
    assert info["seconds_per_step_timed"] > 0
    saved = json.loads((out / "train_info.json").read_text())
    assert saved["steps_planned"] == info["steps_planned"] and saved["capped_by"] == "max_minutes"
    # no budget: the step count as asked, nothing timed
    _, info = train_vq(faces, TINY_VQ, steps=2, batch=4, progress=False)
    assert info["steps_planned"] == 2 and info["capped_by"] is None
    assert info["seconds_per_step_timed"] is None


def test_cli_train_vq_twice_gives_the_same_bytes(run, tmp_path, capsys):
    """`unif2ace train-vq` with its default budgets: the same command gives the same tokenizer."""
    for name in ("a", "b"):
        args = ["--steps", 4, "--channels", "8,16", "--fsq-levels", "4,4,4", "--quiet"]
        assert cli("train-vq", "--out", tmp_path / name, "--data", run / "synthface", *args) == 0
    a, b = ((tmp_path / n / "vq" / "model.safetensors").read_bytes() for n in "ab")
    assert a == b
    capsys.readouterr()
    # a budget that caps the steps is stated on stderr, also with --quiet
    args = ["--steps", 100_000, "--channels", "8,16", "--fsq-levels", "4,4,4", "--quiet"]
    out = tmp_path / "c"
    data = ["--data", run / "synthface"]
    assert cli("train-vq", "--out", out, *data, "--max-minutes", 0.02, *args) == 0
    err = capsys.readouterr().err
    assert "caps training at" in err and "max-minutes" in err, err


@pytest.mark.slow
def test_data_all_fast_twice_gives_the_same_bytes(tmp_path):
    """The whole data pipeline: every asset byte-identical from run to run (~30 s)."""
    for name in ("a", "b"):
        args = ["--num-images", 120, "--fast", "--quiet"]
        assert cli("data-all", "--out", tmp_path / name, *args) == 0
    for rel in (
        "vq/model.safetensors",
        "text_tokenizer/tokenizer.json",
        "judge/model.safetensors",
        "encoders/semantic/model.safetensors",
        "encoders/identity/model.safetensors",
    ):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# ---------------------------------------------------------------------------------------------
# item 9: exit status 2 and one line


def test_an_image_file_that_is_not_an_image(run, tmp_path, capsys):
    good = tmp_path / "good.png"
    Image.open(next((run / "synthface" / "images" / "test").glob("*.png"))).save(good)
    cases = {
        "text.png": b"not an image at all\n",
        "empty.png": b"",
        "truncated.png": good.read_bytes()[:200],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        assert cli("caption", "--out", run, "--image", tmp_path / name) == 2
        one_line_error(capsys, name, "image")
        assert cli("answer", "--out", run, "--image", tmp_path / name, "--question", "Why?") == 2
        one_line_error(capsys, name)


def test_unwritable_outputs_and_a_folder_for_a_file(run, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    a_dir = tmp_path / "a_dir"
    a_dir.mkdir()
    gen = ["generate", "--out", run, "--prompt", "A bald man.", "--steps", 1, "--per-prompt", 1]
    assert cli(*gen, "--grid", a_dir) == 2
    one_line_error(capsys, str(a_dir), "--grid")
    assert cli(*gen, "--grid", a_file / "grid.png") == 2
    one_line_error(capsys, str(a_file))
    assert (
        cli("evaluate", "--out", run, "--n-gen", 0, "--n-vqa", 1, "--n-cap", 0, "--report", a_file)
        == 2
    )
    one_line_error(capsys, str(a_file), "--report")
    assert cli("make-data", "--out", a_file, "--num-images", 2, "--quiet") == 2
    one_line_error(capsys, str(a_file), "--out")
    # a read-only file system (root may write anywhere else)
    assert cli("make-data", "--out", "/proc/unif2ace_nope", "--num-images", 2, "--quiet") == 2
    one_line_error(capsys, "/proc/unif2ace_nope")


def test_malformed_yaml(run, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    assert cli("train", "--out", run, "--config", bad) == 2
    one_line_error(capsys, str(bad), "YAML", "line")
    assert cli("train", "--out", run, "--set", "train.lr=[") == 2
    one_line_error(capsys, "train.lr=[")


def test_backend_variable_checked_before_work(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(_backend._state, "backend", "bogus")
    assert cli("make-data", "--out", tmp_path / "d", "--num-images", 2, "--quiet") == 2
    one_line_error(capsys, "UNIF2ACE_BACKEND", "bogus")
    assert not (tmp_path / "d").exists()
    if not torch.cuda.is_available():
        monkeypatch.setitem(_backend._state, "backend", "cuda")
        assert cli("make-data", "--out", tmp_path / "d", "--num-images", 2, "--quiet") == 2
        one_line_error(capsys, "UNIF2ACE_BACKEND", "cuda")


def test_a_bogus_backend_variable_in_a_fresh_process(tmp_path):
    """The variable is read when the package is imported: that import must not fail."""
    p = run_module(
        "make-data",
        "--out",
        tmp_path / "d",
        "--num-images",
        2,
        "--quiet",
        env={"UNIF2ACE_BACKEND": "bogus"},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "UNIF2ACE_BACKEND" in p.stderr


def test_ctrl_c_in_process(monkeypatch, tmp_path, capsys):
    from unif2ace.cli import data

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "run_make_data", interrupted)
    assert cli("make-data", "--out", tmp_path, "--quiet") == 130
    one_line_error(capsys, "interrupted; rerun the same command to resume")


def test_ctrl_c_on_the_process_group(tmp_path):
    """Ctrl-C in a terminal signals the whole process group, the data workers too: one line."""
    out = tmp_path / "d"
    cmd = [
        sys.executable,
        "-m",
        "unif2ace",
        "make-data",
        "--out",
        str(out),
        "--num-images",
        "50000",
        "--workers",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    t0 = time.monotonic()
    while not any((out / "synthface" / "images" / "train").glob("*.png")):
        assert p.poll() is None and time.monotonic() - t0 < 120, p.communicate()
        time.sleep(0.05)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines() == [
        "unif2ace make-data: interrupted; rerun the same command to resume"
    ]


# ---------------------------------------------------------------------------------------------
# item 10: messages that say what is wrong


def test_counts_that_cannot_be(run, capsys):
    gen = ["generate", "--out", run, "--prompt", "A bald man.", "--steps", 1]
    assert cli(*gen, "--per-prompt", 0) == 2
    one_line_error(capsys, "--per-prompt", "0")
    assert cli("evaluate", "--out", run, "--n-gen", -1) == 2
    one_line_error(capsys, "--n-gen", "-1")
    assert cli("make-data", "--out", run / "x", "--seed", -1) == 2
    one_line_error(capsys, "--seed", "-1")
    assert cli(*gen, "--seed", -1) == 2
    one_line_error(capsys, "--seed")


def test_pipeline_generate_takes_one_string_and_refuses_no_prompt(run):
    from unif2ace import Pipeline

    pipe = Pipeline.load(run)
    with pytest.raises(ValueError, match="no prompt"):
        pipe.generate([], steps=1)
    faces = pipe.generate("A bald man.", steps=1)
    assert faces.shape == (1, 64, 64, 3)


def test_data_all_with_too_few_images(tmp_path, capsys):
    assert cli("data-all", "--out", tmp_path, "--num-images", 5, "--fast", "--quiet") == 2
    one_line_error(capsys, "--num-images")


def test_missing_model_or_assets_name_the_right_step(run, tmp_path, capsys):
    none = run / "no_model"
    assert cli("generate", "--out", run, "--model-dir", none, "--prompt", "A bald man.") == 2
    line = one_line_error(capsys, "unif2ace train --out", str(none))
    assert "data-all" not in line
    nope = tmp_path / "nope"
    assert cli("train", "--out", nope) == 2
    line = one_line_error(capsys, f"unif2ace data-all --out {nope}`")
    # a run folder whose data-all stopped early: the missing asset is named, the path is the run's
    part = tmp_path / "part"
    (part / "synthface").mkdir(parents=True)
    (part / "synthface" / "meta.json").write_text("{}")
    assert cli("train", "--out", part) == 2
    one_line_error(capsys, "text tokenizer", f"unif2ace data-all --out {part}`")


def test_omni_attention_head_size_zero():
    from unif2ace import ops

    q = torch.zeros(1, 4, 2, 0)
    limit = torch.full((1, 4), 4, dtype=torch.int32)
    with pytest.raises(ValueError, match="head size"):
        ops.omni_attention(q, q, q, limit)


# ---------------------------------------------------------------------------------------------
# item 11: values refused


def test_threads_and_minutes_must_be_positive(run, tmp_path, capsys):
    for n in (0, -1):
        assert cli("make-data", "--out", tmp_path, "--threads", n) == 2
        one_line_error(capsys, "--threads")
        assert cli("demo", "--out", tmp_path, "--minutes", n) == 2
        one_line_error(capsys, "--minutes")


@pytest.mark.parametrize("change", ["train.batch_size=2", "train.lr=0.5", "train.seed=1"])
def test_resuming_with_another_train_config_is_refused(run, capsys, change):
    before = sorted((run / "model" / "train" / "checkpoints").iterdir())
    assert cli("train", "--out", run, "--quiet", "--set", *SMALL, change) == 2
    key, value = change.split("=")
    one_line_error(capsys, key, value, "--model-dir")
    assert sorted((run / "model" / "train" / "checkpoints").iterdir()) == before


def test_fewer_steps_than_the_run_has_done_is_refused(run, capsys):
    assert cli("train", "--out", run, "--quiet", "--set", *SMALL, "train.steps=1") == 2
    one_line_error(capsys, "step 3", "train.steps=1")
    # the same command again: nothing to do, fine
    assert cli("train", "--out", run, "--quiet", "--set", *SMALL) == 0


# ---------------------------------------------------------------------------------------------
# item 12: first-hour gaps


def test_pipeline_from_the_package_root_without_loading_it_on_import():
    code = (
        "import sys, unif2ace; assert 'unif2ace.pipeline' not in sys.modules; "
        "from unif2ace import Pipeline; import unif2ace.pipeline as p; "
        "assert Pipeline is p.Pipeline; print('ok')"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
    import unif2ace

    with pytest.raises(AttributeError, match="no_such_name"):
        unif2ace.no_such_name  # noqa: B018


@pytest.mark.slow
def test_a_bare_pip_install_in_a_fresh_venv(tmp_path):
    """`pip install torch==2.13.0` (the local CPU wheel) then `pip install .` into a new venv:
    `unif2ace --help` runs, and so does the demo's first step (make-data). Catches a package the
    code imports that pyproject.toml does not declare. Builds the C++ extension (minutes)."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for args in (["torch==2.13.0"], [str(ROOT)]):
        p = subprocess.run([*pip, *args], env=env, capture_output=True, text=True, timeout=1800)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    exe = str(env_dir / "bin" / "unif2ace")
    p = subprocess.run([exe, "--help"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and "make-data" in p.stdout, p.stderr
    out = tmp_path / "demo"
    cmd = [exe, "make-data", "--out", str(out), "--num-images", "20", "--quiet"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "synthface" / "meta.json").read_text())["num_images"] == 20
