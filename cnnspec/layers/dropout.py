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
        self.draw = np.zeros((batch, *self.out_shape), dtype)  # the host's draw

    def forward(self, xs, out, p, train, rng):
        rate = self.attrs["rate"]
        if train and rate > 0:
            # drawn on the host, so every device drops the same units for a seed
            rng.random(out=self.draw, dtype=self.draw.dtype)
            # mask holds 0 or 1/(1-rate): one multiply forward, one backward
            np.greater_equal(self.draw, rate, out=self.draw)
            self.draw *= 1.0 / (1.0 - rate)
        else:
            self.draw.fill(1.0)
        self.backend.to_device(self.draw, self.mask)
        self.kernels.dropout_apply(xs[0], self.mask, out)

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.dropout_apply(dout, self.mask, dxs[0])
