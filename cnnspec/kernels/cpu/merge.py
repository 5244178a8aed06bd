"""Residual add, with a fused ReLU: one pass over memory each way instead of two
(numpy's copy-then-add) or three (with a separate ReLU layer)."""

from __future__ import annotations

from numba import njit, prange

from ._common import check_c, check_shape

__all__ = ["add_forward", "add_backward"]


@njit(parallel=True, cache=True)
def _add2(a, b, act, out):
    for i in prange(out.size):
        v = a[i] + b[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


@njit(parallel=True, cache=True)
def _add_into(x, act, out):
    for i in prange(out.size):
        v = out[i] + x[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


@njit(parallel=True, cache=True)
def _mask(dout, y, act, dx):
    for i in prange(dx.size):
        yv = y[i]  # loaded unconditionally: a conditional load blocks SIMD
        dx[i] = dout[i] if (yv > 0 or act == 0) else 0.0


def add_forward(xs, out, act=0):
    """out = act(sum of xs); act 1 is a ReLU (applied once, after the last add)."""
    check_c(out=out, **{f"x{i}": x for i, x in enumerate(xs)})
    for x in xs:
        check_shape("input", x, out.shape)
    flat = [x.reshape(-1) for x in xs]
    o = out.reshape(-1)
    if len(xs) == 1:
        _mask(flat[0], flat[0], int(act), o)  # relu(x) = x where x > 0
        return
    _add2(flat[0], flat[1], act if len(xs) == 2 else 0, o)
    for i, x in enumerate(flat[2:]):
        _add_into(x, act if i == len(flat) - 3 else 0, o)


@njit(parallel=True, cache=True)
def _mask2(dout, y, act, dx0, dx1):
    for i in prange(dx0.size):
        yv = y[i]
        g = dout[i] if (yv > 0 or act == 0) else 0.0
        dx0[i] = g
        dx1[i] = g


def add_backward(dout, out, act, dxs):
    """Each non-None dx = dout, masked where a fused ReLU's output `out` is 0; a dx
    given twice (inputs sharing one gradient buffer) is written once."""
    check_c(dout=dout, out=out)
    targets = []
    for dx in dxs:
        if dx is not None and not any(dx is t for t in targets):
            targets.append(dx)
    for dx in targets:
        check_shape("dx", dx, dout.shape)
        check_c(dx=dx)
    d, y = dout.reshape(-1), out.reshape(-1)
    if len(targets) >= 2:  # a residual block: both branches in one pass
        _mask2(d, y, int(act), targets[0].reshape(-1), targets[1].reshape(-1))
    elif targets:
        _mask(d, y, int(act), targets[0].reshape(-1))
    for dx in targets[2:]:
        dx[...] = targets[0]
