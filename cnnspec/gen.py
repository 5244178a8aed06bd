"""Regenerate what the layer declarations decide: the layer part of
`cnnspec/schema.json` and the README's layer table.

    python -m cnnspec.gen           # rewrite both
    python -m cnnspec.gen --check   # exit 1 (and say which) when either is stale

The rest of schema.json (the spec's top level, blocks, `train:`) is written by hand
and kept as it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .layers import Layer
from .layers.attrs import Attr
from .layers.docs import layer_classes, markdown_table

PACKAGE = Path(__file__).resolve().parent
SCHEMA = PACKAGE / "schema.json"
README = PACKAGE.parent / "README.md"
EXPR = {"$ref": "#/$defs/expr"}
BEGIN, END = "<!-- layers:begin (python -m cnnspec.gen) -->", "<!-- layers:end -->"


def _property(attr: Attr) -> dict:
    return {"anyOf": [attr.schema, EXPR], "description": attr.doc}


def layer_def(cls: type[Layer]) -> dict:
    properties = {a.name: _property(a) for a in cls.attributes}
    required = [a.name for a in cls.attributes if a.required]
    if cls.min_inputs > 1:
        required.append("inputs")
    out = {
        "description": cls.description(),
        "$ref": "#/$defs/common",
        "properties": properties,
        "unevaluatedProperties": False,
    }
    if required:
        out["required"] = required
    return out


def schema(current: dict) -> dict:
    """`current` with its layer definitions replaced by the declared ones."""
    defs = current["$defs"]
    old = {rule["then"]["$ref"].rsplit("/", 1)[1] for rule in defs["layer"]["allOf"]}
    rules = []
    for cls in layer_classes():
        names = [cls.type_name, *cls.aliases]
        rules.append(
            {
                "if": {"properties": {"type": {"enum": names}}, "required": ["type"]},
                "then": {"$ref": f"#/$defs/{cls.type_name}"},
            }
        )
    new_defs = {}
    for key, value in defs.items():
        if key in old:
            continue
        if key == "layer":  # the layer definitions go just before the dispatch
            new_defs.update({c.type_name: layer_def(c) for c in layer_classes()})
            value = {**value, "allOf": rules}
        new_defs[key] = value
    return {**current, "$defs": new_defs}


def schema_text() -> str:
    return json.dumps(schema(json.loads(SCHEMA.read_text())), indent=1) + "\n"


def readme_text() -> str:
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{markdown_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    targets = [(SCHEMA, schema_text()), (README, readme_text())]
    stale = [path for path, text in targets if path.read_text() != text]
    if "--check" in argv:
        for path in stale:
            print(f"{path.name} is stale: run `python -m cnnspec.gen`", file=sys.stderr)
        return 1 if stale else 0
    for path, text in targets:
        if path in stale:
            path.write_text(text)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
