"""How many threads the kernels use while other processes are busy on the same cores.

Numba's OpenMP workers spin after each parallel loop, so that the next of a step's many
loops starts at once: on a quiet 2-core AMD EPYC (Zen 5), libgomp's default spin gave a
2-thread LeNet-5 b64 step 1.1-1.8x and ResNet-20 b128 1.35x the speed of a short one
(GOMP_SPINCOUNT=1000). Beside a busy process, though, a spinning worker takes the core
its lagging partner needs: 2 threads ran LeNet-5 at half the 1-thread speed beside it.
So the model looks, every `WINDOW` seconds while it computes, at how much of its CPUs
other processes used, and runs on as many threads as cores are left to it (never more
than Numba's setting, never fewer than one). A lone thread has no partner to wait for.
Only a window in which the model computed most of the time counts: while it waits
(between steps, or while another framework takes its turn in a benchmark) others may use
every core without competing, and their load then says nothing about the next step.

Float sums split over threads (conv weight gradients, batch-norm statistics) give the
same bits for the same thread count, so a run whose thread count changed under load
can differ from another in the last bits; CNNSPEC_ADAPTIVE_THREADS=0 keeps the count
fixed (the tests set it).
"""

from __future__ import annotations

import math
import os
import threading
import time

from ...machine_load import LoadMeter, busy_seconds, own_seconds

WINDOW = 0.25  # seconds between looks: LeNet-5 runs ~100 steps in one, ResNet-20 ~1
SLACK = 0.3  # cores others may use before a thread gives its core up (a daemon's blip)
COMPUTING = 0.5  # share of a window the model must have computed for the window to count


def _our_cpus() -> list[int] | None:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


class ThreadGovernor:
    """Threads for the next computation: `threads(ceiling)`. `busy` and `own` (CPU
    seconds of every process on our CPUs, and of this process) and `clock` are
    injectable for tests."""

    def __init__(self, cpus=None, busy=None, own=own_seconds, clock=time.perf_counter):
        self.cpus = cpus if cpus is not None else _our_cpus()
        busy = busy if busy is not None else (lambda: busy_seconds(self.cpus))
        self.meter = LoadMeter(own, busy, clock)  # others' load since the last look
        self.lock = threading.Lock()
        self.allowed = None  # threads the last look allows; None: no limit (or not looked yet)
        self.clock = clock
        self.computed = 0.0  # seconds the model computed since the last look

    def _look(self) -> None:
        others = self.meter.external_cores()
        computed, window = self.computed, self.meter.elapsed()
        self.meter.start()
        self.computed = 0.0
        if computed < COMPUTING * window:
            return  # mostly idle: the last verdict stands
        if others is None or self.cpus is None:
            self.allowed = None
        else:
            free = len(self.cpus) - others
            self.allowed = None if others <= SLACK else max(1, math.floor(free + SLACK))

    def threads(self, ceiling: int) -> int:
        with self.lock:
            if self.meter.elapsed() >= WINDOW:
                self._look()
            return ceiling if self.allowed is None else max(1, min(ceiling, self.allowed))

    def add_computed(self, seconds: float) -> None:
        with self.lock:
            self.computed += seconds


GOVERNOR = ThreadGovernor()


def adaptive() -> bool:
    return os.environ.get("CNNSPEC_ADAPTIVE_THREADS", "1") != "0"


def count() -> int:
    """Numba's thread count for this thread: numba.get_num_threads without the lock it
    takes on every call (~0.8 us; a LeNet-5 step asked ~11 times)."""
    return _count()


def _first_count() -> int:
    global _count
    import numba

    n = numba.get_num_threads()  # (starts the threading layer, once)
    from numba.np.ufunc import parallel

    # the threading layer's own getter, set once it has started (Numba 0.60-0.68)
    _count = getattr(parallel, "_get_num_threads", None) or numba.get_num_threads
    return n


_count = _first_count


class governed:  # noqa: N801 (used as a function: `with governed():`)
    """Run the enclosed kernels on the threads the governor allows (this thread's Numba
    setting when it is off, or before it has looked twice), then restore the setting.
    A class, not a generator: ~1.5 us less a call (two a LeNet-5 step)."""

    __slots__ = ("ceiling", "threads", "start")

    def __enter__(self):
        self.start = None
        if not adaptive():
            return self
        self.ceiling = ceiling = count()
        self.threads = GOVERNOR.threads(ceiling)
        self.start = GOVERNOR.clock()
        if self.threads != ceiling:  # (the usual case sets nothing: microseconds a call)
            import numba

            numba.set_num_threads(self.threads)
        return self

    def __exit__(self, *exc):
        if self.start is None:
            return
        try:
            if self.threads != self.ceiling:
                import numba

                numba.set_num_threads(self.ceiling)
        finally:
            GOVERNOR.add_computed(GOVERNOR.clock() - self.start)
