"""Fully connected layers on one tiled GEMM kernel: C = act(A @ B + bias), with A and B
read through (row, column) strides so that the transposes of dense's three products
need no copies. Register-blocked like conv2d's kernels; bias sums run over the batch in
a fixed order."""

from __future__ import annotations

from functools import cache

from numba import cuda, float32

from ._common import (
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
)
from .activation import relu_backward

__all__ = ["dense_forward", "dense_backward", "gemm"]

TILE = (64, 64, 8, 4, 4)  # BM, BN, BK, TM, TN: 256 threads
SMALL = (16, 64, 8, 1, 4)  # few rows (a batch of 2, dense's dW with few units)
if SIMULATED:  # the same kernel with small tiles (its threads are Python threads)
    TILE, SMALL = (16, 16, 16, 4, 4), (8, 32, 16, 2, 4)


@cache
def gemm_kernel(bm, bn, bk, tm, tn):
    tx_, ty_ = bn // tn, bm // tm
    nt = tx_ * ty_
    product = tile_product(bm, bn, bk, tm, tn)

    @jit_kernel
    def gemm(a, ars, acs, b, brs, bcs, m_, n_, k_, bias, has_bias, act, c):
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
        for k0 in range(0, k_, bk):
            for e in range(tid, bk * bm, nt):
                m = e // bk
                kk = e - m * bk
                r, k = row0 + m, k0 + kk
                a_s[kk, m] = a[r * ars + k * acs] if r < m_ and k < k_ else float32(0.0)
            for e in range(tid, bk * bn, nt):
                kk = e // bn
                j = e - kk * bn
                col, k = col0 + j, k0 + kk
                b_s[kk, j] = b[k * brs + col * bcs] if col < n_ and k < k_ else float32(0.0)
            cuda.syncthreads()
            product(a_s, b_s, ty, tx, acc, ar, br)
            cuda.syncthreads()
        for i in range(tm):
            r = row0 + ty + i * ty_
            if r < m_:
                for j in range(tn):
                    col = col0 + tx + j * tx_
                    if col < n_:
                        v = acc[i, j]
                        if has_bias:
                            v += bias[col]
                        if act != 0 and not v > 0:
                            v = float32(0.0)
                        c[r * n_ + col] = v

    return gemm


def gemm(a, a_strides, b, b_strides, m, n, k, c, bias=None, act=0):
    """c (m, n, C-contiguous) = act(A @ B + bias[col]); A(i, l) = a[i*rs + l*cs], B alike."""
    tile = SMALL if m <= 16 else TILE
    kernel = gemm_kernel(*tile)
    grid = (blocks(n, tile[1]), blocks(m, tile[0]))
    b_arg = empty_like_none() if bias is None else bias
    kernel[grid, tile_threads(tile)](
        flat(a), *a_strides, flat(b), *b_strides, m, n, k, b_arg, bias is not None, act, flat(c)
    )


@jit_kernel
def _column_sums(x, rows, cols, out):
    # one thread per column, rows added in order: fixed, and coalesced across threads
    j = cuda.grid(1)
    if j < cols:
        v = float32(0.0)
        for i in range(rows):
            v += x[i * cols + j]
        out[j] = v


def dense_forward(x, w, b, out, act=0):
    """out (N, O) = act(x (N, F) @ w(O, F)^T + b) (b may be None; act 1 = ReLU)."""
    n, f = x.shape
    o = w.shape[0]
    check_shape("w", w, (o, f))
    check_shape("out", out, (n, o))
    check_float32(x=x, w=w, out=out)
    if b is not None:
        check_shape("b", b, (o,))
    gemm(x, (f, 1), w, (1, f), n, o, f, out, b, int(act))


def dense_backward(x, w, dout, dx, dw, db, out=None, act=0):
    """dw <- dout^T x; dx <- dout w; db <- sum_n dout (dx and db may be None). With a
    fused ReLU (act 1), `out` is the forward output and dout is masked in place."""
    if act:
        if out is None:
            raise ValueError("a fused activation needs the forward output")
        relu_backward(flat(out), flat(dout), flat(dout))
    n, f = x.shape
    o = w.shape[0]
    check_shape("dout", dout, (n, o))
    check_shape("dw", dw, w.shape)
    gemm(dout, (1, o), x, (f, 1), o, f, n, dw)
    if db is not None:
        check_shape("db", db, (o,))
        _column_sums[blocks(o), THREADS](flat(dout), n, o, db)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        gemm(dout, (o, 1), w, (f, 1), n, f, o, dx)
