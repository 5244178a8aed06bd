"""The summary table in a terminal: fits the width, never cuts a number, says what it left out."""

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

import cnnspec
from cnnspec.report import (
    COLUMNS,
    activation_memory,
    group_rows,
    parse_columns,
    render_summary,
    shape_text,
)

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").glob("*.yaml"))


def rendered(net, width, depth=1, columns=None):
    console = Console(width=width, file=io.StringIO(), highlight=False, color_system=None)
    chosen, named = parse_columns(columns)
    render_summary(net, console, depth, chosen, named)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def nets():
    return {p.stem: cnnspec.load(p) for p in SPECS}


@pytest.mark.parametrize("width", [80, 120])
@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_summary_fits_the_width_and_keeps_every_number(nets, path, width):
    net = nets[path.stem]
    text = rendered(net, width)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines), max(lines, key=len)
    assert "…" not in text  # nothing cut, numbers least of all
    for row in group_rows(net.summary(), 1):
        assert f" {shape_text(row['output_shape'])} " in text
    totals = net.summary()["totals"]
    assert f"params: {totals['params']:,}" in text  # the exact total, whatever the table shows


def test_wide_terminal_shows_every_default_column_and_exact_counts(nets):
    text = rendered(nets["resnet50"], 160)
    header = next(line for line in text.splitlines() if "layer" in line and "type" in line)
    assert all(h in header for h in ("output", "params", "MACs", "RF", "stride", "pad"))
    assert "14,987,264" in text and "bottleneck x3 (32 layers)" in text
    assert "left out" not in text


def test_narrow_terminal_abbreviates_before_dropping(nets):
    text = rendered(nets["resnet50"], 80)
    assert "14.99M" in text and "14,987,2" not in text  # abbreviated, not cut
    assert "25,610,152" in text  # the total stays exact
    narrower = rendered(nets["resnet50"], 64)
    assert "left out to fit 64 columns" in narrower
    assert all(len(line) <= 64 for line in narrower.splitlines())


def test_every_layer_at_80_columns_cuts_only_names(nets):
    net = nets["resnet20-cifar"]
    text = rendered(net, 80, depth=None, columns="+kernel,trainable")
    assert all(len(line) <= 80 for line in text.splitlines())
    for info in net.infos:
        assert f" {shape_text(info.layer.out_shape)} " in text


def test_columns_choose_order_and_extras(nets):
    net = nets["resnet20-cifar"]
    text = rendered(net, 200, columns="layer,kernel,trainable,params")
    header = next(line for line in text.splitlines() if "layer" in line)
    assert re.search(r"layer.*kernel.*trainable.*params", header)
    assert "MACs" not in header and "output" not in header
    conv1 = next(line for line in text.splitlines() if line.startswith("│conv1 "))
    assert " 3 " in conv1 and "yes" in conv1 and "432" in conv1
    bn1 = next(line for line in text.splitlines() if line.startswith("│bn1 "))
    assert "partly" in bn1  # running statistics are parameters, not trained
    # the named columns are the last to go when the width runs out
    narrow = rendered(net, 60, columns="+kernel")
    assert "kernel" in narrow and "left out" in narrow
    expected = "layer type kernel output params macs rf stride pad".split()
    assert parse_columns("+kernel")[0] == tuple(expected)
    with pytest.raises(ValueError, match="unknown column.*nope.*choose from"):
        parse_columns("layer,nope")
    assert set(parse_columns("+trainable")[0]) <= set(COLUMNS)


def test_totals_break_between_phrases_only(nets):
    text = rendered(nets["googlenet"], 80)
    lines = text.splitlines()
    assert any(line.startswith("params: 13,378,280 (13.38M)") for line in lines)
    memory = next(line for line in lines if line.startswith("activations per image:"))
    assert re.fullmatch(
        r"activations per image: [\d.]+ [KMG]?i?B inference, [\d.]+ [KMG]?i?B training", memory
    )
    assert any(re.match(r"(.*   )?MACs: 1\.59G per image", line) for line in lines)


def test_activation_memory_inference_and_training():
    # a chain: inference holds at most two neighbouring outputs; training keeps all of
    # them (input too) plus the largest live pair of gradients
    net = cnnspec.loads(
        "name: t\ninput: [1, 8, 8]\nlayers:\n"
        "  - {name: a, type: conv2d, filters: 2, kernel: 3, padding: 1}\n"  # 2x8x8 = 128
        "  - {name: b, type: relu}\n"  # 128
        "  - {name: c, type: maxpool2d, kernel: 2}\n"  # 2x4x4 = 32
        "  - {name: d, type: dense, units: 3}\n"  # 3
        "  - {name: p, type: softmax}\n"
    )
    mem = activation_memory(net)
    assert mem["inference"] == (128 + 128) * 4
    stored = 64 + 128 + 128 + 32 + 3 + 3
    assert mem["training"] == (stored + 128 + 128) * 4
    totals = net.summary()["totals"]
    assert totals["activation_bytes_inference"] == mem["inference"]
    assert totals["activation_bytes_training"] == mem["training"]
    assert totals["activation_bytes"] == (stored - 64) * 4  # unchanged meaning: all outputs


def test_cli_columns(cli):
    result = cli("summary", "specs/lenet5.yaml", "--columns", "layer,kernel,params")
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "layer" in line)
    assert re.search(r"layer.*kernel.*params", header) and "output" not in header
    bad = cli("summary", "specs/lenet5.yaml", "--columns", "layer,flops")
    assert bad.exit_code == 2 and "unknown column(s) flops" in bad.stderr


def test_readme_shows_the_real_80_column_summary(nets):
    readme = (REPO / "README.md").read_text()
    block = readme.split("$ cnnspec summary specs/resnet20-cifar.yaml\n", 1)[1].split("```", 1)[0]
    text = rendered(nets["resnet20-cifar"], 80)
    assert block == "".join(line.rstrip() + "\n" for line in text.splitlines())
