"""Load YAML safely, remembering the line and column of every node.

The document comes back as plain dicts, lists and scalars, plus a table
``positions[path] = (line, col)`` where ``path`` is a tuple of keys/indices
(``("layers", 3, "filters")``); ``key_positions`` holds where each mapping key
itself stands, so an unknown attribute can be pointed at exactly.
"""

from __future__ import annotations

import gc
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import yaml

from ..errors import Problem, SpecError

MAX_DEPTH = 64
MAX_NODES = 200_000  # guards against alias ("billion laughs") expansion
MAX_BYTES = 8 * 1024 * 1024


@dataclass
class Document:
    data: object
    file: str
    text: str
    positions: dict = field(default_factory=dict)
    key_positions: dict = field(default_factory=dict)

    def pos(self, path, key: bool = False) -> tuple[int, int]:
        """Closest known position of `path` (falls back to its parents)."""
        path = tuple(path)
        if key and path in self.key_positions:
            return self.key_positions[path]
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return self.positions.get((), (1, 1))


def _fail(file: str, message: str, line: int = 0, col: int = 0, hint: str = "") -> SpecError:
    return SpecError([Problem(message, line, col, hint, file=file)])


def read_text(path: str) -> str:
    """Read a spec file, turning every OS or encoding failure into a SpecError."""
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not a spec file", hint="pass a .yaml file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise _fail(path, "no such file", hint="check the path") from None
    except OSError as exc:
        raise _fail(path, f"cannot read the file: {exc.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise _fail(path, f"the file is larger than {MAX_BYTES // 2**20} MiB; not a spec")
    if b"\0" in raw:
        raise _fail(path, "the file is binary, not YAML text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _fail(path, "the file is not UTF-8 text", line, 1) from None


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, plus YAML 1.2's floats: `1e-3` and `5e-4` (how papers
    write learning rates) are numbers, not strings."""


class _FastLoader(getattr(yaml, "CSafeLoader", _Loader)):  # libyaml's parser when installed
    pass


YAML12_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$")
for _cls in (_Loader, _FastLoader):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", YAML12_FLOAT, list("-+.0123456789"))


def _compose(text: str):
    """The node tree, with positions. libyaml parses ~20x faster; on an error the Python parser
    runs again, for its messages (the ones the tests and users know)."""
    if _FastLoader is not _Loader:
        try:
            return yaml.compose(text, Loader=_FastLoader)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=_Loader)


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off meanwhile: loading and building a spec make
    many small objects and free few, and each full collection their count triggers
    walks the whole heap, large in a process holding PyTorch or a test suite (100,000
    concat inputs beside ~200,000 objects: load_text 1.0-1.4 s of CPU, 0.45-0.48 with
    the collector off; building 100,000 layers: half the time, AMD EPYC Zen 5)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def load_text(text: str, file: str = "<spec>") -> Document:
    with collector_paused():
        return _load_text(text, file)


def _load_text(text: str, file: str) -> Document:
    try:
        root = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        if exc.context_mark and (
            re.search(r"\b(tag|anchor|alias)\b", exc.context or "")
            or re.search(r"end of stream|<stream end>", exc.problem or "")
        ):
            mark = exc.context_mark  # where the tag, or what never ends, starts
        message = "invalid YAML: " + " ".join(str(s) for s in (exc.context, exc.problem) if s)
        line, col = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise _fail(file, message, line, col) from None
    except yaml.YAMLError as exc:
        raise _fail(file, f"invalid YAML: {exc}") from None
    except RecursionError:
        raise _fail(file, "the YAML nests too deeply") from None
    if root is None:
        raise _fail(file, "the spec is empty", 1, 1, "start with `name:`, `input:` and `layers:`")
    doc = Document(None, file, text)
    builder = _Builder(doc)
    doc.data = builder.build(root, (), 0)
    if builder.problems:  # once each: a merged anchor is read once per `<<`
        raise SpecError(list(dict.fromkeys(builder.problems)))
    return doc


def load_file(path: str) -> Document:
    return load_text(read_text(path), path)


YAML_TAG = "tag:yaml.org,2002:"
MERGE_TAG = YAML_TAG + "merge"
MAPPING_TAGS = (YAML_TAG + "map", YAML_TAG + "set")
SEQUENCE_TAGS = (YAML_TAG + "seq", YAML_TAG + "omap", YAML_TAG + "pairs")
MAX_DIGITS = 4300  # Python's own limit on int <-> str conversion


def _short(tag: str) -> str:
    return "!!" + tag[len(YAML_TAG) :] if tag.startswith(YAML_TAG) else tag


def _where(path) -> str:
    names = [p for p in path if isinstance(p, str)]
    return f"'{names[-1]}'" if names else "a value"


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.nodes = 0
        self.problems: list[Problem] = []
        self.constructor = yaml.SafeLoader("")

    def _problem(self, node, message, hint=""):
        m = node.start_mark
        self.problems.append(Problem(message, m.line + 1, m.column + 1, hint, file=self.doc.file))

    def _mark(self, node):
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node, path, depth):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self._problem(node, "the document is too large (aliases expand beyond 200,000 nodes)")
            raise SpecError(self.problems)
        if depth > MAX_DEPTH:
            self._problem(node, f"the document nests deeper than {MAX_DEPTH} levels")
            raise SpecError(self.problems)
        self.doc.positions[path] = self._mark(node)
        if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)):
            mapping = isinstance(node, yaml.MappingNode)
            if node.tag not in self.constructor.yaml_constructors:
                self._unknown_tag(node)
            elif node.tag not in (MAPPING_TAGS if mapping else SEQUENCE_TAGS):
                self._problem(
                    node,
                    f"a {'mapping' if mapping else 'list'} cannot be tagged '{_short(node.tag)}'",
                    "remove the tag",
                )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        return self._scalar(node, path)

    def _mapping(self, node, path, depth):
        # YAML merge keys (`<<: *defaults`) first: the mapping's own keys override them
        merged = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == MERGE_TAG:
                for source in self._merge_sources(value_node):
                    part = self.build(source, path, depth)
                    for key, value in part.items():
                        merged.setdefault(key, value)
        self.doc.positions[path] = self._mark(node)
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, "mapping keys must be plain names")
                continue
            if key_node.tag == MERGE_TAG:
                continue
            key = self._scalar(key_node, None)
            if not isinstance(key, str):
                key = str(key)
            if key in out:
                self._problem(key_node, f"duplicate key '{key}'", "remove one of them")
                continue
            self.doc.key_positions[path + (key,)] = self._mark(key_node)
            out[key] = self.build(value_node, path + (key,), depth + 1)
        return {**{k: v for k, v in merged.items() if k not in out}, **out}

    def _merge_sources(self, node):
        if isinstance(node, yaml.MappingNode):
            return [node]
        if isinstance(node, yaml.SequenceNode) and all(
            isinstance(v, yaml.MappingNode) for v in node.value
        ):
            return node.value
        self._problem(
            node,
            "`<<` (a YAML merge key) takes a mapping or a list of mappings",
            "write `<<: *name` where `&name` marks a mapping",
        )
        return []

    def _unknown_tag(self, node):
        self._problem(
            node,
            f"unknown YAML tag '{_short(node.tag)}'",
            "a spec holds plain values: remove the tag",
        )

    def _scalar(self, node, path=()):
        """A scalar's value (None after reporting a problem); `path` None for a key."""
        tag = node.tag
        if tag not in self.constructor.yaml_constructors:
            self._unknown_tag(node)
            return None
        if tag == YAML_TAG + "int":
            digits = sum(c.isdigit() for c in node.value)
            if digits > MAX_DIGITS:
                self._problem(
                    node,
                    f"number too large ({digits:,} digits)",
                    "numbers in a spec are layer sizes and settings, not thousands of digits",
                )
                return None
        try:
            value = self.constructor.construct_object(node, deep=True)
        except Exception:  # PyYAML raises ValueError, IndexError, KeyError, AttributeError...
            self._problem(
                node,
                f"cannot read this value: {node.value!r} is not a valid {_short(tag)}",
                "remove the tag or fix the value",
            )
            return None
        if isinstance(value, (bytes, bytearray)):
            self._problem(node, "binary values are not allowed in a spec")
            return None
        if isinstance(value, float) and not math.isfinite(value) and path is not None:
            self._problem(
                node,
                f"{_where(path)} must be a finite number, got {node.value}",
                "numbers in a spec cannot be .nan or .inf",
            )
            return None
        if not isinstance(value, (str, int, float, bool, type(None))):
            # timestamps and other YAML-specific types: keep their text
            return node.value
        return value
