"""Ahead-of-time compile jobs of the D3Diff Triton kernels (:mod:`unif2ace.triton_kernels.aot`,
``tests/test_triton_aot.py``): every configuration the launcher in
:mod:`unif2ace.triton_kernels.d3diff_loss` can pick, as :class:`~unif2ace.triton_kernels.aot.AotSpec`
jobs."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator

import torch

from unif2ace.triton_kernels.aot import TRITON_DTYPE, AotSpec
from unif2ace.triton_kernels.d3diff_loss import (
    _ROW_BYTES_PER_STEP,
    _ROW_MIN_BLOCK,
    _SPLIT_BLOCK,
    _SPLIT_MAX,
    _SPLIT_WARPS,
    AOT_DTYPES,
    D3DiffConfig,
    _d3diff_loss_fwd_kernel,
    _d3diff_loss_partial_kernel,
    _d3diff_loss_split_grad_kernel,
    _row_config,
)


def _row_configs(itemsize: int) -> list[D3DiffConfig]:
    out, block = [], _ROW_MIN_BLOCK
    while block <= _ROW_BYTES_PER_STEP // itemsize:
        out.append(_row_config(block, itemsize))
        block *= 2
    return out


def _split_configs() -> list[D3DiffConfig]:
    return [
        D3DiffConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=1 << i)
        for i in range(1, _SPLIT_MAX.bit_length())
    ]


def aot_configs() -> Iterator[tuple[D3DiffConfig, torch.dtype]]:
    """Every (configuration, logits dtype) :func:`_pick_config` can hand a GPU launch."""
    for dtype in AOT_DTYPES:
        for cfg in _row_configs(dtype.itemsize) + _split_configs():
            yield cfg, dtype


def _signature(kernel, x: str) -> dict[str, str]:
    """Triton types of ``kernel``'s arguments as the launcher passes them; x: the logits type."""
    types = {
        "logits_ptr": x,
        "grad_ptr": x,
        "targets_ptr": "*i64",
        "log_k": "fp32",
        "alpha": "fp32",
        # Python ints below 2^31 are passed as i32 (strides, K, chunk, ignore_index).
        "stride_logits": "i32",
        "stride_grad": "i32",
        "K": "i32",
        "chunk": "i32",
        "num_splits": "i32",
        "ignore_index": "i32",
    }
    # Every other argument is a pointer to an fp32 [N] vector or workspace. kernel.fn: the Python
    # function under both the JIT and the interpreter wrapper.
    params = inspect.signature(kernel.fn).parameters.values()
    return {
        p.name: "constexpr" if "constexpr" in str(p.annotation) else types.get(p.name, "*fp32")
        for p in params
    }


# What the JIT sees for contiguous tensors with K % 16 == 0 (torch allocations are 16-byte
# aligned): every pointer, both row strides, K and chunk divisible by 16. Unaligned: the logits
# and grad pointers and strides lose it (a column range of a wider vocab at an odd column).
_ALIGNED_ARGS = (
    "logits_ptr",
    "targets_ptr",
    "ratio_ptr",
    "w_ce_ptr",
    "w_se_ptr",
    "grad_scale_ptr",
    "loss_ptr",
    "grad_ptr",
    "part_max_ptr",
    "part_sum_ptr",
    "target_logit_ptr",
    "stride_logits",
    "stride_grad",
    "K",
    "chunk",
)
_UNALIGNED_ARGS = tuple(
    a for a in _ALIGNED_ARGS if a not in ("logits_ptr", "grad_ptr", "stride_logits", "stride_grad")
)


def aot_specs(full: bool = False):
    """Compile jobs (``unif2ace.triton_kernels.aot.AotSpec``) for every :func:`aot_configs` entry.

    The default set compiles each kernel with its heaviest flags (gradient and grad_scale on) and
    16-byte-aligned rows: the common case, and the one with the widest vector loads. ``full=True``
    adds the loss-only / unscaled variants and unaligned rows.
    """
    flag_sets = [(True, True)]
    if full:
        flag_sets += [(True, False), (False, True), (False, False)]
    seen = set()
    for (cfg, dtype), aligned in itertools.product(
        aot_configs(), [True, False] if full else [True]
    ):
        dt = TRITON_DTYPE[dtype]
        tag = f"{dt}-bk{cfg.block_k}-w{cfg.num_warps}" + ("" if aligned else "-unaligned")
        common = dict(
            num_warps=cfg.num_warps,
            divisible_by_16=_ALIGNED_ARGS if aligned else _UNALIGNED_ARGS,
        )
        meta = dict(dtype=dt, block_k=cfg.block_k, num_warps=cfg.num_warps, aligned=aligned)
        if cfg.splits > 1 and (dt, cfg.block_k, cfg.num_warps, aligned) not in seen:
            seen.add((dt, cfg.block_k, cfg.num_warps, aligned))  # independent of the split count
            kern = _d3diff_loss_partial_kernel
            yield AotSpec(
                name=f"{kern.__name__}[{tag}]",
                kernel=kern,
                signature=_signature(kern, "*" + dt),
                constexprs={"BLOCK_K": cfg.block_k},
                meta=dict(meta, splits=cfg.splits),
                **common,
            )
        for has_grad, has_scale in flag_sets:
            constexprs = {"HAS_GRAD": has_grad, "HAS_SCALE": has_scale, "BLOCK_K": cfg.block_k}
            name = f"{tag}-g{int(has_grad)}s{int(has_scale)}"
            if cfg.splits == 1:
                kern = _d3diff_loss_fwd_kernel
            else:
                kern = _d3diff_loss_split_grad_kernel
                constexprs["SPLITS"] = cfg.splits
                name = f"{tag}-s{cfg.splits}-g{int(has_grad)}s{int(has_scale)}"
            yield AotSpec(
                name=f"{kern.__name__}[{name}]",
                kernel=kern,
                signature=_signature(kern, "*" + dt),
                constexprs=constexprs,
                meta=dict(meta, splits=cfg.splits),
                **common,
            )
