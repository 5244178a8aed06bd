"""The CPU backend: numpy arrays in host memory, Numba kernels."""

from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np

from ...backend import Backend


def kernel_name(dispatcher) -> str:
    """`family.function` of a jitted kernel (its module's last name)."""
    func = dispatcher.py_func
    return f"{func.__module__.rsplit('.', 1)[-1]}.{func.__qualname__}"


class CpuBackend(Backend):
    name = "cpu"

    @contextmanager
    def compiling(self, say, alone=True):
        # Numba announces a compile only on a cache miss; nested compiles (a kernel's
        # jitted helpers) belong to the kernel being compiled.
        from numba.core import event

        class Notice(event.Listener):
            def __init__(self):
                self.depth = 0
                self.headed = False
                self.started = 0.0

            def head(self):
                if not self.headed:
                    say("compiling kernels (first run only; cached afterwards)")
                    self.headed = True

            def tell(self, line):  # a line of the background builds', under the heading
                self.head()
                say(line)

            def on_start(self, ev):
                self.depth += 1
                if self.depth > 1:
                    return
                self.head()
                self.started = time.process_time()

            def on_end(self, ev):
                self.depth -= 1
                if self.depth == 0:
                    say(
                        f"  {kernel_name(ev.data['dispatcher'])}: "
                        f"{time.process_time() - self.started:.1f} s"
                    )

        from .background import BACKGROUND

        notice = Notice()
        event.register("numba:compile", notice)
        try:
            # parallel builds (and, alone, the convs' builds): compiled by a child process
            with BACKGROUND.deferring(notice.tell, stand_ins=alone):
                yield
        finally:
            event.unregister("numba:compile", notice)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def to_host(self, array) -> np.ndarray:
        return np.array(array, copy=True)

    def to_device(self, host, out) -> None:
        np.copyto(out, host, casting="same_kind")

    def optimizer(self, model, **settings):
        from ...train.optim import FlatSGD

        return FlatSGD(model, **settings)


BACKEND = CpuBackend()
