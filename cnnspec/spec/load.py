"""Load YAML safely, remembering the line and column of every node.

The document comes back as plain dicts, lists and scalars, plus a table
``positions[path] = (line, col)`` where ``path`` is a tuple of keys/indices
(``("layers", 3, "filters")``); ``key_positions`` holds where each mapping key
itself stands, so an unknown attribute can be pointed at exactly.
"""

from __future__ import annotations

import os
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


def load_text(text: str, file: str = "<spec>") -> Document:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
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
    if builder.problems:
        raise SpecError(builder.problems)
    return doc


def load_file(path: str) -> Document:
    return load_text(read_text(path), path)


class _Builder:
    def __init__(self, doc: Document):
        self.doc = doc
        self.nodes = 0
        self.problems: list[Problem] = []
        self.constructor = yaml.SafeLoader("")

    def _problem(self, node, message, hint=""):
        m = node.start_mark
        self.problems.append(Problem(message, m.line + 1, m.column + 1, hint, file=self.doc.file))

    def build(self, node, path, depth):
        self.nodes += 1
        if self.nodes > MAX_NODES:
            self._problem(node, "the document is too large (aliases expand beyond 200,000 nodes)")
            raise SpecError(self.problems)
        if depth > MAX_DEPTH:
            self._problem(node, f"the document nests deeper than {MAX_DEPTH} levels")
            raise SpecError(self.problems)
        self.doc.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    self._problem(key_node, "mapping keys must be plain names")
                    continue
                key = self._scalar(key_node)
                if not isinstance(key, str):
                    key = str(key)
                if key in out:
                    self._problem(key_node, f"duplicate key '{key}'", "remove one of them")
                    continue
                self.doc.key_positions[path + (key,)] = (
                    key_node.start_mark.line + 1,
                    key_node.start_mark.column + 1,
                )
                out[key] = self.build(value_node, path + (key,), depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, path + (i,), depth + 1) for i, v in enumerate(node.value)]
        return self._scalar(node)

    def _scalar(self, node):
        try:
            value = self.constructor.construct_object(node, deep=True)
        except (ValueError, yaml.YAMLError) as exc:
            self._problem(node, f"cannot read this value: {exc}")
            return None
        if isinstance(value, (bytes, bytearray)):
            self._problem(node, "binary values are not allowed in a spec")
            return None
        if not isinstance(value, (str, int, float, bool, type(None))):
            # timestamps and other YAML-specific types: keep their text
            return node.value
        return value
