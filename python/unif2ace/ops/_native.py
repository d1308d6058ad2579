"""The typed boundary to the compiled kernels (``unif2ace._C``, ``unif2ace._C_cuda``).

A tensor crosses it as a descriptor, ``(data_ptr, dtype code, sizes, strides)`` (strides in
elements), built by :func:`desc`; an absent optional operand is ``None``. The bindings derive every
size and stride from the descriptors, check each operand by name (dtype, rank, sizes against the
other operands, dense rows or contiguity where the kernel needs them) and raise ``ValueError``
naming the argument before any kernel runs (``csrc/binding_args.h``). Only true scalars (``top_k``,
seeds, ``alpha``, ...) are passed as numbers.
"""

from __future__ import annotations

import torch

# dtype codes understood by the bindings (csrc/include/unif2ace/dtype.h: DType); any other dtype
# is sent as -1 and rejected there.
DTYPE_CODES = {
    torch.float32: 0,
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.int32: 3,
    torch.int64: 4,
    torch.uint8: 5,
    torch.bool: 6,
}

Desc = tuple[int, int, tuple[int, ...], tuple[int, ...]]


def desc(t: torch.Tensor | None) -> Desc | None:
    """The descriptor of ``t`` (None for None: an absent optional operand)."""
    if t is None:
        return None
    return (t.data_ptr(), DTYPE_CODES.get(t.dtype, -1), t.shape, t.stride())


def stream(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the CUDA launchers take it."""
    return torch.cuda.current_stream(t.device).cuda_stream
