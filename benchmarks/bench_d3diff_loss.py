"""D3Diff loss: the fused backends against the plain-PyTorch loss, forward + backward, speed and memory.

Cases (sizes from the command line; ``--quick`` shrinks everything to seconds):

* ``logits``          d3diff_loss on [N, K] logits, forward + backward w.r.t. the logits.
                      Baseline ``torch-ref`` = :func:`d3diff_loss_ref` with PyTorch autograd.
                      CPU: ``cpu``. CUDA: ``triton``, ``cuda``, ``compile(ref)`` (torch.compile of
                      the reference, the strong peer).
* ``logits-strided``  the same on a column slice ``base[:, pad:pad + K]`` of a wider row (the image
                      codebook inside a larger vocabulary): row stride K + 2·pad, column stride 1.
                      The slice itself is the leaf, so its gradient is [N, K] and no
                      slice-backward copy dilutes the comparison.
* ``linear``          d3diff_linear_loss: hidden [N, D] @ weight[K, D]ᵀ then the loss, forward +
                      backward w.r.t. hidden and weight. Baseline ``torch-linear+ref``
                      (:func:`d3diff_linear_loss_ref`: F.linear, then the reference);
                      ``fused-<backend>`` = the chunked op with that row kernel (``fused-torch``:
                      the same chunking with torch math).

Inputs are what a training step sees: logits ~ 2·randn (linear: hidden ~ randn, weight ~
2·randn/√D), ~3 % rows at ignore_index, rows grouped in sequences of 256 whose time t ~ U(0.05, 1)
gives ratio and weights through :func:`unif2ace.ops.d3diff_weights` (cosine schedule, so
w_ce ≈ 1/N), α = 0.01. The scalar loss gets an explicit contiguous upstream gradient.

Byte model (``logits`` cases): a fused loss must read the logits once and write the gradient once,
``2·N·K·elt`` bytes (+ 24 B per row of targets/ratio/weights/loss); GB/s is that over the median
time, and "% roofline" compares it with a device copy measured in the same run (copy = the same
read + write pattern). Implementations that make more passes (e.g. backward scaling the saved
gradient in place) show up as a lower fraction. ``linear``: 6·N·D·K FLOPs (logits, dh, dW),
against a measured matmul in the same dtype.

Run (the same cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only -k d3diff``)::

    python benchmarks/bench_d3diff_loss.py --threads 2             # CPU, full sizes
    python benchmarks/bench_d3diff_loss.py --quick --out /tmp/b    # seconds
    python benchmarks/bench_d3diff_loss.py --device cuda --dtypes fp32,bf16

Exit status 0 unless a provider crashes (``--strict``: also when a target fails or a provider's
loss/gradients disagree with the baseline's).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*`; appended, so
# the repo root never shadows an installed package (e.g. Triton's own `triton_kernels`)
from benchmarks.harness import Bench, Case, CaseSpec, Provider, Sizes, Target, skip_reason  # noqa: E402
from benchmarks.measure import dtype_name  # noqa: E402
from unif2ace.ops import (  # noqa: E402
    d3diff_linear_loss,
    d3diff_linear_loss_ref,
    d3diff_loss,
    d3diff_loss_ref,
    d3diff_weights,
)

KERNEL = "d3diff_loss.fwd"
ALPHA = 0.01
IGNORE_INDEX = -100
IGNORE_FRACTION = 0.03
SEQ_LEN = 256  # rows per sequence: one diffusion time per sequence, as in training
# Agreement with the baseline (‖x − x_ref‖ / ‖x_ref‖ over loss and every gradient). bf16: the
# gradient is rounded to bf16 (rel. 2^-8 ≈ 4e-3 per element) by every provider, differently.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

SIZES = Sizes(
    full={"n": 4096, "k": 8192, "lin_n": 8192, "lin_d": 512, "lin_k": 8192},
    quick={"n": 256, "k": 512, "lin_n": 256, "lin_d": 64, "lin_k": 512},
    columns=("N", "K", "D", "dtype", "layout"),
)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def row_inputs(N: int, K: int, device: torch.device, gen: torch.Generator):
    """targets (≈3 % ignore_index), ratio, w_ce, w_se for N rows in sequences of SEQ_LEN."""
    targets = torch.randint(0, K, (N,), generator=gen)
    ignored = torch.rand(N, generator=gen) < IGNORE_FRACTION
    targets[ignored] = IGNORE_INDEX
    seq = torch.arange(N) // SEQ_LEN
    B = int(seq[-1]) + 1 if N else 0
    t = 0.05 + 0.95 * torch.rand(B, generator=gen)
    num_masked = torch.bincount(seq[~ignored], minlength=B)
    ratio, w_ce, w_se = d3diff_weights(t, num_masked)  # per sequence, then per row
    rows = (targets, ratio[seq], w_ce[seq], w_se[seq])
    return tuple(x.to(device) for x in rows)


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward(torch.ones_like(loss, memory_format=torch.contiguous_format))
    return loss


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def logits_case(
    N: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    strided: bool,
    backends: list[str],
    compile_peer: bool,
    seed: int = 0,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    targets, ratio, w_ce, w_se = row_inputs(N, K, device, gen)
    if strided:
        pad = 64
        base = (2 * torch.randn(N, K + 2 * pad, generator=gen)).to(device=device, dtype=dtype)
        logits = base[:, pad : pad + K].requires_grad_()  # [N, K], row stride K + 2·pad
    else:
        logits = (2 * torch.randn(N, K, generator=gen)).to(device=device, dtype=dtype)
        logits.requires_grad_()
    rows = (targets, ratio, w_ce, w_se)

    def reset() -> None:
        logits.grad = None

    def ref() -> torch.Tensor:
        return _backward(d3diff_loss_ref(logits, *rows, ALPHA, IGNORE_INDEX))

    providers = [Provider("torch-ref", ref, reset)]
    if compile_peer and device.type == "cuda" and not strided:
        compiled = torch.compile(d3diff_loss_ref, dynamic=False)
        providers.append(
            Provider(
                "compile(ref)",
                lambda: _backward(compiled(logits, *rows, ALPHA, IGNORE_INDEX)),
                reset,
            )
        )
    for b in backends:
        fn = lambda b=b: _backward(
            d3diff_loss(logits, *rows, ALPHA, ignore_index=IGNORE_INDEX, backend=b)
        )
        providers.append(Provider(b, fn, reset, skip=skip_reason(b, device, KERNEL)))

    elt = torch.finfo(dtype).bits // 8
    return Case(
        name="logits-strided" if strided else "logits",
        params={
            "N": N,
            "K": K,
            "D": None,
            "dtype": dtype_name(dtype),
            "device": device.type,
            "layout": f"row stride {logits.stride(0)}" if strided else "contiguous",
        },
        providers=providers,
        baseline="torch-ref",
        bytes=2 * N * K * elt + 24 * N,
        outputs=lambda: [logits.grad],
        tol=TOL[dtype],
        notes="bytes = read logits + write grad (2·N·K·elt) + 24 B/row",
    )


def linear_case(
    N: int,
    D: int,
    K: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    backends: list[str],
    seed: int = 1,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    targets, ratio, w_ce, w_se = row_inputs(N, K, device, gen)
    hidden = torch.randn(N, D, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (2 / math.sqrt(D) * torch.randn(K, D, generator=gen)).to(device=device, dtype=dtype)
    weight.requires_grad_()  # logits = hidden @ weightᵀ ~ 2·randn, like the logits cases
    rows = (targets, ratio, w_ce, w_se)

    def reset() -> None:
        hidden.grad = None
        weight.grad = None

    def ref() -> torch.Tensor:
        return _backward(
            d3diff_linear_loss_ref(hidden, weight, *rows, ALPHA, ignore_index=IGNORE_INDEX)
        )

    providers = [Provider("torch-linear+ref", ref, reset)]
    for b in [*backends, "torch"]:
        fn = lambda b=b: _backward(
            d3diff_linear_loss(hidden, weight, *rows, ALPHA, ignore_index=IGNORE_INDEX, backend=b)
        )
        providers.append(Provider(f"fused-{b}", fn, reset, skip=skip_reason(b, device, KERNEL)))

    return Case(
        name="linear",
        params={
            "N": N,
            "K": K,
            "D": D,
            "dtype": dtype_name(dtype),
            "device": device.type,
            "layout": "contiguous",
        },
        providers=providers,
        baseline="torch-linear+ref",
        flops=6.0 * N * D * K,
        flops_dtype=dtype,
        outputs=lambda: [hidden.grad, weight.grad],
        tol=TOL[dtype],
        notes="flops = 6·N·D·K (logits, dh, dW)",
    )


def targets_for(args) -> list[Target]:
    """The goals. CPU: stated for the cpu backend; CUDA: the same bars, mirrored."""
    kernels = args.backends
    suffix = "" if args.device.type == "cpu" else " (CPU goal mirrored)"
    out = []
    for b in kernels:
        base = f"torch-ref{suffix}"
        out += [
            Target("logits", b, "speedup", ">=", 3.0, f"{b} ≥ 3× faster than {base}"),
            Target(
                "logits",
                b,
                "mem_reduction",
                ">=",
                4.0,
                f"{b} ≥ 4× lower peak extra memory than {base}",
            ),
        ]
    for b in [*kernels, "torch"]:
        f, base = f"fused-{b}", f"torch-linear+ref{suffix if b != 'torch' else ''}"
        out += [
            Target(
                "linear",
                f,
                "mem_reduction",
                ">=",
                5.0,
                f"{f} ≥ 5× lower peak extra memory than {base}",
            ),
            Target("linear", f, "time_ratio", "<=", 1.3, f"{f} ≤ 1.3× the time of {base}"),
        ]
    return out


def case_specs(args) -> list[CaseSpec]:
    s, device = args.sizes, args.device
    backends = args.backends
    specs = []
    for dtype in args.dtypes:
        for name in args.cases:
            if name in ("logits", "logits-strided"):
                strided = name != "logits"
                peer = not args.no_compile and device.type == "cuda" and not strided
                providers = ("torch-ref", *(["compile(ref)"] if peer else []), *backends)
                build = functools.partial(
                    logits_case,
                    s["n"],
                    s["k"],
                    dtype,
                    device,
                    strided=strided,
                    backends=backends,
                    compile_peer=peer,
                )
            elif name == "linear":
                providers = ("torch-linear+ref", *(f"fused-{b}" for b in [*backends, "torch"]))
                build = functools.partial(
                    linear_case,
                    s["lin_n"],
                    s["lin_d"],
                    s["lin_k"],
                    dtype,
                    device,
                    backends=backends,
                )
            else:
                raise SystemExit(f"unknown case {name!r}")
            specs.append(CaseSpec(f"{name} {dtype_name(dtype)}", providers, build))
    return specs


def add_args(p) -> None:
    p.add_argument(
        "--no-compile", action="store_true", help="CUDA: leave out the torch.compile peer"
    )


BENCH = Bench(
    "d3diff_loss",
    __doc__,
    SIZES,
    case_specs,
    cases="logits,logits-strided,linear",
    dtypes=("fp32", "fp32,bf16"),
    add_args=add_args,
    meta=lambda args: {"alpha": ALPHA},
    notes=lambda args: [
        "Speedup and memory are against the case's baseline (torch-ref / torch-linear+ref), "
        "same inputs, interleaved repetitions, medians; peak extra memory = allocator peak above "
        "the memory live before the call (CPU: torch profiler allocation events; CUDA: "
        "max_memory_allocated), gradients included. RSS = process peak-RSS rise, a cross-check.",
        "logits bytes = read logits + write grad (2·N·K·elt) + 24 B/row; linear FLOPs = 6·N·D·K; "
        "% roofline against a device copy / a matmul measured in this run.",
        f"Value checks of the ops (index range, finiteness) {'on' if args.checks else 'off'}.",
    ],
    ceilings=lambda args: args.dtypes,
    targets=targets_for,
    # Targets are judged on the first dtype (fp32 unless --dtypes says otherwise).
    target_rows=lambda args, rows: [
        r for r in rows if r.get("dtype") == dtype_name(args.dtypes[0])
    ],
)


main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
