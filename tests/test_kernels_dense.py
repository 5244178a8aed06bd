"""Dense kernels: finite differences (float64) and PyTorch parity (float32)."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import dense
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_dense_finite_differences(bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5))
    w = rng.standard_normal((4, 5))
    b = rng.standard_normal(4) if bias else None
    out = np.empty((3, 4))
    r = rng.standard_normal((3, 4))

    def f():
        dense.dense_forward(x, w, b, out)
        return float(np.sum(out * r))

    f()
    dx, dw = np.full_like(x, np.nan), np.full_like(w, np.nan)
    db = np.full(4, np.nan) if bias else None
    dense.dense_backward(x, w, r, dx, dw, db)
    assert rel_error(dx, numerical_grad(f, x)) < FD_TOL
    assert rel_error(dw, numerical_grad(f, w)) < FD_TOL
    if bias:
        assert rel_error(db, numerical_grad(f, b)) < FD_TOL
    dw2 = np.empty_like(w)
    dense.dense_backward(x, w, r, None, dw2, None)
    np.testing.assert_array_equal(dw2, dw)


def test_dense_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 9)).astype(np.float32)
    w = rng.standard_normal((4, 9)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    out = np.empty((6, 4), np.float32)
    dense.dense_forward(x, w, b, out)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    ref = torch.nn.functional.linear(xt, wt, bt)
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    dout = rng.standard_normal((6, 4)).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    dense.dense_backward(x, w, dout, dx, dw, db)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(dw, wt.grad.numpy()) < TORCH_TOL
    assert rel_error(db, bt.grad.numpy()) < TORCH_TOL
