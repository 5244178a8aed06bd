"""2-D convolution kernels: im2col/col2im in Numba, GEMMs through BLAS.

Layouts follow PyTorch: activations NCHW, conv weights (O, C/groups, kh, kw),
transposed-conv weights (Cin, Cout, kh, kw). ``cols`` workspaces are
(N, C*kh*kw, OH*OW) with row index c*kh*kw + i*kw + j (``torch.nn.functional.unfold``
order). All kernels overwrite their outputs and return None.
"""

from __future__ import annotations

from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

from ._common import check_c, check_shape, single_threaded_blas
from .blas import gemm

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


# ---------------------------------------------------------------- tiled conv2d
# Each thread owns a slice of the workspace and walks its own tiles (a band of
# output rows of one sample): it pads the sample once into a private buffer,
# unfolds the tile's patches (im2col) into a matrix small enough to stay in its
# core's L2 cache, multiplies by the weights with a one-thread BLAS GEMM called
# from Numba, and writes the product through the bias and the fused activation
# into the output. Nothing large goes through main memory, and nothing returns to
# Python per tile. The backward pass gives each thread whole samples (their dx
# bands overlap) and private dW / db sums, added up afterwards in thread order.
#
# With stride 1 a tile's patch row for (c, i, j) is one contiguous run of the
# padded sample: the product is computed over the padded width wp (the last
# wp - ow columns of each row are junk, dropped by the epilogue and zero in the
# backward pass), so im2col is C*kh*kw memory copies per tile.

ACT_NONE, ACT_RELU = 0, 1
_SMALL_GROUP_GEMM = 4096  # og * kg below this -> Numba loops instead of BLAS
_TILE_ELEMENTS = 1 << 19  # a tile's im2col matrix (2 MiB in float32): L2-sized; larger
# tiles run the GEMMs faster, smaller ones fall out of cache (measured 0.5-4 MiB)


class _Geometry(NamedTuple):
    hp: int  # padded input height and width
    wp: int
    owe: int  # product columns per output row: wp with stride 1, else ow
    rows: int  # output rows per tile
    tiles: int  # tiles per sample
    pad_size: int  # a padded sample, with slack for the junk columns' reads
    per_thread: int  # workspace elements per thread


def _geometry(x_shape, w_shape, out_shape, stride, pad, dilation, rows=None, space=None):
    """Tile sizes: `rows` output rows per tile, else as many as fill _TILE_ELEMENTS
    and, when `space` (workspace elements per thread) is given, fit in it."""
    c, h, w = x_shape[1:]
    o, cg, kh, kw = w_shape
    oh, ow = out_shape[2], out_shape[3]
    pt, pb, pl, pr = (int(p) for p in pad)
    hp, wp = h + pt + pb, w + pl + pr
    owe = wp if tuple(int(s) for s in stride) == (1, 1) else ow
    k = c * kh * kw
    pad_size = c * hp * wp + (kw - 1) * int(dilation[1]) + wp
    # padded x and dx, dW, db; then per tile column: cols, dcols, the product
    fixed = 2 * pad_size + o * cg * kh * kw + o
    per_column = 2 * k + o
    if rows is None:
        rows = max(1, _TILE_ELEMENTS // (k * owe))
        if space is not None:
            rows = min(rows, (space - fixed) // (per_column * owe))
    rows = min(rows, oh)
    tiles = -(-oh // max(rows, 1))
    rows = -(-oh // tiles)  # bands of even height
    return _Geometry(hp, wp, owe, rows, tiles, pad_size, fixed + per_column * rows * owe)


def conv2d_workspace(
    x_shape, w_shape, out_shape, stride=(1, 1), pad=(0, 0, 0, 0), dilation=(1, 1), tile_rows=None
) -> int:
    """Elements of workspace a conv2d needs for all of Numba's threads: each takes
    a padded sample and its gradient, one tile's im2col matrix and its gradient,
    the tile's product and private dW / db sums. A smaller workspace runs smaller
    tiles (`tile_rows` output rows each), or fewer threads."""
    geo = _geometry(x_shape, w_shape, out_shape, stride, pad, dilation, tile_rows)
    return geo.per_thread * numba.get_num_threads()


# Inner loops index views with the loop variable alone: an index like s + q, whose
# sign Numba cannot see, gets a negative-index check that stops LLVM vectorizing
# the loop (measured: a 10x slower copy).


@njit(cache=True, nogil=True)
def _pad_sample(x, n, pt, pl, hp, wp, xpad):
    """xpad[c, y, x] (flat, hp x wp per channel) = x[n] placed at (pt, pl), zeros around."""
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    xpad[:] = 0
    for c in range(c_):
        for y in range(h_):
            d = c * hp * wp + (y + pt) * wp + pl
            dst, src = xpad[d : d + w_], x[n, c, y]
            for v in range(w_):
                dst[v] = src[v]


@njit(cache=True, nogil=True)
def _unfold(xpad, c_, kh, kw, sh, sw, dh, dw, hp, wp, oy0, nr, owe, ow, cols):
    """cols[(c, i, j), r*owe + ox] = xpad[c, (oy0+r)*sh + i*dh, ox*sw + j*dw]."""
    tc = nr * owe
    for c in range(c_):
        for i in range(kh):
            for j in range(kw):
                row = cols[(c * kh + i) * kw + j]
                if sh == 1 and sw == 1:  # one run: rows of the padded sample follow on
                    s = c * hp * wp + (oy0 + i * dh) * wp + j * dw
                    src = xpad[s : s + tc]
                    for q in range(tc):  # not row[:] = src: Numba checks overlap, slower
                        row[q] = src[q]
                    continue
                for r in range(nr):
                    s = c * hp * wp + ((oy0 + r) * sh + i * dh) * wp + j * dw
                    src, dst = xpad[s : s + (ow - 1) * sw + 1 : sw], row[r * owe : r * owe + ow]
                    for ox in range(ow):
                        dst[ox] = src[ox]


@njit(cache=True, nogil=True)
def _fold(dcols, c_, kh, kw, sh, sw, dh, dw, hp, wp, oy0, nr, owe, ow, dxpad):
    """Adjoint of _unfold: dxpad[...] += dcols[...]."""
    tc = nr * owe
    for c in range(c_):
        for i in range(kh):
            for j in range(kw):
                row = dcols[(c * kh + i) * kw + j]
                if sh == 1 and sw == 1:
                    s = c * hp * wp + (oy0 + i * dh) * wp + j * dw
                    dst = dxpad[s : s + tc]
                    for q in range(tc):
                        dst[q] += row[q]
                    continue
                for r in range(nr):
                    s = c * hp * wp + ((oy0 + r) * sh + i * dh) * wp + j * dw
                    dst, src = dxpad[s : s + (ow - 1) * sw + 1 : sw], row[r * owe : r * owe + ow]
                    for ox in range(ow):
                        dst[ox] += src[ox]


@njit(cache=True, nogil=True)
def _matrix(ws, at, rows, cols):
    return ws[at : at + rows * cols].reshape((rows, cols))


@njit(cache=True, nogil=True)
def _product(w3, cols, blas, prod):
    """prod[g*og + o] = w3[g, o] @ cols[g*kg : (g+1)*kg] for each group g."""
    g_, og, kg = w3.shape
    for g in range(g_):
        a, b = cols[g * kg : (g + 1) * kg], prod[g * og : (g + 1) * og]
        if blas:
            gemm(False, False, 1.0, w3[g], a, 0.0, b)
            continue
        b[:] = 0
        for o in range(og):
            for k in range(kg):
                wv = w3[g, o, k]
                for q in range(a.shape[1]):
                    b[o, q] += wv * a[k, q]


@njit(cache=True, nogil=True)
def _product_t(w3, dprod, blas, dcols):
    """dcols[g*kg:(g+1)*kg] = w3[g].T @ dprod[g*og:(g+1)*og]."""
    g_, og, kg = w3.shape
    for g in range(g_):
        a, b = dprod[g * og : (g + 1) * og], dcols[g * kg : (g + 1) * kg]
        if blas:
            gemm(True, False, 1.0, w3[g], a, 0.0, b)
            continue
        b[:] = 0
        for o in range(og):
            for k in range(kg):
                wv = w3[g, o, k]
                for q in range(a.shape[1]):
                    b[k, q] += wv * a[o, q]


@njit(cache=True, nogil=True)
def _add_weight_grad(dprod, cols, blas, dw3):
    """dw3[g] += dprod[g*og:(g+1)*og] @ cols[g*kg:(g+1)*kg].T."""
    g_, og, kg = dw3.shape
    for g in range(g_):
        a, b = dprod[g * og : (g + 1) * og], cols[g * kg : (g + 1) * kg]
        if blas:
            gemm(False, True, 1.0, a, b, 1.0, dw3[g])
            continue
        for o in range(og):
            for k in range(kg):
                acc = 0.0
                for q in range(a.shape[1]):
                    acc += a[o, q] * b[k, q]
                dw3[g, o, k] += acc


@njit(parallel=True, cache=True)
def _forward_tiles(x, w3, bias, act, blas, dims, geo, T, out, ws):
    sh, sw, pt, pl, dh, dw, kh, kw = dims
    hp, wp, owe, rows, tiles, pad_size, per = geo
    n_, c_ = x.shape[0], x.shape[1]
    o_, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    k_ = c_ * kh * kw
    total = n_ * tiles
    has_bias = bias.shape[0] > 0
    for t in prange(T):
        base = t * per
        xpad = ws[base : base + pad_size]
        at_cols = base + 2 * pad_size
        at_prod = at_cols + 2 * k_ * rows * owe
        last = -1
        for tile in range(t * total // T, (t + 1) * total // T):
            n = tile // tiles
            oy0 = (tile - n * tiles) * rows
            nr = min(rows, oh - oy0)
            if n != last:
                _pad_sample(x, n, pt, pl, hp, wp, xpad)
                last = n
            cols = _matrix(ws, at_cols, k_, nr * owe)
            prod = _matrix(ws, at_prod, o_, nr * owe)
            _unfold(xpad, c_, kh, kw, sh, sw, dh, dw, hp, wp, oy0, nr, owe, ow, cols)
            _product(w3, cols, blas, prod)
            for o in range(o_):
                b = bias[o] if has_bias else 0.0
                for r in range(nr):
                    src = prod[o, r * owe : r * owe + ow]
                    dst = out[n, o, oy0 + r]
                    for v in range(ow):
                        y = src[v] + b
                        dst[v] = (y if y > 0 else 0.0) if act == 1 else y


@njit(parallel=True, cache=True)
def _backward_samples(x, w3, dout, y, act, blas, want_dx, dims, geo, T, dx, ws):
    sh, sw, pt, pl, dh, dw, kh, kw = dims
    hp, wp, owe, rows, tiles, pad_size, per = geo
    n_, c_, h_, w_ = x.shape
    o_, oh, ow = dout.shape[1], dout.shape[2], dout.shape[3]
    g_, og, kg = w3.shape
    k_ = c_ * kh * kw
    wsize = w3.size
    for t in prange(T):
        base = t * per
        xpad = ws[base : base + pad_size]
        dxpad = ws[base + pad_size : base + 2 * pad_size]
        at_cols = base + 2 * pad_size
        at_dcols = at_cols + k_ * rows * owe
        at_prod = at_dcols + k_ * rows * owe
        at_dw = at_prod + o_ * rows * owe
        dw3 = ws[at_dw : at_dw + wsize].reshape((g_, og, kg))
        db = ws[at_dw + wsize : at_dw + wsize + o_]
        dw3[:] = 0
        db[:] = 0
        for n in range(t * n_ // T, (t + 1) * n_ // T):
            _pad_sample(x, n, pt, pl, hp, wp, xpad)
            if want_dx:
                dxpad[:] = 0
            for b in range(tiles):
                oy0 = b * rows
                nr = min(rows, oh - oy0)
                cols = _matrix(ws, at_cols, k_, nr * owe)
                dprod = _matrix(ws, at_prod, o_, nr * owe)
                for o in range(o_):
                    acc = 0.0
                    for r in range(nr):
                        dst = dprod[o, r * owe : (r + 1) * owe]
                        src = dout[n, o, oy0 + r]
                        yr = y[n, o, oy0 + r]
                        for v in range(ow):
                            d = src[v] if act == 0 or yr[v] > 0 else 0.0
                            dst[v] = d
                            acc += d
                        dst[ow:] = 0
                    db[o] += acc
                _unfold(xpad, c_, kh, kw, sh, sw, dh, dw, hp, wp, oy0, nr, owe, ow, cols)
                _add_weight_grad(dprod, cols, blas, dw3)
                if want_dx:
                    dcols = _matrix(ws, at_dcols, k_, nr * owe)
                    _product_t(w3, dprod, blas, dcols)
                    _fold(dcols, c_, kh, kw, sh, sw, dh, dw, hp, wp, oy0, nr, owe, ow, dxpad)
            if want_dx:
                for c in range(c_):
                    for yy in range(h_):
                        s = c * hp * wp + (yy + pt) * wp + pl
                        dst = dx[n, c, yy]
                        for v in range(w_):
                            dst[v] = dxpad[s + v]


def _use_blas(w3):
    g, og, kg = w3.shape
    return g == 1 or og * kg >= _SMALL_GROUP_GEMM


def _plan(x, w, out, stride, pad, dilation, groups, ws):
    """Checks, then the tiles and the threads: all of Numba's threads if the
    workspace has room for one tile row each, fewer otherwise."""
    n, c = x.shape[:2]
    o, cg, kh, kw = w.shape
    g = int(groups)
    if c != cg * g or o % g:
        raise ValueError(f"bad grouped conv shapes: x {x.shape}, w {w.shape}, groups {g}")
    check_shape("out", out, (n, o, out.shape[2], out.shape[3]))
    flat = ws.reshape(-1)
    shapes = (x.shape, w.shape, out.shape, stride, pad, dilation)
    need = _geometry(*shapes, rows=1).per_thread
    threads = min(numba.get_num_threads(), flat.size // need)
    if threads < 1:
        raise ValueError(f"conv2d workspace has {flat.size} elements, need {need}")
    geo = _geometry(*shapes, space=flat.size // threads)
    return geo, threads, flat, w.reshape(g, o // g, cg * kh * kw)


def _bias_or_empty(b, dtype):
    return np.zeros(0, dtype) if b is None else b


def _dims(w, stride, pad, dilation):
    """The kernels' static numbers: (sh, sw, pt, pl, dh, dw, kh, kw)."""
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    return (sh, sw, pt, pl, dh, dw, int(w.shape[2]), int(w.shape[3]))


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, ws, act=ACT_NONE):
    """out = act(conv2d(x, w) + b), PyTorch cross-correlation; `ws` is a workspace
    (any shape, C-contiguous) of :func:`conv2d_workspace` elements."""
    check_c(x=x, w=w, out=out, ws=ws)
    geo, threads, flat, w3 = _plan(x, w, out, stride, pad, dilation, groups, ws)
    bias = _bias_or_empty(b, x.dtype)
    dims = _dims(w, stride, pad, dilation)
    with single_threaded_blas():
        _forward_tiles(x, w3, bias, int(act), _use_blas(w3), dims, tuple(geo), threads, out, flat)


def conv2d_backward(
    x, w, dout, stride, pad, dilation, groups, ws, dx, dw, db, out=None, act=ACT_NONE
):
    """Gradients of :func:`conv2d_forward`; `out` is needed when an activation was
    fused. dx / db may be None; dw is overwritten."""
    check_c(x=x, w=w, dout=dout, ws=ws, dx=dx, dw=dw)
    check_shape("dw", dw, w.shape)
    geo, threads, flat, w3 = _plan(x, w, dout, stride, pad, dilation, groups, ws)
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    if dx is not None:
        check_shape("dx", dx, x.shape)
    if db is not None:
        check_shape("db", db, (w.shape[0],))
    y = out if out is not None else dout
    want_dx = dx is not None
    dx_arg = dx if want_dx else np.empty((1, 1, 1, 1), x.dtype)
    dims = _dims(w, stride, pad, dilation)
    with single_threaded_blas():
        _backward_samples(
            x,
            w3,
            dout,
            y,
            int(act),
            _use_blas(w3),
            want_dx,
            dims,
            tuple(geo),
            threads,
            dx_arg,
            flat,
        )
    # the threads' private sums, added in thread order: the same bits every run
    k = x.shape[1] * w.shape[2] * w.shape[3]
    at = 2 * geo.pad_size + (2 * k + w.shape[0]) * geo.rows * geo.owe  # after the tile buffers
    for t in range(threads):
        start = t * geo.per_thread + at
        part = flat[start : start + w.size].reshape(w.shape)
        part_db = flat[start + w.size : start + w.size + w.shape[0]]
        if t == 0:
            dw[...] = part
        else:
            dw += part
        if db is not None:
            if t == 0:
                db[...] = part_db
            else:
                db += part_db


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
