"""The MoE ops on the GPU path, checked without a GPU: the experts' compute dtype under autocast,
host reads (fake CUDA tensors have no values, so any read raises), the cached group constants,
F.grouped_mm's weight gradient of experts with no rows, and the device every GPU launcher enters
(tensors on a fake ``cuda:1``, the launches mocked)."""

import contextlib

import pytest
import torch
from test_fake_cuda import CUDA, fake_cuda
from test_moe import check_mlp, mlp_inputs
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import backend_params, device_for, rel_err
from unif2ace import _backend, ops
from unif2ace.ops import moe
from unif2ace.ops.moe import _cpu, _cuda, _custom_ops, _torch, moe_mlp, moe_mlp_ref, moe_route
from unif2ace.ops.moe._types import MoEPlan, RouteOptions

BF16_TOL = 3e-2  # ‖out − ref‖ / ‖ref‖ against float64 with bf16 GEMM inputs


# ---- autocast -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("activation", ["silu_glu", "gelu"])
def test_experts_compute_in_the_autocast_dtype(backend, activation):
    """Under autocast the experts take the autocast dtype (bf16), as torch.nn.Linear does: the
    output is bf16 and equals the explicit bf16 call, the gradients come back in the fp32 inputs'
    dtype, and both are within bf16 tolerance of the float64 reference. Triton under the
    interpreter runs fp16 autocast instead: the interpreter's tl.dot gets bf16 operands wrong
    (triton 3.9; the GPU run checks the bf16 path)."""
    dev = device_for(backend)
    amp = torch.float16 if backend == "triton" and dev.type == "cpu" else torch.bfloat16
    T, D, Fh, E, k = 37, 64, 32, 8, 2
    (x, w_up, w_down), ids, w = mlp_inputs(T, D, Fh, E, k, activation, torch.float32, dev, 6)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_up, w_down, w)]
    with torch.autocast(dev.type, dtype=amp):
        y = moe_mlp(*leaves[:3], ids, leaves[3], activation=activation, backend=backend)
    assert y.dtype == amp
    with torch.no_grad():
        y16 = moe_mlp(
            x.to(amp),
            w_up.to(amp),
            w_down.to(amp),
            ids,
            w,
            activation=activation,
            backend=backend,
        )
    assert torch.equal(y, y16)
    gy = torch.randn(T, D, device=dev)
    grads = torch.autograd.grad(y, leaves, gy.to(amp))
    assert [g.dtype for g in grads] == [torch.float32] * 4
    ref = [t.detach().double().cpu().requires_grad_(True) for t in (x, w_up, w_down, w)]
    yr = moe_mlp_ref(*ref[:3], ids.cpu(), ref[3], activation)
    ref_grads = torch.autograd.grad(yr, ref, gy.double().cpu())
    assert rel_err(y, yr) < BF16_TOL
    for name, g, gr in zip(("x", "w_up", "w_down", "weights"), grads, ref_grads):
        assert rel_err(g, gr) < BF16_TOL, name


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_shared_experts_and_routing_under_autocast(backend):
    """Shared experts compute in bf16 like the routed ones; routing stays fp32: bf16 logits give
    exactly the routing of their fp32 upcast outside autocast."""
    T, D, Fh, G = 37, 64, 32, 2
    x = torch.randn(T, D, requires_grad=True)
    su = (torch.randn(G, 2 * Fh, D) / 8).requires_grad_(True)
    sd = (torch.randn(G, D, Fh) / 6).requires_grad_(True)
    gid = torch.randint(0, G, (T,))
    z = torch.randn(T, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ys = ops.moe_shared_experts(x, su, sd, group_ids=gid, backend=backend)
        r = moe_route(z, 2, group_ids=gid, experts_per_group=4, return_stats=True, backend=backend)
    assert ys.dtype == torch.bfloat16
    ys.float().sum().backward()
    assert x.grad.dtype == su.grad.dtype == sd.grad.dtype == torch.float32
    r32 = moe_route(
        z.float(), 2, group_ids=gid, experts_per_group=4, return_stats=True, backend=backend
    )
    assert all(torch.equal(a, b) for a, b in zip(r, r32))
    assert r.topk_weights.dtype == r.prob_sums.dtype == torch.float32


# ---- host reads, cached constants ---------------------------------------------------------------


def test_torch_backend_reads_nothing_on_cuda(monkeypatch):
    """The torch backend's routing with its two losses, and the torch plan (the "triton"
    backend's), on fake CUDA tensors: every size is known on the host, nothing is read back."""
    T, E, k = 37, 8, 2
    with fake_cuda(monkeypatch, None):
        z = torch.randn(T, E, device=CUDA)  # no grad: autograd needs a real CUDA device guard
        gid = torch.randint(0, 2, (T,), device=CUDA)
        r = moe_route(z, k, group_ids=gid, experts_per_group=4, return_stats=True, backend="torch")
        loss = ops.moe_balance_loss(r.expert_counts, r.prob_sums, k, experts_per_group=4)
        loss = loss + ops.moe_z_loss(z, group_ids=gid, experts_per_group=4)
        assert loss.shape == () and loss.is_cuda
        N, bm = T * k, 16
        outs = [
            torch.empty(n, dtype=torch.int32, device=CUDA)
            for n in (E, E + 1, N, N, N // bm + E, N // bm + E)
        ]
        _torch.plan(r.topk_ids, E, bm, *outs)


def test_torch_plan_refuses_bad_ids_on_the_cpu():
    """Contract §3: an id outside [0, E) raises on the CPU (on a GPU, with no host read to raise
    with, it is counted nowhere)."""
    ids = torch.tensor([[0, 5]])
    outs = [torch.empty(n, dtype=torch.int32) for n in (4, 5, 2, 2, 0, 0)]
    with pytest.raises(ValueError, match="outside"):
        _torch.plan(ids, 4, 0, *outs)


def test_group_constants_are_cached():
    """Group offsets and the balance loss's constants cross host -> device once per device, not
    per call; built in inference mode they are still normal tensors (autograd may save them);
    never cached while tracing."""
    a = moe._offsets_tensor([4, 4], torch.device("cpu"))
    assert moe._offsets_tensor([4, 4], "cpu") is a and a.tolist() == [0, 4, 8]
    with torch.inference_mode():
        b = moe._offsets_tensor([3, 5, 7], "cpu")
    assert not b.is_inference() and b.tolist() == [0, 3, 8, 15]
    with FakeTensorMode():
        assert moe._offsets_tensor([4, 4], "cpu") is not a
    assert moe._offsets_tensor([4, 4], "cpu") is a


# ---- F.grouped_mm: the weight gradient of experts with no rows ----------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_weight_grad_of_empty_experts_is_zero(monkeypatch, dtype):
    """F.grouped_mm may leave the blocks of empty groups unwritten (its bf16 CUDA path allocates
    with empty_like): poisoned with NaN here, the composed backward must still give those experts
    a zero gradient."""
    real = torch.nn.functional.grouped_mm

    def grouped_mm(a, b, *, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if out.dim() == 3:  # the weight gradient [E, ., .]
            rows = torch.diff(offs, prepend=offs.new_zeros(1))
            out[rows == 0] = float("nan")
        return out

    monkeypatch.setattr(torch.nn.functional, "grouped_mm", grouped_mm)
    monkeypatch.setenv("UNIF2ACE_MOE_GEMM", "grouped_mm")
    grads = check_mlp("cpu", 64, 128, 96, 8, 2, "silu_glu", dtype, used=6)
    assert (grads[1][6:] == 0).all() and (grads[2][6:] == 0).all()


# ---- device guards ------------------------------------------------------------------------------

DEV1 = torch.device("cuda", 1)


@pytest.fixture
def entered(monkeypatch):
    """torch.cuda.device replaced by a recorder: the list holds the devices entered, innermost
    last."""
    stack: list[torch.device] = []

    @contextlib.contextmanager
    def device(d):
        stack.append(torch.device(d))
        try:
            yield
        finally:
            stack.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    return stack


def _fake_inputs(T=37, E=8, k=2, D=16, Fh=8, block_m=16):
    """Contract arguments on DEV1 (call under FakeTensorMode)."""
    N = T * k
    ids = torch.empty(T, k, dtype=torch.int64, device=DEV1)
    plan = MoEPlan(*_custom_ops.empty_plan(ids, E, block_m), k, block_m)
    f = dict(device=DEV1)
    return dict(
        T=T,
        E=E,
        k=k,
        logits=torch.empty(T, E, **f),
        offsets=torch.empty(2, dtype=torch.int64, device=DEV1),
        ids=ids,
        w=torch.empty(T, k, **f),
        counts=torch.empty(E, dtype=torch.int32, device=DEV1),
        ps=torch.empty(E, **f),
        x=torch.empty(T, D, **f),
        xs=torch.empty(N, D, **f),
        y=torch.empty(T, D, **f),
        w_up=torch.empty(E, 2 * Fh, D, **f),
        w_down=torch.empty(E, D, Fh, **f),
        h=torch.empty(N, 2 * Fh, **f),
        out=torch.empty(N, D, **f),
        gw=torch.empty(T, k, **f),
        plan=plan,
    )


def _run_launchers(backend, a):
    launch = lambda kernel: _backend.launcher(kernel, backend)  # noqa: E731
    p = a["plan"]
    opts = RouteOptions(a["k"], "softmax", True, 0, 0, 1.0)
    launch("moe.route")(
        a["logits"], a["offsets"], None, None, opts, a["ids"], a["w"], a["counts"], a["ps"]
    )
    if backend == "cuda":  # the triton backend's plan is the torch launcher
        launch("moe.plan")(a["ids"], a["E"], p.block_m, *p.tensors())
    launch("moe.permute")(a["x"], p.sorted_slot, a["k"], a["xs"])
    launch("moe.combine")(a["xs"], p.slot_pos, a["w"], a["y"])
    launch("moe.combine_bwd")(a["y"], a["xs"], p.slot_pos, a["w"], a["xs"], a["gw"])
    if backend == "triton":  # the cuda backend's experts are torch GEMMs around the above
        x, xs0 = a["x"], a["x"].new_empty(0, a["x"].shape[1])
        launch("moe.experts_fwd")(
            x, a["w_up"], a["w_down"], a["w"], p, "silu_glu", a["y"], a["h"], a["out"], xs0
        )


def test_triton_launches_enter_the_tensors_device(monkeypatch, entered):
    """Every Triton launch of the MoE family runs with its tensors' GPU current (Triton launches
    on the current device and stream)."""
    if not _backend.triton_available():
        pytest.skip("triton not installed")
    from unif2ace.triton_kernels import moe as tk
    from unif2ace.triton_kernels import moe_route as tr

    launches: list[tuple[str, torch.device | None]] = []

    class Kernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append(
                (self.name, entered[-1] if entered else None)
            )

    names = {
        tk: ("_permute_kernel", "_combine_kernel", "_combine_bwd_kernel", "_grouped_gemm_kernel"),
        tr: ("_route_fwd_kernel", "_route_reduce_kernel"),
    }
    for mod, kernels in names.items():
        for name in kernels:
            monkeypatch.setattr(mod, name, Kernel(name))
    with FakeTensorMode(allow_non_fake_inputs=True):
        _run_launchers("triton", _fake_inputs())
    assert {n for n, _ in launches} == {n for ks in names.values() for n in ks}
    assert all(d == DEV1 for _, d in launches), launches


def test_cuda_launchers_enter_the_tensors_device(monkeypatch, entered):
    """Every call into the CUDA extension (kernels, workspace queries) runs with the tensors' GPU
    current; the extension is a recorder here."""
    calls: list[tuple[str, torch.device | None]] = []

    class Ext:
        def __getattr__(self, name):
            def call(*args):
                calls.append((name, entered[-1] if entered else None))
                return 0  # workspace bytes

            return call

    monkeypatch.setattr(_backend, "cuda_ext", lambda: Ext())
    for mod in (_cuda, _cpu):  # descriptors and streams read pointers: none on fake tensors
        monkeypatch.setattr(mod, "desc", lambda t: None)
    monkeypatch.setattr(_cuda, "stream", lambda t: 0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        _run_launchers("cuda", _fake_inputs())
    kernels = {n for n, _ in calls}
    assert {"moe_route_fwd", "moe_plan", "moe_permute", "moe_combine", "moe_combine_bwd"} <= kernels
    assert all(d == DEV1 for _, d in calls), calls


@pytest.mark.parametrize("backend", backend_params())
def test_moe_mlp_with_no_tokens(backend):
    """T = 0 gives [0, D] on every backend, and a backward where there is a graph (the cpu backend
    used to raise in its combine)."""
    dev = device_for(backend)
    x = torch.randn(0, 8, device=dev, requires_grad=True)
    w_up = torch.randn(4, 16, 8, device=dev, requires_grad=True)
    w_down = torch.randn(4, 8, 8, device=dev, requires_grad=True)
    ids = torch.zeros(0, 2, dtype=torch.long, device=dev)
    weights = torch.zeros(0, 2, device=dev, requires_grad=True)
    y = moe_mlp(x, w_up, w_down, ids, weights, backend=backend)
    assert y.shape == (0, 8)
    if y.requires_grad:  # the torch reference's loop over experts leaves no graph for T = 0
        y.sum().backward()
        assert w_up.grad is None or not w_up.grad.any()
