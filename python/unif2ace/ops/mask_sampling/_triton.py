"""The "triton" launchers of the mask-sampling kernels: ``unif2ace.triton_kernels.mask_sampling``
implements the contract (:mod:`unif2ace.ops.mask_sampling._torch`) with exactly these signatures.

The kernel module is imported on the first launch: triton is heavy and optional. Its launch
functions make their first tensor's device current (a Triton launch goes to the current device and
its current stream).
"""

from __future__ import annotations

from unif2ace import _backend


@_backend.register("mask_sampling.mask_tokens", "triton")
def mask_tokens(*args):
    from unif2ace.triton_kernels import mask_sampling as tk  # lazy: triton is heavy and optional

    tk.mask_tokens_fwd(*args)


@_backend.register("mask_sampling.maskgit_step", "triton")
def maskgit_step(*args):
    from unif2ace.triton_kernels import mask_sampling as tk  # lazy: triton is heavy and optional

    tk.maskgit_step_fwd(*args)
