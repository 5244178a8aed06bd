"""upsample2d: each output takes two taps per axis (nearest: a second of weight 0), as
the CPU kernel. Forward one thread per output; backward one thread per plane adding its
outputs into its own input plane in order (no atomics)."""

from __future__ import annotations

from numba import cuda

from ._common import THREADS, blocks, flat, jit_kernel

__all__ = ["upsample2d_forward", "upsample2d_backward"]


@cuda.jit(device=True, inline="always")
def _lerp(a, b, w):
    return a if w == 0 else a + (b - a) * w  # weight 0: an inf input stays inf


@jit_kernel
def _fwd(x, r0, r1, wr, c0, c1, wc, planes, h_, w_, oh, ow, out):
    t = cuda.grid(1)
    if t < planes * oh * ow:
        p = t // (oh * ow)
        rem = t - p * oh * ow
        i = rem // ow
        j = rem - i * ow
        base = p * h_ * w_
        a, b = base + r0[i] * w_, base + r1[i] * w_
        top = _lerp(x[a + c0[j]], x[a + c1[j]], wc[j])
        bottom = _lerp(x[b + c0[j]], x[b + c1[j]], wc[j])
        out[t] = _lerp(top, bottom, wr[i])


@jit_kernel
def _bwd(dout, r0, r1, wr, c0, c1, wc, planes, h_, w_, oh, ow, dx):
    p = cuda.grid(1)
    if p < planes:
        base = p * h_ * w_
        for k in range(h_ * w_):
            dx[base + k] = 0.0
        for i in range(oh):
            a, b, v = base + r0[i] * w_, base + r1[i] * w_, wr[i]
            for j in range(ow):
                g = dout[(p * oh + i) * ow + j]
                k, m, u = c0[j], c1[j], wc[j]
                dx[a + k] += (1 - v) * (1 - u) * g
                dx[a + m] += (1 - v) * u * g
                dx[b + k] += v * (1 - u) * g
                dx[b + m] += v * u * g


def _geometry(small, big):
    n, c, h, w = small.shape
    return n * c, h, w, big.shape[2], big.shape[3]


def upsample2d_forward(x, r0, r1, wr, c0, c1, wc, out):
    """out (N, C, OH, OW) from x (N, C, H, W) with the layer's taps (device arrays)."""
    g = _geometry(x, out)
    _fwd[blocks(out.size), THREADS](flat(x), r0, r1, wr, c0, c1, wc, *g, flat(out))


def upsample2d_backward(dout, r0, r1, wr, c0, c1, wc, dx):
    """dx (overwritten) from dout, with the forward's taps."""
    g = _geometry(dx, dout)
    _bwd[blocks(g[0]), THREADS](flat(dout), r0, r1, wr, c0, c1, wc, *g, flat(dx))
