"""The typed native boundary: tensors cross into ``unif2ace._C`` / ``unif2ace._C_cuda`` as
descriptors, and each binding re-checks what its kernel relies on.

Two operands passed in each other's place, a wrong dtype, a wrong rank, mismatched sizes or a row
that is not dense must raise a ValueError naming the argument, never reach a kernel. The CUDA
module's checks run before any CUDA call, so they are tested here on CPU tensors, without a GPU.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from unif2ace import _backend
from unif2ace.ops._native import DTYPE_CODES, desc


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


CPU = _backend.cpu_ext()
CUDA_MOD = _module("unif2ace._C_cuda")  # importing needs no GPU; only the checks run here

needs_cpu = pytest.mark.skipif(CPU is None, reason="the C++ CPU module is not built")
MODULES = [
    pytest.param("cpu", marks=needs_cpu),
    pytest.param("cuda", marks=pytest.mark.skipif(CUDA_MOD is None, reason="_C_cuda is not built")),
]


def _ext(which: str):
    return CPU if which == "cpu" else CUDA_MOD


def assert_rejects(op: str, operands: dict, change, call, match: str) -> None:
    """``call(operands)`` after ``change(operands)`` raises the binding's ValueError, which names
    the kernel ``op`` and says ``match``."""
    change(operands)
    with pytest.raises(ValueError, match=f"{op}: {match}"):
        call(operands)


def _extra(which: str) -> tuple:
    """The CUDA launchers' trailing workspace and stream (never reached: the checks fail first)."""
    return () if which == "cpu" else (None, 0)


# ---- the descriptor ------------------------------------------------------------------------------


def test_desc_layout():
    t = torch.zeros(3, 5, dtype=torch.bfloat16)[:, 1:4]
    ptr, code, sizes, strides = desc(t)
    assert ptr == t.data_ptr() and code == DTYPE_CODES[torch.bfloat16] == 1
    assert tuple(sizes) == (3, 3) and tuple(strides) == (5, 1)
    assert desc(None) is None
    assert desc(torch.zeros(2, dtype=torch.float64))[1] == -1  # unknown to the kernels


# ---- D3Diff loss -----------------------------------------------------------------------------------


def _d3diff_operands(N=4, K=7, dtype=torch.float32):
    logits = torch.randn(N, K, dtype=dtype)
    return dict(
        logits=logits,
        targets=torch.randint(0, K, (N,)),
        ratio=torch.rand(N),
        w_ce=torch.ones(N),
        w_se=torch.ones(N),
        loss=torch.empty(N),
        grad=torch.empty(N, K, dtype=dtype),
        grad_scale=None,
    )


def _d3diff_call(which, o):
    _ext(which).d3diff_loss_fwd(
        desc(o["logits"]), desc(o["targets"]), desc(o["ratio"]), desc(o["w_ce"]), desc(o["w_se"]),
        0.5, -100, desc(o["loss"]), desc(o["grad"]), desc(o["grad_scale"]), *_extra(which),
    )  # fmt: skip


@needs_cpu
def test_d3diff_valid_call_matches_torch():
    """The same call with every operand in place: the loss w_ce·CE + α·w_se·SE and its gradient."""
    o = _d3diff_operands()
    _d3diff_call("cpu", o)
    z = o["logits"].double().requires_grad_(True)
    lse = z.logsumexp(1)
    ce = lse - z.gather(1, o["targets"][:, None]).squeeze(1)
    u = lse - math.log(z.shape[1])
    loss = o["w_ce"] * ce + 0.5 * o["w_se"] * o["ratio"] * (ce + torch.expm1(u) - u)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    torch.testing.assert_close(o["loss"].double(), loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o["grad"].double(), grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("which", MODULES)
@pytest.mark.parametrize(
    "change, match",
    [
        # two operands in each other's place
        (lambda o: o.update(targets=o["ratio"], ratio=o["targets"]), "targets must be int64"),
        (lambda o: o.update(loss=o["grad"], grad=o["loss"]), "loss must have shape"),
        # a wrong dtype
        (lambda o: o.update(logits=o["logits"].double()), "logits must be float32, bfloat16"),
        (lambda o: o.update(grad=o["grad"].half()), "grad must have the dtype of logits"),
        # a wrong rank
        (lambda o: o.update(targets=o["targets"][:, None]), r"targets must have shape \[4\], got"),
        (lambda o: o.update(logits=o["logits"][None]), "logits must have 2 dimensions"),
        # mismatched sizes
        (lambda o: o.update(w_se=torch.ones(5)), r"w_se must have shape \[4\], got \[5\]"),
        (lambda o: o.update(grad=torch.empty(4, 6)), r"grad must have shape \[4, 7\]"),
        # a column stride that is not 1, a strided vector
        (lambda o: o.update(logits=torch.randn(7, 4).t()), "logits must have stride 1 along"),
        (lambda o: o.update(loss=torch.empty(8)[::2]), "loss must be contiguous"),
        # a required operand left out
        (lambda o: o.update(w_ce=None), "w_ce is required"),
    ],
)
def test_d3diff_rejects(which, change, match):
    call = lambda o: _d3diff_call(which, o)
    assert_rejects("d3diff_loss_fwd", _d3diff_operands(), change, call, match)


# ---- MoE ---------------------------------------------------------------------------------------


def _plan_operands(T=6, k=2, E=4, block_m=4):
    n = T * k
    nt = n // block_m + E
    i32 = dict(dtype=torch.int32)
    return dict(
        ids=torch.randint(0, E, (T, k)),
        counts=torch.empty(E, **i32),
        offsets=torch.empty(E + 1, **i32),
        sorted_slot=torch.empty(n, **i32),
        slot_pos=torch.empty(n, **i32),
        tile_expert=torch.empty(nt, **i32),
        tile_row=torch.empty(nt, **i32),
    )


def _plan_call(which, o, block_m=4):
    _ext(which).moe_plan(
        desc(o["ids"]), block_m, desc(o["counts"]), desc(o["offsets"]), desc(o["sorted_slot"]),
        desc(o["slot_pos"]), desc(o["tile_expert"]), desc(o["tile_row"]), *_extra(which),
    )  # fmt: skip


@needs_cpu
def test_moe_plan_valid_call():
    o = _plan_operands()
    _plan_call("cpu", o)
    flat = o["ids"].reshape(-1)
    assert o["counts"].tolist() == torch.bincount(flat, minlength=4).tolist()
    assert o["sorted_slot"].tolist() == torch.argsort(flat, stable=True).tolist()


@pytest.mark.parametrize("which", MODULES)
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda o: o.update(counts=o["offsets"], offsets=o["counts"]), r"offsets must have shape"),
        (lambda o: o.update(sorted_slot=o["slot_pos"][:-1]), "sorted_slot must have shape"),
        (lambda o: o.update(ids=o["ids"].float()), "ids must be int32 or int64, got float32"),
        (lambda o: o.update(counts=o["counts"].long()), "counts must be int32, got int64"),
        (lambda o: o.update(ids=o["ids"].t()), "ids must be contiguous"),
        (lambda o: o.update(tile_row=None), "tile_expert and tile_row must both be given"),
    ],
)
def test_moe_plan_rejects(which, change, match):
    assert_rejects("moe_plan", _plan_operands(), change, lambda o: _plan_call(which, o), match)


def _route_call(which, logits, ids, weights, counts, prob_sums, top_k=2):
    T, E = logits.shape
    _ext(which).moe_route_fwd(
        desc(logits), desc(torch.tensor([0, E])), None, None, top_k, 0, True, 0, 0, 1.0,
        desc(ids), desc(weights), desc(counts), desc(prob_sums), *_extra(which),
    )  # fmt: skip


@pytest.mark.parametrize("which", MODULES)
def test_moe_route_rejects_swapped_outputs(which):
    T, E, k = 5, 6, 2
    logits = torch.randn(T, E)
    ids, weights = torch.empty(T, k, dtype=torch.int64), torch.empty(T, k)
    counts, prob_sums = torch.empty(E, dtype=torch.int32), torch.empty(E)
    with pytest.raises(ValueError, match="moe_route_fwd: ids must be int64, got float32"):
        _route_call(which, logits, weights, ids, counts, prob_sums)
    with pytest.raises(ValueError, match="moe_route_fwd: counts must be int32, got float32"):
        _route_call(which, logits, ids, weights, prob_sums, counts)
    with pytest.raises(ValueError, match=r"moe_route_fwd: ids must have shape \[5, 3\]"):
        _route_call(which, logits, ids, weights, counts, prob_sums, top_k=3)


@pytest.mark.parametrize("which", MODULES)
def test_moe_combine_rejects(which):
    T, k, D = 3, 2, 5
    src, out = torch.randn(T * k, D), torch.empty(T, D)
    slot_pos = torch.arange(T * k, dtype=torch.int32)
    ext = _ext(which)
    extra = () if which == "cpu" else (0,)
    with pytest.raises(ValueError, match="moe_combine: src must be float32, bfloat16 or float16"):
        ext.moe_combine(desc(slot_pos), desc(src), None, desc(out), *extra)  # swapped
    with pytest.raises(ValueError, match=r"moe_combine: out must have shape \[3, 5\]"):
        ext.moe_combine(desc(src), desc(slot_pos), None, desc(torch.empty(T, D + 1)), *extra)
    with pytest.raises(ValueError, match="moe_combine: out must have the dtype of src"):
        ext.moe_combine(desc(src), desc(slot_pos), None, desc(out.half()), *extra)
    with pytest.raises(ValueError, match="moe_combine: slot_pos must hold T·k slots"):
        ext.moe_combine(desc(src), desc(slot_pos[:-1]), None, desc(out), *extra)


@needs_cpu
def test_moe_activation_rejects():
    h, a = torch.randn(4, 6), torch.empty(4, 3)
    with pytest.raises(ValueError, match=r"moe_silu_glu_fwd: h must have shape \[4, 6\]"):
        CPU.moe_silu_glu_fwd(desc(h[:, :4]), desc(a))
    with pytest.raises(ValueError, match="moe_silu_glu_fwd: a must be contiguous"):
        CPU.moe_silu_glu_fwd(desc(h), desc(torch.empty(4, 6)[:, :3]))
    with pytest.raises(ValueError, match="moe_gelu_bwd: a is required"):
        CPU.moe_gelu_bwd(desc(h), desc(torch.randn(4, 6)), True, desc(torch.empty(4, 6)), None)


# ---- omni-attention ----------------------------------------------------------------------------


def _attention_operands(B=2, L=5, H=2, Dh=16):
    q, k, v = (torch.randn(B, L, H, Dh) for _ in range(3))
    return dict(
        q=q,
        k=k,
        v=v,
        limit=torch.full((B, L), L, dtype=torch.int32),
        key_valid=torch.ones(B, L, dtype=torch.uint8),
        cos=None,
        sin=None,
        out=torch.empty(B, L, H, Dh),
        lse=torch.empty(B, H, L),
    )


def _attention_call(o):
    CPU.omni_attention_fwd(
        desc(o["q"]), desc(o["k"]), desc(o["v"]), desc(o["limit"]), desc(o["key_valid"]),
        desc(o["cos"]), desc(o["sin"]), 0.25, desc(o["out"]), desc(o["lse"]),
    )  # fmt: skip


@needs_cpu
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda o: o.update(q=o["limit"], limit=o["q"]), "q must be float32, got int32"),
        (lambda o: o.update(out=o["lse"], lse=o["out"]), "out must have shape"),
        (lambda o: o.update(k=o["k"][:, :4]), "k must have the shape of q"),
        (lambda o: o.update(v=o["v"].transpose(2, 3)), "v must have the shape of q"),
        (
            lambda o: o.update(q=o["q"].transpose(1, 3).contiguous().transpose(1, 3)),
            "q must have stride 1 along its last dimension",
        ),
        (lambda o: o.update(limit=o["limit"].long()), "limit must be int32, got int64"),
        (lambda o: o.update(cos=torch.ones(2, 5, 4)), "rope_cos and rope_sin must both be given"),
    ],
)
def test_omni_attention_rejects(change, match):
    assert_rejects("omni_attention_fwd", _attention_operands(), change, _attention_call, match)


# ---- mask sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize("which", MODULES)
def test_mask_tokens_rejects(which):
    B, L = 3, 8
    ids = torch.randint(0, 10, (B, L))
    gamma, n_mask = torch.rand(B), torch.full((B,), 2, dtype=torch.int64)
    out_ids, out_mask = torch.empty(B, L, dtype=torch.int64), torch.empty(B, L, dtype=torch.bool)
    ext, extra = _ext(which), () if which == "cpu" else (0,)

    def call(*args):
        ext.mask_tokens_fwd(*(desc(a) if isinstance(a, torch.Tensor) else a for a in args), *extra)

    with pytest.raises(ValueError, match="mask_tokens_fwd: gamma must be float32, got int64"):
        call(ids, n_mask, gamma, 99, 1, 0, 0, out_ids, out_mask)  # gamma and n_mask swapped
    with pytest.raises(ValueError, match="mask_tokens_fwd: out_ids must be int64, got bool"):
        call(ids, gamma, n_mask, 99, 1, 0, 0, out_mask, out_ids)  # outputs swapped
    with pytest.raises(ValueError, match="mask_tokens_fwd: n_mask is required"):
        call(ids, gamma, None, 99, 1, 0, 0, out_ids, out_mask)  # mode 0 reads n_mask


@pytest.mark.parametrize("which", MODULES)
def test_maskgit_step_rejects(which):
    B, L, K = 2, 4, 9
    logits = torch.randn(B, L, K)
    ids = torch.full((B, L), 99, dtype=torch.int64)
    mask_len = torch.ones(B, dtype=torch.int64)
    out_ids, out_mask = torch.empty(B, L, dtype=torch.int64), torch.empty(B, L, dtype=torch.bool)
    confidence = torch.empty(B, L)
    ext, extra = _ext(which), _extra(which)

    def call(logits=logits, uncond=None, gumbel=None, confidence=confidence, mask_len=mask_len):
        ext.maskgit_step_fwd(
            desc(logits), desc(uncond), desc(ids), desc(mask_len), 99, 0.0, 1.0, 0.0, 1, 0,
            desc(gumbel), None, desc(out_ids), desc(out_mask), desc(confidence), *extra,
        )  # fmt: skip

    with pytest.raises(ValueError, match=r"maskgit_step_fwd: gumbel must have shape \[2, 4, 9\]"):
        call(gumbel=torch.rand(B, L, K - 1))
    with pytest.raises(ValueError, match="maskgit_step_fwd: uncond must have the dtype of logits"):
        call(uncond=logits.half())
    with pytest.raises(ValueError, match="maskgit_step_fwd: mask_len must be int64, got float32"):
        call(mask_len=confidence[:, 0].contiguous())
    with pytest.raises(ValueError, match="maskgit_step_fwd: logits must have stride 1 along"):
        call(logits=torch.randn(B, K, L).transpose(1, 2))
    with pytest.raises(ValueError, match="maskgit_step_fwd: logits must have 3 dimensions"):
        call(logits=torch.randn(1, B, L, K, 1))


@needs_cpu
def test_philox_gumbel_rejects_a_strided_output():
    with pytest.raises(ValueError, match="philox_gumbel: out must be contiguous"):
        CPU.philox_gumbel(1, 0, desc(torch.empty(16)[::2]))
