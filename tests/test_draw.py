"""`cnnspec draw`: diagrams of the classic specs, in DOT, SVG, PNG and Mermaid."""

import re
import shutil
from pathlib import Path

import pytest
from picture_checks import assert_png, assert_svg

import cnnspec
from cnnspec.draw import PictureError, build_diagram, write_diagram

REPO = Path(__file__).resolve().parent.parent
needs_dot = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot program is not installed"
)


def load(name):
    return cnnspec.load(REPO / "specs" / f"{name}.yaml")


@pytest.fixture(scope="module")
def googlenet():
    return load("googlenet")


def test_inception_branches_meet_at_their_concat(googlenet):
    d = build_diagram(googlenet)
    by_name = {b.name: b for b in d.boxes}
    concat = by_name["3a.concat"]
    into = [a for a, b in d.edges if b == concat.id]
    names = {b.id: b.name for b in d.boxes}
    assert [names[a] for a in into] == ["3a.b1", "3a.b2", "3a.b3", "3a.b4"]
    # a conv_relu block is one box named after the block, the relu drawn inside it
    assert by_name["3a.b3"].lines[:2] == ["conv2d 5x5, 32 + relu", "32x28x28"]
    assert by_name["3a.b3"].clusters == ["3a"]
    assert d.cluster_labels["3a"] == "3a: inception"
    assert d.cluster_labels["aux1"] == "aux1: aux_classifier"
    assert d.title(by_name["3a.b3"]) == "b3"
    assert len(d.boxes) < 0.6 * len(googlenet.infos)  # relus folded: fewer boxes


def test_depth_collapses_blocks_as_summary_does():
    net = load("resnet50")
    d = build_diagram(net, depth=1, show=("params",))
    layer1 = next(b for b in d.boxes if b.name == "layer1")
    assert layer1.lines == ["bottleneck x3 (32 layers)", "256x56x56", "218,624 params"]
    names = {b.id: b.name for b in d.boxes}
    assert [(names[a], names[b]) for a, b in d.edges][:3] == [
        ("input", "conv1"),
        ("conv1", "maxpool"),
        ("maxpool", "layer1"),
    ]
    full = build_diagram(net, show=("rf", "macs"))
    add = next(b for b in full.boxes if b.name == "layer1.1.add")
    assert add.lines == ["add + relu", "256x56x56", "RF 19, stride 4"]  # adds no MACs
    downsample = next(b for b in full.boxes if b.name == "layer1.1.downsample")
    assert downsample.lines[0] == "conv2d 1x1, 256 + batchnorm2d"
    assert downsample.lines[2] == "RF 11, stride 4; 51.38M MACs"  # 64*256*56*56


def test_upsampling_says_its_mode_and_scale():
    net = cnnspec.loads(
        "name: up\ninput: [3, 8, 8]\nlayers:\n"
        "  - {name: u, type: upsample2d, scale: 2}\n  - {name: fc, type: dense, units: 4}\n"
    )
    u = next(b for b in build_diagram(net).boxes if b.name == "u")
    assert u.lines[0].startswith("upsample2d ") and u.lines[0].endswith(" x2")
    assert u.lines[1] == "3x16x16" and u.family == "upsample"


def test_no_fold_draws_every_layer():
    net = load("lenet5")
    d = build_diagram(net, fold=False)
    assert len(d.boxes) == len(net.infos) + 1  # and the input


def test_mermaid_needs_nothing_and_declares_every_node(tmp_path):
    net = load("densenet121")
    path = tmp_path / "net.mmd"
    assert write_diagram(build_diagram(net, depth=2), path) == "mmd"
    text = path.read_text()
    assert text.startswith("flowchart TB\n")
    declared = set(re.findall(r"^\s*(n\d+|input)\[", text, re.M))
    used = set(re.findall(r"^\s*(\w+) --> (\w+)$", text, re.M))
    assert used and {x for pair in used for x in pair} <= declared
    assert text.count("subgraph") == text.count("\n  end") + text.count("\n    end")


def test_dot_source_without_the_dot_program(tmp_path, monkeypatch, googlenet):
    pytest.importorskip("graphviz", reason="the graphviz package (cnnspec[plot]) is missing")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    path = tmp_path / "net.dot"
    write_diagram(build_diagram(googlenet), path)
    text = path.read_text()
    assert text.startswith("digraph googlenet {") and "subgraph cluster_3a {" in text
    with pytest.raises(PictureError, match=r"needs Graphviz's `dot`.*apt-get install graphviz"):
        write_diagram(build_diagram(googlenet), tmp_path / "net.svg")


@needs_dot
def test_svg_of_googlenet_and_png_of_resnet20(tmp_path, googlenet):
    pytest.importorskip("graphviz", reason="the graphviz package (cnnspec[plot]) is missing")
    svg = tmp_path / "googlenet.svg"
    write_diagram(build_diagram(googlenet, show=("rf",)), svg)
    root = assert_svg(svg)
    texts = {t.text for t in root.iter() if t.tag.endswith("text")}
    assert {"3a: inception", "aux2: aux_classifier", "conv2d 5x5, 32 + relu"} <= texts
    png = tmp_path / "resnet20.png"
    write_diagram(build_diagram(load("resnet20-cifar"), depth=2), png)
    w, h = assert_png(png, min_side=100)
    assert h > w  # drawn top to bottom


def test_cli_draw(cli, tmp_path):
    out = tmp_path / "lenet.mmd"
    result = cli("draw", "specs/lenet5.yaml", "-o", out, "--show", "rf,params")
    assert result.exit_code == 0, result.output
    assert "RF 5, stride 1; 156 params" in out.read_text()
    assert out.read_text().startswith("flowchart TB\n")
    assert cli("draw", "specs/lenet5.yaml", "-o", out, "--across").exit_code == 0
    assert out.read_text().startswith("flowchart LR\n")
    bad = cli("draw", "specs/lenet5.yaml", "-o", tmp_path / "x.jpg")
    assert bad.exit_code == 2 and "end it in .svg, .png" in bad.stderr
    assert cli("draw", "specs/lenet5.yaml", "-o", out, "--show", "flops").exit_code == 2
    missing = cli("draw", "specs/lenet5.yaml", "-o", tmp_path / "no" / "x.mmd")
    assert missing.exit_code == 1 and "cannot write it" in missing.stderr
    assert "Traceback" not in missing.output
