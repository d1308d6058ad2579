"""Training checkpoints: one folder per step, written atomically, every file checksummed.

Layout (``N`` zero-padded to 7 digits)::

    <out>/checkpoints/step_000000N/
        model.safetensors    full (unsharded) model state, fp32 as trained
        optimizer.pt         optimizer state keyed by parameter name (any world size loads it)
        state.pt             step, per-rank RNG states, loss history, elapsed seconds
        train_config.json    the TrainConfig
        model_config.json    the model_config dict given to train() (null when none)
        COMPLETE             written last: the step and, per file above, its size and sha256;
                             a folder without it is never loaded
    <out>/checkpoints/latest   the newest folder's name, replaced atomically

A folder is written as ``.tmp_step_000000N.<pid>`` beside the others, every file fsynced, then
renamed into place (``os.replace`` of a directory is atomic on POSIX) and the parent fsynced, so a
kill leaves either no ``step_N`` or a complete one; leftovers named ``.tmp_*`` are removed by the
next run. Reading a checkpoint first checks every file against ``COMPLETE`` (a truncated, emptied
or bit-flipped file fails with :class:`CheckpointError` saying which file and how). Reading a
training folder takes the newest checkpoint that verifies and loads, and logs a warning for each
newer one skipped (``latest`` is a convenience for readers and is not trusted). A ``COMPLETE``
without checksums (written before they existed) is loaded unverified.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unif2ace.io import atomic_write_bytes, error_line, sha256_file

log = logging.getLogger(__name__)

CKPT_SUBDIR = "checkpoints"
MARKER = "COMPLETE"
REQUIRED = ("model.safetensors", "optimizer.pt", "state.pt", "train_config.json", MARKER)
_STEP_RE = re.compile(r"^step_(\d{7,})$")


class CheckpointError(ValueError):
    """A checkpoint whose files do not match the checksums written with them, or do not load."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path) -> bool:
    path = Path(path)
    return _STEP_RE.match(path.name) is not None and all((path / f).is_file() for f in REQUIRED)


def list_checkpoints(out) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``out``, oldest first."""
    root = Path(out) / CKPT_SUBDIR
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint folder under ``out`` (``None`` when there is none)."""
    ckpts = list_checkpoints(out)
    return ckpts[-1][1] if ckpts else None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _model_tensors(state: dict) -> tuple[dict, dict]:
    """Split a state dict into contiguous CPU tensors for safetensors (tied weights cloned apart:
    safetensors refuses two names on one storage) and anything else (kept in state.pt)."""
    tensors, extra, seen = {}, {}, set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            extra[k] = v
            continue
        v = v.detach().cpu().contiguous()
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:
            v = v.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[k] = v
    return tensors, extra


def write_checkpoint(
    out,
    step: int,
    model_state: dict,
    optimizer_state: dict,
    state: dict,
    train_config: dict,
    model_config: dict | None,
    keep: int,
) -> Path:
    """Write ``<out>/checkpoints/step_N`` atomically, point ``latest`` at it and keep only the
    newest ``keep`` complete checkpoints. Returns the folder."""
    root = Path(out) / CKPT_SUBDIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".tmp_{name}.{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    tensors, extra = _model_tensors(model_state)
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({**state, "step": step, "model_extra": extra}, tmp / "state.pt")
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2, sort_keys=True))
    (tmp / "model_config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    files = {}
    for f in sorted(tmp.iterdir()):
        _fsync_path(f)
        files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    _fsync_path(tmp / MARKER)
    _fsync_path(tmp)
    if final.exists():  # a re-run past an older run's step: move the old one aside first
        trash = root / f".tmp_old_{name}.{os.getpid()}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_path(root)
    atomic_write_bytes(root / "latest", (name + "\n").encode())
    for _, old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_temps(out) -> list[Path]:
    """Delete ``.tmp_*`` leftovers of killed checkpoint writes; returns what was removed."""
    root = Path(out) / CKPT_SUBDIR
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp_"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                gone.append(p)
    return gone


def verify_checkpoint(path) -> None:
    """Check every file of checkpoint folder ``path`` against the sizes and sha256 sums in its
    ``COMPLETE``; a :class:`CheckpointError` names the first file that differs."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text())
        # no "files": written before checksums, nothing to check
        files = {n: (int(r["bytes"]), str(r["sha256"])) for n, r in marker.get("files", {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: {MARKER} does not read ({error_line(e)})") from None
    for name, (written, sha) in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = f.stat().st_size
        if size != written:
            raise CheckpointError(
                f"{path}: {name} has {size} bytes, {written} were written (truncated?)"
            )
        if sha256_file(f) != sha:
            raise CheckpointError(
                f"{path}: {name} does not match the sha256 recorded when it was written "
                "(its bytes changed on disk)"
            )


def _read_one(path: Path) -> dict:
    """One checkpoint folder, verified, then loaded (a file that still does not load is a
    :class:`CheckpointError` too)."""
    verify_checkpoint(path)
    try:
        # state.pt holds python/numpy RNG states: our own file, so a full unpickle is fine
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
        model = load_file(str(path / "model.safetensors"))
        model.update(state.pop("model_extra", {}) or {})
        return {
            "path": path,
            "step": int(state["step"]),
            "model": model,
            "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False),
            "state": state,
            "train_config": json.loads((path / "train_config.json").read_text()),
            "model_config": json.loads((path / "model_config.json").read_text()),
            "skipped": [],
        }
    except Exception as e:  # noqa: BLE001 - whatever a damaged file raises, say which and why
        raise CheckpointError(f"{path}: does not load ({error_line(e)})") from None


def read_checkpoint(path) -> dict:
    """Everything in a checkpoint: ``model`` (state dict), ``optimizer``, ``state``,
    ``train_config``, ``model_config``, ``step``, ``path``, ``skipped``. ``path`` may be a
    checkpoint folder (a :class:`CheckpointError` when it does not verify or load) or a training
    output folder: its newest checkpoint that verifies and loads, each newer one that does not
    logged as a warning and listed in ``skipped`` as ``(folder, why)``."""
    path = Path(path)
    if is_complete(path):
        return _read_one(path)
    ckpts = list_checkpoints(path)
    if not ckpts:
        raise FileNotFoundError(
            f"{path}: not a complete checkpoint folder (missing {MARKER}?) "
            f"and no complete checkpoint under {path / CKPT_SUBDIR}"
        )
    skipped = []
    for _, folder in reversed(ckpts):
        try:
            ck = _read_one(folder)
        except CheckpointError as e:
            why = str(e).removeprefix(f"{folder}: ")
            log.warning("warning: skipping checkpoint %s: %s", folder, why)
            skipped.append((folder, why))
            continue
        if skipped:
            log.warning("warning: using the older checkpoint %s (step %d)", folder, ck["step"])
        ck["skipped"] = skipped
        return ck
    raise CheckpointError(
        f"{path}: no checkpoint verifies ("
        + "; ".join(f"{f.name}: {why}" for f, why in skipped)
        + f"); move {path / CKPT_SUBDIR} away to train from step 0"
    )


def load_checkpoint(path, model: torch.nn.Module | None = None, strict: bool = True) -> dict:
    """Load a checkpoint's weights into ``model`` (when given) and return its metadata:
    ``{"path", "step", "train_config", "model_config", "model"}`` (``model``: the state dict)."""
    ck = read_checkpoint(path)
    if model is not None:
        model.load_state_dict(ck["model"], strict=strict)
    return {k: ck[k] for k in ("path", "step", "train_config", "model_config", "model")}


def _normalise(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_difference(saved: dict | None, given: dict | None) -> str | None:
    """The first key (dotted) whose value differs between two config dicts, or ``None``."""
    a, b = _normalise(saved), _normalise(given)

    def walk(x, y, prefix):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                d = walk(x.get(k, "<absent>"), y.get(k, "<absent>"), f"{prefix}{k}.")
                if d:
                    return d
            return None
        if x != y:
            return f"key {prefix[:-1] or '<root>'} differs (checkpoint: {x!r}, now: {y!r})"
        return None

    return walk(a, b, "")
