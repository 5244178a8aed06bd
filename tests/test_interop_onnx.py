"""ONNX export, checked by onnxruntime against cnnspec's own forward pass (float32)."""

from pathlib import Path

import numpy as np
import pytest

import cnnspec.network as network
from cnnspec.layers import REGISTRY

onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx package (cnnspec[onnx])")
ort = pytest.importorskip("onnxruntime", reason="the export is checked with onnxruntime")

from layer_cases import ENTRIES  # noqa: E402
from test_conformance import Harness  # noqa: E402

from cnnspec.interop.onnx import OPSET, layer_to_onnx, to_onnx  # noqa: E402

SPECS = Path(__file__).resolve().parent.parent / "specs"
RTOL = 1e-4  # of the largest magnitude in the compared tensor


def _randomise_statistics(model, rng):
    """Running statistics away from 0/1, so batch norm's export is really exercised."""
    for key, p in model.params.items():
        if key.endswith("running_mean"):
            p[...] = rng.normal(0.0, 0.2, p.shape)
        elif key.endswith("running_var"):
            p[...] = rng.uniform(0.5, 1.5, p.shape)


def _run(proto, x, extra=()):
    """onnxruntime's outputs by name; `extra` names intermediate tensors to expose too."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    for name in extra:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"input": x}), strict=True))


def _close(got, want, what):
    scale = max(float(np.abs(want).max()), 1e-6)
    err = float(np.abs(got - want).max())
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert err <= RTOL * scale, f"{what}: max error {err:.3g} vs largest value {scale:.3g}"


def check_against_onnxruntime(net, batch=2, seed=0, aux=True):
    """Every exported output, and the tensor each output layer reads, equal cnnspec's."""
    rng = np.random.default_rng(seed)
    model = net.compile(batch_size=batch, training=False, seed=seed)
    _randomise_statistics(model, rng)
    x = rng.standard_normal((batch, *net.input_shape)).astype(np.float32)
    model.forward(x)
    proto = to_onnx(model, aux=aux)
    heads = model.outputs if aux else [model.head]
    feeding = [h.node.inputs[0] for h in heads if h.layer.role == "output"]
    got = _run(proto, x, feeding)
    for name in [h.name for h in heads] + feeding:
        _close(got[name], model.buf[name].reshape(got[name].shape), name)
    return proto, model, got


CLASSICS = {  # spec -> input shape small enough for CI (None: the spec's own)
    "lenet5-1998": None,
    "lenet5": None,
    "resnet20-cifar": None,
    "alexnet": (3, 67, 67),
    "vgg16": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "resnet34": (3, 32, 32),
    "resnet50": (3, 32, 32),
    "googlenet": (3, 224, 224),  # its 7x7 average pool needs the full size
    "googlenet-bn": (3, 32, 32),
    "densenet121": (3, 32, 32),
}


def test_every_classic_spec_is_covered():
    assert {p.stem for p in SPECS.glob("*.yaml")} == set(CLASSICS)


@pytest.mark.parametrize("name", sorted(CLASSICS))
def test_classic_spec_matches_onnxruntime(name):
    net = network.load(SPECS / f"{name}.yaml", input_shape=CLASSICS[name])
    batch = 1 if name == "googlenet" else 2
    proto, model, _ = check_against_onnxruntime(net, batch=batch)
    assert proto.graph.name == net.name
    assert proto.opset_import[0].version == OPSET >= 17
    node_names = {n.name for n in proto.graph.node}
    assert {i.name for i in net.infos} <= node_names  # every layer keeps its name
    assert [o.name for o in proto.graph.output] == [o.name for o in model.outputs]


# One small network per layer type: a layer under test between an input and an output.
CASES = {
    "conv2d": [
        "{type: conv2d, filters: 6, kernel: 3, stride: 2, padding: [1, 0, 2, 1], dilation: [1, 2]}",
        "{type: conv2d, filters: 4, kernel: [3, 1], groups: 2, padding: same}",
        "{type: conv2d, filters: 3, kernel: 3, connections: [[0], [1, 2], [0, 3]]}",
        "{type: conv2d, filters: 5, kernel: 9, bias: false}",  # whole input: the dense path
    ],
    "conv_transpose2d": [
        "{type: conv_transpose2d, filters: 3, kernel: 3, stride: 2, padding: 1, output_padding: 1}",
        "{type: conv_transpose2d, filters: 2, kernel: [2, 3], dilation: 2, bias: false,"
        " padding: [0, 1, 1, 0]}",
        "{type: conv_transpose2d, filters: 6, kernel: 3, stride: 2, groups: 2}",
    ],
    "maxpool2d": [
        "{type: maxpool2d, kernel: 3, stride: 2, padding: 1}",
        "{type: maxpool2d, kernel: 2, ceil_mode: true}",
        "{type: maxpool2d, kernel: 4, stride: 3, padding: [3, 2, 1, 3], ceil_mode: true}",
    ],
    "avgpool2d": [
        "{type: avgpool2d, kernel: 3, stride: 2, padding: 1}",
        "{type: avgpool2d, kernel: 3, stride: 2, padding: 1, count_include_pad: false}",
        "{type: avgpool2d, kernel: 2, ceil_mode: true, padding: 1}",
        "{type: avgpool2d, kernel: 4, stride: 3, padding: 3, ceil_mode: true}",
        "{type: avgpool2d, kernel: 3, padding: 2, count_include_pad: false, ceil_mode: true}",
    ],
    "subsample2d": ["{type: subsample2d, kernel: 2}"],
    "global_avgpool2d": ["{type: global_avgpool2d}"],
    "flatten": ["{type: flatten}"],
    "dense": ["{type: dense, units: 7}", "{type: dense, units: 3, bias: false}"],
    "dropout": ["{type: dropout, rate: 0.3}"],
    "batchnorm2d": ["{type: batchnorm2d, eps: 0.001}"],
    "lrn": ["{type: lrn, size: 3, alpha: 0.5, beta: 0.75, k: 1.0}", "{type: lrn, size: 2}"],
    "relu": ["{type: relu}"],
    "leaky_relu": ["{type: leaky_relu, alpha: 0.2}"],
    "elu": ["{type: elu, alpha: 0.7}"],
    "sigmoid": ["{type: sigmoid}"],
    "tanh": ["{type: tanh}"],
    "scaled_tanh": ["{type: scaled_tanh}"],
    "prelu": ["{type: prelu, init: 0.1}", "{type: prelu, shared: true}"],
    "rrelu": ["{type: rrelu, lower: 0.1, upper: 0.3}"],
    "maxout": ["{type: maxout, pieces: 2}"],
    "upsample2d": ["{type: upsample2d, scale: [2, 3]}", "{type: upsample2d, mode: bilinear}"],
    "channel_pad": ["{type: channel_pad, channels: 7}"],
    # merges and outputs are spelled out below: they need branches or end the network
    "concat": [],
    "add": [],
    "softmax": [],
    "linear": [],
    "rbf": [],
}

MERGES = """
name: merges
input: [4, 9, 9]
layers:
  - {name: a, type: conv2d, filters: 4, kernel: 3, padding: 1}
  - {name: b, type: conv2d, inputs: [input], filters: 4, kernel: 1}
  - {name: sum, type: add, inputs: [a, b, input]}
  - {name: cat, type: concat, inputs: [sum, a]}
  - {name: flat, type: flatten}
  - {name: aux_fc, type: dense, units: 5, inputs: [flat]}
  - {name: aux, type: linear, inputs: [aux_fc]}
  - {name: fc, type: dense, units: 6, inputs: [flat]}
  - {name: rbf_in, type: tanh}
  - {name: dist, type: rbf, units: 4}
  - {name: fc2, type: dense, units: 3, inputs: [flat]}
  - {name: out, type: softmax}
"""


def _case_net(text):
    return network.loads(
        f"name: case\ninput: [4, 9, 9]\nlayers:\n  - {text}\n  - {{type: linear}}\n"
    )


def test_every_layer_type_has_a_case():
    types = {cls.type_name for cls in REGISTRY.values()}
    assert types == set(CASES)
    covered = {t for t, cases in CASES.items() if cases}
    assert types - covered == {"concat", "add", "softmax", "linear", "rbf"}  # in MERGES


@pytest.mark.parametrize(
    "text", [c for cases in CASES.values() for c in cases], ids=lambda t: t[7:40]
)
def test_layer_matches_onnxruntime(text):
    check_against_onnxruntime(_case_net(text), seed=3)


def test_merges_and_heads_match_onnxruntime():
    net = network.loads(MERGES)
    proto, _, got = check_against_onnxruntime(net, batch=3)
    assert [o.name for o in proto.graph.output] == ["aux", "dist", "out"]
    assert {n.op_type for n in proto.graph.node} >= {"Sum", "Concat", "Softmax", "ReduceSum"}


def test_no_aux_keeps_only_the_main_head_and_what_it_needs():
    net = network.loads(MERGES)
    proto, _, _ = check_against_onnxruntime(net, aux=False)
    assert [o.name for o in proto.graph.output] == ["out"]
    names = {n.name for n in proto.graph.node}
    assert "aux_fc" not in names and "dist" not in names and "fc2" in names


def test_batch_dimension_is_dynamic():
    net = _case_net("{type: conv2d, filters: 2, kernel: 3}")
    model = net.compile(batch_size=5, training=False)
    x = np.random.default_rng(1).standard_normal((5, 4, 9, 9)).astype(np.float32)
    proto = to_onnx(model)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        model.forward(np.concatenate([x[:n], np.zeros((5 - n, 4, 9, 9), np.float32)]))
        (got,) = session.run(None, {"input": x[:n]})
        _close(got, model.buf[model.head.name][:n], f"batch {n}")


def test_cli_export_writes_a_checked_file(cli, tmp_path):
    from cnnspec.train import restore_model, save_checkpoint
    from cnnspec.train.checkpoint import spec_hash

    net = network.load(SPECS / "lenet5.yaml")
    trained = net.compile(batch_size=1, training=False, seed=7)
    weights = tmp_path / "w.npz"
    save_checkpoint(
        weights,
        {f"param/{k}": v for k, v in trained.params.items()},
        {"spec_hash": spec_hash(net.summary()["layers"])},
    )
    path = tmp_path / "lenet5.onnx"
    r = cli("export", "specs/lenet5.yaml", "--weights", weights, "-o", path)
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    fresh = net.compile(batch_size=1, training=False)
    restore_model(fresh, weights)
    x = np.random.default_rng(2).random((1, 1, 32, 32), dtype=np.float32)
    fresh.forward(x)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"input": x}
    )
    _close(got, fresh.buf["output"], "output")


def test_cli_export_bad_paths_are_one_line(cli, tmp_path):
    r = cli("export", "specs/lenet5.yaml", "--weights", tmp_path / "none.npz", "-o", "x.onnx")
    assert r.exit_code == 1 and "no such checkpoint" in r.output
    r = cli("export", "specs/lenet5.yaml", "-o", tmp_path / "missing" / "x.onnx")
    assert r.exit_code == 1 and "cannot write" in r.output and "Traceback" not in r.output


def test_one_layer_alone_with_several_inputs():
    """layer_to_onnx: a layer between graph inputs x0, x1, ... and its output."""
    layer = REGISTRY["concat"]("cat", {}, [(3, 4, 4), (2, 4, 4)])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((2, *s)).astype(np.float32) for s in layer.in_shapes]
    out = np.zeros((2, *layer.out_shape), np.float32)
    layer.forward(xs, out, {}, False, rng)
    proto = layer_to_onnx(layer, {}, "cat")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x0": xs[0], "x1": xs[1]})
    _close(got, out, "cat")


CONFORMANCE = [
    pytest.param(t, i, c, id=f"{t}-{i}") for t, e in ENTRIES.items() for i, c in enumerate(e.cases)
]


@pytest.mark.parametrize(("type_name", "index", "case"), CONFORMANCE)
def test_conformance_case_matches_onnxruntime(type_name, index, case):
    """Every case of the conformance suite (tests/layer_cases.py), exported alone."""
    h = Harness(type_name, case, dtype=np.float32)
    h.forward(train=False)
    proto = layer_to_onnx(h.layer, h.p, "layer")
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {f"x{k}": x for k, x in enumerate(h.xs)})
    _close(got, h.out.reshape(got.shape), f"{type_name} case {index}")
