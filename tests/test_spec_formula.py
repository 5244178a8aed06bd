"""Output-size and receptive-field arithmetic against brute force and PyTorch."""

import copy
import math
import pickle
from fractions import Fraction

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cnnspec.errors import LayerError
from cnnspec.layers.base import Field, output_size, resolve_padding
from cnnspec.layers.conv import ConvTranspose2d

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # pragma: no cover - torch is a test extra
    torch = None

FAST = settings(max_examples=150, deadline=None)

sizes = st.integers(1, 48)
kernels = st.integers(1, 9)
strides = st.integers(1, 5)
dilations = st.integers(1, 4)
pads = st.integers(0, 8)


def windows(n, k, s, p0, p1, d):
    """Count the window positions over the padded input, one stride at a time."""
    padded, span = n + p0 + p1, d * (k - 1) + 1
    count, start = 0, 0
    while start + span <= padded:
        count += 1
        start += s
    return count


def ceil_windows(n, k, s, p0, p1, d):
    """Ceil mode: a window may overhang the right edge by less than a stride, but must
    start inside the input or its left padding."""
    padded, span = n + p0 + p1, d * (k - 1) + 1
    count, start = 0, 0
    while start + span <= padded + s - 1 and start < n + p0:
        count += 1
        start += s
    return count


def torch_pool_out(n, k, s, p, d, ceil_mode):
    x = torch.zeros(1, 1, n, n)
    return F.max_pool2d(x, k, s, p, dilation=d, ceil_mode=ceil_mode).shape[-1]


# ---- explicit padding, stride, dilation -------------------------------------


@FAST
@given(sizes, kernels, strides, pads, pads, dilations)
def test_output_size_matches_brute_force(n, k, s, p0, p1, d):
    expected = windows(n, k, s, p0, p1, d)
    if expected == 0:
        with pytest.raises(LayerError) as info:
            output_size(n, k, s, p0, p1, d)
        assert "larger than the padded input" in info.value.message
        assert info.value.attr == "kernel"
        # the hint shows the arithmetic with the numbers of this layer
        assert f"({n} + {p0} + {p1} - {d}*({k}-1) - 1)/{s}" in info.value.hint
    else:
        assert output_size(n, k, s, p0, p1, d) == expected


@FAST
@given(sizes, kernels, strides, dilations)
def test_valid_padding_is_zero(n, k, s, d):
    pads = resolve_padding("valid", [k, k], [s, s], [d, d], (n, n))
    assert pads == [0, 0, 0, 0]


@FAST
@given(sizes, sizes, kernels, kernels, strides, strides, dilations, dilations)
def test_same_padding_keeps_ceil_n_over_s(h, w, kh, kw, sh, sw, dh, dw):
    pads = resolve_padding("same", [kh, kw], [sh, sw], [dh, dw], (h, w))
    for n, k, s, d, (p0, p1) in ((h, kh, sh, dh, pads[:2]), (w, kw, sw, dw, pads[2:])):
        assert 0 <= p0 <= p1 <= p0 + 1  # split evenly, the odd one at the bottom/right
        assert output_size(n, k, s, p0, p1, d) == math.ceil(n / s) == windows(n, k, s, p0, p1, d)


@FAST
@given(sizes, kernels, strides, dilations)
def test_full_padding_pads_dilated_kernel_minus_one(n, k, s, d):
    pads = resolve_padding("full", [k, k], [s, s], [d, d], (n, n))
    assert pads == [d * (k - 1)] * 4
    out = output_size(n, k, s, *pads[:2], d)
    assert out == windows(n, k, s, *pads[:2], d)
    if s == 1:
        assert out == n + d * (k - 1)


@pytest.mark.parametrize(
    "value, expected",
    [(2, [2, 2, 2, 2]), ([1, 3], [1, 1, 3, 3]), ([0, 1, 2, 3], [0, 1, 2, 3])],
)
def test_explicit_padding_forms(value, expected):
    assert resolve_padding(value, [3, 3], [1, 1], [1, 1], (8, 8)) == expected


@pytest.mark.parametrize("value", ["diagonal", [1, 2, 3], [1.5, 1], True])
def test_bad_padding_is_a_layer_error(value):
    with pytest.raises(LayerError) as info:
        resolve_padding(value, [3, 3], [1, 1], [1, 1], (8, 8))
    assert info.value.attr == "padding"


# ---- ceil mode: PyTorch's pooling rule --------------------------------------


@st.composite
def pool_cases(draw):
    k = draw(st.integers(1, 7))
    s = draw(st.integers(1, 5))
    d = draw(st.integers(1, 3))
    p = draw(st.integers(0, k // 2))  # PyTorch allows at most half the kernel
    span = d * (k - 1) + 1
    n = draw(st.integers(max(1, span - 2 * p), 40))  # the window fits the padded input
    return n, k, s, p, d


@FAST
@given(pool_cases())
@example((5, 3, 2, 1, 1))  # GoogLeNet-style 3x3/2 pooling with padding
@example((112, 3, 2, 0, 1))  # 112 -> 56 rounds up
def test_ceil_mode_matches_pytorch(case):
    n, k, s, p, d = case
    got = output_size(n, k, s, p, p, d, ceil_mode=True)
    assert got == ceil_windows(n, k, s, p, p, d)
    if torch is not None:
        assert got == torch_pool_out(n, k, s, p, d, ceil_mode=True)
    else:  # pragma: no cover
        expected = math.ceil((n + 2 * p - d * (k - 1) - 1) / s) + 1
        if (expected - 1) * s >= n + p:
            expected -= 1
        assert got == expected


@FAST
@given(pool_cases())
def test_floor_mode_matches_pytorch(case):
    n, k, s, p, d = case
    got = output_size(n, k, s, p, p, d)
    assert got == windows(n, k, s, p, p, d)
    if torch is not None:
        assert got == torch_pool_out(n, k, s, p, d, ceil_mode=False)


def test_ceil_mode_googlenet_sizes():
    # 112 -> 56 -> 28 -> 14 -> 7 with 3x3/2 pooling that rounds up (Caffe, the paper)
    sizes = [112]
    for _ in range(4):
        sizes.append(output_size(sizes[-1], 3, 2, 0, 0, 1, ceil_mode=True))
    assert sizes == [112, 56, 28, 14, 7]
    assert output_size(112, 3, 2, 0, 0, 1) == 55  # floor mode would lose a row


@pytest.mark.parametrize("n, k, s", [(2, 3, 2), (1, 2, 2), (4, 5, 3)])
def test_ceil_mode_window_overhanging_small_input(n, k, s):
    expected = torch_pool_out(n, k, s, 0, 1, True) if torch is not None else 1
    assert expected == 1 == ceil_windows(n, k, s, 0, 0, 1)
    assert output_size(n, k, s, 0, 0, 1, ceil_mode=True) == expected


# ---- transposed convolution -------------------------------------------------


def transposed(n, k, s, p, d, extra):
    attrs = {
        "filters": 1,
        "kernel": k,
        "stride": s,
        "padding": p,
        "dilation": d,
        "output_padding": extra,
    }
    return ConvTranspose2d("up", attrs, [(1, n, n)])


@st.composite
def transposed_cases(draw):
    n, k, s, d = draw(st.integers(1, 12)), draw(kernels), draw(strides), draw(dilations)
    p = draw(st.integers(0, 6))
    extra = draw(st.integers(0, max(s, d) - 1))
    return n, k, s, p, d, extra


@FAST
@given(transposed_cases())
def test_transposed_output_formula_matches_pytorch(case):
    n, k, s, p, d, extra = case
    expected = (n - 1) * s - 2 * p + d * (k - 1) + 1 + extra
    if expected < 1:
        with pytest.raises(LayerError) as info:
            transposed(n, k, s, p, d, extra)
        assert f"would be {expected}" in info.value.message
        assert info.value.hint.endswith(f"= {expected}")
        return
    layer = transposed(n, k, s, p, d, extra)
    assert layer.out_shape == (1, expected, expected)
    if torch is not None:
        x, w = torch.zeros(1, 1, n, n), torch.zeros(1, 1, k, k)
        y = F.conv_transpose2d(x, w, stride=s, padding=p, output_padding=extra, dilation=d)
        assert tuple(y.shape[1:]) == layer.out_shape


def test_transposed_rejects_output_padding_not_below_stride_or_dilation():
    with pytest.raises(LayerError) as info:
        transposed(4, 3, 2, 1, 1, 2)
    assert "output_padding (2) must be smaller than stride or dilation" in info.value.message


def test_transposed_asymmetric_attributes():
    attrs = {
        "filters": 2,
        "kernel": [3, 2],
        "stride": [2, 3],
        "padding": [1, 0],
        "dilation": [1, 2],
        "output_padding": [1, 2],
    }
    layer = ConvTranspose2d("up", attrs, [(3, 4, 5)])
    h = (4 - 1) * 2 - 2 + 1 * (3 - 1) + 1 + 1
    w = (5 - 1) * 3 - 0 + 2 * (2 - 1) + 1 + 2
    assert layer.out_shape == (2, h, w)
    if torch is not None:
        y = F.conv_transpose2d(
            torch.zeros(1, 3, 4, 5),
            torch.zeros(3, 2, 3, 2),
            stride=(2, 3),
            padding=(1, 0),
            output_padding=(1, 2),
            dilation=(1, 2),
        )
        assert tuple(y.shape[1:]) == layer.out_shape


# ---- receptive fields -------------------------------------------------------

layer_1d = st.tuples(kernels, strides, pads, dilations)  # (k, s, p, d)


@FAST
@given(st.lists(layer_1d, min_size=1, max_size=4))
def test_receptive_field_of_a_stack_matches_index_propagation(stack):
    """Field.through against following output unit 0 back to the input indices it reads."""
    field, jump = Field(), 1
    for k, s, p, d in stack:
        field = field.through(k, s, p, d)
        jump *= s
    # unit j of a layer reads units j*s - p + d*t (t < k) of the layer before it: walk
    # output unit 0 back to the range of network-input positions it depends on
    lo = hi = 0
    for k, s, p, d in reversed(stack):
        lo, hi = lo * s - p, hi * s - p + d * (k - 1)
    assert field.jump == jump
    assert field.start == lo  # effective padding is -lo
    assert field.size == hi - lo + 1


def test_a_field_is_an_immutable_value_that_pickles_and_copies():
    field = Field(6, Fraction(2, 4), -1)
    assert field.jump == Fraction(1, 2) and type(Field(3, Fraction(4, 2)).jump) is int
    # through a layer: a whole Fraction becomes an int there too (a stride-2 conv after
    # a 2x upsampling), and ints stay ints
    after = field.through(3, 2, 1)
    assert after == Field(7, 1, Fraction(-3, 2)) and type(after.jump) is int
    plain = Field(5, 2).through(3, 2, 1)
    assert all(type(v) is int for v in (plain.size, plain.jump, plain.start))
    with pytest.raises(AttributeError, match="immutable"):
        field.size = 1
    for twin in (pickle.loads(pickle.dumps(field)), copy.deepcopy(field), copy.copy(field)):
        assert twin == field and hash(twin) == hash(field) and twin is not field
    assert field != Field(6, Fraction(1, 2), 0) and field != (6, Fraction(1, 2), -1)


def test_ceil_mode_still_refuses_windows_that_start_past_the_input():
    # 1 + 4 > 1 + 2 - 1: even overhanging by less than a stride, no window fits
    with pytest.raises(LayerError, match=r"kernel \(5\) is larger than the padded input \(1\)"):
        output_size(1, 5, 2, 0, 0, 1, ceil_mode=True)


def test_floor_mode_refuses_a_kernel_beyond_the_padded_input():
    # convolutions have no ceil mode: the PyTorch rule is the window must fit
    with pytest.raises(LayerError, match=r"larger than the padded input \(2\)"):
        output_size(2, 3, 2, 0, 0, 1)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("n, k, s, p", [(2, 3, 2, 0), (1, 2, 2, 0), (4, 5, 3, 0), (5, 4, 3, 2)])
def test_pool_kernels_match_pytorch_on_overhanging_windows(n, k, s, p):
    """The kernels clip windows to the input and use PyTorch's average divisor."""
    import numpy as np

    from cnnspec.kernels.cpu import pool

    o = output_size(n, k, s, p, p, 1, ceil_mode=True)
    x = np.random.default_rng(0).standard_normal((2, 3, n, n)).astype(np.float32)
    out, argmax = np.zeros((2, 3, o, o), np.float32), np.zeros((2, 3, o, o), np.int32)
    pool.maxpool2d_forward(x, k, k, s, s, p, p, out, argmax)
    want = F.max_pool2d(torch.tensor(x), k, s, p, ceil_mode=True)
    assert np.allclose(out, want.numpy())
    for include_pad in (True, False):
        pool.avgpool2d_forward(x, k, k, s, s, p, p, p, p, include_pad, out)
        want = F.avg_pool2d(torch.tensor(x), k, s, p, ceil_mode=True, count_include_pad=include_pad)
        assert np.allclose(out, want.numpy(), atol=1e-6)
