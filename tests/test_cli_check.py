"""`cnnspec check`, `summary` and `schema`: exit codes, the stable JSON forms, rendering."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import cnnspec

REPO = Path(__file__).resolve().parent.parent
SPECS = sorted((REPO / "specs").glob("*.yaml"))
SPEC_NAMES = [f"specs/{p.name}" for p in SPECS]

LAYER_KEYS = set(
    "name type inputs attrs output_shape params trainable_params macs receptive_field".split()
)
CANONICAL_TYPES = set(
    """conv2d conv_transpose2d maxpool2d avgpool2d subsample2d global_avgpool2d flatten dense
    dropout batchnorm2d lrn relu leaky_relu prelu rrelu elu sigmoid tanh scaled_tanh maxout
    concat add channel_pad softmax linear rbf""".split()
)


def strict_json(text):
    """json.loads that refuses NaN and Infinity, which are not JSON."""

    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


def ok(result):
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exit_code == 0, result.stdout + result.stderr
    return result


# ---- exit codes -----------------------------------------------------------------


def test_check_all_specs_exits_0(cli):
    result = ok(cli("check", *SPEC_NAMES))
    lines = result.stdout.splitlines()
    assert len(lines) == len(SPECS)
    for name, line in zip(SPEC_NAMES, lines, strict=True):
        assert line.startswith(f"{name}: ok: ")
    assert "error" not in result.stderr


def test_check_line_content(cli):
    result = ok(cli("check", "specs/lenet5-1998.yaml"))
    line = result.stdout.strip()
    assert line.startswith("specs/lenet5-1998.yaml: ok: lenet5-1998: input 1x32x32 -> 10")
    assert "60,000 trainable params" in line and "13 layers" in line


def test_check_invalid_exits_1(cli):
    result = cli("check", "tests/broken/missing_required.yaml")
    assert result.exit_code == 1
    assert result.stderr.rstrip().endswith("3 errors")


@pytest.mark.parametrize(
    "args",
    [
        ("check", "specs/lenet5.yaml", "--bogus"),
        ("check",),
        ("summary", "specs/lenet5.yaml", "--depth", "0"),
        ("summary", "specs/lenet5.yaml", "--depth", "two"),
        ("summary",),
        ("frobnicate", "specs/lenet5.yaml"),
        ("check", "specs/lenet5.yaml", "--input", "x"),
    ],
)
def test_usage_errors_exit_2(cli, args):
    result = cli(*args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "Usage:" in result.stderr or "Usage:" in result.stdout


def test_no_arguments_shows_help(cli):
    result = cli()
    assert result.exit_code in (0, 2)
    assert "check" in result.stdout and "summary" in result.stdout


def test_warnings_do_not_fail_the_check(cli, tmp_path):
    spec = tmp_path / "unused.yaml"
    spec.write_text(
        "name: unused\ninput: [3, 8, 8]\nlayers:\n"
        "  - {name: a, type: conv2d, filters: 4, kernel: 3}\n"
        "  - {name: b, type: conv2d, inputs: [input], filters: 4, kernel: 3}\n"
    )
    result = ok(cli("check", spec))
    assert f"{spec}:4:5: warning: the output of 'a' is never used" in result.stderr
    entry = json.loads(ok(cli("check", "--json", spec)).stdout)[0]
    assert entry["ok"] is True
    assert [(p["line"], p["column"], p["severity"]) for p in entry["problems"]] == [
        (4, 5, "warning")
    ]


# ---- check --json -----------------------------------------------------------------


def test_check_json_shape(cli):
    result = cli("check", "--json", "specs/lenet5.yaml", "tests/broken/unknown_input.yaml")
    assert result.exit_code == 1
    good, bad = strict_json(result.stdout)
    assert good == {
        "file": "specs/lenet5.yaml",
        "ok": True,
        "name": "lenet5",
        "input": [1, 32, 32],
        "output_shape": [10],
        "params": 61_706,
        "trainable_params": 61_706,
        "macs": good["macs"],
        "problems": [],
    }
    assert isinstance(good["macs"], int) and good["macs"] > 0
    assert bad["file"] == "tests/broken/unknown_input.yaml" and bad["ok"] is False
    assert [(p["line"], p["column"], p["severity"]) for p in bad["problems"]] == [
        (6, 37, "error"),
        (7, 37, "error"),
    ]
    assert bad["problems"][0] == {
        "file": "tests/broken/unknown_input.yaml",
        "line": 6,
        "column": 37,
        "severity": "error",
        "message": "unknown input 'conv_1'",
        "hint": "did you mean 'conv1'?",
    }


def test_check_json_matches_python_api(cli):
    entries = strict_json(ok(cli("check", "--json", *SPEC_NAMES)).stdout)
    assert [e["file"] for e in entries] == SPEC_NAMES
    for entry, path in zip(entries, SPECS, strict=True):
        net = cnnspec.load(path)
        assert entry["ok"] is True
        assert entry["name"] == net.name
        assert entry["output_shape"] == list(net.output_shape)
        assert {k: entry[k] for k in ("params", "trainable_params", "macs")} == net.totals()


# ---- summary --json ------------------------------------------------------------------


@pytest.fixture(scope="module")
def summaries():
    from typer.testing import CliRunner

    from cnnspec.cli import app

    runner = CliRunner()
    out = {}
    for path in SPECS:
        result = runner.invoke(app, ["summary", "--json", str(path)])
        assert result.exit_code == 0, result.stderr
        out[path.stem] = strict_json(result.stdout)
    return out


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_summary_json_is_the_stable_form(summaries, path):
    summary = summaries[path.stem]
    net = cnnspec.load(path)
    assert {"name", "input", "layers", "totals"} <= set(summary)
    assert summary["name"] == net.name
    assert summary["input"] == list(net.input_shape)
    assert summary == json.loads(json.dumps(net.summary()))  # CLI and API agree
    layers = summary["layers"]
    # one entry per primitive layer, in topological order
    assert [x["name"] for x in layers] == [i.name for i in net.infos]
    assert len({x["name"] for x in layers}) == len(layers)
    seen = {"input"}
    for x in layers:
        assert LAYER_KEYS <= set(x)
        assert set(x["inputs"]) <= seen, f"{x['name']} reads a later layer"
        seen.add(x["name"])
        assert x["type"] in CANONICAL_TYPES
        assert all(isinstance(v, int) and v > 0 for v in x["output_shape"])
        assert 0 <= x["trainable_params"] <= x["params"]
        rf = x["receptive_field"]
        assert set(rf) == {"size", "stride", "padding"}
        assert all(len(rf[k]) == 2 for k in rf)
    totals = summary["totals"]
    for key in ("params", "trainable_params", "macs"):
        assert totals[key] == sum(x[key] for x in layers)


def test_summary_json_resolves_attributes(summaries):
    layers = {x["name"]: x for x in summaries["googlenet"]["layers"]}
    conv1 = layers["conv1.conv"]["attrs"]
    assert (conv1["kernel"], conv1["stride"], conv1["padding"]) == ([7, 7], [2, 2], [3, 3, 3, 3])
    assert conv1["filters"] == 64 and conv1["dilation"] == [1, 1] and conv1["groups"] == 1
    pool = layers["pool1"]["attrs"]
    assert pool == {"kernel": [3, 3], "stride": [2, 2], "padding": [0, 0, 0, 0], "ceil_mode": True}
    # block arguments substituted, defaults filled in
    b2 = layers["3a.b2.conv"]["attrs"]
    assert (b2["filters"], b2["kernel"], b2["padding"]) == (128, [3, 3], [1, 1, 1, 1])
    assert layers["3a.concat"]["inputs"] == ["3a.b1.relu", "3a.b2.relu", "3a.b3.relu", "3a.b4.relu"]
    assert layers["3a.b1.conv"]["inputs"] == ["pool2"]
    # every convolution and pooling says kernel [h, w], stride [h, w], padding [t, b, l, r]
    for summary in summaries.values():
        for x in summary["layers"]:
            if x["type"] in ("conv2d", "maxpool2d", "avgpool2d"):
                a = x["attrs"]
                assert len(a["kernel"]) == 2 and len(a["stride"]) == 2
                assert len(a["padding"]) == 4
                assert all(isinstance(v, int) for v in a["kernel"] + a["stride"] + a["padding"])


def test_summary_json_same_padding_is_resolved(cli, tmp_path):
    spec = tmp_path / "same.yaml"
    spec.write_text(
        "input: [3, 9, 10]\nlayers:\n"
        "  - {type: conv2d, filters: 2, kernel: [4, 3], stride: 2, padding: same}\n"
    )
    (layer,) = strict_json(ok(cli("summary", "--json", spec)).stdout)["layers"]
    # 9 -> ceil(9/2) = 5 needs 4*2 + 4 - 9 = 3 rows: 1 on top, 2 at the bottom;
    # 10 -> 5 needs 4*2 + 3 - 10 = 1 column: 0 left, 1 right
    assert layer["attrs"]["padding"] == [1, 2, 0, 1]
    assert layer["attrs"]["kernel"] == [4, 3] and layer["attrs"]["stride"] == [2, 2]
    assert layer["output_shape"] == [2, 5, 5]


def test_summary_json_is_strict_json_for_any_accepted_spec(cli):
    result = cli("summary", "--json", "tests/broken/nan_values.yaml")
    if result.exit_code == 0:
        strict_json(result.stdout)
    else:
        assert result.exit_code == 1 and result.stdout == ""


# ---- summary tables -----------------------------------------------------------------


def test_summary_renders_googlenet(cli):
    text = ok(cli("summary", "specs/googlenet.yaml")).stdout
    assert "googlenet" in text and "3x224x224" in text
    assert "3a" in text and "inception" in text and "5b" in text
    assert "aux_classifier" in text
    assert "13,378,280" in text
    assert "3a.b1" not in text  # collapsed at depth 1
    assert "--depth" in text


def test_summary_depth_and_all(cli):
    depth2 = ok(cli("summary", "specs/googlenet.yaml", "--depth", "2")).stdout
    assert "3a.b1 " in depth2 and "3a.concat" in depth2
    assert "3a.b1.conv" not in depth2
    everything = ok(cli("summary", "specs/googlenet.yaml", "--all")).stdout
    assert "3a.b1.conv" in everything and "3a.b2_reduce.relu" in everything
    assert "collapsed" not in everything
    net = cnnspec.load(REPO / "specs/googlenet.yaml")
    assert all(i.name in everything for i in net.infos)


def test_summary_of_repeated_blocks(cli):
    text = ok(cli("summary", "specs/resnet18.yaml")).stdout
    assert "layer2" in text and "basic" in text and "11,699,112" in text


def test_summary_of_broken_spec_exits_1(cli):
    result = cli("summary", "tests/broken/cyclic_inputs.yaml")
    assert result.exit_code == 1
    assert "tests/broken/cyclic_inputs.yaml:5:5: error: layer 'a' is on a cycle" in result.stderr


# ---- --input re-inference ---------------------------------------------------------------


def test_summary_input_size(cli):
    summary = strict_json(
        ok(cli("summary", "--json", "specs/resnet18.yaml", "--input", "160")).stdout
    )
    assert summary["input"] == [3, 160, 160]
    layers = {x["name"]: x for x in summary["layers"]}
    assert layers["layer4.2.relu"]["output_shape"] == [512, 5, 5]
    assert summary["totals"]["trainable_params"] == 11_689_512


def test_check_input_size(cli):
    result = ok(cli("check", "specs/alexnet.yaml", "--input", "259"))
    assert "input 3x259x259 -> 1000" in result.stdout


def test_check_input_too_small(cli):
    result = cli("check", "specs/lenet5.yaml", "--input", "16")
    assert result.exit_code == 1
    # 16 -> 12 -> 6 -> 2 -> 1: c5's 5x5 kernel is pointed at
    lines = (REPO / "specs" / "lenet5.yaml").read_text().splitlines()
    row = next(i for i, text in enumerate(lines) if "name: c5," in text)
    where = f"specs/lenet5.yaml:{row + 1}:{lines[row].index('kernel: 5') + 9}"
    assert (
        f"{where}: error: the height kernel (5) is larger than the padded input (1)"
        in result.stderr
    )


@pytest.mark.parametrize(
    "values, shape",
    [
        (["160x128"], "3x160x128"),
        (["3x160x128"], "3x160x128"),
        (["160 128"], "3x160x128"),
        (["3, 160, 128"], "3x160x128"),
        (["160", "--input", "128"], "3x160x128"),  # repeated: one number each
        (["1x160x128"], "1x160x128"),
    ],
)
def test_check_input_h_w(cli, values, shape):
    result = cli("check", "specs/resnet18.yaml", "--input", *values)
    assert result.exit_code == 0, result.stderr
    assert f"input {shape} -> 1000" in result.stdout


@pytest.mark.parametrize("values", [["160", "128"], ["1", "160", "160"]])
@pytest.mark.parametrize("command", ["check", "summary"])
def test_input_numbers_after_the_option_are_a_usage_error(cli, command, values):
    """`--input 160 128` would make 128 a spec file: say how to write it instead."""
    result = cli(command, "specs/resnet18.yaml", "--input", *values)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stdout == ""
    flat = " ".join(result.stderr.replace("│", " ").split())
    assert "Usage:" in flat and "--input takes one value" in flat and "160x128" in flat


@pytest.mark.parametrize("value", ["0", "3x0x8", "160x-1", "1x2x3x4", "abc", "", "8x"])
def test_malformed_input_is_a_usage_error(cli, value):
    result = cli("check", "specs/lenet5.yaml", "--input", value)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert "Usage:" in result.stderr and "no layers" not in result.stderr


def test_input_beyond_the_limit_is_reported(cli):
    result = cli("check", "specs/lenet5.yaml", "--input", "100000")
    assert result.exit_code == 1
    assert "input sizes must be at most 65536, got [1, 100000, 100000]" in result.stderr


def test_check_input_zero(cli):
    result = cli("check", "specs/lenet5.yaml", "--input", "0")
    assert result.exit_code in (1, 2)
    assert "no layers" not in result.stderr


# ---- schema ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def schema():
    from typer.testing import CliRunner

    from cnnspec.cli import app

    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0
    return strict_json(result.stdout)


def test_schema_is_valid_draft_2020_12(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema == json.loads((REPO / "cnnspec" / "schema.json").read_text())


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_spec_validates_against_the_schema(schema, path):
    data = yaml.safe_load(path.read_text())
    errors = list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    assert errors == [], [e.message for e in errors]


@pytest.mark.parametrize(
    "name",
    [
        "misspelled_attribute",
        "missing_required",
        "wrong_types",
        "bad_numbers",
        "train_section",
        "unknown_top_level_key",
    ],
)
def test_schema_rejects_broken_specs(schema, name):
    data = yaml.safe_load((REPO / "tests" / "broken" / f"{name}.yaml").read_text())
    assert not jsonschema.Draft202012Validator(schema).is_valid(data)


def test_schema_lists_every_layer_type(schema):
    from cnnspec.layers import REGISTRY

    names = {
        n
        for rule in schema["$defs"]["layer"]["allOf"]
        for n in rule["if"]["properties"]["type"]["enum"]
    }
    assert names == set(REGISTRY)
