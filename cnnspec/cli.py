"""The `cnnspec` command line."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from .errors import SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Validate, analyse, compile and train convolutional networks written in YAML.",
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False)


def _input_shape(spec_input, values: list[int] | None):
    """--input H W, --input S, or --input C H W."""
    if not values:
        return None
    if len(values) == 1:
        return (spec_input[0], values[0], values[0])
    if len(values) == 2:
        return (spec_input[0], *values)
    if len(values) == 3:
        return tuple(values)
    raise typer.BadParameter("give SIZE, H W, or C H W", param_hint="--input")


def _load(path: str, input_values=None):
    from .network import build
    from .spec.load import load_file

    doc = load_file(path)
    shape = None
    if input_values:
        spec_input = doc.data.get("input") if isinstance(doc.data, dict) else None
        if not (isinstance(spec_input, list) and len(spec_input) == 3):
            spec_input = [3, 0, 0]
        shape = _input_shape(spec_input, input_values)
    return build(doc, shape)


def _print_problems(e: SpecError) -> None:
    for p in e.problems:
        err.print(p.format(), markup=False, highlight=False)
    n = sum(p.severity == "error" for p in e.problems)
    err.print(f"[red]{n} error{'s' if n != 1 else ''}[/]")


InputOpt = typer.Option(None, "--input", help="Re-infer for another input: SIZE, H W, or C H W.")


@app.command()
def check(
    specs: list[str] = typer.Argument(..., help="Spec files."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
    input_size: list[int] = InputOpt,
):
    """Validate specs; report every problem as FILE:LINE:COL."""
    results, failed = [], False
    for path in specs:
        try:
            net = _load(path, input_size)
        except SpecError as e:
            failed = True
            if as_json:
                results.append({"file": path, "ok": False,
                                "problems": [p.to_dict() | {"file": path} for p in e.problems]})
            else:
                _print_problems(e)
            continue
        t = net.totals()
        if as_json:
            results.append({
                "file": path, "ok": True, "name": net.name, "input": list(net.input_shape),
                "output_shape": list(net.output_shape), **t,
                "problems": [w.to_dict() for w in net.warnings],
            })
        else:
            from .report import check_line

            print(check_line(net))
            for w in net.warnings:
                err.print(w.format(), markup=False)
    if as_json:
        print(json.dumps(results, indent=2))
    raise typer.Exit(1 if failed else 0)


@app.command()
def summary(
    spec: str = typer.Argument(..., help="Spec file."),
    as_json: bool = typer.Option(False, "--json", help="The stable JSON form."),
    depth: int = typer.Option(1, "--depth", min=1, help="Collapse blocks below this depth."),
    show_all: bool = typer.Option(False, "--all", help="Show every primitive layer."),
    input_size: list[int] = InputOpt,
):
    """Per-layer shapes, parameters, multiply-adds and receptive fields."""
    try:
        net = _load(spec, input_size)
    except SpecError as e:
        _print_problems(e)
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(net.summary(), indent=2))
        return
    from .report import render_summary

    render_summary(net, out, None if show_all else depth)


@app.command()
def schema():
    """Print the JSON Schema (draft 2020-12) of a spec, for editors and tools."""
    from .spec.schema import schema as get_schema

    print(json.dumps(get_schema(), indent=2))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
