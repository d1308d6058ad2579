"""The subcommands that train a run folder's assets: the attribute judge (``train-judge``), the
image tokenizer (``train-vq``, ``eval-vq``) and the two encoders (``train-encoders``). Each writes
its folder under ``--out`` and a ``metrics.json`` in it."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

from unif2ace.cli._common import (
    Commands,
    data_dir,
    int_options,
    nonneg_float,
    save_pairs_grid,
)
from unif2ace.data.readers import FieldMap, load_images_from_records, load_split
from unif2ace.data.synthface import draw_arrays
from unif2ace.encoders.cnn import load_encoder
from unif2ace.encoders.train import (
    attribute_accuracy,
    batched,
    cache_embeddings,
    train_identity,
    train_semantic,
    verification_auc,
)
from unif2ace.eval.judge import JUDGE_SEED_OFFSET, judge_accuracy, load_judge, train_judge
from unif2ace.io import atomic_write_json, lock_folder, save_pretrained
from unif2ace.vq.model import VQAutoencoder, VQConfig
from unif2ace.vq.train import SemanticPerceptualLoss, evaluate_vq, train_vq


def _locked(what: str):
    """Run the command holding ``--out``'s lock exclusively (:func:`unif2ace.io.lock_folder`;
    inside ``data-all`` / ``demo``, which already hold it, a no-op)."""

    def deco(run):
        @functools.wraps(run)
        def locked(args):
            with lock_folder(args.out, what):
                return run(args)

        return locked

    return deco


COMMANDS = Commands()


# ---------------------------------------------------------------------------------------------
# judge


@COMMANDS.register("train-judge", "train the attribute judge (eval only) on its own SynthFace draw")
def _add_judge(p):
    p.add_argument(
        "--data", type=Path, help="dataset folder to evaluate on (default <out>/synthface)"
    )
    p.add_argument(
        "--data-seed",
        type=int,
        default=None,
        help="seed of the dataset judged (default: read from its meta.json)",
    )
    p.add_argument(
        "--num-images",
        type=int,
        default=30_000,
        help="images drawn for the judge (its own seed; train identities only)",
    )
    # more drawn identities (and steps) is what the brows and the moustache need to be read
    # reliably (the runs: docs/results.md)
    int_options(p, steps=5000, batch=48, seed=11, width=16)
    return run_judge


@_locked("train-judge")
def run_judge(args) -> dict:
    data = data_dir(args)
    meta = json.loads((data / "meta.json").read_text())
    data_seed = args.data_seed if args.data_seed is not None else meta["seed"]
    size = meta["size"]
    t0 = time.perf_counter()
    train = draw_arrays(
        args.num_images,
        data_seed + JUDGE_SEED_OFFSET,
        size,
        meta["images_per_identity"],
        split="train",
        progress=not args.quiet,
    )
    draw_s = time.perf_counter() - t0
    judge, info = train_judge(
        train, args.steps, args.batch, seed=args.seed, width=args.width, progress=not args.quiet
    )
    out = Path(args.out) / "judge"
    save_pretrained(
        out,
        judge,
        {
            "model_type": "unif2ace-judge",
            **judge.config,
            "data_seed": data_seed + JUDGE_SEED_OFFSET,
            "seed": args.seed,
        },
    )
    test = load_split(data, "test")
    acc = judge_accuracy(judge, test.images, test.labels)
    res = {
        "test_mean_accuracy": acc["mean"],
        "test_per_attribute": acc["per_attribute"],
        "train_images": int(len(train.images)),
        "draw_seconds": round(draw_s, 1),
        "train_seconds": round(info["seconds"], 1),
        "steps": args.steps,
    }
    atomic_write_json(out / "metrics.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# image tokenizer


@COMMANDS.register(
    "train-vq", "train the FSQ/LFQ image tokenizer (64 px -> 16x16 tokens)", data=True
)
def _add_vq(p):
    p.add_argument("--records", type=Path, help="a caption record file of another dataset")
    p.add_argument("--image-field", default="image")
    p.add_argument(
        "--preset",
        choices=("default", "fast"),
        default="default",
        help="fast: a demo tokenizer in <= 4 wall minutes (1500 steps, 4 min budget)",
    )
    p.add_argument("--steps", type=int, help="default: 10000 (fast: 1500)")
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--channels", default="24,48", help="widths, one per 2x downsampling")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--quantizer", choices=("fsq", "lfq"), default="fsq")
    p.add_argument("--codebook-bits", type=int, default=10)
    p.add_argument("--downsample", type=int, default=4, choices=(4, 8), help="4: 16x16, 8: 8x8")
    p.add_argument(
        "--fsq-levels",
        default="",
        help="fsq: levels; codebook = product (default: VQConfig's, 8,8,8,8)",
    )
    p.add_argument("--decoder-channels", default="", help="decoder widths (default: --channels)")
    p.add_argument("--decoder-blocks", type=int, default=2, help="residual blocks at token grid")
    p.add_argument("--decoder-stage-blocks", type=int, default=1, help="... at each upsampling")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights (0: off)")
    p.add_argument("--edge-weight", type=float, default=0.0, help="L1 on pixel differences")
    p.add_argument(
        "--perceptual-weight",
        type=float,
        default=0.2,
        help="weight of the perceptual loss through the semantic encoder (0: off)",
    )
    p.add_argument(
        "--perceptual",
        type=Path,
        help="semantic encoder folder for the perceptual loss (default <out>/encoders/semantic; "
        "without one the loss is off, reported)",
    )
    p.add_argument(
        "--max-minutes",
        type=nonneg_float,
        help="wall-clock budget: caps the step count when the steps do not fit, recorded in "
        "vq/train_info.json (default none, so the result is the same on every run; fast: 4)",
    )
    p.add_argument(
        "--max-cpu-minutes", type=nonneg_float, help="CPU-time budget, the same way (default none)"
    )
    p.add_argument("--judge", type=Path, help="judge folder (default <out>/judge if present)")
    return run_vq


@_locked("train-vq")
def run_vq(args) -> dict:
    out = Path(args.out) / "vq"
    fast = args.preset == "fast"
    steps = args.steps or (1500 if fast else 10000)
    max_minutes = args.max_minutes if args.max_minutes is not None else (4.0 if fast else None)
    if args.records:
        images = load_images_from_records(args.records, FieldMap(image=args.image_field))
        test = None
    else:
        data = data_dir(args)
        images = load_split(data, "train", progress=not args.quiet).images
        test = load_split(data, "test")
    size = images.shape[1]
    n = {8: 3, 4: 2}[args.downsample]
    ints = lambda s: tuple(int(c) for c in s.split(",") if c.strip())  # noqa: E731
    cfg = VQConfig(
        size=size,
        downsample=args.downsample,
        channels=ints(args.channels)[:n],
        quantizer=args.quantizer,
        codebook_bits=args.codebook_bits,
        fsq_levels=ints(args.fsq_levels) or VQConfig.fsq_levels,
        decoder_channels=ints(args.decoder_channels)[:n],
        decoder_blocks=args.decoder_blocks,
        decoder_stage_blocks=args.decoder_stage_blocks,
    )
    perceptual = None
    sem_dir = args.perceptual or Path(args.out) / "encoders" / "semantic"
    if args.perceptual_weight:
        if (sem_dir / "model.safetensors").exists():
            perceptual = SemanticPerceptualLoss(load_encoder(sem_dir))
        elif args.perceptual is not None:
            raise SystemExit(f"--perceptual {sem_dir}: no model.safetensors there")
        elif not args.quiet:
            print(
                f"train-vq: no semantic encoder at {sem_dir}; training without the perceptual "
                "loss (run train-encoders first)"
            )
    model, info = train_vq(
        images,
        cfg,
        steps,
        args.batch,
        args.lr,
        out=out,
        max_minutes=max_minutes,
        progress=not args.quiet,
        ema_decay=args.ema,
        edge_weight=args.edge_weight,
        max_cpu_minutes=args.max_cpu_minutes,
        perceptual=perceptual,
        perceptual_weight=args.perceptual_weight,
    )
    _say_budget(info)
    res = {
        "train": info,
        "perceptual_encoder": str(sem_dir) if perceptual is not None else None,
        "tokens": f"{cfg.tokens_side}x{cfg.tokens_side}",
        "codebook_size": cfg.codebook_size,
        "quantizer": cfg.quantizer,
    }
    if test is not None:
        res.update(_eval_vq(model, test, args.judge or Path(args.out) / "judge", out))
    atomic_write_json(out / "metrics.json", res)
    return res


def _say_budget(info: dict) -> None:
    """State on stderr (also with --quiet) that a time budget changed the step count: the
    tokenizer then depends on this machine's speed."""
    option = {"max_minutes": "--max-minutes", "max_cpu_minutes": "--max-cpu-minutes"}
    if info["capped_by"]:
        name, wall, cpu = (
            info["capped_by"],
            info["seconds_per_step_timed"],
            info["cpu_seconds_per_step_timed"],
        )
        pace = "" if wall is None else f" (timed here: {wall:.3f} s, {cpu:.3f} CPU s a step)"
        print(
            f"train-vq: {option[name]} {info[name]:g} caps training at {info['steps_planned']} of "
            f"{info['steps']} steps{pace}; the tokenizer depends on this machine's speed "
            "(recorded in vq/train_info.json)",
            file=sys.stderr,
        )
    if info["budget_spent"]:
        print(
            f"train-vq: stopped at step {info['steps_done']} of {info['steps_planned']}: the time "
            "budget is spent; rerun the same command with a larger budget to continue",
            file=sys.stderr,
        )


def _eval_vq(model, test, judge_dir: Path, out: Path) -> dict:
    m, recs = evaluate_vq(model, test.images)
    res = {"test": m}
    if (judge_dir / "model.safetensors").exists():
        judge = load_judge(judge_dir)
        a_orig = judge_accuracy(judge, test.images, test.labels)
        a_rec = judge_accuracy(judge, recs, test.labels)
        res["judge"] = {
            "originals_mean": a_orig["mean"],
            "reconstructions_mean": a_rec["mean"],
            "ratio": a_rec["mean"] / a_orig["mean"],
            "reconstructions_per_attribute": a_rec["per_attribute"],
        }
    save_pairs_grid(test.images[:32], recs[:32], out / "reconstructions.png")
    return res


@COMMANDS.register(
    "eval-vq", "evaluate a trained image tokenizer: PSNR, codebook usage, judge accuracy", data=True
)
def _add_eval_vq(p):
    p.add_argument("--vq", type=Path, help="tokenizer folder (default <out>/vq)")
    p.add_argument("--judge", type=Path, help="judge folder (default <out>/judge)")
    return run_eval_vq


def run_eval_vq(args) -> dict:
    vq_dir = args.vq or Path(args.out) / "vq"
    model = VQAutoencoder.from_pretrained(vq_dir)
    test = load_split(data_dir(args), "test")
    res = _eval_vq(model, test, args.judge or Path(args.out) / "judge", vq_dir)
    atomic_write_json(vq_dir / "eval_metrics.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# encoders


@COMMANDS.register(
    "train-encoders",
    "train the semantic (CLIP stand-in) and identity encoders, cache embeddings",
    data=True,
)
def _add_enc(p):
    int_options(p, semantic_steps=1000, identity_steps=2000, batch=64, width=16)
    return run_encoders


@_locked("train-encoders")
def run_encoders(args) -> dict:
    data = data_dir(args)
    out = Path(args.out) / "encoders"
    train = load_split(data, "train", progress=not args.quiet)
    sem, sinfo = train_semantic(
        train, args.semantic_steps, args.batch, width=args.width, progress=not args.quiet
    )
    save_pretrained(out / "semantic", sem, {"model_type": "unif2ace-semantic", **sem.config})
    ide, iinfo = train_identity(
        train, args.identity_steps, args.batch, width=args.width, progress=not args.quiet
    )
    save_pretrained(out / "identity", ide, {"model_type": "unif2ace-identity", **ide.config})
    res = {
        "semantic_train_seconds": round(sinfo["seconds"], 1),
        "identity_train_seconds": round(iinfo["seconds"], 1),
    }
    for split in ("train", "val", "test"):
        arr = train if split == "train" else load_split(data, split)
        s_emb = batched(sem.embed, arr.images)
        i_emb = batched(ide.embed, arr.images)
        cache_embeddings(out / "embeddings" / f"semantic_{split}.safetensors", s_emb, arr.ids)
        cache_embeddings(out / "embeddings" / f"identity_{split}.safetensors", i_emb, arr.ids)
        if split == "test":
            res["semantic_test_attribute_accuracy"] = attribute_accuracy(
                batched(sem, arr.images), arr.labels
            )["mean"]
            res["identity_test_verification"] = verification_auc(i_emb, arr.identities)
    atomic_write_json(out / "metrics.json", res)
    return res
