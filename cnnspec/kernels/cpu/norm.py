"""Normalisation kernels: batch normalisation and local response normalisation.

Arrays have the channel axis at 1: (N, C, H, W) or (N, C). Per-channel statistics are
accumulated in float64 and reduced in a fixed order, so results are deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from ._common import SplitBySize, as_3d, check_c, check_shape, relu_numpy

__all__ = [
    "batchnorm2d_forward_train",
    "batchnorm2d_forward_eval",
    "batchnorm2d_fold",
    "batchnorm2d_backward",
    "lrn_forward",
    "lrn_backward",
]


# ------------------------------------------------------------------------ batch norm
# The normalised input xhat = (x - mean) * inv_std is never stored: each pass
# recomputes what it needs from x, which costs less than writing and reading it.
# Sums run per channel in float64; `reassoc` lets LLVM vectorise them into partial
# sums (a fixed order, chosen at compile time: the same bits on every run).
_SUMS = {"reassoc"}


_SUM_BLOCK = 4  # samples per partial sum of the reductions: a fixed number, so the
# bits do not depend on the thread count. In memory order (blocks of samples, every
# channel of each), partial sums added up in block order: a loop per channel strides
# over the samples, and small maps (8x8: 256-byte runs 16 KB apart) then read at a
# third of the bandwidth (measured, ResNet-20 b128).


@SplitBySize.with_options(fastmath=_SUMS)
def _bn_stats(x, mean, var):
    # x (N, C, S); mean/var float64 (C,); biased variance in one pass over x, of
    # the values shifted by the channel's first one (no cancellation when the
    # mean is large against the spread)
    n_, c_, s_ = x.shape
    m_ = n_ * s_
    blocks = -(-n_ // _SUM_BLOCK)
    part = np.zeros((blocks, 2, c_))
    for blk in prange(blocks):
        for n in range(blk * _SUM_BLOCK, min(n_, (blk + 1) * _SUM_BLOCK)):
            for c in range(c_):
                shift = np.float64(x[0, c, 0])
                acc = 0.0
                acc2 = 0.0
                row = x[n, c]
                for i in range(s_):
                    d = row[i] - shift
                    acc += d
                    acc2 += d * d
                part[blk, 0, c] += acc
                part[blk, 1, c] += acc2
    for c in range(c_):
        acc = 0.0
        acc2 = 0.0
        for blk in range(blocks):
            acc += part[blk, 0, c]
            acc2 += part[blk, 1, c]
        mu = acc / m_
        mean[c] = x[0, c, 0] + mu
        var[c] = max(acc2 / m_ - mu * mu, 0.0)


# Each kernel's numpy stand-in (`_numpy`), for a first run's first steps while a child
# compiles the kernel's builds (pool.py's): its float operations, float64 sums in
# another order.
def _bn_stats_numpy(x, mean, var):
    d = x - x[0, :, :1].astype(np.float64)  # shifted by each channel's first value
    mu = d.sum(axis=(0, 2)) / (x.shape[0] * x.shape[2])
    mean[...] = x[0, :, 0] + mu
    var[...] = np.maximum((d * d).sum(axis=(0, 2)) / (x.shape[0] * x.shape[2]) - mu * mu, 0.0)


@SplitBySize
def _affine(x, scale, shift, out, act):
    n_, c_, s_ = x.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = scale[c]
        b = shift[c]
        src, dst = x[n, c], out[n, c]
        for i in range(s_):
            v = src[i] * a + b
            dst[i] = v if (act == 0 or v > 0) else 0.0


def _affine_numpy(x, scale, shift, out, act):
    v = x * scale[:, None] + shift[:, None]
    out[...] = relu_numpy(v, act)


# With a fused ReLU (act=1) the gradient reaching the norm is g = dout where the
# forward output x*scale + shift > 0: recomputed from x with the forward's own scale
# and shift (the same float operations, so the same mask) instead of reading the
# output, one array fewer through memory in both passes.


@SplitBySize.with_options(fastmath=_SUMS)
def _bn_bwd_sums(dout, x, scale, shift, act, mean, sum_dy, sum_dy_xc):
    # sum_dy = sum(g), sum_dy_xc = sum(g * (x - mean)), in blocks as _bn_stats
    n_, c_, s_ = dout.shape
    blocks = -(-n_ // _SUM_BLOCK)
    part = np.zeros((blocks, 2, c_))
    for blk in prange(blocks):
        for n in range(blk * _SUM_BLOCK, min(n_, (blk + 1) * _SUM_BLOCK)):
            for c in range(c_):
                mu, sa, sb = mean[c], scale[c], shift[c]
                a = 0.0
                b = 0.0
                d, xr = dout[n, c], x[n, c]
                for i in range(s_):
                    xv = xr[i]
                    g = d[i] if (xv * sa + sb > 0 or act == 0) else 0.0
                    a += g
                    b += g * (xv - mu)
                part[blk, 0, c] += a
                part[blk, 1, c] += b
    # loops, not array expressions: in the parallel build each of those is a parallel
    # region of its own (two a block: ~45 us a call, measured)
    for c in range(c_):
        sum_dy[c] = 0.0
        sum_dy_xc[c] = 0.0
    for blk in range(blocks):
        for c in range(c_):
            sum_dy[c] += part[blk, 0, c]
            sum_dy_xc[c] += part[blk, 1, c]


def _bn_bwd_sums_numpy(dout, x, scale, shift, act, mean, sum_dy, sum_dy_xc):
    """_bn_bwd_sums in numpy, for a first run's first steps (pool.py's stand-ins): the
    same products, summed in another order."""
    g = dout
    if act:
        g = np.where(x * scale[:, None] + shift[:, None] > 0, dout, dout.dtype.type(0))
    sum_dy[...] = g.sum(axis=(0, 2), dtype=np.float64)
    # g in float64 times x - mean in x's dtype, as the kernel multiplies them
    sum_dy_xc[...] = (g.astype(np.float64) * (x - mean[:, None])).sum(axis=(0, 2))


@SplitBySize
def _bn_bwd_dx(dout, x, scale, shift, act, ka, kb, kc, dx):
    # dx = ka*g + kb*x + kc per channel (the batch-norm gradient, expanded)
    n_, c_, s_ = dout.shape
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a, b, k, sa, sb = ka[c], kb[c], kc[c], scale[c], shift[c]
        d, xr, dst = dout[n, c], x[n, c], dx[n, c]
        for i in range(s_):
            xv = xr[i]
            g = d[i] if (xv * sa + sb > 0 or act == 0) else 0.0
            dst[i] = a * g + b * xv + k


def _bn_bwd_dx_numpy(dout, x, scale, shift, act, ka, kb, kc, dx):
    g = dout.astype(np.float64)  # (the kernel's g: float64, its 0.0 a float64 literal)
    if act:
        g[x * scale[:, None] + shift[:, None] <= 0] = 0.0
    dx[...] = ka[:, None] * g + kb[:, None] * x + kc[:, None]


def _param_or(value, c, dtype, fill):
    if value is None:
        return np.full(c, fill, dtype=dtype)
    check_shape("parameter", value, (c,))
    return value


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
    stats=None,
):
    """Training-mode batch norm. Normalises with the biased batch variance and updates
    running stats in place with the unbiased one: r = (1-momentum)*r + momentum*batch.
    gamma/beta may be None (affine=False); running_mean/var may be None (not tracked).
    `batch_mean` and `inv_std` (C,) receive the batch statistics backward needs;
    `affine` (2, C), if given, the (scale, shift) out = x * scale + shift was computed
    with (a fused ReLU's backward recomputes its mask from them).

    Fused into its neighbours: `stats` (float64 (2, C): mean, biased variance), when
    the conv before it took them already, saves the pass over x that finds them; out
    None writes no output (every reader applies `affine` as it reads x)."""
    check_c(x=x, gamma=gamma, beta=beta, out=out, batch_mean=batch_mean, inv_std=inv_std)
    if out is not None:
        check_shape("out", out, x.shape)
    elif affine is None:
        raise ValueError("batch norm without an output must report its affine")
    c = x.shape[1]
    check_shape("inv_std", inv_std, (c,))
    check_shape("batch_mean", batch_mean, (c,))
    gamma = _param_or(gamma, c, x.dtype, 1)
    beta = _param_or(beta, c, x.dtype, 0)
    x3 = as_3d(x)
    m = x3.shape[0] * x3.shape[2]
    if m == 0:
        raise ValueError("batch norm over an empty batch")
    if stats is None:
        mean = np.empty(c, dtype=np.float64)
        var = np.empty(c, dtype=np.float64)
        _bn_stats.or_stand_in(_bn_stats_numpy, x3, mean, var)
    else:
        check_shape("stats", stats, (2, c))
        mean, var = stats[0].astype(np.float64), stats[1].astype(np.float64)
    inv = 1.0 / np.sqrt(var + float(eps))
    inv_std[:] = inv
    batch_mean[:] = mean
    scale = gamma * inv
    scale, shift = scale.astype(x.dtype), (beta - mean * scale).astype(x.dtype)
    if affine is not None:
        check_shape("affine", affine, (2, c))
        affine[0], affine[1] = scale, shift
    if out is not None:
        _affine.or_stand_in(_affine_numpy, x3, scale, shift, as_3d(out), act)
    mom = float(momentum)
    if running_mean is not None:
        running_mean *= 1.0 - mom
        running_mean += mom * mean
    if running_var is not None:
        unbiased = var * (m / (m - 1)) if m > 1 else var
        running_var *= 1.0 - mom
        running_var += mom * unbiased


def _eval_affine(gamma, beta, eps, running_mean, running_var):
    """(scale, shift) in float64 of inference batch norm: out = x * scale + shift."""
    inv = 1.0 / np.sqrt(running_var.astype(np.float64) + float(eps))
    scale = inv if gamma is None else gamma * inv
    shift = -running_mean * scale
    if beta is not None:
        shift = shift + beta
    return scale, shift


def batchnorm2d_fold(w, b, gamma, beta, eps, running_mean, running_var, w_out, b_out):
    """The weights and bias of a layer with the inference batch norm after it folded in:
    w_out = w * scale per output channel (w's axis 0), b_out = b * scale + shift (b None:
    0), in float64, rounded once. O(weights): cheap enough to run on every eval batch, so
    nothing goes stale when training changes the weights or the running statistics."""
    c = w.shape[0]
    check_c(w=w, w_out=w_out)
    check_shape("w_out", w_out, w.shape)
    check_shape("b_out", b_out, (c,))
    scale, shift = _eval_affine(gamma, beta, eps, running_mean, running_var)
    check_shape("running_mean", scale, (c,))
    np.multiply(w.reshape(c, -1), scale[:, None], out=w_out.reshape(c, -1), casting="unsafe")
    b_out[:] = shift if b is None else b * scale + shift


def batchnorm2d_forward_eval(
    x, gamma, beta, eps, running_mean, running_var, out, act=0, affine=None
):
    """Inference batch norm: out = (x - running_mean) / sqrt(running_var + eps) * gamma + beta;
    `affine` (2, C), if given, receives that scale and shift; out None writes no output."""
    check_c(x=x, out=out)
    if out is not None:
        check_shape("out", out, x.shape)
    elif affine is None:
        raise ValueError("batch norm without an output must report its affine")
    c = x.shape[1]
    scale, shift = _eval_affine(gamma, beta, eps, running_mean, running_var)
    scale = np.ascontiguousarray(scale, dtype=x.dtype)
    shift = np.ascontiguousarray(shift, dtype=x.dtype)
    check_shape("running_mean", scale, (c,))
    if affine is not None:
        check_shape("affine", affine, (2, c))
        affine[0], affine[1] = scale, shift
    if out is not None:
        _affine.or_stand_in(_affine_numpy, as_3d(x), scale, shift, as_3d(out), int(act))


def batchnorm2d_backward(
    dout,
    x,
    batch_mean,
    gamma,
    inv_std,
    dx,
    dgamma,
    dbeta,
    affine=None,
    act=0,
    dx_coeffs=None,
    sums=None,
):
    """Gradients of training-mode batch norm from its input and batch statistics.
    gamma may be None (treated as 1); dx, dgamma, dbeta may each be None (skipped).
    With a fused ReLU (act=1), dout is the gradient after the ReLU and `affine` the
    (scale, shift) that :func:`batchnorm2d_forward_train` reported. `dx_coeffs` (3, C),
    if given, receives (ka, kb, kc): dx = ka*g + kb*x + kc per channel, g = dout masked
    by the ReLU (what the conv before it applies as it reads dout, when dx is None).
    `sums` (float64 (2, C)), if given, are sum(g) and sum(g * (x - mean)) already, taken
    by the conv that wrote dout (conv2d_backward's `dx_sums`): no pass over dout for
    them."""
    if act and affine is None:
        raise ValueError("a fused activation needs the forward's affine (scale, shift)")
    check_c(dout=dout, x=x, dx=dx)
    check_shape("x", x, dout.shape)
    c = dout.shape[1]
    d3, x3 = as_3d(dout), as_3d(x)
    m = d3.shape[0] * d3.shape[2]
    mean = batch_mean.astype(np.float64)
    inv = inv_std.astype(np.float64)
    if affine is None:
        affine = np.zeros((2, c), x.dtype)  # unused without a fused ReLU
    check_shape("affine", affine, (2, c))
    scale, shift = affine[0].astype(x.dtype), affine[1].astype(x.dtype)
    if sums is None:
        sum_dy = np.empty(c, dtype=np.float64)
        sum_dy_xc = np.empty(c, dtype=np.float64)
        args = (d3, x3, scale, shift, int(act), mean.astype(x.dtype), sum_dy, sum_dy_xc)
        _bn_bwd_sums.or_stand_in(_bn_bwd_sums_numpy, *args)
    else:
        check_shape("sums", sums, (2, c))
        sum_dy, sum_dy_xc = sums[0], sums[1]
    sum_dy_xhat = sum_dy_xc * inv
    if dbeta is not None:
        dbeta[:] = sum_dy
    if dgamma is not None:
        dgamma[:] = sum_dy_xhat
    if dx is None and dx_coeffs is None:
        return
    # dx = k * (g - mean(g) - xhat * mean(g * xhat)), k = gamma * inv_std,
    # xhat = (x - mean) * inv_std: linear in g and x per channel
    k = inv if gamma is None else inv * gamma
    slope = -k * inv * sum_dy_xhat / m
    t = dout.dtype
    ka, kb, kc = k.astype(t), slope.astype(t), (-k * sum_dy / m - slope * mean).astype(t)
    if dx_coeffs is not None:
        check_shape("dx_coeffs", dx_coeffs, (3, c))
        dx_coeffs[0], dx_coeffs[1], dx_coeffs[2] = ka, kb, kc
    if dx is not None:
        check_shape("dx", dx, dout.shape)
        args = (d3, x3, scale, shift, int(act), ka, kb, kc, as_3d(dx))
        _bn_bwd_dx.or_stand_in(_bn_bwd_dx_numpy, *args)


# ------------------------------------------------------------- local response norm
@njit(cache=True)
def _pow_neg(s, beta):
    """s ** -beta, with a fast exact-enough path for AlexNet's beta = 0.75."""
    if beta == 0.75:
        r = math.sqrt(s)
        return 1.0 / (r * math.sqrt(r))
    return s ** (-beta)


@SplitBySize
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


def _pow_neg_numpy(s, beta):
    if beta == 0.75:
        r = np.sqrt(s)
        return 1.0 / (r * np.sqrt(r)).astype(np.float64)
    return s.astype(np.float64) ** -np.float64(beta)


def _window_sums(v, before, after):
    """Sums over the channel window [c - before, c + after] of (N, C, S), in order."""
    c_ = v.shape[1]
    out = np.zeros_like(v)
    for c in range(c_):
        for j in range(max(0, c - before), min(c_, c + after + 1)):
            out[:, c] += v[:, j]
    return out


def _lrn_fwd_numpy(x, size, alpha, beta, k, out, scale):
    sc = k + (alpha / np.float64(size)) * _window_sums(x * x, size // 2, (size - 1) // 2)
    scale[...] = sc
    out[...] = x * _pow_neg_numpy(sc, beta)


@SplitBySize
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


def _lrn_bwd_numpy(x, out, scale, dout, size, alpha, beta, dx):
    dp = _window_sums(dout * out / scale, (size - 1) // 2, size // 2)
    coef = 2 * np.float64(alpha) * beta / size
    dx[...] = dout * _pow_neg_numpy(scale, beta) - coef * x * dp


def lrn_forward(x, size, alpha, beta, k, out, scale):
    """PyTorch LocalResponseNorm: scale = k + alpha/size * sum of x^2 over channels
    c - size//2 .. c + (size-1)//2 (zero padded); out = x * scale^-beta."""
    check_c(x=x, out=out, scale=scale)
    check_shape("out", out, x.shape)
    check_shape("scale", scale, x.shape)
    t = x.dtype.type
    args = (as_3d(x), int(size), t(alpha), t(beta), t(k), as_3d(out), as_3d(scale))
    _lrn_fwd.or_stand_in(_lrn_fwd_numpy, *args)


def lrn_backward(x, out, scale, dout, size, alpha, beta, dx):
    check_c(x=x, out=out, scale=scale, dout=dout, dx=dx)
    for name, a in (("out", out), ("scale", scale), ("dout", dout), ("dx", dx)):
        check_shape(name, a, x.shape)
    t = x.dtype.type
    args = (as_3d(x), as_3d(out), as_3d(scale), as_3d(dout), int(size), t(alpha), t(beta))
    _lrn_bwd.or_stand_in(_lrn_bwd_numpy, *args, as_3d(dx))
