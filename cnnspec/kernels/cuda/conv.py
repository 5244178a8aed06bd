"""conv2d as implicit GEMM: no im2col buffer. Each block builds a BK x BN tile of the
unfolded input (or of the output gradient, for dx) in shared memory straight from the
NCHW array, beside a BM x BK tile of the weights, and each thread accumulates a TM x TN
block of outputs in registers. Three kernels, one per product:

    forward  out[o, (n,oy,ox)]  = sum_(c,ky,kx) W[o, (c,ky,kx)] * X[(c,ky,kx), (n,oy,ox)]
    dx       dx[c, (n,iy,ix)]   = sum_(o,ky,kx) W[o, (c,ky,kx)] * dY[(o,ky,kx), (n,iy,ix)]
    dw       dW[o, (c,ky,kx)]   = sum_(n,oy,ox) dY[o, (n,oy,ox)] * X[(c,ky,kx), (n,oy,ox)]

per group (grid z). dw's long reduction is split into a fixed number of slices that
write partial sums to the workspace, then added slice by slice: no atomics, the same
bits every run. A thread's outputs are TY (resp. TX) apart, so a warp reads shared
memory without bank conflicts and stores whole rows of the output at once.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from numba import cuda, float32

from ..checks import check_grouped_conv
from ._common import (
    ACT_NONE,
    SIMULATED,
    THREADS,
    blocks,
    check_float32,
    check_shape,
    empty_like_none,
    flat,
    jit_kernel,
    tile_product,
    tile_threads,
    tree_sum,
)

__all__ = ["conv2d_workspace", "conv2d_forward", "conv2d_backward", "conv2d_mask_gradient"]

# (BM, BN, BK, TM, TN): 256 threads each. Tall output maps use the square tile; few
# output channels (LeNet-5's 6 maps, a group of a grouped conv) the wide one. The
# simulator runs the same kernels with small tiles: its threads are Python threads, and
# each `syncthreads` switches between all of a block's.
TILES = {"square": (64, 64, 8, 4, 4), "wide": (16, 128, 8, 2, 4)}
if SIMULATED:
    TILES = {"square": (16, 16, 16, 4, 4), "wide": (8, 32, 16, 2, 4)}
_TARGET_BLOCKS = 264  # two waves on a 132-SM H100/H200: enough to fill the GPU
_MIN_SLICE = 64 if SIMULATED else 512  # dw: the fewest (n, oy, ox) one slice reduces


def tile_for(rows: int) -> tuple:
    return TILES["wide" if rows <= 16 else "square"]


@cache
def forward_kernel(bm, bn, bk, tm, tn):
    tx_, ty_ = bn // tn, bm // tm
    nt = tx_ * ty_
    product = tile_product(bm, bn, bk, tm, tn)
    kstep = nt // bn  # B-tile rows loaded per pass; each thread keeps its column
    assert nt % bn == 0 and nt % bk == 0

    @jit_kernel
    def conv2d_fwd(x, w, bias, has_bias, act, d, out):
        n_, c_, h_, w_, o_, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, g_ = d
        g = cuda.blockIdx.z
        og, cg = o_ // g_, c_ // g_
        khw = kh * kw
        k_ = cg * khw
        ohw = oh * ow
        ncol = n_ * ohw
        row0 = cuda.blockIdx.y * bm
        col0 = cuda.blockIdx.x * bn
        tid = cuda.threadIdx.x
        ty = tid // tx_
        tx = tid - ty * tx_
        a_s = cuda.shared.array((bk, bm), float32)
        b_s = cuda.shared.array((bk, bn), float32)
        acc = cuda.local.array((tm, tn), float32)
        ar = cuda.local.array(tm, float32)
        br = cuda.local.array(tn, float32)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = 0.0
        # the column this thread loads into the B tile is the same at every step
        jl = tid % bn
        kk0 = tid // bn
        col = col0 + jl
        in_cols = col < ncol
        n = col // ohw
        rem = col - n * ohw
        oy = rem // ow
        iy0 = oy * sh - pt
        ix0 = (rem - oy * ow) * sw - pl
        xbase = (n * c_ + g * cg) * h_ * w_
        for k0 in range(0, k_, bk):
            for e in range(tid, bk * bm, nt):
                m = e // bk
                kk = e - m * bk
                r, k = row0 + m, k0 + kk
                v = float32(0.0)
                if r < og and k < k_:
                    v = w[(g * og + r) * k_ + k]
                a_s[kk, m] = v
            for kk in range(kk0, bk, kstep):
                k = k0 + kk
                v = float32(0.0)
                if in_cols and k < k_:
                    c = k // khw
                    r2 = k - c * khw
                    ky = r2 // kw
                    iy = iy0 + ky * dh
                    ix = ix0 + (r2 - ky * kw) * dw
                    if iy >= 0 and iy < h_ and ix >= 0 and ix < w_:
                        v = x[xbase + (c * h_ + iy) * w_ + ix]
                b_s[kk, jl] = v
            cuda.syncthreads()
            product(a_s, b_s, ty, tx, acc, ar, br)
            cuda.syncthreads()
        for i in range(tm):
            r = row0 + ty + i * ty_
            if r < og:
                o = g * og + r
                b = bias[o] if has_bias else float32(0.0)
                for j in range(tn):
                    col = col0 + tx + j * tx_
                    if col < ncol:
                        n = col // ohw
                        v = acc[i, j] + b
                        if act != 0 and not v > 0:
                            v = float32(0.0)
                        out[(n * o_ + o) * ohw + col - n * ohw] = v

    return conv2d_fwd


@cache
def dx_kernel(bm, bn, bk, tm, tn):
    tx_, ty_ = bn // tn, bm // tm
    nt = tx_ * ty_
    product = tile_product(bm, bn, bk, tm, tn)
    kstep = nt // bn  # B-tile rows loaded per pass; each thread keeps its column
    assert nt % bn == 0 and nt % bk == 0

    @jit_kernel
    def conv2d_dx(dout, y, act, w, d, dx):
        n_, c_, h_, w_, o_, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, g_ = d
        g = cuda.blockIdx.z
        og, cg = o_ // g_, c_ // g_
        khw = kh * kw
        k_ = og * khw
        hw = h_ * w_
        ncol = n_ * hw
        row0 = cuda.blockIdx.y * bm
        col0 = cuda.blockIdx.x * bn
        tid = cuda.threadIdx.x
        ty = tid // tx_
        tx = tid - ty * tx_
        a_s = cuda.shared.array((bk, bm), float32)
        b_s = cuda.shared.array((bk, bn), float32)
        acc = cuda.local.array((tm, tn), float32)
        ar = cuda.local.array(tm, float32)
        br = cuda.local.array(tn, float32)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = 0.0
        jl = tid % bn  # the B column this thread loads, the same at every step
        kk0 = tid // bn
        col = col0 + jl
        in_cols = col < ncol
        n = col // hw
        rem = col - n * hw
        iy = rem // w_
        ix = rem - iy * w_
        for k0 in range(0, k_, bk):
            for e in range(tid, bk * bm, nt):
                m = e // bk
                kk = e - m * bk
                r, k = row0 + m, k0 + kk
                v = float32(0.0)
                if r < cg and k < k_:
                    o = k // khw
                    tap = k - o * khw
                    v = w[((g * og + o) * cg + r) * khw + tap]
                a_s[kk, m] = v
            for kk in range(kk0, bk, kstep):
                k = k0 + kk
                v = float32(0.0)
                if in_cols and k < k_:
                    o = k // khw
                    r2 = k - o * khw
                    ky = r2 // kw
                    sy = iy + pt - ky * dh
                    sx = ix + pl - (r2 - ky * kw) * dw
                    if sy >= 0 and sx >= 0:
                        oy = sy // sh
                        ox = sx // sw
                        if oy * sh == sy and ox * sw == sx and oy < oh and ox < ow:
                            at = ((n * o_ + g * og + o) * oh + oy) * ow + ox
                            v = dout[at]
                            if act != 0 and not y[at] > 0:
                                v = float32(0.0)
                b_s[kk, jl] = v
            cuda.syncthreads()
            product(a_s, b_s, ty, tx, acc, ar, br)
            cuda.syncthreads()
        for i in range(tm):
            r = row0 + ty + i * ty_
            if r < cg:
                for j in range(tn):
                    col = col0 + tx + j * tx_
                    if col < ncol:
                        n = col // hw
                        dx[(n * c_ + g * cg + r) * hw + col - n * hw] = acc[i, j]

    return conv2d_dx


@cache
def dw_kernel(bm, bn, bk, tm, tn):
    tx_, ty_ = bn // tn, bm // tm
    nt = tx_ * ty_
    product = tile_product(bm, bn, bk, tm, tn)
    kstep = nt // bn  # B-tile rows loaded per pass; each thread keeps its column
    assert nt % bn == 0 and nt % bk == 0

    @jit_kernel
    def conv2d_dw(x, dout, y, act, d, slices, chunk, dst):
        n_, c_, h_, w_, o_, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, g_ = d
        s = cuda.blockIdx.z % slices
        g = cuda.blockIdx.z // slices
        og, cg = o_ // g_, c_ // g_
        khw = kh * kw
        k_ = cg * khw  # the columns of dW
        ohw = oh * ow
        p_end = min((s + 1) * chunk, n_ * ohw)
        row0 = cuda.blockIdx.y * bm
        col0 = cuda.blockIdx.x * bn
        tid = cuda.threadIdx.x
        ty = tid // tx_
        tx = tid - ty * tx_
        a_s = cuda.shared.array((bk, bm), float32)
        b_s = cuda.shared.array((bk, bn), float32)
        acc = cuda.local.array((tm, tn), float32)
        ar = cuda.local.array(tm, float32)
        br = cuda.local.array(tn, float32)
        for i in range(tm):
            for j in range(tn):
                acc[i, j] = 0.0
        jl = tid % bn  # the B column (a tap of dW) this thread loads, at every step
        kk0 = tid // bn
        col = col0 + jl
        in_cols = col < k_
        c = col // khw
        r2 = col - c * khw
        ky = r2 // kw
        cbase = g * cg + c
        ty0 = ky * dh - pt
        tx0 = (r2 - ky * kw) * dw - pl
        for p0 in range(s * chunk, p_end, bk):
            for e in range(tid, bk * bm, nt):
                m = e // bk
                kk = e - m * bk
                r, p = row0 + m, p0 + kk
                v = float32(0.0)
                if r < og and p < p_end:
                    n = p // ohw
                    at = (n * o_ + g * og + r) * ohw + p - n * ohw
                    v = dout[at]
                    if act != 0 and not y[at] > 0:
                        v = float32(0.0)
                a_s[kk, m] = v
            for kk in range(kk0, bk, kstep):
                p = p0 + kk
                v = float32(0.0)
                if in_cols and p < p_end:
                    n = p // ohw
                    rem = p - n * ohw
                    oy = rem // ow
                    iy = oy * sh + ty0
                    ix = (rem - oy * ow) * sw + tx0
                    if iy >= 0 and iy < h_ and ix >= 0 and ix < w_:
                        v = x[(n * c_ + cbase) * h_ * w_ + iy * w_ + ix]
                b_s[kk, jl] = v
            cuda.syncthreads()
            product(a_s, b_s, ty, tx, acc, ar, br)
            cuda.syncthreads()
        for i in range(tm):
            r = row0 + ty + i * ty_
            if r < og:
                for j in range(tn):
                    col = col0 + tx + j * tx_
                    if col < k_:
                        dst[(s * o_ + g * og + r) * k_ + col] = acc[i, j]

    return conv2d_dw


@jit_kernel
def _sum_slices(parts, slices, size, dw):
    i = cuda.grid(1)
    if i < size:
        v = parts[i]
        for s in range(1, slices):
            v += parts[s * size + i]
        dw[i] = v


@jit_kernel
def _bias_grad(dout, y, act, n_, o_, s_, db):
    # one block per output map; each thread sums a fixed stride of its (n, s) values,
    # then a tree in shared memory: a fixed order, the same bits every run
    o = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    part = cuda.shared.array(THREADS, float32)
    v = float32(0.0)
    for e in range(tid, n_ * s_, THREADS):
        n = e // s_
        at = (n * o_ + o) * s_ + e - n * s_
        if act == 0 or y[at] > 0:
            v += dout[at]
    part[tid] = v
    tree_sum(part, tid)
    if tid == 0:
        db[o] = part[0]


def _dims(x_shape, w_shape, out_shape, stride, pad, dilation):
    n, c, h, w = (int(v) for v in x_shape)
    o, cg, kh, kw = (int(v) for v in w_shape)
    oh, ow = int(out_shape[2]), int(out_shape[3])
    sh, sw = (int(v) for v in stride)
    pt, pl = int(pad[0]), int(pad[2])
    dh, dw = (int(v) for v in dilation)
    return (n, c, h, w, o, oh, ow, kh, kw, sh, sw, pt, pl, dh, dw, c // cg)


def _slices(d) -> tuple[int, int]:
    """dw: how many slices the (n, oy, ox) reduction splits into, and each one's length
    (a multiple of the tile depth), from the layer's shape: enough blocks to fill the GPU."""
    n, c, _, _, o, oh, ow, kh, kw, *_, g = d
    og, k = o // g, c // g * kh * kw
    bm, bn, bk, _, _ = tile_for(og)
    base = math.ceil(k / bn) * math.ceil(og / bm) * g
    p = n * oh * ow
    slices = max(1, min(math.ceil(_TARGET_BLOCKS / base), p // _MIN_SLICE))
    chunk = math.ceil(math.ceil(p / slices) / bk) * bk
    return math.ceil(p / chunk), chunk


def conv2d_workspace(x_shape, w_shape, out_shape, stride, pad, dilation, itemsize=4):
    """Elements of workspace conv2d_backward needs: dw's partial sums, one set per slice
    when the reduction is split (none otherwise)."""
    d = _dims(x_shape, w_shape, out_shape, stride, pad, dilation)
    slices, _ = _slices(d)
    return 0 if slices == 1 else slices * math.prod(int(v) for v in w_shape)


def _check(x, w, out, groups):
    check_grouped_conv(x, w, out, groups)
    check_float32(x=x, w=w, out=out)


def _grid(cols, rows, z, tile):
    """Launch configuration: blocks over (columns, rows, z) and the tile's threads."""
    bm, bn = tile[0], tile[1]
    return (blocks(cols, bn), blocks(rows, bm), z), tile_threads(tile)


def _forward(x, w, b, d, out, act):
    n, o, oh, ow, g = d[0], d[4], d[5], d[6], d[15]
    tile = tile_for(o // g)
    bias = empty_like_none() if b is None else b
    forward_kernel(*tile)[_grid(n * oh * ow, o // g, g, tile)](
        flat(x), flat(w), bias, b is not None, int(act), d, flat(out)
    )


def _input_grad(dout, y, act, w, d, dx):
    n, c, h, wd, g = d[0], d[1], d[2], d[3], d[15]
    tile = tile_for(c // g)
    dx_kernel(*tile)[_grid(n * h * wd, c // g, g, tile)](
        flat(dout), flat(y), int(act), flat(w), d, flat(dx)
    )


def _weight_grad(x, dout, y, act, d, ws, dw):
    c, o, g = d[1], d[4], d[15]
    slices, chunk = _slices(d)
    size = int(np.prod(dw.shape))
    if slices > 1 and (ws is None or ws.size < slices * size):
        have = 0 if ws is None else ws.size
        raise ValueError(f"conv2d workspace has {have} elements, need {slices * size}")
    dst = flat(dw) if slices == 1 else flat(ws)[: slices * size]
    tile = tile_for(o // g)
    k = c // g * d[7] * d[8]
    dw_kernel(*tile)[_grid(k, o // g, g * slices, tile)](
        flat(x), flat(dout), flat(y), int(act), d, slices, chunk, dst
    )
    if slices > 1:
        _sum_slices[blocks(size), THREADS](dst, slices, size, flat(dw))


def _bias_sums(dout, y, act, db):
    n, o = dout.shape[:2]
    check_shape("db", db, (o,))
    _bias_grad[o, THREADS](flat(dout), flat(y), int(act), n, o, dout.size // (n * o), db)


def conv2d_forward(x, w, b, stride, pad, dilation, groups, out, ws=None, act=ACT_NONE):
    """out = act(conv2d(x, w) + b), PyTorch cross-correlation; pad is [t, b, l, r]."""
    _check(x, w, out, groups)
    _forward(x, w, b, _dims(x.shape, w.shape, out.shape, stride, pad, dilation), out, act)


def conv2d_backward(
    x, w, dout, stride, pad, dilation, groups, ws, dx, dw, db, out=None, act=ACT_NONE
):
    """Gradients of conv2d_forward: dx, dw, db overwritten (dx, db may be None); `out`
    (the forward's output) is needed when a ReLU was fused."""
    _check(x, w, dout, groups)
    check_shape("dw", dw, w.shape)
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    d = _dims(x.shape, w.shape, dout.shape, stride, pad, dilation)
    y = out if out is not None else dout
    if dx is not None:
        check_shape("dx", dx, x.shape)
        _input_grad(dout, y, act, w, d, dx)
    _weight_grad(x, dout, y, act, d, ws, dw)
    if db is not None:
        _bias_sums(dout, y, act, db)


@jit_kernel
def _mask(dw, mask):
    i = cuda.grid(1)
    if i < dw.size:
        dw[i] *= mask[i]


def conv2d_mask_gradient(dw, mask):
    """dw *= mask: entries a connection table leaves out get no gradient (stay zero)."""
    check_shape("mask", mask, dw.shape)
    _mask[blocks(dw.size), THREADS](flat(dw), flat(mask))
