"""Activation kernels beyond the conformance suite: extreme inputs, NaN, bad shapes, maxout's
argmax against numpy."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import activation as act
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6


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


def test_scaled_tanh_stand_ins_match_the_kernels():
    """LeNet-5 (1998)'s scaled tanh on a first run's numpy stand-ins (while a child
    compiles the kernels): the backward's bits, the forward's to numpy's tanh."""
    rng = np.random.default_rng(9)
    x, dout = (rng.standard_normal(1000).astype(np.float32) for _ in range(2))
    a, s = np.float32(act.SCALED_TANH_A), np.float32(act.SCALED_TANH_S)
    y = [np.full_like(x, np.nan) for _ in range(2)]
    act._stanh_fwd_numpy(x, a, s, y[0])
    act._stanh_fwd(x, a, s, y[1])
    np.testing.assert_allclose(y[0], y[1], rtol=1e-6, atol=1e-7)
    dx = [np.full_like(x, np.nan) for _ in range(2)]
    act._stanh_bwd_numpy(y[1], a, s, dout, dx[0])
    act._stanh_bwd(y[1], a, s, dout, dx[1])
    np.testing.assert_array_equal(dx[0], dx[1])
