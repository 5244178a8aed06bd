"""Backends: where a compiled model's arrays live and which kernels run its layers.

`net.compile(device=...)` binds one backend to the model. It allocates every buffer,
hands each layer the kernel module of its family (`kernels/<device>/<family>.py`,
kernels named after their layer type: `conv2d_forward`, `global_avgpool2d_backward`)
and moves arrays between the host (numpy) and the device. A backend is a folder,
`cnnspec/kernels/<device>/`, whose `backend.py` defines `BACKEND`; nothing outside it
changes when one is added. Nothing here imports Numba: kernels load when a layer binds.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from types import ModuleType

import numpy as np


class Backend:
    name = ""

    def __init__(self):
        self._modules: dict[str, ModuleType | None] = {}

    @property
    def package(self) -> str:
        return f"cnnspec.kernels.{self.name}"

    def kernels(self, family: str) -> ModuleType | None:
        """The kernel module of a layer family (None: the family needs no kernels)."""
        if family not in self._modules:
            name = f"{self.package}.{family}"
            found = importlib.util.find_spec(name) is not None
            self._modules[family] = importlib.import_module(name) if found else None
        return self._modules[family]

    def load_all(self) -> None:
        """Import every kernel module (a benchmark sees their compile state)."""
        package = importlib.import_module(self.package)
        for module in pkgutil.iter_modules(package.__path__):
            self.kernels(module.name)

    def zeros(self, shape, dtype) -> np.ndarray:
        raise NotImplementedError

    def to_host(self, array) -> np.ndarray:
        """A host (numpy) copy of a device array."""
        raise NotImplementedError

    def to_device(self, host: np.ndarray, out) -> None:
        """Copy a host array into a device array of the same shape."""
        raise NotImplementedError


def devices() -> list[str]:
    """The devices this build has a backend for."""
    from . import kernels

    return sorted(
        m.name
        for m in pkgutil.iter_modules(kernels.__path__)
        if m.ispkg and importlib.util.find_spec(f"cnnspec.kernels.{m.name}.backend")
    )


def get_backend(device: str) -> Backend:
    """The backend of `device`; ValueError (one line) when this build has none."""
    available = devices()
    if device not in available:
        raise ValueError(
            f"device '{device}' is not available; this build compiles for "
            + ", ".join(f"'{d}'" for d in available)
        )
    return importlib.import_module(f"cnnspec.kernels.{device}.backend").BACKEND
