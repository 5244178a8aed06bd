"""2-D convolution kernels: im2col/col2im in Numba, GEMMs through numpy (BLAS).

Layouts follow PyTorch: activations NCHW, conv weights (O, C/groups, kh, kw),
transposed-conv weights (Cin, Cout, kh, kw). ``cols`` workspaces are
(N, C*kh*kw, OH*OW) with row index c*kh*kw + i*kw + j (``torch.nn.functional.unfold``
order). All kernels overwrite their outputs and return None.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import check_c, check_shape

__all__ = [
    "im2col",
    "col2im",
    "conv2d_forward",
    "conv2d_backward",
    "conv_transpose2d_forward",
    "conv_transpose2d_backward",
]


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


@njit(parallel=True, cache=True)
def _im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols):
    n_, c_, h_, w_ = x.shape
    kk = kh * kw
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        for i in range(kh):
            for j in range(kw):
                crow = cols[n, c * kk + i * kw + j]
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


@njit(parallel=True, cache=True)
def _col2im(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx):
    n_, c_, h_, w_ = dx.shape
    kk = kh * kw
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        dp = dx[n, c]
        dp[:, :] = 0
        for i in range(kh):
            for j in range(kw):
                crow = cols[n, c * kk + i * kw + j]
                offx = j * dw - pl
                lo, hi = _valid_range(offx, sw, w_, ow)
                for oy in range(oh):
                    iy = oy * sh - pt + i * dh
                    if iy < 0 or iy >= h_:
                        continue
                    base = oy * ow
                    if sw == 1:
                        # unit stride: contiguous slices vectorise well
                        dr = dp[iy, lo + offx : hi + offx]
                        sr = crow[base + lo : base + hi]
                        for t in range(hi - lo):
                            dr[t] += sr[t]
                    else:
                        dr = dp[iy]
                        for ox in range(lo, hi):
                            dr[ox * sw + offx] += crow[base + ox]


# Grouped convolutions whose per-group GEMMs are tiny (depthwise, ResNeXt-style) run as
# direct Numba loops; bigger groups (and groups=1) use one BLAS GEMM per sample and group.
_SMALL_GROUP_GEMM = 4096  # og * kg below this -> Numba loops
_DCOLS_SCRATCH_BYTES = 32 << 20  # conv2d_backward's input-gradient scratch (when not given)


@njit(parallel=True, cache=True)
def _grouped_fwd(w3, cols4, out4):
    n_, g_, kg, L = cols4.shape
    og = w3.shape[1]
    for ng in prange(n_ * g_):
        n = ng // g_
        g = ng - n * g_
        for o in range(og):
            orow = out4[n, g, o]
            orow[:] = 0
            for k in range(kg):
                wv = w3[g, o, k]
                crow = cols4[n, g, k]
                for t in range(L):
                    orow[t] += wv * crow[t]


@njit(parallel=True, cache=True)
def _grouped_dcols(w3, dout4, dcols4):
    n_, g_, og, L = dout4.shape
    kg = w3.shape[2]
    for ng in prange(n_ * g_):
        n = ng // g_
        g = ng - n * g_
        for k in range(kg):
            drow = dcols4[n, g, k]
            drow[:] = 0
            for o in range(og):
                wv = w3[g, o, k]
                grow = dout4[n, g, o]
                for t in range(L):
                    drow[t] += wv * grow[t]


@njit(parallel=True, cache=True)
def _grouped_dw(dout4, cols4, dw3):
    # one (group, out-channel) per iteration; the batch is summed in fixed order
    n_, g_, og, L = dout4.shape
    kg = cols4.shape[2]
    for go in prange(g_ * og):
        g = go // og
        o = go - g * og
        for k in range(kg):
            acc = 0.0
            for n in range(n_):
                grow = dout4[n, g, o]
                crow = cols4[n, g, k]
                for t in range(L):
                    acc += grow[t] * crow[t]
            dw3[g, o, k] = acc


def _use_blas(w3):
    g, og, kg = w3.shape
    return g == 1 or og * kg >= _SMALL_GROUP_GEMM


def _gemm_fwd(w3, cols4, out4):
    """out4[n, g] = w3[g] @ cols4[n, g]."""
    if _use_blas(w3):
        for i in range(cols4.shape[0]):
            for g in range(w3.shape[0]):
                np.matmul(w3[g], cols4[i, g], out=out4[i, g])
    else:
        _grouped_fwd(w3, cols4, out4)


def _gemm_dcols(w3, dout4, dcols4):
    """dcols4[n, g] = w3[g]^T @ dout4[n, g]."""
    if _use_blas(w3):
        for i in range(dout4.shape[0]):
            for g in range(w3.shape[0]):
                np.matmul(w3[g].T, dout4[i, g], out=dcols4[i, g])
    else:
        _grouped_dcols(w3, dout4, dcols4)


def _gemm_dw(dout4, cols4, dw3):
    """dw3[g] = sum_n dout4[n, g] @ cols4[n, g]^T, summed in fixed sample order."""
    if _use_blas(dw3):
        for g in range(dw3.shape[0]):
            _accumulate_batch_gemm(dout4[:, g], cols4[:, g].transpose(0, 2, 1), dw3[g])
    else:
        _grouped_dw(dout4, cols4, dw3)


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
    _im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)


def col2im(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx):
    """Adjoint of :func:`im2col`: fold cols back into dx (N,C,H,W), overwriting dx."""
    check_c(cols=cols, dx=dx)
    args = (kh, kw, sh, sw, pt, pl, dh, dw, oh, ow)
    kh, kw, sh, sw, pt, pl, dh, dw, oh, ow = (int(v) for v in args)
    _check_cols(dx, cols, kh, kw, oh, ow)
    _col2im(cols, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, dx)


def _unpack(stride, pad, dilation):
    sh, sw = (int(s) for s in stride)
    pt, pb, pl, pr = (int(p) for p in pad)
    dh, dw = (int(d) for d in dilation)
    return sh, sw, pt, pb, pl, pr, dh, dw


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


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, cols):
    """out = conv2d(x, w) + b (PyTorch cross-correlation); cols <- im2col(x)."""
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    n, c, _h, _w = x.shape
    o, cg, kh, kw = w.shape
    g = int(groups)
    if c != cg * g or o % g:
        raise ValueError(f"bad grouped conv shapes: x {x.shape}, w {w.shape}, groups {g}")
    oh, ow = out.shape[2], out.shape[3]
    check_shape("out", out, (n, o, oh, ow))
    check_c(x=x, w=w, out=out, cols=cols)
    _check_cols(x, cols, kh, kw, oh, ow)
    _im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)
    L = oh * ow
    kg = cg * kh * kw
    og = o // g
    _gemm_fwd(w.reshape(g, og, kg), cols.reshape(n, g, kg, L), out.reshape(n, g, og, L))
    if b is not None:
        out += b.reshape(1, o, 1, 1)


def conv2d_backward(x, w, dout, stride, pad, dilation, groups, cols, dx, dw, db, dcols=None):
    """Gradients of :func:`conv2d_forward`.

    ``cols`` must still hold im2col(x) from the forward pass; it is not modified.
    dx / db may be None. ``dcols`` (optional extension, same shape/dtype as cols) is a
    workspace for the input gradient; without it a scratch of at most
    ``_DCOLS_SCRATCH_BYTES`` (but at least one sample) is allocated per call.
    """
    sh, sw, pt, _pb, pl, _pr, dh, dwl = _unpack(stride, pad, dilation)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    g = int(groups)
    oh, ow = dout.shape[2], dout.shape[3]
    L = oh * ow
    kg = cg * kh * kw
    og = o // g
    check_shape("dout", dout, (n, o, oh, ow))
    check_shape("dw", dw, w.shape)
    check_c(x=x, w=w, dout=dout, cols=cols, dx=dx, dw=dw, dcols=dcols)
    _check_cols(x, cols, kh, kw, oh, ow)
    dout4 = dout.reshape(n, g, og, L)
    cols4 = cols.reshape(n, g, kg, L)
    if db is not None:
        check_shape("db", db, (o,))
        np.sum(dout, axis=(0, 2, 3), out=db)
    _gemm_dw(dout4, cols4, dw.reshape(g, og, kg))
    if dx is None:
        return
    check_shape("dx", dx, x.shape)
    if dcols is None:
        # bounded scratch: process the batch in chunks instead of a second full cols buffer
        per_sample = max(1, c * kh * kw * L * cols.itemsize)
        chunk = int(min(n, max(1, _DCOLS_SCRATCH_BYTES // per_sample)))
        dcols = np.empty((chunk, c * kh * kw, L), dtype=cols.dtype)
    else:
        _check_cols(x, dcols, kh, kw, oh, ow, "dcols")
        chunk = n
    w3 = w.reshape(g, og, kg)
    for s0 in range(0, n, chunk):
        s1 = min(n, s0 + chunk)
        buf = dcols[: s1 - s0]
        _gemm_dcols(w3, dout4[s0:s1], buf.reshape(s1 - s0, g, kg, L))
        _col2im(buf, kh, kw, sh, sw, pt, pl, dh, dwl, oh, ow, dx[s0:s1])


def conv_transpose2d_forward(x, w, b, stride, pad, dilation, out, cols):
    """PyTorch ConvTranspose2d (groups=1): cols <- W^T x, out <- col2im(cols) + b."""
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    n, cin, h, wd = x.shape
    cin_w, cout, kh, kw = w.shape
    if cin_w != cin:
        raise ValueError(f"weight {w.shape} does not match input channels {cin}")
    check_shape("out", out, (n, cout, out.shape[2], out.shape[3]))
    check_c(x=x, w=w, out=out, cols=cols)
    _check_cols(out, cols, kh, kw, h, wd)
    w2t = w.reshape(cin, cout * kh * kw).T
    x3 = x.reshape(n, cin, h * wd)
    for i in range(n):
        np.matmul(w2t, x3[i], out=cols[i])
    _col2im(cols, kh, kw, sh, sw, pt, pl, dh, dw, h, wd, out)
    if b is not None:
        out += b.reshape(1, cout, 1, 1)


def conv_transpose2d_backward(x, w, dout, stride, pad, dilation, cols, dx, dw, db):
    """Gradients of :func:`conv_transpose2d_forward`; ``cols`` is used as workspace
    (overwritten with im2col(dout)). dx / db may be None."""
    sh, sw, pt, _pb, pl, _pr, dh, dwl = _unpack(stride, pad, dilation)
    n, cin, h, wd = x.shape
    _, cout, kh, kw = w.shape
    check_shape("dout", dout, (n, cout, dout.shape[2], dout.shape[3]))
    check_shape("dw", dw, w.shape)
    check_c(x=x, w=w, dout=dout, cols=cols, dx=dx, dw=dw)
    _check_cols(dout, cols, kh, kw, h, wd)
    if db is not None:
        check_shape("db", db, (cout,))
        np.sum(dout, axis=(0, 2, 3), out=db)
    _im2col(dout, kh, kw, sh, sw, pt, pl, dh, dwl, h, wd, cols)
    k = cout * kh * kw
    x3 = x.reshape(n, cin, h * wd)
    _accumulate_batch_gemm(x3, cols.transpose(0, 2, 1), dw.reshape(cin, k))
    if dx is not None:
        check_shape("dx", dx, x.shape)
        w2 = w.reshape(cin, k)
        dx3 = dx.reshape(n, cin, h * wd)
        for i in range(n):
            np.matmul(w2, cols[i], out=dx3[i])
