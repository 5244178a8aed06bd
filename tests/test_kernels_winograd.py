"""Winograd F(4x4, 3x3) convolutions: against the direct conv, finite differences, and
the dispatch's choice; the transforms' vector passes against numpy, bit for bit.

Tolerance (Winograd against the direct conv, the largest difference over the largest
magnitude of the direct result): float64 1e-13, float32 2e-5. The transforms multiply
by 2, 4, 5, 8 and 1/4 - 1/24; measured (winograd.py's docstring) the float32 difference
stays near 1e-5 of the output's scale, on these tiny shapes up to 5e-6. The direct
conv itself is held to PyTorch by test_kernels_conv.py and the conformance suite.
"""

import numpy as np
import pytest
from numba import njit

from cnnspec.kernels.cpu import conv, winograd
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

TOL = {np.float64: 1e-13, np.float32: 2e-5}

# (N, C, H, W, K, pad (t, b, l, r)): odd maps (tiles overhanging the edge), padding 0,
# 1, 2 and lopsided, batch 1, channels off the vector width and the blocks, rows long
# enough for a vector's worth of tiles in a row (and a last tile of one column)
CASES = {
    "odd_pad1": (2, 5, 7, 9, 3, (1, 1, 1, 1)),
    "pad0_batch1": (1, 3, 6, 5, 7, (0, 0, 0, 0)),
    "lopsided": (2, 4, 5, 6, 4, (1, 0, 2, 1)),
    "wide_channels": (3, 17, 9, 11, 20, (1, 1, 1, 1)),
    "tiny_map": (2, 2, 3, 3, 2, (0, 0, 0, 0)),
    "long_rows": (1, 3, 5, 37, 2, (1, 1, 1, 1)),
    # maps whose padded rows run past the last tile's first 4 columns (the transform
    # reads those apart: one column at 8x8 with padding 1, two at 10x10 without)
    "whole_tiles_pad1": (3, 2, 8, 8, 3, (1, 1, 1, 1)),
    "whole_tiles_pad0": (2, 3, 10, 10, 2, (0, 0, 0, 0)),
}


@pytest.fixture
def mode(monkeypatch):
    """Force the dispatch: mode("1") Winograd wherever it applies, mode("0") direct."""
    return lambda m: monkeypatch.setattr(winograd, "MODE", m)


def _make(case, dtype, seed=0, bias=True):
    n, c, h, w, k, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(k).astype(dtype) if bias else None
    out = np.empty((n, k, h + pad[0] + pad[1] - 2, w + pad[2] + pad[3] - 2), dtype)
    shapes = (x.shape, wt.shape, out.shape, (1, 1), pad, (1, 1), np.dtype(dtype).itemsize)
    ws = np.full(conv.conv2d_workspace(*shapes), np.nan, dtype)  # garbage: overwritten
    return x, wt, b, out, ws, rng


def _run(m, mode, x, w, b, pad, out, ws, dout, act):
    """forward output, dx, dw, db with the dispatch forced to `m`."""
    mode(m)
    geo = ((1, 1), pad, (1, 1), 1)
    conv.conv2d_forward(x, w, b, *geo, out, ws, act)
    y = out.copy()
    dx, dw = np.full_like(x, np.nan), np.full_like(w, np.nan)
    db = None if b is None else np.full_like(b, np.nan)
    conv.conv2d_backward(x, w, dout, *geo, ws, dx, dw, db, y, act)
    return y, dx, dw, db


def _scaled_error(a, ref):
    return float(np.max(np.abs(a - ref)) / max(np.max(np.abs(ref)), 1e-30))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_winograd_matches_direct(name, dtype, mode):
    case = CASES[name]
    pad = case[5]
    act = conv.ACT_RELU if name in ("odd_pad1", "wide_channels", "long_rows") else conv.ACT_NONE
    bias = name != "lopsided"
    mode("1")  # the workspace for both ways
    x, w, b, out, ws, rng = _make(case, dtype, bias=bias)
    dout = rng.standard_normal(out.shape).astype(dtype)
    direct = _run("0", mode, x, w, b, pad, out, ws, dout, act)
    wino = _run("1", mode, x, w, b, pad, out, ws, dout, act)
    for got, ref in zip(wino, direct, strict=True):
        if ref is not None:
            assert _scaled_error(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_winograd_bands_of_tile_rows(dtype, mode, monkeypatch):
    """Blocks of one panel's columns: samples split into bands of tile rows (the last
    one shorter), as large maps run."""
    case = (3, 3, 41, 22, 5, (1, 1, 1, 1))  # 11 x 6 tiles a sample
    mode("1")
    x, w, b, out, ws, rng = _make(case, dtype, seed=5)

    def banded(columns):  # both ways: bands of rows, the last one shorter
        monkeypatch.setattr(winograd, "_BLOCK_COLUMNS", columns)
        geos = [winograd._geometry(x.shape, w.shape, out.shape, x.itemsize, 1, b) for b in (0, 1)]
        return all(g.spb == 1 and g.bands > 1 and g.ty % g.rows for g in geos)

    # the block that gives such bands depends on the panel width (vector width, dtype)
    assert any(banded(columns) for columns in (1 << i for i in range(7)))
    winograd._blocks.cache_clear()  # (plans cached per shape with other blocks)
    dout = rng.standard_normal(out.shape).astype(dtype)
    direct = _run("0", mode, x, w, b, case[5], out, ws, dout, conv.ACT_RELU)
    wino = _run("1", mode, x, w, b, case[5], out, ws, dout, conv.ACT_RELU)
    for got, ref in zip(wino, direct, strict=True):
        assert _scaled_error(got, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_winograd_on_fewer_threads_than_its_workspace_was_sized_for(dtype, mode, monkeypatch):
    """A model sizes its workspace on Numba's threads and may then run on fewer (beside
    busy processes), whose blocks are larger (the samples are shared out two blocks or
    more a thread): they must fit (a ValueError mid-training before)."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs Numba with at least 2 threads")
    # blocks as long as the threads' shares allow (the rule takes the shortest of 96
    # columns or more where several pad alike, which these shapes' shares all reach)
    monkeypatch.setattr(winograd, "_MIN_BLOCK_COLUMNS", 1 << 30)
    winograd._blocks.cache_clear()  # (plans cached per shape under the rule unpatched)
    case = (32, 8, 16, 16, 8, (1, 1, 1, 1))  # 16 tiles a sample
    saved = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        mode("1")
        x, w, b, out, ws, rng = _make(case, dtype, seed=7)  # sized on 2 threads
        one, two = (
            winograd._geometry(x.shape, w.shape, out.shape, x.itemsize, t, 1) for t in (1, 2)
        )
        assert one.per_thread > 2 * two.per_thread  # one thread's blocks outgrow two's room
        numba.set_num_threads(1)
        dout = rng.standard_normal(out.shape).astype(dtype)
        direct = _run("0", mode, x, w, b, case[5], out, ws, dout, conv.ACT_RELU)
        wino = _run("1", mode, x, w, b, case[5], out, ws, dout, conv.ACT_RELU)
    finally:
        numba.set_num_threads(saved)
    for got, ref in zip(wino, direct, strict=True):
        assert _scaled_error(got, ref) < TOL[dtype]


def test_winograd_finite_differences(mode):
    mode("1")
    case = CASES["odd_pad1"]
    pad = case[5]
    x, w, b, out, ws, rng = _make(case, np.float64, seed=3)
    r = rng.standard_normal(out.shape)
    geo = ((1, 1), pad, (1, 1), 1)

    def loss():
        conv.conv2d_forward(x, w, b, *geo, out, ws)
        return float(np.sum(out * r))

    loss()
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    conv.conv2d_backward(x, w, r, *geo, ws, dx, dw, db)
    assert rel_error(dx, numerical_grad(loss, x)) < 1e-6
    assert rel_error(dw, numerical_grad(loss, w)) < 1e-6
    assert rel_error(db, numerical_grad(loss, b)) < 1e-6
    dw2 = np.empty_like(w)  # dx and db skipped: the same dw
    conv.conv2d_backward(x, w, r, *geo, ws, None, dw2, None)
    np.testing.assert_array_equal(dw2, dw)


def _hooked(m, mode, x, w, b, pad, out, ws, dout, prior, hooks):
    """A batch norm's fusion hooks around the conv, the dispatch forced to `m`: ResNet's
    two kinds of conv. "after_norm": reads norm + ReLU through in_affine, its dx feeds
    that norm (dx_sums), its output a norm without a ReLU; "after_add": reads a ReLU's
    output (relu_dx, dx added to the shortcut's: accumulate), its output feeds norm +
    ReLU. Returns what each writes."""
    mode(m)
    geo = ((1, 1), pad, (1, 1), 1)
    rng = np.random.default_rng(1)
    c, k = x.shape[1], w.shape[0]
    scale, shift = rng.standard_normal(c).astype(x.dtype), rng.standard_normal(c).astype(x.dtype)
    coeffs = rng.standard_normal((3, k)).astype(x.dtype)
    affine = rng.standard_normal((2, k)).astype(x.dtype)
    stats, sums = np.full((2, k), np.nan), np.full((2, c), np.nan)
    mean = rng.standard_normal(c)
    if hooks == "after_norm":
        fwd = {"in_affine": (scale, shift, 1), "stats": stats}
        bwd = {"in_affine": (scale, shift, 1), "dout_affine": (coeffs, affine, 0),
               "dx_sums": (mean, sums)}  # fmt: skip
    elif hooks == "after_add":
        fwd = {"stats": stats}
        bwd = {"accumulate": True, "dout_affine": (coeffs, affine, 1), "relu_dx": True}
    else:  # accumulate alone: the builds without the hooks
        fwd, bwd = {}, {"accumulate": True}
    conv.conv2d_forward(x, w, b, *geo, out, ws, **fwd)
    y = out.copy()
    dx, dw = prior.copy(), np.full_like(w, np.nan)
    db = None if b is None else np.full_like(b, np.nan)
    conv.conv2d_backward(x, w, dout, *geo, ws, dx, dw, db, y, **bwd)
    return y, dx, dw, db, stats, sums


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("hooks", ["after_norm", "after_add", "accumulate"])
@pytest.mark.parametrize("name", ["odd_pad1", "wide_channels", "whole_tiles_pad1"])
def test_winograd_fusion_hooks_match_direct(name, hooks, dtype, mode):
    """Winograd honours the batch norms' fusion hooks as the direct conv does (ResNet's
    training step runs its convs with them); statistics and sums in float64 alike."""
    case = CASES[name]
    pad = case[5]
    mode("1")
    x, w, b, out, ws, rng = _make(case, dtype, seed=9)
    x = np.maximum(x, 0) + dtype(1.0) if hooks == "after_add" else x + dtype(2.0)
    x[0, 0, 0, :2] = 0  # (a ReLU's zeros: relu_dx masks them)
    dout = rng.standard_normal(out.shape).astype(dtype)
    prior = rng.standard_normal(x.shape).astype(dtype)
    direct = _hooked("0", mode, x, w, b, pad, out, ws, dout, prior, hooks)
    runs = dict(winograd.RUNS)
    wino = _hooked("1", mode, x, w, b, pad, out, ws, dout, prior, hooks)
    assert winograd.RUNS == {name: count + 1 for name, count in runs.items()}  # (it ran)
    for got, ref in zip(wino[:4], direct[:4], strict=True):
        if ref is not None:
            assert _scaled_error(got, ref) < TOL[dtype]
    if hooks != "accumulate":
        stats, var = wino[4], direct[4][1]
        assert _scaled_error(stats[0], direct[4][0]) < TOL[dtype]
        assert np.max(np.abs(stats[1] - var) / var) < 10 * TOL[dtype]
    if hooks == "after_norm":
        assert _scaled_error(wino[5], direct[5]) < 10 * TOL[dtype]


def test_blocks_count_the_columns_each_thread_computes():
    """Small maps: the forward's blocks as long as a thread's share of the samples allows
    where shorter ones would pad their panels more (512 channels on 7x7 maps at b16, 4
    tiles a sample: 2 threads had run blocks of 4 samples, 16 columns of a 48-column
    panel at 512 bits); VGG-small's 16x16 convs keep their blocks of 6 samples."""
    nr = conv.panel(4)

    def geometry(n, c, side, threads, backward=0):
        shapes = ((n, c, side, side), (c, c, 3, 3), (n, c, side, side), 4)
        return winograd._geometry(*shapes, threads, backward)

    for threads in (1, 2):
        geo = geometry(16, 512, 7, threads)
        share = 16 // threads
        best = min(winograd._round_up(4 * s, nr) * -(-share // s) for s in range(1, share + 1))
        assert winograd._thread_columns(16, geo.spb, 4, nr, threads, 0) <= 1.05 * best
        for n, c, side in ((64, 64, 16), (64, 128, 16)):  # 16 tiles a sample
            assert geometry(n, c, side, threads).spb == 96 // 16


def test_dispatch_rule(mode):
    def picks(c, k, size, n=64, stride=(1, 1), pad=(1, 1, 1, 1), dil=(1, 1), kernel=3, groups=1):
        x, w = (n, c, size, size), (k, c // groups, kernel, kernel)
        out = (n, k, size, size)  # the rule reads the map size from the output
        return winograd.chooses(x, w, out, stride, pad, dil, groups)

    mode("auto")  # the same rule for the 256- and the 512-bit kernels, as measured
    assert picks(64, 64, 32) and picks(64, 128, 16) and picks(128, 128, 16)  # VGG-small
    assert picks(32, 32, 16, n=128) and picks(64, 64, 8, n=128)  # ResNet-20's later stages
    assert not picks(16, 16, 32, n=128)  # ResNet-20's first stage: too thin
    assert not picks(3, 64, 32)  # VGG-small's first conv: too few input channels
    assert picks(512, 512, 14, n=16) and picks(128, 128, 14, n=16)  # 16 tiles a sample
    assert picks(256, 512, 14, n=16) and not picks(16, 256, 14)  # (the thinner side counts)
    assert not picks(256, 256, 8, n=16) and not picks(512, 512, 7, n=16)  # too few tiles
    assert picks(256, 256, 8, n=64) and not picks(64, 64, 7, n=1024)  # (maps under 8: none)
    assert not picks(128, 128, 16, n=1)  # one sample: a panel's third
    assert not picks(128, 128, 16, stride=(2, 2))
    assert not picks(128, 128, 16, dil=(2, 2))
    assert not picks(128, 128, 16, kernel=1, pad=(0, 0, 0, 0))
    assert not picks(128, 128, 16, groups=2)
    mode("1")
    assert picks(16, 16, 32) and not picks(128, 128, 16, stride=(2, 2))
    mode("0")
    assert not picks(128, 128, 16)


def test_dispatch_runs_winograd_when_chosen(mode, monkeypatch):
    calls = []
    for name in ("forward", "backward"):
        real = getattr(winograd, name)
        monkeypatch.setattr(winograd, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    case = CASES["pad0_batch1"]
    mode("1")
    x, w, b, out, ws, rng = _make(case, np.float32)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    _run("0", mode, x, w, b, case[5], out, ws, dout, conv.ACT_NONE)
    assert calls == []
    _run("1", mode, x, w, b, case[5], out, ws, dout, conv.ACT_NONE)
    assert calls == ["forward", "backward"]


def test_ab_benchmark_runs_both_ways(winograd_ab, monkeypatch, capsys):
    """benchmarks/winograd_ab.py, the measure behind the rule: both ways, MODE restored."""
    calls = []
    real = winograd.forward
    monkeypatch.setattr(winograd, "forward", lambda *a: calls.append(a) or real(*a))
    mode = winograd.MODE
    rows = winograd_ab.main(["--only", "ResNet-20 64 ch", "--batch", "2", "--rounds", "1"])
    assert winograd.MODE == mode
    assert len(calls) == 4  # the warm-up round and the timed one, each an untimed call first
    (row,) = rows
    assert row["picks"] is False  # the rule: 8 tiles (8x8 maps at b2) run direct
    assert all(t > 0 for t in row["direct"] + row["winograd"])
    assert "ResNet-20 64 ch 8x8" in capsys.readouterr().out


# The transforms' passes are intrinsics built from the same _bt/_at/_a/_b as numpy can
# evaluate on whole arrays (no fused multiply-adds either way): their results must be
# those numpy gives, bit for bit. Tile counts: under one vector, one and a half, and
# 37 (whole vectors, a masked rest, rows ending inside a vector).
_TILES = (5, 24, 37)


def _columns_caller(intrinsic):
    """A jitted caller of a column pass (intrinsics run only inside jitted code)."""

    def call(src, at, step, dst, dst_at, dst_step, n):
        intrinsic(src, at, step, dst, dst_at, dst_step, n)

    return njit(call)


_bt_planes, _at_planes, _a_planes, _b_planes = (
    _columns_caller(getattr(winograd, name))
    for name in ("_bt_planes", "_at_planes", "_a_planes", "_b_planes")
)


@njit
def _input_row(sb, src, tails, last, nt, ws, at, ps):
    winograd._input_row(sb, src, tails, last, nt, ws, at, ps)


@njit
def _output_row(sa, t, ts, nt, b, act, sb, d):
    winograd._output_row(sa, t, ts, nt, b, act, sb, d)


@njit
def _dout_row(sa, src, nt, sb, o, ts):
    return winograd._dout_row(sa, src, nt, sb, o, ts)


@njit
def _adjoint_row(sa, t, ts, nt, first, sb, row, st, tails):
    winograd._adjoint_row(sa, t, ts, nt, first, sb, row, st, tails)


def _consts(dtype, values):
    return [dtype(v) for v in values]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(
    "caller, transform, n_in, values",
    [
        (_bt_planes, winograd._bt, 6, (2, 4, 5)),
        (_at_planes, winograd._at, 6, (2, 4, 8)),
        (_a_planes, winograd._a, 4, (2, 4, 8)),
        (_b_planes, winograd._b, 6, (2, 4, 5)),
    ],
)
def test_column_passes_match_numpy(caller, transform, n_in, values, dtype):
    rng = np.random.default_rng(1)
    step, dstep = 53, 61  # planes apart by odd strides; offsets off the vector boundary
    for n in _TILES:
        src = rng.standard_normal(3 + n_in * step).astype(dtype)
        dst = np.full(5 + 6 * dstep, np.nan, dtype)
        caller(src, 3, step, dst, 5, dstep, n)
        ins = [src[3 + i * step : 3 + i * step + n] for i in range(n_in)]
        want = transform.py_func(*ins, *_consts(dtype, values))
        for j, w in enumerate(want):
            got = dst[5 + j * dstep : 5 + j * dstep + n]
            np.testing.assert_array_equal(got, w)
            assert np.isnan(dst[5 + j * dstep + n])  # nothing written past n


def _marks(nt, tx, last):
    """1.0 at each tile row's last (or first) tile of nt tiles, tx a row."""
    z = np.arange(nt)
    return ((z % tx == tx - 1) if last else (z % tx == 0)).astype(float)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_row_passes_match_numpy(dtype):
    rng = np.random.default_rng(2)
    two, four, five, eight = _consts(dtype, (2, 4, 5, 8))
    for nt in _TILES:
        tx = 3  # tiles a row: row ends inside and at the edge of vectors
        ends, starts = _marks(nt, tx, True), _marks(nt, tx, False)
        # input rows: columns 4 z .. 4 z + 5, at a row's end 4 and 5 from its tail
        sb = rng.standard_normal(4 * nt + 4 + 2 * nt + nt + 16).astype(dtype)
        tails, last = 4 * nt + 4, 6 * nt + 4
        sb[last : last + nt] = ends
        ws = np.full(6 * 50 + nt, np.nan, dtype)
        _input_row(sb, 0, tails, last, nt, ws, 0, 50)
        cols = [sb[k : 4 * nt : 4] for k in range(4)]
        nxt = [sb[4 + k : 4 * nt + 4 : 4] for k in range(2)]
        tail = [sb[tails + k : tails + 2 * nt : 2] for k in range(2)]
        e = [np.where(ends != 0, tail[k], nxt[k]) for k in range(2)]
        for j, w in enumerate(winograd._bt.py_func(*cols, *e, two, four, five)):
            np.testing.assert_array_equal(ws[j * 50 : j * 50 + nt], w)
        # output rows: 4 values a tile, bias and ReLU (max(y, 0))
        sa = rng.standard_normal(6 * 40 + nt).astype(dtype)
        out = np.full(4 * nt + 1, np.nan, dtype)
        b = dtype(0.25)
        _output_row(sa, 0, 40, nt, b, 1, out, 0)
        rows = [sa[j * 40 : j * 40 + nt] for j in range(6)]
        for i, y in enumerate(winograd._at.py_func(*rows, two, four, eight)):
            y = y + b
            np.testing.assert_array_equal(out[i : 4 * nt : 4], np.where(0 > y, 0, y))
        assert np.isnan(out[4 * nt])
        # output gradient rows: 4 values a tile in, 6 planes out, and their sum
        g = rng.standard_normal(4 * nt).astype(dtype)
        planes = np.full(6 * 45 + nt, np.nan, dtype)
        total = _dout_row(g, 0, nt, planes, 0, 45)
        d = [g[k::4] for k in range(4)]
        for j, w in enumerate(winograd._a.py_func(*d, two, four, eight)):
            np.testing.assert_array_equal(planes[j * 45 : j * 45 + nt], w)
        assert total == pytest.approx(float(g.astype(np.float64).sum()), rel=1e-5, abs=1e-4)
        # input gradient rows: B v, the left tile's columns 4 and 5 added to 0 and 1
        # unless the tile starts a row; columns 4 and 5 to the tails
        sa = rng.standard_normal(6 * 40 + nt + 40).astype(dtype)
        first = 6 * 40 + 8
        sa[first : first + nt] = starts
        row, st = np.full(4 * nt, np.nan, dtype), np.full(2 * nt, np.nan, dtype)
        _adjoint_row(sa, 0, 40, nt, first, row, 0, st, 0)
        v = [sa[j * 40 : j * 40 + nt] for j in range(6)]
        d = winograd._b.py_func(*v, two, four, five)
        zero = dtype(0)
        for k in range(2):
            left = np.concatenate([[zero], d[4 + k][:-1]]).astype(dtype)
            want = d[k] + np.where(starts != 0, zero, left)
            np.testing.assert_array_equal(row[k::4], want)
            np.testing.assert_array_equal(st[k::2], d[4 + k])
        for k in (2, 3):
            np.testing.assert_array_equal(row[k::4], d[k])
