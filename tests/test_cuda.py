"""The CUDA backend without a GPU. Numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1,
which must be set before Numba is imported, hence one subprocess: tests/cuda_sim.py)
runs every conformance case of layer_cases.py, a few shapes beyond them, two small
networks' SGD steps and a `cnnspec train --device cuda` run, all against the CPU
backend. Outside the simulator every kernel compiles to PTX for sm_80 and sm_90 with
the argument types the simulator saw, and nvJitLink assembles the conv kernels to
check for register spills. On a GPU machine, benchmarks/gpu_check.sh runs the same
cases on the real device."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from layer_cases import ENTRIES

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed: pip install -e '.[cuda]'")

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4  # float32 against float32, relative to each array's scale
CASES = [f"{t}-{i}" for t, e in ENTRIES.items() for i in range(len(e.cases))]
EXTRAS = ["conv2d-square", "conv2d-wide-input", "conv2d-slices", "dense-square"]
EXTRAS += ["add-one-gradient"]
ARCHS = [(8, 0), (9, 0)]


def _env(**extra):
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "NUMBA_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Everything the simulator found, in one subprocess (one import, one compile)."""
    out = tmp_path_factory.mktemp("cuda_sim")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cuda_sim.py"), str(out)],
        env=_env(NUMBA_ENABLE_CUDASIM="1"),
        capture_output=True,
        text=True,
        timeout=1800,  # a guard against a hang, not a measurement
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    with open(out / "launches.pkl", "rb") as f:
        report["launches"] = pickle.load(f)
    report["dir"] = out
    return report


def _check(errors: dict):
    assert "error" not in errors, errors.get("trace") or errors["error"]
    worst = {k: v for k, v in errors.items() if not v <= TOLERANCE}
    assert not worst, f"CUDA differs from CPU (relative to scale): {worst}"


@pytest.mark.parametrize("name", CASES + EXTRAS)
def test_case_matches_cpu(sim, name):
    """Forward, loss, every input and parameter gradient, running statistics and the
    eval-mode forward of one conformance case, CUDA (simulated) against CPU."""
    _check(sim["cases"][name])


def test_simulated_shared_memory_is_one_array_per_block(sim):
    """The simulator's shared arrays are made atomically (tests/cuda_sim.py): with a GIL
    hand-over forced inside the allocation, every thread still sees every other's write.
    Unpatched, threads got arrays of their own under load and read np.empty garbage
    (the intermittent 1e11-sized differences of the cases above)."""
    found = sim["shared_memory"]
    assert "error" not in found, found.get("trace")
    assert found["wrong_sums"] == 0, found


@pytest.mark.parametrize("name", ["lenet-like", "resnet-like"])
def test_network_steps_match_cpu(sim, name):
    """Three SGD steps (plain, then momentum, then Nesterov, with weight decay; dropout,
    batch norm, residual adds, fused ReLUs): the same losses, scores and parameters as
    on the CPU."""
    found = sim["networks"][name]
    assert "error" not in found, found.get("trace")
    np.testing.assert_allclose(found["losses_cuda"], found["losses_cpu"], rtol=1e-4)
    assert found["losses_cpu"][0] != found["losses_cpu"][1]  # the step changed something
    assert found["scores"] < 1e-4 and found["params"] < 1e-4, found


def test_staged_batches_train_identically(sim):
    """The same steps with each batch staged one step ahead (as the trainer hands them)
    from a host buffer overwritten right after the hand-over: the same bits as batches
    given at their step; a batch whose slot a later one reused is refused."""
    found = sim["networks"]["lenet-like"]
    assert "error" not in found, found.get("trace")
    assert found["losses_staged"] == found["losses_cuda"]
    assert found["staged_params_identical"] and found["stale_refused"]


def test_train_on_cuda_then_evaluate_on_cpu(sim):
    """`cnnspec train --device cuda` writes the same .npz checkpoints: the CPU evaluates
    them to the loss the (simulated) GPU did."""
    from typer.testing import CliRunner

    from cnnspec.cli import app

    found = sim["cli"]
    assert found["train_exit"] == 0, found["train_output"]
    assert found["eval_exit"] == 0, found["eval"]
    on_cuda = json.loads(found["eval"][found["eval"].index("{") :])
    d = sim["dir"]
    args = ["eval", str(d / "lenet-like.yaml"), "--data", str(d / "data.npz")]
    args += ["--weights", str(d / "run" / "best.npz"), "--split", "train"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "2", "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    on_cpu = json.loads(result.output[result.output.index("{") :])
    assert on_cpu["accuracy"] == on_cuda["accuracy"]
    assert on_cpu["loss"] == pytest.approx(on_cuda["loss"], rel=1e-5)


# ---- every kernel compiles for the GPUs ----------------------------------------------
def _kernels() -> dict:
    """Every kernel of kernels/cuda by (module, qualname), the key cuda_sim.py records:
    module-level ones, and each GPU tile configuration of the kernel factories."""
    import numba.cuda.dispatcher as dispatcher

    from cnnspec.kernels.cuda import conv, dense

    found = {}
    for path in sorted((ROOT / "cnnspec" / "kernels" / "cuda").glob("*.py")):
        module = importlib.import_module(f"cnnspec.kernels.cuda.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, dispatcher.CUDADispatcher):
                if not value.targetoptions.get("device"):
                    key = (module.__name__, value.py_func.__qualname__)
                    found.setdefault(key, [(value, "")])
    factories = (conv.forward_kernel, conv.dx_kernel, conv.dw_kernel)
    made = [(f, n, t) for f in factories for n, t in conv.TILES.items()]
    made += [(dense.gemm_kernel, n, t) for n, t in (("tile", dense.TILE), ("small", dense.SMALL))]
    for factory, name, tile in made:
        kernel = factory(*tile)
        key = (kernel.py_func.__module__, kernel.py_func.__qualname__)
        found.setdefault(key, []).append((kernel, f"{factory.__name__} {name} {tile}"))
    return found


def test_every_kernel_ran_in_the_simulator(sim):
    """The comparisons above reach every kernel (and every tile), so the PTX test has the
    argument types of each."""
    missing = sorted(set(_kernels()) - set(sim["launches"]))
    assert not missing, f"kernels no simulator case launches: {missing}"


def _link(ptx: str, cc) -> str:
    """nvJitLink's verbose log of assembling the PTX into a cubin for `cc`."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch=sm_{cc[0]}{cc[1]}", "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel")
        nvjitlink.complete(handle)
        log = bytearray(nvjitlink.get_info_log_size(handle))
        nvjitlink.get_info_log(handle, log)
        return log.decode(errors="replace")
    finally:
        nvjitlink.destroy(handle)


@pytest.mark.parametrize("cc", ARCHS, ids=[f"sm_{a}{b}" for a, b in ARCHS])
def test_kernels_compile_to_ptx(sim, cc, capsys):
    """compile_ptx needs no GPU or driver; nvJitLink (when installed) assembles the conv
    kernels, which must not spill registers. Registers per thread are printed."""
    from numba import cuda

    kernels = _kernels()
    try:
        importlib.import_module("cuda.bindings.nvjitlink")
        can_link = True
    except ImportError:
        can_link = False
    registers = {}
    for key, made in kernels.items():
        for kernel, label in made:
            for sig in sim["launches"].get(key, ()):
                ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
                assert ".entry" in ptx
                if not (can_link and key[0].endswith(".conv") and "locals" in key[1]):
                    continue
                log = _link(ptx, cc)
                spills = [int(v) for v in re.findall(r"(\d+) bytes spill stores", log)]
                assert spills and not any(spills), f"{key} spills registers:\n{log}"
                used = re.search(r"[Uu]sed (\d+) registers", log)
                registers[label] = int(used.group(1))
    with capsys.disabled():
        shown = "".join(f"\n  {k}: {v}" for k, v in sorted(registers.items()))
        print(f"\nsm_{cc[0]}{cc[1]} conv registers per thread:{shown or ' not linked'}")


def cache_keys() -> dict:
    """What numba-cuda's on-disk cache keys a kernel by, beyond the GPU and the versions:
    the hash of its bytecode and of its pickled closure (a tile factory's tile and inner
    step), per kernel and tile."""
    from numba.cuda.serialize import dumps

    keys = {}
    for key, made in _kernels().items():
        for kernel, label in made:
            func = kernel.py_func
            cells = tuple(c.cell_contents for c in func.__closure__ or ())
            code = hashlib.sha256(func.__code__.co_code).hexdigest()
            keys[f"{key[0]}.{key[1]} {label}"] = [code, hashlib.sha256(dumps(cells)).hexdigest()]
    return keys


def test_every_kernel_is_cached_on_disk():
    """Every kernel has numba-cuda's disk cache (a second run loads ~50 kernels instead
    of compiling them), and its key is the same in another process: a run finds what the
    previous one stored. Storing and loading need a GPU (benchmarks/gpu_check.sh times a
    cold and a warm first step)."""
    from numba.cuda.dispatcher import CUDACache

    kernels = _kernels()
    uncached = [
        key for key, made in kernels.items() for k, _ in made if not isinstance(k._cache, CUDACache)
    ]
    assert not uncached, f"kernels without cache=True (use _common.jit_kernel): {uncached}"
    here = cache_keys()
    code = "import json, test_cuda; print(json.dumps(test_cuda.cache_keys()))"
    other = subprocess.run(
        [sys.executable, "-c", code], env=_env(), cwd=ROOT / "tests", capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert other.returncode == 0, other.stderr[-2000:]
    assert json.loads(other.stdout) == here


# ---- choosing the device ------------------------------------------------------------
def _cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "cnnspec", *args],
        env=env or _env(),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def _no_gpu() -> bool:
    from cnnspec.kernels.cuda.backend import BACKEND

    return BACKEND.unusable() is not None


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is usable here: nothing is missing")
def test_cuda_without_a_gpu_is_one_line_exit_2(tmp_path):
    result = _cli("train", "specs/lenet5.yaml", "--device", "cuda", "--out", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no usable CUDA GPU" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.iterdir())


@pytest.mark.skipif(not _no_gpu(), reason="a GPU is usable here: auto picks it")
def test_auto_falls_back_to_cpu_and_says_so():
    from cnnspec.backend import resolve_device

    assert resolve_device("auto") == "cpu"
    result = _cli("eval", "specs/lenet5.yaml", "--weights", "missing.npz", "--device", "auto")
    assert result.stderr.startswith("device: cpu (no usable CUDA GPU")
    assert result.returncode == 1  # then the missing checkpoint, on the CPU


def test_without_numba_cuda_the_line_says_how_to_install(tmp_path):
    """numba-cuda hidden from the import system: the message names it and the extra."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'numba_cuda' or name.startswith('numba_cuda.'):\n"
        "            raise ImportError('hidden')\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = _cli("bench", "specs/lenet5.yaml", "--device", "cuda", env=env)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "numba-cuda" in result.stderr and "pip install 'cnnspec[cuda]'" in result.stderr


# the CPU's own helpers: im2col/col2im serve its conv_transpose2d (the CUDA one runs on
# the implicit-GEMM conv kernels), batchnorm2d_fold the eval-mode folding of its fused plan
# (CPU only, as the fusions), the constants are plain numbers, crop_flip the training
# batches' augmentation (on the host whatever the device: train/data.py's Batches)
CPU_ONLY = {"im2col", "col2im", "batchnorm2d_fold", "ACT_NONE", "ACT_RELU", "crop_flip"}


def test_kernel_modules_cover_the_cpu_ones():
    """Every public CPU kernel has a CUDA twin of the same name and (required) parameters."""
    cpu_dir = ROOT / "cnnspec" / "kernels" / "cpu"
    missing = []
    for path in sorted(cpu_dir.glob("*.py")):
        cpu = importlib.import_module(f"cnnspec.kernels.cpu.{path.stem}")
        names = [n for n in getattr(cpu, "__all__", []) if n not in CPU_ONLY]
        if not names or path.stem == "gradcheck":  # gradcheck: a test helper, host-only
            continue
        gpu = importlib.import_module(f"cnnspec.kernels.cuda.{path.stem}")
        for name in names:
            twin = getattr(gpu, name, None)
            if twin is None:
                missing.append(f"{path.stem}.{name}")
                continue
            params = inspect.signature(getattr(cpu, name)).parameters.values()
            want = [p.name for p in params if p.default is inspect.Parameter.empty]
            have = list(inspect.signature(twin).parameters)
            assert have[: len(want)] == want, f"{path.stem}.{name}: {have} != {want}"
    assert not missing, f"CPU kernels without a CUDA twin: {missing}"
