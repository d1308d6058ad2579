# Everyday targets. Every target sets up what it needs itself (a .venv with the local CPU torch).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
# The local CPU wheel: a bare `pip install torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
BUILD_DEPS := scikit-build-core pybind11 ninja cmake
TEST_DEPS  := pytest pytest-benchmark expecttest ruff numpy transformers onnx onnxruntime
OUT ?= bench_results

.PHONY: setup build demo demo-fast train-tiny ablate test test-slow test-install test-gpu lint format bench bench-quick bench-all bench-e2e gpu-suite clean help

# OpenMP threads that spin at barriers crawl when another job shares the 2 cores (a training
# step measured 4-10x slower); passive waiting costs little on an idle machine.
RUN_ENV := OMP_WAIT_POLICY=PASSIVE
RUN ?= runs/tiny

help:
	@echo "make demo       set up and run the main job: the SynthFace demo (<= 20 min, 2 cores) -> runs/demo/demo/"
	@echo "make train-tiny data + the documented tiny recipe + evaluation -> $(RUN)/"
	@echo "make ablate     D3Diff vs mask-only vs score-only, token/sequence MoE off -> $(RUN)/ablations/"
	@echo "make bench      the D3Diff loss benchmark (CPU)"
	@echo "make test       set up and run the default test suite (CPU + Triton interpreter)"
	@echo "make test-slow  the longer checks (marker: slow)"
	@echo "make test-install  a bare 'pip install .' into a fresh venv runs 'unif2ace --help' (minutes)"
	@echo "make gpu-suite  on a CUDA machine: build _C_cuda, GPU tests, every benchmark -> $(OUT)/"
	@echo "make lint       ruff check + ruff format --check"

$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install $(BUILD_DEPS) $(TEST_DEPS) triton
	touch $@

# C++/CUDA changes need a rebuild: the stamp depends on every source the build reads.
$(VENV)/.built: $(VENV)/.deps CMakeLists.txt $(shell find csrc -type f 2>/dev/null)
	$(PIP) install --no-build-isolation -e .
	touch $@

setup: $(VENV)/.built
build: setup

demo: setup
	$(RUN_ENV) $(PY) -m unif2ace demo --out runs/demo --threads 2

demo-fast: setup
	$(RUN_ENV) $(PY) -m unif2ace demo --out runs/demo-fast --threads 2 --fast

train-tiny: setup
	$(RUN_ENV) $(PY) -m unif2ace data-all --out $(RUN) --threads 2
	$(RUN_ENV) $(PY) -m unif2ace train --out $(RUN) --threads 2 --config configs/tiny.yaml
	$(RUN_ENV) $(PY) -m unif2ace evaluate --out $(RUN) --threads 2

ablate: setup
	$(RUN_ENV) $(PY) -m unif2ace ablate --out $(RUN) --threads 2 --config configs/tiny.yaml \
		--set train.steps=800

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# a fresh venv gets the local CPU torch wheel, then the package with its declared dependencies only
test-install: setup
	$(PY) -m pytest -q -m slow tests/test_reliability_cli.py -k bare_pip_install

test-gpu: setup
	UNIF2ACE_TEST_GPU=1 $(PY) -m pytest -q -m gpu

lint: setup
	$(VENV)/bin/ruff check python triton_kernels tests benchmarks
	$(VENV)/bin/ruff format --check python triton_kernels tests benchmarks

format: setup
	$(VENV)/bin/ruff format python triton_kernels tests benchmarks

bench: setup
	$(PY) benchmarks/bench_d3diff_loss.py --out $(OUT)

bench-quick: setup
	$(PY) benchmarks/bench_d3diff_loss.py --quick --out $(OUT)

bench-all: setup
	for b in benchmarks/bench_*.py; do $(PY) $$b --out $(OUT) || exit 1; done

bench-e2e: setup
	$(RUN_ENV) $(PY) benchmarks/bench_e2e.py --out $(OUT)

gpu-suite:
	bash benchmarks/gpu_suite.sh $(OUT)/gpu

clean:
	rm -rf build $(VENV)/.built
