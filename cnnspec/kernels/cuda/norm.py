"""Batch normalisation. Per-channel sums run in float64 with one block per channel:
each thread adds a fixed stride of the channel's values, then a tree in shared memory
(no atomics, no warp shuffles): the same bits every run. Thread 0 of each block then
turns the sums into the channel's constants, so a forward is two launches and a
backward two."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64

from ._common import (
    THREADS,
    blocks,
    check_float32,
    check_shape,
    filled,
    flat,
    jit_kernel,
    scratch,
    tree_sum,
)

__all__ = [
    "batchnorm2d_forward_train",
    "batchnorm2d_forward_eval",
    "batchnorm2d_backward",
    "lrn_forward",
    "lrn_backward",
]


@jit_kernel
def _bn_stats(x, n_, c_, s_, gamma, beta, eps, mom, track, rmean, rvar, bmean, inv_std, affine):
    # biased variance of the values shifted by the channel's first one (no cancellation
    # when the mean is large against the spread), as the CPU kernel
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    p1 = cuda.shared.array(THREADS, float64)
    p2 = cuda.shared.array(THREADS, float64)
    shift = float64(x[c * s_])
    a = float64(0.0)
    b = float64(0.0)
    for e in range(tid, n_ * s_, THREADS):
        n = e // s_
        v = float64(x[(n * c_ + c) * s_ + e - n * s_]) - shift
        a += v
        b += v * v
    p1[tid] = a
    p2[tid] = b
    tree_sum(p1, tid)
    tree_sum(p2, tid)
    if tid == 0:
        m = n_ * s_
        mu = p1[0] / m
        mean = shift + mu
        var = max(p2[0] / m - mu * mu, 0.0)
        inv = 1.0 / math.sqrt(var + eps)
        inv_std[c] = inv
        bmean[c] = mean
        scale = float64(gamma[c]) * inv
        affine[c] = float32(scale)
        affine[c_ + c] = float32(beta[c] - mean * scale)
        if track:
            unbiased = var * m / (m - 1) if m > 1 else var
            rmean[c] = (1.0 - mom) * rmean[c] + mom * mean
            rvar[c] = (1.0 - mom) * rvar[c] + mom * unbiased


@jit_kernel
def _affine(x, affine, c_, s_, act, out):
    i = cuda.grid(1)
    if i < x.size:
        c = (i // s_) % c_
        v = x[i] * affine[c] + affine[c_ + c]
        out[i] = v if (act == 0 or v > 0) else 0.0


@jit_kernel
def _eval_affine(gamma, beta, rmean, rvar, eps, c_, affine):
    c = cuda.grid(1)
    if c < c_:
        inv = 1.0 / math.sqrt(float64(rvar[c]) + eps)
        scale = float64(gamma[c]) * inv
        affine[c] = float32(scale)
        affine[c_ + c] = float32(beta[c] - rmean[c] * scale)


@jit_kernel
def _bn_bwd_sums(dout, x, affine, act, bmean, gamma, inv_std, n_, c_, s_, dgamma, dbeta, k):
    # g = dout masked by the fused ReLU (recomputed from x and the forward's affine);
    # sums of g and g * (x - mean), then dx = ka*g + kb*x + kc per channel
    c = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    p1 = cuda.shared.array(THREADS, float64)
    p2 = cuda.shared.array(THREADS, float64)
    mu, sa, sb = bmean[c], affine[c], affine[c_ + c]
    a = float64(0.0)
    b = float64(0.0)
    for e in range(tid, n_ * s_, THREADS):
        n = e // s_
        at = (n * c_ + c) * s_ + e - n * s_
        xv = x[at]
        if act == 0 or xv * sa + sb > 0:
            g = dout[at]
            a += g
            b += g * (xv - mu)
    p1[tid] = a
    p2[tid] = b
    tree_sum(p1, tid)
    tree_sum(p2, tid)
    if tid == 0:
        m = n_ * s_
        inv = float64(inv_std[c])
        sum_dy = p1[0]
        sum_dy_xhat = p2[0] * inv
        dbeta[c] = sum_dy
        dgamma[c] = sum_dy_xhat
        kk = inv * gamma[c]
        slope = -kk * inv * sum_dy_xhat / m
        k[c] = kk
        k[c_ + c] = slope
        k[2 * c_ + c] = -kk * sum_dy / m - slope * bmean[c]


@jit_kernel
def _bn_bwd_dx(dout, x, affine, act, k, c_, s_, dx):
    i = cuda.grid(1)
    if i < x.size:
        c = (i // s_) % c_
        xv = x[i]
        g = dout[i] if (act == 0 or xv * affine[c] + affine[c_ + c] > 0) else 0.0
        dx[i] = k[c] * g + k[c_ + c] * xv + k[2 * c_ + c]


def _geometry(x):
    n, c = x.shape[:2]
    return n, c, x.size // (n * c) if n * c else 0


def batchnorm2d_forward_train(
    x,
    gamma,
    beta,
    eps,
    momentum,
    running_mean,
    running_var,
    out,
    batch_mean,
    inv_std,
    act=0,
    affine=None,
):
    """Training-mode batch norm, as the CPU kernel: biased batch variance, running stats
    updated in place with the unbiased one; affine (2, C) gets (scale, shift)."""
    check_shape("out", out, x.shape)
    check_float32(x=x, out=out)
    n, c, s = _geometry(x)
    if n * s == 0:
        raise ValueError("batch norm over an empty batch")
    gamma = filled((c,), 1.0) if gamma is None else gamma
    beta = filled((c,), 0.0) if beta is None else beta
    affine = scratch("bn_affine", (2, c)) if affine is None else affine
    track = running_mean is not None and running_var is not None
    rmean = running_mean if track else batch_mean
    rvar = running_var if track else inv_std
    _bn_stats[c, THREADS](
        flat(x),
        n,
        c,
        s,
        gamma,
        beta,
        float(eps),
        float(momentum),
        track,
        rmean,
        rvar,
        batch_mean,
        inv_std,
        flat(affine),
    )
    _affine[blocks(x.size), THREADS](flat(x), flat(affine), c, s, int(act), flat(out))


def batchnorm2d_forward_eval(x, gamma, beta, eps, running_mean, running_var, out, act=0):
    """Inference batch norm with the running statistics."""
    check_shape("out", out, x.shape)
    n, c, s = _geometry(x)
    gamma = filled((c,), 1.0) if gamma is None else gamma
    beta = filled((c,), 0.0) if beta is None else beta
    affine = scratch("bn_eval_affine", (2, c))
    _eval_affine[blocks(c), THREADS](
        gamma, beta, running_mean, running_var, float(eps), c, flat(affine)
    )
    _affine[blocks(x.size), THREADS](flat(x), flat(affine), c, s, int(act), flat(out))


def batchnorm2d_backward(
    dout, x, batch_mean, gamma, inv_std, dx, dgamma, dbeta, affine=None, act=0
):
    """Gradients of training-mode batch norm (dx, dgamma, dbeta may each be None)."""
    if act and affine is None:
        raise ValueError("a fused activation needs the forward's affine (scale, shift)")
    check_shape("x", x, dout.shape)
    n, c, s = _geometry(x)
    gamma = filled((c,), 1.0) if gamma is None else gamma
    if affine is None:
        affine = scratch("bn_affine", (2, c))  # unused without a fused ReLU
    dg = scratch("bn_dgamma", (c,)) if dgamma is None else dgamma
    dbt = scratch("bn_dbeta", (c,)) if dbeta is None else dbeta
    k = scratch("bn_k", (3 * c,), np.float32)
    _bn_bwd_sums[c, THREADS](
        flat(dout),
        flat(x),
        flat(affine),
        int(act),
        batch_mean,
        gamma,
        inv_std,
        n,
        c,
        s,
        dg,
        dbt,
        k,
    )
    if dx is not None:
        check_shape("dx", dx, dout.shape)
        _bn_bwd_dx[blocks(x.size), THREADS](
            flat(dout), flat(x), flat(affine), int(act), k, c, s, flat(dx)
        )


# ------------------------------------------------------------- local response norm
@cuda.jit(device=True, inline="always")
def _pow_neg(s, beta):
    return math.pow(s, -beta)


@jit_kernel
def _lrn_fwd(x, size, alpha, beta, k, c_, s_, out, scale):
    i = cuda.grid(1)
    if i < x.size:
        n = i // (c_ * s_)
        rem = i - n * c_ * s_
        c = rem // s_
        j = rem - c * s_
        acc = float32(0.0)
        for cj in range(max(0, c - size // 2), min(c_, c + (size - 1) // 2 + 1)):
            v = x[(n * c_ + cj) * s_ + j]
            acc += v * v
        sc = float32(k) + float32(alpha / size) * acc
        scale[i] = sc
        out[i] = x[i] * _pow_neg(sc, float32(beta))


@jit_kernel
def _lrn_bwd(x, out, scale, dout, size, alpha, beta, c_, s_, dx):
    # dx_i = dy_i * s_i^-b - (2ab/size) x_i * sum_{j: i in W(j)} dy_j * y_j / s_j
    i = cuda.grid(1)
    if i < x.size:
        n = i // (c_ * s_)
        rem = i - n * c_ * s_
        c = rem // s_
        j = rem - c * s_
        acc = float32(0.0)
        for cj in range(max(0, c - (size - 1) // 2), min(c_, c + size // 2 + 1)):
            at = (n * c_ + cj) * s_ + j
            acc += dout[at] * out[at] / scale[at]
        coef = float32(2.0 * alpha * beta / size)
        dx[i] = dout[i] * _pow_neg(scale[i], float32(beta)) - coef * x[i] * acc


def lrn_forward(x, size, alpha, beta, k, out, scale):
    """PyTorch LocalResponseNorm, as the CPU kernel; scale keeps k + alpha/size * sum x^2."""
    check_shape("out", out, x.shape)
    check_shape("scale", scale, x.shape)
    n, c, s = _geometry(x)
    _lrn_fwd[blocks(x.size), THREADS](
        flat(x), int(size), float(alpha), float(beta), float(k), c, s, flat(out), flat(scale)
    )


def lrn_backward(x, out, scale, dout, size, alpha, beta, dx):
    for name, a in (("out", out), ("scale", scale), ("dout", dout), ("dx", dx)):
        check_shape(name, a, x.shape)
    n, c, s = _geometry(x)
    _lrn_bwd[blocks(x.size), THREADS](
        flat(x), flat(out), flat(scale), flat(dout), int(size), float(alpha), float(beta), c, s,
        flat(dx),
    )  # fmt: skip
