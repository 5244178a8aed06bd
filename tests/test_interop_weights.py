"""Weights in and out: torchvision's state_dicts give cnnspec's specs torchvision's outputs."""

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import cnnspec.network as network
from cnnspec.interop.weights import WeightsError, match_weights, read_tensors

torch = pytest.importorskip("torch", reason="the reference networks are PyTorch's")

SPECS = Path(__file__).resolve().parent.parent / "specs"
RTOL = 1e-4  # of the largest logit
SAFETENSORS = ".safetensors files need the safetensors package (cnnspec[weights])"


def _torchvision_models():
    """torchvision.models; where the installed wheel's compiled operators do not load
    (a CUDA build beside a CPU-only torch), its pure-Python network constructors still
    do, imported without the package's operator registration."""
    try:
        import torchvision.models as models

        return models
    except ImportError:
        raise
    except Exception:  # RuntimeError: operator torchvision::nms does not exist
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        found = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["torchvision"] = package
        import torchvision.models as models

        return models


@pytest.fixture(scope="module")
def tv():
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (pip install torchvision==0.28.0)")
    return _torchvision_models()


def _reference(constructor, seed=0):
    """A torchvision network in eval mode, batch norm's statistics and affine away from 1/0."""
    torch.manual_seed(seed)
    m = constructor().eval()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.1)
    return m


def _logits(net, arrays, x):
    model = net.compile(batch_size=len(x), training=False)
    for k, v in arrays.items():
        np.copyto(model.params[k], v)
    return model.forward(x).copy()


def _same(got, want):
    err = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    assert err <= RTOL * scale, f"max error {err:.3g}, largest logit {scale:.3g}"


CASES = {  # torchvision constructor -> (spec, input size it is compared at)
    "resnet18": ("resnet18", 64),
    "googlenet": ("googlenet-bn", 64),
    "densenet121": ("densenet121", 64),
}


def _constructor(tv, name):
    if name == "googlenet":  # the spec, like torchvision's pretrained model, has no aux heads
        return lambda: tv.googlenet(aux_logits=False, init_weights=True)
    return getattr(tv, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torchvision_state_dict_gives_torchvision_outputs(tv, name, tmp_path):
    spec, size = CASES[name]
    ref = _reference(_constructor(tv, name))
    path = tmp_path / f"{name}.pth"
    torch.save(ref.state_dict(), path)
    net = network.load(SPECS / f"{spec}.yaml", input_shape=(3, size, size))
    found = match_weights(net, read_tensors(path))
    assert found.by == "order"  # torchvision's names are not the spec's; its order is
    bn = sum(1 for m in ref.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert len(found.skipped) == bn  # num_batches_tracked, one per batch norm
    assert sum(k.endswith("running_var") for k in found.arrays) == bn
    x = np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    _same(_logits(net, found.arrays, x), want)


@pytest.mark.slow
def test_vgg16_at_full_size(tv):
    """VGG-16 only at 224x224: torchvision pools to 7x7 whatever the input, so its first
    dense layer has 25,088 inputs only there. About 2 GB and 7 s of CPU."""
    ref = _reference(tv.vgg16)
    net = network.load(SPECS / "vgg16.yaml")
    found = match_weights(net, {k: v.numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    _same(_logits(net, found.arrays, x), want)


def _small_resnet(tmp_path, size=64):
    """specs/resnet18.yaml with a smaller input: the same weights, cheaper to run."""
    text = (SPECS / "resnet18.yaml").read_text().replace("[3, 224, 224]", f"[3, {size}, {size}]")
    path = tmp_path / "resnet18.yaml"
    path.write_text(text)
    return path


def test_round_trip_torchvision_to_onnxruntime(cli, tv, tmp_path):
    """torchvision state_dict -> cnnspec weights import -> cnnspec export -> onnxruntime:
    torchvision's probabilities, and the same top-5 as cnnspec predict."""
    ort = pytest.importorskip("onnxruntime", reason="the export is checked with onnxruntime")
    pytest.importorskip("onnx", reason="export needs the onnx package")
    ref = _reference(tv.resnet18, seed=3)
    state = tmp_path / "r18.pth"
    torch.save(ref.state_dict(), state)
    spec = _small_resnet(tmp_path)
    weights, onnx_path = tmp_path / "r18.npz", tmp_path / "r18.onnx"
    r = cli("weights", "import", spec, state, "-o", weights)
    assert r.exit_code == 0, r.output
    assert "matched by order" in r.output and "skipped 20 num_batches_tracked" in r.output
    r = cli("export", spec, "--weights", weights, "-o", onnx_path)
    assert r.exit_code == 0, r.output
    x = np.random.default_rng(4).random((2, 3, 64, 64), dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (probs,) = session.run(None, {"input": x})
    with torch.no_grad():
        want = torch.softmax(ref(torch.from_numpy(x)), dim=1).numpy()
    _same(probs, want)
    images = tmp_path / "x.npy"
    np.save(images, x)
    r = cli("predict", spec, images, "--weights", weights, "--top", "5", "--json")
    assert r.exit_code == 0, r.output
    import json

    predicted = [[c["class"] for c in row["top"]] for row in json.loads(r.stdout)]
    assert predicted == np.argsort(-probs, axis=1)[:, :5].tolist()


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_safetensors_with_the_shipped_resnet_map(tv, name, tmp_path):
    """.safetensors keeps no order: torchvision's names meet the spec's through
    examples/torchvision-resnet.map.yaml, and give what matching by order gives."""
    save_file = pytest.importorskip("safetensors.numpy", reason=SAFETENSORS).save_file

    from cnnspec.interop.weights import read_map

    state = {k: v.numpy() for k, v in _reference(getattr(tv, name)).state_dict().items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    net = network.load(SPECS / f"{name}.yaml")
    rules = read_map(SPECS.parent / "examples" / "torchvision-resnet.map.yaml")
    by_names = match_weights(net, read_tensors(path), rules)
    assert by_names.by == "names"
    by_order = match_weights(net, state, by="order")
    assert by_names.source == by_order.source
    with pytest.raises(WeightsError, match="neither by name nor in order"):
        match_weights(net, read_tensors(path))  # without the map


def _lenet():
    return network.load(SPECS / "lenet5.yaml")


def _state(net, seed=0):
    rng = np.random.default_rng(seed)
    return {
        f"{i.name}.{d.name}": rng.standard_normal(d.shape).astype(np.float32)
        for i in net.infos
        for d in i.layer.param_defs()
    }


def test_names_match_first_and_maps_rename(tmp_path):
    net = _lenet()
    state = _state(net)
    assert match_weights(net, state).by == "names"
    wrapped = {f"module.{k}".replace("c1.", "conv_a."): v for k, v in state.items()}
    rules_file = tmp_path / "map.yaml"
    rules_file.write_text("'module\\.conv_a\\.(.*)': 'c1.\\1'\n'module\\.(.*)': '\\1'\n")
    from cnnspec.interop.weights import read_map

    found = match_weights(net, wrapped, read_map(rules_file), by="names")
    assert found.source["c1.weight"] == "module.conv_a.weight"
    assert all(np.array_equal(found.arrays[k], v) for k, v in state.items())


def test_missing_unused_and_wrong_shapes_are_listed(cli, tmp_path):
    save_file = pytest.importorskip("safetensors.numpy", reason=SAFETENSORS).save_file

    net = _lenet()
    state = _state(net)
    del state["f6.bias"]
    state["extra.weight"] = np.zeros((2, 2), np.float32)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    r = cli(
        "weights", "import", "specs/lenet5.yaml", path, "-o", tmp_path / "w.npz", "--by", "names"
    )
    assert r.exit_code == 1
    assert "missing (1): f6.bias [84]" in r.output
    assert "unused (1): extra.weight [2, 2]" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "w.npz").exists()
    state = _state(net)
    state["c3.weight"] = np.zeros((16, 6, 3, 3), np.float32)
    with pytest.raises(WeightsError) as e:
        match_weights(net, state)
    assert e.value.details == ["c3.weight has shape [16, 6, 3, 3], 'c3.weight' needs [16, 6, 5, 5]"]


def test_export_and_import_round_trip(cli, tmp_path):
    """cnnspec checkpoint -> .safetensors / .pt -> cnnspec checkpoint: the same arrays."""
    pytest.importorskip("safetensors", reason=SAFETENSORS)
    from cnnspec.train import load_checkpoint, save_checkpoint
    from cnnspec.train.checkpoint import spec_hash

    net = _lenet()
    state = _state(net, seed=5)
    first = tmp_path / "first.npz"
    meta = {"spec_hash": spec_hash(net.summary()["layers"])}
    save_checkpoint(first, {f"param/{k}": v for k, v in state.items()}, meta)
    for suffix in (".safetensors", ".pt"):
        exported, again = tmp_path / f"w{suffix}", tmp_path / f"again{suffix}.npz"
        r = cli("weights", "export", "specs/lenet5.yaml", first, "-o", exported)
        assert r.exit_code == 0, r.output
        assert set(read_tensors(exported)) == set(state)
        r = cli("weights", "import", "specs/lenet5.yaml", exported, "-o", again)
        assert r.exit_code == 0 and "matched by names" in r.output, r.output
        arrays, _ = load_checkpoint(again)
        assert all(np.array_equal(arrays[f"param/{k}"], v) for k, v in state.items())
    r = cli("eval", "specs/lenet5.yaml", "--weights", again)  # a checkpoint like any other
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "content, phrase",
    [(b"not a pickle", "not a readable PyTorch state_dict"), (None, "no such file")],
)
def test_unreadable_files_are_one_line(cli, tmp_path, content, phrase):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    r = cli("weights", "import", "specs/lenet5.yaml", path, "-o", tmp_path / "o.npz")
    assert r.exit_code == 1 and phrase in r.output and "Traceback" not in r.output
