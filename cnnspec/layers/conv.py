"""Convolutions: conv2d (stride, padding modes, dilation, groups, connection
table) and conv_transpose2d: the first on cnnspec's tiled micro-kernel GEMMs, the second
on im2col/col2im and numpy's GEMM."""

from __future__ import annotations

from functools import cached_property

import numpy as np

from ..errors import LayerError
from . import attrs as A
from .base import Layer, ParamDef, output_size, pair, register, resolve_padding, spatial

KERNEL = A.pair("kernel", doc="window size")
STRIDE = A.pair("stride", 1, "step between windows")
DILATION = A.pair("dilation", 1, "spacing between kernel taps")
BIAS = A.boolean("bias", True, "add a learned bias per output map")


GROUPS = A.integer("groups", 1, "input and output maps split into this many groups")


def _groups(a: dict, channels: int, filters: int) -> int:
    """Groups that divide both the input channels and the filters."""
    groups = a["groups"]
    for what, n in (("the input channels", channels), ("filters", filters)):
        if n % groups:
            raise LayerError(
                f"groups ({groups}) must divide {what} ({n})",
                "groups",
                f"{n} / {groups} = {n / groups:g}",
            )
    return groups


@register
class Conv2d(Layer):
    """2-D convolution (cross-correlation), PyTorch weight layout [out, in/groups, kh, kw].

    Shape: [C, H, W] -> [filters, O_h, O_w], O = floor((n + p0 + p1 - d*(f-1) - 1)/s) + 1;
    `same` pads to O = ceil(n/s), `full` pads d*(f-1) on each side.
    Receptive field: size + d*(f-1)*jump, jump * s, start - p0*jump.
    """

    type_name = "conv2d"
    aliases = ("conv",)
    attributes = (
        A.integer("filters", doc="output maps"),
        KERNEL,
        STRIDE,
        A.padding(doc="zeros around the input"),
        DILATION,
        GROUPS,
        BIAS,
        A.int_lists(
            "connections",
            doc="LeNet-5's connection table: for each output map, the input maps that feed it",
        ),
    )

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        filters = a["filters"]
        kernel = pair(a["kernel"], "kernel")
        stride = pair(a["stride"], "stride")
        dilation = pair(a["dilation"], "dilation")
        groups = _groups(a, c, filters)
        padding = resolve_padding(a["padding"], kernel, stride, dilation, (h, w))
        connections = a["connections"]
        self.connection_mask = None
        if connections is not None:
            if groups != 1:
                raise LayerError("'connections' cannot be combined with groups", "connections")
            if len(connections) != filters:
                raise LayerError(
                    f"'connections' lists {len(connections)} output maps but filters is {filters}",
                    "connections",
                    "give one list of input maps per output map",
                )
            self.connection_mask = np.zeros((filters, c, 1, 1), np.float32)
            for o, inputs in enumerate(connections):
                for i in inputs:
                    if not 0 <= i < c:
                        raise LayerError(
                            f"'connections' row {o} names input map {i}, "
                            f"but the input has maps 0..{c - 1}",
                            "connections",
                        )
                    self.connection_mask[o, i] = 1.0
        oh = output_size(
            h, kernel[0], stride[0], padding[0], padding[1], dilation[0], axis="height"
        )
        ow = output_size(w, kernel[1], stride[1], padding[2], padding[3], dilation[1], axis="width")
        self.attrs = {
            "filters": filters,
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
            "bias": a["bias"],
        }
        if connections is not None:
            self.attrs["connections"] = connections
        return (filters, oh, ow)

    def _fan_in(self):
        c = self.in_shapes[0][0]
        kh, kw = self.attrs["kernel"]
        if self.connection_mask is not None:
            return int(self.connection_mask.sum(axis=1).mean() * kh * kw)
        return c // self.attrs["groups"] * kh * kw

    def param_defs(self):
        c = self.in_shapes[0][0]
        a = self.attrs
        kh, kw = a["kernel"]
        shape = (a["filters"], c // a["groups"], kh, kw)
        count = (
            int(self.connection_mask.sum()) * kh * kw if self.connection_mask is not None else None
        )
        fan_out = a["filters"] // a["groups"] * kh * kw
        defs = [ParamDef("weight", shape, True, "auto", self._fan_in(), fan_out, count)]
        if a["bias"]:
            defs.append(ParamDef("bias", (a["filters"],)))
        return defs

    def macs(self):
        o, oh, ow = self.out_shape
        return o * oh * ow * self._fan_in()

    def receptive_field(self, fields):
        a = self.attrs
        fh, fw = fields[0]
        return (
            fh.through(a["kernel"][0], a["stride"][0], a["padding"][0], a["dilation"][0]),
            fw.through(a["kernel"][1], a["stride"][1], a["padding"][2], a["dilation"][1]),
        )

    fusable = True  # a following ReLU can run in this layer's epilogue

    @cached_property  # (asked every call: its shapes and attributes never change)
    def is_dense(self) -> bool:
        """A kernel that covers the whole unpadded input (LeNet-5's C5) is a dense
        layer on the flattened input: weight [out, C, H, W] = [out, C*H*W]."""
        a = self.attrs
        return (
            self.out_shape[1:] == (1, 1)
            and list(self.in_shapes[0][1:]) == a["kernel"]
            and a["padding"] == [0, 0, 0, 0]
            and a["groups"] == 1
        )

    def bind(self, backend):
        super().bind(backend)
        self.dense = backend.kernels("dense")  # for a kernel that covers its input (is_dense)

    # fusion hooks, set by the model (CPU kernels): a batch norm's (scale, shift, relu)
    # applied to the input as it is packed, the float64 (2, filters) array that receives
    # the output's batch statistics, and whether dx adds to what another reader wrote
    in_affine = None
    in_affine_eval = None  # in eval mode: no hook for a norm folded into the conv before it
    folded = None  # (norm, its parameters, weights, bias): the batch norm after it, folded
    # into its weights in eval mode (see fold_norm)
    stats_out = None
    accumulate_dx = False
    dout_affine = None  # a batch norm's (dx coefficients, affine, relu): see conv2d_backward
    dx_sums = None  # the batch norm's (mean, sums) before it, taken with dx: conv2d_backward
    relu_dx = False  # it applies the mask of the ReLU before it to dx: conv2d_backward
    # in eval mode, the add after its folded norm runs in its epilogue (the model passes
    # the add's other input after its own): that add's fused activation, else None
    residual_act = None
    itemsize = 4  # of the model's dtype (set by allocate): the tiles' sizes depend on it

    def allocate(self, batch, dtype=np.float32):
        self.itemsize = np.dtype(dtype).itemsize
        if self.connection_mask is not None:  # on the device, for the weight gradient
            (shape,) = [d.shape for d in self.param_defs() if d.name == "weight"]
            self.weight_mask = self.backend.zeros(shape, dtype)
            self.backend.to_device(np.broadcast_to(self.connection_mask, shape), self.weight_mask)

    def workspace_size(self, batch):
        if self.is_dense:
            return 0
        (w,) = [d.shape for d in self.param_defs() if d.name == "weight"]
        a = self.attrs
        x_shape, out_shape = (batch, *self.in_shapes[0]), (batch, *self.out_shape)
        return self.kernels.conv2d_workspace(
            x_shape, w, out_shape, a["stride"], a["padding"], a["dilation"], self.itemsize
        )

    def fold_norm(self, norm, params, dtype):
        """In eval mode, the batch norm after it (its only reader) becomes part of this
        layer: weights and bias refolded from the current ones on every eval forward, the
        norm's ReLU in the epilogue, and `out` is the norm's output. Its own buffers: the
        parameters (and checkpoints) stay the unfolded ones."""
        (shape,) = [d.shape for d in self.param_defs() if d.name == "weight"]
        zeros = self.backend.zeros
        self.folded = (norm, params, zeros(shape, dtype), zeros(shape[0], dtype))

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        if self.is_dense:
            n, o = out.shape[:2]
            self.dense.dense_forward(
                xs[0].reshape(n, -1),
                p["weight"].reshape(o, -1),
                p.get("bias"),
                out.reshape(n, o),
                self.fused_act,
            )
            return
        hooks = {}
        hook = self.in_affine if train else self.in_affine_eval
        if hook is not None:
            hooks["in_affine"] = hook
        if train and self.stats_out is not None:
            hooks["stats"] = self.stats_out
        w, b, act = p["weight"], p.get("bias"), self.fused_act
        if not train and self.folded is not None:
            norm, q, w, b = self.folded
            norm.fold(p["weight"], p.get("bias"), q, w, b)
            act = norm.fused_act
        if not train and len(xs) == 2:  # (residual_act: set by the model)
            hooks["residual"], act = xs[1], self.residual_act
        self.kernels.conv2d_forward(
            xs[0],
            w,
            b,
            a["stride"],
            a["padding"],
            a["dilation"],
            a["groups"],
            out,
            self.workspace,
            act,
            **hooks,
        )

    def backward(self, xs, out, dout, dxs, p, g):
        a = self.attrs
        if self.is_dense:
            n, o = out.shape[:2]
            dx = None if dxs[0] is None else dxs[0].reshape(n, -1)
            self.dense.dense_backward(
                xs[0].reshape(n, -1),
                p["weight"].reshape(o, -1),
                dout.reshape(n, o),
                dx,
                g["weight"].reshape(o, -1),
                g.get("bias"),
                out.reshape(n, o),
                self.fused_act,
            )
            if self.connection_mask is not None:
                self.kernels.conv2d_mask_gradient(g["weight"], self.weight_mask)
            return
        hooks = {}
        if self.in_affine is not None:
            hooks["in_affine"] = self.in_affine
        if self.accumulate_dx:
            hooks["accumulate"] = True
        if self.dout_affine is not None:
            hooks["dout_affine"] = self.dout_affine
        if self.dx_sums is not None:
            hooks["dx_sums"] = self.dx_sums
        if self.relu_dx:
            hooks["relu_dx"] = True
        self.kernels.conv2d_backward(
            xs[0],
            p["weight"],
            dout,
            a["stride"],
            a["padding"],
            a["dilation"],
            a["groups"],
            self.workspace,
            dxs[0],
            g["weight"],
            g.get("bias"),
            out,
            self.fused_act,
            **hooks,
        )
        if self.connection_mask is not None:
            self.kernels.conv2d_mask_gradient(g["weight"], self.weight_mask)


def transposed_same(kernel, stride, dilation) -> tuple[list[int], list[int]]:
    """Padding [t, b, l, r] and output_padding [h, w] that make a transposed
    convolution's output n*s: the transpose of conv2d's `same`."""
    pads, extra = [], []
    for k, s, d in zip(kernel, stride, dilation, strict=True):
        total = d * (k - 1) + 1 - s
        pads += [max(total, 0) // 2, max(total, 0) - max(total, 0) // 2]
        extra.append(max(-total, 0))
    return pads, extra


@register
class ConvTranspose2d(Layer):
    """Transposed convolution: O = (n-1)*s - 2p + d*(f-1) + 1 + output_padding.

    Shape: [C, H, W] -> [filters, O_h, O_w] with O = (n-1)*s - p0 - p1 + d*(f-1) + 1 + e,
    the gradient of a conv2d with these attributes (weight [in, out/groups, kh, kw]). A padding
    mode crops what the conv2d it inverts pads: `valid` nothing, `full` d*(f-1) on each
    side, `same` makes O = n*s (cropping d*(f-1) + 1 - s, the extra row last, or, when
    that is negative, adding its opposite as output_padding).
    Receptive field: output unit o reads the inputs i with i*s in [o + p0 - d*(f-1), o + p0],
    so size + d*(f-1)*jump/s, jump/s, start + (p0 - d*(f-1))*jump/s (exact fractions: see
    `Field`).
    """

    type_name = "conv_transpose2d"
    aliases = ("deconv2d",)
    kernel_module = "conv_transpose"
    attributes = (
        A.integer("filters", doc="output maps"),
        KERNEL,
        STRIDE,
        A.padding(doc="removed from the output's borders"),
        A.pair("output_padding", 0, "extra rows/columns at the bottom/right", minimum=0),
        DILATION,
        GROUPS,
        BIAS,
    )

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        filters = a["filters"]
        kernel = pair(a["kernel"], "kernel")
        stride = pair(a["stride"], "stride")
        dilation = pair(a["dilation"], "dilation")
        extra = pair(a["output_padding"], "output_padding")
        groups = _groups(a, c, filters)
        if a["padding"] == "same":
            if any(extra):
                raise LayerError(
                    "output_padding cannot be combined with padding: same",
                    "output_padding",
                    "'same' makes the output the input times the stride",
                )
            padding, extra = transposed_same(kernel, stride, dilation)
        else:
            padding = resolve_padding(a["padding"], kernel, stride, dilation, (h, w))
        sizes = []
        for axis, n, k, s, d, p0, p1, e in zip(
            ("height", "width"),
            (h, w),
            kernel,
            stride,
            dilation,
            padding[0::2],
            padding[1::2],
            extra,
            strict=True,
        ):
            if e >= max(s, d):
                raise LayerError(
                    f"output_padding ({e}) must be smaller than stride or dilation",
                    "output_padding",
                )
            o = (n - 1) * s - p0 - p1 + d * (k - 1) + 1 + e
            if o < 1:
                raise LayerError(
                    f"output {axis} would be {o}",
                    "padding",
                    f"({n}-1)*{s} - {p0} - {p1} + {d}*({k}-1) + 1 + {e} = {o}",
                )
            sizes.append(o)
        self.attrs = {
            "filters": filters,
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "output_padding": extra,
            "dilation": dilation,
            "groups": groups,
            "bias": a["bias"],
        }
        return (filters, *sizes)

    def param_defs(self):
        c = self.in_shapes[0][0]
        kh, kw = self.attrs["kernel"]
        f, g = self.attrs["filters"], self.attrs["groups"]
        # PyTorch's layout [in, out/groups, kh, kw], and its fans of that tensor
        fan_in, fan_out = f // g * kh * kw, c * kh * kw
        defs = [ParamDef("weight", (c, f // g, kh, kw), True, "auto", fan_in, fan_out)]
        if self.attrs["bias"]:
            defs.append(ParamDef("bias", (f,)))
        return defs

    def macs(self):
        c, h, w = self.in_shapes[0]
        kh, kw = self.attrs["kernel"]
        return c * h * w * self.attrs["filters"] // self.attrs["groups"] * kh * kw

    def receptive_field(self, fields):
        # output o reads the inputs i with i*s in [o + p0 - d*(f-1), o + p0]
        a = self.attrs
        return tuple(
            f.upsampled(d * (k - 1) - p, p, s)
            for f, k, s, p, d in zip(
                fields[0], a["kernel"], a["stride"], a["padding"][0::2], a["dilation"], strict=True
            )
        )

    def allocate(self, batch, dtype=np.float32):
        _, h, w = self.in_shapes[0]
        kh, kw = self.attrs["kernel"]
        self.cols = self.backend.zeros((batch, self.attrs["filters"] * kh * kw, h * w), dtype)

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        self.kernels.conv_transpose2d_forward(
            xs[0],
            p["weight"],
            p.get("bias"),
            a["stride"],
            a["padding"],
            a["dilation"],
            out,
            self.cols,
            a["groups"],
        )

    def backward(self, xs, out, dout, dxs, p, g):
        a = self.attrs
        self.kernels.conv_transpose2d_backward(
            xs[0],
            p["weight"],
            dout,
            a["stride"],
            a["padding"],
            a["dilation"],
            self.cols,
            dxs[0],
            g["weight"],
            g.get("bias"),
            a["groups"],
        )
