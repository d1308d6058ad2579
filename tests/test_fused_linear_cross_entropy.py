"""fused_linear_cross_entropy: every backend against an fp64 F.cross_entropy, outputs and gradients
(hidden, weight, bias) on odd sizes, its identity with d3diff_linear_loss at α = 0, torch.compile,
and one test per input-validation rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import backend_params, device_for, rel_err
from unif2ace import ops
from unif2ace.ops import (
    d3diff_linear_loss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_ref,
)

IGNORE = -100
N, V, D = 37, 1013, 123


def make_inputs(n, v, d, device, bias, ignore_frac=0.2, dtype=torch.float32):
    hidden = (torch.randn(n, d, device=device) / 2).to(dtype).requires_grad_(True)
    weight = (torch.randn(v, d, device=device) / math.sqrt(d)).to(dtype).requires_grad_(True)
    b = (torch.randn(v, device=device) * 0.1).to(dtype).requires_grad_(True) if bias else None
    targets = torch.randint(0, v, (n,), device=device)
    if n > 1:
        targets[torch.rand(n, device=device) < ignore_frac] = IGNORE
    return hidden, weight, b, targets


def cross_entropy_fp64(hidden, weight, bias, targets, weights, reduction, upstream):
    """Loss and gradients from F.cross_entropy in float64 on the CPU."""
    ins = [
        t.detach().double().cpu().requires_grad_(True)
        for t in (hidden, weight, bias)
        if t is not None
    ]
    b = ins[2] if bias is not None else None
    logits = F.linear(ins[0], ins[1], b)
    row = F.cross_entropy(logits, targets.cpu(), ignore_index=IGNORE, reduction="none")
    if weights is not None:
        row = row * weights.double().cpu()
    loss = row.sum() if reduction == "sum" else row
    grads = torch.autograd.grad(loss, ins, upstream.double().cpu())
    return loss.detach(), grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [None, 8])
def test_matches_fp64_cross_entropy(backend, bias, reduction, weighted, chunk):
    dev = device_for(backend)
    hidden, weight, b, targets = make_inputs(N, V, D, dev, bias)
    weights = torch.rand(N, device=dev) + 0.1 if weighted else None
    loss = fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        weights,
        bias=b,
        reduction=reduction,
        chunk_size=chunk,
        backend=backend,
    )
    upstream = torch.randn(N, device=dev) if reduction == "none" else torch.tensor(0.7, device=dev)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    grads = torch.autograd.grad(loss, inputs, upstream)
    ref, grefs = cross_entropy_fp64(hidden, weight, b, targets, weights, reduction, upstream)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    assert rel_err(loss, ref) < 1e-5
    for g, gr in zip(grads, grefs, strict=True):
        assert g.shape == gr.shape and g.dtype == torch.float32
        assert rel_err(g, gr) < 1e-5
    if reduction == "none":
        assert (loss[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_mean_cross_entropy_and_the_reference(backend):
    """weights = 1 / #valid rows gives F.cross_entropy's mean; the *_ref agrees in fp64."""
    dev = device_for(backend)
    hidden, weight, b, targets = make_inputs(N, V, D, dev, bias=True)
    valid = targets != IGNORE
    weights = torch.full((N,), 1.0 / int(valid.sum()), device=dev)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, weights, bias=b, backend=backend)
    args64 = [t.detach().double().cpu() for t in (hidden, weight, b)]
    mean = F.cross_entropy(F.linear(*args64), targets.cpu(), ignore_index=IGNORE)
    ref = fused_linear_cross_entropy_ref(
        args64[0], args64[1], targets.cpu(), weights.cpu(), args64[2]
    )
    assert rel_err(loss, mean) < 1e-5
    torch.testing.assert_close(ref, mean)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("torch", "cpu")])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_is_d3diff_linear_loss_at_alpha_zero(backend, reduction):
    """The same kernel as d3diff_linear_loss(..., alpha=0) with w_ce = weights: identical bits."""
    hidden, weight, b, targets = make_inputs(N, V, D, "cpu", bias=True)
    weights = torch.rand(N) + 0.1
    ones = torch.ones(N)
    out = []
    for fn in (
        lambda: fused_linear_cross_entropy(
            hidden, weight, targets, weights, bias=b, reduction=reduction, backend=backend
        ),
        lambda: d3diff_linear_loss(
            hidden,
            weight,
            targets,
            ones,
            weights,
            ones * 0,
            0.0,
            bias=b,
            reduction=reduction,
            backend=backend,
        ),
    ):
        loss = fn()
        out.append((loss, *torch.autograd.grad(loss.sum(), (hidden, weight, b))))
    for x, y in zip(*out, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("torch", "cpu")])
def test_bf16(backend):
    hidden, weight, b, targets = make_inputs(64, 257, 32, "cpu", bias=True, dtype=torch.bfloat16)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias=b, backend=backend)
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    assert all(g.dtype == torch.bfloat16 for g in grads)
    ref, grefs = cross_entropy_fp64(hidden, weight, b, targets, None, "sum", torch.tensor(1.0))
    assert rel_err(loss, ref) < 1e-2
    for g, gr in zip(grads, grefs, strict=True):
        assert rel_err(g, gr) < 3e-2


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("torch", "cpu")])
def test_under_autocast(backend):
    """bf16 autocast: the matmuls on bf16 copies of hidden, weight and bias, the loss in fp32,
    the gradients in the inputs' dtype (fp32); the op on bf16 inputs exactly, fp32 within bf16."""
    hidden, weight, b, targets = make_inputs(64, 257, 32, "cpu", bias=True)
    weights = torch.rand(64) + 0.1

    def run(*ins):
        loss = fused_linear_cross_entropy(
            ins[0], ins[1], targets, weights, bias=ins[2], backend=backend, chunk_size=16
        )
        return loss, torch.autograd.grad(loss, ins)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run(hidden, weight, b)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    loss16, grads16 = run(
        *(t.detach().bfloat16().requires_grad_(True) for t in (hidden, weight, b))
    )
    assert torch.equal(loss, loss16)
    assert all(torch.equal(g, g16.float()) for g, g16 in zip(grads, grads16, strict=True))
    loss32, grads32 = run(hidden, weight, b)
    assert rel_err(loss, loss32) < 1e-2
    assert all(rel_err(g, g32) < 3e-2 for g, g32 in zip(grads, grads32, strict=True))


def test_exported_from_ops():
    assert ops.fused_linear_cross_entropy is fused_linear_cross_entropy
    assert "fused_linear_cross_entropy" in ops.__all__


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("torch", "cpu")])
def test_torch_compile(backend):
    hidden, weight, b, targets = make_inputs(N, V, D, "cpu", bias=True)
    weights = torch.rand(N) + 0.1

    def step(h, w, bias):
        return fused_linear_cross_entropy(h, w, targets, weights, bias=bias, backend=backend)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [t.detach() for t in (hidden, weight, b)]
    a1 = [t.clone().requires_grad_(True) for t in args]
    a2 = [t.clone().requires_grad_(True) for t in args]
    out1, out2 = step(*a1), compiled(*a2)
    torch.testing.assert_close(out1, out2)
    for x, y in zip(torch.autograd.grad(out1, a1), torch.autograd.grad(out2, a2), strict=True):
        torch.testing.assert_close(x, y)


# ---- bad input: one test per rule ----------------------------------------------------------------


def _good():
    hidden, weight, b, targets = make_inputs(6, 10, 8, "cpu", bias=True, ignore_frac=0)
    return hidden.detach(), weight.detach(), b.detach(), targets


@pytest.mark.parametrize("backend", ["torch", "auto"])
class TestBadInput:
    def test_shapes(self, backend):
        h, W, b, t = _good()
        with pytest.raises(ValueError, match=r"hidden must be a 2-D tensor"):
            fused_linear_cross_entropy(h[0], W, t, backend=backend)
        with pytest.raises(ValueError, match=r"weight must be \[K, D=8\]"):
            fused_linear_cross_entropy(h, W[:, :7], t, backend=backend)
        with pytest.raises(ValueError, match=r"bias must be \[K=10\]"):
            fused_linear_cross_entropy(h, W, t, bias=b[:9], backend=backend)
        with pytest.raises(ValueError, match="K = 0"):
            fused_linear_cross_entropy(h, W[:0], t, backend=backend)
        with pytest.raises(ValueError, match=r"targets must have shape \[6\]"):
            fused_linear_cross_entropy(h, W, t[:5], backend=backend)
        with pytest.raises(ValueError, match=r"weights must have shape \[6\]"):
            fused_linear_cross_entropy(h, W, t, torch.ones(5), backend=backend)

    def test_dtypes(self, backend):
        h, W, b, t = _good()
        with pytest.raises(TypeError, match="weight dtype"):
            fused_linear_cross_entropy(h, W.double(), t, backend=backend)
        with pytest.raises(TypeError, match="bias dtype"):
            fused_linear_cross_entropy(h, W, t, bias=b.double(), backend=backend)
        with pytest.raises(TypeError, match="targets must be int32 or int64"):
            fused_linear_cross_entropy(h, W, t.float(), backend=backend)
        with pytest.raises(TypeError, match="weights must be a floating tensor"):
            fused_linear_cross_entropy(h, W, t, torch.ones(6, dtype=torch.long), backend=backend)
        with pytest.raises(TypeError, match="hidden must be one of"):
            fused_linear_cross_entropy(h.long(), W.long(), t, backend=backend)

    def test_device(self, backend):
        h, W, b, t = _good()
        with pytest.raises(ValueError, match="targets is on meta but the input is on cpu"):
            fused_linear_cross_entropy(h, W, t.to("meta"), backend=backend)

    def test_values(self, backend):
        h, W, b, t = _good()
        bad = t.clone()
        bad[1] = 10
        with pytest.raises(ValueError, match=r"fused_linear_cross_entropy: targets has 1 entries"):
            fused_linear_cross_entropy(h, W, bad, backend=backend)
        weights = torch.ones(6)
        weights[2] = float("nan")
        with pytest.raises(ValueError, match="fused_linear_cross_entropy: weights has non-finite"):
            fused_linear_cross_entropy(h, W, t, weights, backend=backend)

    def test_reduction_and_backend(self, backend):
        h, W, b, t = _good()
        with pytest.raises(ValueError, match="reduction must be one of"):
            fused_linear_cross_entropy(h, W, t, reduction="mean", backend=backend)


def test_unknown_backend():
    h, W, b, t = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_cross_entropy(h, W, t, backend="numpy")
    with pytest.raises(RuntimeError, match="not available"):
        fused_linear_cross_entropy(h, W, t, backend="cuda")
