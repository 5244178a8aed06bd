"""Expand blocks, `repeat` and `when` into a flat list of primitive layer nodes.

Names are scoped: a layer named `conv1` inside block instance `3a` becomes
`3a.conv1`; the k-th copy of a repeated layer `stage` becomes `stage.k`. Inside
a block, `in` is the instance's input. A layer left out by `when: false` passes
its input through, so `inputs` may still name it (optional projections).
A repeated block instance sees its copy number as `index` (1-based), so the
first copy of a ResNet stage can stride and project while the others do not.
References are resolved after a scope is complete, so a forward reference is
legal and a loop is reported as a cycle rather than as an unknown name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import Problem, did_you_mean
from ..graph import INPUT, Node
from .exprs import MISSING, ExprError, MissingArgument, is_expr, substitute
from .load import Document
from .schema import layer_types

BROKEN = "<broken>"  # stands for a layer that could not be made: its users are skipped
FAILED = object()  # a reference whose problem is reported already
COMMON = ("type", "name", "inputs", "repeat", "when", "comment")
MAX_BLOCK_DEPTH = 16
MAX_NODES = 100_000
MAX_REPEAT = 10_000  # also the schema's maximum for a literal `repeat`
REPEAT_WHY = f"a network expands to at most {MAX_NODES} layers"


@dataclass(eq=False)
class Scope:
    prefix: str
    names: dict = field(default_factory=dict)  # local name -> global name or Ref
    counters: dict = field(default_factory=dict)


@dataclass(eq=False)
class Ref:
    scope: Scope
    name: str
    path: tuple  # where the reference is written
    what: str = "input"  # "input", or "output" for a block's `output:`
    resolved: object = None  # what resolve() found (a global name, or FAILED): asked once


class Expander:
    def __init__(self, doc: Document):
        self.doc = doc
        self.data = doc.data
        self.blocks = self.data.get("blocks") or {}
        if not isinstance(self.blocks, dict):
            self.blocks = {}
        self.types = layer_types()
        self.nodes: list[Node] = []
        self.problems: list[Problem] = []
        self.broken: set[str] = set()  # nodes made from values that could not be computed
        self.outputs: list[Ref] = []  # every block instance's `output:` reference
        self.failed = False  # a value() call since the last reset could not be computed
        self.full = False  # the layer limit was reached: expansion stopped
        self._least: dict[str, int] = {}
        self._recursion_reported: set[tuple] = set()
        self._constant: dict[int, tuple[dict, dict]] = {}  # id(item) -> its attrs, their paths
        self._last_values: tuple | None = None  # (item, env, (attrs, attr_paths)) just made

    def problem(self, path, message, hint="", key=False):
        line, col = self.doc.pos(path, key=key)
        self.problems.append(
            Problem(message, line, col, hint, file=self.doc.file, path=tuple(path))
        )

    # ---- expansion --------------------------------------------------------
    def run(self) -> list[Node]:
        top = Scope("", {INPUT: INPUT})
        layers = self.data.get("layers")
        if isinstance(layers, list):
            self.expand(layers, ("layers",), top, {}, {}, INPUT, ())
        for node in self.nodes:
            node.inputs = [self.resolve(r) if isinstance(r, Ref) else r for r in node.inputs]
        for ref in self.outputs:  # reported even when nothing consumes the block
            self.resolve(ref)
        return self.nodes

    def expand(self, items, items_path, scope, env, env_paths, prev, stack):
        for idx, item in enumerate(items):
            path = items_path + (idx,)
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                continue  # the schema reports it
            if self.full:
                return prev
            kind = item["type"]
            self.failed = False
            given = self.value(item.get("inputs"), env, path + ("inputs",))
            refs = None
            if isinstance(given, list) and all(isinstance(n, str) for n in given):
                refs = [Ref(scope, n, path + ("inputs", i)) for i, n in enumerate(given)]
            name = item.get("name")
            if not isinstance(name, str):
                n = scope.counters[kind] = scope.counters.get(kind, 0) + 1
                name = f"{kind}_{n}"
            elif name in scope.names:
                self.problem(
                    path + ("name",),
                    f"duplicate layer name '{name}'",
                    "give each layer a unique name",
                )
                continue
            when = self.value(item.get("when", True), env, path + ("when",))
            repeat = self.value(item.get("repeat", 1), env, path + ("repeat",))
            if self.failed:
                # `inputs`, `when` or `repeat` could not be computed (reported once):
                # the layer is left out and whatever takes its output is skipped
                prev = scope.names[name] = BROKEN
                continue
            if not when:
                # left out: it acts as identity, for `inputs` and for the next layer
                prev = scope.names[name] = refs[0] if refs else prev
                continue
            if not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
                repeat = 1  # the schema reports it
            elif repeat > MAX_REPEAT:
                if is_expr(item.get("repeat")):  # a literal is reported by the schema
                    self.problem(
                        path + ("repeat",),
                        f"'repeat' must be <= {MAX_REPEAT} ({REPEAT_WHY}), got {repeat}",
                    )
                prev = scope.names[name] = BROKEN
                continue
            if kind in self.blocks and self.recursive(kind, path, stack):
                prev = scope.names[name] = refs[0] if refs else prev  # passes its input on
                continue
            if kind in self.blocks or kind in self.types:
                each = self.least(kind) if kind in self.blocks else 1
                if len(self.nodes) + repeat * each > MAX_NODES:
                    self.limit(path)  # fail at once, not after making 100,000 layers
                    return prev
            for r in range(repeat):
                if self.full:
                    return prev
                copy = name if repeat == 1 else f"{name}.{r + 1}"
                inputs = refs if (refs and r == 0) else [prev]
                if kind in self.blocks:
                    prev = self.instance(
                        item, path, kind, copy, inputs, scope, env, stack, index=r + 1
                    )
                elif kind in self.types:
                    prev = self.primitive(item, path, copy, inputs, scope, env, env_paths, stack)
                else:
                    choices = list(self.types) + list(self.blocks)
                    hint = did_you_mean(kind, choices) or (
                        "define it under `blocks:` or use a layer type "
                        "(`cnnspec schema` lists them)"
                    )
                    self.problem(path + ("type",), f"unknown layer type '{kind}'", hint)
                    prev = scope.names[name] = BROKEN
                    break
            if repeat > 1:
                scope.names[name] = prev
        return prev

    def limit(self, path):
        self.full = True
        self.problem(
            path,
            f"the network expands to more than {MAX_NODES} layers",
            "lower `repeat` counts, or nest fewer repeated blocks",
        )

    def least(self, kind, seen=()) -> int:
        """Fewest layers an instance of block `kind` makes: a lower bound, where what
        depends on expressions, `when` or recursion counts as none (capped just past
        the limit)."""
        if kind in self._least:
            return self._least[kind]
        if kind in seen:
            return 0
        block = self.blocks.get(kind)
        total = 0
        if isinstance(block, dict) and isinstance(block.get("layers"), list):
            for item in block["layers"]:
                total = min(total + self._least_item(item, seen + (kind,)), MAX_NODES + 1)
        self._least[kind] = total
        return total

    def _least_item(self, item, seen) -> int:
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            return 0
        if item.get("when", True) is not True or is_expr(item.get("inputs")):
            return 0
        repeat = item.get("repeat", 1)
        if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= MAX_REPEAT:
            return 0
        kind = item["type"]
        return repeat * (self.least(kind, seen) if kind in self.blocks else int(kind in self.types))

    def primitive(self, item, path, name, inputs, scope, env, env_paths, stack):
        if len(self.nodes) >= MAX_NODES:
            self.limit(path)
            return BROKEN
        gname = scope.prefix + name
        self.failed = False
        constant = self._constant.get(id(item))
        last = self._last_values
        if constant is None and last and last[0] is item and last[1] is env:
            constant = last[2]  # the next copy of `repeat`: the same arguments, the same values
        if constant is None:
            attrs, attr_paths = {}, {}
            for key, raw in item.items():
                if key in COMMON:
                    continue
                attrs[key] = self.value(raw, env, path + (key,))
                arg = raw[1:] if isinstance(raw, str) and raw[1:] in env_paths else None
                attr_paths[key] = env_paths[arg] if arg else path + (key,)
            if not any(_uses_arguments(v) for k, v in item.items() if k not in COMMON):
                # Written without `$`: every copy has these values; one shared dict lets later
                # stages check and infer such copies once (Network copies before changing).
                self._constant[id(item)] = (attrs, attr_paths)
            elif not self.failed:
                self._last_values = (item, env, (attrs, attr_paths))
        else:
            attrs, attr_paths = constant
        node = Node(
            gname,
            self.types[item["type"]],
            attrs,
            list(inputs),
            path,
            attr_paths,
            " > ".join(stack),
        )
        self.nodes.append(node)
        if self.failed:
            self.broken.add(gname)  # its failed values are reported; do not check it further
        scope.names[name] = gname
        return gname

    def recursive(self, kind, path, stack) -> bool:
        """Whether using block `kind` here recurses; reported once per place, however many
        copies `repeat` makes of it and of the blocks around it."""
        itself = kind in (s.split(" ")[0] for s in stack)
        if not itself and len(stack) < MAX_BLOCK_DEPTH:
            return False
        if path not in self._recursion_reported:
            self._recursion_reported.add(path)
            self.problem(
                path + ("type",),
                f"block '{kind}' uses itself"
                if itself
                else f"blocks nest deeper than {MAX_BLOCK_DEPTH} levels here",
                "blocks may use other blocks, but not recursively"
                if itself
                else "flatten some of the blocks",
            )
        return True

    def instance(self, item, path, kind, name, inputs, scope, env, stack, index):
        block = self.blocks[kind]
        if not isinstance(block, dict) or not isinstance(block.get("layers"), list):
            return inputs[0]
        if len(inputs) != 1:
            self.problem(
                path + ("inputs",),
                f"block '{kind}' takes exactly one input",
                "merge the inputs first with concat or add",
            )
        params = block.get("params") or {}
        if not isinstance(params, dict):
            params = {}
        args, arg_paths = {}, {}
        for key, raw in item.items():
            if key in COMMON:
                continue
            if key not in params:
                self.problem(
                    path + (key,),
                    f"block '{kind}' has no argument '{key}'",
                    did_you_mean(key, params) or "its arguments: " + (", ".join(params) or "none"),
                    key=True,
                )
                continue
            args[key] = self.value(raw, env, path + (key,), missing=MISSING)
            arg_paths[key] = path + (key,)
        for key, default in params.items():
            if key in args:
                continue
            if default is None:
                self.problem(
                    path,
                    f"block '{kind}' needs the argument '{key}'",
                    f"add `{key}: ...` to this layer",
                )
                args[key] = MISSING  # layers that use it are skipped, not reported again
            else:
                args[key] = default
                arg_paths[key] = ("blocks", kind, "params", key)
        args["index"] = index  # 1-based copy number under `repeat`
        inner = Scope(scope.prefix + name + ".", {"in": inputs[0]})
        out = self.expand(
            block["layers"],
            ("blocks", kind, "layers"),
            inner,
            args,
            arg_paths,
            inputs[0],
            stack + (f"{kind} {scope.prefix}{name}",),
        )
        if isinstance(block.get("output"), str):
            out = Ref(inner, block["output"], ("blocks", kind, "output"), "output")
            self.outputs.append(out)
        scope.names[name] = out
        return out

    def value(self, raw, env, path, missing=None):
        try:
            return substitute(raw, env)
        except MissingArgument:
            # the instance that left the argument out is reported, not this use of it
            self.failed = True
            return missing
        except ExprError as exc:
            self.failed = True
            self.problem(
                path,
                str(exc),
                "block arguments are written $name or ${expression}"
                if env
                else "`$` values are only meaningful inside a block",
            )
            return missing  # a block argument that failed is not reported again where used

    # ---- reference resolution ---------------------------------------------
    def resolve(self, ref: Ref):
        """The global name ``ref`` stands for, or None (reported once). Every reference on
        the chain remembers the answer, so chains through 10,000 pass-through blocks cost
        linear time, not quadratic."""
        chain = []
        target = self._follow(ref, chain)
        for r in chain:
            r.resolved = FAILED if target is None else target
        return target

    def _follow(self, ref: Ref, chain: list):
        seen = set()
        target = ref
        while isinstance(target, Ref):
            if target.resolved is not None:
                return None if target.resolved is FAILED else target.resolved
            if id(target) in seen:
                self.problem(ref.path, f"'{ref.name}' refers to itself through `when: false`")
                return None
            seen.add(id(target))
            chain.append(target)
            found = target.scope.names.get(target.name)
            if found is None and target.what == "output":
                hint = did_you_mean(target.name, target.scope.names) or (
                    "`output` names one of the block's layers; by default the last is its output"
                )
                block = target.path[1] if len(target.path) > 1 else "?"
                self.problem(
                    target.path,
                    f"block '{block}' has no layer '{target.name}' for its output",
                    hint,
                )
                return None
            if found is None:
                hint = did_you_mean(target.name, target.scope.names) or (
                    "inputs name earlier layers of the same block or network"
                    + (
                        "; `in` is the block's input"
                        if target.scope.prefix
                        else "; `input` is the network's input"
                    )
                )
                self.problem(target.path, f"unknown input '{target.name}'", hint)
                return None
            target = found
        return target


def _uses_arguments(value) -> bool:
    """Whether `$`-values appear anywhere in ``value`` (substitute() looks into lists and
    mappings too)."""
    if isinstance(value, list):
        return any(_uses_arguments(v) for v in value)
    if isinstance(value, dict):
        return any(_uses_arguments(v) for v in value.values())
    return is_expr(value)


def expand(doc: Document) -> Expander:
    """Expand the document; the Expander holds `nodes`, `problems`, `broken` (names of
    nodes whose values could not be computed) and `full` (the layer limit was hit)."""
    ex = Expander(doc)
    ex.run()
    return ex
