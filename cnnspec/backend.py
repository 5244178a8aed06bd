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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    @contextmanager
    def compiling(self, say: Callable[[str], None], alone: bool = True) -> Iterator[None]:
        """While inside, ``say`` gets a line as kernels compile (a cold cache: first runs
        only), so a first step that compiles does not look frozen; a backend may compile
        some kernels in the background meanwhile (the CPU's parallel builds, and with
        ``alone`` (no other ranks of a run beside this process, whose cores a background
        compiler would take) its convolutions, while numpy stands in)."""
        yield

    def zeros(self, shape, dtype) -> np.ndarray:
        raise NotImplementedError

    def to_host(self, array) -> np.ndarray:
        """A host (numpy) copy of a device array."""
        raise NotImplementedError

    def to_device(self, host: np.ndarray, out) -> None:
        """Copy a host array into a device array of the same shape."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (timing)."""

    def unusable(self) -> str | None:
        """Why this device cannot run here (one line: what is missing, how to get it),
        or None when it can."""
        return None

    def stager(self, shape, dtype) -> Stager:
        """A double-buffered staging area for input batches of ``shape`` (Model.stage)."""
        return Stager(self, shape, dtype)

    def optimizer(self, model, **settings):
        """The SGD optimizer (train.optim.SGD's interface) over a compiled model's
        trainable parameters, updating them where they live."""
        from .train.optim import SGD

        return SGD({k: model.params[k] for k in sorted(model.trainable)}, **settings)


class StagedBatch:
    """An input batch handed to a model ahead of its step (`Model.stage`): it names one
    slot of the model's staging area and the hand-over that filled it."""

    __slots__ = ("stager", "slot", "generation")

    def __init__(self, stager: Stager, slot: int, generation: int):
        self.stager, self.slot, self.generation = stager, slot, generation


class Stager:
    """Input batches staged in two slots: `put` copies a host batch into the next slot at
    once (the caller may reuse its array) and starts the slot's transfer; `take` gives
    the slot's array, ready for the step. While one slot feeds a step, the next batch
    fills the other; a third `put` reuses the first slot, so a batch must be taken before
    the second `put` after its own. Here (the CPU) the slot is the host copy itself; the
    CUDA backend transfers it on a second stream while the current step computes."""

    def __init__(self, backend: Backend, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.slots = [backend.zeros(self.shape, self.dtype) for _ in range(2)]
        self.generation = [0, 0]
        self.handed = 0  # batches put so far

    def put(self, host: np.ndarray) -> StagedBatch:
        host = np.asarray(host)
        if host.shape != self.shape:
            raise ValueError(f"input batch has shape {host.shape}, the model expects {self.shape}")
        if not np.can_cast(host.dtype, self.dtype, casting="same_kind"):
            raise TypeError(f"cannot stage a {host.dtype} batch for {self.dtype} inputs")
        slot = self.handed % 2
        self.handed += 1
        self.generation[slot] = self.handed
        self._fill(slot, host)
        return StagedBatch(self, slot, self.handed)

    def take(self, staged: StagedBatch):
        """The slot's array of a staged batch, once its transfer has arrived (for the work
        issued from now on); RuntimeError if a later batch has reused the slot."""
        if self.generation[staged.slot] != staged.generation:
            raise RuntimeError(
                "this staged batch was overwritten by a later one: stage at most one batch "
                "ahead of the step that uses it"
            )
        self._arrived(staged.slot)
        return self.slots[staged.slot]

    def _fill(self, slot: int, host: np.ndarray) -> None:
        np.copyto(self.slots[slot], host, casting="same_kind")

    def _arrived(self, slot: int) -> None:
        """Make the work issued from now on wait for the slot's transfer (none here)."""


class DeviceUnavailable(RuntimeError):
    """The device has a backend in this build but cannot run here; the message says
    what is missing and how to install it."""


def devices() -> list[str]:
    """The devices this build has a backend for."""
    from . import kernels

    return sorted(
        m.name
        for m in pkgutil.iter_modules(kernels.__path__)
        if m.ispkg and importlib.util.find_spec(f"cnnspec.kernels.{m.name}.backend")
    )


def get_backend(device: str) -> Backend:
    """The backend of `device` ("auto": CUDA when usable, else CPU); ValueError (one
    line) when this build has none, DeviceUnavailable when it cannot run here."""
    if device == "auto":
        return get_backend(resolve_device("auto"))
    available = devices()
    if device not in available:
        raise ValueError(
            f"device '{device}' is not available; this build compiles for "
            + ", ".join(f"'{d}'" for d in available)
        )
    backend = importlib.import_module(f"cnnspec.kernels.{device}.backend").BACKEND
    reason = backend.unusable()
    if reason:
        raise DeviceUnavailable(reason)
    return backend


def resolve_device(device: str) -> str:
    """The device a `--device` choice means here: "auto" is "cuda" when a GPU is usable,
    else "cpu"; any other name is itself."""
    if device != "auto":
        return device
    cuda = importlib.import_module("cnnspec.kernels.cuda.backend").BACKEND
    return "cpu" if cuda.unusable() else "cuda"
