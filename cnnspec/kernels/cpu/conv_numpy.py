"""The direct convolution in numpy, for a first run's first steps: the conv kernels'
builds are most of a cold start (LeNet-5, 1 thread, AMD EPYC Zen 3: 4.5 s of CPU each
for the forward and the backward, of a 10.5 s first step), and while a child process
compiles them (background.py) the model computes with these instead: its first step
starts at once, and each step after at a few times the kernels' time until they load.

Im2col and numpy's matmul, over every stride, padding, dilation and group count, with
every hook of the kernels (bias, fused ReLU, residual add, batch norms' statistics and
affine input, the norm's gradient in place of the output's, an input gradient added to
or masked for a ReLU). Float sums in another order than the kernels': a cold run's first
steps differ from a warm run's in the last bits (CNNSPEC_BACKGROUND_BUILDS=0 compiles
before the first step instead).
"""

from __future__ import annotations

import numpy as np

from ._common import unpack_geometry


def _geometry(x, w, out_shape, stride, pad, dilation):
    sh, sw, pt, _pb, pl, _pr, dh, dw = unpack_geometry(stride, pad, dilation)
    kh, kw = w.shape[2:]
    oh, ow = out_shape[2:]
    # the padded input, cut to what the windows reach (a stride may leave rows unread)
    rows, cols = (oh - 1) * sh + (kh - 1) * dh + 1, (ow - 1) * sw + (kw - 1) * dw + 1
    return sh, sw, pt, pl, dh, dw, kh, kw, oh, ow, rows, cols


def _padded(x, pt, pl, rows, cols):
    n, c, h, wd = x.shape
    xp = np.zeros((n, c, rows, cols), x.dtype)
    h0, w0 = max(0, min(h, rows - pt)), max(0, min(wd, cols - pl))
    xp[:, :, pt : pt + h0, pl : pl + w0] = x[:, :, :h0, :w0]
    return xp


def _columns(x, w, out_shape, stride, pad, dilation, groups):
    """x's windows as (N, groups, C/groups * kh * kw, oh * ow), and the geometry."""
    geo = sh, sw, pt, pl, dh, dw, kh, kw, oh, ow, rows, cols = _geometry(
        x, w, out_shape, stride, pad, dilation
    )
    xp = _padded(x, pt, pl, rows, cols)
    n, c = x.shape[:2]
    windows = np.empty((n, c, kh, kw, oh, ow), x.dtype)
    for i in range(kh):
        for j in range(kw):
            windows[:, :, i, j] = xp[:, :, i * dh :: sh, j * dw :: sw][:, :, :oh, :ow]
    return windows.reshape(n, groups, c // groups * kh * kw, oh * ow), geo


def _hooked(x, in_affine):
    """h(x): x * scale + shift per channel, then max(., 0) with the hook's ReLU."""
    if in_affine is None:
        return x
    scale, shift, relu = in_affine
    h = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    return np.maximum(h, 0, out=h) if relu else h


def _channel_moments(y):
    y = y.astype(np.float64)
    mean = y.mean(axis=(0, 2, 3))
    return mean, ((y - mean.reshape(1, -1, 1, 1)) ** 2).mean(axis=(0, 2, 3))


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, act=0, residual=None,
                   in_affine=None, stats=None):  # fmt: skip
    """As the kernels' conv2d_forward (the same arguments and hooks)."""
    cols, _ = _columns(_hooked(x, in_affine), w, out.shape, stride, pad, dilation, groups)
    n, o = out.shape[:2]
    w3 = w.reshape(groups, o // groups, -1)
    y = np.matmul(w3, cols).reshape(out.shape)
    if b is not None and b.size:  # (the kernels' "no bias": None or empty)
        y += b.reshape(1, o, 1, 1)
    if residual is not None:
        y += residual
    if act:
        np.maximum(y, 0, out=y)
    out[...] = y
    if stats is not None:
        stats[0], stats[1] = _channel_moments(out)


def conv2d_backward(x, w, dout, stride, pad, dilation, groups, dx, dw, db, out=None, act=0,
                    in_affine=None, accumulate=False, dout_affine=None, dx_sums=None,
                    relu_dx=False):  # fmt: skip
    """As the kernels' conv2d_backward (the same arguments and hooks, checked there)."""
    o = dout.shape[1]
    per_channel = (1, o, 1, 1)
    if dout_affine is not None:  # dout is the norm's output gradient: the conv's own
        k, affine, relu = dout_affine
        g = dout
        if relu:
            on = out * affine[0].reshape(per_channel) + affine[1].reshape(per_channel) > 0
            g = np.where(on, dout, 0)
        g_out = k[0].reshape(per_channel) * g + k[1].reshape(per_channel) * out
        g_out = (g_out + k[2].reshape(per_channel)).astype(dout.dtype)
    elif act:
        g_out = np.where(out > 0, dout, 0).astype(dout.dtype)
    else:
        g_out = dout
    cols, geo = _columns(_hooked(x, in_affine), w, dout.shape, stride, pad, dilation, groups)
    sh, sw, pt, pl, dh, ddw, kh, kw, oh, ow, rows, cols_ = geo
    n = dout.shape[0]
    g3 = g_out.reshape(n, groups, o // groups, oh * ow)
    dw[...] = np.matmul(g3, cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(dw.shape)
    if db is not None:
        db[...] = g_out.sum(axis=(0, 2, 3))
    if dx is None:
        return
    w3 = w.reshape(groups, o // groups, -1)
    c = x.shape[1]
    dcols = np.matmul(w3.transpose(0, 2, 1), g3).reshape(n, c, kh, kw, oh, ow)
    dxp = np.zeros((n, c, rows, cols_), x.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i * dh :: sh, j * ddw :: sw][:, :, :oh, :ow] += dcols[:, :, i, j]
    h, wd = x.shape[2:]
    h0, w0 = max(0, min(h, rows - pt)), max(0, min(wd, cols_ - pl))
    grad = np.zeros_like(x)
    grad[:, :, :h0, :w0] = dxp[:, :, pt : pt + h0, pl : pl + w0]
    if accumulate:
        dx += grad
    else:
        dx[...] = grad
    if relu_dx:
        dx[x <= 0] = 0
    if (
        dx_sums is not None
    ):  # what the norm before reads: sums over g, g = dx where h's ReLU let x through
        mean, sums = dx_sums
        scale, shift, relu = in_affine
        g = dx.astype(np.float64)
        if relu:
            g[x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1) <= 0] = 0
        sums[0] = g.sum(axis=(0, 2, 3))
        sums[1] = (g * (x - mean.reshape(1, -1, 1, 1).astype(x.dtype))).sum(axis=(0, 2, 3))
