"""Inverted dropout: scale kept units by 1/(1-rate) in training, identity in eval."""

from __future__ import annotations

import numpy as np

from . import attrs as A
from .base import Layer, register


@register
class Dropout(Layer):
    """Inverted dropout.

    Shape: unchanged. Receptive field: unchanged.
    """

    type_name = "dropout"
    transparent_to_init = True
    attributes = (
        A.number(
            "rate", 0.5, "fraction of units zeroed in training", minimum=0, exclusiveMaximum=1
        ),
    )

    def setup(self, a, in_shapes):
        self.attrs = {"rate": a["rate"]}
        return in_shapes[0]

    def allocate(self, batch, dtype=np.float32):
        self.mask = self.backend.zeros((batch, *self.out_shape), dtype)

    def forward(self, xs, out, p, train, rng):
        rate = self.attrs["rate"]
        if train and rate > 0:
            rng.random(out=self.mask, dtype=self.mask.dtype)
            # mask holds 0 or 1/(1-rate): one multiply forward, one backward
            np.greater_equal(self.mask, rate, out=self.mask)
            self.mask *= 1.0 / (1.0 - rate)
        else:
            self.mask.fill(1.0)
        np.multiply(xs[0], self.mask, out=out)

    def backward(self, xs, out, dout, dxs, p, g):
        np.multiply(dout, self.mask, out=dxs[0])
