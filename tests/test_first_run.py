"""The first run's work: which kernels a LeNet-5 float32 step compiles (counted, never
timed), and the notice `cnnspec train` prints while kernels compile."""

import json
import subprocess
import sys
from pathlib import Path

import numba

from cnnspec.backend import get_backend

ROOT = Path(__file__).resolve().parents[1]

# A fresh process (this one has compiled other dtypes and layers): one LeNet-5 step, then
# every cnnspec kernel holding a compiled (or cache-loaded) signature.
_STEP = """
import gc, json, numpy as np, numba, cnnspec
from numba.core.dispatcher import Dispatcher
m = cnnspec.load("specs/lenet5.yaml").compile(batch_size=64)
x = np.zeros((64, 1, 32, 32), np.float32)
m.step(x, np.arange(64) % 10)
found = []
for d in gc.get_objects():
    if isinstance(d, Dispatcher) and d.py_func.__module__.startswith("cnnspec"):
        for sig in d.signatures:
            arrays = sorted({str(a.dtype) for a in sig if isinstance(a, numba.types.Array)})
            found.append([d.py_func.__qualname__, bool(d.targetoptions.get("parallel")), arrays])
print(json.dumps(found))
"""


def test_lenet5_step_compiles_only_what_it_uses():
    done = subprocess.run(
        [sys.executable, "-c", _STEP], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    names = sorted(name for name, _, _ in found)
    # float32 throughout (the loss keeps its per-sample losses in float64 on purpose)
    assert all(arrays in ([], ["float32"], ["float32", "int32"]) for name, _, arrays in found
               if name != "_softmax_ce_serial"), found  # fmt: skip
    # parallel=True builds (~0.8 s of CPU more each to compile): the convs only; LeNet-5's
    # pools and loss are small enough for the serial builds
    assert sorted(n for n, parallel, _ in found if parallel) == [
        "_backward_samples",
        "_forward_tiles",
    ]
    # 8 kernels; a cold cache also lists the conv's 8 jitted helpers (a warm one loads
    # them linked into the kernels): 16 signatures, _pack's twice (plain and transposed)
    assert len(found) <= 16, names
    assert len(names) - len(set(names)) <= 1, names


def test_compiling_notice_names_each_kernel_once():
    @numba.njit
    def helper(x):
        return x * 2

    @numba.njit
    def kernel(x):
        return helper(x) + 1

    lines = []
    with get_backend("cpu").compiling(lines.append):
        assert kernel(1.5) == 4.0
        kernel(2.5)  # compiled already: says nothing
    assert lines[0] == "compiling kernels (first run only; cached afterwards)"
    assert len(lines) == 2 and lines[1].startswith("  test_first_run.")
    assert "kernel" in lines[1] and "helper" not in lines[1]
    with get_backend("cpu").compiling(lines.append):
        kernel(3.5)
    assert len(lines) == 2
