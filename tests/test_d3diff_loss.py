"""D3Diff loss: every backend against the float64 reference, gradients included, plus the SEDD
identity, the launcher contract (poisoned outputs, in-place gradient, row scaling), opcheck,
torch.compile and one test per input-validation rule."""

import math

import pytest
import torch

from conftest import backend_params, device_for, rel_err
from unif2ace import _backend
from unif2ace.ops import (
    d3diff_linear_loss,
    d3diff_linear_loss_ref,
    d3diff_loss,
    d3diff_loss_ref,
    d3diff_weights,
    schedule,
)

IGNORE = -100
KERNEL = "d3diff_loss.fwd"
# Relative-error bounds ‖out − ref‖/‖ref‖ per dtype. fp32: accumulation-order noise. bf16/fp16:
# the gradient is stored in the logits' dtype (≈ 2^-9 / 2^-12 relative rounding per element).
TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_rows(N, K, device, ignore_frac=0.2):
    targets = torch.randint(0, K, (N,), device=device)
    if N > 1:
        targets[torch.rand(N, device=device) < ignore_frac] = IGNORE
    sv = schedule(torch.rand(N, device=device))
    w_ce = torch.rand(N, device=device) + 0.1
    w_se = sv.dsigma.float() * torch.rand(N, device=device)
    return targets, sv.ratio.float(), w_ce, w_se


def make_logits(N, K, dtype, device, strided=False, scale=3.0):
    if strided:  # a column range of a wider vocabulary, as Show-o slices [text_vocab : -1]
        return (torch.randn(N, K + 11, device=device) * scale).to(dtype)[:, 5 : 5 + K]
    return (torch.randn(N, K, device=device) * scale).to(dtype)


def ref_loss_and_grad(logits, targets, ratio, w_ce, w_se, alpha, reduction, upstream):
    z = logits.detach().double().cpu().requires_grad_(True)
    loss = d3diff_loss_ref(
        z,
        targets.cpu(),
        ratio.double().cpu(),
        w_ce.double().cpu(),
        w_se.double().cpu(),
        alpha,
        IGNORE,
        reduction,
    )
    (g,) = torch.autograd.grad(loss, z, upstream.double().cpu())
    return loss.detach(), g


# ---- forward + backward against fp64 -----------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("N", [1, 37, 512])
@pytest.mark.parametrize("K", [3, 1013, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_fp64_reference(backend, N, K, dtype):
    if dtype != torch.float32 and backend == "triton" and _backend.triton_interpreted():
        pytest.skip("the Triton interpreter's bf16 arithmetic is not trustworthy")
    if backend == "triton" and _backend.triton_interpreted() and N * K > 512 * 1013:
        pytest.skip("interpreter cost; the largest size runs compiled in the GPU suite")
    dev = device_for(backend)
    logits = make_logits(N, K, dtype, dev).requires_grad_(True)
    rows = make_rows(N, K, dev)
    loss = d3diff_loss(logits, *rows, alpha=0.5, reduction="sum", backend=backend)
    upstream = torch.tensor(1.3, device=dev)
    (g,) = torch.autograd.grad(loss, logits, upstream)
    ref, gref = ref_loss_and_grad(logits, *rows, 0.5, "sum", upstream)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert rel_err(loss, ref) < TOL[torch.float32]  # fp32 accumulation whatever the input dtype
    assert rel_err(g, gref) < TOL[dtype]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("alpha,ce_on", [(0.0, True), (1.0, False), (0.01, True)])
def test_strided_none_reduction_and_special_cases(backend, alpha, ce_on):
    """Column-range views, per-row losses, α = 0 (Show-o CE) and w_ce = 0 (SEDD only)."""
    dev = device_for(backend)
    N, K = 37, 1013
    logits = make_logits(N, K, torch.float32, dev, strided=True).requires_grad_(True)
    assert logits.stride(0) != K
    targets, ratio, w_ce, w_se = make_rows(N, K, dev)
    if not ce_on:
        w_ce = torch.zeros_like(w_ce)
    loss = d3diff_loss(logits, targets, ratio, w_ce, w_se, alpha, reduction="none", backend=backend)
    upstream = torch.randn(N, device=dev)
    (g,) = torch.autograd.grad(loss, logits, upstream)
    ref, gref = ref_loss_and_grad(logits, targets, ratio, w_ce, w_se, alpha, "none", upstream)
    assert loss.shape == (N,)
    assert (loss[targets == IGNORE] == 0).all()
    assert rel_err(loss, ref) < TOL[torch.float32]
    assert rel_err(g, gref) < TOL[torch.float32]
    assert (g[targets == IGNORE] == 0).all()


@pytest.mark.parametrize("backend", backend_params())
def test_alpha_zero_is_masked_cross_entropy(backend):
    dev = device_for(backend)
    N, K = 37, 101
    logits = make_logits(N, K, torch.float32, dev)
    targets, ratio, w_ce, w_se = make_rows(N, K, dev)
    w_ce = torch.ones_like(w_ce)
    loss = d3diff_loss(logits, targets, ratio, w_ce, w_se, 0.0, backend=backend)
    ce = torch.nn.functional.cross_entropy(
        logits.double(), targets, ignore_index=IGNORE, reduction="sum"
    )
    assert rel_err(loss, ce) < 1e-5


def sedd_absorbing_score_entropy(z, sigma, x0):
    """SEDD's absorbing-state score entropy with its scale_by_sigma log-score, written as SEDD
    writes it (graph_lib.Absorbing.score_entropy + model.SEDD.forward), for every row masked.
    z: [N, K] logits over the K non-mask tokens; sigma: [N] total noise; x0: [N] clean tokens."""
    K = z.shape[1]
    esigm1 = torch.where(sigma < 0.5, torch.expm1(sigma), sigma.exp() - 1)
    log_score = z - esigm1.log()[:, None] - math.log(K)  # scale_by_sigma, log(vocab − 1) = log K
    ratio = 1 / esigm1
    neg_term = ratio * log_score.gather(-1, x0[:, None]).squeeze(-1)
    pos_term = log_score.exp().sum(-1)
    const = ratio * (ratio.log() - 1)
    return pos_term - neg_term + const


@pytest.mark.parametrize("backend", backend_params())
def test_sedd_score_entropy_term_by_term(backend):
    """w_ce = 0, α = 1, w_se = σ'(t): d3diff_loss equals SEDD's weighted score-entropy per row."""
    dev = device_for(backend)
    N, K = 37, 1013
    z = make_logits(N, K, torch.float32, dev, scale=1.0)
    t = torch.rand(N, device=dev) * 0.98 + 0.01
    sv = schedule(t.double().cpu(), "loglinear")
    x0 = torch.randint(0, K, (N,), device=dev)
    sedd = sv.dsigma * sedd_absorbing_score_entropy(z.double().cpu(), sv.sigma, x0.cpu())
    ours = d3diff_loss(
        z,
        x0,
        sv.ratio.float().to(dev),
        torch.zeros(N, device=dev),
        sv.dsigma.float().to(dev),
        1.0,
        reduction="none",
        backend=backend,
    )
    assert rel_err(ours, sedd) < 1e-5
    # the reference itself, in fp64, term by term (no fp32 rounding)
    ref = d3diff_loss_ref(
        z.double().cpu(),
        x0.cpu(),
        sv.ratio,
        torch.zeros(N, dtype=torch.float64),
        sv.dsigma,
        1.0,
        reduction="none",
    )
    torch.testing.assert_close(ref, sedd, rtol=1e-10, atol=1e-10)
    assert (ours >= -1e-4).all()  # score entropy is non-negative


# ---- the launcher contract, backend by backend --------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
def test_launcher_poisoned_outputs_inplace_and_scale(backend, inplace, scaled):
    dev = device_for(backend)
    N, K = 37, 1013
    logits = make_logits(N, K, torch.float32, dev)
    targets, ratio, w_ce, w_se = make_rows(N, K, dev)
    scale = torch.randn(N, device=dev) if scaled else None
    ref_loss, gref = ref_loss_and_grad(
        logits,
        targets,
        ratio,
        w_ce,
        w_se,
        0.3,
        "none",
        scale if scaled else torch.ones(N, device=dev),
    )
    loss = torch.full((N,), float("nan"), device=dev)
    grad = logits if inplace else torch.full_like(logits, float("nan"))
    _backend.launcher(KERNEL, backend)(
        logits, targets, ratio, w_ce, w_se, 0.3, IGNORE, loss, grad, scale
    )
    assert rel_err(loss, ref_loss) < TOL[torch.float32]
    assert rel_err(grad, gref) < TOL[torch.float32]


@pytest.mark.parametrize("backend", backend_params())
def test_launcher_out_of_range_target_gives_nan_row(backend):
    """With checks off, a bad target never reads out of bounds: that row is NaN, others exact."""
    dev = device_for(backend)
    N, K = 5, 64
    logits = make_logits(N, K, torch.float32, dev)
    targets, ratio, w_ce, w_se = make_rows(N, K, dev, ignore_frac=0.0)
    targets[2] = K + 7
    loss = torch.empty(N, device=dev)
    grad = torch.empty_like(logits)
    _backend.launcher(KERNEL, backend)(
        logits, targets, ratio, w_ce, w_se, 0.3, IGNORE, loss, grad, None
    )
    assert torch.isnan(loss[2]) and torch.isnan(grad[2]).all()
    keep = torch.tensor([0, 1, 3, 4])
    assert torch.isfinite(loss[keep]).all() and torch.isfinite(grad[keep]).all()


# ---- fused linear loss ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("N,D,K,chunk", [(1, 16, 3, None), (37, 23, 1013, 8), (300, 64, 512, None)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_loss_matches_fp64_reference(backend, N, D, K, chunk, bias, reduction):
    dev = device_for(backend)
    h = (torch.randn(N, D, device=dev) / 2).requires_grad_(True)
    W = (torch.randn(K, D, device=dev) / math.sqrt(D)).requires_grad_(True)
    b = (torch.randn(K, device=dev) * 0.1).requires_grad_(True) if bias else None
    rows = make_rows(N, K, dev)
    loss = d3diff_linear_loss(
        h, W, *rows, 0.5, bias=b, reduction=reduction, chunk_size=chunk, backend=backend
    )
    upstream = torch.randn(N, device=dev) if reduction == "none" else torch.tensor(0.7, device=dev)
    inputs = (h, W) + ((b,) if bias else ())
    grads = torch.autograd.grad(loss, inputs, upstream)

    ins64 = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    ref = d3diff_linear_loss_ref(
        ins64[0],
        ins64[1],
        *[r.cpu() for r in rows],
        0.5,
        bias=ins64[2] if bias else None,
        reduction=reduction,
    )
    grefs = torch.autograd.grad(ref, ins64, upstream.double().cpu())
    assert rel_err(loss, ref) < 1e-5
    for g, gr in zip(grads, grefs):
        assert g.shape == gr.shape
        assert rel_err(g, gr) < 1e-5


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "torch")])
def test_linear_loss_bf16(backend):
    dev = device_for(backend)
    N, D, K = 64, 32, 257
    h = torch.randn(N, D, device=dev).bfloat16().requires_grad_(True)
    W = (torch.randn(K, D, device=dev) / math.sqrt(D)).bfloat16().requires_grad_(True)
    rows = make_rows(N, K, dev)
    loss = d3diff_linear_loss(h, W, *rows, 0.5, backend=backend)
    gh, gw = torch.autograd.grad(loss, (h, W))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    h64, W64 = (t.detach().double().requires_grad_(True) for t in (h, W))
    ref = d3diff_linear_loss_ref(h64, W64, *rows, 0.5)
    rh, rw = torch.autograd.grad(ref, (h64, W64))
    assert rel_err(loss, ref) < 1e-2
    assert rel_err(gh, rh) < 3e-2 and rel_err(gw, rw) < 3e-2


# ---- under torch.autocast ---------------------------------------------------------------------


def _grads(loss, ins):
    return torch.autograd.grad(loss, [t for t in ins if t is not None])


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "torch")])
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_loss_under_autocast(backend, reduction, bias):
    """bf16 autocast: the LM head's inputs are cast to bf16 (the matmuls in bf16), the loss is
    fp32, the gradients reach the fp32 inputs in fp32; exactly the op on bf16 inputs outside
    autocast, and the fp32 op within bf16 rounding."""
    dev = device_for(backend)
    N, D, K = 45, 32, 257
    h = torch.randn(N, D, device=dev).requires_grad_(True)
    W = (torch.randn(K, D, device=dev) / math.sqrt(D)).requires_grad_(True)
    b = (torch.randn(K, device=dev) * 0.1).requires_grad_(True) if bias else None
    rows = make_rows(N, K, dev)
    up = torch.rand(N, device=dev) if reduction == "none" else torch.tensor(1.0)
    kw = dict(backend=backend, reduction=reduction, chunk_size=16)

    def run(h, W, b):
        loss = d3diff_linear_loss(h, W, *rows, 0.5, bias=b, **kw)
        return loss, _grads((loss * up).sum(), (h, W, b))

    with torch.autocast(dev.type, dtype=torch.bfloat16):
        loss, grads = run(h, W, b)
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * len(grads)
    cast = [
        t.detach().bfloat16().requires_grad_(True) if t is not None else None for t in (h, W, b)
    ]
    loss16, grads16 = run(*cast)  # the definition: the op on the autocast-dtype inputs
    assert torch.equal(loss, loss16)
    assert all(torch.equal(g, g16.float()) for g, g16 in zip(grads, grads16))
    loss32, grads32 = run(h, W, b)
    assert rel_err(loss, loss32) < 1e-2
    assert all(rel_err(g, g32) < 3e-2 for g, g32 in zip(grads, grads32))


def test_linear_loss_under_autocast_takes_mixed_dtypes():
    """As F.linear under autocast: bf16 hidden states with an fp32 head, and float64 left alone."""
    N, D, K = 9, 16, 33
    rows = make_rows(N, K, "cpu")
    h, W = torch.randn(N, D), torch.randn(K, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = d3diff_linear_loss(h.bfloat16(), W, *rows, 0.5)
        f64 = d3diff_linear_loss(h.double(), W.double(), *rows, 0.5, backend="torch")
    assert torch.equal(mixed, d3diff_linear_loss(h.bfloat16(), W.bfloat16(), *rows, 0.5))
    plain = d3diff_linear_loss(h.double(), W.double(), *rows, 0.5, backend="torch")
    assert mixed.dtype == torch.float32 and torch.equal(f64, plain)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "torch")])
def test_loss_on_logits_under_autocast(backend):
    """d3diff_loss casts nothing: bf16 logits from an autocast LM head are read as they are, the
    loss is fp32 and the gradient has the logits' dtype."""
    dev = device_for(backend)
    N, D, K = 37, 16, 101
    h, W = torch.randn(N, D, device=dev), torch.randn(K, D, device=dev) / 4
    rows = make_rows(N, K, dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        logits = (h @ W.T).requires_grad_(True)
        loss = d3diff_loss(logits, *rows, 0.5, backend=backend)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    (g,) = torch.autograd.grad(loss, logits)
    plain = logits.detach().requires_grad_(True)
    loss_plain = d3diff_loss(plain, *rows, 0.5, backend=backend)
    assert g.dtype == torch.bfloat16
    assert torch.equal(loss, loss_plain)
    assert torch.equal(g, torch.autograd.grad(loss_plain, plain)[0])


# ---- GPU launchers: on the tensors' device ----------------------------------------------------


def test_gpu_launchers_enter_the_tensors_device(monkeypatch, launch_recorder):
    """The "triton" and "cuda" launchers of the row kernel, on (fake) tensors of cuda:1 while
    cuda:0 is current: every launch, the SM count and the workspace query happen on cuda:1."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from unif2ace.ops.d3diff_loss import _cpu as d3_cpu
    from unif2ace.ops.d3diff_loss import _cuda as d3_cuda

    tk = pytest.importorskip("unif2ace.triton_kernels.d3diff_loss")
    rec = launch_recorder
    for name in (
        "_d3diff_loss_fwd_kernel",
        "_d3diff_loss_partial_kernel",
        "_d3diff_loss_split_grad_kernel",
    ):
        monkeypatch.setattr(tk, name, rec)
    launch = pytest.importorskip("unif2ace.triton_kernels._launch")
    monkeypatch.setattr(launch, "num_sms", rec.num_sms)

    rec.mock_native(d3_cuda, d3_cpu, "d3diff_loss_workspace_bytes", "d3diff_loss_fwd")
    split = tk.D3DiffConfig(block_k=64, num_warps=4, splits=2)
    with FakeTensorMode():
        dev = torch.device("cuda", 1)
        N, K = 8, 300
        logits = torch.empty(N, K, device=dev)
        targets = torch.zeros(N, dtype=torch.int64, device=dev)
        ratio, w_ce, w_se, loss = (torch.empty(N, device=dev) for _ in range(4))
        args = (logits, targets, ratio, w_ce, w_se, 0.1, IGNORE, loss, torch.empty_like(logits))
        for backend in ("triton", "cuda"):
            _backend.launcher(KERNEL, backend)(*args, None)
        tk.d3diff_loss_fwd(*args, config=split)
    kinds = [k for k, _ in rec.seen]
    assert kinds.count("launch") == 4 and {"sms", "workspace", "stream"} <= set(kinds)
    assert all(index == 1 for _, index in rec.seen), rec.seen


# ---- op registration: opcheck and torch.compile --------------------------------------------------


def _opcheck_backends():
    return [p for p in backend_params() if p.id in ("cpu", "torch", "triton")]


@pytest.mark.parametrize("backend", _opcheck_backends())
def test_opcheck(backend):
    """The custom ops with every launcher (d3diff_loss(backend="torch") itself runs the
    reference, but the torch launcher serves the custom ops all the same)."""
    dev = device_for(backend)
    N, K = 7, 33
    logits = make_logits(N, K, torch.float32, dev).requires_grad_(True)
    rows = list(make_rows(N, K, dev))
    args = (0.3, IGNORE, backend)
    torch.library.opcheck(torch.ops.unif2ace.d3diff_loss_fwd.default, (logits, rows, *args, False))
    grad_rows = torch.randn(N, device=dev)
    torch.library.opcheck(
        torch.ops.unif2ace.d3diff_loss_bwd, (grad_rows, logits.detach(), rows, *args)
    )


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "torch")])
def test_opcheck_linear(backend):
    dev = device_for(backend)
    N, D, K = 9, 8, 33
    h, W, b = torch.randn(N, D), torch.randn(K, D), torch.randn(K)
    rows = list(make_rows(N, K, dev))
    args = (0.3, IGNORE, 4, backend, "d3diff_linear_loss")
    op = torch.ops.unif2ace.d3diff_linear_loss.default
    torch.library.opcheck(op, (h, W, b, True, None, rows, *args))  # forward, gradients kept
    torch.library.opcheck(op, (h, W, b, False, None, rows, *args))  # forward, loss only
    torch.library.opcheck(op, (h, W, None, True, torch.randn(N), rows, *args))  # backward


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id == "cpu"])
def test_torch_compile(backend):
    dev = device_for(backend)
    N, K, D = 37, 101, 16
    rows = make_rows(N, K, dev)

    def step(logits, h, W):
        return d3diff_loss(logits, *rows, 0.3, backend=backend) + d3diff_linear_loss(
            h, W, *rows, 0.3, backend=backend
        )

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [make_logits(N, K, torch.float32, dev), torch.randn(N, D), torch.randn(K, D)]
    a1 = [t.clone().requires_grad_(True) for t in args]
    a2 = [t.clone().requires_grad_(True) for t in args]
    out1, out2 = step(*a1), compiled(*a2)
    g1 = torch.autograd.grad(out1, a1)
    g2 = torch.autograd.grad(out2, a2)
    torch.testing.assert_close(out1, out2)
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y)


def test_backward_twice_with_retain_graph():
    if not _backend.available("cpu", torch.device("cpu")):
        pytest.skip("cpu backend not built")
    logits = make_logits(4, 9, torch.float32, "cpu").requires_grad_(True)
    loss = d3diff_loss(logits, *make_rows(4, 9, "cpu", ignore_frac=0), backend="cpu")
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "triton")])
def test_inplace_backward(backend):
    """inplace_backward=True: same gradient, written over the logits of an intermediate."""
    dev = device_for(backend)
    N, K, D = 37, 1013, 16
    rows = make_rows(N, K, dev)
    h = torch.randn(N, D, device=dev, requires_grad=True)
    W = torch.randn(K, D, device=dev) / 4
    grads = []
    for inplace in (False, True):
        logits = h @ W.t()  # an intermediate: nothing else reads it after the loss
        loss = d3diff_loss(
            logits, *rows, 0.3, reduction="none", inplace_backward=inplace, backend=backend
        )
        (g,) = torch.autograd.grad(loss, h, torch.linspace(0.5, 1.5, N, device=dev))
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", [p for p in backend_params() if p.id in ("cpu", "triton")])
def test_inplace_backward_refuses_a_second_backward(backend):
    """The gradient overwrote the saved logits: a second backward through the graph must be
    refused by autograd's version check, not run on the gradient as if it were the logits."""
    dev = device_for(backend)
    N, K = 37, 101
    rows = make_rows(N, K, dev)
    x = torch.randn(N, K, device=dev, requires_grad=True)
    loss = d3diff_loss(x * 1, *rows, 0.3, inplace_backward=True, backend=backend)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_path_matches():
    if not _backend.available("cpu", torch.device("cpu")):
        pytest.skip("cpu backend not built")
    logits = make_logits(37, 101, torch.float32, "cpu")
    rows = make_rows(37, 101, "cpu")
    with torch.no_grad():
        a = d3diff_loss(logits, *rows, 0.3, backend="cpu")
    b = d3diff_loss_ref(logits.double(), *rows, 0.3)
    assert rel_err(a, b) < 1e-5


# ---- backends and the process default -------------------------------------------------------------


def test_auto_and_default_backend():
    import unif2ace

    cpu = torch.device("cpu")
    assert _backend.resolve("auto", cpu, "x") == (
        "cpu" if _backend.available("cpu", cpu) else "torch"
    )
    with unif2ace.use_backend("torch"):
        assert unif2ace.get_backend() == "torch"
        assert _backend.resolve(None, cpu, "x") == "torch"
    assert unif2ace.get_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        unif2ace.set_backend("fastest")
    with pytest.raises(RuntimeError, match="not available"):
        _backend.resolve("cuda", cpu, "d3diff_loss")


def test_every_backend_registers_the_row_kernel():
    assert _backend.implemented(KERNEL) == ("torch", "cpu", "triton", "cuda")
    with pytest.raises(RuntimeError, match="no 'auto' launcher"):
        _backend.launcher(KERNEL, "auto")


# ---- bad input: one test per rule ----------------------------------------------------------------


def _good(N=6, K=10):
    return make_logits(N, K, torch.float32, "cpu"), *make_rows(N, K, "cpu", ignore_frac=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
class TestBadInput:
    def test_logits_not_2d(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(ValueError, match=r"logits must be a 2-D tensor"):
            d3diff_loss(z[0], t, r, wc, ws, backend=backend)

    def test_rows_wrong_length(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(ValueError, match=r"targets must have shape \[6\]"):
            d3diff_loss(z, t[:5], r, wc, ws, backend=backend)
        with pytest.raises(ValueError, match=r"ratio must have shape \[6\]"):
            d3diff_loss(z, t, r[:, None], wc, ws, backend=backend)

    def test_logits_dtype(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(TypeError, match="logits must be one of"):
            d3diff_loss(z.long(), t, r, wc, ws, backend=backend)

    def test_targets_dtype(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(TypeError, match="targets must be int32 or int64"):
            d3diff_loss(z, t.float(), r, wc, ws, backend=backend)

    def test_weights_dtype(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(TypeError, match="w_ce must be a floating tensor"):
            d3diff_loss(z, t, r, wc.long(), ws, backend=backend)

    def test_device_mismatch(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(ValueError, match="targets is on meta but the input is on cpu"):
            d3diff_loss(z, t.to("meta"), r, wc, ws, backend=backend)

    def test_k_zero(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(ValueError, match="K = 0"):
            d3diff_loss(z[:, :0], t, r, wc, ws, backend=backend)

    def test_reduction_and_alpha(self, backend):
        z, t, r, wc, ws = _good()
        with pytest.raises(ValueError, match="reduction must be one of"):
            d3diff_loss(z, t, r, wc, ws, reduction="mean", backend=backend)
        with pytest.raises(ValueError, match="alpha must be a finite number"):
            d3diff_loss(z, t, r, wc, ws, alpha=float("nan"), backend=backend)

    def test_linear_shapes(self, backend):
        _, t, r, wc, ws = _good()
        h, W = torch.randn(6, 8), torch.randn(10, 8)
        with pytest.raises(ValueError, match=r"weight must be \[K, D=8\]"):
            d3diff_linear_loss(h, W[:, :7], t, r, wc, ws, backend=backend)
        with pytest.raises(ValueError, match=r"bias must be \[K=10\]"):
            d3diff_linear_loss(h, W, t, r, wc, ws, bias=torch.zeros(9), backend=backend)
        with pytest.raises(TypeError, match="weight dtype"):
            d3diff_linear_loss(h, W.double(), t, r, wc, ws, backend=backend)
        with pytest.raises(ValueError, match="K = 0"):
            d3diff_linear_loss(h, W[:0], t, r, wc, ws, backend=backend)
        t[0] = 10
        with pytest.raises(ValueError, match="outside"):
            d3diff_linear_loss(h, W, t, r, wc, ws, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "arg,row,value,message",
    [
        (1, 1, 10, r"targets has 1 entries outside \[0, 10\) or -100"),
        (1, 2, -1, "outside"),
        (2, 0, float("inf"), "ratio has non-finite entries"),
        (2, 0, float("nan"), "ratio has non-finite entries"),
        (2, 0, -0.5, "ratio must be >= 0"),
    ],
    ids=["target_too_large", "target_negative", "ratio_inf", "ratio_nan", "ratio_negative"],
)
def test_bad_values(backend, arg, row, value, message):
    """The value rules: inputs[arg][row] = value is refused with that message."""
    inputs = list(_good())
    inputs[arg][row] = value
    with pytest.raises(ValueError, match=message):
        d3diff_loss(*inputs, backend=backend)


def test_unknown_backend_name():
    z, t, r, wc, ws = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        d3diff_loss(z, t, r, wc, ws, backend="numpy")


def test_checks_off_skips_value_checks():
    import unif2ace

    z, t, r, wc, ws = _good()
    r[0] = float("inf")
    unif2ace.set_checks(False)
    try:
        d3diff_loss(z, t, r, wc, ws, backend="torch")  # no error: value checks are off
    finally:
        unif2ace.set_checks(True)


# ---- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear", "loglinear"])
def test_schedule_identities(name):
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    v = schedule(t, name)
    assert (v.gamma > 0).all() and (v.gamma < 1).all()
    assert torch.all(v.gamma[1:] >= v.gamma[:-1])  # more masking as t grows
    torch.testing.assert_close(v.sigma, -torch.log1p(-v.gamma))
    torch.testing.assert_close(v.ratio, 1 / torch.expm1(v.sigma))
    h = 1e-6
    fd = (schedule(t + h, name).sigma - schedule(t - h, name).sigma) / (2 * h)
    torch.testing.assert_close(v.dsigma, fd, rtol=1e-5, atol=1e-6)


def test_schedule_rejects_bad_t_and_name():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        schedule(torch.tensor([1.5]))
    with pytest.raises(ValueError, match="schedule must be one of"):
        schedule(torch.tensor([0.5]), "sqrt")


def test_d3diff_weights_normalise_per_token():
    t = torch.tensor([0.3, 0.7])
    n = torch.tensor([10, 30])
    ratio, w_ce, w_se = d3diff_weights(t, n)
    torch.testing.assert_close(w_ce, torch.full((2,), 1 / 40))
    v = schedule(t)
    torch.testing.assert_close(w_se, v.dsigma / 40)
    torch.testing.assert_close(ratio, v.ratio)
