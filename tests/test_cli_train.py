"""`cnnspec train`, `eval` and `predict` end to end on the built-in digits, with the
real compiled model: outputs, resume, and clear errors for bad input."""

import json

import numpy as np
import pytest

TINY = """
name: tiny-digits
input: [1, 8, 8]
layers:
  - {name: conv, type: conv2d, filters: 8, kernel: 3, padding: same}
  - {name: relu, type: relu}
  - {name: pool, type: maxpool2d, kernel: 2}
  - {name: fc, type: dense, units: 10}
  - {name: prob, type: softmax}
train: {data: digits, epochs: 2, batch_size: 32, lr: 0.05, momentum: 0.9, val_split: 0.2}
"""


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture
def trained(cli, spec, tmp_path):
    out = tmp_path / "run"
    result = cli("train", spec, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    return out


def test_train_writes_metrics_and_checkpoints(trained):
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["val_acc"] > 0.5  # two epochs on digits: far above chance (0.1)
    assert (trained / "last.npz").exists() and (trained / "best.npz").exists()
    with np.load(trained / "best.npz", allow_pickle=False) as ckpt:
        assert "param/conv.weight" in ckpt.files


def test_resume_continues_to_more_epochs(cli, spec, trained):
    result = cli("train", spec, "--out", trained, "--epochs", "3", "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == [1, 2, 3]


def test_eval_reports_accuracy_and_confusion(cli, spec, trained):
    result = cli("eval", spec, "--weights", trained / "best.npz", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["count"] == 359 and 0.5 < report["accuracy"] <= 1
    assert np.array(report["confusion"]).sum() == 359
    assert "top5" in report


def test_predict_classifies_images_from_a_file(cli, spec, trained, tmp_path):
    digits = np.load("cnnspec/data/digits.npz")
    images = tmp_path / "images.npy"
    np.save(images, digits["x"][:5].astype(np.float32) / 16)
    result = cli("predict", spec, images, "--weights", trained / "best.npz", "--json", "--top", "2")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 5 and all(len(r["top"]) == 2 for r in rows)
    assert all(0 <= r["top"][0]["probability"] <= 1 for r in rows)


def test_checkpoint_of_another_spec_is_refused(cli, trained):
    result = cli("eval", "specs/lenet5.yaml", "--weights", trained / "best.npz")
    assert result.exit_code == 1
    assert "different spec" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--data", "no/such/place"], "no/such/place"),
        (["--data", "cnnspec/data/README.md"], "README.md"),
    ],
)
def test_bad_data_is_one_clear_error(cli, spec, tmp_path, args, phrase):
    result = cli("train", spec, "--out", tmp_path / "x", "--no-progress", *args)
    assert result.exit_code == 1
    assert phrase in result.output and "Traceback" not in result.output


def test_corrupt_checkpoint_and_wrong_channels(cli, spec, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    result = cli("eval", spec, "--weights", bad)
    assert result.exit_code == 1 and "Traceback" not in result.output
    colour = tmp_path / "colour.npz"
    np.savez(colour, x=np.zeros((4, 8, 8, 3), np.uint8), y=np.zeros(4, np.int64))
    result = cli("train", spec, "--data", colour, "--out", tmp_path / "y", "--no-progress")
    assert result.exit_code == 1 and "channel" in result.output


def test_labels_out_of_range(cli, spec, tmp_path):
    data = tmp_path / "labels.npz"
    np.savez(data, x=np.zeros((40, 8, 8), np.uint8), y=np.full(40, 12, np.int64))
    result = cli("train", spec, "--data", data, "--out", tmp_path / "z", "--no-progress")
    assert result.exit_code == 1 and "label" in result.output.lower()


def test_nan_loss_stops_with_a_message(cli, spec, tmp_path):
    result = cli("train", spec, "--lr", "1e30", "--out", tmp_path / "nan", "--no-progress")
    assert result.exit_code == 1
    assert "learning rate" in result.output.lower() and "Traceback" not in result.output
