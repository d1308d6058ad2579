"""The ``unif2ace`` command.

Subcommands register themselves in ``COMMANDS`` (name -> (add_arguments, run)); later parts of the
package add theirs (``train``, ``generate``, ``demo``...) with :func:`register`. Every command
writes under one output folder (``--out``); the data commands use these sub-folders::

    <out>/synthface/        the dataset (make-data)
    <out>/text_tokenizer/   tokenizer.json (train-text-tokenizer)
    <out>/judge/            attribute judge + metrics.json (train-judge)
    <out>/encoders/         semantic/, identity/, embeddings/, metrics.json (train-encoders)
    <out>/vq/               image tokenizer + metrics.json (train-vq; its perceptual loss runs
                            through encoders/semantic, so train-encoders comes first)
    <out>/report.json       everything measured (data-all)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

COMMANDS: dict[str, tuple[Callable, str]] = {}


def register(name: str, help: str):
    """Decorator for a function ``add(parser)`` that adds a subcommand's arguments and returns the
    function that runs it (``run(args) -> dict | None``; the dict is printed as JSON)."""

    def deco(add):
        COMMANDS[name] = (add, help)
        return add

    return deco


def _common(p: argparse.ArgumentParser):
    p.add_argument("--out", required=True, type=Path, help="output folder (everything goes here)")
    # default 1: on a shared 2-core machine two OpenMP threads spin-wait on each other; measured
    # 0.6 s vs ~8 s per judge training step under a load average of ~150
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _data_dir(args) -> Path:
    return Path(args.data) if getattr(args, "data", None) else Path(args.out) / "synthface"


def _print(obj):
    print(json.dumps(obj, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# make-data


@register("make-data", "draw the SynthFace dataset (images, captions, VQA, attributes)")
def _add_make_data(p):
    _common(p)
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side, 32..256 (default 64)")
    p.add_argument("--images-per-identity", type=int, default=8)
    p.add_argument("--vqa-per-image", type=int, default=None,
                   help="questions per image (default: SynthFaceConfig's, 8)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    return run_make_data


def run_make_data(args) -> dict:
    from unif2ace.data.readers import dataset_stats
    from unif2ace.data.synthface import SynthFaceConfig, generate

    per_image = args.vqa_per_image
    cfg = SynthFaceConfig(
        args.num_images, args.seed, args.size, args.images_per_identity,
        SynthFaceConfig.vqa_per_image if per_image is None else per_image,
    )  # fmt: skip
    meta = generate(
        Path(args.out) / "synthface",
        cfg,
        workers=args.workers,
        fmt=args.format,
        progress=not args.quiet,
    )
    stats = dataset_stats(Path(args.out) / "synthface")
    res = {
        "seconds": round(meta["seconds"], 2),
        "num_images": meta["num_images"],
        "num_vqa": meta["num_vqa"],
        "splits": meta["splits"],
        "categories": stats["categories"],
        "values": stats["values"],
        "caption_attributes_mean": {
            s: round(stats[s]["caption_attributes_mean"], 3)
            for s in ("train", "val", "test")
            if s in stats
        },
        "train_missing_values": stats.get("train", {}).get("missing_values"),
    }
    _save_metrics(Path(args.out) / "synthface" / "stats.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# text tokenizer


@register("train-text-tokenizer", "train the byte-level BPE text tokenizer on captions + VQA")
def _add_text_tok(p):
    _common(p)
    p.add_argument("--data", type=Path, help="dataset folder (default <out>/synthface)")
    p.add_argument(
        "--records",
        type=Path,
        nargs="*",
        help="caption record files of another dataset instead of --data",
    )
    p.add_argument("--text-field", default="caption")
    p.add_argument("--vocab-size", type=int, default=4096)
    return run_text_tokenizer


def run_text_tokenizer(args) -> dict:
    from unif2ace.data.readers import FieldMap, read_records
    from unif2ace.data.text_tokenizer import TextTokenizer, synthface_texts

    t0 = time.perf_counter()
    if args.records:

        def texts():
            for f in args.records:
                recs, _ = read_records(
                    f, "caption", FieldMap(text=args.text_field), check_images=False
                )
                for r in recs:
                    yield from r.texts

        it = texts()
    else:
        it = synthface_texts(_data_dir(args))
    tok = TextTokenizer.train(it, vocab_size=args.vocab_size)
    out = Path(args.out) / "text_tokenizer"
    tok.save(out)
    res = {
        "vocab_size": tok.vocab_size,
        "seconds": round(time.perf_counter() - t0, 2),
        "path": str(out / "tokenizer.json"),
    }
    return res


# ---------------------------------------------------------------------------------------------
# judge


@register("train-judge", "train the attribute judge (eval only) on its own SynthFace draw")
def _add_judge(p):
    _common(p)
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
    # measured on the 10k default set: 30k drawn / 5000 steps -> 98.6 % mean test accuracy in
    # 9.9 min; 12k / 3000 -> 96.7 % (more identities is what the brows and the moustache needed)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=48)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--width", type=int, default=16)
    return run_judge


def run_judge(args) -> dict:
    from unif2ace.data.io import save_pretrained
    from unif2ace.data.readers import load_split
    from unif2ace.data.synthface import draw_arrays
    from unif2ace.eval.judge import JUDGE_SEED_OFFSET, judge_accuracy, train_judge

    data = _data_dir(args)
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
    _save_metrics(out / "metrics.json", res)
    return res


def load_judge(folder):
    from unif2ace.data.io import load_pretrained_state
    from unif2ace.eval.judge import AttributeJudge

    state, cfg = load_pretrained_state(folder)
    j = AttributeJudge(cfg["width"], cfg["size"])
    j.load_state_dict(state)
    return j.eval()


# ---------------------------------------------------------------------------------------------
# image tokenizer


@register("train-vq", "train the FSQ/LFQ image tokenizer (64 px -> 16x16 tokens)")
def _add_vq(p):
    _common(p)
    p.add_argument("--data", type=Path, help="dataset folder (default <out>/synthface)")
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
    p.add_argument("--fsq-levels", default="",
                   help="fsq: levels; codebook = product (default: VQConfig's, 8,8,8,8)")  # fmt: skip
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
    p.add_argument("--max-minutes", type=float, help="wall budget (default 30; fast: 4)")
    p.add_argument("--max-cpu-minutes", type=float, default=14.0, help="CPU-time budget")
    p.add_argument("--judge", type=Path, help="judge folder (default <out>/judge if present)")
    return run_vq


def run_vq(args) -> dict:
    from unif2ace.data.readers import FieldMap, load_images_from_records, load_split
    from unif2ace.vq.model import VQConfig
    from unif2ace.vq.train import train_vq

    out = Path(args.out) / "vq"
    fast = args.preset == "fast"
    steps = args.steps or (1500 if fast else 10000)
    max_minutes = args.max_minutes if args.max_minutes is not None else (4.0 if fast else 30.0)
    if args.records:
        images = load_images_from_records(args.records, FieldMap(image=args.image_field))
        test = None
    else:
        data = _data_dir(args)
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
            from unif2ace.vq.train import SemanticPerceptualLoss

            perceptual = SemanticPerceptualLoss(load_encoder(sem_dir))
        elif args.perceptual is not None:
            raise SystemExit(f"--perceptual {sem_dir}: no model.safetensors there")
        elif not args.quiet:
            print(f"train-vq: no semantic encoder at {sem_dir}; training without the perceptual "
                  "loss (run train-encoders first)")  # fmt: skip
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
    res = {
        "train": info,
        "perceptual_encoder": str(sem_dir) if perceptual is not None else None,
        "tokens": f"{cfg.tokens_side}x{cfg.tokens_side}",
        "codebook_size": cfg.codebook_size,
        "quantizer": cfg.quantizer,
    }
    if test is not None:
        res.update(_eval_vq(model, test, args.judge or Path(args.out) / "judge", out))
    _save_metrics(out / "metrics.json", res)
    return res


def _eval_vq(model, test, judge_dir: Path, out: Path) -> dict:
    from unif2ace.eval.judge import judge_accuracy
    from unif2ace.vq.train import evaluate_vq

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
    _save_grid(test.images[:32], recs[:32], out / "reconstructions.png")
    return res


@register("eval-vq", "evaluate a trained image tokenizer: PSNR, codebook usage, judge accuracy")
def _add_eval_vq(p):
    _common(p)
    p.add_argument("--data", type=Path, help="dataset folder (default <out>/synthface)")
    p.add_argument("--vq", type=Path, help="tokenizer folder (default <out>/vq)")
    p.add_argument("--judge", type=Path, help="judge folder (default <out>/judge)")
    return run_eval_vq


def run_eval_vq(args) -> dict:
    from unif2ace.data.readers import load_split
    from unif2ace.vq.model import VQAutoencoder

    vq_dir = args.vq or Path(args.out) / "vq"
    model = VQAutoencoder.from_pretrained(vq_dir)
    test = load_split(_data_dir(args), "test")
    res = _eval_vq(model, test, args.judge or Path(args.out) / "judge", vq_dir)
    _save_metrics(vq_dir / "eval_metrics.json", res)
    return res


def _save_grid(orig, recs, path):
    import numpy as np
    from PIL import Image

    rows = [np.concatenate(list(orig[i : i + 8]), 1) for i in range(0, len(orig), 8)]
    rrows = [np.concatenate(list(recs[i : i + 8]), 1) for i in range(0, len(recs), 8)]
    grid = np.concatenate([x for pair in zip(rows, rrows) for x in pair], 0)
    Image.fromarray(grid).save(path)


# ---------------------------------------------------------------------------------------------
# encoders


@register(
    "train-encoders", "train the semantic (CLIP stand-in) and identity encoders, cache embeddings"
)
def _add_enc(p):
    _common(p)
    p.add_argument("--data", type=Path, help="dataset folder (default <out>/synthface)")
    p.add_argument("--semantic-steps", type=int, default=1000)
    p.add_argument("--identity-steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    return run_encoders


def run_encoders(args) -> dict:
    from unif2ace.data.io import save_pretrained
    from unif2ace.data.readers import load_split
    from unif2ace.encoders.train import (
        attribute_accuracy,
        batched,
        cache_embeddings,
        train_identity,
        train_semantic,
        verification_auc,
    )

    data = _data_dir(args)
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
    _save_metrics(out / "metrics.json", res)
    return res


def load_encoder(folder):
    """A trained SemanticEncoder or IdentityEncoder from its folder."""
    from unif2ace.data.io import load_pretrained_state
    from unif2ace.encoders.cnn import IdentityEncoder, SemanticEncoder

    state, cfg = load_pretrained_state(folder)
    cls = SemanticEncoder if cfg["kind"] == "semantic" else IdentityEncoder
    m = cls(cfg["width"], cfg["dim"], cfg["size"])
    m.load_state_dict(state)
    return m.eval()


# ---------------------------------------------------------------------------------------------
# data-all


@register(
    "data-all",
    "the whole data pipeline into one folder: data, text tokenizer, judge, "
    "encoders, image tokenizer; writes <out>/report.json",
)
def _add_all(p):
    _common(p)
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--fast", action="store_true", help="tiny step counts (smoke test)")
    return run_all


def run_all(args) -> dict:
    parser = build_parser()
    common = ["--out", str(args.out), "--threads", str(args.threads)] + (
        ["--quiet"] if args.quiet else []
    )
    fast = args.fast
    steps = {
        "make-data": [
            "--num-images",
            str(args.num_images),
            "--seed",
            str(args.seed),
            "--size",
            str(args.size),
            "--workers",
            str(args.workers),
            "--format",
            args.format,
        ],
        "train-text-tokenizer": ["--vocab-size", "1024" if fast else "4096"],
        "train-judge": ["--steps", "20", "--num-images", "600"] if fast else [],
        # the encoders come before the image tokenizer: its perceptual loss runs through the
        # semantic encoder
        "train-encoders": ["--semantic-steps", "10", "--identity-steps", "10"] if fast else [],
        "train-vq": ["--steps", "20"] if fast else [],
    }
    report = {}
    for name, extra in steps.items():
        sub = parser.parse_args([name, *common, *extra])
        t0 = time.perf_counter()
        report[name] = sub.func(sub)
        report[name]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    _save_metrics(Path(args.out) / "report.json", report)
    return report


# ---------------------------------------------------------------------------------------------


def _save_metrics(path, obj):
    from unif2ace.data.io import atomic_write_json

    atomic_write_json(path, obj)


def build_parser() -> argparse.ArgumentParser:
    import unif2ace.cli_model  # noqa: F401  (registers the model's subcommands)

    parser = argparse.ArgumentParser(prog="unif2ace", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=add(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "threads"):
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        res = args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"unif2ace {args.command}: error: {e}", file=sys.stderr)
        return 2
    if res is not None and args.command != "data-all":
        _print(res)
    elif res is not None:
        print(f"report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    from unif2ace.cli import main as _main  # the registry lives in the imported module

    sys.exit(_main())
