"""Launch geometry, argument checks and small device scratch shared by the CUDA kernels.

Jitted helpers live next to their callers, as in `kernels/cpu/`.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
from numba import cuda

from ..checks import check_shape as check_shape  # the kernels import it from here

ACT_NONE, ACT_RELU = 0, 1
# Threads per block of the elementwise and per-channel kernels. Numba's CUDA simulator
# runs every CUDA thread as a Python thread: there, smaller blocks keep the tests fast
# (the kernels work with any power of two).
SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
THREADS = 32 if SIMULATED else 256

_scratch: dict = {}

# The decorator of every kernel. A kernel compiles once per machine, not once per run:
# numba-cuda keeps its PTX and cubin on disk (in __pycache__ beside the source, or under
# NUMBA_CACHE_DIR), keyed by the kernel's bytecode and closure (a tile factory's tile and
# inner step), the GPU's compute capability and the CUDA and numba-cuda versions. Like
# Numba's CPU cache it does not notice an edit to a device function of another module
# (tree_sum below): after changing one, delete the .nbi/.nbc files of its callers.
_cached_jit = cuda.jit(cache=True)
KERNELS: list = []  # every kernel made so far (a tile factory's on first use): bench's cache count


def jit_kernel(fn):
    kernel = _cached_jit(fn)
    KERNELS.append(kernel)
    return kernel


def tile_threads(tile) -> int:
    """Threads of a register-blocked GEMM tile (BM, BN, BK, TM, TN): one per TM x TN block."""
    bm, bn, _, tm, tn = tile
    return (bm // tm) * (bn // tn)


@cache
def tile_product(bm, bn, bk, tm, tn):
    """The inner step of every register-blocked GEMM kernel: acc (TM x TN, registers) +=
    this thread's share of A_s (BK x BM) times B_s (BK x BN), both in shared memory. A
    thread owns rows ty + i*(BM/TM) and columns tx + j*(BN/TN): a warp reads a tile row
    without bank conflicts and stores whole rows of the output."""
    tx_, ty_ = bn // tn, bm // tm

    @cuda.jit(device=True, inline="always")
    def product(a_s, b_s, ty, tx, acc, ar, br):
        for kk in range(bk):
            for i in range(tm):
                ar[i] = a_s[kk, ty + i * ty_]
            for j in range(tn):
                br[j] = b_s[kk, tx + j * tx_]
            for i in range(tm):
                for j in range(tn):
                    acc[i, j] += ar[i] * br[j]

    return product


@cuda.jit(device=True, inline="always")
def tree_sum(part, tid):
    """part[0] <- the sum of a block's THREADS partial sums, as a tree in a fixed order
    (no atomics, no warp shuffles: the same bits every run, and the simulator runs it)."""
    cuda.syncthreads()
    half = THREADS // 2
    while half > 0:
        if tid < half:
            part[tid] += part[tid + half]
        cuda.syncthreads()
        half //= 2


def blocks(n: int, threads: int = THREADS) -> int:
    return max(1, (int(n) + threads - 1) // threads)


def check_float32(**arrays) -> None:
    for name, a in arrays.items():
        if a is not None and np.dtype(a.dtype) != np.float32:
            raise ValueError(f"{name} must be float32 on the CUDA backend, got {a.dtype}")


def scratch(key: str, shape, dtype=np.float32, fill=None):
    """A device array kept for the life of the process, one per (key, shape, dtype):
    per-channel constants and labels are staged here instead of allocated per call.
    With `fill`, it holds that value from its creation (copied in once)."""
    k = (key, tuple(shape), np.dtype(dtype).str)
    if k not in _scratch:
        host = None if fill is None else np.full(shape, fill, dtype)
        _scratch[k] = cuda.device_array(shape, dtype) if host is None else cuda.to_device(host)
    return _scratch[k]


def filled(shape, value: float):
    """A device array of `value` (a missing gamma is ones, a missing beta zeros); nothing
    writes it, so it is copied in once, not at every call."""
    return scratch(f"fill{value!r}", shape, fill=value)


def flat(a):
    return a.reshape(-1)


def empty_like_none():
    """A one-element stand-in for an optional array the kernel will not touch."""
    return scratch("none", (1,))
