"""Mask sampling: the fused decode step and training-time masking against plain PyTorch, speed and memory.

Cases (sizes from the command line; ``--quick`` shrinks everything to seconds):

* ``step``           maskgit_step with classifier-free guidance (two logits tensors [B, L, K]),
                     every position masked (the first, heaviest decode step), mask_len = ⌊0.9·L⌋.
                     Baseline ``torch-ref`` = :func:`maskgit_step_ref` — Show-o's step written
                     plainly: guidance, softmax, ``torch.multinomial``, gather, log, Gumbel choice
                     noise, sort. CPU: ``cpu``; CUDA: ``triton``, ``cuda``.
* ``step-noguide``   the same without unconditional logits (one logits tensor).
* ``step-strided``   guided, on Show-o's views ``full[:, -(L + 1):-1, lo:lo + K]`` of a wider
                     vocabulary (row stride V, no copy).
* ``mask_tokens``    "count" masking of [B_mask, L_mask] ids: torch (the reference, Philox in torch)
                     against the kernels.

The providers draw different random numbers (torch.Generator vs Philox), so their outputs are not
compared row by row; instead, after timing, every provider runs once on the same supplied noise
and must return the reference's ids and mask exactly (recorded in the notes).

Byte model (step cases): a fused step must read each logits tensor once, ``n_logits·B·L·K·elt``
bytes (+ 30 B per position for ids, outputs, confidence); GB/s is that over the median time and
"% roofline" compares it with a device copy measured in the same run. Memory: peak extra memory
above the inputs (CPU: torch allocator events; the CPU kernel's own scratch, threads·(4·K + 16·L)
bytes, is allocated with ``new`` outside torch and added to the cpu row by this script).

Run (the same cases under pytest-benchmark: ``pytest benchmarks/ --benchmark-only -k mask``)::

    python benchmarks/bench_mask_sampling.py --threads 2            # CPU, full sizes
    python benchmarks/bench_mask_sampling.py --quick --out /tmp/b   # seconds
    python benchmarks/bench_mask_sampling.py --device cuda --dtypes fp32,bf16

Exit status 0 unless a provider crashes (``--strict``: also when a target fails).
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # for `benchmarks.*` (appended)
from benchmarks.harness import Bench, Case, CaseSpec, Provider, Sizes, Target, skip_reason  # noqa: E402
from benchmarks.measure import dtype_name  # noqa: E402
from unif2ace.ops import mask_tokens, mask_tokens_ref, maskgit_step, maskgit_step_ref  # noqa: E402
from unif2ace.ops.mask_sampling.reference import gumbel_from_bits  # noqa: E402

STEP, MASK = "mask_sampling.maskgit_step", "mask_sampling.mask_tokens"
GUIDANCE, TEMPERATURE, CHOICE_T = 2.0, 1.0, 4.5
SIZES = Sizes(
    full={"b": 16, "l": 256, "k": 8192, "mask_b": 64, "mask_l": 1024},
    quick={"b": 2, "l": 64, "k": 512, "mask_b": 8, "mask_l": 256},
    columns=("B", "L", "K", "dtype", "layout"),
)


def exactness_note(logits, uncond, ids, mask_len, backends, device) -> str:
    """Every available backend on the same supplied noise vs the reference (ids and mask equal)."""
    B, L, K = logits.shape
    gen = torch.Generator().manual_seed(0)
    gn = gumbel_from_bits(torch.randint(0, 2**32, (B, L, K), generator=gen)).to(device)
    cn = torch.randn(B, L, generator=gen).to(device)
    g = GUIDANCE if uncond is not None else 0.0
    ref = maskgit_step_ref(logits, ids, K, mask_len, uncond, g, TEMPERATURE, CHOICE_T, gn, cn)
    out = []
    for b in backends:
        if skip_reason(b, device, STEP):
            continue
        got = maskgit_step(
            logits,
            ids,
            K,
            mask_len,
            uncond_logits=uncond,
            guidance=g,
            temperature=TEMPERATURE,
            choice_temperature=CHOICE_T,
            gumbel_noise=gn,
            choice_noise=cn,
            backend=b,
        )
        n_ids = int((got[0] != ref[0]).sum())
        n_mask = int((got[1] != ref[1]).sum())
        out.append(f"{b}: {n_ids} ids / {n_mask} mask entries differ of {B * L}")
    del gn, cn
    return "; ".join(out) or "no kernel backend to check"


def step_case(B, L, K, dtype, device, *, guided, strided, backends, seed=0) -> Case:
    gen = torch.Generator().manual_seed(seed)
    if strided:  # Show-o: full [B, L + 2, V] logits, image positions -(L+1):-1, codebook lo:lo+K
        V, lo = K + 2 * 128, 128
        full = (3 * torch.randn(B, L + 2, V, generator=gen)).to(device=device, dtype=dtype)
        logits = full[:, -(L + 1) : -1, lo : lo + K]
        ufull = (3 * torch.randn(B, L + 2, V, generator=gen)).to(device=device, dtype=dtype)
        uncond = ufull[:, -(L + 1) : -1, lo : lo + K] if guided else None
    else:
        logits = (3 * torch.randn(B, L, K, generator=gen)).to(device=device, dtype=dtype)
        uncond = (
            (3 * torch.randn(B, L, K, generator=gen)).to(device=device, dtype=dtype)
            if guided
            else None
        )
    ids = torch.full((B, L), K, device=device)  # all masked: mask_id = K
    mask_len = torch.full((B,), int(0.9 * L), device=device)
    g = GUIDANCE if guided else 0.0
    torch_gen = torch.Generator(device=device).manual_seed(1)

    def ref():
        return maskgit_step_ref(
            logits, ids, K, mask_len, uncond, g, TEMPERATURE, CHOICE_T, generator=torch_gen
        )[:2]

    providers = [Provider("torch-ref", lambda: (ref(), None)[1])]
    for b in backends:
        fn = lambda b=b: (
            maskgit_step(
                logits,
                ids,
                K,
                mask_len,
                uncond_logits=uncond,
                guidance=g,  # noqa: E731
                temperature=TEMPERATURE,
                choice_temperature=CHOICE_T,
                seed=7,
                backend=b,
            ),
            None,
        )[1]
        providers.append(Provider(b, fn, skip=skip_reason(b, device, STEP)))
    elt = torch.finfo(dtype).bits // 8
    n_logits = 2 if guided else 1
    name = "step-strided" if strided else ("step" if guided else "step-noguide")
    scratch = torch.get_num_threads() * (4 * (K + 16) + 16 * L)  # the cpu kernel's own buffers

    def after(rows, report) -> None:
        note = exactness_note(logits, uncond, ids, mask_len, backends, device)
        note = f"{name} {dtype_name(dtype)}, exactness on supplied noise vs torch-ref — {note}"
        report.notes.append(note)
        print("  " + note)
        add_memory_columns(rows, scratch)

    return Case(
        name=name,
        params={
            "B": B,
            "L": L,
            "K": K,
            "dtype": dtype_name(dtype),
            "device": device.type,
            "layout": f"view, row stride {logits.stride(1)}" if strided else "contiguous",
            "guided": guided,
            "logits_bytes": B * L * K * elt,
        },
        providers=providers,
        baseline="torch-ref",
        bytes=n_logits * B * L * K * elt + 30 * B * L,
        tol=math.inf,  # different random streams: exactness is checked on supplied noise instead
        notes=f"bytes = read {n_logits} logits tensor(s) + 30 B/position",
        after=after,
    )


def add_memory_columns(rows, scratch: int) -> None:
    """mem_vs_logits = peak extra memory over one logits tensor; the cpu row also counts the
    kernel's scratch (allocated with ``new[]``, which the profiler does not see)."""
    base = next((r for r in rows if r["provider"] == "torch-ref"), {})
    for r in rows:
        lb = r.get("logits_bytes")
        if not lb or r.get("peak_mem_bytes") is None:
            continue
        if r.get("provider") == "cpu":
            r["peak_mem_bytes"] += scratch
            if base.get("peak_mem_bytes"):
                r["mem_ratio"] = r["peak_mem_bytes"] / base["peak_mem_bytes"]
                r["mem_reduction"] = base["peak_mem_bytes"] / r["peak_mem_bytes"]
        r["mem_vs_logits"] = r["peak_mem_bytes"] / lb


def mask_case(B, L, device, *, backends) -> Case:
    ids = torch.randint(0, 8192, (B, L), device=device)
    gamma = torch.rand(B, generator=torch.Generator().manual_seed(3)).to(device)
    n_mask = (gamma.double() * L).round().clamp(1, L).long()
    providers = [Provider("torch-ref", lambda: mask_tokens_ref(ids, gamma, n_mask, 8192, 5))]
    for b in backends:
        fn = lambda b=b: mask_tokens(ids, gamma, 8192, seed=5, backend=b)  # noqa: E731
        providers.append(Provider(b, fn, skip=skip_reason(b, device, MASK)))
    return Case(
        name="mask_tokens",
        params={
            "B": B,
            "L": L,
            "K": None,
            "dtype": "int64",
            "device": device.type,
            "layout": "count",
        },
        providers=providers,
        baseline="torch-ref",
        tol=0.0,  # integer-only decisions: bit-exact on every backend
        notes="count mode; outputs compared exactly",
    )


def targets_for(args) -> list[Target]:
    mem = "step peak extra memory ≤ 1.2× one logits tensor"
    if args.device.type == "cpu":
        return [
            Target("step", "cpu", "speedup", ">=", 4.0, "cpu step ≥ 4× faster than torch-ref"),
            Target("step", "cpu", "mem_vs_logits", "<=", 1.2, f"cpu {mem}"),
        ]
    out = []
    for b in args.backends:
        out += [
            Target("step", b, "speedup", ">=", 5.0, f"{b} step ≥ 5× faster than torch-ref"),
            Target(
                "step", b, "bw_fraction", ">=", 0.8, f"{b} step reads logits at ≥ 80% of copy BW"
            ),
            Target("step", b, "mem_vs_logits", "<=", 1.2, f"{b} {mem}"),
        ]
    return out


def case_specs(args) -> list[CaseSpec]:
    s, device = args.sizes, args.device
    backends = args.backends
    providers = ("torch-ref", *backends)
    dtypes = args.dtypes
    specs = []
    for dtype in dtypes:
        for name in args.cases:
            if name.startswith("step"):
                build = functools.partial(
                    step_case,
                    s["b"],
                    s["l"],
                    s["k"],
                    dtype,
                    device,
                    guided=name != "step-noguide",
                    strided=name == "step-strided",
                    backends=backends,
                )
            elif name == "mask_tokens":
                if dtype != dtypes[0]:
                    continue  # integer ids: the logits dtype does not apply
                build = functools.partial(
                    mask_case, s["mask_b"], s["mask_l"], device, backends=backends
                )
            else:
                raise SystemExit(f"unknown case {name!r}")
            specs.append(CaseSpec(f"{name} {dtype_name(dtype)}", providers, build))
    return specs


BENCH = Bench(
    "mask_sampling",
    __doc__,
    SIZES,
    case_specs,
    cases="step,step-noguide,step-strided,mask_tokens",
    dtypes=("fp32", "fp32"),
    warmup=(1, 1),
    reps=(7, 30),
    meta=lambda args: {
        "guidance": GUIDANCE,
        "temperature": TEMPERATURE,
        "choice_temperature": CHOICE_T,
    },
    notes=lambda args: [
        "Speedup and memory against torch-ref (same inputs, interleaved repetitions, medians). "
        "Peak extra memory = allocator peak above the memory live before the call; "
        "mem_vs_logits = that over one logits tensor (B·L·K·elt).",
        "Step bytes = each logits tensor read once + 30 B/position; % roofline against a device "
        "copy measured in this run.",
    ],
    ceilings=lambda args: [],  # copy bandwidth only: the step is bound by reading the logits
    targets=targets_for,
    target_rows=lambda args, rows: [
        r for r in rows if r.get("dtype") in (dtype_name(args.dtypes[0]), "int64")
    ],
)
main = BENCH.main

if __name__ == "__main__":
    sys.exit(main())
