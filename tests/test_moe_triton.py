"""Triton MoE kernels (triton_kernels/moe.py, moe_route.py) against the torch launchers
(ops/moe/_torch.py), beyond what tests/test_moe.py covers through the public ops: every output
element written (NaN-poisoned buffers), combine backward in place (grad_src = src), the saved
pre-activation h of the gathered grouped GEMM, and plans with a block_m other than the default 64.
Under the interpreter on CPU (tests/conftest.py), on the GPU with UNIF2ACE_TEST_GPU=1."""

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import device_for, rel_err
from unif2ace import _backend
from unif2ace.ops import moe
from unif2ace.ops.moe import _cpu, _torch, reference
from unif2ace.ops.moe._types import RouteOptions

pytestmark = pytest.mark.skipif(
    not _backend.available("triton", device_for("triton")), reason="triton not available here"
)
tk = pytest.importorskip("unif2ace.triton_kernels.moe")
from unif2ace.triton_kernels import moe_aot, moe_route  # noqa: E402

DEV = device_for("triton")


@pytest.mark.parametrize("T,k,E,D", [(1, 1, 2, 5), (37, 2, 9, 123), (300, 4, 16, 512)])
@pytest.mark.parametrize("weighted", [True, False])
def test_permute_combine_kernels_match_torch(T, k, E, D, weighted):
    ids = torch.randint(0, E, (T, k), device=DEV)
    p = moe.moe_plan(ids, E, block_m=64, backend="torch")
    x = torch.randn(T, D, device=DEV)
    xs = torch.full((T * k, D), float("nan"), device=DEV)
    tk.permute(x, p.sorted_slot, k, xs)
    assert torch.equal(xs, x[p.sorted_slot.long() // k])
    src = torch.randn(T * k, D, device=DEV)
    w = torch.rand(T, k, device=DEV) if weighted else None
    y = torch.full((T, D), float("nan"), device=DEV)
    tk.combine(src, p.slot_pos, w, y)
    yr = torch.empty(T, D, device=DEV)
    _torch.combine(src, p.slot_pos, w, yr)
    assert rel_err(y, yr) < 1e-5
    go = torch.randn(T, D, device=DEV)
    gs_ref, gw_ref = torch.empty_like(src), torch.empty(T, k, device=DEV)
    _torch.combine_bwd(go, src, p.slot_pos, w, gs_ref, gw_ref)
    gs, gw = torch.full_like(src, float("nan")), torch.full((T, k), float("nan"), device=DEV)
    tk.combine_bwd(go, src, p.slot_pos, w, gs, gw)
    assert torch.equal(gs, gs_ref) and rel_err(gw, gw_ref) < 2e-5
    inplace, gw2 = src.clone(), torch.empty(T, k, device=DEV)
    tk.combine_bwd(go, inplace, p.slot_pos, w, inplace, gw2)  # grad_src may be src (contract §6)
    assert torch.equal(inplace, gs_ref) and rel_err(gw2, gw_ref) < 2e-5


@pytest.mark.parametrize("activation", ["silu_glu", "gelu", "gelu_tanh"])
def test_gathered_grouped_gemm_saves_h(activation):
    T, D, Fh, E, k = 37, 123, 77, 9, 2
    Fu = 2 * Fh if activation == "silu_glu" else Fh
    x = torch.randn(T, D, device=DEV)
    wu = torch.randn(E, Fu, D, device=DEV) / D**0.5
    wd = torch.randn(E, D, Fh, device=DEV) / Fh**0.5
    ids = torch.rand(T, E, device=DEV).argsort(1)[:, :k]
    w = torch.rand(T, k, device=DEV)
    p = moe.moe_plan(ids, E, backend="triton")
    N = T * k
    y = torch.full((T, D), float("nan"), device=DEV)
    h = torch.full((N, Fu), float("nan"), device=DEV)
    out = torch.full((N, D), float("nan"), device=DEV)
    tk.experts_fwd(x, wu, wd, w, p, activation, y, h, out, x.new_empty(0, D))
    xs = x[p.sorted_slot.long() // k]
    hr, outr = torch.empty(N, Fu, device=DEV), torch.empty(N, D, device=DEV)
    for e in range(E):
        lo, hi = int(p.offsets[e]), int(p.offsets[e + 1])
        hr[lo:hi] = xs[lo:hi].double().matmul(wu[e].double().T).float()
        a = reference.activate(hr[lo:hi].double(), activation)
        outr[lo:hi] = a.matmul(wd[e].double().T).float()
    assert rel_err(h, hr) < 2e-6 and rel_err(out, outr) < 2e-6
    yr = moe.moe_mlp_ref(x.double(), wu.double(), wd.double(), ids, w.double(), activation)
    assert rel_err(y, yr) < 2e-6


@pytest.mark.parametrize("block_m", [16, 48])
def test_mlp_with_other_block_m(block_m):
    T, D, Fh, E, k = 37, 64, 40, 5, 2
    x = torch.randn(T, D, device=DEV)
    wu = torch.randn(E, 2 * Fh, D, device=DEV) / 8
    wd = torch.randn(E, D, Fh, device=DEV) / 6
    ids = torch.rand(T, E, device=DEV).argsort(1)[:, :k]
    w = torch.rand(T, k, device=DEV)
    p = moe.moe_plan(ids, E, block_m=block_m, backend="triton")
    y = moe.moe_mlp(x, wu, wd, ids, w, plan=p, backend="triton")
    yr = moe.moe_mlp_ref(x.double(), wu.double(), wd.double(), ids, w.double())
    assert rel_err(y, yr) < 2e-5


def test_plan_without_tile_map_is_a_clear_error():
    ids = torch.randint(0, 4, (8, 2), device=DEV)
    p = moe.moe_plan(ids, 4, block_m=0, backend="triton")
    x = torch.randn(8, 16, device=DEV)
    with pytest.raises(ValueError, match="no tile map"):
        moe.moe_mlp(
            x,
            torch.randn(4, 32, 16, device=DEV),
            torch.randn(4, 16, 16, device=DEV),
            ids,
            None,
            plan=p,
            backend="triton",
        )


def test_pick_config_stays_within_aot_configs():
    covered = {(cfg, dtype) for kind, cfg, dtype in moe_aot.aot_configs() if kind != "row"}
    for dtype in moe_aot.AOT_DTYPES:
        assert (tk._pick_gemm_config(dtype), dtype) in covered
    assert tk._pick_row_config(False) == tk._ROW


# ---- routing ------------------------------------------------------------------------------------
# tests/test_moe.py runs the public op on every backend (modes, T ∈ {1, 37, 4096}, ties, grads);
# here: the Triton launcher on NaN / -1 poisoned outputs, engineered ties in every mode, bf16
# logits, T = 0, determinism, and the sync-free torch backward of the GPU backends.


def _route_args(T, E, k, mode, ties, dev):
    sizes = [E // 2, E - E // 2] if mode == "groups" else [E]
    offs = moe._offsets_tensor(sizes, dev)
    gid = torch.randint(0, len(sizes), (T,), device=dev) if mode == "groups" else None
    ng, tg = (4, 2) if mode == "group-limited" else (0, 0)
    scoring = "sigmoid" if mode == "group-limited" else "softmax"
    z = torch.randint(0, 3, (T, E), device=dev).float() if ties else torch.randn(T, E, device=dev)
    bias = None
    if mode == "group-limited":
        bias = (torch.randint(0, 2, (E,), device=dev) * 0.25).float()
    return z, offs, gid, bias, scoring, ng, tg


@pytest.mark.parametrize("mode", ["plain", "groups", "group-limited"])
@pytest.mark.parametrize("T,E,k", [(1, 8, 1), (37, 16, 2), (37, 64, 8), (37, 256, 4)])
@pytest.mark.parametrize("ties", [False, True])
def test_route_kernel_matches_torch_launcher(mode, T, E, k, ties):
    z, offs, gid, bias, scoring, ng, tg = _route_args(T, E, k, mode, ties, DEV)
    if k > (E // 2 if mode == "groups" else E) or (ng and k > tg * (E // ng)):
        pytest.skip("k does not fit")
    outs = [
        (
            torch.full((T, k), -1, dtype=torch.int64, device=DEV),
            torch.full((T, k), float("nan"), device=DEV),
            torch.full((E,), -1, dtype=torch.int32, device=DEV),
            torch.full((E,), float("nan"), device=DEV),
        )
        for _ in range(2)
    ]
    args = (z, offs, gid, bias, RouteOptions(k, scoring, True, ng, tg, 1.5))
    moe_route.route(*args, *outs[0])
    _torch.route(z.double(), *args[1:], *outs[1])
    ids, w, cnt, ps = outs[0]
    ids_r, w_r, cnt_r, ps_r = outs[1]
    assert torch.equal(ids, ids_r) and torch.equal(cnt, cnt_r)
    assert (w - w_r).abs().max() < 1e-6 and (ps - ps_r).abs().max() < 1e-5


def test_route_kernel_bf16_empty_and_deterministic():
    z = torch.randn(37, 9, device=DEV).bfloat16()
    a = moe.moe_route(z, 2, return_stats=True, backend="triton")
    b = moe.moe_route_ref(z.double(), 2)
    assert torch.equal(a.topk_ids, b.topk_ids) and rel_err(a.topk_weights, b.topk_weights) < 1e-6
    c = moe.moe_route(z, 2, return_stats=True, backend="triton")
    assert all(torch.equal(x, y) for x, y in zip(a, c))
    e = moe.moe_route(z[:0], 2, return_stats=True, backend="triton")
    assert e.topk_ids.shape == (0, 2) and not e.expert_counts.any() and not e.prob_sums.any()


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_route_bwd_torch_matches_cpu(scoring, renormalize):
    """The dense closed form the GPU backends share against the C++ kernel."""
    T, E, k = 37, 18, 4
    z = torch.randn(T, E)
    offs = moe._offsets_tensor([9, 9], "cpu")
    gid = torch.randint(0, 2, (T,))
    ids = moe.moe_route(z, k, group_ids=gid, experts_per_group=9, scoring=scoring, backend="torch")[
        0
    ]
    gw, gp = torch.randn(T, k), torch.randn(E)
    for g_w, g_p in ((gw, gp), (gw, None), (None, gp)):
        a, b = torch.full((T, E), float("nan")), torch.full((T, E), float("nan"))
        _cpu.route_bwd(z, offs, gid, ids, g_w, g_p, scoring, renormalize, 2.0, a)
        _torch.route_bwd(z, offs, gid, ids, g_w, g_p, scoring, renormalize, 2.0, b)
        assert rel_err(b, a) < 1e-6


def _near_tie_logits(n_tokens: int, E: int = 8, seed: int = 0) -> torch.Tensor:
    """Softmax near-ties: per token 2-4 logits within a few 2^-55 of 0 (their exps are 1 or a few
    ulps below it) and the rest -1000 (exp underflows to 0), kept only where the sum of the exps
    rounds the same in every order (the backends sum in different orders) and the exps agree
    between the C library, numpy and torch. Where two exps are a few ulps apart, ``ex / s`` and ``ex · (1 / s)`` round
    them into different orders or ties."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < n_tokens:
        nnz = int(torch.randint(2, 5, (1,), generator=gen))
        z = torch.full((E,), -1000.0)
        pos = torch.randperm(E, generator=gen)[:nnz]
        z[pos] = -torch.randint(0, 12, (nnz,), generator=gen).float() * 2.0**-55
        zd = z.double()
        d = zd - zd.max()
        ex = torch.exp(d)
        same = ex.tolist() == [math.exp(v) for v in d.tolist()] == np.exp(d.numpy()).tolist()
        if not same:  # the C library's exp (C++), numpy's (the interpreter) and torch's agree
            continue
        vals = [v for v in ex.tolist() if v > 0]
        if len({sum(p, 0.0) for p in itertools.permutations(vals)}) == 1:
            rows.append(z)
    return torch.stack(rows)


@pytest.mark.parametrize("k", [1, 2])
def test_route_near_ties_match_cpp(k):
    """Near-tie routing: the Triton kernel normalises as the C++ and CUDA kernels do
    (``ex · (1 / Σ ex)``), so it picks the same experts in the same order; on these inputs the
    division ``ex / Σ ex`` would pick differently for many tokens. On a GPU (libdevice's exp) the
    chosen keys are compared within a few ulps instead of the ids."""
    if _backend.cpu_ext() is None:
        pytest.skip("the C++ CPU module is not built")
    z = _near_tie_logits(400)
    zd = z.double()
    ex = torch.exp(zd - zd.max(1, keepdim=True).values)
    s = ex.sum(1, keepdim=True)
    order = lambda key: key.sort(dim=1, descending=True, stable=True).indices[:, :k]  # noqa: E731
    flips = (order(ex / s) != order(ex * (1.0 / s))).any(1)
    assert int(flips.sum()) >= 10  # the inputs do tell the two forms apart
    cpp = moe.moe_route(z, k, return_stats=True, backend="cpu")
    tri = moe.moe_route(z.to(DEV), k, return_stats=True, backend="triton")
    if DEV.type == "cpu":
        assert torch.equal(tri.topk_ids, cpp.topk_ids)
        assert torch.equal(tri.expert_counts, cpp.expert_counts)
    else:
        key = ex * (1.0 / s)
        got, want = key.gather(1, tri.topk_ids.cpu()), key.gather(1, cpp.topk_ids)
        assert ((got - want).abs() <= 4 * 2.0**-53).all()
    assert (tri.topk_weights.cpu() - cpp.topk_weights).abs().max() < 1e-6


def test_route_config_stays_within_aot_configs():
    covered = {cfg for kind, cfg, _ in moe_aot.aot_configs() if kind[0] == "route"}
    for E in range(1, moe_route.ROUTE_MAX_E + 1):
        assert moe_route._pick_route_config(E, False) in covered
    assert not moe_route.route_supported(moe_route.ROUTE_MAX_E + 1, 2, 0)


def test_route_beyond_kernel_limits_falls_back():
    z = torch.randn(5, 300, device=DEV)  # E > ROUTE_MAX_E: the torch spec runs instead
    a = moe.moe_route(z, 9, return_stats=True, backend="triton")
    b = moe.moe_route_ref(z.double(), 9)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.expert_counts, b.expert_counts)
