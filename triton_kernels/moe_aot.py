"""Ahead-of-time compile jobs of the MoE Triton kernels (:mod:`unif2ace.triton_kernels.aot`,
``tests/test_triton_aot.py``): one :class:`~unif2ace.triton_kernels.aot.AotSpec` per configuration
the launchers in :mod:`unif2ace.triton_kernels.moe` and :mod:`unif2ace.triton_kernels.moe_route`
can pick."""

from __future__ import annotations

import inspect
import itertools

import torch

from unif2ace.triton_kernels.aot import TRITON_DTYPE, AotSpec
from unif2ace.triton_kernels.moe import (
    _ROW,
    _combine_bwd_kernel,
    _combine_kernel,
    _grouped_gemm_kernel,
    _permute_kernel,
    _pick_gemm_config,
)
from unif2ace.triton_kernels.moe_route import (
    _ROUTE_BLOCK_E,
    ROUTE_MAX_GROUPS,
    ROUTE_MAX_K,
    _pick_route_config,
    _route_fwd_kernel,
    _route_reduce_kernel,
)

AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def aot_configs():
    """Every (kernel kind, configuration, dtype) a GPU launch can pick."""
    for dtype in AOT_DTYPES:
        yield "row", _ROW, dtype
        for be in _ROUTE_BLOCK_E:
            for softmax in (True, False):
                yield ("route", softmax), _pick_route_config(be, False), dtype
        for act in (0, 1, 2, 3):
            for gather in (True, False):
                if act == 0 and gather:
                    continue  # the down projection reads the activation rows directly
                if act != 0 and not gather:
                    continue  # the up projection always gathers
                yield ("gemm", act), _pick_gemm_config(dtype), dtype


_IDX_PTRS = {"sorted_slot_ptr", "slot_pos_ptr", "offsets_ptr", "tile_expert_ptr", "tile_row_ptr"}


_ROUTE_TYPES = {
    "offsets_ptr": "*i64",
    "gid_ptr": "*i64",
    "bias_ptr": "*fp32",
    "ids_ptr": "*i64",
    "cnt_part_ptr": "*i32",
    "ps_part_ptr": "*fp32",
    "counts_ptr": "*i32",
    "prob_sums_ptr": "*fp32",
    "scaling": "fp32",
}


def _signature(kernel, dt: str) -> dict[str, str]:
    route = kernel in (_route_fwd_kernel, _route_reduce_kernel)
    out = {}
    for p in inspect.signature(kernel.fn).parameters.values():
        if "constexpr" in str(p.annotation):
            out[p.name] = "constexpr"
        elif route and p.name in _ROUTE_TYPES:
            out[p.name] = _ROUTE_TYPES[p.name]
        elif p.name in _IDX_PTRS:
            out[p.name] = "*i32"
        elif p.name == "grad_w_ptr" or (p.name == "w_ptr" and kernel is not _grouped_gemm_kernel):
            out[p.name] = "*fp32"
        elif p.name.endswith("_ptr"):
            out[p.name] = "*" + dt
        else:
            out[p.name] = "i32"
    return out


def aot_specs(full: bool = False):
    """Compile jobs (:class:`AotSpec`) for every :func:`aot_configs` entry and kernel variant."""
    del full  # the default set already has every kernel variant a launcher picks
    for kind, cfg, dtype in aot_configs():
        dt = TRITON_DTYPE[dtype]
        if kind == "row":
            common = dict(num_warps=cfg.num_warps)
            base = dict(BLOCK_R=cfg.block_r, BLOCK_D=cfg.block_d)
            meta = dict(dtype=dt, block_r=cfg.block_r, block_d=cfg.block_d)
            div = (
                "x_ptr",
                "xs_ptr",
                "src_ptr",
                "out_ptr",
                "grad_out_ptr",
                "grad_src_ptr",
                "sorted_slot_ptr",
                "slot_pos_ptr",
                "w_ptr",
                "grad_w_ptr",
                "D",
                "stride_x",
                "stride_src",
                "stride_go",
            )
            yield AotSpec(
                name=f"_permute_kernel[{dt}]",
                kernel=_permute_kernel,
                signature=_signature(_permute_kernel, dt),
                constexprs=base,
                divisible_by_16=div,
                meta=meta,
                **common,
            )
            for has_w in (True, False):
                yield AotSpec(
                    name=f"_combine_kernel[{dt}-w{int(has_w)}]",
                    kernel=_combine_kernel,
                    signature=_signature(_combine_kernel, dt),
                    constexprs=dict(base, HAS_W=has_w),
                    divisible_by_16=div,
                    meta=meta,
                    **common,
                )
            for has_w, has_gw in itertools.product((True, False), (True, False)):
                yield AotSpec(
                    name=f"_combine_bwd_kernel[{dt}-w{int(has_w)}g{int(has_gw)}]",
                    kernel=_combine_bwd_kernel,
                    signature=_signature(_combine_bwd_kernel, dt),
                    constexprs=dict(base, HAS_W=has_w, HAS_GW=has_gw),
                    divisible_by_16=div,
                    meta=meta,
                    **common,
                )
        elif kind[0] == "route":
            softmax = kind[1]
            tag = f"{dt}-e{cfg.block_e}-{'softmax' if softmax else 'sigmoid'}"
            yield AotSpec(
                name=f"_route_fwd_kernel[{tag}]",
                kernel=_route_fwd_kernel,
                signature=_signature(_route_fwd_kernel, dt),
                constexprs=dict(
                    SOFTMAX=softmax,
                    BLOCK_T=cfg.block_t,
                    BLOCK_E=cfg.block_e,
                    BLOCK_K=ROUTE_MAX_K,
                    BLOCK_G=ROUTE_MAX_GROUPS,
                ),
                num_warps=cfg.num_warps,
                divisible_by_16=(
                    "logits_ptr",
                    "offsets_ptr",
                    "gid_ptr",
                    "bias_ptr",
                    "ids_ptr",
                    "w_ptr",
                    "cnt_part_ptr",
                    "ps_part_ptr",
                ),
                meta=dict(dtype=dt, block_t=cfg.block_t, block_e=cfg.block_e, softmax=softmax),
            )
            if dtype == torch.float32 and softmax:  # dtype-free: once per block size
                yield AotSpec(
                    name=f"_route_reduce_kernel[e{cfg.block_e}]",
                    kernel=_route_reduce_kernel,
                    signature=_signature(_route_reduce_kernel, dt),
                    constexprs=dict(STRIDE=cfg.block_e, BLOCK=cfg.block_e),
                    num_warps=cfg.num_warps,
                    divisible_by_16=("cnt_part_ptr", "ps_part_ptr", "counts_ptr", "prob_sums_ptr"),
                    meta=dict(block_e=cfg.block_e),
                )
        else:
            act = kind[1]
            yield AotSpec(
                name=f"_grouped_gemm_kernel[{dt}-act{act}-g{int(act != 0)}]",
                kernel=_grouped_gemm_kernel,
                signature=_signature(_grouped_gemm_kernel, dt),
                constexprs=dict(
                    GATHER=act != 0,
                    ACT=act,
                    IEEE=dtype == torch.float32,
                    BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n,
                    BLOCK_K=cfg.block_k,
                ),
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                divisible_by_16=(
                    "a_ptr",
                    "w_ptr",
                    "h_ptr",
                    "act_ptr",
                    "sorted_slot_ptr",
                    "offsets_ptr",
                    "tile_expert_ptr",
                    "tile_row_ptr",
                    "K_DIM",
                    "stride_a",
                    "stride_we",
                    "stride_wn",
                    "stride_h",
                    "stride_act",
                ),
                meta=dict(
                    dtype=dt, act=act, block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k
                ),
            )
