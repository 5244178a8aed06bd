"""BLAS GEMM callable from Numba code, on each of Numba's threads.

Numba's own ``np.dot`` goes through scipy's BLAS, an older OpenBLAS build that
runs the conv kernels' small GEMMs up to 1.6x slower than numpy's (measured on
this project's 2-core AVX-512 machine: 16x144 @ 144x1088 float32, 60 vs 96
GFLOP/s on one thread). So the kernels call numpy's own OpenBLAS through its
64-bit-integer CBLAS entry, found in the library numpy loaded, and fall back to
scipy's when numpy's BLAS does not export one (an MKL or Accelerate build).

The entry is bound by symbol name (``llvmlite`` ``add_symbol``), not by address,
so functions that call it stay in Numba's on-disk cache.
"""

from __future__ import annotations

import ctypes

import numpy as np
from llvmlite import binding as llvm
from numba import cfunc, njit, types

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112

_ARGS = (types.int32, types.int32, types.int32, types.int64, types.int64, types.int64)


def _signature(real):
    # order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
    ptr = types.voidptr
    return types.void(*_ARGS, real, ptr, types.int64, ptr, types.int64, real, ptr, types.int64)


_SGEMM_SIG, _DGEMM_SIG = _signature(types.float32), _signature(types.float64)
_sgemm = types.ExternalFunction("cnnspec_cblas_sgemm64", _SGEMM_SIG)
_dgemm = types.ExternalFunction("cnnspec_cblas_dgemm64", _DGEMM_SIG)

# numpy >= 2 wheels (scipy-openblas64) name them scipy_cblas_*64_, numpy 1.x's cblas_*64_
_NUMPY_NAMES = ("scipy_cblas_{}gemm64_", "cblas_{}gemm64_")


def _numpy_blas_path() -> str | None:
    from threadpoolctl import threadpool_info

    for lib in threadpool_info():
        if lib.get("user_api") == "blas" and "numpy" in lib.get("filepath", ""):
            return lib["filepath"]
    return None


def _numpy_gemms() -> dict[str, int] | None:
    path = _numpy_blas_path()
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    for pattern in _NUMPY_NAMES:
        try:
            found = {p: getattr(lib, pattern.format(p)) for p in "sd"}
        except AttributeError:
            continue
        return {p: ctypes.cast(f, ctypes.c_void_p).value for p, f in found.items()}
    return None


def _scipy_fallback_gemms() -> dict[str, int]:
    """CBLAS-shaped adapters over scipy's Fortran GEMMs (operands contiguous:
    lda, ldb, ldc are their row lengths, as every caller here passes them)."""
    from scipy.linalg.cython_blas import __pyx_capi__ as capi

    pyapi = ctypes.pythonapi
    pyapi.PyCapsule_GetName.restype = ctypes.c_char_p
    pyapi.PyCapsule_GetName.argtypes = [ctypes.py_object]
    pyapi.PyCapsule_GetPointer.restype = ctypes.c_void_p
    pyapi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    addresses = {}
    for p, real, sig in (("s", types.float32, _SGEMM_SIG), ("d", types.float64, _DGEMM_SIG)):
        capsule = capi[p + "gemm"]
        fortran = pyapi.PyCapsule_GetPointer(capsule, pyapi.PyCapsule_GetName(capsule))
        llvm.add_symbol(f"cnnspec_fortran_{p}gemm", fortran)
        addresses[p] = _fortran_adapter(p, real, sig).address
    return addresses


def _fortran_adapter(p, real, sig):
    ptr = types.voidptr
    fortran = types.ExternalFunction(
        f"cnnspec_fortran_{p}gemm",
        types.void(ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr),
    )
    dtype = np.float32 if p == "s" else np.float64

    def adapter(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T
        ints = np.array([n, m, k, ldb, lda, ldc], np.int32)
        reals = np.array([alpha, beta], dtype)
        flags = np.array([78 if tb == NO_TRANS else 84, 78 if ta == NO_TRANS else 84], np.uint8)
        fortran(
            flags[0:].ctypes, flags[1:].ctypes, ints[0:].ctypes, ints[1:].ctypes,
            ints[2:].ctypes, reals[0:].ctypes, b, ints[3:].ctypes, a, ints[4:].ctypes,
            reals[1:].ctypes, c, ints[5:].ctypes,
        )  # fmt: skip

    return cfunc(sig, nopython=True)(adapter)


def _register() -> str:
    gemms = _numpy_gemms()
    source = "numpy"
    if gemms is None:
        gemms, source = _scipy_fallback_gemms(), "scipy"
    llvm.add_symbol("cnnspec_cblas_sgemm64", gemms["s"])
    llvm.add_symbol("cnnspec_cblas_dgemm64", gemms["d"])
    return source


SOURCE = _register()  # which library's GEMM the kernels call


@njit(cache=True, nogil=True)
def gemm(trans_a, trans_b, alpha, a, b, beta, c):
    """c = alpha * op(a) @ op(b) + beta * c for C-contiguous 2-D arrays (views of a
    bigger buffer are fine), op = transpose when trans_* is True."""
    m, n = c.shape
    k = a.shape[0] if trans_a else a.shape[1]
    ta = TRANS if trans_a else NO_TRANS
    tb = TRANS if trans_b else NO_TRANS
    lda, ldb, ldc = a.shape[1], b.shape[1], c.shape[1]
    if c.itemsize == 4:  # float32; the kernels run float32 or float64
        _sgemm(ROW_MAJOR, ta, tb, m, n, k, np.float32(alpha), a.ctypes, lda, b.ctypes, ldb,
               np.float32(beta), c.ctypes, ldc)  # fmt: skip
    else:
        _dgemm(ROW_MAJOR, ta, tb, m, n, k, np.float64(alpha), a.ctypes, lda, b.ctypes, ldb,
               np.float64(beta), c.ctypes, ldc)  # fmt: skip
