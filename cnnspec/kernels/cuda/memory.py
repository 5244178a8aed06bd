"""Device memory chores: filling an array with a value on the device."""

from __future__ import annotations

from numba import cuda

from ._common import THREADS, blocks, flat, jit_kernel


@jit_kernel
def _fill(a, value):
    i = cuda.grid(1)
    if i < a.size:
        a[i] = value


def fill(a, value) -> None:
    """Every element of the (contiguous) device array `a` set to `value`."""
    if a.size:
        _fill[blocks(a.size), THREADS](flat(a), value)
