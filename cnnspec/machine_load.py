"""The CPU time processes have spent, from /proc/stat: what `cnnspec bench` and the
benchmarks report as other processes' load, and what the CPU backend's thread governor
reads to give cores back to them. No Numba here."""

from __future__ import annotations

import os
import time


def busy_seconds(cpus=None) -> float | None:
    """CPU seconds every process has spent so far on all CPUs, or on the CPUs numbered in
    `cpus` (their /proc/stat lines); None where /proc/stat cannot be read. Time stolen by
    the hypervisor counts as busy: the cores were not ours then either."""
    try:
        with open("/proc/stat") as f:
            if cpus is None:
                lines = [f.readline()]
            else:
                wanted = {f"cpu{c}" for c in cpus}
                lines = [line for line in f if line.split(maxsplit=1)[0] in wanted]
        total = 0
        for line in lines:
            fields = [int(v) for v in line.split()[1:]]
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            total += sum(fields[:8]) - idle
    except (OSError, ValueError, IndexError):
        return None
    return total / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds this process (all its threads) has spent so far."""
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """The CPU other processes use while we measure: busy time (`busy`: of the whole
    machine by default) minus ours (`own`), over the wall time since `start`."""

    def __init__(self, own=own_seconds, busy=busy_seconds, clock=time.perf_counter):
        self.own, self.busy, self.clock = own, busy, clock
        self.start()

    def start(self):
        self.t0, self.busy0, self.own0 = self.clock(), self.busy(), self.own()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def external_cores(self) -> float | None:
        busy = self.busy()
        wall = self.elapsed()
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0 - (self.own() - self.own0)) / wall)
