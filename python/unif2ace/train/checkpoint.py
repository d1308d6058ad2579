"""Training checkpoints: one folder per step, written atomically.

Layout (``N`` zero-padded to 7 digits)::

    <out>/checkpoints/step_000000N/
        model.safetensors    full (unsharded) model state, fp32 as trained
        optimizer.pt         optimizer state keyed by parameter name (any world size loads it)
        state.pt             step, per-rank RNG states, loss history, elapsed seconds
        train_config.json    the TrainConfig
        model_config.json    the model_config dict given to train() (null when none)
        COMPLETE             written last; a folder without it is never loaded
    <out>/checkpoints/latest   the newest folder's name, replaced atomically

A folder is written as ``.tmp_step_000000N.<pid>`` beside the others, every file fsynced, then
renamed into place (``os.replace`` of a directory is atomic on POSIX) and the parent fsynced, so a
kill leaves either no ``step_N`` or a complete one; leftovers named ``.tmp_*`` are removed by the
next run. Resuming takes the highest complete step (``latest`` is a convenience for readers and is
only trusted when it names a complete folder).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from unif2ace.io import atomic_write_bytes

CKPT_SUBDIR = "checkpoints"
MARKER = "COMPLETE"
REQUIRED = ("model.safetensors", "optimizer.pt", "state.pt", "train_config.json", MARKER)
_STEP_RE = re.compile(r"^step_(\d{7,})$")


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
    for f in tmp.iterdir():
        _fsync_path(f)
    (tmp / MARKER).write_text(json.dumps({"step": step}) + "\n")
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


def _resolve(path) -> Path:
    path = Path(path)
    if is_complete(path):
        return path
    if (path / CKPT_SUBDIR).is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"{path}: not a complete checkpoint folder (missing {MARKER}?) "
        f"and no complete checkpoint under {path / CKPT_SUBDIR}"
    )


def read_checkpoint(path) -> dict:
    """Everything in a checkpoint: ``model`` (state dict), ``optimizer``, ``state``,
    ``train_config``, ``model_config``, ``step``, ``path``. ``path`` may be a checkpoint folder or
    a training output folder (its newest complete checkpoint)."""
    path = _resolve(path)
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
    }


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
