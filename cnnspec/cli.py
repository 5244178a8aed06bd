"""The `cnnspec` command line."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from .errors import SpecError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Validate, analyse, compile and train convolutional networks written in YAML.",
    pretty_exceptions_enable=False,
)
# Piped output is 160 wide unless COLUMNS says otherwise (rich reads it when width is None).
_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
out = Console(highlight=False, emoji=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, emoji=False)


INPUT_FORMS = "SIZE, HxW or CxHxW (e.g. 160, 160x128, 3x160x128)"


def _input_error(message: str):
    raise typer.BadParameter(message, param_hint="'--input'")  # the command adds its usage


def _input_values(values) -> list[int]:
    """--input 160x128, '160 128', 160,128 (and, repeated, --input 160 --input 128)."""
    if isinstance(values, (str, int)):
        values = [values]
    sizes = []
    for value in values:
        text = str(value).strip().lower()
        if not re.fullmatch(r"[+-]?\d+(?:(?:\s*[x,]\s*|\s+)[+-]?\d+)*", text):
            _input_error(f"{value!r} is not a size: give {INPUT_FORMS}")
        sizes += [int(p) for p in re.findall(r"[+-]?\d+", text)]
    if not 1 <= len(sizes) <= 3:
        _input_error(f"give {INPUT_FORMS}, not {len(sizes)} numbers")
    if any(v < 1 for v in sizes):
        _input_error(f"sizes must be positive integers, got {'x'.join(map(str, sizes))}")
    return sizes


def _input_shape(spec_input, values):
    """--input SIZE, HxW or CxHxW: the spec's channels unless C is given."""
    if not values:
        return None
    values = _input_values(values)
    if len(values) == 1:
        return (spec_input[0], values[0], values[0])
    if len(values) == 2:
        return (spec_input[0], *values)
    return tuple(values)


def _stray_sizes(paths, input_given) -> None:
    """`--input 160 128` makes 128 a spec file: say how to write it instead."""
    stray = [p for p in paths if re.fullmatch(r"\d+", p) and not os.path.exists(p)]
    if stray and input_given:
        _input_error(
            f"{' '.join(stray)}: not a spec file; --input takes one value: "
            f"write it as {INPUT_FORMS}"
        )


def _load(path: str, input_values=None):
    from .network import build
    from .spec.load import load_file

    doc = load_file(path)
    shape = None
    if input_values:
        spec_input = doc.data.get("input") if isinstance(doc.data, dict) else None
        if not (isinstance(spec_input, list) and len(spec_input) == 3):
            spec_input = [3, 0, 0]  # the spec's own problems are reported
        shape = _input_shape(spec_input, input_values)
    return build(doc, shape)


def _print_problems(e: SpecError) -> None:
    for p in e.problems:
        err.print(p.format(), markup=False, highlight=False, soft_wrap=True)
    n = sum(p.severity == "error" for p in e.problems)
    err.print(f"[red]{n} error{'s' if n != 1 else ''}[/]")


InputSize = typer.Option(
    None,
    "--input",
    metavar="SIZE|HxW|CxHxW",
    help="Re-infer for another input size: SIZE, HxW or CxHxW (e.g. 160x128); "
    "the spec's channels unless C is given.",
)


@app.command()
def check(
    specs: list[str] = typer.Argument(..., help="Spec files."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
    input_size: list[str] = InputSize,
):
    """Validate specs; report every problem as FILE:LINE:COL."""
    _stray_sizes(specs, bool(input_size))
    if input_size:
        _input_values(input_size)  # a malformed --input is a usage error, whatever the spec
    results, failed = [], False
    for path in specs:
        try:
            net = _load(path, input_size)
        except SpecError as e:
            failed = True
            if as_json:
                results.append(
                    {
                        "file": path,
                        "ok": False,
                        "problems": [p.to_dict() | {"file": path} for p in e.problems],
                    }
                )
            else:
                _print_problems(e)
            continue
        t = net.totals()
        if as_json:
            results.append(
                {
                    "file": path,
                    "ok": True,
                    "name": net.name,
                    "input": list(net.input_shape),
                    "output_shape": list(net.output_shape),
                    **t,
                    "problems": [w.to_dict() for w in net.warnings],
                }
            )
        else:
            from .report import check_line

            print(check_line(net))
            for w in net.warnings:
                err.print(w.format(), markup=False, soft_wrap=True)
    if as_json:
        print(json.dumps(results, indent=2))
    raise typer.Exit(1 if failed else 0)


@app.command(context_settings={"allow_extra_args": True})
def summary(
    ctx: typer.Context,
    spec: str = typer.Argument(..., help="Spec file."),
    as_json: bool = typer.Option(False, "--json", help="The stable JSON form."),
    depth: int = typer.Option(1, "--depth", min=1, help="Collapse blocks below this depth."),
    show_all: bool = typer.Option(False, "--all", help="Show every primitive layer."),
    input_size: list[str] = InputSize,
    batch_size: int = typer.Option(
        None, "--batch-size", min=1, help="Also show the memory training takes at this batch."
    ),
    columns: str = typer.Option(
        None,
        "--columns",
        metavar="A,B,..|+A,..",
        help="Table columns, in order, from layer, type, kernel, output, params, trainable, "
        "MACs, RF, stride, pad; +NAME adds to the defaults. Columns that do not fit the "
        "terminal are left out, the ones named here last.",
    ),
):
    """Per-layer shapes, parameters, multiply-adds and receptive fields."""
    if ctx.args:  # `--input 160 128` leaves 128 here: say how to write it instead
        _stray_sizes(ctx.args, bool(input_size))
        raise typer.BadParameter(
            f"one spec file only; unexpected: {' '.join(ctx.args)}", param_hint="'SPEC'"
        )
    if input_size:
        _input_values(input_size)
    from .report import parse_columns, render_summary

    try:
        chosen, named = parse_columns(columns)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--columns'") from None
    try:
        net = _load(spec, input_size)
    except SpecError as e:
        _print_problems(e)
        raise typer.Exit(1) from None
    memory = None
    if batch_size:
        from .memory import estimate

        memory = estimate(net, batch_size)
    if as_json:
        result = net.summary()
        if memory:
            result["training_memory"] = {"batch_size": batch_size, "bytes": memory.total}
            result["training_memory"].update(
                {k.replace(" ", "_"): v for k, v in memory.parts.items()}
            )
        print(json.dumps(result, indent=2))
        return
    render_summary(net, out, None if show_all else depth, chosen, named)
    if memory:
        out.print(f"training at batch {batch_size} takes about {memory.describe()}", soft_wrap=True)


@app.command()
def draw(
    spec: str = typer.Argument(..., help="Spec file."),
    output: str = typer.Option(
        ..., "-o", "--output", help="net.svg, .png, .pdf (need Graphviz), .dot or .mmd (Mermaid)."
    ),
    depth: int = typer.Option(
        None, "--depth", min=1, help="Collapse blocks below this depth (default: every layer)."
    ),
    show: str = typer.Option(
        "", "--show", metavar="rf,params,macs", help="Add receptive field, params, MACs."
    ),
    fold: bool = typer.Option(
        True,
        "--fold/--no-fold",
        help="Draw activation, norm and dropout layers inside the layer they follow.",
    ),
    dpi: int = typer.Option(96, "--dpi", min=10, max=600, help="Resolution of a .png."),
    across: bool = typer.Option(False, "--across", help="Left to right instead of top down."),
    input_size: list[str] = InputSize,
):
    """Draw the network: layers with type, attributes and output shape; blocks as clusters."""
    from .draw import SHOW, build_diagram, output_format, write_diagram

    wanted = tuple(x.strip().lower() for x in show.split(",") if x.strip())
    unknown = [x for x in wanted if x not in SHOW]
    if unknown:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown)}; choose from {', '.join(SHOW)}", param_hint="'--show'"
        )
    _picture_path(output, output_format)
    net = _load_or_exit(spec, input_size)
    diagram = build_diagram(net, depth, wanted, fold)
    diagram.direction = "LR" if across else "TB"
    _write_picture(output, write_diagram, diagram, output, dpi)


@app.command()
def schema():
    """Print the JSON Schema (draft 2020-12) of a spec, for editors and tools."""
    from .spec.schema import schema as get_schema

    print(json.dumps(get_schema(), indent=2))


@app.command()
def layers(
    layer_type: str = typer.Argument(None, metavar="[TYPE]", help="One type to describe."),
):
    """List the layer types, or describe one: its attributes, their defaults and docs."""
    from .errors import did_you_mean
    from .layers import REGISTRY
    from .layers.docs import describe, vocabulary

    if layer_type is None:
        print(vocabulary())
        return
    if layer_type not in REGISTRY:
        hint = did_you_mean(layer_type, REGISTRY) or "`cnnspec layers` lists them"
        _fail(f"unknown layer type '{layer_type}'; {hint}", 2)
    print(describe(REGISTRY[layer_type]))


def _say(line: str) -> None:
    out.print(line, markup=False, soft_wrap=True)


def _compiling(model):
    """Compile notices (first runs only) on stderr, and parallel builds in the background
    (kernels/cpu/background.py), for the commands whose stdout may be read by a program."""
    return model.backend.compiling(lambda line: err.print(line, markup=False, soft_wrap=True))


def _fail(message: str, code: int = 1):
    err.print(f"[red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load_or_exit(spec: str, input_size=None):
    try:
        return _load(spec, input_size)
    except SpecError as e:
        _print_problems(e)
        raise typer.Exit(1) from None


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    import numba

    from .kernels import cpu  # noqa: F401  (its OpenMP spin setting precedes Numba's workers)

    limit = numba.config.NUMBA_NUM_THREADS
    if not 1 <= threads <= limit:
        _fail(f"--threads must be between 1 and {limit} on this machine", 2)
    numba.set_num_threads(threads)


def _spec_hash(net) -> str:
    """What a checkpoint must match: the network, not its training settings."""
    from .train.checkpoint import spec_hash

    return spec_hash(net.summary()["layers"])


def _dataset(source: str, split: str, net):
    from .train.data import check_labels, fit_to_input, load_data

    ds = load_data(source, split)
    ds = fit_to_input(ds, net.input_shape)
    check_labels(ds, int(net.outputs[-1].layer.out_shape[0]) if net.outputs else 0)
    return ds


Threads = typer.Option(None, "--threads", help="CPU threads for the kernels.")
Device = typer.Option(
    "cpu", "--device", help="cpu, cuda, or auto (CUDA when a GPU is usable, else CPU)."
)


def _device(choice: str) -> str:
    """The device to compile for; one line and exit 2 when it cannot run here."""
    from .backend import DeviceUnavailable, devices, get_backend, resolve_device

    if choice not in (*devices(), "auto"):
        _fail(f"unknown device '{choice}'; use " + ", ".join([*devices(), "auto"]), 2)
    device = resolve_device(choice)
    try:
        get_backend(device)
    except DeviceUnavailable as exc:
        _fail(str(exc), 2)  # _fail escapes: "[cuda]" is not markup
    if choice == "auto":
        why = "" if device == "cuda" else f" ({_cuda_reason()})"
        err.print(f"device: {device}{why}", highlight=False, soft_wrap=True, markup=False)
    return device


def _cuda_reason() -> str:
    from .kernels.cuda.backend import BACKEND

    return BACKEND.unusable() or ""


Strict = typer.Option(
    False, "--strict", help="Inputs outside the training range are an error, not a warning."
)


def _check_range(ds, model, strict: bool) -> None:
    """Warn (or, strict, fail) when inputs were scaled unlike the training data."""
    from .train.data import input_range, range_mismatch

    problem = range_mismatch(input_range(ds), model.trained_inputs)
    if problem and strict:
        _fail(f"{ds.name}: {problem}")
    if problem:
        err.print(
            f"[yellow]warning:[/] {ds.name}: {problem} (--strict makes this an error)",
            highlight=False,
            soft_wrap=True,
        )


@app.command()
def train(
    spec: str = typer.Argument(..., help="Spec file."),
    data: str = typer.Option(
        None,
        "--data",
        help="digits (built in), an .npz file, an MNIST "
        "IDX or CIFAR-10 directory. Default: the spec's train.data.",
    ),
    epochs: int = typer.Option(None, "--epochs", min=1),
    batch_size: int = typer.Option(None, "--batch-size", min=1),
    lr: float = typer.Option(None, "--lr", min=0.0),
    momentum: float = typer.Option(None, "--momentum", min=0.0, max=0.999999),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov"),
    weight_decay: float = typer.Option(None, "--weight-decay", min=0.0),
    schedule: str = typer.Option(None, "--schedule", help="constant, step, multistep, cosine"),
    warmup_epochs: float = typer.Option(None, "--warmup-epochs", min=0.0),
    crop_padding: int = typer.Option(
        None, "--crop-padding", min=0, help="Augment: random crop after zero padding."
    ),
    hflip: bool = typer.Option(None, "--hflip/--no-hflip", help="Augment: horizontal flips."),
    val_split: float = typer.Option(None, "--val-split", min=0.0, max=0.95),
    seed: int = typer.Option(None, "--seed", min=0),
    out_dir: str = typer.Option(None, "--out", help="Output directory (default runs/NAME)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.npz."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start afresh in an OUT that holds a run (deletes it)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    threads: int = typer.Option(
        None,
        "--threads",
        help="CPU threads for the kernels (under MPI, per process: default the node's "
        "cores over its processes).",
    ),
    scale_lr: bool = typer.Option(
        False, "--scale-lr", help="Under MPI: lr x processes, with a linear warm-up to it."
    ),
    step_timeout: float = typer.Option(
        None,
        "--step-timeout",
        min=0.0,
        metavar="S",
        help="Abort the job when no step, validation or save finishes for S seconds.",
    ),
    device: str = Device,
    patience: int = typer.Option(
        None, "--patience", min=1, help="Stop when --monitor has not improved for N epochs."
    ),
    monitor: str = typer.Option(
        "val_loss",
        "--monitor",
        help="What --patience watches: val_loss, val_acc, train_loss, train_acc.",
    ),
    min_delta: float = typer.Option(
        0.0, "--min-delta", min=0.0, help="The least change --patience counts as better."
    ),
    tensorboard: bool = typer.Option(
        False, "--tensorboard", help="Write TensorBoard scalars to OUT/tensorboard."
    ),
    histograms: bool = typer.Option(
        False, "--histograms", help="With --tensorboard: weight and gradient histograms too."
    ),
):
    """Train a spec with SGD; checkpoints and metrics go to OUT/. Data-parallel on MPI when
    started by mpiexec/srun (see the README)."""
    from .memory import check_fits
    from .train import DataError, TrainingDiverged, TrainingInterrupted, fit, split_dataset
    from .train.checkpoint import CheckpointError
    from .train.dist import (
        DistError,
        default_threads,
        launch_note,
        ranks_on_node,
        scale_learning_rate,
        world,
    )
    from .train.loop import DEFAULTS, RUN_DEFAULTS, check_resume_settings
    from .train.rundir import RunDirError, check_run_dir
    from .train.schedules import validate_schedule

    try:
        processes = world()
    except DistError as exc:
        _fail(str(exc))
    if not processes.root:  # every rank runs the same checks; one says what happens
        out.quiet = err.quiet = True
    notes = [launch_note(processes)]
    if threads is None:
        threads, pinned = default_threads(processes)
        notes.append(pinned)
    for note in filter(None, notes):
        err.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    _set_threads(threads)
    processes.step_timeout = step_timeout
    net = _load_or_exit(spec)
    device = _device(device)
    if device != "cpu" and getattr(processes, "size", 1) > 1:
        _fail("data-parallel training (MPI) runs on the CPU backend only; use --device cpu", 2)
    if not net.outputs:
        _fail(f"{spec}: the network has no output layer (softmax, linear or rbf) to train")
    cfg = net.train_config
    flags = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "warmup_epochs": warmup_epochs,
        "val_split": val_split,
        "seed": seed,
        "data": data,
        "crop_padding": crop_padding,
        "hflip": hflip,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    source = cfg.setdefault("data", RUN_DEFAULTS["data"])
    val_fraction = cfg.setdefault("val_split", RUN_DEFAULTS["val_split"])
    cfg.setdefault("batch_size", RUN_DEFAULTS["batch_size"])
    cfg.setdefault("seed", DEFAULTS["seed"])
    if scale_lr:
        out.print(scale_learning_rate(cfg, processes.size), markup=False, soft_wrap=True)
    out_path = Path(out_dir or Path("runs") / net.name)
    try:  # every setting, the output directory and the memory, before any work
        validate_schedule({**DEFAULTS, **cfg})
        check_run_dir(out_path, resume, overwrite)
        if resume:
            check_resume_settings(out_path, cfg)
        # again at compile time, with the data loaded; the node's memory is its processes'
        if device == "cpu":
            check_fits(net, cfg["batch_size"], sharing=ranks_on_node(processes))
    except (ValueError, RunDirError, CheckpointError) as exc:
        _fail(str(exc))
    try:
        ds = _dataset(source, "train", net)
        train_ds, val_ds = (
            split_dataset(ds, val_fraction, cfg["seed"]) if val_fraction else (ds, None)
        )
        if len(train_ds) < cfg["batch_size"] * processes.size:
            _fail(
                f"the training set has {len(train_ds)} images, fewer than one batch of "
                f"{processes.describe(cfg['batch_size'])}; lower --batch-size"
            )
        callbacks = _train_callbacks(
            patience,
            monitor,
            min_delta,
            val_ds is not None,
            tensorboard,
            histograms,
            out_path,
            processes.root,
        )
        model = net.compile(device=device, batch_size=cfg["batch_size"], seed=cfg["seed"])
        cfg["spec_hash"] = _spec_hash(net)
        out.print(
            f"training [bold]{net.name}[/] on {ds.name} ({len(train_ds)} train, "
            f"{len(val_ds) if val_ds else 0} validation images), "
            f"{processes.describe(cfg['batch_size'])}, "
            f"{cfg.get('epochs', DEFAULTS['epochs'])} epochs -> {out_path}/"
        )
        say = _say if processes.root else lambda line: None
        with model.backend.compiling(say, alone=processes.size == 1):
            history = fit(
                model,
                train_ds,
                val_ds,
                cfg,
                out_path,
                resume=resume,
                progress=progress,
                console=out,
                world=processes,
                overwrite=overwrite,
                callbacks=callbacks,
            )
    except (DataError, CheckpointError, RunDirError, ValueError) as exc:
        _fail(str(exc))
    except TrainingInterrupted as exc:
        err.print(f"[yellow]interrupted:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(128 + exc.signum) from None
    except TrainingDiverged as exc:
        _fail(str(exc))
    if history:
        last = history[-1]
        best = max((h.get("val_acc") or h.get("train_acc") or 0.0) for h in history)
        out.print(
            f"done: epoch {last['epoch']}, best accuracy {best:.2%}; weights in "
            f"{out_path / 'best.npz'}, metrics in {out_path / 'metrics.jsonl'} (and .csv)"
        )


def _train_callbacks(
    patience, monitor, min_delta, has_val, tensorboard, histograms, out_path, root=True
):
    """Early stopping and TensorBoard, as the train flags ask (ValueError: a bad flag);
    under MPI only rank 0 (`root`) writes TensorBoard events."""
    from .train.callbacks import MONITORS, EarlyStopping, TensorBoardLog

    if monitor not in MONITORS:
        raise ValueError(f"--monitor must be one of {', '.join(MONITORS)}, not {monitor!r}")
    callbacks = []
    if patience is not None:
        if monitor.startswith("val_") and not has_val:
            raise ValueError(
                f"--monitor {monitor} needs validation data: give --val-split above 0, "
                f"or --monitor {monitor.replace('val_', 'train_')}"
            )
        callbacks.append(EarlyStopping(patience, monitor, min_delta))
    if histograms and not tensorboard:
        raise ValueError("--histograms goes with --tensorboard")
    if tensorboard and root:
        callbacks.append(TensorBoardLog(out_path / "tensorboard", histograms))
    return callbacks


def _restored_model(
    spec: str,
    weights: str | None,
    batch_size: int,
    device: str = "cpu",
    training: bool = False,
    keep=(),
):
    """The spec compiled with the checkpoint's weights (its initial ones when None);
    training=True keeps every activation in a buffer of its own (but a batch norm that
    its readers apply writes none: keep it)."""
    from .train import restore_model
    from .train.checkpoint import CheckpointError

    net = _load_or_exit(spec)
    compile_for = _device(device)
    try:
        model = net.compile(device=compile_for, batch_size=batch_size, training=training, keep=keep)
        if weights is None:
            return net, model
        restore_model(model, weights, _spec_hash(net))
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))
    return net, model


@app.command("eval")
def evaluate_cmd(
    spec: str = typer.Argument(..., help="Spec file."),
    weights: str = typer.Option(..., "--weights", help="A checkpoint (.npz) of this spec."),
    data: str = typer.Option(None, "--data", help="Data source (default: the spec's)."),
    split: str = typer.Option("test", "--split", help="train or test"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    as_json: bool = typer.Option(False, "--json"),
    strict: bool = Strict,
    threads: int = Threads,
    device: str = Device,
):
    """Loss, top-1/top-5 accuracy and confusion matrix of trained weights."""
    from .train import DataError, evaluate
    from .train.loop import RUN_DEFAULTS

    _set_threads(threads)
    net, model = _restored_model(spec, weights, batch_size, device)
    source = data or net.train_config.get("data", RUN_DEFAULTS["data"])
    try:
        ds = _dataset(source, split, net)
        _check_range(ds, model, strict)
        with _compiling(model):
            result = evaluate(model, ds)
    except DataError as exc:
        _fail(str(exc))
    result["data"] = ds.name
    if as_json:
        print(json.dumps(result, indent=2))
        return
    from rich.table import Table

    line = (
        f"{net.name} on {ds.name} ({result['count']} images): loss {result['loss']:.4f}, "
        f"top-1 {result['accuracy']:.2%}"
    )
    if "top5" in result:
        line += f", top-5 {result['top5']:.2%}"
    out.print(line)
    confusion = result["confusion"]
    if len(confusion) <= 20:
        table = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
        table.add_column("")
        for k in range(len(confusion)):
            table.add_column(str(k), justify="right")
        for k, row in enumerate(confusion):
            table.add_row(
                str(k),
                *[
                    f"[bold]{v}[/]" if i == k else (str(v) if v else "[dim].[/]")
                    for i, v in enumerate(row)
                ],
            )
        out.print(table)


@app.command()
def predict(
    spec: str = typer.Argument(..., help="Spec file."),
    inputs: list[str] = typer.Argument(
        ...,
        help="Image files (PNG, JPEG, ...), folders of them, .npy (N,C,H,W or N,H,W) "
        "or .npz (x) arrays.",
    ),
    weights: str = typer.Option(..., "--weights", help="A checkpoint (.npz) of this spec."),
    top: int = typer.Option(1, "--top", min=1, help="How many classes to show per image."),
    labels: str = typer.Option(None, "--labels", help="Class names, one a line."),
    as_json: bool = typer.Option(False, "--json"),
    strict: bool = Strict,
    threads: int = Threads,
    device: str = Device,
):
    """Classify images with trained weights, scaled and resized as in training."""
    import numpy as np

    from .interop.inputs import read_inputs, read_labels
    from .train.data import Batches, DataError

    _set_threads(threads)
    net, model = _restored_model(spec, weights, 64, device)
    try:
        names = read_labels(labels, model.num_outputs) if labels else None
        ds, sources = read_inputs(inputs, net.input_shape)
    except DataError as exc:
        _fail(str(exc))
    _check_range(ds, model, strict)
    results = []
    with _compiling(model):
        scores = [model.probabilities(x)[:n] for x, _, n in Batches(ds, model.batch_size)]
    for row in (row for batch in scores for row in batch):
        best = np.argsort(-row)[:top]
        results.append(
            [
                {"class": int(k), "probability": float(row[k])}
                | ({"label": names[k]} if names else {})
                for k in best
            ]
        )
    if as_json:
        print(
            json.dumps(
                [
                    {"index": i, "input": src, "top": r}
                    for i, (src, r) in enumerate(zip(sources, results, strict=True))
                ],
                indent=2,
            )
        )
        return
    for src, r in zip(sources, results, strict=True):
        shown = ", ".join(f"{c.get('label', c['class'])} ({c['probability']:.1%})" for c in r)
        out.print(f"{src}: {shown}", markup=False, soft_wrap=True)


@app.command("export")
def export_cmd(
    spec: str = typer.Argument(..., help="Spec file."),
    output: str = typer.Option(..., "-o", "--output", help="The ONNX file to write."),
    weights: str = typer.Option(
        None, "--weights", help="A checkpoint (.npz) of this spec (default: initial weights)."
    ),
    aux: bool = typer.Option(True, "--aux/--no-aux", help="Auxiliary heads as extra outputs."),
):
    """Write the network and its weights as ONNX (opset 17, dynamic batch); open it in Netron."""
    if weights:
        net, model = _restored_model(spec, weights, 1)
    else:
        net = _load_or_exit(spec)
        model = net.compile(batch_size=1, training=False)
        err.print("note: no --weights given; exporting the initial (untrained) weights")
    try:
        model.export_onnx(output, aux=aux)
    except ImportError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{output}: cannot write ({exc.strerror or exc})")
    heads = model.outputs if aux else [model.head]
    out.print(
        f"wrote {output}: {net.name}, input [N, {', '.join(map(str, net.input_shape))}], "
        f"outputs {', '.join(h.name for h in heads) or model.head.name}",
        soft_wrap=True,
    )


weights_app = typer.Typer(
    no_args_is_help=True,
    help="Weights in and out: PyTorch state_dicts (.pt/.pth) and .safetensors files.",
)
app.add_typer(weights_app, name="weights")


@weights_app.command("import")
def weights_import(
    spec: str = typer.Argument(..., help="Spec file."),
    file: str = typer.Argument(..., help="A PyTorch state_dict (.pt/.pth) or .safetensors file."),
    output: str = typer.Option(..., "-o", "--output", help="The checkpoint (.npz) to write."),
    rename_map: str = typer.Option(
        None, "--map", help="YAML of renames: FILE-NAME-REGEX: SPEC-NAME (\\1 for groups)."
    ),
    by: str = typer.Option(
        "auto", "--by", help="auto (names, else the file's order), names or order."
    ),
):
    """Make a cnnspec checkpoint from another framework's weights; every shape checked."""
    from .interop.weights import WeightsError, match_weights, read_map, read_tensors
    from .train.checkpoint import save_checkpoint

    if by not in ("auto", "names", "order"):
        raise typer.BadParameter(f"{by!r}: use auto, names or order", param_hint="'--by'")
    net = _load_or_exit(spec)
    try:
        rules = read_map(rename_map) if rename_map else []
        tensors = read_tensors(file)
    except WeightsError as exc:
        _fail(str(exc))
    try:
        found = match_weights(net, tensors, rules, by)
    except WeightsError as exc:
        err.print(f"[red]error:[/] {file}: {exc}", highlight=False, soft_wrap=True)
        for line in exc.details:
            err.print(f"  {line}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    meta = {"kind": "weights", "spec_hash": _spec_hash(net), "source": os.path.basename(file)}
    try:
        save_checkpoint(output, {f"param/{k}": v for k, v in found.arrays.items()}, meta)
    except OSError as exc:
        _fail(f"{output}: cannot write ({exc.strerror or exc})")
    values = sum(int(v.size) for v in found.arrays.values())
    skipped = f"; skipped {len(found.skipped)} num_batches_tracked" if found.skipped else ""
    out.print(
        f"wrote {output}: {len(found.arrays)} tensors ({values:,} values) of {net.name}, "
        f"matched by {found.by}{skipped}",
        soft_wrap=True,
    )


@weights_app.command("export")
def weights_export(
    spec: str = typer.Argument(..., help="Spec file."),
    weights: str = typer.Argument(..., help="A checkpoint (.npz) of this spec."),
    output: str = typer.Option(..., "-o", "--output", help="A .safetensors or .pt file."),
):
    """Write a checkpoint's weights as LAYER.PARAM tensors (PyTorch layouts)."""
    from .interop.weights import WeightsError, write_tensors

    net, model = _restored_model(spec, weights, 1)
    try:
        write_tensors(output, model.params, {"cnnspec_spec": net.name})
    except WeightsError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{output}: cannot write ({exc.strerror or exc})")
    out.print(f"wrote {output}: {len(model.params)} tensors of {net.name}", soft_wrap=True)


@app.command("bench")
def bench_cmd(
    spec: str = typer.Argument(..., help="Spec file."),
    batch: int = typer.Option(64, "--batch", min=1, help="Batch size."),
    threads: int = Threads,
    repeat: int = typer.Option(20, "--repeat", min=1, help="Timed runs per measurement."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed runs before each."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable result."),
    input_size: list[str] = InputSize,
    device: str = Device,
):
    """Time eval forward, train forward+backward and SGD steps; per-layer times; GFLOP/s."""
    from .bench import bench, render_bench

    _set_threads(threads)
    net = _load_or_exit(spec, input_size)
    device = _device(device)
    try:
        result = bench(
            net, batch=batch, threads=threads, warmup=warmup, repeat=repeat, device=device
        )
    except ValueError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(result, indent=2))
        return
    render_bench(result, out)


@app.command()
def plot(
    runs: list[str] = typer.Argument(..., help="Run directories of `cnnspec train` (OUT/)."),
    output: str = typer.Option(..., "-o", "--output", help="curves.png, .svg or .pdf"),
):
    """Training curves: loss and accuracy per epoch (several runs overlaid), learning rate."""
    from .plots import PictureError, file_format, plot_curves, read_runs

    _picture_path(output, file_format)
    try:
        read = read_runs(runs)
    except PictureError as exc:
        _fail(str(exc))
    _write_picture(output, plot_curves, read, output)


show_app = typer.Typer(
    no_args_is_help=True, help="Pictures of a trained network: its filters and feature maps."
)
app.add_typer(show_app, name="show")
Weights = typer.Option(
    None, "--weights", help="A checkpoint (.npz) of this spec (default: the initial weights)."
)
Layer = typer.Option(..., "--layer", help="The layer's name, as `summary --all` lists it.")
Picture = typer.Option(..., "-o", "--output", help="A .png, .svg or .pdf file.")


def _picture_path(output: str, output_format) -> None:
    """A usage error (exit 2) for a file name whose suffix names no format we write."""
    from .plots import PictureError

    try:
        output_format(output)
    except PictureError as exc:
        _fail(str(exc), 2)


def _write_picture(output: str, write, *args) -> None:
    """write(*args), which makes `output`; any failure as one line."""
    from .plots import PictureError

    try:
        write(*args)
    except PictureError as exc:
        _fail(str(exc))
    except OSError as exc:
        _fail(f"{output}: cannot write it ({exc.strerror or exc})")
    out.print(f"wrote {output}", markup=False, highlight=False)


def _layer_info(net, name: str, fits, wanted: str):
    """The layer called `name`, if `fits(info)`; else a one-line error listing those that do."""
    fitting = [i.name for i in net.infos if fits(i)]
    info = next((i for i in net.infos if i.name == name), None)
    if info is None or not fits(info):
        what = "no layer" if info is None else f"{info.node.type} layer"
        listed = ", ".join(fitting[:12]) + (", ..." if len(fitting) > 12 else "")
        _fail(f"--layer {name}: {what} of {net.name} with {wanted}; choose one of: {listed}")
    return info


@show_app.command("filters")
def show_filters(
    spec: str = typer.Argument(..., help="Spec file."),
    layer: str = Layer,
    output: str = Picture,
    weights: str = Weights,
    max_filters: int = typer.Option(64, "--max", min=1, help="Show at most this many filters."),
):
    """A convolution's kernels as a grid (colour for a first layer that reads RGB)."""
    from .plots import file_format, plot_filters

    _picture_path(output, file_format)
    net, model = _restored_model(spec, weights, 1)
    kernels = lambda i: getattr(model.params.get(f"{i.name}.weight"), "ndim", 0) == 4  # noqa: E731
    info = _layer_info(net, layer, kernels, "convolution kernels")
    weight = model.params[f"{layer}.weight"]
    if weight.shape[0] != info.layer.attrs.get("filters", weight.shape[0]):
        weight = weight.transpose(1, 0, 2, 3)  # conv_transpose2d keeps [in, out, kh, kw]
    trained = Path(weights).name if weights else "initial weights"
    title = f"{net.name} {layer}: {weight.shape[0]} filters {weight.shape[2]}x{weight.shape[3]}"
    _write_picture(output, plot_filters, weight, f"{title} ({trained})", output, max_filters)


@show_app.command("maps")
def show_maps(
    spec: str = typer.Argument(..., help="Spec file."),
    layer: str = Layer,
    image: str = typer.Option(..., "--image", help="One image: .png, .jpg or .npy."),
    output: str = Picture,
    weights: str = Weights,
    max_maps: int = typer.Option(64, "--max", min=1, help="Show at most this many maps."),
):
    """The feature maps (activations) of one input image at a layer."""
    import numpy as np

    from .interop.inputs import read_inputs
    from .plots import file_format, plot_maps
    from .report import shape_text
    from .train.data import DataError

    _picture_path(output, file_format)
    net, model = _restored_model(spec, weights, 1, training=True)
    if layer in model.unwritten:  # a batch norm its readers apply: have it write its output
        shown = model.relu_of.get(layer, layer)  # (after a ReLU)
        net, model = _restored_model(spec, weights, 1, training=True, keep=(shown,))
    elif layer in model.folded:  # a conv that writes its norm's output in eval mode
        net, model = _restored_model(spec, weights, 1, training=True, keep=(layer,))
    info = _layer_info(net, layer, lambda i: len(i.layer.out_shape) == 3, "CxHxW maps")
    try:  # read as predict reads it: the same scaling, channels and resize as training
        ds, _ = read_inputs([image], net.input_shape)
    except DataError as exc:
        _fail(str(exc))
    if len(ds) != 1:
        _fail(f"{image}: holds {len(ds)} images; show maps draws one (save that one alone)")
    model.forward(ds.x)
    maps = np.array(model.buf[layer][0])
    after = model.relu_of.get(layer)
    note = f", after {after}" if after else ""  # a fused ReLU works in its producer's buffer
    trained = Path(weights).name if weights else "initial weights"
    title = f"{net.name} {layer} ({info.node.type}{note}): {shape_text(maps.shape)} ({trained})"
    _write_picture(output, plot_maps, ds.x[0], maps, title, output, max_maps)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
