"""Input batches staged on a second stream: a batch handed over early (`Model.stage`) is
copied into a pinned host slot at once, then transferred to its device slot on a copy
stream while the step before it computes; the step that takes it waits on an event
for the transfer, not for the host.

The kernels run on the default stream. The copy stream is created non-blocking: a
blocking one (`cuda.stream()`) would wait for the legacy default stream's kernels
before every copy, and they for it, so nothing would overlap.
"""

from __future__ import annotations

from functools import cache, partial

import numpy as np
from numba import cuda

from ...backend import Backend, Stager
from ._common import SIMULATED

COMPUTE = 0  # the stream every kernel launches on (numba's default)
# Events only order streams here; timing makes recording them dearer. The simulator's
# events take no arguments (and order nothing: it runs everything at once).
_event = cuda.event if SIMULATED else partial(cuda.event, timing=False)


@cache
def copy_stream():
    """The process's stream for input transfers, non-blocking (created once)."""
    if SIMULATED:  # the simulator has no external streams; it runs everything at once
        return cuda.stream()
    from cuda.bindings import driver

    cuda.current_context()  # numba's context is the current one
    err, handle = driver.cuStreamCreate(driver.CUstream_flags.CU_STREAM_NON_BLOCKING)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cannot create the input copy stream: {err.name}")
    return cuda.external_stream(int(handle))  # lives as long as the process


class CudaStager(Stager):
    """Two device slots, each with a pinned host twin and two events: `copied` (the
    slot's transfer has arrived) and `released` (the steps issued before its refill
    are done with it)."""

    def __init__(self, backend: Backend, shape, dtype):
        super().__init__(backend, shape, dtype)
        self.pinned = [cuda.pinned_array(self.shape, self.dtype) for _ in range(2)]
        self.copied = [_event() for _ in range(2)]
        self.released = [_event() for _ in range(2)]
        self.stream = copy_stream()

    def _fill(self, slot: int, host: np.ndarray) -> None:
        # the slot's previous transfer must have left the pinned buffer before it is refilled
        self.copied[slot].synchronize()
        np.copyto(self.pinned[slot], host, casting="same_kind")
        # the device slot is refilled only after the steps issued so far, which include
        # every step that read the batch it held (taken before this put: Stager.take)
        self.released[slot].record(COMPUTE)
        self.released[slot].wait(self.stream)
        self.slots[slot].copy_to_device(self.pinned[slot], stream=self.stream)
        self.copied[slot].record(self.stream)

    def _arrived(self, slot: int) -> None:
        self.copied[slot].wait(COMPUTE)
