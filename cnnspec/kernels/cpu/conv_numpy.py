"""The direct convolution in numpy, for a first run's first steps: the conv kernels'
builds are most of a cold start (LeNet-5, 1 thread, AMD EPYC Zen 3: 4.5 s of CPU each
for the forward and the backward, of a 10.5 s first step), and while a child process
compiles them (background.py) the model computes with these instead: its first step
starts at once, and each step after at a few times the kernels' time until they load.

Im2col and numpy's matmul, over every stride, padding, dilation and group count, with
the bias, a fused ReLU, a fused residual add, and a gradient added to (or masked for a
ReLU before) the input; the batch-norm hooks are the kernels' alone. Float sums in
another order than the kernels': a cold run's first steps differ from a warm run's in
the last bits (CNNSPEC_BACKGROUND_BUILDS=0 compiles before the first step instead).
"""

from __future__ import annotations

import numpy as np

from ._common import unpack_geometry

__all__ = ["conv2d_forward", "conv2d_backward"]


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


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, act, residual):
    """As the kernels' conv2d_forward without the batch-norm hooks."""
    cols, _ = _columns(x, w, out.shape, stride, pad, dilation, groups)
    n, o = out.shape[:2]
    w3 = w.reshape(groups, o // groups, -1)
    y = np.matmul(w3, cols).reshape(out.shape)
    if b is not None:
        y += b.reshape(1, o, 1, 1)
    if residual is not None:
        y += residual
    if act:
        np.maximum(y, 0, out=y)
    out[...] = y


def conv2d_backward(x, w, dout, stride, pad, dilation, groups, dx, dw, db, y, act,
                    accumulate, relu_dx):  # fmt: skip
    """As the kernels' conv2d_backward without the batch-norm hooks; `y` is the forward
    output where a ReLU was fused."""
    g_out = np.where(y > 0, dout, 0).astype(dout.dtype) if act else dout
    cols, geo = _columns(x, w, dout.shape, stride, pad, dilation, groups)
    sh, sw, pt, pl, dh, ddw, kh, kw, oh, ow, rows, cols_ = geo
    n, o = dout.shape[:2]
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
