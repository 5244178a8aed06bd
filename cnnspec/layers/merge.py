"""Merging branches: concat (along channels), add (residual), and channel_pad
(zero channels appended: ResNet's option-A shortcut)."""

from __future__ import annotations

from ..errors import LayerError
from . import attrs as A
from .base import Field, Layer, register


def union(fields):
    """Receptive field of a merge: the union of the branches' fields, per axis."""
    out = []
    for axis in range(2):
        fs = [f[axis] for f in fields]
        start = min(f.start for f in fs)
        end = max(f.start + f.size for f in fs)
        out.append(Field(end - start, max(f.jump for f in fs), start))
    return tuple(out)


def unaligned(fields) -> bool:
    return any(f[axis].jump != fields[0][axis].jump for f in fields for axis in range(2))


class _Merge(Layer):
    role = "merge"
    min_inputs = 2
    max_inputs = 1_000

    def receptive_field(self, fields):
        return union(fields)


@register
class Concat(_Merge):
    """Concatenate the outputs named in `inputs` along channels.

    Shape: [C1, H, W], [C2, H, W], ... -> [C1 + C2 + ..., H, W].
    Receptive field: the union of the branches' fields (see `union`).
    """

    type_name = "concat"

    def setup(self, a, in_shapes):
        first = in_shapes[0]
        for s in in_shapes[1:]:
            if len(s) != len(first) or s[1:] != first[1:]:
                sizes = ", ".join("x".join(map(str, t[1:])) or "(flat)" for t in in_shapes)
                raise LayerError(
                    f"concat needs equal spatial sizes, got {sizes}",
                    "inputs",
                    "pad or crop the branches so their outputs line up",
                )
        self.attrs = {"axis": 0}
        return (sum(s[0] for s in in_shapes), *first[1:])

    def forward(self, xs, out, p, train, rng):
        c = 0
        for x in xs:
            out[:, c : c + x.shape[1]] = x
            c += x.shape[1]

    def backward(self, xs, out, dout, dxs, p, g):
        c = 0
        for x, dx in zip(xs, dxs, strict=True):
            if dx is not None:
                dx[...] = dout[:, c : c + x.shape[1]]
            c += x.shape[1]


@register
class Add(_Merge):
    """Add the outputs named in `inputs` (residual connections).

    Shape: equal shapes in, the same out. Receptive field: the union, as concat.
    """

    type_name = "add"

    def setup(self, a, in_shapes):
        for s in in_shapes[1:]:
            if s != in_shapes[0]:
                shapes = ", ".join(str(list(t)) for t in in_shapes)
                hint = "use a 1x1 conv2d (projection) or channel_pad on the shortcut"
                if s[0] == in_shapes[0][0]:
                    hint = "the branches' strides differ: give the shortcut the same stride"
                raise LayerError(f"add needs equal shapes, got {shapes}", "inputs", hint)
        return in_shapes[0]

    fusable = True  # a following ReLU runs in the same pass (ResNet's block output)
    # per input, a batch norm's (scale, shift, relu) applied as it is read (set by the
    # model, CPU kernels; see Conv2d.in_affine)
    in_affine = None
    in_affine_eval = None  # in eval mode (see Conv2d.in_affine_eval)
    # its fused ReLU's mask is applied to its output gradient by the conv that writes that
    # last (Conv2d.relu_dx), and its inputs' gradients share that buffer: its backward
    # then has nothing to do (set by the model, CPU)
    dout_masked = False

    def forward(self, xs, out, p, train, rng):
        hooks = self.in_affine if train else self.in_affine_eval
        hook = {} if hooks is None else {"in_affine": hooks}
        self.kernels.add_forward(xs, out, self.fused_act, **hook)

    def backward(self, xs, out, dout, dxs, p, g):
        act = 0 if self.dout_masked else self.fused_act
        self.kernels.add_backward(dout, out, act, dxs)


@register
class ChannelPad(Layer):
    """Append zero channels up to `channels` (ResNet option-A shortcut).

    Shape: [C, H, W] -> [channels, H, W]. Receptive field: unchanged.
    """

    type_name = "channel_pad"
    transparent_to_init = True
    attributes = (A.integer("channels", doc="channels after padding"),)

    def setup(self, a, in_shapes):
        c = in_shapes[0][0]
        if a["channels"] < c:
            raise LayerError(
                f"channel_pad to {a['channels']} channels, but the input already has {c}",
                "channels",
            )
        self.attrs = {"channels": a["channels"]}
        return (a["channels"], *in_shapes[0][1:])

    def forward(self, xs, out, p, train, rng):
        c = xs[0].shape[1]
        out[:, :c] = xs[0]
        out[:, c:] = 0

    def backward(self, xs, out, dout, dxs, p, g):
        dxs[0][...] = dout[:, : xs[0].shape[1]]
