"""predict on image files and folders, class names, and explicit input ranges: inputs
scaled unlike the training data get a warning naming both ranges (an error with --strict)."""

import json

import numpy as np
import pytest
from test_cli_train import TINY  # the same small digits network

from cnnspec.train import load_checkpoint
from cnnspec.train.data import resize_bilinear


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A spec trained on the built-in digits (once for the module)."""
    from typer.testing import CliRunner

    from cnnspec.cli import app

    where = tmp_path_factory.mktemp("predict")
    spec = where / "tiny.yaml"
    spec.write_text(TINY)
    r = CliRunner().invoke(app, ["train", str(spec), "--out", str(where / "run"), "--no-progress"])
    assert r.exit_code == 0, r.output
    return spec, where / "run" / "best.npz"


def _digits(n=6):
    with np.load("cnnspec/data/digits.npz") as f:
        return f["x"][:n], f["y"][:n]


def _top(output):
    return [row["top"][0]["class"] for row in json.loads(output)]


def test_checkpoint_records_the_training_inputs(run):
    _, weights = run
    _, meta = load_checkpoint(weights)
    assert meta["config"]["inputs"] == {
        "range": [0.0, 1.0],
        "pixels": "digits: 0..16 divided by 16",
    }


def test_digits_trap_warns_with_both_ranges(cli, run):
    """The built-in digits' file read as an ordinary uint8 array: 0..16 divided by 255."""
    spec, weights = run
    r = cli("eval", spec, "--weights", weights, "--data", "cnnspec/data/digits.npz")
    assert r.exit_code == 0, r.output
    assert "warning: digits.npz: the inputs are 0..0.06275 (uint8 0..16 divided by 255)" in r.output
    assert "trained on 0..1 (digits: 0..16 divided by 16)" in r.output
    r = cli("eval", spec, "--weights", weights, "--data", "cnnspec/data/digits.npz", "--strict")
    assert r.exit_code == 1 and "error: digits.npz" in r.output and "top-1" not in r.output
    r = cli("eval", spec, "--weights", weights)  # the built-in source itself: no warning
    assert r.exit_code == 0 and "warning" not in r.output


@pytest.mark.parametrize(
    "values, found",
    [
        (lambda x: x, "uint8 0..16 divided by 255"),  # uint8 with max 16
        (lambda x: x.astype(np.float32) * 255 / 16, "float32 as stored"),  # floats in 0..255
    ],
)
def test_predict_warns_on_arrays_scaled_otherwise(cli, run, tmp_path, values, found):
    spec, weights = run
    x, _ = _digits()
    path = tmp_path / "x.npy"
    np.save(path, values(x))
    r = cli("predict", spec, path, "--weights", weights)
    assert r.exit_code == 0 and f"({found}), but the model was trained on 0..1" in r.output
    r = cli("predict", spec, path, "--weights", weights, "--strict")
    assert r.exit_code == 1 and "error:" in r.output and "Traceback" not in r.output
    np.save(path, x.astype(np.float32) / 16)  # scaled as in training
    r = cli("predict", spec, path, "--weights", weights, "--strict")
    assert r.exit_code == 0 and "warning" not in r.output


def test_png_and_jpeg_files_and_folders(cli, run, tmp_path):
    Image = pytest.importorskip("PIL.Image", reason="reading image files needs Pillow")
    spec, weights = run
    x, y = _digits()
    pixels = np.round(x.astype(np.float32) * 255 / 16).astype(np.uint8)
    folder = tmp_path / "images"
    folder.mkdir()
    for i, img in enumerate(pixels):
        Image.fromarray(img).save(folder / f"{i}.png")
    arrays = tmp_path / "same.npy"
    np.save(arrays, pixels)  # the same 8-bit values as an array
    r = cli("predict", spec, folder, "--weights", weights, "--json", "--strict")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert [row["input"] for row in rows] == [str(folder / f"{i}.png") for i in range(len(x))]
    from_arrays = cli("predict", spec, arrays, "--weights", weights, "--json")
    assert json.loads(from_arrays.stdout)[3]["top"] == rows[3]["top"]
    assert _top(r.stdout) == _top(from_arrays.stdout)
    assert sum(np.array(_top(r.stdout)) == y) >= 4  # trained: mostly right
    # colour JPEG and a twice-as-large PNG: made grey (luma) and resized as in training
    rgb = folder.parent / "rgb.png"
    Image.fromarray(np.repeat(pixels[0][:, :, None], 3, axis=2)).save(rgb)
    big = np.asarray(Image.fromarray(pixels[0]).resize((16, 16), Image.NEAREST))
    Image.fromarray(big).save(folder.parent / "big.png")
    Image.fromarray(np.repeat(pixels[1][:, :, None], 3, axis=2)).save(folder.parent / "c.jpg")
    r = cli("predict", spec, rgb, folder.parent / "big.png", folder.parent / "c.jpg",
            "--weights", weights, "--json", "--top", "10")  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert rows[0]["top"][0] == json.loads(from_arrays.stdout)[0]["top"][0]  # R=G=B: same grey
    resized = resize_bilinear(big[None, None].astype(np.float32) / 255, 8, 8)
    np.save(tmp_path / "resized.npy", resized)
    want = json.loads(cli("predict", spec, tmp_path / "resized.npy", "--weights", weights,
                          "--json", "--top", "10").stdout)  # fmt: skip
    got, exp = rows[1]["top"], want[0]["top"]
    assert [c["class"] for c in got] == [c["class"] for c in exp]
    assert np.allclose([c["probability"] for c in got], [c["probability"] for c in exp])
    assert rows[2]["input"].endswith("c.jpg")


def test_npz_arrays_need_no_labels(cli, run, tmp_path):
    spec, weights = run
    x, _ = _digits(3)
    path = tmp_path / "x.npz"
    np.savez(path, x=x.astype(np.float32) / 16)
    r = cli("predict", spec, path, "--weights", weights, "--json", "--strict")
    assert r.exit_code == 0, r.output
    assert [row["input"] for row in json.loads(r.stdout)] == [f"{path}[{i}]" for i in range(3)]


def test_labels_name_the_classes(cli, run, tmp_path):
    spec, weights = run
    x, _ = _digits(2)
    path = tmp_path / "x.npy"
    np.save(path, x.astype(np.float32) / 16)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(names) + "\n\n")
    r = cli("predict", spec, path, "--weights", weights, "--labels", labels, "--json")
    assert r.exit_code == 0, r.output
    for row in json.loads(r.stdout):
        assert row["top"][0]["label"] == names[row["top"][0]["class"]]
    r = cli("predict", spec, path, "--weights", weights, "--labels", labels)
    assert any(f"{path}[0]: {n} (" in r.output for n in names)
    labels.write_text("a\nb\n")
    r = cli("predict", spec, path, "--weights", weights, "--labels", labels)
    assert r.exit_code == 1 and "2 label lines, but the network has 10 classes" in r.output


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda d: d / "empty", "a folder without image files"),
        (lambda d: d / "notes.txt", "not an image or array file"),
        (lambda d: d / "broken.png", "not a readable image"),
        (lambda d: d / "nothing.png.missing", "no such file or folder"),
    ],
)
def test_bad_inputs_are_one_line(cli, run, tmp_path, make, phrase):
    pytest.importorskip("PIL.Image", reason="reading image files needs Pillow")
    spec, weights = run
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    r = cli("predict", spec, make(tmp_path), "--weights", weights)
    assert r.exit_code == 1 and phrase in r.output and "Traceback" not in r.output
