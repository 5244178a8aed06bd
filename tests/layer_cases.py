"""The conformance cases: per layer type, attribute sets (odd ones included) and, where
PyTorch has the op, how PyTorch computes it. `test_conformance.py` derives from each
case the shape, receptive-field, finite-difference and PyTorch-parity checks; a
registered layer type without an entry here fails the suite.

A torch function takes (xs, p, a): input tensors, parameter tensors by name and the
layer's resolved attributes (padding as [top, bottom, left, right]); an output layer's
also takes the target and returns (output, loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Case:
    attrs: dict
    inputs: tuple = ((3, 6, 6),)  # one [C, H, W] (or flat) shape per input
    fused_act: int = 0  # 1: a following ReLU runs in the layer (fusable layers)
    torch: bool = True  # False: this attribute set has no PyTorch twin


@dataclass(frozen=True)
class Entry:
    cases: list[Case]
    torch: Callable | None = None
    random: bool = False  # training-mode output is random: PyTorch parity in eval mode


ENTRIES: dict[str, Entry] = {}


def random_params(layer, rng, dtype) -> dict:
    """A case's parameters as every harness draws them (after its inputs, from the same
    generator): N(0, 0.25), running variances in [0.5, 1.5], a connection table's
    missing entries zero."""
    params = {}
    for d in layer.param_defs():
        v = rng.standard_normal(d.shape) * 0.5
        if d.name == "running_var":
            v = rng.uniform(0.5, 1.5, d.shape)
        if d.name == "weight" and getattr(layer, "connection_mask", None) is not None:
            v = v * layer.connection_mask
        params[d.name] = v.astype(dtype)
    return params


def random_target(type_name: str, layer, batch: int, rng, dtype):
    """An output layer's target: values for a linear head, else class labels."""
    k = layer.out_shape[0]
    if type_name == "linear":
        return rng.standard_normal((batch, k)).astype(dtype)
    return rng.integers(0, k, batch).astype(np.int64)


def entry(type_name: str, cases: list[Case], torch: Callable | None = None, **kw) -> None:
    ENTRIES[type_name] = Entry(cases, torch, **kw)


def F():
    import torch.nn.functional

    return torch.nn.functional


def _pad(x, a, value=0.0):
    t, b, l, r = a["padding"]
    return F().pad(x, (l, r, t, b), value=value)


# ---- convolution ----------------------------------------------------------------------


def _conv2d(xs, p, a):
    w = p["weight"]
    return F().conv2d(_pad(xs[0], a), w, p.get("bias"), a["stride"], 0, a["dilation"], a["groups"])


entry(
    "conv2d",
    [
        Case({"filters": 4, "kernel": 3}),
        Case({"filters": 2, "kernel": [3, 2], "stride": [2, 1], "padding": [1, 0, 2, 1]}),
        Case(
            {"filters": 4, "kernel": 3, "stride": 2, "dilation": 2, "padding": "same", "groups": 2},
            inputs=((4, 7, 6),),
            fused_act=1,
        ),
        Case({"filters": 3, "kernel": 1, "stride": 3, "bias": False}),  # stride > kernel
        Case({"filters": 2, "kernel": 6}, fused_act=1),  # covers its input: runs as dense
        Case({"filters": 3, "kernel": 2, "connections": [[0], [0, 1], [1, 2]]}),
        Case({"filters": 2, "kernel": 1}, inputs=((3, 1, 1),)),  # 1x1 maps
    ],
    _conv2d,
)


def _conv_transpose2d(xs, p, a):
    t, b, l, r = a["padding"]
    eh, ew = a["output_padding"]
    g = a["groups"]
    y = F().conv_transpose2d(xs[0], p["weight"], None, a["stride"], 0, 0, g, a["dilation"])
    y = F().pad(y, (-l, -r + ew, -t, -b + eh))  # negative padding crops
    return y if "bias" not in p else y + p["bias"][None, :, None, None]


entry(
    "conv_transpose2d",
    [
        Case({"filters": 2, "kernel": 3, "stride": 2}, inputs=((3, 4, 4),)),
        Case(
            {
                "filters": 3,
                "kernel": [2, 3],
                "stride": [2, 1],
                "padding": [1, 0, 0, 1],
                "output_padding": [1, 0],
            },
            inputs=((2, 4, 3),),
        ),
        Case({"filters": 2, "kernel": 3, "dilation": 2, "padding": 1, "bias": False}),
        Case({"filters": 2, "kernel": 2, "stride": 3}, inputs=((2, 3, 3),)),  # stride > kernel
        Case({"filters": 2, "kernel": [3, 4], "stride": 2, "padding": "same"}, ((2, 3, 3),)),
        Case({"filters": 2, "kernel": 1, "stride": [3, 1], "padding": "same"}, ((2, 3, 3),)),
        Case({"filters": 2, "kernel": 3, "dilation": [1, 2], "padding": "full"}),
        Case({"filters": 2, "kernel": 3, "stride": 2, "padding": "valid"}, ((2, 3, 3),)),
        Case({"filters": 6, "kernel": 3, "stride": 2, "padding": 1, "groups": 2}, ((4, 3, 3),)),
    ],
    _conv_transpose2d,
)


# ---- pooling ------------------------------------------------------------------------


def _symmetric(a):
    t, b, l, r = a["padding"]
    return (t, l) if (t, l) == (b, r) else None


def _maxpool2d(xs, p, a):
    pad = _symmetric(a)
    if pad is None:  # asymmetric: pad with -inf, then pool without padding
        return F().max_pool2d(_pad(xs[0], a, float("-inf")), a["kernel"], a["stride"])
    return F().max_pool2d(xs[0], a["kernel"], a["stride"], pad, ceil_mode=a["ceil_mode"])


entry(
    "maxpool2d",
    [
        Case({}),
        Case({"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True}, inputs=((2, 6, 5),)),
        Case({"kernel": [3, 2], "stride": [1, 2], "padding": [1, 0, 0, 1]}),
        Case({"kernel": 1, "stride": 3}),  # stride > kernel
        # padding up to the kernel less one (Caffe, ONNX); PyTorch stops at half the kernel
        Case({"kernel": 3, "padding": 2}, torch=False),
        Case({"kernel": 4, "stride": 3, "padding": [3, 2, 1, 3], "ceil_mode": True}, torch=False),
    ],
    _maxpool2d,
)


def _avgpool2d(xs, p, a):
    pad = _symmetric(a)
    return F().avg_pool2d(
        xs[0],
        a["kernel"],
        a["stride"],
        pad,
        ceil_mode=a["ceil_mode"],
        count_include_pad=a["count_include_pad"],
    )


entry(
    "avgpool2d",
    [
        Case(
            {"kernel": 3, "stride": 2, "padding": 1, "ceil_mode": True, "count_include_pad": False}
        ),
        Case({"kernel": 2, "padding": 1}),
        Case({"kernel": [2, 3], "stride": [3, 1]}),
        Case({"kernel": [3, 2], "padding": [1, 0, 1, 1]}, torch=False),  # asymmetric
        Case({"kernel": 3, "padding": 2}, torch=False),  # padding beyond half the kernel
        Case(
            {"kernel": 4, "stride": 3, "padding": 3, "ceil_mode": True, "count_include_pad": False},
            torch=False,
        ),
    ],
    _avgpool2d,
)


def _subsample2d(xs, p, a):
    pooled = F().avg_pool2d(xs[0], a["kernel"], a["stride"])
    return pooled * p["weight"][None, :, None, None] + p["bias"][None, :, None, None]


entry("subsample2d", [Case({}), Case({"kernel": 3, "stride": 2})], _subsample2d)
entry(
    "global_avgpool2d",
    [Case({}), Case({}, inputs=((2, 1, 1),))],
    lambda xs, p, a: xs[0].mean((2, 3), keepdim=True),
)


# ---- dense, dropout, normalisation ----------------------------------------------------

entry("flatten", [Case({})], lambda xs, p, a: xs[0].flatten(1))
entry(
    "dense",
    [
        Case({"units": 5}),
        Case({"units": 3, "bias": False}, fused_act=1),
        Case({"units": 2}, ((7,),)),
    ],
    lambda xs, p, a: F().linear(xs[0].flatten(1), p["weight"], p.get("bias")),
)
entry("dropout", [Case({"rate": 0.3})], lambda xs, p, a: xs[0], random=True)
entry(
    "batchnorm2d",
    [Case({}), Case({"momentum": 0.5, "eps": 0.1}, fused_act=1)],
    lambda xs, p, a: F().batch_norm(
        xs[0],
        p["running_mean"].clone(),
        p["running_var"].clone(),
        p["weight"],
        p["bias"],
        True,
        a["momentum"],
        a["eps"],
    ),
)
entry(
    "lrn",
    [
        Case({"size": 3}),
        Case({"size": 4, "alpha": 1.5, "beta": 0.6, "k": 1.0}, ((6, 2, 2),)),  # even, strong
        Case({"size": 5, "alpha": 2.0, "k": 1.0}, ((7, 3, 2),)),
    ],
    lambda xs, p, a: F().local_response_norm(xs[0], a["size"], a["alpha"], a["beta"], a["k"]),
)


# ---- activations ------------------------------------------------------------------------

SMALL = ((2, 3, 4),)
entry("relu", [Case({}, SMALL)], lambda xs, p, a: F().relu(xs[0]))
entry(
    "leaky_relu",
    [Case({}, SMALL), Case({"alpha": 0.2}, SMALL)],
    lambda xs, p, a: F().leaky_relu(xs[0], a["alpha"]),
)
entry("elu", [Case({"alpha": 0.7}, SMALL)], lambda xs, p, a: F().elu(xs[0], a["alpha"]))
entry("sigmoid", [Case({}, SMALL)], lambda xs, p, a: xs[0].sigmoid())
entry("tanh", [Case({}, SMALL)], lambda xs, p, a: xs[0].tanh())
entry("scaled_tanh", [Case({}, SMALL)], lambda xs, p, a: 1.7159 * (xs[0] * (2 / 3)).tanh())
entry(
    "prelu",
    [Case({}, SMALL), Case({"shared": True, "init": 0.1}, SMALL)],
    lambda xs, p, a: F().prelu(xs[0], p["weight"]),
)
entry(
    "rrelu",
    [Case({"lower": 0.1, "upper": 0.3}, SMALL)],
    lambda xs, p, a: F().rrelu(xs[0], a["lower"], a["upper"], training=False),
    random=True,
)


def _maxout(xs, p, a):
    n, c, h, w = xs[0].shape
    return xs[0].reshape(n, c // a["pieces"], a["pieces"], h, w).amax(2)


entry("maxout", [Case({"pieces": 3}, ((6, 2, 3),))], _maxout)


# ---- merging ----------------------------------------------------------------------------

entry(
    "concat",
    [Case({}, ((3, 4, 4), (2, 4, 4))), Case({}, ((2, 1, 1), (1, 1, 1), (2, 1, 1)))],
    lambda xs, p, a: __import__("torch").cat(xs, 1),
)
entry(
    "add",
    [Case({}, ((3, 4, 4), (3, 4, 4))), Case({}, ((2, 3, 3),) * 3, fused_act=1)],
    lambda xs, p, a: sum(xs[1:], xs[0]),
)
entry(
    "channel_pad",
    [Case({"channels": 5}, SMALL)],
    lambda xs, p, a: F().pad(xs[0], (0, 0, 0, 0, 0, a["channels"] - xs[0].shape[1])),
)


# ---- outputs: torch returns (output, loss) ----------------------------------------------


def _softmax(xs, p, a, target):
    logits = xs[0].flatten(1)
    return logits.softmax(1), a["loss_weight"] * F().cross_entropy(logits, target)


def _linear(xs, p, a, target):
    out = xs[0].flatten(1)
    return out, a["loss_weight"] * F().mse_loss(out, target)


def _rbf(xs, p, a, target):
    x = xs[0].flatten(1)
    out = ((x[:, None, :] - p["weight"][None]) ** 2).sum(-1)
    return out, a["loss_weight"] * F().cross_entropy(-out, target)


entry("softmax", [Case({}, ((6,),)), Case({"loss_weight": 0.5}, ((2, 2, 2),))], _softmax)
entry("linear", [Case({}, ((4,),)), Case({"loss_weight": 2.0}, ((1, 2, 2),))], _linear)
entry(
    "rbf",
    [Case({"units": 3}, ((5,),)), Case({"units": 4, "trainable": True}, ((2, 2, 1),))],
    _rbf,
)


def _upsample2d(xs, p, a):
    if a["mode"] == "nearest":
        return F().interpolate(xs[0], scale_factor=a["scale"], mode="nearest")
    return F().interpolate(xs[0], scale_factor=a["scale"], mode="bilinear", align_corners=False)


entry(
    "upsample2d",
    [
        Case({}, ((2, 3, 4),)),
        Case({"scale": [3, 1]}, ((2, 3, 2),)),
        Case({"mode": "bilinear"}, ((2, 3, 4),)),
        Case({"scale": [3, 2], "mode": "bilinear"}, ((2, 4, 3),)),
        Case({"scale": 4, "mode": "bilinear"}, ((1, 1, 2),)),  # a 1-pixel axis
    ],
    _upsample2d,
)
