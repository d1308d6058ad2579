"""What the benchmarks measure, and nothing about cases or reports: time, memory and ceilings.

* **Time**: :func:`time_call` is the one timer every measurement goes through (CUDA: events around
  the call plus a synchronize; CPU: ``time.perf_counter``); :func:`summarize` turns a list of times
  into median, quartiles (IQR) and min/max; :func:`interleaved_order` is the rotation the harness
  uses so that no provider always runs first, after a cold cache or right after the most
  memory-hungry one. :func:`synced` is the callable the pytest-benchmark path times: the provider's
  call plus a device synchronize, so its clock sees the GPU work too.
* **Memory**, a separate un-timed call per provider (profiling distorts time):

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

* **Ceilings** for the roofline columns, measured in the same process (:func:`measure_ceilings`: a
  large device copy for bandwidth, a large matmul per dtype for dense FLOP/s), and
  :func:`apply_roofline`, which turns a row's GB/s and TFLOP/s into fractions of them.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

MiB = float(1 << 20)


def dtype_name(dt: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` / ``fp64`` (the names used in rows and on command lines)."""
    return {
        torch.float32: "fp32",
        torch.bfloat16: "bf16",
        torch.float16: "fp16",
        torch.float64: "fp64",
    }.get(dt, str(dt).replace("torch.", ""))


# ------------------------------------------------------------------------------------------------
# Time
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


def synced(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronize (for timers that only read a host clock)."""
    if device.type != "cuda":
        return fn

    def call() -> Any:
        out = fn()
        synchronize(device)
        return out

    return call


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
