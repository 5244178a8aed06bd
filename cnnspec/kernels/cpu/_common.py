"""Plain-Python helpers shared by the CPU kernels (argument checks, views).

Jitted helpers live next to their callers: Numba's on-disk cache does not notice when a
function in another module changes.
"""

from __future__ import annotations

import numpy as np


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
