"""The trainer's callbacks: metrics.csv, early stopping, TensorBoard (on the loop's fake model)."""

import csv
import io
import json
import struct

import numpy as np
import pytest
from rich.console import Console
from test_cli_train import TINY
from test_dist import _mpi_train, needs_mpi
from test_train_loop import CFG, FakeModel

from cnnspec.train.callbacks import CSV_FIELDS, EarlyStopping, TensorBoardLog
from cnnspec.train.data import load_builtin_digits, split_dataset
from cnnspec.train.loop import fit


@pytest.fixture(scope="module")
def digits():
    train, val = split_dataset(load_builtin_digits("train"), 0.2, seed=0)
    return train.subset(np.arange(128)), val.subset(np.arange(64))


def run(tmp_path, digits, cfg, callbacks=(), resume=False, model=None):
    console = Console(file=io.StringIO(), width=200)
    history = fit(
        model or FakeModel(),
        digits[0],
        digits[1],
        cfg,
        tmp_path / "run",
        resume=resume,
        progress=False,
        console=console,
        callbacks=callbacks,
    )
    return history, console.file.getvalue()


def test_metrics_csv_matches_jsonl_and_follows_resume(tmp_path, digits):
    history, _ = run(tmp_path, digits, {**CFG, "epochs": 2})
    out = tmp_path / "run"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert tuple(rows[0]) == CSV_FIELDS
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row, record in zip(rows, jsonl, strict=True):
        assert float(row["val_acc"]) == record["val_acc"]  # repr round-trips exactly
        assert float(row["train_loss"]) == record["train_loss"]
    run(tmp_path, digits, {**CFG, "epochs": 3}, resume=True)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]


def test_no_validation_leaves_csv_cells_empty(tmp_path, digits):
    fit(FakeModel(), digits[0], None, {**CFG, "epochs": 1}, tmp_path / "r", progress=False)
    (row,) = csv.DictReader((tmp_path / "r" / "metrics.csv").open())
    assert row["val_loss"] == "" and row["val_acc"] == "" and float(row["train_acc"]) > 0


def test_early_stopping_rule():
    def hist(values, key="val_loss"):
        return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]

    stop = EarlyStopping(patience=2, monitor="val_loss")
    assert stop.stop_reason(hist([1.0, 0.9, 0.95])) is None
    reason = stop.stop_reason(hist([1.0, 0.9, 0.95, 0.91]))
    assert reason == (
        "early stop after epoch 4: val_loss has not improved for 2 epochs "
        "(patience 2; best 0.9000 at epoch 2)"
    )
    acc = EarlyStopping(patience=1, monitor="val_acc", min_delta=0.01)
    assert acc.stop_reason(hist([0.5, 0.6], "val_acc")) is None
    assert "best 60.00% at epoch 2" in acc.stop_reason(hist([0.5, 0.6, 0.605], "val_acc"))
    assert EarlyStopping(1).stop_reason(hist([None, None], "val_loss")) is None
    with pytest.raises(ValueError, match="--monitor must be one of"):
        EarlyStopping(1, "accuracy")


def test_early_stopping_stops_training_and_says_why(tmp_path, digits):
    # a learning rate too small to change a float32 weight: validation loss stays put
    cfg = {**CFG, "epochs": 10, "lr": 1e-20, "nesterov": False, "momentum": 0.0}
    history, text = run(tmp_path, digits, cfg, [EarlyStopping(2, "val_loss")])
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert "early stop after epoch 3: val_loss has not improved for 2 epochs" in text
    # resuming the stopped run stops again at once: the rule reads the saved history
    history, text = run(tmp_path, digits, cfg, [EarlyStopping(2, "val_loss")], resume=True)
    assert len(history) == 3 and "early stop after epoch 3" in text


def read_events(path):
    """Scalar events (tag, step, value) from a TensorBoard event file (TFRecord framing)."""
    from tensorboardX.proto import event_pb2

    data, at, out = path.read_bytes(), 0, []
    while at < len(data):
        (n,) = struct.unpack("<Q", data[at : at + 8])
        event = event_pb2.Event.FromString(data[at + 12 : at + 12 + n])
        at += 12 + n + 4
        for v in event.summary.value:
            out.append((v.tag, event.step, v.simple_value if v.HasField("simple_value") else None))
    return out


def test_tensorboard_scalars_and_histograms(tmp_path, digits):
    pytest.importorskip("tensorboardX", reason="tensorboardX (cnnspec[plot]) is not installed")
    logdir = tmp_path / "tb"
    history, _ = run(tmp_path, digits, {**CFG, "epochs": 2}, [TensorBoardLog(logdir, True)])
    (events,) = logdir.glob("events.out.tfevents.*")
    got = read_events(events)
    scalars = {(tag, step): v for tag, step, v in got if v is not None}
    for r in history:
        e = r["epoch"]
        assert scalars[("loss/train", e)] == pytest.approx(r["train_loss"], rel=1e-6)
        assert scalars[("accuracy/val", e)] == pytest.approx(r["val_acc"], rel=1e-6)
        assert scalars[("lr", e)] == pytest.approx(r["lr"])
        assert ("images_per_s", e) in scalars
    tags = {tag for tag, _, _ in got}
    assert {"weights/w", "weights/b", "loss/val", "accuracy/train"} <= tags


def have_tensorboard() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_cli_patience_and_tensorboard(cli, spec, tmp_path):
    out = tmp_path / "run"
    args = ("train", spec, "--out", out, "--no-progress", "--epochs", "6", "--lr", "1e-20")
    tensorboard = have_tensorboard()
    board = ("--tensorboard",) if tensorboard else ()
    result = cli(*args, "--patience", "1", "--monitor", "val_acc", *board)
    assert result.exit_code == 0, result.output
    assert "early stop after epoch 2: val_acc has not improved for 1 epochs" in result.stdout
    assert (out / "metrics.csv").read_text().count("\n") == 3  # header and two epochs
    if tensorboard:
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    args = ("train", spec, "--out", tmp_path / "other", "--no-progress", "--lr", "1e-20")
    bad = cli(*args, "--patience", "2", "--val-split", "0")
    assert bad.exit_code == 1 and "--monitor val_loss needs validation data" in bad.stderr
    assert cli(*args, "--histograms").exit_code == 1
    typo = cli(*args, "--monitor", "val_accuracy")
    assert typo.exit_code == 1 and "--monitor must be one of val_loss, val_acc" in typo.stderr


@needs_mpi
def test_early_stopping_and_logs_under_mpi(spec, tmp_path):
    """Two processes stop at the same epoch (no rank left waiting in a collective); rank 0
    alone says why and writes metrics.csv and the TensorBoard events."""
    out = tmp_path / "run"
    board = ("--tensorboard",) if have_tensorboard() else ()
    flags = ("--epochs", "6", "--lr", "1e-20", "--patience", "1", "--monitor", "val_acc")
    result = _mpi_train(2, spec, "--out", out, *flags, *board)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("early stop after epoch 2: val_acc has not improved") == 1
    assert [int(r["epoch"]) for r in csv.DictReader((out / "metrics.csv").open())] == [1, 2]
    if board:
        assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
