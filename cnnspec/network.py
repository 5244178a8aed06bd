"""Load -> validate -> expand -> infer: a spec becomes a Network whose every layer
knows its output shape, parameters, cost and receptive field."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

from .errors import LayerError, Problem, SpecError
from .graph import INPUT, Node, topological
from .layers import REGISTRY, Field, Layer
from .layers.merge import unaligned
from .report import human, param_size
from .spec.expand import expand
from .spec.load import Document, load_file, load_text
from .spec.schema import schema, validate


@dataclass
class Info:
    """One primitive layer after inference."""

    node: Node
    layer: Layer
    field: tuple  # (Field h, Field w)

    @property
    def name(self):
        return self.node.name


@dataclass
class Network:
    name: str
    input_shape: tuple
    infos: list[Info]
    doc: Document
    warnings: list[Problem] = field(default_factory=list)

    @property
    def file(self) -> str:
        return self.doc.file

    @property
    def train_config(self) -> dict:
        return dict(self.doc.data.get("train") or {})

    @property
    def output_shape(self) -> tuple:
        return self.infos[-1].layer.out_shape

    @property
    def outputs(self) -> list[Info]:
        return [i for i in self.infos if i.layer.role == "output"]

    def totals(self) -> dict:
        params = trainable = macs = 0
        for info in self.infos:
            for p in info.layer.param_defs():
                params += param_size(p)
                trainable += param_size(p) if p.trainable else 0
            macs += info.layer.macs()
        return {"params": params, "trainable_params": trainable, "macs": macs}

    def summary(self) -> dict:
        from .report import summary_dict

        return summary_dict(self)

    def reshape(self, input_shape) -> Network:
        """The same spec inferred for another input size."""
        return build(self.doc, tuple(input_shape))

    def compile(
        self,
        device: str = "cpu",
        batch_size: int = 32,
        seed: int = 0,
        dtype="float32",
        training: bool = True,
        keep=(),
    ):
        """A Model with static buffers for this batch size on `device` (its backend;
        float64 for gradient checks; training=False: forward only, in less memory;
        keep: layers whose outputs `forward(outputs=...)` may read)."""
        from .compile import compile_network

        return compile_network(self, device, batch_size, seed, dtype, training, keep)


def load(path: str, input_shape=None) -> Network:
    """Load, validate and infer a spec file; raise SpecError with every problem."""
    return build(load_file(os.fspath(path)), input_shape)


def loads(text: str, file: str = "<spec>", input_shape=None) -> Network:
    return build(load_text(text, file), input_shape)


def build(doc: Document, input_shape=None) -> Network:
    if not isinstance(doc.data, dict):
        raise SpecError(
            [
                Problem(
                    f"the spec must be a mapping, got {type(doc.data).__name__}",
                    1,
                    1,
                    "start with `name:`, `input: [C, H, W]` and `layers:`",
                    file=doc.file,
                )
            ]
        )
    problems = validate(doc)
    expanded = expand(doc)
    nodes = expanded.nodes
    problems += expanded.problems
    if expanded.full:  # the layer limit: checking 100,000 layers further helps nobody
        raise SpecError(_unique(problems))
    more, bad_block_nodes = _validate_expanded(doc, nodes, expanded.broken)
    problems += more
    order, cyclic = topological(nodes)
    for node in cyclic:
        line, col = doc.pos(node.path)
        problems.append(
            Problem(
                f"layer '{node.name}' is on a cycle of inputs",
                line,
                col,
                "a layer cannot depend on its own output",
                file=doc.file,
            )
        )
    if input_shape is not None:
        shape, problem = _requested_input(doc, input_shape)
        if problem:
            problems.append(problem)
    else:
        given = doc.data.get("input")  # the schema reports one that is not [C, H, W]
        shape = tuple(given) if isinstance(given, list) and _valid_input(given) else None
    infos, warnings = [], []
    if shape:
        # layers with problems so far are skipped, and so is everything after them,
        # so independent mistakes are all reported without follow-on noise
        broken = {p.path[:2] for p in problems if p.path[:1] == ("layers",)}
        broken |= bad_block_nodes | expanded.broken
        infos, more, warnings = _infer(doc, order, shape, broken)
        problems += more
    problems = _unique(problems)
    if problems:
        raise SpecError(problems)
    if not infos:
        raise SpecError(
            [Problem("the network has no layers", *doc.pos(("layers",)), file=doc.file)]
        )
    name = doc.data.get("name") or os.path.splitext(os.path.basename(doc.file))[0]
    return Network(name, shape, infos, doc, warnings)


def _input_limit() -> int:
    return schema()["properties"]["input"]["items"]["maximum"]


def _valid_input(shape) -> bool:
    return len(shape) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _input_limit() for v in shape
    )


def _requested_input(doc: Document, input_shape):
    """An input shape asked for by the caller (reshape, --input) and its problem, if any."""
    try:
        shape = tuple(input_shape)
    except TypeError:
        shape = (input_shape,)
    shape = tuple(
        int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v for v in shape
    )
    if _valid_input(shape):
        return shape, None
    shown = "[" + ", ".join(repr(v) for v in shape) + "]"
    if len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape):
        message = f"input sizes must be at most {_input_limit()}, got {shown}"
    else:
        message = f"input must be [channels, height, width] of positive integers, got {shown}"
    line, col = doc.pos(("input",))
    hint = "the input asked for replaces the spec's `input` here"
    return None, Problem(message, line, col, hint, file=doc.file)


def _validate_expanded(doc: Document, nodes: list[Node], broken=frozenset()):
    """Check block-made layers against their schema once arguments are substituted."""
    problems, bad = [], set()
    for node in nodes:
        if not node.block or node.name in broken:
            continue  # top-level layers were validated as written; broken ones are reported
        shim = Document(None, doc.file, "", {(): doc.pos(node.path)})
        for key, p in node.attr_paths.items():
            shim.positions[(key,)] = doc.pos(p)
        data = {"type": node.type, "inputs": [str(i) for i in node.inputs], **node.attrs}
        found = validate(shim, data, (), subschema=node.type)
        if found:
            bad.add(node.name)
            problems += found
    return problems, bad


def _infer(doc, order, input_shape, broken=frozenset()):
    problems, warnings = [], []
    shapes = {INPUT: input_shape}
    fields = {INPUT: (Field(), Field())}
    consumers: dict[str, list[Node]] = {}
    infos = []
    for node in order:
        for i in node.inputs:
            consumers.setdefault(i, []).append(node)
        if (
            any(i not in shapes for i in node.inputs)
            or node.name in broken
            or (not node.block and node.path[:2] in broken)
        ):
            continue  # it, or an input, has a problem already reported
        cls = REGISTRY[node.type]
        if not cls.min_inputs <= len(node.inputs) <= cls.max_inputs:
            want = (
                f"at least {cls.min_inputs}" if cls.max_inputs > 1 else f"exactly {cls.min_inputs}"
            )
            problems.append(
                _problem(
                    doc,
                    node,
                    "inputs",
                    LayerError(
                        f"{node.type} takes {want} input(s), got {len(node.inputs)}",
                        "inputs",
                        "list them under `inputs: [...]`",
                    ),
                )
            )
            continue
        in_shapes = [shapes[i] for i in node.inputs]
        try:
            layer = cls(node.name, node.attrs, in_shapes)
        except LayerError as exc:
            problems.append(_problem(doc, node, exc.attr, exc))
            continue
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            # values the schema let through but the arithmetic cannot use
            problems.append(_problem(doc, node, None, LayerError(f"invalid attributes: {exc}")))
            continue
        in_fields = [fields[i] for i in node.inputs]
        if len(in_fields) > 1 and unaligned(in_fields):
            line, col = doc.pos(node.path)
            warnings.append(
                Problem(
                    f"'{node.name}' merges branches with different effective strides; "
                    "its receptive field is their union",
                    line,
                    col,
                    severity="warning",
                    file=doc.file,
                )
            )
        try:
            field_ = layer.receptive_field(in_fields)
        except OverflowError:
            field_ = None
        problem = _too_large(doc, node, layer, field_)
        if problem:
            problems.append(problem)
            continue
        shapes[node.name] = layer.out_shape
        fields[node.name] = field_
        infos.append(Info(node, layer, fields[node.name]))
    for info in infos:
        used_by = consumers.get(info.name, [])
        if info.layer.role == "output" and used_by:
            problems.append(
                _problem(
                    doc,
                    used_by[0],
                    "inputs",
                    LayerError(
                        f"output layer '{info.name}' feeds '{used_by[0].name}'; "
                        "output layers must end the network",
                        "inputs",
                        "take the layer before the output instead",
                    ),
                )
            )
    if infos and not problems:
        last = infos[-1]
        for info in infos[:-1]:
            if not consumers.get(info.name) and info.layer.role != "output":
                line, col = doc.pos(info.node.path)
                warnings.append(
                    Problem(
                        f"the output of '{info.name}' is never used",
                        line,
                        col,
                        f"only '{last.name}' and output layers end the network",
                        severity="warning",
                        file=doc.file,
                    )
                )
    return infos, problems, warnings


MAX_VALUES = 2**63  # what a 64-bit index addresses: no tensor, index or stride is larger


def _too_large(doc, node, layer, field_) -> Problem | None:
    """A layer no machine could run: its output, or its receptive field's stride, is
    beyond any 64-bit index (it also keeps every reported number short)."""
    values = math.prod(int(v) for v in layer.out_shape)
    if values >= MAX_VALUES:
        message = (
            f"the output of '{node.name}' ({'x'.join(map(str, layer.out_shape))}) "
            f"has {human(values)} values per image, beyond any 64-bit index"
        )
        hint = "check the sizes, strides and paddings that lead here"
    elif field_ is None or any(
        max(abs(f.size), abs(f.jump), abs(f.start)) >= MAX_VALUES for f in field_
    ):
        message = f"the receptive field of '{node.name}' grows beyond any 64-bit index"
        hint = "its effective stride multiplies the strides before it; check them"
    else:
        return None
    line, col = doc.pos(node.path)
    return Problem(message, line, col, hint, file=doc.file)


def _problem(doc, node, attr, exc: LayerError) -> Problem:
    path = node.attr_paths.get(attr) if attr else None
    if path is None and attr == "inputs":
        path = node.path + ("inputs",)
    line, col = doc.pos(path or node.path)
    message = f"{node.name}: {exc.message}" if "." in node.name else exc.message
    return Problem(message, line, col, exc.hint, file=doc.file)


def _unique(problems):
    seen, out = set(), []
    for p in problems:
        key = (p.line, p.col, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return sorted(out, key=lambda p: (p.line, p.col))
