"""The SGD update on the CPU: torch.optim.SGD's rule (dampening 0, train/optim.py) in one
pass over the parameters, their gradients and the momentum buffers, for train.optim's
SGD and FlatSGD.

    g = grad + weight_decay * p
    b = g                       on a parameter's first step (momentum > 0)
    b = momentum * b + g        afterwards
    g = g + momentum * b        with nesterov, else g = b
    p = p - lr * g

Subnormals flushed: a momentum entry smaller in magnitude than the dtype's smallest normal
number is stored as 0, and a step lr * g that would be one (|g| < tiny / lr) is not
taken. A parameter whose gradient is exactly 0 (a dead ReLU unit's weights, without
weight decay) has a momentum entry that decays by `momentum` a step, through ~150 steps of
subnormals at 0.9, and on x86 each operation on a subnormal costs ~100 cycles: LeNet-5
b64 on random data held 6,174 subnormal entries after 1,000 steps (its SGD step 166 us
instead of 41; VGG-small's 27 ms of a 160 ms step, 2.0M of its 2.4M entries). Such an
entry moves no parameter larger than ~1e-30 (float32) by a bit, and torch with
``torch.set_flush_denormal(True)`` gives the same values; otherwise the same operations
in the same order as torch's (no fused multiply-adds): the same bits.

One pass where numpy took six (LeNet-5's 61,706 parameters: an SGD step 41 -> 23 us, 17
of them in the kernel, 1 thread; 2.36M parameters 1.1 ms, 0.56 at 2 threads); while a
first run compiles it in the background, numpy stands in (the same bits).
"""

from __future__ import annotations

from functools import cache

import numpy as np
from numba import prange

from ._common import SplitBySize

__all__ = ["sgd_update"]


@SplitBySize
def _sgd(p, grad, buf, lr, momentum, weight_decay, nesterov, first, tiny, floor):
    zero = p.dtype.type(0)
    for i in prange(p.size):
        d = grad[i]
        if weight_decay != 0:
            d = p[i] * weight_decay + d
        if momentum != 0:
            b = d if first else buf[i] * momentum + d
            b = zero if abs(b) < tiny else b  # (NaN kept: NaN < tiny is False)
            buf[i] = b
            d = b * momentum + d if nesterov else b
        d = zero if abs(d) < floor else d  # (lr * 0 is no subnormal)
        p[i] = p[i] - d * lr


def _sgd_numpy(p, grad, buf, lr, momentum, weight_decay, nesterov, first, tiny, floor, scratch):
    """_sgd's stand-in: the same operations as numpy passes, through the flat scratch
    arrays (a, b of p's dtype, mask of bools) in chunks of their size."""
    size = scratch[0].size
    for at in range(0, p.size, size):
        part = slice(at, at + size)
        a, b, mask = (s[: min(size, p.size - at)] for s in scratch)
        d = grad[part]
        if weight_decay != 0:
            np.multiply(p[part], weight_decay, out=a)
            a += d
            d = a
        if momentum != 0:
            m = buf[part]
            if first:
                np.copyto(m, d)
            else:
                m *= momentum
                m += d
            np.less(np.abs(m, out=b), tiny, out=mask)
            np.copyto(m, 0, where=mask)
            if nesterov:
                np.multiply(m, momentum, out=b)
                b += d
                d = b
            else:
                d = m
        step = a if d is not a else b  # p -= lr * d, through a scratch array not d's
        np.less(np.abs(d, out=step), floor, out=mask)
        np.multiply(d, lr, out=step)
        np.copyto(step, 0, where=mask)
        p[part] -= step


@cache
def _limits(dtype) -> tuple:
    """The smallest normal and the largest finite value of a float dtype (its scalars)."""
    info = np.finfo(dtype)
    return info.tiny, info.max


def sgd_update(p, grad, buf, lr, momentum, weight_decay, nesterov, first, scratch=None):
    """One update of the 1-D contiguous arrays p (in place) and buf (the momentum buffer,
    None without momentum; started afresh when `first`) from grad. `scratch` = (a, b,
    mask): 1-D arrays of p's dtype (two) and of bools, of any one size, for numpy's passes
    on a first run (None: allocated then)."""
    t = p.dtype.type
    tiny, largest = _limits(p.dtype)
    # |g| below this: lr * g would be subnormal (inf for lr 0: every step 0, as lr * g)
    floor = t(min(tiny / lr, largest)) if lr > 0 else t(np.inf)
    args = (p, grad, p if buf is None else buf, t(lr), t(momentum), t(weight_decay))
    args += (bool(nesterov), bool(first), t(tiny), floor)

    def stand_in(*a):
        n, dt = p.size, p.dtype
        s = scratch or (np.empty(n, dt), np.empty(n, dt), np.empty(n, bool))
        _sgd_numpy(*a, s)

    _sgd.or_stand_in(stand_in, *args)
