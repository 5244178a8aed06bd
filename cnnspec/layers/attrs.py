"""Layer attributes, declared once per layer class.

Each `Attr` says what a spec may write for one attribute (its JSON Schema), its
default and a one-line doc. From these declarations come the layer
part of `cnnspec/schema.json` (`python -m cnnspec.gen`), the README's layer table,
the defaults a layer's `setup` sees, did-you-mean for names and enum values (the
schema's `properties` and `enum`s) and `cnnspec layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

SIZE = 65536  # largest spatial size, kernel, stride, padding or dilation
COUNT = 1048576  # largest channel, unit or group count


class _Required:
    def __repr__(self) -> str:
        return "required"


REQUIRED = _Required()


@dataclass(frozen=True)
class Attr:
    name: str
    kind: str  # how `cnnspec layers` names the type: "int", "int or [h, w]", ...
    schema: dict  # JSON Schema of a literal value (a block may also write `$arg`)
    default: object = REQUIRED
    doc: str = ""
    shown_default: str = ""  # how a computed default reads ("= kernel")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def default_text(self) -> str:
        if self.shown_default:
            return self.shown_default
        if self.required:
            return "required"
        if self.default is None:
            return "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


def _int(minimum: int, maximum: int) -> dict:
    return {"type": "integer", "minimum": minimum, "maximum": maximum}


def integer(name, default=REQUIRED, doc="", minimum=1, maximum=COUNT, **kw) -> Attr:
    return Attr(name, "int", _int(minimum, maximum), default, doc, **kw)


def pair(name, default=REQUIRED, doc="", minimum=1, **kw) -> Attr:
    """An int for both axes or [h, w]."""
    one = _int(minimum, SIZE)
    schema = {"anyOf": [one, {"type": "array", "items": one, "minItems": 2, "maxItems": 2}]}
    return Attr(name, "int or [h, w]", schema, default, doc, **kw)


def padding(name="padding", default=0, doc="", **kw) -> Attr:
    one = _int(0, SIZE)
    schema = {
        "anyOf": [
            one,
            {"enum": ["valid", "same", "full"]},
            {"type": "array", "items": one, "minItems": 2, "maxItems": 4},
        ]
    }
    kind = "int, [h, w], [t, b, l, r] or valid | same | full"
    return Attr(name, kind, schema, default, doc, **kw)


def number(name, default=REQUIRED, doc="", shown_default="", **bounds) -> Attr:
    """A float; bounds are JSON Schema's minimum, maximum, exclusiveMinimum, ..."""
    ops = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    kind = "float" + "".join(f", {ops[k]} {v:g}" for k, v in bounds.items())
    schema = {"type": "number", **bounds}
    return Attr(name, kind, schema, default, doc, shown_default=shown_default)


def boolean(name, default, doc="", **kw) -> Attr:
    return Attr(name, "bool", {"type": "boolean"}, default, doc, **kw)


def choice(name, choices: tuple, default=REQUIRED, doc="", **kw) -> Attr:
    return Attr(name, " | ".join(choices), {"enum": list(choices)}, default, doc, **kw)


def int_lists(name, default=None, doc="", **kw) -> Attr:
    """A list of lists of indices (LeNet-5's connection table)."""
    schema = {
        "type": "array",
        "items": {"type": "array", "items": _int(0, COUNT), "minItems": 1},
        "minItems": 1,
    }
    return Attr(name, "list of lists of int", schema, default, doc, **kw)


def resolve(declared: tuple[Attr, ...], given: dict) -> dict:
    """The attributes a layer's setup sees: defaults filled in. A required attribute
    left out stays out (the schema reports it; setup's KeyError otherwise)."""
    values = dict(given)
    for attr in declared:
        if attr.name not in values and not attr.required:
            values[attr.name] = attr.default
    return values
