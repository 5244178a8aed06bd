"""Losses and the softmax output, one thread per sample (classes are few). The loss
comes back to the host as one float64 per sample, added there in order: the only
numbers a training step copies out besides the scores its metrics need."""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float32, float64

from ..checks import check_class_labels
from ._common import THREADS, blocks, check_float32, check_shape, flat, jit_kernel, scratch

__all__ = [
    "softmax_forward",
    "softmax_loss",
    "linear_loss",
    "rbf_forward",
    "rbf_backward",
    "negate",
]


@jit_kernel
def _softmax(logits, n_, k_, probs):
    n = cuda.grid(1)
    if n < n_:
        row = n * k_
        m = logits[row]
        for j in range(1, k_):
            m = max(m, logits[row + j])
        s = float32(0.0)
        for j in range(k_):
            e = math.exp(logits[row + j] - m)
            probs[row + j] = e
            s += e
        for j in range(k_):
            probs[row + j] /= s


@jit_kernel
def _softmax_ce(logits, labels, n_, k_, grad_scale, want_grad, probs, dlogits, losses):
    n = cuda.grid(1)
    if n < n_:
        row = n * k_
        m = logits[row]
        for j in range(1, k_):
            m = max(m, logits[row + j])
        s = float64(0.0)
        for j in range(k_):
            e = math.exp(float64(logits[row + j] - m))
            probs[row + j] = e
            s += e
        inv = 1.0 / s
        for j in range(k_):
            probs[row + j] = float32(probs[row + j] * inv)
        lab = labels[n]
        losses[n] = m + math.log(s) - logits[row + lab]
        if want_grad:
            for j in range(k_):
                dlogits[row + j] = grad_scale * probs[row + j]
            dlogits[row + lab] -= grad_scale


def _staged(key, host, dtype):
    """A host array (labels, targets) copied into a device buffer kept for its shape."""
    host = np.ascontiguousarray(host, dtype)
    dev = scratch(key, host.shape, dtype)
    dev.copy_to_device(host)
    return dev


def softmax_forward(z, out):
    """out = softmax(z) over axis 1, z and out (N, K)."""
    check_shape("out", out, z.shape)
    n, k = z.shape
    _softmax[blocks(n), THREADS](flat(z), n, k, flat(out))


def softmax_loss(logits, labels, probs, dlogits, weight=1.0):
    """Mean softmax cross-entropy times ``weight``; labels are host integers (N,).
    probs <- softmax(logits); dlogits <- weight * (probs - onehot) / N (unless None)."""
    n, k = logits.shape
    labels = np.asarray(labels)
    check_class_labels(labels, n, k)
    check_shape("probs", probs, (n, k))
    check_float32(logits=logits, probs=probs, dlogits=dlogits)
    want_grad = dlogits is not None
    if want_grad:
        check_shape("dlogits", dlogits, (n, k))
    losses = scratch("ce_losses", (n,), np.float64)
    _softmax_ce[blocks(n), THREADS](
        flat(logits), _staged("labels", labels, np.int32), n, k, float(weight) / n, want_grad,
        flat(probs), flat(dlogits if want_grad else probs), losses,
    )  # fmt: skip
    return float(weight) * float(losses.copy_to_host().sum()) / n


@jit_kernel
def _mse(pred, target, m, grad_scale, want_grad, dpred, partial):
    # one thread per fixed chunk of elements: partial sums in a fixed order
    t = cuda.grid(1)
    chunk = (m + partial.size - 1) // partial.size
    if t < partial.size:
        acc = float64(0.0)
        for i in range(t * chunk, min(m, (t + 1) * chunk)):
            d = pred[i] - target[i]
            acc += d * d
            if want_grad:
                dpred[i] = grad_scale * d
        partial[t] = acc


def linear_loss(pred, target, dpred, weight=1.0):
    """weight * mean((pred - target)^2); dpred <- its gradient (unless None). The
    target is a host array."""
    check_shape("target", target, pred.shape)
    m = pred.size
    if m == 0:
        raise ValueError("empty prediction")
    want_grad = dpred is not None
    partial = scratch("mse_partial", (min(m, 4 * THREADS),), np.float64)
    _mse[blocks(partial.size), THREADS](
        flat(pred), flat(_staged("target", target, np.float32)), m, 2.0 * float(weight) / m,
        want_grad, flat(dpred if want_grad else pred), partial,
    )  # fmt: skip
    return float(weight) * float(partial.copy_to_host().sum()) / m


# ------------------------------------------------------------------------------- rbf
@jit_kernel
def _rbf_fwd(x, centres, n_, k_, f_, out):
    i = cuda.grid(1)
    if i < n_ * k_:
        n = i // k_
        k = i - n * k_
        acc = float32(0.0)
        for f in range(f_):
            d = x[n * f_ + f] - centres[k * f_ + f]
            acc += d * d
        out[i] = acc


@jit_kernel
def _rbf_dx(x, centres, dout, n_, k_, f_, dx):
    i = cuda.grid(1)
    if i < n_ * f_:
        n = i // f_
        f = i - n * f_
        acc = float32(0.0)
        for k in range(k_):
            acc += 2 * dout[n * k_ + k] * (x[i] - centres[k * f_ + f])
        dx[i] = acc


@jit_kernel
def _rbf_dc(x, centres, dout, n_, k_, f_, dc):
    i = cuda.grid(1)
    if i < k_ * f_:
        k = i // f_
        f = i - k * f_
        acc = float32(0.0)
        for n in range(n_):  # the batch in order: deterministic
            acc -= 2 * dout[n * k_ + k] * (x[n * f_ + f] - centres[i])
        dc[i] = acc


def rbf_forward(x, centres, out):
    """LeNet-5 Euclidean RBF units: out[n, k] = sum_f (x[n, f] - centres[k, f])^2."""
    n, f = x.shape
    k = centres.shape[0]
    if centres.shape[1] != f:
        raise ValueError(f"centres {centres.shape} do not match x {x.shape}")
    check_shape("out", out, (n, k))
    _rbf_fwd[blocks(n * k), THREADS](flat(x), flat(centres), n, k, f, flat(out))


def rbf_backward(x, centres, dout, dx, dcentres):
    """dx and dcentres (either may be None) are overwritten."""
    n, f = x.shape
    k = centres.shape[0]
    check_shape("dout", dout, (n, k))
    if dx is not None:
        check_shape("dx", dx, x.shape)
        _rbf_dx[blocks(n * f), THREADS](flat(x), flat(centres), flat(dout), n, k, f, flat(dx))
    if dcentres is not None:
        check_shape("dcentres", dcentres, centres.shape)
        _rbf_dc[blocks(k * f), THREADS](flat(x), flat(centres), flat(dout), n, k, f, flat(dcentres))


@jit_kernel
def _negate(x, out):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = -x[i]


def negate(x, out):
    """out = -x (RBF distances as logits and back; out may be x)."""
    check_shape("out", out, x.shape)
    _negate[blocks(out.size), THREADS](flat(x), flat(out))
