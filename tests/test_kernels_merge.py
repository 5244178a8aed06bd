"""Residual add kernels, with and without the fused ReLU, against numpy."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import merge


@pytest.mark.parametrize("n_inputs", [1, 2, 3])
@pytest.mark.parametrize("act", [0, 1])
def test_add_forward_and_backward(n_inputs, act):
    rng = np.random.default_rng(n_inputs + 10 * act)
    xs = [rng.standard_normal((3, 4, 5, 6)).astype(np.float32) for _ in range(n_inputs)]
    out = np.full_like(xs[0], np.nan)
    merge.add_forward(xs, out, act)
    expect = np.sum(xs, axis=0)
    if act:
        expect = np.maximum(expect, 0)
    np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dxs = [np.full_like(x, np.nan) for x in xs] + [None]
    merge.add_backward(dout, out, act, dxs)
    g = dout * (out > 0) if act else dout
    for dx in dxs[:-1]:
        np.testing.assert_array_equal(dx, g)
