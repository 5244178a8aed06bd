"""The GEMM the conv kernels call from Numba: numpy's BLAS, or scipy's through an adapter."""

import ctypes

import numpy as np
import pytest

from cnnspec.kernels.cpu import blas

CASES = [(False, False), (False, True), (True, False), (True, True)]


def _operands(rng, ta, tb, dtype, m=5, n=9, k=7):
    a = rng.standard_normal((k, m) if ta else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if tb else (k, n)).astype(dtype)
    c = rng.standard_normal((m, n)).astype(dtype)
    expect = (a.T if ta else a) @ (b.T if tb else b)
    return a, b, c, expect


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("ta", "tb"), CASES)
def test_gemm_matches_numpy(ta, tb, dtype):
    rng = np.random.default_rng(0)
    a, b, c, expect = _operands(rng, ta, tb, dtype)
    c0 = c.copy()
    blas.gemm(ta, tb, 2.0, a, b, 1.0, c)  # accumulate
    np.testing.assert_allclose(c, c0 + 2 * expect, rtol=1e-5, atol=1e-5)
    blas.gemm(ta, tb, 1.0, a, b, 0.0, c)  # overwrite
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-5)


def test_gemm_writes_into_row_views_of_a_buffer():
    rng = np.random.default_rng(1)
    buf = np.zeros(200, np.float32)
    a, b, _, expect = _operands(rng, False, False, np.float32)
    c = buf[40 : 40 + 45].reshape(5, 9)
    blas.gemm(False, False, 1.0, a, b, 0.0, c)
    np.testing.assert_allclose(c, expect, rtol=1e-5, atol=1e-5)
    assert not buf[:40].any() and not buf[85:].any()


@pytest.mark.parametrize(
    ("dtype", "ctype"), [(np.float32, ctypes.c_float), (np.float64, ctypes.c_double)]
)
@pytest.mark.parametrize(("ta", "tb"), CASES)
def test_scipy_fallback_adapter_matches_numpy(ta, tb, dtype, ctype):
    """The adapter used when numpy's BLAS exports no 64-bit CBLAS GEMM."""
    pytest.importorskip("scipy")
    address = blas._scipy_fallback_gemms()["s" if dtype == np.float32 else "d"]
    i32, i64, ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
    args = (i32, i32, i32, i64, i64, i64, ctype, ptr, i64, ptr, i64, ctype, ptr, i64)
    fn = ctypes.CFUNCTYPE(None, *args)(address)
    rng = np.random.default_rng(2)
    a, b, c, expect = _operands(rng, ta, tb, dtype)
    c0 = c.copy()
    flag = {False: blas.NO_TRANS, True: blas.TRANS}
    m, n = c.shape
    k = a.shape[0] if ta else a.shape[1]
    fn(blas.ROW_MAJOR, flag[ta], flag[tb], m, n, k, 2.0, a.ctypes.data, a.shape[1],
       b.ctypes.data, b.shape[1], 1.0, c.ctypes.data, n)  # fmt: skip
    np.testing.assert_allclose(c, c0 + 2 * expect, rtol=1e-5, atol=1e-5)
