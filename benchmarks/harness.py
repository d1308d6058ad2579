"""Shared benchmark harness: an op against its PyTorch peers, same process, same inputs, interleaved.

A ``benchmarks/bench_<op>.py`` declares its cases as :class:`CaseSpec` objects (an id, the names
of its providers, and a builder returning a :class:`Case`: one input set and the
:class:`Provider` callables over it) and describes itself with a :class:`Bench`. The same specs
run two ways:

* **the script** (``python benchmarks/bench_<op>.py [--quick] [--out DIR]``, :meth:`Bench.main`):
  :func:`run_case` on every case, then the report files (:mod:`benchmarks.results`). This path
  keeps what pytest-benchmark does not do: interleaved providers, the error against the baseline
  next to the time, peak memory, the roofline and the markdown report.
* **pytest-benchmark** (``pytest benchmarks/ --benchmark-only``, ``benchmarks/conftest.py``): one
  test per (case, provider), timed by ``benchmark.pedantic`` over the same provider call, so
  pytest-benchmark's storage, ``--benchmark-compare`` and histograms work between versions.

For each case :func:`run_case` does:

1. **Warm-up**: each provider runs ``warmup`` times (compiles, caches, first-touch page faults).
   The first warm-up call's outputs (the provider's return value plus ``Case.outputs()``, e.g. the
   leaves' ``.grad``) are compared with the baseline's: ``rel_err = ‖x − x_base‖ / ‖x_base‖``
   (worst over outputs), so a fast but wrong provider shows up in the same row as its time.
2. **Timing**, interleaved: repetition ``r`` runs every provider once, in an order rotated by ``r``
   (:func:`~benchmarks.measure.interleaved_order`). ``Provider.reset`` runs before every call,
   un-timed (e.g. drop ``.grad`` so each call allocates its gradients as a training step does).
   Reported: median, quartiles (IQR) and min/max per provider, ratios of medians against the
   baseline provider.
3. **Memory**, a separate un-timed call per provider
   (:func:`~benchmarks.measure.measure_peak_memory`).
4. **Roofline**: a case may state the bytes its op must move and/or the FLOPs it must do per call
   (its byte model in ``Case.notes``). The harness then reports GB/s and TFLOP/s and, against the
   ceilings measured in the same process, the fraction of roofline.
"""

from __future__ import annotations

import argparse
import gc
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import unif2ace
from benchmarks.measure import (
    apply_roofline,
    dtype_name,
    interleaved_order,
    measure_ceilings,
    measure_peak_memory,
    merge_ceilings,
    summarize,
    time_call,
)
from benchmarks.results import REPO_ROOT, Report, machine_info
from unif2ace import _backend

# ------------------------------------------------------------------------------------------------
# What a benchmark declares
# ------------------------------------------------------------------------------------------------


@dataclass
class Provider:
    """One implementation under test.

    ``fn`` runs one measured call (e.g. forward + backward) and may return the output tensor(s) to
    compare with the baseline's. ``reset`` runs, un-timed, before every call. ``skip`` (a reason)
    marks a provider that cannot run here; it is recorded in the results and never called.
    """

    name: str
    fn: Callable[[], Any] | None
    reset: Callable[[], None] | None = None
    skip: str | None = None


@dataclass
class Case:
    """One input set and the providers measured on it.

    ``params`` (sizes, dtype, device, layout …) is copied into every result row. ``bytes`` /
    ``flops`` are per call and feed the roofline columns; ``notes`` states their model.
    ``outputs`` returns tensors produced by a call besides ``fn``'s return value (e.g. ``.grad``).
    ``tol`` is the largest ``rel_err`` against the baseline accepted as agreement. ``after``
    (script path only) sees the case's rows and the report before the rows are added: derived
    columns, notes, profiles.
    """

    name: str
    params: dict[str, Any]
    providers: list[Provider]
    baseline: str
    bytes: float | None = None
    flops: float | None = None
    flops_dtype: torch.dtype | None = None
    outputs: Callable[[], Sequence[torch.Tensor | None]] | None = None
    tol: float = 1e-3
    notes: str = ""
    after: Callable[[list[dict[str, Any]], Report], None] | None = None


@dataclass
class CaseSpec:
    """A case before it is built: pytest-benchmark parametrizes over ``providers`` at collection
    time, and ``build`` allocates the inputs only when the case runs. ``providers`` names every
    provider ``build`` may return (one missing from the built case is a test failure)."""

    id: str
    providers: tuple[str, ...]
    build: Callable[[], Case]


@dataclass
class Target:
    """An informational goal, e.g. ``Target("logits", "cpu", "speedup", ">=", 3.0)``.

    ``metric`` is a key of a result row (``speedup``, ``time_ratio``, ``mem_reduction``,
    ``mem_ratio``, ``bw_fraction`` …). ``case`` matches a row's ``case`` name.
    """

    case: str
    provider: str
    metric: str
    op: str
    value: float
    label: str = ""


# ------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------


def _flatten_outputs(x: Any) -> list[torch.Tensor]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flatten_outputs(item)]
    return []


def _snapshot(ret: Any, case: Case) -> list[torch.Tensor | None]:
    outs: list[torch.Tensor | None] = [t.detach().double().cpu() for t in _flatten_outputs(ret)]
    if case.outputs is not None:
        outs += [None if t is None else t.detach().double().cpu() for t in case.outputs()]
    return outs


def rel_error(outs: Sequence[torch.Tensor | None], ref: Sequence[torch.Tensor | None]) -> float:
    """Worst ``‖x − ref‖ / ‖ref‖`` over paired outputs (inf on a missing or misshapen one)."""
    if len(outs) != len(ref):
        return math.inf
    worst = 0.0
    for x, r in zip(outs, ref):
        if x is None and r is None:
            continue
        if x is None or r is None or x.shape != r.shape:
            return math.inf
        den = r.norm().item()
        num = (x - r).norm().item()
        err = num / den if den > 0 else num
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def run_case(
    case: Case,
    device: torch.device,
    *,
    warmup: int = 2,
    reps: int = 10,
    min_reps: int = 3,
    max_time_s: float | None = None,
    memory: bool = True,
    ceilings: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Warm up, compare with the baseline, time interleaved, measure memory; one row per provider.

    ``max_time_s`` caps the timed repetitions (never below ``min_reps``), estimated from the
    warm-up. A provider that raises is recorded with ``status="error"`` and dropped from the case;
    the others carry on.
    """
    rows: dict[str, dict[str, Any]] = {}
    for p in case.providers:
        rows[p.name] = {
            "case": case.name,
            "provider": p.name,
            **case.params,
            "status": "ok",
            "note": "",
            "baseline": case.baseline,
        }
        if p.skip is not None or p.fn is None:
            rows[p.name].update(status="skipped", note=p.skip or "no function")
    active = [p for p in case.providers if rows[p.name]["status"] == "ok"]
    by_name = {p.name: p for p in active}

    def call(p: Provider) -> tuple[float, Any]:
        if p.reset is not None:
            p.reset()
        return time_call(p.fn, device)

    def fail(p: Provider, stage: str, exc: BaseException) -> None:
        rows[p.name].update(status="error", note=f"{stage}: {type(exc).__name__}: {exc}")
        rows[p.name]["traceback"] = traceback.format_exc(limit=6)
        log(f"  ! {p.name} failed during {stage}: {type(exc).__name__}: {exc}")
        by_name.pop(p.name, None)

    for p in case.providers:
        if rows[p.name]["status"] == "skipped":
            log(f"  {p.name}: skipped ({rows[p.name]['note']})")

    # 1. warm-up; the baseline first so the others are compared with it.
    order = sorted(active, key=lambda p: p.name != case.baseline)
    ref_outs: list[torch.Tensor | None] | None = None
    warm_times: dict[str, float] = {}
    for p in order:
        try:
            t, ret = call(p)
            snap = _snapshot(ret, case)
            del ret
            for _ in range(max(warmup - 1, 0)):
                t, _ = call(p)
            warm_times[p.name] = t
            log(f"  {p.name}: warm-up done, last call {t * 1e3:.2f} ms")
        except Exception as exc:  # noqa: BLE001  (a crashing provider is a result, not the end)
            fail(p, "warm-up", exc)
            continue
        if p.name == case.baseline:
            ref_outs = snap
        elif ref_outs is not None:
            err = rel_error(snap, ref_outs)
            rows[p.name]["rel_err"] = err
            if not err <= case.tol:
                rows[p.name]["note"] = (
                    f"disagrees with {case.baseline}: rel_err {err:.2e} > {case.tol:g}"
                )
        del snap
    del ref_outs
    for p in by_name.values():
        if p.reset is not None:
            p.reset()
    gc.collect()

    # 2. timed repetitions, interleaved.
    names = list(by_name)
    n_reps = reps
    if max_time_s is not None and names:
        per_round = sum(warm_times.get(n, 0.0) for n in names)
        if per_round > 0:
            n_reps = max(min_reps, min(reps, int(max_time_s / per_round)))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(n_reps):
        for name in interleaved_order(names, r):
            p = by_name.get(name)
            if p is None:
                continue
            try:
                t, _ = call(p)
                times[name].append(t)
            except Exception as exc:  # noqa: BLE001
                fail(p, f"repetition {r}", exc)
    for name in list(by_name):
        rows[name].update(summarize(times[name]))
        r = rows[name]
        log(
            f"  {name}: median {r['median_ms']:.2f} ms (IQR {r['q1_ms']:.2f}–{r['q3_ms']:.2f}, n={r['reps']})"
        )
        if by_name[name].reset is not None:
            by_name[name].reset()

    # 3. memory, one un-timed call each.
    if memory:
        for name in list(by_name):
            p = by_name[name]
            try:
                rows[name].update(measure_peak_memory(p.fn, device, p.reset))
            except Exception as exc:  # noqa: BLE001
                fail(p, "memory measurement", exc)
            if p.reset is not None:
                p.reset()
            gc.collect()

    _derive(rows, case, ceilings)
    return list(rows.values())


def _derive(rows: dict[str, dict[str, Any]], case: Case, ceilings: dict[str, Any] | None) -> None:
    """Ratios against the baseline, achieved GB/s and TFLOP/s, and the roofline fractions."""
    base = rows.get(case.baseline, {})
    bt, bm = base.get("median_ms"), base.get("peak_mem_bytes")
    for row in rows.values():
        t, m = row.get("median_ms"), row.get("peak_mem_bytes")
        if row["status"] != "ok" or t is None or not t > 0:
            continue
        if bt:
            row["time_ratio"] = t / bt
            row["speedup"] = bt / t
        if bm is not None and m is not None and bm > 0:
            row["mem_ratio"] = m / bm
            row["mem_reduction"] = bm / m if m > 0 else math.inf
        if case.bytes:
            row["bytes"] = case.bytes
            row["gbps"] = case.bytes / (t * 1e-3) / 1e9
        if case.flops:
            row["flops"] = case.flops
            row["tflops"] = case.flops / (t * 1e-3) / 1e12
            if case.flops_dtype is not None:
                row["flops_dtype"] = dtype_name(case.flops_dtype)
    apply_roofline(rows.values(), ceilings)


def check_targets(
    rows: Sequence[dict[str, Any]], targets: Sequence[Target]
) -> list[dict[str, Any]]:
    """Evaluate each target on the matching row: ``passed`` is True/False, or None when not measured."""
    ops = {
        ">=": lambda a, b: a >= b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        "<": lambda a, b: a < b,
    }
    out = []
    for tg in targets:
        row = next((r for r in rows if r["case"] == tg.case and r["provider"] == tg.provider), None)
        value = None if row is None or row.get("status") != "ok" else row.get(tg.metric)
        passed = None if value is None else bool(ops[tg.op](value, tg.value))
        out.append(
            {
                "case": tg.case,
                "provider": tg.provider,
                "metric": tg.metric,
                "op": tg.op,
                "target": tg.value,
                "value": value,
                "passed": passed,
                "label": tg.label or f"{tg.provider} {tg.metric} {tg.op} {tg.value:g}",
            }
        )
    return out


def exit_code(report: Report, strict: bool) -> int:
    """1 when a provider crashed; with ``strict`` also when a target failed or outputs disagreed."""
    if any(r.get("status") == "error" for r in report.rows):
        return 1
    if strict:
        if any(t["passed"] is False for t in report.targets):
            return 1
        if any(r.get("note", "").startswith("disagrees") for r in report.rows):
            return 1
    return 0


# ------------------------------------------------------------------------------------------------
# The script every bench_*.py runs (gpu_suite.sh relies on --out and --budget-s)
# ------------------------------------------------------------------------------------------------


def common_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench_results", help="output folder")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: cuda when available, else cpu",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repetitions (tests, CI)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, help="warm-up calls per provider")
    p.add_argument("--reps", type=int, help="max timed repetitions per provider")
    p.add_argument("--budget-s", type=float, help="rough wall-time budget; caps reps per case")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument(
        "--checks",
        choices=("on", "off", "default"),
        default="default",
        help="the ops' data checks (default: on for CPU, off for CUDA, where each check is a "
        "host sync that the eager reference does not pay)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 when a target fails or a provider disagrees with the baseline",
    )
    return p


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    return torch.device(name)


def skip_reason(backend: str, device: torch.device, kernel: str) -> str | None:
    """Why the ops cannot run ``kernel`` on ``backend`` here, or None: the library's own rule
    (:func:`unif2ace._backend.resolve`: available on the device, and a launcher registered)."""
    try:
        _backend.resolve(backend, device, kernel, kernel)
    except RuntimeError as exc:
        return str(exc)
    return None


Rows = list[dict[str, Any]]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUICK_REPS = 3  # timed repetitions per provider under --quick


@dataclass
class Sizes:
    """A benchmark's size options: ``--<key>`` (``_`` spelled ``-``) defaults to ``full[key]``, or
    to ``quick[key]`` under ``--quick``. ``columns`` are the row keys the report's tables show
    first (the case's sizes, dtype, layout …)."""

    full: dict[str, Any]
    quick: dict[str, Any]
    columns: tuple[str, ...]


@dataclass
class Bench:
    """One benchmark script: its name, sizes, cases and hooks; :meth:`main` is the whole script.

    ``doc`` is the script's docstring (its first line describes the command line).
    ``specs(args)`` declares the cases (``args.device``, ``args.sizes``, ``args.cases``,
    ``args.dtypes`` … resolved by :meth:`parse`). ``cases`` (a comma list) adds ``--cases``;
    ``dtypes`` (the default on CPU, on CUDA) adds ``--dtypes``; ``add_args(parser)`` adds the
    script's own options. ``warmup`` is the warm-up calls at (full size, ``--quick``); ``reps`` the
    timed repetitions at full size (on CPU, on CUDA), ``QUICK_REPS`` under ``--quick``.
    ``ceilings(args)`` lists the dtypes whose matmul ceiling the
    roofline needs (None: no roofline). ``targets(args)`` returns the informational goals, judged
    on the rows ``target_rows(args, rows)`` keeps (default all).
    """

    name: str
    doc: str
    sizes: Sizes
    specs: Callable[[argparse.Namespace], list[CaseSpec]]
    cases: str | None = None
    dtypes: tuple[str, str] | None = None
    add_args: Callable[[argparse.ArgumentParser], None] | None = None
    warmup: tuple[int, int] = (2, 1)
    reps: tuple[int, int] = (10, 30)
    meta: Callable[[argparse.Namespace], dict[str, Any]] | None = None
    notes: Callable[[argparse.Namespace], list[str]] = lambda args: []
    ceilings: Callable[[argparse.Namespace], Sequence[torch.dtype]] | None = None
    targets: Callable[[argparse.Namespace], list[Target]] = lambda args: []
    target_rows: Callable[[argparse.Namespace, Rows], Rows] = lambda args, rows: rows
    devices: tuple[str, ...] = ("cpu", "cuda")
    report_cls: type[Report] = Report

    def parser(self) -> argparse.ArgumentParser:
        p = common_parser(self.doc.split("\n", 1)[0])
        for key, default in self.sizes.full.items():
            p.add_argument(
                f"--{key.replace('_', '-')}",
                type=type(default),
                default=None,
                help=f"default {default!r} ({self.sizes.quick[key]!r} with --quick)",
            )
        if self.cases is not None:
            p.add_argument("--cases", default=self.cases, help="comma list of cases")
        if self.dtypes is not None:
            p.add_argument(
                "--dtypes",
                default=None,
                help=f"comma list of fp32,bf16,fp16 (default {self.dtypes[0]} on CPU, "
                f"{self.dtypes[1]} on CUDA)",
            )
        if self.add_args is not None:
            self.add_args(p)
        return p

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """The command line, with ``device``, ``backends``, ``sizes``, ``warmup``, ``reps`` and
        ``checks`` resolved to what the run uses."""
        args = self.parser().parse_args(argv)
        args.device = pick_device(args.device)
        # the engine's kernel backends measured on this device against the PyTorch peers
        args.backends = ["cpu"] if args.device.type == "cpu" else ["triton", "cuda"]
        preset = self.sizes.quick if args.quick else self.sizes.full
        args.sizes = {k: getattr(args, k) or preset[k] for k in self.sizes.full}
        if args.warmup is None:
            args.warmup = self.warmup[1] if args.quick else self.warmup[0]
        if args.reps is None:
            full = self.reps[0] if args.device.type == "cpu" else self.reps[1]
            args.reps = QUICK_REPS if args.quick else full
        if self.cases is not None:
            args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
        if self.dtypes is not None:
            names = args.dtypes or self.dtypes[args.device.type != "cpu"]
            args.dtypes = [DTYPES[d.strip()] for d in names.split(",")]
        args.checks = args.checks == "on" or (
            args.checks == "default" and args.device.type == "cpu"
        )
        return args

    def configure(self, args: argparse.Namespace) -> None:
        """The process-wide settings of a run: threads and the ops' data checks."""
        if args.threads:
            torch.set_num_threads(args.threads)
        unif2ace.set_checks(args.checks)

    def main(self, argv: Sequence[str] | None = None) -> int:
        args = self.parse(argv)
        device = args.device
        if device.type not in self.devices:
            print(f"{self.name}: nothing to measure on {device.type} ({self.doc.splitlines()[0]})")
            return 0
        self.configure(args)
        meta = machine_info(device)
        meta.update(sizes=args.sizes, value_checks=args.checks, warmup=args.warmup)
        meta.update(max_reps=args.reps, **(self.meta(args) if self.meta else {}))
        print(
            f"# {self.name} on {meta.get('gpu') or meta['cpu_model']} ({device}), torch "
            f"{meta['torch']}, {meta['torch_threads']} threads, backends here: "
            f"{meta.get('backends_available')}"
        )
        dtypes = self.ceilings(args) if self.ceilings else None
        ceilings = None if dtypes is None else measure_ceilings(device, dtypes, quick=args.quick)
        report = self.report_cls(
            self.name, args.out, meta, size_keys=self.sizes.columns, ceilings=ceilings
        )
        report.notes += self.notes(args)
        if args.quick:
            report.notes.append(
                "--quick sizes: a smoke run; the targets are meant for the full sizes."
            )
        specs = self.specs(args)
        per_case_s = args.budget_s / len(specs) if args.budget_s and specs else None
        for spec in specs:
            print(f"\n## {spec.id}", flush=True)
            case = spec.build()
            rows = run_case(
                case,
                device,
                warmup=args.warmup,
                reps=args.reps,
                max_time_s=per_case_s,
                memory=not args.no_memory,
                ceilings=ceilings,
            )
            if case.after is not None:
                case.after(rows, report)
            report.add(rows)
            del case, rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if dtypes is not None:
            # Ceilings again at the end; the best of the two is kept (one taken while another
            # process competed for the memory bus or the cores would inflate every fraction).
            report.ceilings = merge_ceilings(
                ceilings, measure_ceilings(device, dtypes, quick=args.quick)
            )
        report.targets = check_targets(self.target_rows(args, report.rows), self.targets(args))
        report.finish()
        print()
        print(report.markdown())
        print(f"results: {args.out / (self.name + '.json')}, {args.out / (self.name + '.md')}")
        return exit_code(report, args.strict)
