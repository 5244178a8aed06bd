"""Fully connected layers and flatten. A dense layer on a [C, H, W] input
flattens it implicitly (as Caffe's InnerProduct does)."""

from __future__ import annotations

from . import attrs as A
from .base import Layer, ParamDef, flat_size, register
from .pool import covers_input


@register
class Flatten(Layer):
    """Flatten a [C, H, W] input into one vector.

    Shape: [C, H, W] -> [C*H*W].
    Receptive field: every unit sees the whole input (size + (H-1)*jump, ...).
    """

    type_name = "flatten"
    transparent_to_init = True

    def setup(self, a, in_shapes):
        return (flat_size(in_shapes[0]),)

    def receptive_field(self, fields):
        return covers_input(fields, self.in_shapes[0])

    def forward(self, xs, out, p, train, rng):
        out[...] = xs[0].reshape(out.shape)

    def backward(self, xs, out, dout, dxs, p, g):
        if dxs[0] is not None:
            dxs[0][...] = dout.reshape(dxs[0].shape)


@register
class Dense(Layer):
    """Fully connected layer (flattens a [C, H, W] input implicitly); weight [out, in].

    Shape: any -> [units]. Receptive field: the whole input, as flatten.
    """

    type_name = "dense"
    aliases = ("fc",)
    attributes = (
        A.integer("units", doc="outputs"),
        A.boolean("bias", True, "add a learned bias per unit"),
    )

    def setup(self, a, in_shapes):
        self.attrs = {"units": a["units"], "bias": a["bias"]}
        return (a["units"],)

    def param_defs(self):
        n_in, n_out = flat_size(self.in_shapes[0]), self.attrs["units"]
        defs = [ParamDef("weight", (n_out, n_in), True, "auto", n_in, n_out)]
        if self.attrs["bias"]:
            defs.append(ParamDef("bias", (n_out,)))
        return defs

    def macs(self):
        return flat_size(self.in_shapes[0]) * self.attrs["units"]

    def receptive_field(self, fields):
        return covers_input(fields, self.in_shapes[0])

    fusable = True

    def forward(self, xs, out, p, train, rng):
        x = xs[0].reshape(xs[0].shape[0], -1)
        self.kernels.dense_forward(x, p["weight"], p.get("bias"), out, self.fused_act)

    def backward(self, xs, out, dout, dxs, p, g):
        x = xs[0].reshape(xs[0].shape[0], -1)
        dx = None if dxs[0] is None else dxs[0].reshape(x.shape)
        self.kernels.dense_backward(
            x, p["weight"], dout, dx, g["weight"], g.get("bias"), out, self.fused_act
        )
