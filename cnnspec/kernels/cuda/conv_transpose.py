"""conv_transpose2d(x) with weight [in, out/groups, kh, kw] is the input gradient of a
conv2d from its output's shape to x's with that weight (its groups follow from the
shapes): conv.py's three implicit-GEMM kernels, their roles swapped (forward = dx kernel,
dx = forward kernel, dw = dw kernel)."""

from __future__ import annotations

from numba import cuda

from ._common import ACT_NONE, THREADS, blocks, check_float32, check_shape, flat, jit_kernel
from .conv import _bias_sums, _dims, _forward, _input_grad, _weight_grad

__all__ = ["conv_transpose2d_forward", "conv_transpose2d_backward"]


@jit_kernel
def _add_bias(out, b, c_, s_):
    i = cuda.grid(1)
    if i < out.size:
        out[i] += b[(i // s_) % c_]


def _check_groups(out_shape, w_shape, groups):
    """The conv2d it inverts (out -> x) has the groups its weight's shape says."""
    if int(w_shape[1]) * int(groups) != int(out_shape[1]):
        raise ValueError(
            f"weight {tuple(w_shape)} does not give {out_shape[1]} maps in {groups} groups"
        )


def conv_transpose2d_forward(x, w, b, stride, pad, dilation, out, cols=None, groups=1):
    """out = conv_transpose2d(x, w) + b (weight [in, out/groups, kh, kw], pad [t, b, l, r]);
    `cols` (the CPU kernel's im2col buffer) serves as workspace for the backward."""
    check_float32(x=x, w=w, out=out)
    _check_groups(out.shape, w.shape, groups)
    d = _dims(out.shape, w.shape, x.shape, stride, pad, dilation)
    _input_grad(x, x, ACT_NONE, w, d, out)
    if b is not None:
        n, f = out.shape[:2]
        _add_bias[blocks(out.size), THREADS](flat(out), b, f, out.size // (n * f))


def conv_transpose2d_backward(x, w, dout, stride, pad, dilation, cols, dx, dw, db, groups=1):
    """dx, dw, db overwritten (dx, db may be None)."""
    check_shape("dw", dw, w.shape)
    _check_groups(dout.shape, w.shape, groups)
    d = _dims(dout.shape, w.shape, x.shape, stride, pad, dilation)
    if dx is not None:
        check_shape("dx", dx, x.shape)
        _forward(dout, w, None, d, dx, ACT_NONE)
    _weight_grad(dout, x, x, ACT_NONE, d, cols, dw)
    if db is not None:
        _bias_sums(dout, dout, ACT_NONE, db)
