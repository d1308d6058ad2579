"""Test setup. TRITON_INTERPRET must be set before any @triton.jit decorator runs, so it is set
here, before the package (and its Triton kernels) is imported; on a CUDA machine the GPU tests
run with the real compiler (UNIF2ACE_TEST_GPU=1 leaves the interpreter off)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

if os.environ.get("UNIF2ACE_TEST_GPU", "0") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import unif2ace  # noqa: E402,F401
from unif2ace import _backend  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for the test (a module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a shared 2-core machine two OpenMP
    threads spin-wait on each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


GPU_RUN = os.environ.get("UNIF2ACE_TEST_GPU", "0") == "1"
TESTS = Path(__file__).resolve().parent
GLOO = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def torchrun_two_cpu_processes(script: str, result: Path, *args) -> dict:
    """Run ``tests/<script> *args result`` as 2 CPU processes (gloo) under
    ``torch.distributed.run`` and return the JSON that rank 0 writes to ``result``."""
    pythonpath = [str(TESTS), str(TESTS.parent / "python"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(pythonpath)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += [str(TESTS / script), *map(str, args), str(result)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads(Path(result).read_text())


def device_for(backend: str) -> torch.device:
    """cuda for the cuda backend, and for triton in a GPU run; CPU (triton: interpreter) otherwise."""
    if backend == "cuda" or (backend == "triton" and GPU_RUN):
        return torch.device("cuda")
    return torch.device("cpu")


def backend_params():
    """pytest params for every backend, skipped cleanly when it cannot run here. Backends that run
    on a GPU carry the ``gpu`` marker (``pytest -m gpu`` in benchmarks/gpu_suite.sh)."""
    params = []
    for name in ("torch", "cpu", "triton", "cuda"):
        dev = device_for(name)
        marks = [pytest.mark.gpu] if dev.type == "cuda" else []
        if dev.type == "cpu" and not _backend.available(name, dev):
            marks.append(pytest.mark.skip(reason=f"backend {name} not available here"))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (0 when both are zero)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


class LaunchRecorder:
    """Where mocked GPU launches would go, on this CPU-only torch: ``torch.cuda.device`` makes its
    index ``current`` while entered (and ``torch.cuda.current_device`` returns it); ``seen`` collects
    ``(what, device index)`` from the mocks below."""

    def __init__(self, monkeypatch):
        self.current, self.seen = 0, []
        self.monkeypatch = monkeypatch
        recorder = self

        class Device:
            def __init__(self, d):
                self.idx = torch.device(d).index

            def __enter__(self):
                self.prev, recorder.current = recorder.current, self.idx

            def __exit__(self, *exc):
                recorder.current = self.prev

        monkeypatch.setattr(torch.cuda, "device", Device)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)

    def record(self, what: str) -> None:
        self.seen.append((what, self.current))

    def __getitem__(self, grid):
        """Stands in for a Triton kernel: ``kernel[grid](...)`` records a launch."""
        return lambda *args, **kwargs: self.record("launch")

    def num_sms(self, index: int) -> int:
        self.seen.append(("sms", index))
        return 132

    def stream(self, t: torch.Tensor) -> None:
        self.seen.append(("stream", t.device.index))

    def mock_native(self, cuda_launchers, cpu_launchers, workspace: str, *launches: str) -> None:
        """Stands in for the compiled extensions: ``_backend.cuda_ext()`` answers ``workspace``
        (records a "workspace", 64 bytes) and each of ``launches`` (records a launch); the launcher
        modules' ``stream`` records a stream and their ``desc`` returns None."""

        def workspace_bytes(*args):
            self.record("workspace")
            return 64

        ext = SimpleNamespace(**{workspace: workspace_bytes})
        for name in launches:
            setattr(ext, name, lambda *args: self.record("launch"))
        self.monkeypatch.setattr(_backend, "cuda_ext", lambda: ext)
        self.monkeypatch.setattr(cuda_launchers, "stream", self.stream)
        self.monkeypatch.setattr(cuda_launchers, "desc", lambda t: None)
        self.monkeypatch.setattr(cpu_launchers, "desc", lambda t: None)


@pytest.fixture
def launch_recorder(monkeypatch) -> LaunchRecorder:
    return LaunchRecorder(monkeypatch)
