"""The direct convolution in numpy, for a first run's first steps: the conv kernels'
builds are most of a cold start (LeNet-5, 1 thread, AMD EPYC Zen 3: 4.5 s of CPU each
for the forward and the backward, of a 10.5 s first step), and while a child process
compiles them (background.py) the model computes with these instead: its first step
starts at once, and each step after at a few times the kernels' time until they load.

Im2col and numpy's matmul (and for dx the same on the output gradient, or the columns'
gradients added into place), over every stride, padding, dilation and group count, with
every hook of the kernels (bias, fused ReLU, residual add, batch norms' statistics and
affine input, the norm's gradient in place of the output's, an input gradient added to
or masked for a ReLU). Float sums in another order than the kernels': a cold run's first
steps differ from a warm run's in the last bits (CNNSPEC_BACKGROUND_BUILDS=0 compiles
before the first step instead).
"""

from __future__ import annotations

import numpy as np

from ._common import as_3d, merge_moments, unpack_geometry
from .norm import _bn_bwd_sums_numpy


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
    s_n, s_c, s_h, s_w = xp.strides  # xp holds exactly the rows and columns they reach
    view = np.lib.stride_tricks.as_strided(
        xp, (n, c, kh, kw, oh, ow), (s_n, s_c, s_h * dh, s_w * dw, s_h * sh, s_w * sw),
        writeable=False,
    )  # fmt: skip
    return view.reshape(n, groups, c // groups * kh * kw, oh * ow), geo


def _hooked(x, in_affine):
    """h(x): x * scale + shift per channel, then max(., 0) with the hook's ReLU."""
    if in_affine is None:
        return x
    scale, shift, relu = in_affine
    h = x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
    return np.maximum(h, 0, out=h) if relu else h


def _chunk_moments(y):
    """A chunk's row [shift, sum(y - shift), sum((y - shift)^2), count] per channel, in
    float64, as the kernels' threads write theirs for merge_moments."""
    shift = y[0, :, 0, 0].astype(np.float64)
    d = y.astype(np.float64) - shift.reshape(1, -1, 1, 1)
    sums = d.sum(axis=(0, 2, 3)), np.square(d, out=d).sum(axis=(0, 2, 3))
    return np.concatenate([shift, *sums, [y.size // y.shape[1]]])


# The windows of this many bytes at most at a time (a chunk of samples; one sample where
# that is larger), and every pass over a chunk's inputs and outputs done while they are
# in cache: ResNet-20 b128's convs, 1 thread, AMD EPYC Zen 3, forward 0.59 -> 0.40 s and
# backward 1.53 -> 1.10 s against chunks of 64 MB (1-2 MB alike). And a first step never
# needs memory the kernels' workspaces would not (im2col of VGG-16's conv1_2 at batch 32
# is 3.7 GB).
_CHUNK_BYTES = 1 << 20


def _chunks(x, w, out_shape):
    n, c, kh, kw = x.shape[0], x.shape[1], w.shape[2], w.shape[3]
    per_sample = c * kh * kw * out_shape[2] * out_shape[3] * x.itemsize
    step = max(1, _CHUNK_BYTES // max(1, per_sample))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, act=0, residual=None,
                   in_affine=None, stats=None):  # fmt: skip
    """As the kernels' conv2d_forward (the same arguments and hooks)."""
    o = out.shape[1]
    w3 = w.reshape(groups, o // groups, -1)
    moments = []
    for part in _chunks(x, w, out.shape):
        cols, _ = _columns(_hooked(x[part], in_affine), w, out.shape, stride, pad, dilation, groups)
        y = np.matmul(w3, cols).reshape(out[part].shape)
        if b is not None and b.size:  # (the kernels' "no bias": None or empty)
            y += b.reshape(1, o, 1, 1)
        if residual is not None:
            y += residual[part]
        if act:
            np.maximum(y, 0, out=y)
        out[part] = y
        if stats is not None:
            moments.append(_chunk_moments(y))
    if stats is not None:
        stats[0], stats[1] = merge_moments(np.array(moments))


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


def _input_gradient(g, w, x_shape, geo, groups):
    """dx of a chunk from its output gradient g: for a stride-1 conv with no more output
    channels than input channels, the correlation of the padded g with the flipped,
    transposed weights (im2col of g and a matmul, as the forward: 0.6x the time on
    ResNet-20's convs); otherwise every window's gradient columns added into place."""
    sh, sw, pt, pl, dh, dw, kh, kw, oh, ow, rows, cols = geo
    (n, c, h, wd), o = (g.shape[0], *x_shape[1:]), w.shape[0]
    top, left = (kh - 1) * dh - pt, (kw - 1) * dw - pl  # g's padding for the correlation
    if sh == sw == 1 and o <= c and top >= 0 and left >= 0:
        flipped = w.reshape(groups, o // groups, c // groups, kh, kw)[..., ::-1, ::-1]
        flipped = flipped.transpose(0, 2, 1, 3, 4).reshape(c, o // groups, kh, kw)
        windows, _ = _columns(g, flipped, (n, c, h, wd), (1, 1), (top, 0, left, 0),
                              (dh, dw), groups)  # fmt: skip
        return np.matmul(flipped.reshape(groups, c // groups, -1), windows).reshape(n, c, h, wd)
    g3 = g.reshape(n, groups, o // groups, oh * ow)
    w3 = w.reshape(groups, o // groups, -1)
    dcols = np.matmul(w3.transpose(0, 2, 1), g3).reshape(n, c, kh, kw, oh, ow)
    dxp = np.zeros((n, c, rows, cols), g.dtype)
    for i in range(kh):
        for j in range(kw):
            dxp[:, :, i * dh :: sh, j * dw :: sw][:, :, :oh, :ow] += dcols[:, :, i, j]
    h0, w0 = max(0, min(h, rows - pt)), max(0, min(wd, cols - pl))
    grad = np.zeros((n, c, h, wd), g.dtype)
    grad[:, :, :h0, :w0] = dxp[:, :, pt : pt + h0, pl : pl + w0]
    return grad


def conv2d_backward(x, w, dout, stride, pad, dilation, groups, dx, dw, db, out=None, act=0,
                    in_affine=None, accumulate=False, dout_affine=None, dx_sums=None,
                    relu_dx=False):  # fmt: skip
    """As the kernels' conv2d_backward (the same arguments and hooks, checked there)."""
    o = dout.shape[1]
    w3 = w.reshape(groups, o // groups, -1)
    # the chunks' sums in float64 (a batch of 128 is ~40 chunks of ResNet-20's first convs)
    dw_sum, db_sum = np.zeros((groups, o // groups, w3.shape[2])), np.zeros(o)
    sums = np.zeros((2, x.shape[1]))
    mean = None if dx_sums is None else dx_sums[0].astype(x.dtype)  # (as the norm passes it)
    for part in _chunks(x, w, dout.shape):
        g = _output_gradient(dout[part], None if out is None else out[part], act, dout_affine)
        db_sum += g.sum(axis=(0, 2, 3), dtype=np.float64)
        cols, geo = _columns(_hooked(x[part], in_affine), w, dout.shape, stride, pad, dilation,
                             groups)  # fmt: skip
        n = cols.shape[0]
        g3 = g.reshape(n, groups, o // groups, -1)
        dw_sum += np.matmul(g3, cols.transpose(0, 1, 3, 2)).sum(axis=0)
        if dx is None:
            continue
        grad = _input_gradient(g, w, x.shape, geo, groups)
        if accumulate:
            grad += dx[part]
        if relu_dx:
            grad[x[part] <= 0] = 0
        dx[part] = grad
        if dx_sums is not None:  # what the norm before reads: its backward's own sums
            part_sums = np.empty((2, x.shape[1]))
            _bn_bwd_sums_numpy(as_3d(grad), as_3d(x[part]), *in_affine, mean, *part_sums)
            sums += part_sums
    dw[...] = dw_sum.reshape(dw.shape)
    if db is not None:
        db[...] = db_sum
    if dx_sums is not None:
        dx_sums[1][...] = sums
