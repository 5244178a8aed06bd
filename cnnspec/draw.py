"""`cnnspec draw`: a network as a diagram: Graphviz DOT (SVG and PNG through Graphviz's
`dot` program) or Mermaid.

Each box is a layer (or, below `depth`, a whole block) with its type, key attributes
and output shape; blocks are drawn as clusters. An activation, normalisation or dropout
layer that only post-processes the layer before it is drawn inside that layer's box
("+ batchnorm2d + relu"), so a ResNet reads as convolutions and merges, not as three
times as many boxes.
"""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .graph import INPUT
from .plots import PictureError, file_format
from .report import _pair, block_kind, block_types, count, human, param_size, shape_text

SHOW = ("rf", "params", "macs")
FORMATS = ("svg", "png", "pdf", "dot", "gv", "mmd")
FOLDED_FAMILIES = {"activation", "norm", "dropout"}  # drawn inside the box they follow
COLOURS = {  # by layer family (the module that defines the layer)
    "conv": "#cfe2f3",
    "pool": "#d9ead3",
    "upsample": "#d0e0e3",
    "norm": "#fff2cc",
    "activation": "#eeeeee",
    "dropout": "#eeeeee",
    "merge": "#fce5cd",
    "dense": "#d9d2e9",
    "output": "#f4cccc",
    "block": "#e3eaf6",
    "input": "#ffffff",
}
GRAPHVIZ_HELP = (
    "install Graphviz (apt-get install graphviz, brew install graphviz or "
    "conda install graphviz), or write a .dot or .mmd file, which need no Graphviz"
)


@dataclass
class Box:
    id: str
    name: str  # the full dotted name of the layer or collapsed block
    lines: list[str]  # below the name: type and attributes, shape, --show figures
    family: str
    clusters: list[str] = field(default_factory=list)  # enclosing blocks, outermost first


@dataclass
class Diagram:
    name: str
    boxes: list[Box]
    edges: list[tuple[str, str]]
    cluster_labels: dict[str, str]
    direction: str = "TB"  # TB: top to bottom; LR: left to right

    def title(self, box: Box) -> str:
        """A box's name without the block it is drawn in ('b1' inside cluster '3a')."""
        inner = box.clusters[-1] + "." if box.clusters else ""
        return box.name[len(inner) :] if box.name.startswith(inner) else box.name


def family(info) -> str:
    if info.layer.role == "output":
        return "output"
    return type(info.layer).__module__.rsplit(".", 1)[-1]


def describe(info) -> str:
    """'conv2d 3x3/2, 64': the type and the attributes that tell layers apart."""
    a = info.layer.attrs
    text = info.node.type
    if a.get("kernel") is not None and info.node.type != "global_avgpool2d":
        text += " " + "x".join(map(str, _two(a["kernel"])))
        stride = _two(a.get("stride", 1))
        if stride != [1, 1]:
            text += "/" + _pair(stride)
    for key, form in (
        ("filters", ", {}"),
        ("units", ", {}"),
        ("channels", ", {}"),
        ("rate", " {}"),
        ("mode", " {}"),
        ("size", " size {}"),
    ):
        if key in a:
            text += form.format(a[key])
    if "scale" in a:
        text += " x" + _pair(_two(a["scale"]))
    if a.get("groups", 1) != 1:
        text += f", groups {a['groups']}"
    if any(d != 1 for d in _two(a.get("dilation", 1))):
        text += f", dilation {_pair(_two(a['dilation']))}"
    return text


def _two(v) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v, v]


def _figures(infos, show) -> list[str]:
    """The --show line: receptive field, parameters, MACs of a box's layers."""
    parts = []
    last = infos[-1]
    if "rf" in show:
        fh, fw = last.field
        size = _pair([_num(fh.size), _num(fw.size)])
        jump = _pair([_num(fh.jump), _num(fw.jump)])
        parts.append(f"RF {size}, stride {jump}")
    if "params" in show:
        params = sum(param_size(p) for i in infos for p in i.layer.param_defs())
        if params:
            parts.append(f"{count(params)} params")
    if "macs" in show:
        macs = sum(i.layer.macs() for i in infos)
        if macs:
            parts.append(f"{human(macs)} MACs")
    return ["; ".join(parts)] if parts else []


def _num(v):
    return int(v) if float(v).is_integer() else round(float(v), 2)


def build_diagram(net, depth: int | None = None, show=(), fold: bool = True) -> Diagram:
    """The boxes, edges and clusters of `net`, blocks deeper than `depth` collapsed."""
    infos = net.infos

    def key(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:depth]) if depth is not None and len(parts) > depth else name

    consumers: dict[str, int] = {}
    for info in infos:
        for i in info.node.inputs:
            consumers[i] = consumers.get(i, 0) + 1

    def folds(info) -> bool:
        """Drawn inside its producer's box: it only post-processes that one layer (which
        feeds nothing else), both uncollapsed and in the same block."""
        src = info.node.inputs[0]
        return (
            fold
            and family(info) in FOLDED_FAMILIES
            and len(info.node.inputs) == 1
            and src != INPUT
            and consumers.get(src) == 1
            and key(info.name) == info.name
            and key(src) == src
            and src.rpartition(".")[0] == info.name.rpartition(".")[0]
        )

    owner: dict[str, str] = {}  # layer name -> the box it is drawn in
    groups: dict[str, list] = {}
    for info in infos:
        box = owner[info.node.inputs[0]] if folds(info) else key(info.name)
        owner[info.name] = box
        groups.setdefault(box, []).append(info)

    kinds = block_types(net)
    ids = {INPUT: "input"}
    boxes = [Box("input", "input", [shape_text(net.input_shape)], "input")]
    for n, (name, members) in enumerate(groups.items()):
        ids[name] = f"n{n}"
        head = members[0]
        if len(members) > 1 and head.name != name:  # a collapsed block
            kind, copies = block_kind(name, kinds)
            label = f"{kind} x{copies}" if copies > 1 else kind
            lines = [f"{label} ({len(members)} layers)"]
            fam = "block"
        else:
            what = " + ".join([describe(head), *(m.node.type for m in members[1:])])
            lines = [] if what == name.rpartition(".")[2] else [what]  # not 'concat' twice
            fam = family(head)
        lines.append(shape_text(members[-1].layer.out_shape))
        lines += _figures(members, show)
        clusters = [".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)]
        boxes.append(Box(ids[name], name, lines, fam, clusters))
    edges: dict[tuple[str, str], None] = {}  # ordered, each once
    for info in infos:
        b = ids[owner[info.name]]
        for i in info.node.inputs:
            a = ids[owner.get(i, i)]
            if a != b:
                edges[a, b] = None
    labels = _dissolve_single_clusters(boxes, kinds)
    return Diagram(net.name, boxes, list(edges), labels)


def _dissolve_single_clusters(boxes: list[Box], kinds) -> dict[str, str]:
    """A block drawn as one box (a conv + relu pair) needs no frame: the box takes the
    block's name instead. Returns the labels of the clusters that remain."""
    members: dict[str, int] = {}
    for box in boxes:
        for c in box.clusters:
            members[c] = members.get(c, 0) + 1
    for box in boxes:
        while box.clusters and members[box.clusters[-1]] == 1:
            box.name = box.clusters.pop()
    labels = {}
    for c in members:
        if members[c] > 1:
            kind, copies = block_kind(c, kinds)
            labels[c] = f"{c}: {kind} x{copies}" if copies > 1 else f"{c}: {kind}"
    return labels


# ---------------------------------------------------------------- Graphviz


def _graphviz():
    try:
        import graphviz
    except ImportError:
        raise PictureError(
            "diagrams in DOT, SVG or PNG need the graphviz Python package: "
            "pip install 'cnnspec[plot]' (a .mmd Mermaid file needs nothing)"
        ) from None
    return graphviz


def to_graphviz(d: Diagram):
    """A graphviz.Digraph; its `.source` is the DOT text, which needs no `dot` program."""
    graphviz = _graphviz()
    g = graphviz.Digraph(d.name)
    g.attr("graph", rankdir=d.direction, label=d.name, labelloc="t")
    # ordering=in: branches left to right in the order their merge lists them
    g.attr("graph", fontname="Helvetica", fontsize="14", nodesep="0.25", ranksep="0.3")
    g.attr("graph", ordering="in")
    g.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="10")
    g.attr("edge", arrowsize="0.6", color="#555555")
    tree: dict[tuple, list[Box]] = {}
    for box in d.boxes:
        tree.setdefault(tuple(box.clusters), []).append(box)
    _emit(g, d, tree, ())
    trunk = _ancestors(d.edges, d.boxes[-1].id)
    for a, b in d.edges:
        # heavy edges stay short and straight: the path to the final output is the
        # spine, side branches such as auxiliary heads hang off it
        g.edge(a, b, weight="8" if a in trunk and b in trunk else "1")
    return g


def _ancestors(edges: list[tuple[str, str]], last: str) -> set[str]:
    """`last` and every box it depends on."""
    producers: dict[str, list[str]] = {}
    for a, b in edges:
        producers.setdefault(b, []).append(a)
    seen, todo = {last}, [last]
    while todo:
        for a in producers.get(todo.pop(), []):
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def _emit(g, d: Diagram, tree: dict, path: tuple) -> None:
    """The boxes directly in cluster `path`, then each sub-cluster, nested."""
    for box in tree.get(path, []):
        lines = "".join(f"<br/>{html.escape(line)}" for line in box.lines)
        label = f"<<b>{html.escape(d.title(box))}</b>{lines}>"
        shape = "oval" if box.family == "input" else "box3d" if box.family == "block" else "box"
        extra = {"margin": "0.15,0.09"} if shape == "box3d" else {}  # room for the 3-D edge
        g.node(box.id, label, fillcolor=COLOURS.get(box.family, "#ffffff"), shape=shape, **extra)
    children = [p for p in tree if len(p) > len(path) and p[: len(path)] == path]
    for name in dict.fromkeys(p[len(path)] for p in children):
        with g.subgraph(name=f"cluster_{name}") as sub:
            sub.attr(
                label=d.cluster_labels.get(name, name),
                style="rounded,dashed",
                color="#7f7f7f",
                labeljust="l",
                fontsize="11",
            )
            _emit(sub, d, tree, (*path, name))


# ---------------------------------------------------------------- Mermaid


def to_mermaid(d: Diagram) -> str:
    """A Mermaid flowchart (renders on GitHub, in GitLab and in mermaid.live)."""
    out = [f"flowchart {d.direction}"]
    tree: dict[tuple, list[Box]] = {}
    for box in d.boxes:
        tree.setdefault(tuple(box.clusters), []).append(box)
    cluster_ids: dict[str, str] = {}

    def esc(text: str) -> str:
        return html.escape(text).replace('"', "#quot;")

    def emit(path: tuple, indent: str) -> None:
        for box in tree.get(path, []):
            text = "<br/>".join([f"<b>{esc(d.title(box))}</b>", *map(esc, box.lines)])
            out.append(f'{indent}{box.id}["{text}"]')
        children = [p for p in tree if len(p) > len(path) and p[: len(path)] == path]
        for name in dict.fromkeys(p[len(path)] for p in children):
            cid = cluster_ids.setdefault(name, f"c{len(cluster_ids)}")
            out.append(f'{indent}subgraph {cid}["{esc(d.cluster_labels.get(name, name))}"]')
            emit((*path, name), indent + "  ")
            out.append(f"{indent}end")

    emit((), "  ")
    out += [f"  {a} --> {b}" for a, b in d.edges]
    for fam, colour in COLOURS.items():
        out.append(f"  classDef {fam} fill:{colour},stroke:#555")
    for box in d.boxes:
        out.append(f"  class {box.id} {box.family}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- files


def output_format(path: str | Path) -> str:
    fmt = file_format(path, FORMATS)
    return "dot" if fmt == "gv" else fmt


def write_diagram(d: Diagram, path: str | Path, dpi: int = 96) -> str:
    """Write `d` to `path` in the format its suffix names; returns the format."""
    fmt = output_format(path)
    path = Path(path)
    if fmt == "mmd":
        path.write_text(to_mermaid(d))
        return fmt
    g = to_graphviz(d)
    if fmt == "dot":
        path.write_text(g.source)
        return fmt
    if shutil.which("dot") is None:
        raise PictureError(
            f"{path}: writing .{fmt} needs Graphviz's `dot` program; {GRAPHVIZ_HELP}"
        )
    if fmt == "png":
        g.attr("graph", dpi=str(dpi))
    try:
        data = g.pipe(format=fmt)
    except Exception as exc:  # graphviz.CalledProcessError and friends: say it in one line
        last = str(exc).strip().splitlines()[-1]
        raise PictureError(f"{path}: Graphviz failed: {last}") from None
    path.write_bytes(data)
    return fmt
