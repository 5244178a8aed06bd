"""Upsampling by an integer factor: nearest neighbour and bilinear."""

from __future__ import annotations

import numpy as np

from . import attrs as A
from .base import Layer, pair, register, spatial


@register
class Upsample2d(Layer):
    """Upsample each map by an integer factor per axis: nearest or bilinear.

    Shape: [C, H, W] -> [C, H*s_h, W*s_w]. Bilinear follows PyTorch's
    align_corners=False: output o samples x = (o + 1/2)/s - 1/2 (at least 0) from
    the inputs floor(x) and floor(x) + 1.
    Receptive field: output o reads inputs in [(o - b)/s, (o + a)/s], reaching each end at
    some o: nearest reads floor(o/s) (b = s - 1, a = 0); bilinear floor(x) and, when its
    weight is not 0, floor(x) + 1 (b = floor(3s/2) - 1, a = floor(s/2)). So size +
    (a + b)*jump/s, jump/s, start - b*jump/s, exact fractions (see `Field`).
    """

    type_name = "upsample2d"
    aliases = ("upsample",)
    transparent_to_init = True
    attributes = (
        A.pair("scale", 2, "factor per axis"),
        A.choice("mode", ("nearest", "bilinear"), "nearest", "how the new values are made"),
    )

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        scale = pair(a["scale"], "scale")
        self.attrs = {"scale": scale, "mode": a["mode"]}
        return (c, h * scale[0], w * scale[1])

    def receptive_field(self, fields):
        if self.attrs["mode"] == "nearest":
            reach = [(s - 1, 0) for s in self.attrs["scale"]]
        else:
            reach = [(3 * s // 2 - 1, s // 2) for s in self.attrs["scale"]]
        return tuple(
            f.upsampled(*r, s)
            for f, r, s in zip(fields[0], reach, self.attrs["scale"], strict=True)
        )

    def allocate(self, batch, dtype=np.float32):
        taps = nearest_taps if self.attrs["mode"] == "nearest" else bilinear_taps
        self.taps = []
        for n, s in zip(self.in_shapes[0][1:], self.attrs["scale"], strict=True):
            for host in taps(n, n * s, dtype):
                self.taps.append(self.backend.zeros(host.shape, host.dtype))
                self.backend.to_device(host, self.taps[-1])

    def forward(self, xs, out, p, train, rng):
        self.kernels.upsample2d_forward(xs[0], *self.taps, out)

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.upsample2d_backward(dout, *self.taps, dxs[0])


def nearest_taps(n_in: int, n_out: int, dtype=np.float32):
    """Output o copies input floor(o * n_in / n_out): first tap, weight 0 on the second."""
    i0 = np.arange(n_out, dtype=np.int64) * n_in // n_out
    return i0, i0, np.zeros(n_out, dtype)


def bilinear_taps(n_in: int, n_out: int, dtype=np.float32):
    """Source indices and weights of half-pixel-centred bilinear resampling (the convention of
    torch.nn.functional.interpolate(mode="bilinear", align_corners=False), no antialiasing):
    output o = input i0 + (input i1 - input i0) * weight."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(dtype)
