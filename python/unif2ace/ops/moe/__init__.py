"""Grouped MoE dispatch: routing, permutation plan, permute / combine, expert MLP, balance loss.

UniF²ace's token-level MoE: G task groups, each with its own routed experts (global expert id =
group offset + local id) plus shared experts; token t is routed top-k among the experts of group
``group_ids[t]``. The ops are model-agnostic: plain Mixtral / Qwen-MoE softmax top-k and
DeepSeek-V3 group-limited sigmoid routing are special cases (:mod:`unif2ace.ops.moe.hf` is the
Hugging Face drop-in).

Pipeline (every arrow a public op, each with ``backend=``)::

    router_logits [T, E] --moe_route--> topk_ids [T, k], topk_weights [T, k] (+ counts, prob sums)
    topk_ids --moe_plan--> MoEPlan (expert-sorted order, offsets, tile map)
    x [T, D] --moe_permute--> xs [N = T·k, D] (rows grouped by expert)
    experts: per-expert up projection, activation, down projection  -> out [N, D]
    out --moe_combine(weights)--> y [T, D] = Σ_j w[t, j] · out[slot_pos[t, j]]
    moe_mlp = plan + permute + experts + combine in one custom op with its own backward.

Layers, one per module: this module (the public functions and their input checks) →
``_custom_ops`` (torch.library ops, fakes, autograd) → one launcher module per backend
(``_torch``: the executable spec, whose docstring is the LAUNCHER CONTRACT; ``_cpu``, ``_triton``,
``_cuda``; ``_composed``: expert GEMMs shared by several) → ``reference`` (plain PyTorch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from unif2ace import _backend
from unif2ace.ops._validate import check_device, check_dtype, checked
from unif2ace.ops.moe._custom_ops import (
    BLOCK_M,
    combine_op,
    mlp_fwd_op,
    permute_op,
    plan_op,
    route_op,
)
from unif2ace.ops.moe._types import MoEPlan, MoERouting
from unif2ace.ops.moe.reference import group_cols, moe_mlp_grouped_mm, moe_mlp_ref, moe_route_ref

__all__ = [
    "MoEPlan",
    "MoERouting",
    "moe_balance_loss",
    "moe_combine",
    "moe_mlp",
    "moe_mlp_grouped_mm",
    "moe_mlp_ref",
    "moe_permute",
    "moe_plan",
    "moe_route",
    "moe_route_ref",
    "moe_shared_experts",
    "moe_z_loss",
]

SCORINGS = ("softmax", "sigmoid")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu_glu")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _group_sizes(E: int, experts_per_group, op: str) -> list[int]:
    """Group sizes from ``experts_per_group`` (None: one group of E; int: equal groups; sequence:
    one size per group). The sizes must add up to E (the router's columns)."""
    if experts_per_group is None:
        return [E]
    if isinstance(experts_per_group, int) and not isinstance(experts_per_group, bool):
        if experts_per_group < 1 or E % experts_per_group:
            raise ValueError(
                f"{op}: experts_per_group={experts_per_group} must be >= 1 and divide the "
                f"E = {E} experts"
            )
        return [experts_per_group] * (E // experts_per_group)
    sizes = [int(s) for s in experts_per_group]
    if not sizes or min(sizes) < 1 or sum(sizes) != E:
        raise ValueError(
            f"{op}: experts_per_group {sizes} must be positive sizes adding up to E = {E}"
        )
    return sizes


# Small constant tensors built from host values (group offsets, the expert -> group map, the
# per-group loss coefficients), cached per (values, dtype, device): building one is a host ->
# device copy, which would otherwise run on every call of every layer. Nothing is cached while
# tracing (torch.compile, fake tensors): the traced program builds its own constants. Callers never
# write into a cached tensor.
_CONSTS: dict[tuple, torch.Tensor] = {}


def _const(values: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    device = torch.device(device)
    tracing = torch.compiler.is_compiling() or (
        torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    )
    if tracing or (device.type != "cpu" and device.index is None):
        return torch.tensor(values, dtype=dtype, device=device)
    key = (values, dtype, device)
    t = _CONSTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor: autograd may save it later
            t = _CONSTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def _offsets_tensor(sizes: list[int], device) -> torch.Tensor:
    """Group offsets int64 [G+1] (cached: no host -> device copy per call)."""
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return _const(tuple(offs), torch.int64, device)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype where autocast is on for ``device``'s type, else None."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def _check_index_tensor(op, name, t, device, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int32 or int64, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {list(shape)}, got {list(t.shape)}")
    check_device(op, device, **{name: t})


def _route(name, logits, args, nmax) -> MoERouting:
    """moe_route after validation; ``args`` = moe_route_ref's (top_k, offsets, group_ids, scoring,
    renormalize, n_group, topk_group, bias, scaling). The torch backend is the reference
    (differentiable by autograd), given the largest group size ``nmax`` from the host (no read of
    the offsets); the others run the custom op."""
    if name == "torch":
        return moe_route_ref(logits, *args, max_group_size=nmax)
    top_k, offsets, group_ids, scoring, renormalize, ng, tg, bias, scaling = args
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        logits = logits.contiguous()
    w, ps, ids, counts = route_op(
        logits,
        offsets,
        group_ids,
        bias,
        top_k,
        scoring,
        bool(renormalize),
        ng,
        tg,
        float(scaling),
        name,
    )
    return MoERouting(ids, w, counts, ps)


def moe_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int | Sequence[int] | None = None,
    scoring: str = "softmax",
    renormalize: bool = True,
    n_group: int | None = None,
    topk_group: int | None = None,
    correction_bias: torch.Tensor | None = None,
    scaling: float = 1.0,
    return_stats: bool = False,
    backend: str | None = None,
):
    """Top-k routing: per-token task groups, DeepSeek-V3 group limits, softmax or sigmoid scores.

    Parameters
    ----------
    router_logits : Tensor [T, E], float32 / bfloat16 / float16 (float64 on the torch backend)
        Router scores over all E experts (all task groups side by side; column stride 1).
    top_k : int
        Experts per token, ``1 <= k <=`` the size of every group (and ``<= E``).
    group_ids : Tensor [T], int32/int64, optional
        Task group of each token (UniF²ace: 0 understanding, 1 generation). Required when there
        is more than one group; token t is routed among its group's experts only, and the ids
        returned are global (group offset + local id).
    experts_per_group : int or sequence of int, optional
        Group sizes (adding up to E; an int means equal groups). None: one group of E experts.
    scoring : "softmax" | "sigmoid"
        softmax over the token's group (Mixtral, Qwen-MoE) or elementwise sigmoid (DeepSeek-V3).
    renormalize : bool
        Divide the k chosen scores by their sum (Mixtral: True; Qwen2-MoE: ``norm_topk_prob``).
    n_group, topk_group : int, optional
        DeepSeek-V3 group-limited routing inside each group: split its experts into ``n_group``
        equal subgroups, keep the ``topk_group`` subgroups with the largest sum of their two best
        keys, choose the k experts among those.
    correction_bias : Tensor [E], float, optional
        Added to the scores for the *selection only* (DeepSeek-V3 ``e_score_correction_bias``).
    scaling : float
        Multiplies the weights (DeepSeek-V3 ``routed_scaling_factor``).
    return_stats : bool
        Return a :class:`MoERouting` with the per-expert counts and probability sums too.
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    (topk_ids int64 [T, k], topk_weights float32 [T, k]), or :class:`MoERouting`.

    Selection: key = score (+ bias) in float64, the k largest in descending order, **equal keys →
    lower expert index first** on every backend. ``w_j = scaling · s_j / Σ_i s_i`` (renormalize)
    or ``scaling · s_j``. ``prob_sums[e] = Σ_t q_{t,e}`` over tokens of e's group, q the softmax
    probability (sigmoid: the score divided by the sum over the group). Gradients flow from
    topk_weights and prob_sums to router_logits.

    Under autocast routing stays in fp32, as the softmax wants: bf16 / fp16 logits are upcast and
    autocast is off inside. Host reads: none (the group sizes are host values), except where the
    triton / cuda backends fall back to the torch launcher beyond their kernels' limits (E >
    256): it reads the largest group size from the offsets once per call.
    """
    op = "moe_route"
    if not isinstance(router_logits, torch.Tensor) or router_logits.dim() != 2:
        raise ValueError(
            f"{op}: router_logits must be a 2-D tensor [T, E], got {_shape(router_logits)}"
        )
    T, E = router_logits.shape
    dev = router_logits.device
    if scoring not in SCORINGS:
        raise ValueError(f"{op}: scoring must be one of {SCORINGS}, got {scoring!r}")
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"{op}: top_k must be a positive int, got {top_k!r}")
    if top_k > E:
        raise ValueError(f"{op}: top_k = {top_k} exceeds the number of experts E = {E}")
    sizes = _group_sizes(E, experts_per_group, op)
    if len(sizes) > 1 and group_ids is None:
        raise ValueError(f"{op}: group_ids is required with {len(sizes)} expert groups")
    if top_k > min(sizes):
        g = sizes.index(min(sizes))
        raise ValueError(f"{op}: top_k = {top_k} exceeds the {sizes[g]} experts of group {g}")
    ng = int(n_group or 0)
    tg = int(topk_group or 0)
    if ng:
        if any(s % ng for s in sizes):
            raise ValueError(f"{op}: n_group = {ng} must divide every group's size {sizes}")
        if not 1 <= tg <= ng:
            raise ValueError(f"{op}: topk_group must be in [1, n_group = {ng}], got {topk_group!r}")
        if top_k > tg * (min(sizes) // ng):
            raise ValueError(
                f"{op}: top_k = {top_k} exceeds the {tg * (min(sizes) // ng)} experts of the "
                f"topk_group = {tg} subgroups kept"
            )
    elif topk_group:
        raise ValueError(f"{op}: topk_group needs n_group")
    if group_ids is not None:
        _check_index_tensor(op, "group_ids", group_ids, dev, (T,))
        group_ids = group_ids.to(torch.int64).contiguous()
    if correction_bias is not None:
        if not isinstance(correction_bias, torch.Tensor) or tuple(correction_bias.shape) != (E,):
            raise ValueError(
                f"{op}: correction_bias must have shape [{E}], got {_shape(correction_bias)}"
            )
        if not correction_bias.is_floating_point():
            raise TypeError(f"{op}: correction_bias must be floating, got {correction_bias.dtype}")
        check_device(op, dev, correction_bias=correction_bias)
        correction_bias = correction_bias.detach().to(torch.float32).contiguous()
    name = _backend.resolve(backend, dev, op, kernel="moe.route")
    check_dtype(
        op, "router_logits", router_logits, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES
    )
    if _backend.checks_enabled():  # under torch.compile inside a custom op: no graph break
        if group_ids is not None:
            group_ids = checked(group_ids, "index_range", op, "group_ids", upper=len(sizes))
        router_logits = checked(router_logits, "finite", op, "router_logits")
    offsets = _offsets_tensor(sizes, dev)
    args = (top_k, offsets, group_ids, scoring, renormalize, ng, tg, correction_bias, scaling)
    if _autocast_dtype(dev) is None:
        r = _route(name, router_logits, args, max(sizes))
    else:  # routing stays fp32 under autocast (the softmax wants it): upcast, autocast off inside
        if router_logits.dtype in (torch.bfloat16, torch.float16):
            router_logits = router_logits.float()
        with torch.autocast(dev.type, enabled=False):
            r = _route(name, router_logits, args, max(sizes))
    return r if return_stats else (r.topk_ids, r.topk_weights)


def moe_plan(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    block_m: int | None = None,
    backend: str | None = None,
) -> MoEPlan:
    """Expert-sorted order of the T·k routed slots (contract §3): a stable counting sort.

    Parameters
    ----------
    topk_ids : Tensor [T, k], int32/int64, values in [0, num_experts)
    num_experts : int
    block_m : int, optional
        Rows per tile of the tile→expert map (GPU grouped GEMMs). Default: the backend's own
        (0 on CPU: no tile map).
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    :class:`MoEPlan`: counts [E], offsets [E+1], sorted_slot [N], slot_pos [N], tile_expert /
    tile_row [N // block_m + E], all int32 (N = T·k). Within an expert slots keep token order.
    """
    op = "moe_plan"
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        raise ValueError(f"{op}: topk_ids must be a 2-D tensor [T, k], got {_shape(topk_ids)}")
    _check_index_tensor(op, "topk_ids", topk_ids, topk_ids.device)
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{op}: num_experts must be a positive int, got {num_experts!r}")
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"{op}: T·k = {topk_ids.numel()} slots must be < 2^31 (int32 plan)")
    name = _backend.resolve(backend, topk_ids.device, op, kernel="moe.plan")
    bm = BLOCK_M[name] if block_m is None else int(block_m)
    if bm < 0:
        raise ValueError(f"{op}: block_m must be >= 0, got {block_m}")
    ids = topk_ids
    if _backend.checks_enabled():
        ids = checked(topk_ids, "index_range", op, "topk_ids", upper=num_experts)
    out = plan_op(ids.contiguous(), num_experts, bm, name)
    return MoEPlan(*out, topk_ids.shape[1], bm, *_fingerprint(topk_ids))


def _fingerprint(ids: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(the ids tensor, its version counter): how a plan knows its ids were not written since it
    was made. Nothing while tracing (torch.compile): there a plan is always re-checked."""
    if torch.compiler.is_compiling():
        return None, -1
    return ids, ids._version


def _check_plan(op: str, plan: MoEPlan, topk_ids: torch.Tensor, E: int, backend: str) -> None:
    """A plan given to ``moe_mlp`` belongs to ``topk_ids`` (see its ``plan`` parameter)."""
    T, k = topk_ids.shape
    N = plan.sorted_slot.numel()
    if plan.num_experts != E or N != T * k:
        raise ValueError(
            f"{op}: plan was made for {plan.num_experts} experts and {N} slots, but the call has "
            f"E = {E} experts and T·k = {T * k} slots"
        )
    if plan.top_k != k:
        raise ValueError(f"{op}: plan was made for top_k = {plan.top_k}, topk_ids has k = {k}")
    check_device(op, topk_ids.device, plan=plan.slot_pos)
    if not _backend.checks_enabled():
        return
    if plan.source is topk_ids and plan.source_version == topk_ids._version:
        return
    fresh = plan_op(topk_ids.contiguous(), E, plan.block_m, backend)
    given = plan.tensors()
    same = all(a.shape == b.shape for a, b in zip(fresh, given)) and bool(
        torch.stack([(a == b).all() for a, b in zip(fresh, given)]).all()  # one host read
    )
    if not same:
        raise ValueError(
            f"{op}: plan was made for other topk_ids (same shape, other experts); make it with "
            f"moe_plan(topk_ids, E) from the ids you pass, or leave plan=None"
        )


def moe_permute(x: torch.Tensor, plan: MoEPlan, *, backend: str | None = None) -> torch.Tensor:
    """Gather token rows into expert-sorted order: ``xs[p] = x[sorted_slot[p] // k]``.

    x [T, D] → xs [T·k, D] (rows of expert e at ``offsets[e]:offsets[e+1]``). Backward: each
    token's gradient is the sum of its k rows' gradients. The plan's size is checked against x;
    which ids it came from cannot be (this op takes no ids).
    """
    op = "moe_permute"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [T, D], got {_shape(x)}")
    if plan.sorted_slot.numel() != x.shape[0] * plan.top_k:
        raise ValueError(
            f"{op}: the plan has {plan.sorted_slot.numel()} slots but x has "
            f"{x.shape[0]} tokens × k = {plan.top_k}"
        )
    check_device(op, x.device, plan=plan.sorted_slot)
    name = _backend.resolve(backend, x.device, op, kernel="moe.permute")
    check_dtype(op, "x", x, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if x.shape[1] > 1 and x.stride(1) != 1:
        x = x.contiguous()
    return permute_op(x, plan.sorted_slot, plan.slot_pos, plan.top_k, name)


def moe_combine(
    expert_out: torch.Tensor,
    topk_weights: torch.Tensor | None,
    plan: MoEPlan,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Weighted sum of each token's k expert outputs, back in token order.

    ``y[t] = Σ_j w[t, j] · expert_out[slot_pos[t·k + j]]`` (fp32 accumulation, j ascending:
    deterministic). expert_out [T·k, D] in expert-sorted order; topk_weights [T, k] or None (1).
    Gradients flow to expert_out and topk_weights.
    """
    op = "moe_combine"
    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2:
        raise ValueError(
            f"{op}: expert_out must be a 2-D tensor [T·k, D], got {_shape(expert_out)}"
        )
    N = plan.slot_pos.numel()
    k = plan.top_k
    if expert_out.shape[0] != N:
        raise ValueError(f"{op}: expert_out has {expert_out.shape[0]} rows, the plan {N} slots")
    dev = expert_out.device
    check_device(op, dev, plan=plan.slot_pos)
    name = _backend.resolve(backend, dev, op, kernel="moe.combine")
    check_dtype(op, "expert_out", expert_out, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if topk_weights is not None:
        if tuple(topk_weights.shape) != (N // k, k):
            raise ValueError(
                f"{op}: topk_weights must be [{N // k}, {k}], got {list(topk_weights.shape)}"
            )
        check_device(op, dev, topk_weights=topk_weights)
    if name == "torch":
        T, D = N // k, expert_out.shape[1]
        rows = expert_out[plan.slot_pos.long()].view(T, k, D)
        if topk_weights is not None:
            rows = rows * topk_weights[:, :, None].to(rows.dtype)
        return rows.sum(1)
    w = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()
    if expert_out.shape[1] > 1 and expert_out.stride(1) != 1:
        expert_out = expert_out.contiguous()
    return combine_op(expert_out, plan.slot_pos, w, k, name)


def _check_mlp(op, x, w_up, w_down, topk_ids, topk_weights, activation) -> torch.Tensor:
    """Shapes, dtypes, devices; with the value checks on, the ids' range. Returns the ids to use
    (:func:`checked`)."""
    for nm, t, nd in (("x", x, 2), ("w_up", w_up, 3), ("w_down", w_down, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != nd:
            raise ValueError(f"{op}: {nm} must be a {nd}-D tensor, got {_shape(t)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    T, D = x.shape
    E, Fu, Dw = w_up.shape
    Fh = Fu // 2 if activation == "silu_glu" else Fu
    if Dw != D or (activation == "silu_glu" and Fu % 2):
        raise ValueError(
            f"{op}: w_up must be [E, {'2F' if activation == 'silu_glu' else 'F'}, D={D}] for "
            f"activation {activation!r}, got {list(w_up.shape)}"
        )
    if tuple(w_down.shape) != (E, D, Fh):
        raise ValueError(
            f"{op}: w_down must be [E={E}, D={D}, F={Fh}] to match w_up {list(w_up.shape)} "
            f"({activation}), got {list(w_down.shape)}"
        )
    if topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"{op}: topk_ids must be [T={T}, k], got {list(topk_ids.shape)}")
    _check_index_tensor(op, "topk_ids", topk_ids, x.device)
    check_device(op, x.device, w_up=w_up, w_down=w_down)
    for nm, t in (("w_up", w_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {nm} dtype {t.dtype} differs from x's {x.dtype}")
    if topk_weights is not None:
        if tuple(topk_weights.shape) != tuple(topk_ids.shape):
            raise ValueError(
                f"{op}: topk_weights must have topk_ids' shape {list(topk_ids.shape)}, got "
                f"{list(topk_weights.shape)}"
            )
        if not topk_weights.is_floating_point():
            raise TypeError(f"{op}: topk_weights must be floating, got {topk_weights.dtype}")
        check_device(op, x.device, topk_weights=topk_weights)
    if topk_ids.numel() >= 2**31:
        raise ValueError(f"{op}: T·k = {topk_ids.numel()} slots must be < 2^31")
    if _backend.checks_enabled():
        return checked(topk_ids, "index_range", op, "topk_ids", upper=E)
    return topk_ids


def moe_mlp(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor | None = None,
    *,
    activation: str = "silu_glu",
    plan: MoEPlan | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Routed expert MLPs: ``y[t] = Σ_j w[t, j] · W_down[e] act(W_up[e] x[t])``, ``e = ids[t, j]``.

    Parameters
    ----------
    x : Tensor [T, D], float32 / bfloat16 / float16 (float64 on the torch backend)
    w_up : Tensor [E, Fu, D]
        Up projections. ``silu_glu``: Fu = 2F, rows [0, F) the gate and [F, 2F) the up
        projection (transformers' ``gate_up_proj`` layout), ``act = silu(gate) · up``;
        ``gelu`` (erf) / ``gelu_tanh``: Fu = F, ``act = gelu(W_up x)``.
    w_down : Tensor [E, D, F]
    topk_ids : Tensor [T, k], int32/int64, values in [0, E)
    topk_weights : Tensor [T, k], float, or None (every weight 1: shared experts)
    activation : "silu_glu" | "gelu" | "gelu_tanh"
    plan : MoEPlan, optional
        A plan of these ids already computed (:func:`moe_plan`); made here otherwise. Checked
        against ``topk_ids`` on every backend: its E, T·k and top_k always; with the value checks
        on (:func:`unif2ace.set_checks`) its contents too: free for a plan made from this very
        tensor, unwritten since (the plan keeps it and its version), else the plan is made again
        and compared (one host read; a graph break under torch.compile). With the checks off a
        plan of other ids of the same shape goes undetected and the output is wrong.
    backend : "torch" | "cpu" | "triton" | "cuda" | "auto" | None

    Returns
    -------
    Tensor [T, D] in x's dtype. Gradients flow to x, w_up, w_down and topk_weights.

    No bias terms (Mixtral, Qwen-MoE, DeepSeek have none). The torch backend is the loop over
    experts (:func:`moe_mlp_ref`); the others run plan → permute → per-expert GEMMs → combine in
    one custom op that saves the gathered input, the pre-activation and the expert outputs
    (N·(2D + Fu) elements, N = T·k) and recomputes the activation in backward.

    Autocast: the experts compute in the autocast dtype, as ``torch.nn.Linear`` does. Where
    autocast is on for x's device, x, w_up and w_down are cast to its dtype (bf16 under the
    trainer's amp) and the op runs with autocast off inside; the GEMMs accumulate in fp32 (the
    Triton grouped GEMM's 16-bit tensor-core path, F.grouped_mm's bf16 path, the C++ and torch
    GEMMs) and the combine sums in fp32; the output comes back in the autocast dtype and the
    gradients in the inputs' own dtypes (the casts' backward). An explicit cast here rather than
    ``torch.library.register_autocast`` on the custom op: that rule would also cast the routing
    weights (fp32 by the launcher contract), fixes one dtype at registration instead of the
    context's, and would not reach the torch backend, which runs no custom op.

    Host reads (the expert sizes are data, the one inherent exception): the composed GEMM loop
    (CPU; elsewhere where F.grouped_mm does not apply: fp16, rows not 16-byte aligned) reads the
    plan's offsets once per forward and once per backward (_composed.py); F.grouped_mm and the
    Triton grouped GEMM (its grid spans the plan's max_tiles, a host size) read nothing. The
    torch backend's loop over experts (:func:`moe_mlp_ref`) finds each expert's rows on the host;
    under torch.compile, where that would be a graph break, the torch backend runs the composed
    torch launchers behind the custom op instead (the same math; rounding may differ).
    """
    op = "moe_mlp"
    amp = _autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if amp is not None:
        cast = lambda t: t.to(amp) if isinstance(t, torch.Tensor) else t  # noqa: E731
        with torch.autocast(x.device.type, enabled=False):
            return moe_mlp(
                cast(x),
                cast(w_up),
                cast(w_down),
                topk_ids,
                topk_weights,
                activation=activation,
                plan=plan,
                backend=backend,
            )
    ids_in = topk_ids
    topk_ids = _check_mlp(op, x, w_up, w_down, topk_ids, topk_weights, activation)
    name = _backend.resolve(backend, x.device, op, kernel="moe.experts_fwd")
    if plan is not None:  # on "torch" too, which does not use it: one rule on every backend
        _check_plan(op, plan, ids_in, w_up.shape[0], name)
    check_dtype(op, "x", x, _FLOAT_DTYPES if name == "torch" else _KERNEL_DTYPES)
    if name == "torch" and not torch.compiler.is_compiling():
        return moe_mlp_ref(x, w_up, w_down, topk_ids, topk_weights, activation)
    # (traced on "torch": the loop over experts sizes each expert's rows from the data, which no
    # graph can hold; the torch launchers behind the custom op compute the same, plan → permute
    # → torch GEMMs → combine, and compile with fullgraph=True)
    E = w_up.shape[0]
    if plan is None:
        plan = moe_plan(topk_ids, E, backend=name)
    w = None if topk_weights is None else topk_weights.to(torch.float32).contiguous()
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, w_up, w_down, topk_weights)
    )
    y, *_ = mlp_fwd_op(
        x.contiguous(),
        w_up.contiguous(),
        w_down.contiguous(),
        w,
        *plan.tensors(),
        plan.top_k,
        plan.block_m,
        activation,
        save,
        True,
        name,
    )
    return y


def moe_shared_experts(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int = 1,
    activation: str = "silu_glu",
    backend: str | None = None,
) -> torch.Tensor:
    """Shared (always-on) experts of each token's task group, summed with weight 1.

    w_up [G·S, Fu, D], w_down [G·S, D, F]: group g's S shared experts are rows g·S … g·S + S − 1.
    group_ids [T] (None: one group). ``y[t] = Σ_{s<S} W_down[g·S+s] act(W_up[g·S+s] x[t])``,
    g = group_ids[t]: the routed-experts op with fixed ids and no weights (one pass over all
    groups, no per-group Python loop). Under autocast it computes in the autocast dtype, as
    :func:`moe_mlp` (which it calls) does.
    """
    op = "moe_shared_experts"
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{op}: x must be a 2-D tensor [T, D], got {_shape(x)}")
    S = int(experts_per_group)
    n = w_up.shape[0] if isinstance(w_up, torch.Tensor) and w_up.dim() == 3 else 0
    if S < 1 or n % S:
        raise ValueError(f"{op}: experts_per_group = {S} must divide the {n} shared experts")
    T = x.shape[0]
    base = torch.arange(S, device=x.device)[None, :]
    if group_ids is None:
        if n != S:
            raise ValueError(f"{op}: group_ids is required with {n // S} groups of shared experts")
        ids = base.expand(T, S).contiguous()
    else:
        _check_index_tensor(op, "group_ids", group_ids, x.device, (T,))
        if _backend.checks_enabled():
            group_ids = checked(group_ids, "index_range", op, "group_ids", upper=n // S)
        ids = group_ids.to(torch.int64)[:, None] * S + base
    return moe_mlp(x, w_up, w_down, ids, None, activation=activation, backend=backend)


def moe_balance_loss(
    expert_counts: torch.Tensor,
    prob_sums: torch.Tensor,
    top_k: int,
    *,
    experts_per_group: int | Sequence[int] | None = None,
    coef: float | Sequence[float] = 0.01,
    reduction: str = "sum",
) -> torch.Tensor:
    """Per-group load-balancing loss ``λ_g · E_g · Σ_{i∈g} f_i · P_i`` (Switch / DeepSeek style).

    Parameters
    ----------
    expert_counts : Tensor [E], int   — slots routed to each expert (:class:`MoERouting`)
    prob_sums : Tensor [E], float     — Σ over the group's tokens of each expert's probability
    top_k : int
    experts_per_group : as in :func:`moe_route`
    coef : float or one per group     — λ_g
    reduction : "sum" | "none"        — scalar, or one loss per group [G]

    ``T_g = Σ_{i∈g} counts_i / k`` tokens in group g, ``f_i = counts_i / (k·T_g)`` (fraction of the
    group's assignments, Σ f = 1), ``P_i = prob_sums_i / T_g``. Equals λ_g under perfect balance;
    transformers' Mixtral ``load_balancing_loss_func`` is k times this (its f sums to k). A group
    with no tokens contributes 0. Gradient flows through prob_sums only.
    """
    op = "moe_balance_loss"
    if reduction not in ("sum", "none"):
        raise ValueError(f"{op}: reduction must be 'sum' or 'none', got {reduction!r}")
    E = prob_sums.shape[0]
    if tuple(expert_counts.shape) != (E,) or prob_sums.dim() != 1:
        raise ValueError(
            f"{op}: expert_counts and prob_sums must both be [E], got "
            f"{list(expert_counts.shape)} and {list(prob_sums.shape)}"
        )
    sizes = _group_sizes(E, experts_per_group, op)
    G = len(sizes)
    coefs = [float(coef)] * G if isinstance(coef, (int, float)) else [float(c) for c in coef]
    if len(coefs) != G:
        raise ValueError(f"{op}: coef has {len(coefs)} entries for {G} groups")
    dev = prob_sums.device
    # the expert -> group map and the λ_g·E_g factors: constants of the config, cached per device
    # (no host -> device copy, no data-dependent size)
    gidx = _const(tuple(g for g, s in enumerate(sizes) for _ in range(s)), torch.int64, dev)
    p = prob_sums if prob_sums.dtype == torch.float64 else prob_sums.float()
    c = expert_counts.to(p.dtype)
    assign = torch.zeros(G, dtype=p.dtype, device=dev).index_add(0, gidx, c)  # k·T_g
    tokens = assign / top_k
    f = c / assign.clamp_min(1)[gidx]
    P = p / tokens.clamp_min(1.0 / top_k)[gidx]
    per_group = torch.zeros(G, dtype=p.dtype, device=dev).index_add(0, gidx, f * P)
    loss = per_group * _const(tuple(cg * s for cg, s in zip(coefs, sizes)), p.dtype, dev)
    return loss.sum() if reduction == "sum" else loss


def moe_z_loss(
    router_logits: torch.Tensor,
    *,
    group_ids: torch.Tensor | None = None,
    experts_per_group: int | Sequence[int] | None = None,
    coef: float = 1e-3,
) -> torch.Tensor:
    """Router z-loss (ST-MoE): ``coef · mean_t (log Σ_{e ∈ group(t)} exp z_{t,e})²``."""
    op = "moe_z_loss"
    T, E = router_logits.shape
    sizes = _group_sizes(E, experts_per_group, op)
    if len(sizes) > 1 and group_ids is None:
        raise ValueError(f"{op}: group_ids is required with {len(sizes)} expert groups")
    offsets = _offsets_tensor(sizes, router_logits.device)
    _, cols, valid = group_cols(offsets, group_ids, T, E, max(sizes))
    z = router_logits if router_logits.dtype == torch.float64 else router_logits.float()
    lse = torch.logsumexp(z.gather(1, cols).masked_fill(~valid, -math.inf), dim=1)
    return coef * (lse * lse).mean() if T else z.sum() * 0
