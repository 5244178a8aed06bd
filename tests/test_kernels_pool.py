"""Pooling kernels: finite differences (float64) and PyTorch / numpy parity (float32)."""

import math

import numpy as np
import pytest

from cnnspec.kernels.cpu import pool
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4


def _pool_out(size, k, s, p0, p1, ceil_mode=False):
    """PyTorch's pooling output size (with ceil_mode's 'last window starts inside' rule)."""
    num = size + p0 + p1 - k
    o = (math.ceil(num / s) if ceil_mode else num // s) + 1
    if ceil_mode and (o - 1) * s >= size + p0:
        o -= 1
    return o


# (N, C, H, W, k, s, p, ceil_mode)  -- symmetric padding, comparable with torch directly
MAX_CASES = {
    "k2s2": (2, 3, 6, 6, 2, 2, 0, False),
    "k2s2_odd": (2, 3, 7, 5, 2, 2, 0, False),  # a row and a column no window covers
    "k1s2": (2, 3, 7, 6, 1, 2, 0, False),  # ResNet's option-A subsampling
    "overlap_k3s2": (2, 2, 7, 7, 3, 2, 0, False),
    "k3s2_pad1": (1, 3, 6, 5, 3, 2, 1, False),
    "k3s2_ceil": (2, 2, 8, 6, 3, 2, 0, True),
    "k3s2_pad1_ceil": (1, 2, 6, 7, 3, 2, 1, True),
    # the 2x2 forward's vectors of outputs: rows of whole vectors and a rest
    "k2s2_rows_of_5_and_9": (2, 3, 10, 18, 2, 2, 0, False),
}


def _randn_distinct(rng, shape, dtype):
    # distinct values: no ties for max pooling, well-defined finite differences
    n = int(np.prod(shape))
    vals = rng.permutation(n).astype(np.float64) / n + 0.01 * rng.standard_normal(n)
    return (vals.reshape(shape) * 4 - 2).astype(dtype)


def _max_setup(case, dtype, seed=0):
    n, c, h, w, k, s, p, ceil_mode = case
    rng = np.random.default_rng(seed)
    x = _randn_distinct(rng, (n, c, h, w), dtype)
    oh = _pool_out(h, k, s, p, p, ceil_mode)
    ow = _pool_out(w, k, s, p, p, ceil_mode)
    out = np.empty((n, c, oh, ow), dtype)
    arg = np.empty((n, c, oh, ow), np.int32)
    return x, out, arg, rng


@pytest.mark.parametrize("name", list(MAX_CASES))
def test_maxpool_finite_differences(name):
    case = MAX_CASES[name]
    k, s, p = case[4:7]
    x, out, arg, rng = _max_setup(case, np.float64)
    r = rng.standard_normal(out.shape)

    def loss():
        pool.maxpool2d_forward(x, k, k, s, s, p, p, out, arg)
        return float(np.sum(out * r))

    loss()
    dx = np.full_like(x, np.nan)
    pool.maxpool2d_backward(r, arg, dx)
    assert rel_error(dx, numerical_grad(loss, x, eps=1e-7)) < FD_TOL


@pytest.mark.parametrize("name", list(MAX_CASES))
def test_maxpool_matches_torch(name):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    case = MAX_CASES[name]
    k, s, p, ceil_mode = case[4:8]
    x, out, arg, rng = _max_setup(case, np.float32, seed=1)
    pool.maxpool2d_forward(x, k, k, s, s, p, p, out, arg)
    xt = torch.tensor(x, requires_grad=True)
    ref, idx = F.max_pool2d(xt, k, s, p, ceil_mode=ceil_mode, return_indices=True)
    assert ref.shape == out.shape
    np.testing.assert_array_equal(out, ref.detach().numpy())
    np.testing.assert_array_equal(arg, idx.numpy())
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx = np.empty_like(x)
    pool.maxpool2d_backward(dout, arg, dx)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL


def test_maxpool_asymmetric_padding_is_minus_inf():
    x = -np.ones((1, 1, 3, 3), np.float32) - np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    out = np.empty((1, 1, 2, 2), np.float32)
    arg = np.empty(out.shape, np.int32)
    # pad top 1, left 0, k2 s2: row windows [-1, 1) and [1, 3); col windows [0, 2) and [2, 4)
    pool.maxpool2d_forward(x, 2, 2, 2, 2, 1, 0, out, arg)
    np.testing.assert_array_equal(out[0, 0], [[-1, -3], [-4, -6]])
    np.testing.assert_array_equal(arg[0, 0], [[0, 2], [3, 5]])


# (N, C, H, W, k, s, pad(t, b, l, r), ceil_mode)
AVG_CASES = {
    "k2s2": (2, 3, 6, 6, 2, 2, (0, 0, 0, 0), False),
    "k2s2_odd": (2, 3, 7, 5, 2, 2, (0, 0, 0, 0), False),
    "k3s3": (1, 2, 9, 6, 3, 3, (0, 0, 0, 0), False),
    "overlap_k3s2": (2, 2, 7, 7, 3, 2, (0, 0, 0, 0), False),
    "k3s2_pad1": (1, 3, 6, 5, 3, 2, (1, 1, 1, 1), False),
    "k3s2_pad1_ceil": (1, 2, 6, 7, 3, 2, (1, 1, 1, 1), True),
    "k3s2_ceil": (2, 2, 8, 6, 3, 2, (0, 0, 0, 0), True),
    "k3s1_asym_pad": (1, 2, 5, 6, 3, 1, (1, 0, 2, 1), False),
}


def _avg_setup(case, dtype, seed=0):
    n, c, h, w, k, s, pad, ceil_mode = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    oh = _pool_out(h, k, s, pad[0], pad[1], ceil_mode)
    ow = _pool_out(w, k, s, pad[2], pad[3], ceil_mode)
    return x, np.empty((n, c, oh, ow), dtype), rng


@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("name", list(AVG_CASES))
def test_avgpool_finite_differences(name, include_pad):
    case = AVG_CASES[name]
    k, s, pad = case[4:7]
    x, out, rng = _avg_setup(case, np.float64)
    r = rng.standard_normal(out.shape)

    def loss():
        pool.avgpool2d_forward(x, k, k, s, s, *pad, include_pad, out)
        return float(np.sum(out * r))

    loss()
    dx = np.full_like(x, np.nan)
    pool.avgpool2d_backward(r, k, k, s, s, *pad, include_pad, dx)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL


@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("name", list(AVG_CASES))
def test_avgpool_matches_torch(name, include_pad):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    case = AVG_CASES[name]
    k, s, pad, ceil_mode = case[4:8]
    x, out, rng = _avg_setup(case, np.float32, seed=1)
    pool.avgpool2d_forward(x, k, k, s, s, *pad, include_pad, out)
    xt = torch.tensor(x, requires_grad=True)
    if pad[0] == pad[1] == pad[2] == pad[3]:
        ref = F.avg_pool2d(xt, k, s, pad[0], ceil_mode, count_include_pad=include_pad)
    else:
        # asymmetric padding (no ceil): explicit zero padding, divisor = all or valid cells
        tpad = (pad[2], pad[3], pad[0], pad[1])
        ref = F.avg_pool2d(F.pad(xt, tpad), k, s)
        if not include_pad:
            ones = torch.ones_like(xt[:1, :1])
            ref = ref / F.avg_pool2d(F.pad(ones, tpad), k, s)
    assert ref.shape == out.shape
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx = np.empty_like(x)
    pool.avgpool2d_backward(dout, k, k, s, s, *pad, include_pad, dx)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL


# 2x2 pools in vectors: rows of one output to three vectors, odd sizes leaving a row and
# a column uncovered (forward; the backward's 2x2 kernel takes exact covers only)
SIZES_2X2 = [(10, 10), (28, 28), (7, 75), (5, 33), (4, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw", [(10, 14), (28, 28), (6, 74), (4, 2)])
def test_avgpool_2x2_backward_matches_the_general_loop_bit_for_bit(dtype, hw):
    """2x2 windows that cover the input exactly (LeNet-5's S2) take their own backward
    kernel: the same values as the general one, every input cell written, both builds."""
    rng = np.random.default_rng(4)
    h, w = hw
    dout = rng.standard_normal((3, 4, h // 2, w // 2)).astype(dtype)
    ref = np.full((3, 4, h, w), np.nan, dtype)
    pool._avgpool_bwd.serial(dout, 2, 2, 2, 2, 0, 0, 0, 0, True, ref)
    for build in (pool._avgpool_bwd_2x2.serial, pool._avgpool_bwd_2x2.parallel):
        dx = np.full_like(ref, np.nan)
        build(dout, dx)
        np.testing.assert_array_equal(dx, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw", SIZES_2X2)
def test_avgpool_2x2_forward_sums_in_its_order(dtype, hw):
    """((x00 + x01) + x10 + x11) / 4 in x's dtype, bit for bit, both builds (the general
    loop sums in float64: within TORCH_TOL of it, test_avgpool_matches_torch)."""
    rng = np.random.default_rng(6)
    h, w = hw
    x = rng.standard_normal((3, 4, h, w)).astype(dtype)
    c = x[:, :, : h // 2 * 2, : w // 2 * 2]
    ref = ((c[:, :, ::2, ::2] + c[:, :, ::2, 1::2]) + c[:, :, 1::2, ::2]) + c[:, :, 1::2, 1::2]
    ref *= dtype(0.25)
    for build in (pool._avgpool_fwd_2x2.serial, pool._avgpool_fwd_2x2.parallel):
        out = np.full_like(ref, np.nan)
        build(x, out)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("hw", SIZES_2X2)
def test_maxpool_2x2_vectors_match_the_general_loop_bit_for_bit(dtype, hw):
    """The general loop's values and indices, the first of equal values winning (few
    distinct values: many ties), both builds."""
    rng = np.random.default_rng(5)
    h, w = hw
    x = rng.integers(-3, 4, (3, 4, h, w)).astype(dtype)
    out = np.full((3, 4, h // 2, w // 2), np.nan, dtype)
    ref = np.full_like(out, np.nan)
    ref_arg = np.full(out.shape, -1, np.int32)
    pool._maxpool_fwd.serial(x, 2, 2, 2, 2, 0, 0, ref, ref_arg)
    for build in (pool._maxpool_fwd_2x2.serial, pool._maxpool_fwd_2x2.parallel):
        out[...], arg = np.nan, np.full(out.shape, -1, np.int32)
        build(x, out, arg)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_array_equal(arg, ref_arg)


def _subsample_ref(x, coef, bias, k, s):
    n, c, h, w = x.shape
    oh, ow = (h - k) // s + 1, (w - k) // s + 1
    pooled = np.zeros((n, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            pooled[:, :, i, j] = x[:, :, i * s : i * s + k, j * s : j * s + k].mean(axis=(2, 3))
    return coef[None, :, None, None] * pooled + bias[None, :, None, None], pooled


@pytest.mark.parametrize("k,s", [(2, 2), (3, 2)])
def test_subsample2d(k, s):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 7, 6))
    coef = rng.standard_normal(3)
    bias = rng.standard_normal(3)
    ref_out, ref_pooled = _subsample_ref(x, coef, bias, k, s)
    out = np.empty_like(ref_out)
    pooled = np.empty_like(ref_pooled)
    pool.subsample2d_forward(x, coef, bias, k, k, s, s, out, pooled)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-12, atol=1e-12)
    r = rng.standard_normal(out.shape)

    def loss():
        pool.subsample2d_forward(x, coef, bias, k, k, s, s, out, pooled)
        return float(np.sum(out * r))

    loss()
    dx = np.full_like(x, np.nan)
    dcoef, dbias = np.empty_like(coef), np.empty_like(bias)
    pool.subsample2d_backward(r, pooled, coef, k, k, s, s, dx, dcoef, dbias)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL
    assert rel_error(dcoef, numerical_grad(loss, coef)) < FD_TOL
    assert rel_error(dbias, numerical_grad(loss, bias)) < FD_TOL


def test_subsample2d_float32_matches_numpy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    coef = rng.standard_normal(3).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    ref_out, ref_pooled = _subsample_ref(x.astype(np.float64), coef, bias, 2, 2)
    out = np.empty(ref_out.shape, np.float32)
    pooled = np.empty(ref_out.shape, np.float32)
    pool.subsample2d_forward(x, coef, bias, 2, 2, 2, 2, out, pooled)
    assert rel_error(out, ref_out) < TORCH_TOL
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dx = np.empty_like(x)
    dcoef, dbias = np.empty_like(coef), np.empty_like(bias)
    pool.subsample2d_backward(dout, pooled, coef, 2, 2, 2, 2, dx, dcoef, dbias)
    ref_dx = np.repeat(np.repeat(dout * coef[None, :, None, None] / 4, 2, axis=2), 2, axis=3)
    assert rel_error(dx, ref_dx) < TORCH_TOL
    assert rel_error(dcoef, (dout * ref_pooled).sum(axis=(0, 2, 3))) < TORCH_TOL
    assert rel_error(dbias, dout.sum(axis=(0, 2, 3))) < TORCH_TOL


@pytest.mark.parametrize(("k", "s", "p"), [(3, 2, 1), (2, 2, 0), (3, 3, 0)])
def test_maxpool_nan_and_inf_follow_torch(k, s, p):
    """The general path, and the non-overlapping ones (2x2 has a branch-free loop)."""
    torch = pytest.importorskip("torch")
    x = np.arange(2 * 6 * 6, dtype=np.float32).reshape(1, 2, 6, 6) / 10
    x[0, 0, 1, 1] = np.nan
    x[0, 0, 4, 4] = np.inf
    x[0, 1, :3, :3] = -np.inf
    x[0, 1, 3, 3] = np.nan
    x[0, 1, 3, 5] = np.nan
    o = _pool_out(6, k, s, p, p)
    out = np.empty((1, 2, o, o), np.float32)
    arg = np.empty(out.shape, np.int32)
    pool.maxpool2d_forward(x, k, k, s, s, p, p, out, arg)
    ref, idx = torch.nn.functional.max_pool2d(torch.tensor(x), k, s, p, return_indices=True)
    np.testing.assert_array_equal(out, ref.numpy())  # NaN positions compare equal
    np.testing.assert_array_equal(arg, idx.numpy())


# ------------------------------------------------------------- a first run's stand-ins
def _tied_with_nonfinite(rng, shape, dtype):
    """Small integers (many ties), a few NaNs and infinities of both signs."""
    x = rng.integers(-2, 3, shape).astype(dtype)
    flat = x.reshape(-1)
    for value, every in ((np.nan, 17), (np.inf, 23), (-np.inf, 29)):
        flat[rng.integers(0, flat.size, flat.size // every)] = value
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (2, 3, 10, 18), (1, 2, 7, 5)])
def test_numpy_stand_ins_give_the_kernels_bits(dtype, shape):
    """The 2x2 pools' and the max pool scatter's stand-ins (a first run's first steps):
    the kernels' values and indices bit for bit, ties (the first of equals), NaNs (the
    last NaN wins) and infinities included; the scatter also where windows overlap."""
    rng = np.random.default_rng(sum(shape))
    n, c, h, w = shape
    x = _tied_with_nonfinite(rng, shape, dtype)
    out_shape = (n, c, h // 2, w // 2)
    bits = np.int32 if dtype == np.float32 else np.int64
    got, want = [], []
    for results, name in ((got, "_numpy"), (want, "")):
        out, arg = np.full(out_shape, 7, dtype), np.full(out_shape, 7, np.int32)
        avg = np.full(out_shape, 7, dtype)
        with np.errstate(invalid="ignore"):  # inf - inf (the kernels: no warnings)
            getattr(pool, "_maxpool_fwd_2x2" + name)(x, out, arg)
            getattr(pool, "_avgpool_fwd_2x2" + name)(x, avg)
        results += [out.view(bits), arg, avg.view(bits)]
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    dout = rng.standard_normal(out_shape).astype(dtype)
    dout.reshape(-1)[::5] = -0.0
    if h == 2 * out_shape[2] and w == 2 * out_shape[3]:
        dx = [np.full(shape, 7, dtype) for _ in range(2)]
        pool._avgpool_bwd_2x2_numpy(dout, dx[0])
        pool._avgpool_bwd_2x2(dout, dx[1])
        np.testing.assert_array_equal(dx[0].view(bits), dx[1].view(bits))
    # the scatter, on a 2x2 pool's argmax and on an overlapping 3x3 / 2 pool's
    arg2 = want[1]
    arg3 = np.empty((n, c, (h - 3) // 2 + 1, (w - 3) // 2 + 1), np.int32)
    pool.maxpool2d_forward(x, 3, 3, 2, 2, 0, 0, np.empty(arg3.shape, dtype), arg3)
    for arg in (arg2, arg3):
        g = rng.standard_normal(arg.shape).astype(dtype)
        dx = [np.full((n * c, h * w), 7, dtype) for _ in range(2)]
        views = g.reshape(n * c, -1), arg.reshape(n * c, -1)
        pool._maxpool_bwd_numpy(*views, dx[0])
        pool._maxpool_bwd(*views, dx[1])
        np.testing.assert_array_equal(dx[0].view(bits), dx[1].view(bits))


def test_a_first_run_pools_on_the_stand_ins_while_the_child_compiles(first_run, monkeypatch):
    """No pool build is ready (as on an empty cache): the calls ask a child for them and
    return numpy's numbers at once."""
    background = first_run
    called = []
    for name in ("_maxpool_fwd_2x2", "_maxpool_bwd", "_avgpool_fwd_2x2", "_avgpool_bwd_2x2"):
        stand_in = getattr(pool, name + "_numpy")
        monkeypatch.setattr(pool, name + "_numpy",
                            lambda *a, f=stand_in, n=name: called.append(n) or f(*a))  # fmt: skip
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    out, arg, avg = np.empty((2, 3, 4, 4), np.float32), np.empty((2, 3, 4, 4), np.int32), None
    with background.deferring():
        pool.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, out, arg)
        dx = np.empty_like(x)
        pool.maxpool2d_backward(out, arg, dx)
        avg = np.empty_like(out)
        pool.avgpool2d_forward(x, 2, 2, 2, 2, 0, 0, 0, 0, True, avg)
        dxa = np.empty_like(x)
        pool.avgpool2d_backward(avg, 2, 2, 2, 2, 0, 0, 0, 0, True, dxa)
        asked = sorted(background.state.values())
    assert called == ["_maxpool_fwd_2x2", "_maxpool_bwd", "_avgpool_fwd_2x2", "_avgpool_bwd_2x2"]
    assert asked == ["pending"] * 4  # their serial builds (arrays this small: serial)
    ref = [np.empty_like(a) for a in (out, arg, dx, avg, dxa)]
    pool.maxpool2d_forward(x, 2, 2, 2, 2, 0, 0, ref[0], ref[1])
    pool.maxpool2d_backward(ref[0], ref[1], ref[2])
    pool.avgpool2d_forward(x, 2, 2, 2, 2, 0, 0, 0, 0, True, ref[3])
    pool.avgpool2d_backward(ref[3], 2, 2, 2, 2, 0, 0, 0, 0, True, ref[4])
    for a, b in zip((out, arg, dx, avg, dxa), ref, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_pool_and_pick_stand_ins_match_the_kernels(dtype):
    """ResNet's global average pool (its float64 sums in another order: float64's
    rounding apart) and option-A pick: their stand-ins."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 5, 8, 7)).astype(dtype)
    flat, pooled = x.reshape(15, -1), np.empty(15, dtype)
    got = [np.full(15, np.nan, dtype), np.full_like(flat, np.nan)]
    pool._gap_fwd_numpy(flat, got[0])
    pool._gap_fwd(flat, pooled)
    np.testing.assert_allclose(got[0], pooled, rtol=1e-14 if dtype == np.float64 else 1e-7)
    pool._gap_bwd_numpy(pooled, got[1])
    want = np.empty_like(flat)
    pool._gap_bwd(pooled, want)
    np.testing.assert_array_equal(got[1], want)
    out = [np.full((3, 5, 4, 3), np.nan, dtype) for _ in range(2)]
    arg = [np.full((3, 5, 4, 3), -7, np.int32) for _ in range(2)]
    pool._pick_numpy(x, 2, 3, out[0], arg[0])
    pool._pick(x, 2, 3, out[1], arg[1])
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(arg[0], arg[1])


@pytest.mark.parametrize("window", [(2, 2, 2, 2), (3, 2, 2, 3)])  # (kh, kw, sh, sw)
def test_subsampling_stand_ins_match_the_kernels(window):
    """LeNet-5 (1998)'s trainable subsampling on a first run's numpy stand-ins, tiling
    and overlapping (clipped) windows: dx's bits, the window means' and the parameter
    gradients' float64 sums to their rounding."""
    kh, kw, sh, sw = window
    rng = np.random.default_rng(kh * 10 + kw)
    x = rng.standard_normal((3, 4, 9, 10)).astype(np.float32)
    coef, bias = (rng.standard_normal(4).astype(np.float32) for _ in range(2))
    shape = (3, 4, (9 - kh) // sh + 1, (10 - kw) // sw + 1)
    dout = rng.standard_normal(shape).astype(np.float32)
    got = []
    for suffix in ("_numpy", ""):
        out, pooled = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
        dx = np.full_like(x, np.nan)
        dcoef, dbias = np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32)
        getattr(pool, "_subsample_fwd" + suffix)(x, coef, bias, kh, kw, sh, sw, out, pooled)
        getattr(pool, "_subsample_bwd_dx" + suffix)(dout, coef, kh, kw, sh, sw, dx)
        views = dout.reshape(3, 4, -1), pooled.reshape(3, 4, -1)
        getattr(pool, "_subsample_bwd_params" + suffix)(*views, dcoef, dbias)
        got.append((out, pooled, dx, dcoef, dbias))
    for a, b in zip(*got, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[0][2], got[1][2])


@pytest.mark.parametrize("name", list(MAX_CASES))
def test_general_maxpool_stand_in_gives_the_kernels_bits(name):
    """Max pooling's general kernel (overlapping, padded, clipped windows) on a first
    run's numpy stand-in: its values and indices, ties, NaNs and infinities included."""
    n, c, h, w, k, s, p, ceil_mode = MAX_CASES[name]
    rng = np.random.default_rng(len(name))
    x = _tied_with_nonfinite(rng, (n, c, h, w), np.float32)
    shape = (n, c, _pool_out(h, k, s, p, p, ceil_mode), _pool_out(w, k, s, p, p, ceil_mode))
    got = [(np.full(shape, 7, np.float32), np.full(shape, 7, np.int32)) for _ in range(2)]
    pool._maxpool_fwd_numpy(x, k, k, s, s, p, p, *got[0])
    pool._maxpool_fwd(x, k, k, s, s, p, p, *got[1])
    np.testing.assert_array_equal(got[0][0].view(np.int32), got[1][0].view(np.int32))
    np.testing.assert_array_equal(got[0][1], got[1][1])


def test_a_window_in_the_padding_alone_is_minus_inf_on_the_stand_in_too():
    x = np.ones((1, 1, 2, 2), np.float32)
    got = [(np.empty((1, 1, 2, 2), np.float32), np.empty((1, 1, 2, 2), np.int32))
           for _ in range(2)]  # fmt: skip
    # pad top 1, 2x2 windows, stride 2: the first row's windows reach one real row
    pool._maxpool_fwd_numpy(x, 1, 1, 2, 2, 1, 0, *got[0])
    pool._maxpool_fwd(x, 1, 1, 2, 2, 1, 0, *got[1])
    np.testing.assert_array_equal(got[0][0], got[1][0])
    np.testing.assert_array_equal(got[0][1], got[1][1])
    assert (got[0][1][0, 0, 0] == -1).all()


@pytest.mark.parametrize("include_pad", [True, False])
@pytest.mark.parametrize("name", list(AVG_CASES))
def test_general_avgpool_stand_ins_match_the_kernels(name, include_pad):
    """Average pooling's general kernels (overlapping, padded, clipped windows) on a
    first run's numpy stand-ins: dx's bits, the means' float64 sums to their rounding."""
    case = AVG_CASES[name]
    k, s, pad = case[4:7]
    x, out, rng = _avg_setup(case, np.float32, seed=2)
    window = (k, k, s, s, *pad, include_pad)
    outs = [np.full_like(out, np.nan) for _ in range(2)]
    pool._avgpool_fwd_numpy(x, *window, outs[0])
    pool._avgpool_fwd(x, *window, outs[1])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-6, atol=1e-7)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    dxs = [np.full_like(x, np.nan) for _ in range(2)]
    pool._avgpool_bwd_numpy(dout, *window, dxs[0])
    pool._avgpool_bwd(dout, *window, dxs[1])
    np.testing.assert_array_equal(dxs[0], dxs[1])
