"""The compiled model end to end: gradients of whole networks against finite
differences (float64), parity with PyTorch, reproducibility, static buffers."""

import numpy as np
import pytest

import cnnspec

EVERY_LAYER = """
name: every-layer
input: [3, 9, 9]
layers:
  - {name: c1, type: conv2d, filters: 4, kernel: 3, padding: same, stride: 2}
  - {name: bn, type: batchnorm2d}
  - {name: a1, type: prelu}
  - {name: c2, type: conv2d, filters: 4, kernel: 3, padding: 2, dilation: 2, groups: 2}
  - {name: a2, type: elu}
  - {name: c3, type: conv2d, filters: 6, kernel: 1, inputs: [a1],
     connections: [[0], [1, 2], [2, 3], [0, 3], [0, 1, 2], [1, 2, 3]]}
  - {name: a3, type: leaky_relu, alpha: 0.1}
  - {name: cat, type: concat, inputs: [a2, a3]}
  - {name: lrn, type: lrn, size: 3}
  - {name: mo, type: maxout, pieces: 2}
  - {name: pad, type: channel_pad, channels: 6, inputs: [a2]}
  - {name: c4, type: conv2d, filters: 5, kernel: 3, padding: 1, inputs: [pad]}
  - {name: sum, type: add, inputs: [mo, c4]}
  - {name: up, type: conv_transpose2d, filters: 3, kernel: 3, stride: 2, padding: 1,
     output_padding: 1}
  - {name: sig, type: sigmoid}
  - {name: mp, type: maxpool2d, kernel: 3, stride: 2, ceil_mode: true}
  - {name: ap, type: avgpool2d, kernel: 2, stride: 1, padding: 1, inputs: [up]}
  - {name: ss, type: subsample2d, kernel: 2}
  - {name: st, type: scaled_tanh}
  - {name: gp, type: global_avgpool2d, inputs: [mp]}
  - {name: flat, type: flatten, inputs: [st]}
  - {name: d0, type: dense, units: 5, inputs: [flat]}
  - {name: th, type: tanh}
  - {name: both, type: concat, inputs: [th, gp2]}
  - {name: gp2, type: flatten, inputs: [gp]}
  - {name: rr, type: rrelu, inputs: [both]}
  - {name: drop, type: dropout, rate: 0.3}
  - {name: d1, type: dense, units: 4}
  - {name: out, type: softmax}
"""

RBF_NET = """
input: [1, 6, 6]
layers:
  - {type: conv2d, filters: 3, kernel: 3}
  - {type: scaled_tanh}
  - {type: dense, units: 5}
  - {type: rbf, units: 3, trainable: true}
"""

REGRESSION = """
input: [2, 5, 5]
layers:
  - {type: conv2d, filters: 3, kernel: 3, padding: valid}
  - {type: relu}
  - {type: dense, units: 2}
  - {type: linear}
"""


def _fd_check(model, x, y, n_checks=6, eps=1e-6, seed=0):
    """Central differences on a few entries of every trainable parameter."""
    state = model.rng.bit_generator.state

    def loss_at():
        model.rng.bit_generator.state = state  # same dropout mask / RReLU slopes
        keep = {k: v.copy() for k, v in model.params.items() if k not in model.trainable}
        loss, _ = model.loss_and_grads(x, y)
        for k, v in keep.items():  # running statistics must not drift between probes
            model.params[k][...] = v
        return loss

    loss_at()
    grads = {k: v.copy() for k, v in model.grads.items()}
    pick = np.random.default_rng(seed)
    for key, g in grads.items():
        p = model.params[key].reshape(-1)
        free = np.flatnonzero(model.masks[key]) if key in model.masks else np.arange(p.size)
        for idx in pick.choice(free, size=min(n_checks, free.size), replace=False):
            old = p[idx]
            p[idx] = old + eps
            up = loss_at()
            p[idx] = old - eps
            down = loss_at()
            p[idx] = old
            numeric = (up - down) / (2 * eps)
            analytic = g.reshape(-1)[idx]
            assert abs(numeric - analytic) <= 1e-5 + 1e-4 * abs(numeric), (key, idx)


@pytest.mark.parametrize("text", [EVERY_LAYER, RBF_NET, REGRESSION], ids=["all", "rbf", "mse"])
def test_whole_network_gradients_match_finite_differences(text):
    net = cnnspec.loads(text)
    model = net.compile(batch_size=3, seed=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, *net.input_shape))
    if net.outputs[-1].node.type == "linear":
        y = rng.normal(size=(3, model.num_outputs))
    else:
        y = rng.integers(0, model.num_outputs, 3)
    _fd_check(model, x, y)


def test_same_seed_same_weights_and_losses():
    net = cnnspec.load("specs/lenet5.yaml")
    a, b = net.compile(batch_size=4, seed=7), net.compile(batch_size=4, seed=7)
    c = net.compile(batch_size=4, seed=8)
    for k in a.params:
        assert np.array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["c1.weight"], c.params["c1.weight"])
    x = np.random.default_rng(0).random((4, 1, 32, 32), dtype=np.float32)
    y = np.array([0, 1, 2, 3])
    losses_a = [a.step(x, y, lr=0.05, momentum=0.9) for _ in range(3)]
    losses_b = [b.step(x, y, lr=0.05, momentum=0.9) for _ in range(3)]
    assert losses_a == losses_b


def test_params_are_the_models_storage_in_pytorch_layout():
    net = cnnspec.load("specs/lenet5.yaml")
    model = net.compile(batch_size=2)
    assert model.params["c1.weight"].shape == (6, 1, 5, 5)
    assert model.params["f6.weight"].shape == (84, 120)
    assert all(v.dtype == np.float32 for v in model.params.values())
    x = np.zeros((2, 1, 32, 32), np.float32)
    before = model.forward(x).copy()
    model.params["logits.bias"][:] = [10] + [0] * 9
    assert not np.allclose(model.forward(x), before)


def test_masked_connections_stay_masked():
    net = cnnspec.load("specs/lenet5-1998.yaml")
    model = net.compile(batch_size=2)
    mask = net.infos[4].layer.connection_mask
    w = model.params["c3.weight"]
    assert np.all(w[np.broadcast_to(mask == 0, w.shape)] == 0)
    x = np.random.default_rng(0).random((2, 1, 32, 32), dtype=np.float32)
    for _ in range(3):
        model.step(x, np.array([3, 4]), lr=0.1)
    assert np.all(w[np.broadcast_to(mask == 0, w.shape)] == 0)
    assert "output.weight" not in model.trainable


def test_wrong_batch_shape_is_a_clear_error():
    model = cnnspec.load("specs/lenet5.yaml").compile(batch_size=2)
    with pytest.raises(ValueError, match="batch size is fixed"):
        model.forward(np.zeros((3, 1, 32, 32), np.float32))


def _torch_lenet(model, vs_torch):
    torch = pytest.importorskip("torch")
    t = vs_torch.torch_model("lenet5")  # the benchmark's twin
    names = ["c1", None, None, "c3", None, None, "c5", None, None, "f6", None, "logits"]
    with torch.no_grad():
        for mod, name in zip(t, names, strict=True):
            if name:
                mod.weight.copy_(torch.from_numpy(model.params[f"{name}.weight"]))
                mod.bias.copy_(torch.from_numpy(model.params[f"{name}.bias"]))
    return torch, t, names


def test_lenet5_matches_pytorch_forward_and_backward(vs_torch):
    model = cnnspec.load("specs/lenet5.yaml").compile(batch_size=5, seed=3)
    torch, t, names = _torch_lenet(model, vs_torch)
    rng = np.random.default_rng(1)
    x = rng.random((5, 1, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, 5)
    loss, grads = model.loss_and_grads(x, y)
    out = t(torch.from_numpy(x))
    ref = torch.nn.functional.cross_entropy(out, torch.from_numpy(y))
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * max(1, abs(ref.item()))
    np.testing.assert_allclose(model.forward(x), out.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        model.probabilities(x), torch.softmax(out, 1).detach().numpy(), rtol=1e-4, atol=1e-6
    )
    for mod, name in zip(t, names, strict=True):
        if name:
            for part in ("weight", "bias"):
                ref_g = getattr(mod, part).grad.numpy()
                got = grads[f"{name}.{part}"]
                assert np.abs(got - ref_g).max() <= 1e-4 * np.abs(ref_g).max() + 1e-7, name


FUSIONS = """
input: [2, 6, 6]
layers:
  - {name: conv, type: conv2d, filters: 3, kernel: 3, padding: 1}
  - {name: r1, type: relu}
  - {name: bn, type: batchnorm2d}
  - {name: r2, type: relu}
  - {name: conv2, type: conv2d, filters: 3, kernel: 3, padding: 1}
  - {name: sum, type: add, inputs: [conv2, r2]}
  - {name: r4, type: relu}
  - {name: fc, type: dense, units: 4}
  - {name: r3, type: relu}
  - {name: out, type: dense, units: 3}
  - {name: prob, type: softmax}
"""


def test_fused_relu_with_several_users_sums_their_gradients():
    """A ReLU fused into batch norm whose output feeds two layers (ResNet's stem feeds
    the first block's conv and its shortcut): both users' gradients must reach it."""
    net = cnnspec.loads(
        """
input: [2, 6, 6]
layers:
  - {name: conv, type: conv2d, filters: 3, kernel: 3, padding: 1}
  - {name: bn, type: batchnorm2d}
  - {name: r, type: relu}
  - {name: a, type: conv2d, filters: 3, kernel: 3, padding: 1}
  - {name: sum, type: add, inputs: [a, r]}
  - {name: fc, type: dense, units: 3}
  - {name: prob, type: softmax}
"""
    )
    model = net.compile(batch_size=4, seed=2, dtype=np.float64)
    assert model.fused == {"r": "bn"}
    rng = np.random.default_rng(3)
    _fd_check(model, rng.normal(size=(4, 2, 6, 6)), rng.integers(0, 3, 4))


def test_fused_relus_compute_what_separate_relus_do():
    """ReLUs after conv, batch norm, add and dense run inside those layers; the numbers must
    be those of separate layers (checked here against finite differences and against
    a network where each ReLU cannot fuse because its producer has a second user)."""
    net = cnnspec.loads(FUSIONS)
    model = net.compile(batch_size=4, seed=2, dtype=np.float64)
    assert set(model.fused) == {"r1", "r2", "r3", "r4"}
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 2, 6, 6)), rng.integers(0, 3, 4)
    _fd_check(model, x, y)
    unfused = cnnspec.loads(
        FUSIONS.replace(
            "{name: prob, type: softmax}",
            "{name: prob, type: softmax}\n"
            "  - {name: keep, type: concat, inputs: [conv, bn, sum]}\n"
            "  - {name: keep2, type: flatten, inputs: [fc]}",
        )
    )
    other = unfused.compile(batch_size=4, seed=2, dtype=np.float64)
    assert not other.fused
    for k in model.params:
        other.params[k][...] = model.params[k]
    np.testing.assert_allclose(other.forward(x, train=True), model.forward(x, train=True))
    loss_a, grads_a = model.loss_and_grads(x, y)
    loss_b, grads_b = other.loss_and_grads(x, y)
    assert np.isclose(loss_a, loss_b)
    for k in grads_a:
        np.testing.assert_allclose(grads_a[k], grads_b[k], rtol=1e-10, atol=1e-12)


def test_resnet20_gradients_match_finite_differences():
    """A whole classic spec (blocks, `when`, option-A shortcuts, fused ReLUs feeding
    residual branches) at a small input size, in float64."""
    net = cnnspec.load("specs/resnet20-cifar.yaml").reshape((3, 8, 8))
    model = net.compile(batch_size=2, seed=4, dtype=np.float64)
    rng = np.random.default_rng(5)
    _fd_check(model, rng.normal(size=(2, 3, 8, 8)), rng.integers(0, 10, 2), n_checks=2)


def test_gradient_buffers_share_memory_when_their_lives_do_not_overlap():
    model = cnnspec.load("specs/resnet20-cifar.yaml").compile(batch_size=2)
    bases = {id(b.base if b.base is not None else b) for b in model.dbuf.values()}
    assert len(bases) < len(model.dbuf) / 3  # 73 layers, a handful of buffers


@pytest.mark.parametrize(
    "spec, shape",
    [
        ("lenet5", None),
        ("resnet20-cifar", (3, 16, 16)),
        ("googlenet-bn", (3, 64, 64)),
        ("densenet121", (3, 32, 32)),
    ],
)
def test_inference_model_shares_activation_memory_and_predicts_the_same(spec, shape):
    net = cnnspec.load(f"specs/{spec}.yaml")
    if shape:
        net = net.reshape(shape)
    train = net.compile(batch_size=2, seed=1)
    infer = net.compile(batch_size=2, seed=1, training=False)
    x = np.random.default_rng(2).random((2, *net.input_shape), dtype=np.float32)
    np.testing.assert_array_equal(infer.forward(x), train.forward(x))

    def held(model):
        return sum({id(b): b.nbytes for b in model.buf.values() if b.base is None}.values()) + sum(
            {id(b.base): b.base.nbytes for b in model.buf.values() if b.base is not None}.values()
        )

    if spec != "lenet5":  # LeNet-5's activations all differ in size: nothing to share
        assert held(infer) < held(train)
    with pytest.raises(RuntimeError, match="inference"):
        infer.loss_and_grads(x, np.zeros(2, np.int64))


def test_conv_covering_its_whole_input_runs_as_dense_and_matches_finite_differences():
    net = cnnspec.loads(
        """
input: [2, 6, 6]
layers:
  - {name: c1, type: conv2d, filters: 3, kernel: 2}
  - {name: full, type: conv2d, filters: 4, kernel: 5,
     connections: [[0], [0, 1], [1, 2], [0, 1, 2]]}
  - {name: r, type: relu}
  - {name: fc, type: dense, units: 3}
  - {name: prob, type: softmax}
"""
    )
    assert net.infos[1].layer.is_dense and not net.infos[0].layer.is_dense
    model = net.compile(batch_size=3, seed=6, dtype=np.float64)
    assert model.fused == {"r": "full"}
    rng = np.random.default_rng(7)
    _fd_check(model, rng.normal(size=(3, 2, 6, 6)), rng.integers(0, 3, 3))
