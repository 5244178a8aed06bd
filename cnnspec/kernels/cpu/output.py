"""Output layers' kernels: softmax_loss (cross-entropy), linear_loss (mean squared error)
and LeNet-5's Euclidean RBF units (rbf_forward, rbf_backward; its loss is softmax_loss of
the negated distances).

Losses return the (weighted) scalar loss as a Python float and write the gradient of that
scalar with respect to the prediction. Batch reductions use fixed-order partial sums.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from ..checks import check_class_labels
from ._common import SplitBySize, check_c, check_shape

__all__ = [
    "softmax_forward",
    "softmax_loss",
    "linear_loss",
    "rbf_forward",
    "rbf_backward",
    "negate",
]

_MSE_CHUNK = 16384


# ------------------------------------------------------------- softmax cross-entropy
def softmax_forward(z, out):
    """out = softmax(z) over axis 1, z and out (N, K)."""
    check_shape("out", out, z.shape)
    np.subtract(z, z.max(axis=1, keepdims=True), out=out)
    np.exp(out, out=out)
    out /= out.sum(axis=1, keepdims=True)


@SplitBySize
def _softmax_ce(logits, labels, probs, dlogits, grad_scale, want_grad, losses):
    # returns how many labels are out of [0, K) (their rows are left as they were: the
    # caller raises), checked here as they are read: two numpy passes less
    n_, k_ = logits.shape
    bad = 0
    for n in prange(n_):
        if labels[n] < 0 or labels[n] >= k_:
            bad += 1
            continue
        m = logits[n, 0]
        for j in range(1, k_):
            if logits[n, j] > m:
                m = logits[n, j]
        s = 0.0
        for j in range(k_):
            e = math.exp(logits[n, j] - m)
            probs[n, j] = e
            s += e
        inv = 1.0 / s
        for j in range(k_):
            probs[n, j] = probs[n, j] * inv
        lab = labels[n]
        losses[n] = m + math.log(s) - logits[n, lab]
        if want_grad:
            for j in range(k_):
                dlogits[n, j] = grad_scale * probs[n, j]
            dlogits[n, lab] -= grad_scale
    return bad


def _softmax_ce_numpy(logits, labels, probs, dlogits, grad_scale, want_grad, losses):
    """_softmax_ce in numpy, for a first run's first steps (pool.py's stand-ins): the
    exponentials numpy's, so the last bits may differ."""
    bad = int(np.count_nonzero((labels < 0) | (labels >= logits.shape[1])))
    if bad:
        return bad
    rows = np.arange(logits.shape[0])
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    s = e.sum(axis=1, dtype=np.float64, keepdims=True)
    probs[...] = e * (1.0 / s)
    losses[...] = m[:, 0] + np.log(s[:, 0]) - logits[rows, labels]
    if want_grad:
        dlogits[...] = grad_scale * probs
        dlogits[rows, labels] -= grad_scale
    return 0


def softmax_loss(logits, labels, probs, dlogits, weight=1.0):
    """Mean softmax cross-entropy times ``weight``.

    logits (N, K); labels int (N,); probs <- softmax(logits);
    dlogits <- weight * (probs - onehot) / N (skipped when dlogits is None).
    """
    check_c(logits=logits, labels=labels, probs=probs, dlogits=dlogits)
    n, k = logits.shape
    check_class_labels(labels, n, None)  # (the range: _softmax_ce's)
    check_shape("probs", probs, (n, k))
    want_grad = dlogits is not None
    if want_grad:
        check_shape("dlogits", dlogits, (n, k))
    else:
        dlogits = probs  # never written (want_grad=False)
    losses = np.empty(n, dtype=np.float64)
    scale = logits.dtype.type(float(weight) / n)
    bad = _softmax_ce.or_stand_in(
        _softmax_ce_numpy, logits, labels, probs, dlogits, scale, want_grad, losses
    )
    if bad:
        raise ValueError(f"labels out of range [0, {k})")
    return float(weight) * float(losses.sum()) / n


# ------------------------------------------------------------------------------- mse
@SplitBySize
def _mse(pred, target, dpred, grad_scale, want_grad, chunk, partial):
    n = pred.size
    for ci in prange(partial.size):
        acc = 0.0
        for i in range(ci * chunk, min(n, (ci + 1) * chunk)):
            d = pred[i] - target[i]
            acc += d * d
            if want_grad:
                dpred[i] = grad_scale * d
        partial[ci] = acc


def linear_loss(pred, target, dpred, weight=1.0):
    """weight * mean((pred - target)^2) over all elements; dpred <- its gradient
    (skipped when dpred is None)."""
    check_c(pred=pred, target=target, dpred=dpred)
    check_shape("target", target, pred.shape)
    m = pred.size
    if m == 0:
        raise ValueError("empty prediction")
    want_grad = dpred is not None
    if want_grad:
        check_shape("dpred", dpred, pred.shape)
    else:
        dpred = pred  # never written
    partial = np.empty((m + _MSE_CHUNK - 1) // _MSE_CHUNK, dtype=np.float64)
    scale = pred.dtype.type(2.0 * float(weight) / m)
    _mse(
        pred.reshape(-1),
        target.reshape(-1),
        dpred.reshape(-1),
        scale,
        want_grad,
        _MSE_CHUNK,
        partial,
    )
    return float(weight) * float(partial.sum()) / m


# ------------------------------------------------------------------------------- rbf
@SplitBySize
def _rbf_fwd(x, centres, out):
    n_, f_ = x.shape
    k_ = centres.shape[0]
    for n in prange(n_):
        for k in range(k_):
            acc = 0.0
            for f in range(f_):
                d = x[n, f] - centres[k, f]
                acc += d * d
            out[n, k] = acc


def _rbf_fwd_numpy(x, centres, out):
    d = x[:, None, :] - centres[None]
    out[...] = (d * d).sum(axis=2, dtype=np.float64)  # (float64 sums, in another order)


@SplitBySize
def _rbf_bwd_dx(x, centres, dout, dx):
    n_, f_ = x.shape
    k_ = centres.shape[0]
    for n in prange(n_):
        for f in range(f_):
            dx[n, f] = 0
        for k in range(k_):
            g = 2 * dout[n, k]
            for f in range(f_):
                dx[n, f] += g * (x[n, f] - centres[k, f])


def _rbf_bwd_dx_numpy(x, centres, dout, dx):
    dx[...] = 0
    for k in range(centres.shape[0]):  # in the kernel's order, rounded at each add
        dx += (2 * dout[:, k : k + 1].astype(np.float64)) * (x - centres[k])


@SplitBySize
def _rbf_bwd_dc(x, centres, dout, dc):
    n_, f_ = x.shape
    k_ = centres.shape[0]
    for k in prange(k_):
        for f in range(f_):
            dc[k, f] = 0
        for n in range(n_):  # fixed order over the batch: deterministic
            g = 2 * dout[n, k]
            for f in range(f_):
                dc[k, f] -= g * (x[n, f] - centres[k, f])


def _rbf_bwd_dc_numpy(x, centres, dout, dc):
    dc[...] = 0
    for n in range(x.shape[0]):  # in the kernel's order, rounded at each add
        dc -= (2 * dout[n].astype(np.float64))[:, None] * (x[n] - centres)


def rbf_forward(x, centres, out):
    """LeNet-5 Euclidean RBF units: out[n, k] = sum_f (x[n, f] - centres[k, f])^2."""
    check_c(x=x, centres=centres, out=out)
    if centres.shape[1] != x.shape[1]:
        raise ValueError(f"centres {centres.shape} do not match x {x.shape}")
    check_shape("out", out, (x.shape[0], centres.shape[0]))
    _rbf_fwd.or_stand_in(_rbf_fwd_numpy, x, centres, out)


def rbf_backward(x, centres, dout, dx, dcentres):
    """dx and dcentres (either may be None) are overwritten."""
    check_c(x=x, centres=centres, dout=dout, dx=dx, dcentres=dcentres)
    check_shape("dout", dout, (x.shape[0], centres.shape[0]))
    if dx is not None:
        check_shape("dx", dx, x.shape)
        _rbf_bwd_dx.or_stand_in(_rbf_bwd_dx_numpy, x, centres, dout, dx)
    if dcentres is not None:
        check_shape("dcentres", dcentres, centres.shape)
        _rbf_bwd_dc.or_stand_in(_rbf_bwd_dc_numpy, x, centres, dout, dcentres)


def negate(x, out):
    """out = -x (RBF distances as logits and back; out may be x)."""
    np.negative(x, out=out)
