"""Train UniF²ace on a run folder: the recipe behind ``unif2ace train`` and ``unif2ace demo``.

A YAML file with three sections (each optional), overridden from the command line with
``--set section.key=value``::

    model: {preset: tiny, d_model: 128, token_moe: true, alpha: 0.01, ...}   # ModelConfig fields
    train: {steps: 2000, batch_size: 16, lr: 1e-3, ...}                      # TrainConfig fields
                                          # + max_minutes: steps from a timed step (below)
    data:  {vqa_per_image: 8, vqa_turns: 8, t2i_per_image: 2, tasks: [t2i, caption, vqa]}

``train.max_minutes`` replaces ``train.steps`` by as many steps as fit the budget on this machine:
three steps are timed before training and the count is written to ``out/train/steps.json``, so a
resumed run keeps the same step count and LR schedule. Unknown sections or keys raise with the
closest valid names. The fields the run's assets fix (text
vocabulary, codebook, tokens per image, embedding sizes) are taken from them.

While it trains, a run holds the run folder's lock shared (``data-all``, which rewrites the assets,
takes it exclusively) and the model folder's exclusively (one training per model folder). The
model folder records the hashes of the assets it is trained with (``assets.json``); resuming on
other assets is refused (:func:`~unif2ace.pipeline.assets.check_model_assets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import statistics
import time
from pathlib import Path

import torch

from unif2ace.io import atomic_write_json, lock_folder
from unif2ace.models import ModelConfig, UniF2ace, collate, get_config
from unif2ace.models.unif2ace import mark_dynamic_sizes
from unif2ace.pipeline.assets import Assets, bind_model, check_model_assets
from unif2ace.pipeline.model_data import UnifiedDataset, prepare_split
from unif2ace.train.checkpoint import list_checkpoints, load_checkpoint
from unif2ace.train.config import (
    TrainConfig,
    _unknown_key,
    apply_overrides,
    merge_dataclass,
    read_yaml,
)
from unif2ace.train.trainer import train, unwrap_model

SECTIONS = ("model", "train", "data")
# per image: two text->image rows, a caption row, and one row holding up to 8 of its questions
DATA_DEFAULTS = {
    "vqa_per_image": 8,
    "vqa_turns": 8,
    "t2i_per_image": 2,
    "tasks": ["t2i", "caption", "vqa"],
}


def read_recipe(path=None, overrides: list[str] | None = None) -> dict[str, dict]:
    """``{"model": {...}, "train": {...}, "data": {...}}`` from a YAML file and ``section.key=value``
    overrides (values parsed as YAML)."""
    where = str(path) if path is not None else "recipe"
    tree = apply_overrides(read_yaml(path) if path is not None else {}, overrides, where)
    for sec, body in tree.items():
        if sec not in SECTIONS:
            raise ValueError(_unknown_key(sec, list(SECTIONS), where))
        if not isinstance(body, dict | None):
            raise ValueError(f"{where}: section {sec!r} is not a mapping")
    conf = {s: dict(tree.get(s) or {}) for s in SECTIONS}
    for k in conf["data"]:
        if k not in DATA_DEFAULTS:
            raise ValueError(_unknown_key(k, list(DATA_DEFAULTS), f"{where}: data section"))
    return conf


def model_config(section: dict, assets=None) -> ModelConfig:
    section = dict(section)
    preset = section.pop("preset", "tiny")
    if assets is not None:
        section = {**section, **assets.model_fields()}
    cfg = get_config(preset, **section)
    if assets is not None and cfg.code_vector_dim:  # any non-zero value: on, sized to the tokenizer
        cfg = dataclasses.replace(cfg, code_vector_dim=assets.vq.config.code_dim).validate()
    return cfg


def train_config(section: dict, out: Path) -> TrainConfig:
    return merge_dataclass(TrainConfig, {"out": str(out), **section}, where="train section")


def _time_step(model, dataset, cfg, tcfg, reps: int = 3) -> float:
    """Median seconds of a training step (forward + backward, AdamW excluded: it is small)."""
    n = max(1, tcfg.batch_size // tcfg.grad_accum)
    g = torch.Generator().manual_seed(0)
    times = []
    for r in range(reps + 1):
        idx = torch.randint(0, len(dataset), (n,), generator=g).tolist()
        batch = collate(cfg, [dataset[i] for i in idx])
        t = time.perf_counter()
        loss, _ = model(batch, loss=True, step=r)
        loss.backward()
        times.append((time.perf_counter() - t) * tcfg.grad_accum)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])  # the first call warms up


def model_loss(seed: int, model, batch, step):
    """The wrapped model's loss: the layout's host work eagerly, the model through the wrapper
    (DDP, FSDP2, torch.compile) with the batch's sizes dynamic (one graph for every batch)."""
    prepared = unwrap_model(model).prepare_loss(batch, step, seed)
    return model(prepared=mark_dynamic_sizes(prepared))


def train_and_save(
    model,
    dataset,
    cfg: ModelConfig,
    tcfg: TrainConfig,
    out: Path,
    *,
    stop_after=None,
    on_start=None,
) -> dict:
    """:func:`~unif2ace.train.trainer.train` of a :class:`UniF2ace` on ``dataset`` (items
    :class:`~unif2ace.models.layout.Example`, collated for ``cfg``; the loss of
    :meth:`UniF2ace.loss` seeded by ``tcfg.seed``); once the last step is done, rank 0 writes
    the final weights to ``out`` (the final checkpoint holds them whole, also under FSDP2)."""
    res = train(
        model,
        dataset,
        functools.partial(collate, cfg),
        functools.partial(model_loss, tcfg.seed),
        tcfg,
        model_config=cfg.to_dict(),
        stop_after=stop_after,
        on_start=on_start,
    )
    if int(os.environ.get("RANK", "0")) == 0 and res.get("step", 0) >= tcfg.steps:
        final = UniF2ace(cfg)
        load_checkpoint(res["checkpoint"], final)
        final.save_pretrained(out)
    res["model_dir"] = str(out)
    return res


def train_unified(
    root, recipe: dict[str, dict], *, out=None, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Train on ``root``'s SynthFace train split; the model goes to ``out`` (default
    ``root/model``), checkpoints and logs to ``out/train``. Resumes from the last checkpoint that
    verifies. Raises :class:`~unif2ace.io.FolderLocked` while another process writes ``root``'s
    assets or trains into ``out``, and :class:`~unif2ace.pipeline.assets.AssetMismatch` when
    ``out`` was trained with other assets than ``root`` holds now."""
    root = Path(root)
    out = Path(out or root / "model")
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun rank 0 alone writes
    with contextlib.ExitStack() as held:
        if rank0 and root.is_dir():  # a missing run folder: Assets says what makes one
            held.enter_context(lock_folder(root, "train", shared=True))
        assets = Assets(root)
        if rank0:
            held.enter_context(lock_folder(out, "train"))
        if (out / "model.safetensors").is_file() or list_checkpoints(out / "train"):
            check_model_assets(out, assets, training=True)
        if rank0:
            bind_model(out, assets)
        return _train_unified(assets, recipe, out, progress, stop_after)


def _train_unified(assets: Assets, recipe: dict, out: Path, progress: bool, stop_after) -> dict:
    cfg = model_config(recipe.get("model", {}), assets)
    tsec = {"progress": progress, **recipe.get("train", {})}
    budget = tsec.pop("max_minutes", None)
    tcfg = train_config(tsec, out / "train")
    data = {**DATA_DEFAULTS, **recipe.get("data", {})}
    split = prepare_split(assets, "train", progress=progress)
    dataset = UnifiedDataset(
        split,
        assets.tokenizer,
        vqa_per_image=data["vqa_per_image"],
        tasks=tuple(data["tasks"]),
        t2i_per_image=int(data["t2i_per_image"]),
        vqa_turns=int(data["vqa_turns"]),
    )
    # the initial weights come from train.seed: torch seeds its default generator at random in
    # every process, and FSDP2 ranks must start from the same model (DDP would broadcast rank 0's)
    torch.manual_seed(tcfg.seed)
    model = UniF2ace(cfg)
    model.fit_embedding_stats(split.semantic, split.identity)  # resumed runs load the same
    if cfg.code_vector_dim:
        model.set_code_vectors(assets.vq.code_vectors())
    if budget is not None:
        steps_file = out / "train" / "steps.json"
        if steps_file.is_file():
            tcfg.steps = json.loads(steps_file.read_text())["steps"]
        else:
            sec = _time_step(model, dataset, cfg, tcfg)
            tcfg.steps = max(1, int(float(budget) * 60 / sec))
            atomic_write_json(
                steps_file, {"steps": tcfg.steps, "seconds_per_step": sec, "max_minutes": budget}
            )
    res = train_and_save(model, dataset, cfg, tcfg, out, stop_after=stop_after)
    res["config"] = {"model": cfg.to_dict(), "train": dataclasses.asdict(tcfg), "data": data}
    return res
