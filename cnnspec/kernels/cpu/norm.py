"""Normalisation kernels: batch normalisation and local response normalisation.

Arrays have the channel axis at 1: (N, C, H, W) or (N, C). Per-channel statistics are
accumulated in float64 and reduced in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import as_3d, check_c, check_shape

__all__ = [
    "batchnorm_forward_train",
    "batchnorm_forward_eval",
    "batchnorm_backward",
    "batchnorm_xhat",
    "lrn_forward",
    "lrn_backward",
]


# ------------------------------------------------------------------------ batch norm
@njit(parallel=True, cache=True)
def _bn_stats(x, mean, var):
    # x (N, C, S); mean/var float64 (C,); biased variance, two-pass for accuracy
    n_, c_, s_ = x.shape
    m_ = n_ * s_
    for c in prange(c_):
        acc = 0.0
        for n in range(n_):
            for i in range(s_):
                acc += x[n, c, i]
        mu = acc / m_
        acc2 = 0.0
        for n in range(n_):
            for i in range(s_):
                d = x[n, c, i] - mu
                acc2 += d * d
        mean[c] = mu
        var[c] = acc2 / m_


@njit(parallel=True, cache=True)
def _bn_normalize(x, mean, inv_std, gamma, beta, out, xhat, act):
    n_, c_, s_ = x.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        mu = mean[c]
        istd = inv_std[c]
        g = gamma[c]
        b = beta[c]
        for i in range(s_):
            xh = (x[n, c, i] - mu) * istd
            xhat[n, c, i] = xh
            v = g * xh + b
            out[n, c, i] = v if (act == 0 or v > 0) else 0.0


@njit(parallel=True, cache=True)
def _affine(x, scale, shift, out, act):
    n_, c_, s_ = x.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = scale[c]
        b = shift[c]
        for i in range(s_):
            v = x[n, c, i] * a + b
            out[n, c, i] = v if (act == 0 or v > 0) else 0.0


@njit(parallel=True, cache=True)
def _bn_bwd_sums(dout, xhat, y, act, sum_dy, sum_dy_xhat):
    # with a fused ReLU (act=1), the gradient reaching the norm is dout where y > 0
    n_, c_, s_ = dout.shape
    for c in prange(c_):
        a = 0.0
        b = 0.0
        for n in range(n_):
            for i in range(s_):
                g = dout[n, c, i] if (act == 0 or y[n, c, i] > 0) else 0.0
                a += g
                b += g * xhat[n, c, i]
        sum_dy[c] = a
        sum_dy_xhat[c] = b


@njit(parallel=True, cache=True)
def _bn_bwd_dx(dout, xhat, y, act, coef, mean_dy, mean_dy_xhat, dx):
    # dx = gamma*inv_std * (dy - mean(dy) - xhat*mean(dy*xhat)); coef = gamma*inv_std
    n_, c_, s_ = dout.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        k = coef[c]
        m1 = mean_dy[c]
        m2 = mean_dy_xhat[c]
        for i in range(s_):
            g = dout[n, c, i] if (act == 0 or y[n, c, i] > 0) else 0.0
            dx[n, c, i] = k * (g - m1 - xhat[n, c, i] * m2)


def _param_or(value, c, dtype, fill):
    if value is None:
        return np.full(c, fill, dtype=dtype)
    check_shape("parameter", value, (c,))
    return value


def batchnorm_forward_train(
    x,
    gamma,
    beta,
    eps,
    momentum,
    running_mean,
    running_var,
    out,
    xhat,
    inv_std,
    act=0,
    batch_mean=None,
):
    """Training-mode batch norm. Normalises with the biased batch variance and updates
    running stats in place with the unbiased one: r = (1-momentum)*r + momentum*batch.
    gamma/beta may be None (affine=False); running_mean/var may be None (not tracked).
    `batch_mean` (C,), if given, receives the batch mean (for :func:`batchnorm_xhat`)."""
    check_c(x=x, gamma=gamma, beta=beta, out=out, xhat=xhat, inv_std=inv_std)
    check_shape("out", out, x.shape)
    check_shape("xhat", xhat, x.shape)
    c = x.shape[1]
    check_shape("inv_std", inv_std, (c,))
    gamma = _param_or(gamma, c, x.dtype, 1)
    beta = _param_or(beta, c, x.dtype, 0)
    x3 = as_3d(x)
    m = x3.shape[0] * x3.shape[2]
    if m == 0:
        raise ValueError("batch norm over an empty batch")
    mean = np.empty(c, dtype=np.float64)
    var = np.empty(c, dtype=np.float64)
    _bn_stats(x3, mean, var)
    inv_std[:] = 1.0 / np.sqrt(var + float(eps))
    if batch_mean is not None:
        batch_mean[:] = mean
    _bn_normalize(x3, mean.astype(x.dtype), inv_std, gamma, beta, as_3d(out), as_3d(xhat), int(act))
    mom = float(momentum)
    if running_mean is not None:
        running_mean *= 1.0 - mom
        running_mean += mom * mean
    if running_var is not None:
        unbiased = var * (m / (m - 1)) if m > 1 else var
        running_var *= 1.0 - mom
        running_var += mom * unbiased


def batchnorm_forward_eval(x, gamma, beta, eps, running_mean, running_var, out, act=0):
    """Inference batch norm: out = (x - running_mean) / sqrt(running_var + eps) * gamma + beta."""
    check_c(x=x, out=out)
    check_shape("out", out, x.shape)
    c = x.shape[1]
    inv = 1.0 / np.sqrt(running_var.astype(np.float64) + float(eps))
    scale = inv if gamma is None else gamma * inv
    shift = -running_mean * scale
    if beta is not None:
        shift = shift + beta
    scale = np.ascontiguousarray(scale, dtype=x.dtype)
    shift = np.ascontiguousarray(shift, dtype=x.dtype)
    check_shape("running_mean", scale, (c,))
    _affine(as_3d(x), scale, shift, as_3d(out), int(act))


def batchnorm_xhat(x, batch_mean, inv_std, xhat):
    """Recompute the normalised input (x - mean) * inv_std of a training forward pass,
    so the backward pass needs no stored copy of it."""
    check_c(x=x, xhat=xhat)
    check_shape("xhat", xhat, x.shape)
    scale = np.ascontiguousarray(inv_std, dtype=x.dtype)
    shift = np.ascontiguousarray(-batch_mean * inv_std, dtype=x.dtype)
    _affine(as_3d(x), scale, shift, as_3d(xhat), 0)


def batchnorm_backward(dout, xhat, gamma, inv_std, dx, dgamma, dbeta, out=None, act=0):
    """Gradients of training-mode batch norm. gamma may be None (treated as 1);
    dx, dgamma, dbeta may each be None (skipped). With a fused ReLU (act=1), `out`
    is the forward output and dout is the gradient after the ReLU."""
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    check_c(dout=dout, xhat=xhat, dx=dx)
    check_shape("xhat", xhat, dout.shape)
    c = dout.shape[1]
    d3 = as_3d(dout)
    x3 = as_3d(xhat)
    m = d3.shape[0] * d3.shape[2]
    sum_dy = np.empty(c, dtype=np.float64)
    sum_dy_xhat = np.empty(c, dtype=np.float64)
    y3 = as_3d(out) if act else d3
    _bn_bwd_sums(d3, x3, y3, int(act), sum_dy, sum_dy_xhat)
    if dbeta is not None:
        dbeta[:] = sum_dy
    if dgamma is not None:
        dgamma[:] = sum_dy_xhat
    if dx is not None:
        check_shape("dx", dx, dout.shape)
        coef = inv_std.astype(np.float64)
        if gamma is not None:
            coef = coef * gamma
        t = dout.dtype
        _bn_bwd_dx(
            d3,
            x3,
            y3,
            int(act),
            coef.astype(t),
            (sum_dy / m).astype(t),
            (sum_dy_xhat / m).astype(t),
            as_3d(dx),
        )


# ------------------------------------------------------------- local response norm
@njit(cache=True)
def _pow_neg(s, beta):
    """s ** -beta, with a fast exact-enough path for AlexNet's beta = 0.75."""
    if beta == 0.75:
        r = math.sqrt(s)
        return 1.0 / (r * math.sqrt(r))
    return s ** (-beta)


@njit(parallel=True, cache=True)
def _lrn_fwd(x, size, alpha, beta, k, out, scale):
    n_, c_, s_ = x.shape
    before = size // 2
    after = (size - 1) // 2
    a = alpha / size
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        sp = scale[n, c]
        sp[:] = 0
        for j in range(max(0, c - before), min(c_, c + after + 1)):
            xj = x[n, j]
            for i in range(s_):
                sp[i] += xj[i] * xj[i]
        xc = x[n, c]
        oc = out[n, c]
        for i in range(s_):
            sc = k + a * sp[i]
            sp[i] = sc
            oc[i] = xc[i] * _pow_neg(sc, beta)


@njit(parallel=True, cache=True)
def _lrn_bwd(x, out, scale, dout, size, alpha, beta, dx):
    # dx_i = dy_i * s_i^-b - (2ab/size) x_i * sum_{j: i in W(j)} dy_j * y_j / s_j
    # W(j) = [j - size//2, j + (size-1)//2]  =>  j in [i - (size-1)//2, i + size//2]
    n_, c_, s_ = x.shape
    before = size // 2
    after = (size - 1) // 2
    coef = 2 * alpha * beta / size
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        dp = dx[n, c]
        dp[:] = 0
        for j in range(max(0, c - after), min(c_, c + before + 1)):
            gj = dout[n, j]
            yj = out[n, j]
            sj = scale[n, j]
            for i in range(s_):
                dp[i] += gj[i] * yj[i] / sj[i]
        xc = x[n, c]
        gc = dout[n, c]
        sc = scale[n, c]
        for i in range(s_):
            dp[i] = gc[i] * _pow_neg(sc[i], beta) - coef * xc[i] * dp[i]


def lrn_forward(x, size, alpha, beta, k, out, scale):
    """PyTorch LocalResponseNorm: scale = k + alpha/size * sum of x^2 over channels
    c - size//2 .. c + (size-1)//2 (zero padded); out = x * scale^-beta."""
    check_c(x=x, out=out, scale=scale)
    check_shape("out", out, x.shape)
    check_shape("scale", scale, x.shape)
    t = x.dtype.type
    _lrn_fwd(as_3d(x), int(size), t(alpha), t(beta), t(k), as_3d(out), as_3d(scale))


def lrn_backward(x, out, scale, dout, size, alpha, beta, dx):
    check_c(x=x, out=out, scale=scale, dout=dout, dx=dx)
    for name, a in (("out", out), ("scale", scale), ("dout", dout), ("dx", dx)):
        check_shape(name, a, x.shape)
    t = x.dtype.type
    _lrn_bwd(
        as_3d(x), as_3d(out), as_3d(scale), as_3d(dout), int(size), t(alpha), t(beta), as_3d(dx)
    )
