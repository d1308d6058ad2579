"""Compile ``@triton.jit`` kernels ahead of time for a GPU target, on a machine without a GPU.

Triton lowers a kernel to PTX and runs the ptxas it ships with, so a kernel can be compiled for
sm_80 / sm_90 anywhere. This module turns that into a check: a kernel module lists its compile
jobs as :class:`AotSpec` (``aot_specs(full=False)``, one per configuration its launcher can
pick), and :func:`compile_spec` compiles one job and reads ptxas' own resource report
(registers, spill stores/loads, stack frame): ``CompiledKernel.n_regs`` / ``n_spills`` exist only
after the binary is loaded on a device, so without a GPU the ptxas log is the source.

Command line (prints a JSON report, exit status 1 if a compile failed or spilled)::

    python -m unif2ace.triton_kernels.aot unif2ace.triton_kernels.d3diff_loss --arch 80 90

Under ``TRITON_INTERPRET=1`` ``@triton.jit`` returns an interpreter wrapper, not a compilable
``JITFunction``, and it decides that when the decorator runs; :func:`run_report` therefore always
compiles in a fresh interpreter with ``TRITON_INTERPRET`` removed from the environment.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

DEFAULT_ARCHS = (80, 90)
# torch dtype -> Triton's pointer element type ("*" + TRITON_DTYPE[dtype] in a signature)
TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class AotSpec:
    """One ahead-of-time compile job.

    ``signature`` maps every argument of ``kernel`` to a Triton type string (``"*bf16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the constexpr values; ``divisible_by_16``
    names the arguments the JIT would see as multiples of 16 (pointers of fresh torch tensors,
    strides and sizes that are multiples of 16), names not in the signature are ignored.
    """

    name: str
    kernel: Any
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)  # JSON-able facts copied to the result
    enable_fp_fusion: bool = True  # as the launcher compiles it (mask_sampling turns FMA off)


@dataclass
class AotResult:
    name: str
    arch: int
    ok: bool
    n_regs: int | None = None
    spill_stores: int | None = None  # bytes
    spill_loads: int | None = None  # bytes
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    num_warps: int | None = None
    max_vector_load: int | None = None  # widest ld.global.vN in the PTX (1 = scalar only)
    compile_s: float = 0.0
    error: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


_RE_REGS = re.compile(r"Used (\d+) registers")
_RE_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_RE_VLOAD = re.compile(r"ld\.global(?:\.[\w:]+)*?\.v(\d)\.")


def _parse_ptxas_log(log: str) -> dict:
    regs = _RE_REGS.findall(log)
    spill = _RE_SPILL.findall(log)
    if not regs or not spill:
        raise RuntimeError(f"could not read the ptxas resource report from:\n{log}")
    stack, stores, loads = (max(int(s[i]) for s in spill) for i in range(3))
    return {
        "n_regs": max(int(r) for r in regs),
        "stack_bytes": stack,
        "spill_stores": stores,
        "spill_loads": loads,
    }


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    """Compile ``spec`` for ``sm_<arch>`` and return ptxas' resource report."""
    import triton  # heavy and optional: only the compile needs it
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    if not isinstance(spec.kernel, JITFunction):
        return AotResult(
            spec.name,
            arch,
            False,
            meta=dict(spec.meta),
            error=f"{type(spec.kernel).__name__} is not a JITFunction (TRITON_INTERPRET=1 set "
            "before the kernel module was imported?); compile through run_report()",
        )
    arg_names = spec.kernel.arg_names
    attrs = {
        (arg_names.index(a),): [["tt.divisibility", 16]]
        for a in spec.divisible_by_16
        if a in spec.signature
    }
    src = triton.compiler.ASTSource(
        fn=spec.kernel,
        signature=dict(spec.signature),
        constexprs=dict(spec.constexprs),
        attrs=attrs,
    )
    options = {
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
        "enable_fp_fusion": spec.enable_fp_fusion,
    }
    log = io.StringIO()
    t0 = time.perf_counter()
    # ptxas runs with -v; TRITON_DUMP_PTXAS_LOG makes Triton print its log, and a compile found in
    # the cache would skip ptxas, hence always_compile.
    old = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile)
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a failed compile is a result, not a crash of the whole report
        return AotResult(
            spec.name,
            arch,
            False,
            compile_s=time.perf_counter() - t0,
            error=_describe(e),
            meta=dict(spec.meta),
        )
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = old
    elapsed = time.perf_counter() - t0
    try:
        res = _parse_ptxas_log(log.getvalue())
    except RuntimeError as e:
        return AotResult(
            spec.name, arch, False, compile_s=elapsed, error=str(e), meta=dict(spec.meta)
        )
    vec = [int(v) for v in _RE_VLOAD.findall(compiled.asm["ptx"])]
    return AotResult(
        spec.name,
        arch,
        True,
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        max_vector_load=max(vec, default=1),
        compile_s=elapsed,
        meta=dict(spec.meta),
        **res,
    )


def _describe(e: BaseException) -> str:
    parts = []
    while e is not None and len(parts) < 4:  # Triton's CompilationError hides the cause
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__
    return "\ncaused by ".join(parts)[-6000:]


_JOBS: list[tuple[AotSpec, int]] = []  # inherited by forked workers (kernels do not pickle)


def _compile_job(i: int) -> dict:
    spec, arch = _JOBS[i]
    return asdict(compile_spec(spec, arch))


def compile_all(
    specs: Iterable[AotSpec], archs: Sequence[int] = DEFAULT_ARCHS, jobs: int | None = None
) -> list[AotResult]:
    """Compile every spec for every arch, ``jobs`` processes at once (default: all CPUs)."""
    _JOBS[:] = [(s, a) for s in specs for a in archs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(_JOBS)))
    if jobs == 1:
        rows = [_compile_job(i) for i in range(len(_JOBS))]
    else:
        # fork: the workers inherit the imported kernels; ptxas and the MLIR passes are CPU-bound.
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = pool.map(_compile_job, range(len(_JOBS)), chunksize=1)
    return [AotResult(**r) for r in rows]


def run_report(
    module: str,
    archs: Sequence[int] = DEFAULT_ARCHS,
    full: bool = False,
    jobs: int | None = None,
    timeout: float | None = None,
) -> list[AotResult]:
    """Compile ``module.aot_specs(full)`` in a fresh process without ``TRITON_INTERPRET``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory(prefix="u2a_aot_") as tmp:
        env.setdefault("TRITON_CACHE_DIR", os.path.join(tmp, "cache"))
        out = os.path.join(tmp, "report.json")
        cmd = [
            sys.executable,
            "-m",
            "unif2ace.triton_kernels.aot",
            module,
            "--json",
            out,
            "--arch",
            *map(str, archs),
        ]
        if full:
            cmd.append("--full")
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(out):
            raise RuntimeError(
                f"AOT report of {module} was not written (exit {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        with open(out) as f:
            return [AotResult(**r) for r in json.load(f)["results"]]


def format_table(results: Sequence[AotResult]) -> str:
    lines = [f"{'kernel':<72} {'sm':>3} {'regs':>4} {'spill':>5} {'smem':>6} {'vec':>3} {'s':>5}"]
    for r in results:
        if r.ok:
            spill = (r.spill_stores or 0) + (r.spill_loads or 0)
            lines.append(
                f"{r.name:<72} {r.arch:>3} {r.n_regs:>4} {spill:>5} {r.shared_bytes:>6} "
                f"{r.max_vector_load:>3} {r.compile_s:>5.1f}"
            )
        else:
            lines.append(f"{r.name:<72} {r.arch:>3} FAILED: {r.error.splitlines()[0][:200]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m unif2ace.triton_kernels.aot", description=__doc__)
    p.add_argument("module", help="kernel module exposing aot_specs(full: bool)")
    p.add_argument("--arch", type=int, nargs="+", default=list(DEFAULT_ARCHS))
    p.add_argument("--full", action="store_true", help="every flag/alignment variant")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", default=None, help="write the report here ('-' for stdout)")
    args = p.parse_args(argv)

    import triton  # heavy and optional: only the compile needs it

    mod = importlib.import_module(args.module)
    t0 = time.perf_counter()
    results = compile_all(mod.aot_specs(full=args.full), args.arch, args.jobs)
    report = {
        "module": args.module,
        "triton": triton.__version__,
        "archs": args.arch,
        "full": args.full,
        "wall_s": round(time.perf_counter() - t0, 2),
        "results": [asdict(r) for r in results],
    }
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
    else:
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        print(format_table(results))
        print(f"{len(results)} compiles in {report['wall_s']} s")
    return 0 if all(r.ok and not r.spills for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
