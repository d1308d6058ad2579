"""The "cuda" launchers of the grouped MoE family: the CUDA kernels of ``unif2ace._C_cuda``
(csrc/cuda/moe.cu). Contract: the module docstring of _torch.py.

Routing forward (one warp per token, E <= 256, k <= 32; larger falls back to the torch launcher),
plan (histogram + scan + scatter), permute, combine and combine backward are CUDA kernels; the
expert GEMMs are the composed path (_composed.py: F.grouped_mm, no host sync) over these
permute / combine kernels; the routing backward is the torch launcher (the closed form over all E
columns, no host sync).
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops._native import desc, stream
from unif2ace.ops.moe import _composed, _cpu, _torch

_ROUTE_MAX_E = 256  # csrc/cuda/moe.cu kRouteMaxE: up to 8 candidates per lane of a warp


@_backend.register("moe.route", "cuda")
def route(*args):
    logits, opts = args[0], args[4]  # the contract's arguments (_torch.route)
    T, E = logits.shape
    if E > _ROUTE_MAX_E or opts.top_k > 32:
        _torch.route(*args)
        return
    ext = _backend.cuda_ext()
    with torch.cuda.device(logits.device):
        ws_bytes = ext.moe_route_workspace_bytes(T, E)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.moe_route_fwd(*_cpu.route_args(*args), desc(ws), stream(logits))


route_bwd = _backend.register("moe.route_bwd", "cuda")(_torch.route_bwd)


@_backend.register("moe.plan", "cuda")
def plan(ids, num_experts, block_m, *outs):
    ext = _backend.cuda_ext()
    with torch.cuda.device(ids.device):
        ws_bytes = ext.moe_plan_workspace_bytes(ids.numel(), num_experts)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=ids.device)
        ext.moe_plan(*_cpu.plan_args(ids, num_experts, block_m, *outs), desc(ws), stream(ids))


@_backend.register("moe.permute", "cuda")
def permute(x, sorted_slot, top_k, xs):
    with torch.cuda.device(x.device):
        _backend.cuda_ext().moe_permute(desc(x), desc(sorted_slot), top_k, desc(xs), stream(x))


@_backend.register("moe.combine", "cuda")
def combine(src, slot_pos, weights, out):
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine(
            desc(src), desc(slot_pos), desc(weights), desc(out), stream(src)
        )


@_backend.register("moe.combine_bwd", "cuda")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    if grad_out.dtype != src.dtype:
        grad_out = grad_out.to(src.dtype)
    if grad_out.shape[1] > 1 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine_bwd(
            desc(grad_out),
            desc(src),
            desc(slot_pos),
            desc(weights),
            desc(grad_src),
            desc(grad_weights),
            stream(src),
        )


experts_fwd = _backend.register("moe.experts_fwd", "cuda")(_composed.experts_fwd(permute, combine))
experts_bwd = _backend.register("moe.experts_bwd", "cuda")(
    _composed.experts_bwd(permute, combine, combine_bwd)
)
