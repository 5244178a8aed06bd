"""What `check` and `summary` show: the stable JSON form and the rich table."""

from __future__ import annotations

import math

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


def _block_label(row, kinds) -> str:
    """'inception (14 layers)', or 'basic x3 (21 layers)' for a repeated block."""
    name = row["name"]
    kind, copies = kinds.get(name), 1
    if kind is None:
        depth = name.count(".") + 1
        inner = [n for n in kinds if n.startswith(name + ".") and n.count(".") == depth]
        kind = kinds.get(inner[0], "block") if inner else "block"
        copies = len(inner) or 1
    times = f" x{copies}" if copies > 1 else ""
    return f"[cyan]{kind}[/]{times} ({row['count']} layers)"


def _pair(v) -> str:
    return str(v[0]) if v[0] == v[1] else f"{v[0]}x{v[1]}"


def render_summary(net, console, depth: int | None = 1) -> None:
    from rich.table import Table

    summary = net.summary()
    kinds = block_types(net)
    table = Table(
        title=f"{summary['name']}  input {shape_text(summary['input'])}",
        title_justify="left",
        show_lines=False,
        pad_edge=False,
    )
    for col, justify in (
        ("layer", "left"),
        ("type", "left"),
        ("output", "right"),
        ("params", "right"),
        ("MACs", "right"),
        ("RF", "right"),
        ("stride", "right"),
        ("pad", "right"),
    ):
        table.add_column(col, justify=justify, no_wrap=True)
    for row in group_rows(summary, depth):
        kind = row["type"] or _block_label(row, kinds)
        rf = row["receptive_field"]
        table.add_row(
            "  " * row["depth"] + row["name"],
            kind,
            shape_text(row["output_shape"]),
            count(row["params"]) if row["params"] else "-",
            human(row["macs"]) if row["macs"] else "-",
            _pair(rf["size"]),
            _pair(rf["stride"]),
            _pair(rf["padding"]),
        )
    console.print(table)
    t = summary["totals"]
    frozen = t["params"] - t["trainable_params"]
    console.print(
        f"params: [bold]{count(t['params'])}[/] ({human(t['params'])})"
        + (f", of which {count(frozen)} not trainable" if frozen else "")
        + f"   MACs: [bold]{human(t['macs'])}[/] per image"
        + f"   weights: {human_bytes(t['param_bytes'])}"
        + f"   activations: {human_bytes(t['activation_bytes'])} per image"
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
