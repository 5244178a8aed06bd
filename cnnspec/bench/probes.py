"""Machine and load probes shared by `cnnspec bench` and benchmarks/vs_torch.py: BLAS and
Numba thread counts, the CPU model, versions (the CPU other processes use: machine_load)."""

from __future__ import annotations

import os
import platform
from contextlib import contextmanager

import numpy as np


# ---- BLAS threads (threadpoolctl, as the model limits them) ----------------------------------
def _blas():
    from ..compile import blas_libraries

    return blas_libraries()


def blas_threads() -> int | None:
    """Threads numpy's BLAS uses, or None when that cannot be told."""
    libs = _blas()
    return int(libs[0].num_threads) if libs else None


def set_blas_threads(n: int) -> bool:
    """Set numpy's BLAS thread count; False when it cannot be set from here."""
    libs = _blas()
    for lib in libs:
        lib.set_num_threads(int(n))
    return bool(libs)


@contextmanager
def threads_set(threads: int | None):
    """Numba and BLAS threads set to ``threads`` (None: leave them), restored afterwards."""
    import numba

    before = (numba.get_num_threads(), blas_threads())
    if threads is not None:
        numba.set_num_threads(threads)
        set_blas_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            numba.set_num_threads(before[0])
            if before[1] is not None:
                set_blas_threads(before[1])


# ---- machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_before": load,
        "platform": platform.platform(),
    }


def versions() -> dict:
    import numba

    out = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from .. import __version__

        out["cnnspec"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return out
