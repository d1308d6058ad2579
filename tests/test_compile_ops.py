"""Every public op under ``torch.compile(fullgraph=True)`` (Inductor) on the "torch" backend and on
"auto" (the C++ kernels on CPU), value checks off: no graph break, and the compiled outputs and
gradients equal eager (issue 22, item 1, the ops' part).

Each case is one small function over a family's ops; ``fullgraph=True`` makes any graph break an
error. Integer outputs (ids, masks, counts) must be equal; floating outputs and gradients agree to
rounding (Inductor may fuse and reorder float arithmetic; the "torch" backend's ``moe_mlp`` runs the
composed torch launchers when traced instead of its loop over experts, see
:func:`unif2ace.ops.moe_mlp`).

With the value checks on, every op's checks run inside custom ops (their own, or
``unif2ace::value_check``: see :func:`unif2ace.ops._validate.checked`), so they are no graph break
either and still raise their ValueError from the compiled code; the one exception is
``omni_limit``, whose answer (None for a split image span) depends on the data.
"""

import pytest
import torch

import unif2ace
from conftest import rel_err
from unif2ace import _backend, ops
from unif2ace.ops._validate import checked

BACKENDS = ["torch"] + (["auto"] if _backend.cpu_ext() is not None else [])
T, D, E, K, F = 24, 16, 4, 2, 8


def _leaf(*shape, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen) * scale).requires_grad_(True)


def case_moe_route(backend, gen):
    logits = _leaf(T, 2 * E, gen=gen)
    gid = torch.randint(0, 2, (T,), generator=gen)
    bias = torch.randn(E, generator=gen) * 0.1

    def fn(z, gid, bias):
        r = ops.moe_route(
            z, K, group_ids=gid, experts_per_group=E, return_stats=True, backend=backend
        )
        bal = ops.moe_balance_loss(r.expert_counts, r.prob_sums, K, experts_per_group=E)
        zl = ops.moe_z_loss(z, group_ids=gid, experts_per_group=E)
        ids2, w2 = ops.moe_route(
            z[:, :E],
            K,
            scoring="sigmoid",
            n_group=2,
            topk_group=1,
            correction_bias=bias,
            scaling=2.5,
            backend=backend,
        )
        return r.topk_ids, r.topk_weights, r.expert_counts, bal + zl, ids2, w2

    return fn, (logits, gid, bias)


def case_moe_dispatch(backend, gen):
    x = _leaf(T, D, gen=gen)
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :K]
    w = torch.rand(T, K, generator=gen).requires_grad_(True)

    def fn(x, ids, w):
        plan = ops.moe_plan(ids, E, backend=backend)
        xs = ops.moe_permute(x, plan, backend=backend)
        return ops.moe_combine(torch.tanh(xs), w, plan, backend=backend), plan.offsets

    return fn, (x, ids, w)


def case_moe_mlp(backend, gen):
    x = _leaf(T, D, gen=gen)
    wu = _leaf(E, 2 * F, D, scale=D**-0.5, gen=gen)
    wd = _leaf(E, D, F, scale=F**-0.5, gen=gen)
    su = _leaf(2, F, D, scale=D**-0.5, gen=gen)
    sd = _leaf(2, D, F, scale=F**-0.5, gen=gen)
    ids = torch.rand(T, E, generator=gen).argsort(1)[:, :K]
    w = torch.rand(T, K, generator=gen).requires_grad_(True)
    gid = torch.randint(0, 2, (T,), generator=gen)

    def fn(x, wu, wd, su, sd, ids, w, gid):
        y = ops.moe_mlp(x, wu, wd, ids, w, backend=backend)
        s = ops.moe_shared_experts(
            x, su, sd, group_ids=gid, activation="gelu_tanh", backend=backend
        )
        return y + s

    return fn, (x, wu, wd, su, sd, ids, w, gid)


def case_mask_sampling(backend, gen):
    ids = torch.randint(0, 30, (3, 20), generator=gen)
    gamma = torch.rand(3, generator=gen)
    logits = torch.randn(3, 20, 30, generator=gen)
    uncond = torch.randn(3, 20, 30, generator=gen)

    def fn(ids, gamma, logits, uncond):
        masked, mask = ops.mask_tokens(ids, gamma, 30, seed=3, offset=2, backend=backend)
        bern, _ = ops.mask_tokens(ids, gamma, 30, seed=3, mode="bernoulli", backend=backend)
        n = mask.sum(1) // 2
        out = ops.maskgit_step(
            logits,
            masked,
            30,
            n,
            uncond_logits=uncond,
            guidance=1.5,
            seed=5,
            return_confidence=True,
            backend=backend,
        )
        return masked, mask, bern, *out

    return fn, (ids, gamma, logits, uncond)


def case_d3diff(backend, gen):
    N, Kc, Dh = 20, 12, 16
    logits = _leaf(N, Kc, gen=gen)
    h = _leaf(N, Dh, gen=gen)
    W = _leaf(Kc, Dh, scale=Dh**-0.5, gen=gen)
    b = _leaf(Kc, scale=0.1, gen=gen)
    t = torch.randint(0, Kc, (N,), generator=gen)
    t[3] = -100
    ratio, wce, wse = (torch.rand(N, generator=gen) for _ in range(3))

    def fn(logits, h, W, b, t, ratio, wce, wse):
        sv = ops.schedule(ratio * 0.9 + 0.05, "cosine")
        a = ops.d3diff_loss(logits, t, sv.ratio.float(), wce, wse, backend=backend)
        per_row = ops.d3diff_linear_loss(
            h, W, t, ratio, wce, wse, bias=b, reduction="none", chunk_size=8, backend=backend
        )
        ce = ops.fused_linear_cross_entropy(h, W, t, wse, backend=backend)
        return a + per_row.sum() + ce, per_row

    return fn, (logits, h, W, b, t, ratio, wce, wse)


def case_attention(backend, gen):
    B, L, H, Dh = 2, 12, 2, 16
    q, k, v = (_leaf(B, L, H, Dh, gen=gen) for _ in range(3))
    is_img = torch.zeros(B, L, dtype=torch.bool)
    is_img[:, 3:9] = True
    cos, sin = torch.randn(2, B, L, Dh // 2, generator=gen).unbind()
    key_valid = torch.ones(B, L, dtype=torch.bool)
    key_valid[1, -2:] = False

    def fn(q, k, v, is_img, cos, sin, key_valid):
        limit = ops.omni_limit(is_img)
        a = ops.omni_attention(q, k, v, limit, span=(3, 9), rotary=(cos, sin), backend=backend)
        b = ops.omni_attention(q, k, v, limit, backend=backend)  # "auto" span: read, or not
        c = ops.omni_attention(q, k, v, limit, key_valid, span=None, backend=backend)
        return a, b, c

    return fn, (q, k, v, is_img, cos, sin, key_valid)


CASES = {n[5:]: f for n, f in dict(globals()).items() if n.startswith("case_")}


def _run(fn, args):
    """Outputs, and the gradients of a fixed random projection of the floating outputs."""
    leaves = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(7)
    loss = sum(
        (o.float() * torch.randn(o.shape, generator=gen)).sum()
        for o in outs
        if o.is_floating_point() and o.requires_grad
    )
    grads = []
    if torch.is_tensor(loss):
        loss.backward()
        grads = [a.grad for a in leaves if a.requires_grad]
    return [o.detach() for o in outs], grads


# Inductor's first compile of these two cases takes 25-55 s on a loaded 2-core machine
SLOW = {("attention", "torch"), ("moe_route", "torch")}


@pytest.mark.parametrize(
    "case,backend",
    [
        pytest.param(c, b, marks=[pytest.mark.slow] if (c, b) in SLOW else [], id=f"{c}-{b}")
        for c in sorted(CASES)
        for b in BACKENDS
    ],
)
def test_op_compiles_fullgraph_and_matches_eager(case, backend):
    torch._dynamo.reset()
    fn, args = CASES[case](backend, torch.Generator().manual_seed(0))
    unif2ace.set_checks(False)  # value checks read data: see test_checks_on_graph_breaks
    try:
        want, want_grads = _run(fn, args)
        got, got_grads = _run(torch.compile(fn, fullgraph=True), args)
    finally:
        unif2ace.set_checks(True)
    assert (
        len(got) == len(want) and len(got_grads) == len(want_grads) > 0 or case == "mask_sampling"
    )
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, (case, i)
        if a.is_floating_point():
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)) and torch.equal(a[~fin], b[~fin]), (case, i)
            assert rel_err(a[fin], b[fin]) < 1e-5, (case, i, rel_err(a[fin], b[fin]))
        else:
            assert torch.equal(a, b), (case, i)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        assert rel_err(a, b) < 1e-5, (case, "grad", i, rel_err(a, b))


def test_sample_times_compiles():
    torch._dynamo.reset()
    fn = lambda: ops.sample_times(6, mode="antithetic")  # noqa: E731
    with torch._inductor.config.patch(fallback_random=True):  # eager's random stream
        torch.manual_seed(3)
        got = torch.compile(fn, fullgraph=True)()
    torch.manual_seed(3)
    assert torch.equal(got, fn())


def _break_reasons(explained):
    return [
        str(r.reason).splitlines()[0] + f" ({r.user_stack[-1].name if r.user_stack else '?'})"
        for r in explained.break_reasons
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_graph_break_with_checks_off(case, backend):
    """torch._dynamo.explain, which (unlike fullgraph=True) also reports what dynamo would split
    off rather than fail on, e.g. an op with a data-dependent output size."""
    torch._dynamo.reset()
    fn, args = CASES[case](backend, torch.Generator().manual_seed(0))
    unif2ace.set_checks(False)
    try:
        explained = torch._dynamo.explain(fn)(*args)
    finally:
        unif2ace.set_checks(True)
    assert explained.graph_break_count == 0, _break_reasons(explained)


@pytest.mark.parametrize("case", sorted(CASES))
def test_checks_on_graph_breaks(case):
    """With the value checks on, one graph per case ("auto" on CPU, else "torch"), except for
    omni_limit's check (the attention case)."""
    torch._dynamo.reset()
    fn, args = CASES[case](BACKENDS[-1], torch.Generator().manual_seed(0))
    explained = torch._dynamo.explain(fn)(*args)
    reasons = _break_reasons(explained)
    if case == "attention":
        assert reasons and all("omni_limit" in r for r in reasons), reasons
    else:
        assert explained.graph_break_count == 0, reasons


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda z: ops.moe_route(z, 1, group_ids=torch.tensor([0, 2]), experts_per_group=2),
            "moe_route: group_ids has 1 entries outside",
        ),
        (lambda z: ops.moe_plan(torch.tensor([[0], [5]]), 4), "moe_plan: topk_ids has 1 entries"),
        (lambda z: ops.schedule(z[0] + 1.5), "schedule: t must be finite and in"),
        (
            lambda z: checked(z[0] > -1, "count", "loss", "mask", upper=3) * 1,
            "loss: mask has 4 nonzero entries, expected 3",
        ),
        (
            lambda z: ops.mask_tokens(torch.zeros(2, 3, dtype=torch.long), z[:, 0] + 2, 9, seed=1),
            "mask_tokens: gamma must be finite and in",
        ),
    ],
)
def test_checks_on_raise_from_compiled_code(call, match):
    torch._dynamo.reset()
    with pytest.raises(ValueError, match=match):
        torch.compile(call, fullgraph=True, backend="aot_eager")(torch.zeros(2, 4))


def test_value_check_op():
    t = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    args = ("unit_interval", "op", "t", 0, None, False)
    torch.library.opcheck(torch.ops.unif2ace.value_check.default, (t, *args))
    ids = torch.tensor([0, 3, -100])
    torch.library.opcheck(
        torch.ops.unif2ace.value_check.default, (ids, "index_range", "op", "ids", 4, -100, False)
    )
