"""Normalisation: batch norm (train/eval, running statistics) and AlexNet's
local response normalisation (PyTorch's LocalResponseNorm convention: alpha/size)."""

from __future__ import annotations

import numpy as np

from . import attrs as A
from .base import Layer, ParamDef, register


@register
class BatchNorm2d(Layer):
    """Batch normalisation (PyTorch conventions for momentum and running variance).

    Shape: unchanged. Receptive field: unchanged (per unit; the statistics see the batch).
    """

    type_name = "batchnorm2d"
    aliases = ("batchnorm", "bn")
    fusable = True  # a following ReLU runs in the normalisation pass
    transparent_to_init = True
    attributes = (
        A.number(
            "momentum", 0.1, "weight of the batch in the running statistics", minimum=0, maximum=1
        ),
        A.number("eps", 1e-5, "added to the variance", exclusiveMinimum=0),
    )

    def setup(self, a, in_shapes):
        self.attrs = {"momentum": a["momentum"], "eps": a["eps"]}
        return in_shapes[0]

    def param_defs(self):
        c = self.in_shapes[0][0]
        return [
            ParamDef("weight", (c,), True, "ones"),
            ParamDef("bias", (c,)),
            ParamDef("running_mean", (c,), False),
            ParamDef("running_var", (c,), False, "ones"),
        ]

    # fused into the convs beside it (set by the model, CPU): the batch statistics the
    # conv before it took, and whether it writes its output (else its readers apply it)
    stats = None
    writes_out = True
    dx_in_producer = False  # the conv before it forms dx from self.dx_coeffs
    sums_in_reader = False  # the conv that reads it takes self.dx_sums as it writes dout
    dx_sums = None  # float64 (2, C): sum(g), sum(g * (x - mean)) (set by the model)

    def allocate(self, batch, dtype=np.float32):
        c = self.in_shapes[0][0]
        self.inv_std = self.backend.zeros(c, dtype)
        self.batch_mean = self.backend.zeros(c, dtype)
        self.affine = self.backend.zeros((2, c), dtype)  # the forward's scale and shift
        self.dx_coeffs = self.backend.zeros((3, c), dtype)  # dx = ka*g + kb*x + kc

    def fold(self, w, b, p, w_out, b_out):
        """w_out, b_out = the weights and bias (w, b; b may be None) of the layer before
        it with its inference affine folded in (p: its parameters): that layer's output
        is then this norm's, in eval mode."""
        self.kernels.batchnorm2d_fold(
            w,
            b,
            p["weight"],
            p["bias"],
            self.attrs["eps"],
            p["running_mean"],
            p["running_var"],
            w_out,
            b_out,
        )

    def forward(self, xs, out, p, train, rng):
        k, a = self.kernels, self.attrs
        out = out if self.writes_out else None  # its readers apply self.affine
        if train:
            fused = {} if self.stats is None else {"stats": self.stats}
            k.batchnorm2d_forward_train(
                xs[0],
                p["weight"],
                p["bias"],
                a["eps"],
                a["momentum"],
                p["running_mean"],
                p["running_var"],
                out,
                self.batch_mean,
                self.inv_std,
                self.fused_act,
                self.affine,
                **fused,
            )
        else:
            fused = {} if self.writes_out else {"affine": self.affine}
            k.batchnorm2d_forward_eval(
                xs[0],
                p["weight"],
                p["bias"],
                a["eps"],
                p["running_mean"],
                p["running_var"],
                out,
                self.fused_act,
                **fused,
            )

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.batchnorm2d_backward(
            dout,
            xs[0],
            self.batch_mean,
            p["weight"],
            self.inv_std,
            dxs[0],
            g["weight"],
            g["bias"],
            self.affine,
            self.fused_act,
            **({"dx_coeffs": self.dx_coeffs} if self.dx_in_producer else {}),
            **({"sums": self.dx_sums} if self.sums_in_reader else {}),
        )


@register
class LRN(Layer):
    """Local response normalisation across channels: x / (k + alpha/size * sum x^2)^beta.

    Shape: unchanged. Receptive field: unchanged (it mixes channels, not positions).
    """

    type_name = "lrn"
    transparent_to_init = True
    attributes = (
        A.integer("size", 5, "channels summed over"),
        A.number("alpha", 1e-4, "scale of the sum (divided by size)"),
        A.number("beta", 0.75, "exponent"),
        A.number("k", 2.0, "added before the exponent"),
    )

    def setup(self, a, in_shapes):
        self.attrs = {name: a[name] for name in ("size", "alpha", "beta", "k")}
        return in_shapes[0]

    def allocate(self, batch, dtype=np.float32):
        self.scale = self.backend.zeros((batch, *self.out_shape), dtype)

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        self.kernels.lrn_forward(xs[0], a["size"], a["alpha"], a["beta"], a["k"], out, self.scale)

    def backward(self, xs, out, dout, dxs, p, g):
        a = self.attrs
        self.kernels.lrn_backward(
            xs[0], out, self.scale, dout, a["size"], a["alpha"], a["beta"], dxs[0]
        )
