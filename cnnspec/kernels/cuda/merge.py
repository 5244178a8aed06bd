"""Residual add with a fused ReLU, one thread per element, as the CPU kernels."""

from __future__ import annotations

from numba import cuda

from ._common import THREADS, blocks, check_shape, flat, jit_kernel

__all__ = ["add_forward", "add_backward"]


@jit_kernel
def _add2(a, b, act, out):
    i = cuda.grid(1)
    if i < out.size:
        v = a[i] + b[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


@jit_kernel
def _add_into(x, act, out):
    i = cuda.grid(1)
    if i < out.size:
        v = out[i] + x[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


@jit_kernel
def _mask(dout, y, act, dx):
    i = cuda.grid(1)
    if i < dx.size:
        dx[i] = dout[i] if (act == 0 or y[i] > 0) else 0.0


@jit_kernel
def _mask2(dout, y, act, dx0, dx1):
    i = cuda.grid(1)
    if i < dx0.size:
        g = dout[i] if (act == 0 or y[i] > 0) else 0.0
        dx0[i] = g
        dx1[i] = g


def add_forward(xs, out, act=0):
    """out = act(sum of xs); act 1 is a ReLU (applied once, after the last add)."""
    for x in xs:
        check_shape("input", x, out.shape)
    flats, o, grid = [flat(x) for x in xs], flat(out), blocks(out.size)
    if len(xs) == 1:
        _mask[grid, THREADS](flats[0], flats[0], int(act), o)
        return
    _add2[grid, THREADS](flats[0], flats[1], int(act) if len(xs) == 2 else 0, o)
    for i, x in enumerate(flats[2:]):
        _add_into[grid, THREADS](x, int(act) if i == len(flats) - 3 else 0, o)


def add_backward(dout, out, act, dxs):
    """Each non-None dx = dout, masked where a fused ReLU's output `out` is 0."""
    targets = [dx for dx in dxs if dx is not None]
    for dx in targets:
        check_shape("dx", dx, dout.shape)
    d, y, grid = flat(dout), flat(out), blocks(dout.size)
    if len(targets) >= 2:  # a residual block: both branches in one pass
        _mask2[grid, THREADS](d, y, int(act), flat(targets[0]), flat(targets[1]))
    elif targets:
        _mask[grid, THREADS](d, y, int(act), flat(targets[0]))
    for dx in targets[2:]:
        dx[...] = targets[0]
