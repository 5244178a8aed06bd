"""The layer vocabulary as people read it: `cnnspec layers`, `cnnspec layers TYPE`
and the README's layer table, all from the layer classes' declarations."""

from __future__ import annotations

import inspect

from .base import REGISTRY, Layer


def layer_classes() -> list[type[Layer]]:
    """Every layer class once, in registration order."""
    return list(dict.fromkeys(REGISTRY.values()))


def _names(cls, quote="") -> str:
    aliases = ", ".join(f"{quote}{a}{quote}" for a in cls.aliases)
    return f"{quote}{cls.type_name}{quote}" + (f" ({aliases})" if aliases else "")


def _attr_defaults(cls) -> list[tuple[str, str]]:
    out = [(a.name, "" if a.required else f" ({a.default_text()})") for a in cls.attributes]
    return out + ([("inputs", " (required)")] if cls.min_inputs > 1 else [])


def vocabulary() -> str:
    """One line per layer type: names and what it computes."""
    rows = [(_names(cls), cls.description()) for cls in layer_classes()]
    width = max(len(n) for n, _ in rows)
    return "\n".join(f"{n:<{width}}  {d}" for n, d in rows)


def describe(cls: type[Layer]) -> str:
    """One type: its docstring, then each attribute's type, default and doc."""
    lines = [_names(cls), ""]
    lines += [inspect.cleandoc(cls.__doc__ or ""), ""]
    if cls.min_inputs > 1:
        lines.append(f"inputs: at least {cls.min_inputs}, named under `inputs: [...]`")
    if not cls.attributes:
        lines.append("attributes: none")
        return "\n".join(lines)
    lines.append("attributes:")
    rows = []
    for a in cls.attributes:
        rows.append((a.name, a.kind, f"= {a.default_text()}", a.doc))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        lines.append("  " + "  ".join(f"{r[i]:<{widths[i]}}" for i in range(3)) + "  " + r[3])
    return "\n".join(lines)


def markdown_table() -> str:
    """The README's layer table."""
    rows = ["| type (aliases) | what | attributes (default) |", "|---|---|---|"]
    for cls in layer_classes():
        attrs = ", ".join(f"`{name}`{default}" for name, default in _attr_defaults(cls))
        what = cls.description().replace("|", "\\|")
        rows.append(f"| {_names(cls, '`')} | {what} | {attrs or '—'} |")
    kinds: dict[str, list[str]] = {}  # the attributes' types, beyond plain numbers
    for cls in layer_classes():
        for a in cls.attributes:
            if a.kind not in ("int", "bool") and not a.kind.startswith("float"):
                names = kinds.setdefault(a.kind, [])
                names += [] if a.name in names else [a.name]
    legend = "; ".join(
        ", ".join(f"`{n}`" for n in names) + f": {kind}" for kind, names in kinds.items()
    )
    return "\n".join(rows) + f"\n\nTypes: {legend}." if legend else "\n".join(rows)
