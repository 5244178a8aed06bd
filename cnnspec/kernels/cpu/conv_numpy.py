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


# The windows of this many bytes at most at a time (a chunk of samples; one sample where
# that is larger: VGG-16's conv1_2, 115 MB): a first step must not need memory that the
# kernels' workspaces, a few tiles a thread, never would (im2col of VGG-16's conv1_2 at
# batch 32 is 3.7 GB)
_CHUNK_BYTES = 64 << 20


def _chunks(x, w, out_shape):
    n, c, kh, kw = x.shape[0], x.shape[1], w.shape[2], w.shape[3]
    per_sample = c * kh * kw * out_shape[2] * out_shape[3] * x.itemsize
    step = max(1, _CHUNK_BYTES // max(1, per_sample))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, act=0, residual=None,
                   in_affine=None, stats=None):  # fmt: skip
    """As the kernels' conv2d_forward (the same arguments and hooks)."""
    hx = _hooked(x, in_affine)
    o = out.shape[1]
    w3 = w.reshape(groups, o // groups, -1)
    for part in _chunks(x, w, out.shape):
        cols, _ = _columns(hx[part], w, out.shape, stride, pad, dilation, groups)
        y = np.matmul(w3, cols).reshape(out[part].shape)
        if b is not None and b.size:  # (the kernels' "no bias": None or empty)
            y += b.reshape(1, o, 1, 1)
        if residual is not None:
            y += residual[part]
        if act:
            np.maximum(y, 0, out=y)
        out[part] = y
    if stats is not None:
        stats[0], stats[1] = _channel_moments(out)


def _output_gradient(dout, out, act, dout_affine):
    """The conv's own output gradient: dout masked by a fused ReLU, or formed from a
    norm's output gradient (dout_affine, as the kernels take it)."""
    if dout_affine is not None:
        k, affine, relu = dout_affine
        per_channel = (1, dout.shape[1], 1, 1)
        g = dout
        if relu:
            on = out * affine[0].reshape(per_channel) + affine[1].reshape(per_channel) > 0
            g = np.where(on, dout, 0)
        g_out = k[0].reshape(per_channel) * g + k[1].reshape(per_channel) * out
        return (g_out + k[2].reshape(per_channel)).astype(dout.dtype)
    if act:
        return np.where(out > 0, dout, 0).astype(dout.dtype)
    return dout


def conv2d_backward(x, w, dout, stride, pad, dilation, groups, dx, dw, db, out=None, act=0,
                    in_affine=None, accumulate=False, dout_affine=None, dx_sums=None,
                    relu_dx=False):  # fmt: skip
    """As the kernels' conv2d_backward (the same arguments and hooks, checked there)."""
    g_out = _output_gradient(dout, out, act, dout_affine)
    if db is not None:
        db[...] = g_out.sum(axis=(0, 2, 3))
    hx = _hooked(x, in_affine)
    o, c = dout.shape[1], x.shape[1]
    w3 = w.reshape(groups, o // groups, -1)
    dw_sum = np.zeros((groups, o // groups, w3.shape[2]), w.dtype)
    for part in _chunks(x, w, dout.shape):
        cols, geo = _columns(hx[part], w, dout.shape, stride, pad, dilation, groups)
        sh, sw, pt, pl, dh, ddw, kh, kw, oh, ow, rows, cols_ = geo
        n = cols.shape[0]
        g3 = g_out[part].reshape(n, groups, o // groups, oh * ow)
        dw_sum += np.matmul(g3, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        if dx is None:
            continue
        dcols = np.matmul(w3.transpose(0, 2, 1), g3).reshape(n, c, kh, kw, oh, ow)
        dxp = np.zeros((n, c, rows, cols_), x.dtype)
        for i in range(kh):
            for j in range(kw):
                dxp[:, :, i * dh :: sh, j * ddw :: sw][:, :, :oh, :ow] += dcols[:, :, i, j]
        h, wd = x.shape[2:]
        h0, w0 = max(0, min(h, rows - pt)), max(0, min(wd, cols_ - pl))
        grad = np.zeros((n, *x.shape[1:]), x.dtype)
        grad[:, :, :h0, :w0] = dxp[:, :, pt : pt + h0, pl : pl + w0]
        if accumulate:
            dx[part] += grad
        else:
            dx[part] = grad
    dw[...] = dw_sum.reshape(dw.shape)
    if dx is None:
        return
    if relu_dx:
        dx[x <= 0] = 0
    if dx_sums is not None:  # the norm before reads sums of g: dx where h's ReLU let x pass
        mean, sums = dx_sums
        scale, shift, relu = in_affine
        g = dx.astype(np.float64)
        if relu:
            g[x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1) <= 0] = 0
        sums[0] = g.sum(axis=(0, 2, 3))
        sums[1] = (g * (x - mean.reshape(1, -1, 1, 1).astype(x.dtype))).sum(axis=(0, 2, 3))
