"""Convolution kernels: finite differences (float64) and PyTorch parity (float32)."""

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llvmlite import ir
from numba.extending import intrinsic

from cnnspec.kernels.cpu import _llvm, conv
from cnnspec.kernels.cpu import conv_transpose as convt
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

FD_TOL = 1e-6
TORCH_TOL = 1e-4


@pytest.fixture
def dx_path(monkeypatch):
    """choose(as_conv): whether dx is taken as a convolution where it can be one
    (conv._dx_as_conv's answer), with the plans cached under the other answer forgotten:
    conv._call keeps a plan per shape, its dx path included, so a second call of the
    same shapes would run the first one's path whatever the patch said."""

    def choose(as_conv):
        monkeypatch.setattr(conv, "_dx_as_conv", lambda *a: as_conv)
        conv._call.cache_clear()

    yield choose
    conv._call.cache_clear()  # (before monkeypatch restores the rule: no call between)


# (N, C, H, W, O, kh, kw, stride, pad(t, b, l, r), dilation, groups, bias)
CONV_CASES = {
    "basic": (2, 3, 6, 5, 4, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, True),
    "stride_asympad_dilation_groups": (2, 4, 7, 6, 6, 3, 2, (2, 1), (1, 2, 0, 1), (1, 2), 2, True),
    "depthwise_nobias": (2, 4, 6, 6, 4, 3, 3, (2, 2), (1, 0, 1, 0), (1, 1), 4, False),
    "depthwise_multiplier": (1, 3, 5, 5, 6, 2, 2, (1, 1), (0, 1, 1, 0), (2, 1), 3, True),
    "pointwise_nobias": (2, 5, 4, 3, 3, 1, 1, (1, 1), (0, 0, 0, 0), (1, 1), 1, False),
    "stride3x2_k5x3_dilated": (2, 3, 11, 9, 4, 5, 3, (3, 2), (2, 1, 0, 2), (2, 1), 1, True),
    "stride4_k11": (1, 2, 23, 19, 3, 11, 11, (4, 4), (0, 0, 0, 0), (1, 1), 1, True),
    # several samples to a tile, side by side, sharing padding columns (pr <= pl)
    "batch_shared_pad_dilated": (5, 3, 4, 5, 4, 3, 3, (1, 1), (1, 0, 2, 1), (1, 2), 1, True),
    # stride-2 columns split a vector of pairs at a time: rows long enough for the full
    # and half-vector blocks, pairs left over and an odd last column; even left padding
    "stride2_wide_rows": (3, 2, 5, 37, 3, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), 1, True),
    "stride1x2_wide_even_pad": (2, 2, 4, 24, 3, 3, 3, (1, 2), (0, 1, 2, 0), (1, 1), 1, False),
    # LeNet-5's c1: one input channel, 6 outputs, 5x5 (dW taken as its transpose at 512 bits)
    "one_channel_k5": (2, 1, 9, 8, 6, 5, 5, (1, 1), (2, 2, 2, 2), (1, 1), 1, True),
}

# (N, Cin, H, W, Cout, kh, kw, stride, pad, dilation, output_padding, bias)
CONVT_CASES = {
    "stride2_pad1_outpad1": (2, 3, 4, 3, 2, 3, 3, (2, 2), (1, 1, 1, 1), (1, 1), (1, 1), True),
    "asym_dilated": (2, 3, 3, 4, 4, 3, 2, (2, 3), (1, 0, 2, 1), (2, 1), (1, 2), True),
    "stride1_nobias": (1, 2, 4, 4, 3, 2, 2, (1, 1), (0, 0, 0, 0), (1, 1), (0, 0), False),
}


def _conv_out(h, k, s, p0, p1, d):
    return (h + p0 + p1 - d * (k - 1) - 1) // s + 1


def _make_conv(case, dtype, seed=0):
    n, c, h, w, o, kh, kw, stride, pad, dil, g, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((o, c // g, kh, kw)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    oh = _conv_out(h, kh, stride[0], pad[0], pad[1], dil[0])
    ow = _conv_out(w, kw, stride[1], pad[2], pad[3], dil[1])
    out = np.empty((n, o, oh, ow), dtype)
    # a workspace for tiles of two output rows, so images span several tiles
    shapes = (x.shape, wt.shape, out.shape, stride, pad, dil, np.dtype(dtype).itemsize)
    ws = np.empty(conv.conv2d_workspace(*shapes, tile_rows=2), dtype)
    return x, wt, b, out, ws, rng


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_finite_differences(name):
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, cols, rng = _make_conv(case, np.float64)
    r = rng.standard_normal(out.shape)

    def loss():
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, cols)
        return float(np.sum(out * r))

    loss()
    dx, dw = np.empty_like(x), np.empty_like(w)
    db = None if b is None else np.empty_like(b)
    dx.fill(np.nan)
    dw.fill(np.nan)
    conv.conv2d_backward(x, w, r, stride, pad, dil, g, cols, dx, dw, db)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL
    assert rel_error(dw, numerical_grad(loss, w)) < FD_TOL
    if b is not None:
        assert rel_error(db, numerical_grad(loss, b)) < FD_TOL
    # dx=None / db=None path gives the same dw
    loss()
    dw2 = np.empty_like(w)
    conv.conv2d_backward(x, w, r, stride, pad, dil, g, cols, None, dw2, None)
    np.testing.assert_array_equal(dw2, dw)


def test_both_orientations_of_the_dw_products_are_covered():
    """dW's products run either way round (conv._dw_swapped): the cases above take both
    at this vector width, so the tests run both."""
    swapped = set()
    for case in CONV_CASES.values():
        c, o, kh, kw, g = case[1], case[4], case[5], case[6], case[10]
        swapped.add(conv._dw_swapped(o // g, c // g * kh * kw))
    assert swapped == {False, True}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_fused_relu_is_relu_of_conv(name):
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, ws, rng = _make_conv(case, np.float64, seed=6)
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws)
    plain = out.copy()
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, conv.ACT_RELU)
    np.testing.assert_array_equal(out, np.maximum(plain, 0))
    dout = rng.standard_normal(out.shape)
    dx, dw, db = np.empty_like(x), np.empty_like(w), None if b is None else np.empty_like(b)
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, db, out, conv.ACT_RELU)
    masked = dout * (plain > 0)
    dx2, dw2, db2 = np.empty_like(x), np.empty_like(w), None if b is None else np.empty_like(b)
    conv.conv2d_backward(x, w, masked, stride, pad, dil, g, ws, dx2, dw2, db2)
    np.testing.assert_allclose(dx, dx2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("relu", [0, 1])
def test_conv2d_fusion_hooks_are_the_ops_they_replace(name, relu):
    """in_affine is conv(h(x)) with h = a batch norm's affine (+ ReLU) and zero padding;
    stats are the output's batch mean and variance; dout_affine is the backward of
    the norm after the conv; accumulate adds dx to what is there."""
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, ws, rng = _make_conv(case, np.float64, seed=7)
    x += 3.0  # a mean far from zero: the statistics must not cancel
    c, o = x.shape[1], w.shape[0]
    scale, shift = rng.standard_normal(c), rng.standard_normal(c)
    hx = x * scale[:, None, None] + shift[:, None, None]
    hx = np.maximum(hx, 0) if relu else hx
    stats = np.empty((2, o))
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, in_affine=(scale, shift, relu),
                        stats=stats)  # fmt: skip
    fused = out.copy()
    conv.conv2d_forward(hx, w, b, stride, pad, dil, g, out, ws)
    np.testing.assert_array_equal(fused, out)
    np.testing.assert_allclose(stats[0], out.mean(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats[1], out.var(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)

    dout = rng.standard_normal(out.shape)
    k, affine = rng.standard_normal((3, o)), rng.standard_normal((2, o))
    prior = rng.standard_normal(x.shape)
    dx, dw = prior.copy(), np.empty_like(w)
    db = None if b is None else np.empty_like(b)
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, db, out, 0,
                         in_affine=(scale, shift, relu), accumulate=True,
                         dout_affine=(k, affine, relu))  # fmt: skip
    ch = (slice(None), None, None)
    masked = dout * (out * affine[0][ch] + affine[1][ch] > 0) if relu else dout
    d_norm = k[0][ch] * masked + k[1][ch] * out + k[2][ch]
    dx2, dw2, db2 = np.empty_like(x), np.empty_like(w), None if b is None else np.empty_like(b)
    conv.conv2d_backward(hx, w, d_norm, stride, pad, dil, g, ws, dx2, dw2, db2)
    np.testing.assert_allclose(dx, prior + dx2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dw, dw2, rtol=1e-12, atol=1e-12)
    if b is not None:
        np.testing.assert_allclose(db, db2, rtol=1e-12, atol=1e-12)
    dx3 = prior.copy()  # accumulate alone: the build without the hooks
    conv.conv2d_backward(hx, w, d_norm, stride, pad, dil, g, ws, dx3, dw2, db2, accumulate=True)
    np.testing.assert_allclose(dx3, prior + dx2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("as_conv", [False, True])
@pytest.mark.parametrize("name", list(CONV_CASES))
@pytest.mark.parametrize("relu", [0, 1])
def test_conv2d_dx_sums_are_the_norm_backward_sums(name, relu, as_conv, dx_path):
    """dx_sums: the sums the batch norm before the conv takes from its output gradient
    (dx, masked by the norm's ReLU), taken as dx is written, on either dx path (a
    convolution where the case allows one); dx itself does not change."""
    dx_path(as_conv)
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, ws, rng = _make_conv(case, np.float64, seed=11)
    x += 3.0
    c = x.shape[1]
    scale, shift, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    hook = (scale, shift, relu)
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, in_affine=hook)
    dout = rng.standard_normal(out.shape)
    dx, dx2, dw = np.empty_like(x), np.empty_like(x), np.empty_like(w)
    sums = np.full((2, c), np.nan)
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, None, out,
                         in_affine=hook, dx_sums=(mean, sums))  # fmt: skip
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx2, dw, None, out, in_affine=hook)
    np.testing.assert_array_equal(dx, dx2)
    ch = (slice(None), None, None)
    gm = dx * (x * scale[ch] + shift[ch] > 0) if relu else dx
    np.testing.assert_allclose(sums[0], gm.sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        sums[1], (gm * (x - mean[ch])).sum(axis=(0, 2, 3)), rtol=1e-12, atol=1e-12
    )
    with pytest.raises(ValueError, match="dx_sums"):  # dx added to: not the whole gradient
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, None, out,
                             in_affine=hook, dx_sums=(mean, sums), accumulate=True)  # fmt: skip


@pytest.mark.parametrize("as_conv", [False, True])
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_relu_dx_masks_the_whole_gradient(name, as_conv, dx_path):
    """relu_dx: x is a ReLU's output, and dx (written, or added to what another reader
    wrote) becomes the gradient of the ReLU's input: 0 where x is 0."""
    dx_path(as_conv)
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, ws, rng = _make_conv(case, np.float64, seed=13)
    x = np.maximum(x, 0.0)
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws)
    dout = rng.standard_normal(out.shape)
    prior = rng.standard_normal(x.shape)
    plain, dw = np.empty_like(x), np.empty_like(w)
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, plain, dw, None, out)
    for start, acc in ((None, False), (prior, True)):
        dx = np.full_like(x, np.nan) if start is None else start.copy()
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, None, out,
                             accumulate=acc, relu_dx=True)  # fmt: skip
        want = (plain if start is None else start + plain) * (x > 0)
        np.testing.assert_allclose(dx, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="relu_dx"):
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, None, out,
                             in_affine=(np.ones(x.shape[1]), np.zeros(x.shape[1]), 1),
                             relu_dx=True)  # fmt: skip


@numba.njit
def _epilogue(p, p_at, stride, out, out_at, rows, n, b, act, shift, want, res=None):
    return conv.epilogue_rows(p, p_at, stride, out, out_at, rows, n, b, act, shift, want, res)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 8, 16, 28, 33])
def test_epilogue_rows_write_just_their_rows(dtype, n):
    """The forward epilogue's rows (whole vectors and a masked rest) write n elements a
    row and nothing beside them, and sum what they wrote."""
    rng = np.random.default_rng(n)
    rows, stride = 5, n + 3
    p = rng.standard_normal(rows * stride + 40).astype(dtype)
    for act in (0, 1):
        out = np.full(rows * n + 20, 99, dtype)
        a, a2 = _epilogue(p, 2, stride, out, 3, rows, n, dtype(0.3), act, 0.1, 1)
        want = np.stack([p[2 + r * stride :][:n] for r in range(rows)]) + dtype(0.3)
        want = np.maximum(want, 0) if act else want
        np.testing.assert_array_equal(out[3 : 3 + rows * n].reshape(rows, n), want)
        assert (out[:3] == 99).all() and (out[3 + rows * n :] == 99).all()
        e = want.astype(np.float64) - 0.1
        np.testing.assert_allclose((a, a2), (e.sum(), (e * e).sum()), rtol=1e-12, atol=1e-12)
        assert _epilogue(p, 2, stride, out, 3, rows, n, dtype(0.3), act, 0.1, 0) == (0.0, 0.0)
        # a residual at out's offsets, added before the ReLU: (p + b) + r, as an add after it
        res = rng.standard_normal(out.shape).astype(dtype)
        _epilogue(p, 2, stride, out, 3, rows, n, dtype(0.3), act, 0.1, 0, res)
        r = res[3 : 3 + rows * n].reshape(rows, n)
        want = np.stack([p[2 + s * stride :][:n] for s in range(rows)]) + dtype(0.3) + r
        want = np.maximum(want, 0) if act else want
        np.testing.assert_array_equal(out[3 : 3 + rows * n].reshape(rows, n), want)
        assert (out[:3] == 99).all() and (out[3 + rows * n :] == 99).all()


@intrinsic
def _store_first(typingctx, out, at, left):
    """out[at:][:left] = 1, 2, 3 ... through _llvm.store (a row's end)."""

    def codegen(context, builder, signature, args):
        dtype = signature.args[0].dtype
        if isinstance(dtype, numba.types.Integer):  # (int32: the max pools' argmax)
            vec = ir.VectorType(ir.IntType(32), _llvm.lanes(4))
            iota = ir.Constant(vec, list(range(1, vec.count + 1)))
        else:
            vec = _llvm.vector(dtype)
            iota = ir.Constant(vec, [float(i) for i in range(1, vec.count + 1)])
        ptr = _llvm.vec_ptr(builder, _llvm.base(context, builder, signature.args[0], *args[:2]),
                            _llvm.const(0), vec)  # fmt: skip
        _llvm.store(builder, vec, ptr, iota, args[2])
        return context.get_dummy_value()

    return numba.types.void(out, numba.types.int64, numba.types.int64), codegen


@numba.njit
def _store_first_of(out, at, left):
    _store_first(out, at, left)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_a_row_ends_store_writes_just_its_lanes(dtype):
    """A vector stored up to a row's end writes its first `left` lanes and nothing else:
    none for left <= 0, all from the vector's width on (the pools ask for both)."""
    lanes = conv.VECTOR_BYTES // np.dtype(dtype).itemsize
    for left in range(-2, lanes + 3):
        out = np.zeros(lanes + 8, dtype)
        _store_first_of(out, 3, left)
        k = min(max(left, 0), lanes)
        want = np.zeros_like(out)
        want[3 : 3 + k] = np.arange(1, k + 1)
        np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("winograd", ["0", "1"])  # "1": Winograd where it applies (basic)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_residual_is_the_add_after_it(name, winograd, monkeypatch):
    """conv2d_forward(residual=r): the same bits as the conv, then r added, then its ReLU."""
    monkeypatch.setattr(conv.winograd, "MODE", winograd)
    case = CONV_CASES[name]
    x, w, b, out, ws, rng = _make_conv(case, np.float32, seed=11)
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    res = rng.standard_normal(out.shape).astype(np.float32)
    for act in (conv.ACT_NONE, conv.ACT_RELU):
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws)
        want = out + res
        want = np.maximum(want, 0) if act else want
        fused = np.full_like(out, np.nan)
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, fused, ws, act, residual=res)
        np.testing.assert_array_equal(fused, want)


def test_conv2d_statistics_are_exact_far_from_zero():
    """The epilogue's shifted sums: float32 outputs with a mean 1e4 times their spread
    still give the variance (one-pass E[y^2] - E[y]^2 would lose it)."""
    case = CONV_CASES["pointwise_nobias"]
    x, w, b, out, ws, rng = _make_conv(case, np.float32, seed=8)
    w[...] = 1.0
    x[...] = 1e4 + rng.standard_normal(x.shape).astype(np.float32)
    stats = np.empty((2, w.shape[0]))
    conv.conv2d_forward(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, out, ws, stats=stats)
    y = out.astype(np.float64)
    np.testing.assert_allclose(stats[0], y.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(stats[1], y.var(axis=(0, 2, 3)), rtol=1e-9)


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d_matches_torch(name):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, cols, rng = _make_conv(case, np.float32, seed=1)
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, cols)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    ref = F.conv2d(F.pad(xt, (pad[2], pad[3], pad[0], pad[1])), wt, bt, stride, 0, dil, g)
    assert ref.shape == out.shape
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dw = np.empty_like(x), np.empty_like(w)
    db = None if b is None else np.empty_like(b)
    conv.conv2d_backward(x, w, dout, stride, pad, dil, g, cols, dx, dw, db)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(dw, wt.grad.numpy()) < TORCH_TOL
    if b is not None:
        assert rel_error(db, bt.grad.numpy()) < TORCH_TOL


def test_im2col_matches_unfold_and_col2im_is_adjoint():
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(3)
    n, c, h, w, kh, kw = 2, 3, 6, 7, 3, 2
    sh, sw, p, dh, dw = 2, 1, 1, 1, 2
    x = rng.standard_normal((n, c, h, w))
    oh = _conv_out(h, kh, sh, p, p, dh)
    ow = _conv_out(w, kw, sw, p, p, dw)
    cols = np.empty((n, c * kh * kw, oh * ow))
    convt.im2col(x, kh, kw, sh, sw, p, p, dh, dw, oh, ow, cols)
    ref = F.unfold(torch.tensor(x), (kh, kw), dilation=(dh, dw), padding=p, stride=(sh, sw))
    np.testing.assert_allclose(cols, ref.numpy(), rtol=0, atol=0)
    c2 = rng.standard_normal(cols.shape)
    back = np.full_like(x, np.nan)
    convt.col2im(c2, kh, kw, sh, sw, p, p, dh, dw, oh, ow, back)
    ref_fold = F.fold(torch.tensor(c2), (h, w), (kh, kw), (dh, dw), p, (sh, sw))
    np.testing.assert_allclose(back, ref_fold.numpy(), rtol=1e-12, atol=1e-12)
    assert np.isclose(np.sum(cols * c2), np.sum(x * back))


def _make_convt(case, dtype, seed=0):
    n, cin, h, w, cout, kh, kw, stride, pad, dil, op, bias = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cin, cout, kh, kw)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype) if bias else None
    oh = (h - 1) * stride[0] - (pad[0] + pad[1]) + dil[0] * (kh - 1) + 1 + op[0]
    ow = (w - 1) * stride[1] - (pad[2] + pad[3]) + dil[1] * (kw - 1) + 1 + op[1]
    out = np.empty((n, cout, oh, ow), dtype)
    cols = np.empty((n, cout * kh * kw, h * w), dtype)
    return x, wt, b, out, cols, rng


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_conv_transpose2d_finite_differences(name):
    case = CONVT_CASES[name]
    stride, pad, dil = case[7], case[8], case[9]
    x, w, b, out, cols, rng = _make_convt(case, np.float64)
    r = rng.standard_normal(out.shape)

    def loss():
        convt.conv_transpose2d_forward(x, w, b, stride, pad, dil, out, cols)
        return float(np.sum(out * r))

    loss()
    dx, dw = np.full_like(x, np.nan), np.full_like(w, np.nan)
    db = None if b is None else np.full_like(b, np.nan)
    convt.conv_transpose2d_backward(x, w, r, stride, pad, dil, cols, dx, dw, db)
    assert rel_error(dx, numerical_grad(loss, x)) < FD_TOL
    assert rel_error(dw, numerical_grad(loss, w)) < FD_TOL
    if b is not None:
        assert rel_error(db, numerical_grad(loss, b)) < FD_TOL
    dw2 = np.empty_like(w)
    convt.conv_transpose2d_backward(x, w, r, stride, pad, dil, cols, None, dw2, None)
    np.testing.assert_array_equal(dw2, dw)


@pytest.mark.parametrize("name", list(CONVT_CASES))
def test_conv_transpose2d_matches_torch(name):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    case = CONVT_CASES[name]
    stride, pad, dil = case[7], case[8], case[9]
    x, w, b, out, cols, rng = _make_convt(case, np.float32, seed=2)
    convt.conv_transpose2d_forward(x, w, b, stride, pad, dil, out, cols)
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    oh, ow = out.shape[2:]
    if pad[0] == pad[1] and pad[2] == pad[3]:
        op = case[10]
        ref = F.conv_transpose2d(xt, wt, bt, stride, (pad[0], pad[2]), op, 1, dil)
    else:
        # asymmetric padding: full (unpadded) transposed conv, zero-extended, then cropped
        full = F.conv_transpose2d(xt, wt, None, stride, 0, 0, 1, dil)
        eh = max(0, pad[0] + oh - full.shape[2])
        ew = max(0, pad[2] + ow - full.shape[3])
        ref = F.pad(full, (0, ew, 0, eh))[:, :, pad[0] : pad[0] + oh, pad[2] : pad[2] + ow]
        if bt is not None:
            ref = ref + bt.view(1, -1, 1, 1)
    assert ref.shape == out.shape
    assert rel_error(out, ref.detach().numpy()) < TORCH_TOL
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dw = np.empty_like(x), np.empty_like(w)
    db = None if b is None else np.empty_like(b)
    convt.conv_transpose2d_backward(x, w, dout, stride, pad, dil, cols, dx, dw, db)
    assert rel_error(dx, xt.grad.numpy()) < TORCH_TOL
    assert rel_error(dw, wt.grad.numpy()) < TORCH_TOL
    if b is not None:
        assert rel_error(db, bt.grad.numpy()) < TORCH_TOL


def test_conv2d_rejects_bad_workspace():
    x = np.zeros((1, 2, 4, 4), np.float32)
    w = np.zeros((3, 2, 3, 3), np.float32)
    out = np.empty((1, 3, 2, 2), np.float32)
    with pytest.raises(ValueError):
        conv.conv2d_forward(x, w, None, (1, 1), (0, 0, 0, 0), (1, 1), 1, out, np.empty((1, 18, 5)))


def _naive_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow):
    n, c, h, w = x.shape
    cols = np.zeros((n, c * kh * kw, oh * ow))
    for ci in range(c):
        for i in range(kh):
            for j in range(kw):
                for oy in range(oh):
                    for ox in range(ow):
                        iy, ix = oy * sh - pt + i * dh, ox * sw - pl + j * dw
                        if 0 <= iy < h and 0 <= ix < w:
                            cols[:, ci * kh * kw + i * kw + j, oy * ow + ox] = x[:, ci, iy, ix]
    return cols


@settings(max_examples=60, deadline=None, database=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    kh=st.integers(1, 3),
    kw=st.integers(1, 3),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    pt=st.integers(0, 3),
    pl=st.integers(0, 3),
    dh=st.integers(1, 2),
    dw=st.integers(1, 2),
    extra_h=st.integers(0, 2),
    extra_w=st.integers(0, 2),
)
def test_im2col_col2im_random_geometry(h, w, kh, kw, sh, sw, pt, pl, dh, dw, extra_h, extra_w):
    """im2col equals a naive loop and col2im is its exact adjoint for arbitrary geometry,
    including windows that run past the input (ceil_mode / output_padding style)."""
    oh = max(1, (h + pt - dh * (kh - 1) - 1) // sh + 1) + extra_h
    ow = max(1, (w + pl - dw * (kw - 1) - 1) // sw + 1) + extra_w
    rng = np.random.default_rng(h * 1000 + w)
    x = rng.standard_normal((1, 2, h, w))
    cols = np.full((1, 2 * kh * kw, oh * ow), np.nan)
    convt.im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, cols)
    np.testing.assert_array_equal(cols, _naive_im2col(x, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow))
    c2 = rng.standard_normal(cols.shape)
    back = np.full_like(x, np.nan)
    convt.col2im(c2, kh, kw, sh, sw, pt, pl, dh, dw, oh, ow, back)
    assert np.isclose(np.sum(cols * c2), np.sum(x * back), rtol=1e-12, atol=1e-12)


def test_batch_reductions_do_not_depend_on_thread_count():
    """Parameter gradients are summed over the batch in a fixed order: bit-identical
    results for any number of Numba threads (conv2d: see the next test)."""
    import numba

    from cnnspec.kernels.cpu import activation, norm, pool

    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    dout = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)

    def grads():
        res = []
        y, mean, inv = np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32)
        ones, zeros = np.ones(4, np.float32), np.zeros(4, np.float32)
        norm.batchnorm2d_forward_train(x, ones, zeros, 1e-5, 0.1, None, None, y, mean, inv)
        dx, dg, dbeta = np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32)
        norm.batchnorm2d_backward(dout, x, mean, ones, inv, dx, dg, dbeta)
        dpw = np.empty(4, np.float32)
        activation.prelu_backward(x, np.full(4, 0.25, np.float32), dout, dx.copy(), dpw)
        pooled, sub = np.empty((8, 4, 3, 3), np.float32), np.empty((8, 4, 3, 3), np.float32)
        pool.subsample2d_forward(x, ones, zeros, 2, 2, 2, 2, sub, pooled)
        dc, dsb = np.empty(4, np.float32), np.empty(4, np.float32)
        pool.subsample2d_backward(sub, pooled, ones, 2, 2, 2, 2, None, dc, dsb)
        return res + [y, dx, dg, dbeta, dpw, dc, dsb]

    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        serial = grads()
    finally:
        numba.set_num_threads(threads)
    for a, b in zip(serial, grads(), strict=True):
        np.testing.assert_array_equal(a, b)


def _conv_grads(g, threads=None):
    import numba

    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    dout = rng.standard_normal((8, 4, 6, 6)).astype(np.float32)
    w = np.linspace(-1, 1, 4 * (4 // g) * 9, dtype=np.float32).reshape(4, 4 // g, 3, 3)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1))
    ws = np.empty(conv.conv2d_workspace(x.shape, w.shape, x.shape, *geometry, 4), np.float32)
    saved = numba.get_num_threads()
    try:
        numba.set_num_threads(threads or saved)
        out = np.empty_like(x)
        conv.conv2d_forward(x, w, None, *geometry, g, out, ws)
        dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty(4, np.float32)
        conv.conv2d_backward(x, w, dout, *geometry, g, ws, dx, dw, db)
    finally:
        numba.set_num_threads(saved)
    return out, dx, dw, db


@pytest.mark.parametrize("g", [1, 4])
def test_conv2d_reductions_fixed_for_a_thread_count(g):
    """conv2d's threads sum dW / db privately, then in thread order: the same bits run
    after run; another thread count changes only the rounding."""
    for a, b in zip(_conv_grads(g), _conv_grads(g), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_conv_grads(g, threads=1), _conv_grads(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["basic", "depthwise_nobias", "stride_asympad_dilation_groups"])
def test_conv2d_tile_size_does_not_change_results(name):
    case = CONV_CASES[name]
    stride, pad, dil, g = case[7], case[8], case[9], case[10]
    x, w, b, out, _, rng = _make_conv(case, np.float64, seed=6)
    dout = rng.standard_normal(out.shape)
    results = []
    for rows in (1, None):
        shapes = (x.shape, w.shape, out.shape, stride, pad, dil, 8)
        ws = np.empty(conv.conv2d_workspace(*shapes, tile_rows=rows))
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws)
        dx, dw = np.full_like(x, np.nan), np.empty_like(w)
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, None)
        results.append((out.copy(), dx, dw))
    for a, b_ in zip(*results, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride", [(1, 1), (2, 2)])
def test_conv2d_several_samples_per_tile_match_one_row_tiles(stride):
    """Small images share a tile (a partial one last); same numbers as one-row tiles."""
    import numba

    rng = np.random.default_rng(13)
    x = rng.standard_normal((9, 3, 5, 6))
    w = rng.standard_normal((5, 3, 3, 3))
    b = rng.standard_normal(5)
    pad, dil = (1, 1, 1, 1), (1, 1)
    oh, ow = _conv_out(5, 3, stride[0], 1, 1, 1), _conv_out(6, 3, stride[1], 1, 1, 1)
    out = np.empty((9, 5, oh, ow))
    dout = rng.standard_normal(out.shape)
    shapes = (x.shape, w.shape, out.shape, stride, pad, dil, 8)
    assert conv._geometry(*shapes, numba.get_num_threads()).spt > 1
    results = []
    for rows in (None, 1):
        ws = np.empty(conv.conv2d_workspace(*shapes, tile_rows=rows))
        conv.conv2d_forward(x, w, b, stride, pad, dil, 1, out, ws, conv.ACT_RELU)
        dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        conv.conv2d_backward(x, w, dout, stride, pad, dil, 1, ws, dx, dw, db, out, conv.ACT_RELU)
        results.append((out.copy(), dx, dw, db))
    for a, b_ in zip(*results, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


def test_conv2d_shorter_last_band_matches_one_row_tiles():
    """Bands of output rows with a shorter last one: the backward pass re-zeroes its
    dout rows when a tile's shape changes, else the last band would keep the rows of
    the one before it. Same numbers as one-row tiles."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((3, 2, 5, 30))
    w = rng.standard_normal((4, 2, 3, 3))
    stride, pad, dil = (1, 1), (1, 1, 1, 1), (1, 1)
    out = np.empty((3, 4, 5, 30))
    dout = rng.standard_normal(out.shape)
    shapes = (x.shape, w.shape, out.shape, stride, pad, dil, 8)
    results = []
    for rows in (2, 1):
        ws = np.empty(conv.conv2d_workspace(*shapes, tile_rows=rows))
        geo = conv._plan(conv._key(x, w, out, stride, pad, dil, 1), w, ws, x.itemsize)[0].geo
        assert geo.rows == rows and (rows == 1 or geo.tiles * rows > 5)  # a shorter last band
        conv.conv2d_forward(x, w, None, stride, pad, dil, 1, out, ws, conv.ACT_RELU)
        dw, db = np.empty_like(w), np.empty(4)
        conv.conv2d_backward(x, w, dout, stride, pad, dil, 1, ws, None, dw, db, out, conv.ACT_RELU)
        results.append((dw, db))
    for a, b_ in zip(*results, strict=True):
        np.testing.assert_allclose(a, b_, rtol=1e-12, atol=1e-12)


# (N, C, H, W, O, kh, kw, pad(t, b, l, r), dilation, groups): stride-1 convs whose dx can
# be a convolution (dout padded by d*(k-1) - p): 'same', dilated, grouped, asymmetric,
# 'valid' and 'full' padding, small images several to a tile (9 samples: a partial last)
DX_CONV_CASES = {
    "same": (2, 3, 6, 5, 4, 3, 3, (1, 1, 1, 1), (1, 1), 1),
    "dilated2_asympad": (2, 4, 9, 8, 5, 3, 3, (2, 1, 0, 3), (2, 2), 1),
    "groups": (2, 6, 7, 6, 9, 3, 3, (1, 1, 1, 1), (1, 1), 3),
    "depthwise_k2x3": (2, 4, 6, 7, 4, 2, 3, (0, 1, 1, 1), (1, 1), 4),
    "valid_k5": (2, 6, 9, 9, 16, 5, 5, (0, 0, 0, 0), (1, 1), 1),
    "full": (2, 3, 5, 6, 4, 3, 2, (2, 2, 1, 1), (1, 1), 1),
    "pointwise": (2, 5, 4, 3, 3, 1, 1, (0, 0, 0, 0), (1, 1), 1),
    "small_samples": (9, 3, 5, 6, 5, 3, 3, (1, 1, 1, 1), (1, 1), 1),
    # whole blocks of output channels: dW reads dout from the padded dout (_dx_conv's shared)
    "small_samples_shared": (9, 3, 5, 6, 8, 3, 3, (1, 1, 1, 1), (1, 1), 1),
    "groups_shared": (2, 6, 7, 6, 8, 3, 3, (1, 1, 1, 1), (1, 1), 2),
}


@pytest.mark.parametrize("rows", [2, None])
@pytest.mark.parametrize("name", list(DX_CONV_CASES))
def test_dx_as_a_convolution_matches_the_transposed_product(name, rows, dx_path):
    """Stride-1 dx taken as a convolution of dout with the flipped, transposed weights
    (bands of `rows` rows, or the default tiles) gives the transposed product's dx:
    plain, through a fused ReLU, and with the fusion hooks and accumulate; dW and db
    do not change. float64, tight; the 256-bit kernels run it with
    CNNSPEC_VECTOR_BITS=256."""
    n, c, h, w, o, kh, kw, pad, dil, g = DX_CONV_CASES[name]
    oh, ow = (
        _conv_out(h, kh, 1, pad[0], pad[1], dil[0]),
        _conv_out(w, kw, 1, pad[2], pad[3], dil[1]),
    )
    shapes = ((n, c, h, w), (o, c // g, kh, kw), (n, o, oh, ow), (1, 1), pad, dil)
    dx_path(True)  # (a workspace with room)
    assert conv._dx_conv(*shapes, 1, 1, conv.panel(8)) is not None
    rng = np.random.default_rng(21)
    x = rng.standard_normal(shapes[0]) + 1.0
    wt = rng.standard_normal(shapes[1])
    b = rng.standard_normal(o)
    out = np.empty(shapes[2])
    dout = rng.standard_normal(out.shape)
    ws = np.empty(conv.conv2d_workspace(*shapes, 8, tile_rows=rows))
    scale, shift = rng.standard_normal(c), rng.standard_normal(c)
    k, affine = rng.standard_normal((3, o)), rng.standard_normal((2, o))
    prior = rng.standard_normal(x.shape)
    calls = [  # (forward act, backward keywords, dx's starting value)
        (0, {}, None),
        (conv.ACT_RELU, {}, None),
        (0, {"in_affine": (scale, shift, 1), "accumulate": True,
             "dout_affine": (k, affine, 1)}, prior),
        (0, {"accumulate": True, "dout_affine": (k, affine, 0)}, prior),
    ]  # fmt: skip
    for act, hooks, start in calls:
        fwd = {"in_affine": hooks["in_affine"]} if "in_affine" in hooks else {}
        conv.conv2d_forward(x, wt, b, (1, 1), pad, dil, g, out, ws, act, **fwd)
        results = []
        for as_conv in (False, True):
            dx_path(as_conv)
            dx = np.full_like(x, np.nan) if start is None else start.copy()
            dw, db = np.empty_like(wt), np.empty_like(b)
            conv.conv2d_backward(x, wt, dout, (1, 1), pad, dil, g, ws, dx, dw, db, out, act,
                                 **hooks)  # fmt: skip
            plan = conv._call(*shapes, 8, ws.size, numba.get_num_threads(), True, True)
            assert (plan.dxc is not None) == as_conv  # the path asked for is the one run
            results.append((dx, dw, db))
        for old, new in zip(*results, strict=True):
            np.testing.assert_allclose(new, old, rtol=1e-12, atol=1e-12)


@pytest.fixture
def unfold(monkeypatch):
    """choose(on): every stride-1 conv's padded samples unfolded by column taps, or none
    (conv._UNFOLD_JUNK), with the cached plans forgotten (as dx_path's)."""

    def choose(on):
        monkeypatch.setattr(conv, "_UNFOLD_JUNK", 0.0 if on else 2.0)
        conv._call.cache_clear()

    yield choose
    conv._call.cache_clear()


# stride 1, kernels wider than a column: CONV_CASES' and DX_CONV_CASES' (as CONV_CASES)
UNFOLD_CASES = {
    **{name: case for name, case in CONV_CASES.items() if case[7] == (1, 1) and case[6] > 1},
    **{
        f"dx_{name}": (n, c, h, w, o, kh, kw, (1, 1), pad, dil, g, True)
        for name, (n, c, h, w, o, kh, kw, pad, dil, g) in DX_CONV_CASES.items()
        if kw > 1
    },
}


@pytest.mark.parametrize("as_conv", [False, True])
@pytest.mark.parametrize("rows", [2, None])
@pytest.mark.parametrize("name", list(UNFOLD_CASES))
def test_unfolded_taps_match_the_phase_split_samples(name, rows, as_conv, unfold, dx_path):
    """Padded samples unfolded by column taps (a plane per tap, no junk columns: _taps)
    give what the phase-split ones give, forward and backward, on either dx path, in
    bands of `rows` rows or the default tiles, with every hook (float64, tight)."""
    n, c, h, w, o, kh, kw, stride, pad, dil, g, bias = UNFOLD_CASES[name]
    oh, ow = (
        _conv_out(h, kh, 1, pad[0], pad[1], dil[0]),
        _conv_out(w, kw, 1, pad[2], pad[3], dil[1]),
    )
    shapes = ((n, c, h, w), (o, c // g, kh, kw), (n, o, oh, ow), stride, pad, dil)
    rng = np.random.default_rng(31)
    x = np.maximum(rng.standard_normal(shapes[0]), 0.0) + 0.5 * (rng.random(shapes[0]) < 0.3)
    wt, b = rng.standard_normal(shapes[1]), rng.standard_normal(o) if bias else None
    dout, res = rng.standard_normal(shapes[2]), rng.standard_normal(shapes[2])
    scale, shift, mean = rng.standard_normal(c), rng.standard_normal(c), rng.standard_normal(c)
    k, affine = rng.standard_normal((3, o)), rng.standard_normal((2, o))
    prior = rng.standard_normal(x.shape)
    hook = (scale, shift, 1)
    results = []
    for on in (False, True):
        unfold(on)
        dx_path(as_conv)
        assert (conv._taps(*shapes) > 1) == on
        ws = np.empty(conv.conv2d_workspace(*shapes, 8, tile_rows=rows))
        got = []
        out, stats = np.empty(shapes[2]), np.empty((2, o))
        conv.conv2d_forward(x, wt, b, stride, pad, dil, g, out, ws, conv.ACT_RELU)
        got.append(out.copy())
        conv.conv2d_forward(x, wt, b, stride, pad, dil, g, out, ws, in_affine=hook, stats=stats,
                            residual=res)  # fmt: skip
        got += [out.copy(), stats.copy()]
        calls = [  # (forward act, backward keywords, dx's starting value)
            (conv.ACT_RELU, {}, None),
            (0, {"in_affine": hook, "accumulate": True, "dout_affine": (k, affine, 1)}, prior),
            (0, {"in_affine": hook, "dx_sums": (mean, np.empty((2, c)))}, None),
            (0, {"relu_dx": True, "accumulate": True}, prior),
        ]
        for act, hooks, start in calls:
            fwd = {"in_affine": hooks["in_affine"]} if "in_affine" in hooks else {}
            conv.conv2d_forward(x, wt, b, stride, pad, dil, g, out, ws, act, **fwd)
            dx = np.full_like(x, np.nan) if start is None else start.copy()
            dw, db = np.empty_like(wt), None if b is None else np.empty_like(b)
            conv.conv2d_backward(x, wt, dout, stride, pad, dil, g, ws, dx, dw, db, out, act,
                                 **hooks)  # fmt: skip
            got += [dx, dw] + ([] if db is None else [db])
            got += [hooks["dx_sums"][1].copy()] if "dx_sums" in hooks else []
        results.append(got)
    for old, new in zip(*results, strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-12, atol=1e-12)


def test_unfolded_taps_where_junk_columns_are_a_large_share():
    """LeNet-5's c3 (14 columns a row for 10 outputs) unfolds; its c1 (32 for 28), 'same'
    3x3 convs on maps as small as 8x8 (9 for 8), strides and 1-wide kernels do not."""
    c3 = ((64, 6, 14, 14), (16, 6, 5, 5), (64, 16, 10, 10), (1, 1), (0,) * 4, (1, 1))
    assert conv._taps(*c3) == 5
    c1 = ((64, 1, 32, 32), (6, 1, 5, 5), (64, 6, 28, 28), (1, 1), (0,) * 4, (1, 1))
    assert conv._taps(*c1) == 1
    same8 = ((128, 64, 8, 8), (64, 64, 3, 3), (128, 64, 8, 8), (1, 1), (1,) * 4, (1, 1))
    assert conv._taps(*same8) == 1
    strided = ((2, 3, 14, 14), (4, 3, 5, 5), (2, 4, 5, 5), (2, 2), (0,) * 4, (1, 1))
    assert conv._taps(*strided) == 1
    column = ((2, 3, 14, 14), (4, 3, 5, 1), (2, 4, 10, 14), (1, 1), (0,) * 4, (1, 1))
    assert conv._taps(*column) == 1


def test_unfold_ab_benchmark_runs_both_ways(unfold_ab, monkeypatch, capsys):
    """benchmarks/unfold_ab.py, the measure behind the rule: both layouts, the rule (and
    the plans cached under the layouts it forced) restored."""
    taps = []
    real = conv._taps
    monkeypatch.setattr(conv, "_taps", lambda *a: taps.append(real(*a)) or taps[-1])
    rule = conv._UNFOLD_JUNK
    rows = unfold_ab.main(["--only", "LeNet-5 c3", "--batch", "2", "--rounds", "1"])
    assert conv._UNFOLD_JUNK == rule and conv._call.cache_info().currsize == 0
    assert set(taps) == {1, 5}  # phase-split and unfolded
    (row,) = [r for r in rows if r["name"] == "LeNet-5 c3"]
    assert row["picks"] is True  # the rule: 29% junk columns unfold
    assert all(t > 0 for t in row["split"] + row["unfolded"])
    assert "LeNet-5 c3" in capsys.readouterr().out


def test_dx_as_a_convolution_only_where_it_can_and_pays():
    """Strides, and padding beyond the kernel's reach, keep the transposed product; so do
    convs whose dout padding would make the convolution's work too large (LeNet-5's c3)."""
    same = ((128, 16, 32, 32), (16, 16, 3, 3), (128, 16, 32, 32), (1, 1), (1,) * 4, (1, 1))
    assert conv._dx_conv(*same, 1, 1, 48) is not None
    # whole samples a tile: dout is gathered into the padded dout; bands: copied there
    assert conv._dx_conv(*same, 32, 1, 48).shared and not conv._dx_conv(*same, 1, 1, 48).shared
    strided = ((2, 3, 8, 8), (4, 3, 3, 3), (2, 4, 4, 4), (2, 2), (1,) * 4, (1, 1))
    assert conv._dx_conv(*strided, 1, 1, 48) is None
    wide_pad = ((2, 3, 8, 8), (4, 3, 3, 3), (2, 4, 10, 10), (1, 1), (3, 1, 1, 3), (1, 1))
    assert conv._dx_conv(*wide_pad, 1, 1, 48) is None
    c3 = ((64, 6, 14, 14), (16, 6, 5, 5), (64, 16, 10, 10), (1, 1), (0,) * 4, (1, 1))
    assert conv._dx_conv(*c3, 1, 1, 48) is None


@pytest.mark.slow
def test_narrow_vector_kernels_match_numpy(tmp_path):
    """The 256-bit micro-kernels (CPUs without AVX-512), forced in a fresh process with
    its own Numba cache: forward and backward against a direct numpy reference."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np
from cnnspec.kernels.cpu import conv
assert conv.VECTOR_BYTES == 32
rng = np.random.default_rng(0)
for n, c, h, o, k, s, p in [(3, 5, 9, 7, 3, 1, 1), (2, 4, 11, 9, 3, 2, 1), (2, 3, 8, 6, 5, 1, 0)]:
    for dt in (np.float32, np.float64):
        x = rng.standard_normal((n, c, h, h)).astype(dt)
        w = rng.standard_normal((o, c, k, k)).astype(dt)
        oh = (h + 2 * p - k) // s + 1
        out = np.empty((n, o, oh, oh), dt)
        shapes = (x.shape, w.shape, out.shape, (s, s), (p,) * 4, (1, 1), x.itemsize)
        ws = np.empty(conv.conv2d_workspace(*shapes), dt)
        conv.conv2d_forward(x, w, None, (s, s), (p,) * 4, (1, 1), 1, out, ws)
        xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
        cols = np.stack([xp[:, :, i : i + s * oh : s, j : j + s * oh : s]
                         for i in range(k) for j in range(k)], axis=2)  # n, c, k*k, oh, oh
        ref = np.einsum("ncqyx,ocq->noyx", cols, w.reshape(o, c, k * k))
        assert np.allclose(out, ref, rtol=1e-4, atol=1e-4), (dt, n, c, h, o, k, s, p)
        dout = rng.standard_normal(out.shape).astype(dt)
        dx, dw = np.empty_like(x), np.empty_like(w)
        conv.conv2d_backward(x, w, dout, (s, s), (p,) * 4, (1, 1), 1, ws, dx, dw, None)
        dw_ref = np.einsum("ncqyx,noyx->ocq", cols, dout).reshape(w.shape)
        assert np.allclose(dw, dw_ref, rtol=1e-4, atol=1e-3), "dw"
        dcols = np.einsum("ocq,noyx->ncqyx", w.reshape(o, c, k * k), dout)
        dxp = np.zeros_like(xp)
        for q in range(k * k):
            i, j = divmod(q, k)
            dxp[:, :, i : i + s * oh : s, j : j + s * oh : s] += dcols[:, :, q]
        assert np.allclose(dx, dxp[:, :, p : p + h, p : p + h], rtol=1e-4, atol=1e-3), "dx"
print("ok")
"""
    env = dict(os.environ, CNNSPEC_VECTOR_BITS="256", NUMBA_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_each_vector_width_keeps_its_own_cache(tmp_path):
    """512-bit then 256-bit kernels in one Numba cache: each process compiles (or loads)
    its own width, never the other's blocks (it crashed when the cache ignored the
    width). One tiny forward conv per process, against numpy."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np
from cnnspec.kernels.cpu import conv
rng = np.random.default_rng(0)
x = rng.standard_normal((2, 3, 6, 6)).astype(np.float32)
w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
out = np.empty((2, 5, 4, 4), np.float32)
ws = np.empty(conv.conv2d_workspace(x.shape, w.shape, out.shape, (1, 1), (0,) * 4, (1, 1), 4),
              np.float32)
conv.conv2d_forward(x, w, None, (1, 1), (0,) * 4, (1, 1), 1, out, ws)
cols = np.stack([x[:, :, i : i + 4, j : j + 4] for i in range(3) for j in range(3)], axis=2)
ref = np.einsum("ncqyx,ocq->noyx", cols, w.reshape(5, 3, 9))
assert np.allclose(out, ref, rtol=1e-4, atol=1e-4)
print(conv.VECTOR_BYTES * 8)
"""
    for bits in ("512", "256", "512"):
        env = dict(os.environ, CNNSPEC_VECTOR_BITS=bits, NUMBA_CACHE_DIR=str(tmp_path))
        env["NUMBA_NUM_THREADS"] = "1"
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, (bits, done.returncode, done.stderr[-3000:])
        assert done.stdout.split() == [bits]
    cached = {p.name.split("-")[-1].split(".")[0] for p in tmp_path.rglob("conv._forward*.nbi")}
    assert cached == {"512bit", "256bit"}, cached


def test_a_kernels_cache_stamp_covers_every_module_of_the_folder(tmp_path):
    """A kernel compiles in helpers and intrinsics of other modules (pool.py conv.py's LLVM
    helpers, winograd.py its micro-kernels): its cached build must go stale when any of
    them changes, not only its own file (Numba's stamp)."""
    import os

    from cnnspec.kernels.cpu import _common, pool

    for name in ("a.py", "b.py", "notes.txt"):
        (tmp_path / name).write_text("x = 1\n")
    before = _common.folder_stamp(str(tmp_path))
    assert [e[0] for e in before] == ["a.py", "b.py"]
    os.utime(tmp_path / "b.py", ns=(1, 1))
    touched = _common.folder_stamp(str(tmp_path))
    assert touched != before
    (tmp_path / "notes.txt").write_text("changed\n")  # not Python: not a kernel's source
    assert _common.folder_stamp(str(tmp_path)) == touched

    stamp = pool._avgpool_fwd_2x2.serial._cache._impl.locator.get_source_stamp()
    folder = os.path.dirname(pool.__file__)
    assert stamp[1] == _common.folder_stamp(folder)
    assert "conv.py" in {e[0] for e in stamp[1]}


def test_a_kernel_that_cannot_be_cached_is_a_warning_not_a_traceback():
    """Numba warns that a build cannot be cached (under NUMBA_OPT=0 some cannot: dynamic
    globals) with its locator's `_py_file`, which the width-aware locator passes on."""
    from types import SimpleNamespace

    from numba.core.errors import NumbaWarning

    from cnnspec.kernels.cpu import pool

    impl = pool._avgpool_fwd_2x2.serial._cache._impl
    uncachable = SimpleNamespace(
        lifted=(),
        library=SimpleNamespace(has_dynamic_globals=True),
        fndesc=SimpleNamespace(qualname="kernel"),
    )
    with pytest.warns(NumbaWarning, match="Cannot cache"):
        assert impl.check_cachable(uncachable) is False
    assert impl.locator._py_file == pool.__file__
