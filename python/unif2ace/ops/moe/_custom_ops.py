"""The grouped MoE family's custom ops (torch.library): each op allocates its outputs and calls
the chosen backend's launcher (``_backend.launcher("moe.<kernel>", backend)``, contract in
_torch.py); a fake per op gives torch.compile the output shapes, and the differentiable ops
register their autograd through a backward op each.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.moe import _cpu, _cuda, _torch, _triton  # noqa: F401  (register the launchers)
from unif2ace.ops.moe._types import MoEPlan, RouteOptions

# The per-backend facts that fix output shapes (the fakes need them without running a launcher).
# BLOCK_M: the plan's row block, the rows of one tile of its tile map (0: no tile map; the CPU
# backends do not tile). Triton's grouped GEMM reads its tiles at this size.
BLOCK_M = {"torch": 0, "cpu": 0, "triton": 64, "cuda": 64}
# GATHERS_IN_KERNEL: the backends whose grouped GEMM gathers x rows itself and saves no xs
# ([0, D]) for backward (contract §7).
GATHERS_IN_KERNEL = frozenset({"triton"})


def _xs_rows(backend: str, n: int) -> int:
    return 0 if backend in GATHERS_IN_KERNEL else n


_Opt = torch.Tensor | None


@torch.library.custom_op("unif2ace::moe_route", mutates_args=())
def route_op(
    logits: torch.Tensor,
    group_offsets: torch.Tensor,
    group_ids: _Opt,
    bias: _Opt,
    top_k: int,
    scoring: str,
    renormalize: bool,
    n_group: int,
    topk_group: int,
    scaling: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    T, E = logits.shape
    dev = logits.device
    ids = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, top_k, dtype=torch.float32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    prob_sums = torch.empty(E, dtype=torch.float32, device=dev)
    opts = RouteOptions(top_k, scoring, renormalize, n_group, topk_group, scaling)
    _backend.launcher("moe.route", backend)(
        logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums
    )
    # Float outputs first: opcheck's autograd test sums the outputs into the first one's dtype.
    return weights, prob_sums, ids, counts


@route_op.register_fake
def _(logits, group_offsets, group_ids, bias, top_k, *options_and_backend):
    T, E = logits.shape
    return (
        logits.new_empty(T, top_k, dtype=torch.float32),
        logits.new_empty(E, dtype=torch.float32),
        logits.new_empty(T, top_k, dtype=torch.int64),
        logits.new_empty(E, dtype=torch.int32),
    )


@torch.library.custom_op("unif2ace::moe_route_bwd", mutates_args=())
def route_bwd_op(
    logits: torch.Tensor,
    group_offsets: torch.Tensor,
    group_ids: _Opt,
    ids: torch.Tensor,
    grad_weights: _Opt,
    grad_prob_sums: _Opt,
    scoring: str,
    renormalize: bool,
    scaling: float,
    backend: str,
) -> torch.Tensor:
    grad = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    inputs = (logits, group_offsets, group_ids, ids, grad_weights, grad_prob_sums)
    _backend.launcher("moe.route_bwd", backend)(*inputs, scoring, renormalize, scaling, grad)
    return grad


@route_bwd_op.register_fake
def _(logits, *inputs_and_options):
    return logits.new_empty(logits.shape, dtype=torch.float32)


def _route_setup(ctx, inputs, output):
    logits, group_offsets, group_ids = inputs[:3]
    scoring, renormalize, scaling, backend = inputs[5], inputs[6], inputs[9], inputs[10]
    ctx.args = (scoring, renormalize, scaling, backend)  # route_bwd_op's trailing arguments
    ctx.save_for_backward(logits, group_offsets, group_ids, output[2])
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _route_backward(ctx, g_weights, g_prob_sums, g_ids, g_counts):
    logits, group_offsets, group_ids, ids = ctx.saved_tensors
    f32 = lambda g: None if g is None else g.to(torch.float32).contiguous()
    grad = route_bwd_op(
        logits, group_offsets, group_ids, ids, f32(g_weights), f32(g_prob_sums), *ctx.args
    )
    return (grad.to(logits.dtype),) + (None,) * 10


route_op.register_autograd(_route_backward, setup_context=_route_setup)


def _max_tiles(n: int, num_experts: int, block_m: int) -> int:
    return n // block_m + num_experts if block_m > 0 else 0


def empty_plan(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, ...]:
    """The plan's int32 arrays for the N = ids.numel() slots, uninitialised, on ids' device:
    counts [E], offsets [E+1], sorted_slot [N], slot_pos [N], tile_expert / tile_row [max_tiles]."""
    n = ids.numel()
    nt = _max_tiles(n, num_experts, block_m)
    sizes = (num_experts, num_experts + 1, n, n, nt, nt)
    return tuple(ids.new_empty(s, dtype=torch.int32) for s in sizes)


@torch.library.custom_op("unif2ace::moe_plan", mutates_args=())
def plan_op(
    ids: torch.Tensor, num_experts: int, block_m: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    out = empty_plan(ids, num_experts, block_m)
    _backend.launcher("moe.plan", backend)(ids, num_experts, block_m, *out)
    return out


@plan_op.register_fake
def _(ids, num_experts, block_m, backend):
    return empty_plan(ids, num_experts, block_m)


@torch.library.custom_op("unif2ace::moe_permute", mutates_args=())
def permute_op(
    x: torch.Tensor, sorted_slot: torch.Tensor, slot_pos: torch.Tensor, top_k: int, backend: str
) -> torch.Tensor:
    xs = torch.empty(sorted_slot.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    _backend.launcher("moe.permute", backend)(x, sorted_slot, top_k, xs)
    return xs


@permute_op.register_fake
def _(x, sorted_slot, slot_pos, top_k, backend):
    return x.new_empty(sorted_slot.numel(), x.shape[1])


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.args = (inputs[3], inputs[4])


def _permute_backward(ctx, grad_xs):
    (slot_pos,) = ctx.saved_tensors
    top_k, backend = ctx.args
    gx = combine_op(grad_xs.contiguous(), slot_pos, None, top_k, backend)
    return gx, None, None, None, None


permute_op.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op("unif2ace::moe_combine", mutates_args=())
def combine_op(
    src: torch.Tensor, slot_pos: torch.Tensor, weights: _Opt, top_k: int, backend: str
) -> torch.Tensor:
    out = torch.empty(slot_pos.numel() // top_k, src.shape[1], dtype=src.dtype, device=src.device)
    _backend.launcher("moe.combine", backend)(src, slot_pos, weights, out)
    return out


@combine_op.register_fake
def _(src, slot_pos, weights, top_k, backend):
    return src.new_empty(slot_pos.numel() // top_k, src.shape[1])


@torch.library.custom_op("unif2ace::moe_combine_bwd", mutates_args=())
def combine_bwd_op(
    grad_out: torch.Tensor,
    src: torch.Tensor,
    slot_pos: torch.Tensor,
    weights: _Opt,
    top_k: int,
    need_grad_weights: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    grad_src = torch.empty_like(src)
    T = slot_pos.numel() // top_k
    gw = torch.empty(
        (T, top_k) if need_grad_weights else (0,), dtype=torch.float32, device=src.device
    )
    _backend.launcher("moe.combine_bwd", backend)(
        grad_out, src, slot_pos, weights, grad_src, gw if need_grad_weights else None
    )
    return grad_src, gw


@combine_bwd_op.register_fake
def _(grad_out, src, slot_pos, weights, top_k, need_grad_weights, backend):
    T = slot_pos.numel() // top_k
    return torch.empty_like(src), src.new_empty(
        (T, top_k) if need_grad_weights else (0,), dtype=torch.float32
    )


def _combine_setup(ctx, inputs, output):
    src, slot_pos, weights, top_k, backend = inputs
    ctx.save_for_backward(src, slot_pos, weights)
    ctx.args = (top_k, backend)


def _combine_backward(ctx, grad_out):
    src, slot_pos, weights = ctx.saved_tensors
    top_k, backend = ctx.args
    need_gw = weights is not None and ctx.needs_input_grad[2]
    gs, gw = combine_bwd_op(grad_out.contiguous(), src, slot_pos, weights, top_k, need_gw, backend)
    return gs, None, gw if need_gw else None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_combine_setup)


@torch.library.custom_op("unif2ace::moe_mlp_fwd", mutates_args=())
def mlp_fwd_op(
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: _Opt,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    sorted_slot: torch.Tensor,
    slot_pos: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    save: bool,
    consume: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # consume: the caller never reads the returned h / out / xs (moe_mlp drops them), so the eager
    # backward may reuse them for the gradients (_mlp_bwd_impl).
    T, D = x.shape
    N = sorted_slot.numel()
    plan = MoEPlan(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m)
    y = torch.empty_like(x)
    h = x.new_empty(N, w_up.shape[1])
    out = x.new_empty(N, D)
    xs = x.new_empty(_xs_rows(backend, N), D)
    _backend.launcher("moe.experts_fwd", backend)(
        x, w_up, w_down, weights, plan, activation, y, h, out, xs
    )
    if not save:
        return y, h.new_empty(0, h.shape[1]), out.new_empty(0, D), xs.new_empty(0, D)
    return y, h, out, xs


@mlp_fwd_op.register_fake
def _(x, w_up, w_down, weights, counts, offsets, sorted_slot, *plan_and_options):
    *_, save, _consume, backend = plan_and_options
    T, D = x.shape
    N = sorted_slot.numel() if save else 0
    return (
        torch.empty_like(x),
        x.new_empty(N, w_up.shape[1]),
        x.new_empty(N, D),
        x.new_empty(_xs_rows(backend, N), D),
    )


# The registered backward allocates fresh gradient buffers (what torch.compile traces); eager
# autograd calls _mlp_bwd_impl(consume=True) directly and reuses the saved buffers instead
# (a custom op that mutates them trips AOTAutograd in opcheck: "Node ... was invalid").
@torch.library.custom_op("unif2ace::moe_mlp_bwd", mutates_args=())
def mlp_bwd_op(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    weights: _Opt,
    counts: torch.Tensor,
    offsets: torch.Tensor,
    sorted_slot: torch.Tensor,
    slot_pos: torch.Tensor,
    tile_expert: torch.Tensor,
    tile_row: torch.Tensor,
    h: torch.Tensor,
    out: torch.Tensor,
    xs: torch.Tensor,
    top_k: int,
    block_m: int,
    activation: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = MoEPlan(counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row, top_k, block_m)
    return _mlp_bwd_impl(
        grad_y, x, w_up, w_down, weights, plan, h, out, xs, activation, backend, consume=False
    )


def _mlp_bwd_impl(grad_y, x, w_up, w_down, weights, plan, h, out, xs, activation, backend, consume):
    gx = torch.empty_like(x)
    gwu = torch.empty_like(w_up)
    gwd = torch.empty_like(w_down)
    gw = torch.empty(
        weights.shape if weights is not None else (0,), dtype=torch.float32, device=x.device
    )
    grads = (gx, gwu, gwd, gw if weights is not None else None)
    _backend.launcher("moe.experts_bwd", backend)(
        grad_y, x, w_up, w_down, weights, plan, activation, h, out, xs, *grads, consume=consume
    )
    return gx, gwu, gwd, gw


@mlp_bwd_op.register_fake
def _(grad_y, x, w_up, w_down, weights, *plan_saved_and_options):
    gw = x.new_empty(weights.shape if weights is not None else (0,), dtype=torch.float32)
    return torch.empty_like(x), torch.empty_like(w_up), torch.empty_like(w_down), gw


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:10], *output[1:])
    ctx.args = inputs[10:]  # top_k, block_m, activation, save, consume, backend
    ctx.mark_non_differentiable(*output[1:])
    # Without this autograd fills zero gradients for h, out and xs (N·(2D + Fu) elements) before
    # calling backward, a visible share of the layer's backward time (docs/results.md).
    ctx.set_materialize_grads(False)
    ctx.used = False


def _mlp_backward(ctx, grad_y, *_):
    x, w_up, w_down, weights, *plan6, h, out, xs = ctx.saved_tensors
    top_k, block_m, activation, save, consume, backend = ctx.args
    if grad_y is None:
        return (None,) * 16
    if not save:
        raise RuntimeError(
            "moe_mlp: no input required grad when the forward ran, so nothing was saved for "
            "backward; call it again with grad enabled"
        )
    grad_y = grad_y.contiguous()
    traced = torch.compiler.is_compiling() or any(
        type(t) is not torch.Tensor
        for t in (grad_y, x, h)  # fake / functional tensors: tracing
    )
    if traced or not consume:  # the registered, non-mutating backward op
        gx, gwu, gwd, gw = mlp_bwd_op(
            grad_y,
            x,
            w_up,
            w_down,
            weights,
            *plan6,
            h,
            out,
            xs,
            top_k,
            block_m,
            activation,
            backend,
        )
    else:  # eager: reuse the saved buffers for the gradients (once only)
        if ctx.used:
            raise RuntimeError(
                "moe_mlp: backward ran twice through the same graph; the saved activations are "
                "consumed in place to save memory. Call moe_mlp again instead of "
                "retain_graph=True."
            )
        ctx.used = True
        plan = MoEPlan(*plan6, top_k, block_m)
        gx, gwu, gwd, gw = _mlp_bwd_impl(
            grad_y, x, w_up, w_down, weights, plan, h, out, xs, activation, backend, consume=True
        )
    return (gx, gwu, gwd, gw if weights is not None else None) + (None,) * 12


mlp_fwd_op.register_autograd(_mlp_backward, setup_context=_mlp_setup)
