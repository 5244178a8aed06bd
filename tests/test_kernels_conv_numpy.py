"""The numpy convolution that stands in for the conv kernels while a first run's child
compiles them (kernels/cpu/conv_numpy.py): the kernels' results, call for call."""

import sys

import numba
import numpy as np
import pytest

from cnnspec.kernels.cpu import _common, conv, conv_numpy, winograd
from cnnspec.kernels.cpu._common import Builds
from cnnspec.kernels.cpu.background import BackgroundBuilds

# (n, c, h, w, o, kh, kw, stride, pad (t, b, l, r), dilation, groups)
CASES = {
    "lenet-c1": (3, 1, 12, 12, 6, 5, 5, (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "same-3x3": (2, 4, 7, 9, 5, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "strided-uneven-pad": (2, 3, 9, 8, 4, 3, 2, (2, 3), (2, 0, 1, 1), (1, 1), 1),
    "dilated-grouped": (2, 4, 10, 10, 6, 3, 3, (1, 2), (2, 2, 0, 1), (2, 1), 2),
    "stride-leaves-rows": (2, 2, 8, 8, 3, 2, 2, (3, 3), (0, 0, 0, 0), (1, 1), 1),
    # stride 1, no more outputs than inputs: dx as a correlation of the padded gradient
    "narrowing-3x2": (2, 5, 7, 9, 4, 3, 2, (1, 1), (1, 1, 1, 0), (1, 1), 1),
    "narrowing-dilated-grouped": (2, 6, 10, 9, 4, 3, 3, (1, 1), (2, 1, 0, 3), (2, 1), 2),
    "pad-past-the-reach": (2, 4, 5, 6, 3, 3, 3, (1, 1), (3, 0, 1, 1), (1, 1), 1),
}


def _conv(case, dtype, seed):
    n, c, h, w, o, kh, kw, stride, pad, dil, g = case
    rng = np.random.default_rng(seed)
    oh = (h + pad[0] + pad[1] - dil[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + pad[2] + pad[3] - dil[1] * (kw - 1) - 1) // stride[1] + 1

    def normal(*shape):
        return rng.standard_normal(shape).astype(dtype)

    x, wt, b = normal(n, c, h, w), normal(o, c // g, kh, kw), normal(o)
    size = conv.conv2d_workspace(x.shape, wt.shape, (n, o, oh, ow), stride, pad, dil, x.itemsize)
    return x, wt, b, normal(n, o, oh, ow), np.empty(size, dtype), (stride, pad, dil, g)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("act, residual", [(0, False), (1, False), (1, True)])
def test_forward_matches_the_kernels(name, dtype, tol, act, residual):
    x, w, b, res, ws, (stride, pad, dil, g) = _conv(CASES[name], dtype, 1)
    res = res if residual else None
    want, got = np.empty_like(res if res is not None else _conv(CASES[name], dtype, 1)[3]), None
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, want, ws, act=act, residual=res)
    got = np.full_like(want, np.nan)
    conv_numpy.conv2d_forward(x, w, b, stride, pad, dil, g, got, act=act, residual=res)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize(
    "act, accumulate, relu_dx, with_dx, with_db",
    [(0, False, False, True, True), (1, True, False, True, False),
     (0, False, True, True, True), (1, False, False, False, True)],
)  # fmt: skip
def test_backward_matches_the_kernels(name, dtype, tol, act, accumulate, relu_dx, with_dx, with_db):
    x, w, b, dout, ws, (stride, pad, dil, g) = _conv(CASES[name], dtype, 2)
    out = np.empty_like(dout)
    conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, act=act)
    start = np.random.default_rng(3).standard_normal(x.shape).astype(dtype)
    results = []
    for run in ("kernels", "numpy"):
        dx = start.copy() if with_dx else None
        dw, db = np.full_like(w, np.nan), np.full_like(b, np.nan) if with_db else None
        args = (x, w, dout, stride, pad, dil, g)
        if run == "kernels":
            conv.conv2d_backward(*args, ws, dx, dw, db, out=out if act else None, act=act,
                                 accumulate=accumulate, relu_dx=relu_dx)  # fmt: skip
        else:
            conv_numpy.conv2d_backward(*args, dx, dw, db, out=out if act else None, act=act,
                                       accumulate=accumulate, relu_dx=relu_dx)  # fmt: skip
        results.append([a for a in (dx, dw, db) if a is not None])
    for want, got in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def test_serial_and_parallel_builds_give_the_same_bits(monkeypatch):
    """What lets a first run's steps switch from one build to the other mid-run."""
    if numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: the parallel build runs as the serial one")
    x, w, b, dout, ws, (stride, pad, dil, g) = _conv(CASES["dilated-grouped"], np.float32, 4)
    results = []
    for serial in (True, False):
        for builds in (conv._forward_tiles, conv._backward_samples):
            monkeypatch.setattr(builds, "pick", lambda _, b=builds, s=serial: Builds.pick(b, s))
        out, dx, dw, db = np.empty_like(dout), np.empty_like(x), np.empty_like(w), np.empty_like(b)
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, act=1)
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, db, out=out, act=1)
        results.append((out, dx, dw, db))
    for a, b_ in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b_)


def _affine(rng, c, dtype):
    return rng.standard_normal(c).astype(dtype), rng.standard_normal(c).astype(dtype)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 2e-4)])
@pytest.mark.parametrize(
    "name", ["same-3x3", "strided-uneven-pad", "dilated-grouped", "narrowing-dilated-grouped"]
)
@pytest.mark.parametrize("relu, chunked", [(False, False), (True, False), (True, True)])
def test_batch_norm_hooks_match_the_kernels(name, dtype, tol, relu, chunked, monkeypatch):
    """A norm before the conv (affine input, its gradient's sums), one after it (the
    statistics of the output, the norm's output gradient in place of the conv's); the
    numpy side also a sample at a time (its bound on memory for large layers)."""
    if chunked:
        monkeypatch.setattr(conv_numpy, "_CHUNK_BYTES", 1)
    x, w, b, dout, ws, (stride, pad, dil, g) = _conv(CASES[name], dtype, 5)
    rng = np.random.default_rng(6)
    scale, shift = _affine(rng, x.shape[1], dtype)
    in_affine = (scale, shift, relu)
    k = rng.standard_normal((3, w.shape[0])).astype(dtype)
    dout_affine = (k, np.stack(_affine(rng, w.shape[0], dtype)), relu)
    mean = rng.standard_normal(x.shape[1])
    results = []
    for run in (conv, conv_numpy):
        out, stats = np.full_like(dout, np.nan), np.full((2, w.shape[0]), np.nan)
        extra = (ws,) if run is conv else ()
        run.conv2d_forward(x, w, b, stride, pad, dil, g, out, *extra, in_affine=in_affine,
                           stats=stats)  # fmt: skip
        dx, dw, db = np.full_like(x, np.nan), np.full_like(w, np.nan), np.full_like(b, np.nan)
        sums = np.full((2, x.shape[1]), np.nan)
        run.conv2d_backward(x, w, dout, stride, pad, dil, g, *extra, dx, dw, db, out=out,
                            in_affine=in_affine, dout_affine=dout_affine,
                            dx_sums=(mean, sums))  # fmt: skip
        results.append((out, stats, dx, dw, db, sums))
    for want, got in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("winograd_mode", ["0", "1"], ids=["direct", "winograd"])
def test_a_first_run_computes_on_the_stand_in_while_the_child_compiles(
    first_run, monkeypatch, winograd_mode
):
    """No conv build is ready (as on an empty cache): the calls ask a child for them and
    return numpy's numbers at once, the direct conv's calls and Winograd's alike."""
    background = first_run
    monkeypatch.setattr(winograd, "MODE", winograd_mode)
    x, w, b, dout, ws, (stride, pad, dil, g) = _conv(CASES["same-3x3"], np.float32, 7)
    assert winograd.chooses(x.shape, w.shape, dout.shape, stride, pad, dil, g) == (
        winograd_mode == "1"
    )
    size = winograd.workspace(x.shape, w.shape, dout.shape, x.itemsize)
    ws = np.empty(max(ws.size, size), np.float32)
    got, want = [], []
    with background.deferring():
        out = np.empty_like(dout)
        conv.conv2d_forward(x, w, b, stride, pad, dil, g, out, ws, act=1)
        dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
        conv.conv2d_backward(x, w, dout, stride, pad, dil, g, ws, dx, dw, db, out=out, act=1)
        got += [out, dx, dw, db]
        asked = sorted(background.state.values())
    out = np.empty_like(dout)
    conv_numpy.conv2d_forward(x, w, b, stride, pad, dil, g, out, act=1)
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    conv_numpy.conv2d_backward(x, w, dout, stride, pad, dil, g, dx, dw, db, out=out, act=1)
    want += [out, dx, dw, db]
    for a, b_ in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b_)
    assert asked == ["pending"] * (4 if numba.get_num_threads() > 1 else 2)


def test_a_rank_of_a_distributed_run_compiles_its_convs_itself(monkeypatch):
    """One of several ranks (`compiling(alone=False)`): a child would take a core from
    another rank and come late, so no stand-in and nothing asked of a child."""
    background = BackgroundBuilds(command=[sys.executable, "-c", "import time; time.sleep(60)"])
    monkeypatch.setenv("CNNSPEC_BACKGROUND_BUILDS", "1")
    monkeypatch.setattr(_common, "BACKGROUND", background)
    with background.deferring(stand_ins=False):
        assert conv._forward_tiles.now(True, ()) is conv._forward_tiles.serial
        assert not background.state and background.child is None
