"""upsample2d: each output takes two taps per axis (nearest: a second of weight 0),
out = lerp over rows of lerps over columns, as PyTorch's bilinear does."""

from __future__ import annotations

from numba import njit, prange

from ._common import SplitBySize, check_c

__all__ = ["upsample2d_forward", "upsample2d_backward"]


@njit(inline="always")
def _lerp(a, b, w):
    return a if w == 0 else a + (b - a) * w  # weight 0: an inf input stays inf


@SplitBySize
def _fwd(x, r0, r1, wr, c0, c1, wc, out):
    planes, oh, ow = out.shape
    for p in prange(planes):
        for i in range(oh):
            a, b, v = r0[i], r1[i], wr[i]
            for j in range(ow):
                top = _lerp(x[p, a, c0[j]], x[p, a, c1[j]], wc[j])
                bottom = _lerp(x[p, b, c0[j]], x[p, b, c1[j]], wc[j])
                out[p, i, j] = _lerp(top, bottom, v)


@SplitBySize
def _bwd(dout, r0, r1, wr, c0, c1, wc, dx):
    planes, oh, ow = dout.shape
    for p in prange(planes):  # a plane's outputs scatter into its own input plane only
        dx[p] = 0.0
        for i in range(oh):
            a, b, v = r0[i], r1[i], wr[i]
            for j in range(ow):
                g = dout[p, i, j]
                k, m, u = c0[j], c1[j], wc[j]
                dx[p, a, k] += (1 - v) * (1 - u) * g
                dx[p, a, m] += (1 - v) * u * g
                dx[p, b, k] += v * (1 - u) * g
                dx[p, b, m] += v * u * g


def upsample2d_forward(x, r0, r1, wr, c0, c1, wc, out):
    """out (N, C, OH, OW) from x (N, C, H, W); (r0, r1, wr) rows' taps, (c0, c1, wc)
    columns' (layers/upsample.py makes them)."""
    check_c(x=x, out=out)
    n, c = x.shape[:2]
    _fwd(x.reshape(n * c, *x.shape[2:]), r0, r1, wr, c0, c1, wc, out.reshape(n * c, *out.shape[2:]))


def upsample2d_backward(dout, r0, r1, wr, c0, c1, wc, dx):
    """dx (overwritten) from dout, with the forward's taps."""
    check_c(dout=dout, dx=dx)
    n, c = dx.shape[:2]
    _bwd(
        dout.reshape(n * c, *dout.shape[2:]),
        r0,
        r1,
        wr,
        c0,
        c1,
        wc,
        dx.reshape(n * c, *dx.shape[2:]),
    )
