"""The bench_*.py cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

One test per (benchmark, case, provider), e.g. ``test_bench[moe/layer/cpu]``, grouped per case so
pytest-benchmark's table puts the providers of one input set side by side. Each test times the
provider's call with ``benchmark.pedantic`` (``Provider.reset`` as its un-timed setup, one call
per round, the script's warm-up and repetition counts), so ``--benchmark-autosave``,
``--benchmark-compare`` and ``--benchmark-histogram`` work across versions. The cases are the ones
the scripts run (:class:`benchmarks.harness.CaseSpec`), built when their first test runs; the
script path adds what pytest-benchmark has no place for (interleaving, the error against the
baseline, memory, roofline, the markdown report).

Options: ``--bench-quick`` (the scripts' ``--quick`` sizes and repetitions), ``--bench-device``,
``--bench-threads``. ``make test`` never collects this folder (``testpaths = ["tests"]``).
"""

from __future__ import annotations

import gc
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.harness import Bench, Case, CaseSpec

# the harness's benchmarks (a module-level BENCH); bench_showo.py is a standalone script
BENCH_MODULES = sorted(
    p.stem
    for p in Path(__file__).parent.glob("bench_*.py")
    if "\nBENCH = " in p.read_text() or "\nBENCH: " in p.read_text()
)


@dataclass
class BenchCase:
    """One test's parameter: a provider of a declared case, with the run's resolved options."""

    bench: Bench
    args: Any
    spec: CaseSpec
    provider: str

    @property
    def id(self) -> str:
        return f"{self.bench.name}/{self.spec.id}/{self.provider}".replace(" ", "-")


def pytest_addoption(parser) -> None:
    group = parser.getgroup("unif2ace benchmarks")
    group.addoption(
        "--bench-quick", action="store_true", help="the scripts' --quick sizes and repetitions"
    )
    group.addoption("--bench-device", default="auto", choices=("auto", "cpu", "cuda"))
    group.addoption("--bench-threads", type=int, default=None, help="torch.set_num_threads")


def bench_cases(config) -> list[BenchCase]:
    argv = ["--device", config.getoption("--bench-device")]
    if config.getoption("--bench-quick"):
        argv.append("--quick")
    if config.getoption("--bench-threads"):
        argv += ["--threads", str(config.getoption("--bench-threads"))]
    out = []
    for name in BENCH_MODULES:
        bench = importlib.import_module(f"benchmarks.{name}").BENCH
        args = bench.parse(argv)
        if args.device.type not in bench.devices:
            continue
        out += [BenchCase(bench, args, s, p) for s in bench.specs(args) for p in s.providers]
    return out


def pytest_generate_tests(metafunc) -> None:
    if "bench_case" in metafunc.fixturenames:
        cases = bench_cases(metafunc.config)
        metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])


_built: dict[tuple[str, str], Case] = {}  # the case of the running tests (one at a time)


@pytest.fixture
def built_case(bench_case: BenchCase) -> Case:
    """The built case of ``bench_case``; built once for all its providers, dropped after them."""
    key = (bench_case.bench.name, bench_case.spec.id)
    if key not in _built:
        _built.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        bench_case.bench.configure(bench_case.args)
        _built[key] = bench_case.spec.build()
    return _built[key]
