"""Activations. Elementwise ones keep shape and receptive field; PReLU learns
its slope (shared or per channel); maxout takes the max over channel groups."""

from __future__ import annotations

import numpy as np

from ..errors import LayerError
from . import attrs as A
from .base import Layer, ParamDef, register

SAME_SHAPE = """

    Shape: unchanged. Receptive field: unchanged.
    """


class _Elementwise(Layer):
    family = "linear"

    def setup(self, a, in_shapes):
        self.attrs = {attr.name: a[attr.name] for attr in self.attributes}
        return in_shapes[0]

    def forward(self, xs, out, p, train, rng):
        fwd = getattr(self.kernels, self.type_name + "_forward")
        fwd(xs[0].reshape(-1), *self.attrs.values(), out.reshape(-1))

    def backward(self, xs, out, dout, dxs, p, g):
        getattr(self.kernels, self.type_name + "_backward")(
            *self._saved(xs[0].reshape(-1), out.reshape(-1)),
            *self.attrs.values(),
            dout.reshape(-1),
            dxs[0].reshape(-1),
        )

    def _saved(self, x, y):
        return (x,)


@register
class ReLU(_Elementwise):
    __doc__ = "max(0, x)." + SAME_SHAPE
    type_name = "relu"
    family = "relu"


@register
class LeakyReLU(_Elementwise):
    __doc__ = "x if x > 0 else alpha*x." + SAME_SHAPE
    type_name = "leaky_relu"
    attributes = (A.number("alpha", 0.01, "slope for x < 0"),)
    family = "relu"


@register
class ELU(_Elementwise):
    __doc__ = "x if x > 0 else alpha*(exp(x)-1)." + SAME_SHAPE
    type_name = "elu"
    attributes = (A.number("alpha", 1.0, "value approached as x -> -inf is -alpha"),)
    family = "relu"

    def _saved(self, x, y):
        return (x, y)


class _FromOutput(_Elementwise):
    family = "tanh"

    def _saved(self, x, y):
        return (y,)


@register
class Sigmoid(_FromOutput):
    __doc__ = "1 / (1 + exp(-x))." + SAME_SHAPE
    type_name = "sigmoid"


@register
class Tanh(_FromOutput):
    __doc__ = "tanh(x)." + SAME_SHAPE
    type_name = "tanh"


@register
class ScaledTanh(_FromOutput):
    __doc__ = "LeCun's 1.7159 * tanh(2x/3)." + SAME_SHAPE
    type_name = "scaled_tanh"
    family = "lecun"


@register
class RReLU(Layer):
    __doc__ = (
        "Randomised leaky ReLU: slope ~ U(lower, upper) in training, the mean in evaluation."
        + SAME_SHAPE
    )
    type_name = "rrelu"
    family = "relu"
    attributes = (
        A.number("lower", 1 / 8, "smallest slope", shown_default="1/8"),
        A.number("upper", 1 / 3, "largest slope", shown_default="1/3"),
    )

    def setup(self, a, in_shapes):
        lower, upper = a["lower"], a["upper"]
        if lower > upper:
            raise LayerError(f"'lower' ({lower}) must not exceed 'upper' ({upper})", "lower")
        self.attrs = {"lower": lower, "upper": upper}
        return in_shapes[0]

    def allocate(self, batch, dtype=np.float32):
        self.slopes = self.backend.zeros(batch * int(np.prod(self.out_shape)), dtype)
        self.draw = np.zeros(self.slopes.shape, dtype)  # drawn on the host, as dropout's

    def forward(self, xs, out, p, train, rng):
        lo, hi = self.attrs["lower"], self.attrs["upper"]
        if train:
            rng.random(out=self.draw, dtype=self.draw.dtype)
            self.draw *= hi - lo
            self.draw += lo
        else:
            self.draw.fill((lo + hi) / 2)
        self.backend.to_device(self.draw, self.slopes)
        self.kernels.rrelu_forward(xs[0].reshape(-1), self.slopes, out.reshape(-1))

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.rrelu_backward(
            xs[0].reshape(-1), self.slopes, dout.reshape(-1), dxs[0].reshape(-1)
        )


@register
class PReLU(Layer):
    __doc__ = "Leaky ReLU with a learned slope, shared or per channel." + SAME_SHAPE
    type_name = "prelu"
    family = "relu"
    attributes = (
        A.boolean("shared", False, "one slope for all channels (false: one per channel)"),
        A.number("init", 0.25, "initial slope"),
    )

    def setup(self, a, in_shapes):
        self.attrs = {"shared": a["shared"], "init": a["init"]}
        return in_shapes[0]

    def param_defs(self):
        n = 1 if self.attrs["shared"] else self.in_shapes[0][0]
        return [ParamDef("weight", (n,), True, f"const:{self.attrs['init']}")]

    def forward(self, xs, out, p, train, rng):
        self.kernels.prelu_forward(xs[0], p["weight"], out)

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.prelu_backward(xs[0], p["weight"], dout, dxs[0], g["weight"])


@register
class Maxout(Layer):
    """Max over groups of `pieces` consecutive channels.

    Shape: [C, ...] -> [C/pieces, ...]. Receptive field: unchanged.
    """

    type_name = "maxout"
    family = "relu"
    attributes = (A.integer("pieces", doc="channels per group"),)

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
        self.argmax = self.backend.zeros((batch, *self.out_shape), np.int32)

    def forward(self, xs, out, p, train, rng):
        self.kernels.maxout_forward(xs[0], self.attrs["pieces"], out, self.argmax)

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.maxout_backward(dout, self.argmax, dxs[0])
