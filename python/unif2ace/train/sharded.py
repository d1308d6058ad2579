"""Starting training from a model folder without any rank holding the whole model, and activation
checkpointing of the shard units.

A model built on the meta device (``with torch.device("meta"): model = UniF2ace(cfg)``) has shapes
and no storage. The trainer shards it (FSDP2's ``fully_shard`` works on meta parameters), gives it
storage with ``to_empty``, recomputes the buffers checkpoints do not hold (``reset_buffers``) and
then fills each parameter from a :class:`WeightSource`: under FSDP2 every rank reads only the box
of each tensor it owns (its rows: ``Shard(0)``), sliced straight out of the safetensors file, so no
rank ever holds a full copy of the model, nor of any one sharded tensor. Without FSDP2 every
tensor is read whole, one at a time. Every name and shape is checked against the source's headers
before anything is allocated.

Sources: a model folder (:func:`folder_source`: ``model.safetensors`` as
:func:`unif2ace.io.save_pretrained` writes it, or ``model.safetensors.index.json`` with its shards)
or a state dict already in memory (:func:`state_source`, a resumed checkpoint's weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from unif2ace.io import TensorFolder

FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors")

Box = tuple[slice, ...]


@dataclass
class WeightSource:
    """Named tensors to start from: their shapes (read without the data) and a reader of a box
    (one slice per dim) of one of them."""

    where: str  # named in every error
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str, Box], torch.Tensor]


def folder_source(folder) -> WeightSource:
    """The tensors of a model folder (``model.safetensors`` or a sharded
    ``model.safetensors.index.json``), read lazily: a box is sliced out of the memory-mapped file,
    so only its bytes are read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"init_from={str(folder)!r}: not a folder")
    tensors = TensorFolder(folder, FOLDER_FILES)
    shapes = {k: tensors.shape(k) for k in tensors.keys()}

    return WeightSource(str(folder), shapes, tensors.get_slice)


def state_source(state: dict, where: str) -> WeightSource:
    """The tensors of a state dict in memory (its other entries are left out)."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return WeightSource(where, shapes, lambda name, box: tensors[name][box])


# ---------------------------------------------------------------------------------------------


def on_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of ``model`` is on the meta device (then all of them are
    given storage by :func:`materialize`)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters (DTensors under FSDP2) and persistent buffers of ``model`` by state-dict
    name: what a checkpoint holds and the loader fills."""
    out = {}
    for prefix, mod in model.named_modules(remove_duplicate=False):
        pre = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out[pre + name] = p
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out[pre + name] = b
    return out


def _names(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_weights(model: nn.Module, source: WeightSource) -> None:
    """Raise ``ValueError`` naming the source and the tensors unless it holds exactly the model's
    parameters and persistent buffers with the model's (global) shapes."""
    want = {k: tuple(v.shape) for k, v in model_tensors(model).items()}
    missing = want.keys() - source.shapes.keys()
    unexpected = source.shapes.keys() - want.keys()
    wrong = [
        f"{k} (holds {list(source.shapes[k])}, the model has {list(s)})"
        for k, s in want.items()
        if k in source.shapes and source.shapes[k] != s
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_names(missing)}")
    if wrong:
        problems.append(f"{len(wrong)} of another shape: {_names(wrong)}")
    if unexpected:
        problems.append(f"{len(unexpected)} the model does not have: {_names(unexpected)}")
    if problems:
        raise ValueError(f"{source.where}: the weights do not fit the model: {'; '.join(problems)}")


@dataclass
class LoadStats:
    """What :func:`load_weights` did on this rank: ``max_read_numel`` (the largest tensor it read
    at once), ``read_numel`` (all it read), ``local_numel`` (the elements this rank stores) and
    ``numel`` (the model's, all ranks together)."""

    source: str
    tensors: int = 0
    max_read_numel: int = 0
    read_numel: int = 0
    local_numel: int = 0
    numel: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _local_box(t: torch.Tensor) -> tuple[torch.Tensor, Box]:
    """The tensor this rank stores for ``t`` and the box of ``t`` it holds."""
    if isinstance(t, DTensor):
        # the offsets and sizes of this rank's shard (FSDP2: Shard(0), possibly uneven); the
        # same metadata torch.distributed.checkpoint writes shards by
        (chunk,) = t.__create_chunk_list__()
        box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
        local = t.to_local()
    else:
        local, box = t, tuple(slice(0, s) for s in t.shape)
    if tuple(local.shape) != tuple(s.stop - s.start for s in box):
        raise RuntimeError(f"local shard {list(local.shape)} does not match its box {box}")
    return local, box


@torch.no_grad()
def load_weights(model: nn.Module, source: WeightSource) -> LoadStats:
    """Copy every parameter and persistent buffer of ``model`` from ``source`` (checked first by
    :func:`check_weights`): a DTensor gets its local shard only, read as a slice of the source;
    any other tensor is read whole. One tensor (or shard) is held at a time; values are cast to
    the model's dtype."""
    check_weights(model, source)
    stats = LoadStats(source.where)
    tensors = model_tensors(model)  # holds every tensor, so their ids stay theirs
    seen: set[int] = set()  # a tensor under two names (tied weights) is loaded once
    for name, t in tensors.items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        stats.numel += t.numel()
        local, box = _local_box(t)
        stats.tensors += 1
        stats.local_numel += local.numel()
        if local.numel() == 0:
            continue
        value = source.read(name, box)
        stats.max_read_numel = max(stats.max_read_numel, value.numel())
        stats.read_numel += value.numel()
        local.copy_(value)
        del value
    return stats


def materialize(model: nn.Module, device: torch.device, source: WeightSource) -> LoadStats:
    """Give a meta-device ``model`` (sharded or not) storage on ``device``, recompute its buffers
    (``model.reset_buffers()``) and load its weights from ``source``."""
    check_weights(model, source)
    non_persistent = [
        f"{p}.{n}" if p else n
        for p, m in model.named_modules()
        for n in m._buffers
        if n in m._non_persistent_buffers_set
    ]
    reset = getattr(model, "reset_buffers", None)
    if non_persistent and reset is None:
        raise ValueError(
            f"{type(model).__name__} on the meta device has buffers no checkpoint holds "
            f"({_names(non_persistent)}) and no reset_buffers() to compute them"
        )
    model.to_empty(device=device)
    if reset is not None:
        reset()
    return load_weights(model, source)


# ---------------------------------------------------------------------------------------------
# activation checkpointing


def _checkpointed_forward(unit: nn.Module, plain, *args, **kwargs):
    if torch.is_grad_enabled() and unit.training:
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)  # evaluation, sampling, decoding: nothing to recompute


def checkpoint_activations(units: Iterable[nn.Module]) -> int:
    """Make each of ``units`` recompute its forward in backward (non-reentrant
    ``torch.utils.checkpoint``) when it trains with gradients: only the unit's inputs are kept
    between forward and backward. The forward is replaced on the instance, so parameter names
    (and so checkpoints) are unchanged and FSDP2's hooks, which run around the forward, see the
    same module; call it before ``fully_shard``. A unit already checkpointed is left as it is.
    Returns the number of units changed."""
    changed = 0
    for unit in units:
        if getattr(unit, "_plain_forward", None) is not None:
            continue
        plain = unit.forward
        unit._plain_forward = plain
        unit.forward = functools.partial(_checkpointed_forward, unit, plain)
        changed += 1
    return changed
