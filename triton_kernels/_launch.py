"""Launch helpers shared by the Triton launcher modules of ``unif2ace.triton_kernels``."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton

# The SM count the config pickers assume without a device (interpreter, AOT sweeps): H100 SXM.
DEFAULT_NUM_SMS = 132


@functools.cache
def num_sms(device_index: int) -> int:
    """The streaming-multiprocessor count of CUDA device ``device_index`` (cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_num_sms(t: torch.Tensor) -> int:
    """The SM count of ``t``'s device, current inside :func:`on_tensor_device`; the default for
    CPU tensors (the interpreter)."""
    return num_sms(torch.cuda.current_device()) if t.is_cuda else DEFAULT_NUM_SMS


def split_count(
    rows: int,
    K: int,
    num_sms: int,
    *,
    block: int,
    min_steps: int,
    max_splits: int,
    programs_per_sm: int,
) -> int:
    """How many programs to split each row's K columns over (1: no split).

    A row is split only when there are fewer than ``programs_per_sm`` rows per SM, into the power
    of 2 that fills the SMs, at most ``max_splits`` and at most as many as leave every split
    ``min_steps`` blocks of ``block`` columns.
    """
    want = programs_per_sm * num_sms
    if rows >= want:
        return 1
    fit = K // (min_steps * block)
    if fit < 2:
        return 1
    splits = min(triton.next_power_of_2(triton.cdiv(want, max(rows, 1))), max_splits)
    return min(splits, 1 << (fit.bit_length() - 1))  # largest power of 2 <= fit


def on_device(t: torch.Tensor):
    """``with on_device(t):`` makes t's GPU the current device: a Triton launch goes to the current
    device and its current stream, whatever device its arguments are on. A no-op for CPU tensors
    (the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def on_tensor_device(launch):
    """Run ``launch`` inside :func:`on_device` of its first argument."""

    @functools.wraps(launch)
    def run(t: torch.Tensor, *args, **kwargs):
        with on_device(t):
            return launch(t, *args, **kwargs)

    return run
