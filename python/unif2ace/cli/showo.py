"""``unif2ace generate --showo …`` and ``unif2ace answer --showo …``: the released Show-o
checkpoints (:mod:`unif2ace.showo`), from folders on disk. The ``generate`` and ``answer``
commands hand over to this module when ``--showo`` is given."""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from PIL import Image

from unif2ace.cli._common import save_png


def add_options(p, *, generate: bool) -> None:
    g = p.add_argument_group("released Show-o (instead of a run folder)")
    g.add_argument("--showo", type=Path, help="Show-o checkpoint folder (e.g. showlab/show-o)")
    g.add_argument("--magvit", type=Path, help="MAGVIT-v2 folder (showlab/magvitv2)")
    g.add_argument("--tokenizer", type=Path, help="Phi-1.5 tokenizer folder (microsoft/phi-1_5)")
    g.add_argument("--clip", type=Path, help="CLIP vision tower folder (CLIP-ViT variants)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--device", default="cpu", help="cpu or cuda")
    if generate:
        g.add_argument(
            "--size", type=int, choices=[256, 512], help="image size (must match the checkpoint)"
        )
        g.add_argument(
            "--annealing",
            choices=["showo", "maskgit"],
            default="showo",
            help="confidence-noise temperature: compounded per step (Show-o's code) or not",
        )


def _need(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            raise ValueError(f"--showo needs --{name} (the {name} folder)")


def _pipeline(args, *, magvit: bool):
    from unif2ace.showo import ShowoPipeline

    _need(args, "tokenizer", *(["magvit"] if magvit else []))
    t0 = time.perf_counter()
    pipe = ShowoPipeline.from_folders(
        args.showo,
        args.tokenizer,
        args.magvit,
        args.clip,
        dtype=getattr(torch, args.dtype),
        device=args.device,
    )
    return pipe, time.perf_counter() - t0


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:48] or "prompt"


def generate(args) -> dict:
    """PNGs under ``--out`` (one per prompt and sample), named after the prompt."""
    pipe, load_s = _pipeline(args, magvit=True)
    if args.size is not None and args.size != pipe.size:
        raise ValueError(
            f"--size {args.size}: this checkpoint generates {pipe.size} px "
            f"({pipe.vocab.num_vq_tokens} codes); use the matching Show-o folder"
        )
    out = Path(args.out)
    files = []
    t0 = time.perf_counter()
    for i, prompt in enumerate(args.prompt):
        for k in range(args.per_prompt):
            img = pipe.generate(
                prompt,
                steps=args.steps,
                guidance=args.guidance,
                seed=args.seed + k,
                annealing=args.annealing,
            )[0]
            path = out / f"{i:02d}_{_slug(prompt)}_{k}.png"
            save_png(Image.fromarray(img.numpy()), path)
            files.append(str(path))
    return {
        "images": files,
        "size": pipe.size,
        "steps": args.steps,
        "guidance": args.guidance,
        "load_s": round(load_s, 2),
        "generate_s": round(time.perf_counter() - t0, 2),
    }


def answer(args) -> dict:
    pipe, _ = _pipeline(args, magvit=not args.clip)
    qs = args.question if len(args.question) == len(args.image) else args.question * len(args.image)
    if len(qs) != len(args.image):
        raise ValueError("give one question, or one per image")
    return {
        "answers": [
            {"image": str(img), "question": q, "answer": pipe.answer(img, q)}
            for img, q in zip(args.image, qs)
        ]
    }
