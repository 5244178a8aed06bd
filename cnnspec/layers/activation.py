"""Activations. Elementwise ones keep shape and receptive field; PReLU learns
its slope (shared or per channel); maxout takes the max over channel groups."""

from __future__ import annotations

import numpy as np

from ..errors import LayerError
from .base import Layer, ParamDef, register


def _kernels():
    from ..kernels.cpu import activation

    return activation


class _Elementwise(Layer):
    defaults: dict = {}
    # activation family, used to pick the initialisation of the layer before it
    family = "linear"

    def setup(self, a, in_shapes):
        self.attrs = {k: a.get(k, v) for k, v in self.defaults.items()}
        return in_shapes[0]

    def forward(self, xs, out, p, train, rng):
        fwd = getattr(_kernels(), self.type_name + "_forward")
        fwd(xs[0].reshape(-1), *self.attrs.values(), out.reshape(-1))

    def backward(self, xs, out, dout, dxs, p, g):
        getattr(_kernels(), self.type_name + "_backward")(
            *self._saved(xs[0].reshape(-1), out.reshape(-1)),
            *self.attrs.values(),
            dout.reshape(-1),
            dxs[0].reshape(-1),
        )

    def _saved(self, x, y):
        return (x,)


@register
class ReLU(_Elementwise):
    type_name = "relu"
    family = "relu"


@register
class LeakyReLU(_Elementwise):
    type_name = "leaky_relu"
    defaults = {"alpha": 0.01}
    family = "relu"


@register
class ELU(_Elementwise):
    type_name = "elu"
    defaults = {"alpha": 1.0}
    family = "relu"

    def _saved(self, x, y):
        return (x, y)


class _FromOutput(_Elementwise):
    family = "tanh"

    def _saved(self, x, y):
        return (y,)


@register
class Sigmoid(_FromOutput):
    type_name = "sigmoid"


@register
class Tanh(_FromOutput):
    type_name = "tanh"


@register
class ScaledTanh(_FromOutput):
    """LeCun's 1.7159 * tanh(2x/3)."""

    type_name = "scaled_tanh"


@register
class RReLU(Layer):
    """Randomised leaky ReLU: slope ~ U(lower, upper) in training, their mean in eval."""

    type_name = "rrelu"
    family = "relu"

    def setup(self, a, in_shapes):
        lower, upper = a.get("lower", 1 / 8), a.get("upper", 1 / 3)
        if lower > upper:
            raise LayerError(f"'lower' ({lower}) must not exceed 'upper' ({upper})", "lower")
        self.attrs = {"lower": lower, "upper": upper}
        return in_shapes[0]

    def allocate(self, batch, dtype=np.float32):
        self.slopes = np.zeros(batch * int(np.prod(self.out_shape)), dtype)

    def forward(self, xs, out, p, train, rng):
        lo, hi = self.attrs["lower"], self.attrs["upper"]
        if train:
            rng.random(out=self.slopes, dtype=self.slopes.dtype)
            self.slopes *= hi - lo
            self.slopes += lo
        else:
            self.slopes.fill((lo + hi) / 2)
        _kernels().rrelu_forward(xs[0].reshape(-1), self.slopes, out.reshape(-1))

    def backward(self, xs, out, dout, dxs, p, g):
        _kernels().rrelu_backward(
            xs[0].reshape(-1), self.slopes, dout.reshape(-1), dxs[0].reshape(-1)
        )


@register
class PReLU(Layer):
    type_name = "prelu"
    family = "relu"

    def setup(self, a, in_shapes):
        self.attrs = {"shared": a.get("shared", False), "init": a.get("init", 0.25)}
        return in_shapes[0]

    def param_defs(self):
        n = 1 if self.attrs["shared"] else self.in_shapes[0][0]
        return [ParamDef("weight", (n,), True, f"const:{self.attrs['init']}")]

    def forward(self, xs, out, p, train, rng):
        _kernels().prelu_forward(xs[0], p["weight"], out)

    def backward(self, xs, out, dout, dxs, p, g):
        _kernels().prelu_backward(xs[0], p["weight"], dout, dxs[0], g["weight"])


@register
class Maxout(Layer):
    type_name = "maxout"
    family = "relu"

    def setup(self, a, in_shapes):
        c = in_shapes[0][0]
        k = a["pieces"]
        if c % k:
            raise LayerError(
                f"pieces ({k}) must divide the input channels ({c})",
                "pieces",
                f"{c} / {k} = {c / k:g}",
            )
        self.attrs = {"pieces": k}
        return (c // k, *in_shapes[0][1:])

    def allocate(self, batch, dtype=np.float32):
        self.argmax = np.zeros((batch, *self.out_shape), np.int32)

    def forward(self, xs, out, p, train, rng):
        _kernels().maxout_forward(xs[0], self.attrs["pieces"], out, self.argmax)

    def backward(self, xs, out, dout, dxs, p, g):
        _kernels().maxout_backward(dout, self.argmax, dxs[0])
