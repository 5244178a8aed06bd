"""Fully connected layer kernels (numpy/BLAS GEMMs writing into preallocated outputs)."""

from __future__ import annotations

import numpy as np

from ._common import check_shape, matmul

__all__ = ["dense_forward", "dense_backward"]


def dense_forward(x, w, b, out):
    """out (N, O) = x (N, F) @ w(O, F)^T + b (b may be None)."""
    n, f = x.shape
    o = w.shape[0]
    check_shape("w", w, (o, f))
    check_shape("out", out, (n, o))
    matmul(x, w.T, out)
    if b is not None:
        check_shape("b", b, (o,))
        out += b


def dense_backward(x, w, dout, dx, dw, db):
    """dw <- dout^T x; dx <- dout w; db <- sum_n dout (dx and db may be None)."""
    n, f = x.shape
    o = w.shape[0]
    check_shape("dout", dout, (n, o))
    check_shape("dw", dw, w.shape)
    matmul(dout.T, x, dw)
    if db is not None:
        check_shape("db", db, (o,))
        np.sum(dout, axis=0, out=db)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        matmul(dout, w, dx)
