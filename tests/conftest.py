"""Shared fixtures: the repository root and a CLI runner that runs from it."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# The thread count stays fixed in tests (and their subprocesses): a count adapted to the
# machine's load would change float sums' bits between runs the tests compare.
os.environ["CNNSPEC_ADAPTIVE_THREADS"] = "0"
# `cnnspec train` compiles parallel builds in a child process while its first steps run
# serially; tests/test_background_builds.py tests that, the others compile in-process.
os.environ["CNNSPEC_BACKGROUND_BUILDS"] = "0"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(monkeypatch):
    """Run `cnnspec ARGS...` in-process from the repository root (short relative paths).
    Numba's thread count is restored afterwards: `--threads 1` had left every later test
    of the session on one thread (their serial-against-parallel checks compared one
    thread with itself)."""
    import numba
    from typer.testing import CliRunner

    from cnnspec.cli import app

    monkeypatch.chdir(REPO)
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args])

    threads = numba.get_num_threads()
    yield invoke
    numba.set_num_threads(threads)


@pytest.fixture
def first_run(monkeypatch):
    """A first run's deferral with no build ready (as on an empty cache): the kernels
    that have numpy stand-ins ask a child (here one that never answers) for their builds
    and run the stand-ins. The BackgroundBuilds, to enter with `.deferring()`."""
    from cnnspec.kernels.cpu import _common
    from cnnspec.kernels.cpu import background as background_module
    from cnnspec.kernels.cpu.background import BackgroundBuilds

    background = BackgroundBuilds(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    if not background.spare_core:
        pytest.skip("one core: a first run compiles its kernels in its own process")
    monkeypatch.setenv("CNNSPEC_BACKGROUND_BUILDS", "1")  # (the tests' default: off)
    monkeypatch.setattr(_common, "BACKGROUND", background)  # (what Builds.now reads)
    monkeypatch.setattr(background_module, "load_cached", lambda build, sig: False)
    return background


def _benchmark(name):
    """benchmarks/NAME.py as a module (the folder is no package; its modules import
    their shared one, _ab, from beside them, as when run as scripts)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def vs_torch():
    """benchmarks/vs_torch.py, whose torch twins of the networks the tests share."""
    return _benchmark("vs_torch")


@pytest.fixture(scope="session")
def winograd_ab():
    """benchmarks/winograd_ab.py, the per-layer measure behind Winograd's rule."""
    return _benchmark("winograd_ab")


@pytest.fixture(scope="session")
def memory_bandwidth():
    """benchmarks/memory_bandwidth.py, the machine's memory rates behind the Speed section."""
    return _benchmark("memory_bandwidth")


@pytest.fixture(scope="session")
def unfold_ab():
    """benchmarks/unfold_ab.py, the per-layer measure behind the unfolded taps' rule."""
    return _benchmark("unfold_ab")
