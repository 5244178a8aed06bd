"""The Python API as scripts use it: host copies, outputs by name, the input gradient,
targets per head, and SGD state kept across step() calls."""

import numpy as np
import pytest

import cnnspec
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

SPEC = """
input: [1, 6, 6]
layers:
  - {type: conv2d, name: conv, filters: 3, kernel: 3}
  - {type: relu, name: act}
  - {type: flatten, name: flat}
  - {type: dense, name: aux_fc, units: 2}
  - {type: linear, name: regress}
  - {type: dense, name: fc, inputs: [flat], units: 4}
  - {type: softmax, name: classes}
"""
X = np.random.default_rng(0).standard_normal((2, 1, 6, 6))
Y = {"regress": np.array([[0.5, -1.0], [1.0, 0.0]]), "classes": np.array([1, 3])}


def model(**kw):
    return cnnspec.loads(SPEC).compile(batch_size=2, dtype="float64", **kw)


def test_forward_returns_host_copies():
    m = model()
    a = m.forward(X)
    b = m.forward(X + 1.0)
    assert not np.shares_memory(a, m.buf["classes"]) and not np.allclose(a, b)
    loss, grads = m.loss_and_grads(X, Y, copy=True)
    views = m.loss_and_grads(X * 2, Y)[1]
    assert np.shares_memory(views["fc.weight"], m.flat_grads)
    assert not np.shares_memory(grads["fc.weight"], m.flat_grads)
    assert not np.allclose(grads["fc.weight"], views["fc.weight"])


def test_outputs_by_name():
    m = model(keep=["conv"])
    out = m.forward(X, outputs=[*m.head_names, "conv"])
    assert set(out) == {"regress", "classes", "conv"}
    np.testing.assert_array_equal(out["classes"], m.forward(X))
    # kept, conv holds its pre-activation: the ReLU after it got its own buffer
    assert (out["conv"] < 0).any()
    with pytest.raises(ValueError, match=r"compile with keep=\['act'\]"):
        m.forward(X, outputs=["act"])
    with pytest.raises(ValueError, match="no layer 'conv1'; did you mean 'conv'"):
        m.forward(X, outputs=["conv1"])
    with pytest.raises(ValueError, match="no layer"):
        model(keep=["nope"])


def test_a_target_per_head():
    m = model()
    with pytest.raises(ValueError, match=r"different losses .*give a target per head"):
        m.loss_and_grads(X, Y["classes"])
    with pytest.raises(ValueError, match=r"missing: \['regress'\]"):
        m.loss_and_grads(X, {"classes": Y["classes"]})
    loss, _ = m.loss_and_grads(X, Y)
    scores = m.forward(X, outputs=m.head_names)
    z = scores["classes"] - scores["classes"].max(axis=1, keepdims=True)
    ce = -np.mean(z[[0, 1], Y["classes"]] - np.log(np.exp(z).sum(axis=1)))
    mse = np.mean((scores["regress"] - Y["regress"]) ** 2)
    assert loss == pytest.approx(ce + mse, rel=1e-10)


def test_input_gradient_matches_finite_differences():
    m = model()
    x = X.copy()
    dx = m.input_gradient(x, Y)
    num = numerical_grad(lambda: m.loss_and_grads(x, Y)[0], x)
    assert rel_error(dx, num) < 1e-6
    loss_before, grads = m.loss_and_grads(x, Y, copy=True)
    fresh = model()  # parameter gradients are unchanged by computing the input's
    np.testing.assert_allclose(fresh.loss_and_grads(x, Y)[1]["conv.weight"], grads["conv.weight"])


def test_step_keeps_momentum_when_settings_change():
    from cnnspec.train.optim import SGD

    m, ref = model(), model()
    params = {k: ref.params[k] for k in ref.trainable}
    opt = SGD(params, lr=0.1, momentum=0.9)
    for momentum, decay in [(0.9, 0.0), (0.9, 0.01), (0.5, 0.01)]:
        m.step(X, Y, lr=0.1, momentum=momentum, weight_decay=decay)
        opt.configure(momentum, False, decay)
        opt.step(ref.loss_and_grads(X, Y)[1])
    for k in params:
        np.testing.assert_allclose(m.params[k], ref.params[k], rtol=1e-12)


def test_staged_batches_are_copied_at_hand_over_and_refused_once_overwritten():
    """Model.stage takes a batch ahead of its step (the trainer hands each one a step
    early): the host array may change at once; a third hand-over reuses the first slot."""
    m, plain = model(), model()
    x = X.copy()
    first = m.stage(x)
    x *= 3.0  # the caller reuses its array for the next batch
    second = m.stage(x)
    x[...] = np.nan
    np.testing.assert_array_equal(m.forward(first), plain.forward(X))
    loss, grads = m.loss_and_grads(second, Y, copy=True)
    want_loss, want = plain.loss_and_grads(X * 3.0, Y, copy=True)
    assert loss == want_loss and all(np.array_equal(grads[k], want[k]) for k in want)
    np.testing.assert_array_equal(m.forward(X), plain.forward(X))  # arrays still work
    m.stage(X)
    with pytest.raises(RuntimeError, match="overwritten by a later one"):
        m.forward(first)
    with pytest.raises(ValueError, match="staged for another model"):
        plain.forward(second)
    with pytest.raises(ValueError, match="batch size is fixed"):
        m.stage(X[:1])
