"""Register-blocked GEMM micro-kernels, written in LLVM IR through Numba intrinsics.

LLVM keeps a block of C in vector registers across the whole reduction, which
Numba's loops cannot ask of it; OpenBLAS, on the other hand, may run narrower
kernels than the CPU has (this machine's environment sets OPENBLAS_CORETYPE=
Haswell: AVX2). Measured on one core of the project's AVX-512 machine, float32:
these reach 265-270 GFLOP/s on the conv shapes where OpenBLAS gives 100-125.

Two kernels, both on plain float32/float64 arrays with element offsets:

- ``bcast(a, ao, b, bo, c, co, ldc, k, beta)``: C[MR x NR] (+)= A B, A packed
  [k][MR] (a column of A per step, broadcast), B packed [k][NR] (a row panel),
  C row-major with row stride ldc. Used for the forward product and dcols.
- ``dot(a, ao, lda, b, bo, ldb, c, co, ldc, n)``: C[MD x ND] += A B^T for row-major
  A (MD rows) and B (ND rows) of length n (a multiple of the vector width): dW.

Vector width follows the CPU: 512-bit with AVX-512, else 256-bit, so the blocks
fit the register file (32 or 16 vector registers).
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_WIDE = bool(llvm.get_host_cpu_features().get("avx512f", False))
VECTOR_BYTES = 64 if _WIDE else 32
MR = 8 if _WIDE else 4  # bcast: rows of C per block
NV = 3  # bcast: vectors of C per row
MD = 4 if _WIDE else 2  # dot: rows of A per block
ND = 6 if _WIDE else 4  # dot: rows of B per block

_I64 = ir.IntType(64)
_I32 = ir.IntType(32)


def lanes(itemsize: int) -> int:
    return VECTOR_BYTES // itemsize


def panel(itemsize: int) -> int:
    """NR: the columns of one B panel / C block of ``bcast``."""
    return NV * lanes(itemsize)


def _llvm_real(dtype):
    return ir.FloatType() if dtype == types.float32 else ir.DoubleType()


def _vector(dtype):
    real = _llvm_real(dtype)
    return real, ir.VectorType(real, lanes(dtype.bitwidth // 8))


def _fma(builder, vec, a, b, c):
    name = f"llvm.fma.v{vec.count}{'f32' if isinstance(vec.element, ir.FloatType) else 'f64'}"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(vec, [vec] * 3), name
    )
    return builder.call(fn, [a, b, c])


def _splat(builder, vec, x):
    v = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(_I32, 0))
    mask = ir.Constant(ir.VectorType(_I32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), mask)


def _base(context, builder, aryty, ary, offset):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [offset])


def _vec_ptr(builder, base, index, vec):
    return builder.bitcast(builder.gep(base, [index]), vec.as_pointer())


def _const(n):
    return ir.Constant(_I64, n)


def _loop(builder, count, n_carried, zero, body):
    """for i in range(count): carried = body(i, carried); returns the final values
    (zero if count <= 0). Emitted as one basic block with phi nodes, so LLVM keeps
    the carried vectors in registers."""
    entry = builder.block
    loop = builder.append_basic_block("mk.loop")
    done = builder.append_basic_block("mk.done")
    builder.cbranch(builder.icmp_signed(">", count, _const(0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_I64)
    i.add_incoming(_const(0), entry)
    carried = [builder.phi(zero.type) for _ in range(n_carried)]
    for p in carried:
        p.add_incoming(zero, entry)
    new = body(i, carried)
    tail = builder.block
    nxt = builder.add(i, _const(1))
    i.add_incoming(nxt, tail)
    for p, v in zip(carried, new, strict=True):
        p.add_incoming(v, tail)
    builder.cbranch(builder.icmp_signed("<", nxt, count), loop, done)
    builder.position_at_end(done)
    final = []
    for v in new:
        f = builder.phi(zero.type)
        f.add_incoming(zero, entry)
        f.add_incoming(v, tail)
        final.append(f)
    return final


def _row_pointer(context, builder, signature, args, index, base_i, row):
    """&array[offsets[first + row] + column] for the (array, offsets, first, column)
    arguments starting at position `index`."""
    ary, offs, first, column = args[index : index + 4]
    data = context.make_array(signature.args[index])(context, builder, ary).data
    table = context.make_array(signature.args[index + 1])(context, builder, offs).data
    offset = builder.load(builder.gep(table, [builder.add(first, row)]))
    return builder.gep(data, [builder.add(offset, column)])


@intrinsic
def bcast(typingctx, a, ao, b, boffs, bi, bcol, c, coffs, ci, ccol, k, beta):
    """C[MR x NR] = A B (+= when beta != 0). A packed [k][MR] at a[ao:]; B row kk is
    b[boffs[bi + kk] + bcol:][:NR]; C row i is c[coffs[ci + i] + ccol:][:NR]. With
    beta, rows are read, added and written one after another, so C rows may
    overlap (the backward pass adds W^T dout straight into a padded dx)."""
    i64 = types.int64
    sig = types.void(a, i64, b, boffs, i64, i64, c, coffs, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        a_ary, ao = args[0], args[1]
        k, beta = args[10], args[11]
        real, vec = _vector(signature.args[0].dtype)
        pa = _base(context, builder, signature.args[0], a_ary, ao)

        def step(kk, acc):
            brow = _row_pointer(context, builder, signature, args, 2, None, kk)
            bv = [builder.load(_vec_ptr(builder, brow, _const(v * vec.count), vec), align=4)
                  for v in range(NV)]  # fmt: skip
            arow = builder.mul(kk, _const(MR))
            out = []
            for i in range(MR):
                x = builder.load(builder.gep(pa, [builder.add(arow, _const(i))]))
                s = _splat(builder, vec, x)
                out += [_fma(builder, vec, s, bv[v], acc[i * NV + v]) for v in range(NV)]
            return out

        zero = ir.Constant(vec, [0.0] * vec.count)
        acc = _loop(builder, k, MR * NV, zero, step)
        add = builder.icmp_signed("!=", beta, _const(0))
        for i in range(MR):
            crow = _row_pointer(context, builder, signature, args, 6, None, _const(i))
            for v in range(NV):
                ptr = _vec_ptr(builder, crow, _const(v * vec.count), vec)
                old = builder.load(ptr, align=4)
                value = builder.select(add, builder.fadd(old, acc[i * NV + v]), acc[i * NV + v])
                builder.store(value, ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _hsum(builder, vec, v):
    # pairwise halving: a fixed order, the same bits every run
    n = vec.count
    while n > 1:
        half = n // 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half))))
        hi = builder.shuffle_vector(
            v, v, ir.Constant(ir.VectorType(_I32, half), list(range(half, n)))
        )
        v = builder.fadd(lo, hi)
        n = half
    return builder.extract_element(v, ir.Constant(_I32, 0))


@intrinsic
def dot(typingctx, a, ao, lda, b, boffs, bi, bcol, c, co, ldc, n):
    """C[MD x ND] at c[co:] (row stride ldc) += A B^T: A = MD rows of a from ao
    (stride lda), B row j = b[boffs[bi + j] + bcol:], each n long (a multiple of
    the vector width)."""
    i64 = types.int64
    sig = types.void(a, i64, i64, b, boffs, i64, i64, c, i64, i64, i64)

    def codegen(context, builder, signature, args):
        a_ary, ao, lda = args[0], args[1], args[2]
        c_ary, co, ldc, n = args[7], args[8], args[9], args[10]
        real, vec = _vector(signature.args[0].dtype)
        pa = _base(context, builder, signature.args[0], a_ary, ao)
        pc = _base(context, builder, signature.args[7], c_ary, co)
        rows_a = [builder.gep(pa, [builder.mul(lda, _const(i))]) for i in range(MD)]
        rows_b = [_row_pointer(context, builder, signature, args, 3, None, _const(j))
                  for j in range(ND)]  # fmt: skip

        def step(t, acc):
            at = builder.mul(t, _const(vec.count))
            av = [builder.load(_vec_ptr(builder, r, at, vec), align=4) for r in rows_a]
            bv = [builder.load(_vec_ptr(builder, r, at, vec), align=4) for r in rows_b]
            return [_fma(builder, vec, av[i], bv[j], acc[i * ND + j])
                    for i in range(MD) for j in range(ND)]  # fmt: skip

        zero = ir.Constant(vec, [0.0] * vec.count)
        steps = builder.sdiv(n, _const(vec.count))
        acc = _loop(builder, steps, MD * ND, zero, step)
        for i in range(MD):
            for j in range(ND):
                ptr = builder.gep(pc, [builder.add(builder.mul(ldc, _const(i)), _const(j))])
                total = _hsum(builder, vec, acc[i * ND + j])
                builder.store(builder.fadd(builder.load(ptr), total), ptr)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True)
def _probe(a, b, boffs, c, coffs, k, reps, threads):
    # each thread multiplies its own cache-resident block, over and over
    for t in prange(threads):
        for _ in range(reps):
            bcast(a, 0, b, boffs, t * k, 0, c, coffs, t * MR, 0, k, 0)


def peak_gflops(repeat: int = 5, k: int = 256, reps: int = 2000) -> float:
    """Best float32 GFLOP/s of the bcast kernel on every Numba thread at once: the
    ceiling the conv kernels work against (no memory traffic)."""
    import time

    import numba
    import numpy as np

    threads = numba.get_num_threads()
    nr = panel(4)
    a = np.random.default_rng(0).standard_normal(k * MR).astype(np.float32)
    b = np.random.default_rng(1).standard_normal(threads * k * nr).astype(np.float32)
    c = np.zeros(threads * MR * nr, np.float32)
    boffs = np.arange(threads * k, dtype=np.int64) * nr
    coffs = np.arange(threads * MR, dtype=np.int64) * nr
    _probe(a, b, boffs, c, coffs, k, 1, threads)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _probe(a, b, boffs, c, coffs, k, reps, threads)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * MR * nr * k * reps * threads / best / 1e9
