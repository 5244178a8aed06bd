"""Finite-difference helpers used by the kernel tests (and usable by layer tests)."""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np


def numerical_grad(
    f: Callable[[], float], x: np.ndarray, eps: float = 1e-6, serial: bool = True
) -> np.ndarray:
    """Central finite-difference gradient of the scalar ``f()`` w.r.t. ``x``.

    ``x`` is perturbed in place (and restored); ``f`` must read it on every call.
    With ``serial`` the many tiny kernel calls run on one Numba thread (the kernels are
    deterministic for any thread count); this avoids thread wake-up costs that dominate
    on busy machines.
    """
    grad = np.zeros(x.shape, dtype=np.float64)
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("x must be contiguous so that it can be perturbed in place")
    g = grad.reshape(-1)
    threads = numba.get_num_threads()
    if serial:
        numba.set_num_threads(1)
    try:
        for i in range(flat.size):
            orig = flat[i]
            flat[i] = orig + eps
            fp = f()
            flat[i] = orig - eps
            fm = f()
            flat[i] = orig
            g[i] = (fp - fm) / (2.0 * eps)
    finally:
        numba.set_num_threads(threads)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max(max|b|, tiny): a scale-aware relative error."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(float(np.max(np.abs(b))), float(np.max(np.abs(a))), 1e-12)
    return float(np.max(np.abs(a - b))) / scale
