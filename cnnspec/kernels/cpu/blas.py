"""Large matrix products (dense layers) split over Numba's own threads.

The model holds BLAS to one thread (BLAS's threads and Numba's would spin against each
other on the same cores), so cnnspec splits a large product itself, in one block of
rows or columns a thread, each block a call of numpy's own BLAS through its C
interface. On Numba's threads, not a Python thread pool: after each parallel loop
Numba's OpenMP workers spin (~300,000 rounds, libgomp's default, kept on purpose:
threads.py), and a pool thread that had to share a core with a spinning worker ran
VGG-small's fc3 (b64, 8192 -> 256) no faster at 2 threads than at 1 (AMD EPYC Zen 3,
2 cores: 4.41 / 8.27 ms forward / backward against 4.52 / 9.19).

Where numpy's BLAS is not found, or does not give the product numpy gives in a check
on first use, products run unsplit.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numba
import numpy as np

from .threads import count as thread_count

# at least this many floating-point operations a block. The speed-up of two blocks over
# one call just after a parallel loop (AMD EPYC Zen 3, 2 threads, float32): 0.71 at
# 6 MFLOP, 1.15 at 17, 1.6 at 34, 1.89 at 268 (VGG-small's fc3, b64)
_BLOCK_FLOPS = 8e6
_MIN_BLOCK = 16  # rows or columns of a block

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_REALS = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}


@numba.njit(parallel=True, cache=True, no_cfunc_wrapper=True)
def _gemm_blocks(gemm, trans_a, trans_b, k, lda, ldb, ldc, blocks):
    # blocks[p] = (rows, columns, address of a, of b, of out): out = a @ b for each block
    for p in numba.prange(blocks.shape[0]):
        m, n, a, b, c = blocks[p, 0], blocks[p, 1], blocks[p, 2], blocks[p, 3], blocks[p, 4]
        gemm(_ROW_MAJOR, trans_a, trans_b, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc)


# numpy >= 2's scipy-openblas, numpy 1.x's openblas64_, then any plain CBLAS (MKL, ...)
_NAMES = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_", "cblas_{}gemm")


@cache
def _cblas_gemm(dtype: np.dtype):
    """numpy's BLAS `cblas_?gemm` for `dtype` as a ctypes function; None where not found
    or not agreeing with numpy. Integers are passed 64-bit: an LP64 BLAS reads the low
    half of each (x86-64 and AArch64 give every argument an 8-byte register or slot)."""
    letter, real = _REALS.get(dtype, (None, None))
    if letter is None:
        return None
    try:
        from threadpoolctl import threadpool_info

        paths = [i["filepath"] for i in threadpool_info() if i["user_api"] == "blas"]
    except Exception:  # no answer from threadpoolctl: products run unsplit
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    # a prototype class a signature: Numba types a ctypes function by its class, and
    # with CDLL's one class for all its functions dgemm ran sgemm's build
    proto = ctypes.CFUNCTYPE(None, *[i64] * 6, real, ptr, i64, ptr, i64, real, ptr, i64)
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in _NAMES:
            name = name.format(letter)
            if hasattr(lib, name) and _agrees(gemm := proto((name, lib)), dtype):
                return gemm
    return None


def _agrees(gemm, dtype) -> bool:
    """Whether split products through `gemm` give numpy's (transposed operands too)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 29)).astype(dtype)
    b = rng.standard_normal((23, 29)).astype(dtype)
    # split by rows (a's rows stored as rows, b's columns as rows), then by columns
    for x, y in ((a, b.T), (a.T.copy().T[:20], b.T.copy())):
        out = np.zeros((len(x), 23), dtype)
        _split(gemm, x, y, out, 2)
        if not np.allclose(out, x @ y, rtol=1e-4, atol=1e-4):
            return False
    return True


def _layout(m: np.ndarray):
    """(transpose flag, leading dimension) of a 2-D operand for row-major BLAS, or None
    where neither its rows nor its columns are contiguous."""
    rows, cols = (s // m.itemsize for s in m.strides)
    if cols == 1 and rows >= max(1, m.shape[1]):
        return _NO_TRANS, rows
    if rows == 1 and cols >= max(1, m.shape[0]):
        return _TRANS, cols
    return None


def _split(gemm, a, b, out, parts: int) -> bool:
    """out = a @ b in `parts` blocks of out's columns (or rows, where it has more) on
    Numba's threads: False where an operand's layout does not suit BLAS."""
    la, lb, lc = _layout(a), _layout(b), _layout(out)
    if la is None or lb is None or lc is None or lc[0] != _NO_TRANS:
        return False
    (ta, lda), (tb, ldb), ldc = la, lb, lc[1]
    m, n = out.shape
    size = out.itemsize
    by_columns = n >= m
    edges = np.linspace(0, n if by_columns else m, parts + 1).astype(np.int64)
    blocks = np.empty((parts, 5), np.int64)
    pa, pb, pc = (x.__array_interface__["data"][0] for x in (a, b, out))
    for p, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if by_columns:  # b's columns lo:hi: its rows of b^T where b is stored transposed
            step_b = size * (ldb if tb == _TRANS else 1)
            blocks[p] = m, hi - lo, pa, pb + lo * step_b, pc + lo * size
        else:  # a's rows lo:hi
            step_a = size * (1 if ta == _TRANS else lda)
            blocks[p] = hi - lo, n, pa + lo * step_a, pb, pc + lo * ldc * size
    _gemm_blocks(gemm, ta, tb, a.shape[1], lda, ldb, ldc, blocks)
    return True


def matmul(a, b, out):
    """out = a @ b, 2-D: split over Numba's threads where the product is large."""
    m, n = out.shape
    k = a.shape[1]
    dtype = out.dtype
    flops = 2.0 * m * k * n
    if flops >= 2 * _BLOCK_FLOPS and max(m, n) >= 2 * _MIN_BLOCK:  # (else one block)
        parts = min(int(flops // _BLOCK_FLOPS), max(m, n) // _MIN_BLOCK, thread_count())
        if parts >= 2 and a.dtype == b.dtype == dtype and k > 0:
            gemm = _cblas_gemm(dtype)
            if gemm is not None and _split(gemm, a, b, out, parts):
                return
    # np.dot where it takes `out` (C-contiguous, the result's dtype): the same BLAS call,
    # but matmul takes a loop of its own for an inner dimension of 1 (a dense layer's dW
    # at batch 1: LeNet-5's c5 76 us against 12, numpy 2.4); same bits
    if (a.dtype == b.dtype == dtype or dtype == np.result_type(a, b)) and out.flags.c_contiguous:
        np.dot(a, b, out=out)
    else:
        np.matmul(a, b, out=out)
