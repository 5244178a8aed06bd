"""Activation kernels: finite differences (float64) and PyTorch / numpy parity (float32)."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import activation as act
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4
ALPHA = 0.15
ELU_ALPHA = 1.3
RRELU_LO, RRELU_HI = 1 / 8, 1 / 3


def _x(rng, shape, dtype):
    x = rng.standard_normal(shape) * 2
    x[np.abs(x) < 0.05] = 0.3  # keep finite differences away from the kink at 0
    return x.astype(dtype)


def _forward_backward(name, x, dout, slopes=None):
    """Run one elementwise activation kernel pair on flat arrays; returns (out, dx)."""
    out = np.full_like(x, np.nan)
    dx = np.full_like(x, np.nan)
    if name == "relu":
        act.relu_forward(x, out)
        act.relu_backward(x, dout, dx)
    elif name == "leaky_relu":
        act.leaky_relu_forward(x, ALPHA, out)
        act.leaky_relu_backward(x, ALPHA, dout, dx)
    elif name == "elu":
        act.elu_forward(x, ELU_ALPHA, out)
        act.elu_backward(x, out, ELU_ALPHA, dout, dx)
    elif name == "sigmoid":
        act.sigmoid_forward(x, out)
        act.sigmoid_backward(out, dout, dx)
    elif name == "tanh":
        act.tanh_forward(x, out)
        act.tanh_backward(out, dout, dx)
    elif name == "scaled_tanh":
        act.scaled_tanh_forward(x, out)
        act.scaled_tanh_backward(out, dout, dx)
    elif name in ("rrelu_train", "rrelu_eval"):
        act.rrelu_forward(x, slopes, out)
        act.rrelu_backward(x, slopes, dout, dx)
    else:
        raise AssertionError(name)
    return out, dx


def _slopes(name, rng, n, dtype):
    if name == "rrelu_train":
        return rng.uniform(RRELU_LO, RRELU_HI, n).astype(dtype)
    if name == "rrelu_eval":
        return np.full(n, (RRELU_LO + RRELU_HI) / 2, dtype)
    return None


ELEMENTWISE = [
    "relu",
    "leaky_relu",
    "elu",
    "sigmoid",
    "tanh",
    "scaled_tanh",
    "rrelu_train",
    "rrelu_eval",
]


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_finite_differences(name):
    rng = np.random.default_rng(0)
    x = _x(rng, 40, np.float64)
    r = rng.standard_normal(40)
    slopes = _slopes(name, rng, 40, np.float64)
    _, dx = _forward_backward(name, x, r, slopes)

    def loss():
        out, _ = _forward_backward(name, x, r, slopes)
        return float(np.sum(out * r))

    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL


def _torch_ref(name, xt, slopes):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if name == "relu":
        return F.relu(xt)
    if name == "leaky_relu":
        return F.leaky_relu(xt, ALPHA)
    if name == "elu":
        return F.elu(xt, ELU_ALPHA)
    if name == "sigmoid":
        return torch.sigmoid(xt)
    if name == "tanh":
        return torch.tanh(xt)
    if name == "scaled_tanh":
        return 1.7159 * torch.tanh(2.0 * xt / 3.0)
    if name == "rrelu_eval":
        return F.rrelu(xt, RRELU_LO, RRELU_HI, training=False)
    if name == "rrelu_train":
        # like torch.rrelu(training=True): elements <= 0 use the noise slope
        return torch.where(xt > 0, xt, xt * torch.tensor(slopes))
    raise AssertionError(name)


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_elementwise_matches_torch(name):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shape = (2, 3, 4, 5)
    x = _x(rng, shape, np.float32)
    x.reshape(-1)[:4] = [0.0, -30.0, 30.0, -1e-3]  # zero, saturation, tiny negative
    dout = rng.standard_normal(shape).astype(np.float32)
    slopes = _slopes(name, rng, x.size, np.float32)
    out, dx = _forward_backward(name, x.reshape(-1), dout.reshape(-1), slopes)
    xt = torch.tensor(x, requires_grad=True)
    ref = _torch_ref(name, xt, None if slopes is None else slopes.reshape(shape))
    ref.backward(torch.tensor(dout))
    assert rel_error(out.reshape(shape), ref.detach().numpy()) < TORCH_TOL
    assert rel_error(dx.reshape(shape), xt.grad.numpy()) < TORCH_TOL


def test_sigmoid_is_stable_for_large_inputs():
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], np.float32)
    out = np.empty_like(x)
    with np.errstate(all="raise"):
        act.sigmoid_forward(x, out)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[[0, 2, 4]], [0.0, 0.5, 1.0])


def test_relu_propagates_nan():
    x = np.array([np.nan, -1.0, 2.0])
    out = np.empty_like(x)
    act.relu_forward(x, out)
    assert np.isnan(out[0]) and out[1] == 0 and out[2] == 2


def test_elementwise_rejects_multidimensional():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError):
        act.relu_forward(x, np.empty_like(x))


PRELU_CASES = {
    "per_channel_4d": ((2, 3, 4, 5), 3),
    "shared_4d": ((2, 3, 4, 5), 1),
    "per_channel_2d": ((4, 6), 6),
    "shared_2d": ((4, 6), 1),
}


@pytest.mark.parametrize("name", list(PRELU_CASES))
def test_prelu_finite_differences(name):
    shape, nw = PRELU_CASES[name]
    rng = np.random.default_rng(0)
    x = _x(rng, shape, np.float64)
    w = rng.uniform(0.05, 0.5, nw)
    r = rng.standard_normal(shape)
    out = np.empty_like(x)

    def loss():
        act.prelu_forward(x, w, out)
        return float(np.sum(out * r))

    loss()
    dx, dw = np.full_like(x, np.nan), np.full_like(w, np.nan)
    act.prelu_backward(x, w, r, dx, dw)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL
    assert rel_error(dw, numerical_grad(loss, w)) < FD_TOL
    dw2 = np.empty_like(w)
    act.prelu_backward(x, w, r, None, dw2)  # first layer: no input gradient
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("name", list(PRELU_CASES))
def test_prelu_matches_torch(name):
    torch = pytest.importorskip("torch")
    shape, nw = PRELU_CASES[name]
    rng = np.random.default_rng(1)
    x = _x(rng, shape, np.float32)
    w = rng.uniform(0.05, 0.5, nw).astype(np.float32)
    out = np.empty_like(x)
    act.prelu_forward(x, w, out)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    ref = torch.nn.functional.prelu(xt, wt)
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    dout = rng.standard_normal(shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dw = np.empty_like(x), np.empty_like(w)
    act.prelu_backward(x, w, dout, dx, dw)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(dw, wt.grad.numpy()) < TORCH_TOL


def _maxout_ref(x, pieces):
    n, c = x.shape[:2]
    grouped = x.reshape(n, c // pieces, pieces, *x.shape[2:])
    winner = grouped.argmax(axis=2)
    k_index = np.arange(c // pieces).reshape((1, -1) + (1,) * (x.ndim - 2))
    return grouped.max(axis=2), (k_index * pieces + winner).astype(np.int32)


@pytest.mark.parametrize("shape,pieces", [((2, 6, 3, 4), 2), ((2, 6, 3, 4), 3), ((5, 8), 4)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maxout(shape, pieces, dtype):
    rng = np.random.default_rng(0)
    x = rng.permutation(np.prod(shape)).reshape(shape).astype(dtype) / 7.0  # no ties
    out_shape = (shape[0], shape[1] // pieces, *shape[2:])
    out = np.empty(out_shape, dtype)
    arg = np.empty(out_shape, np.int32)
    act.maxout_forward(x, pieces, out, arg)
    ref_out, ref_arg = _maxout_ref(x, pieces)
    np.testing.assert_array_equal(out, ref_out)
    np.testing.assert_array_equal(arg, ref_arg)
    r = rng.standard_normal(out_shape).astype(dtype)
    dx = np.full_like(x, np.nan)
    act.maxout_backward(r, arg, dx)
    ref_dx = np.zeros_like(x)
    np.put_along_axis(ref_dx, ref_arg, r, axis=1)
    np.testing.assert_array_equal(dx, ref_dx)
    if dtype == np.float64:

        def loss():
            act.maxout_forward(x, pieces, out, arg)
            return float(np.sum(out * r))

        assert rel_error(dx, numerical_grad(loss, x, eps=1e-4)) < FD_TOL
        act.maxout_forward(x, pieces, out, arg)
