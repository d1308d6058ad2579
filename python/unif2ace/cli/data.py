"""The dataset subcommands (``make-data``, ``train-text-tokenizer``) and ``data-all``, which runs
the whole data pipeline: the dataset, then the assets of :mod:`unif2ace.cli.assets`.

The data steps hold the run folder's lock exclusively (:func:`unif2ace.io.lock_folder`; a
training holds it shared), and ``data-all`` does not redraw a folder that already holds finished
assets unless given ``--force``."""

from __future__ import annotations

import time
from pathlib import Path

from unif2ace.cli import assets
from unif2ace.cli._common import Commands, data_dir, run_command
from unif2ace.data.readers import FieldMap, dataset_stats, read_records
from unif2ace.data.synthface import SynthFaceConfig, generate
from unif2ace.data.text_tokenizer import TextTokenizer, synthface_texts
from unif2ace.io import atomic_write_json, lock_folder
from unif2ace.pipeline.assets import finished_assets, trained_models

COMMANDS = Commands()
# the data pipeline, in order: the encoders come before the image tokenizer, whose perceptual loss
# runs through the semantic encoder
DATA_STEPS = ("make-data", "train-text-tokenizer", "train-judge", "train-encoders", "train-vq")


def run_data_step(name: str, args, extra: list[str]) -> dict:
    """Run the data step ``name`` (one of :data:`DATA_STEPS`) with ``args``' output folder,
    threads and quietness, and the step's own arguments ``extra``, holding the folder's lock."""
    with lock_folder(args.out, name):
        return run_command({**COMMANDS, **assets.COMMANDS}, name, args, extra)


# ---------------------------------------------------------------------------------------------
# make-data


@COMMANDS.register("make-data", "draw the SynthFace dataset (images, captions, VQA, attributes)")
def _add_make_data(p):
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side, 32..256 (default 64)")
    p.add_argument("--images-per-identity", type=int, default=8)
    p.add_argument(
        "--vqa-per-image",
        type=int,
        default=None,
        help="questions per image (default: SynthFaceConfig's, 8)",
    )
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    return run_make_data


def run_make_data(args) -> dict:
    with lock_folder(args.out, "make-data"):
        return _make_data(args)


def _make_data(args) -> dict:
    per_image = args.vqa_per_image
    cfg = SynthFaceConfig(
        args.num_images,
        args.seed,
        args.size,
        args.images_per_identity,
        SynthFaceConfig.vqa_per_image if per_image is None else per_image,
    )
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
    atomic_write_json(Path(args.out) / "synthface" / "stats.json", res)
    return res


# ---------------------------------------------------------------------------------------------
# text tokenizer


@COMMANDS.register(
    "train-text-tokenizer", "train the byte-level BPE text tokenizer on captions + VQA", data=True
)
def _add_text_tok(p):
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
    with lock_folder(args.out, "train-text-tokenizer"):
        return _text_tokenizer(args)


def _text_tokenizer(args) -> dict:
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
        it = synthface_texts(data_dir(args))
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
# data-all


@COMMANDS.register(
    "data-all",
    "the whole data pipeline into one folder: data, text tokenizer, judge, "
    "encoders, image tokenizer; writes <out>/report.json",
)
def _add_all(p):
    p.add_argument("--num-images", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--format", choices=("jsonl", "parquet"), default="jsonl")
    p.add_argument("--fast", action="store_true", help="tiny step counts (smoke test)")
    p.add_argument(
        "--force",
        action="store_true",
        help="redraw a folder that already holds finished assets (a model trained on them then "
        "no longer matches them and must be retrained)",
    )
    return run_all


def check_redraw(out, force: bool) -> None:
    """Refuse (ValueError) to redraw a folder holding finished assets unless ``force``; forced,
    remove what would let a step keep an old asset (the image tokenizer resumes a finished
    training from ``vq/train_state.pt``)."""
    out = Path(out)
    done = finished_assets(out)
    if done and not force:
        models = ", ".join(str(m) for m in trained_models(out))
        bound = f", and the trained model in {models} would no longer match them" if models else ""
        raise ValueError(
            f"{out} already holds finished assets ({', '.join(done)}){bound}; "
            "pass --force to redraw them all, or use another --out"
        )
    if force:
        (out / "vq" / "train_state.pt").unlink(missing_ok=True)


def run_all(args) -> dict:
    # SynthFace splits by identity (images_per_identity each): fewer than two identities and one
    # more image leave a split empty
    least = 2 * SynthFaceConfig().images_per_identity + 1
    if args.num_images < least:
        raise ValueError(
            f"--num-images {args.num_images}: data-all needs at least {least} images "
            f"(train, val and test each hold whole identities of "
            f"{SynthFaceConfig().images_per_identity} images)"
        )
    with lock_folder(args.out, "data-all"):
        check_redraw(args.out, args.force)
        return _all(args)


def _all(args) -> dict:
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
        "train-encoders": ["--semantic-steps", "10", "--identity-steps", "10"] if fast else [],
        "train-vq": ["--steps", "20"] if fast else [],
    }
    report = {}
    for name, extra in steps.items():
        t0 = time.perf_counter()
        report[name] = run_data_step(name, args, extra)
        report[name]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(Path(args.out) / "report.json", report)
    return report
