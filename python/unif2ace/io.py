"""Atomic file writing, content hashes, the lock that gives a folder one writer, and the
safetensors + config.json checkpoint format used by the model, the image tokenizer, the encoders
and the judge, and :class:`TensorFolder`, which reads other projects' checkpoint folders (Phi,
Show-o) a tensor at a time (a base module: every layer may import it).

Every file is written to ``<name>.tmp.<pid>`` in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a killed run leaves either the old file or the new one, never
half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked
    fcntl = None

import torch
from safetensors import safe_open
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


def error_line(e: BaseException, limit: int = 160) -> str:
    """``"Type: first sentence"`` of an exception, on one line (for a message that names why a
    file was skipped)."""
    text = " ".join(str(e).split())
    text = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0]
    return f"{type(e).__name__}: {text[:limit]}" if text else type(e).__name__


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# one writer per folder

LOCK_NAME = ".lock"
_held: dict[str, list] = {}  # lock file -> [fd, shared, depth] of the locks this process holds


class FolderLocked(ValueError):
    """Another process holds the folder's lock (its pid and command are in the message)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _holders(fd: int, alive_only: bool = False) -> list[str]:
    """The ``"<pid> <what>"`` lines of the lock file whose process is alive (unless
    ``alive_only``, all of them when none is: a forked child of a holder may hold the lock after
    its parent ended)."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
    except OSError:
        return []
    lines = [x for x in dict.fromkeys(text.splitlines()) if x.partition(" ")[0].isdigit()]
    alive = [x for x in lines if _alive(int(x.partition(" ")[0]))]
    return alive if alive or alive_only else lines


def _name(holders: list[str]) -> str:
    """``pid N (what)``, comma-joined, of the holders."""
    named = [
        f"pid {p} ({w})" if w else f"pid {p}" for p, _, w in (h.partition(" ") for h in holders)
    ]
    return ", ".join(named) or "another process"


def _write_holders(fd: int, shared: bool, what: str | None) -> None:
    """Rewrite the lock file: this process's line (``what``; none: taken out) after those of the
    other shared holders still alive (an exclusive holder is alone)."""
    me = f"{os.getpid()} "
    lines = [h for h in _holders(fd, True) if not h.startswith(me)] if shared else []
    data = "".join(h + "\n" for h in [*lines, *([me + what] if what else [])]).encode()
    with contextlib.suppress(OSError):
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))


@contextlib.contextmanager
def lock_folder(folder, what: str, *, shared: bool = False):
    """Hold ``folder/.lock`` for the ``with`` block: exclusively (one writer), or ``shared`` (any
    number of holders that only need the folder not to change under them). The lock is the OS's
    (``flock``): it goes with the process, so a killed holder leaves no stale lock. The holder
    writes ``"<pid> <what>"`` into the file (a shared one adds its line to those of the other
    holders still alive); a process that cannot get the lock raises :class:`FolderLocked` naming
    the holders' pids at once (it never waits). Nested use in one process is
    a no-op (a shared lock cannot be made exclusive that way: RuntimeError). Where the file
    system has no locks, a warning is logged and the block runs unlocked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(folder / LOCK_NAME)
    if key in _held:
        entry = _held[key]
        if entry[1] and not shared:
            raise RuntimeError(f"{folder}: this process holds it shared, cannot lock it for {what}")
        entry[2] += 1
        try:
            yield
        finally:
            entry[2] -= 1
        return
    if fcntl is None:
        yield
        return
    fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(
                f"{folder} is in use by {_name(_holders(fd))}; wait for it to end or stop it, "
                "or use another folder"
            ) from None
        except OSError as e:  # e.g. a network file system without locks
            logging.getLogger(__name__).warning(
                "warning: cannot lock %s (%s); going on without a lock", folder, e.strerror
            )
        else:
            _write_holders(fd, shared, what)
        _held[key] = [fd, shared, 1]
        try:
            yield
        finally:
            del _held[key]
            _write_holders(fd, shared, None)  # still held: take our line out
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)


class TensorFolder:
    """The tensors of a checkpoint folder by name, read one at a time (safetensors files are
    memory-mapped, so the whole state is never held twice)."""

    def __init__(self, folder, files: tuple[str, ...]):
        """Read the first of ``files`` (in order) that ``folder`` holds: a ``.safetensors`` file,
        a ``*.safetensors.index.json`` with its shards, or a ``.bin``; FileNotFoundError when
        there is none or a listed shard is missing."""
        folder = Path(folder)
        self.folder = folder
        self._where: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._bin: dict[str, torch.Tensor] | None = None
        for name in files:
            path = folder / name
            if not path.is_file():
                continue
            if name.endswith(".index.json"):
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
                for shard in shards:
                    if not (folder / shard).is_file():
                        raise FileNotFoundError(f"{folder / shard} (listed in {name}) not found")
                    self._index(folder / shard)
            elif name.endswith(".safetensors"):
                self._index(path)
            else:
                self._bin = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            self.file = name
            break
        else:
            raise FileNotFoundError(f"{folder}: no weights found (looked for {', '.join(files)})")

    def _index(self, path: Path) -> None:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                self._where[k] = path
                self._shape[k] = tuple(f.get_slice(k).get_shape())

    def keys(self) -> list[str]:
        return list(self._bin) if self._bin is not None else list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        if self._bin is not None:
            return tuple(self._bin[name].shape)
        return self._shape[name]

    def get(self, name: str) -> torch.Tensor:
        if self._bin is not None:
            return self._bin[name]
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_tensor(name)

    def get_slice(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """``get(name)[box]`` reading only the box's bytes from a safetensors file (a rank's
        rows of a sharded parameter); ``box = ()`` reads the whole (0-dim) tensor."""
        if self._bin is not None:
            return self._bin[name][box]
        with safe_open(str(self._where[name]), "pt") as f:
            return f.get_slice(name)[box] if box else f.get_tensor(name)
