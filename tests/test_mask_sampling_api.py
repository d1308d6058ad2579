"""Mask sampling, the API around the kernels: custom-op registration (opcheck, torch.compile), one
test per validation rule of the public functions, and the benchmark script's smoke run.

The numerical tests (exactness, the Philox contract, statistics, invariants) are in
test_mask_sampling.py, whose input helpers these tests share.
"""

import pytest
import torch
from test_mask_sampling import CPU_BUILT, quantized_logits, random_state

import unif2ace
from conftest import backend_params, device_for
from unif2ace import _backend
from unif2ace.ops import mask_tokens, maskgit_decode, maskgit_step
from unif2ace.ops.mask_sampling.reference import gumbel_from_bits

# ---- registration: opcheck and torch.compile ----------------------------------------------------------


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "triton")])
def test_opcheck(backend):
    dev = device_for(backend)
    B, L, K = 2, 5, 9
    logits = quantized_logits((B, L, K), dev)
    uncond = quantized_logits((B, L, K), dev)
    ids, mask_len = random_state(B, L, K, K, dev)
    gn = gumbel_from_bits(torch.randint(0, 2**32, (B, L, K))).to(dev)
    cn = torch.randn(B, L, device=dev)
    for args in (
        (logits, uncond, ids, mask_len, K, 1.5, 2.0, 0.5, 7, 1, gn, cn, True, backend),
        (logits, None, ids, mask_len, K, 0.0, 1.0, 4.5, 7, 1, None, None, True, backend),
    ):
        torch.library.opcheck(torch.ops.unif2ace.maskgit_step_fwd.default, args)
    ids2 = torch.randint(0, 9, (B, 13), device=dev)
    gamma = torch.rand(B, device=dev)
    n_mask = torch.tensor([3, 13], device=dev)
    for mode in (0, 1):
        torch.library.opcheck(
            torch.ops.unif2ace.mask_tokens_fwd.default,
            (ids2, gamma, n_mask, -1, 3, 0, mode, backend),
        )


def test_torch_compile():
    if not CPU_BUILT:
        pytest.skip("CPU kernels not built")
    B, L, K = 2, 7, 33
    logits, uncond = quantized_logits((B, L, K), "cpu"), quantized_logits((B, L, K), "cpu")
    ids, mask_len = random_state(B, L, K, K, "cpu")

    def step(logits, uncond, ids, mask_len):
        new_ids, mask = maskgit_step(
            logits,
            ids,
            K,
            mask_len,
            uncond_logits=uncond,
            guidance=1.5,
            seed=3,
            offset=2,
            backend="cpu",
        )
        masked, _ = mask_tokens(new_ids, 0.5, K, seed=4, backend="cpu")
        return new_ids, mask, masked

    with unif2ace.use_backend("cpu"):
        _backend.set_checks(False)  # value checks read the data: not part of a compiled graph
        try:
            compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
            got = compiled(logits, uncond, ids, mask_len)
        finally:
            _backend.set_checks(True)
    want = step(logits, uncond, ids, mask_len)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


# ---- GPU launchers: on the tensors' device -------------------------------------------------------------


def test_gpu_launchers_enter_the_tensors_device(monkeypatch, launch_recorder):
    """The "triton" and "cuda" launchers of both kernels, on (fake) tensors of cuda:1 while cuda:0
    is current: every launch, the SM count, the workspace query and the stream are cuda:1's."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unif2ace.ops.mask_sampling import _cpu as ms_cpu
    from unif2ace.ops.mask_sampling import _cuda as ms_cuda

    tk = pytest.importorskip("unif2ace.triton_kernels.mask_sampling")
    rec = launch_recorder
    kernels = (
        "_select_kernel",
        "_bernoulli_kernel",
        "_maskgit_scan_kernel",
        "_maskgit_combine_kernel",
    )
    for name in kernels:
        monkeypatch.setattr(tk, name, rec)
    launch = pytest.importorskip("unif2ace.triton_kernels._launch")
    monkeypatch.setattr(launch, "num_sms", rec.num_sms)

    rec.mock_native(
        ms_cuda, ms_cpu, "maskgit_step_workspace_bytes", "mask_tokens_fwd", "maskgit_step_fwd"
    )
    split = tk.StepConfig(block_k=64, num_warps=4, splits=2)
    with FakeTensorMode():
        dev = torch.device("cuda", 1)
        B, L, K = 2, 6, 300
        ids = torch.zeros(B, L, dtype=torch.int64, device=dev)
        gamma, n_mask = torch.empty(B, device=dev), torch.ones(B, dtype=torch.int64, device=dev)
        out = (torch.empty_like(ids), torch.empty(B, L, dtype=torch.bool, device=dev))
        logits = torch.empty(B, L, K, device=dev)
        step = (logits, None, ids, n_mask, K, 0.0, 1.0, 1.0, 3, 0, None, None, *out)
        step_out = torch.empty(B, L, device=dev)
        for backend in ("triton", "cuda"):
            for mode in (0, 1):
                launch = _backend.launcher("mask_sampling.mask_tokens", backend)
                launch(ids, gamma, n_mask, K, 3, 0, mode, *out)
            _backend.launcher("mask_sampling.maskgit_step", backend)(*step, step_out)
        tk.maskgit_step_fwd(*step, step_out, config=split)
    kinds = [k for k, _ in rec.seen]
    # triton: select, bernoulli, scan, select; cuda: 3 calls; the forced split: scan, combine, select
    assert kinds.count("launch") == 4 + 3 + 3
    assert {"sms", "workspace", "stream"} <= set(kinds)
    assert all(index == 1 for _, index in rec.seen), rec.seen


# ---- validation: one test per rule ---------------------------------------------------------------------


def _good(B=2, L=5, K=8):
    logits = torch.randn(B, L, K)
    ids = torch.full((B, L), K)
    return logits, ids, K, torch.tensor([2, 3])


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize(
    "change,err,match",
    [
        (lambda a: a.update(logits=torch.randn(2, 5)), ValueError, "3-D tensor"),
        (
            lambda a: a.update(
                logits=torch.randn(2, 0, 8), ids=torch.zeros(2, 0, dtype=torch.long)
            ),
            ValueError,
            "L = 0",
        ),
        (lambda a: a.update(logits=torch.randn(2, 5, 0)), ValueError, "K = 0"),
        (lambda a: a.update(ids=torch.full((2, 4), 8)), ValueError, "ids must have shape"),
        (lambda a: a.update(ids=torch.full((2, 5), 8.0)), TypeError, "ids must be one of"),
        (lambda a: a["ids"].__setitem__((0, 1), 9), ValueError, "ids has 1 entries outside"),
        (lambda a: a["ids"].__setitem__((1, 0), -3), ValueError, "ids has 1 entries outside"),
        (lambda a: a.update(mask_id=3), ValueError, "mask_id = 3 is a codebook index"),
        (
            lambda a: a.update(ids=a["ids"].int(), mask_id=2**31),
            ValueError,
            "does not fit the ids' dtype torch.int32",
        ),
        (lambda a: a.update(mask_len=torch.tensor([-1, 2])), ValueError, "mask_len must be in"),
        (lambda a: a.update(mask_len=torch.tensor([2, 6])), ValueError, "mask_len must be in"),
        (
            lambda a: a.update(mask_len=torch.tensor([2, 3, 4])),
            ValueError,
            "mask_len must have shape",
        ),
        (lambda a: a.update(mask_len=torch.tensor([2.0, 3.0])), TypeError, "mask_len must be int"),
        (lambda a: a.update(uncond_logits=torch.randn(2, 5, 9)), ValueError, "shape of logits"),
        (
            lambda a: a.update(uncond_logits=torch.randn(2, 5, 8, device="meta")),
            ValueError,
            "uncond_logits is on meta",
        ),
        (
            lambda a: a.update(uncond_logits=torch.randn(2, 5, 8, dtype=torch.float64)),
            TypeError,
            "uncond_logits dtype",
        ),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature must be > 0"),
        (lambda a: a.update(temperature=-1.0), ValueError, "temperature must be > 0"),
        (lambda a: a.update(temperature=float("nan")), ValueError, "temperature must be a finite"),
        (
            lambda a: a.update(choice_temperature=-0.5),
            ValueError,
            "choice_temperature must be >= 0",
        ),
        (lambda a: a.update(guidance=float("inf")), ValueError, "guidance must be a finite"),
        (lambda a: a.update(seed=-1), ValueError, "seed must be in"),
        (lambda a: a.update(seed=2**63), ValueError, "seed must be in"),
        (lambda a: a.update(offset=2**30), ValueError, "offset must be in"),
        (
            lambda a: a.update(gumbel_noise=torch.randn(2, 5, 7)),
            ValueError,
            "gumbel_noise must have",
        ),
        (lambda a: a.update(gumbel_noise=torch.randn(2, 5, 8).double()), TypeError, "gumbel_noise"),
        (lambda a: a.update(choice_noise=torch.randn(2, 4)), ValueError, "choice_noise must have"),
        (lambda a: a.update(backend="nope"), ValueError, "backend must be one of"),
    ],
)
def test_step_validation(backend, change, err, match):
    if backend == "cpu" and not CPU_BUILT:
        pytest.skip("CPU kernels not built")
    logits, ids, mask_id, mask_len = _good()
    a = dict(logits=logits, ids=ids, mask_id=mask_id, mask_len=mask_len, backend=backend)
    change(a)
    with pytest.raises(err, match=match):
        maskgit_step(a.pop("logits"), a.pop("ids"), a.pop("mask_id"), a.pop("mask_len"), **a)


def test_step_value_checks_can_be_disabled():
    """set_checks(False) skips the data-reading checks; the kernel still stays in bounds (an id out
    of range at a known position is copied through, never used as an index)."""
    if not CPU_BUILT:
        pytest.skip("CPU kernels not built")
    logits, ids, K, mask_len = _good()
    ids[0, 0] = 1000
    _backend.set_checks(False)
    try:
        out, _ = maskgit_step(logits, ids, K, torch.tensor([2, 9]), seed=1, backend="cpu")
    finally:
        _backend.set_checks(True)
    assert out[0, 0] == 1000 and (out[1] == K).all()  # mask_len clamped to L by the kernel


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(ids=torch.zeros(2, 0, dtype=torch.long)), ValueError, "L = 0"),
        (dict(ids=torch.zeros(4, dtype=torch.long)), ValueError, "2-D tensor"),
        (dict(ids=torch.zeros(2, 3)), TypeError, "ids must be one of"),
        (dict(gamma=torch.tensor([0.5, 1.5])), ValueError, "gamma must be finite and in"),
        (dict(gamma=torch.tensor([0.5, float("nan")])), ValueError, "gamma must be finite and in"),
        (dict(gamma=torch.tensor([0.5])), ValueError, "gamma must have shape"),
        (dict(mode="random"), ValueError, "mode must be one of"),
        (dict(seed=-5), ValueError, "seed must be in"),
        # a mask id the ids' dtype cannot hold would be written as a wrapped value (0, -2^31)
        (dict(ids=torch.zeros(2, 3, dtype=torch.int32), mask_id=2**31), ValueError, "not fit"),
        (dict(ids=torch.zeros(2, 3, dtype=torch.int32), mask_id=2**40), ValueError, "not fit"),
        (dict(ids=torch.zeros(2, 3, dtype=torch.int32), mask_id=-(2**31) - 1), ValueError, "fit"),
        (dict(mask_id=2**63), ValueError, "does not fit the ids' dtype torch.int64"),
    ],
)
def test_mask_tokens_validation(kwargs, err, match):
    a = dict(ids=torch.zeros(2, 3, dtype=torch.long), gamma=torch.tensor([0.5, 0.5]), mask_id=9)
    a.update(kwargs)
    with pytest.raises(err, match=match):
        mask_tokens(a.pop("ids"), a.pop("gamma"), a.pop("mask_id"), **a)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(steps=0), ValueError, "steps must be in"),
        (dict(annealing="linear"), ValueError, "annealing must be one of"),
        (dict(schedule="quadratic"), ValueError, "schedule must be one of"),
        (dict(schedule=lambda r: 1.5), ValueError, "must be in \\[0, 1\\]"),
    ],
)
def test_decode_validation(kwargs, err, match):
    a = dict(steps=3, mask_id=4)
    a.update(kwargs)
    with pytest.raises(err, match=match):
        maskgit_decode(lambda x: torch.randn(1, 6, 4), torch.full((1, 6), 4), **a)


# ---- the benchmark script, seconds-long smoke run ----------------------------------------------------


def test_bench_mask_sampling_quick(tmp_path):
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks import bench_mask_sampling as bench

    args = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--b", "2", "--l", "16"]
    args += ["--k", "96", "--mask-b", "4", "--mask-l", "32", "--reps", "2"]
    assert bench.main(args) == 0
    doc = json.loads((tmp_path / "mask_sampling.json").read_text())
    rows = {(r["case"], r["provider"]): r for r in doc["rows"]}
    for case in ("step", "step-noguide", "step-strided", "mask_tokens"):
        assert rows[(case, "torch-ref")]["status"] == "ok"
        if CPU_BUILT:
            assert rows[(case, "cpu")]["status"] == "ok"
    if CPU_BUILT:
        assert "cpu: 0 ids / 0 mask entries differ" in " ".join(doc["notes"])
        assert rows[("mask_tokens", "cpu")]["rel_err"] == 0.0
