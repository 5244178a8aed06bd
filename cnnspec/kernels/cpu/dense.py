"""Fully connected layer kernels (numpy/BLAS GEMMs writing into preallocated outputs).

BLAS, not the conv micro-kernels, measured 2026-12-02 on the shared 2-core Intel Xeon
(AVX-512), forward + dx + dW: the micro-kernels through the conv path (a 1x1 conv on a
1x1 map) ran 3.5-18x slower at 1 and 2 threads on LeNet-5's, VGG-small's, AlexNet's and
VGG-16's dense shapes (batch 2-64; tiles and panels sized for images, not rows).
A dense kernel of their own could at best double VGG-small's fc (8192 -> 256, b64: BLAS
100-134 GFLOP/s on one thread against their 257-270 peak), ~3 ms of its step; the
AlexNet / VGG-16 layers at small batch (5-50 GFLOP/s) stream their weights from memory,
which no faster arithmetic shortens. Nothing to compile on a first run, either.
"""

from __future__ import annotations

import numpy as np

from ._common import check_shape
from .blas import matmul

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
        dout.sum(axis=0, out=db)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        matmul(dout, w, dx)
