"""Validate a document against the shipped JSON Schema (draft 2020-12) and turn
jsonschema's errors into `where: what` + `help: how to fix it`."""

from __future__ import annotations

import json
from functools import cache, lru_cache
from importlib import resources

import jsonschema

from ..errors import Problem, did_you_mean
from .load import Document

EXPR = {"$ref": "#/$defs/expr"}
RANGE = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
OPS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads(resources.files("cnnspec").joinpath("schema.json").read_text())


def _is_integer(checker, instance) -> bool:
    # JSON Schema counts 4.0 as an integer; a layer size or count must be a Python int
    return isinstance(instance, int) and not isinstance(instance, bool)


@lru_cache(maxsize=1)
def validator():
    base = jsonschema.Draft202012Validator
    checker = base.TYPE_CHECKER.redefine("integer", _is_integer)
    cls = jsonschema.validators.extend(base, type_checker=checker)
    return cls(schema())


@cache
def _attribute_validator(layer_type: str, attribute: str):
    props = schema()["$defs"].get(layer_type, {}).get("properties", {})
    if attribute not in props:
        return None
    ref = f"#/$defs/{layer_type}/properties/{attribute}"
    return validator().evolve(schema={"$ref": ref, "$defs": schema()["$defs"]})


def attribute_valid(layer_type: str, attribute: str, value) -> bool:
    """Whether one attribute's value passes its schema: a quick test with no messages (false
    for an attribute the type does not have)."""
    v = _attribute_validator(layer_type, attribute)
    return v is not None and v.is_valid(value)


def layer_types() -> dict[str, str]:
    """Every primitive type and alias -> its canonical name."""
    out = {}
    for rule in schema()["$defs"]["layer"]["allOf"]:
        names = rule["if"]["properties"]["type"]["enum"]
        for n in names:
            out[n] = names[0]
    return out


def validate(doc: Document, data=None, base_path=(), subschema: str | None = None):
    """Problems of `data` (default: the whole document) against the schema or one $def."""
    data = doc.data if data is None else data
    v = validator()
    if subschema:
        v = v.evolve(schema={"$ref": f"#/$defs/{subschema}", "$defs": schema()["$defs"]})
    problems = []
    for err in v.iter_errors(data):
        problems.extend(_explain(doc, err, tuple(base_path)))
    return problems


def _leaves(err):
    """Descend into anyOf/oneOf/allOf to the errors that say something useful."""
    if err.validator in ("anyOf", "oneOf") and err.context:
        # skip the `$arg` alternative: outside blocks nobody meant an expression
        branches = err.validator_value
        useful = [e for e in err.context if branches[e.relative_schema_path[0]] != EXPR]
        depth = max((len(e.absolute_path) for e in useful), default=0)
        if depth > len(err.absolute_path):
            return [leaf for e in useful if len(e.absolute_path) == depth for leaf in _leaves(e)]
        return [err]
    if err.validator in ("allOf", "$ref") and err.context:
        return [leaf for e in err.context for leaf in _leaves(e)]
    return [err]


def _describe_type(schema_part) -> str:
    if not isinstance(schema_part, dict):
        return "a valid value"
    if "anyOf" in schema_part:
        kinds = [_describe_type(s) for s in schema_part["anyOf"] if s != EXPR]
        return " or ".join(kinds)
    if "enum" in schema_part:
        return "one of " + ", ".join(repr(v) for v in schema_part["enum"])
    t = schema_part.get("type")
    if t == "integer":
        lo = schema_part.get("minimum")
        return "a positive integer" if lo == 1 else "an integer >= 0" if lo == 0 else "an integer"
    if "$ref" in schema_part and "type" not in schema_part:
        return "a " + schema_part["$ref"].rsplit("/", 1)[-1]
    if t == "array":
        lo, hi = schema_part.get("minItems"), schema_part.get("maxItems")
        item = _describe_type(schema_part.get("items", {}))
        if lo is not None and lo == hi:
            count = f"{lo} item" + ("s" if lo != 1 else "")
        elif lo is not None and hi is not None:
            count = f"{lo} to {hi} items"
        elif lo is not None:
            count = f"at least {lo} item" + ("s" if lo != 1 else "")
        elif hi is not None:
            count = f"at most {hi} items"
        else:
            return f"a list (each item {item})"
        return f"a list of {count} (each {item})"
    return {
        "number": "a number",
        "boolean": "true or false",
        "string": "a string",
        "object": "a mapping",
    }.get(t, "a valid value")


def _range_leaf(err):
    """Inside anyOf/oneOf: the error of a branch whose type fits the value but whose
    range does not (`rate: 1.5` is a number, just too large)."""
    for e in err.context or ():
        if len(e.absolute_path) != len(err.absolute_path):
            continue  # about an item or attribute inside the value
        if e.validator in RANGE:
            return e
        if e.validator in ("anyOf", "oneOf", "allOf", "$ref"):
            found = _range_leaf(e)
            if found is not None:
                return found
    return None


def _range_message(where, e) -> str:
    """`'rate' must be < 1, got 1.5`; a positive integer stays a positive integer."""
    bound = e.validator_value
    if e.validator in ("minimum", "exclusiveMinimum") and e.schema.get("type") == "integer":
        if (e.validator, bound) in (("minimum", 0), ("minimum", 1)):
            return f"{where} must be {_describe_type(e.schema)}, got {_show(e.instance)}"
    why = e.schema.get("description")
    return (
        f"{where} must be {OPS[e.validator]} {bound}"
        + (f" ({why})" if why else "")
        + (f", got {_show(e.instance)}")
    )


def _explain(doc: Document, err, base) -> list[Problem]:
    out = []
    for e in _leaves(err):
        path = base + tuple(e.absolute_path)
        line, col = doc.pos(path)
        where = _where(path)
        hint = ""
        v = e.validator
        if v in ("additionalProperties", "unevaluatedProperties"):
            allowed = list(e.schema.get("properties", {}))
            if e.schema.get("$ref") == "#/$defs/common":
                allowed += list(schema()["$defs"]["common"]["properties"])
            extras = (
                [k for k in e.instance if k not in allowed] if isinstance(e.instance, dict) else []
            )
            for key in extras or [None]:
                kline, kcol = doc.pos(path + (key,), key=True) if key else (line, col)
                hint = did_you_mean(key, allowed) or ("allowed: " + ", ".join(sorted(allowed)))
                owner = e.instance.get("type") if isinstance(e.instance, dict) else None
                subject = f"{owner}" if owner else where
                out.append(
                    Problem(
                        f"unknown attribute '{key}' for {subject}",
                        kline,
                        kcol,
                        hint,
                        file=doc.file,
                        path=path,
                    )
                )
            continue
        if v == "required":
            missing = e.message.split("'")[1] if "'" in e.message else e.message
            owner = e.instance.get("type", where) if isinstance(e.instance, dict) else where
            sub = e.schema.get("properties", {}).get(missing, {})
            message = f"{owner} needs '{missing}'"
            hint = f"add `{missing}: ...` ({_describe_type(sub)})" if sub else f"add `{missing}:`"
        elif v in RANGE:
            message = _range_message(where, e)
        elif v in ("type", "minItems", "maxItems", "pattern", "minLength"):
            message = f"{where} must be {_describe_type(e.schema)}"
            if v == "pattern" and e.validator_value != "^\\$":
                message = f"{where} has characters that are not allowed"
                hint = e.schema.get("description", "")
            message += f", got {_show(e.instance)}"
        elif v == "enum":
            message = f"{where} must be {_describe_type(e.schema)}, got {_show(e.instance)}"
            hint = did_you_mean(e.instance, e.validator_value)
        elif v in ("anyOf", "oneOf"):
            r = _range_leaf(e)
            if r is not None:
                message = _range_message(where, r)
            else:
                message = f"{where} must be {_describe_type(e.schema)}, got {_show(e.instance)}"
                if isinstance(e.instance, str):  # `padding: sam`
                    hint = did_you_mean(e.instance, _enum_values(e.schema))
        else:
            message = f"{where}: {e.message}"
        out.append(Problem(message, line, col, hint, file=doc.file, path=path))
    return out


def _enum_values(schema_part) -> list:
    """The words an anyOf allows among its alternatives (`same`, `valid`, ...)."""
    if not isinstance(schema_part, dict):
        return []
    words = list(schema_part.get("enum", []))
    for branch in schema_part.get("anyOf", []):
        words += _enum_values(branch)
    return words


def _where(path) -> str:
    if not path:
        return "the spec"
    names = [p for p in path if isinstance(p, str)]
    return f"'{names[-1]}'" if names else f"item {path[-1]}"


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) < 60 else text[:57] + "..."
