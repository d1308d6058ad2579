"""The model's subcommands: ``train``, ``generate``, ``answer``, ``caption``, ``evaluate`` and
``ablate`` (each on a run folder that ``unif2ace data-all`` made)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from unif2ace.cli import paper, showo
from unif2ace.cli._common import (
    Commands,
    int_options,
    pos_int,
    save_grid,
    writable_file,
    writable_folder,
)
from unif2ace.data.readers import load_split
from unif2ace.eval.judge import load_judge
from unif2ace.eval.model_eval import evaluate_model, summary_rows
from unif2ace.io import atomic_write_bytes, atomic_write_json
from unif2ace.models import UniF2ace
from unif2ace.pipeline import (
    Assets,
    Pipeline,
    check_images,
    check_resume,
    check_run_folder,
    prepare_split,
    read_recipe,
    train_unified,
)
from unif2ace.pipeline.assets import check_model_assets
from unif2ace.pipeline.paper import PaperPipeline, is_paper_run
from unif2ace.pipeline.recipe import model_config

COMMANDS = Commands()


# ---------------------------------------------------------------------------------------------
# train


@COMMANDS.register(
    "train",
    "train UniF2ace on a run folder (after data-all); resumes after a kill",
    recipe=True,
    writes_out=False,
)
def _add_train(p):
    p.add_argument("--model-dir", type=Path, help="where the model goes (default <out>/model)")
    return run_train


def prepare_training(root, recipe: dict, model_dir) -> None:
    """What a training run checks before it starts: the run folder's assets and data, an output
    folder it can write, and (when it resumes) the same recipe as the run it resumes; the notes
    of :func:`check_resume` go to stderr."""
    check_run_folder(root, need=("assets", "data"))
    model_config(recipe.get("model", {}), Assets(root))  # a bad key or value: named first
    writable_folder(model_dir, "--model-dir")
    for note in check_resume(recipe, model_dir):
        print(f"note: {note}", file=sys.stderr)


def run_train(args) -> dict:
    if is_paper_run(args.out):  # a run started from Show-o (unif2ace init --from-showo)
        return paper.train(args)
    recipe = read_recipe(args.config, args.set)
    prepare_training(args.out, recipe, args.model_dir or Path(args.out) / "model")
    res = train_unified(args.out, recipe, out=args.model_dir, progress=not args.quiet)
    return {k: res[k] for k in ("step", "loss", "seconds", "model_dir") if k in res}


# ---------------------------------------------------------------------------------------------
# inference


def _infer_args(p):
    p.add_argument("--model-dir", type=Path, help="model folder (default <out>/model)")


def _pipeline(args):
    """The run's pipeline: a run started from Show-o (``unif2ace init --from-showo``) or a
    SynthFace run folder."""
    if is_paper_run(args.out):
        return PaperPipeline(args.out, args.model_dir)
    return Pipeline.load(args.out, args.model_dir)


def _decode_args(p):
    p.add_argument("--steps", type=pos_int, help="MaskGIT decode steps (12; Show-o: 18)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale (2.0; Show-o: 5.0)"
    )
    p.add_argument("--seed", type=int, default=0)


def _decode_defaults(args, showo: bool) -> None:
    """The unset decoding options: the demo's (12 steps, guidance 2, 4 per prompt) or Show-o's
    (18 steps, guidance 5, 1 per prompt)."""
    for name, demo, released in (("steps", 12, 18), ("guidance", 2.0, 5.0), ("per_prompt", 4, 1)):
        if getattr(args, name, 0) is None:
            setattr(args, name, released if showo else demo)


@COMMANDS.register(
    "generate", "text -> faces: a PNG grid (MaskGIT decoding with guidance)", writes_out=False
)
def _add_generate(p):
    _infer_args(p)
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    p.add_argument("--per-prompt", type=pos_int, help="samples per prompt (4; Show-o: 1)")
    _decode_args(p)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grid", type=Path, help="output PNG (default <out>/samples/generate.png)")
    showo.add_options(p, generate=True)
    return run_generate


def run_generate(args) -> dict:
    _decode_defaults(args, showo=args.showo is not None or is_paper_run(args.out))
    if args.showo is not None:  # the released Show-o: one PNG per sample under --out
        return showo.generate(args)
    pipe = _pipeline(args)  # first: a missing run folder is named as such
    path = writable_file(args.grid or Path(args.out) / "samples" / "generate.png", "--grid")
    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    images = pipe.generate(
        prompts,
        steps=args.steps,
        guidance=args.guidance,
        temperature=args.temperature,
        seed=args.seed,
    )
    save_grid(images, path, cols=args.per_prompt)
    return {"grid": str(path), "images": len(images)}


def _load_images(paths, size):
    """Image files -> ``uint8 [N, size, size, 3]``, checked by :func:`pipeline.check_images`. A
    file that is not a readable image (another format, empty, truncated) is a ValueError naming
    it."""
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            with Image.open(p) as im:
                im.load()  # decode now: a truncated file fails here, not later
                out.append(check_images(im, size)[0])
        except (OSError, SyntaxError) as e:  # PIL: UnidentifiedImageError, "truncated", ...
            raise ValueError(f"{p}: not a readable image file ({e})") from None
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return np.stack(out)


@COMMANDS.register("answer", "image + question -> answer", writes_out=False, out_optional=True)
def _add_answer(p):
    _infer_args(p)
    p.add_argument("--image", nargs="+", type=Path, required=True)
    p.add_argument("--question", nargs="+", required=True, help="one question, or one per image")
    showo.add_options(p, generate=False)
    return run_answer


def run_answer(args) -> dict:
    if args.showo is not None:
        return showo.answer(args)
    if args.out is None:
        raise ValueError("--out RUN (a run folder) or --showo DIR (a released Show-o) is required")
    pipe = _pipeline(args)
    images = _load_images(args.image, pipe.image_size)
    qs = args.question * len(images) if len(args.question) == 1 else args.question
    answers = pipe.answer(images, qs)
    return {
        "answers": [
            {"image": str(i), "question": q, "answer": a}
            for i, q, a in zip(args.image, qs, answers)
        ]
    }


@COMMANDS.register("caption", "image -> fine-grained caption", writes_out=False)
def _add_caption(p):
    _infer_args(p)
    p.add_argument("--image", nargs="+", type=Path, required=True)
    return run_caption


def run_caption(args) -> dict:
    pipe = _pipeline(args)
    caps = pipe.caption(_load_images(args.image, pipe.image_size))
    return {"captions": [{"image": str(i), "caption": c} for i, c in zip(args.image, caps)]}


# ---------------------------------------------------------------------------------------------
# evaluate


@COMMANDS.register(
    "evaluate",
    "score a trained model on the SynthFace test split (metrics.json + .md)",
    writes_out=False,
)
def _add_eval(p):
    _infer_args(p)
    p.add_argument("--split", default="test")
    int_options(p, minimum=0, n_gen=256, n_vqa=512, n_cap=256)
    _decode_args(p)
    p.add_argument("--report", type=Path, help="folder (default <model-dir>/eval)")
    return run_evaluate


def evaluate_run(
    root,
    model_dir=None,
    *,
    split="test",
    n_gen=256,
    n_vqa=512,
    n_cap=256,
    steps=12,
    guidance=2.0,
    seed=0,
    progress=True,
    report=None,
) -> tuple[dict, dict]:
    root = Path(root)
    model_dir = Path(model_dir or root / "model")
    check_run_folder(root, need=("assets", "data", "judge"), model_dir=model_dir)
    report = writable_folder(report or model_dir / "eval", "--report")
    assets = Assets(root)
    check_model_assets(model_dir, assets)
    model = UniF2ace.from_pretrained(model_dir)
    test = prepare_split(assets, split, progress=progress)
    train_labels = prepare_split(assets, "train", progress=progress).labels
    judge = load_judge(root / "judge")
    real = load_split(root / "synthface", split, limit=n_gen).images
    m, samples = evaluate_model(
        model,
        assets,
        test,
        judge,
        train_labels=train_labels,
        real_images=real,
        n_gen=n_gen,
        n_vqa=n_vqa,
        n_cap=n_cap,
        steps=steps,
        guidance=guidance,
        seed=seed,
        progress=progress,
    )
    atomic_write_json(report / "metrics.json", m)
    table = "| metric | value |\n|---|---|\n" + "".join(
        f"| {a} | {b} |\n" for a, b in summary_rows(m)
    )
    atomic_write_bytes(report / "metrics.md", table.encode())
    return m, samples


def run_evaluate(args) -> dict:
    if is_paper_run(args.out):  # the held-out loss of a run started from Show-o
        return paper.evaluate(args)
    _decode_defaults(args, showo=False)
    m, _ = evaluate_run(
        args.out,
        args.model_dir,
        split=args.split,
        n_gen=args.n_gen,
        n_vqa=args.n_vqa,
        n_cap=args.n_cap,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        progress=not args.quiet,
        report=args.report,
    )
    return dict(summary_rows(m))


# ---------------------------------------------------------------------------------------------
# ablations (paper Tables 3 and 4 at our scale)

ABLATIONS = {
    "D3Diff (alpha=0.01)": [],
    "mask-only (alpha=0)": ["model.alpha=0"],
    "score-only (w_ce=0, alpha=1)": ["model.w_ce=0", "model.alpha=1"],
    "no token MoE": ["model.token_moe=false"],
    "no sequence MoE": ["model.seq_moe=false"],
}


@COMMANDS.register(
    "ablate",
    "train and score D3Diff vs mask-only vs score-only, token/sequence MoE on/off",
    recipe=True,
    writes_out=False,
)
def _add_ablate(p):
    p.add_argument("--only", nargs="*", help="a subset of the variants (by index, 0-based)")
    int_options(p, minimum=0, n_gen=128, n_vqa=256, n_cap=128)
    return run_ablate


def ablation_table(res: dict) -> str:
    """The markdown table of ``{variant: {"metrics", "seconds"}}``, with a last row of the chance
    levels (they depend on the test items only, the same for every variant)."""
    nan = float("nan")
    lines = [
        "| variant | gen. attribute acc. | Fréchet (judge) | VQA | caption F1 | minutes |",
        "|---|---|---|---|---|---|",
    ]
    order = list(ABLATIONS)  # results.json comes back with its keys sorted
    for name in sorted(res, key=lambda n: order.index(n) if n in order else len(order)):
        r, m = res[name], res[name]["metrics"]
        g, v, c = m.get("generation", {}), m.get("vqa", {}), m.get("caption", {})
        lines.append(
            f"| {name} | {g.get('mean', nan):.3f} | {m.get('frechet_judge', nan):.0f} | "
            f"{v.get('accuracy', nan):.3f} | {c.get('f1', nan):.3f} | "
            f"{r['seconds'] / 60:.1f} |"
        )
    if res:
        m = next(iter(res.values()))["metrics"]
        ch = m.get("generation", {}).get("chance", {})
        floor = m.get("frechet_judge_real_vs_real")
        lines.append(
            f"| chance | {ch.get('majority_mean', nan):.3f} (majority value) | "
            f"{'–' if floor is None else f'{floor:.0f} (real vs real)'} | "
            f"{m.get('vqa', {}).get('chance', nan):.3f} (blind) | "
            f"{m.get('caption', {}).get('chance_f1', nan):.3f} | |"
        )
    return "\n".join(lines) + "\n"


def run_ablate(args) -> dict:
    names = list(ABLATIONS)
    if args.only:
        bad = [i for i in args.only if not (i.isdigit() and int(i) < len(names))]
        if bad:
            raise ValueError(f"--only {' '.join(bad)}: variants are numbered 0..{len(names) - 1}")
        names = [names[int(i)] for i in args.only]
    folder = Path(args.out) / "ablations"
    recipes = {name: read_recipe(args.config, [*args.set, *ABLATIONS[name]]) for name in names}
    for name in names:  # every variant checked before the first trains
        prepare_training(args.out, recipes[name], folder / str(list(ABLATIONS).index(name)))
    res = {}
    for name in names:
        recipe = recipes[name]
        model_dir = folder / f"{list(ABLATIONS).index(name)}"
        t0 = time.perf_counter()
        train_unified(args.out, recipe, out=model_dir, progress=not args.quiet)
        m, _ = evaluate_run(
            args.out,
            model_dir,
            n_gen=args.n_gen,
            n_vqa=args.n_vqa,
            n_cap=args.n_cap,
            progress=not args.quiet,
        )
        res[name] = {"metrics": m, "seconds": round(time.perf_counter() - t0, 1)}
        # after every variant, so a killed run keeps the rows it finished
        atomic_write_bytes(folder / "table.md", ablation_table(res).encode())
        atomic_write_json(folder / "results.json", res)
    print(ablation_table(res))
    return {"table": str(folder / "table.md")}
