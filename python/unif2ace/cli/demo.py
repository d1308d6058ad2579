"""``unif2ace demo``: everything on SynthFace in one go — the data pipeline, a tiny model trained
for a few minutes, its evaluation, and a report with a grid of prompts → faces, answers and
captions."""

from __future__ import annotations

import json
import time
from pathlib import Path

from unif2ace.cli._common import Commands, pos_float, pos_int, save_grid
from unif2ace.cli.data import run_data_step
from unif2ace.cli.model import evaluate_run, prepare_training
from unif2ace.eval.model_eval import summary_rows
from unif2ace.io import atomic_write_bytes, atomic_write_json
from unif2ace.pipeline import Assets, Pipeline, prepare_split, read_recipe, train_unified

COMMANDS = Commands()


# ---------------------------------------------------------------------------------------------
# demo

DEMO_PROMPTS = [
    "A person with long wavy blonde hair, blue eyes and a smile, wearing round glasses.",
    "A man with a bald head, a full beard, brown eyes and a surprised expression.",
    "A person with short black hair, dark skin and a neutral expression, wearing a beanie.",
    "A person with curly red hair and green eyes, wearing sunglasses, on a blue background.",
]

# a learning rate above the trainer's default: in the demo's few minutes of training it scores
# better on every metric (the runs are in docs/results.md)
DEMO_RECIPE = ["train.lr=3e-3"]


@COMMANDS.register(
    "demo",
    "everything on SynthFace in one go: data, tokenizers, encoders, judge, a tiny "
    "model; writes a grid of prompts -> faces, answers, captions and a metrics table",
    recipe=True,
)
def _add_demo(p):
    p.add_argument("--num-images", type=pos_int, default=6000)
    p.add_argument("--minutes", type=pos_float, default=9.0, help="model training budget")
    p.add_argument("--fast", action="store_true", help="a smoke run of a minute or two")
    p.set_defaults(threads=2)
    return run_demo


def run_demo(args) -> dict:
    out = Path(args.out)
    t0 = time.perf_counter()
    fast = args.fast
    steps = {
        "make-data": ["--num-images", str(200 if fast else args.num_images)],
        "train-text-tokenizer": ["--vocab-size", "1024" if fast else "2048"],
        "train-judge": ["--steps", "30", "--num-images", "600"] if fast else ["--steps", "2500"],
        "train-encoders": (
            ["--semantic-steps", "10", "--identity-steps", "10"]
            if fast
            else ["--semantic-steps", "400", "--identity-steps", "800"]
        ),
        "train-vq": ["--steps", "30"] if fast else ["--preset", "fast"],  # perceptual: semantic
    }
    timing = {}
    for name, extra in steps.items():
        done = out / ".demo" / f"{name}.done"
        if done.exists():  # resumed demo: skip finished steps
            continue
        t = time.perf_counter()
        run_data_step(name, args, extra)
        timing[name] = round(time.perf_counter() - t, 1)
        atomic_write_bytes(done, b"")
    sets = list(args.set)
    if fast:
        sets = ["train.steps=3", "train.batch_size=4", "train.log_every=1", *sets]
    else:
        sets = [f"train.max_minutes={args.minutes}", *DEMO_RECIPE, *sets]
    recipe = read_recipe(args.config, sets)
    prepare_training(out, recipe, out / "model")
    t = time.perf_counter()
    tr = train_unified(out, recipe, progress=not args.quiet)
    timing["train"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    n = 16 if fast else 128
    m, samples = evaluate_run(
        out, n_gen=n, n_vqa=2 * n, n_cap=n, progress=not args.quiet, steps=4 if fast else 12
    )
    timing["evaluate"] = round(time.perf_counter() - t, 1)
    demo = out / "demo"
    pipe = Pipeline.load(out)
    per = 2 if fast else 6
    prompts = [p for p in DEMO_PROMPTS for _ in range(per)]
    faces = pipe.generate(prompts, steps=4 if fast else 12, seed=1)
    save_grid(faces, demo / "prompts_to_faces.png", cols=per)
    save_grid(samples["images"][:32], demo / "test_prompts_to_faces.png", cols=8)
    lines = [
        "# unif2ace demo\n",
        f"Total time: {time.perf_counter() - t0:.0f} s "
        f"({json.dumps(timing)}); model trained for {tr.get('step')} steps.\n",
        "## Metrics (SynthFace test split)\n",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {a} | {b} |" for a, b in summary_rows(m)]
    lines += ["", "## Prompts → faces (`prompts_to_faces.png`, one row per prompt)", ""]
    lines += [f"{i + 1}. {p}" for i, p in enumerate(DEMO_PROMPTS)]
    lines += [
        "",
        "## Sample answers (test images)",
        "",
        "| question | answer | model |",
        "|---|---|---|",
    ]
    lines += [f"| {q} | {a} | {pred} |" for _, q, a, pred in samples.get("vqa", [])[:12]]
    lines += ["", "## Sample captions (test images)", ""]
    test_caps = samples.get("captions", [])[:6]
    ref = prepare_split(Assets(out), "test", progress=False).captions
    for i, c in enumerate(test_caps):
        lines += [f"- **model:** {c}", f"  **reference:** {ref[i]}"]
    atomic_write_bytes(demo / "README.md", ("\n".join(lines) + "\n").encode())
    atomic_write_json(demo / "metrics.json", {"metrics": m, "timing": timing})
    print("\n".join(lines[: 2 + 3 + len(summary_rows(m)) + 2]))
    return {
        "report": str(demo / "README.md"),
        "grid": str(demo / "prompts_to_faces.png"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
