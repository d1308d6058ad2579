"""Grouped MoE dispatch: unif2ace's ops against plain-PyTorch MoE, forward + backward, speed and memory.

UniF²ace's token MoE layer: G = 2 task groups, each 1 shared + E_g = 8
routed SiLU-GLU experts, top-k = 4 within the token's group, tokens split evenly at random
between groups, plus the per-group balance loss. Cases:

* ``dispatch``  route + plan + permute + combine with nothing between permute and combine (the
                expert step is the identity: any stand-in, e.g. a per-row scale, adds the same
                elementwise cost to both sides and only dilutes the ratio), forward + backward to
                x and the router logits (through the weights and the balance-loss sums).
                Routing weights not renormalised (Qwen2-MoE's default): with renormalisation
                y = x·Σw = x and the logits' gradient through the weights is 0 up to rounding, so
                the baseline comparison would only compare rounding noise.
                Baseline ``torch-eager``: masked softmax / topk / renormalise / bincount + sum /
                argsort / gather / index_add, autograd. ``cpu``: moe_route, moe_plan, moe_permute,
                moe_combine (C++).
* ``layer``     the whole layer, forward + backward to x, the router and every expert weight.
                Baseline ``hf-loop``: the Hugging Face Mixtral / Qwen2-MoE block applied per task
                group (masked tokens, softmax top-k, a loop over experts with where / index /
                index_add, the shared expert as a dense MLP). ``grouped_mm``: eager routing +
                argsort + ``F.grouped_mm`` (transformers' "grouped_mm" experts; shared experts as a
                k = 1 grouped_mm). ``cpu``: moe_route + moe_mlp + moe_shared_experts (C++
                dispatch, per-expert torch GEMMs). ``cpu+grouped_mm``: the same with
                UNIF2ACE_MOE_GEMM=grouped_mm (the GEMM choice, measured).

Every provider computes the same loss: Σ y·g (a fixed contiguous upstream gradient g: the
grouped_mm CPU backward fails on an expanded one) + the balance loss.
FLOPs model (``layer``): 3 × 2·T·(k + 1)·D·(2F + F + ...)= 18·T·(k+1)·D·F (up 2F×D and down D×F
per routed/shared slot, forward + 2× in backward), against a measured fp32 matmul.

Run (the same cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only -k moe``)::

    python benchmarks/bench_moe.py --threads 2           # CPU, T=8192, D=512, F=1024
    python benchmarks/bench_moe.py --quick --out /tmp/b  # seconds
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*` (appended)
from benchmarks.harness import Bench, Case, CaseSpec, Provider, Sizes, Target, skip_reason  # noqa: E402
from unif2ace.ops import (  # noqa: E402
    moe_balance_loss,
    moe_combine,
    moe_mlp,
    moe_mlp_grouped_mm,
    moe_permute,
    moe_plan,
    moe_route,
    moe_shared_experts,
)

KERNEL = "moe.route"
SIZES = Sizes(
    full={"t": 8192, "d": 512, "f": 1024, "groups": 2, "experts": 8, "k": 4},
    quick={"t": 512, "d": 64, "f": 128, "groups": 2, "experts": 8, "k": 4},
    columns=("T", "D", "F", "G", "E_g", "k", "dtype"),
)
BALANCE_COEF = 0.01
TOL = 1e-4


class Inputs:
    def __init__(self, s, device, seed=0):
        gen = torch.Generator().manual_seed(seed)
        T, D, Fh, G, Eg, k = s["t"], s["d"], s["f"], s["groups"], s["experts"], s["k"]
        self.T, self.D, self.F, self.G, self.Eg, self.k, self.E = T, D, Fh, G, Eg, k, G * Eg
        r = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=gen)).to(device)
        self.gid = torch.randint(0, G, (T,), generator=gen).to(device)
        self.x = r(T, D).requires_grad_()
        self.router = r(self.E, D, scale=D**-0.5).requires_grad_()
        self.w_up = r(self.E, 2 * Fh, D, scale=D**-0.5).requires_grad_()
        self.w_down = r(self.E, D, Fh, scale=Fh**-0.5).requires_grad_()
        self.s_up = r(G, 2 * Fh, D, scale=D**-0.5).requires_grad_()
        self.s_down = r(G, D, Fh, scale=Fh**-0.5).requires_grad_()
        self.gy = r(T, D)  # contiguous upstream gradient
        self.logits = r(T, self.E).requires_grad_()  # dispatch case: logits are the leaf
        self.group_mask = torch.arange(self.E, device=device)[None, :] // Eg == self.gid[:, None]

    def leaves(self):
        return [self.x, self.router, self.w_up, self.w_down, self.s_up, self.s_down, self.logits]

    def reset(self):
        for t in self.leaves():
            t.grad = None


def eager_route(z, inp, renormalize=True):
    """Masked softmax over the token's group, topk, (renormalise); counts and probability sums."""
    p = torch.softmax(z.float().masked_fill(~inp.group_mask, float("-inf")), dim=-1)  # [T, E]
    v, ids = torch.topk(p, inp.k, dim=-1)
    w = v / v.sum(-1, keepdim=True) if renormalize else v
    counts = torch.bincount(ids.reshape(-1), minlength=inp.E)
    return ids, w, counts, p.sum(0)


def balance(counts, prob_sums, inp):
    return moe_balance_loss(counts, prob_sums, inp.k, experts_per_group=inp.Eg, coef=BALANCE_COEF)


def finish(y, aux, inp):
    loss = (y * inp.gy).sum() + aux
    loss.backward()
    return y


# ---- dispatch -----------------------------------------------------------------------------------


def dispatch_eager(inp):
    ids, w, counts, ps = eager_route(inp.logits, inp, renormalize=False)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // inp.k
    xs = inp.x[tok]
    y = torch.zeros_like(inp.x).index_add(0, tok, xs * w.reshape(-1)[order, None])
    return finish(y, balance(counts, ps, inp), inp)


def dispatch_ops(inp, backend):
    r = moe_route(
        inp.logits,
        inp.k,
        group_ids=inp.gid,
        experts_per_group=inp.Eg,
        renormalize=False,
        return_stats=True,
        backend=backend,
    )
    plan = moe_plan(r.topk_ids, inp.E, backend=backend)
    xs = moe_permute(inp.x, plan, backend=backend)
    y = moe_combine(xs, r.topk_weights, plan, backend=backend)
    return finish(y, balance(r.expert_counts, r.prob_sums, inp), inp)


# ---- layer --------------------------------------------------------------------------------------


def _mlp(x, up, down):
    gate, u = F.linear(x, up).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * u, down)


def layer_hf_loop(inp):
    """Per task group: the transformers Mixtral / Qwen2-MoE block (eager experts loop)."""
    x = inp.x
    logits = x @ inp.router.T
    y = torch.zeros_like(x)
    counts_all, ps_all = [], []
    for g in range(inp.G):
        tok_g = torch.where(inp.gid == g)[0]
        xg = x[tok_g]
        lo = g * inp.Eg
        p = torch.softmax(logits[tok_g, lo : lo + inp.Eg].float(), dim=-1)
        v, ids = torch.topk(p, inp.k, dim=-1)
        w = v / v.sum(-1, keepdim=True)
        counts_all.append(torch.bincount(ids.reshape(-1), minlength=inp.Eg))
        ps_all.append(p.sum(0))
        yg = _mlp(xg, inp.s_up[g], inp.s_down[g])  # shared expert
        mask = F.one_hot(ids, inp.Eg).permute(2, 1, 0)  # [E_g, k, T_g]
        for e in range(inp.Eg):
            j, t = torch.where(mask[e])
            if t.numel() == 0:
                continue
            o = _mlp(xg[t], inp.w_up[lo + e], inp.w_down[lo + e]) * w[t, j, None]
            yg = yg.index_add(0, t, o)
        y = y.index_add(0, tok_g, yg)
    aux = balance(torch.cat(counts_all), torch.cat(ps_all), inp)
    return finish(y, aux, inp)


def layer_grouped_mm(inp):
    logits = inp.x @ inp.router.T
    ids, w, counts, ps = eager_route(logits, inp)
    y = moe_mlp_grouped_mm(inp.x, inp.w_up, inp.w_down, ids, w)
    y = y + moe_mlp_grouped_mm(inp.x, inp.s_up, inp.s_down, inp.gid[:, None])
    return finish(y, balance(counts, ps, inp), inp)


def layer_ops(inp, backend, gemm=None):
    old = os.environ.get("UNIF2ACE_MOE_GEMM")
    if gemm:
        os.environ["UNIF2ACE_MOE_GEMM"] = gemm
    try:
        r = moe_route(
            inp.x @ inp.router.T,
            inp.k,
            group_ids=inp.gid,
            experts_per_group=inp.Eg,
            return_stats=True,
            backend=backend,
        )
        y = moe_mlp(inp.x, inp.w_up, inp.w_down, r.topk_ids, r.topk_weights, backend=backend)
        y = y + moe_shared_experts(inp.x, inp.s_up, inp.s_down, group_ids=inp.gid, backend=backend)
        return finish(y, balance(r.expert_counts, r.prob_sums, inp), inp)
    finally:
        if gemm:
            if old is None:
                os.environ.pop("UNIF2ACE_MOE_GEMM", None)
            else:
                os.environ["UNIF2ACE_MOE_GEMM"] = old


def _params(inp, device):
    return {
        "T": inp.T,
        "D": inp.D,
        "F": inp.F,
        "G": inp.G,
        "E_g": inp.Eg,
        "k": inp.k,
        "dtype": "fp32",
        "device": device.type,
    }


def dispatch_case(inp, device, backends):
    providers = [Provider("torch-eager", lambda: dispatch_eager(inp), inp.reset)]
    for b in backends:
        providers.append(
            Provider(b, lambda b=b: dispatch_ops(inp, b), inp.reset, skip_reason(b, device, KERNEL))
        )
    return Case(
        name="dispatch",
        params=_params(inp, device),
        providers=providers,
        baseline="torch-eager",
        outputs=lambda: [inp.x.grad, inp.logits.grad],
        tol=TOL,
        notes="route + plan + permute + combine, fwd + bwd (no expert GEMMs)",
    )


def layer_case(inp, device, backends):
    providers = [
        Provider("hf-loop", lambda: layer_hf_loop(inp), inp.reset),
        Provider("grouped_mm", lambda: layer_grouped_mm(inp), inp.reset),
    ]
    for b in backends:
        providers.append(
            Provider(b, lambda b=b: layer_ops(inp, b), inp.reset, skip_reason(b, device, KERNEL))
        )
    if device.type == "cpu" and "cpu" in backends:
        providers.append(
            Provider(
                "cpu+grouped_mm",
                lambda: layer_ops(inp, "cpu", "grouped_mm"),
                inp.reset,
                skip_reason("cpu", device, KERNEL),
            )
        )
    flops = 18.0 * inp.T * (inp.k + 1) * inp.D * inp.F
    return Case(
        name="layer",
        params=_params(inp, device),
        providers=providers,
        baseline="hf-loop",
        flops=flops,
        flops_dtype=torch.float32,
        outputs=lambda: [
            inp.x.grad,
            inp.router.grad,
            inp.w_up.grad,
            inp.w_down.grad,
            inp.s_up.grad,
            inp.s_down.grad,
        ],
        tol=TOL,
        notes="flops = 18·T·(k+1)·D·F (up 2F·D + down F·D per slot, fwd + 2× bwd)",
        after=grouped_mm_ratios,
    )


def grouped_mm_ratios(rows, report) -> None:
    """``speedup_vs_grouped_mm``: the F.grouped_mm peer's median over each engine provider's (a
    second baseline for the layer)."""
    ok = {r["provider"]: r for r in rows if r.get("status") == "ok"}
    if "grouped_mm" not in ok:
        return
    for name, r in ok.items():
        if name not in ("hf-loop", "grouped_mm"):
            r["speedup_vs_grouped_mm"] = ok["grouped_mm"]["median_ms"] / r["median_ms"]


def targets_for(args) -> list[Target]:
    b = "cpu" if args.device.type == "cpu" else "triton"
    vs_mm = f"{b} layer no slower than the F.grouped_mm version"
    return [
        Target("dispatch", b, "speedup", ">=", 3.0, f"{b} route+plan+permute+combine ≥ 3× eager"),
        Target("layer", b, "speedup", ">=", 1.2, f"{b} layer ≥ 1.2× the HF-style loop"),
        Target("layer", b, "speedup_vs_grouped_mm", ">=", 1.0, vs_mm),
    ]


def case_specs(args) -> list[CaseSpec]:
    device, backends = args.device, args.backends
    inputs: list[Inputs] = []  # one input set shared by the cases, built by the first that runs

    def build(case_fn):
        if not inputs:
            inputs.append(Inputs(args.sizes, device))
        return case_fn(inputs[0], device, backends)

    cpu_gemm = ["cpu+grouped_mm"] if device.type == "cpu" else []
    declared = {
        "dispatch": (("torch-eager", *backends), dispatch_case),
        "layer": (("hf-loop", "grouped_mm", *backends, *cpu_gemm), layer_case),
    }
    return [
        CaseSpec(name, declared[name][0], lambda fn=declared[name][1]: build(fn))
        for name in args.cases
    ]


BENCH = Bench(
    "moe",
    __doc__,
    SIZES,
    case_specs,
    cases="dispatch,layer",
    reps=(10, 10),
    meta=lambda args: {"moe_gemm": os.environ.get("UNIF2ACE_MOE_GEMM", "default")},
    notes=lambda args: [
        "Same inputs, interleaved repetitions, medians; speedup against the case's baseline "
        "(dispatch: torch-eager; layer: hf-loop); speedup_vs_grouped_mm in the JSON rows.",
        "Every provider computes Σ y·g + balance loss and its full backward; fp32.",
    ],
    ceilings=lambda args: [torch.float32],
    targets=targets_for,
)
main = BENCH.main

if __name__ == "__main__":
    raise SystemExit(main())
