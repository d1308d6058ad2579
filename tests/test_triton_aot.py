"""Ahead-of-time GPU compiles of the Triton kernels, on a machine without a GPU.

Every configuration a launcher can pick is compiled for sm_80 and sm_90, in fp32, bf16 and fp16,
with Triton's own ptxas; a failed compile or a register spill fails the test. Registers, spills,
shared memory and the widest global load are printed and written to build/aot/<module>.json.
Each module in MODULES lists its compile jobs as ``aot_specs(full=False)``.

tests/conftest.py sets TRITON_INTERPRET=1 before the package is imported, which makes every
``@triton.jit`` an interpreter wrapper that cannot be compiled; the compiles therefore run in a
subprocess without that variable (``unif2ace.triton_kernels.aot.run_report``). The every-variant
sweep (flag combinations, unaligned strides) takes minutes of CPU and is marked slow.
"""

import itertools
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
torch = pytest.importorskip("torch")

from unif2ace.triton_kernels import aot  # noqa: E402
from unif2ace.triton_kernels import d3diff_loss as d3  # noqa: E402
from unif2ace.triton_kernels import d3diff_loss_aot as d3_aot  # noqa: E402

ARCHS = (80, 90)
REPORT_DIR = Path(__file__).resolve().parents[1] / "build" / "aot"
MODULES = [
    "unif2ace.triton_kernels.d3diff_loss_aot",
    "unif2ace.triton_kernels.mask_sampling_aot",
    "unif2ace.triton_kernels.moe_aot",
]


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.access(get_ptxas(90).path, os.X_OK) or shutil.which("ptxas") is not None
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not available")


def _report(module: str, full: bool) -> list[aot.AotResult]:
    results = aot.run_report(module, ARCHS, full=full, timeout=900)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    name = module.rsplit(".", 1)[-1] + ("_full" if full else "")
    with open(REPORT_DIR / f"{name}.json", "w") as f:
        json.dump([asdict(r) for r in results], f, indent=1)
    print(f"\n{module} (report: {REPORT_DIR / name}.json)\n{aot.format_table(results)}")
    return results


@pytest.fixture(scope="module", params=MODULES)
def report(request):
    return request.param, _report(request.param, full=False)


def _assert_clean(results: list[aot.AotResult]) -> None:
    failed = [f"{r.name} sm_{r.arch}: {r.error}" for r in results if not r.ok]
    assert not failed, "GPU compile failed:\n" + "\n\n".join(failed)
    spilled = [
        f"{r.name} sm_{r.arch}: {r.n_regs} regs, {r.spill_stores} B spill stores, "
        f"{r.spill_loads} B spill loads"
        for r in results
        if r.spills
    ]
    assert not spilled, "register spills:\n" + "\n".join(spilled)


def test_compiles_without_spills(report):
    _, results = report
    assert {r.arch for r in results} == set(ARCHS)
    _assert_clean(results)


def test_every_d3diff_config_is_compiled(report):
    module, results = report
    if module != "unif2ace.triton_kernels.d3diff_loss_aot":
        pytest.skip("d3diff_loss only")
    names = {(r.name, r.arch) for r in results}
    for cfg, dtype in d3_aot.aot_configs():
        tag = f"{aot.TRITON_DTYPE[dtype]}-bk{cfg.block_k}-w{cfg.num_warps}"
        if cfg.splits == 1:
            expected = [f"_d3diff_loss_fwd_kernel[{tag}-g1s1]"]
        else:
            expected = [
                f"_d3diff_loss_partial_kernel[{tag}]",
                f"_d3diff_loss_split_grad_kernel[{tag}-s{cfg.splits}-g1s1]",
            ]
        for name, arch in itertools.product(expected, ARCHS):
            assert (name, arch) in names, f"{name} was not compiled for sm_{arch}"


def test_d3diff_loads_are_16_byte_vectors(report):
    """With 16-byte-aligned rows, a thread holding >= 16 bytes of a block loads them as v4."""
    module, results = report
    if module != "unif2ace.triton_kernels.d3diff_loss_aot":
        pytest.skip("d3diff_loss only")
    sizes = {"fp32": 4, "bf16": 2, "fp16": 2}
    for r in results:
        m = r.meta
        if not r.ok or not m["aligned"]:
            continue
        per_thread_bytes = m["block_k"] // (32 * m["num_warps"]) * sizes[m["dtype"]]
        if per_thread_bytes >= 16:
            assert r.max_vector_load == 4, f"{r.name} sm_{r.arch}: widest load v{r.max_vector_load}"


def test_pick_config_stays_within_aot_configs():
    """The launcher never picks a configuration that the AOT compile did not cover."""
    covered = {cfg for cfg, _ in d3_aot.aot_configs()}
    for N, K, sms, dtype in itertools.product(
        [1, 2, 7, 37, 100, 263, 264, 512, 10_000, 1 << 20],
        [1, 3, 100, 1013, 4095, 4096, 8192, 8193, 16384, 32000, 131072, 262144, 1 << 22],
        [1, 46, 108, 132, 170],
        d3.AOT_DTYPES,
    ):
        cfg = d3._pick_config(N, K, dtype, interpret=False, num_sms=sms)
        assert cfg in covered, (N, K, sms, dtype, cfg)
        if cfg.splits > 1:  # no split is empty
            chunk = d3._split_chunk(K, cfg.splits)
            assert chunk * (cfg.splits - 1) < K, (N, K, sms, cfg)


def test_compile_spec_in_process_or_clear_error():
    """In this process the kernels are JIT functions (compile here) or interpreter wrappers
    (compile_spec must refuse with a message that points at run_report)."""
    spec = next(
        s for s in d3_aot.aot_specs() if "bk128" in s.name and s.name.startswith("_d3diff_loss_fwd")
    )
    res = aot.compile_spec(spec, 90)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        assert not res.ok and "run_report" in res.error
    else:
        assert res.ok and res.n_regs and not res.spills, res.error


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES)
def test_every_variant_compiles_without_spills(module):
    """Loss-only / unscaled flag variants and unaligned strides too (minutes of CPU)."""
    _assert_clean(_report(module, full=True))
