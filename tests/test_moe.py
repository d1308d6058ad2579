"""Grouped MoE dispatch: routing (every mode, ties), plan, permute/combine and the expert MLP on
every backend against float64 references (outputs and every gradient), the launcher contract
(poisoned outputs), shared experts, balance and z losses, one test per input-validation rule,
opcheck on every custom op and a torch.compile smoke test."""

import pytest
import torch

import unif2ace
from conftest import backend_params, device_for, rel_err
from unif2ace import _backend
from unif2ace.ops import moe
from unif2ace.ops._native import desc
from unif2ace.ops.moe import (
    _cpu,
    _custom_ops,
    _torch,
    moe_balance_loss,
    moe_combine,
    moe_mlp,
    moe_mlp_grouped_mm,
    moe_mlp_ref,
    moe_permute,
    moe_plan,
    moe_route,
    moe_route_ref,
    moe_shared_experts,
    moe_z_loss,
    reference,
)
from unif2ace.ops.moe._types import RouteOptions

# ‖out − ref‖/‖ref‖ against float64. fp32: accumulation order over D, F ≤ 1024.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


# ---- routing ------------------------------------------------------------------------------------


# name -> keyword arguments of moe_route for E experts and k (None: the mode does not fit).
def route_mode(mode, E, k, device):
    if mode == "softmax":
        return {}
    if mode == "softmax-raw":  # Qwen2-MoE norm_topk_prob=False
        return {"renormalize": False}
    if mode == "sigmoid":
        return {"scoring": "sigmoid", "scaling": 2.5}
    if mode == "groups":  # UniF²ace task groups of unequal size
        if E < 2:
            return None
        sizes = [E // 2, E - E // 2]
        return None if k > min(sizes) else {"experts_per_group": sizes}
    if mode == "group-limited":  # DeepSeek-V3
        n_group = {2: 2, 9: 3, 64: 8}[E]
        topk_group = max(1, n_group // 2)
        if k > topk_group * (E // n_group):
            return None
        bias = torch.randn(E, device=device) * 0.1
        return {
            "scoring": "sigmoid",
            "n_group": n_group,
            "topk_group": topk_group,
            "correction_bias": bias,
            "scaling": 2.5,
        }
    raise AssertionError(mode)


def group_ids_for(kw, T, device):
    sizes = kw.get("experts_per_group")
    if sizes is None:
        return None
    return torch.randint(0, len(sizes), (T,), device=device)


def check_route(backend, logits, k, kw, gid, grads=True):
    """Ids and counts exact, weights/prob sums/gradients within tolerance of the fp64 reference."""
    dev = logits.device
    z = logits.detach().clone().requires_grad_(True)
    r = moe_route(z, k, group_ids=gid, return_stats=True, backend=backend, **kw)
    offs = moe._offsets_tensor(
        moe._group_sizes(z.shape[1], kw.get("experts_per_group"), "t"), "cpu"
    )
    zr = logits.detach().double().cpu().requires_grad_(True)
    ref_kw = {k_: v for k_, v in kw.items() if k_ not in ("experts_per_group",)}
    if "correction_bias" in ref_kw:
        ref_kw["correction_bias"] = ref_kw["correction_bias"].cpu()
    for a, b in (("n_group", 0), ("topk_group", 0)):
        ref_kw.setdefault(a, b)
    ref = moe_route_ref(zr, k, offs, None if gid is None else gid.cpu(), **ref_kw)
    assert r.topk_ids.dtype == torch.int64 and r.topk_weights.dtype == torch.float32
    assert torch.equal(r.topk_ids.cpu(), ref.topk_ids)
    assert torch.equal(r.expert_counts.cpu().long(), ref.expert_counts.long())
    assert rel_err(r.topk_weights, ref.topk_weights) < 1e-6
    assert rel_err(r.prob_sums, ref.prob_sums) < 1e-5
    if grads:
        gw = torch.randn(r.topk_weights.shape, device=dev)
        gp = torch.randn(r.prob_sums.shape, device=dev)
        (g,) = torch.autograd.grad((r.topk_weights * gw).sum() + (r.prob_sums * gp).sum(), z)
        (gr,) = torch.autograd.grad(
            (ref.topk_weights * gw.double().cpu()).sum()
            + (ref.prob_sums * gp.double().cpu()).sum(),
            zr,
        )
        assert rel_err(g, gr) < 1e-5
    return r


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["softmax", "softmax-raw", "sigmoid", "groups", "group-limited"])
@pytest.mark.parametrize("T", [1, 37, 4096])
@pytest.mark.parametrize("E", [2, 9, 64])
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_route_matches_reference(backend, mode, T, E, k):
    if k > E:
        pytest.skip("k > E")
    dev = device_for(backend)
    kw = route_mode(mode, E, k, dev)
    if kw is None:
        pytest.skip(f"{mode} does not fit E={E}, k={k}")
    logits = torch.randn(T, E, device=dev) * 2
    check_route(backend, logits, k, kw, group_ids_for(kw, T, dev), grads=T <= 37 or E == 9)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("mode", ["softmax", "softmax-raw", "sigmoid", "groups", "group-limited"])
def test_route_ties_lowest_index(backend, mode):
    """Logits on a 3-value grid: most keys tie; ties go to the lower expert index everywhere."""
    dev = device_for(backend)
    T, E, k = 37, 64, 4
    kw = route_mode(mode, E, k, dev)
    if "correction_bias" in kw:  # ties of (logit, bias) pairs
        kw["correction_bias"] = torch.randint(0, 2, (E,), device=dev).float() * 0.1
    logits = torch.randint(0, 3, (T, E), device=dev).float()
    logits[0] = 1.0  # all equal: the first k experts (of the first eligible subgroups)
    gid = group_ids_for(kw, T, dev)
    r = check_route(backend, logits, k, kw, gid, grads=False)
    if mode in ("softmax", "softmax-raw", "sigmoid"):
        assert r.topk_ids[0].tolist() == list(range(k))


def test_route_ties_explicit():
    z = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0]])
    for backend in ("torch", "cpu"):
        ids, w = moe_route(z, 2, backend=backend)
        assert ids.tolist() == [[1, 2]]
        ids, w = moe_route(z, 3, backend=backend)
        assert ids.tolist() == [[1, 2, 4]]
        assert torch.allclose(w, torch.full((1, 3), 1 / 3))


def test_route_task_groups_stay_in_group():
    T, k = 200, 4
    gid = torch.randint(0, 2, (T,))
    ids, _ = moe_route(torch.randn(T, 16), k, group_ids=gid, experts_per_group=8, backend="cpu")
    assert ((ids // 8) == gid[:, None]).all()


def test_route_bf16_logits():
    z = torch.randn(37, 9).bfloat16()
    a = moe_route(z, 2, return_stats=True, backend="cpu")
    b = moe_route_ref(z.double(), 2)
    assert torch.equal(a.topk_ids, b.topk_ids)
    assert rel_err(a.topk_weights, b.topk_weights) < 1e-6


def test_route_deterministic_stats():
    z = torch.randn(4096, 64)
    a = moe_route(z, 8, return_stats=True, backend="cpu")
    b = moe_route(z, 8, return_stats=True, backend="cpu")
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---- plan, permute, combine ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("T,k,E", [(1, 1, 2), (37, 2, 9), (4096, 4, 64), (5000, 8, 3)])
@pytest.mark.parametrize("block_m", [0, 16, 64])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_plan(backend, T, k, E, block_m, id_dtype):
    dev = device_for(backend)
    ids = torch.randint(0, max(E - 1, 1), (T, k), device=dev).to(id_dtype)  # expert E-1 empty
    p = moe_plan(ids, E, block_m=block_m, backend=backend)
    flat = ids.reshape(-1).long().cpu()
    counts = torch.bincount(flat, minlength=E)
    assert torch.equal(p.counts.cpu().long(), counts)
    assert torch.equal(
        p.offsets.cpu().long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    )
    assert torch.equal(p.sorted_slot.cpu().long(), torch.argsort(flat, stable=True))  # stable
    assert torch.equal(p.slot_pos.cpu().long()[p.sorted_slot.cpu().long()], torch.arange(T * k))
    assert all(t.dtype == torch.int32 for t in p.tensors())
    if block_m:
        te, tr = p.tile_expert.cpu().tolist(), p.tile_row.cpu().tolist()
        assert len(te) == T * k // block_m + E
        exp = [
            (e, r)
            for e in range(E)
            for r in range(int(p.offsets[e]), int(p.offsets[e + 1]), block_m)
        ]
        assert list(zip(te, tr))[: len(exp)] == exp
        assert all(e == -1 and r == T * k for e, r in zip(te[len(exp) :], tr[len(exp) :]))
    else:
        assert p.tile_expert.numel() == 0


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("T,D,k,E", [(1, 123, 1, 2), (37, 123, 2, 9), (300, 512, 4, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_combine(backend, T, D, k, E, dtype):
    dev = device_for(backend)
    ids = torch.randint(0, E, (T, k), device=dev)
    p = moe_plan(ids, E, backend=backend)
    x = torch.randn(T, D, device=dev).to(dtype).requires_grad_(True)
    w = torch.rand(T, k, device=dev).requires_grad_(True)
    xs = moe_permute(x, p, backend=backend)
    assert torch.equal(xs, x[p.sorted_slot.long() // k])
    src = (torch.randn(T * k, D, device=dev)).to(dtype).requires_grad_(True)
    y = moe_combine(src, w, p, backend=backend)
    # reference in fp64: token t's j-th slot is src row slot_pos[t·k + j]
    rows = src.detach().double()[p.slot_pos.long()].view(T, k, D)
    wr = w.detach().double().requires_grad_(True)
    rr = rows.clone().requires_grad_(True)
    yr = (rr * wr[:, :, None]).sum(1)
    assert y.dtype == dtype
    assert rel_err(y, yr) < TOL[dtype]
    gy = torch.randn(T, D, device=dev)
    gs, gw = torch.autograd.grad(y, (src, w), gy.to(dtype))
    grr, gwr = torch.autograd.grad(yr, (rr, wr), gy.double())
    assert rel_err(gs[p.slot_pos.long()].view(T, k, D), grr) < TOL[dtype]
    assert rel_err(gw, gwr) < TOL[dtype]
    (gx,) = torch.autograd.grad(xs, x, src.detach())  # permute backward: sum of the k rows
    gxr = src.detach().double()[p.slot_pos.long()].view(T, k, D).sum(1)
    assert rel_err(gx, gxr) < TOL[dtype]


def test_launchers_write_every_element():
    """Contract: outputs poisoned with NaN / -1 before the call are fully written (cpu)."""
    T, E, k, D = 37, 9, 2, 33
    nan = lambda *shape: torch.full(shape, float("nan"))  # noqa: E731
    z, go = torch.randn(T, E), torch.tensor([0, E])
    ids, w = torch.full((T, k), -1, dtype=torch.int64), nan(T, k)
    c, ps = torch.full((E,), -1, dtype=torch.int32), nan(E)
    _cpu.route(z, go, None, None, RouteOptions(k, "softmax", True, 0, 0, 1.0), ids, w, c, ps)
    assert (ids >= 0).all() and w.isfinite().all() and (c >= 0).all() and ps.isfinite().all()
    gz = nan(T, E)
    _cpu.route_bwd(z, go, None, ids, torch.randn(T, k), None, "softmax", True, 1.0, gz)
    assert gz.isfinite().all()
    for scoring, renorm in (("softmax", True), ("sigmoid", False)):  # torch spec == C++
        gid = torch.randint(0, 2, (T,))
        go2 = torch.tensor([0, 4, E])
        opts = RouteOptions(k, scoring, renorm, 0, 0, 2.0)
        _cpu.route(z, go2, gid, None, opts, ids, w, c, ps)
        args = (z, go2, gid, ids, torch.randn(T, k), torch.randn(E), scoring, renorm, 2.0)
        ga, gb = torch.empty(T, E), torch.empty(T, E)
        _cpu.route_bwd(*args, ga)
        _torch.route_bwd(*args, gb)
        assert rel_err(ga, gb) < 1e-6
    bufs = [
        torch.full((n,), -7, dtype=torch.int32)
        for n in (E, E + 1, T * k, T * k, T * k // 16 + E, T * k // 16 + E)
    ]
    _cpu.plan(ids, E, 16, *bufs)
    assert all((b != -7).all() for b in bufs)
    x = torch.randn(T, D)
    xs, y, gsrc, gw = nan(T * k, D), nan(T, D), nan(T * k, D), nan(T, k)
    _cpu.permute(x, bufs[2], k, xs)
    _cpu.combine(xs, bufs[3], w, y)
    _cpu.combine_bwd(torch.randn(T, D), xs, bufs[3], w, gsrc, gw)
    assert all(t.isfinite().all() for t in (xs, y, gsrc, gw))


# ---- expert MLP ---------------------------------------------------------------------------------


def mlp_inputs(T, D, Fh, E, k, activation, dtype, device, used=None):
    Fu = 2 * Fh if activation == "silu_glu" else Fh
    x = torch.randn(T, D, device=device)
    w_up = torch.randn(E, Fu, D, device=device) / D**0.5
    w_down = torch.randn(E, D, Fh, device=device) / Fh**0.5
    # distinct experts per token from the first `used` experts (the others stay empty)
    used = used or E
    ids = torch.rand(T, used, device=device).argsort(1)[:, :k]
    weights = torch.rand(T, k, device=device)
    return [t.to(dtype) for t in (x, w_up, w_down)], ids, weights


def check_mlp(backend, T, D, Fh, E, k, activation, dtype, used=None, weighted=True):
    dev = device_for(backend)
    (x, w_up, w_down), ids, weights = mlp_inputs(T, D, Fh, E, k, activation, dtype, dev, used)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    w = weights.clone().requires_grad_(True) if weighted else None
    y = moe_mlp(*leaves, ids, w, activation=activation, backend=backend)
    gy = torch.randn(T, D, device=dev)
    grads = torch.autograd.grad(y, leaves + ([w] if weighted else []), gy.to(dtype))
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, w_up, w_down)]
    wr = weights.double().cpu().requires_grad_(True) if weighted else None
    yr = moe_mlp_ref(*ref_leaves, ids.cpu(), wr, activation)
    ref_grads = torch.autograd.grad(yr, ref_leaves + ([wr] if weighted else []), gy.double().cpu())
    assert y.dtype == dtype and y.shape == (T, D)
    assert rel_err(y, yr) < TOL[dtype]
    for name, g, gr in zip(("x", "w_up", "w_down", "weights"), grads, ref_grads):
        assert rel_err(g, gr) < TOL[dtype], name
    return grads


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "T,D,Fh,E,k",
    [(37, 123, 77, 9, 2), (1, 123, 77, 9, 4), (64, 512, 1024, 4, 2), (200, 64, 32, 16, 4)],
)
@pytest.mark.parametrize("activation", ["silu_glu", "gelu", "gelu_tanh"])
def test_mlp_matches_fp64_reference(backend, T, D, Fh, E, k, activation):
    check_mlp(backend, T, D, Fh, E, k, activation, torch.float32)


@pytest.mark.parametrize("backend", backend_params())
def test_mlp_empty_experts(backend):
    grads = check_mlp(backend, 37, 123, 77, 9, 2, "silu_glu", torch.float32, used=4)
    assert (grads[1][4:] == 0).all() and (grads[2][4:] == 0).all()  # unused experts: zero grad


@pytest.mark.parametrize("backend", backend_params())
def test_mlp_unweighted(backend):
    check_mlp(backend, 37, 123, 77, 9, 2, "gelu", torch.float32, weighted=False)


def test_mlp_bf16_cpu():
    check_mlp("cpu", 37, 128, 64, 9, 2, "silu_glu", torch.bfloat16)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu_glu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_activation_kernels_match_torch(activation, dtype):
    """The C++ activation passes (forward; backward fused with the recomputed output, in place
    over h as the expert backward runs it) against torch's in fp64, over a wide range including
    the saturated tails; rows with a stride (a slice of a wider buffer) in the forward."""
    if _backend.cpu_ext() is None:
        pytest.skip("the C++ CPU module is not built")
    N, Fd = 67, 45
    Fu = 2 * Fd if activation == "silu_glu" else Fd
    wide = torch.cat([torch.linspace(-30, 30, N * Fu // 2), 3 * torch.randn(N * Fu - N * Fu // 2)])
    h = wide[torch.randperm(N * Fu)].view(N, Fu).to(dtype)
    da = torch.randn(N, Fd).to(dtype)
    hr = h.double().requires_grad_(True)
    ar = reference.activate(hr, activation)
    (dhr,) = torch.autograd.grad(ar, hr, da.double())
    tol = 2e-6 if dtype == torch.float32 else 1e-2
    padded = torch.zeros(N, Fu + 3, dtype=dtype)
    padded[:, :Fu] = h
    outs = [_cpu.act_fwd(padded[:, :Fu], activation)]
    if activation != "silu_glu":  # the C++ forward itself (the erf form's dispatch is torch's)
        outs.append(torch.empty(N, Fd, dtype=dtype))
        _backend.cpu_ext().moe_gelu_fwd(
            desc(padded[:, :Fu]), activation == "gelu_tanh", desc(outs[-1])
        )
    for a in outs:
        assert (a.double() - ar).abs().max() <= tol * (1 + ar.abs()).max()
    dh, a2 = _cpu.act_bwd(h.clone(), da, activation, consume=True)
    assert (a2.double() - ar).abs().max() <= tol * (1 + ar.abs()).max()
    assert (dh.double() - dhr).abs().max() <= tol * (1 + dhr.abs()).max()


@pytest.mark.parametrize("gemm", ["loop", "grouped_mm"])
def test_mlp_gemm_modes(monkeypatch, gemm):
    monkeypatch.setenv("UNIF2ACE_MOE_GEMM", gemm)
    check_mlp("cpu", 64, 128, 96, 8, 2, "silu_glu", torch.float32, used=6)


def test_grouped_mm_peer_matches_loop():
    (x, w_up, w_down), ids, w = mlp_inputs(64, 128, 96, 8, 2, "silu_glu", torch.float32, "cpu", 6)
    leaves = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    y = moe_mlp_grouped_mm(*leaves, ids, w)
    y.backward(torch.ones_like(y).contiguous())
    ref = [t.clone().requires_grad_(True) for t in (x, w_up, w_down)]
    yr = moe_mlp_ref(*ref, ids, w)
    yr.backward(torch.ones_like(yr))
    assert rel_err(y, yr) < 1e-5
    assert all(rel_err(a.grad, b.grad) < 1e-5 for a, b in zip(leaves, ref))


def test_mlp_no_grad_saves_nothing():
    (x, w_up, w_down), ids, w = mlp_inputs(37, 64, 32, 4, 2, "silu_glu", torch.float32, "cpu")
    with torch.no_grad():
        y = moe_mlp(x, w_up, w_down, ids, w, backend="cpu")
    assert rel_err(y, moe_mlp_ref(x, w_up, w_down, ids, w)) < 1e-5


def test_mlp_backward_twice_is_a_clear_error():
    (x, w_up, w_down), ids, w = mlp_inputs(37, 64, 32, 4, 2, "silu_glu", torch.float32, "cpu")
    x.requires_grad_(True)
    y = moe_mlp(x, w_up, w_down, ids, w, backend="cpu")
    y.sum().backward(retain_graph=True)
    # the saved buffers were reused for gradients: autograd's version check or our guard refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation|backward ran twice"):
        y.sum().backward()


# ---- shared experts, losses ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("S", [1, 2])
def test_shared_experts(backend, S):
    dev = device_for(backend)
    T, D, Fh, G = 37, 123, 77, 2
    x = torch.randn(T, D, device=dev, requires_grad=True)
    w_up = (torch.randn(G * S, 2 * Fh, D, device=dev) / D**0.5).requires_grad_(True)
    w_down = (torch.randn(G * S, D, Fh, device=dev) / Fh**0.5).requires_grad_(True)
    gid = torch.randint(0, G, (T,), device=dev)
    y = moe_shared_experts(x, w_up, w_down, group_ids=gid, experts_per_group=S, backend=backend)
    ref = torch.zeros(T, D, dtype=torch.float64)
    xd, wud, wdd = (t.detach().double().cpu() for t in (x, w_up, w_down))
    for t in range(T):
        for s in range(S):
            e = int(gid[t]) * S + s
            gate, up = (wud[e] @ xd[t]).chunk(2)
            ref[t] += wdd[e] @ (torch.nn.functional.silu(gate) * up)
    assert rel_err(y, ref) < TOL[torch.float32]
    y.sum().backward()
    assert x.grad is not None and w_up.grad is not None


def test_balance_loss_formula_and_mixtral_equivalence():
    T, E, k = 300, 8, 2
    z = torch.randn(T, E, requires_grad=True)
    r = moe_route(z, k, return_stats=True, backend="cpu")
    loss = moe_balance_loss(r.expert_counts, r.prob_sums, k, coef=1.0)
    # transformers' Mixtral load_balancing_loss_func (one layer, no mask), written out:
    probs = torch.softmax(z, -1)
    mask = torch.nn.functional.one_hot(r.topk_ids, E).float()  # [T, k, E]
    mixtral = (mask.mean(0) * probs.mean(0)[None]).sum() * E
    assert torch.allclose(loss * k, mixtral, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, z)
    (gm,) = torch.autograd.grad(mixtral / k, z)
    assert rel_err(g, gm) < 1e-5


def test_balance_loss_per_group():
    T, k = 400, 2
    gid = torch.randint(0, 2, (T,))
    gid[:5] = 0
    z = torch.randn(T, 12)
    r = moe_route(z, k, group_ids=gid, experts_per_group=[4, 8], return_stats=True, backend="cpu")
    per = moe_balance_loss(
        r.expert_counts, r.prob_sums, k, experts_per_group=[4, 8], coef=[0.1, 0.2], reduction="none"
    )
    for g, (lo, hi, lam) in enumerate(((0, 4, 0.1), (4, 12, 0.2))):
        Tg = int((gid == g).sum())
        f = r.expert_counts[lo:hi].float() / (k * Tg)
        P = torch.softmax(z[gid == g][:, lo:hi], -1).mean(0)
        assert torch.allclose(per[g], lam * (hi - lo) * (f * P).sum(), rtol=1e-5)
    # balanced routing gives λ
    c = torch.full((4,), 50, dtype=torch.int32)
    assert torch.allclose(
        moe_balance_loss(c, torch.full((4,), 25.0), 2, coef=0.3), torch.tensor(0.3)
    )


def test_z_loss():
    z = torch.randn(37, 16)
    gid = torch.randint(0, 2, (37,))
    got = moe_z_loss(z, group_ids=gid, experts_per_group=8, coef=0.5)
    lse = torch.stack([torch.logsumexp(z[t, 8 * gid[t] : 8 * gid[t] + 8], 0) for t in range(37)])
    assert torch.allclose(got, 0.5 * (lse**2).mean())


# ---- bad input: one test per rule ---------------------------------------------------------------


def test_bad_expert_id():
    (x, wu, wd), ids, w = mlp_inputs(8, 16, 8, 4, 2, "silu_glu", torch.float32, "cpu")
    ids[3, 1] = 4
    with pytest.raises(ValueError, match="topk_ids.*outside"):
        moe_mlp(x, wu, wd, ids, w, backend="cpu")
    with pytest.raises(ValueError, match="topk_ids.*outside"):
        moe_plan(ids, 4, backend="cpu")
    ids[3, 1] = -1
    with pytest.raises(ValueError, match="outside"):
        moe_mlp(x, wu, wd, ids, w, backend="torch")


def test_bad_expert_id_kernel_guard():
    """With value checks off the C++ plan still refuses an out-of-range id (no OOB write)."""
    ids = torch.tensor([[0, 5]])
    unif2ace.set_checks(False)
    try:
        with pytest.raises(ValueError, match="moe_plan"):
            moe_plan(ids, 4, backend="cpu")
    finally:
        unif2ace.set_checks(True)


def test_bad_k_larger_than_E():
    with pytest.raises(ValueError, match="top_k = 5 exceeds the number of experts E = 4"):
        moe_route(torch.randn(3, 4), 5)


def test_bad_k_larger_than_group():
    with pytest.raises(ValueError, match="top_k = 3 exceeds the 2 experts of group 0"):
        moe_route(torch.randn(3, 6), 3, group_ids=torch.zeros(3).long(), experts_per_group=[2, 4])
    with pytest.raises(ValueError, match="topk_group"):
        moe_route(torch.randn(3, 8), 4, n_group=4, topk_group=1)


def test_bad_group_ids():
    z = torch.randn(5, 8)
    with pytest.raises(ValueError, match="group_ids has 1 entries outside \\[0, 2\\)"):
        moe_route(z, 2, group_ids=torch.tensor([0, 1, 2, 0, 1]), experts_per_group=4, backend="cpu")
    with pytest.raises(ValueError, match="group_ids is required"):
        moe_route(z, 2, experts_per_group=4)
    with pytest.raises(ValueError, match=r"group_ids must have shape \[5\]"):
        moe_route(z, 2, group_ids=torch.zeros(4, dtype=torch.long), experts_per_group=4)
    with pytest.raises(TypeError, match="group_ids must be int32 or int64"):
        moe_route(z, 2, group_ids=torch.zeros(5), experts_per_group=4)
    with pytest.raises(ValueError, match="experts_per_group"):
        moe_route(z, 2, group_ids=torch.zeros(5, dtype=torch.long), experts_per_group=3)
    with pytest.raises(ValueError, match="n_group = 3 must divide"):
        moe_route(z, 2, n_group=3, topk_group=1)


def test_bad_weight_shapes():
    (x, wu, wd), ids, w = mlp_inputs(8, 16, 8, 4, 2, "silu_glu", torch.float32, "cpu")
    with pytest.raises(ValueError, match="w_down must be"):
        moe_mlp(x, wu, wd[:, :, :7], ids, w)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_mlp(x, wu, wd[:3], ids, w)
    with pytest.raises(ValueError, match="w_up must be"):
        moe_mlp(x, wu[:, :, :15], wd, ids, w)
    with pytest.raises(ValueError, match="w_up must be"):
        moe_mlp(x, wu[:, :15], wd, ids, w)  # odd Fu for silu_glu
    with pytest.raises(ValueError, match="w_down must be"):
        moe_mlp(x, wu, wd, ids, w, activation="gelu")  # gelu wants Fu = F
    with pytest.raises(ValueError, match="topk_weights must have topk_ids' shape"):
        moe_mlp(x, wu, wd, ids, w[:, :1])
    with pytest.raises(ValueError, match="topk_ids must be"):
        moe_mlp(x, wu, wd, ids[:5], w[:5])


def test_bad_devices():
    (x, wu, wd), ids, w = mlp_inputs(8, 16, 8, 4, 2, "silu_glu", torch.float32, "cpu")
    with pytest.raises(ValueError, match="w_up is on meta but the input is on cpu"):
        moe_mlp(x, wu.to("meta"), wd, ids, w)
    with pytest.raises(ValueError, match="topk_ids is on meta"):
        moe_mlp(x, wu, wd, ids.to("meta"), w)
    with pytest.raises(ValueError, match="group_ids is on meta"):
        gid = torch.zeros(3, dtype=torch.long, device="meta")
        moe_route(torch.randn(3, 4), 2, group_ids=gid, experts_per_group=2)
    with pytest.raises(ValueError, match="correction_bias is on meta"):
        moe_route(torch.randn(3, 4), 2, correction_bias=torch.zeros(4, device="meta"))


def test_bad_dtypes_and_options():
    (x, wu, wd), ids, w = mlp_inputs(8, 16, 8, 4, 2, "silu_glu", torch.float32, "cpu")
    with pytest.raises(TypeError, match="w_up dtype torch.float64 differs"):
        moe_mlp(x, wu.double(), wd, ids, w)
    with pytest.raises(TypeError, match="topk_ids must be int32 or int64"):
        moe_mlp(x, wu, wd, ids.float(), w)
    with pytest.raises(TypeError, match="x must be one of"):
        moe_mlp(x.double(), wu.double(), wd.double(), ids, w, backend="cpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        moe_mlp(x, wu, wd, ids, w, activation="relu")
    with pytest.raises(ValueError, match="scoring must be one of"):
        moe_route(torch.randn(3, 4), 2, scoring="tanh")
    with pytest.raises(ValueError, match="non-finite"):
        moe_route(torch.tensor([[0.0, float("nan")]]), 1, backend="cpu")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        moe_route(torch.randn(3, 4), 2, backend="cuda")


# ---- registration: opcheck, torch.compile -------------------------------------------------------


def _opcheck_cases(backend):
    T, E, k, D, Fh = 11, 6, 2, 16, 8
    z = torch.randn(T, E, requires_grad=True)
    go = torch.tensor([0, 3, 6])
    gid = torch.randint(0, 2, (T,))
    ids, w = moe_route(z.detach(), k, group_ids=gid, experts_per_group=3, backend=backend)
    p = moe_plan(ids, E, block_m=4, backend=backend)
    x = torch.randn(T, D, requires_grad=True)
    wu = torch.randn(E, 2 * Fh, D, requires_grad=True)
    wd = torch.randn(E, D, Fh, requires_grad=True)
    wr = w.clone().requires_grad_(True)
    src = torch.randn(T * k, D, requires_grad=True)
    _, h, out, xs = _custom_ops.mlp_fwd_op(
        x, wu, wd, wr, *p.tensors(), k, 4, "silu_glu", True, False, backend
    )
    return [
        (_custom_ops.route_op, (z, go, gid, torch.randn(E) * 0.1, k, "sigmoid", True, 0, 0, 1.5, backend)),
        (_custom_ops.route_op, (z, torch.tensor([0, E]), None, None, k, "softmax", False, 3, 2, 1.0, backend)),
        (_custom_ops.route_bwd_op, (z.detach(), go, gid, ids, torch.randn(T, k), torch.randn(E), "softmax", True, 1.0, backend)),
        (_custom_ops.plan_op, (ids, E, 4, backend)),
        (_custom_ops.permute_op, (x, p.sorted_slot, p.slot_pos, k, backend)),
        (_custom_ops.combine_op, (src, p.slot_pos, wr, k, backend)),
        (_custom_ops.combine_op, (src, p.slot_pos, None, k, backend)),
        (_custom_ops.combine_bwd_op, (torch.randn(T, D), src.detach(), p.slot_pos, w, k, True, backend)),
        (_custom_ops.mlp_fwd_op, (x, wu, wd, wr, *p.tensors(), k, 4, "silu_glu", True, False, backend)),
        (_custom_ops.mlp_bwd_op, (torch.randn(T, D), x.detach(), wu.detach(), wd.detach(), w,
                               *p.tensors(), h.detach(), out.detach(), xs.detach(), k, 4,
                               "silu_glu", backend)),
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend):
    for op, args in _opcheck_cases(backend):
        torch.library.opcheck(op, args)


def test_torch_compile_smoke():
    torch._dynamo.reset()
    T, E, k, D, Fh = 33, 8, 2, 32, 16
    gid = torch.randint(0, 2, (T,))

    def layer(x, router, wu, wd, sw_up, sw_down):
        r = moe_route(
            x @ router.T, k, group_ids=gid, experts_per_group=4, return_stats=True, backend="cpu"
        )
        y = moe_mlp(x, wu, wd, r.topk_ids, r.topk_weights, backend="cpu")
        y = y + moe_shared_experts(x, sw_up, sw_down, group_ids=gid, backend="cpu")
        aux = moe_balance_loss(r.expert_counts, r.prob_sums, k, experts_per_group=4)
        return y, aux

    args = [
        torch.randn(T, D),
        torch.randn(E, D),
        torch.randn(E, 2 * Fh, D) / 6,
        torch.randn(E, D, Fh) / 4,
        torch.randn(2, 2 * Fh, D) / 6,
        torch.randn(2, D, Fh) / 4,
    ]
    leaves = [a.clone().requires_grad_(True) for a in args]
    unif2ace.set_checks(False)  # value checks read data (graph breaks); compile without them
    try:
        y, aux = torch.compile(layer, fullgraph=True, backend="aot_eager")(*leaves)
        (y.sum() + aux).backward()
    finally:
        unif2ace.set_checks(True)
    ref_leaves = [a.clone().requires_grad_(True) for a in args]
    yr, auxr = layer(*ref_leaves)
    (yr.sum() + auxr).backward()
    assert rel_err(y, yr) < 1e-5 and rel_err(aux, auxr) < 1e-5
    assert all(rel_err(a.grad, b.grad) < 1e-5 for a, b in zip(leaves, ref_leaves))
