"""Triton kernels of unif2ace, importable as ``unif2ace.triton_kernels``.

Each module holds the ``@triton.jit`` kernels of one op family and tensor-level launchers; the
public ops in ``unif2ace.ops`` call the launchers. Under ``TRITON_INTERPRET=1`` they run on CPU
tensors; only fp32 is trustworthy there (the interpreter's bf16 arithmetic is not).
"""
