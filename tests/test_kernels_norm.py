"""Normalisation kernels: finite differences (float64) and PyTorch parity (float32)."""

import numpy as np
import pytest

from cnnspec.kernels.cpu import norm
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4
EPS = 1e-5
MOMENTUM = 0.1

BN_SHAPES = {"4d": (3, 4, 3, 2), "2d": (6, 3)}


def _bn_setup(shape, dtype, seed):
    rng = np.random.default_rng(seed)
    c = shape[1]
    x = rng.standard_normal(shape) * 2 + rng.standard_normal((1, c) + (1,) * (len(shape) - 2))
    gamma = rng.uniform(0.5, 1.5, c)
    beta = rng.standard_normal(c)
    return rng, x.astype(dtype), gamma.astype(dtype), beta.astype(dtype)


@pytest.mark.parametrize("name", list(BN_SHAPES))
def test_batchnorm_train_finite_differences(name):
    shape = BN_SHAPES[name]
    rng, x, gamma, beta = _bn_setup(shape, np.float64, 0)
    c = shape[1]
    r = rng.standard_normal(shape)
    out, mean, inv_std = np.empty_like(x), np.empty(c), np.empty(c)
    rm, rv = np.zeros(c), np.ones(c)

    def loss():
        norm.batchnorm2d_forward_train(x, gamma, beta, EPS, MOMENTUM, rm, rv, out, mean, inv_std)
        return float(np.sum(out * r))

    loss()
    dx, dg, db = np.full_like(x, np.nan), np.full(c, np.nan), np.full(c, np.nan)
    norm.batchnorm2d_backward(r, x, mean, gamma, inv_std, dx, dg, db)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL
    assert rel_error(dg, numerical_grad(loss, gamma)) < FD_TOL
    assert rel_error(db, numerical_grad(loss, beta)) < FD_TOL


@pytest.mark.parametrize("name", list(BN_SHAPES))
def test_batchnorm_matches_torch(name):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    shape = BN_SHAPES[name]
    rng, x, gamma, beta = _bn_setup(shape, np.float32, 1)
    c = shape[1]
    rm = rng.standard_normal(c).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, c).astype(np.float32)
    rm_t, rv_t = torch.tensor(rm), torch.tensor(rv)
    out, mean, inv_std = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    norm.batchnorm2d_forward_train(x, gamma, beta, EPS, MOMENTUM, rm, rv, out, mean, inv_std)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    ref = F.batch_norm(xt, rm_t, rv_t, gt, bt, training=True, momentum=MOMENTUM, eps=EPS)
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    assert rel_error(rm, rm_t.numpy()) < TORCH_TOL
    assert rel_error(rv, rv_t.numpy()) < TORCH_TOL
    dout = rng.standard_normal(shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dg, db = np.empty_like(x), np.empty_like(gamma), np.empty_like(beta)
    norm.batchnorm2d_backward(dout, x, mean, gamma, inv_std, dx, dg, db)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(dg, gt.grad.numpy()) < TORCH_TOL
    assert rel_error(db, bt.grad.numpy()) < TORCH_TOL
    # eval mode with the updated running statistics
    out_eval = np.empty_like(x)
    norm.batchnorm2d_forward_eval(x, gamma, beta, EPS, rm, rv, out_eval)
    ref_eval = F.batch_norm(torch.tensor(x), rm_t, rv_t, gt, bt, training=False, eps=EPS)
    assert rel_error(out_eval, ref_eval.detach().numpy()) < TORCH_TOL


def test_batchnorm_eval_float64_and_no_affine():
    rng, x, gamma, beta = _bn_setup((2, 3, 2, 2), np.float64, 2)
    rm = rng.standard_normal(3)
    rv = rng.uniform(0.5, 2.0, 3)
    out = np.empty_like(x)
    norm.batchnorm2d_forward_eval(x, gamma, beta, EPS, rm, rv, out)
    b = (1, 3, 1, 1)
    ref = (x - rm.reshape(b)) / np.sqrt(rv.reshape(b) + EPS) * gamma.reshape(b) + beta.reshape(b)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)
    norm.batchnorm2d_forward_eval(x, None, None, EPS, rm, rv, out)
    ref = (x - rm.reshape(b)) / np.sqrt(rv.reshape(b) + EPS)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)


# (shape, size, alpha, beta, k)
def test_batchnorm_returns_the_batch_statistics_backward_uses():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 3, 5, 5)) * 3 + 7).astype(np.float32)
    c = x.shape[1]
    out, inv_std, mean = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    norm.batchnorm2d_forward_train(x, None, None, 1e-5, 0.1, None, None, out, mean, inv_std)
    np.testing.assert_allclose(mean, x.mean(axis=(0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv_std, 1 / np.sqrt(x.var(axis=(0, 2, 3)) + 1e-5), rtol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_batchnorm_fused_relu_is_relu_of_batchnorm(dtype):
    """Backward recomputes the ReLU's mask from x and the forward's scale and shift: it
    must be the forward's mask exactly (the output is x * scale + shift, clipped)."""
    rng, x, gamma, beta = _bn_setup((8, 3, 9, 9), dtype, 12)
    c = x.shape[1]
    mean, inv_std, affine = np.empty(c, dtype), np.empty(c, dtype), np.empty((2, c), dtype)
    plain, fused = np.empty_like(x), np.empty_like(x)
    norm.batchnorm2d_forward_train(x, gamma, beta, EPS, MOMENTUM, None, None, plain, mean, inv_std)
    norm.batchnorm2d_forward_train(
        x, gamma, beta, EPS, MOMENTUM, None, None, fused, mean, inv_std, 1, affine
    )
    np.testing.assert_array_equal(fused, np.maximum(plain, 0))
    np.testing.assert_array_equal(
        fused, np.maximum(x * affine[0, :, None, None] + affine[1, :, None, None], 0)
    )
    dout = rng.standard_normal(x.shape).astype(dtype)
    grads = [np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)]
    norm.batchnorm2d_backward(dout, x, mean, gamma, inv_std, *grads, affine, 1)
    expect = [np.empty_like(x), np.empty(c, dtype), np.empty(c, dtype)]
    masked = np.where(fused > 0, dout, 0).astype(dtype)
    norm.batchnorm2d_backward(masked, x, mean, gamma, inv_std, *expect)
    tol = 1e-5 if dtype == np.float32 else 1e-12  # the sums' vector order may differ
    for a, b in zip(grads, expect, strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_batchnorm_statistics_survive_a_large_mean():
    """One-pass statistics shift by a sample value first: no cancellation."""
    rng = np.random.default_rng(14)
    x = (1000 + 0.01 * rng.standard_normal((8, 2, 6, 6))).astype(np.float32)
    c = x.shape[1]
    out, inv_std, mean = np.empty_like(x), np.empty(c, np.float32), np.empty(c, np.float32)
    norm.batchnorm2d_forward_train(x, None, None, 0.0, 0.1, None, None, out, mean, inv_std)
    var = x.astype(np.float64).var(axis=(0, 2, 3))
    np.testing.assert_allclose(1 / inv_std.astype(np.float64) ** 2, var, rtol=1e-3)


def test_batchnorm_fused_entry_points_are_the_unfused_results():
    """What the fused model asks of batch norm: statistics given (taken by the conv
    before it), no output (its readers apply `affine`), and dx as coefficients."""
    rng, x, gamma, beta = _bn_setup((5, 3, 4, 4), np.float64, 15)
    c = x.shape[1]
    run = [np.zeros(c), np.ones(c)]
    out, mean, inv_std, affine = np.empty_like(x), np.empty(c), np.empty(c), np.empty((2, c))
    norm.batchnorm2d_forward_train(
        x, gamma, beta, EPS, MOMENTUM, *run, out, mean, inv_std, 1, affine
    )
    run2 = [np.zeros(c), np.ones(c)]
    mean2, inv2, affine2 = np.empty(c), np.empty(c), np.empty((2, c))
    stats = np.stack([x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))])
    norm.batchnorm2d_forward_train(
        x, gamma, beta, EPS, MOMENTUM, *run2, None, mean2, inv2, 1, affine2, stats=stats
    )
    for a, b in zip([mean, inv_std, affine, *run], [mean2, inv2, affine2, *run2], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    np.testing.assert_array_equal(out, np.maximum(x * affine[0][:, None, None]
                                                  + affine[1][:, None, None], 0))  # fmt: skip
    eval_affine = np.empty((2, c))
    norm.batchnorm2d_forward_eval(x, gamma, beta, EPS, *run, None, 1, eval_affine)
    evaluated = np.empty_like(x)
    norm.batchnorm2d_forward_eval(x, gamma, beta, EPS, *run, evaluated, 1)
    expect = np.maximum(x * eval_affine[0][:, None, None] + eval_affine[1][:, None, None], 0)
    np.testing.assert_array_equal(evaluated, expect)
    dout = rng.standard_normal(x.shape)
    dx, dg, db = np.empty_like(x), np.empty(c), np.empty(c)
    norm.batchnorm2d_backward(dout, x, mean, gamma, inv_std, dx, dg, db, affine, 1)
    k, dg2, db2 = np.empty((3, c)), np.empty(c), np.empty(c)
    norm.batchnorm2d_backward(dout, x, mean, gamma, inv_std, None, dg2, db2, affine, 1, k)
    g = np.where(out > 0, dout, 0)
    ch = (slice(None), None, None)
    np.testing.assert_allclose(k[0][ch] * g + k[1][ch] * x + k[2][ch], dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(dg, dg2)
    np.testing.assert_array_equal(db, db2)
    with pytest.raises(ValueError, match="affine"):
        norm.batchnorm2d_forward_eval(x, gamma, beta, EPS, *run, None)


def test_batch_norm_and_add_kernels_run_one_parallel_loop():
    """In a parallel build every array expression outside the prange loop is a parallel
    region of its own: the backward sums once added their per-block parts that way, ~45 us
    a call at any size. Each kernel's parallel build (compiled afresh here, for Numba's
    report) holds its prange loop and at most a zeroed array of partial sums."""
    import numba

    from cnnspec.kernels.cpu import merge
    from cnnspec.kernels.cpu._common import IN_AFFINE, IN_COPY, as_3d

    rng = np.random.default_rng(0)
    x = as_3d(rng.standard_normal((5, 3, 4, 4)).astype(np.float32))
    d, out = x.copy(), np.empty_like(x)
    c = np.ones(3, np.float32)
    aff = np.ones((2, 3), np.float32)
    calls = [  # kernel, arguments, its parallel regions (partial sums zeroed: one more)
        (norm._bn_stats, (x, np.empty(3), np.empty(3)), 2),
        (norm._bn_bwd_sums, (d, x, c, c, 1, c, np.empty(3), np.empty(3)), 2),
        (norm._bn_bwd_dx, (d, x, c, c, 1, c, c, c, out), 1),
        (norm._affine, (x, c, c, out, 1), 1),
        (merge._add2_hooked, (x, d, aff, IN_AFFINE, aff[:, :1], IN_COPY, 1, out), 1),
        (merge._add_hooked, (x, aff, IN_AFFINE, 1, True, out), 1),
    ]
    for builds, args, regions in calls:
        fastmath = builds.parallel.targetoptions.get("fastmath", False)
        kernel = numba.njit(parallel=True, fastmath=fastmath)(builds.__wrapped__)
        kernel(*args)
        report = kernel.get_metadata(kernel.signatures[0])["parfor_diagnostics"]
        assert len(report.initial_parfors) == regions, builds.__wrapped__.__name__


@pytest.mark.parametrize("act", [0, 1])
def test_backward_sums_stand_in_matches_the_kernel(act):
    """The batch norm's backward sums (a first run's stand-in while a child compiles the
    kernel): the kernel's, summed in another order."""
    rng = np.random.default_rng(5)
    dout, x = (rng.standard_normal((6, 4, 25)).astype(np.float32) for _ in range(2))
    scale, shift = (rng.standard_normal(4).astype(np.float32) for _ in range(2))
    mean = rng.standard_normal(4).astype(np.float32)
    sums = []
    for run in (norm._bn_bwd_sums_numpy, norm._bn_bwd_sums):
        s = np.full((2, 4), np.nan)
        run(dout, x, scale, shift, act, mean, s[0], s[1])
        sums.append(s)
    np.testing.assert_allclose(sums[0], sums[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act", [0, 1])
def test_batch_norm_and_lrn_stand_ins_match_the_kernels(act):
    """A first run's numpy stand-ins of the batch norm's statistics, affine pass and
    input gradient, and of local response normalisation (AlexNet's, GoogLeNet's)."""
    rng = np.random.default_rng(6 + act)
    x, dout = (rng.standard_normal((5, 6, 12)).astype(np.float32) + 0.5 for _ in range(2))
    c = 6
    scale, shift, ka, kb, kc = (rng.standard_normal(c).astype(np.float32) for _ in range(5))
    stats = [(np.full(c, np.nan), np.full(c, np.nan)) for _ in range(2)]
    norm._bn_stats_numpy(x, *stats[0])
    norm._bn_stats(x, *stats[1])
    np.testing.assert_allclose(stats[0], stats[1], rtol=1e-12, atol=1e-14)
    for kernel, args in ((norm._affine, (x, scale, shift)),
                         (norm._bn_bwd_dx, (dout, x, scale, shift, act, ka, kb, kc))):  # fmt: skip
        got = [np.full_like(x, np.nan) for _ in range(2)]
        stand_in = getattr(norm, kernel.__wrapped__.__name__ + "_numpy")
        if kernel is norm._affine:
            stand_in(*args, got[0], act)
            kernel(*args, got[1], act)
        else:
            stand_in(*args, got[0])
            kernel(*args, got[1])
        np.testing.assert_array_equal(got[0], got[1])
    for size, beta in ((5, 0.75), (4, 0.6)):
        a, b, k = np.float32(1e-2), np.float32(beta), np.float32(2.0)
        fwd = [(np.full_like(x, np.nan), np.full_like(x, np.nan)) for _ in range(2)]
        norm._lrn_fwd_numpy(x, size, a, b, k, *fwd[0])
        norm._lrn_fwd(x, size, a, b, k, *fwd[1])
        np.testing.assert_allclose(fwd[0], fwd[1], rtol=1e-6)
        out, sc = fwd[1]
        dx = [np.full_like(x, np.nan) for _ in range(2)]
        norm._lrn_bwd_numpy(x, out, sc, dout, size, a, b, dx[0])
        norm._lrn_bwd(x, out, sc, dout, size, a, b, dx[1])
        np.testing.assert_allclose(dx[0], dx[1], rtol=1e-5, atol=1e-6)
