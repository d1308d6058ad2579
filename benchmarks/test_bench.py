"""pytest-benchmark's view of the benchmark cases (see ``benchmarks/conftest.py``)."""

from __future__ import annotations

import math

import pytest

from benchmarks.measure import synced


def _info(value):
    """A value pytest-benchmark can store in its JSON (numbers, strings, booleans, None)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def test_bench(benchmark, bench_case, built_case) -> None:
    case, args = built_case, bench_case.args
    provider = next((p for p in case.providers if p.name == bench_case.provider), None)
    if provider is None:
        pytest.fail(f"{bench_case.id}: declared by the case spec but not built")
    if provider.skip is not None or provider.fn is None:
        pytest.skip(provider.skip or "no function")
    benchmark.group = f"{bench_case.bench.name}: {bench_case.spec.id}"
    benchmark.extra_info.update(
        {k: _info(v) for k, v in case.params.items()},
        case=case.name,
        provider=provider.name,
        baseline=case.baseline,
    )
    benchmark.pedantic(
        synced(provider.fn, args.device),
        setup=provider.reset,
        rounds=args.reps,
        warmup_rounds=args.warmup,
        iterations=1,
    )
    if provider.reset is not None:
        provider.reset()
