"""Parallel builds compiled by a child process while the first steps run the serial
builds (kernels/cpu/background.py): the same bits, the child's builds loaded from the
cache, and every way the child can fail falls back to compiling in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest
from numba import prange

from cnnspec.kernels.cpu._common import Builds
from cnnspec.kernels.cpu.background import FAILED, LOADED, BackgroundBuilds

ROOT = Path(__file__).resolve().parents[1]

# A fresh process with an empty Numba cache on 2 threads: model `a` takes two LeNet-5
# steps inside `compiling()` (deferring), waiting for the child between them; model `b`,
# the same weights, takes them with the parallel builds. Every in-process compilation
# is logged with its build flags.
_DEFERRED_STEPS = """
import json, numpy as np, numba, cnnspec
from numba.core import event
from cnnspec.backend import get_backend
from cnnspec.kernels.cpu import conv
from cnnspec.kernels.cpu.background import BACKGROUND
compiled = []
class Log(event.Listener):
    def on_start(self, ev):
        d = ev.data["dispatcher"]
        compiled.append([d.py_func.__qualname__, bool(d.targetoptions.get("parallel"))])
    def on_end(self, ev):
        pass
event.register("numba:compile", Log())
rng = np.random.default_rng(0)
x, y = rng.standard_normal((64, 1, 32, 32)).astype(np.float32), np.arange(64) % 10
net = cnnspec.load("specs/lenet5.yaml")
a, b = net.compile(batch_size=64, seed=1), net.compile(batch_size=64, seed=1)
lines = []
with get_backend("cpu").compiling(lines.append):
    loss_a = [a.step(x, y, momentum=0.9)]
    first = [bool(k.parallel.overloads) for k in (conv._forward_tiles, conv._backward_samples)]
    done = BACKGROUND.wait(900)
    loss_a.append(a.step(x, y, momentum=0.9))
    after = [bool(k.parallel.overloads) for k in (conv._forward_tiles, conv._backward_samples)]
    still_deferring = BACKGROUND.active
loss_b = [b.step(x, y, momentum=0.9) for _ in range(2)]
close = all(np.allclose(a.params[k], b.params[k], rtol=1e-4, atol=1e-6) for k in a.params)
print(json.dumps(dict(compiled=compiled, lines=lines, first=first, done=done, after=after,
                      still_deferring=still_deferring, loss_a=loss_a, loss_b=loss_b, close=close)))
"""


@pytest.mark.slow
def test_first_steps_run_on_stand_ins_while_a_child_compiles_the_builds(tmp_path):
    env = dict(
        os.environ,
        NUMBA_CACHE_DIR=str(tmp_path),
        NUMBA_NUM_THREADS="2",
        CNNSPEC_BACKGROUND_BUILDS="1",
    )
    done = subprocess.run(
        [sys.executable, "-c", _DEFERRED_STEPS], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    # nothing parallel=True compiled in this process, nor the builds of the kernels with
    # stand-ins (convs, pools, loss, SGD update): the child's came from the cache
    stood_in = ("_forward_tiles", "_backward_samples", "_maxpool_", "_avgpool_", "_softmax_ce",
                "_sgd", "_bias_act", "_mask_sum")  # fmt: skip
    here = [name for name, parallel in r["compiled"] if parallel or name.startswith(stood_in)]
    assert not here, r["compiled"]
    assert r["first"] == [False, False] and r["done"] and r["after"] == [True, True]
    assert not r["still_deferring"]  # settled: no per-call typing once all is loaded
    deferred = [line for line in r["lines"] if "compiling in a background process" in line]
    stand_in = [line for line in deferred if "its numpy stand-in runs" in line]
    ready = [line for line in r["lines"] if "(parallel build): ready after" in line]
    # numpy meanwhile: the convs', the 4 pools' and the SGD update's two builds each, the
    # serial ones of the loss and the dense layers' two passes; ready said for the 6 the
    # second step's forward and backward run (the SGD update after them runs its build
    # from the cache: all were ready, deferring had ended)
    assert len(deferred) == 17 and len(stand_in) == 17 and len(ready) == 6, r["lines"]
    assert r["lines"][0] == "compiling kernels (first run only; cached afterwards)"
    # numpy sums in another order than the kernels: the same numbers to float32 rounding
    assert np.allclose(r["loss_a"], r["loss_b"], rtol=1e-5) and r["close"]


def _double(x, out):
    for i in prange(x.size):
        out[i] = 2 * x[i]


@pytest.fixture
def doubling(tmp_path, monkeypatch):
    """A Builds of _double with its own empty cache (the child cannot import it)."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CNNSPEC_BACKGROUND_BUILDS", "1")
    return Builds(_double)


def _call(background, builds):
    x = np.arange(5.0)
    out = np.zeros(5)
    background.run(builds, x, out)
    assert np.array_equal(out, 2 * x)


def test_no_child_compiles_the_parallel_build_here(doubling):
    background = BackgroundBuilds(command=[str(Path("/nonexistent") / "python")])
    lines = []
    with background.deferring(lines.append):
        _call(background, doubling)
        assert list(background.state.values()) == [FAILED]
        assert doubling.parallel.overloads and not lines
        background.settle()
        assert not background.active


def test_a_child_that_fails_leaves_the_build_to_this_process(doubling, monkeypatch):
    monkeypatch.setattr(_double, "__module__", "no_such_module")  # the child cannot import it
    background = BackgroundBuilds()  # the real child
    with background.deferring():
        _call(background, doubling)  # the serial build while the child tries
        assert background.wait(300)
        assert list(background.state.values()) == [FAILED]
        _call(background, doubling)
        assert doubling.parallel.overloads


def test_leaving_stops_the_child_and_forgets_what_it_left(doubling):
    background = BackgroundBuilds(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    with background.deferring():
        _call(background, doubling)
        child = background.child
        assert child.poll() is None and background.active
        background.settle()
        assert background.active  # still waiting for the child
    assert child.poll() is not None and not background.state
    assert not doubling.parallel.overloads  # never compiled here


@pytest.mark.parametrize("where", ["this process", "the disk cache"])
def test_a_compiled_parallel_build_is_used_at_once(doubling, where):
    doubling.parallel(np.arange(3.0), np.zeros(3))  # compiled here, and cached
    if where == "the disk cache":
        doubling = Builds(_double)  # a later run: nothing compiled in the process yet
    background = BackgroundBuilds(command=[str(Path("/nonexistent") / "python")])
    with background.deferring():
        _call(background, doubling)
        assert list(background.state.values()) == [LOADED] and background.child is None
        assert doubling.parallel.stats.cache_hits or where == "this process"
        background.settle()
        assert not background.active


def test_a_computation_that_asked_for_nothing_keeps_deferring(doubling):
    """A first computation on one thread (serial builds only) does not end deferring."""
    background = BackgroundBuilds(command=[str(Path("/nonexistent") / "python")])
    with background.deferring():
        background.settle()
        assert background.active
        _call(background, doubling)
        background.settle()
        assert not background.active


def test_off_when_asked(doubling, monkeypatch):
    monkeypatch.setenv("CNNSPEC_BACKGROUND_BUILDS", "0")
    background = BackgroundBuilds()
    with background.deferring():
        assert not background.active


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(5, 3, 7), (9, 16, 64)])
def test_batch_norm_sums_have_the_same_bits_in_both_builds(shape, dtype):
    """The sums that `reassoc` lets LLVM vectorise, serial and parallel: the same
    partial sums (a deferred first step gives the bits the parallel build would)."""
    from cnnspec.kernels.cpu import norm

    rng = np.random.default_rng(1)
    x, dout = (rng.standard_normal(shape).astype(dtype) + 3 for _ in range(2))
    c = shape[1]
    scale, shift = rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)
    results = []
    for build in ("serial", "parallel"):
        mean, var, s1, s2 = (np.zeros(c) for _ in range(4))
        getattr(norm._bn_stats, build)(x, mean, var)
        getattr(norm._bn_bwd_sums, build)(dout, x, scale, shift, 1, mean.astype(dtype), s1, s2)
        results.append([mean, var, s1, s2])
    for a, b in zip(*results, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_train_then_eval_cold_defer_and_say_so_where_a_program_will_not_read_it(tmp_path):
    """`cnnspec train` and `cnnspec eval --json` on empty caches, 2 threads: both run
    serially while a child compiles, say so (train on stdout, eval on stderr, its stdout
    stays JSON) and leave no child behind."""
    marker = f"CNNSPEC_TEST_RUN={tmp_path}"  # in the env of our processes and their children
    env = dict(os.environ, NUMBA_NUM_THREADS="2", CNNSPEC_BACKGROUND_BUILDS="1")
    env.update([marker.split("=", 1)])
    cnnspec = [sys.executable, "-m", "cnnspec"]
    run = tmp_path / "run"
    train = subprocess.run(
        [*cnnspec, "train", "specs/lenet5.yaml", "--epochs", "1", "--out", str(run)],
        cwd=ROOT, env=dict(env, NUMBA_CACHE_DIR=str(tmp_path / "a")), capture_output=True,
        text=True,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assert "conv._forward_tiles (parallel build): compiling in a background" in train.stdout
    evaluate = subprocess.run(
        [*cnnspec, "eval", "specs/lenet5.yaml", "--weights", str(run / "best.npz"), "--json"],
        cwd=ROOT, env=dict(env, NUMBA_CACHE_DIR=str(tmp_path / "b")), capture_output=True,
        text=True,
    )  # fmt: skip
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert json.loads(evaluate.stdout)["count"] > 0
    assert evaluate.stderr.startswith("compiling kernels (first run only; cached afterwards)")
    assert "conv._forward_tiles (parallel build): compiling in a background" in evaluate.stderr
    assert not _processes_with(marker)  # each command's child was killed as it ended


def _processes_with(marker: str) -> list[str]:
    """The processes whose environment holds `marker` (Linux's /proc; none elsewhere)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0"):
                found.append(environ.parent.name)
        except OSError:
            pass  # gone, or not ours to read
    return found


def test_the_child_caches_only_the_build_asked_of_it(tmp_path):
    """The parent caches the same jitted helpers while the child compiles: two writers of
    one cache index could pair a key with the other's code, so the child writes only the
    requested build's files (here _add2_hooked's, not its helper _hooked's)."""
    import base64
    import pickle

    from cnnspec.kernels.cpu import merge

    x = np.zeros((2, 3, 4), np.float32)
    aff = np.zeros((2, 3), np.float32)
    args = (x, x, aff, 1, aff, 2, 1, x)
    sig = tuple(map(merge._add2_hooked.parallel.typeof_pyval, args))
    request = b"parallel " + base64.b64encode(
        pickle.dumps((0, merge.__name__, "_add2_hooked", "parallel", sig))
    )
    done = subprocess.run(
        [sys.executable, "-m", "cnnspec.kernels.cpu.background"],
        input=request + b"\n", capture_output=True, cwd=ROOT,
        env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)),
    )  # fmt: skip
    assert done.stdout.decode().split() == ["ok", "0"], done.stderr.decode()[-2000:]
    cached = {p.name.split("-")[0] for p in tmp_path.rglob("*.nb[ic]")}
    assert cached == {"merge._add2_hooked"}, cached


_ORPHAN = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "cnnspec.kernels.cpu.background",
                          str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
child.stdin.write(sys.stdin.buffer.read())  # the requests, queued in the pipe
child.stdin.flush()
print(child.pid, flush=True)
os._exit(0)  # as if killed: the pipe stays readable to its end
"""


def test_a_child_whose_parent_is_gone_compiles_nothing_more(tmp_path):
    """A parent killed with requests still queued: its child stops instead of compiling
    them (after kill -9 it had compiled everything the parent had asked for)."""
    import base64
    import pickle
    import time

    from cnnspec.kernels.cpu import merge

    x = np.zeros(24, np.float32)
    sig = tuple(map(merge._add2.parallel.typeof_pyval, (x, x, 1, x)))
    request = b"parallel " + base64.b64encode(
        pickle.dumps((0, merge.__name__, "_add2", "parallel", sig))
    )
    parent = subprocess.run(
        [sys.executable, "-c", _ORPHAN], input=request + b"\n", capture_output=True, cwd=ROOT,
        env=dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path)),
    )  # fmt: skip
    child = Path("/proc") / parent.stdout.decode().strip()
    for _ in range(1200):  # bounded work, not a time limit: it stops once it has started
        if not child.exists() or "Z" in (child / "stat").read_text().split()[2]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the orphaned child is still running")
    assert not list(tmp_path.rglob("*.nb[ic]"))  # nothing compiled into the cache
