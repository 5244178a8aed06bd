"""Pooling: one thread per output forward. Backward adds overlapping windows' gradients
without atomics, in a fixed order (the same sums every run): average pooling with one
thread per input gathering from the windows that cover it, max pooling with one thread
per plane scattering to its argmax positions."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32

from ._common import THREADS, blocks, check_float32, check_shape, flat, jit_kernel

__all__ = [
    "maxpool2d_forward",
    "maxpool2d_backward",
    "avgpool2d_forward",
    "avgpool2d_backward",
    "global_avgpool2d_forward",
    "global_avgpool2d_backward",
    "subsample2d_forward",
    "subsample2d_backward",
]


@jit_kernel
def _maxpool_fwd(x, d, out, argmax):
    nc_, h_, w_, oh, ow, kh, kw, sh, sw, pt, pl = d
    i = cuda.grid(1)
    if i >= nc_ * oh * ow:
        return
    nc = i // (oh * ow)
    rem = i - nc * oh * ow
    oy = rem // ow
    ox = rem - oy * ow
    hs = oy * sh - pt
    he = min(hs + kh, h_)
    hs = max(hs, 0)
    ws = ox * sw - pl
    we = min(ws + kw, w_)
    ws = max(ws, 0)
    if hs >= he or ws >= we:  # a window entirely in the padding
        out[i] = -math.inf
        argmax[i] = -1
        return
    base = nc * h_ * w_
    best = -math.inf
    idx = hs * w_ + ws
    for iy in range(hs, he):
        for ix in range(ws, we):
            v = x[base + iy * w_ + ix]
            if v > best or v != v:  # PyTorch's rule: the first NaN wins
                best = v
                idx = iy * w_ + ix
                if v != v:
                    break
        if best != best:
            break
    out[i] = best
    argmax[i] = idx


@cuda.jit(device=True, inline="always")
def _window_range(i, p, k, s, o):
    """Outputs o whose window [o*s - p, o*s - p + k) covers input i: [lo, hi)."""
    lo = max(0, (i + p - k) // s + 1)
    hi = min(o, (i + p) // s + 1)
    return lo, hi


@jit_kernel
def _maxpool_bwd(dout, argmax, nc_, hw, ohw, dx):
    # one thread per plane scatters its outputs in order: overlapping windows add up
    # without atomics, in a fixed order
    nc = cuda.grid(1)
    if nc >= nc_:
        return
    for k in range(hw):
        dx[nc * hw + k] = 0
    for o in range(ohw):
        idx = argmax[nc * ohw + o]
        if idx >= 0:
            dx[nc * hw + idx] += dout[nc * ohw + o]


def _max_dims(x_shape, out_shape, kh, kw, sh, sw, pt, pl):
    n, c, h, w = x_shape
    return (n * c, h, w, out_shape[2], out_shape[3], kh, kw, sh, sw, pt, pl)


def maxpool2d_forward(x, kh, kw, sh, sw, pt, pl, out, argmax):
    """Max pooling; argmax (int32, like out) gets the flat h*W+w index in x's plane."""
    n, c = x.shape[:2]
    check_shape("out", out, (n, c, out.shape[2], out.shape[3]))
    check_shape("argmax", argmax, out.shape)
    check_float32(x=x, out=out)
    if np.dtype(argmax.dtype) != np.int32:
        raise ValueError("argmax must be int32")
    d = tuple(int(v) for v in _max_dims(x.shape, out.shape, kh, kw, sh, sw, pt, pl))
    _maxpool_fwd[blocks(out.size), THREADS](flat(x), d, flat(out), flat(argmax))


def maxpool2d_backward(dout, argmax, dx):
    """dx <- scatter of dout to the argmax positions (overwrites dx)."""
    check_shape("argmax", argmax, dout.shape)
    n, c, h, w = dx.shape
    check_shape("dout", dout, (n, c, dout.shape[2], dout.shape[3]))
    ohw = dout.shape[2] * dout.shape[3]
    _maxpool_bwd[blocks(n * c), THREADS](flat(dout), flat(argmax), n * c, h * w, ohw, flat(dx))


@cuda.jit(device=True, inline="always")
def _avg_window(o, s, k, p_before, size, p_after):
    start = o * s - p_before
    end = min(start + k, size + p_after)
    extent = end - start
    return max(start, 0), min(end, size), extent


@cuda.jit(device=True, inline="always")
def _divisor(oy, ox, d):
    h_, w_, kh, kw, sh, sw, pt, pb, pl, pr, cip = d[1:]
    hs, he, ph = _avg_window(oy, sh, kh, pt, h_, pb)
    ws, we, pw = _avg_window(ox, sw, kw, pl, w_, pr)
    return ph * pw if cip else (he - hs) * (we - ws)


@jit_kernel
def _avgpool_fwd(x, d, oh, ow, out):
    nc_, h_, w_, kh, kw, sh, sw, pt, pb, pl, pr, cip = d
    i = cuda.grid(1)
    if i >= nc_ * oh * ow:
        return
    nc = i // (oh * ow)
    rem = i - nc * oh * ow
    oy = rem // ow
    ox = rem - oy * ow
    hs, he, _ = _avg_window(oy, sh, kh, pt, h_, pb)
    ws, we, _ = _avg_window(ox, sw, kw, pl, w_, pr)
    div = _divisor(oy, ox, d)
    acc = float32(0.0)
    base = nc * h_ * w_
    for iy in range(hs, he):
        for ix in range(ws, we):
            acc += x[base + iy * w_ + ix]
    out[i] = acc / div if div > 0 else float32(0.0)


@jit_kernel
def _avgpool_bwd(dout, d, oh, ow, dx):
    nc_, h_, w_, kh, kw, sh, sw, pt, pb, pl, pr, cip = d
    i = cuda.grid(1)
    if i >= nc_ * h_ * w_:
        return
    nc = i // (h_ * w_)
    at = i - nc * h_ * w_
    iy = at // w_
    ix = at - iy * w_
    y0, y1 = _window_range(iy, pt, kh, sh, oh)
    x0, x1 = _window_range(ix, pl, kw, sw, ow)
    v = float32(0.0)
    for oy in range(y0, y1):
        for ox in range(x0, x1):
            div = _divisor(oy, ox, d)
            if div > 0:
                v += dout[(nc * oh + oy) * ow + ox] / div
    dx[i] = v


def _avg_dims(shape, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad):
    n, c, h, w = shape
    dims = (n * c, h, w, kh, kw, sh, sw, pt, pb, pl, pr, bool(count_include_pad))
    return tuple(int(v) for v in dims)


def avgpool2d_forward(x, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, out):
    """Average pooling, PyTorch's AvgPool2d (count_include_pad as there)."""
    check_float32(x=x, out=out)
    d = _avg_dims(x.shape, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad)
    _avgpool_fwd[blocks(out.size), THREADS](flat(x), d, out.shape[2], out.shape[3], flat(out))


def avgpool2d_backward(dout, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, dx):
    d = _avg_dims(dx.shape, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad)
    oh, ow = dout.shape[2], dout.shape[3]
    _avgpool_bwd[blocks(dx.size), THREADS](flat(dout), d, oh, ow, flat(dx))


@jit_kernel
def _gap_fwd(x, nc_, hw, out):
    i = cuda.grid(1)
    if i < nc_:
        acc = float32(0.0)
        for k in range(hw):
            acc += x[i * hw + k]
        out[i] = acc / hw


@jit_kernel
def _gap_bwd(dout, nc_, hw, dx):
    i = cuda.grid(1)
    if i < nc_ * hw:
        dx[i] = dout[i // hw] / hw


def global_avgpool2d_forward(x, out):
    """out (N, C) = mean of x (N, C, H, W) over H, W."""
    n, c = x.shape[:2]
    check_shape("out", out, (n, c))
    _gap_fwd[blocks(n * c), THREADS](flat(x), n * c, x.size // (n * c), flat(out))


def global_avgpool2d_backward(dout, dx):
    n, c = dx.shape[:2]
    check_shape("dout", dout, (n, c))
    hw = dx.size // (n * c)
    _gap_bwd[blocks(dx.size), THREADS](flat(dout), n * c, hw, flat(dx))


# ------------------------------------------------------ LeNet-5 trainable subsampling
@jit_kernel
def _subsample_fwd(x, coef, bias, d, out, pooled):
    nc_, c_, h_, w_, oh, ow, kh, kw, sh, sw = d
    i = cuda.grid(1)
    if i < nc_ * oh * ow:
        nc = i // (oh * ow)
        rem = i - nc * oh * ow
        oy = rem // ow
        ox = rem - oy * ow
        hs, ws = oy * sh, ox * sw
        he, we = min(hs + kh, h_), min(ws + kw, w_)
        acc = float32(0.0)
        for iy in range(hs, he):
            for ix in range(ws, we):
                acc += x[(nc * h_ + iy) * w_ + ix]
        cnt = (he - hs) * (we - ws)
        p = acc / cnt if cnt > 0 else float32(0.0)
        pooled[i] = p
        c = nc % c_
        out[i] = coef[c] * p + bias[c]


@jit_kernel
def _subsample_dx(dout, coef, d, dx):
    nc_, c_, h_, w_, oh, ow, kh, kw, sh, sw = d
    i = cuda.grid(1)
    if i < nc_ * h_ * w_:
        nc = i // (h_ * w_)
        at = i - nc * h_ * w_
        iy = at // w_
        ix = at - iy * w_
        y0, y1 = _window_range(iy, 0, kh, sh, oh)
        x0, x1 = _window_range(ix, 0, kw, sw, ow)
        v = float32(0.0)
        for oy in range(y0, y1):
            for ox in range(x0, x1):
                cnt = (min(oy * sh + kh, h_) - oy * sh) * (min(ox * sw + kw, w_) - ox * sw)
                if cnt > 0:
                    v += dout[(nc * oh + oy) * ow + ox] / cnt
        dx[i] = coef[nc % c_] * v


@jit_kernel
def _subsample_params(dout, pooled, n_, c_, l_, dcoef, dbias):
    c = cuda.grid(1)  # one thread per map, the batch in order: deterministic
    if c < c_:
        sa = float32(0.0)
        sb = float32(0.0)
        for n in range(n_):
            base = (n * c_ + c) * l_
            for k in range(l_):
                g = dout[base + k]
                sa += g * pooled[base + k]
                sb += g
        dcoef[c] = sa
        dbias[c] = sb


def _subsample_dims(x_shape, out_shape, kh, kw, sh, sw):
    n, c, h, w = x_shape
    return tuple(int(v) for v in (n * c, c, h, w, out_shape[2], out_shape[3], kh, kw, sh, sw))


def subsample2d_forward(x, coef, bias, kh, kw, sh, sw, out, pooled):
    """LeNet-5 subsampling: pooled = window mean (no padding), out = coef[c]*pooled + bias[c]."""
    check_shape("pooled", pooled, out.shape)
    d = _subsample_dims(x.shape, out.shape, kh, kw, sh, sw)
    _subsample_fwd[blocks(out.size), THREADS](flat(x), coef, bias, d, flat(out), flat(pooled))


def subsample2d_backward(dout, pooled, coef, kh, kw, sh, sw, dx, dcoef, dbias):
    """Gradients of subsample2d_forward; dx may be None."""
    n, c = dout.shape[:2]
    check_shape("pooled", pooled, dout.shape)
    l_ = dout.size // (n * c)
    _subsample_params[blocks(c), THREADS](flat(dout), flat(pooled), n, c, l_, dcoef, dbias)
    if dx is not None:
        d = _subsample_dims(dx.shape, dout.shape, kh, kw, sh, sw)
        _subsample_dx[blocks(dx.size), THREADS](flat(dout), coef, d, flat(dx))
