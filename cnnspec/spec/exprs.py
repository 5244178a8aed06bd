"""Block arguments: `$name` and `${expression}` inside block bodies.

`$filters` stands for the argument's value (any type, lists included);
`${filters * 4}` evaluates a small, safe arithmetic/boolean expression over the
arguments. Only literals, names, arithmetic, comparisons, `and`/`or`/`not`,
`x if c else y`, `min`, `max`, `int` and lists are allowed: a spec is data, not code.

Evaluation is bounded: every integer stays below 2**63 in magnitude, every float is
finite, strings and lists hold at most 10,000 items, and an expression gives a
number, true/false, a string or a list of those. Every failure is an ExprError.
"""

from __future__ import annotations

import ast
import functools
import math
import operator
import re

_NAME = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_EXPR = re.compile(r"^\$\{(.*)\}$", re.S)

MAX_TEXT = 500  # characters in one expression
MAX_INT = 2**63  # integers (intermediate results included) stay below this in magnitude
MAX_LEN = 10_000  # items in a string or list an expression makes
MAX_EXPONENT = 64

_BINOPS = {
    ast.Add: (operator.add, "+"),
    ast.Sub: (operator.sub, "-"),
    ast.Mult: (operator.mul, "*"),
    ast.Div: (operator.truediv, "/"),
    ast.FloorDiv: (operator.floordiv, "//"),
    ast.Mod: (operator.mod, "%"),
    ast.Pow: (operator.pow, "**"),
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def _extreme(name: str, args: list):
    """min/max of two or more numbers, or of one non-empty list of numbers."""
    items = args[0] if len(args) == 1 and isinstance(args[0], list) else args
    if len(args) == 1 and not isinstance(args[0], list):
        raise ExprError(
            f"{name}() needs two or more numbers, or one list of numbers; got only {_kind(args[0])}"
        )
    if not items:
        raise ExprError(f"{name}() of nothing: give it two or more numbers, or a non-empty list")
    odd = next((v for v in items if not _number(v)), None)
    if odd is not None:
        raise ExprError(
            f"{name}() compares numbers, but got {_kind(odd)}"
            + (" (a list goes alone: max(list), not max(list, 1))" if isinstance(odd, list) else "")
        )
    return min(items) if name == "min" else max(items)


def _int(name: str, args: list):
    """int of a number (truncating), of true/false, or of a string that spells a whole number."""
    if len(args) != 1:
        raise ExprError(f"int() takes one value, got {len(args)}")
    (v,) = args
    if isinstance(v, str):
        text = v.strip()
        if len(text) > 100:
            raise ExprError("number too large in the expression")
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ExprError(f"int() of the string {v!r}, which is not a whole number")
        return int(text)
    if not _number(v):
        raise ExprError(f"int() of {_kind(v)}; give it a number or a string of digits")
    return int(v)


_FUNCS = {"min": _extreme, "max": _extreme, "int": _int}


class ExprError(Exception):
    pass


class MissingArgument(ExprError):
    """The expression uses a block argument that the instance did not give (that
    mistake is reported once, where the instance is written)."""


class _Missing:
    """The value of a required block argument that an instance left out."""

    def __repr__(self):
        return "<missing>"


MISSING = _Missing()


def is_expr(value) -> bool:
    return isinstance(value, str) and bool(_NAME.match(value) or _EXPR.match(value))


def substitute(value, env: dict):
    """Replace `$name`/`${expr}` in `value` (recursively in lists and dicts)."""
    if isinstance(value, str):
        m = _NAME.match(value)
        if m:
            if m.group(1) not in env:
                raise ExprError(f"unknown block argument '${m.group(1)}'")
            return _lookup(env, m.group(1))
        m = _EXPR.match(value)
        if m:
            return evaluate(m.group(1), env)
        return value
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


def _lookup(env, name):
    value = env[name]
    if value is MISSING or _holds_missing(value):
        raise MissingArgument(f"the block argument '{name}' is missing")
    return value


def _holds_missing(value) -> bool:
    if isinstance(value, list):
        return any(v is MISSING or _holds_missing(v) for v in value)
    if isinstance(value, dict):
        return any(v is MISSING or _holds_missing(v) for v in value.values())
    return False


def evaluate(text: str, env: dict):
    if len(text) > MAX_TEXT:
        raise ExprError(f"expression too long (over {MAX_TEXT} characters)")
    try:
        return _result(_eval(_parse(text), env))
    except RecursionError:
        raise ExprError("the expression nests too deeply") from None


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    """The expression's tree, parsed once however many copies evaluate it."""
    try:
        return ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ExprError(f"cannot parse the expression '{text}'") from None


def _kind(value) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _result(value):
    """What an expression may give: numbers, true/false, strings and lists of those."""
    if isinstance(value, list):
        for v in value:
            _result(v)
        return value
    if isinstance(value, (bool, int, float, str)):
        return _checked(value)
    raise ExprError(
        f"the expression gives {_kind(value)}; expressions give numbers, "
        "true/false, strings or lists"
    )


def _checked(value):
    """Bound one (intermediate) result."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) >= MAX_INT:
            raise ExprError("number too large in the expression (integers stay below 2**63)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ExprError("the expression gives a number that is not finite")
    elif isinstance(value, (str, list)):
        if len(value) > MAX_LEN:
            raise ExprError(f"the expression makes a {_kind(value)[2:]} longer than {MAX_LEN}")
    elif isinstance(value, complex):
        raise ExprError("the expression gives a complex number")
    return value


def _number(v) -> bool:
    return isinstance(v, (int, float))  # bool is an int


def _binop(node, left, right):
    fn, sym = _BINOPS[type(node.op)]
    seq = (str, list)
    if isinstance(node.op, ast.Add) and (
        (isinstance(left, str) and isinstance(right, str))
        or (isinstance(left, list) and isinstance(right, list))
    ):
        return _checked(left + right)
    if isinstance(node.op, ast.Mult) and (
        (isinstance(left, seq) and isinstance(right, int))
        or (isinstance(left, int) and isinstance(right, seq))
    ):
        items, times = (left, right) if isinstance(left, seq) else (right, left)
        if len(items) * max(times, 0) > MAX_LEN:
            raise ExprError(f"the expression makes a {_kind(items)[2:]} longer than {MAX_LEN}")
        return items * times
    if not (_number(left) and _number(right)):
        raise ExprError(f"cannot compute {_kind(left)} {sym} {_kind(right)}")
    if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
        raise ExprError(f"exponent too large (at most {MAX_EXPONENT})")
    try:
        value = fn(left, right)
    except ZeroDivisionError:
        raise ExprError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as exc:
        raise ExprError(f"cannot evaluate '{ast.unparse(node)}': {exc}") from None
    return _checked(value)


def _eval(node, env):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise ExprError("number too large in the expression")
        return _checked(node.value)
    if isinstance(node, ast.Name):
        if node.id in ("true", "True"):
            return True
        if node.id in ("false", "False"):
            return False
        if node.id not in env:
            raise ExprError(f"unknown block argument '{node.id}'")
        return _lookup(env, node.id)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _binop(node, _eval(node.left, env), _eval(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _eval(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not v
        if not _number(v):
            sym = "-" if isinstance(node.op, ast.USub) else "+"
            raise ExprError(f"cannot compute {sym}{_kind(v)}")
        return _checked(-v if isinstance(node.op, ast.USub) else +v)
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, env) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, env)
            try:
                holds = _CMPOPS[type(op)](left, right)
            except TypeError:
                raise ExprError(f"cannot compare {_kind(left)} with {_kind(right)}") from None
            if not holds:
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.List):
        return _checked([_eval(e, env) for e in node.elts])
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS
        and not node.keywords
    ):
        name = node.func.id
        return _result(_FUNCS[name](name, [_eval(a, env) for a in node.args]))
    raise ExprError(f"'{ast.unparse(node)}' is not allowed in an expression")
