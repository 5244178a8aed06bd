"""Fully connected layer kernels: numpy's BLAS products writing into preallocated
outputs, and a kernel pass each side of them (bias and ReLU; ReLU mask and bias gradient).

BLAS, not the conv micro-kernels, measured 2026-12-02 on the shared 2-core Intel Xeon
(AVX-512), forward + dx + dW: the micro-kernels through the conv path (a 1x1 conv on a
1x1 map) ran 3.5-18x slower at 1 and 2 threads on LeNet-5's, VGG-small's, AlexNet's and
VGG-16's dense shapes (batch 2-64; tiles and panels sized for images, not rows).
A dense kernel of their own could at best double VGG-small's fc (8192 -> 256, b64: BLAS
100-134 GFLOP/s on one thread against their 257-270 peak), ~3 ms of its step; the
AlexNet / VGG-16 layers at small batch (5-50 GFLOP/s) stream their weights from memory,
which no faster arithmetic shortens.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from ._common import SplitBySize, check_shape
from .blas import matmul

__all__ = ["dense_forward", "dense_backward"]


# The passes around the products, one kernel call each instead of two or three numpy
# ones (LeNet-5's three dense layers: ~25 us of small numpy passes a step, 1 thread,
# Intel Xeon model 207).
@SplitBySize
def _bias_act(out, b, act):
    # out = act(out + b) by rows (b of size 0: no bias; act 1: ReLU, NaN propagates)
    n_, o_ = out.shape
    for n in prange(n_):
        if b.size:
            for o in range(o_):
                out[n, o] += b[o]
        if act:
            for o in range(o_):
                out[n, o] = 0 if out[n, o] <= 0 else out[n, o]


def _bias_act_numpy(out, b, act):
    if b.size:
        out += b
    if act:
        np.copyto(out, 0, where=out <= 0)


@SplitBySize
def _mask_sum(dout, out, act, db):
    # dout = 0 where a fused ReLU's output is not > 0 (NaN too); db = its column sums,
    # row after row as numpy sums along axis 0 (the same bits); db of size 0: no sums.
    # In blocks of columns, so that the rows' loops vectorise
    n_, o_ = dout.shape
    for c in prange(-(-o_ // _COLUMNS)):
        lo = c * _COLUMNS
        hi = o_ if o_ - lo < _COLUMNS else lo + _COLUMNS
        if act:
            for n in range(n_):
                for o in range(lo, hi):
                    if not out[n, o] > 0:
                        dout[n, o] = 0
        if db.size:
            for o in range(lo, hi):
                db[o] = dout[0, o] if n_ else 0
            for n in range(1, n_):
                for o in range(lo, hi):
                    db[o] += dout[n, o]


_COLUMNS = 512


def _mask_sum_numpy(dout, out, act, db):
    if act:
        np.copyto(dout, 0, where=~(out > 0))
    if db.size:
        dout.sum(axis=0, out=db)


def dense_forward(x, w, b, out, act=0):
    """out (N, O) = act(x (N, F) @ w(O, F)^T + b) (b may be None; act 1 = ReLU)."""
    n, f = x.shape
    o = w.shape[0]
    check_shape("w", w, (o, f))
    check_shape("out", out, (n, o))
    matmul(x, w.T, out)
    if b is not None:
        check_shape("b", b, (o,))
    elif not act:
        return
    bias = np.zeros(0, out.dtype) if b is None else b  # (size 0: no bias)
    _bias_act.or_stand_in(_bias_act_numpy, out, bias, int(act))


def dense_backward(x, w, dout, dx, dw, db, out=None, act=0):
    """dw <- dout^T x; dx <- dout w; db <- sum_n dout (dx and db may be None). With a
    fused ReLU (act 1), `out` is the forward output and dout is masked in place."""
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    n, f = x.shape
    o = w.shape[0]
    check_shape("dout", dout, (n, o))
    check_shape("dw", dw, w.shape)
    if db is not None:
        check_shape("db", db, (o,))
    if act or db is not None:
        sums = np.zeros(0, dout.dtype) if db is None else db  # (size 0: no sums)
        _mask_sum.or_stand_in(_mask_sum_numpy, dout, dout if out is None else out, int(act), sums)
    matmul(dout.T, x, dw)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        matmul(dout, w, dx)
