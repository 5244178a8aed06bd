"""The memory a compiled model will take, computed from the inferred network before anything
is allocated, and the memory this machine can give it.

A network that cannot fit is refused with the figure and the largest batch that fits, instead
of being found out by numpy's `Unable to allocate 49.0 GiB` or by the kernel's OOM killer.

For training the estimate is an upper bound (measured: 1.0-1.5x what the model allocates):
every activation gradient is counted, although the compiled model lets gradients whose lives
do not overlap share memory; fused ReLUs are counted once. For inference, where activations
share memory too, it is a lower bound: the weights and the two largest activations.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .layers.base import Layer
from .report import human_bytes, param_size, values

LIMIT_ENV = "CNNSPEC_MEMORY_LIMIT"  # bytes (or 512M, 8G) to plan for, or "off"
PROBE_VALUES = 1 << 24  # layers with larger outputs are not probed: assumed activation-sized
PARTS = (
    "parameters",
    "gradients",
    "optimizer state",
    "activations",
    "activation gradients",
    "layer buffers",
    "workspace",
)


class MemoryLimitError(ValueError):
    """The network does not fit in the memory available; the message says what would."""


@dataclass
class Estimate:
    batch: int
    training: bool
    parts: dict[str, int]  # bytes, by PARTS

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k} {human_bytes(v)}" for k, v in self.parts.items() if v)
        return f"{human_bytes(self.total)} ({shown})"


def _bound(layer, backend):
    """A copy of ``layer`` bound to ``backend``, to measure without touching the original."""
    twin = layer.clone(layer.name)
    twin.bind(backend)
    return twin


def _per_image_buffers(layer, backend, dtype) -> int:
    """Bytes of the buffers a layer allocates for itself, per image: measured by allocating
    them for one image on a copy of the layer (zeroed memory that is not touched is free)."""
    if type(layer).allocate is Layer.allocate:
        return 0
    if values(layer.out_shape) > PROBE_VALUES:
        return values(layer.out_shape) * np.dtype(dtype).itemsize  # like a dropout mask
    probe = _bound(layer, backend)
    before = {id(v) for v in vars(probe).values()}
    probe.allocate(1, dtype)
    return sum(
        v.nbytes for v in vars(probe).values() if isinstance(v, np.ndarray) and id(v) not in before
    )


class _Network:
    """What the estimate needs of a network, computed once; then any batch is a sum."""

    def __init__(self, net, training: bool, momentum: bool, dtype, device="cpu") -> None:
        from .backend import get_backend

        backend = get_backend(device) if isinstance(device, str) else device
        self.itemsize = size = np.dtype(dtype).itemsize
        self.training = training
        # one layer of each kind: copies (repeat, block instances) are clones of a template
        self.layers = list({id(i.layer.template or i.layer): i.layer for i in net.infos}.values())
        self.scratch = []  # bound copies of the layers that need scratch, to ask how much
        for layer in self.layers:
            if type(layer).workspace_size is not Layer.workspace_size:
                twin = _bound(layer, backend)
                twin.itemsize = size  # what allocate() sets; workspace_size reads it
                self.scratch.append(twin)
        totals = net.totals()
        trainable = totals["trainable_params"] if training else 0
        largest = max(
            [param_size(d) for layer in self.layers for d in layer.param_defs() if d.trainable]
            + [0]
        )
        self.fixed = {
            "parameters": totals["params"] * size,
            "gradients": trainable * size,
            # the momentum buffers, and SGD's two scratch arrays as large as the largest weight
            "optimizer state": ((trainable if momentum else 0) + 2 * largest) * size
            if training
            else 0,
        }
        from .compile import fused_norms, fused_relus, fusion_enabled  # imports the kernels

        fused = fused_relus(net.infos)
        if backend.name == "cpu" and fusion_enabled():  # norms their readers apply: no output
            fused = {**fused, **fused_norms(net.infos, fused)[1]}
        images = [values(net.input_shape)]
        images += [values(i.layer.out_shape) for i in net.infos if i.name not in fused]
        if not training:
            images = sorted(images)[-2:]  # what is alive at least: one layer's input and output
        self.activation = sum(images) * size  # per image
        # the trainer and evaluate hand each batch over a step early: two staging slots
        # (on a GPU also two pinned host buffers, counted here once)
        self.staged = 2 * values(net.input_shape) * size  # per image
        probed: dict[int, int] = {}
        self.buffers = 0
        for info in net.infos:
            template = info.layer.template or info.layer
            if id(template) not in probed:
                probed[id(template)] = _per_image_buffers(template, backend, dtype)
            self.buffers += probed[id(template)]

    def estimate(self, batch: int) -> Estimate:
        parts = dict(self.fixed)
        parts["activations"] = self.activation * batch
        parts["activation gradients"] = self.activation * batch if self.training else 0
        parts["layer buffers"] = self.buffers * batch
        parts["staged inputs"] = self.staged * batch
        parts["workspace"] = max(
            [int(layer.workspace_size(batch)) * self.itemsize for layer in self.scratch] + [0]
        )
        return Estimate(batch, self.training, parts)

    def largest_batch(self, budget: int, upto: int) -> int:
        """The largest batch (at most ``upto``) whose estimate fits ``budget``; 0 if none."""
        lo, hi = 0, upto
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.estimate(mid).total <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def estimate(
    net, batch: int, training: bool = True, momentum: bool = True, dtype=np.float32, device="cpu"
):
    """The memory a model of ``net`` compiled at ``batch`` takes (an upper bound)."""
    return _Network(net, training, momentum, dtype, device).estimate(batch)


def _parse_bytes(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        return None
    scale = 1024 ** "_kmgt".index(m.group(2) or "_")
    return int(float(m.group(1)) * scale)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_room(proc_cgroup: str = "/proc/self/cgroup", root: Path = CGROUP_ROOT) -> int | None:
    """Memory this process's cgroup (and every cgroup above it) still allows: the smallest
    limit less usage along the chain, cgroup v2 or v1 (SLURM jobs, containers). None: no
    limit found."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    chains = []
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0":
            chains.append((root / path.lstrip("/"), root, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):
            base = root / "memory"
            chains.append(
                (base / path.lstrip("/"), base, "memory.limit_in_bytes", "memory.usage_in_bytes")
            )
    rooms = []
    for where, top, limit_name, usage_name in chains:
        while True:
            limit = _read_int(str(where / limit_name))
            if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2**63
                rooms.append(max(limit - (_read_int(str(where / usage_name)) or 0), 0))
            if where == top or top not in where.parents:
                break
            where = where.parent
    return min(rooms) if rooms else None


def available() -> tuple[int, str] | None:
    """Bytes this process can still use, and where that figure comes from: $CNNSPEC_MEMORY_LIMIT,
    its cgroup's limit less its usage (containers, SLURM), or MemAvailable in /proc/meminfo,
    whichever is least. None when unknown or switched off (CNNSPEC_MEMORY_LIMIT=off)."""
    given = os.environ.get(LIMIT_ENV)
    if given:
        if given.strip().lower() == "off":
            return None
        limit = _parse_bytes(given)
        if limit is None:
            raise MemoryLimitError(
                f"{LIMIT_ENV}={given!r} is not a size; give bytes (e.g. 8G, 512M) or off"
            )
        return limit, f"{LIMIT_ENV}={given}"
    found = []
    room = _cgroup_room()
    if room is not None:
        found.append((room, "the room left under the cgroup's memory limit"))
    try:
        meminfo = Path("/proc/meminfo").read_text()
        m = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.M)
        if m:
            found.append((int(m.group(1)) * 1024, "available memory (MemAvailable)"))
    except OSError:
        pass
    return min(found) if found else None


def check_fits(
    net,
    batch: int,
    training: bool = True,
    momentum: bool = True,
    dtype=np.float32,
    sharing: int = 1,
    device="cpu",
) -> Estimate:
    """Refuse, with MemoryLimitError, a model that would not fit in the memory available
    (its ``sharing``-th part, when that many processes train side by side on this machine)."""
    model = _Network(net, training, momentum, dtype, device)
    need = model.estimate(batch)
    budget = available()
    if budget is None or need.total * sharing <= budget[0]:
        return need
    room, source = budget[0] // sharing, budget[1]
    if sharing > 1:
        source += f" shared by {sharing} processes on this machine"
    what, bound = ("training", "about") if training else ("running", "at least")
    fits = model.largest_batch(room, batch - 1)
    advice = (
        f"the largest batch that fits is {fits} (--batch-size {fits})"
        if fits
        else "not even one image fits: make the network or its input smaller"
    )
    raise MemoryLimitError(
        f"{what} {net.name} at batch {batch} needs {bound} {need.describe()}, but "
        f"{source} is {human_bytes(room)}; {advice}"
    )
