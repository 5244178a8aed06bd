"""2-D convolution kernels: im2col/col2im in Numba, GEMMs through numpy (BLAS).

Layouts follow PyTorch: activations NCHW, conv weights (O, C/groups, kh, kw),
transposed-conv weights (Cin, Cout, kh, kw). ``cols`` workspaces are
(N, C*kh*kw, OH*OW) with row index c*kh*kw + i*kw + j (``torch.nn.functional.unfold``
order). All kernels overwrite their outputs and return None.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ._common import check_c, check_shape, matmul

__all__ = [
    "ACT_NONE",
    "ACT_RELU",
    "conv2d_workspace",
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


# ---------------------------------------------------------------- batched lowering
# conv2d runs a chunk of samples at a time: im2col writes the chunk as one matrix
# cols (K, nb*L), K = C*kh*kw, L = OH*OW, so each group needs one GEMM per chunk
# instead of one per sample; an epilogue then scatters the (O, nb*L) product into
# NCHW while adding the bias and applying a fused activation. The chunk is sized
# from the workspace, which bounds memory for large images and batches.

ACT_NONE, ACT_RELU = 0, 1
_SMALL_GROUP_GEMM = 4096  # og * kg below this -> Numba loops instead of BLAS
_CHUNK_BYTES = 24 << 20  # default workspace per conv call


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
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


@njit(parallel=True, cache=True)
def _epilogue(prod, bias, act, n0, nb, out):
    """out[n0+n, o] = act(prod[o, n*L : (n+1)*L] + bias[o]) (bias may be empty)."""
    o_ = out.shape[1]
    L = out.shape[2] * out.shape[3]
    has_bias = bias.shape[0] > 0
    for no in prange(nb * o_):
        n = no // o_
        o = no - n * o_
        src = prod[o, n * L : n * L + L]
        dst = out[n0 + n, o].reshape(L)
        b = bias[o] if has_bias else 0.0
        if act == 1:
            for t in range(L):
                v = src[t] + b
                dst[t] = v if v > 0 else 0.0
        else:
            for t in range(L):
                dst[t] = src[t] + b


@njit(parallel=True, cache=True)
def _gather_grad(dout, out, act, n0, nb, dprod):
    """dprod[o, n*L + t] = dout[n0+n, o, t], masked by a fused ReLU's output."""
    o_ = dout.shape[1]
    L = dout.shape[2] * dout.shape[3]
    for no in prange(nb * o_):
        n = no // o_
        o = no - n * o_
        src = dout[n0 + n, o].reshape(L)
        dst = dprod[o, n * L : n * L + L]
        if act == 1:
            y = out[n0 + n, o].reshape(L)
            for t in range(L):
                dst[t] = src[t] if y[t] > 0 else 0.0
        else:
            for t in range(L):
                dst[t] = src[t]


@njit(parallel=True, cache=True)
def _grouped_product(w3, cols, prod):
    # prod[g*og + o] = sum_k w3[g, o, k] * cols[g*kg + k]: per-group GEMMs too small for BLAS
    g_, og, kg = w3.shape
    m = cols.shape[1]
    for go in prange(g_ * og):
        g = go // og
        o = go - g * og
        dst = prod[go]
        dst[:] = 0
        for k in range(kg):
            wv = w3[g, o, k]
            src = cols[g * kg + k]
            for t in range(m):
                dst[t] += wv * src[t]


@njit(parallel=True, cache=True)
def _grouped_dw_t(dprod, cols, dw3, accumulate):
    g_, og, kg = dw3.shape
    m = cols.shape[1]
    for go in prange(g_ * og):
        g = go // og
        o = go - g * og
        grow = dprod[go]
        for k in range(kg):
            crow = cols[g * kg + k]
            acc = 0.0
            for t in range(m):
                acc += grow[t] * crow[t]
            if accumulate:
                dw3[g, o, k] += acc
            else:
                dw3[g, o, k] = acc


def _use_blas(w3):
    g, og, kg = w3.shape
    return g == 1 or og * kg >= _SMALL_GROUP_GEMM


def conv2d_workspace(x_shape, w_shape, out_shape, batch_chunk=None) -> int:
    """Elements a conv2d workspace needs for `batch_chunk` samples per GEMM (default:
    as many as fit in about 24 MiB, at least one, at most the batch)."""
    n = x_shape[0]
    per = _per_sample(x_shape, w_shape, out_shape)
    if batch_chunk is None:
        batch_chunk = max(1, min(n, _CHUNK_BYTES // (4 * per)))
    return int(per * batch_chunk)


def _per_sample(x_shape, w_shape, out_shape):
    o, cg, kh, kw = w_shape
    k = x_shape[1] * kh * kw
    return (2 * k + o) * out_shape[2] * out_shape[3]  # cols + dcols + product


def _views(ws, x, w, out, cols=None):
    """Chunk size and the (cols, dcols, product) matrices inside the workspace; a
    caller-kept `cols` (K, N*L) means one chunk and no recomputing in backward."""
    n, c = x.shape[:2]
    o, _cg, kh, kw = w.shape
    L = out.shape[2] * out.shape[3]
    k = c * kh * kw
    flat = ws.reshape(-1)
    if cols is not None:
        check_shape("cols", cols, (k, n * L))
        if flat.size < (k + o) * n * L:
            raise ValueError(f"conv2d workspace has {flat.size} elements, need {(k + o) * n * L}")
        dcols = flat[: k * n * L].reshape(k, n * L)
        prod = flat[k * n * L : (k + o) * n * L].reshape(o, n * L)
        return n, cols, dcols, prod
    nb = min(n, flat.size // _per_sample(x.shape, w.shape, out.shape))
    if nb < 1:
        need = _per_sample(x.shape, w.shape, out.shape)
        raise ValueError(f"conv2d workspace has {flat.size} elements, one sample needs {need}")
    cols = flat[: k * nb * L].reshape(k, nb * L)
    dcols = flat[k * nb * L : 2 * k * nb * L].reshape(k, nb * L)
    prod = flat[2 * k * nb * L : (2 * k + o) * nb * L].reshape(o, nb * L)
    return nb, cols, dcols, prod


def _bias_or_empty(b, dtype):
    return np.zeros(0, dtype) if b is None else b


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, ws, act=ACT_NONE, cols=None):
    """out = act(conv2d(x, w) + b), PyTorch cross-correlation; `ws` is a workspace of
    at least :func:`conv2d_workspace` elements (any shape, C-contiguous). A `cols`
    matrix (C*kh*kw, N*OH*OW) kept by the caller keeps im2col(x) for the backward pass."""
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    n, c, _h, _w = x.shape
    o, cg, kh, kw = w.shape
    g = int(groups)
    if c != cg * g or o % g:
        raise ValueError(f"bad grouped conv shapes: x {x.shape}, w {w.shape}, groups {g}")
    oh, ow = out.shape[2], out.shape[3]
    check_shape("out", out, (n, o, oh, ow))
    check_c(x=x, w=w, out=out, ws=ws, cols=cols)
    nb, cols, _dcols, prod = _views(ws, x, w, out, cols)
    w3 = w.reshape(g, o // g, cg * kh * kw)
    bias = _bias_or_empty(b, x.dtype)
    for n0 in range(0, n, nb):
        m = min(nb, n - n0)
        L = oh * ow
        c_m, p_m = cols[:, : m * L], prod[:, : m * L]
        _im2col_t(x, n0, m, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)
        _product(w3, c_m, p_m)
        _epilogue(prod, bias, int(act), n0, m, out)


def _product(w3, cols, prod):
    """prod[g*og:(g+1)*og] = w3[g] @ cols[g*kg:(g+1)*kg] for each group."""
    g, og, kg = w3.shape
    if not _use_blas(w3):
        _grouped_product(w3, cols, prod)
        return
    for gi in range(g):
        matmul(w3[gi], cols[gi * kg : (gi + 1) * kg], prod[gi * og : (gi + 1) * og])


def conv2d_backward(
    x, w, dout, stride, pad, dilation, groups, ws, dx, dw, db, out=None, act=ACT_NONE, cols=None
):
    """Gradients of :func:`conv2d_forward`: im2col is recomputed per chunk unless the
    forward's `cols` is passed back; `out` is needed when an activation was fused.
    dx / db may be None; dw is overwritten."""
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
    check_c(x=x, w=w, dout=dout, ws=ws, dx=dx, dw=dw, cols=cols)
    kept = cols is not None
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    if dx is not None:
        check_shape("dx", dx, x.shape)
    if db is not None:
        check_shape("db", db, (o,))
    nb, cols, dcols, prod = _views(ws, x, w, dout, cols)
    w3 = w.reshape(g, og, kg)
    dw3 = dw.reshape(g, og, kg)
    y = out if out is not None else dout
    blas = _use_blas(w3)
    for n0 in range(0, n, nb):
        m = min(nb, n - n0)
        c_m, d_m, p_m = cols[:, : m * L], dcols[:, : m * L], prod[:, : m * L]
        _gather_grad(dout, y, int(act), n0, m, prod)
        if not kept:
            _im2col_t(x, n0, m, kh, kw, sh, sw, pt, pl, dh, dwl, oh, ow, cols)
        first = n0 == 0
        if db is not None:
            part = p_m.sum(axis=1)
            if first:
                db[...] = part
            else:
                db += part
        if blas:
            for gi in range(g):
                rows, ks = slice(gi * og, (gi + 1) * og), slice(gi * kg, (gi + 1) * kg)
                if first:
                    matmul(p_m[rows], c_m[ks].T, dw3[gi])
                else:
                    dw3[gi] += p_m[rows] @ c_m[ks].T
        else:
            _grouped_dw_t(p_m, c_m, dw3, not first)
        if dx is None:
            continue
        if blas:
            for gi in range(g):
                rows, ks = slice(gi * og, (gi + 1) * og), slice(gi * kg, (gi + 1) * kg)
                matmul(w3[gi].T, p_m[rows], d_m[ks])
        else:
            _grouped_product(np.ascontiguousarray(w3.transpose(0, 2, 1)), p_m, d_m)
        _col2im_t(dcols, n0, m, kh, kw, sh, sw, pt, pl, dh, dwl, oh, ow, dx)


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
    _col2im_each(cols, kh, kw, sh, sw, pt, pl, dh, dw, h, wd, out)
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
    _im2col_each(dout, kh, kw, sh, sw, pt, pl, dh, dwl, h, wd, cols)
    k = cout * kh * kw
    x3 = x.reshape(n, cin, h * wd)
    _accumulate_batch_gemm(x3, cols.transpose(0, 2, 1), dw.reshape(cin, k))
    if dx is not None:
        check_shape("dx", dx, x.shape)
        w2 = w.reshape(cin, k)
        dx3 = dx.reshape(n, cin, h * wd)
        for i in range(n):
            np.matmul(w2, cols[i], out=dx3[i])
