"""The "cpu" launchers of the mask-sampling kernels: the C++ functions of ``unif2ace._C``
(contract in :mod:`unif2ace.ops.mask_sampling._torch`).

The C++ and CUDA functions take the same raw-pointer arguments (the CUDA ones add a workspace and
the stream); :func:`mask_tokens_args` and :func:`step_args` build them for both.
"""

from __future__ import annotations

from unif2ace import _backend


def mask_tokens_args(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask) -> tuple:
    """The raw-pointer arguments of ``mask_tokens_fwd`` from the launcher's tensors."""
    B, L = ids.shape
    return (
        ids.data_ptr(),
        B,
        L,
        gamma.data_ptr(),
        n_mask.data_ptr(),
        int(mask_id),
        int(seed),
        int(offset),
        int(mode),
        out_ids.data_ptr(),
        out_mask.data_ptr(),
    )


def step_args(
    logits, uncond, ids, mask_len, mask_id, guidance, inv_t, tau, seed, offset, gumbel, choice, *out
) -> tuple:
    """The raw-pointer arguments of ``maskgit_step_fwd`` from the launcher's tensors (``out`` =
    out_ids, out_mask, confidence)."""
    B, L, K = logits.shape
    has_u = uncond is not None
    return (
        logits.data_ptr(),
        B,
        L,
        K,
        logits.stride(0),
        logits.stride(1),
        _backend.DTYPE_CODES[logits.dtype],
        uncond.data_ptr() if has_u else 0,
        uncond.stride(0) if has_u else 0,
        uncond.stride(1) if has_u else 0,
        ids.data_ptr(),
        mask_len.data_ptr(),
        int(mask_id),
        float(guidance),
        float(inv_t),
        float(tau),
        int(seed),
        int(offset),
        gumbel.data_ptr() if gumbel is not None else 0,
        choice.data_ptr() if choice is not None else 0,
        *(t.data_ptr() for t in out),
    )


@_backend.register("mask_sampling.mask_tokens", "cpu")
def mask_tokens(*args):
    _backend.cpu_ext().mask_tokens_fwd(*mask_tokens_args(*args))


@_backend.register("mask_sampling.maskgit_step", "cpu")
def maskgit_step(*args):
    _backend.cpu_ext().maskgit_step_fwd(*step_args(*args))
