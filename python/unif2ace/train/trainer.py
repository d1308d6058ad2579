"""A model-agnostic training loop: AdamW, warm-up + cosine schedule, gradient clipping, bf16
autocast, gradient accumulation, DDP / FSDP2 under ``torchrun``, atomic checkpoints and exact
resume, a start from a model folder without a full copy of the model on any rank (a meta-device
model, :mod:`unif2ace.train.sharded`) and activation checkpointing.

Data order does not depend on the world size: epoch ``e`` visits the dataset in the order
``torch.randperm(N, generator seeded with seed·1_000_003 + e)``; optimizer step ``s`` takes the
global positions ``[s·B, (s+1)·B)`` of the concatenated epoch orders. Rank ``r`` of ``W`` takes the
contiguous slice ``[r·B/W, (r+1)·B/W)`` of that global batch and cuts it into ``grad_accum``
micro-batches; each micro-batch loss (a mean over the micro-batch) is scaled by ``1/grad_accum``
and DDP/FSDP2 average gradients over ranks, so 1 process and ``W`` processes at the same global
batch see the same loss and gradients (up to float rounding and to the loss function's own
per-batch normalisation).

Logs go to ``<out>/log.jsonl``, one JSON object per logged step. A resumed run first truncates the
log to the steps up to its checkpoint, so the file never holds two entries for one step.

A run holds ``<out>/.lock`` (:func:`unif2ace.io.lock_folder`) from start to end: a second run into
the same folder is refused with the first one's pid instead of interleaving its log and deleting
its checkpoint in progress. It resumes from the newest checkpoint whose checksums verify (see
:mod:`unif2ace.train.checkpoint`); the ones skipped are logged and returned.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from unif2ace.io import FolderLocked, atomic_write_bytes, lock_folder
from unif2ace.train import sharded
from unif2ace.train.checkpoint import (
    CheckpointError,
    config_difference,
    list_checkpoints,
    read_checkpoint,
    remove_stale_temps,
    write_checkpoint,
)
from unif2ace.train.config import TrainConfig

_EPOCH_SEED_MUL = 1_000_003


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0 = the first): linear warm-up over
    ``warmup_steps`` (``lr·(step+1)/warmup_steps``), then cosine from ``lr`` to
    ``min_lr_ratio·lr`` at ``steps`` (held there past it)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    p = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * p))


class GlobalOrder:
    """Dataset indices of any optimizer step's global batch (see the module docstring)."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the dataset is empty")
        self.n, self.seed = n, seed
        self._cache: dict[int, torch.Tensor] = {}

    def epoch(self, e: int) -> torch.Tensor:
        if e not in self._cache:
            g = torch.Generator().manual_seed((self.seed * _EPOCH_SEED_MUL + e) % (2**63))
            self._cache = {e: torch.randperm(self.n, generator=g)}  # one epoch held at a time
        return self._cache[e]

    def batch(self, step: int, size: int) -> torch.Tensor:
        pos = step * size
        parts = []
        while size > 0:
            e, off = divmod(pos, self.n)
            take = min(size, self.n - off)
            parts.append(self.epoch(e)[off : off + take])
            pos, size = pos + take, size - take
        return torch.cat(parts)


# ---------------------------------------------------------------------------------------------
# distributed setup


@dataclass
class _Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    parallel: str  # resolved: none | ddp | fsdp2
    created: bool  # we initialised the process group (and destroy it at the end)


def _setup(cfg: TrainConfig) -> _Dist:
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1")) if under_torchrun else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    parallel = cfg.parallel
    if parallel == "auto":
        parallel = "ddp" if world > 1 or (dist.is_available() and dist.is_initialized()) else "none"
    if world > 1 and parallel == "none":
        raise ValueError(
            f"parallel='none' with WORLD_SIZE={world}: every rank would train its own copy; "
            "use parallel=ddp or fsdp2"
        )
    if cfg.device == "auto":
        device = (
            torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        )
    else:
        device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = False
    if parallel != "none":
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this build of torch")
        if not dist.is_initialized():
            if not under_torchrun:
                parallel = "none"  # a plain `python` run: one process, nothing to wrap
            else:
                backend = "nccl" if device.type == "cuda" else "gloo"
                dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
                created = True
    if parallel != "none":
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return _Dist(rank, world, local_rank, device, parallel, created)


def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "shard_units"):
        return list(model.shard_units())
    return [c for c in model.children() if any(True for _ in c.parameters())]


def _wrap(model: torch.nn.Module, d: _Dist, broadcast: bool) -> torch.nn.Module:
    """The module the loss function calls: DDP around ``model``, or ``model`` itself after
    ``fully_shard`` (FSDP2 changes the module in place), or ``model`` untouched. ``broadcast``:
    under FSDP2, first make every rank's copy rank 0's (not for a model on the meta device, nor
    for weights every rank read from the same source)."""
    if d.parallel == "ddp":
        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if d.parallel == "fsdp2":
        if broadcast:  # fully_shard shards each rank's own copy: make them rank 0's first
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)
        mesh = init_device_mesh(d.device.type, (d.world,))
        for unit in _shard_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def _place(model, d: _Dist, cfg: TrainConfig, ck: dict | None):
    """Put the weights the run starts from on the training device and wrap the model for
    ``d.parallel``; returns ``(wrapped, what the loader did)``.

    The weights come from the checkpoint resumed (``ck``), else from ``cfg.init_from``, else
    from the model as built. A model on the meta device is given storage only once sharded
    (FSDP2: each rank reads its own shard of each tensor) or, without FSDP2, just before it is
    wrapped; a built model is loaded whole, tensor by tensor. Every name and shape is checked
    before anything is allocated."""
    meta = sharded.on_meta(model)
    if ck is not None and not meta:
        model.load_state_dict(ck["model"])

    def pick():
        source = None
        if ck is not None and meta:
            source = sharded.state_source(ck["model"], f"{ck['path']}/model.safetensors")
        elif ck is None and cfg.init_from is not None:
            source = sharded.folder_source(cfg.init_from)
        if meta and source is None:
            raise ValueError(
                "the model is on the meta device (no storage, no values): set init_from to the "
                "model folder to start from, or build the model on a real device"
            )
        if source is not None:
            sharded.check_weights(model, source)  # before anything is allocated
        return source

    source = _on_every_rank(d, pick)
    if not meta:
        model.to(d.device)
    if cfg.activation_checkpointing:  # before fully_shard: its hooks go around the recompute
        sharded.checkpoint_activations(_shard_units(model))
    loaded = None
    if source is not None and not (meta and d.parallel == "fsdp2"):
        if meta:
            loaded = sharded.materialize(model, d.device, source)
        else:
            loaded = sharded.load_weights(model, source)
    wrapped = _wrap(model, d, broadcast=source is None)
    if meta and d.parallel == "fsdp2":
        loaded = sharded.materialize(model, d.device, source)
    return wrapped, loaded


def unwrap_model(wrapped: torch.nn.Module) -> torch.nn.Module:
    """The model under what :func:`train` wraps it in (``torch.compile``, DDP); FSDP2 changes
    the model in place, so an FSDP2 model is its own."""
    wrapped = getattr(wrapped, "_orig_mod", wrapped)
    return wrapped.module if isinstance(wrapped, DDP) else wrapped


@contextlib.contextmanager
def _grad_sync(wrapped, parallel: str, sync: bool):
    """No gradient all-reduce / reduce-scatter on micro-batches before the last."""
    if parallel == "ddp" and not sync:
        with wrapped.no_sync():
            yield
    elif parallel == "fsdp2":
        wrapped.set_requires_gradient_sync(sync)
        yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# optimizer, RNG, batches


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    low = name.lower()
    return p.ndim < 2 or "embed" in low or "norm" in low


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with no weight decay on biases, norms and embeddings (ndim < 2, or a name holding
    ``embed`` / ``norm``). Its fused kernel where every parameter allows it (plain float tensors
    on the CPU or a GPU; FSDP2's sharded parameters keep the default implementation): on CPU
    torch's default is a loop over the parameters, several times slower (docs/results.md)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = all(
        not isinstance(p, DTensor)
        and p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in decay + no_decay
    )
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=fused or None
    )


def _rng_state() -> dict:
    st = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    if "cuda" in st and torch.cuda.is_available():
        cuda = st["cuda"]
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _num_tokens(batch) -> float:
    if isinstance(batch, Mapping) and "num_tokens" in batch:
        n = batch["num_tokens"]
        return float(n.sum().item() if isinstance(n, torch.Tensor) else n)
    return math.nan


def _resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return torch.bfloat16 if amp == "bf16" else None


def _as_float(x) -> float:
    if hasattr(x, "full_tensor"):  # a DTensor (FSDP2): the norm is a partial over shards
        x = x.full_tensor()
    return float(x)


# ---------------------------------------------------------------------------------------------
# checkpoint save / load (collective under ddp / fsdp2)


def _state_options():
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save(model, opt, d: _Dist, cfg, model_config, step, losses, elapsed) -> Path:
    # under FSDP2 these gather the shards (every rank must call); with cpu_offload only rank 0
    # receives the full tensors
    msd = get_model_state_dict(model, options=_state_options())
    osd = get_optimizer_state_dict(model, opt, options=_state_options())
    rng = _rng_state()
    rngs = [None] * d.world if d.rank == 0 else None
    if d.world > 1:
        dist.gather_object(rng, rngs, dst=0)
    else:
        rngs = [rng]
    path = Path(cfg.out) / "checkpoints" / f"step_{step:07d}"
    if d.rank == 0:
        state = {"rng": rngs, "losses": list(losses), "elapsed": elapsed, "world_size": d.world}
        path = write_checkpoint(
            cfg.out, step, msd, osd, state, cfg.to_dict(), model_config, cfg.keep_checkpoints
        )
    if d.world > 1:
        dist.barrier()
    return path


def _truncate_log(path: Path, upto: int) -> None:
    """Keep only entries with ``step <= upto`` (rewritten atomically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a torn last line from a kill
    atomic_write_bytes(path, "".join(s + "\n" for s in kept).encode())


# ---------------------------------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    dataset,
    collate,
    loss_fn,
    cfg: TrainConfig,
    *,
    model_config: dict | None = None,
    eval_fn=None,
    stop_after: int | None = None,
    on_start=None,
) -> dict:
    """Train ``model`` for ``cfg.steps`` optimizer steps, resuming from ``cfg.out`` when it holds
    a checkpoint.

    Parameters
    ----------
    model : nn.Module
        Built (and initialised) by the caller on any device; moved to the training device. Under
        FSDP2 it is sharded in place (per ``model.shard_units()`` if defined, else per direct
        child with parameters, then the root). With ``cfg.init_from`` its weights are loaded
        from that folder (unless the run resumes); it may then be built on the meta device
        (``with torch.device("meta")``): it gets storage only once sharded, and each rank reads
        only its shards (:mod:`unif2ace.train.sharded`; ``model.reset_buffers()``, when
        defined, recomputes the buffers checkpoints do not hold). With
        ``cfg.activation_checkpointing`` each shard unit recomputes its forward in backward.
    dataset : indexable with ``len()``
    collate : ``list[item] -> batch`` (tensors anywhere inside dicts/lists/tuples are moved to
        the device; a mapping batch with ``num_tokens`` enables tokens/s).
    loss_fn : ``(model, batch, step) -> (loss, metrics)``: ``loss`` a scalar tensor, the MEAN
        over the micro-batch; ``metrics`` a ``dict[str, float | 0-dim tensor]`` (the keys any
        rank returns at the first step are logged, a key a rank lacks counting 0 there;
        tensors are read only on the steps that log);
        ``step`` the number of optimizer steps already taken (0 on the first).
    cfg : TrainConfig
    model_config : dict, optional
        Stored in every checkpoint; resuming with a different one raises ``ValueError``.
    eval_fn : ``(model, step) -> dict``, optional
        Called on every rank under ``torch.no_grad`` in eval mode every ``cfg.eval_every`` steps
        (default: at each checkpoint) and at the end; its dict is logged under ``"eval"``.
    stop_after : int, optional
        Return right after optimizer step ``stop_after``, before any checkpoint of that step (a
        simulated kill, for tests).
    on_start : ``(model) -> None``, optional
        Called under ``torch.no_grad`` on every rank once the starting weights are in place
        (not when resuming, whose checkpoint holds everything): e.g. buffers fitted from the
        data, such as the embedding statistics of a model started from ``init_from``.

    Returns
    -------
    dict with ``step`` (steps done), ``loss`` (last), ``losses`` (global mean loss of every step
    from 1, including steps done before a resume), ``wall_seconds`` (this run),
    ``samples_per_s`` and ``tokens_per_s`` (this run; ``None`` without ``num_tokens``),
    ``checkpoint`` (the newest, or ``None``), ``resumed_from``, ``skipped_checkpoints``
    (``(folder, why)`` of each newer checkpoint that did not verify), ``eval`` (the last one)
    and ``loaded`` (this rank's :class:`~unif2ace.train.sharded.LoadStats` as a dict when the
    weights were loaded by ``init_from`` or into a meta model, else ``None``).

    Raises :class:`~unif2ace.io.FolderLocked` when another process trains into ``cfg.out``, and
    :class:`~unif2ace.train.checkpoint.CheckpointError` when it holds checkpoints of which none
    verifies.
    """
    d = _setup(cfg)
    try:
        with contextlib.ExitStack() as held:
            # rank 0 writes the folder, so rank 0 holds its lock; every rank learns the outcome
            _on_rank0(d, lambda: held.enter_context(lock_folder(cfg.out, "train")))
            return _train(
                model,
                dataset,
                collate,
                loss_fn,
                cfg,
                d,
                model_config,
                eval_fn,
                stop_after,
                on_start,
            )
    finally:
        if d.created:
            dist.destroy_process_group()


def _on_rank0(d: _Dist, fn):
    """``fn()`` on rank 0, its result broadcast to every rank; a :class:`FolderLocked` or
    :class:`CheckpointError` it raises is raised on every rank (no rank waits for a failed one)."""
    box = [None, None]
    if d.rank == 0:
        try:
            box[0] = fn()
        except (FolderLocked, CheckpointError) as e:
            box[1] = (type(e), str(e))
    if d.world > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1][0](box[1][1])
    return box[0]


def _on_every_rank(d: _Dist, fn):
    """``fn()`` on every rank; when it raises on any rank, every rank raises (a folder one rank
    cannot read must not leave the others waiting in the next collective)."""
    try:
        result, err = fn(), None
    except (ValueError, OSError) as e:
        result, err = None, e
    if d.world > 1:
        errs = [None] * d.world
        dist.all_gather_object(errs, None if err is None else f"{type(err).__name__}: {err}")
        failed = [(r, e) for r, e in enumerate(errs) if e is not None]
        if failed and err is None:
            r, why = failed[0]
            raise RuntimeError(f"rank {r} could not start: {why}")
    if err is not None:
        raise err
    return result


def _train(
    model, dataset, collate, loss_fn, cfg, d, model_config, eval_fn, stop_after, on_start
) -> dict:
    B, accum = cfg.batch_size, cfg.grad_accum
    if B % (d.world * accum):
        raise ValueError(
            f"batch_size={B} must be divisible by world_size*grad_accum = {d.world}*{accum}"
        )
    per_rank, micro = B // d.world, B // (d.world * accum)
    order = GlobalOrder(len(dataset), cfg.seed)
    out = Path(cfg.out)
    log_path = out / "log.jsonl"
    if d.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out)
    if d.world > 1:
        dist.barrier()

    # --- resume: rank 0 picks the newest checkpoint that verifies; every rank reads that one
    ck = None

    def pick():
        nonlocal ck
        ck = read_checkpoint(out) if list_checkpoints(out) else None
        return (str(ck["path"]), [(str(p), why) for p, why in ck["skipped"]]) if ck else None

    picked = _on_rank0(d, pick)
    skipped = picked[1] if picked else []
    if picked and d.rank != 0:
        ck = read_checkpoint(picked[0])
    if ck is not None and model_config is not None and ck["model_config"] is not None:
        diff = config_difference(ck["model_config"], model_config)
        if diff:
            raise ValueError(
                f"{ck['path']}: checkpoint was written for another config: {diff}; "
                "use another output folder or the same model config"
            )
    wrapped, loaded = _place(model, d, cfg, ck)
    if cfg.compile:
        wrapped = torch.compile(wrapped)
    if ck is None and on_start is not None:
        with torch.no_grad():
            on_start(model)
    opt = build_optimizer(model, cfg)
    start, losses, elapsed_before, resumed_from = 0, [], 0.0, None
    last_ckpt = ck["path"] if ck is not None else None
    if ck is not None:
        set_optimizer_state_dict(
            model, opt, ck["optimizer"], options=StateDictOptions(full_state_dict=True)
        )
        st = ck["state"]
        rngs = st["rng"]
        # the same world size gets each rank its own RNG back; another one, rank 0's
        _set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
        start, losses = ck["step"], list(st["losses"])[: ck["step"]]
        elapsed_before, resumed_from = float(st["elapsed"]), ck["step"]
        del ck
    else:
        _seed_all(cfg.seed + d.rank)
    if d.rank == 0:
        _truncate_log(log_path, start)

    amp_dtype = _resolve_amp(cfg.amp, d.device)
    autocast = (
        torch.autocast(d.device.type, dtype=amp_dtype)
        if amp_dtype is not None
        else contextlib.nullcontext()
    )
    eval_every = cfg.eval_every or cfg.ckpt_every
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else math.inf
    bar = tqdm(
        total=cfg.steps, initial=start, desc="train", disable=not (cfg.progress and d.rank == 0)
    )
    t_run = time.perf_counter()
    t_log, samples_since, tokens_since = t_run, 0, 0.0
    total_tokens, last_eval = 0.0, None
    metric_keys: list[str] | None = None
    step = start
    model.train()
    # each step's [loss, tokens, *metrics] stay on the device until a step that logs, evaluates,
    # checkpoints or stops: then one read brings the pending steps to the host
    pending: list[torch.Tensor] = []
    for step in range(start, cfg.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        mine = order.batch(step, B)[d.rank * per_rank : (d.rank + 1) * per_rank]
        loss_acc = torch.zeros((), dtype=torch.float64, device=d.device)
        metric_acc: dict[str, torch.Tensor] = {}
        ntok = 0.0
        for k in range(accum):
            items = [dataset[i] for i in mine[k * micro : (k + 1) * micro].tolist()]
            batch = _to_device(collate(items), d.device)
            ntok += _num_tokens(batch)
            with _grad_sync(wrapped, d.parallel, k == accum - 1):
                with autocast:
                    loss, metrics = loss_fn(wrapped, batch, step)
                (loss / accum).backward()
            loss_acc += loss.detach().double() / accum
            for key, v in (metrics or {}).items():
                v = torch.as_tensor(v, dtype=torch.float64, device=d.device).detach()
                metric_acc[key] = metric_acc.get(key, 0.0) + v / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

        # one all-reduce per step: loss, tokens and metrics averaged (tokens summed) over ranks
        if metric_keys is None:  # the keys any rank reported at the first step, on every rank
            metric_keys = sorted(metric_acc)  # (a rank without, e.g., t2i rows lacks loss_t2i)
            if d.world > 1:
                every: list = [None] * d.world
                dist.all_gather_object(every, metric_keys)
                metric_keys = sorted(set().union(*every))
        ntok_t = torch.tensor([0.0 if math.isnan(ntok) else ntok], dtype=torch.float64)
        zero = torch.zeros((), dtype=torch.float64, device=d.device)
        metric_t = [metric_acc.get(m, zero).view(1) for m in metric_keys]
        stats = torch.cat([loss_acc.view(1), ntok_t.to(d.device, non_blocking=True), *metric_t])
        if d.world > 1:
            dist.all_reduce(stats)
            stats[0] /= d.world
            stats[2:] /= d.world
        pending.append(stats)
        done = step + 1
        samples_since += B
        bar.update(1)
        log_now = done % cfg.log_every == 0 or done == cfg.steps or done == stop_after
        eval_now = eval_fn is not None and (done % eval_every == 0 or done == cfg.steps)
        stop_now = stop_after is not None and done >= stop_after
        if log_now or eval_now or stop_now or done % cfg.ckpt_every == 0:
            for row in torch.stack(pending).tolist():
                losses.append(row[0])
                tokens_since += row[1]  # 0 without num_tokens
                total_tokens += row[1]
            pending.clear()
            step_loss, step_metrics = row[0], row[2:]

        entry = None
        if log_now:
            now = time.perf_counter()
            dt = max(now - t_log, 1e-9)
            entry = {
                "step": done,
                "loss": step_loss,
                "lr": lr,
                "grad_norm": _as_float(grad_norm),
                "samples_per_s": samples_since / dt,
                "elapsed": elapsed_before + now - t_run,
                "metrics": dict(zip(metric_keys, step_metrics)),
            }
            if not math.isnan(ntok):
                entry["tokens_per_s"] = tokens_since / dt
            t_log, samples_since, tokens_since = now, 0, 0.0
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if stop_now:
            _write_log(d, log_path, entry)
            break
        if eval_now:
            was_training = model.training
            model.eval()
            with torch.no_grad(), autocast:
                last_eval = eval_fn(model, done)
            model.train(was_training)
            entry = entry or {"step": done, "loss": step_loss, "lr": lr}
            entry["eval"] = last_eval
        _write_log(d, log_path, entry)
        if done % cfg.ckpt_every == 0 or done == cfg.steps:
            elapsed = elapsed_before + time.perf_counter() - t_run
            last_ckpt = _save(model, opt, d, cfg, model_config, done, losses, elapsed)
    bar.close()
    wall = time.perf_counter() - t_run
    done_steps = len(losses)
    run_steps = done_steps - start
    return {
        "step": done_steps,
        "loss": losses[-1] if losses else None,
        "losses": losses,
        "wall_seconds": wall,
        "samples_per_s": run_steps * B / wall if wall > 0 else None,
        "tokens_per_s": total_tokens / wall if total_tokens and wall > 0 else None,
        "checkpoint": str(last_ckpt) if last_ckpt else None,
        "resumed_from": resumed_from,
        "skipped_checkpoints": skipped,
        "eval": last_eval,
        "world_size": d.world,
        "parallel": d.parallel,
        "loaded": loaded.to_dict() if loaded is not None else None,
    }


def _write_log(d: _Dist, path: Path, entry: dict | None) -> None:
    if entry is None or d.rank != 0:
        return
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
