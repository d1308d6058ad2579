"""UniF2ace's training loss and training step under ``torch.compile`` on CPU, on the "torch"
backend and on "auto" (the C++ kernels), and whether one compile serves a run.

What depends on the batch's layout and on the step's noise (host values, seeded CPU generators)
is :meth:`UniF2ace.prepare_loss`, run eagerly; what is compiled (:meth:`UniF2ace.loss_from`, by
:meth:`UniF2ace.compile_loss`) traces as one graph, checks on or off, with the batch's sizes
dynamic, so one compile serves batches of other lengths, layouts, masked counts and dropped
prompts. The compiled loss and every gradient agree with eager to rounding (Inductor fuses and
reorders float arithmetic). The model has no noise expert here (``noise_std=0``: its ``randn``
would differ between eager and compiled).
"""

import copy

import pytest
import torch

import unif2ace
from conftest import rel_err
from model_data import examples, small_cfg
from unif2ace import _backend
from unif2ace.models import UniF2ace
from unif2ace.models.layout import collate
from unif2ace.models.unif2ace import mark_dynamic_sizes

BACKENDS = ["torch"] + (["auto"] if _backend.cpu_ext() is not None else [])
# steps whose noise differs: at step 4 the first t2i row's prompt is dropped, at 3 and 5 not
STEPS = (3, 4, 5)
SEED = 1


def _model_and_batch():
    torch.manual_seed(0)
    cfg = small_cfg(noise_std=0.0, n_layers=1)
    return UniF2ace(cfg), collate(cfg, examples(cfg, 4))


@pytest.fixture
def checks_off():
    was = _backend.checks_enabled()
    unif2ace.set_checks(False)
    yield
    unif2ace.set_checks(was)


def test_noise_given_or_drawn_gives_the_same_loss():
    model, batch = _model_and_batch()
    for step in STEPS:
        drawn, parts = model.loss(batch, step, SEED)
        given, parts_given = model.loss(batch, noise=model.draw_noise(batch, step, SEED))
        assert torch.equal(drawn, given)
        assert parts.keys() == parts_given.keys()
    noise = model.draw_noise(batch, 3, SEED)
    short = noise._replace(mask_seeds=noise.mask_seeds[:1])
    with pytest.raises(ValueError, match="noise for 1 t2i rows, batch has 2"):
        model.loss(batch, noise=short)


def test_noise_drawn_covers_the_steps_variety():
    """STEPS must exercise a dropped prompt and unequal masked counts (else the recompiles the
    compiled tests go through are not the ones a training run meets)."""
    model, batch = _model_and_batch()
    noises = [model.draw_noise(batch, s, SEED) for s in STEPS]
    assert any(any(n.drop) for n in noises) and any(not any(n.drop) for n in noises)
    assert len({tuple(n.num_masked) for n in noises}) == len(STEPS)


# the GPU path's branches too: Triton's launchers (under the interpreter on CPU tensors here)
TRACED = BACKENDS + (["triton"] if _backend.available("triton", torch.device("cpu")) else [])


@pytest.mark.parametrize("checks", [False, True])
@pytest.mark.parametrize("backend", TRACED)
def test_loss_traces_without_graph_break(backend, checks):
    """The compiled part of the loss (:meth:`UniF2ace.loss_from`) is one graph, checks on or off;
    so is the whole :meth:`UniF2ace.loss` with the noise given."""
    model, batch = _model_and_batch()
    was = _backend.checks_enabled()
    unif2ace.set_checks(checks)
    try:
        with unif2ace.use_backend(backend):
            noise = model.draw_noise(batch, 4, SEED)
            prepared = mark_dynamic_sizes(model.prepare_loss(batch, noise=noise))
            for fn, args, kw in (
                (model.loss_from, (prepared,), {}),
                (model.loss, (batch,), {"noise": noise}),
            ):
                torch._dynamo.reset()
                ex = torch._dynamo.explain(fn)(*args, **kw)
                assert ex.graph_break_count == 0, [str(b.reason) for b in ex.break_reasons]
                assert ex.graph_count == 1
    finally:
        unif2ace.set_checks(was)
        torch._dynamo.reset()


def test_masked_count_check_runs_before_the_compiled_graph():
    """With checks on, the loss's masked-count check runs in the eager part of
    :meth:`UniF2ace.compile_loss`: a noise whose counts disagree with the masks ``mask_tokens``
    draws raises from the compiled call as from eager."""
    model, batch = _model_and_batch()
    noise = model.draw_noise(batch, 3, SEED)
    bad = noise._replace(num_masked=[noise.num_masked[0] + 1, *noise.num_masked[1:]])
    with pytest.raises(ValueError, match="UniF2ace.loss: mask has"):
        model.loss(batch, noise=bad)  # eager
    was = _backend.checks_enabled()
    unif2ace.set_checks(True)
    try:
        with unif2ace.use_backend("torch"):
            torch._dynamo.reset()
            fn = model.compile_loss(backend="aot_eager")
            with pytest.raises(ValueError, match="UniF2ace.loss: mask has"):
                fn(batch, noise=bad)
    finally:
        unif2ace.set_checks(was)
        torch._dynamo.reset()


def _batches(cfg):
    """Batches as a run meets them: other lengths, row orders and sample indices, t2i rows and
    answers in each, padding in each."""
    ex = examples(cfg, 7)
    return [collate(cfg, ex[k : k + 4]) for k in (0, 1, 2, 3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_graph_serves_every_batch(backend):
    """:meth:`UniF2ace.compile_loss` compiles once for a run's batches: other sequence lengths,
    token counts, masked counts and dropped prompts are sizes of one dynamic graph, not
    recompiles (the loss traced with the layout's host values recompiled for each batch). The
    compiled loss and gradients agree with eager on every batch."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model, _ = _model_and_batch()
    batches = _batches(model.config)
    assert len({b["input_ids"].shape[1] for b in batches}) > 1
    steps = [(b, s) for b in batches for s in STEPS[:2]]
    assert any(any(model.draw_noise(b, s, SEED).drop) for b, s in steps)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        with unif2ace.use_backend(backend):
            fn = model.compile_loss(backend=counter)
            for batch, step in steps:
                lc, parts = fn(batch, step, SEED)
                lc.backward()
                gc = _grads(model)
                model.zero_grad()
                le, parts_e = model.loss(batch, step, SEED)
                le.backward()
                ge = _grads(model)
                model.zero_grad()
                assert rel_err(lc, le) < 1e-6, step
                assert parts.keys() == parts_e.keys()
                for name in ge:
                    assert rel_err(gc[name], ge[name]) < 1e-5, (step, name)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_equals_eager(backend, checks_off):
    """Loss, backward and AdamW: the compiled loss (:meth:`UniF2ace.compile_loss`, Inductor) and
    the compiled optimizer step against eager on a copy of the model, step after step on other
    batches; every step's loss and gradients, and the parameters after the last update, agree to
    rounding."""
    eager, _ = _model_and_batch()
    comp = copy.deepcopy(eager)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=1e-3)
    opt_c = torch.optim.AdamW(comp.parameters(), lr=1e-3)
    torch._dynamo.reset()
    loss_c = comp.compile_loss()
    opt_step = torch.compile(opt_c.step)
    try:
        with unif2ace.use_backend(backend):
            for step, batch in zip(STEPS, _batches(eager.config)):
                noise = eager.draw_noise(batch, step, SEED)
                le, _ = eager.loss(batch, noise=noise)
                le.backward()
                lc, parts = loss_c(batch, noise=noise)
                lc.backward()
                assert rel_err(lc, le) < 1e-5, step
                assert torch.equal(parts["loss"], lc.detach())
                ge, gc = _grads(eager), _grads(comp)
                assert ge.keys() == gc.keys() and ge
                for name in ge:
                    assert rel_err(gc[name], ge[name]) < 1e-4, (step, name)
                opt_e.step()
                opt_step()
                opt_e.zero_grad()
                opt_c.zero_grad()
    finally:
        torch._dynamo.reset()
    start = dict(_model_and_batch()[0].named_parameters())
    pe = dict(eager.named_parameters())
    moved = 0
    for name, p in comp.named_parameters():
        assert torch.allclose(p, pe[name], rtol=0, atol=1e-5), name
        if not torch.equal(pe[name], start[name]):  # the compiled AdamW updated it as well
            assert not torch.equal(p, start[name]), name
            moved += 1
    assert moved > len(pe) // 2


@pytest.mark.slow
def test_bench_e2e_compile_reports_four_providers(tmp_path, monkeypatch):
    """``benchmarks/bench_e2e.py --compile`` on a one-layer model: the eager and compiled
    providers of both backends run and agree with the torch baseline, and the compiled rows carry
    their compile time and their ratio to eager."""
    import json
    import sys
    from pathlib import Path

    # for `benchmarks.*`, appended (the repository root never shadows an installed package)
    monkeypatch.setattr(sys, "path", [*sys.path, str(Path(__file__).resolve().parents[1])])
    from benchmarks import bench_e2e as bench

    model = "n_layers=1 d_model=32 n_heads=2 expert_ffn=32"
    argv = f"--quick --device cpu --reps 2 --no-memory --compile --model-set {model}"
    assert bench.main([*argv.split(), "--out", str(tmp_path)]) == 0
    rows = {r["provider"]: r for r in json.loads((tmp_path / "e2e.json").read_text())["rows"]}
    assert set(rows) == {"torch", "engine", "torch+compile", "engine+compile"}
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r.get("note"))
        if name != "torch":
            assert r["rel_err"] < 1e-3, name
    for name in ("torch+compile", "engine+compile"):
        assert rows[name]["compile_s"] > 0 and rows[name]["x_eager"] > 0
    assert rows["engine+compile"]["x_torch_compile"] > 0
    assert "compile s" in (tmp_path / "e2e.md").read_text()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_graph_serves_generation(backend):
    """:meth:`UniF2ace.compile_image_logits`: every decoding step of a batch and batches of other
    prompt lengths run one compiled graph, and decode the codes eager decoding gives."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from unif2ace.models.sampling import generate_images

    model, _ = _model_and_batch()
    model.eval()
    prompts = [[[11, 12, 13], [14]], [[15, 16, 17, 18, 19, 20], [21, 22]]]
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    try:
        with unif2ace.use_backend(backend):
            fn = model.compile_image_logits(backend=counter)
            for p in prompts:
                want = generate_images(model, p, steps=3, seed=2)
                got = generate_images(model, p, steps=3, seed=2, image_logits=fn)
                assert torch.equal(got, want)
    finally:
        torch._dynamo.reset()
    assert counter.frame_count == 1
