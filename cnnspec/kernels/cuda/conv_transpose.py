"""conv_transpose2d(x) with weight [in, out, kh, kw] is the input gradient of a conv2d
from its output's shape to x's with that weight: conv.py's three implicit-GEMM kernels,
their roles swapped (forward = dx kernel, dx = forward kernel, dw = dw kernel)."""

from __future__ import annotations

from numba import cuda

from ._common import ACT_NONE, THREADS, blocks, check_float32, check_shape, flat
from .conv import _bias_sums, _dims, _forward, _input_grad, _weight_grad

__all__ = ["conv_transpose2d_forward", "conv_transpose2d_backward"]


@cuda.jit
def _add_bias(out, b, c_, s_):
    i = cuda.grid(1)
    if i < out.size:
        out[i] += b[(i // s_) % c_]


def conv_transpose2d_forward(x, w, b, stride, pad, dilation, out, cols=None):
    """out = conv_transpose2d(x, w) + b (weight [in, out, kh, kw], pad [t, b, l, r]);
    `cols` (the CPU kernel's im2col buffer) serves as workspace for the backward."""
    check_float32(x=x, w=w, out=out)
    d = _dims(out.shape, w.shape, x.shape, stride, pad, dilation)
    _input_grad(x, x, ACT_NONE, w, d, out)
    if b is not None:
        n, f = out.shape[:2]
        _add_bias[blocks(out.size), THREADS](flat(out), b, f, out.size // (n * f))


def conv_transpose2d_backward(x, w, dout, stride, pad, dilation, cols, dx, dw, db):
    """dx, dw, db overwritten (dx, db may be None)."""
    check_shape("dw", dw, w.shape)
    d = _dims(dout.shape, w.shape, x.shape, stride, pad, dilation)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        _forward(dout, w, None, d, dx, ACT_NONE)
    _weight_grad(dout, x, x, ACT_NONE, d, cols, dw)
    if db is not None:
        _bias_sums(dout, dout, ACT_NONE, db)
