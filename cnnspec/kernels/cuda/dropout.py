"""Inverted dropout: out = x * mask, the mask (0 or 1/(1-rate)) drawn by the host's
generator (so a CPU and a CUDA run drop the same units) and staged on the device."""

from __future__ import annotations

from numba import cuda

from ._common import THREADS, blocks, check_shape, flat, jit_kernel

__all__ = ["dropout_apply"]


@jit_kernel
def _apply(x, mask, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = x[i] * mask[i]


def dropout_apply(x, mask, out):
    """out = x * mask (elementwise; forward and backward alike)."""
    check_shape("mask", mask, out.shape)
    _apply[blocks(out.size), THREADS](flat(x), flat(mask), flat(out))
