"""Stochastic gradient descent with the exact update rule of ``torch.optim.SGD`` (dampening 0).

    g = grad + weight_decay * p
    b = g                       on a parameter's first step (momentum > 0)
    b = momentum * b + g        afterwards
    g = g + momentum * b        with nesterov, else g = b
    p = p - lr * g

Parameters are updated in place (they are the model's own storage) and every buffer is
allocated once, in the constructor.
"""

from __future__ import annotations

import numpy as np


class SGD:
    def __init__(
        self,
        params: dict[str, np.ndarray],
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        for name, p in params.items():
            if not (isinstance(p, np.ndarray) and np.issubdtype(p.dtype, np.floating)):
                raise ValueError(f"parameter {name!r} must be a floating-point numpy array")
        self.params = params
        self.lr = float(lr)
        self.steps = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._has_buffer = dict.fromkeys(params, False)
        self.configure(momentum, nesterov, weight_decay)
        # Two scratch arrays per dtype, as large as the largest parameter, shared by all
        # parameters through per-parameter views: the update never allocates.
        sizes: dict[np.dtype, int] = {}
        for p in params.values():
            sizes[p.dtype] = max(sizes.get(p.dtype, 0), p.size)
        flat = {dt: (np.empty(n, dt), np.empty(n, dt)) for dt, n in sizes.items()}
        self._scratch = {
            k: tuple(buf[: p.size].reshape(p.shape) for buf in flat[p.dtype])
            for k, p in params.items()
        }

    def configure(self, momentum: float, nesterov: bool, weight_decay: float) -> None:
        """Change the hyperparameters between steps; momentum buffers already started are
        kept (as torch.optim.SGD keeps its state when a param group changes)."""
        if momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be non-negative")
        if nesterov and momentum == 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.weight_decay = float(weight_decay)
        if momentum and not self._buffers:
            self._buffers = {k: np.zeros_like(p) for k, p in self.params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Apply one update to every parameter that has a gradient in ``grads``."""
        lr = self.lr if lr is None else float(lr)
        for name, grad in grads.items():
            p = self.params[name]  # KeyError for a gradient of an unknown parameter
            a, b = self._scratch[name]
            d = grad
            if self.weight_decay:
                np.multiply(p, self.weight_decay, out=a)
                a += grad
                d = a
            if self.momentum:
                buf = self._buffers[name]
                if self._has_buffer[name]:
                    buf *= self.momentum
                    buf += d
                else:
                    np.copyto(buf, d)
                    self._has_buffer[name] = True
                if self.nesterov:
                    np.multiply(buf, self.momentum, out=b)
                    b += d
                    d = b
                else:
                    d = buf
            # p -= lr * d, through a scratch array that is not d's storage.
            tmp = a if d is not a else b
            np.multiply(d, lr, out=tmp)
            p -= tmp
        self.steps += 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the momentum buffers (only those already started) and the step count."""
        state = {"steps": np.array(self.steps, np.int64)}
        for name, buf in self._buffers.items():
            if self._has_buffer[name]:
                state[f"momentum_buffer/{name}"] = buf.copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        expected = {f"momentum_buffer/{k}" for k in self._buffers} | {"steps"}
        unknown = set(state) - expected
        if unknown:
            raise ValueError(
                f"optimizer state has entries for unknown parameters: {sorted(unknown)}"
            )
        for name, buf in self._buffers.items():
            saved = state.get(f"momentum_buffer/{name}")
            if saved is not None and saved.shape != buf.shape:
                raise ValueError(f"momentum buffer {name!r}: shape {saved.shape} != {buf.shape}")
        self.steps = int(state["steps"])
        for name, buf in self._buffers.items():
            saved = state.get(f"momentum_buffer/{name}")
            self._has_buffer[name] = saved is not None
            if saved is not None:
                np.copyto(buf, saved)
