"""Shared benchmark harness: an op against its PyTorch peers, same process, same inputs, interleaved.

Every ``benchmarks/bench_<op>.py`` builds :class:`Case` objects (one input set, several
:class:`Provider` callables over it) and hands them to :func:`run_case`. For each case:

1. **Warm-up**: each provider runs ``warmup`` times (compiles, caches, first-touch page faults).
   The first warm-up call's outputs (the provider's return value plus ``Case.outputs()``, e.g. the
   leaves' ``.grad``) are compared with the baseline's: ``rel_err = ‖x − x_base‖ / ‖x_base‖``
   (worst over outputs), so a fast but wrong provider shows up in the same row as its time.
2. **Timing**, interleaved: repetition ``r`` runs every provider once, in an order rotated by ``r``
   (no provider always runs first, after a cold cache or right after the most memory-hungry one).
   ``Provider.reset`` runs before every call, un-timed (e.g. drop ``.grad`` so each call allocates
   its gradients as a training step does). CUDA: events around the call plus a synchronize; CPU:
   ``time.perf_counter``. Reported: median, quartiles (IQR) and min/max per provider, ratios of
   medians against the baseline provider.
3. **Memory**, a separate un-timed call per provider (profiling distorts time):

   * CUDA: ``max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
     allocated just before the call.
   * CPU: ``tracemalloc`` does not see torch's allocator. The torch profiler with
     ``profile_memory=True`` records one ``[memory]`` event per allocation (+bytes) and free
     (−bytes) of the CPU allocator; their running sum ordered by time is the memory live above the
     start of the call, and its maximum is the peak extra memory. Only allocations made on threads
     the profiler follows are seen (the calling thread and the CPU autograd engine, which runs on
     the caller for CPU tensors; not separate Python threads). Our C++/CUDA kernels allocate
     nothing themselves (they write into torch-allocated outputs), so torch's allocator events are
     the whole picture for them and for the PyTorch peers alike.
   * Cross-check on Linux: peak RSS of the call (``VmHWM`` after resetting it through
     ``/proc/self/clear_refs``, minus ``VmRSS`` before). It over- or under-counts by what glibc
     keeps or returns, so it is reported next to, never instead of, the allocator figure.

4. **Roofline**: a case may state the bytes its op must move and/or the FLOPs it must do per call
   (its byte model in ``Case.notes``). The harness then reports GB/s and TFLOP/s, and, against
   ceilings measured in the same process (:func:`measure_ceilings`: a large device copy for
   bandwidth, a large matmul per dtype for dense FLOP/s), the fraction of roofline.

Results go to ``<out>/<name>.json`` (machine, versions, commit, date, thread count, every row),
``<out>/<name>.md`` (the table and the targets), rows appended to ``<out>/<name>.csv`` (history
across machines, as Liger's benchmarks keep it) and ``<out>/<name>.png`` when matplotlib is
installed. The files are rewritten after every case, so a run killed by a timeout keeps what it
finished.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = float(1 << 20)


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
    ``tol`` is the largest ``rel_err`` against the baseline accepted as agreement.
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
# Statistics and timers
# ------------------------------------------------------------------------------------------------


def quantile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted sequence (numpy's default method)."""
    if not sorted_xs:
        return math.nan
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times_s: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max (in ms) and the count of a list of times in seconds."""
    xs = sorted(t * 1e3 for t in times_s)
    return {
        "median_ms": quantile(xs, 0.5),
        "q1_ms": quantile(xs, 0.25),
        "q3_ms": quantile(xs, 0.75),
        "min_ms": xs[0] if xs else math.nan,
        "max_ms": xs[-1] if xs else math.nan,
        "reps": len(xs),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds one call of ``fn`` takes (CUDA events + synchronize on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        synchronize(device)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3, out
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved_order(names: Sequence[str], rep: int) -> list[str]:
    """The providers' order in repetition ``rep``: the list rotated by ``rep`` positions."""
    if not names:
        return []
    k = rep % len(names)
    return list(names[k:]) + list(names[:k])


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2 (kineto prints a line on every profiler start/stop); Python errors still raise."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def cpu_memory_events(prof) -> list[tuple[int, int]]:
    """(time ns, ±bytes) of the CPU allocator's events recorded by a ``profile_memory`` profile.

    torch 2.13 exposes them as kineto events named ``[memory]`` whose ``nbytes()`` is positive for
    an allocation and negative for a free (``prof.profiler.kineto_results.events()``).
    """
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name() != "[memory]" or e.device_type() != torch.autograd.DeviceType.CPU:
            continue
        out.append((e.start_ns(), int(e.nbytes())))
    out.sort(key=lambda x: x[0])
    return out


def peak_of_events(events: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(peak, final) of the running sum of ±bytes events: memory live above the start."""
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak, live


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def measure_peak_memory(
    fn: Callable[[], Any], device: torch.device, reset: Callable[[], None] | None = None
) -> dict[str, int | None]:
    """Peak extra memory of one call of ``fn`` above what was live before it (see module doc).

    Returns ``peak_mem_bytes`` (torch allocator), ``end_mem_bytes`` (still live after the call:
    e.g. the ``.grad`` it left) and ``peak_rss_bytes`` (CPU cross-check, None if unavailable).
    """
    if reset is not None:
        reset()
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        end = torch.cuda.memory_allocated(device) - before
        return {"peak_mem_bytes": int(peak), "end_mem_bytes": int(end), "peak_rss_bytes": None}

    from torch.profiler import ProfilerActivity, profile

    rss_ok = _reset_peak_rss()
    rss_before = _proc_status_kib("VmRSS")
    with _quiet_stderr():
        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        prof.__enter__()
    try:
        out = fn()
        del out
    finally:
        with _quiet_stderr():
            prof.__exit__(None, None, None)
    hwm = _proc_status_kib("VmHWM")
    peak, end = peak_of_events(cpu_memory_events(prof))
    rss = max(0, hwm - rss_before) * 1024 if rss_ok and hwm is not None and rss_before else None
    return {"peak_mem_bytes": int(peak), "end_mem_bytes": int(end), "peak_rss_bytes": rss}


# ------------------------------------------------------------------------------------------------
# Ceilings (roofline), measured in the same process
# ------------------------------------------------------------------------------------------------


def _median_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    fn()
    return summarize([time_call(fn, device)[0] for _ in range(reps)])["median_ms"] * 1e-3


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 5) -> float:
    """Bytes/s of a large device copy, counting the read and the write (2 × size)."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * 4 / t


def measure_matmul_flops(
    device: torch.device, dtype: torch.dtype, n: int | None = None, reps: int = 5
) -> float:
    """FLOP/s of an n×n×n matmul in ``dtype`` (under the process's current TF32 settings)."""
    if n is None:
        n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = _median_time(lambda: a @ b, device, reps)
    return 2.0 * n**3 / t


def measure_ceilings(
    device: torch.device, dtypes: Sequence[torch.dtype] = (torch.float32,), quick: bool = False
) -> dict[str, Any]:
    """Copy bandwidth and dense matmul FLOP/s per dtype on ``device`` (smaller sizes if quick)."""
    nbytes = (32 << 20) if quick else None
    n = 512 if quick else None
    out: dict[str, Any] = {
        "copy_bytes_per_s": measure_copy_bandwidth(device, nbytes),
        "matmul_flops": {},
    }
    for dt in dtypes:
        if device.type == "cpu" and dt != torch.float32:
            continue  # CPU low-precision matmul speed varies with the ISA; fp32 is the ceiling we use
        out["matmul_flops"][dtype_name(dt)] = measure_matmul_flops(device, dt, n)
    if device.type == "cuda":
        out["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


# ------------------------------------------------------------------------------------------------
# Running a case
# ------------------------------------------------------------------------------------------------


def dtype_name(dt: torch.dtype) -> str:
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }.get(dt, str(dt).replace("torch.", ""))


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


def apply_roofline(rows: Iterable[dict[str, Any]], ceilings: dict[str, Any] | None) -> None:
    """(Re)compute ``bw_fraction`` / ``flops_fraction`` of rows from measured ceilings."""
    if not ceilings:
        return
    copy_bw = ceilings.get("copy_bytes_per_s")
    mm = ceilings.get("matmul_flops", {})
    for row in rows:
        if row.get("gbps") is not None and copy_bw:
            row["bw_fraction"] = row["gbps"] * 1e9 / copy_bw
        peak = mm.get(row.get("flops_dtype"))
        if row.get("tflops") is not None and peak:
            row["flops_fraction"] = row["tflops"] * 1e12 / peak


def merge_ceilings(*measured: dict[str, Any] | None) -> dict[str, Any]:
    """The best of several ceiling measurements (e.g. at the start and the end of a run): a
    ceiling measured while something else ran is too low and would inflate every fraction."""
    out: dict[str, Any] = {"copy_bytes_per_s": 0.0, "matmul_flops": {}}
    for c in measured:
        if not c:
            continue
        out["copy_bytes_per_s"] = max(out["copy_bytes_per_s"], c.get("copy_bytes_per_s", 0.0))
        for k, v in c.get("matmul_flops", {}).items():
            out["matmul_flops"][k] = max(out["matmul_flops"].get(k, 0.0), v)
        out.update({k: v for k, v in c.items() if k not in ("copy_bytes_per_s", "matmul_flops")})
    return out


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


# ------------------------------------------------------------------------------------------------
# Machine description
# ------------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _git(*args: str) -> str | None:
    try:
        r = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Machine, versions, commit, date and threads: stored with every result file."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        # Other processes on the machine distort CPU timings (OpenMP barriers wait for descheduled
        # threads): the load at the start and end of the run is kept with the results.
        "loadavg_start": _loadavg(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    try:
        import unif2ace
        from unif2ace import _backend

        info["unif2ace"] = unif2ace.__version__
        info["backends_available"] = [
            b for b in ("torch", "cpu", "triton", "cuda") if _backend.available(b, device)
        ]
    except Exception as exc:  # noqa: BLE001
        info["unif2ace"] = f"import failed: {exc}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
    return info


# ------------------------------------------------------------------------------------------------
# Output: JSON, markdown, CSV, PNG
# ------------------------------------------------------------------------------------------------


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return str(x) if isinstance(x, int) else format(x, spec)


def markdown_table(rows: Sequence[dict[str, Any]], size_keys: Sequence[str] = ()) -> str:
    """One line per provider: time (median, IQR), × baseline, peak extra memory, roofline."""
    head = [
        "case",
        *size_keys,
        "provider",
        "median ms",
        "IQR ms",
        "min–max ms",
        "speedup",
        "peak extra MiB",
        "mem ÷ baseline",
        "RSS MiB",
        "GB/s",
        "TFLOP/s",
        "% roofline",
        "rel err",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r.get("status") == "ok"
        roof = r.get("bw_fraction", r.get("flops_fraction"))
        mem = r.get("peak_mem_bytes")
        rss = r.get("peak_rss_bytes")
        note = (
            r.get("note", "")
            if r.get("status") == "ok"
            else f"{r.get('status')}: {r.get('note', '')}"
        )
        cells = [
            r["case"],
            *[_fmt(r.get(k)) for k in size_keys],
            r["provider"],
            _fmt(r.get("median_ms"), ".2f") if ok else "–",
            f"{_fmt(r.get('q1_ms'), '.2f')}–{_fmt(r.get('q3_ms'), '.2f')}" if ok else "–",
            f"{_fmt(r.get('min_ms'), '.2f')}–{_fmt(r.get('max_ms'), '.2f')}" if ok else "–",
            f"{_fmt(r.get('speedup'), '.2f')}×" if r.get("speedup") else "–",
            _fmt(mem / MiB, ".1f") if mem is not None else "–",
            f"1/{_fmt(r.get('mem_reduction'), '.2f')}" if r.get("mem_reduction") else "–",
            _fmt(rss / MiB, ".0f") if rss is not None else "–",
            _fmt(r.get("gbps"), ".1f"),
            _fmt(r.get("tflops"), ".3f"),
            f"{100 * roof:.0f}%" if roof is not None else "–",
            _fmt(r.get("rel_err"), ".1e"),
            note.replace("|", "/").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_markdown(results: Sequence[dict[str, Any]]) -> str:
    lines = []
    for t in results:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        lines.append(f"- {mark} [{t['case']}] {t['label']} (measured {_fmt(t['value'], '.3g')})")
    return "\n".join(lines)


def _json_default(x: Any) -> Any:
    if isinstance(x, torch.dtype):
        return dtype_name(x)
    if isinstance(x, (torch.device, Path)):
        return str(x)
    return repr(x)


def _json_safe(x: Any) -> Any:
    """Infinities/NaN become strings (strict JSON has no literal for them)."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class Report:
    """Collects a benchmark script's rows and writes them after every case."""

    name: str
    out_dir: Path
    meta: dict[str, Any]
    size_keys: Sequence[str] = ()
    ceilings: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, rows: Sequence[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.write()

    def markdown(self) -> str:
        m = self.meta
        where = m.get("gpu") or m.get("cpu_model")
        parts = [
            f"## {self.name}",
            "",
            f"{where}, {m.get('device')}, torch {m.get('torch')}, triton {m.get('triton')}, "
            f"{m.get('torch_threads')} threads, commit {str(m.get('git_commit'))[:10]}"
            f"{' (dirty)' if m.get('git_dirty') else ''}, {m.get('date')}",
        ]
        if self.ceilings:
            c = self.ceilings
            mm = ", ".join(
                f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in c.get("matmul_flops", {}).items()
            )
            parts.append(
                f"Measured ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s; matmul {mm}."
            )
        load = [m.get("loadavg_start"), m.get("loadavg_end")]
        if (
            any(x and x[0] > 0.5 * (m.get("cpu_count") or 1) for x in load)
            and m.get("device") == "cpu"
        ):
            parts.append(
                f"**Machine busy** (1-min load average {load[0]} at start, {load[1]} at end "
                f"on {m.get('cpu_count')} CPUs): CPU timings are inflated and noisy."
            )
        parts += ["", markdown_table(self.rows, self.size_keys)]
        if self.targets:
            parts += ["", "Targets (informational):", "", targets_markdown(self.targets)]
        if self.notes:
            parts += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(parts) + "\n"

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        doc = {
            "benchmark": self.name,
            "machine": self.meta,
            "ceilings": self.ceilings,
            "rows": self.rows,
            "targets": self.targets,
            "notes": self.notes,
        }
        (self.out_dir / f"{self.name}.json").write_text(
            json.dumps(_json_safe(doc), indent=1, default=_json_default) + "\n"
        )
        (self.out_dir / f"{self.name}.md").write_text(self.markdown())

    def finish(self) -> None:
        """Final write, plus the CSV history rows and the PNG plot (if matplotlib is installed)."""
        self.meta["loadavg_end"] = _loadavg()
        apply_roofline(self.rows, self.ceilings)
        self.write()
        self._append_csv()
        self._plot()

    def _append_csv(self) -> None:
        keys = [
            "date",
            "benchmark",
            "device_name",
            "torch",
            "git_commit",
            "case",
            *self.size_keys,
            "provider",
            "status",
            "median_ms",
            "q1_ms",
            "q3_ms",
            "speedup",
            "peak_mem_bytes",
            "mem_reduction",
            "gbps",
            "tflops",
            "rel_err",
        ]
        path = self.out_dir / f"{self.name}.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            if new:
                w.writeheader()
            for r in self.rows:
                w.writerow(
                    {
                        **r,
                        "date": self.meta.get("date"),
                        "benchmark": self.name,
                        "device_name": self.meta.get("gpu") or self.meta.get("cpu_model"),
                        "torch": self.meta.get("torch"),
                        "git_commit": self.meta.get("git_commit"),
                    }
                )

    def _plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        ok = [r for r in self.rows if r.get("status") == "ok"]
        if not ok:
            return None
        labels = [f"{r['case']}\n{r['provider']}" for r in ok]
        fig, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(ok)), 4.5))
        axes[0].bar(range(len(ok)), [r.get("speedup", 0) for r in ok])
        axes[0].set_ylabel("speedup vs baseline (median)")
        axes[1].bar(range(len(ok)), [r.get("mem_reduction", 0) or 0 for r in ok])
        axes[1].set_ylabel("peak extra memory reduction vs baseline")
        for ax in axes:
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xticks(range(len(ok)), labels, rotation=60, ha="right", fontsize=7)
        fig.suptitle(f"{self.name} — {self.meta.get('gpu') or self.meta.get('cpu_model')}")
        fig.tight_layout()
        path = self.out_dir / f"{self.name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ------------------------------------------------------------------------------------------------
# Command line shared by every bench_*.py (gpu_suite.sh relies on --out and --budget-s)
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls per provider")
    p.add_argument("--reps", type=int, default=None, help="max timed repetitions per provider")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="rough wall-time budget for the whole script; caps repetitions per case",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
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
