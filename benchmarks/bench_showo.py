"""Show-o text-to-image at full size with random weights: the engine path against Show-o's loop.

One 256-px generation (18 steps, classifier-free guidance, batch 1) of a Show-o-sized model
(Phi-1.5: 24 layers, width 2048, 32 heads, MLP 8192, QK-LayerNorm, the 58,498-token vocabulary;
random weights, fp32) and the MAGVIT-v2 decode of its codes (full size, random weights). Two
providers generate from the same prompt, seed and noise:

* ``engine``: :func:`unif2ace.showo.t2i_generate` — the 129-token text part of the conditional and
  unconditional rows runs once and its keys / values are reused; each step runs the 258 image
  positions through the omni-attention op and scores only the 8192 codebook rows of the head; the
  fused sampling step (:func:`unif2ace.ops.maskgit_step`).
* ``plain``: the same with ``cached=False`` — Show-o's loop: every step the whole 387-token
  sequence, SDPA with a boolean mask, the full 58,498-column head, then the slice.

Both call the same sampling step, so the codes must be identical. Reported: the time of each
whole generation (run once each) and the peak resident memory during it (the process's
``VmHWM``, reset before it) against the weights' size; then one decoding step's logits
(the part the two providers do differently) timed interleaved, engine / plain, ``--reps`` times,
medians and their ratio; and the MAGVIT-v2 decode time.

Run::

    python benchmarks/bench_showo.py --threads 2            # full size (about 10 minutes on 2 cores)
    python benchmarks/bench_showo.py --quick                # 2 layers, width 256: a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import _proc_status_kib, _reset_peak_rss  # noqa: E402
from unif2ace.models import UniF2ace  # noqa: E402
from unif2ace.showo import ShowoVocab, t2i_generate  # noqa: E402
from unif2ace.showo.checkpoint import showo_config  # noqa: E402
from unif2ace.showo.generate import t2i_logits_fn  # noqa: E402
from unif2ace.vq.magvitv2 import MagvitV2, MagvitV2Config  # noqa: E402

SHOWO = dict(vocab_size=58498, llm_vocab_size=50295, codebook_size=8192)


def peak_rss_bytes(fn):
    """``fn()`` and the process's peak resident set size while it ran (``VmHWM`` reset first,
    as :mod:`benchmarks.measure` does): (result, bytes, or None where Linux cannot say)."""
    ok = _reset_peak_rss()
    out = fn()
    hwm = _proc_status_kib("VmHWM")
    return out, (hwm * 1024 if ok and hwm is not None else None)


@torch.no_grad()
def random_showo(n_layers: int, d: int, d_ff: int, num_vq_tokens: int, seed: int = 0) -> UniF2ace:
    """A Show-o-shaped model with random weights (built on the meta device, filled in place)."""
    conf = {**SHOWO, "num_vq_tokens": num_vq_tokens}
    sizes = dict(D=d, n_layers=n_layers, head_dim=64, d_ff=d_ff, clip=0)
    with torch.device("meta"):
        model = UniF2ace(showo_config(conf, sizes))
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "layernorm" in name and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0.0, 0.02, generator=g)
    model.reset_buffers()
    model.showo = ShowoVocab(num_vq_tokens=num_vq_tokens)
    return model.eval()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3, help="interleaved step timings per provider")
    ap.add_argument("--quick", action="store_true", help="2 layers of width 256, 4 steps")
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    ap.add_argument("--device", default="cpu", help="cpu or cuda (memory: RSS or CUDA allocator)")
    ap.add_argument("--budget-s", type=float, help="accepted for the GPU suite; not used")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.quick:
        layers, d, d_ff, steps, vq = 2, 256, 1024, 4, MagvitV2Config(ch=32, z_channels=13)
    else:
        layers, d, d_ff, steps, vq = 24, 2048, 8192, args.steps, MagvitV2Config()
    t0 = time.perf_counter()
    model = random_showo(layers, d, d_ff, 256).to(dev)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    build_s = time.perf_counter() - t0
    prompt = [[(i * 7919) % 50000 for i in range(24)]]  # a 24-token prompt
    res: dict = {
        "benchmark": "showo",
        "device": str(dev),
        "model": f"{layers} layers, width {d}, MLP {d_ff}, vocab 58498, fp32, random weights",
        "params": sum(p.numel() for p in model.parameters()),
        "weights_gib": weights / 2**30,
        "build_s": build_s,
        "steps": steps,
        "guidance": args.guidance,
        "threads": args.threads,
    }
    codes = {}
    for name, cached in (("engine", True), ("plain", False)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        codes[name], rss = peak_rss_bytes(
            functools.partial(
                t2i_generate,
                model,
                prompt,
                steps=steps,
                guidance=args.guidance,
                seed=0,
                cached=cached,
            )
        )
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res[f"{name}_s"] = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else (rss or 0)
        res[f"{name}_peak_rss_gib"] = peak / 2**30
        print(f"{name}: {res[f'{name}_s']:.1f} s, peak {peak / 2**30:.2f} GiB", flush=True)
    res["speedup"] = res["plain_s"] / res["engine_s"]
    res["identical_codes"] = bool(torch.equal(codes["engine"], codes["plain"]))
    # one step's logits, interleaved (the prefix of the engine's is computed once, outside)
    vocab = model.showo
    rows = torch.cat([vocab.t2i_prompt(prompt), vocab.t2i_prompt([[]])])
    half = codes["engine"].clone()
    half[:, ::2] = vocab.codebook_size  # half the image still masked
    with torch.no_grad():
        fns = {
            n: t2i_logits_fn(model, rows, cfg=True, cached=c)
            for n, c in (("engine", True), ("plain", False))
        }
        times = {n: [] for n in fns}
        for _ in range(args.reps):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn(half.to(dev))
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[n].append(time.perf_counter() - t0)
    for n, ts in times.items():
        res[f"{n}_step_median_s"] = statistics.median(ts)
    res["step_speedup"] = res["plain_step_median_s"] / res["engine_step_median_s"]
    print(
        f"one step: engine {res['engine_step_median_s']:.2f} s, plain {res['plain_step_median_s']:.2f} s",
        flush=True,
    )
    res["engine_peak_minus_weights_gib"] = res["engine_peak_rss_gib"] - res["weights_gib"]
    del model
    magvit = MagvitV2(vq).eval().to(dev)
    with torch.no_grad():
        t0 = time.perf_counter()
        img = magvit.decode_code(codes["engine"])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        res["magvit_decode_s"] = time.perf_counter() - t0
    res["image_shape"] = list(img.shape)
    print(json.dumps(res, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "showo.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "showo.md").write_text(
        f"## Show-o t2i ({res['model']}, {steps} steps, {res['device']})\n\n"
        "| | engine | Show-o's loop | ratio |\n|---|---|---|---|\n"
        f"| generation | {res['engine_s']:.2f} s | {res['plain_s']:.2f} s | "
        f"{res['speedup']:.2f}x |\n"
        f"| one step (median) | {res['engine_step_median_s']:.3f} s | "
        f"{res['plain_step_median_s']:.3f} s | {res['step_speedup']:.2f}x |\n"
        f"| peak memory | {res['engine_peak_rss_gib']:.2f} GiB | "
        f"{res['plain_peak_rss_gib']:.2f} GiB | |\n\n"
        f"identical codes: {res['identical_codes']}; weights {res['weights_gib']:.2f} GiB\n"
    )
    return res


if __name__ == "__main__":
    main()
