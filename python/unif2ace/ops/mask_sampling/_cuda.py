"""The "cuda" launchers of the mask-sampling kernels: the CUDA functions of ``unif2ace._C_cuda``
(contract in :mod:`unif2ace.ops.mask_sampling._torch`), each launched on its tensors' device and
that device's current stream."""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops._native import desc, stream
from unif2ace.ops.mask_sampling._cpu import mask_tokens_args, step_args


@_backend.register("mask_sampling.mask_tokens", "cuda")
def mask_tokens(*args):
    ids = args[0]
    with torch.cuda.device(ids.device):
        _backend.cuda_ext().mask_tokens_fwd(*mask_tokens_args(*args), stream(ids))


@_backend.register("mask_sampling.maskgit_step", "cuda")
def maskgit_step(*args):
    ext = _backend.cuda_ext()
    logits = args[0]
    B, L, K = logits.shape
    with torch.cuda.device(logits.device):
        ws_bytes = ext.maskgit_step_workspace_bytes(B, L, K)
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.maskgit_step_fwd(*step_args(*args), desc(workspace), stream(logits))
