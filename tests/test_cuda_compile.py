"""Every ``csrc/cuda/*.cu`` compiles with nvcc for sm_80 and sm_90a, warnings as errors, no spills.

On a machine without a GPU this is the only check CUDA code gets: a
failed compile, any warning, or a register spill in any kernel fails the test. Registers, stack
frame and shared memory per kernel are printed (straight to the terminal, no ``-s`` needed) and
recorded as test properties. Skipped when nvcc is not on PATH. The compiles run in parallel, one
per core.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("sm_80", "sm_90a")
NVCC = shutil.which("nvcc")

# The device-code flags of the _C_cuda target in CMakeLists.txt (with UNIF2ACE_CUDA_WERROR=ON).
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "-Xptxas",
    "-v",
    "-Werror=all-warnings",
    "-Xcompiler=-Wall,-Wextra,-Werror",
    f"-I{ROOT / 'csrc' / 'include'}",
]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
_PROPS = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {mangled function: {registers, stack, spill_stores, spill_loads, smem}}.

    Entry functions get every field; a device function compiled on its own (not inlined) gets the
    frame/spill fields only.
    """
    funcs: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif m := _PROPS.search(line):
            current = m.group(1)
            funcs.setdefault(current, {})
        elif (m := _FRAME.search(line)) and current is not None:
            stack, st, ld = map(int, m.groups())
            funcs[current].update(stack=stack, spill_stores=st, spill_loads=ld)
        elif (m := _USED.search(line)) and current is not None:
            funcs[current]["registers"] = int(m.group(1))
            funcs[current]["smem"] = int(m.group(2) or 0)
    return funcs


def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    return {n: short_name(s) for n, s in zip(names, out)}


def short_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::kernel<1, 256>(ns::Params)' -> 'kernel<1, 256>'."""
    s = demangled.replace("(anonymous namespace)::", "").replace("unif2ace::", "")
    s = re.sub(r"^void ", "", s)
    return re.sub(r"\(.*\)$", "", s)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], tuple[int, str]]:
    """Compile every (file, arch) pair once, in parallel: {(file name, arch): (returncode, log)}."""
    out_dir = tmp_path_factory.mktemp("cuda_compile")

    def one(cu: Path, arch: str) -> tuple[int, str]:
        obj = out_dir / f"{cu.stem}.{arch}.o"
        cmd = [NVCC, *NVCC_FLAGS, f"-arch={arch}", "-c", str(cu), "-o", str(obj)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        return p.returncode, " ".join(cmd) + "\n" + p.stdout + p.stderr

    jobs = [(cu, arch) for cu in CU_FILES for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(lambda job: one(*job), jobs))
    return {(cu.name, arch): r for (cu, arch), r in zip(jobs, results)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", [p.name for p in CU_FILES])
def test_cuda_compiles_without_spills(compiled, cu, arch, capsys, record_property):
    rc, log = compiled[(cu, arch)]
    assert rc == 0, f"nvcc failed for {cu} ({arch}):\n{log}"

    funcs = parse_ptxas(log)
    entries = {name for name, f in funcs.items() if "registers" in f}
    assert entries, f"no kernel found in the ptxas report of {cu} ({arch}):\n{log}"

    names = demangle(sorted(funcs))
    rows = [f"{cu} [{arch}]  registers  stack  spill st/ld  smem  kernel"]
    for name in sorted(funcs, key=lambda n: names[n]):
        f = funcs[name]
        rows.append(
            f"{'':{len(cu) + len(arch) + 3}}  {f.get('registers', '-'):>9}  {f.get('stack', 0):>5}"
            f"  {f.get('spill_stores', 0):>5}/{f.get('spill_loads', 0):<5} {f.get('smem', 0):>5}"
            f"  {names[name]}"
        )
        record_property(f"{arch}:{names[name]}", f)
    with capsys.disabled():
        print("\n" + "\n".join(rows))

    spilled = {
        names[n]: f for n, f in funcs.items() if f.get("spill_stores", 0) or f.get("spill_loads", 0)
    }
    assert not spilled, f"{cu} ({arch}) spills registers: {spilled}"
