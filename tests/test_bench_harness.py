"""The benchmark harness itself: statistics, interleaving, memory measurement, failure handling,
seconds-long smoke runs of the benchmark scripts in --quick mode, and the same cases collected and
run once under pytest-benchmark."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO))  # for `benchmarks.*`; appended, so the repo root never shadows an
# installed package (e.g. Triton's own `triton_kernels`)
from benchmarks import harness, measure  # noqa: E402
from benchmarks.harness import Case, Provider, Target  # noqa: E402
from benchmarks.results import Report  # noqa: E402

CPU = torch.device("cpu")
MiB = 1 << 20


def run_quick(bench, out: Path, options: str) -> dict:
    """``bench``'s script under ``--quick`` on the CPU with ``options`` (as typed on a command
    line); it must exit 0. Returns its JSON results."""
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out), *options.split()]) == 0
    return json.loads((out / f"{bench.BENCH.name}.json").read_text())


def test_summarize_median_quartiles():
    s = measure.summarize([0.003, 0.001, 0.002, 0.004, 0.100])  # seconds → ms
    assert s["median_ms"] == pytest.approx(3.0)
    assert s["q1_ms"] == pytest.approx(2.0)
    assert s["q3_ms"] == pytest.approx(4.0)
    assert (s["min_ms"], s["max_ms"], s["reps"]) == (pytest.approx(1.0), pytest.approx(100.0), 5)
    assert measure.summarize([0.001, 0.002])["median_ms"] == pytest.approx(1.5)
    assert math.isnan(measure.summarize([])["median_ms"])


def test_interleaved_order_rotates():
    names = ["a", "b", "c"]
    orders = [measure.interleaved_order(names, r) for r in range(6)]
    assert all(sorted(o) == names for o in orders)
    assert [o[0] for o in orders] == ["a", "b", "c", "a", "b", "c"]


def test_run_case_interleaves_and_resets():
    calls = []

    def make(name):
        return Provider(
            name, lambda: calls.append(name), reset=lambda: calls.append(f"reset-{name}")
        )

    case = Case("c", {"N": 1}, [make("a"), make("b"), make("c")], baseline="a")
    rows = harness.run_case(case, CPU, warmup=1, reps=4, memory=False, log=lambda s: None)
    timed = [c for c in calls if not c.startswith("reset")][3:]  # after one warm-up each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    # every call is preceded by its provider's reset
    for i, c in enumerate(calls):
        if not c.startswith("reset"):
            assert calls[i - 1] == f"reset-{c}"
    assert [r["reps"] for r in rows] == [4, 4, 4]
    assert rows[0]["speedup"] == pytest.approx(1.0)


def test_ratios_against_baseline():
    import time

    slow = Provider("slow", lambda: time.sleep(0.004))
    fast = Provider("fast", lambda: time.sleep(0.001))
    case = Case("c", {}, [slow, fast], baseline="slow", bytes=1e6)
    rows = {r["provider"]: r for r in harness.run_case(case, CPU, warmup=1, reps=5, memory=False)}
    assert rows["fast"]["speedup"] > 1.5
    assert rows["fast"]["time_ratio"] == pytest.approx(1 / rows["fast"]["speedup"])
    assert rows["fast"]["gbps"] > rows["slow"]["gbps"]


def test_cpu_memory_sees_known_allocation():
    def alloc_and_free():
        x = torch.empty(8 * MiB, dtype=torch.uint8)
        y = torch.empty(4 * MiB, dtype=torch.uint8)
        del x, y

    m = measure.measure_peak_memory(alloc_and_free, CPU)
    assert 12 * MiB <= m["peak_mem_bytes"] < 12 * MiB + 64 * 1024
    assert m["end_mem_bytes"] == 0

    kept = []
    m = measure.measure_peak_memory(
        lambda: kept.append(torch.ones(3 * MiB, dtype=torch.uint8)), CPU
    )
    assert m["end_mem_bytes"] == pytest.approx(3 * MiB, abs=4096)


def test_cpu_memory_sees_autograd_backward():
    # (x.exp() * 2).sum().backward(): exp result + product live in forward, then the gradient
    # (kept in x.grad) and exp's backward temporary: peak ≥ 3 tensors, x.grad survives.
    x = torch.randn(MiB // 4, requires_grad=True)  # 1 MiB

    def fwd_bwd():
        (x.exp() * 2).sum().backward()

    m = measure.measure_peak_memory(fwd_bwd, CPU, reset=lambda: setattr(x, "grad", None))
    assert m["peak_mem_bytes"] >= 3 * MiB
    assert m["end_mem_bytes"] == pytest.approx(MiB, abs=4096)


def test_peak_of_events():
    assert measure.peak_of_events([(0, 5), (1, 3), (2, -5), (3, 4), (4, -7)]) == (8, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_sees_known_allocation():
    dev = torch.device("cuda")

    def alloc_and_free():
        x = torch.empty(8 * MiB, dtype=torch.uint8, device=dev)
        del x

    m = measure.measure_peak_memory(alloc_and_free, dev)
    assert 8 * MiB <= m["peak_mem_bytes"] < 10 * MiB


def test_errors_skips_and_disagreement_are_rows():
    def boom():
        raise RuntimeError("kernel exploded")

    x = torch.ones(4)
    case = Case(
        "c",
        {},
        [
            Provider("ref", lambda: x * 2),
            Provider("wrong", lambda: x * 3),
            Provider("crash", boom),
            Provider("absent", None, skip="not built"),
        ],
        baseline="ref",
    )
    rows = {
        r["provider"]: r for r in harness.run_case(case, CPU, warmup=1, reps=2, log=lambda s: None)
    }
    assert rows["ref"]["status"] == "ok" and rows["ref"]["reps"] == 2
    assert rows["wrong"]["status"] == "ok" and rows["wrong"]["note"].startswith("disagrees")
    assert rows["wrong"]["rel_err"] == pytest.approx(0.5)
    assert rows["crash"]["status"] == "error" and "kernel exploded" in rows["crash"]["note"]
    assert rows["absent"]["status"] == "skipped" and rows["absent"]["note"] == "not built"

    rep = Report("t", Path("/nonexistent"), {}, rows=list(rows.values()))
    assert harness.exit_code(rep, strict=False) == 1


def test_check_targets():
    rows = [{"case": "c", "provider": "k", "status": "ok", "speedup": 3.5, "mem_reduction": 2.0}]
    res = harness.check_targets(
        rows,
        [
            Target("c", "k", "speedup", ">=", 3.0),
            Target("c", "k", "mem_reduction", ">=", 4.0),
            Target("c", "missing", "speedup", ">=", 1.0),
        ],
    )
    assert [r["passed"] for r in res] == [True, False, None]


def test_bench_d3diff_loss_quick(tmp_path):
    from benchmarks import bench_d3diff_loss as bench

    doc = run_quick(bench, tmp_path, "--n 64 --k 96 --lin-n 64 --lin-d 16 --lin-k 96 --reps 2")
    assert doc["machine"]["torch"] == torch.__version__
    rows = {(r["case"], r["provider"]): r for r in doc["rows"]}
    for key in [
        ("logits", "torch-ref"),
        ("logits-strided", "torch-ref"),
        ("linear", "torch-linear+ref"),
        ("linear", "fused-torch"),
    ]:
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["median_ms"] > 0 and rows[key]["peak_mem_bytes"] > 0
    assert rows[("linear", "fused-torch")]["rel_err"] < 1e-4
    assert "| logits |" in (tmp_path / "d3diff_loss.md").read_text()
    assert doc["targets"]


def test_bench_e2e_quick_with_profile(tmp_path):
    """The end-to-end benchmark on a one-layer model: both providers run, agree, and the profile
    splits each step into GEMM / attention / other with the bound it puts on the speed-up."""
    from benchmarks import bench_e2e as bench

    model = "n_layers=1 d_model=32 n_heads=2 expert_ffn=32"
    doc = run_quick(bench, tmp_path, f"--reps 2 --profile --model-set {model}")
    rows = {r["provider"]: r for r in doc["rows"]}
    assert rows["torch"]["status"] == "ok" and rows["engine"]["status"] == "ok"
    assert rows["engine"]["rel_err"] < 1e-3 and rows["engine"]["tokens_per_s"] > 0
    md = (tmp_path / "e2e.md").read_text()
    assert "GEMM" in md and "attention" in md and "'other' at 0" in md
    assert bench.op_category("aten::addmm") == "GEMM"
    assert bench.op_category("unif2ace::omni_attention_fwd") == "attention"
    assert bench.op_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert bench.op_category("aten::gelu") == "other"


def test_report_summarises_a_suite_folder(tmp_path):
    from benchmarks import report

    (tmp_path / "steps.tsv").write_text(
        "step\tstatus\trc\tseconds\tlog\n"
        f"build\tfailed\t1\t3\t{tmp_path / 'build.log'}\n"
        f"tests-gpu\tok\t0\t5\t{tmp_path / 'tests-gpu.log'}\n"
    )
    (tmp_path / "build.log").write_text("cmake ...\nnvcc fatal: unsupported arch\n")
    (tmp_path / "junit-gpu.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="ok"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2">tb</failure></testcase>'
        '<testcase classname="t" name="sk"><skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    rep = Report("fake", tmp_path, {"device": "cuda", "gpu": "H100"})
    rep.add([{"case": "c", "provider": "p", "status": "ok", "median_ms": 1.0}])
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "3 tests, 1 passed, 1 failed" in text
    assert "FAILURE t::bad: assert 1 == 2" in text
    assert "## fake" in text and "| c |" in text
    assert "nvcc fatal: unsupported arch" in text  # the failed step's log tail


def test_roofline_uses_the_best_ceiling():
    a = {"copy_bytes_per_s": 10e9, "matmul_flops": {"fp32": 1e12}}
    b = {"copy_bytes_per_s": 20e9, "matmul_flops": {"fp32": 0.5e12, "bf16": 2e12}}
    c = measure.merge_ceilings(a, None, b)
    assert c["copy_bytes_per_s"] == 20e9 and c["matmul_flops"] == {"fp32": 1e12, "bf16": 2e12}
    rows = [{"gbps": 5.0}, {"tflops": 0.25, "flops_dtype": "fp32"}]
    measure.apply_roofline(rows, c)
    assert rows[0]["bw_fraction"] == pytest.approx(0.25)
    assert rows[1]["flops_fraction"] == pytest.approx(0.25)


def test_bench_attention_quick(tmp_path):
    """The omni-attention benchmark: both providers run and agree, forward and backward."""
    from benchmarks import bench_attention as bench

    doc = run_quick(bench, tmp_path, "--reps 2")
    rows = {(r["case"], r["provider"]): r for r in doc["rows"]}
    for case in ("fwd[tiny]", "fwd+bwd[tiny]"):
        assert rows[(case, "torch-sdpa")]["status"] == "ok"
        if rows[(case, "cpu")]["status"] != "skipped":
            assert rows[(case, "cpu")]["rel_err"] < 1e-4 and rows[(case, "cpu")]["median_ms"] > 0
    assert 0 < rows[("fwd[tiny]", "cpu")]["score_fraction"] < 1


def test_bench_mask_sampling_and_moe_quick(tmp_path):
    """The other two scripts at tiny sizes: every provider runs, the kernels agree."""
    from benchmarks import bench_mask_sampling, bench_moe

    mask = run_quick(bench_mask_sampling, tmp_path, "--reps 1 --warmup 1 --b 1 --l 16 --k 64")
    moe_doc = run_quick(bench_moe, tmp_path, "--reps 1 --warmup 1 --t 64 --d 16 --f 32")
    assert {r["status"] for r in mask["rows"]} == {"ok"}
    assert any("exactness on supplied noise" in n for n in mask["notes"])
    moe = {(r["case"], r["provider"]): r for r in moe_doc["rows"]}
    assert moe[("dispatch", "cpu")]["rel_err"] < 1e-4
    assert moe[("layer", "cpu")]["speedup_vs_grouped_mm"] > 0


def _pytest_benchmarks(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "--bench-quick", "-q"]
    cmd += ["-p", "no:cacheprovider", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_pytest_benchmark_cases_collect_and_run_once():
    """Every bench_*.py script's cases are pytest-benchmark tests (one per case and provider), and
    a sample of them runs once with --benchmark-disable."""
    r = _pytest_benchmarks("--collect-only")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = re.findall(r"test_bench\[([^/]+)/", r.stdout)
    scripts = {
        p.stem.removeprefix("bench_")
        for p in (REPO / "benchmarks").glob("bench_*.py")
        if "\nBENCH = " in p.read_text()  # bench_showo.py is a standalone script
    }
    assert set(ids) == scripts and "e2e" in scripts, r.stdout
    assert "test_bench[moe/layer/hf-loop]" in r.stdout
    r = _pytest_benchmarks("--benchmark-disable", "-k", "d3diff_loss or dispatch")
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"\b9 passed", r.stdout), r.stdout


@pytest.mark.slow
def test_pytest_benchmark_every_case_runs_once():
    r = _pytest_benchmarks("--benchmark-disable")
    assert r.returncode == 0, r.stdout + r.stderr
    assert " failed" not in r.stdout and " error" not in r.stdout, r.stdout


def test_gpu_smoke_runs_the_model_path_on_cpu(tmp_path):
    """The suite's end-to-end step (train through the trainer, then sample) on the CPU: the same
    code the GPU run takes, a few steps."""
    from benchmarks import gpu_smoke

    gpu_smoke.main(["--out", str(tmp_path), "--device", "cpu", "--steps", "2", "--batch-size", "4"])
    res = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert res["steps"] == 2 and math.isfinite(res["loss_last"])
    assert len(res["answers"]) == 4


def test_bench_showo_quick(tmp_path):
    """The standalone Show-o benchmark at 2 layers: both providers give the same codes, and it
    writes the JSON and markdown the GPU suite's report reads."""
    from benchmarks import bench_showo

    res = bench_showo.main(["--quick", "--reps", "1", "--threads", "1", "--out", str(tmp_path)])
    assert res["identical_codes"] and res["benchmark"] == "showo"
    assert res["image_shape"] == [1, 3, 256, 256]
    assert (tmp_path / "showo.md").read_text().startswith("## Show-o t2i")
