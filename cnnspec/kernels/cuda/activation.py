"""Elementwise activations, one thread per element (flat arrays, as the CPU kernels)."""

from __future__ import annotations

import math

from numba import cuda, float32, float64

from .. import SCALED_TANH_A, SCALED_TANH_S
from ._common import THREADS, blocks, check_float32, check_shape, flat, jit_kernel

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


def _launch(kernel, *args):
    out = args[-1]
    check_float32(**{f"a{i}": a for i, a in enumerate(args) if hasattr(a, "dtype")})
    for a in args:
        if hasattr(a, "shape") and tuple(a.shape) != tuple(out.shape):
            raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(out.shape)}")
    kernel[blocks(out.size), THREADS](*args)


@jit_kernel
def _relu_fwd(x, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i] = 0 if v <= 0 else v  # NaN propagates, like torch.relu


@jit_kernel
def _relu_bwd(x, dout, dx):
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = dout[i] if x[i] > 0 else 0


def relu_forward(x, out):
    _launch(_relu_fwd, x, out)


def relu_backward(x, dout, dx):
    """dx = dout where x > 0 (dx may be dout itself: masked in place)."""
    _launch(_relu_bwd, x, dout, dx)


@jit_kernel
def _leaky_fwd(x, alpha, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i] = v if v > 0 else float32(alpha) * v


@jit_kernel
def _leaky_bwd(x, alpha, dout, dx):
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = dout[i] if x[i] > 0 else float32(alpha) * dout[i]


def leaky_relu_forward(x, alpha, out):
    _launch(_leaky_fwd, x, float(alpha), out)


def leaky_relu_backward(x, alpha, dout, dx):
    _launch(_leaky_bwd, x, float(alpha), dout, dx)


@jit_kernel
def _elu_fwd(x, alpha, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i] = v if v > 0 else float32(alpha) * math.expm1(v)


@jit_kernel
def _elu_bwd(x, y, alpha, dout, dx):
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = dout[i] if x[i] > 0 else dout[i] * (y[i] + float32(alpha))


def elu_forward(x, alpha, out):
    _launch(_elu_fwd, x, float(alpha), out)


def elu_backward(x, out_y, alpha, dout, dx):
    _launch(_elu_bwd, x, out_y, float(alpha), dout, dx)


@jit_kernel
def _sigmoid_fwd(x, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        if v >= 0:
            out[i] = float32(1.0) / (float32(1.0) + math.exp(-v))
        else:
            e = math.exp(v)
            out[i] = e / (float32(1.0) + e)


@jit_kernel
def _sigmoid_bwd(y, dout, dx):
    i = cuda.grid(1)
    if i < y.size:
        dx[i] = dout[i] * y[i] * (float32(1.0) - y[i])


def sigmoid_forward(x, out):
    _launch(_sigmoid_fwd, x, out)


def sigmoid_backward(y, dout, dx):
    _launch(_sigmoid_bwd, y, dout, dx)


@jit_kernel
def _tanh_fwd(x, a, s, out):
    i = cuda.grid(1)
    if i < x.size:
        out[i] = float32(a) * math.tanh(float32(s) * x[i])


@jit_kernel
def _tanh_bwd(y, a, s, dout, dx):
    # y = a tanh(s x): dy/dx = s (a - y^2 / a)
    i = cuda.grid(1)
    if i < y.size:
        v = y[i]
        dx[i] = dout[i] * float32(s) * (float32(a) - v * v / float32(a))


def tanh_forward(x, out):
    _launch(_tanh_fwd, x, 1.0, 1.0, out)


def tanh_backward(y, dout, dx):
    _launch(_tanh_bwd, y, 1.0, 1.0, dout, dx)


def scaled_tanh_forward(x, out):
    _launch(_tanh_fwd, x, SCALED_TANH_A, SCALED_TANH_S, out)


def scaled_tanh_backward(y, dout, dx):
    _launch(_tanh_bwd, y, SCALED_TANH_A, SCALED_TANH_S, dout, dx)


@jit_kernel
def _rrelu_fwd(x, slopes, out):
    i = cuda.grid(1)
    if i < x.size:
        v = x[i]
        out[i] = v if v > 0 else v * slopes[i]


@jit_kernel
def _rrelu_bwd(x, slopes, dout, dx):
    i = cuda.grid(1)
    if i < x.size:
        dx[i] = dout[i] if x[i] > 0 else dout[i] * slopes[i]


def rrelu_forward(x, slopes, out):
    """Randomised leaky ReLU with per-element slopes drawn by the caller."""
    _launch(_rrelu_fwd, x, slopes, out)


def rrelu_backward(x, slopes, dout, dx):
    _launch(_rrelu_bwd, x, slopes, dout, dx)


@jit_kernel
def _prelu_fwd(x, w, c_, s_, out):
    i = cuda.grid(1)
    if i < x.size:
        a = w[0] if w.size == 1 else w[(i // s_) % c_]
        v = x[i]
        out[i] = v if v > 0 else a * v


@jit_kernel
def _prelu_dx(x, w, dout, c_, s_, dx):
    i = cuda.grid(1)
    if i < x.size:
        a = w[0] if w.size == 1 else w[(i // s_) % c_]
        dx[i] = dout[i] if x[i] > 0 else a * dout[i]


@jit_kernel
def _prelu_dw(x, dout, n_, c_, s_, shared, dw):
    # one thread per slope, the batch in order: deterministic (slopes are few)
    t = cuda.grid(1)
    if t < dw.size:
        acc = float64(0.0)
        c_lo, c_hi = (0, c_) if shared else (t, t + 1)
        for n in range(n_):
            for c in range(c_lo, c_hi):
                base = (n * c_ + c) * s_
                for k in range(s_):
                    v = x[base + k]
                    if not v > 0:
                        acc += v * dout[base + k]
        dw[t] = acc


def _prelu_geometry(x, w):
    n, c = x.shape[:2]
    if w.ndim != 1 or w.shape[0] not in (1, c):
        raise ValueError(f"prelu weight shape {w.shape} does not fit {x.shape}")
    return n, c, x.size // (n * c)


def prelu_forward(x, w, out):
    """PReLU over channel axis 1; w has shape (C,) or (1,) (one shared slope)."""
    n, c, s = _prelu_geometry(x, w)
    _prelu_fwd[blocks(x.size), THREADS](flat(x), w, c, s, flat(out))


def prelu_backward(x, w, dout, dx, dw):
    """dx overwritten (dx may be None); dw overwritten with the batch-summed slope
    gradient, in a fixed order."""
    n, c, s = _prelu_geometry(x, w)
    check_shape("dw", dw, w.shape)
    if dx is not None:
        _prelu_dx[blocks(x.size), THREADS](flat(x), w, flat(dout), c, s, flat(dx))
    _prelu_dw[blocks(dw.size), THREADS](flat(x), flat(dout), n, c, s, w.shape[0] == 1, dw)


@jit_kernel
def _maxout_fwd(x, pieces, k_, s_, out, argmax):
    i = cuda.grid(1)  # over out (N, K, S)
    if i < out.size:
        n = i // (k_ * s_)
        rem = i - n * k_ * s_
        k = rem // s_
        j = rem - k * s_
        c0 = k * pieces
        cx = k_ * pieces
        best = x[(n * cx + c0) * s_ + j]
        idx = c0
        for c in range(c0 + 1, c0 + pieces):
            v = x[(n * cx + c) * s_ + j]
            if v > best or (v != v and best == best):  # NaN propagates like torch.max
                best = v
                idx = c
        out[i] = best
        argmax[i] = idx


@jit_kernel
def _maxout_bwd(dout, argmax, pieces, k_, s_, dx):
    i = cuda.grid(1)  # over dout; each writes its own group of dx
    if i < dout.size:
        n = i // (k_ * s_)
        rem = i - n * k_ * s_
        k = rem // s_
        j = rem - k * s_
        cx = k_ * pieces
        for c in range(k * pieces, (k + 1) * pieces):
            dx[(n * cx + c) * s_ + j] = dout[i] if c == argmax[i] else 0.0


def maxout_forward(x, pieces, out, argmax):
    """out[:, k] = max over input channels k*pieces .. k*pieces+pieces-1; argmax (int32)
    holds the winning (absolute) input channel."""
    pieces = int(pieces)
    n, c = x.shape[:2]
    if pieces < 1 or c % pieces:
        raise ValueError(f"{c} channels are not divisible into groups of {pieces}")
    check_shape("out", out, (n, c // pieces, *x.shape[2:]))
    check_shape("argmax", argmax, out.shape)
    s = x.size // (n * c)
    _maxout_fwd[blocks(out.size), THREADS](flat(x), pieces, c // pieces, s, flat(out), flat(argmax))


def maxout_backward(dout, argmax, dx):
    check_shape("argmax", argmax, dout.shape)
    n, c = dx.shape[:2]
    k = dout.shape[1]
    if k == 0 or c % k:
        raise ValueError(f"dx channels {c} do not match dout channels {k}")
    s = dx.size // (n * c)
    _maxout_bwd[blocks(dout.size), THREADS](flat(dout), flat(argmax), c // k, k, s, flat(dx))
