"""What `check` and `summary` show: the stable JSON form and the rich table."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .graph import INPUT

BYTES_PER_VALUE = 4  # float32


def param_size(p) -> int:
    """Entries of a ParamDef, exactly: Python integers, whatever the size."""
    return int(p.count) if p.count is not None else math.prod(int(d) for d in p.shape)


def values(shape) -> int:
    """Values in a tensor of this shape, exactly."""
    return math.prod(int(d) for d in shape)


def _int_or_float(v):
    if isinstance(v, int):
        return int(v)
    return int(v) if float(v).is_integer() else round(float(v), 4)


def layer_dict(info) -> dict:
    layer = info.layer
    defs = layer.param_defs()
    fh, fw = info.field
    return {
        "name": info.name,
        "type": info.node.type,
        "inputs": list(info.node.inputs),
        "attrs": dict(layer.attrs),
        "output_shape": list(layer.out_shape),
        "params": sum(param_size(p) for p in defs),
        "trainable_params": sum(param_size(p) for p in defs if p.trainable),
        "macs": layer.macs(),
        "receptive_field": {
            "size": [_int_or_float(fh.size), _int_or_float(fw.size)],
            "stride": [_int_or_float(fh.jump), _int_or_float(fw.jump)],
            "padding": [_int_or_float(-fh.start), _int_or_float(-fw.start)],
        },
        "activation_bytes": values(layer.out_shape) * BYTES_PER_VALUE,
    }


def summary_dict(net) -> dict:
    layers = [layer_dict(i) for i in net.infos]
    totals = net.totals()
    totals["activation_bytes"] = sum(x["activation_bytes"] for x in layers)
    totals["param_bytes"] = totals["params"] * BYTES_PER_VALUE
    memory = activation_memory(net)
    totals["activation_bytes_inference"] = memory["inference"]
    totals["activation_bytes_training"] = memory["training"]
    return {
        "name": net.name,
        "input": list(net.input_shape),
        "layers": layers,
        "totals": totals,
        "outputs": [o.name for o in net.outputs],
        "warnings": [w.to_dict() for w in net.warnings],
    }


def human(n, unit: str = "") -> str:
    """1234567 -> '1.23M'; any int, however large: 10**400 -> '1.00e400'."""
    if isinstance(n, int) and abs(n) >= 10**15:
        return _scientific(n) + unit
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}"


def _scientific(n: int) -> str:
    """An int as d.dde+X without converting it to a float or to all its digits."""
    sign, n = ("-" if n < 0 else ""), abs(n)
    exp = max(int((n.bit_length() - 1) * math.log10(2)) - 1, 0)
    while 10 ** (exp + 1) <= n:
        exp += 1
    digits = n * 100 // 10**exp  # 100..999: three significant digits, truncated
    return f"{sign}{digits // 100}.{digits % 100:02d}e{exp}"


def human_bytes(n) -> str:
    if n >= 2**50:
        return f"{human(int(n))} B"
    for factor, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= factor:
            return f"{n / factor:.2f} {suffix}"
    return f"{int(n)} B"


def count(n: int) -> str:
    """An exact count with thousands separators, or its scientific form when very long."""
    return f"{n:,}" if abs(n) < 10**30 else human(n)


def shape_text(shape) -> str:
    return "x".join(str(s) for s in shape)


def group_rows(summary: dict, depth: int | None) -> list[dict]:
    """Collapse layers deeper than `depth` name segments into one row per block."""
    rows: list[dict] = []
    index: dict[str, dict] = {}
    for layer in summary["layers"]:
        parts = layer["name"].split(".")
        if depth is None or len(parts) <= depth:
            rows.append(dict(layer, depth=len(parts) - 1, count=1))
            continue
        key = ".".join(parts[:depth])
        row = index.get(key)
        if row is None:
            row = index[key] = dict(
                layer,
                name=key,
                type="",
                depth=depth - 1,
                count=0,
                params=0,
                trainable_params=0,
                macs=0,
                activation_bytes=0,
            )
            rows.append(row)
        row["count"] += 1
        for k in ("params", "trainable_params", "macs", "activation_bytes"):
            row[k] += layer[k]
        row["output_shape"] = layer["output_shape"]
        row["receptive_field"] = layer["receptive_field"]
    return rows


def block_types(net) -> dict[str, str]:
    """Block instance name -> block type, from the expansion trail of each node."""
    out = {}
    for info in net.infos:
        for part in filter(None, info.node.block.split(" > ")):
            kind, _, name = part.partition(" ")
            out[name] = kind
    return out


def block_kind(name: str, kinds: dict[str, str]) -> tuple[str, int]:
    """A block's type and how many copies it holds: ('inception', 1) for an instance,
    ('basic', 3) for the group a `repeat` makes, ('block', 1) when unknown."""
    kind = kinds.get(name)
    if kind is not None:
        return kind, 1
    depth = name.count(".") + 1
    inner = [n for n in kinds if n.startswith(name + ".") and n.count(".") == depth]
    return (kinds.get(inner[0], "block") if inner else "block"), len(inner) or 1


def _block_label(row, kinds, with_count: bool = True) -> str:
    """'inception (14 layers)', or 'basic x3 (21 layers)' for a repeated block."""
    kind, copies = block_kind(row["name"], kinds)
    times = f" x{copies}" if copies > 1 else ""
    layers = f" ({row['count']} layers)" if with_count else ""
    return f"[cyan]{kind}[/]{times}{layers}"


def _pair(v) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


# ---------------------------------------------------------------- activation memory


def activation_memory(net) -> dict:
    """Activation bytes per image: `inference` is the peak of the outputs alive at once
    when each is freed after its last reader; `training` keeps every output for the
    backward pass and adds the peak of the output gradients alive at once."""
    infos = net.infos
    size = {INPUT: values(net.input_shape) * BYTES_PER_VALUE}
    size.update({i.name: values(i.layer.out_shape) * BYTES_PER_VALUE for i in infos})
    order = {i.name: k for k, i in enumerate(infos)}
    order[INPUT] = -1
    last_read = {name: order[name] for name in size}
    for info in infos:
        for i in info.node.inputs:
            last_read[i] = max(last_read[i], order[info.name])
    for info in net.outputs or infos[-1:]:
        last_read[info.name] = len(infos)  # the scores are read after the forward pass
    inference = _peak(size, order, last_read)
    # backward runs in reverse: an output's gradient is written by its first reader to
    # run backward (its last reader forward) and read last by its own backward step
    rev = {name: len(infos) - 1 - k for name, k in order.items() if name != INPUT}
    first_write = {name: len(infos) - 1 - last_read[name] for name in rev}
    grads = _peak({n: size[n] for n in rev}, {n: max(first_write[n], 0) for n in rev}, rev)
    return {"inference": inference, "training": sum(size.values()) + grads}


def _peak(size: dict, born: dict, dies: dict) -> int:
    """The largest total size alive at one step; a value lives from `born` to `dies`."""
    events: dict[int, int] = {}
    for name, n in size.items():
        events[born[name]] = events.get(born[name], 0) + n
        events[dies[name] + 1] = events.get(dies[name] + 1, 0) - n
    alive = peak = 0
    for step in sorted(events):
        alive += events[step]
        peak = max(peak, alive)
    return peak


# ---------------------------------------------------------------- the summary table


@dataclass(frozen=True)
class Column:
    key: str
    header: str
    justify: str
    doc: str


COLUMNS = {
    c.key: c
    for c in (
        Column("layer", "layer", "left", "layer name, indented by block depth"),
        Column("type", "type", "left", "layer type, or block type and size"),
        Column("kernel", "kernel", "right", "kernel size of convolutions and pooling"),
        Column("output", "output", "right", "output shape, CxHxW"),
        Column("params", "params", "right", "parameters (all, frozen ones included)"),
        Column("trainable", "trainable", "left", "whether the parameters are trained"),
        Column("macs", "MACs", "right", "multiply-adds per image"),
        Column("rf", "RF", "right", "receptive field size"),
        Column("stride", "stride", "right", "receptive field stride (jump)"),
        Column("pad", "pad", "right", "receptive field effective padding"),
    )
}
DEFAULT_COLUMNS = ("layer", "type", "output", "params", "macs", "rf", "stride", "pad")
# Dropped first to last when the table is wider than the terminal; layer, type and
# output always stay.
DROP_ORDER = ("pad", "trainable", "kernel", "stride", "macs", "rf", "params")


def parse_columns(text: str | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """'layer,type,kernel' -> (the columns to show, the ones named); ValueError names
    unknown ones. A leading '+' adds to the default columns ('+kernel,trainable')."""
    if not text:
        return DEFAULT_COLUMNS, ()
    extra = text.startswith("+")
    names = [c.strip().lower() for c in text.lstrip("+").split(",") if c.strip()]
    unknown = [c for c in names if c not in COLUMNS]
    if unknown or not names:
        raise ValueError(
            f"unknown column(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(COLUMNS)} (or +NAME to add to the defaults)"
        )
    named = tuple(dict.fromkeys(names))
    if extra:
        return tuple(c for c in COLUMNS if c in DEFAULT_COLUMNS or c in named), named
    return named, named


def _kernel_text(row) -> str:
    k = row["attrs"].get("kernel") if row["type"] else None
    if k is None:
        return "-"
    return _pair(k) if isinstance(k, (list, tuple)) else str(k)


def _trainable_text(row) -> str:
    if not row["params"]:
        return "-"
    if row["trainable_params"] == row["params"]:
        return "yes"
    return "no" if not row["trainable_params"] else "partly"


def _cells(row, kinds, short_labels: bool, short_counts: bool) -> dict:
    """One table row's text per column; for a narrow terminal, block labels without
    their layer count and parameter counts as 1.23M: abbreviated, never cut."""
    rf = row["receptive_field"]
    params = row["params"]
    return {
        "layer": "  " * row["depth"] + row["name"],
        "type": row["type"] or _block_label(row, kinds, with_count=not short_labels),
        "kernel": _kernel_text(row),
        "output": shape_text(row["output_shape"]),
        "params": (human(params) if short_counts else count(params)) if params else "-",
        "trainable": _trainable_text(row),
        "macs": human(row["macs"]) if row["macs"] else "-",
        "rf": _pair(rf["size"]),
        "stride": _pair(rf["stride"]),
        "pad": _pair(rf["padding"]),
    }


def _table(title, columns, rows, compact: bool):
    from rich import box
    from rich.table import Table

    table = Table(
        title=title,
        title_justify="left",
        show_lines=False,
        pad_edge=False,
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
    )
    for key in columns:
        c = COLUMNS[key]
        # only names may shorten, never a number: the table is fitted before it is drawn
        overflow = "ellipsis" if key == "layer" else "fold"
        table.add_column(c.header, justify=c.justify, no_wrap=True, overflow=overflow)
    for cells in rows:
        table.add_row(*(cells[k] for k in columns))
    return table


def fit_table(console, title, columns, rows, kinds, named=()):
    """The widest form of the table that fits the console: block labels and counts
    abbreviated first, then a lighter frame, then columns dropped by DROP_ORDER (the
    `named` ones, which the user asked for, last). Returns the table and the columns
    it had to leave out."""
    from rich.measure import Measurement

    width = console.width
    unbounded = console.options.update_width(10**6)  # the natural width, not a clamped one
    columns = list(columns)
    drop_order = sorted(DROP_ORDER, key=lambda c: c in named)  # stable: DROP_ORDER within
    dropped: list[str] = []
    # (short block labels, short counts, light frame), from the fullest form down
    steps = [(False, False, False), (True, False, False), (True, True, False), (True, True, True)]
    while True:
        for short_labels, short_counts, compact in steps:
            cells = [_cells(r, kinds, short_labels, short_counts) for r in rows]
            table = _table(title, columns, cells, compact)
            if Measurement.get(console, unbounded, table).maximum <= width:
                return table, dropped
        victim = next((c for c in drop_order if c in columns), None)
        if victim is None:
            return table, dropped  # only names left to shorten: they take an ellipsis
        columns.remove(victim)
        dropped.append(victim)


def totals_phrases(summary: dict) -> list[str]:
    t = summary["totals"]
    frozen = t["params"] - t["trainable_params"]
    return [
        f"params: [bold]{count(t['params'])}[/] ({human(t['params'])})"
        + (f", of which {count(frozen)} not trainable" if frozen else ""),
        f"MACs: [bold]{human(t['macs'])}[/] per image",
        f"weights: {human_bytes(t['param_bytes'])}",
        f"activations per image: {human_bytes(t['activation_bytes_inference'])} inference, "
        f"{human_bytes(t['activation_bytes_training'])} training",
    ]


def pack_phrases(phrases: list[str], width: int, sep: str = "   ") -> list[str]:
    """Phrases (rich markup) joined into lines no wider than `width`, breaking only
    between phrases."""
    from rich.text import Text

    lines: list[str] = []
    for phrase in phrases:
        if lines:
            joined = lines[-1] + sep + phrase
            if Text.from_markup(joined).cell_len <= width:
                lines[-1] = joined
                continue
        lines.append(phrase)
    return lines


def render_summary(net, console, depth: int | None = 1, columns=DEFAULT_COLUMNS, named=()) -> None:
    """The summary table fitted to the console's width (see fit_table), then the totals
    in lines that break only between phrases."""
    summary = net.summary()
    kinds = block_types(net)
    title = f"{summary['name']}  input {shape_text(summary['input'])}"
    rows = group_rows(summary, depth)
    table, dropped = fit_table(console, title, columns, rows, kinds, named)
    console.print(table)
    for line in pack_phrases(totals_phrases(summary), console.width):
        console.print(line, overflow="fold")
    if dropped:
        console.print(
            f"[dim]{', '.join(dropped)} left out to fit {console.width} columns; "
            "--columns chooses[/]"
        )
    if depth is not None and any(len(x["name"].split(".")) > depth for x in summary["layers"]):
        console.print(
            f"[dim]blocks collapsed at depth {depth}; --depth N or --all to expand them[/]"
        )
    for w in net.warnings:
        console.print(f"[yellow]{w.format()}[/]")


def check_line(net) -> str:
    t = net.totals()
    frozen = t["params"] - t["trainable_params"]
    return (
        f"{net.file}: ok: {net.name}: input {shape_text(net.input_shape)} -> "
        f"{shape_text(net.output_shape)}, {count(t['trainable_params'])} trainable params"
        + (f" (+{count(frozen)} fixed)" if frozen else "")
        + f", {human(t['macs'])} MACs, {len(net.infos)} layers"
    )
