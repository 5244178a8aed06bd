"""Plain-Python helpers shared by the CPU kernels (argument checks, views), the vector
width the micro-kernels are built for, and a Numba cache per width.

A kernel's cached build is stale once any module of this folder changes (the cache
locator below stamps every kernel with all of them): kernels call jitted helpers and
LLVM-IR intrinsics of other modules here, which Numba's own stamp (the kernel's file
alone) would not notice. Every kernel module imports this one first.
"""

from __future__ import annotations

import os
import types
from functools import lru_cache, partial

import llvmlite.binding as llvm
import numba
import numpy as np
from numba.core import caching

from ..checks import check_shape as check_shape  # the kernels import it from here
from .background import BACKGROUND
from .threads import count as thread_count


def cpu_has_avx512() -> bool:
    """Whether this CPU runs AVX-512 (LLVM's view of the host, as Numba compiles for)."""
    return bool(llvm.get_host_cpu_features().get("avx512f", False))


# The micro-kernels' vector width follows the CPU (512-bit with AVX-512, else 256-bit);
# CNNSPEC_VECTOR_BITS=256 forces the narrow kernels (tests run them on AVX-512 CPUs).
_BITS = os.environ.get("CNNSPEC_VECTOR_BITS")
_WIDE = _BITS == "512" or (_BITS is None and cpu_has_avx512())
VECTOR_BITS = 512 if _WIDE else 256


def folder_stamp(folder: str) -> tuple:
    """(name, mtime_ns, size) of each Python file in `folder`: changes when any does."""
    entries = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            st = os.stat(os.path.join(folder, name))
            entries.append((name, st.st_mtime_ns, st.st_size))
    return tuple(entries)


class _WidthCacheLocator(caching._CacheLocator):
    """Numba's own cache location for the kernels in this folder, with the vector width
    in the file names, and stamped with every module of the folder. Numba keys a cached
    kernel on its source, signature and CPU, not on the module constants baked into it:
    a 256-bit process loading 512-bit blocks from a shared cache crashed. Every kernel
    here is keyed, since any may inline the micro-kernels; and Numba's stamp is the
    kernel's own file, while the helpers and intrinsics it compiles in may live in
    another (an edit there left the old code cached)."""

    _folder = os.path.dirname(os.path.abspath(__file__)) + os.sep

    def __init__(self, inner):
        self._inner = inner

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_source_stamp(self):
        return self._inner.get_source_stamp(), _kernels_stamp()

    def get_disambiguator(self):
        return f"{self._inner.get_disambiguator()}-{VECTOR_BITS}bit"

    def __getattr__(self, name):
        # the rest as Numba's own locator has it: Numba reads `_py_file` to warn that a
        # kernel cannot be cached (under NUMBA_OPT=0 some can't: without it, a traceback)
        if name == "_inner":  # not set yet (a copy, an unpickling): no endless lookup
            raise AttributeError(name)
        return getattr(self._inner, name)

    @classmethod
    def from_function(cls, py_func, py_file):
        if not os.path.abspath(py_file).startswith(cls._folder):
            return None
        for other in caching.CacheImpl._locator_classes:
            inner = None if other is cls else other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None


@lru_cache(maxsize=1)
def _kernels_stamp() -> tuple:
    return folder_stamp(_WidthCacheLocator._folder)  # once a process: ~20 stats


# before any kernel module's @njit(cache=True) builds its cache
if not any(c.__name__ == "_WidthCacheLocator" for c in caching.CacheImpl._locator_classes):
    caching.CacheImpl._locator_classes.insert(0, _WidthCacheLocator)


def check_c(**arrays: np.ndarray | None) -> None:
    """Raise if any (non-None) array is not C-contiguous.

    The kernels write through reshaped views; a non-contiguous output would make
    ``reshape`` return a copy and the result would silently be lost.
    """
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")


# A batch norm (and its ReLU) applied by the layer that reads its output, as it reads
# it, per channel (the `in_affine` hook of conv2d and add): copy, x*scale + shift, and
# max(x*scale + shift, 0).
IN_COPY, IN_AFFINE, IN_AFFINE_RELU = 0, 1, 2

# The output-gradient hook (conv2d's `dout_affine`): when a conv's output feeds only a
# batch norm, the norm's input gradient ka*g + kb*y + kc (g: the norm's output gradient,
# masked where its ReLU was 0, y: the conv's output) is formed by the conv as it reads
# dout, instead of in a pass of the norm's own: plain dout, the hook without a ReLU, with.
OUT_PLAIN, OUT_NORM, OUT_NORM_RELU = 0, 1, 2


def input_hook(in_affine, x):
    """The kernels' (aff, mode) for `in_affine`: None, or (scale, shift, relu) with
    scale and shift (C,) in x's dtype, C = x.shape[1]: aff (2, C) (without a hook, a
    (2, 1) scale 1 and shift 0: x * 1 + 0 is x)."""
    if in_affine is None:
        return np.array([[1], [0]], x.dtype), IN_COPY
    scale, shift, relu = in_affine
    c = x.shape[1]
    check_shape("in_affine scale", scale, (c,))
    check_shape("in_affine shift", shift, (c,))
    aff = np.empty((2, c), x.dtype)
    aff[0], aff[1] = scale, shift
    return aff, IN_AFFINE_RELU if relu else IN_AFFINE


def forward_hooks(in_affine, stats, x, outputs, threads):
    """A conv forward's (aff, mode, moments): all None / IN_COPY without hooks (the
    build without them), else the input hook and per-thread moment rows for
    :func:`merge_moments` (one row, unused, without `stats`): one build for both hooks."""
    if in_affine is None and stats is None:
        return None, IN_COPY, None
    aff, mode = input_hook(in_affine, x)
    return aff, mode, np.zeros((threads if stats is not None else 1, 3 * outputs + 1))


def backward_hooks(in_affine, gk, relu_dx, dx_sums, x, threads):
    """A conv backward's (aff, mode, gk, dsums): None / IN_COPY / gk / None without
    hooks (the build without them; accumulate is a flag of both builds), else the input
    hook, the output-gradient hook's coefficients (gk, or a (5, 1) placeholder) and per
    thread the norm's mean then its two sums (no channels: none wanted), for
    :func:`merge_dx_sums`."""
    if in_affine is None and gk is None and not relu_dx:
        return None, IN_COPY, gk, None
    aff, mode = input_hook(in_affine, x)
    gk = np.zeros((5, 1), x.dtype) if gk is None else gk
    dsums = np.zeros((threads, 3, 0 if dx_sums is None else x.shape[1]))
    if dx_sums is not None:
        dsums[:, 0] = dx_sums[0]
    return aff, mode, gk, dsums


def merge_dx_sums(dx_sums, dsums):
    """dx_sums' sums (float64 (2, C)) = the threads' in dsums, added in thread order."""
    if dx_sums is None:
        return
    sums = dx_sums[1]
    sums[...] = 0.0
    for part in dsums:
        sums += part[1:]


def unpack_geometry(stride, pad, dilation):
    """(sh, sw, pt, pb, pl, pr, dh, dw) as Python ints from [h, w], [t, b, l, r], [h, w]."""
    sh, sw = (int(s) for s in stride)
    pt, pb, pl, pr = (int(p) for p in pad)
    dh, dw = (int(d) for d in dilation)
    return sh, sw, pt, pb, pl, pr, dh, dw


def as_3d(a: np.ndarray) -> np.ndarray:
    """View an (N, C, ...) array as (N, C, S); S = 1 for 2-D input."""
    if a.ndim < 2:
        raise ValueError(f"expected an array with a channel axis, got shape {a.shape}")
    return a.reshape(a.shape[0], a.shape[1], -1)


# Arrays (all of a call's together) smaller than this run serially: a parallel region's
# fork/join and, under load, its wait for a descheduled worker cost more than the loop,
# and a parallel=True build costs ~0.8 s of CPU more to compile than a serial one (on a
# first `cnnspec train`, in the background: background.py). It was 512K: LeNet-5's pools
# (150K-380K elements at b64) then ran on one thread at 2 threads, reading the halves
# the other core's convs had just written from its cache; at 64K its b64 step at 2
# threads took 0.88-0.95x the time (AMD EPYC Zen 5, alternating in one process).
SERIAL_BELOW = 1 << 16  # elements


def relu_numpy(v, on):
    """For the kernels' numpy stand-ins: v where it is > 0 (NaN: 0), if `on`; else v."""
    return np.where(v > 0, v, v.dtype.type(0)) if on else v


# A jitted helper that only other kernels call needs neither a Python nor a C-callable
# entry point: @njit(**HELPER) skips generating and caching them. With the kernels'
# builds skipping the C-callable one too: ~0.3-0.45 s (6-8%) of LeNet-5's cold first step.
HELPER = {"cache": True, "no_cpython_wrapper": True, "no_cfunc_wrapper": True}


class Builds:
    """A prange kernel in two builds, each compiled on first use: parallel=True, and
    serial (prange runs as range), which compiles in ~1/3 of the CPU time (no parfor
    passes, no gufunc). A prange iteration writes only its own outputs, so both
    builds give the same bits for the same arguments. While `BACKGROUND` defers (the
    first runs of `cnnspec train`, `eval`, `predict`), a parallel build not yet compiled
    runs the serial one while a child process compiles it (background.py)."""

    def __init__(self, py_func, **options):
        options = dict(cache=True, no_cfunc_wrapper=True, **options)  # Numba's, for both
        self.parallel = numba.njit(parallel=True, **options)(py_func)
        # its own qualname: Numba's on-disk cache is per qualname, not per build flags
        twin = types.FunctionType(
            py_func.__code__, py_func.__globals__, py_func.__name__, py_func.__defaults__
        )
        twin.__qualname__ = py_func.__qualname__ + "_serial"
        self.serial = numba.njit(**options)(twin)
        self.__wrapped__ = py_func

    @classmethod
    def with_options(cls, **options):
        """The decorator, with Numba options for both builds (e.g. fastmath)."""
        return lambda py_func: cls(py_func, **options)

    def pick(self, serial: bool):
        if serial:
            return self.serial
        if BACKGROUND.active:  # the parallel build, or the serial one until it is ready
            return partial(BACKGROUND.run, self)
        return self.parallel

    def now(self, serial: bool, args):
        """For a kernel with a stand-in: the build `pick(serial)` would run, or None while
        `BACKGROUND` defers and no build runs `args` without compiling here: a child
        compiles them meanwhile (the serial build too on more threads, and first: the
        child's own compiling leaves the model one core), and the caller runs its
        stand-in. A process that has no second core, or is one of a run's ranks,
        compiles them here (`BACKGROUND.stand_ins`)."""
        if not BACKGROUND.active or not BACKGROUND.stand_ins:
            return self.pick(serial)
        sig = tuple(map(self.parallel.typeof_pyval, args))  # (~4 us an argument: once)
        if not serial and BACKGROUND.ready(self.parallel, sig, None):
            return self.parallel  # (a warm run asks for no serial build it will not use)
        serial_ready = BACKGROUND.ready(self.serial, sig, "its numpy stand-in")
        if not serial and BACKGROUND.ready(self.parallel, sig, "its numpy stand-in"):
            return self.parallel
        return self.serial if serial_ready else None


class SplitBySize(Builds):
    """The serial build on one thread or below SERIAL_BELOW elements (all array
    arguments together), the parallel one above: a small model's loss, and LeNet-5's
    pools on one thread, never compile their parallel builds."""

    def __call__(self, *args):
        return self.pick(self._serial(args))(*args)

    def or_stand_in(self, stand_in, *args):
        """Call the build `__call__` would, or `stand_in(*args)` (numpy doing the same)
        while a child compiles it on a first run (:meth:`Builds.now`)."""
        kernel = self.now(self._serial(args), args)
        return stand_in(*args) if kernel is None else kernel(*args)

    @staticmethod
    def _serial(args) -> bool:
        if thread_count() == 1:
            return True
        return sum([a.size for a in args if isinstance(a, np.ndarray)]) < SERIAL_BELOW


def merge_moments(parts):
    """(mean, biased variance) per channel from per-thread rows [shift (C), sum(y - shift)
    (C), sum((y - shift)^2) (C), count]: Chan et al.'s pairwise update, in float64 and
    thread order. A shift near the data keeps the squares from cancelling. Like dW,
    the same bits for a given thread count (the threads' tiles set the partial sums)."""
    c = (parts.shape[1] - 1) // 3
    n = 0.0
    mean = np.zeros(c)
    m2 = np.zeros(c)
    for shift, s1, s2, count in ((p[:c], p[c : 2 * c], p[2 * c : 3 * c], p[3 * c]) for p in parts):
        if count == 0:
            continue
        mean_t = shift + s1 / count
        m2_t = np.maximum(s2 - s1 * s1 / count, 0.0)
        total = n + count
        delta = mean_t - mean
        mean = mean + delta * (count / total)
        m2 = m2 + m2_t + delta * delta * (n * count / total)
        n = total
    return mean, m2 / n
