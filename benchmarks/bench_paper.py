"""UniF²ace at the paper's size, one training step on the CPU: the engine against plain PyTorch.

One forward + backward of the training loss (``model(batch, loss=True, step=0, seed=0)``) of the
``paper`` config (Show-o 1.3B: Phi-1.5, 24 layers, width 2048, a token MoE of Show-o's dense MLP
plus per-group experts, a sequence MoE; about 1.97 B parameters), random weights
(``torch.manual_seed(0); UniF2ace(cfg)``), fp32, batch 1 (``--batch``: the 387-token t2i row,
one MMU row, or both). Two backends run the same model on the same batch:

* ``engine``: ``unif2ace.use_backend("auto")``, this project's C++ CPU kernels;
* ``torch``: ``use_backend("torch")``, plain PyTorch (SDPA with a boolean mask, looped experts,
  the unfused loss).

Reported:

* **time**: one warm-up step each, then ``--reps`` steps interleaved (torch, engine, torch, …;
  gradients set to None before each), medians and the ratio torch / engine;
* **peak memory**: each backend's step runs in a fresh subprocess (``--child BACKEND``): the
  process's ``VmHWM`` (reset after the model is built, as :mod:`benchmarks.measure` does), the
  same minus the RSS after building the model (the step's own peak above the weights), and the
  RSS the forward leaves (the saved activations); weights' and gradients' sizes computed;
* **computed, not measured**: the optimizer does not run (AdamW's two fp32 states, 8 bytes per
  parameter, do not fit next to fp32 weights and gradients on a 24 GiB machine). The script prints
  what a full AdamW step would need on one device (weights 4 + gradients 4 + states 8 bytes per
  parameter, plus activations) and per 80 GB card of the GPU recipe (FSDP2 over 8 GPUs, bf16
  autocast, fp32 master weights / gradients / states sharded).

Run::

    python benchmarks/bench_paper.py --threads 2              # full size (the 1.97 B model)
    python benchmarks/bench_paper.py --layers 2 --threads 2   # full width, 2 layers
    python benchmarks/bench_paper.py --quick                  # width 256, 2 layers: a smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import _proc_status_kib, _reset_peak_rss  # noqa: E402
from unif2ace import use_backend  # noqa: E402
from unif2ace.models import UniF2ace, get_config, parameter_count  # noqa: E402
from unif2ace.models.layout import TASK_MMU, TASK_T2I, Example, collate  # noqa: E402

GiB = float(2**30)
BACKENDS = {"torch": "torch", "engine": "auto"}  # report name -> unif2ace backend
STEP, SEED = 0, 0  # the same noise (mask, time, prompt drop) for every step timed
CHILD_TAG = "BENCH_PAPER_CHILD "  # prefix of the child's one result line on stdout
# the miniature of --quick: the paper's vocabulary, layout and MoE structure, small widths
QUICK = dict(
    d_model=256, n_layers=2, n_heads=4, d_ff=1024, dense_ffn=1024, expert_ffn=64,
    semantic_dim=32, identity_dim=32,
)  # fmt: skip
# the GPU recipe of the computed estimate
GPUS, CARD_BYTES = 8, 80e9
CUDA_RESERVE = 3 * GiB  # CUDA context, cuBLAS workspaces and allocator slack (assumed)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--reps", type=int, default=3, help="interleaved timed steps per backend")
    ap.add_argument("--batch", choices=("t2i", "mmu", "both"), default="t2i")
    ap.add_argument("--quick", action="store_true", help="width 256, 2 layers: a smoke run")
    ap.add_argument("--layers", type=int, help="override n_layers (e.g. 2 at full width)")
    ap.add_argument("--out", type=Path, default=Path("build/bench"))
    ap.add_argument("--device", default="cpu", choices=("cpu",), help="CPU only (VmHWM)")
    ap.add_argument("--budget-s", type=float, help="stop adding timed reps after this long")
    ap.add_argument("--child", choices=tuple(BACKENDS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be at least 1, got {args.reps}")
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers must be at least 1, got {args.layers}")
    return args


def build_config(args):
    """The ``paper`` config, shrunk by ``--quick`` and/or ``--layers``."""
    over = dict(QUICK) if args.quick else {}
    if args.layers is not None:
        over["n_layers"] = args.layers
    return get_config("paper", **over)


def make_batch(cfg, kind: str) -> dict:
    """A collated batch of one t2i row, one MMU row, or both (random codes, words, embeddings).

    The t2i row is always ``max_text_len + 1`` text tokens + <soi> + the image + <eoi> (387 at the
    paper's size; the text part is left-padded), a 48-token prompt; the MMU row is <mmu><soi> image
    <eoi> BOS, a 32-token question and a 64-token answer + EOS (357 tokens)."""
    g = torch.Generator().manual_seed(0)

    def words(n: int) -> list[int]:
        return torch.randint(0, 50000, (n,), generator=g).tolist()  # below Show-o's special ids

    def example(task: int, index: int) -> Example:
        return Example(
            task=task,
            codes=torch.randint(0, cfg.codebook_size, (cfg.image_tokens,), generator=g),
            prompt=words(48 if task == TASK_T2I else 32),
            answer=None if task == TASK_T2I else words(64),
            semantic=torch.randn(cfg.semantic_dim, generator=g),
            identity=torch.randn(cfg.identity_dim, generator=g),
            index=index,
        )

    tasks = {"t2i": [TASK_T2I], "mmu": [TASK_MMU], "both": [TASK_T2I, TASK_MMU]}[kind]
    return collate(cfg, [example(t, i) for i, t in enumerate(tasks)])


def build_model(cfg) -> UniF2ace:
    torch.manual_seed(0)
    return UniF2ace(cfg).train()


def train_step(model, batch, backend: str, parts: dict | None = None) -> float:
    """One forward + backward under ``backend`` (gradients set to None first); the loss.
    ``parts``: where to write the seconds of the forward and the backward. The global RNG is
    re-seeded first: the sequence MoE's noise expert draws from it, and so every step (both
    backends, every rep) computes the same loss."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    with use_backend(BACKENDS[backend]):
        t0 = time.perf_counter()
        loss, _ = model(batch, loss=True, step=STEP, seed=SEED)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
    if parts is not None:
        parts.update(step_s=t2 - t0, forward_s=t1 - t0, backward_s=t2 - t1)
    return float(loss.detach())


def child(args) -> dict:
    """``--child BACKEND``: build the model, then one step under BACKEND in this fresh process;
    the memory figures (bytes) on one stdout line."""
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    model = build_model(cfg)
    batch = make_batch(cfg, args.batch)
    gc.collect()
    rss_build = _proc_status_kib("VmRSS")
    ok = _reset_peak_rss()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)  # as train_step: the noise expert's draw
    with use_backend(BACKENDS[args.child]):
        loss, _ = model(batch, loss=True, step=STEP, seed=SEED)
        rss_fwd = _proc_status_kib("VmRSS")
        loss.backward()
    hwm = _proc_status_kib("VmHWM")
    kib = 1024 if ok and None not in (rss_build, rss_fwd, hwm) else None
    res = {
        "backend": args.child,
        "loss": float(loss.detach()),
        "rss_after_build": kib and rss_build * kib,
        "rss_after_forward": kib and rss_fwd * kib,
        "vmhwm": kib and hwm * kib,
    }
    print(CHILD_TAG + json.dumps(res), flush=True)
    return res


def run_child(args, backend: str) -> dict:
    """One backend's step in a fresh ``python bench_paper.py --child BACKEND`` process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", backend]
    cmd += ["--threads", str(args.threads), "--batch", args.batch]
    if args.quick:
        cmd.append("--quick")
    if args.layers is not None:
        cmd += ["--layers", str(args.layers)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(
            f"bench_paper: the {backend} memory run failed (exit {r.returncode}); expected a "
            f"'{CHILD_TAG.strip()}' line. stderr tail:\n{r.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len(CHILD_TAG) :])


def mem_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def computed_memory(cfg, params: int, activations: float | None) -> dict:
    """What the optimizer step would need, from the parameter count (GiB, computed, not measured).

    * one device, fp32 AdamW: weights 4 + gradients 4 + two states 8 bytes per parameter, plus the
      fp32 activations measured here (the engine's forward);
    * per card of the GPU recipe (FSDP2 over 8 GPUs, bf16 autocast): the fp32 master weights,
      gradients and AdamW states sharded (16 bytes per parameter / 8); the unsharded working set
      (bf16 all-gathered parameters of two blocks, the current and the prefetched, and of the root's
      embedding and head; fp32 unsharded gradients of one block and the root before their
      reduce-scatter); activations at half the fp32 ones measured here (bf16 autocast keeps most
      saved tensors in bf16; an estimate), per sample of this batch; a fixed CUDA reserve.
    """
    pc = parameter_count(cfg)
    block = pc["blocks"] / cfg.n_layers
    root = pc["embedding"] + pc["head"]
    act = activations or 0.0
    single = 16 * params
    sharded = 16 * params / GPUS
    gathered = 2 * (2 * block + root)
    unsharded_grads = 4 * (block + root)
    act_bf16 = act / 2
    card = sharded + gathered + unsharded_grads + act_bf16 + CUDA_RESERVE
    machine = mem_total_bytes()
    fixed = card - act_bf16
    return {
        "note": "computed from the parameter count, not measured; activations from this run",
        "adamw_one_device": {
            "weights_gib": 4 * params / GiB,
            "grads_gib": 4 * params / GiB,
            "adam_states_gib": 8 * params / GiB,
            "activations_fp32_gib": act / GiB,
            "total_gib": (single + act) / GiB,
            "machine_gib": machine and machine / GiB,
            "fits_here": None if machine is None else single + act <= machine,
        },
        "fsdp2_per_card": {
            "gpus": GPUS,
            "card_gb": CARD_BYTES / 1e9,
            "sharded_states_gib": sharded / GiB,
            "gathered_bf16_params_gib": gathered / GiB,
            "unsharded_fp32_grads_gib": unsharded_grads / GiB,
            "activations_bf16_gib": act_bf16 / GiB,
            "cuda_reserve_gib": CUDA_RESERVE / GiB,
            "total_gib": card / GiB,
            "card_gib": CARD_BYTES / GiB,
            "max_samples_per_card": (
                int((CARD_BYTES - fixed) // act_bf16) if act_bf16 > 0 else None
            ),
        },
    }


def _gib(x) -> str:
    return "n/a" if x is None else f"{x / GiB:.2f} GiB"


def table(res: dict) -> str:
    """The plain-text table printed at the end."""
    t, e = res["torch"], res["engine"]
    rows = [
        ("step fwd+bwd, median", f"{t['step_median_s']:.3f} s", f"{e['step_median_s']:.3f} s",
         f"{res['ratio']:.2f}x"),
        ("  forward, median", f"{t['forward_median_s']:.3f} s", f"{e['forward_median_s']:.3f} s",
         f"{t['forward_median_s'] / e['forward_median_s']:.2f}x"),
        ("  backward, median", f"{t['backward_median_s']:.3f} s",
         f"{e['backward_median_s']:.3f} s",
         f"{t['backward_median_s'] / e['backward_median_s']:.2f}x"),
        ("peak RSS (VmHWM)", _gib(t["vmhwm"]), _gib(e["vmhwm"]), ""),
        ("step peak above weights", _gib(t["step_peak"]), _gib(e["step_peak"]), ""),
        ("activations (fwd RSS)", _gib(t["activations"]), _gib(e["activations"]), ""),
        ("loss", f"{t['loss']:.6f}", f"{e['loss']:.6f}", ""),
    ]  # fmt: skip
    out = [
        f"UniF²ace {res['model']}",
        f"batch {res['batch']} (sequence length {res['seq_len']}), fp32, "
        f"{res['threads']} threads, {res['reps']} interleaved reps",
        "",
        f"{'':26}{'torch':>14}{'engine':>14}{'torch/engine':>14}",
    ]
    out += [f"{a:26}{b:>14}{c:>14}{d:>14}" for a, b, c, d in rows]
    out += [
        "",
        f"parameters {res['params']:,}: weights {res['weights_gib']:.2f} GiB, "
        f"gradients {res['grads_gib']:.2f} GiB (fp32)",
        "",
        "COMPUTED, NOT MEASURED (the optimizer does not run here):",
    ]
    a, f = res["computed"]["adamw_one_device"], res["computed"]["fsdp2_per_card"]
    fits = {True: "fits", False: "does NOT fit", None: "?"}[a["fits_here"]]
    machine = "n/a" if a["machine_gib"] is None else f"{a['machine_gib']:.1f} GiB"
    out += [
        f"  AdamW fp32 step, one device: weights {a['weights_gib']:.2f} + grads "
        f"{a['grads_gib']:.2f} + states {a['adam_states_gib']:.2f} + activations "
        f"{a['activations_fp32_gib']:.2f} = {a['total_gib']:.2f} GiB ({fits} in this "
        f"machine's {machine})",
        f"  GPU recipe, FSDP2 over {f['gpus']} GPUs, bf16 autocast, per {f['card_gb']:.0f} GB "
        f"card ({f['card_gib']:.1f} GiB): sharded fp32 weights/grads/states "
        f"{f['sharded_states_gib']:.2f} + gathered bf16 params {f['gathered_bf16_params_gib']:.2f}"
        f" + unsharded fp32 grads {f['unsharded_fp32_grads_gib']:.2f} + activations (bf16 est.) "
        f"{f['activations_bf16_gib']:.2f} + CUDA reserve {f['cuda_reserve_gib']:.2f} = "
        f"{f['total_gib']:.2f} GiB per card at this batch; about {f['max_samples_per_card']} "
        "such samples fit per card",
    ]
    return "\n".join(out)


def markdown(res: dict) -> str:
    t, e = res["torch"], res["engine"]
    a, f = res["computed"]["adamw_one_device"], res["computed"]["fsdp2_per_card"]
    return (
        f"## UniF²ace paper config, one training step ({res['model']}, batch {res['batch']}, "
        f"fp32, {res['device']}, {res['threads']} threads)\n\n"
        "| | torch | engine | torch / engine |\n|---|---|---|---|\n"
        f"| step fwd+bwd (median of {res['reps']}) | {t['step_median_s']:.3f} s | "
        f"{e['step_median_s']:.3f} s | {res['ratio']:.2f}x |\n"
        f"| forward (median) | {t['forward_median_s']:.3f} s | {e['forward_median_s']:.3f} s "
        "| |\n"
        f"| backward (median) | {t['backward_median_s']:.3f} s | "
        f"{e['backward_median_s']:.3f} s | |\n"
        f"| peak RSS (VmHWM) | {_gib(t['vmhwm'])} | {_gib(e['vmhwm'])} | |\n"
        f"| step peak above weights | {_gib(t['step_peak'])} | {_gib(e['step_peak'])} | |\n"
        f"| activations (RSS after forward) | {_gib(t['activations'])} | "
        f"{_gib(e['activations'])} | |\n\n"
        f"{res['params']:,} parameters: weights {res['weights_gib']:.2f} GiB, gradients "
        f"{res['grads_gib']:.2f} GiB (fp32); sequence length {res['seq_len']}.\n\n"
        "**Computed, not measured** (the optimizer does not run): a fp32 AdamW step on one "
        f"device needs {a['total_gib']:.2f} GiB (weights + grads + states "
        f"{16 * res['params'] / GiB:.2f} GiB, activations {a['activations_fp32_gib']:.2f} GiB); "
        f"the GPU recipe (FSDP2 over {f['gpus']} GPUs, bf16 autocast, fp32 master state "
        f"sharded) needs about {f['total_gib']:.2f} GiB per {f['card_gb']:.0f} GB card at this "
        f"batch (sharded state {f['sharded_states_gib']:.2f}, gathered params and unsharded "
        f"grads {f['gathered_bf16_params_gib'] + f['unsharded_fp32_grads_gib']:.2f}, "
        f"activations {f['activations_bf16_gib']:.2f}, reserve {f['cuda_reserve_gib']:.2f}).\n"
    )


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "paper.json").write_text(json.dumps(res, indent=2) + "\n")
    if "ratio" in res:
        (out / "paper.md").write_text(markdown(res))


def main(argv=None) -> dict:
    args = parse(argv)
    if args.child:
        return child(args)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    params_cfg = parameter_count(cfg)["total"]
    res: dict = {
        "benchmark": "paper",
        "device": "cpu",
        "model": (
            f"{'paper' if not (args.quick or args.layers) else 'paper-shrunk'}: "
            f"{cfg.n_layers} layers, width {cfg.d_model}, dense MLP {cfg.dense_ffn}, "
            f"experts {cfg.shared_experts}+{cfg.routed_experts}x{cfg.expert_ffn} per group, "
            f"vocab {cfg.vocab_size}, random weights"
        ),
        "config": {k: getattr(cfg, k) for k in ("n_layers", "d_model", "n_heads", "dense_ffn")}
        | {"expert_ffn": cfg.expert_ffn, "quick": args.quick},
        "batch": args.batch,
        "threads": args.threads,
        "reps": args.reps,
        "step": STEP,
        "params": params_cfg,
        "weights_gib": 4 * params_cfg / GiB,
        "grads_gib": 4 * params_cfg / GiB,
    }
    # memory first, one fresh process per backend, before this process holds a model
    mem = {}
    for name in BACKENDS:
        print(f"memory: {name} step in a fresh process ...", flush=True)
        mem[name] = run_child(args, name)
    res["memory_s"] = time.perf_counter() - t_start
    write(res | {"memory": mem}, args.out)
    t0 = time.perf_counter()
    model = build_model(cfg)
    res["build_s"] = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    if n != params_cfg:
        raise RuntimeError(f"parameter_count says {params_cfg:,} parameters, the model has {n:,}")
    batch = make_batch(cfg, args.batch)
    res["seq_len"] = batch["meta"].seq_len
    res["num_tokens"] = batch["num_tokens"]
    losses = {name: train_step(model, batch, name) for name in BACKENDS}  # warm-up each
    times = {name: {"step_s": [], "forward_s": [], "backward_s": []} for name in BACKENDS}
    t_reps = time.perf_counter()
    for rep in range(args.reps):
        for name in BACKENDS:  # torch, engine, torch, engine, ...
            parts: dict = {}
            train_step(model, batch, name, parts)
            for k, v in times[name].items():
                v.append(parts[k])
        print(
            f"rep {rep + 1}: "
            + ", ".join(f"{k} {v['step_s'][-1]:.3f} s" for k, v in times.items()),
            flush=True,
        )
        if args.budget_s is not None and time.perf_counter() - t_reps > args.budget_s:
            break
    del model
    gc.collect()
    for name in BACKENDS:
        m, ts = mem[name], times[name]
        step_peak = m["vmhwm"] and m["vmhwm"] - m["rss_after_build"]
        acts = m["rss_after_forward"] and m["rss_after_forward"] - m["rss_after_build"]
        res[name] = {
            "backend": BACKENDS[name],
            "step_median_s": statistics.median(ts["step_s"]),
            "step_s": ts["step_s"],
            "forward_median_s": statistics.median(ts["forward_s"]),
            "backward_median_s": statistics.median(ts["backward_s"]),
            "loss": losses[name],
            "child_loss": m["loss"],
            "vmhwm": m["vmhwm"],
            "rss_after_build": m["rss_after_build"],
            "step_peak": step_peak,
            "activations": acts,
            "vmhwm_gib": m["vmhwm"] and m["vmhwm"] / GiB,
            "step_peak_above_weights_gib": step_peak and step_peak / GiB,
        }
    res["reps"] = len(times["torch"]["step_s"])
    res["ratio"] = res["torch"]["step_median_s"] / res["engine"]["step_median_s"]
    res["loss_rel_diff"] = abs(losses["torch"] - losses["engine"]) / max(
        abs(losses["torch"]), 1e-12
    )
    res["computed"] = computed_memory(cfg, params_cfg, res["engine"]["activations"])
    res["total_s"] = time.perf_counter() - t_start
    if not all(math.isfinite(res[n]["step_median_s"]) for n in BACKENDS):
        raise RuntimeError("bench_paper: a step time is not finite")
    print(json.dumps(res, indent=2))
    print(table(res), flush=True)
    write(res, args.out)
    return res


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
