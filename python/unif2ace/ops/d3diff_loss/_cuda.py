"""The "cuda" launcher of the D3Diff row kernel: ``unif2ace._C_cuda.d3diff_loss_fwd`` (csrc/cuda).

Contract: the module docstring of :mod:`unif2ace.ops.d3diff_loss._torch`.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops._native import desc, stream
from unif2ace.ops.d3diff_loss._cpu import fwd_args


@_backend.register("d3diff_loss.fwd", "cuda")
def d3diff_loss_fwd(logits, *args) -> None:
    ext = _backend.cuda_ext()
    with torch.cuda.device(logits.device):  # the launcher sizes its grid for the current device
        ws_bytes = ext.d3diff_loss_workspace_bytes(*logits.shape)
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.d3diff_loss_fwd(*fwd_args(logits, *args), desc(workspace), stream(logits))
