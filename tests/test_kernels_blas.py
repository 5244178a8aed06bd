"""Large matrix products split over Numba's threads, each block a call of numpy's BLAS;
the dense layers' passes around their products."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from cnnspec.kernels.cpu import blas, dense

DTYPES = [np.float32, np.float64]


def _gemm(dtype):
    gemm = blas._cblas_gemm(np.dtype(dtype))
    if gemm is None:
        pytest.skip("numpy's BLAS has no C interface cnnspec finds (not OpenBLAS or MKL)")
    return gemm


def _operand(rng, shape, dtype, transposed):
    """A (rows, cols) matrix stored row-major, or as the transpose of a row-major one."""
    if transposed:
        return rng.standard_normal(shape[::-1]).astype(dtype).T
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("parts", [2, 3, 5])
@pytest.mark.parametrize("m, n", [(41, 19), (19, 41)], ids=["by-rows", "by-columns"])
@pytest.mark.parametrize("ta, tb", [(0, 0), (0, 1), (1, 0), (1, 1)])
def test_split_products_match_numpy(dtype, parts, m, n, ta, tb):
    """Every block's operands and output are where the layouts put them: uneven blocks,
    either operand stored transposed, split by rows or by columns."""
    rng = np.random.default_rng(parts)
    a = _operand(rng, (m, 23), dtype, ta)
    b = _operand(rng, (23, n), dtype, tb)
    out = np.full((m, n), np.nan, dtype)
    assert blas._split(_gemm(dtype), a, b, out, parts)
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_strided_operands_fall_back_to_numpy():
    """An operand with neither rows nor columns contiguous is not given to BLAS."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 2000))[:, ::2]
    b = rng.standard_normal((1000, 300))
    out = np.empty((64, 300))
    assert not blas._split(_gemm(np.float64), a, b, out, 2)
    blas.matmul(a, b, out)
    np.testing.assert_allclose(out, a @ b, rtol=1e-12)


@pytest.mark.parametrize("shape", [(8, 300, 20000), (20000, 300, 8)], ids=["wide", "tall"])
def test_large_products_are_split_and_match_numpy(shape, monkeypatch):
    if numba.get_num_threads() < 2:
        pytest.skip("one Numba thread: products are never split")
    splits = []
    split = blas._split
    monkeypatch.setattr(blas, "_split", lambda *args: splits.append(args[-1]) or split(*args))
    m, k, n = shape
    rng = np.random.default_rng(9)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    blas.matmul(a, b, out)
    assert splits == [min(numba.get_num_threads(), 2 * m * k * n // int(blas._BLOCK_FLOPS))]
    np.testing.assert_allclose(out, a @ b, rtol=1e-4, atol=1e-3)


def test_small_products_run_unsplit(monkeypatch):
    monkeypatch.setattr(blas, "_split", lambda *args: pytest.fail("split"))
    a, b = np.ones((64, 400), np.float32), np.ones((400, 120), np.float32)
    out = np.empty((64, 120), np.float32)
    blas.matmul(a, b, out)
    assert (out == 400).all()


def test_a_blas_function_giving_other_products_is_refused():
    """The check on first use: sgemm handed float64 arrays computes something else."""
    assert not blas._agrees(_gemm(np.float32), np.dtype(np.float64))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", [0, 1])
@pytest.mark.parametrize("n, o", [(64, 120), (1, 7), (3, 1100), (300, 700), (0, 5)])
def test_dense_passes_match_their_numpy_stand_ins_bit_for_bit(dtype, act, n, o):
    """The bias + ReLU after the forward product, the ReLU mask + bias gradient before
    the backward ones: kernel and stand-in (a first run's numpy) alike, NaN included,
    and the old numpy code's bits (np.maximum; the column sums numpy's, row by row).
    300 x 700: the parallel builds on more threads."""
    rng = np.random.default_rng(n + o)
    out = rng.standard_normal((n, o)).astype(dtype)
    dout = rng.standard_normal((n, o)).astype(dtype)
    if n > 1:
        out[1, 1] = dout[0, 0] = np.nan
        out[0, 2 % o] = 0.0
    b = rng.standard_normal(o).astype(dtype)
    for bias in (b, np.zeros(0, dtype)):
        kernel, numpy_ = out.copy(), out.copy()
        dense._bias_act(kernel, bias, act)
        dense._bias_act_numpy(numpy_, bias, act)
        old = out + bias if bias.size else out.copy()
        if act:
            np.maximum(old, 0, out=old)
        np.testing.assert_array_equal(kernel, numpy_)
        np.testing.assert_array_equal(kernel, old)
    for want_db in (True, False):
        g, g_numpy = dout.copy(), dout.copy()
        db, db_numpy = np.full(o, 7, dtype), np.full(o, 7, dtype)
        sums = (db, db_numpy) if want_db else (np.zeros(0, dtype),) * 2
        dense._mask_sum(g, out, act, sums[0])
        dense._mask_sum_numpy(g_numpy, out, act, sums[1])
        np.testing.assert_array_equal(g, g_numpy)
        np.testing.assert_array_equal(db.view(np.uint8), db_numpy.view(np.uint8))
        masked = ~(out > 0) if act else np.zeros(out.shape, bool)
        assert (g[masked] == 0).all() and np.array_equal(g[~masked], dout[~masked], equal_nan=True)
        if want_db:
            np.testing.assert_array_equal(db, g.sum(axis=0))
