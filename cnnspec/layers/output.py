"""Output layers: they end the network and define its loss. softmax (cross-
entropy on its input logits), linear (mean squared error), rbf (LeNet-5's
Euclidean RBF units; the loss treats negative distances as logits)."""

from __future__ import annotations

import numpy as np

from . import attrs as A
from .base import Layer, ParamDef, flat_size, register

LOSS_WEIGHT = A.number("loss_weight", 1.0, "weight of this head's loss in the total")


class _Output(Layer):
    role = "output"
    loss_name = "cross_entropy"
    attributes = (LOSS_WEIGHT,)
    # the loss writes the output the forward would (a training pass skips the forward)
    loss_writes_output = False

    def setup(self, a, in_shapes):
        self.attrs = {"loss_weight": a["loss_weight"]}
        return (flat_size(in_shapes[0]),)

    def scores(self, xs, out):
        """Higher = more likely, for accuracy, losses of evaluation, predictions."""
        return out

    def allocate(self, batch, dtype=np.float32):
        self.dlogits = self.backend.zeros((batch, self.out_shape[0]), dtype)

    def loss(self, xs, out, target) -> float:
        """Loss of this head; leaves d(loss)/d(input) in self.dlogits (weighted)."""
        raise NotImplementedError

    def backward(self, xs, out, dout, dxs, p, g):
        if dxs[0] is not None:
            dxs[0][...] = self.dlogits.reshape(dxs[0].shape)


@register
class Softmax(_Output):
    """Output: softmax over its input logits, trained with cross-entropy.

    Shape: any -> [flattened size]. Receptive field: unchanged.
    """

    type_name = "softmax"
    loss_writes_output = True  # softmax_loss leaves the probabilities in `out`

    def scores(self, xs, out):
        return xs[0].reshape(out.shape)  # the logits: softmax(logits) = out

    def forward(self, xs, out, p, train, rng):
        self.kernels.softmax_forward(xs[0].reshape(out.shape), out)

    def loss(self, xs, out, target):
        logits = xs[0].reshape(out.shape)
        return self.kernels.softmax_loss(
            logits, target, out, self.dlogits, self.attrs["loss_weight"]
        )


@register
class Linear(_Output):
    """Output: identity, trained with mean squared error (regression).

    Shape: any -> [flattened size]. Receptive field: unchanged.
    """

    type_name = "linear"
    loss_name = "mse"

    def forward(self, xs, out, p, train, rng):
        out[...] = xs[0].reshape(out.shape)

    def loss(self, xs, out, target):
        return self.kernels.linear_loss(out, target, self.dlogits, self.attrs["loss_weight"])


@register
class RBF(_Output):
    """Output: LeNet-5's Euclidean RBF units (distance to a centre per class; nearest wins).

    y_k = sum_j (x_j - w_kj)^2. Shape: any -> [units]. Receptive field: unchanged.
    """

    type_name = "rbf"
    attributes = (
        A.integer("units", doc="classes (one centre each)"),
        A.boolean("trainable", False, "learn the centres (false: fixed +-1 codes)"),
        LOSS_WEIGHT,
    )

    def setup(self, a, in_shapes):
        self.attrs = {name: a[name] for name in ("units", "trainable", "loss_weight")}
        return (a["units"],)

    def param_defs(self):
        n_in = flat_size(self.in_shapes[0])
        # LeCun's centres are +-1 codes; random +-1 codes play that part here.
        return [ParamDef("weight", (self.attrs["units"], n_in), self.attrs["trainable"], "sign")]

    def scores(self, xs, out):
        self.kernels.negate(out, self.neg)
        return self.neg

    def allocate(self, batch, dtype=np.float32):
        super().allocate(batch, dtype)
        self.probs = self.backend.zeros((batch, self.out_shape[0]), dtype)
        self.dscores = self.backend.zeros((batch, self.out_shape[0]), dtype)
        self.neg = self.backend.zeros((batch, self.out_shape[0]), dtype)  # the logits

    def forward(self, xs, out, p, train, rng):
        self.kernels.rbf_forward(xs[0].reshape(xs[0].shape[0], -1), p["weight"], out)

    def loss(self, xs, out, target):
        value = self.kernels.softmax_loss(
            self.scores(xs, out), target, self.probs, self.dscores, self.attrs["loss_weight"]
        )
        self.kernels.negate(self.dscores, self.dscores)  # d loss / d distance
        return value

    def backward(self, xs, out, dout, dxs, p, g):
        x = xs[0].reshape(xs[0].shape[0], -1)
        dx = None if dxs[0] is None else dxs[0].reshape(x.shape)
        self.kernels.rbf_backward(x, p["weight"], self.dscores, dx, g.get("weight"))
