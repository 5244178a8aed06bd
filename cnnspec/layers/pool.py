"""Pooling: max and average (overlapping, padding, ceil mode), LeNet-5's
trainable subsampling, and global average pooling."""

from __future__ import annotations

import numpy as np

from ..errors import LayerError
from . import attrs as A
from .base import Layer, ParamDef, output_size, pair, register, resolve_padding, spatial

KERNEL = A.pair("kernel", 2, "window size")
STRIDE = A.pair("stride", None, "step between windows (smaller overlaps)", shown_default="= kernel")


class _Pool2d(Layer):
    transparent_to_init = True
    attributes = (
        KERNEL,
        STRIDE,
        A.padding(doc="around the input, less than the kernel (Caffe, ONNX)"),
        A.boolean("ceil_mode", False, "round the output size up (PyTorch's ceil_mode)"),
    )

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        kernel = pair(a["kernel"], "kernel")
        stride = pair(kernel if a["stride"] is None else a["stride"], "stride")
        padding = resolve_padding(a["padding"], kernel, stride, [1, 1], (h, w))
        for axis, k, p0, p1 in (
            ("height", kernel[0], *padding[:2]),
            ("width", kernel[1], *padding[2:]),
        ):
            # Caffe's and ONNX's rule (PyTorch stops at half the kernel): every window
            # then holds at least one real pixel
            if max(p0, p1) >= k:
                raise LayerError(
                    f"{axis} padding ({max(p0, p1)}) must be smaller than the kernel ({k})",
                    "padding",
                    "a window made only of padding has no value to pool",
                )
        ceil_mode = a["ceil_mode"]
        oh = output_size(h, kernel[0], stride[0], padding[0], padding[1], 1, ceil_mode, "height")
        ow = output_size(w, kernel[1], stride[1], padding[2], padding[3], 1, ceil_mode, "width")
        self.attrs = {
            "kernel": kernel,
            "stride": stride,
            "padding": padding,
            "ceil_mode": ceil_mode,
        }
        return (c, oh, ow)

    def receptive_field(self, fields):
        a = self.attrs
        fh, fw = fields[0]
        return (
            fh.through(a["kernel"][0], a["stride"][0], a["padding"][0]),
            fw.through(a["kernel"][1], a["stride"][1], a["padding"][2]),
        )


@register
class MaxPool2d(_Pool2d):
    """Max pooling; stride defaults to the kernel (smaller = overlapping).

    Shape: [C, H, W] -> [C, O_h, O_w], O = floor((n + p0 + p1 - f)/s) + 1 (ceil with
    ceil_mode, less one if the last window would start in the right padding).
    Receptive field: size + (f-1)*jump, jump * s, start - p0*jump.
    """

    type_name = "maxpool2d"
    aliases = ("maxpool",)

    def allocate(self, batch, dtype=np.float32):
        self.argmax = self.backend.zeros((batch, *self.out_shape), np.int32)

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        self.kernels.maxpool2d_forward(
            xs[0], *a["kernel"], *a["stride"], a["padding"][0], a["padding"][2], out, self.argmax
        )

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.maxpool2d_backward(dout, self.argmax, dxs[0])


@register
class AvgPool2d(_Pool2d):
    """Average pooling; count_include_pad as in PyTorch and ONNX.

    Shape: as maxpool2d; the divisor is the window's size within the padded input
    (count_include_pad: a ceil-mode window's overhang does not count) or the number of
    input units it covers. Receptive field: as maxpool2d.
    """

    type_name = "avgpool2d"
    aliases = ("avgpool",)
    attributes = (
        *_Pool2d.attributes,
        A.boolean(
            "count_include_pad", True, "padding (not a ceil-mode overhang) counts in the divisor"
        ),
    )

    def setup(self, a, in_shapes):
        shape = super().setup(a, in_shapes)
        self.attrs["count_include_pad"] = a["count_include_pad"]
        return shape

    def _args(self):
        a = self.attrs
        return (*a["kernel"], *a["stride"], *a["padding"], a["count_include_pad"])

    def forward(self, xs, out, p, train, rng):
        self.kernels.avgpool2d_forward(xs[0], *self._args(), out)

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.avgpool2d_backward(dout, *self._args(), dxs[0])


@register
class Subsample2d(Layer):
    """LeNet-5's trainable subsampling: window average x coefficient + bias, per map.

    Shape: [C, H, W] -> [C, O_h, O_w], O = floor((n - f)/s) + 1 (no padding).
    Receptive field: size + (f-1)*jump, jump * s, start.
    """

    type_name = "subsample2d"
    transparent_to_init = True
    attributes = (KERNEL, STRIDE)

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        kernel = pair(a["kernel"], "kernel")
        stride = pair(kernel if a["stride"] is None else a["stride"], "stride")
        oh = output_size(h, kernel[0], stride[0], 0, 0, 1, axis="height")
        ow = output_size(w, kernel[1], stride[1], 0, 0, 1, axis="width")
        self.attrs = {"kernel": kernel, "stride": stride, "padding": [0, 0, 0, 0]}
        return (c, oh, ow)

    def param_defs(self):
        c = self.in_shapes[0][0]
        return [ParamDef("weight", (c,), True, "ones"), ParamDef("bias", (c,))]

    def receptive_field(self, fields):
        a = self.attrs
        fh, fw = fields[0]
        return (
            fh.through(a["kernel"][0], a["stride"][0], 0),
            fw.through(a["kernel"][1], a["stride"][1], 0),
        )

    def allocate(self, batch, dtype=np.float32):
        self.pooled = self.backend.zeros((batch, *self.out_shape), dtype)

    def forward(self, xs, out, p, train, rng):
        a = self.attrs
        self.kernels.subsample2d_forward(
            xs[0], p["weight"], p["bias"], *a["kernel"], *a["stride"], out, self.pooled
        )

    def backward(self, xs, out, dout, dxs, p, g):
        a = self.attrs
        self.kernels.subsample2d_backward(
            dout,
            self.pooled,
            p["weight"],
            *a["kernel"],
            *a["stride"],
            dxs[0],
            g["weight"],
            g["bias"],
        )


@register
class GlobalAvgPool2d(Layer):
    """Average over the whole spatial extent.

    Shape: [C, H, W] -> [C, 1, 1].
    Receptive field: size + (H-1)*jump (resp. W), jump, start: the whole input.
    """

    type_name = "global_avgpool2d"
    aliases = ("global_avgpool",)
    transparent_to_init = True

    def setup(self, a, in_shapes):
        c, h, w = spatial(in_shapes[0], self.type_name)
        self.attrs = {"kernel": [h, w]}
        return (c, 1, 1)

    def receptive_field(self, fields):
        h, w = self.attrs["kernel"]
        return fields[0][0].through(h, 1, 0), fields[0][1].through(w, 1, 0)

    def forward(self, xs, out, p, train, rng):
        self.kernels.global_avgpool2d_forward(xs[0], out.reshape(out.shape[0], -1))

    def backward(self, xs, out, dout, dxs, p, g):
        self.kernels.global_avgpool2d_backward(dout.reshape(dout.shape[0], -1), dxs[0])


def covers_input(fields, in_shape):
    """Receptive field of a unit that sees its whole (C, H, W) input (dense, flatten)."""
    if len(in_shape) != 3:
        return fields[0]
    _, h, w = in_shape
    return fields[0][0].through(h, 1, 0), fields[0][1].through(w, 1, 0)
