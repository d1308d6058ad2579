#!/usr/bin/env bash
# The one GPU script: on a bare CUDA machine (torch + triton preinstalled, this repo checked out,
# no internet) build unif2ace with _C_cuda, run the GPU tests, a 20-step tiny training and a
# sampling run on cuda:0 (benchmarks/gpu_smoke.py), and every benchmarks/bench_*.py, and write
# OUT_DIR/report.md. GPUs are lent for minutes, so:
#   * the whole run stays under SUITE_BUDGET_S (default 470 s): each step gets a timeout, trimmed
#     to what is left (20 s are kept for the report);
#   * a failed or timed-out step never stops the later ones (no `set -e`); each step's output goes
#     to OUT_DIR/<step>.log and its status to OUT_DIR/steps.tsv;
#   * benchmarks write their JSON/markdown after every case, so a benchmark cut by its timeout
#     keeps what it finished.
#
# Usage: bash benchmarks/gpu_suite.sh OUT_DIR [--cpu-dry-run]
#   --cpu-dry-run  for a machine without a GPU: no build (uses the installed package), the GPU test
#                  selection (all skip), benchmarks with --quick --device cpu, the report. It
#                  exercises the whole flow except the CUDA parts.
# Environment: PYTHON (default: python, else python3), SUITE_BUDGET_S, CUDA_ARCH (e.g. 90a;
#   default: the device's own, so nvcc compiles one architecture instead of two), SUITE_BENCH_ARGS
#   (extra flags for every benchmark, e.g. "--quick").
set -uo pipefail

usage() { echo "usage: bash benchmarks/gpu_suite.sh OUT_DIR [--cpu-dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT_ARG=$1; shift
DRY=0
for arg in "$@"; do
  case "$arg" in
    --cpu-dry-run) DRY=1 ;;
    *) usage ;;
  esac
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
mkdir -p "$OUT_ARG"
OUT=$(cd "$OUT_ARG" && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${SUITE_BUDGET_S:-470}
RESERVE=20
START=$SECONDS
STEPS="$OUT/steps.tsv"
SUITE_ENV="$OUT/suite.env"  # variables a step hands to the later ones (e.g. PYTHONPATH)
printf 'step\tstatus\trc\tseconds\tlog\n' >"$STEPS"
: >"$SUITE_ENV"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1

left() { echo $((BUDGET - (SECONDS - START) - RESERVE)); }

record() {  # record NAME STATUS RC SECONDS LOG
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >>"$STEPS"
}

# step NAME LIMIT_S CMD...: run CMD with a timeout trimmed to the budget, log to OUT/NAME.log.
step() {
  local name=$1 limit=$2 log="$OUT/$1.log"
  shift 2
  local rem
  rem=$(left)
  if [ "$rem" -lt "$limit" ]; then limit=$rem; fi
  if [ "$limit" -lt 5 ]; then
    echo "== $name: skipped, no time left in the ${BUDGET}s budget"
    record "$name" skipped - 0 "$log"
    return 0
  fi
  echo "== $name (timeout ${limit}s) -> $log"
  local t0=$SECONDS rc status
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  echo "   $status (exit $rc, $((SECONDS - t0)) s)"
  if [ "$status" != ok ]; then tail -n 15 "$log" | sed 's/^/   | /'; fi
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$log"
  # shellcheck disable=SC1090
  . "$SUITE_ENV"
  return "$rc"
}

# ---- 1. environment ------------------------------------------------------------------------
env_info() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -srm), $(nproc) CPUs"
  echo "repo: $(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo '?')$(git -C "$REPO" diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" - <<'PY'
import importlib
import torch
print(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB")
for m in ("triton", "scikit_build_core", "pybind11", "ninja", "cmake", "pytest", "matplotlib"):
    try:
        mod = importlib.import_module(m)
        print(f"{m}: {getattr(mod, '__version__', 'present')}")
    except Exception as exc:
        print(f"{m}: MISSING ({type(exc).__name__})")
PY
  echo "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1 || echo 'not on PATH')"
  echo "cmake: $(command -v cmake >/dev/null && cmake --version | head -n 1 || echo 'not on PATH')"
}
echo "# unif2ace GPU suite -> $OUT (budget ${BUDGET}s$([ $DRY = 1 ] && echo ', CPU dry run'))"
env_info >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if command -v nvidia-smi >/dev/null; then
  step nvidia-smi 30 nvidia-smi
  cp "$OUT/nvidia-smi.log" "$OUT/nvidia-smi.txt"
else
  echo "nvidia-smi: not found" | tee "$OUT/nvidia-smi.txt"
fi

# ---- 2. build ------------------------------------------------------------------------------
build() {
  set -x
  local missing=()
  "$PY" -c "import scikit_build_core" 2>/dev/null || missing+=(scikit-build-core)
  "$PY" -c "import pybind11" 2>/dev/null || missing+=(pybind11)
  command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null || missing+=(ninja)
  command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || missing+=(cmake)
  "$PY" -c "import pytest" 2>/dev/null || missing+=(pytest)  # for the GPU tests step
  if [ ${#missing[@]} -gt 0 ]; then
    echo "BUILD: missing tools: ${missing[*]}; trying pip (fails fast offline)"
    "$PY" -m pip install --retries 0 --timeout 10 "${missing[@]}" ||
      echo "BUILD: could not install ${missing[*]} (offline?): the build below will likely fail"
  fi
  # Only the device's architecture (half the nvcc time of CMakeLists' default "80;90a").
  local arch=${CUDA_ARCH:-$("$PY" -c 'import torch; M, m = torch.cuda.get_device_capability(); print(f"{M}{m}" + ("a" if M == 9 else ""))' 2>/dev/null)}
  local pip_args=(install --no-build-isolation --no-deps -v -e .) cmake_arch=()
  if [ -n "$arch" ]; then
    pip_args+=("--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch")
    cmake_arch=("-DCMAKE_CUDA_ARCHITECTURES=$arch")
  fi
  echo "BUILD: CUDA architecture ${arch:-CMakeLists default}"
  if UNIF2ACE_CUDA=ON "$PY" -m pip "${pip_args[@]}" >"$OUT/build-pip.log" 2>&1 ||
    { grep -q externally-managed "$OUT/build-pip.log" &&
      PIP_BREAK_SYSTEM_PACKAGES=1 UNIF2ACE_CUDA=ON "$PY" -m pip "${pip_args[@]}" >>"$OUT/build-pip.log" 2>&1; }; then
    echo "BUILD: pip editable install with UNIF2ACE_CUDA=ON succeeded"
  else
    tail -n 40 "$OUT/build-pip.log"
    echo "BUILD: pip install failed (log: build-pip.log); falling back to a direct CMake build"
    local bdir="$REPO/build/gpu-suite" stage="$REPO/build/gpu-suite/stage"
    cmake -S . -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DUNIF2ACE_CUDA=ON \
      "${cmake_arch[@]}" -DPython_EXECUTABLE="$PY" \
      -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" &&
      cmake --build "$bdir" -j "$(nproc)" || {
      # Last resort: the package without _C_cuda, so the Triton and torch backends still get
      # tested and benchmarked on the GPU.
      echo "BUILD: CMake build failed too; installing without the CUDA module (UNIF2ACE_CUDA=OFF)"
      PIP_BREAK_SYSTEM_PACKAGES=1 UNIF2ACE_CUDA=OFF "$PY" -m pip install --no-build-isolation \
        --no-deps -e . >>"$OUT/build-pip.log" 2>&1 &&
        echo "BUILD: installed WITHOUT _C_cuda: the cuda backend will be skipped" ||
        echo "BUILD: even the CPU-only install failed: see build-pip.log"
      return 1
    }
    # An older install (e.g. an editable one from an earlier run, whose import hook outranks
    # PYTHONPATH) would shadow the fresh build: remove it (works offline).
    "$PY" -m pip uninstall -y unif2ace || true
    # A package folder that imports like the installed one: python/unif2ace + triton_kernels + .so
    rm -rf "$stage" && mkdir -p "$stage/unif2ace"
    for f in "$REPO"/python/unif2ace/*; do ln -s "$f" "$stage/unif2ace/"; done
    ln -s "$REPO/triton_kernels" "$stage/unif2ace/triton_kernels"
    cp "$bdir"/_C*.so "$stage/unif2ace/"
    echo "export PYTHONPATH=$stage\${PYTHONPATH:+:\$PYTHONPATH}" >>"$SUITE_ENV"
    export PYTHONPATH=$stage${PYTHONPATH:+:$PYTHONPATH}
  fi
  set +x
  cd /tmp && "$PY" -c "import unif2ace, unif2ace._C, unif2ace._C_cuda as c; print('BUILD: imported', c.__file__, [n for n in dir(c) if not n.startswith('_')])"
}
if [ $DRY = 1 ]; then
  echo "== build: skipped (--cpu-dry-run uses the installed package)"
  record build skipped - 0 "$OUT/build.log"
else
  export -f build
  export PY OUT REPO SUITE_ENV
  step build 240 bash -c build
  grep -E '^BUILD:' "$OUT/build.log" | sed 's/^/   /'
fi
"$PY" - >>"$OUT/env.txt" 2>&1 <<'PY'
import torch
from unif2ace import _backend
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
print(f"unif2ace backends available on {dev}:", [b for b in ("torch", "cpu", "triton", "cuda") if _backend.available(b, dev)])
PY
tail -n 1 "$OUT/env.txt"

# ---- 3. GPU tests ----------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  step tests-gpu 120 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --junitxml="$OUT/junit-gpu.xml"
else
  # UNIF2ACE_TEST_GPU=1: Triton runs on the GPU compiler, not the interpreter (tests/conftest.py).
  step tests-gpu 150 env UNIF2ACE_TEST_GPU=1 "$PY" -m pytest -m gpu -x -q -p no:cacheprovider \
    --junitxml="$OUT/junit-gpu.xml"
fi
tail -n 3 "$OUT/tests-gpu.log" | sed 's/^/   /'

# ---- 3b. the model end to end: 20 training steps (bf16, engine backend) + sampling on cuda:0 ----
if [ $DRY = 1 ]; then
  step gpu-smoke 60 "$PY" benchmarks/gpu_smoke.py --out "$OUT" --device cpu
else
  step gpu-smoke 90 "$PY" benchmarks/gpu_smoke.py --out "$OUT" --device cuda
fi
tail -n 4 "$OUT/gpu-smoke.log" | sed 's/^/   /'

# ---- 4. every benchmark ----------------------------------------------------------------------
mapfile -t BENCHES < <(ls benchmarks/bench_*.py 2>/dev/null)
n=${#BENCHES[@]}
for i in "${!BENCHES[@]}"; do
  b=${BENCHES[$i]}
  name=$(basename "$b" .py)
  share=$(($(left) / (n - i)))  # split what is left evenly over the benchmarks not yet run
  # The benchmark's own --budget-s covers its timed repetitions; warm-up, compiles and memory runs
  # need the rest of the share.
  extra=(--out "$OUT" --budget-s $((share / 2)))
  if [ $DRY = 1 ]; then extra+=(--quick --device cpu); fi
  # bench_paper is the full-size CPU step of the paper config (minutes per step): its miniature here
  if [ $DRY = 0 ] && [ "$name" = bench_paper ]; then extra+=(--quick --device cpu); fi
  # shellcheck disable=SC2206  # SUITE_BENCH_ARGS: extra flags for every benchmark, word-split
  extra+=(${SUITE_BENCH_ARGS:-})
  step "$name" "$share" "$PY" "$b" "${extra[@]}"
done

# ---- 5. report -------------------------------------------------------------------------------
RESERVE=0
step report 20 "$PY" benchmarks/report.py "$OUT"
echo "# done in $((SECONDS - START)) s: $OUT/report.md"
awk -F'\t' 'NR > 1 { printf "   %-22s %-8s exit %-4s %5s s\n", $1, $2, $3, $4 }' "$STEPS"
