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


def test_an_existing_run_is_refused_before_any_work(cli, spec, trained):
    before = (trained / "last.npz").read_bytes()
    result = cli("train", spec, "--out", trained, "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "already holds a training run" in result.output and "training tiny" not in result.output
    assert (trained / "last.npz").read_bytes() == before


@pytest.mark.parametrize(
    "args, phrase",
    [
        (["--schedule", "cosin"], "got 'cosin'; did you mean 'cosine'?"),
        (["--schedule", "step"], "the step schedule needs step_size"),
        (["--resume", "--overwrite"], "contradict"),
    ],
)
def test_bad_flags_are_refused_before_any_work(cli, spec, tmp_path, args, phrase):
    result = cli("train", spec, "--out", tmp_path / "r", "--no-progress", *args)
    assert result.exit_code == 1 and phrase in result.output
    assert "training tiny" not in result.output and not (tmp_path / "r").exists()


def test_resume_with_another_seed_names_it(cli, spec, trained):
    result = cli("train", spec, "--out", trained, "--resume", "--seed", "7", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "started with seed 0, not 7" in result.output and "--seed 0" in result.output
    assert "training tiny" not in result.output  # refused before loading any data


def test_out_that_is_a_file_is_one_line(cli, spec, tmp_path):
    (tmp_path / "f").write_text("")
    result = cli("train", spec, "--out", tmp_path / "f" / "run", "--no-progress")
    assert result.exit_code == 1 and "which is a file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_sigterm_exits_143_saying_so(cli, spec, tmp_path, monkeypatch):
    import signal

    import cnnspec.train
    from cnnspec.train.loop import TrainingInterrupted

    def terminated(*args, **kwargs):
        raise TrainingInterrupted("training terminated (SIGTERM) ...", tmp_path, True, 15)

    monkeypatch.setattr(cnnspec.train, "fit", terminated)
    result = cli("train", spec, "--out", tmp_path / "r", "--no-progress")
    assert result.exit_code == 128 + signal.SIGTERM
    assert "interrupted: training terminated (SIGTERM)" in result.output


def structured(n):
    return np.zeros(n, dtype=[("a", "f4"), ("b", "i4")])


@pytest.mark.parametrize(
    "array, phrase",
    [
        (np.array(["a", "b"]), "dtype <U1"),
        (structured(3), "dtype [('a', '<f4'), ('b', '<i4')]"),
        (np.zeros((0, 8, 8), np.float32), "holds no images"),
        (np.zeros((0, 1, 8, 8), np.float32), "holds no images"),
        (np.full((2, 8, 8), np.nan, np.float32), "contains 128 NaN or infinite"),
        (np.full((2, 8, 8), np.inf), "NaN or infinite"),
        (np.zeros((2, 8, 8), np.complex64), "dtype complex64"),
        (np.full((2, 8, 8), 256, np.int64), "0..255"),
    ],
    ids=["strings", "structured", "zero", "zero4d", "nan", "inf", "complex", "int-range"],
)
def test_predict_bad_images_are_one_line(cli, spec, trained, tmp_path, array, phrase):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    result = cli("predict", spec, path, "--weights", trained / "best.npz")
    assert result.exit_code == 1 and phrase in result.output, result.output
    assert "Traceback" not in result.output and "Warning" not in result.output


def test_predict_scales_integers_like_training_and_reads_3d_as_grey_images(
    cli, spec, trained, tmp_path
):
    digits = np.load("cnnspec/data/digits.npz")["x"][:3]  # 0..16: scale them to 0..255
    as_float, as_int = tmp_path / "f.npy", tmp_path / "i.npy"
    np.save(as_float, (digits * 15).astype(np.float32) / 255)
    np.save(as_int, (digits * 15).astype(np.int64))
    runs = [cli("predict", spec, p, "--weights", trained / "best.npz", "--json") for p in
            (as_float, as_int)]  # fmt: skip
    assert all(r.exit_code == 0 for r in runs), runs[1].output
    rows = [json.loads(r.stdout) for r in runs]
    assert len(rows[1]) == 3  # a (3, 8, 8) array is three grey images, as for .npz
    assert [r["top"] for r in rows[0]] == [r["top"] for r in rows[1]]


@pytest.mark.parametrize("poison", ["nan", "int32"])
def test_eval_and_resume_refuse_damaged_weights(cli, spec, trained, tmp_path, poison):
    from cnnspec.train.checkpoint import load_checkpoint, save_checkpoint

    arrays, meta = load_checkpoint(trained / "last.npz")
    w = arrays["param/conv.weight"]
    arrays["param/conv.weight"] = np.where(w > 0, np.nan, w) if poison == "nan" else w.astype(
        np.int32)  # fmt: skip
    save_checkpoint(trained / "last.npz", arrays, meta)
    phrase = (
        "NaN or infinite"
        if poison == "nan"
        else "is int32, not floating-point weights like the network's float32"
    )
    result = cli("eval", spec, "--weights", trained / "last.npz")
    assert result.exit_code == 1 and phrase in result.output and "conv.weight" in result.output
    result = cli("train", spec, "--out", trained, "--resume", "--epochs", "3", "--no-progress")
    assert result.exit_code == 1 and phrase in result.output


def test_sigterm_to_a_real_trainer_saves_and_exits_143(spec, tmp_path):
    """The whole CLI in a subprocess, as SLURM or Kubernetes stop it."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "NUMBA_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    args = ["train", spec, "--out", out, "--epochs", "500", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cnnspec", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    for line in proc.stdout:  # the first epoch's line: training is under way
        if line.startswith("epoch 1/500"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 143, stderr
    assert "interrupted: training terminated (SIGTERM)" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr and not (out / ".lock").exists()
    from cnnspec.train.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.npz")[1]["epoch"] >= 1
