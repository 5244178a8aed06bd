"""Normalisation: batch norm (train/eval, running statistics) and AlexNet's
local response normalisation (PyTorch's LocalResponseNorm convention: alpha/size)."""

from __future__ import annotations

import numpy as np

from .base import Layer, ParamDef, register


def _kernels():
    from ..kernels.cpu import norm

    return norm


@register
class BatchNorm2d(Layer):
    type_name = "batchnorm2d"
    aliases = ("batchnorm", "bn")
    fusable = True  # a following ReLU runs in the normalisation pass

    def setup(self, a, in_shapes):
        self.attrs = {"momentum": a.get("momentum", 0.1), "eps": a.get("eps", 1e-5)}
        return in_shapes[0]

    def param_defs(self):
        c = self.in_shapes[0][0]
        return [
            ParamDef("weight", (c,), True, "ones"),
            ParamDef("bias", (c,)),
            ParamDef("running_mean", (c,), False),
            ParamDef("running_var", (c,), False, "ones"),
        ]

    def allocate(self, batch, dtype=np.float32):
        c = self.in_shapes[0][0]
        self.inv_std = np.zeros(c, dtype)
        self.batch_mean = np.zeros(c, dtype)
        self.affine = np.zeros((2, c), dtype)  # the forward's scale and shift

    def forward(self, xs, out, p, train, rng):
        k, a = _kernels(), self.attrs
        if train:
            k.batchnorm_forward_train(
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
            )
        else:
            k.batchnorm_forward_eval(
                xs[0],
                p["weight"],
                p["bias"],
                a["eps"],
                p["running_mean"],
                p["running_var"],
                out,
                self.fused_act,
            )

    def backward(self, xs, out, dout, dxs, p, g):
        _kernels().batchnorm_backward(
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
        )


@register
class LRN(Layer):
    type_name = "lrn"

    def setup(self, a, in_shapes):
        self.attrs = {
            "size": a.get("size", 5),
            "alpha": a.get("alpha", 1e-4),
            "beta": a.get("beta", 0.75),
            "k": a.get("k", 2.0),
        }
        return in_shapes[0]

    def allocate(self, batch, dtype=np.float32):
        self.scale = np.zeros((batch, *self.out_shape), dtype)

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        _kernels().lrn_forward(xs[0], a["size"], a["alpha"], a["beta"], a["k"], out, self.scale)

    def backward(self, xs, out, dout, dxs, p, g):
        a = self.attrs
        _kernels().lrn_backward(
            xs[0], out, self.scale, dout, a["size"], a["alpha"], a["beta"], dxs[0]
        )
