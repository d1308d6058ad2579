"""Launch helpers shared by the Triton launcher modules of ``unif2ace.triton_kernels``."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device_index: int) -> int:
    """The streaming-multiprocessor count of CUDA device ``device_index`` (cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def on_tensor_device(launch):
    """Run ``launch`` with its first argument's CUDA device current: a Triton launch goes to the
    current device and its current stream, whatever device the tensors are on."""

    @functools.wraps(launch)
    def run(t: torch.Tensor, *args, **kwargs):
        if not t.is_cuda:
            return launch(t, *args, **kwargs)
        with torch.cuda.device(t.device):
            return launch(t, *args, **kwargs)

    return run
