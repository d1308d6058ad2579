"""Atomic file writing and the safetensors + config.json checkpoint format used by the model, the
image tokenizer, the encoders and the judge (a base module: every layer may import it).

Every file is written to ``<name>.tmp.<pid>`` in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a killed run leaves either the old file or the new one, never
half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_pretrained(folder, module: torch.nn.Module, config: dict) -> None:
    """``folder/model.safetensors`` + ``folder/config.json``, each written atomically."""
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    atomic_write_bytes(folder / "model.safetensors", save(state))
    atomic_write_json(folder / "config.json", config)


def load_pretrained_state(folder) -> tuple[dict, dict]:
    """(state_dict, config) from a folder written by :func:`save_pretrained`."""
    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found (expected a folder written by save_pretrained)"
            )
    config = json.loads((folder / "config.json").read_text())
    return load_file(str(folder / "model.safetensors")), config
