"""The "cpu" launchers of the mask-sampling kernels: the C++ functions of ``unif2ace._C``
(contract in :mod:`unif2ace.ops.mask_sampling._torch`).

The C++ and CUDA functions take the same arguments, tensors as descriptors
(:func:`unif2ace.ops._native.desc`; the CUDA ones add a workspace and the stream):
:func:`mask_tokens_args` and :func:`step_args` build them for both.
"""

from __future__ import annotations

from unif2ace import _backend
from unif2ace.ops._native import desc


def mask_tokens_args(ids, gamma, n_mask, mask_id, seed, offset, mode, out_ids, out_mask) -> tuple:
    """The arguments of ``mask_tokens_fwd`` from the launcher's."""
    return (
        desc(ids),
        desc(gamma),
        desc(n_mask),
        int(mask_id),
        int(seed),
        int(offset),
        int(mode),
        desc(out_ids),
        desc(out_mask),
    )


def step_args(
    logits, uncond, ids, mask_len, mask_id, guidance, inv_t, tau, seed, offset, gumbel, choice, *out
) -> tuple:
    """The arguments of ``maskgit_step_fwd`` from the launcher's (``out`` = out_ids, out_mask,
    confidence)."""
    return (
        desc(logits),
        desc(uncond),
        desc(ids),
        desc(mask_len),
        int(mask_id),
        float(guidance),
        float(inv_t),
        float(tau),
        int(seed),
        int(offset),
        desc(gumbel),
        desc(choice),
        *(desc(t) for t in out),
    )


@_backend.register("mask_sampling.mask_tokens", "cpu")
def mask_tokens(*args):
    _backend.cpu_ext().mask_tokens_fwd(*mask_tokens_args(*args))


@_backend.register("mask_sampling.maskgit_step", "cpu")
def maskgit_step(*args):
    _backend.cpu_ext().maskgit_step_fwd(*step_args(*args))
