"""Activation kernels.

Elementwise kernels take 1-D contiguous arrays (callers pass ``a.reshape(-1)``).
Channel-wise kernels (prelu, maxout) take the full array with the channel axis at 1.
Scalar hyper-parameters are cast to the array dtype so float32 data compiles (and runs)
a single float32 specialisation.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from .. import SCALED_TANH_A, SCALED_TANH_S
from ._common import SplitBySize, as_3d, check_c, check_shape

__all__ = [
    "relu_forward",
    "relu_backward",
    "leaky_relu_forward",
    "leaky_relu_backward",
    "elu_forward",
    "elu_backward",
    "sigmoid_forward",
    "sigmoid_backward",
    "tanh_forward",
    "tanh_backward",
    "scaled_tanh_forward",
    "scaled_tanh_backward",
    "rrelu_forward",
    "rrelu_backward",
    "prelu_forward",
    "prelu_backward",
    "maxout_forward",
    "maxout_backward",
]


def _check_flat(**arrays):
    size = None
    for name, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D (pass a.reshape(-1)), got shape {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
        if size is None:
            size = a.size
        elif a.size != size:
            raise ValueError(f"{name} has {a.size} elements, expected {size}")


# ------------------------------------------------------------------------------ relu
@SplitBySize
def _relu_fwd(x, out):
    for i in prange(x.size):
        v = x[i]
        # NaN propagates (NaN <= 0 is False), like torch.relu
        out[i] = 0 if v <= 0 else v


@SplitBySize
def _relu_bwd(x, dout, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else 0


def relu_forward(x, out):
    _check_flat(x=x, out=out)
    _relu_fwd(x, out)


def relu_backward(x, dout, dx):
    _check_flat(x=x, dout=dout, dx=dx)
    _relu_bwd(x, dout, dx)


# ------------------------------------------------------------------------ leaky relu
@SplitBySize
def _leaky_fwd(x, alpha, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0 else v * alpha


@SplitBySize
def _leaky_bwd(x, alpha, dout, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else dout[i] * alpha


def leaky_relu_forward(x, alpha, out):
    _check_flat(x=x, out=out)
    _leaky_fwd(x, x.dtype.type(alpha), out)


def leaky_relu_backward(x, alpha, dout, dx):
    _check_flat(x=x, dout=dout, dx=dx)
    _leaky_bwd(x, x.dtype.type(alpha), dout, dx)


# ------------------------------------------------------------------------------- elu
@SplitBySize
def _elu_fwd(x, alpha, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0 else alpha * math.expm1(v)


@SplitBySize
def _elu_bwd(x, y, alpha, dout, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else dout[i] * (y[i] + alpha)


def elu_forward(x, alpha, out):
    _check_flat(x=x, out=out)
    _elu_fwd(x, x.dtype.type(alpha), out)


def elu_backward(x, out_y, alpha, dout, dx):
    _check_flat(x=x, out_y=out_y, dout=dout, dx=dx)
    _elu_bwd(x, out_y, x.dtype.type(alpha), dout, dx)


# --------------------------------------------------------------------------- sigmoid
@SplitBySize
def _sigmoid_fwd(x, out):
    for i in prange(x.size):
        v = x[i]
        if v >= 0:
            out[i] = 1.0 / (1.0 + math.exp(-v))
        else:
            z = math.exp(v)
            out[i] = z / (1.0 + z)


@SplitBySize
def _sigmoid_bwd(y, dout, dx):
    for i in prange(y.size):
        s = y[i]
        dx[i] = dout[i] * s * (1 - s)


def sigmoid_forward(x, out):
    _check_flat(x=x, out=out)
    _sigmoid_fwd(x, out)


def sigmoid_backward(y, dout, dx):
    _check_flat(y=y, dout=dout, dx=dx)
    _sigmoid_bwd(y, dout, dx)


# ------------------------------------------------------------------------------ tanh
@SplitBySize
def _tanh_fwd(x, out):
    for i in prange(x.size):
        out[i] = math.tanh(x[i])


@SplitBySize
def _tanh_bwd(y, dout, dx):
    for i in prange(y.size):
        t = y[i]
        dx[i] = dout[i] * (1 - t * t)


def tanh_forward(x, out):
    _check_flat(x=x, out=out)
    _tanh_fwd(x, out)


def tanh_backward(y, dout, dx):
    _check_flat(y=y, dout=dout, dx=dx)
    _tanh_bwd(y, dout, dx)


# ------------------------------------------------- scaled tanh (LeCun: 1.7159 tanh(2x/3))
# LeNet-5 (1998)'s kernels split by size, with numpy stand-ins for a first run (as
# pool.py's): its cold first step had compiled seven parallel builds on one thread
@SplitBySize
def _stanh_fwd(x, a, s, out):
    for i in prange(x.size):
        out[i] = a * math.tanh(s * x[i])


def _stanh_fwd_numpy(x, a, s, out):
    out[...] = a * np.tanh(s * x)  # (numpy's tanh: the last bits may differ)


@SplitBySize
def _stanh_bwd(y, a, s, dout, dx):
    # dy/dx = a*s*(1 - tanh^2) = (s/a) * (a^2 - y^2)
    c = s / a
    a2 = a * a
    for i in prange(y.size):
        t = y[i]
        dx[i] = dout[i] * c * (a2 - t * t)


def _stanh_bwd_numpy(y, a, s, dout, dx):
    dx[...] = dout * (s / a) * (a * a - y * y)


def scaled_tanh_forward(x, out):
    _check_flat(x=x, out=out)
    t = x.dtype.type
    _stanh_fwd.or_stand_in(_stanh_fwd_numpy, x, t(SCALED_TANH_A), t(SCALED_TANH_S), out)


def scaled_tanh_backward(y, dout, dx):
    _check_flat(y=y, dout=dout, dx=dx)
    t = y.dtype.type
    args = (y, t(SCALED_TANH_A), t(SCALED_TANH_S), dout, dx)
    _stanh_bwd.or_stand_in(_stanh_bwd_numpy, *args)


# ----------------------------------------------------------------------------- rrelu
@SplitBySize
def _rrelu_fwd(x, slopes, out):
    for i in prange(x.size):
        v = x[i]
        out[i] = v if v > 0 else v * slopes[i]


@SplitBySize
def _rrelu_bwd(x, slopes, dout, dx):
    for i in prange(x.size):
        dx[i] = dout[i] if x[i] > 0 else dout[i] * slopes[i]


def rrelu_forward(x, slopes, out):
    """Randomised leaky ReLU with per-element slopes drawn by the caller."""
    _check_flat(x=x, slopes=slopes, out=out)
    _rrelu_fwd(x, slopes, out)


def rrelu_backward(x, slopes, dout, dx):
    _check_flat(x=x, slopes=slopes, dout=dout, dx=dx)
    _rrelu_bwd(x, slopes, dout, dx)


# ----------------------------------------------------------------------------- prelu
@SplitBySize
def _prelu_fwd(x, w, out):
    n_, c_, s_ = x.shape
    shared = w.shape[0] == 1
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = w[0] if shared else w[c]
        for i in range(s_):
            v = x[n, c, i]
            out[n, c, i] = v if v > 0 else a * v


@SplitBySize
def _prelu_bwd(x, w, dout, dx, partial):
    n_, c_, s_ = x.shape
    shared = w.shape[0] == 1
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = w[0] if shared else w[c]
        acc = 0.0
        for i in range(s_):
            v = x[n, c, i]
            g = dout[n, c, i]
            if v > 0:
                dx[n, c, i] = g
            else:
                dx[n, c, i] = a * g
                acc += v * g
        partial[n, c] = acc


def prelu_forward(x, w, out):
    """PReLU over channel axis 1; w has shape (C,) or (1,) (one shared slope)."""
    check_c(x=x, w=w, out=out)
    check_shape("out", out, x.shape)
    if w.ndim != 1 or w.shape[0] not in (1, x.shape[1]):
        raise ValueError(f"prelu weight shape {w.shape} does not fit {x.shape}")
    _prelu_fwd(as_3d(x), w, as_3d(out))


def prelu_backward(x, w, dout, dx, dw):
    """dx overwritten (dx may be None); dw overwritten with the batch-summed
    (deterministic) slope gradient."""
    check_c(x=x, w=w, dout=dout, dx=dx, dw=dw)
    check_shape("dout", dout, x.shape)
    if dx is None:
        dx = np.empty_like(x)
    check_shape("dx", dx, x.shape)
    check_shape("dw", dw, w.shape)
    if w.ndim != 1 or w.shape[0] not in (1, x.shape[1]):
        raise ValueError(f"prelu weight shape {w.shape} does not fit {x.shape}")
    partial = np.empty((x.shape[0], x.shape[1]), dtype=np.float64)
    _prelu_bwd(as_3d(x), w, as_3d(dout), as_3d(dx), partial)
    per_channel = partial.sum(axis=0)  # fixed order: deterministic
    if w.shape[0] == 1:
        dw[0] = per_channel.sum()
    else:
        dw[:] = per_channel


# ---------------------------------------------------------------------------- maxout
@SplitBySize
def _maxout_fwd(x, pieces, out, argmax):
    n_, k_, s_ = out.shape
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        c0 = k * pieces
        for i in range(s_):
            best = x[n, c0, i]
            idx = c0
            for c in range(c0 + 1, c0 + pieces):
                v = x[n, c, i]
                # NaN propagates like torch.max
                if v > best or (v != v and best == best):
                    best = v
                    idx = c
            out[n, k, i] = best
            argmax[n, k, i] = idx


@SplitBySize
def _maxout_bwd(dout, argmax, pieces, dx):
    n_, k_, s_ = dout.shape
    for nk in prange(n_ * k_):
        n = nk // k_
        k = nk - n * k_
        for c in range(k * pieces, (k + 1) * pieces):
            for i in range(s_):
                dx[n, c, i] = 0
        for i in range(s_):
            dx[n, argmax[n, k, i], i] = dout[n, k, i]


def maxout_forward(x, pieces, out, argmax):
    """out[:, k] = max over input channels k*pieces .. k*pieces+pieces-1;
    argmax (int32, like out) holds the winning (absolute) input channel."""
    check_c(x=x, out=out, argmax=argmax)
    pieces = int(pieces)
    n, c = x.shape[:2]
    if pieces < 1 or c % pieces:
        raise ValueError(f"{c} channels are not divisible into groups of {pieces}")
    check_shape("out", out, (n, c // pieces, *x.shape[2:]))
    check_shape("argmax", argmax, out.shape)
    if argmax.dtype != np.int32:
        raise ValueError("argmax must be int32")
    _maxout_fwd(as_3d(x), pieces, as_3d(out), as_3d(argmax))


def maxout_backward(dout, argmax, dx):
    check_c(dout=dout, argmax=argmax, dx=dx)
    check_shape("argmax", argmax, dout.shape)
    n, c = dx.shape[:2]
    k = dout.shape[1]
    if k == 0 or c % k:
        raise ValueError(f"dx channels {c} do not match dout channels {k}")
    check_shape("dout", dout, (n, k, *dx.shape[2:]))
    _maxout_bwd(as_3d(dout), as_3d(argmax), c // k, as_3d(dx))
