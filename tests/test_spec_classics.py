"""The classic networks in specs/: published parameter counts, shapes, receptive fields."""

from pathlib import Path

import pytest

import cnnspec

SPECS = Path(__file__).resolve().parent.parent / "specs"
ALL_SPECS = sorted(SPECS.glob("*.yaml"))

_cache: dict = {}


def net(name):
    if name not in _cache:
        _cache[name] = cnnspec.load(SPECS / f"{name}.yaml")
    return _cache[name]


def layer(network, name):
    for info in network.infos:
        if info.name == name:
            return info
    raise KeyError(name)


def summary_layer(network, name):
    return next(x for x in network.summary()["layers"] if x["name"] == name)


def test_specs_folder_is_populated():
    names = {p.stem for p in ALL_SPECS}
    assert {
        "lenet5",
        "lenet5-1998",
        "alexnet",
        "vgg16",
        "googlenet",
        "googlenet-bn",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet20-cifar",
        "densenet121",
    } <= names


@pytest.mark.parametrize("path", ALL_SPECS, ids=lambda p: p.stem)
def test_every_spec_loads_cleanly(path):
    network = cnnspec.load(path)
    assert network.infos
    assert network.warnings == []
    summary = network.summary()
    assert len(summary["layers"]) == len(network.infos)
    assert summary["totals"]["params"] == sum(x["params"] for x in summary["layers"])


# ---- published parameter counts ---------------------------------------------

PUBLISHED = {
    "lenet5-1998": 60_000,  # LeCun et al. 1998
    "alexnet": 62_378_344,  # single-tower AlexNet
    "vgg16": 138_357_544,  # torchvision
    "googlenet-bn": 6_624_904,  # torchvision, no auxiliary heads
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
}


@pytest.mark.parametrize("name, trainable", sorted(PUBLISHED.items()))
def test_trainable_params_match_published_figures(name, trainable):
    assert net(name).totals()["trainable_params"] == trainable


def test_resnet20_cifar_is_027m():
    totals = net("resnet20-cifar").totals()
    assert round(totals["trainable_params"] / 1e6, 2) == 0.27  # He et al., table 6
    assert totals["params"] > totals["trainable_params"]  # BN running statistics


def test_batchnorm_statistics_are_not_trainable():
    totals = net("resnet18").totals()
    # 2 running statistics per BN channel; resnet18 has 4,800 BN channels
    assert totals["params"] - totals["trainable_params"] == 9_600


# ---- LeNet-5 (1998) ---------------------------------------------------------


def test_lenet5_1998_layer_shapes_and_c3():
    network = net("lenet5-1998")
    spatial = {n: layer(network, n).layer.out_shape for n in ("c1", "s2", "c3", "s4", "c5")}
    assert spatial == {
        "c1": (6, 28, 28),
        "s2": (6, 14, 14),
        "c3": (16, 10, 10),
        "s4": (16, 5, 5),
        "c5": (120, 1, 1),
    }
    c3 = summary_layer(network, "c3")
    # Table I: 6 maps see 3 inputs, 9 see 4, 1 sees all 6 -> (6*3 + 9*4 + 6) * 25 + 16
    assert c3["params"] == c3["trainable_params"] == 1_516
    assert summary_layer(network, "s2")["params"] == 12
    assert summary_layer(network, "f6")["params"] == 10_164
    rbf = summary_layer(network, "output")
    assert (rbf["params"], rbf["trainable_params"]) == (840, 0)  # fixed centres
    assert network.totals()["params"] == 60_840


def test_lenet5_course_version_shapes():
    network = net("lenet5")
    assert [i.layer.out_shape[1:] for i in network.infos if i.node.type == "conv2d"] == [
        (28, 28),
        (10, 10),
        (1, 1),
    ]
    assert network.output_shape == (10,)


# ---- AlexNet ----------------------------------------------------------------


def test_alexnet_spatial_sizes_and_fc6_input():
    network = net("alexnet")
    sizes = [
        layer(network, n).layer.out_shape[1]
        for n in ("conv1", "pool1", "conv2", "pool2", "conv5", "pool5")
    ]
    assert sizes == [55, 27, 27, 13, 13, 6]
    assert layer(network, "pool5").layer.out_shape == (256, 6, 6)
    fc6 = layer(network, "fc6").layer
    assert fc6.param_defs()[0].shape == (4096, 9216)
    assert summary_layer(network, "fc6")["params"] == 9216 * 4096 + 4096


def test_alexnet_pool5_receptive_field():
    rf = summary_layer(net("alexnet"), "pool5")["receptive_field"]
    assert rf == {"size": [195, 195], "stride": [32, 32], "padding": [64, 64]}


# ---- VGG-16 -----------------------------------------------------------------


def test_vgg16_block5_pool_receptive_field():
    rf = summary_layer(net("vgg16"), "block5.pool")["receptive_field"]
    assert rf == {"size": [212, 212], "stride": [32, 32], "padding": [90, 90]}


def test_vgg16_stages_halve():
    network = net("vgg16")
    pools = [layer(network, f"block{i}.pool").layer.out_shape for i in range(1, 6)]
    assert pools == [(64, 112, 112), (128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]
    assert len([i for i in network.infos if i.node.type == "conv2d"]) == 13


# ---- GoogLeNet, Table 1 of Szegedy et al. 2014 ------------------------------

# name: (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), output size, params column
TABLE1 = {
    "3a": ((64, 96, 128, 16, 32, 32), (256, 28, 28), 159),
    "3b": ((128, 128, 192, 32, 96, 64), (480, 28, 28), 380),
    "4a": ((192, 96, 208, 16, 48, 64), (512, 14, 14), 364),
    "4b": ((160, 112, 224, 24, 64, 64), (512, 14, 14), 437),
    "4c": ((128, 128, 256, 24, 64, 64), (512, 14, 14), 463),
    "4d": ((112, 144, 288, 32, 64, 64), (528, 14, 14), 580),
    "4e": ((256, 160, 320, 32, 128, 128), (832, 14, 14), 840),
    "5a": ((256, 160, 320, 32, 128, 128), (832, 7, 7), 1072),
    "5b": ((384, 192, 384, 48, 128, 128), (1024, 7, 7), 1388),
}
INPUT_CHANNELS = {
    "3a": 192,
    "3b": 256,
    "4a": 480,
    "4b": 512,
    "4c": 512,
    "4d": 512,
    "4e": 528,
    "5a": 832,
    "5b": 832,
}


def inception_weights(module):
    """Weights (biases excluded) of the module's convolutions, from the spec."""
    total = 0
    for info in net("googlenet").infos:
        if info.name.startswith(module + ".") and info.node.type == "conv2d":
            total += info.layer.param_defs()[0].size
    return total


def table1_weights(module):
    """The same count from Table 1's filter columns."""
    c1, c3r, c3, c5r, c5, proj = TABLE1[module][0]
    c = INPUT_CHANNELS[module]
    return c * c1 + c * c3r + 9 * c3r * c3 + c * c5r + 25 * c5r * c5 + c * proj


@pytest.mark.parametrize("module", list(TABLE1))
def test_googlenet_inception_output_sizes(module):
    assert layer(net("googlenet"), f"{module}.concat").layer.out_shape == TABLE1[module][1]


@pytest.mark.parametrize("module", list(TABLE1))
def test_googlenet_inception_weights_follow_table1_columns(module):
    assert inception_weights(module) == table1_weights(module)


@pytest.mark.parametrize("module", list(TABLE1))
def test_googlenet_inception_weights_near_table1_params_column(module):
    """Table 1's params column does not always agree with its own filter columns (4c:
    128*512 + 128*512 + 256*128*9 + 24*512 + 64*24*25 + 64*512 = 509,440 = 497.5K, printed
    463K), so only 3a, 3b and 4b match within rounding; all are within 8%."""
    kib = inception_weights(module) / 1024
    printed = TABLE1[module][2]
    if module in ("3a", "3b", "4b"):
        assert abs(kib - printed) <= 1
    assert abs(kib - printed) / printed < 0.08


def test_googlenet_auxiliary_heads_and_pooling():
    network = net("googlenet")
    assert [o.name for o in network.outputs] == ["aux1.prob", "aux2.prob", "prob"]
    assert layer(network, "aux1.prob").layer.attrs["loss_weight"] == 0.3
    assert layer(network, "aux1.pool").layer.out_shape == (512, 4, 4)  # 14 -> 4 with 5x5/3
    assert [layer(network, p).layer.out_shape[1] for p in ("pool1", "pool2", "pool3", "pool4")] == [
        56,
        28,
        14,
        7,
    ]
    assert layer(network, "pool5").layer.out_shape == (1024, 1, 1)


# ---- other networks ---------------------------------------------------------


def test_resnet_stage_shapes():
    r18, r50 = net("resnet18"), net("resnet50")
    assert layer(r18, "layer4.2.relu").layer.out_shape == (512, 7, 7)
    assert layer(r50, "layer4.3.relu").layer.out_shape == (2048, 7, 7)
    # projections only where the shape changes
    names18 = {i.name for i in r18.infos}
    assert "layer2.1.downsample" in names18 and "layer1.1.downsample" not in names18
    assert "layer2.2.downsample" not in names18


def test_densenet121_block_shapes():
    network = net("densenet121")
    assert layer(network, "denseblock1.6.concat").layer.out_shape == (256, 56, 56)
    assert layer(network, "denseblock4.16.concat").layer.out_shape == (1024, 7, 7)


# ---- re-inference at another input size --------------------------------------


def test_resnet18_reshaped_to_160():
    network = net("resnet18").reshape((3, 160, 160))
    assert network.input_shape == (3, 160, 160)
    assert network.output_shape == (1000,)
    assert layer(network, "layer4.2.relu").layer.out_shape == (512, 5, 5)
    assert network.totals()["trainable_params"] == PUBLISHED["resnet18"]
    assert network.summary()["input"] == [3, 160, 160]
    # the original is untouched
    assert layer(net("resnet18"), "layer4.2.relu").layer.out_shape == (512, 7, 7)


def test_alexnet_reshaped_changes_fc6():
    network = net("alexnet").reshape((3, 259, 259))
    assert layer(network, "pool5").layer.out_shape == (256, 7, 7)
    assert layer(network, "fc6").layer.param_defs()[0].shape == (4096, 256 * 7 * 7)


def test_lenet5_at_16x16_fails_with_output_size_problem():
    with pytest.raises(cnnspec.SpecError) as info:
        net("lenet5").reshape((1, 16, 16))
    (problem,) = info.value.problems
    # 16 -> c1 12 -> s2 6 -> c3 2 -> s4 1: c5's 5x5 kernel no longer fits
    lines = (SPECS / "lenet5.yaml").read_text().splitlines()
    row = next(i for i, text in enumerate(lines) if "name: c5," in text)
    assert (problem.line, problem.col) == (row + 1, lines[row].index("kernel: 5") + 9)
    assert "kernel (5) is larger than the padded input (1)" in problem.message
    assert "floor((1 + 0 + 0 - 1*(5-1) - 1)/1) + 1 = -3" in problem.hint
    assert problem.file.endswith("lenet5.yaml")


BAD_SHAPES = [(0, 32, 32), (1, 0, 0), (1, -3, 32), (32, 32), (1, 32, 32, 32)]


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
def test_reshape_to_an_impossible_input_is_refused(shape):
    with pytest.raises(cnnspec.SpecError):
        net("lenet5").reshape(shape)


@pytest.mark.parametrize("shape", BAD_SHAPES, ids=str)
def test_reshape_to_an_impossible_input_names_the_input(shape):
    with pytest.raises(cnnspec.SpecError) as info:
        net("lenet5").reshape(shape)
    message = info.value.problems[0].message
    assert "input" in message and "no layers" not in message
    assert (
        message
        == f"input must be [channels, height, width] of positive integers, got {list(shape)}"
    )


def test_reshape_beyond_the_input_limit_names_the_limit():
    with pytest.raises(cnnspec.SpecError) as info:
        net("lenet5").reshape((1, 70000, 32))
    (p,) = info.value.problems
    assert p.message == "input sizes must be at most 65536, got [1, 70000, 32]"


def test_figures_quoted_in_the_readme():
    # course LeNet-5: 156 + 2,416 + 48,120 + 10,164 + 850
    assert net("lenet5").totals()["trainable_params"] == 61_706
    # ResNet-20, option A: 432 + 32 (stem) + 14,016 + 51,072 + 203,520 (stages) + 650 (fc)
    assert net("resnet20-cifar").totals()["trainable_params"] == 269_722
    # GoogLeNet (paper): each auxiliary head is conv 1x1 128 (+bias) on 4a (512 channels)
    # or 4d (528), fc 2048 -> 1024 and fc 1024 -> 1000, both with biases
    heads = [c * 128 + 128 + 2048 * 1024 + 1024 + 1024 * 1000 + 1000 for c in (512, 528)]
    assert heads == [3_188_840, 3_190_888]
    googlenet = net("googlenet").summary()
    assert googlenet["totals"]["trainable_params"] == 13_378_280
    main = [x for x in googlenet["layers"] if not x["name"].startswith("aux")]
    assert sum(x["trainable_params"] for x in main) == 13_378_280 - sum(heads) == 6_998_552
