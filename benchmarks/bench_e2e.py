"""End-to-end training step: UniF²ace.loss forward + backward + AdamW, engine kernels vs backend="torch".

Synthetic batches per config (half text→image, half image→text examples built with
:class:`~unif2ace.models.layout.Example` and :func:`~unif2ace.models.layout.collate`: random image
codes, prompts, questions and answers of varied lengths, random semantic / identity embeddings).
Two providers run the same steps on two copies of one model (same initial weights, each with its
own AdamW: the trainer's, fused), in the same process, interleaved, medians:

* ``engine``  ``unif2ace.use_backend("auto")``: the ops resolve to the C++ CPU kernels (``cpu``)
              on CPU, Triton / CUDA on a GPU — MoE routing + dispatch, the fused D3Diff / CE
              linear loss, token masking, omni-attention (CPU);
* ``torch``   ``unif2ace.use_backend("torch")``: every op's plain-PyTorch reference (the baseline).

Attention is torch's SDPA with the boolean omni mask in ``torch`` and the engine's omni-attention
kernel (``unif2ace.ops.omni_attention``) in ``engine``; everything else (the projections,
LayerNorm, embeddings, AdamW) is the same PyTorch code in both. A step
is ``zero_grad`` (un-timed, so each step allocates its gradients as training does) → ``model.loss``
(fixed ``step=0, seed=0``: same masks and times every call) → ``backward`` → ``AdamW.step``. The
global RNG is re-seeded before each call (the sequence MoE's noise expert draws from it).

Reported per provider: step time (median, IQR), tokens/s = the batches' mean ``num_tokens`` / median step
time, the speedup over ``torch``, and the peak extra CPU memory of one step (torch allocator events
through the profiler, the harness's measure; RSS as a cross-check). ``rel_err``: the first step's
loss and every parameter gradient against the torch provider's (same weights).

``--profile`` adds one torch.profiler step per provider and the top ops by self CPU time.

``--compile`` adds ``torch+compile`` and ``engine+compile``: the same step with the loss
compiled by :meth:`UniF2ace.compile_loss` (the layout's host work eager, the model and the fused
losses one Inductor graph with the batch's sizes dynamic), backward through the compiled graph,
AdamW eager (its fused kernel beats Inductor's compiled AdamW here). Their first warm-up call
compiles (``compile_s``: its wall time, one step included; it depends on Inductor's on-disk
cache, so state whether it was cold). ``--batches K`` cycles the steps over K batches of other
lengths and layouts, as training does: the compiled providers then also show that they do not
recompile. Inductor draws random numbers as eager does (``fallback_random``), so the noise
expert's draws and hence ``rel_err`` stay comparable.

Measure with ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1``: with OpenMP's default spin-wait on a
shared machine the 2-thread step time and the ratio swing widely from run to run, and the ratio
also depends on how the threads wait (``GOMP_SPINCOUNT``, recorded with the results). The
measured figures and that dependence are in ``docs/results.md``.

Run (the same cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only -k e2e``)::

    python benchmarks/bench_e2e.py --threads 2                  # tiny and small, batch 8
    python benchmarks/bench_e2e.py --quick --out /tmp/b         # CI: tiny, batch 2, < 60 s idle
    python benchmarks/bench_e2e.py --configs tiny --profile     # where the time goes
    python benchmarks/bench_e2e.py --configs tiny --compile     # eager and compiled, 4 providers
"""

from __future__ import annotations

import copy
import functools
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch.profiler import ProfilerActivity, profile

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*` (appended)
import unif2ace  # noqa: E402
from benchmarks.harness import Bench, Case, CaseSpec, Provider, Sizes, Target  # noqa: E402
from benchmarks.results import Report  # noqa: E402
from unif2ace import _backend  # noqa: E402
from unif2ace.models import Example, UniF2ace, collate, get_config  # noqa: E402
from unif2ace.models.layout import TASK_MMU, TASK_T2I  # noqa: E402

SIZES = Sizes(
    full={"configs": "tiny,small", "batch": 8},
    quick={"configs": "tiny", "batch": 2},
    columns=("config", "layers", "B", "tokens", "dtype"),
)
FIRST_TEXT_ID = 16  # above the special tokens
TOL = 1e-3  # loss + gradients, fp32: the ops' references and kernels differ by rounding only


def synthetic_examples(cfg, n: int, seed: int = 0) -> list[Example]:
    """``n`` examples alternating t2i / mmu, random codes and text of varied lengths."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))
    text = lambda n: torch.randint(FIRST_TEXT_ID, cfg.text_vocab, (n,), generator=g).tolist()
    Lt = cfg.max_text_len
    exs = []
    for i in range(n):
        codes = torch.randint(0, cfg.codebook_size, (cfg.image_tokens,), generator=g)
        if i % 2 == 0:
            exs.append(Example(TASK_T2I, codes, text(rnd(Lt // 4, Lt)), index=i))
        else:
            sem = torch.randn(cfg.semantic_dim, generator=g)
            ident = torch.randn(cfg.identity_dim, generator=g)
            q, a = text(rnd(4, Lt // 4)), text(rnd(Lt // 4, Lt))
            exs.append(Example(TASK_MMU, codes, q, a, sem, ident, index=i))
    return exs


def synthetic_batch(cfg, B: int, device, seed: int = 0) -> dict:
    """The collated batch of :func:`synthetic_examples` on ``device``."""
    batch = collate(cfg, synthetic_examples(cfg, B, seed))
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    """One model copy + its AdamW; ``step`` runs one training step under ``backend`` on the next
    of ``batches`` (cycling, so every provider sees the same batch at its n-th call)."""

    def __init__(self, name: str, model, batches, backend: str, compiled: bool = False):
        self.name, self.model, self.backend = name, model, backend
        self.batches = batches if isinstance(batches, list) else [batches]
        self.calls = 0
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the trainer's AdamW (fused kernel, train.build_optimizer), eager in every provider: it
        # is faster than Inductor's compiled AdamW step here, so the compiled providers compile
        # the loss only, as train.compile does
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, fused=True)
        self.cpu_s: list[float] = []  # process CPU seconds of every call (see cpu_ms below)
        self.wall_s: list[float] = []  # wall seconds of every call (the first: compile_s)
        self.compiled = compiled
        if compiled:
            self.loss_fn = model.compile_loss()

    def reset(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        torch.manual_seed(0)

    def step(self):
        batch = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        c0, w0 = time.process_time(), time.perf_counter()
        with unif2ace.use_backend(self.backend):
            if self.compiled:
                # the eager RNG stream in the graph (the noise expert's draws stay comparable)
                with torch._inductor.config.patch(fallback_random=True):
                    loss, _ = self.loss_fn(batch, step=0, seed=0)
                    loss.backward()
            else:
                loss, _ = self.model.loss(batch, step=0, seed=0)
                loss.backward()
            self.opt.step()
        self.cpu_s.append(time.process_time() - c0)
        self.wall_s.append(time.perf_counter() - w0)
        # the loss and every gradient: compared with the baseline on the first call only
        return [loss.detach(), *[p.grad for p in self.params]]


def build_case(
    name: str,
    B: int,
    layers: int | None,
    device,
    extra: dict,
    profile: bool = False,
    compiled: bool = False,
    n_batches: int = 1,
) -> Case:
    """One training step of config ``name`` (``extra``: model config overrides) on both
    providers; ``profile`` adds a torch.profiler step per provider to the report; ``compiled``
    adds the two compiled providers; ``n_batches``: the steps cycle over that many batches
    (other lengths, layouts and masked counts, as in training)."""
    overrides = {"n_layers": layers} if layers else {}
    overrides.update(extra)
    cfg = get_config(name, **overrides)
    torch.manual_seed(0)
    model = UniF2ace(cfg).to(device).train()
    batches = [synthetic_batch(cfg, B, device, seed=s) for s in range(n_batches)]
    batch = batches[0]
    tokens = statistics.mean(b["num_tokens"] for b in batches)
    trainers = {
        "torch": Trainer("torch", model, batches, "torch"),
        "engine": Trainer("engine", copy.deepcopy(model), batches, "auto"),
    }
    if compiled:
        for prov, backend in (("torch+compile", "torch"), ("engine+compile", "auto")):
            trainers[prov] = Trainer(prov, copy.deepcopy(model), batches, backend, compiled=True)
    params = {
        "config": name,
        "layers": cfg.n_layers,
        "B": B,
        "tokens": tokens,
        "batches": n_batches,
        "seq_len": batch["input_ids"].shape[1],
        "dtype": "fp32",
        "device": device.type,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "engine_resolves_to": _backend.resolve("auto", device, "e2e"),
    }
    case_name = f"train_step[{name}]"

    def after(rows, report) -> None:
        for r in rows:
            if r.get("status") == "ok":
                r["tokens_per_s"] = tokens / (r["median_ms"] * 1e-3)
                t = trainers[r["provider"]]
                r["cpu_ms"] = 1e3 * statistics.median(t.cpu_s) if t.cpu_s else None
                if t.compiled and t.wall_s:
                    r["compile_s"] = t.wall_s[0]
        # issue 22's ratios: compiled against eager of the same backend, engine against torch
        ms = {r["provider"]: r["median_ms"] for r in rows if r.get("status") == "ok"}
        for r in rows:
            p = r["provider"]
            if p.endswith("+compile") and p in ms and p[: -len("+compile")] in ms:
                r["x_eager"] = ms[p[: -len("+compile")]] / ms[p]
            if p == "engine+compile" and "torch+compile" in ms:
                r["x_torch_compile"] = ms["torch+compile"] / ms[p]
        ratios = [
            f"{r['provider']} {r['x_eager']:.2f}× its eager"
            + (f", {r['x_torch_compile']:.2f}× torch+compile" if "x_torch_compile" in r else "")
            + f", compile {r['compile_s']:.1f} s"
            for r in rows
            if "x_eager" in r
        ]
        if ratios:
            report.notes.append(f"{case_name}: " + "; ".join(ratios))
            print("  " + "; ".join(ratios))
        base = next((r for r in rows if r["provider"] == "torch" and r.get("cpu_ms")), None)
        for r in rows:
            if base and r.get("cpu_ms"):
                r["cpu_speedup"] = base["cpu_ms"] / r["cpu_ms"]
        if not profile:
            return
        for t in trainers.values():
            if t.compiled:
                continue
            prof = profile_step(t)
            report.profiles[f"{case_name} {t.backend}"] = prof
            top = ", ".join(f"{p['op']} {p['self_pct']:.0f}%" for p in prof["top"][:8])
            print(f"  top ops ({t.backend}): {top}")
        note = ceiling_note(report.profiles, case_name)
        if note:
            report.notes.append(note)
            print("  " + note)

    return Case(
        name=case_name,
        params=params,
        providers=[Provider(n, t.step, t.reset) for n, t in trainers.items()],
        baseline="torch",
        tol=TOL,
        notes="loss fwd + bwd + AdamW step; tokens/s = num_tokens / median step time",
        after=after,
    )


GEMM_OPS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")


def op_category(name: str) -> str:
    """GEMM (the same matmuls in both providers), attention (torch's SDPA, or the engine's
    omni-attention kernel) or other (the engine's other ops, plus norms, embeddings and the
    optimizer, the same code in both)."""
    if name in GEMM_OPS:
        return "GEMM"
    return "attention" if ("scaled_dot_product" in name or "omni_attention" in name) else "other"


def profile_step(trainer: Trainer, top: int = 15) -> dict:
    """Top ops by self CPU time of one (warm) step, and the self time per op_category."""
    trainer.reset()
    trainer.step()
    trainer.reset()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step()
    avgs = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in avgs) or 1.0
    cats = {"GEMM": 0.0, "attention": 0.0, "other": 0.0}
    for e in avgs:
        cats[op_category(e.key)] += e.self_cpu_time_total / 1e3
    return {
        "top": [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": e.self_cpu_time_total / 1e3,
                "self_pct": 100.0 * e.self_cpu_time_total / total,
            }
            for e in avgs[:top]
        ],
        "categories_ms": cats,
    }


def ceiling_note(profiles: dict, case: str) -> str | None:
    """The bound the profile puts on the engine's speed-up: the torch step's time if the engine
    made every op outside the shared GEMMs and attention free."""
    base = profiles.get(f"{case} torch")
    eng = profiles.get(f"{case} auto")
    if not base or not eng:
        return None
    b, e = base["categories_ms"], eng["categories_ms"]
    tb, te = sum(b.values()), sum(e.values())
    return (
        f"{case}: profiled self time torch {tb:.0f} ms = GEMM {b['GEMM']:.0f} + attention "
        f"{b['attention']:.0f} + other {b['other']:.0f}; engine {te:.0f} ms = GEMM {e['GEMM']:.0f} "
        f"+ attention {e['attention']:.0f} + other {e['other']:.0f}. The GEMMs are the same code "
        f"in both providers: with its attention as it is and 'other' at 0 the engine would reach "
        f"{tb / (e['GEMM'] + e['attention']):.2f}× torch."
    )


@dataclass
class E2EReport(Report):
    """The harness report plus a throughput table (tokens/s) and the profiles."""

    profiles: dict = field(default_factory=dict)

    def markdown(self) -> str:
        lines = [
            "",
            "| case | provider | tokens | median ms | tokens/s | × torch | CPU ms | "
            "CPU × torch | peak MiB | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            if r.get("status") != "ok":
                continue
            mem = r.get("peak_mem_bytes")
            comp = f"{r['compile_s']:.1f}" if r.get("compile_s") else "–"
            lines.append(
                f"| {r['case']} | {r['provider']} | {r['tokens']} | {r['median_ms']:.1f} | "
                f"{r['tokens_per_s']:.0f} | {r.get('speedup', 1.0):.2f}× | "
                f"{r.get('cpu_ms') or float('nan'):.0f} | {r.get('cpu_speedup') or float('nan'):.2f}× | "
                f"{'–' if mem is None else f'{mem / 2**20:.1f}'} | "
                f"{comp} |"
            )
        out = super().markdown() + "\nThroughput:\n" + "\n".join(lines) + "\n"
        for key, prof in self.profiles.items():
            cats = ", ".join(f"{k} {v:.1f} ms" for k, v in prof["categories_ms"].items())
            out += f"\nTop ops by self CPU time, {key} ({cats}):\n\n| op | calls | self ms | % |\n"
            out += "|---|---|---|---|\n" + "".join(
                f"| {p['op']} | {p['calls']} | {p['self_ms']:.1f} | {p['self_pct']:.1f} |\n"
                for p in prof["top"]
            )
        return out

    def write(self) -> None:
        if self.profiles:
            self.meta["profiles"] = self.profiles
        super().write()


def case_specs(args) -> list[CaseSpec]:
    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.model_set)}
    specs = []
    for name in (c.strip() for c in args.sizes["configs"].split(",") if c.strip()):
        layers = args.small_layers if name == "small" else None
        build = functools.partial(
            build_case,
            name,
            args.sizes["batch"],
            layers,
            args.device,
            extra,
            args.profile,
            args.compile,
            args.batches,
        )
        providers = ("torch", "engine")
        if args.compile:
            providers += ("torch+compile", "engine+compile")
        specs.append(CaseSpec(f"train_step[{name}]", providers, build))
    return specs


def targets_for(args) -> list[Target]:
    out = []
    for spec in case_specs(args):
        out += [
            Target(spec.id, "engine", "speedup", ">=", 1.3, "engine ≥ 1.3× torch tokens/s"),
            Target(spec.id, "engine", "mem_ratio", "<", 1.0, "engine peak memory < torch's"),
        ]
    return out


def add_args(p) -> None:
    p.add_argument(
        "--model-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="model config overrides, e.g. expert_activation=silu_glu",
    )
    p.add_argument("--small-layers", type=int, help="the small config's n_layers (default 8)")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops per provider")
    p.add_argument(
        "--compile",
        action="store_true",
        help="add torch+compile and engine+compile (torch.compile of the loss and AdamW step)",
    )
    p.add_argument(
        "--batches",
        type=int,
        default=1,
        help="cycle the steps over this many batches (other lengths and layouts, as training "
        "does; the compiled providers then show whether they recompile)",
    )


BENCH = Bench(
    "e2e",
    __doc__,
    SIZES,
    case_specs,
    add_args=add_args,
    warmup=(1, 1),
    reps=(7, 7),
    meta=lambda args: {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
    },
    notes=lambda args: [
        "Same model weights, same batch; interleaved repetitions, medians. engine = "
        "use_backend('auto'), torch = use_backend('torch'); speedup against torch.",
        "peak extra MiB: torch-allocator peak of one step above what was live before it "
        "(gradients, activations, optimizer temporaries; AdamW state already exists).",
        "CPU ms: median process CPU time of a call (warm-up, timed and memory calls), all "
        "threads summed; on a shared, busy box it is steadier than wall time (preemption does "
        "not count) but it counts OpenMP spin-waits, so compare it at --threads 1.",
    ],
    targets=targets_for,
    report_cls=E2EReport,
)
main = BENCH.main

if __name__ == "__main__":
    raise SystemExit(main())
