"""Where benchmark results go: the machine description and the :class:`Report` files.

A report is written after every case, so a run killed by a timeout keeps what it finished:
``<out>/<name>.json`` (machine, versions, commit, date, thread count, every row),
``<out>/<name>.md`` (the table and the targets), rows appended to ``<out>/<name>.csv`` (history
across machines and commits) and ``<out>/<name>.png`` when matplotlib is installed.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import unif2ace
from benchmarks.measure import MiB, apply_roofline, dtype_name
from unif2ace import _backend

REPO_ROOT = Path(__file__).resolve().parents[1]

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
    try:  # optional and slow to import: only its version is wanted here
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    info["unif2ace"] = unif2ace.__version__
    info["backends_available"] = [
        b for b in ("torch", "cpu", "triton", "cuda") if _backend.available(b, device)
    ]
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
