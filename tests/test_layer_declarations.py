"""One declaration per layer: the generated schema and README table are current, and
the defaults, docs and `cnnspec layers` come from the layer classes."""

import subprocess
import sys

import pytest

import cnnspec
from cnnspec import gen
from cnnspec.layers import REGISTRY
from cnnspec.layers.docs import layer_classes


def test_generated_files_are_current():
    """`python -m cnnspec.gen` regenerates them; run it after changing a layer."""
    assert gen.SCHEMA.read_text() == gen.schema_text(), "schema.json is stale"
    assert gen.README.read_text() == gen.readme_text(), "README's layer table is stale"


def test_schema_allows_exactly_the_declared_attributes():
    defs = gen.schema(__import__("json").loads(gen.SCHEMA.read_text()))["$defs"]
    for cls in layer_classes():
        declared = {a.name for a in cls.attributes}
        assert set(defs[cls.type_name]["properties"]) == declared


@pytest.mark.parametrize("cls", layer_classes(), ids=lambda c: c.type_name)
def test_every_layer_documents_itself(cls):
    doc = cls.__doc__ or ""
    assert cls.description(), f"{cls.type_name} needs a one-line docstring"
    assert "Shape" in doc and "Receptive field" in doc, f"{cls.type_name}: say both rules"
    for attr in cls.attributes:
        assert attr.doc, f"{cls.type_name}.{attr.name} needs a one-line doc"


def net(layer: str, input_shape="[2, 8, 8]"):
    return cnnspec.loads(f"input: {input_shape}\nlayers:\n  - {layer}\n")


def test_setup_sees_the_declared_defaults():
    a = net("{type: conv2d, filters: 3, kernel: 3}").infos[0].layer.attrs
    assert a["stride"] == [1, 1] and a["dilation"] == [1, 1] and a["groups"] == 1
    assert a["padding"] == [0, 0, 0, 0] and a["bias"] is True
    pool = net("{type: maxpool2d, kernel: 3}").infos[0].layer.attrs
    assert pool["stride"] == [3, 3]  # the computed default: the kernel
    assert net("{type: dropout}").infos[0].layer.attrs == {"rate": 0.5}


def test_did_you_mean_for_attribute_names_and_enum_values():
    with pytest.raises(cnnspec.SpecError) as e:
        net("{type: upsample2d, scal: 3}")
    assert "did you mean 'scale'?" in {p.hint for p in e.value.problems}
    with pytest.raises(cnnspec.SpecError) as e:
        net("{type: conv2d, filters: 2, kernel: 3, padding: sam}")
    assert e.value.problems[0].hint == "did you mean 'same'?"


def test_transparent_layers_are_looked_past_by_the_initialiser():
    """conv -> maxpool -> tanh: Glorot (bounded), not He (unbounded normal)."""
    spec = "input: [1, 8, 8]\nlayers:\n  - {type: conv2d, filters: 4, kernel: 3}\n"
    model = cnnspec.loads(spec + "  - {type: maxpool2d}\n  - {type: tanh}\n").compile(batch_size=1)
    w = model.params["conv2d_1.weight"]
    limit = (6.0 / (9 + 36)) ** 0.5
    assert abs(w).max() <= limit
    assert REGISTRY["maxpool2d"].transparent_to_init and not REGISTRY["conv2d"].transparent_to_init


def test_cli_layers_lists_and_describes(cli):
    out = cli("layers")
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert len(lines) == len(layer_classes())
    assert any(line.startswith("conv2d (conv)") for line in lines)
    one = cli("layers", "conv2d")
    assert one.exit_code == 0
    assert "Receptive field" in one.stdout
    assert "= 1" in one.stdout and "spacing between kernel taps" in one.stdout
    bad = cli("layers", "convv2d")
    assert bad.exit_code == 2
    assert "unknown layer type 'convv2d'; did you mean 'conv2d'?" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr


def test_check_imports_no_numba(tmp_path):
    """Validation is numpy and jsonschema only: no Numba import, nothing compiled."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cnnspec.cli import app\n"
        "r = CliRunner().invoke(app, ['check', 'specs/lenet5.yaml'])\n"
        "assert r.exit_code == 0, r.output\n"
        "import cnnspec.backend, cnnspec.compile\n"
        "cnnspec.load('specs/resnet20-cifar.yaml').summary()\n"
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=gen.README.parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_unknown_device_is_one_line():
    net_ = net("{type: relu}")
    with pytest.raises(
        ValueError, match=r"^device 'tpu' is not available; this build compiles for 'cpu', 'cuda'$"
    ):
        net_.compile(device="tpu", batch_size=1)


def test_layers_run_on_the_bound_backend():
    from cnnspec.backend import get_backend

    model = net("{type: conv2d, filters: 2, kernel: 3}").compile(batch_size=1)
    layer = model.infos[0].layer
    assert model.backend is get_backend("cpu") and layer.backend is model.backend
    assert layer.kernels.__name__ == "cnnspec.kernels.cpu.conv"
    assert hasattr(layer.kernels, "conv2d_forward")


def test_help_loads_neither_numpy_nor_numba():
    """`cnnspec --help` starts fast: no spec, so no numpy, jsonschema or Numba."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from cnnspec.cli import app\n"
        "assert CliRunner().invoke(app, ['--help']).exit_code == 0\n"
        "print(sorted(m for m in ('numpy', 'numba', 'jsonschema') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=gen.README.parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
