"""What the trainer tells the outside world after each epoch: a CSV copy of the metrics,
TensorBoard scalars, and early stopping.

A callback sees the whole history (resumed epochs included) and keeps no state of its
own, so a resumed run logs and stops exactly as an uninterrupted one would::

    on_start(history)                      # before the first (or resumed) epoch
    on_epoch_end(record, history, model)   # after the epoch's checkpoints are saved
    stop_reason(history) -> str | None     # a sentence when training should stop now
    close()

Under MPI only rank 0 calls ``on_start`` and ``on_epoch_end`` (they write files); every rank
asks ``stop_reason`` of the same reduced history, and the ranks agree on the answer.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

METRICS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s")
CSV_FIELDS = (*METRICS, "seconds")


class Callback:
    def on_start(self, history: list[dict[str, Any]]) -> None:
        pass

    def on_epoch_end(self, record: dict[str, Any], history: list[dict], model: Any) -> None:
        pass

    def stop_reason(self, history: list[dict[str, Any]]) -> str | None:
        return None

    def close(self) -> None:
        pass


class CsvLog(Callback):
    """`metrics.csv`: metrics.jsonl's records for spreadsheets, rewritten whole each
    epoch (a few hundred bytes), so a resumed run drops the lines after its checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, history: list[dict[str, Any]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in history:
                writer.writerow({k: "" if r.get(k) is None else r[k] for k in CSV_FIELDS})
        tmp.replace(self.path)

    def on_start(self, history):
        self.write(history)

    def on_epoch_end(self, record, history, model):
        self.write(history)


MONITORS = {"val_loss": "min", "val_acc": "max", "train_loss": "min", "train_acc": "max"}


class EarlyStopping(Callback):
    """Keras' EarlyStopping: stop when `monitor` has not improved by more than
    `min_delta` for `patience` epochs in a row."""

    def __init__(self, patience: int, monitor: str = "val_loss", min_delta: float = 0.0):
        if monitor not in MONITORS:
            raise ValueError(f"--monitor must be one of {', '.join(MONITORS)}, not {monitor!r}")
        if patience < 1:
            raise ValueError(f"patience must be at least 1, got {patience}")
        self.patience, self.monitor, self.min_delta = patience, monitor, abs(min_delta)
        self.sign = -1.0 if MONITORS[monitor] == "min" else 1.0

    def best_epoch(self, history: list[dict[str, Any]]) -> dict[str, Any] | None:
        best = None
        for r in history:
            value = r.get(self.monitor)
            if value is None or not math.isfinite(value):
                continue
            if best is None or self.sign * (value - best[self.monitor]) > self.min_delta:
                best = r
        return best

    def stop_reason(self, history):
        best = self.best_epoch(history)
        if best is None or not history:
            return None
        waited = history[-1]["epoch"] - best["epoch"]
        if waited < self.patience:
            return None
        value = best[self.monitor]
        shown = f"{value:.2%}" if self.monitor.endswith("acc") else f"{value:.4f}"
        return (
            f"early stop after epoch {history[-1]['epoch']}: {self.monitor} has not improved "
            f"for {waited} epochs (patience {self.patience}; best {shown} at epoch "
            f"{best['epoch']})"
        )


class TensorBoardLog(Callback):
    """TensorBoard scalars per epoch (loss, accuracy, lr, images/s) through tensorboardX;
    with `histograms`, the weights and the last step's gradients too."""

    def __init__(self, logdir: str | Path, histograms: bool = False) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ValueError(
                "--tensorboard needs tensorboardX: pip install 'cnnspec[plot]'"
            ) from None
        self.writer = SummaryWriter(str(logdir))
        self.histograms = histograms

    def on_epoch_end(self, record, history, model):
        step = record["epoch"]
        for key, tag in (
            ("train_loss", "loss/train"),
            ("val_loss", "loss/val"),
            ("train_acc", "accuracy/train"),
            ("val_acc", "accuracy/val"),
            ("lr", "lr"),
            ("images_per_s", "images_per_s"),
        ):
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        if self.histograms:
            from .loop import _host  # the loop imports this module: import at use

            for name in sorted(model.trainable):
                self.writer.add_histogram(f"weights/{name}", _host(model, model.params[name]), step)
            grads = getattr(model, "grads", None) or {}
            for name in sorted(grads):
                self.writer.add_histogram(f"grads/{name}", _host(model, grads[name]), step)
        self.writer.flush()

    def close(self):
        self.writer.close()
