"""UniF²ace fine-tuned from the released Show-o: ``unif2ace init --from-showo`` writes the run
folder; ``tokenize-images`` (:mod:`unif2ace.cli.features`) caches the images; ``train``,
``generate``, ``answer``, ``caption`` and ``evaluate`` (:mod:`unif2ace.cli.model`) call the
functions here when ``--out`` is such a run (:func:`unif2ace.pipeline.paper.is_paper_run`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from unif2ace.cli._common import Commands

COMMANDS = Commands()


@COMMANDS.register(
    "init",
    "start a UniF2ace run from the released Show-o (the MoE levels upcycled from its MLP)",
    recipe=True,
)
def _add_init(p):
    p.add_argument("--from-showo", type=Path, required=True, help="Show-o folder (showlab/show-o)")
    p.add_argument("--magvit", type=Path, required=True, help="MAGVIT-v2 folder")
    p.add_argument("--tokenizer", type=Path, required=True, help="Phi-1.5 tokenizer folder")
    p.add_argument("--clip", type=Path, help="CLIP vision folder (the sequence MoE's CLIP expert)")
    p.add_argument(
        "--face-onnx", type=Path, help="face-recognition ONNX, 112x112 (the face expert)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the new random parameters")
    return run_init


def run_init(args) -> dict:
    from unif2ace.pipeline.paper import init_run
    from unif2ace.pipeline.recipe import read_recipe

    recipe = read_recipe(args.config, args.set)
    # the resolved recipe (config file + --set), which train reads back
    text = f"# unif2ace init --config {args.config} --set {' '.join(args.set)}\n"
    text += yaml.safe_dump(recipe, sort_keys=False)
    res = init_run(
        args.out,
        showo=args.from_showo,
        magvit=args.magvit,
        tokenizer=args.tokenizer,
        recipe=recipe,
        clip=args.clip,
        face_onnx=args.face_onnx,
        recipe_text=text,
        seed=args.seed,
    )
    if not args.quiet:
        print(res["note"])
    return res


def recipe_of(args) -> dict:
    """The run's ``recipe.yaml`` with this command's ``--config`` sections and ``--set`` on
    top (section by section, key by key)."""
    from unif2ace.pipeline.recipe import read_recipe

    base = read_recipe(Path(args.out) / "recipe.yaml")
    extra = read_recipe(args.config, args.set)
    return {s: {**base.get(s, {}), **extra.get(s, {})} for s in ("model", "train", "data")}


def train(args) -> dict:
    from unif2ace.pipeline.paper import train_paper

    if getattr(args, "model_dir", None):
        raise ValueError("--model-dir: a run from Show-o trains into <out>/model")
    res = train_paper(args.out, recipe_of(args), progress=not args.quiet)
    return {k: res[k] for k in ("step", "loss", "model_dir") if k in res}


def evaluate(args) -> dict:
    from unif2ace.pipeline.paper import evaluate_paper

    return evaluate_paper(args.out, args.model_dir, split=getattr(args, "split", None) or "test")
