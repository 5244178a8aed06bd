"""How fast this machine moves memory, on 1 .. N threads: the other half of a CPU's
roofline beside the GEMM peak that `cnnspec bench` and `vs_torch.py` measure. A
training step streams every activation to and from memory several times (ResNet-20 at
batch 128 keeps 145 MiB of them), so where this is low the step is bound by it, not by
the multiply-adds (the README's Speed section).

    python benchmarks/memory_bandwidth.py
    python benchmarks/memory_bandwidth.py --mib 512 --threads 1 2

Three passes over arrays far larger than the caches, each thread over its own slice:
`read` sums an array (GB/s read); `copy` and `streaming` copy one into another, adding 1
(GB/s copied, each byte read once and written once) with ordinary vector stores, which
read every line they write into the cache first, and with non-temporal ones, which skip
that read. Best of `--repeat` runs each.
"""

from __future__ import annotations

import argparse
import os

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from cnnspec.bench.measure import _timed
from cnnspec.kernels.cpu import _llvm

_BYTES = 64  # alignment of the arrays: a cache line, and the widest vector


def _copy_codegen(streaming):
    def codegen(context, builder, signature, args):
        src, dst, first, count = args
        vec = _llvm.vector(signature.args[0].dtype)
        ps = _llvm.base(context, builder, signature.args[0], src, first)
        pd = _llvm.base(context, builder, signature.args[1], dst, first)
        nontemporal = builder.module.add_metadata([ir.Constant(_llvm.I32, 1)])
        one = _llvm.splat(builder, vec, ir.Constant(vec.element, 1.0))

        def step(i, _):
            at = builder.mul(i, _llvm.const(vec.count))
            # + 1: a plain copy loop would become a call of memcpy (its own stores)
            value = builder.fadd(builder.load(_llvm.vec_ptr(builder, ps, at, vec), align=4), one)
            ptr = _llvm.vec_ptr(builder, pd, at, vec)
            if streaming:  # (whole vectors at aligned places: the caller's _slices)
                store = builder.store(value, ptr, align=4 * vec.count)  # (float32)
                store.set_metadata("nontemporal", nontemporal)
            else:
                builder.store(value, ptr, align=4)
            return []

        whole = builder.sdiv(count, _llvm.const(vec.count))
        _llvm.loop(builder, whole, 0, None, step)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _copy_vectors(typingctx, src, dst, first, count):
    """dst[first : first + count] = src[...] + 1 in whole vectors, ordinary stores."""
    return types.void(src, dst, types.int64, types.int64), _copy_codegen(False)


@intrinsic
def _stream_vectors(typingctx, src, dst, first, count):
    """The same with non-temporal stores (first and count whole aligned vectors)."""
    return types.void(src, dst, types.int64, types.int64), _copy_codegen(True)


def _slices(n, threads):
    """Each thread's first element, in whole 64-byte lines of float32."""
    line = _BYTES // 4
    return [t * (n // line) // threads * line for t in range(threads + 1)]


@njit(parallel=True, fastmath={"reassoc"}, cache=True)
def _read(a, bounds):
    sums = np.zeros(bounds.size - 1, np.float32)
    for t in prange(bounds.size - 1):
        acc = np.float32(0)
        for i in range(bounds[t], bounds[t + 1]):
            acc += a[i]
        sums[t] = acc
    return sums.sum()


@njit(parallel=True, cache=True)
def _copy(a, b, bounds, streaming):
    for t in prange(bounds.size - 1):
        count = bounds[t + 1] - bounds[t]
        if streaming:
            _stream_vectors(a, b, bounds[t], count)
        else:
            _copy_vectors(a, b, bounds[t], count)


def aligned(n):
    """n float32 zeros starting on a 64-byte boundary (numpy's large arrays start 16
    bytes past one)."""
    raw = np.zeros(n + _BYTES // 4, np.float32)
    skip = (-raw.ctypes.data % _BYTES) // 4
    return raw[skip : skip + n]


def measure(mib, threads, repeat):
    """{'threads', 'read', 'copy', 'streaming'}: GB/s read, and copied each way."""
    n = mib * 2**20 // 4 // (_BYTES // 4) * (_BYTES // 4)
    a, b = aligned(n), aligned(n)
    a[:] = np.arange(n, dtype=np.float32) % 251
    numba.set_num_threads(threads)
    bounds = np.array(_slices(n, threads), np.int64)
    runs = {
        "read": lambda: _read(a, bounds),
        "copy": lambda: _copy(a, b, bounds, False),
        "streaming": lambda: _copy(a, b, bounds, True),
    }
    row = {"threads": threads}
    for name, run in runs.items():
        run()  # compiled, the pages touched
        if name != "read":
            if not np.array_equal(a + 1, b):
                raise AssertionError(f"the {name} pass copied wrongly")
            b[:] = 0
        best = min(_timed(run, 0, repeat))  # (run once above)
        row[name] = a.nbytes / best / 1e9
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of each array")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: 1 up to the cores)")  # fmt: skip
    parser.add_argument("--repeat", type=int, default=10, help="timed runs of each pass")
    args = parser.parse_args(argv)
    counts = args.threads or list(range(1, numba.config.NUMBA_NUM_THREADS + 1))
    print(f"{args.mib} MiB arrays, best of {args.repeat}, {os.cpu_count()} cores")
    print(f"{'threads':>7} {'read GB/s':>10} {'copy GB/s':>10} {'streaming':>10} {'ratio':>6}")
    rows = []
    was = numba.get_num_threads()
    try:
        for threads in counts:
            row = measure(args.mib, threads, args.repeat)
            rows.append(row)
            ratio = row["streaming"] / row["copy"]
            print(f"{threads:7d} {row['read']:10.1f} {row['copy']:10.1f}"
                  f" {row['streaming']:10.1f} {ratio:6.2f}", flush=True)  # fmt: skip
    finally:
        numba.set_num_threads(was)
    return rows


if __name__ == "__main__":
    main()
