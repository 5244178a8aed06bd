"""Builds compiled in a background process while the first steps run without them.

A kernel's parallel=True build costs several times the CPU of its serial one to compile
(Numba optimises a parallel loop's body in four libraries, one linking the next): on 2
threads LeNet-5's cold first step took ~18 s, ~7 s on one. While `deferring()` is on
(`CpuBackend.compiling`: `cnnspec train`, `eval`, `predict`; CNNSPEC_BACKGROUND_BUILDS=0
keeps it off), a kernel asked for a parallel build that is neither loaded nor in Numba's
on-disk cache runs its serial build (the same bits: a prange iteration writes only its
own outputs, and the thread count the tiles are cut for is an argument), and a child
process compiles the parallel build into the cache, on another core, niced; the model
loads it at its next call once it is there. A run that ends first kills the child: it
ran at one thread's speed, and started about twice as soon (LeNet-5's first epoch, cold,
2 threads: 18-21 s -> 9-10 s).

The convolutions' builds, serial ones too, are the child's alone (`Builds.now`): they
were ~9 of the 10.5 s of CPU a cold LeNet-5 first step took on one thread, and while the
child compiles them a numpy convolution (conv_numpy.py) stands in. So are the builds of
the other kernels the specs' networks run (pools, losses, norms, residual adds, LeNet-5
(1998)'s scaled tanh and RBF units: `SplitBySize.or_stand_in`), each with a numpy stand-in
beside it: their cold first step compiles nothing in the process (LeNet-5's ends ~1 s
after python starts). On more threads the
child takes the serial build first (its own compiling leaves the model one core), and it
serves serial requests before the parallel ones queued meanwhile. A process without a
second core compiles everything itself, as without a child.

Not a thread: Numba compiles under one process-wide lock, and its typing and lowering
hold the GIL, which the kernels (not nogil) hold while they run.
"""

from __future__ import annotations

import base64
import importlib
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

PENDING, BUILT, LOADED, FAILED = "pending", "built", "loaded", "failed"


def load_cached(dispatcher, sig) -> bool:
    """Load a build of `dispatcher` for the argument types `sig` from Numba's on-disk
    cache, never compiling it: whether it is loaded now. (Dispatcher.compile's cache
    path, without its fall-through to the compiler.)"""
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        if dispatcher.overloads.get(sig) is not None:
            return True
        cres = dispatcher._cache.load_overload(sig, dispatcher.targetctx)
        if cres is None:
            return False
        dispatcher._cache_hits[sig] += 1
        dispatcher.targetctx.insert_user_function(cres.entry_point, cres.fndesc, [cres.library])
        dispatcher.add_overload(cres)
        return True


class BackgroundBuilds:
    """The parallel builds that `Builds.pick` defers while `active`: their state by
    (builds, argument types), and the child process that compiles them. `command`
    starts the child (injectable for tests)."""

    def __init__(self, command=None):
        self.command = command
        self.active = False
        self.say = lambda line: None
        self.state: dict = {}
        self.asked: dict = {}  # key -> when it was asked for (its "ready after" line)
        self.requests: list = []  # keys by request number (the child answers by number)
        self.child = None
        self.lock = threading.Lock()
        try:
            self.spare_core = len(os.sched_getaffinity(0)) > 1  # for the child
        except (AttributeError, OSError):
            self.spare_core = (os.cpu_count() or 1) > 1
        self.stand_ins = False  # whether `Builds.now` may hand the caller its stand-in

    @contextmanager
    def deferring(self, say=None, stand_ins=True):
        """While inside, parallel builds that would compile are deferred as above, and
        with `stand_ins` the convs' builds too (not for one of several ranks of a run:
        their child would take a core from another rank and come late); `say` gets a
        line when one is deferred and when it is ready. Leaving kills the child (what it
        finished is in Numba's cache for the next run)."""
        import numba

        wanted = os.environ.get("CNNSPEC_BACKGROUND_BUILDS", "1") != "0"
        self.active = wanted and not numba.config.DISABLE_JIT  # (no builds to defer)
        self.stand_ins = stand_ins and self.spare_core
        self.say = say or (lambda line: None)
        try:
            yield self
        finally:
            self.active = False
            self.say = lambda line: None
            self.stop()

    def run(self, builds, *args):
        """Call the parallel build of `builds` if it is loaded or can be loaded, else
        its serial build, asking the child for the parallel one."""
        sig = tuple(map(builds.parallel.typeof_pyval, args))
        if self.ready(builds.parallel, sig, "the serial build"):
            return builds.parallel(*args)  # or FAILED: compiled here, as without us
        return builds.serial(*args)

    def ready(self, build, sig, meanwhile: str | None) -> bool:
        """Whether `build` (a Numba dispatcher) runs arguments of the types `sig` now: it
        is loaded, in the cache, or compiled here (no child could take it). Else the
        child is asked for it, `meanwhile` (what runs instead) is said, and it is False
        until it is ready; with `meanwhile` None nothing is asked."""
        key = (build, sig)
        state = self.state.get(key)
        if state is None:
            if load_cached(build, sig):
                state = self.state[key] = LOADED
            elif meanwhile is None:
                return False
            else:
                self.state[key] = PENDING
                self._ask(key, meanwhile)
                state = self.state[key]  # FAILED if no child could take it
        if state == BUILT:
            # the child's build, from the cache (compiled here if the cache could not keep it)
            build.compile(sig)
            state = self.state[key] = LOADED
            waited = time.perf_counter() - self.asked[key]
            self.say(f"  {_name(build)}: ready after {waited:.1f} s")
        return state != PENDING

    def settle(self) -> None:
        """After a computation: stop deferring once builds were asked for and none is
        left to wait for (a deferred call costs ~4 us an argument to type; a computation
        that asked for none, on one thread, pays nothing). A build the child finished
        and this process has not loaded is in the cache: Numba loads it at its next call
        (a conv's serial build on more threads may never have one)."""
        if self.state and PENDING not in self.state.values():
            self.active = False

    def wait(self, timeout: float) -> bool:
        """Until nothing is pending (tests): whether that happened within `timeout`."""
        end = time.monotonic() + timeout
        while any(s == PENDING for s in self.state.values()):
            if time.monotonic() > end:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        with self.lock:
            child, self.child = self.child, None
        if child is None:
            return
        try:
            child.stdin.close()
        except OSError:
            pass
        if child.poll() is None:
            child.kill()
        child.wait()
        for key, s in list(self.state.items()):
            if s == PENDING:
                del self.state[key]  # asked for again by the next deferring()

    def _ask(self, key, meanwhile: str) -> None:
        build, sig = key
        func = build.py_func
        which = "parallel" if build.targetoptions.get("parallel") else "serial"
        with self.lock:
            number = len(self.requests)
            self.requests.append(key)
            self.asked[key] = time.perf_counter()
            try:
                if self.child is None:
                    self.child = self._start()
                request = (number, func.__module__, func.__name__, which, sig)
                line = which.encode() + b" " + base64.b64encode(pickle.dumps(request))
                self.child.stdin.write(line + b"\n")
                self.child.stdin.flush()
            except (OSError, ValueError, pickle.PicklingError):
                self.state[key] = FAILED
                return
        self.say(
            f"  {_name(build)}: compiling in a background process; "
            f"{meanwhile} runs until it is ready"
        )

    def _start(self):
        child = subprocess.Popen(
            self.command or [sys.executable, "-m", __name__, str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONWARNINGS="ignore"),
        )
        threading.Thread(target=self._listen, args=(child,), daemon=True).start()
        return child

    def _listen(self, child) -> None:
        """The child's answers: `ok N` (request N is in the cache) or `error N ...`."""
        for line in child.stdout:
            word, _, rest = line.decode(errors="replace").partition(" ")
            number = int(rest.split(" ", 1)[0]) if rest[:1].isdigit() else -1
            if 0 <= number < len(self.requests):
                key = self.requests[number]
                if self.state.get(key) == PENDING:
                    self.state[key] = BUILT if word == "ok" else FAILED
            if word != "ok":  # something is wrong there: this process compiles the rest
                child.kill()  # (and no two processes write one cache index at once)
        if self.child is not child:
            return  # stopped: stop() forgets what it left pending
        for key, s in list(self.state.items()):  # the child died: compile them here
            if s == PENDING:
                self.state[key] = FAILED


def _name(build) -> str:
    """`family.function (parallel build)` (or serial) of a Builds' build."""
    from .backend import kernel_name

    which = "parallel" if build.targetoptions.get("parallel") else "serial"
    return f"{kernel_name(build).removesuffix('_serial')} ({which} build)"


BACKGROUND = BackgroundBuilds()


def _serve() -> None:
    """The child: compile each requested build into Numba's cache, answer; stop
    at the end of the requests (the parent closed them) or when the parent is gone."""
    try:
        os.nice(10)  # the model's own steps come first
    except (AttributeError, OSError):
        pass
    from numba.core import caching

    # Numba caches every function it compiles, the jitted helpers too, and the parent
    # compiles (and caches) the same helpers meanwhile. Two processes adding different
    # signatures to one cache index can pair one's key with the other's code (entries
    # are numbered by the index's length), so the child saves only the builds asked of
    # it, whose indexes no one else writes.
    target = []
    save_overload = caching.Cache.save_overload
    caching.Cache.save_overload = lambda cache, *args: (
        save_overload(cache, *args) if target and cache is target[0] else None
    )
    parent = int(sys.argv[1]) if len(sys.argv) > 1 else os.getppid()  # (it may be gone)
    requests = queue.PriorityQueue()

    def read():  # serial builds first (a model waiting for one runs a stand-in), in order
        for order, line in enumerate(sys.stdin.buffer):
            which, _, request = line.partition(b" ")
            requests.put((which != b"serial", order, request))
        requests.put((2, 0, None))  # the end of the requests

    threading.Thread(target=read, daemon=True).start()
    while (request := requests.get()[2]) is not None:
        if os.getppid() != parent:
            break  # the parent was killed: its queued requests are no one's
        number = -1
        try:
            number, module, name, which, sig = pickle.loads(base64.b64decode(request))
            build = getattr(getattr(importlib.import_module(module), name), which)
            target[:] = [build._cache]
            build.compile(sig)
            answer = f"ok {number}"
        except Exception as exc:  # noqa: BLE001 -- any failure: the parent compiles it
            answer = f"error {number} {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(answer + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    _serve()
