"""The CPU backend: numpy arrays in host memory, Numba kernels."""

from __future__ import annotations

import numpy as np

from ...backend import Backend


class CpuBackend(Backend):
    name = "cpu"

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype)

    def to_host(self, array) -> np.ndarray:
        return np.array(array, copy=True)

    def to_device(self, host, out) -> None:
        np.copyto(out, host, casting="same_kind")


BACKEND = CpuBackend()
