"""Pictures drawn with matplotlib: training curves (`cnnspec plot`), a layer's filters
and one image's feature maps (`cnnspec show`).

matplotlib's object API with the Agg canvas: no pyplot, no global backend, no window,
so it works on a server and inside tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

PICTURE_FORMATS = ("png", "svg", "pdf")


class PictureError(Exception):
    """A picture (plot, diagram) that cannot be made; the message says what to do."""


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PictureError("pictures need matplotlib: pip install 'cnnspec[plot]'") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def file_format(path: str | Path, formats=PICTURE_FORMATS) -> str:
    """The format a file name's suffix names, one of `formats`; PictureError otherwise."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in formats:
        raise PictureError(
            f"{path}: cannot tell the format from the file name; end it in "
            + ", ".join("." + f for f in formats)
        )
    return fmt


def save(fig, path: str | Path, dpi: int = 100) -> None:
    fig.savefig(path, format=file_format(path), dpi=dpi)


# ---------------------------------------------------------------- training curves


def read_run(path: str | Path) -> tuple[str, list[dict]]:
    """(label, records) of a run directory (or its metrics.jsonl); PictureError if unreadable."""
    p = Path(path)
    file = p / "metrics.jsonl" if p.is_dir() else p
    if not file.is_file():
        raise PictureError(
            f"{path}: no metrics.jsonl there; give a run directory of `cnnspec train`"
        )
    records = []
    for n, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise PictureError(f"{file}:{n}: not a JSON line of metrics") from None
    if not records:
        raise PictureError(f"{file}: no epochs recorded yet")
    label = p.name if p.is_dir() else p.parent.name
    return label or str(p), records


def read_runs(paths) -> list[tuple[str, list[dict]]]:
    """Each run labelled by its directory's name, or by the path as given when two
    names are the same."""
    runs = [read_run(p) for p in paths]
    if len({label for label, _ in runs}) < len(runs):
        runs = [(str(p), records) for p, (_, records) in zip(paths, runs, strict=True)]
    return runs


def plot_curves(runs: list[tuple[str, list[dict]]], path: str | Path) -> None:
    """Loss and accuracy per epoch (training solid, validation dashed), one colour per run,
    and the learning rate on a panel of its own."""
    fig = _figure(12, 3.6)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    colours = [f"C{k % 10}" for k in range(len(runs))]
    for (label, records), colour in zip(runs, colours, strict=True):
        epochs = [r["epoch"] for r in records]
        for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                values = [r.get(f"{split}_{key}") for r in records]
                if all(v is None for v in values):
                    continue
                ys = [math.nan if v is None else v for v in values]
                ax.plot(epochs, ys, style, color=colour, label=f"{label} {split}", marker=".")
        lr_ax.plot(epochs, [r["lr"] for r in records], color=colour, label=label, marker=".")
    loss_ax.set(title="loss (cross-entropy)", xlabel="epoch")
    acc_ax.set(title="accuracy", xlabel="epoch", ylim=(0, 1.0))
    acc_ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    lr_ax.set(title="learning rate (at epoch start)", xlabel="epoch")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    loss_ax.legend(fontsize="small")
    if len(runs) > 1:
        lr_ax.legend(fontsize="small")
    save(fig, path)


# ---------------------------------------------------------------- filters and maps


def _normalised(a: np.ndarray) -> np.ndarray:
    """Scaled into [0, 1] (a constant array becomes 0.5): each picture's own contrast."""
    lo, hi = float(a.min()), float(a.max())
    return np.full_like(a, 0.5) if hi <= lo else (a - lo) / (hi - lo)


def _grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns for n tiles: one row up to 8, else about square."""
    cols = n if n <= 8 else math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def plot_filters(weight: np.ndarray, title: str, path: str | Path, max_filters: int = 64):
    """A convolution's kernels [out, in, kh, kw]: one tile per filter, in colour when it
    reads 3 channels (an RGB first layer); otherwise, with several input channels, one
    grey tile per (input channel, filter): filters as columns. Each tile has its own
    contrast."""
    out_c, in_c = weight.shape[:2]
    shown = min(out_c, max_filters)
    colour = in_c == 3
    notes = [] if shown == out_c else [f"first {shown} of {out_c} filters"]
    if colour or in_c == 1:
        rows, cols = _grid_shape(shown)
        tiles = [(k, None) for k in range(shown)]
    else:
        in_shown = min(in_c, 16)
        rows, cols = in_shown, shown
        tiles = [(k, c) for c in range(in_shown) for k in range(shown)]
        notes.append("columns: filters, rows: input channels" + ("" if in_c <= 16 else " 0-15"))
    size = max(0.35, min(1.0, 8.0 / max(rows, cols)))
    fig = _figure(max(cols * size + 0.4, 4.5), rows * size + 0.8)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, (k, c) in zip(axes, tiles, strict=False):
        if c is None:
            tile = weight[k].transpose(1, 2, 0) if colour else weight[k, 0]
            ax.imshow(_normalised(tile), cmap=None if colour else "gray", interpolation="nearest")
        else:
            ax.imshow(_normalised(weight[k, c]), cmap="gray", interpolation="nearest")
    fig.suptitle("\n".join([title, *notes]), fontsize="medium")
    save(fig, path)


def plot_maps(
    image: np.ndarray, maps: np.ndarray, title: str, path: str | Path, max_maps: int = 64
):
    """The input image, then one tile per channel of `maps` [C, H, W] (viridis, each
    with its own contrast: brighter = stronger response)."""
    shown = min(len(maps), max_maps)
    rows, cols = _grid_shape(shown + 1)
    size = max(0.6, min(1.4, 10.0 / max(rows, cols)))
    fig = _figure(max(cols * size + 0.4, 4.5), rows * size + 0.7)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes:
        ax.set_axis_off()
    rgb = image.shape[0] == 3
    picture = image.transpose(1, 2, 0) if rgb else image[0]
    axes[0].imshow(_normalised(picture), cmap=None if rgb else "gray", interpolation="nearest")
    axes[0].set_title("input", fontsize="small")
    for k in range(shown):
        axes[k + 1].imshow(_normalised(maps[k]), cmap="viridis", interpolation="nearest")
        axes[k + 1].set_title(str(k), fontsize="x-small")
    note = "" if shown == len(maps) else f" (first {shown} of {len(maps)} maps)"
    fig.suptitle(title + note, fontsize="medium")
    save(fig, path)
