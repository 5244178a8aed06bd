"""Fully connected layer kernels (numpy/BLAS GEMMs writing into preallocated outputs)."""

from __future__ import annotations

import numpy as np

from ._common import check_shape, matmul

__all__ = ["dense_forward", "dense_backward"]


def dense_forward(x, w, b, out, act=0):
    """out (N, O) = act(x (N, F) @ w(O, F)^T + b) (b may be None; act 1 = ReLU)."""
    n, f = x.shape
    o = w.shape[0]
    check_shape("w", w, (o, f))
    check_shape("out", out, (n, o))
    matmul(x, w.T, out)
    if b is not None:
        check_shape("b", b, (o,))
        out += b
    if act:
        np.maximum(out, 0, out=out)


def dense_backward(x, w, dout, dx, dw, db, out=None, act=0):
    """dw <- dout^T x; dx <- dout w; db <- sum_n dout (dx and db may be None). With a
    fused ReLU (act 1), `out` is the forward output and dout is masked in place."""
    if act:
        if out is None:
            raise ValueError("a fused activation needs the forward output")
        dout *= out > 0
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
