"""The CUDA backend: numba-cuda device arrays, allocated once per compiled model, and the
kernels of this folder. Host transfers happen only here, in staging.py (a batch handed
over early, on a second stream) and, for labels and the loss, in the loss kernels: a
training step copies in one batch and copies out the loss and the scores its metrics
need.

Nothing imports numba-cuda until a model is compiled for this device, and `unusable()`
says in one line what is missing when it cannot run.
"""

from __future__ import annotations

import os

import numpy as np

from ...backend import Backend

INSTALL = "pip install 'cnnspec[cuda]' (NVIDIA's numba-cuda[cu13])"


class CudaBackend(Backend):
    name = "cuda"

    def unusable(self) -> str | None:
        """Why this backend cannot run here (one line), or None when it can."""
        try:
            from numba import cuda
        except ImportError:
            return f"the CUDA backend needs numba-cuda, which is not installed: {INSTALL}"
        if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
            return None  # Numba's simulator: every kernel runs on the CPU, slowly
        if not _is_numba_cuda(cuda):
            return f"numba's built-in CUDA target is deprecated; the backend needs {INSTALL}"
        try:
            if cuda.is_available() and len(cuda.gpus) > 0:
                return None
        except Exception as e:  # a broken driver raises from deep inside
            return f"no usable CUDA GPU: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        return (
            "no usable CUDA GPU: no NVIDIA driver or device was found "
            "(check nvidia-smi); use --device cpu"
        )

    def zeros(self, shape, dtype):
        from numba import cuda

        from .memory import fill

        a = cuda.device_array(shape, np.dtype(dtype))
        fill(a, 0)
        return a

    def to_host(self, array) -> np.ndarray:
        if isinstance(array, np.ndarray):
            return array.copy()
        return array.copy_to_host()

    def to_device(self, host, out) -> None:
        host = np.asarray(host)
        if not np.can_cast(host.dtype, out.dtype, casting="same_kind"):
            raise TypeError(f"cannot copy {host.dtype} into a {out.dtype} device array")
        if tuple(host.shape) != tuple(out.shape):
            host = np.broadcast_to(host, out.shape)
        out.copy_to_device(np.ascontiguousarray(host, dtype=out.dtype))

    def synchronize(self) -> None:
        from numba import cuda

        cuda.synchronize()

    def stager(self, shape, dtype):
        from .staging import CudaStager

        return CudaStager(self, shape, dtype)

    def optimizer(self, model, **settings):
        from .optim import DeviceSGD

        return DeviceSGD(model, **settings)


def _is_numba_cuda(cuda) -> bool:
    """Whether `numba.cuda` is NVIDIA's numba-cuda package (not the deprecated built-in)."""
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return False
    return True


BACKEND = CudaBackend()
