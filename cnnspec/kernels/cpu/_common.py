"""Small helpers shared by the CPU kernels (shape checks, index ranges)."""

from __future__ import annotations

import numpy as np
from numba import njit


def check_c(**arrays: np.ndarray | None) -> None:
    """Raise if any (non-None) array is not C-contiguous.

    The kernels write through reshaped views; a non-contiguous output would make
    ``reshape`` return a copy and the result would silently be lost.
    """
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")


def check_shape(name: str, a: np.ndarray, shape: tuple[int, ...]) -> None:
    if tuple(a.shape) != tuple(int(s) for s in shape):
        raise ValueError(f"{name} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def as_3d(a: np.ndarray) -> np.ndarray:
    """View an (N, C, ...) array as (N, C, S); S = 1 for 2-D input."""
    if a.ndim < 2:
        raise ValueError(f"expected an array with a channel axis, got shape {a.shape}")
    return a.reshape(a.shape[0], a.shape[1], -1)


@njit(cache=True)
def valid_range(off, stride, size, n_out):
    """Indices o in [lo, hi) with 0 <= o*stride + off < size, clipped to [0, n_out)."""
    if off < 0:
        lo = (-off + stride - 1) // stride
    else:
        lo = 0
    last = size - 1 - off
    if last < 0:
        hi = 0
    else:
        hi = last // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi
