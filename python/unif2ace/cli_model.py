"""The model's subcommands of the ``unif2ace`` command: train, generate, answer, caption, evaluate,
ablate and demo (the data subcommands are in :mod:`unif2ace.cli`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from unif2ace.cli import _common, _save_metrics, build_parser, register


def _recipe_args(p):
    p.add_argument("--config", type=Path, help="YAML recipe (sections model, train, data)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help="overrides, e.g. train.steps=200 model.alpha=0")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# train


@register("train", "train UniF2ace on a run folder (after data-all); resumes after a kill")
def _add_train(p):
    _common(p)
    _recipe_args(p)
    p.add_argument("--model-dir", type=Path, help="where the model goes (default <out>/model)")
    return run_train


def run_train(args) -> dict:
    from unif2ace.train.unified import read_recipe, train_unified

    recipe = read_recipe(args.config, args.set)
    res = train_unified(args.out, recipe, out=args.model_dir, progress=not args.quiet)
    return {k: res[k] for k in ("step", "loss", "seconds", "model_dir") if k in res}


# ---------------------------------------------------------------------------------------------
# inference


def _pipeline(args):
    from unif2ace.pipeline import Pipeline

    return Pipeline.load(args.out, args.model_dir)


def _infer_args(p):
    _common(p)
    p.add_argument("--model-dir", type=Path, help="model folder (default <out>/model)")


def _decode_args(p):
    p.add_argument("--steps", type=int, default=12, help="MaskGIT decode steps")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)


def save_grid(images, path, cols: int = 8, labels: list[str] | None = None, scale: int = 2) -> None:
    """A PNG grid of ``uint8 [N, H, W, 3]`` images (with short labels under each when given)."""
    from PIL import Image, ImageDraw

    from unif2ace.data.io import atomic_write_bytes

    n = len(images)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    h, w = images.shape[1] * scale, images.shape[2] * scale
    lab = 12 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + lab)), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(Image.fromarray(im).resize((w, h), Image.NEAREST), (c * w, r * (h + lab)))
        if labels:
            draw.text((c * w + 2, r * (h + lab) + h), labels[i][: w // 6], fill="black")
    import io

    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


@register("generate", "text -> faces: a PNG grid (MaskGIT decoding with guidance)")
def _add_generate(p):
    _infer_args(p)
    p.add_argument("--prompt", nargs="+", required=True, help="one or more prompts")
    p.add_argument("--per-prompt", type=int, default=4, help="samples per prompt")
    _decode_args(p)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--grid", type=Path, help="output PNG (default <out>/samples/generate.png)")
    return run_generate


def run_generate(args) -> dict:
    pipe = _pipeline(args)
    prompts = [p for p in args.prompt for _ in range(args.per_prompt)]
    images = pipe.generate(prompts, steps=args.steps, guidance=args.guidance,
                           temperature=args.temperature, seed=args.seed)  # fmt: skip
    path = args.grid or Path(args.out) / "samples" / "generate.png"
    save_grid(images, path, cols=args.per_prompt)
    return {"grid": str(path), "images": len(images)}


def _load_images(paths, size):
    """Image files -> ``uint8 [N, size, size, 3]``, checked by :func:`pipeline.check_images`."""
    from PIL import Image

    from unif2ace.pipeline import check_images

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"image not found: {p}")
        try:
            out.append(check_images(Image.open(p), size)[0])
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    return np.stack(out)


@register("answer", "image + question -> answer")
def _add_answer(p):
    _infer_args(p)
    p.add_argument("--image", nargs="+", type=Path, required=True)
    p.add_argument("--question", nargs="+", required=True, help="one question, or one per image")
    return run_answer


def run_answer(args) -> dict:
    pipe = _pipeline(args)
    images = _load_images(args.image, pipe.assets.image_size)
    qs = args.question * len(images) if len(args.question) == 1 else args.question
    answers = pipe.answer(images, qs)
    return {"answers": [{"image": str(i), "question": q, "answer": a}
                        for i, q, a in zip(args.image, qs, answers)]}  # fmt: skip


@register("caption", "image -> fine-grained caption")
def _add_caption(p):
    _infer_args(p)
    p.add_argument("--image", nargs="+", type=Path, required=True)
    return run_caption


def run_caption(args) -> dict:
    pipe = _pipeline(args)
    caps = pipe.caption(_load_images(args.image, pipe.assets.image_size))
    return {"captions": [{"image": str(i), "caption": c} for i, c in zip(args.image, caps)]}


# ---------------------------------------------------------------------------------------------
# evaluate


@register("evaluate", "score a trained model on the SynthFace test split (metrics.json + .md)")
def _add_eval(p):
    _infer_args(p)
    p.add_argument("--split", default="test")
    p.add_argument("--n-gen", type=int, default=256)
    p.add_argument("--n-vqa", type=int, default=512)
    p.add_argument("--n-cap", type=int, default=256)
    _decode_args(p)
    p.add_argument("--report", type=Path, help="folder (default <model-dir>/eval)")
    return run_evaluate


def evaluate_run(root, model_dir=None, *, split="test", n_gen=256, n_vqa=512, n_cap=256,
                 steps=12, guidance=2.0, seed=0, progress=True, report=None) -> tuple[dict, dict]:  # fmt: skip
    from unif2ace.cli import load_judge
    from unif2ace.data.readers import load_split
    from unif2ace.eval.model_eval import evaluate_model, summary_rows
    from unif2ace.models import UniF2ace
    from unif2ace.pipeline import Assets, _need, prepare_split

    root = Path(root)
    model_dir = Path(model_dir or root / "model")
    model = UniF2ace.from_pretrained(_need(model_dir, "trained model"))
    assets = Assets(root)
    test = prepare_split(assets, split, progress=progress)
    train_labels = prepare_split(assets, "train", progress=progress).labels
    judge = load_judge(_need(root / "judge", "attribute judge"))
    real = load_split(root / "synthface", split, limit=n_gen).images
    m, samples = evaluate_model(model, assets, test, judge, train_labels=train_labels,
                                real_images=real, n_gen=n_gen, n_vqa=n_vqa, n_cap=n_cap,
                                steps=steps, guidance=guidance, seed=seed, progress=progress)  # fmt: skip
    report = Path(report or model_dir / "eval")
    _save_metrics(report / "metrics.json", m)
    table = "| metric | value |\n|---|---|\n" + "".join(f"| {a} | {b} |\n" for a, b in summary_rows(m))
    from unif2ace.data.io import atomic_write_bytes

    atomic_write_bytes(report / "metrics.md", table.encode())
    return m, samples


def run_evaluate(args) -> dict:
    m, _ = evaluate_run(args.out, args.model_dir, split=args.split, n_gen=args.n_gen,
                        n_vqa=args.n_vqa, n_cap=args.n_cap, steps=args.steps,
                        guidance=args.guidance, seed=args.seed, progress=not args.quiet,
                        report=args.report)  # fmt: skip
    from unif2ace.eval.model_eval import summary_rows

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


@register("ablate", "train and score D3Diff vs mask-only vs score-only, token/sequence MoE on/off")
def _add_ablate(p):
    _common(p)
    _recipe_args(p)
    p.add_argument("--only", nargs="*", help="a subset of the variants (by index, 0-based)")
    p.add_argument("--n-gen", type=int, default=128)
    p.add_argument("--n-vqa", type=int, default=256)
    p.add_argument("--n-cap", type=int, default=128)
    return run_ablate


def ablation_table(res: dict) -> str:
    """The markdown table of ``{variant: {"metrics", "seconds"}}``, with a last row of the chance
    levels (they depend on the test items only, the same for every variant)."""
    nan = float("nan")
    lines = ["| variant | gen. attribute acc. | Fréchet (judge) | VQA | caption F1 | minutes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    order = list(ABLATIONS)  # results.json comes back with its keys sorted
    for name in sorted(res, key=lambda n: order.index(n) if n in order else len(order)):
        r, m = res[name], res[name]["metrics"]
        g, v, c = m.get("generation", {}), m.get("vqa", {}), m.get("caption", {})
        lines.append(f"| {name} | {g.get('mean', nan):.3f} | {m.get('frechet_judge', nan):.0f} | "
                     f"{v.get('accuracy', nan):.3f} | {c.get('f1', nan):.3f} | "
                     f"{r['seconds'] / 60:.1f} |")  # fmt: skip
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
    from unif2ace.data.io import atomic_write_bytes
    from unif2ace.train.unified import read_recipe, train_unified

    names = list(ABLATIONS)
    if args.only:
        names = [names[int(i)] for i in args.only]
    folder = Path(args.out) / "ablations"
    res = {}
    for name in names:
        recipe = read_recipe(args.config, [*args.set, *ABLATIONS[name]])
        model_dir = folder / f"{list(ABLATIONS).index(name)}"
        t0 = time.perf_counter()
        train_unified(args.out, recipe, out=model_dir, progress=not args.quiet)
        m, _ = evaluate_run(args.out, model_dir, n_gen=args.n_gen, n_vqa=args.n_vqa,
                            n_cap=args.n_cap, progress=not args.quiet)  # fmt: skip
        res[name] = {"metrics": m, "seconds": round(time.perf_counter() - t0, 1)}
        # after every variant, so a killed run keeps the rows it finished
        atomic_write_bytes(folder / "table.md", ablation_table(res).encode())
        _save_metrics(folder / "results.json", res)
    print(ablation_table(res))
    return {"table": str(folder / "table.md")}


# ---------------------------------------------------------------------------------------------
# demo

DEMO_PROMPTS = [
    "A person with long wavy blonde hair, blue eyes and a smile, wearing round glasses.",
    "A man with a bald head, a full beard, brown eyes and a surprised expression.",
    "A person with short black hair, dark skin and a neutral expression, wearing a beanie.",
    "A person with curly red hair and green eyes, wearing sunglasses, on a blue background.",
]

# the demo's ~9-minute run: at lr 1e-3 (the trainer's default) the same budget scored VQA 0.520,
# caption F1 0.171, Fréchet 1599; at 3e-3 0.551, 0.218, 1355 (one run each, 1131 / 1029 steps)
DEMO_RECIPE = ["train.lr=3e-3"]


@register("demo", "everything on SynthFace in one go: data, tokenizers, encoders, judge, a tiny "
          "model; writes a grid of prompts -> faces, answers, captions and a metrics table")  # fmt: skip
def _add_demo(p):
    _common(p)
    _recipe_args(p)
    p.add_argument("--num-images", type=int, default=6000)
    p.add_argument("--minutes", type=float, default=9.0, help="model training budget")
    p.add_argument("--fast", action="store_true", help="a smoke run of a minute or two")
    p.set_defaults(threads=2)
    return run_demo


def run_demo(args) -> dict:
    from unif2ace.data.io import atomic_write_bytes
    from unif2ace.eval.model_eval import summary_rows
    from unif2ace.pipeline import Pipeline

    out = Path(args.out)
    t0 = time.perf_counter()
    parser = build_parser()
    common = ["--out", str(out), "--threads", str(args.threads)] + (["--quiet"] if args.quiet else [])
    fast = args.fast
    steps = {
        "make-data": ["--num-images", str(200 if fast else args.num_images)],
        "train-text-tokenizer": ["--vocab-size", "1024" if fast else "2048"],
        "train-judge": ["--steps", "30", "--num-images", "600"] if fast else ["--steps", "2500"],
        "train-encoders": (["--semantic-steps", "10", "--identity-steps", "10"] if fast
                           else ["--semantic-steps", "400", "--identity-steps", "800"]),
        "train-vq": ["--steps", "30"] if fast else ["--preset", "fast"],  # perceptual: semantic
    }  # fmt: skip
    timing = {}
    for name, extra in steps.items():
        done = out / ".demo" / f"{name}.done"
        if done.exists():  # resumed demo: skip finished steps
            continue
        sub = parser.parse_args([name, *common, *extra])
        t = time.perf_counter()
        sub.func(sub)
        timing[name] = round(time.perf_counter() - t, 1)
        atomic_write_bytes(done, b"")
    sets = list(args.set)
    if fast:
        sets = ["train.steps=3", "train.batch_size=4", "train.log_every=1", *sets]
    else:
        sets = [f"train.max_minutes={args.minutes}", *DEMO_RECIPE, *sets]
    from unif2ace.train.unified import read_recipe, train_unified

    t = time.perf_counter()
    tr = train_unified(out, read_recipe(args.config, sets), progress=not args.quiet)
    timing["train"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    n = 16 if fast else 128
    m, samples = evaluate_run(out, n_gen=n, n_vqa=2 * n, n_cap=n, progress=not args.quiet,
                              steps=4 if fast else 12)  # fmt: skip
    timing["evaluate"] = round(time.perf_counter() - t, 1)
    demo = out / "demo"
    pipe = Pipeline.load(out)
    per = 2 if fast else 6
    prompts = [p for p in DEMO_PROMPTS for _ in range(per)]
    faces = pipe.generate(prompts, steps=4 if fast else 12, seed=1)
    save_grid(faces, demo / "prompts_to_faces.png", cols=per)
    save_grid(samples["images"][:32], demo / "test_prompts_to_faces.png", cols=8)
    lines = ["# unif2ace demo\n", f"Total time: {time.perf_counter() - t0:.0f} s "
             f"({json.dumps(timing)}); model trained for {tr.get('step')} steps.\n",
             "## Metrics (SynthFace test split)\n", "| metric | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} |" for a, b in summary_rows(m)]
    lines += ["", "## Prompts → faces (`prompts_to_faces.png`, one row per prompt)", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(DEMO_PROMPTS)]
    lines += ["", "## Sample answers (test images)", "", "| question | answer | model |", "|---|---|---|"]
    lines += [f"| {q} | {a} | {pred} |" for _, q, a, pred in samples.get("vqa", [])[:12]]
    lines += ["", "## Sample captions (test images)", ""]
    test_caps = samples.get("captions", [])[:6]
    from unif2ace.pipeline import Assets, prepare_split

    ref = prepare_split(Assets(out), "test", progress=False).captions
    for i, c in enumerate(test_caps):
        lines += [f"- **model:** {c}", f"  **reference:** {ref[i]}"]
    atomic_write_bytes(demo / "README.md", ("\n".join(lines) + "\n").encode())
    _save_metrics(demo / "metrics.json", {"metrics": m, "timing": timing})
    print("\n".join(lines[:2 + 3 + len(summary_rows(m)) + 2]))
    return {"report": str(demo / "README.md"), "grid": str(demo / "prompts_to_faces.png"),
            "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
