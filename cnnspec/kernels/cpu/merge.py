"""Residual add, with a fused ReLU: one pass over memory each way instead of two
(numpy's copy-then-add) or three (with a separate ReLU layer); a batch norm before it
is applied as its input is read (`in_affine`), so the norm need not write its output."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import (
    IN_AFFINE,
    IN_COPY,
    SplitBySize,
    as_3d,
    check_c,
    check_shape,
    input_hook,
    relu_numpy,
)

__all__ = ["add_forward", "add_backward"]


# Each kernel's numpy stand-in (`_numpy`) runs a first run's first steps while a child
# compiles the kernel's builds (pool.py's): the same values.
@SplitBySize
def _add2(a, b, act, out):
    for i in prange(out.size):
        v = a[i] + b[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


def _add2_numpy(a, b, act, out):
    out[...] = relu_numpy(a + b, act)


@SplitBySize
def _add_into(x, act, out):
    for i in prange(out.size):
        v = out[i] + x[i]
        out[i] = v if (act == 0 or v > 0) else 0.0


@SplitBySize
def _mask(dout, y, act, dx):
    for i in prange(dx.size):
        yv = y[i]  # loaded unconditionally: a conditional load blocks SIMD
        dx[i] = dout[i] if (yv > 0 or act == 0) else 0.0


def _mask_numpy(dout, y, act, dx):
    dx[...] = np.where(y > 0, dout, dout.dtype.type(0)) if act else dout


@njit(cache=True)
def _hooked(v, a, b, mode, zero):
    if mode == IN_COPY:
        return v
    t = v * a + b  # as the norm's own pass computes it
    return t if (mode == IN_AFFINE or t > 0) else zero


@SplitBySize
def _add_hooked(x, aff, mode, act, first, out):
    """out (=, first; else +=) h(x) per channel (N, C, S), then act."""
    n_, c_, s_ = out.shape
    zero = out.dtype.type(0)  # in the data's dtype: float32 sums stay float32
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        ca = c if mode != IN_COPY else 0
        a, b = aff[0, ca], aff[1, ca]
        src, dst = x[n, c], out[n, c]
        for i in range(s_):
            v = _hooked(src[i], a, b, mode, zero)
            v = v if first else dst[i] + v
            dst[i] = v if (act == 0 or v > 0) else zero


def _hooked_numpy(v, aff, mode):
    if mode == IN_COPY:
        return v
    t = v * aff[0][:, None] + aff[1][:, None]  # (the channel axis of (N, C, S))
    return relu_numpy(t, mode != IN_AFFINE)


@SplitBySize
def _add2_hooked(x, y, affx, modex, affy, modey, act, out):
    """out = act(hx(x) + hy(y)) per channel (N, C, S): both inputs in one pass."""
    n_, c_, s_ = out.shape
    zero = out.dtype.type(0)
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        cx = c if modex != IN_COPY else 0
        cy = c if modey != IN_COPY else 0
        ax, bx, ay, by = affx[0, cx], affx[1, cx], affy[0, cy], affy[1, cy]
        px, py, dst = x[n, c], y[n, c], out[n, c]
        for i in range(s_):
            v = _hooked(px[i], ax, bx, modex, zero) + _hooked(py[i], ay, by, modey, zero)
            dst[i] = v if (act == 0 or v > 0) else zero


def _add2_hooked_numpy(x, y, affx, modex, affy, modey, act, out):
    out[...] = relu_numpy(_hooked_numpy(x, affx, modex) + _hooked_numpy(y, affy, modey), act)


def add_forward(xs, out, act=0, in_affine=None):
    """out = act(sum of xs); act 1 is a ReLU (applied once, after the last add).
    in_affine: None, or per input None or a batch norm's (scale, shift, relu) to apply
    to it as it is read (see conv2d_forward)."""
    check_c(out=out, **{f"x{i}": x for i, x in enumerate(xs)})
    for x in xs:
        check_shape("input", x, out.shape)
    if in_affine is not None and any(h is not None for h in in_affine):
        if len(in_affine) != len(xs):
            raise ValueError("in_affine needs one entry (or None) per input")
        hooks = [input_hook(h, x) for h, x in zip(in_affine, xs, strict=True)]
        x3, o3 = [as_3d(x) for x in xs], as_3d(out)
        if len(xs) == 2:
            _add2_hooked.or_stand_in(
                _add2_hooked_numpy, x3[0], x3[1], *hooks[0], *hooks[1], int(act), o3
            )
            return
        for i, (x, (aff, mode)) in enumerate(zip(x3, hooks, strict=True)):
            _add_hooked(x, aff, mode, int(act) if i == len(xs) - 1 else 0, i == 0, o3)
        return
    flat = [x.reshape(-1) for x in xs]
    o = out.reshape(-1)
    if len(xs) == 1:
        _mask.or_stand_in(_mask_numpy, flat[0], flat[0], int(act), o)  # relu(x): x where > 0
        return
    _add2.or_stand_in(_add2_numpy, flat[0], flat[1], act if len(xs) == 2 else 0, o)
    for i, x in enumerate(flat[2:]):
        _add_into(x, act if i == len(flat) - 3 else 0, o)


@SplitBySize
def _mask2(dout, y, act, dx0, dx1):
    for i in prange(dx0.size):
        yv = y[i]
        g = dout[i] if (yv > 0 or act == 0) else 0.0
        dx0[i] = g
        dx1[i] = g


def add_backward(dout, out, act, dxs):
    """Each non-None dx = dout, masked where a fused ReLU's output `out` is 0; a dx
    given twice (inputs sharing one gradient buffer) is written once, and one that is
    dout itself, without a ReLU, not at all (the gradient passes through in place)."""
    check_c(dout=dout, out=out)
    targets = []
    for dx in dxs:
        if dx is dout and not act:
            continue
        if dx is not None and not any(dx is t for t in targets):
            targets.append(dx)
    for dx in targets:
        check_shape("dx", dx, dout.shape)
        check_c(dx=dx)
    d, y = dout.reshape(-1), out.reshape(-1)
    if len(targets) >= 2:  # a residual block: both branches in one pass
        _mask2(d, y, int(act), targets[0].reshape(-1), targets[1].reshape(-1))
    elif targets:
        _mask.or_stand_in(_mask_numpy, d, y, int(act), targets[0].reshape(-1))
    for dx in targets[2:]:
        dx[...] = targets[0]
