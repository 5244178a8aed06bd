"""Load -> validate -> expand -> infer: a spec becomes a Network whose every layer
knows its output shape, parameters, cost and receptive field."""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass, field, replace

from .errors import LayerError, Problem, SpecError
from .graph import INPUT, Node, topological
from .layers import REGISTRY, Field, Layer
from .layers.merge import unaligned
from .report import human, param_size
from .spec.expand import expand
from .spec.load import Document, collector_paused, load_file, load_text
from .spec.schema import attribute_valid, schema, validate


@dataclass(slots=True)
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
        counted: dict[int, tuple[int, int, int]] = {}  # clones of one layer count alike
        for info in self.infos:
            template = info.layer.template or info.layer
            counts = counted.get(id(template))
            if counts is None:
                defs = template.param_defs()
                counts = counted[id(template)] = (
                    sum(param_size(p) for p in defs),
                    sum(param_size(p) for p in defs if p.trainable),
                    template.macs(),
                )
            params, trainable, macs = params + counts[0], trainable + counts[1], macs + counts[2]
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
    with collector_paused():
        return _build(doc, input_shape)


def _build(doc: Document, input_shape=None) -> Network:
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
    problems = _overlong_inputs(doc)
    problems += validate(doc)
    problems += _train_problems(doc)
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


def _train_problems(doc: Document) -> list[Problem]:
    """What the schema cannot say about `train:`: settings the chosen schedule needs."""
    from .train.schedules import schedule_lacks

    train = doc.data.get("train")
    lacking = schedule_lacks(train) if isinstance(train, dict) else None
    if not lacking:
        return []
    path = ("train", "schedule")
    return [Problem(lacking, *doc.pos(path), "add it under train:", file=doc.file, path=path)]


def _overlong_inputs(doc: Document) -> list[Problem]:
    """`inputs` longer than any layer takes, reported once and cut to that length, so that a
    spec naming 100,000 inputs is not validated, expanded and resolved name by name."""
    most = max(cls.max_inputs for cls in REGISTRY.values())
    data = doc.data
    places = [(("layers",), data.get("layers"))]
    blocks = data.get("blocks")
    if isinstance(blocks, dict):
        places += [(("blocks", k, "layers"), b.get("layers")) for k, b in blocks.items()
                   if isinstance(b, dict)]  # fmt: skip
    problems = []
    for where, layers in places:
        for i, layer in enumerate(layers if isinstance(layers, list) else ()):
            inputs = layer.get("inputs") if isinstance(layer, dict) else None
            if isinstance(inputs, list) and len(inputs) > most:
                path = (*where, i, "inputs")
                problems.append(
                    Problem(
                        f"'inputs' names {len(inputs)} layers; a layer takes at most {most}",
                        *doc.pos(path),
                        "merge the branches in stages (concat or add of concats)",
                        file=doc.file,
                        path=path,
                    )
                )
                del inputs[most:]
    return problems


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
    checker = _CopyChecker(doc)
    for node in nodes:
        if not node.block or node.name in broken:
            continue  # top-level layers were validated as written; broken ones are reported
        found = checker.problems(node)
        if found:
            bad.add(node.name)
            problems += found
    return problems, bad


class _CopyChecker:
    """Each distinct block-made layer checked once, not every copy (a block of 10 convolutions
    repeated 9,999 times is 10 checks): copies written without `$` share one attrs dict and
    are known by it; copies whose `$`-values differ from a first, valid copy of the same layer
    have just those values checked, against their attributes' schemas."""

    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.known: dict[tuple, list[Problem]] = {}  # (id(attrs), inputs) -> problems
        self.first: dict[tuple, tuple[dict, list[Problem]]] = {}  # first copy of each layer
        self.values: dict[tuple, bool] = {}  # (type, attribute, repr(value)) -> valid

    def problems(self, node: Node) -> list[Problem]:
        shared = (id(node.attrs), len(node.inputs))
        found = self.known.get(shared)
        if found is None:
            found = self.known[shared] = self._check(node)
        return found

    def _check(self, node: Node) -> list[Problem]:
        place = (node.type, node.path, len(node.inputs))
        first = self.first.get(place)
        if first is not None and not first[1] and first[0].keys() == node.attrs.keys():
            if all(
                self._valid(node.type, k, v)
                for k, v in node.attrs.items()
                if repr(v) != repr(first[0][k])
            ):
                return []
        shim = Document(None, self.doc.file, "", {(): self.doc.pos(node.path)})
        for attr, p in node.attr_paths.items():
            shim.positions[(attr,)] = self.doc.pos(p)
        data = {"type": node.type, "inputs": ["in"] * len(node.inputs), **node.attrs}
        found = validate(shim, data, (), subschema=node.type)
        self.first.setdefault(place, (node.attrs, found))
        return found

    def _valid(self, layer_type: str, attribute: str, value) -> bool:
        key = (layer_type, attribute, repr(value))
        if key not in self.values:
            self.values[key] = attribute_valid(layer_type, attribute, value)
        return self.values[key]


def _infer(doc, order, input_shape, broken=frozenset()):
    problems, warnings = [], []
    made: dict[tuple, Layer] = {}
    failed: dict[tuple, list[int]] = {}  # (path, message) -> [index in problems, copies]
    shapes = {INPUT: input_shape}
    fields = {INPUT: (Field(), Field())}
    first_consumer: dict[str, Node] = {}  # all the checks below need (no list per layer)
    infos = []
    for node in order:
        inputs = node.inputs
        for i in inputs:
            if i not in first_consumer:
                first_consumer[i] = node
        if broken and (node.name in broken or (not node.block and node.path[:2] in broken)):
            continue  # its problem is reported already
        try:
            in_shapes = [shapes[i] for i in inputs]
        except KeyError:
            continue  # an input has a problem already reported
        cls = REGISTRY[node.type]
        if not cls.min_inputs <= len(inputs) <= cls.max_inputs:
            problems.append(_input_count_problem(doc, node, cls))
            continue
        try:
            layer = _make_layer(cls, node, in_shapes, made)
        except LayerError as exc:
            # Copies of a layer (`repeat`, block instances) that fail alike: reported once.
            first = failed.setdefault((node.path, exc.message), [len(problems), 0])
            if first[1] == 0:
                problems.append(_problem(doc, node, exc.attr, exc))
            first[1] += 1
            continue
        except (TypeError, ValueError, KeyError, OverflowError) as exc:
            # values the schema let through but the arithmetic cannot use
            problems.append(_problem(doc, node, None, LayerError(f"invalid attributes: {exc}")))
            continue
        in_fields = [fields[i] for i in inputs]
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
        if _values(layer.out_shape) >= MAX_VALUES or not _field_fits(field_):
            problems.append(_too_large(doc, node, layer, field_))
            continue
        shapes[node.name] = layer.out_shape
        fields[node.name] = field_
        infos.append(Info(node, layer, field_))
    for at, copies in failed.values():
        if copies > 1:
            p = problems[at]
            problems[at] = replace(p, message=f"{p.message} (and in {copies - 1} more copies)")
    for info in infos:
        used_by = first_consumer.get(info.name)
        if info.layer.role == "output" and used_by:
            problems.append(
                _problem(
                    doc,
                    used_by,
                    "inputs",
                    LayerError(
                        f"output layer '{info.name}' feeds '{used_by.name}'; "
                        "output layers must end the network",
                        "inputs",
                        "take the layer before the output instead",
                    ),
                )
            )
    if infos and not problems:
        last = infos[-1]
        for info in infos[:-1]:
            if info.name not in first_consumer and info.layer.role != "output":
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


def _input_count_problem(doc, node, cls) -> Problem:
    if cls.min_inputs == cls.max_inputs:
        want = f"exactly {cls.min_inputs}"
    elif len(node.inputs) < cls.min_inputs:
        want = f"at least {cls.min_inputs}"
    else:
        want = f"at most {cls.max_inputs}"
    message = f"{node.type} takes {want} input(s), got {len(node.inputs)}"
    return _problem(
        doc, node, "inputs", LayerError(message, "inputs", "list them under `inputs: [...]`")
    )


def _make_layer(cls, node, in_shapes, made: dict) -> Layer:
    """A layer for ``node``; copies of a layer (same type, values and input shapes: what
    `repeat` makes) are set up once and cloned, so 100,000 of them infer quickly."""
    shapes = tuple(in_shapes)
    shared = (id(node.attrs), shapes)  # copies of a layer written without `$` share attrs
    template = made.get(shared)
    if template is None:
        key = (node.type, repr(node.attrs), shapes)
        template = made.get(key)
        if template is None:
            made[key] = made[shared] = cls(node.name, node.attrs, in_shapes)
            return made[key]
        made[shared] = template
    return template.clone(node.name)


MAX_VALUES = 2**63  # what a 64-bit index addresses: no tensor, index or stride is larger
FIELD_LIMIT = float(MAX_VALUES)  # exact; floats (field starts) compare fast with a float


@functools.lru_cache(maxsize=4096)
def _values(shape: tuple) -> int:
    return math.prod(int(v) for v in shape)


def _field_fits(field_) -> bool:
    if field_ is None:
        return False
    h, w = field_
    largest = max(abs(h.size), abs(h.jump), abs(h.start), abs(w.size), abs(w.jump), abs(w.start))
    return largest < FIELD_LIMIT


def _too_large(doc, node, layer, field_) -> Problem:
    """A layer no machine could run: its output, or its receptive field's stride, is
    beyond any 64-bit index (it also keeps every reported number short)."""
    values = _values(layer.out_shape)
    if values >= MAX_VALUES:
        message = (
            f"the output of '{node.name}' ({'x'.join(map(str, layer.out_shape))}) "
            f"has {human(values)} values per image, beyond any 64-bit index"
        )
        hint = "check the sizes, strides and paddings that lead here"
    else:
        message = f"the receptive field of '{node.name}' grows beyond any 64-bit index"
        hint = "its effective stride multiplies the strides before it; check them"
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
