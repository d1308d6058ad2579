"""benchmarks/bench_paper.py at --quick: both backends timed and measured, the computed memory.

The script is the paper-size training-step benchmark (engine against ``backend="torch"``); here
its miniature config runs one interleaved rep (plus the two memory subprocesses) and the report it
returns and writes is checked field by field.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_paper

    out = tmp_path_factory.mktemp("bench_paper")
    res = bench_paper.main(["--quick", "--reps", "1", "--threads", "1", "--out", str(out)])
    return res, out


def test_quick_report_has_both_backends_times_and_ratio(quick_report):
    res, _ = quick_report
    assert res["benchmark"] == "paper" and res["config"]["quick"]
    assert res["seq_len"] == 387  # 129 text tokens + <soi> + 256 image tokens + <eoi>
    for name, backend in (("torch", "torch"), ("engine", "auto")):
        r = res[name]
        assert r["backend"] == backend
        assert r["step_median_s"] > 0 and math.isfinite(r["step_median_s"])
        assert r["forward_median_s"] > 0 and r["backward_median_s"] > 0
        assert len(r["step_s"]) == res["reps"] == 1
        # the same model, batch and noise: the two backends agree on the loss
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["child_loss"], rel=1e-5)
    assert res["ratio"] == pytest.approx(
        res["torch"]["step_median_s"] / res["engine"]["step_median_s"]
    )
    assert res["loss_rel_diff"] < 1e-4


def test_quick_report_memory_fields(quick_report):
    res, _ = quick_report
    assert res["params"] > 0
    assert res["weights_gib"] == pytest.approx(4 * res["params"] / 2**30)
    assert res["grads_gib"] == res["weights_gib"]
    for name in ("torch", "engine"):
        r = res[name]
        if r["vmhwm"] is None:  # not Linux: the fields are there, the values unknown
            continue
        assert r["vmhwm"] >= r["rss_after_build"] > 0
        assert r["step_peak"] == r["vmhwm"] - r["rss_after_build"] > 0
        assert r["step_peak_above_weights_gib"] == pytest.approx(r["step_peak"] / 2**30)
    comp = res["computed"]
    one = comp["adamw_one_device"]
    assert one["weights_gib"] + one["grads_gib"] + one["adam_states_gib"] == pytest.approx(
        16 * res["params"] / 2**30
    )
    card = comp["fsdp2_per_card"]
    assert card["gpus"] == 8 and card["card_gb"] == 80
    assert card["sharded_states_gib"] == pytest.approx(16 * res["params"] / 8 / 2**30)
    assert card["total_gib"] > card["sharded_states_gib"]
    assert "not measured" in comp["note"]


def test_quick_report_files_and_table(quick_report):
    from benchmarks import bench_paper

    res, out = quick_report
    doc = json.loads((out / "paper.json").read_text())
    assert doc["ratio"] == pytest.approx(res["ratio"]) and "torch" in doc and "engine" in doc
    md = (out / "paper.md").read_text()
    assert md.startswith("## UniF²ace paper config") and "Computed, not measured" in md
    text = bench_paper.table(res)
    assert "torch/engine" in text and "COMPUTED, NOT MEASURED" in text


def test_paper_config_sizes_without_building():
    """The full-size config the script runs by default: the parameter count the report uses."""
    sys.path.insert(0, str(REPO))
    from benchmarks import bench_paper

    args = bench_paper.parse([])
    cfg = bench_paper.build_config(args)
    assert (cfg.n_layers, cfg.d_model, cfg.layout) == (24, 2048, "showo")
    args = bench_paper.parse(["--layers", "2"])
    assert bench_paper.build_config(args).n_layers == 2
    with pytest.raises(SystemExit):
        bench_paper.parse(["--reps", "0"])
