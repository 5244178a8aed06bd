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

from .background import BACKGROUND, load_cached

# at least this many floating-point operations a block. The speed-up of two blocks over
# one call just after a parallel loop (AMD EPYC Zen 3, 2 threads, float32): 0.71 at
# 6 MFLOP, 1.15 at 17, 1.6 at 34, 1.89 at 268 (VGG-small's fc3, b64)
_BLOCK_FLOPS = 8e6
_MIN_BLOCK = 16  # rows or columns of a block

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
_REALS = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}


@numba.njit(parallel=True, cache=True, no_cfunc_wrapper=True)
def _gemm_blocks(gemm, blocks):
    # blocks[p] = (transpose a, transpose b, rows, columns, inner, lda, ldb, ldc, address
    # of a, of b, of out): out = a @ b for each block, one a thread
    for p in numba.prange(blocks.shape[0]):
        ta, tb, m, n, k, lda, ldb, ldc, a, b, c = blocks[p]
        gemm(_ROW_MAJOR, ta, tb, m, n, k, 1.0, a, lda, b, ldb, 0.0, c, ldc)


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


def _whole(a, b, out):
    """The _gemm_blocks row of out = a @ b in one call; None where an operand's layout
    does not suit BLAS (neither rows nor columns contiguous, or out transposed)."""
    la, lb, lc = _layout(a), _layout(b), _layout(out)
    if la is None or lb is None or lc is None or lc[0] != _NO_TRANS:
        return None
    addresses = (x.__array_interface__["data"][0] for x in (a, b, out))
    return (la[0], lb[0], *out.shape, a.shape[1], la[1], lb[1], lc[1], *addresses)


def _split(gemm, a, b, out, parts: int) -> bool:
    """out = a @ b in `parts` blocks of out's columns (or rows, where it has more) on
    Numba's threads: False where an operand's layout does not suit BLAS (or while the
    blocks' build waits: _run_blocks)."""
    whole = _whole(a, b, out)
    if whole is None:
        return False
    ta, tb, m, n, _k, lda, ldb, ldc, pa, pb, pc = whole
    size = out.itemsize
    by_columns = n >= m
    edges = np.linspace(0, n if by_columns else m, parts + 1).astype(np.int64)
    blocks = np.empty((parts, 11), np.int64)
    blocks[:] = whole
    for p, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
        if by_columns:  # b's columns lo:hi: its rows of b^T where b is stored transposed
            step_b = size * (ldb if tb == _TRANS else 1)
            blocks[p, 3] = hi - lo
            blocks[p, 9:] = pb + lo * step_b, pc + lo * size
        else:  # a's rows lo:hi
            step_a = size * (1 if ta == _TRANS else lda)
            blocks[p, 2] = hi - lo
            blocks[p, 8], blocks[p, 10] = pa + lo * step_a, pc + lo * ldc * size
    return _run_blocks(gemm, blocks)


def _run_blocks(gemm, blocks) -> bool:
    """_gemm_blocks(gemm, blocks), or False (nothing run) while a first run's builds are
    deferred (background.py) and its parallel build is neither loaded nor cached:
    compiled here, it held up a cold 2-thread LeNet-5 step (a sixth kernel compiled),
    and a product unsplit stands in as well."""
    if BACKGROUND.active:
        sig = tuple(_gemm_blocks.typeof_pyval(v) for v in (gemm, blocks))
        if not load_cached(_gemm_blocks, sig):
            return False
    _gemm_blocks(gemm, blocks)
    return True


# Independent products too small to split each (a dense layer's dW and dx) run one a
# thread from this size. LeNet-5's backward at b64, 2 threads, AMD EPYC Zen 3, dW and dx
# one after another / one a thread, just after a parallel loop: c5 (64 x 400 -> 120,
# 6 MFLOP each) 166 / 82 us, f6 (120 -> 84, 1.3 MFLOP) 44 / 28, logits (84 -> 10) 13 /
# 11. In the model, where Numba's workers may have gone to sleep since the last parallel
# loop: c5's backward 0.187-0.189 -> 0.154-0.169 ms, but f6's 0.066 -> 0.095-0.106.
_EACH_FLOPS = 4e6


def matmul_each(products) -> None:
    """out = a @ b for each (a, b, out) of `products`: one a Numba thread where there are
    threads for them all and each is too small to split, else :func:`matmul` each."""
    flops = [2.0 * out.size * a.shape[1] for a, _, out in products]
    threads = numba.get_num_threads()
    if threads >= len(products) > 1 and _EACH_FLOPS <= min(flops) <= max(flops) < 2 * _BLOCK_FLOPS:
        dtype = products[0][2].dtype
        rows = [_whole(*p) if all(x.dtype == dtype for x in p) else None for p in products]
        gemm = _cblas_gemm(dtype)
        if gemm is not None and None not in rows and _run_blocks(gemm, np.array(rows, np.int64)):
            return
    for a, b, out in products:
        matmul(a, b, out)


def matmul(a, b, out):
    """out = a @ b, 2-D: split over Numba's threads where the product is large."""
    m, n = out.shape
    k = a.shape[1]
    flops = 2.0 * m * k * n
    dtype = out.dtype
    if flops >= 2 * _BLOCK_FLOPS and a.dtype == b.dtype == dtype and k > 0:
        parts = min(numba.get_num_threads(), int(flops // _BLOCK_FLOPS), max(m, n) // _MIN_BLOCK)
        gemm = _cblas_gemm(dtype) if parts >= 2 else None
        if gemm is not None and _split(gemm, a, b, out, parts):
            return
    # np.dot where it takes `out` (C-contiguous, the result's dtype): the same BLAS call,
    # but matmul takes a loop of its own for an inner dimension of 1 (a dense layer's dW
    # at batch 1: LeNet-5's c5 76 us against 12, numpy 2.4); same bits
    if out.flags.c_contiguous and dtype == np.result_type(a, b):
        np.dot(a, b, out=out)
    else:
        np.matmul(a, b, out=out)
