"""The whole model path on one device: a short training run through the trainer, then sampling.

On a GPU (``benchmarks/gpu_suite.sh`` runs it): the ``tiny`` config with random weights and random
SynthFace-shaped examples (:func:`benchmarks.bench_e2e.synthetic_examples`), ``--steps`` optimizer
steps (default 20) through :func:`unif2ace.train.train` with its CUDA default of bf16 autocast
and the engine's backend ("auto": Triton, then CUDA, then torch), then image generation and text
decoding on ``cuda:0``.
It checks what a first GPU user would hit at once: a device mix-up, an autocast dtype clash, a
non-finite loss, a sampler that returns codes out of range. It writes ``OUT/gpu_smoke.json``.

``--device cpu`` (the suite's dry run, and ``tests/test_bench_harness.py``) runs the same path on
the CPU with a few steps.

Usage: python benchmarks/gpu_smoke.py --out DIR [--device cuda|cpu] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*` (appended)
import unif2ace  # noqa: E402
from benchmarks.bench_e2e import synthetic_examples  # noqa: E402
from unif2ace import _backend  # noqa: E402
from unif2ace.models import UniF2ace, collate, get_config  # noqa: E402
from unif2ace.models.sampling import generate_images, generate_text  # noqa: E402
from unif2ace.train import TrainConfig, train  # noqa: E402


def run(out: Path, device: str, steps: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    cfg = get_config("tiny")
    model = UniF2ace(cfg)
    data = synthetic_examples(cfg, 4 * batch_size)  # even: text->image, odd: questions
    tcfg = TrainConfig(
        out=str(out / "gpu_smoke_run"),
        steps=steps,
        batch_size=batch_size,
        warmup_steps=2,
        log_every=max(1, steps // 4),
        ckpt_every=steps,
        device=device,
        progress=False,
    )
    t0 = time.perf_counter()
    result = train(
        model,
        data,
        lambda b: collate(cfg, b),
        lambda m, b, step: m(b, loss=True, step=step),
        tcfg,
        model_config=cfg.to_dict(),
    )
    train_s = time.perf_counter() - t0
    losses = [float(x) for x in result["losses"]]
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"gpu_smoke: training losses not finite or missing: {losses}")

    model.eval()
    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.no_grad():
        prompts = [ex.prompt for ex in data[0:8:2]]
        codes = generate_images(model, prompts, steps=8, seed=1)
        if codes.device != dev or codes.shape != (len(prompts), cfg.image_tokens):
            raise SystemExit(f"gpu_smoke: codes {tuple(codes.shape)} on {codes.device}")
        if int(codes.min()) < 0 or int(codes.max()) >= cfg.codebook_size:
            raise SystemExit("gpu_smoke: generated codes outside the codebook")
        answers = generate_text(model, codes, [ex.prompt for ex in data[1:9:2]], max_new_tokens=6)
    sample_s = time.perf_counter() - t0
    return {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "backend": _backend.resolve("auto", dev, "gpu_smoke"),
        "amp": "bf16" if dev.type == "cuda" else "none",
        "steps": steps,
        "batch_size": batch_size,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "train_seconds": round(train_s, 2),
        "sample_seconds": round(sample_s, 2),
        "answers": answers,
        "torch": torch.__version__,
        "unif2ace": unif2ace.__version__,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=None, help="default 20 on CUDA, 3 on the CPU")
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    steps = args.steps or (20 if args.device.startswith("cuda") else 3)
    device = "cuda:0" if args.device == "cuda" else args.device
    args.out.mkdir(parents=True, exist_ok=True)
    res = run(args.out, device, steps, args.batch_size)
    (args.out / "gpu_smoke.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
