"""Loss kernels and the RBF output layer: finite differences and reference parity."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import output as L
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4


@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_softmax_cross_entropy_finite_differences(weight):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((5, 4)) * 2
    labels = rng.integers(0, 4, 5)
    probs, dlogits = np.empty_like(logits), np.full_like(logits, np.nan)
    value = L.softmax_loss(logits, labels, probs, dlogits, weight)
    assert isinstance(value, float)

    def f():
        return L.softmax_loss(logits, labels, probs, None, weight)

    assert rel_error(dlogits, numerical_grad(f, logits)) < FD_TOL
    assert f() == value  # the loss-only path agrees bit for bit (and refreshes probs)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref_p = e / e.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, ref_p, rtol=1e-12)
    ref = -weight * np.mean(np.log(ref_p[np.arange(5), labels]))
    assert np.isclose(value, ref, rtol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_softmax_cross_entropy_matches_torch(scale):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((6, 10)) * scale).astype(np.float32)
    labels = rng.integers(0, 10, 6)
    probs, dlogits = np.empty_like(logits), np.empty_like(logits)
    weight = 0.7
    value = L.softmax_loss(logits, labels, probs, dlogits, weight)
    lt = torch.tensor(logits, requires_grad=True)
    ref = weight * torch.nn.functional.cross_entropy(lt, torch.tensor(labels))
    ref.backward()
    assert np.isfinite(value)
    assert abs(value - ref.item()) <= TORCH_TOL * max(1.0, abs(ref.item()))
    assert rel_error(probs, torch.softmax(lt, dim=1).detach().numpy()) < TORCH_TOL
    assert rel_error(dlogits, lt.grad.numpy()) < TORCH_TOL


@pytest.mark.parametrize("labels", [[0, 3], [-1, 2], [2, 0, 7, -4]])
def test_softmax_cross_entropy_rejects_bad_labels(labels):
    """Out of [0, K): the kernel counts them as it reads them (its numpy stand-in too),
    and the loss raises."""
    labels = np.array(labels)
    logits = np.zeros((len(labels), 3), np.float32)
    with pytest.raises(ValueError, match=r"labels out of range \[0, 3\)"):
        L.softmax_loss(logits, labels, np.empty_like(logits), None)
    bad = int(((labels < 0) | (labels >= 3)).sum())
    for run in (L._softmax_ce, L._softmax_ce_numpy):
        probs, losses = np.zeros_like(logits), np.zeros(len(labels))
        assert run(logits, labels, probs, probs, np.float32(1), False, losses) == bad


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2)])
def test_mse_finite_differences(shape):
    rng = np.random.default_rng(0)
    pred = rng.standard_normal(shape)
    target = rng.standard_normal(shape)
    dpred = np.full_like(pred, np.nan)
    value = L.linear_loss(pred, target, dpred, 0.5)
    assert np.isclose(value, 0.5 * np.mean((pred - target) ** 2), rtol=1e-12)

    def f():
        return L.linear_loss(pred, target, None, 0.5)

    assert rel_error(dpred, numerical_grad(f, pred)) < FD_TOL


def test_mse_matches_torch_and_is_chunked_deterministically():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    shape = (3, 40000)  # several reduction chunks
    pred = rng.standard_normal(shape).astype(np.float32)
    target = rng.standard_normal(shape).astype(np.float32)
    dpred = np.empty_like(pred)
    value = L.linear_loss(pred, target, dpred, 2.0)
    pt = torch.tensor(pred, requires_grad=True)
    ref = 2.0 * torch.nn.functional.mse_loss(pt, torch.tensor(target))
    ref.backward()
    assert abs(value - ref.item()) <= TORCH_TOL * abs(ref.item())
    assert rel_error(dpred, pt.grad.numpy()) < TORCH_TOL
    assert L.linear_loss(pred, target, None, 2.0) == value


def _rbf_ref(x, c):
    return ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rbf(dtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 7)).astype(dtype)
    centres = rng.choice([-1.0, 1.0], size=(3, 7)).astype(dtype)
    out = np.empty((4, 3), dtype)
    L.rbf_forward(x, centres, out)
    tol = 1e-12 if dtype == np.float64 else TORCH_TOL
    assert rel_error(out, _rbf_ref(x.astype(np.float64), centres)) < tol
    r = rng.standard_normal((4, 3)).astype(dtype)
    dx, dc = np.full_like(x, np.nan), np.full_like(centres, np.nan)
    L.rbf_backward(x, centres, r, dx, dc)
    diff = x[:, None, :].astype(np.float64) - centres[None, :, :]
    ref_dx = 2 * np.einsum("nk,nkf->nf", r, diff)
    ref_dc = -2 * np.einsum("nk,nkf->kf", r, diff)
    assert rel_error(dx, ref_dx) < tol
    assert rel_error(dc, ref_dc) < tol
    dx2 = np.empty_like(x)
    L.rbf_backward(x, centres, r, dx2, None)  # fixed centres
    np.testing.assert_array_equal(dx2, dx)
    if dtype == np.float64:

        def f():
            L.rbf_forward(x, centres, out)
            return float(np.sum(out * r))

        assert rel_error(dx, numerical_grad(f, x)) < FD_TOL
        assert rel_error(dc, numerical_grad(f, centres)) < FD_TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("want_grad", [True, False])
def test_softmax_stand_in_matches_the_kernel(dtype, want_grad):
    """The loss's numpy stand-in (a first run's first steps, while a child compiles the
    kernel): the kernel's numbers to the last bits of numpy's exponentials."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal((64, 10)) * 3).astype(dtype)
    labels = rng.integers(0, 10, 64)
    scale = dtype(0.7 / 64)
    results = []
    for run in (L._softmax_ce_numpy, L._softmax_ce):
        probs, losses = np.full_like(logits, np.nan), np.full(64, np.nan)
        dlogits = np.full_like(logits, np.nan)
        run(logits, labels, probs, dlogits if want_grad else probs, scale, want_grad, losses)
        results.append((probs, losses, dlogits))
    tol = 1e-6 if dtype == np.float32 else 1e-14
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_rbf_stand_ins_match_the_kernels():
    """LeNet-5 (1998)'s RBF units on a first run's numpy stand-ins: the gradients' bits
    (added in the kernels' order), the distances' float64 sums to their rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 84)).astype(np.float32)
    centres = np.sign(rng.standard_normal((10, 84))).astype(np.float32)
    dout = rng.standard_normal((16, 10)).astype(np.float32)
    got = [[np.full((16, 10), np.nan, np.float32), np.full_like(x, np.nan),
            np.full_like(centres, np.nan)] for _ in range(2)]  # fmt: skip
    for (out, dx, dc), suffix in zip(got, ("_numpy", ""), strict=True):
        getattr(L, "_rbf_fwd" + suffix)(x, centres, out)
        getattr(L, "_rbf_bwd_dx" + suffix)(x, centres, dout, dx)
        getattr(L, "_rbf_bwd_dc" + suffix)(x, centres, dout, dc)
    np.testing.assert_allclose(got[0][0], got[1][0], rtol=1e-7)
    np.testing.assert_array_equal(got[0][1], got[1][1])
    np.testing.assert_array_equal(got[0][2], got[1][2])
