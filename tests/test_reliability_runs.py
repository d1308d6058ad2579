"""Run folders that lose nothing and say what is wrong (issue 23, items 1-3), on the toy problem
of tests/train_worker.py:

- checkpoints carry the sha256 of every file; a checkpoint that does not verify or load is skipped
  with a warning naming it and why, and training resumes from the newest one that does, as exactly
  as from any other checkpoint;
- one writer per folder: an OS file lock (released by a kill) refuses a second training or data
  command with the holder's pid;
- ``data-all`` does not redraw a folder's finished assets unless told to (``--force``).

The tests that need a real run folder (a model bound to its assets, the model-data cache rebuilt)
are in tests/test_pipeline.py, beside its run folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_worker as tw
from unif2ace.cli import main
from unif2ace.train import list_checkpoints, load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent


def _run(out, model_config=None, stop_after=None, **kw):
    return tw.run(out, model_config, stop_after, **kw)


# ---------------------------------------------------------------------------------------------
# item 3: checksums, verification, fallback


def _truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _empty(f: Path) -> None:
    f.write_bytes(b"")


def _flip_last_byte(f: Path) -> None:
    """Same size, one byte of the last tensor's data changed: only a checksum sees it."""
    b = bytearray(f.read_bytes())
    b[-1] ^= 0x5A
    f.write_bytes(bytes(b))


DAMAGE = {
    "truncated model.safetensors": ("model.safetensors", _truncate),
    "empty optimizer.pt": ("optimizer.pt", _empty),
    "truncated state.pt": ("state.pt", _truncate),
    "flipped bytes in model.safetensors": ("model.safetensors", _flip_last_byte),
}


def test_checkpoint_records_checksums(tmp_path):
    _run(tmp_path, steps=3)
    ck = tmp_path / "checkpoints" / "step_0000003"
    files = json.loads((ck / "COMPLETE").read_text())["files"]
    assert {"model.safetensors", "optimizer.pt", "state.pt", "train_config.json"} <= set(files)
    for name, rec in files.items():
        data = (ck / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_corrupt_newest_checkpoint(tmp_path, damage, caplog):
    full = _run(tmp_path / "full")
    out = tmp_path / "killed"
    _run(out, stop_after=7)  # checkpoints at 3 and 6
    name, spoil = DAMAGE[damage]
    spoil(out / "checkpoints" / "step_0000006" / name)
    with caplog.at_level(logging.WARNING):
        res = _run(out)
    assert res["resumed_from"] == 3
    skipped = res["skipped_checkpoints"]
    assert len(skipped) == 1 and skipped[0][0].endswith("step_0000006") and name in skipped[0][1]
    assert "step_0000006" in caplog.text and name in caplog.text
    # resuming from the older checkpoint is as exact as any resume
    assert res["losses"] == full["losses"]
    a, b = load_checkpoint(tmp_path / "full")["model"], load_checkpoint(out)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 13))


def test_a_named_corrupt_checkpoint_is_refused(tmp_path):
    from unif2ace.train.checkpoint import CheckpointError

    _run(tmp_path, stop_after=7)
    root = tmp_path / "checkpoints"
    _flip_last_byte(root / "step_0000003" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"step_0000003: model\.safetensors .*sha256"):
        load_checkpoint(root / "step_0000003")
    _truncate(root / "step_0000006" / "state.pt")
    with pytest.raises(CheckpointError, match=r"step_0000006: state\.pt has \d+ bytes, \d+ were"):
        load_checkpoint(root / "step_0000006")


def test_no_checkpoint_verifies(tmp_path):
    from unif2ace.train.checkpoint import CheckpointError

    _run(tmp_path, stop_after=7)
    for _, ck in list_checkpoints(tmp_path):
        _truncate(ck / "optimizer.pt")
    with pytest.raises(CheckpointError, match=r"no checkpoint.*step_0000006.*step_0000003"):
        _run(tmp_path)


def test_checkpoint_without_checksums_still_loads(tmp_path):
    """A checkpoint written before checksums (COMPLETE holds only the step) loads as before."""
    _run(tmp_path, stop_after=4)
    ck = tmp_path / "checkpoints" / "step_0000003"
    (ck / "COMPLETE").write_text(json.dumps({"step": 3}) + "\n")
    assert load_checkpoint(ck)["step"] == 3
    assert _run(tmp_path)["resumed_from"] == 3


# ---------------------------------------------------------------------------------------------
# item 2: one writer per folder


def _hold_lock(path: Path, pid: int) -> int:
    """Lock ``path/.lock`` the way another process would (an open file description of our own)
    and write ``pid`` into it; returns the fd (close it to release)."""
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, f"{pid} train\n".encode())
    return fd


def test_a_locked_folder_refuses_a_second_writer(tmp_path):
    from unif2ace.io import FolderLocked, lock_folder

    fd = _hold_lock(tmp_path, 4242)
    try:
        with pytest.raises(FolderLocked, match=r"in use by pid 4242 \(train\)"):
            _run(tmp_path, steps=3)
        with pytest.raises(FolderLocked, match="pid 4242"):
            with lock_folder(tmp_path, "test"):
                pass
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "log.jsonl").exists()
    finally:
        os.close(fd)
    assert _run(tmp_path, steps=3)["step"] == 3
    # this process holds it now while inside: nested use in one process is fine, another open
    # file description is refused
    with lock_folder(tmp_path, "outer"):
        with lock_folder(tmp_path, "inner"):
            pass
        with pytest.raises(BlockingIOError):
            _hold_lock(tmp_path, 1)
    os.close(_hold_lock(tmp_path, 1))  # released on leaving


HOLDER = """
import sys, time
from unif2ace.io import lock_folder
with lock_folder(sys.argv[1], "holder", shared=sys.argv[2:] == ["shared"]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _holder(path: Path, *mode: str) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), *mode], stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_the_lock_names_the_holding_process_and_a_kill_releases_it(tmp_path):
    from unif2ace.io import FolderLocked

    p = _holder(tmp_path)
    try:
        with pytest.raises(FolderLocked, match=rf"pid {p.pid} \(holder\)"):
            _run(tmp_path, steps=3)
    finally:
        p.kill()  # SIGKILL: no clean-up code runs in the holder
        p.wait()
    assert _run(tmp_path, steps=3)["step"] == 3


def test_shared_holders_are_all_named(tmp_path):
    """Trainings hold the run folder shared (its assets must not change under them): they do not
    exclude each other, and a writer is told every one of them."""
    from unif2ace.io import FolderLocked, lock_folder

    p = _holder(tmp_path, "shared")
    try:
        with lock_folder(tmp_path, "train", shared=True):
            lines = (tmp_path / ".lock").read_text().splitlines()
            assert lines == [f"{p.pid} holder", f"{os.getpid()} train"]
        with pytest.raises(FolderLocked, match=rf"in use by pid {p.pid} \(holder\);"):
            with lock_folder(tmp_path, "data-all"):
                pass
    finally:
        p.kill()
        p.wait()
    with lock_folder(tmp_path, "data-all"):
        assert (tmp_path / ".lock").read_text() == f"{os.getpid()} data-all\n"


def test_data_all_refuses_a_locked_folder(tmp_path, capsys):
    fd = _hold_lock(tmp_path, 4343)
    try:
        assert (
            main(["data-all", "--out", str(tmp_path), "--num-images", "40", "--fast", "--quiet"])
            == 2
        )
    finally:
        os.close(fd)
    assert "pid 4343" in capsys.readouterr().err
    assert not (tmp_path / "synthface").exists()


@pytest.mark.parametrize("command", ["train-judge", "train-vq", "train-encoders"])
def test_asset_commands_refuse_a_locked_folder(tmp_path, capsys, command):
    fd = _hold_lock(tmp_path, 4344)
    try:
        assert main([command, "--out", str(tmp_path), "--quiet"]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert "pid 4344" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# item 1: data-all on a folder with finished assets


def test_data_all_refuses_finished_assets(tmp_path, capsys):
    (tmp_path / "synthface").mkdir()
    (tmp_path / "synthface" / "meta.json").write_text("{}")
    (tmp_path / "text_tokenizer").mkdir()
    (tmp_path / "text_tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(b"weights")
    args = ["data-all", "--out", str(tmp_path), "--num-images", "40", "--fast", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "SynthFace data" in err and "text tokenizer" in err and "--force" in err
    assert "model" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "text_tokenizer" / "tokenizer.json").read_text() == "{}"
