"""Stochastic gradient descent with the exact update rule of ``torch.optim.SGD`` (dampening 0).

    g = grad + weight_decay * p
    b = g                       on a parameter's first step (momentum > 0)
    b = momentum * b + g        afterwards
    g = g + momentum * b        with nesterov, else g = b
    p = p - lr * g

Parameters are updated in place (they are the model's own storage) and every buffer is
allocated once, in the constructor. The update is one kernel pass (kernels/cpu/optim.py),
which flushes subnormal momentum entries and steps to zero: torch's values under
``torch.set_flush_denormal(True)``, a subnormal costing ~100 cycles an operation otherwise.
"""

from __future__ import annotations

from functools import cache

import numpy as np


@cache
def _kernels():
    """(sgd_update, governed), imported on first use (they load Numba)."""
    from ..kernels.cpu.optim import sgd_update
    from ..kernels.cpu.threads import governed

    return sgd_update, governed


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
            if not p.flags.c_contiguous:
                raise ValueError(
                    f"parameter {name!r} must be C-contiguous (it is updated in place)"
                )
        self.params = params
        self.lr = float(lr)
        self.steps = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._has_buffer = dict.fromkeys(params, False)
        self.configure(momentum, nesterov, weight_decay)
        # Scratch arrays per dtype for the update's numpy passes (a first run's, while its
        # kernel compiles), as large as the largest parameter: the update never allocates.
        sizes: dict[np.dtype, int] = {}
        for p in params.values():
            sizes[p.dtype] = max(sizes.get(p.dtype, 0), p.size)
        self._scratch = {
            dt: (np.empty(n, dt), np.empty(n, dt), np.empty(n, bool)) for dt, n in sizes.items()
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
            self._buffers = self._new_buffers()

    def _new_buffers(self) -> dict[str, np.ndarray]:
        """Zeroed momentum buffers by parameter name (made when momentum is first set)."""
        return {k: np.zeros_like(p) for k, p in self.params.items()}

    def step(self, grads: dict[str, np.ndarray], lr: float | None = None) -> None:
        """Apply one update to every parameter that has a gradient in ``grads``."""
        lr = self.lr if lr is None else float(lr)
        for name, grad in grads.items():
            p = self.params[name]  # KeyError for a gradient of an unknown parameter
            if grad.shape != p.shape:
                raise ValueError(f"gradient of {name!r}: shape {grad.shape} != {p.shape}")
            buf = self._buffers[name] if self.momentum else None
            self._update(p, grad, buf, not self._has_buffer[name], lr)
            if self.momentum:
                self._has_buffer[name] = True
        self.steps += 1

    def _update(self, p, grad, buf, first, lr) -> None:
        """The rule on arrays of one shape, p in place; buf is the momentum buffer (None
        without momentum), started afresh when `first` (kernels/cpu/optim.py), on the
        threads the model's kernels get (fewer beside busy processes: threads.py)."""
        sgd_update, governed = _kernels()
        grad = np.ascontiguousarray(grad, p.dtype).reshape(-1)
        buf = None if buf is None else buf.reshape(-1)
        settings = (self.momentum, self.weight_decay, self.nesterov, first)
        with governed():
            sgd_update(p.reshape(-1), grad, buf, lr, *settings, self._scratch[p.dtype])

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


class FlatSGD(SGD):
    """SGD over a compiled model, whose parameters and gradients are views of one flat
    array each (``model.flat_params``, ``model.flat_grads``): its own gradients (what
    ``loss_and_grads`` returns) update in one kernel call over those arrays, instead of
    one a parameter; other gradients take SGD's path. The same operations on the same
    values, so the same bits. The momentum buffers are views of one flat array laid out
    as the parameters, so the state_dict is SGD's. LeNet-5 (61,706 parameters in 10
    arrays, momentum and weight decay): 0.056 -> 0.032 ms a step as numpy passes over the
    flat arrays (1 thread, AMD EPYC Zen 5), 0.041 -> 0.023 as one kernel call (Intel
    Xeon model 207)."""

    def __init__(self, model, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        self._flat = model.flat_params, model.flat_grads
        self._model_grads = model.grads
        self._flat_buffer = None  # made with the momentum buffers
        params = {k: model.params[k] for k in sorted(model.trainable)}
        super().__init__(params, lr, momentum, nesterov, weight_decay)

    def _new_buffers(self) -> dict[str, np.ndarray]:
        flat = self._flat[0]
        self._flat_buffer = np.zeros_like(flat)
        start = flat.__array_interface__["data"][0]
        views = {}
        for name, p in self.params.items():
            at = (p.__array_interface__["data"][0] - start) // flat.itemsize
            views[name] = self._flat_buffer[at : at + p.size].reshape(p.shape)
        return views

    def step(self, grads, lr=None) -> None:
        started = self._has_buffer.values()
        some = any(started)
        if grads is not self._model_grads or (self.momentum and some and not all(started)):
            super().step(grads, lr)  # not the model's, or a partial momentum state loaded
            return
        lr = self.lr if lr is None else float(lr)
        p, g = self._flat
        if p.size:
            self._update(p, g, self._flat_buffer if self.momentum else None, not some, lr)
        if self.momentum:
            self._has_buffer = dict.fromkeys(self._has_buffer, True)
        self.steps += 1
