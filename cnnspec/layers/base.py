"""The contract every layer answers, and the attribute helpers they share.

A layer class owns everything about one `type`: its attributes (declared once, in
`attributes`; the JSON Schema, README table and `cnnspec layers` derive from them),
its shape rule, its receptive-field rule, its parameters and their initialisation,
its cost, and which kernels run it forward and backward. The registry maps the
spec's `type` names to these classes.

The receptive-field rule for fractional fields is written once, at `Field`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

import numpy as np

from ..errors import LayerError
from .attrs import Attr, resolve

REGISTRY: dict[str, type[Layer]] = {}


def register(cls):
    for name in (cls.type_name, *cls.aliases):
        REGISTRY[name] = cls
    return cls


@dataclass(frozen=True)
class ParamDef:
    """One parameter array: PyTorch layout, whether SGD trains it, how to initialise it."""

    name: str
    shape: tuple
    trainable: bool = True
    init: str = "zeros"  # zeros | ones | auto (fan-based, chosen by activation) | uniform:a
    fan_in: int = 1
    fan_out: int = 1
    count: int | None = None  # trainable entries when a mask hides some (LeNet-5's C3)

    @property
    def size(self) -> int:
        return self.count if self.count is not None else math.prod(self.shape)


def exact(value):
    """An int where a Fraction is whole; receptive-field numbers stay exact."""
    if isinstance(value, Fraction) and value.denominator == 1:
        return int(value)
    return value


class Field:
    """Receptive field along one axis: size, effective stride (jump), start offset.

    Output unit o sees the input positions start + o*jump .. start + o*jump + size - 1
    (effective padding = -start). Layers that upsample (conv_transpose2d, upsample2d)
    make jump a fraction, and units differ in what they read; the rule, used by every
    layer and by the union at merges: the three numbers are exact (int or Fraction,
    never rounded) and give the smallest interval, linear in o, that holds every unit's
    field. They are printed rounded to 4 decimals.
    """

    # A plain class with slots, not a frozen dataclass: one is made per axis per layer,
    # and the dataclass's setters made them a sixth of checking 100,000 layers.
    __slots__ = ("size", "jump", "start")  # effective padding = -start

    def __init__(self, size: int | Fraction = 1, jump: int | Fraction = 1, start=0):
        if Fraction in (type(size), type(jump), type(start)):  # rare: upsampling
            size, jump, start = exact(size), exact(jump), exact(start)
        set_slot = object.__setattr__
        set_slot(self, "size", size)
        set_slot(self, "jump", jump)
        set_slot(self, "start", start)

    def __setattr__(self, name, value):
        raise AttributeError(f"Field is immutable (cannot set '{name}')")

    def __eq__(self, other):
        if other.__class__ is not Field:
            return NotImplemented
        return (self.size, self.jump, self.start) == (other.size, other.jump, other.start)

    def __hash__(self):
        return hash((self.size, self.jump, self.start))

    def __repr__(self):
        return f"Field(size={self.size!r}, jump={self.jump!r}, start={self.start!r})"

    def __reduce__(self):  # pickle and copy: through __init__, which may set the slots
        return Field, (self.size, self.jump, self.start)

    def through(self, kernel: int, stride: int, pad: int, dilation: int = 1) -> Field:
        size = self.size + dilation * (kernel - 1) * self.jump
        jump, start = self.jump * stride, self.start - pad * self.jump
        if jump.__class__ is not int:  # after upsampling: __init__ turns whole Fractions to ints
            return Field(size, jump, start)
        # Past __init__ otherwise (an int jump keeps ints ints, and Fractions not whole):
        # this runs twice for each of up to 100,000 layers a check infers (half its cost).
        twin = _new_object(Field)
        _set_size(twin, size)
        _set_jump(twin, jump)
        _set_start(twin, start)
        return twin

    def upsampled(self, reach_before, reach_after, scale: int) -> Field:
        """Through a layer whose output unit o reads the input units in
        [(o - reach_before)/scale, (o + reach_after)/scale] (each end exact)."""
        jump = Fraction(self.jump) / scale
        return Field(
            self.size + (reach_before + reach_after) * jump,
            jump,
            self.start - reach_before * jump,
        )


_new_object = object.__new__
_set_size, _set_jump, _set_start = (getattr(Field, n).__set__ for n in Field.__slots__)


class Layer:
    """The first paragraph of a layer's docstring is its description in the schema and in
    `cnnspec layers`; the rest says its shape rule and receptive-field rule."""

    type_name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    attributes: ClassVar[tuple[Attr, ...]] = ()
    role: ClassVar[str] = "hidden"  # hidden | merge | output
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int] = 1
    # the activation family that picks the initialisation of the weights before it
    # (relu: He, tanh: Glorot, lecun: LeCun); None: not an activation
    family: ClassVar[str | None] = None
    # does not change which initialisation suits the weights before it (pooling,
    # normalisation): the initialiser looks past it for the next activation
    transparent_to_init: ClassVar[bool] = False
    template: Layer | None = None  # the layer this one is a clone of

    def __init__(self, name: str, attrs: dict, in_shapes: list[tuple]):
        self.name = name
        self.raw = attrs
        self.in_shapes = [tuple(s) for s in in_shapes]
        self.attrs: dict = {}
        self.out_shape: tuple = self.setup(resolve(self.attributes, attrs), self.in_shapes)

    @classmethod
    def description(cls) -> str:
        """The docstring's first paragraph, on one line."""
        return " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())

    def clone(self, name: str) -> Layer:
        """The same layer under another name, without running setup again (buffers are
        allocated per layer later; the resolved attributes, set only by setup, are shared:
        a copy each was 100,000 more dicts for the collector to walk in a 100,000-layer
        check)."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.name, twin.template = name, self.template or self
        return twin

    # ---- shape inference --------------------------------------------------
    def setup(self, attrs: dict, in_shapes: list[tuple]) -> tuple:
        """Resolve attributes into self.attrs and return the output shape."""
        self.attrs = {}
        return in_shapes[0]

    def param_defs(self) -> list[ParamDef]:
        return []

    def macs(self) -> int:
        return 0

    def receptive_field(self, fields: list[tuple[Field, Field]]) -> tuple[Field, Field]:
        return fields[0]

    # ---- execution --------------------------------------------------------
    fusable: ClassVar[bool] = False  # can apply a following ReLU itself (fused_act = 1)
    fused_act: int = 0
    workspace = None  # scratch shared by all layers, bound by the model
    # the kernels' module in the backend's folder; default: this layer module's name
    kernel_module: ClassVar[str | None] = None
    backend = None  # bound by the model at compile time
    kernels = None  # the bound backend's kernel module for this layer

    def bind(self, backend) -> None:
        """Take the compiled model's backend: its kernels run this layer."""
        self.backend = backend
        family = self.kernel_module or type(self).__module__.rsplit(".", 1)[1]
        self.kernels = backend.kernels(family)

    def allocate(self, batch: int, dtype=np.float32) -> None:
        """Allocate per-(spec, batch) buffers once; nothing is allocated per step."""

    def workspace_size(self, batch: int) -> int:
        """Elements of scratch needed during one forward or backward call. Layers run
        one at a time, so the model gives them all the same buffer."""
        return 0

    def forward(self, xs: list, out, p: dict, train: bool, rng) -> None:
        raise NotImplementedError

    def backward(self, xs: list, out, dout, dxs: list, p: dict, g: dict) -> None:
        """Write input gradients into dxs (None where not needed) and parameter gradients into g."""
        raise NotImplementedError


# ---- attribute helpers ----------------------------------------------------


def pair(value, what: str) -> list[int]:
    if isinstance(value, bool):
        raise LayerError(f"'{what}' must be an integer or [h, w]", what)
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    raise LayerError(f"'{what}' must be an integer or [h, w], got {value!r}", what)


def spatial(shape: tuple, layer: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise LayerError(
            f"{layer} needs a [channels, height, width] input, got {list(shape)}",
            hint="put it before any flatten or dense layer",
        )
    return shape


def resolve_padding(value, kernel, stride, dilation, size) -> list[int]:
    """Padding as [top, bottom, left, right] from an int, [h, w], [t, b, l, r] or a mode."""
    if value == "valid":
        return [0, 0, 0, 0]
    if value == "full":
        ph, pw = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
        return [ph, ph, pw, pw]
    if value == "same":
        pads = []
        for n, k, s, d in zip(size, kernel, stride, dilation, strict=True):
            total = max((math.ceil(n / s) - 1) * s + d * (k - 1) + 1 - n, 0)
            pads += [total // 2, total - total // 2]
        return pads
    if isinstance(value, int) and not isinstance(value, bool):
        return [value] * 4
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        if len(value) == 2:
            return [value[0], value[0], value[1], value[1]]
        if len(value) == 4:
            return list(value)
    raise LayerError(
        f"'padding' must be an integer, [h, w], [top, bottom, left, right], "
        f"'valid', 'same' or 'full', got {value!r}",
        "padding",
    )


def output_size(n, k, s, p0, p1, d, ceil_mode=False, axis="height", attr="kernel") -> int:
    """O = floor((n + p0 + p1 - d*(k-1) - 1)/s) + 1, or PyTorch's ceil mode: ceil instead
    of floor (the last window may overhang the padded input by less than a stride), less
    one if the last window would start in the right padding."""
    span = d * (k - 1) + 1
    padded = n + p0 + p1
    num = padded - span
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= n + p0:
        out -= 1  # the last window would start inside the right padding
    if out < 1:
        kernel = f"{k}" if d == 1 else f"{k}, dilated to {span}"
        rounding = "ceil" if ceil_mode else "floor"
        formula = f"{rounding}(({n} + {p0} + {p1} - {d}*({k}-1) - 1)/{s}) + 1"
        raise LayerError(
            f"the {axis} kernel ({kernel}) is larger than the padded input ({padded})",
            attr,
            f"output {axis} = {formula} = {out}; "
            "use a smaller kernel, more padding or a larger input",
        )
    return out


def flat_size(shape: tuple) -> int:
    return math.prod(int(v) for v in shape)  # exact: numpy's int64 would overflow
