"""Block arguments: `$name` and `${expression}` inside block bodies.

`$filters` stands for the argument's value (any type, lists included);
`${filters * 4}` evaluates a small, safe arithmetic/boolean expression over the
arguments. Only literals, names, arithmetic, comparisons, `and`/`or`/`not`,
`x if c else y`, `min`, `max` and lists are allowed: a spec is data, not code.
"""

from __future__ import annotations

import ast
import operator
import re

_NAME = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_EXPR = re.compile(r"^\$\{(.*)\}$", re.S)

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_CMPOPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_FUNCS = {"min": min, "max": max, "int": int}


class ExprError(Exception):
    pass


def is_expr(value) -> bool:
    return isinstance(value, str) and bool(_NAME.match(value) or _EXPR.match(value))


def substitute(value, env: dict):
    """Replace `$name`/`${expr}` in `value` (recursively in lists and dicts)."""
    if isinstance(value, str):
        m = _NAME.match(value)
        if m:
            if m.group(1) not in env:
                raise ExprError(f"unknown block argument '${m.group(1)}'")
            return env[m.group(1)]
        m = _EXPR.match(value)
        if m:
            return evaluate(m.group(1), env)
        return value
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    return value


def evaluate(text: str, env: dict):
    if len(text) > 500:
        raise ExprError("expression too long")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ExprError(f"cannot parse the expression '{text}'") from None
    return _eval(tree.body, env)


def _eval(node, env):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in ("true", "True"):
            return True
        if node.id in ("false", "False"):
            return False
        if node.id not in env:
            raise ExprError(f"unknown block argument '{node.id}'")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ExprError("exponent too large")
        try:
            return _BINOPS[type(node.op)](left, right)
        except (TypeError, ZeroDivisionError, OverflowError) as exc:
            raise ExprError(f"cannot evaluate: {exc}") from None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        v = _eval(node.operand, env)
        if isinstance(node.op, ast.Not):
            return not v
        return -v if isinstance(node.op, ast.USub) else +v
    if isinstance(node, ast.BoolOp):
        values = [_eval(v, env) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(o) in _CMPOPS for o in node.ops):
        left = _eval(node.left, env)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, env)
            if not _CMPOPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _eval(node.body if _eval(node.test, env) else node.orelse, env)
    if isinstance(node, ast.List):
        return [_eval(e, env) for e in node.elts]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCS
        and not node.keywords
    ):
        return _FUNCS[node.func.id](*[_eval(a, env) for a in node.args])
    raise ExprError(f"'{ast.unparse(node)}' is not allowed in an expression")
