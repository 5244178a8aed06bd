"""conv_transpose2d kernels, on im2col/col2im and numpy's GEMM.

Layouts follow PyTorch: activations NCHW, transposed-conv weights (Cin, Cout, kh, kw).
``cols`` workspaces are (N, C*kh*kw, OH*OW) with row index c*kh*kw + i*kw + j
(``torch.nn.functional.unfold`` order). All kernels overwrite their outputs and
return None.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import SplitBySize, check_c, check_shape
from ._common import unpack_geometry as _unpack

__all__ = ["im2col", "col2im", "conv_transpose2d_forward", "conv_transpose2d_backward"]


@njit(cache=True)
def _valid_range(off, stride, size, n_out):
    """Indices o in [lo, hi) with 0 <= o*stride + off < size, clipped to [0, n_out)."""
    if off < 0:
        lo = (-off + stride - 1) // stride
    else:
        lo = 0
    last = size - 1 - off
    if last < 0:
        hi = 0
    else:
        hi = last // stride + 1
    if hi > n_out:
        hi = n_out
    if lo > hi:
        lo = hi
    return lo, hi


@SplitBySize
def _im2col_t(x, n0, nb, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    _, c_, h_, w_ = x.shape
    kk = kh * kw
    L = oh * ow
    for nc in prange(nb * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n0 + n, c]
        for i in range(kh):
            for j in range(kw):
                crow = cols[c * kk + i * kw + j, n * L : n * L + L]
                offx = j * dw - pl
                lo, hi = _valid_range(offx, sw, w_, ow)
                for oy in range(oh):
                    iy = oy * sh - pt + i * dh
                    seg = crow[oy * ow : oy * ow + ow]
                    if iy < 0 or iy >= h_:
                        seg[:] = 0
                        continue
                    xr = xp[iy]
                    seg[:lo] = 0
                    if sw == 1:
                        seg[lo:hi] = xr[lo + offx : hi + offx]
                    else:
                        for ox in range(lo, hi):
                            seg[ox] = xr[ox * sw + offx]
                    seg[hi:] = 0


@SplitBySize
def _col2im_t(cols, n0, nb, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx):
    _, c_, h_, w_ = dx.shape
    kk = kh * kw
    L = oh * ow
    for nc in prange(nb * c_):
        n = nc // c_
        c = nc - n * c_
        dp = dx[n0 + n, c]
        dp[:, :] = 0
        for i in range(kh):
            for j in range(kw):
                crow = cols[c * kk + i * kw + j, n * L : n * L + L]
                offx = j * dw - pl
                lo, hi = _valid_range(offx, sw, w_, ow)
                for oy in range(oh):
                    iy = oy * sh - pt + i * dh
                    if iy < 0 or iy >= h_:
                        continue
                    base = oy * ow
                    if sw == 1:
                        dr = dp[iy, lo + offx : hi + offx]
                        sr = crow[base + lo : base + hi]
                        for t in range(hi - lo):
                            dr[t] += sr[t]
                    else:
                        dr = dp[iy]
                        for ox in range(lo, hi):
                            dr[ox * sw + offx] += crow[base + ox]


def _check_cols(x, cols, kh, kw, oh, ow, name="cols"):
    check_shape(name, cols, (x.shape[0], x.shape[1] * kh * kw, oh * ow))
    if cols.dtype != x.dtype:
        raise ValueError(f"{name} dtype {cols.dtype} != {x.dtype}")


def im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    """Unfold x (N,C,H,W) into cols (N, C*kh*kw, oh*ow); padded positions are 0."""
    check_c(x=x, cols=cols)
    args = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = (int(v) for v in args)
    _check_cols(x, cols, kh, kw, oh, ow)
    _im2col_each(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)


def col2im(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx):
    """Adjoint of :func:`im2col`: fold cols back into dx (N,C,H,W), overwriting dx."""
    check_c(cols=cols, dx=dx)
    args = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = (int(v) for v in args)
    _check_cols(dx, cols, kh, kw, oh, ow)
    _col2im_each(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx)


def _im2col_each(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    """Per-sample layout (N, K, L): sample i's matrix is a one-sample chunk."""
    for i in range(x.shape[0]):
        _im2col_t(x, i, 1, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols[i])


def _col2im_each(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx):
    for i in range(dx.shape[0]):
        _col2im_t(cols[i], i, 1, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx)


def _accumulate_batch_gemm(a, b_t, dst, tmp=None):
    """dst = sum_n a[n] @ b_t[n] in fixed sample order (deterministic).

    a: (N, ..., M, L), b_t: (N, ..., L, K) (may be a transposed view), dst (..., M, K).
    """
    n = a.shape[0]
    np.matmul(a[0], b_t[0], out=dst)
    if n > 1:
        if tmp is None:
            tmp = np.empty_like(dst)
        for i in range(1, n):
            np.matmul(a[i], b_t[i], out=tmp)
            dst += tmp


def _groups_of(w, cin, groups):
    """Per group: its input channels and its rows of cols (output channels x taps)."""
    cin_w, cout_g, kh, kw = w.shape
    if groups < 1 or cin % groups or cin_w != cin:
        raise ValueError(f"weight {w.shape} does not match {cin} input channels in {groups} groups")
    cig, k = cin // groups, cout_g * kh * kw
    return [(slice(g * cig, (g + 1) * cig), slice(g * k, (g + 1) * k)) for g in range(groups)]


def conv_transpose2d_forward(x, w, b, stride, pad, dilation, out, cols, groups=1):
    """PyTorch ConvTranspose2d: per group, cols <- W_g^T x_g; out <- col2im(cols) + b.
    w is (C_in, C_out/groups, kh, kw), as PyTorch lays it out."""
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    cout = cout_g * groups
    parts = _groups_of(w, cin, groups)
    check_shape("out", out, (n, cout, out.shape[2], out.shape[3]))
    check_c(x=x, w=w, out=out, cols=cols)
    _check_cols(out, cols, kh, kw, h, wd)
    x3 = x.reshape(n, cin, h * wd)
    for chans, rows in parts:
        w2t = w[chans].reshape(-1, cout_g * kh * kw).T
        for i in range(n):
            np.matmul(w2t, x3[i, chans], out=cols[i, rows])
    _col2im_each(cols, kh, kw, sh, sw, pt, pl, dh, dw, h, wd, out)
    if b is not None:
        out += b.reshape(1, cout, 1, 1)


def conv_transpose2d_backward(x, w, dout, stride, pad, dilation, cols, dx, dw, db, groups=1):
    """Gradients of :func:`conv_transpose2d_forward`; ``cols`` is used as workspace
    (overwritten with im2col(dout)). dx / db may be None."""
    sh, sw, pt, _pb, pl, _pr, dh, dwl = _unpack(stride, pad, dilation)
    n, cin, h, wd = x.shape
    _, cout_g, kh, kw = w.shape
    cout = cout_g * groups
    parts = _groups_of(w, cin, groups)
    check_shape("dout", dout, (n, cout, dout.shape[2], dout.shape[3]))
    check_shape("dw", dw, w.shape)
    check_c(x=x, w=w, dout=dout, cols=cols, dx=dx, dw=dw)
    _check_cols(dout, cols, kh, kw, h, wd)
    if db is not None:
        check_shape("db", db, (cout,))
        np.sum(dout, axis=(0, 2, 3), out=db)
    _im2col_each(dout, kh, kw, sh, sw, pt, pl, dh, dwl, h, wd, cols)
    k = cout_g * kh * kw
    x3 = x.reshape(n, cin, h * wd)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        dx3 = dx.reshape(n, cin, h * wd)
    for chans, rows in parts:
        _accumulate_batch_gemm(
            x3[:, chans], cols[:, rows].transpose(0, 2, 1), dw[chans].reshape(-1, k)
        )
        if dx is not None:
            w2 = w[chans].reshape(-1, k)
            for i in range(n):
                np.matmul(w2, cols[i, rows], out=dx3[i, chans])
