"""The SGD update on the device: torch.optim.SGD's rule (dampening 0), over the model's
one flat parameter array, in one launch per step.

    g = grad + weight_decay * p
    b = g                       on the first step (momentum > 0)
    b = momentum * b + g        afterwards
    g = g + momentum * b        with nesterov, else g = b
    p = p - lr * g
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32

from ._common import THREADS, blocks, jit_kernel

__all__ = ["sgd_update", "DeviceSGD"]


@jit_kernel
def _sgd(p, grad, buf, lr, momentum, weight_decay, nesterov, first):
    i = cuda.grid(1)
    if i < p.size:
        g = grad[i]
        if weight_decay != 0:
            g += float32(weight_decay) * p[i]
        if momentum != 0:
            b = g if first else float32(momentum) * buf[i] + g
            buf[i] = b
            g = g + float32(momentum) * b if nesterov else b
        p[i] -= float32(lr) * g


def sgd_update(p, grad, buf, lr, momentum, weight_decay, nesterov, first):
    """One update of flat float32 device arrays p (in place) and the momentum buffer."""
    if p.size:
        _sgd[blocks(p.size), THREADS](
            p, grad, buf, float(lr), float(momentum), float(weight_decay), bool(nesterov),
            bool(first),
        )  # fmt: skip


class DeviceSGD:
    """train.optim.SGD's interface over a compiled model's flat parameter and gradient
    arrays: one launch per step, the momentum buffer on the device. Its state_dict has
    the same per-parameter entries as the CPU optimizer's (host copies), so checkpoints
    move between devices."""

    def __init__(self, model, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.model = model
        self.lr, self.momentum, self.nesterov = float(lr), float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self.started = False  # the momentum buffer holds a value (after the first step)
        p = model.flat_params
        # without momentum a one-element stand-in the kernel never touches
        self.buffer = model.backend.zeros(p.size if momentum else 1, p.dtype)
        # where each trainable parameter lies in the flat arrays, in the model's order
        self.slices, at = {}, 0
        for key, (_info, d) in model.defs.items():
            if d.trainable:
                size = int(np.prod(d.shape))
                self.slices[key] = (at, at + size, d.shape)
                at += size

    def configure(self, momentum, nesterov, weight_decay) -> None:
        """Change the hyperparameters between steps, keeping a started momentum buffer
        (as train.optim.SGD and torch.optim.SGD do)."""
        if momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        p = self.model.flat_params
        if momentum and self.buffer.size != p.size:
            self.buffer = self.model.backend.zeros(p.size, p.dtype)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)

    def step(self, grads, lr=None) -> None:
        if grads is not self.model.grads:
            raise ValueError("the device optimizer updates from the model's own gradients")
        lr = self.lr if lr is None else float(lr)
        m = self.model
        sgd_update(
            m.flat_params, m.flat_grads, self.buffer, lr, self.momentum, self.weight_decay,
            self.nesterov, not self.started,
        )  # fmt: skip
        self.started = self.started or bool(self.momentum)
        self.steps += 1

    def state_dict(self) -> dict:
        state = {"steps": np.array(self.steps, np.int64)}
        if self.started:
            host = self.buffer.copy_to_host()
            for key, (a, b, shape) in self.slices.items():
                state[f"momentum_buffer/{key}"] = host[a:b].reshape(shape)
        return state

    def load_state_dict(self, state) -> None:
        expected = {f"momentum_buffer/{k}" for k in self.slices} if self.momentum else set()
        unknown = set(state) - expected - {"steps"}
        if unknown:
            raise ValueError(
                f"optimizer state has entries for unknown parameters: {sorted(unknown)}"
            )
        saved = {k: state.get(f"momentum_buffer/{k}") for k in self.slices}
        for key, value in saved.items():
            if value is not None and value.shape != self.slices[key][2]:
                raise ValueError(
                    f"momentum buffer {key!r}: shape {value.shape} != {self.slices[key][2]}"
                )
        present = [v is not None for v in saved.values()]
        if self.momentum and any(present) and not all(present):
            raise ValueError("the device optimizer needs every momentum buffer or none")
        self.steps = int(state["steps"])
        self.started = bool(self.momentum) and all(present) and bool(present)
        if self.started:
            host = np.empty(self.buffer.size, self.buffer.dtype)
            for key, (a, b, _shape) in self.slices.items():
                host[a:b] = saved[key].reshape(-1)
            self.buffer.copy_to_device(host)
