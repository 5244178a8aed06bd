"""Every classic spec compiles and learns: a few SGD steps on one fixed batch of
two images lower the loss. The ImageNet-sized ones are slow (run in CI)."""

import glob
import os

import numpy as np
import pytest

import cnnspec

SPECS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "specs", "*.yaml")))
SMALL = {"lenet5", "lenet5-1998", "resnet20-cifar"}
# RBF distances over 84 units make large gradients: LeCun's small step size
LEARNING_RATE = {"lenet5-1998": 2e-4}


def _param(path):
    name = os.path.splitext(os.path.basename(path))[0]
    marks = () if name in SMALL else (pytest.mark.slow,)
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_param(p) for p in SPECS])
def test_spec_compiles_and_loss_falls(path):
    net = cnnspec.load(path)
    model = net.compile(batch_size=2, seed=0)
    rng = np.random.default_rng(0)
    x = rng.random((2, *net.input_shape), dtype=np.float32)
    y = rng.integers(0, model.num_outputs, 2)
    lr = LEARNING_RATE.get(net.name, 0.002)
    state = model.rng.bit_generator.state
    losses = []
    for _ in range(4):
        model.rng.bit_generator.state = state  # the same dropout masks: one fixed objective
        losses.append(model.step(x, y, lr=lr, momentum=0.9))
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < losses[0], losses
