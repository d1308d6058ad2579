"""Ahead-of-time compile jobs of the mask-sampling Triton kernels (:mod:`unif2ace.triton_kernels.aot`,
``tests/test_triton_aot.py``): one :class:`~unif2ace.triton_kernels.aot.AotSpec` per configuration
the launchers in :mod:`unif2ace.triton_kernels.mask_sampling` can pick."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from unif2ace.triton_kernels.aot import TRITON_DTYPE, AotSpec
from unif2ace.triton_kernels.mask_sampling import (
    _BERNOULLI_BLOCK,
    _BERNOULLI_WARPS,
    _SELECT_MAX_BLOCK,
    _SELECT_MIN_BLOCK,
    SelectConfig,
    _bernoulli_kernel,
    _pick_select_config,
    _select_kernel,
)
from unif2ace.triton_kernels.mask_sampling_step import (
    _COMBINE_ROWS,
    _COMBINE_WARPS,
    _SCAN_MAX_BLOCK,
    _SCAN_MIN_BLOCK,
    _SPLIT_BLOCK,
    _SPLIT_MAX,
    _SPLIT_WARPS,
    StepConfig,
    _maskgit_combine_kernel,
    _maskgit_scan_kernel,
    _scan_config,
)


def _scan_configs() -> list[StepConfig]:
    out, block = [], _SCAN_MIN_BLOCK
    while block <= _SCAN_MAX_BLOCK:
        out.append(_scan_config(block))
        block *= 2
    out += [
        StepConfig(block_k=_SPLIT_BLOCK, num_warps=_SPLIT_WARPS, splits=1 << i)
        for i in range(1, _SPLIT_MAX.bit_length())
    ]
    return out


def _select_configs() -> list[SelectConfig]:
    out, block = [], _SELECT_MIN_BLOCK
    while block <= _SELECT_MAX_BLOCK:
        out.append(_pick_select_config(block, interpret=False))
        block *= 2
    out.append(_pick_select_config(_SELECT_MAX_BLOCK + 1, interpret=False))  # chunked
    return out


AOT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def aot_configs() -> Iterator[tuple[str, object, torch.dtype | None]]:
    """Every (kernel family, configuration, logits dtype) a GPU launch can pick.

    ``("scan", StepConfig, dtype)`` (the combine kernel rides along with each split count),
    ``("select", SelectConfig, None)`` and ``("bernoulli", None, None)``.
    """
    for cfg in _scan_configs():
        for dtype in AOT_DTYPES:
            yield "scan", cfg, dtype
    for cfg in _select_configs():
        yield "select", cfg, None
    yield "bernoulli", None, None


# Integer scalars as the JIT specialises them for ordinary sizes (< 2^31: i32); the seed as i64
# (random 63-bit seeds; the full set adds i32 seeds).
_SCAN_SIG = {
    "stride_lb": "i32",
    "stride_ll": "i32",
    "stride_ub": "i32",
    "stride_ul": "i32",
    "ids_ptr": "*i64",
    "gumbel_ptr": "*fp32",
    "choice_ptr": "*fp32",
    "out_ids_ptr": "*i64",
    "conf_ptr": "*fp32",
    "part_f_ptr": "*fp32",
    "part_k_ptr": "*i32",
    "n_pos": "i32",
    "L": "i32",
    "K": "i32",
    "chunk": "i32",
    "mask_id": "i32",
    "c_cond": "fp32",
    "c_uncond": "fp32",
    "inv_temp": "fp32",
    "tau": "fp32",
    "seed": "i64",
    "offset": "i32",
}
# The combine kernel takes these of the scan's arguments, in the same order.
_COMBINE_SIG = {
    name: _SCAN_SIG[name]
    for name in (
        "ids_ptr",
        "choice_ptr",
        "out_ids_ptr",
        "conf_ptr",
        "part_f_ptr",
        "part_k_ptr",
        "n_pos",
        "L",
        "mask_id",
        "tau",
        "seed",
        "offset",
    )
}
# The select and bernoulli kernels end with the same arguments: the masked row they write.
_MASK_OUT_SIG = {
    "out_ids_ptr": "*i64",
    "out_mask_ptr": "*i1",
    "L": "i32",
    "mask_id": "i32",
    "seed": "i64",
    "offset": "i32",
}
_SELECT_SIG = {"conf_ptr": "*fp32", "n_ptr": "*i64", "src_ids_ptr": "*i64", **_MASK_OUT_SIG}
_BERNOULLI_SIG = {"ids_ptr": "*i64", "gamma_ptr": "*fp32", **_MASK_OUT_SIG}
# Fresh torch allocations are 16-byte aligned; a logits view at an odd column is not (unaligned
# variant: the logits/uncond pointers and strides lose it).
_ALIGNED_ARGS = (
    "logits_ptr",
    "uncond_ptr",
    "stride_lb",
    "stride_ll",
    "stride_ub",
    "stride_ul",
    "K",
    "chunk",
    "ids_ptr",
    "gumbel_ptr",
    "choice_ptr",
    "out_ids_ptr",
    "conf_ptr",
    "part_f_ptr",
    "part_k_ptr",
    "conf_ptr",
    "n_ptr",
    "src_ids_ptr",
    "out_mask_ptr",
    "gamma_ptr",
)
_UNALIGNED_ARGS = tuple(
    a
    for a in _ALIGNED_ARGS
    if a not in ("logits_ptr", "uncond_ptr", "stride_lb", "stride_ll", "stride_ub", "stride_ul")
)


def _spec(name: str, kernel, tag: str, seed_t: str, sig: dict, constexprs: dict, **kw) -> AotSpec:
    """The AotSpec ``name[tag]`` of one kernel variant: the seed typed ``seed_t`` (``-seed32`` in
    the name for i32), the constexprs appended to the signature in their order."""
    seed_tag = "" if seed_t == "i64" else "-seed32"
    return AotSpec(
        name=f"{name}[{tag}{seed_tag}]",
        kernel=kernel,
        signature={**sig, "seed": seed_t, **dict.fromkeys(constexprs, "constexpr")},
        constexprs=constexprs,
        **kw,
    )


def _scan_spec(cfg: StepConfig, dt: str, flags: tuple, aligned: bool, seed_t: str):
    has_u, has_n, has_c = flags
    tag = f"{dt}-bk{cfg.block_k}-w{cfg.num_warps}-s{cfg.splits}" + ("" if aligned else "-unaligned")
    tag += f"-u{int(has_u)}n{int(has_n)}c{int(has_c)}"
    return _spec(
        "_maskgit_scan_kernel",
        _maskgit_scan_kernel,
        tag,
        seed_t,
        {"logits_ptr": "*" + dt, "uncond_ptr": "*" + dt, **_SCAN_SIG},
        {
            "HAS_UNCOND": has_u,
            "HAS_NOISE": has_n,
            "HAS_CHOICE_NOISE": has_c,
            "FAST_LOG": True,
            "SPLITS": cfg.splits,
            "ROWS": cfg.rows,
            "BLOCK_K": cfg.block_k,
        },
        num_warps=cfg.num_warps,
        divisible_by_16=_ALIGNED_ARGS if aligned else _UNALIGNED_ARGS,
        meta=dict(
            kernel="scan",
            dtype=dt,
            block_k=cfg.block_k,
            num_warps=cfg.num_warps,
            splits=cfg.splits,
            aligned=aligned,
            flags=list(flags),
            seed=seed_t,
        ),
        enable_fp_fusion=False,
    )


def _combine_spec(splits: int, has_c: bool, seed_t: str):
    return _spec(
        "_maskgit_combine_kernel",
        _maskgit_combine_kernel,
        f"s{splits}-c{int(has_c)}",
        seed_t,
        _COMBINE_SIG,
        {"HAS_CHOICE_NOISE": has_c, "SPLITS": splits, "ROWS": _COMBINE_ROWS},
        num_warps=_COMBINE_WARPS,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="combine", splits=splits, seed=seed_t),
        enable_fp_fusion=False,
    )


def _select_spec(cfg: SelectConfig, key_philox: bool, seed_t: str):
    kind = "philox" if key_philox else "conf"
    mode = "single" if cfg.single else "chunked"
    return _spec(
        "_select_kernel",
        _select_kernel,
        f"{kind}-bl{cfg.block_l}-w{cfg.num_warps}-{mode}",
        seed_t,
        {**_SELECT_SIG, "conf_ptr": "*i64" if key_philox else "*fp32"},
        {
            "KEY_PHILOX": key_philox,
            "NBITS": 64 if key_philox else 32,
            "BLOCK_L": cfg.block_l,
            "SINGLE": cfg.single,
        },
        num_warps=cfg.num_warps,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="select", block_l=cfg.block_l, single=cfg.single, key=kind, seed=seed_t),
    )


def _bernoulli_spec(seed_t: str):
    return _spec(
        "_bernoulli_kernel",
        _bernoulli_kernel,
        f"bl{_BERNOULLI_BLOCK}-w{_BERNOULLI_WARPS}",
        seed_t,
        _BERNOULLI_SIG,
        {"BLOCK_L": _BERNOULLI_BLOCK},
        num_warps=_BERNOULLI_WARPS,
        divisible_by_16=_ALIGNED_ARGS,
        meta=dict(kernel="bernoulli", block_l=_BERNOULLI_BLOCK, seed=seed_t),
    )


def _in_default_set(family: str, cfg, dtype) -> bool:
    """The default (every-run) AOT subset. fp16 compiles like bf16 (only the
    conversion differs); select blocks 32 / 512 / 4096 bracket the register use of the others;
    the combine at the smallest and largest split count. Everything else is in full=True."""
    if family == "scan":
        return dtype != torch.float16 and cfg.splits <= 2
    if family == "combine":
        return cfg.splits in (2, _SPLIT_MAX)
    if family == "select":
        return not cfg.single or cfg.block_l in (_SELECT_MIN_BLOCK, 512, _SELECT_MAX_BLOCK)
    return True


_ALL_FLAGS = [(u, n, c) for u in (True, False) for n in (False, True) for c in (False, True)]
_DEFAULT_FLAGS = (True, False, False)  # guidance, Philox noise: the production path


def aot_specs(full: bool = False):
    """Compile jobs (``unif2ace.triton_kernels.aot.AotSpec``) for the :func:`aot_configs` entries.

    Default (:func:`_in_default_set`): the scan on the production path
    (guidance, Philox noise, aligned rows) at every row block and the smallest split count, fp32
    and bf16 — SPLITS only changes the partial stores, so the larger split counts are left to the
    full set; the combine at 2 and 64 splits; the select in both key kinds at three blocks and
    chunked; the bernoulli kernel. ``full=True``: every configuration in every
    dtype; at the row blocks and 2 splits also every (uncond, supplied noise, supplied choice
    noise) flag combination (fp32) and unaligned logits; the combine with supplied choice noise;
    32-bit seeds for one kernel of each family.
    """
    for family, cfg, dtype in aot_configs():
        wanted = full or _in_default_set(family, cfg, dtype)
        if family == "scan":
            dt = TRITON_DTYPE[dtype]
            if wanted:
                yield _scan_spec(cfg, dt, _DEFAULT_FLAGS, True, "i64")
            if full and cfg.splits <= 2:
                if dtype == torch.float32:
                    for flags in _ALL_FLAGS:
                        if flags != _DEFAULT_FLAGS:
                            yield _scan_spec(cfg, dt, flags, True, "i64")
                yield _scan_spec(cfg, dt, _DEFAULT_FLAGS, False, "i64")
            if full and cfg.block_k == _SCAN_MAX_BLOCK and dtype == torch.float32:
                yield _scan_spec(cfg, dt, _DEFAULT_FLAGS, True, "i32")
            if cfg.splits > 1 and dtype == torch.float32:
                if full or _in_default_set("combine", cfg, None):
                    yield _combine_spec(cfg.splits, False, "i64")
                if full:
                    yield _combine_spec(cfg.splits, True, "i64")
                if full and cfg.splits == 2:
                    yield _combine_spec(cfg.splits, False, "i32")
        elif not wanted:
            continue
        elif family == "select":
            for key_philox in (False, True):
                yield _select_spec(cfg, key_philox, "i64")
                if full and cfg.single and cfg.block_l == 512:
                    yield _select_spec(cfg, key_philox, "i32")
        else:
            yield _bernoulli_spec("i64")
            if full:
                yield _bernoulli_spec("i32")
