"""The first run's work: which kernels a LeNet-5 float32 step compiles (counted, never
timed), and the notice `cnnspec train` prints while kernels compile."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import pytest

from cnnspec.backend import get_backend

ROOT = Path(__file__).resolve().parents[1]

# A fresh process with an empty Numba cache (cold, as on a fresh install): one LeNet-5
# float32 step, logging every compilation (cnnspec kernels, their jitted
# helpers and the Numba library functions they pull in) with its nesting depth.
_COLD_STEP = """
import json, numpy as np, numba, cnnspec
from numba.core import event
compiled, depth = [], [0]
class Log(event.Listener):
    def on_start(self, ev):
        d, args = ev.data["dispatcher"], ev.data["args"]
        arrays = sorted({str(a.dtype) for a in args if isinstance(a, numba.types.Array)})
        parallel = bool(d.targetoptions.get("parallel"))
        compiled.append([d.py_func.__module__, d.py_func.__qualname__, depth[0], parallel, arrays])
        depth[0] += 1
    def on_end(self, ev):
        depth[0] -= 1
event.register("numba:compile", Log())
m = cnnspec.load("specs/lenet5.yaml").compile(batch_size=64)
m.step(np.zeros((64, 1, 32, 32), np.float32), np.arange(64) % 10)
print(json.dumps(compiled))
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_lenet5_cold_step_compiles_only_what_it_uses(tmp_path, threads):
    """The work of a cold first step, counted (never timed): what a regression in what
    gets compiled (a dtype, a parallel build, a literal-argument variant) would add."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_NUM_THREADS=str(threads))
    done = subprocess.run(
        [sys.executable, "-c", _COLD_STEP], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = json.loads(done.stdout.strip().splitlines()[-1])
    ours = [(name, depth, parallel, arrays) for module, name, depth, parallel, arrays
            in compiled if module.startswith("cnnspec")]  # fmt: skip
    # float32 throughout (the loss keeps its per-sample losses in float64 on purpose)
    assert all(arrays in ([], ["float32"], ["float32", "int32"]) for name, _, _, arrays in ours
               if name != "_softmax_ce_serial"), ours  # fmt: skip
    # parallel=True builds (~1-2 s of CPU more each to compile): the convs' and the pools',
    # on more than one thread only; LeNet-5's loss is small enough for the serial build
    # (and the SGD update, over 61,706 parameters and their gradients and momentum)
    parallel = sorted(name for name, _, parallel, _ in ours if parallel)
    pools = ["_avgpool_bwd_2x2", "_avgpool_fwd_2x2", "_maxpool_bwd", "_maxpool_fwd_2x2"]
    assert parallel == (
        [] if threads == 1 else sorted(["_backward_samples", "_forward_tiles", "_sgd", *pools])
    ), ours
    # each function compiled once (a second signature is a second compile); _pack once
    # per direction (a literal bool: each build without the other's loops)
    names = [name for name, *_ in ours]
    assert len(names) == len(set(names)) + 1 and names.count("_pack") == 2, names
    # 10 kernels (2 convs, 4 pools, the dense layers' two passes, the loss, the SGD
    # update) and the convs' 8 helpers (9 builds); 21-22 compilations in all with the
    # Numba library functions they use (np.empty, and dtype.type on more threads: compiled
    # once per set of build flags). No min / max builtins: 4 compilations more.
    assert len([n for n, depth, _, _ in ours if depth == 0]) <= 10, names
    assert len(ours) <= 19 and len(compiled) <= 20 + threads, compiled


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
