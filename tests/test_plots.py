"""`cnnspec plot` (training curves) and `cnnspec show filters|maps`: real pictures, right data."""

import json
from pathlib import Path

import numpy as np
import pytest
from picture_checks import assert_png, assert_svg

import cnnspec
from cnnspec.train.checkpoint import save_checkpoint

pytest.importorskip("matplotlib", reason="matplotlib (cnnspec[plot]) is not installed")

REPO = Path(__file__).resolve().parent.parent
LENET = REPO / "specs" / "lenet5.yaml"


def write_run(path, epochs, val=True, lr=0.1):
    path.mkdir(parents=True)
    with (path / "metrics.jsonl").open("w") as f:
        for e in range(1, epochs + 1):
            r = {"epoch": e, "lr": lr / e, "train_loss": 2.0 / e, "train_acc": 1 - 0.5 / e}
            r |= {"val_loss": 2.2 / e, "val_acc": 1 - 0.6 / e} if val else {"val_loss": None}
            f.write(json.dumps(r | {"images_per_s": 1000.0, "seconds": 0.1}) + "\n")
    return path


def test_plot_overlays_runs(cli, tmp_path):
    a = write_run(tmp_path / "a", 5)
    b = write_run(tmp_path / "b", 3, val=False, lr=0.5)
    out = tmp_path / "curves.png"
    result = cli("plot", a, b, "-o", out)
    assert result.exit_code == 0, result.output
    w, h = assert_png(out, min_side=200)
    assert w > 2 * h  # three panels side by side
    svg = tmp_path / "curves.svg"
    assert cli("plot", a / "metrics.jsonl", "-o", svg).exit_code == 0
    text = " ".join(t.text or "" for t in assert_svg(svg).iter())
    assert "learning rate" in text or "learning rate" in svg.read_text()


def test_runs_with_the_same_name_are_told_apart(tmp_path):
    from cnnspec.plots import read_runs

    a, b = write_run(tmp_path / "x" / "run", 2), write_run(tmp_path / "y" / "run", 2)
    assert [label for label, _ in read_runs([a, b])] == [str(a), str(b)]
    c = write_run(tmp_path / "z", 1)
    assert [label for label, _ in read_runs([a, c])] == ["run", "z"]


def test_plot_bad_input_is_one_line(cli, tmp_path):
    missing = cli("plot", tmp_path / "nothing", "-o", tmp_path / "c.png")
    assert missing.exit_code == 1 and "no metrics.jsonl there" in missing.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"epoch": 1}\n{oops\n')
    result = cli("plot", broken, "-o", tmp_path / "c.png")
    assert result.exit_code == 1 and "metrics.jsonl:2: not a JSON line" in result.stderr
    wrong = cli("plot", write_run(tmp_path / "ok", 2), "-o", tmp_path / "c.gif")
    assert wrong.exit_code == 2 and "end it in .png, .svg, .pdf" in wrong.stderr
    assert "Traceback" not in missing.output + result.output + wrong.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """LeNet-5 weights with a recognisable C1: filter k is k+1 times a fixed pattern."""
    net = cnnspec.load(LENET)
    model = net.compile(batch_size=1, training=False)
    w = model.params["c1.weight"]
    pattern = np.random.default_rng(1).standard_normal(w.shape[1:]).astype(np.float32)
    for k in range(len(w)):
        w[k] = (k + 1) * pattern * 0.1
    from cnnspec.train.checkpoint import spec_hash

    path = tmp_path_factory.mktemp("ckpt") / "w.npz"
    arrays = {f"param/{k}": v for k, v in model.params.items()}
    save_checkpoint(path, arrays, {"spec_hash": spec_hash(net.summary()["layers"])})
    return path, {k: v.copy() for k, v in model.params.items()}


def test_show_filters(cli, tmp_path, checkpoint, monkeypatch):
    import cnnspec.plots as plots

    seen = {}
    real = plots.plot_filters

    def spy(w, *args, **kw):
        seen["w"] = w.copy()
        return real(w, *args, **kw)

    monkeypatch.setattr(plots, "plot_filters", spy)
    out = tmp_path / "c1.png"
    result = cli("show", "filters", LENET, "--weights", checkpoint[0], "--layer", "c1", "-o", out)
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(seen["w"], checkpoint[1]["c1.weight"])
    assert_png(out, min_side=100)
    c3 = tmp_path / "c3.svg"  # 16 filters x 6 input channels, initial weights
    assert cli("show", "filters", LENET, "--layer", "c3", "-o", c3).exit_code == 0
    assert_svg(c3)
    bad = cli("show", "filters", LENET, "--layer", "f6", "-o", out)
    assert bad.exit_code == 1 and "choose one of: c1, c3, c5" in bad.stderr
    typo = cli("show", "filters", LENET, "--layer", "c2", "-o", out)
    assert typo.exit_code == 1 and "no layer of lenet5" in typo.stderr
    spec = tmp_path / "up.yaml"  # a transposed convolution keeps [in, out, kh, kw]
    spec.write_text(
        "name: up\ninput: [3, 8, 8]\nlayers:\n"
        "  - {name: up, type: conv_transpose2d, filters: 5, kernel: 3, stride: 2}\n"
        "  - {name: fc, type: dense, units: 4}\n  - {name: prob, type: softmax}\n"
    )
    assert cli("show", "filters", spec, "--layer", "up", "-o", out).exit_code == 0
    assert seen["w"].shape == (5, 3, 3, 3)


def test_colour_filters_of_an_rgb_first_layer(tmp_path):
    from cnnspec.plots import plot_filters

    w = np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32)
    plot_filters(w, "rgb", tmp_path / "rgb.png")
    from PIL import Image

    pixels = np.asarray(Image.open(tmp_path / "rgb.png").convert("RGB")).astype(int)
    chroma = (pixels.max(axis=2) - pixels.min(axis=2)).max()
    assert chroma > 100  # coloured tiles, not grey ones


def test_show_maps_are_the_layers_activations(cli, tmp_path, checkpoint, monkeypatch):
    import cnnspec.plots as plots

    seen = {}
    real = plots.plot_maps
    monkeypatch.setattr(
        plots,
        "plot_maps",
        lambda image, maps, *a, **k: (
            seen.update(image=image, maps=maps.copy()) or real(image, maps, *a, **k)
        ),
    )
    x = np.random.default_rng(2).random((32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "maps.png"
    args = ("show", "maps", LENET, "--weights", checkpoint[0], "--image", tmp_path / "x.npy")
    result = cli(*args, "--layer", "c1", "-o", out)
    assert result.exit_code == 0, result.output
    assert_png(out, min_side=100)
    # c1 (its ReLU fused in): relu(correlate(x, w_k) + b_k), checked at a few places
    w, b = checkpoint[1]["c1.weight"], checkpoint[1]["c1.bias"]
    maps = seen["maps"]
    assert maps.shape == (6, 28, 28)
    for k, i, j in [(0, 0, 0), (3, 10, 17), (5, 27, 27)]:
        expected = max(0.0, float((x[i : i + 5, j : j + 5] * w[k, 0]).sum() + b[k]))
        assert maps[k, i, j] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    from PIL import Image

    rgb = tmp_path / "rgb.png"  # a colour picture for a grey network: converted to grey
    Image.fromarray((np.random.default_rng(3).random((40, 30, 3)) * 255).astype(np.uint8)).save(rgb)
    coloured = cli("show", "maps", LENET, "--image", rgb, "--layer", "s2", "-o", out)
    assert coloured.exit_code == 0, coloured.output
    assert seen["maps"].shape == (6, 14, 14)
    flat = cli(*args, "--layer", "f6", "-o", out)
    assert flat.exit_code == 1 and "CxHxW maps" in flat.stderr
    no_image = cli(
        "show", "maps", LENET, "--image", tmp_path / "none.png", "--layer", "c1", "-o", out
    )
    assert no_image.exit_code == 1 and "no such file" in no_image.stderr
