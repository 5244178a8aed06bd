"""conv2d kernels: tiled indirect GEMMs on register-blocked micro-kernels (written in
LLVM IR through Numba intrinsics). Transposed convolution and im2col/col2im live in
conv_transpose.py.

Layouts follow PyTorch: activations NCHW, conv weights (O, C/groups, kh, kw). All
kernels overwrite their outputs and return None.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ..checks import check_grouped_conv
from . import _llvm, conv_numpy, merge, winograd
from ._common import (
    HELPER,
    IN_AFFINE_RELU,
    IN_COPY,
    OUT_NORM,
    OUT_NORM_RELU,
    OUT_PLAIN,
    VECTOR_BITS,
    Builds,
    backward_hooks,
    check_c,
    check_shape,
    forward_hooks,
    merge_dx_sums,
    merge_moments,
)
from ._common import unpack_geometry as _unpack
from ._llvm import lanes
from .threads import count as thread_count

__all__ = [
    "ACT_NONE",
    "ACT_RELU",
    "conv2d_workspace",
    "conv2d_forward",
    "conv2d_backward",
    "conv2d_mask_gradient",
]


# ---------------------------------------------------------------- micro-kernels
# LLVM keeps a block of C in vector registers across the whole reduction, which
# Numba's loops cannot ask of it; OpenBLAS, on the other hand, may run narrower
# kernels than the CPU has (this machine's environment sets OPENBLAS_CORETYPE=
# Haswell: AVX2). Measured on one core of the project's AVX-512 machine, float32:
# 257-270 GFLOP/s on the conv shapes where OpenBLAS gives 100-125.
#
# Both kernels find rows through tables of offsets (indirect GEMM):
# - ``bcast``: C[MR x NR] (+)= A B, A packed [k][MR] (a column of A per step,
#   broadcast against a row of B): the forward product and dx;
# - ``dot``: C[MD x ND] += A B^T over long rows (its accumulators summed at the end,
#   into a block of C): dW.
# The vector width (_common.VECTOR_BITS: the CPU's, or CNNSPEC_VECTOR_BITS) sizes the
# blocks to fit the register file (32 or 16 vector registers); Numba's cache is kept
# per width.
_WIDE = VECTOR_BITS == 512
VECTOR_BYTES = VECTOR_BITS // 8
MR = 8 if _WIDE else 4  # bcast: rows of C per block
NV = 3  # bcast: vectors of C per row
MD = 4 if _WIDE else 2  # dot: rows of A per block
ND = 6 if _WIDE else 4  # dot: rows of B per block
# The 256-bit dot block, re-measured on an AMD EPYC Zen 3 (AVX2; ResNet-20's dW alone,
# 1 thread, 2026-12-04): 2x4 60-68 GFLOP/s, 2x5 the same, 2x6 and 3x4 38-41 (twelve
# accumulators and their operands overflow the 16 vector registers).


def panel(itemsize: int) -> int:
    """NR: the columns of one B panel / C block of ``bcast``."""
    return NV * lanes(itemsize)


def _row_pointer(context, builder, signature, args, index, row):
    """&array[offsets[first + row] + column] for the (array, offsets, first, column)
    arguments starting at position `index`."""
    ary, offs, first, column = args[index : index + 4]
    data = context.make_array(signature.args[index])(context, builder, ary).data
    table = context.make_array(signature.args[index + 1])(context, builder, offs).data
    offset = builder.load(builder.gep(table, [builder.add(first, row)]))
    return builder.gep(data, [builder.add(offset, column)])


def _prefetcher(context, builder, signature, args, index):
    """step(kk): prefetches line kk of the stream (pf, pf_at, lines) at argument `index`:
    pf's elements pf_at + kk * (a line's elements), if kk < lines (a branch: prefetching
    the last line again in later steps cost LeNet-5's short calls ~4% at 256 bits)."""
    aryty = signature.args[index]
    base = _llvm.base(context, builder, aryty, args[index], args[index + 1])
    lines = args[index + 2]
    line = _llvm.const(64 // (aryty.dtype.bitwidth // 8))
    i8p = ir.IntType(8).as_pointer()
    name = "llvm.prefetch.p0i8"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, _llvm.I32, _llvm.I32, _llvm.I32]), name
    )

    def step(kk):
        with builder.if_then(builder.icmp_signed("<", kk, lines)):
            ptr = builder.bitcast(builder.gep(base, [builder.mul(kk, line)]), i8p)
            # read, keep in all cache levels, data
            operands = [
                ptr,
                ir.Constant(_llvm.I32, 0),
                ir.Constant(_llvm.I32, 3),
                ir.Constant(_llvm.I32, 1),
            ]
            builder.call(fn, operands)

    return step


# The tiles' inputs stream from memory (a ResNet-20 batch's activations are 8 MiB a
# layer): copied in a burst when a tile starts, they stalled the core ~0.5 ms of a 16-
# channel 32x32 conv's 3.7 ms forward (1 thread, AMD EPYC Zen 5; the same conv with
# its samples resident in L2: 3.2 ms). ``bcast_ahead`` prefetches the next tile's
# input while it multiplies, one cache line per step: that recovers most of it; the
# rows the tile's epilogue (or dx) writes, prefetched as well, a further 1.0-1.05x.
# Prefetches issued in a burst between the calls recovered less than half.


def _bcast_codegen(ahead):
    def codegen(context, builder, signature, args):
        a_ary, ao = args[0], args[1]
        k, beta = args[10], args[11]
        vec = _llvm.vector(signature.args[0].dtype)
        pa = _llvm.base(context, builder, signature.args[0], a_ary, ao)
        prefetch = _prefetcher(context, builder, signature, args, 12) if ahead else None
        zero = ir.Constant(vec, [0.0] * vec.count)
        add = builder.icmp_signed("!=", beta, _llvm.const(0))

        def block(mr):  # the first mr rows of C (A's block holds MR rows whatever mr)
            def step(kk, acc):
                brow = _row_pointer(context, builder, signature, args, 2, kk)
                bv = [builder.load(_llvm.vec_ptr(builder, brow, _llvm.const(v * vec.count),
                                                 vec), align=4)
                      for v in range(NV)]  # fmt: skip
                if prefetch is not None:
                    prefetch(kk)
                arow = builder.mul(kk, _llvm.const(MR))
                out = []
                for i in range(mr):
                    x = builder.load(builder.gep(pa, [builder.add(arow, _llvm.const(i))]))
                    s = _llvm.splat(builder, vec, x)
                    out += [_llvm.fma(builder, vec, s, bv[v], acc[i * NV + v]) for v in range(NV)]
                return out

            acc = _llvm.loop(builder, k, mr * NV, zero, step)
            for i in range(mr):
                crow = _row_pointer(context, builder, signature, args, 6, _llvm.const(i))
                for v in range(NV):
                    ptr = _llvm.vec_ptr(builder, crow, _llvm.const(v * vec.count), vec)
                    old = builder.load(ptr, align=4)
                    value = builder.select(add, builder.fadd(old, acc[i * NV + v]), acc[i * NV + v])
                    builder.store(value, ptr, align=4)

        if not ahead:
            block(MR)
            return context.get_dummy_value()

        def body(heights):  # the shortest of these bodies that holds the block's rows
            if not heights:
                block(MR)
                return
            fits = builder.icmp_signed("<=", args[15], _llvm.const(heights[0]))
            with builder.if_else(fits, likely=False) as (few, more):
                with few:
                    block(heights[0])
                with more:
                    body(heights[1:])

        body((MR // 2, 3 * MR // 4))
        return context.get_dummy_value()

    return codegen


@intrinsic
def bcast(typingctx, a, ao, b, boffs, bi, bcol, c, coffs, ci, ccol, k, beta):
    """C[MR x NR] = A B (+= when beta != 0). A packed [k][MR] at a[ao:]; B row kk is
    b[boffs[bi + kk] + bcol:][:NR]; C row i is c[coffs[ci + i] + ccol:][:NR]. With
    beta, rows are read, added and written one after another, so C rows may
    overlap (the backward pass adds W^T dout straight into a padded dx)."""
    i64 = types.int64
    sig = types.void(a, i64, b, boffs, i64, i64, c, coffs, i64, i64, i64, i64)
    return sig, _bcast_codegen(False)


# A block of C whose real rows fit in half of it (the rest: padding up to whole blocks)
# runs a half-height body: LeNet-5's c1 (6 output channels) and c3's dx convolution (6
# input channels) computed 8 rows for 6 in blocks of 4 at 256 bits. Rows that fit in
# three quarters of it run a body that tall: c1 at 512 bits, 6 rows of 8 (its forward
# 0.282 -> 0.226 ms, b64, 1 thread, AMD EPYC Zen 4).
@intrinsic
def bcast_ahead(
    typingctx, a, ao, b, boffs, bi, bcol, c, coffs, ci, ccol, k, beta, pf, pf_at, lines, rows
):
    """``bcast`` on the block's first `rows` rows of C (at most MR: up to MR / 2 or 3 MR / 4
    of them compute only those), prefetching `lines` cache lines of pf from pf_at on, one a
    step (at most k of them): a hint that changes no result."""
    i64 = types.int64
    sig = types.void(a, i64, b, boffs, i64, i64, c, coffs, i64, i64, i64, i64, pf, i64, i64, i64)
    return sig, _bcast_codegen(True)


@intrinsic
def prefetch(typingctx, a, at):
    """A hint: the cache line holding a[at] (read, kept in all levels); no result."""
    sig = types.void(a, types.int64)

    def codegen(context, builder, signature, args):
        i8p = ir.IntType(8).as_pointer()
        name = "llvm.prefetch.p0i8"
        fn = builder.module.globals.get(name) or ir.Function(
            builder.module,
            ir.FunctionType(ir.VoidType(), [i8p, _llvm.I32, _llvm.I32, _llvm.I32]),
            name,
        )
        ptr = builder.bitcast(
            _llvm.base(context, builder, signature.args[0], args[0], args[1]), i8p
        )
        builder.call(
            fn,
            [ptr, ir.Constant(_llvm.I32, 0), ir.Constant(_llvm.I32, 3), ir.Constant(_llvm.I32, 1)],
        )
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def epilogue_rows(typingctx, p, p_at, p_stride, out, out_at, rows, n, bias, act, shift, want, res):
    """out[out_at + r*n:][:n] = act(p[p_at + r*p_stride:][:n] + bias) for r < rows (act 1:
    ReLU); returns (sum(y - shift), sum((y - shift)^2)) over them in float64 if `want`,
    else (0, 0). Whole vectors and a masked one a row, the sums in vector registers
    across the rows. `res`: None, or an array shaped as out whose elements are added
    before act (a residual add fused into the conv: act((p + bias) + res))."""
    i64 = types.int64
    f64 = types.float64
    sig = types.UniTuple(f64, 2)(p, i64, i64, out, i64, i64, i64, p.dtype, i64, f64, i64, res)
    residual = not isinstance(res, (types.NoneType, types.Omitted))

    def codegen(context, builder, signature, args):
        p_ary, p_at, p_stride, o_ary, o_at, rows, n, bias, act, shift, want, r_ary = args
        vec = _llvm.vector(signature.args[0].dtype)
        single = isinstance(vec.element, ir.FloatType)
        parts = 2 if single else 1  # float64 vectors a vector of data makes
        half = vec.count // parts
        dvec = ir.VectorType(ir.DoubleType(), half)
        pp = _llvm.base(context, builder, signature.args[0], p_ary, p_at)
        po = _llvm.base(context, builder, signature.args[3], o_ary, o_at)
        pr = _llvm.base(context, builder, signature.args[11], r_ary, o_at) if residual else None
        bv, kv = _llvm.splat(builder, vec, bias), _llvm.splat(builder, dvec, shift)
        relu = builder.icmp_signed("==", act, _llvm.const(1))
        full = builder.sdiv(n, _llvm.const(vec.count))
        rest = builder.sub(n, builder.mul(full, _llvm.const(vec.count)))
        tail = _llvm.lane_mask(builder, vec.count, rest)

        # ReLU as a lane mask (y = 0 where relu and not t > 0), not a select between two
        # vectors on the scalar flag: LLVM unswitched the rows loop on that flag, a copy
        # of it for each (more code in every conv build, for no speed)
        relu_lanes = _llvm.splat(builder, ir.VectorType(ir.IntType(1), vec.count), relu)

        def value(x, r=None):
            t = builder.fadd(x, bv)
            if r is not None:
                t = builder.fadd(t, r)
            off = builder.and_(builder.fcmp_unordered("<=", t, _llvm.zeros(vec)), relu_lanes)
            return builder.select(off, _llvm.zeros(vec), t)

        def part(v, i):  # lanes i*half .. (i + 1)*half - 1 of v
            if parts == 1:
                return v
            take = ir.Constant(
                ir.VectorType(_llvm.I32, half), list(range(i * half, (i + 1) * half))
            )
            return builder.shuffle_vector(v, v, take)

        def add(y, acc, mask):  # acc: sum(e), sum(e^2) per part, e = y - shift (0 past mask)
            out = []
            for i in range(parts):
                h = builder.fpext(part(y, i), dvec) if single else y
                e = builder.fsub(h, kv)
                if mask is not None:
                    e = builder.select(part(mask, i), e, _llvm.zeros(dvec))
                out += [builder.fadd(acc[2 * i], e), _llvm.fma(builder, dvec, e, e, acc[2 * i + 1])]
            return out

        def rows_loop(sums):
            def row(r, acc):
                src = builder.gep(pp, [builder.mul(r, p_stride)])
                dst = builder.gep(po, [builder.mul(r, n)])
                rsd = builder.gep(pr, [builder.mul(r, n)]) if residual else None

                def step(i, acc):
                    at = builder.mul(i, _llvm.const(vec.count))
                    x = builder.load(_llvm.vec_ptr(builder, src, at, vec), align=4)
                    rv = None
                    if residual:
                        rv = builder.load(_llvm.vec_ptr(builder, rsd, at, vec), align=4)
                    y = value(x, rv)
                    builder.store(y, _llvm.vec_ptr(builder, dst, at, vec), align=4)
                    return add(y, acc, None) if sums else []

                whole = _llvm.loop(builder, full, len(acc), _llvm.zeros(dvec), step)  # (from zero)
                acc = [builder.fadd(a, b) for a, b in zip(acc, whole, strict=True)]
                before = builder.block
                # the rest, masked, where there is one: an empty masked load and store are
                # not free without AVX-512 (rows of whole vectors: ResNet-20's at 256 bits)
                with builder.if_then(builder.icmp_signed(">", rest, _llvm.const(0))):
                    at = builder.mul(full, _llvm.const(vec.count))
                    x = _llvm.masked(builder, vec, _llvm.vec_ptr(builder, src, at, vec), tail)
                    rv = None
                    if residual:
                        rv = _llvm.masked(builder, vec, _llvm.vec_ptr(builder, rsd, at, vec), tail)
                    y = value(x, rv)
                    _llvm.store(builder, vec, _llvm.vec_ptr(builder, dst, at, vec), y, rest)
                    ends = add(y, acc, tail) if sums else []
                    tail_block = builder.block
                merged = []
                for a, e in zip(acc, ends, strict=True):
                    m = builder.phi(a.type)
                    m.add_incoming(a, before)
                    m.add_incoming(e, tail_block)
                    merged.append(m)
                return merged

            return _llvm.loop(
                builder, rows, 2 * parts if sums else 0, _llvm.zeros(dvec), row, False
            )

        result = cgutils.alloca_once_value(builder, context.make_tuple(
            builder, signature.return_type, [ir.Constant(ir.DoubleType(), 0.0)] * 2))  # fmt: skip
        with builder.if_else(builder.icmp_signed("!=", want, _llvm.const(0))) as (then, otherwise):
            with then:
                acc = rows_loop(True)
                totals = []
                for k in range(2):  # the float64 lanes, added up
                    v = acc[k]
                    for i in range(1, parts):
                        v = builder.fadd(v, acc[2 * i + k])
                    t = builder.extract_element(v, _llvm.const(0))
                    for lane in range(1, half):
                        t = builder.fadd(t, builder.extract_element(v, _llvm.const(lane)))
                    totals.append(t)
                builder.store(context.make_tuple(builder, signature.return_type, totals), result)
            with otherwise:
                rows_loop(False)
        return builder.load(result)

    return sig, codegen


@intrinsic
def masked_rows(typingctx, src, at, src_stride, y, dst, dst_at, dst_stride, rows, n, act):
    """dst[dst_at + r*dst_stride:][:n] = src[at + r*src_stride:][:n] for r < rows, 0
    where `act` (a fused ReLU) and y's element at the same place is not > 0. Whole
    vectors and a masked one a row: rows as short as LeNet-5's (28, 14 and 10 columns)
    fell to the scalar tail of the loops LLVM vectorises (c1's and c3's output-gradient
    gathers 0.10 and 0.067 ms a b64 batch, 1 thread, AMD EPYC Zen 5; now 0.058 and
    0.024)."""
    i64 = types.int64
    sig = types.void(src, i64, i64, y, dst, i64, i64, i64, i64, i64)
    return sig, _rows_codegen("masked")


@intrinsic
def add_rows(typingctx, src, at, src_stride, dst, dst_at, dst_stride, rows, n):
    """dst[dst_at + r*dst_stride:][:n] += src[at + r*src_stride:][:n] for r < rows, in
    whole vectors and a masked one a row: the unfolded taps' planes added up into dx (rows
    of 10 and fewer in LeNet-5's c3, which Numba's loops left to their scalar tails)."""
    i64 = types.int64
    return types.void(src, i64, i64, dst, i64, i64, i64, i64), _rows_codegen("add")


@intrinsic
def affine_rows(typingctx, src, at, src_stride, dst, dst_at, dst_stride, rows, n, a, b, relu):
    """dst[dst_at + r*dst_stride:][:n] = src[at + r*src_stride:][:n] * a + b for r < rows
    (a multiply, then an add: the batch norm's own rounding), 0 where `relu` and not > 0
    (NaN included), in whole vectors and a masked one a row: the input hook's copy of a
    stride-1 conv's samples, which Numba's loop over a row's elements ran at a third of
    this speed (ResNet-20's 16-channel convs at b128: 0.4 ms of a 4.7 ms forward)."""
    i64 = types.int64
    sig = types.void(src, i64, i64, dst, i64, i64, i64, i64, src.dtype, src.dtype, i64)
    return sig, _rows_codegen("affine")


@intrinsic
def norm_rows(
    typingctx, src, at, src_stride, y, dst, dst_at, dst_stride, rows, n, ka, kb, kc, sa, sb, relu
):
    """dst[dst_at + r*dst_stride:][:n] = ka*g + kb*y + kc for r < rows, g = src[at +
    r*src_stride:][:n] and y at the same place, g 0 where `relu` and not y*sa + sb > 0:
    the output-gradient hook (OUT_NORM, OUT_NORM_RELU) in whole vectors and a masked one
    a row, the float operations of the norm's own backward."""
    i64 = types.int64
    t = src.dtype
    sig = types.void(src, i64, i64, y, dst, i64, i64, i64, i64, t, t, t, t, t, i64)
    return sig, _rows_codegen("norm")


def _rows_codegen(kind, samples=False):
    """masked_rows' code (kind "masked"), add_rows' ("add"), affine_rows' ("affine") or
    norm_rows' ("norm"); with `samples`, the *_samples twins': three more arguments
    (count, src_step, dst_step), the rows repeated for each of `count` samples, src (and
    y) and dst moved on by their steps."""

    def codegen(context, builder, signature, args):
        if samples:
            args, (count, s_step, d_step) = args[:-3], args[-3:]
        if kind == "masked":
            s_ary, at, s_stride, y_ary, d_ary, d_at, d_stride, rows, n, act = args
            dst_ty = signature.args[4]
        elif kind == "norm":
            s_ary, at, s_stride, y_ary, d_ary, d_at, d_stride, rows, n = args[:9]
            ka, kb, kc, sa, sb, act = args[9:]
            dst_ty = signature.args[4]
        elif kind == "add":
            s_ary, at, s_stride, d_ary, d_at, d_stride, rows, n = args
            dst_ty = signature.args[3]
        else:
            s_ary, at, s_stride, d_ary, d_at, d_stride, rows, n, a, b, act = args
            dst_ty = signature.args[3]
        vec = _llvm.vector(signature.args[0].dtype)
        zero = _llvm.zeros(vec)
        ps0 = _llvm.base(context, builder, signature.args[0], s_ary, at)
        pd0 = _llvm.base(context, builder, dst_ty, d_ary, d_at)
        if kind != "add":
            plain = builder.icmp_signed("==", act, _llvm.const(0))  # no ReLU: lanes kept
            keep_all = _llvm.splat(builder, ir.VectorType(ir.IntType(1), vec.count), plain)
        py0 = None
        if kind in ("masked", "norm"):
            py0 = _llvm.base(context, builder, signature.args[3], y_ary, at)
        if kind == "affine":
            av, bv = _llvm.splat(builder, vec, a), _llvm.splat(builder, vec, b)
        if kind == "norm":
            kav, kbv, kcv = (_llvm.splat(builder, vec, k) for k in (ka, kb, kc))
            sav, sbv = _llvm.splat(builder, vec, sa), _llvm.splat(builder, vec, sb)

        def sample(ps, py, pd):
            def row(r, _):
                src_at = builder.mul(r, s_stride)
                src = builder.gep(ps, [src_at])
                out = builder.gep(pd, [builder.mul(r, d_stride)])

                def run(at, left, carried):  # whole vectors, then the row's rest, masked
                    s = _llvm.load(builder, vec, _llvm.vec_ptr(builder, src, at, vec), left)
                    dst = _llvm.vec_ptr(builder, out, at, vec)
                    if kind == "masked":  # s, or 0 where the ReLU's output was not > 0 (NaN
                        yr = builder.gep(py, [src_at])  # included)
                        yv = _llvm.load(builder, vec, _llvm.vec_ptr(builder, yr, at, vec), left)
                        keep = builder.or_(builder.fcmp_ordered(">", yv, zero), keep_all)
                        value = builder.select(keep, s, zero)
                    elif kind == "norm":  # ka*g' + kb*y + kc, g' = g or 0 where the ReLU was
                        yr = builder.gep(py, [src_at])
                        yv = _llvm.load(builder, vec, _llvm.vec_ptr(builder, yr, at, vec), left)
                        t = builder.fadd(builder.fmul(yv, sav), sbv)
                        keep = builder.or_(builder.fcmp_ordered(">", t, zero), keep_all)
                        g = builder.select(keep, s, zero)
                        value = builder.fadd(builder.fmul(kav, g), builder.fmul(kbv, yv))
                        value = builder.fadd(value, kcv)
                    elif kind == "add":
                        value = builder.fadd(_llvm.load(builder, vec, dst, left), s)
                    else:
                        t = builder.fadd(builder.fmul(s, av), bv)
                        keep = builder.or_(builder.fcmp_ordered(">", t, zero), keep_all)
                        value = builder.select(keep, t, zero)
                    _llvm.store(builder, vec, dst, value, left)
                    return carried

                _llvm.vectors(builder, n, vec.count, _llvm.const(0), run)
                return []

            _llvm.loop(builder, rows, 0, zero, row, False)

        if not samples:
            sample(ps0, py0, pd0)
            return context.get_dummy_value()

        def each(i, _):
            s_at, d_at_ = builder.mul(i, s_step), builder.mul(i, d_step)
            py = None if py0 is None else builder.gep(py0, [s_at])
            sample(builder.gep(ps0, [s_at]), py, builder.gep(pd0, [d_at_]))
            return []

        _llvm.loop(builder, count, 0, zero, each, False)
        return context.get_dummy_value()

    return codegen


# The same, for the rows of several samples at once (count, src_step, dst_step after the
# row functions' arguments): one call for all of a Winograd block's samples, where a call
# a sample (2 rows of 8 on 8x8 maps, ~9 ns a call) had been most of its transforms' copies
# (the input planes of a 64-channel 8x8 conv at b128 0.87-0.95 -> 0.43 ms, 1 thread, Intel
# Xeon model 207).
@intrinsic
def masked_samples(typingctx, src, at, src_stride, y, dst, dst_at, dst_stride, rows, n, act,
                   count, src_step, dst_step):  # fmt: skip
    i64 = types.int64
    sig = types.void(src, i64, i64, y, dst, i64, i64, i64, i64, i64, i64, i64, i64)
    return sig, _rows_codegen("masked", True)


@intrinsic
def add_samples(typingctx, src, at, src_stride, dst, dst_at, dst_stride, rows, n, count,
                src_step, dst_step):  # fmt: skip
    i64 = types.int64
    sig = types.void(src, i64, i64, dst, i64, i64, i64, i64, i64, i64, i64)
    return sig, _rows_codegen("add", True)


@intrinsic
def affine_samples(typingctx, src, at, src_stride, dst, dst_at, dst_stride, rows, n, a, b,
                   relu, count, src_step, dst_step):  # fmt: skip
    i64 = types.int64
    sig = types.void(src, i64, i64, dst, i64, i64, i64, i64, src.dtype, src.dtype, i64, i64,
                     i64, i64)  # fmt: skip
    return sig, _rows_codegen("affine", True)


@intrinsic
def norm_samples(typingctx, src, at, src_stride, y, dst, dst_at, dst_stride, rows, n, ka, kb,
                 kc, sa, sb, relu, count, src_step, dst_step):  # fmt: skip
    i64 = types.int64
    t = src.dtype
    sig = types.void(src, i64, i64, y, dst, i64, i64, i64, i64, t, t, t, t, t, i64, i64, i64,
                     i64)  # fmt: skip
    return sig, _rows_codegen("norm", True)


def _reduction(count, width):
    """How ``dot`` sums its `count` accumulators of `width` lanes: a tree of steps, each
    ("pair", a, b) or ("halve", a) on the list of live vectors, ending in vectors of one
    lane per accumulator. A pair of vectors, each of groups of l lanes (one group per
    accumulator), becomes one: the low half of every group plus its high half; a vector
    left without a partner is halved against itself. Returns the steps and the order
    of the accumulators in the result (a block of C in memory). Every accumulator's
    lanes are added pairwise, lane i + lane i + l/2, as a horizontal sum of its own
    would add them: the same bits, for a quarter of the shuffles and adds (the sums
    of 24 accumulators cost ~10% of a dot call over rows of ~1100 columns)."""
    live = [([a], width) for a in range(count)]  # (accumulators, lanes)
    steps = []
    lanes_per = width
    while lanes_per > 1:
        nxt = []
        for v in range(0, len(live) - 1, 2):
            assert live[v][1] == live[v + 1][1], "a pair of vectors of unequal widths"
            steps.append(("pair", v, v + 1))
            nxt.append((live[v][0] + live[v + 1][0], live[v][1]))
        if len(live) % 2:
            steps.append(("halve", len(live) - 1))
            nxt.append((live[-1][0], live[-1][1] // 2))
        steps.append(("level",))
        live = nxt
        lanes_per //= 2
    return steps, [a for accs, _ in live for a in accs]


def dot_order(itemsize: int) -> list[int]:
    """Where ``dot`` keeps C[i, j] in its block: the block's k-th element is C's
    element i*ND + j = dot_order(itemsize)[k]."""
    return _reduction(MD * ND, lanes(itemsize))[1]


@lru_cache(maxsize=2)
def _unblock_order(itemsize: int) -> np.ndarray:
    """Where each element of a ``dot`` block comes from in row-major order (the inverse
    of :func:`dot_order`). Cached: working it out took ~10 us of each conv backward
    call (LeNet-5's c3 is ~0.7 ms)."""
    inverse = np.argsort(dot_order(itemsize))
    inverse.flags.writeable = False
    return inverse


def dot_unblock(blocks: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The (rows, cols) matrix (a copy) that ``dot`` calls keep as blocks: block
    (r // MD, c // ND) at (r // MD) * MD * cols + (c // ND) * MD * ND, its elements in
    :func:`dot_order`."""
    b = blocks.reshape(rows // MD, cols // ND, MD * ND)
    inverse = _unblock_order(blocks.itemsize)
    b = b[:, :, inverse].reshape(rows // MD, cols // ND, MD, ND)
    return b.transpose(0, 2, 1, 3).reshape(rows, cols)


def _halves(builder, a, b, width, group, high):
    """The low (or high) half of every `group`-lane group of a, then of b."""
    half = group // 2
    first = half if high else 0
    take = [g * group + first + i for g in range(width // group) for i in range(half)]
    if b is None:
        return builder.shuffle_vector(a, a, ir.Constant(ir.VectorType(_llvm.I32, len(take)), take))
    take += [width + t for t in take]
    return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_llvm.I32, len(take)), take))


def _dot_codegen(a_table):
    """``dot``'s code; `a_table`: A's rows found through a table, as B's (``dot_rows``)."""

    def codegen(context, builder, signature, args):
        ib, ic = (4, 8) if a_table else (3, 7)  # where B's and C's arguments start
        c_ary, co, n = args[ic], args[ic + 1], args[ic + 2]
        vec = _llvm.vector(signature.args[0].dtype)
        pc = _llvm.base(context, builder, signature.args[ic], c_ary, co)
        if a_table:
            rows_a = [_row_pointer(context, builder, signature, args, 0, _llvm.const(i))
                      for i in range(MD)]  # fmt: skip
        else:
            pa = _llvm.base(context, builder, signature.args[0], args[0], args[1])
            rows_a = [builder.gep(pa, [builder.mul(args[2], _llvm.const(i))]) for i in range(MD)]
        rows_b = [
            _row_pointer(context, builder, signature, args, ib, _llvm.const(j)) for j in range(ND)
        ]

        def step(t, acc):
            at = builder.mul(t, _llvm.const(vec.count))
            av = [builder.load(_llvm.vec_ptr(builder, r, at, vec), align=4) for r in rows_a]
            bv = [builder.load(_llvm.vec_ptr(builder, r, at, vec), align=4) for r in rows_b]
            return [_llvm.fma(builder, vec, av[i], bv[j], acc[i * ND + j])
                    for i in range(MD) for j in range(ND)]  # fmt: skip

        zero = ir.Constant(vec, [0.0] * vec.count)
        steps = builder.sdiv(n, _llvm.const(vec.count))
        acc = _llvm.loop(builder, steps, MD * ND, zero, step)
        live = [(v, vec.count) for v in acc]  # (vector, its width)
        nxt = []
        group = vec.count
        for s in _reduction(MD * ND, vec.count)[0]:
            if s[0] == "pair":
                (x, w), (y, _) = live[s[1]], live[s[2]]
                lo = _halves(builder, x, y, w, group, False)
                hi = _halves(builder, x, y, w, group, True)
                nxt.append((builder.fadd(lo, hi), w))
            elif s[0] == "halve":
                x, w = live[s[1]]
                lo = _halves(builder, x, None, w, group, False)
                hi = _halves(builder, x, None, w, group, True)
                nxt.append((builder.fadd(lo, hi), w // 2))
            else:
                live, nxt, group = nxt, [], group // 2
        at = 0
        for v, w in live:
            ptr = builder.bitcast(builder.gep(pc, [_llvm.const(at)]), v.type.as_pointer())
            builder.store(builder.fadd(builder.load(ptr, align=4), v), ptr, align=4)
            at += w
        return context.get_dummy_value()

    return codegen


@intrinsic
def dot(typingctx, a, ao, lda, b, boffs, bi, bcol, c, co, n):
    """C[MD x ND] += A B^T: A = MD rows of a from ao (stride lda), B row j =
    b[boffs[bi + j] + bcol:], each n long (a multiple of the vector width). C is a
    block of MD*ND elements at c[co:], in :func:`dot_order` (blocks of a larger
    matrix: :func:`dot_unblock`)."""
    i64 = types.int64
    sig = types.void(a, i64, i64, b, boffs, i64, i64, c, i64, i64)
    return sig, _dot_codegen(False)


@intrinsic
def dot_rows(typingctx, a, aoffs, ai, acol, b, boffs, bi, bcol, c, co, n):
    """``dot`` with A's rows through a table too: A row i = a[aoffs[ai + i] + acol:]."""
    i64 = types.int64
    sig = types.void(a, aoffs, i64, i64, b, boffs, i64, i64, c, i64, i64)
    return sig, _dot_codegen(True)


# ---------------------------------------------------------------- stride-2 copies
# A stride-2 conv keeps its padded samples split into column phases (even and odd
# columns in rows of their own); copied element by element, with a stride, neither
# the split nor its adjoint (dx written back, usually added) vectorises: 16 -> 32
# channels, 32x32, b128 (1 thread, AMD EPYC Zen 5, 512-bit): 0.9 ms of the forward's
# 3.0 and 1.7 ms of the backward's 6.9. These move whole vectors of pairs and sort
# them with one shuffle (vpermt2ps), blocks of a register's lanes, then of half a
# register (a 16-wide row is 8 pairs); the caller copies the few pairs left.


def _split(stride):
    """The conv kernels' `split` argument: True where the stride-2 vector copies are
    wanted, else None, a build without them (each kernel compiles its own copy of the
    copies: with them in every build, LeNet-5's cold first step took ~30% more CPU)."""
    return True if int(stride[1]) == 2 else None


def _pair_blocks(builder, n, vec_count, block=None):
    """Emits block(u, width) over pairs [0, n): a loop of `vec_count`-pair blocks, then
    one block of each smaller width down to 4 where the pairs left fill one; returns the
    pairs done (block None: only counts them)."""
    full = builder.sdiv(n, _llvm.const(vec_count))
    if block is not None:
        _llvm.loop(builder, full, 0, ir.Constant(ir.VectorType(_llvm.I32, 1), None),
                   lambda i, _: block(builder.mul(i, _llvm.const(vec_count)), vec_count)
                   or [])  # fmt: skip
    done = builder.mul(full, _llvm.const(vec_count))
    width = vec_count // 2
    while width >= 4:
        fits = builder.icmp_signed(">=", builder.sub(n, done), _llvm.const(width))
        if block is not None:
            at = done
            with builder.if_then(fits):
                block(at, width)
        done = builder.select(fits, builder.add(done, _llvm.const(width)), done)
        width //= 2
    return done


def _pair_rows(context, builder, signature, args, operands, rows, n, block):
    """Emits, for each of `rows` rows, block(pointers, u, width) over its n pairs
    (_pair_blocks); operands: (argument index of an array, of its offset, of its row
    stride) each, the pointers those rows start at. Returns the pairs done a row."""
    vec = _llvm.vector(signature.args[operands[0][0]].dtype)
    bases = [
        _llvm.base(context, builder, signature.args[i], args[i], args[o]) for i, o, _ in operands
    ]

    def row(r, _):
        at = [builder.gep(p, [builder.mul(r, args[op[2]])])
              for p, op in zip(bases, operands, strict=True)]  # fmt: skip
        _pair_blocks(builder, n, vec.count, lambda u, width: block(at, u, width))
        return []

    _llvm.loop(builder, rows, 0, ir.Constant(ir.VectorType(_llvm.I32, 1), None), row)
    return _pair_blocks(builder, n, vec.count)  # counted again: the loop may not have run


@intrinsic
def deinterleave(typingctx, src, s0, ss, evens, e0, odds, o0, ds, n, rows):
    """For each row r < rows: evens[e0 + r*ds + u] = src[s0 + r*ss + 2u], odds[o0 + r*ds
    + u] = src[s0 + r*ss + 2u + 1] for the first u of n, in vector blocks; returns how
    many it did a row (the rest, under 4, is the caller's)."""
    i64 = types.int64
    sig = i64(src, i64, i64, evens, i64, odds, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        vec = _llvm.vector(signature.args[0].dtype)

        def block(at, u, width):
            ps, pe, po = at
            pairs = ir.VectorType(vec.element, 2 * width)
            half = ir.VectorType(vec.element, width)
            v = builder.load(
                _llvm.vec_ptr(builder, ps, builder.mul(u, _llvm.const(2)), pairs), align=4
            )
            for first, dst in ((0, pe), (1, po)):
                take = [2 * i + first for i in range(width)]
                part = builder.shuffle_vector(
                    v, v, ir.Constant(ir.VectorType(_llvm.I32, width), take)
                )
                builder.store(part, _llvm.vec_ptr(builder, dst, u, half), align=4)

        operands = ((0, 1, 2), (3, 4, 7), (5, 6, 7))
        return _pair_rows(context, builder, signature, args, operands, args[9], args[8], block)

    return sig, codegen


@intrinsic
def interleave(typingctx, evens, e0, odds, o0, ss, dst, d0, ds, n, rows, add):
    """For each row r < rows: dst[d0 + r*ds + 2u] = evens[e0 + r*ss + u], dst[d0 + r*ds
    + 2u + 1] = odds[o0 + r*ss + u] (+= with add != 0) for the first u of n, in vector
    blocks; returns how many it did a row (as deinterleave)."""
    i64 = types.int64
    sig = i64(evens, i64, odds, i64, i64, dst, i64, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        vec = _llvm.vector(signature.args[0].dtype)
        add = builder.icmp_signed("!=", args[10], _llvm.const(0))

        def block(at, u, width):
            pe, po, pd = at
            pairs = ir.VectorType(vec.element, 2 * width)
            half = ir.VectorType(vec.element, width)
            e = builder.load(_llvm.vec_ptr(builder, pe, u, half), align=4)
            o = builder.load(_llvm.vec_ptr(builder, po, u, half), align=4)
            take = [i // 2 + (width if i % 2 else 0) for i in range(2 * width)]
            v = builder.shuffle_vector(e, o, ir.Constant(ir.VectorType(_llvm.I32, 2 * width), take))
            ptr = _llvm.vec_ptr(builder, pd, builder.mul(u, _llvm.const(2)), pairs)
            old = builder.load(ptr, align=4)
            builder.store(builder.select(add, builder.fadd(old, v), v), ptr, align=4)

        operands = ((0, 1, 4), (2, 3, 4), (5, 6, 7))
        return _pair_rows(context, builder, signature, args, operands, args[9], args[8], block)

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


# ---------------------------------------------------------------- tiled conv2d
# Each thread owns a slice of the workspace and walks its own tiles (a band of
# output rows of one sample, or several small samples): it copies the samples,
# padded, into a private buffer and multiplies with the register-blocked
# micro-kernels, which find each im2col row through a table of offsets (an
# indirect GEMM). The padded samples are stored split into stride phases
# (pixel (y, x) in plane (y % sh, x % sw) at (y // sh, x // sw)), and the samples
# of a tile side by side within each row of a plane, so im2col row (c, i, j) of a
# tile IS a run of one plane, for any stride: nothing is unfolded. The product
# runs over the planes' full width wq per sample (columns past ow are junk: the
# epilogue drops them and the backward pass gives them zero gradient), and the
# backward pass adds W^T dout straight into the padded dx (bcast reads, adds and
# writes its C rows one after another, so the overlapping rows of neighbouring
# (i, j) are safe). Side by side, not stacked: stacked samples would add kh - 1
# junk rows each (8x8 maps: 36% junk columns against 20%; measured 10% faster).
#
# The forward pass splits the tiles among threads; the backward pass gives each
# thread whole samples (their dx bands overlap) and private dW / db sums, added
# up afterwards in thread order. Product columns are padded to whole panels (NR),
# and each group's rows to whole blocks of the micro-kernel that reads them
# (zero weights): ogb, kgb round og, kg up to MR (bcast), ogd to MD and kgd to
# ND (dot; ND and MD where dW is taken as its transpose, _dw_swapped).
#
# Per thread: padded samples [c][sh][sw][hq][s][wq] and their gradient, a zero
# row and a sink row (what padding rows of the blocks read and write), the
# product or dout [g*ogb + o][tcp] (column r*spt*wq + s*wq + x), dW [g][ogd][kgd]
# (or [g][kgd][ogd]), db.

ACT_NONE, ACT_RELU = 0, 1
_TILE_ELEMENTS = 1 << 18  # a tile's (virtual) im2col matrix, 1 MiB in float32.
# Measured on 2 cores over the ResNet-20 / VGG-small convs (forward + backward):
# 128K elements starve the dW dot products of long rows (big layers 1.5x slower),
# 512K falls out of L2 on small ones (up to 1.2x slower).
_DW_COLUMNS = 1024  # the dW dot products take a tile's columns in runs of about this
# many, each run through all the products: a thin conv's tile is ~10K columns (LeNet-5's
# c1: 25 rows of im2col), and whole rows of it streamed from L2 for each product block;
# a run's rows (10 of 1024) stay in L1 for all of them. 1 thread, 512-bit, Intel Xeon
# (model 207), backward ms: c1 0.47 -> 0.40, c3 0.89 -> 0.74, ResNet-20's conv1 2.7 ->
# 2.2, VGG-small's conv1_1 5.7 -> 5.0 (512-1024 alike; tiles of 1.5 runs or fewer kept
# whole: ResNet-20's 16 channels, 1056 columns, ran 2-4% slower in runs of 1024 and 32).


_MIN_COLUMNS = 512  # wide layers (VGG-16's 256 channels at 56x56: one row per tile by
# the budget above) still get long tiles: panel padding and short dW rows cost more
# than the cache they overflow (VGG-16 block 3 conv 2, b2: 100 -> 52 ms fwd + bwd;
# 256 columns: 1.1x slower, 1024: the same as 512)


# A conv on one thread (one Numba thread, or a workspace with room for one) runs the
# kernels' serial builds, which compile in a third of the CPU time: LeNet-5's cold first
# step on one thread 8.9 -> 5.4 s. Running small convs serially on more threads as well
# was measured and left out: on the shared 2-core machine under others' load it was
# faster (LeNet-5 b64 step 0.95x the time), but LeNet-5 b64 gains 1.23x from a second
# thread on a quiet one (benchmarks/results/2026-12-02-cpu-t*-512), nearly all of it in
# its convs; their parallel builds cost ~3.5 s of CPU more, once.


def _round_up(n, m):
    return -(-n // m) * m


class _Geometry(NamedTuple):
    hq: int  # height and width of a stride phase of a padded sample
    wq: int
    rows: int  # output rows per tile
    tiles: int  # tiles per sample (bands of rows)
    spt: int  # samples per tile (several small ones, else 1)
    tcp: int  # product columns per tile, padded to whole panels
    ogb: int  # output channels per group, padded to whole bcast blocks
    ogd: int  # ... to whole dot blocks (MD rows, or ND with swap)
    kgb: int  # im2col rows per group, padded to whole bcast blocks
    kgd: int  # ... to whole dot blocks (ND rows, or MD with swap)
    pad_size: int  # padded samples, with slack for the padding columns' reads
    per_thread: int  # workspace elements per thread
    wpack: int  # packed weights, shared by the threads
    swap: int  # 1: dW's dot products take it as its transpose (_dw_swapped)


# dW's products (``dot``: MD rows of A against ND of B) run over dout's rows as A and
# the im2col rows as B, or the other way round where that pads much less: dout's rows
# are padded to whole blocks of the side they are on, and so are the im2col rows.
# LeNet-5's c1 (6 output channels, 25 im2col rows) at 512 bits: 8 x 30 rows' worth, or
# 6 x 28 the other way round; its dW 1.2x faster (1 thread, AMD EPYC Zen 5). The other
# way round streams more of dout per multiply-add (ND of its rows a call, not MD): its
# c3 at 256 bits (16 x 152, or 16 x 150) ran 1.1x slower.
def _dw_swapped(og, kg):
    """Whether dW's products take dout's rows as B (and the im2col rows as A): where
    that pads at least a fifth less."""
    swapped = _round_up(og, ND) * _round_up(kg, MD)
    return 5 * swapped <= 4 * _round_up(og, MD) * _round_up(kg, ND)


# Samples side by side in a padded row give each row of the product (the im2col
# matrix's columns) wq columns for ow outputs: the wq - ow junk ones are multiplied like
# the rest, forward, for dW and for dx. Where they are a large share (LeNet-5's c3, 5x5
# 'valid' on 14x14 maps: 14 columns for 10), the padded samples are unfolded instead: a
# plane per column tap j, holding padded columns j*d .. j*d + ow - 1 of every row, so
# im2col row (c, i, j) is plane (c, j) from row i, rows ow long, no junk; the padded
# samples take kw times the copies (and dx adds the planes back up). Measured with
# benchmarks/unfold_ab.py (AMD EPYC Zen 4, 512-bit, phase-split time over unfolded,
# forward / backward, 1 thread | 2): LeNet-5's c3 (29% junk, b64) 1.27 / 1.23 | 1.26 /
# 1.23 (1.19 / 1.10 at 256 bits, 1 thread); 3x3 'valid' on 12x12, 32 channels (17%)
# 1.22 / 1.10 | 1.21 / 1.15; GoogLeNet's 5x5 on 7x7 (22%) 1.08 / 0.99 | 1.22 / 1.10; at
# 11-12.5%: LeNet-5's c1 0.97 / 0.99 (0.94 / 0.86 at 256 bits: the copies cost what the
# junk did, 6 outputs from one channel), 3x3 192 -> 384 on 7x7 1.08 / 1.10 | 0.99 / 1.00,
# ResNet-20's 8x8 1.00 / 0.97 | 0.96 / 0.91.
_UNFOLD_JUNK = 0.15  # the share of junk columns from which a stride-1 conv unfolds


def _taps(x_shape, w_shape, out_shape, stride, pad, dilation):
    """Planes per input channel for the column taps: kw where the padded samples are
    unfolded, else 1."""
    kw, w, ow = int(w_shape[3]), int(x_shape[3]), int(out_shape[3])
    pl, pr, dw = int(pad[2]), int(pad[3]), int(dilation[1])
    if tuple(int(s) for s in stride) != (1, 1) or kw == 1:
        return 1
    wq = _split_width(w, kw, pl, pr, dw)
    return kw if wq - ow >= _UNFOLD_JUNK * wq else 1


def _split_width(w, kw, pl, pr, dw):
    """A padded row's columns in the phase-split samples of a stride-1 conv (_geometry)."""
    return w + pl if pr <= pl and pr <= (kw - 1) * dw else w + pl + pr


def _geometry(
    x_shape, w_shape, out_shape, stride, pad, dilation, itemsize, threads, rows=None, space=None
):
    """Tile sizes: `rows` output rows per tile, else as many rows, or whole samples,
    as fill _TILE_ELEMENTS (leaving two tiles per thread) and, when `space`
    (workspace elements per thread) is given, fit in it."""
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    oh = out_shape[2]
    g = c // cg
    og, kg, k = o // g, cg * kh * kw, c * kh * kw
    sh, sw = (int(s) for s in stride)
    pt, pb, pl, pr = (int(p) for p in pad)
    hq, wq = -(-(h + pt + pb) // sh), -(-(w + pl + pr) // sw)
    taps = _taps(x_shape, w_shape, out_shape, stride, pad, dilation)
    if taps > 1:  # a plane per column tap, rows as wide as the output's (_taps)
        wq = out_shape[3]
    elif sw == 1:
        # neighbours share their padding columns: a sample's right padding is the left
        # padding of the one beside it (or of the next row's), so fewer junk columns (3x3,
        # pad 1: 8x8 maps 9 columns a row, not 10; ResNet-20's eval forward, 1 thread:
        # 8x8 convs 1.15x, 16x16 1.06x, 32x32 1.05x faster)
        wq = _split_width(w, kw, pl, pr, int(dilation[1]))
    nr = panel(itemsize)
    ogb, kgb = _round_up(og, MR), _round_up(kg, MR)
    swap = _dw_swapped(og, kg)
    md_o, nd_k = (ND, MD) if swap else (MD, ND)  # the dot blocks' sides dout and im2col are on
    ogd, kgd = _round_up(og, md_o), _round_up(kg, nd_k)

    def layout(rows, spt):
        tcp = _round_up(rows * spt * wq, nr)
        pad_size = c * sh * sw * taps * spt * hq * wq + nr + kw * int(dilation[1]) + wq
        # padded x and dx, zero and sink rows, the product, dW, db
        size = 2 * pad_size + 2 * tcp + g * max(ogb, ogd) * tcp + g * ogd * kgd + o
        dxc = _dx_conv(x_shape, w_shape, out_shape, stride, pad, dilation, rows, spt, nr)
        if dxc is not None:  # then the dx convolution's padded dout and product
            size += dxc.size
        return tcp, pad_size, size

    spt = 1
    if rows is None:
        rows = max(1, min(oh, max(_TILE_ELEMENTS // (k * wq), -(-_MIN_COLUMNS // wq))))
        if rows == oh:
            spt = max(1, min(_TILE_ELEMENTS // (k * oh * wq), -(-n // (2 * threads))))
            if sh * sw > 1:  # a strided conv's padded samples hold sh*sw times its output's
                # pixels: at most a quarter of the budget (with their gradient and the next
                # samples prefetched they overflowed L2: 16 -> 32 channels, 32x32 -> 16x16,
                # b128, 1 thread, AMD EPYC Zen 5: 6 samples a tile -> 3, backward 1.06x
                # faster, forward 1.03x). Unfolded samples (kw times the input) take no such
                # cap: counted kw times in it, GoogLeNet's 3x3 192 -> 384 on 7x7 maps ran one
                # sample a tile, 0.75x the phase-split speed (1.08x uncapped), and LeNet-5's
                # c3 lost 2-5% (benchmarks/unfold_ab.py, 1 thread, Zen 4)
                spt = max(1, min(spt, _TILE_ELEMENTS // (4 * c * sh * sw * hq * wq)))
        if space is not None:
            while spt > 1 and layout(rows, spt)[2] > space:
                spt -= 1
            while rows > 1 and layout(rows, 1)[2] > space:
                rows -= 1
        # as few samples a tile as make the same number of tiles: a tile computes all
        # its columns, so a last tile of fewer samples costs a full one (LeNet-5's c3,
        # b64: 12 samples a tile, 72 computed; 11: 66). A thread's samples, as the
        # backward pass splits them (LeNet-5 b64 step, 1 thread, AMD EPYC Zen 3, best
        # of 9 alternating: 4.00 -> 3.89 ms, 4.31 -> 4.08 in a slower hour)
        per = -(-n // threads)
        spt = -(-per // -(-per // spt))
    rows = max(1, min(rows, oh))
    tiles = -(-oh // rows)
    rows = -(-oh // tiles)  # bands of even height
    tcp, pad_size, size = layout(rows, spt)
    wpack = g * max(ogb * kg, kgb * og, _round_up(cg, MR) * og * kh * kw)
    return _Geometry(
        hq, wq, rows, tiles, spt, tcp, ogb, ogd, kgb, kgd, pad_size, size, wpack, int(swap)
    )


# The input gradient of a stride-1 conv is itself a conv: dx = conv(dout padded by
# d*(k-1) - p, W with O and C/g swapped per group and flipped in both spatial axes),
# a reduction over og*kh*kw (ResNet-20's first stage: 144) written once. The
# transposed product (dx += W^T dout into the padded dx, a reduction over og alone)
# pays a read-modify-write of 8 overlapping rows per og FMA steps. Measured (1 thread,
# 512-bit, ResNet-20 b128 with its norms fused): dx 8.1 -> 4.5 ms (16 channels,
# 32x32), 6.8 -> 4.1 (32, 16x16), 6.7 -> 4.8 (64, 8x8); the step's conv backward
# 200 -> 170 ms. The padded dout is copied from the tiles dW reads (_gather's), so
# the ReLU mask and the norm's gradient are formed once; where the layouts allow
# (`shared`), the tiles are gathered into it and dW reads them there: no copy (ResNet-20
# b128's backward, 1 thread, Zen 5: 2.2-2.7 ms a step of 100-104 in its 16 stride-1
# 3x3 convs at 512 bits, 3.5 of 200 at 256).
class _DxConv(NamedTuple):
    hq: int  # height and width of a padded sample of dout
    wq: int
    pt: int  # dout's padding: top and left
    pl: int
    rows: int  # dx rows per band
    tiles: int  # bands per sample
    tcp: int  # product columns per band, padded to whole panels
    cgb: int  # input channels per group, padded to whole bcast blocks
    pad_size: int  # padded dout samples, with slack for the padding columns' reads
    size: int  # per thread: padded dout and the product
    shared: int  # 1: the dW products read dout's rows from the padded dout (_dx_conv)


def _dx_conv(x_shape, w_shape, out_shape, stride, pad, dilation, rows, spt, nr):
    """The dx convolution's sizes, for backward tiles of `rows` output rows and `spt`
    samples; None where dx cannot be one (a stride, or padding beyond the kernel's
    reach) or does not pay (_dx_as_conv): the workspace has room for it only there."""
    n, c, h, w = x_shape
    o, cg, kh, kw = w_shape
    oh, ow = out_shape[2], out_shape[3]
    sh, sw, pt, pb, pl, pr, dh, dw = _unpack(stride, pad, dilation)
    qt, qb, ql, qr = dh * (kh - 1) - pt, dh * (kh - 1) - pb, dw * (kw - 1) - pl, dw * (kw - 1) - pr
    if sh != 1 or sw != 1 or min(qt, qb, ql, qr) < 0:
        return None
    if not _dx_as_conv(x_shape, w_shape, out_shape, dilation):
        return None
    hq, wq = oh + qt + qb, ow + ql + qr
    if qr <= ql:  # neighbours share their padding columns, as in _geometry (3x3, pad 1,
        # 8x8 maps: 9 columns a row, not 10; ResNet-20's backward, 1 thread, Zen 5: 64
        # channels 8x8 1.05x, 32 at 16x16 and 16 at 32x32 1.01x faster)
        wq = ow + ql
    rows = h if rows >= oh else min(rows, h)
    tiles = -(-h // rows)
    rows = -(-h // tiles)
    tcp = _round_up(rows * spt * wq, nr)
    cgb = _round_up(cg, MR)
    pad_size = o * spt * hq * wq + nr + kw * dw + wq
    size = pad_size + (c // cg) * cgb * tcp
    # Whole-sample tiles whose dout rows are laid out as the padded dout's (the forward's
    # padded rows as wide as dout's: pl == pr) are gathered straight into it, and the dW
    # products read them there: a tile's row of dout, [r][s][x] at stride spt * wq, is a
    # run of a channel of it, its junk columns the padding columns, and what the panels
    # add past the last row the bottom and next top padding rows (zeros). Rows of dot
    # blocks past og would be another group's, so og fills whole blocks.
    wq_x = _split_width(w, kw, pl, pr, dw)  # _geometry's wq
    tail = _round_up(oh * spt * wq_x, nr) - oh * spt * wq_x  # the panels' slack columns
    og, kg = o * cg // c, cg * kh * kw
    shared = rows >= oh and wq_x == wq and og % MD == 0 and tail <= (qb + qt) * spt * wq
    shared = shared and not _dw_swapped(og, kg)  # (the swapped products read dprod's rows)
    shared = shared and _taps(x_shape, w_shape, out_shape, stride, pad, dilation) == 1
    return _DxConv(hq, wq, qt, ql, rows, tiles, tcp, cgb, pad_size, size, int(shared))


# The dx convolution's multiply-adds over the transposed product's (both with their
# padding rows and columns) beyond which the transposed product stays. The convolution
# runs at a higher FLOP rate (ResNet-20's 3x3 'same' convs, ratio 1.0: dx 1.4-2.2x
# faster with the 512-bit kernels, 1.1-1.4x with the 256-bit ones) but multiplies all
# of dout's padding, which a 'valid' conv on a small map makes large. Measured, 1
# thread, 512-bit: ratio 1.33-1.67 1.2-1.6x faster, 1.8 1.0-1.25x, LeNet-5's c3 (2.4)
# 0.8x; 256-bit: 1.33-1.4 0.85-1.0x, 1.8 0.7-0.9x.
_DX_CONV_MAX_WORK = 1.75 if _WIDE else 1.25


def _dx_as_conv(x_shape, w_shape, out_shape, dilation):
    """Whether dx is taken as a convolution where it can be one (a stride-1 conv)."""
    h, w = x_shape[2], x_shape[3]
    o, cg, kh, kw = w_shape
    oh, ow = out_shape[2], out_shape[3]
    og = o * cg // x_shape[1]
    dw = int(dilation[1])
    wq_x = ow + dw * (kw - 1)  # a padded row of x, stride 1
    transposed = oh * wq_x * _round_up(cg * kh * kw, MR) * og
    as_conv = h * (w + dw * (kw - 1)) * _round_up(cg, MR) * og * kh * kw
    return as_conv <= _DX_CONV_MAX_WORK * transposed


def conv2d_workspace(
    x_shape,
    w_shape,
    out_shape,
    stride=(1, 1),
    pad=(0, 0, 0, 0),
    dilation=(1, 1),
    itemsize=4,
    tile_rows=None,
) -> int:
    """Elements of workspace a conv2d needs for all of Numba's threads: each takes
    padded samples and their gradient, one tile's product and private dW / db sums
    (and, where dx is a convolution, padded samples of dout and a band of dx); the
    packed weights are shared. A smaller workspace runs smaller tiles
    (`tile_rows` output rows each), or fewer threads."""
    threads = numba.get_num_threads()
    shapes = (x_shape, w_shape, out_shape, stride, pad, dilation, itemsize, threads)
    geo = _geometry(*shapes, rows=tile_rows)
    size = geo.per_thread * threads + geo.wpack
    groups = x_shape[1] // w_shape[1]
    if winograd.chooses(x_shape, w_shape, out_shape, stride, pad, dilation, groups):
        size = max(size, winograd.workspace(x_shape, w_shape, out_shape, itemsize))
    return size


# Inner loops index views with the loop variable alone: an index like s + q, whose
# sign Numba cannot see, gets a negative-index check that stops LLVM vectorizing
# the loop (measured: a 10x slower copy).
#
# Jitted code here writes `a if a < b else b`, not min(a, b): each builtin call compiles a
# Numba function of its own (per signature and build flags) on a cold start.


# The input hook (`in_affine`, see _common.input_hook): a batch norm, and the ReLU
# after it, that would write its output only for this conv to read is applied here
# instead, per input channel as the samples are copied in. The padding stays zero: it
# pads the normalised input. The same float operations as the norm's own pass, so the
# same values (and ReLU mask).


@njit(inline="always", nogil=True)  # inlined in Numba's IR: no compile of its own
def _tap_run(j, dw, pl, w_, wq):
    """Where tap j's plane of unfolded samples (_taps) holds the interior: its columns u ..
    u + m - 1 (none where m <= 0) hold input columns x0 .. x0 + m - 1."""
    e = j * dw  # the plane's column u holds padded column u + e
    u = pl - e if pl > e else 0
    m = (pl + w_ - e if pl + w_ - e < wq else wq) - u
    return u, m, u + e - pl


@njit(**HELPER, nogil=True)
def _pad_samples(x, n0, ns, spt, dims, hq, wq, xpad, aff, mode, clear, split):
    """xpad = x[n0 : n0 + ns] padded by (pt, pl) and split into stride phases:
    padded pixel (y, x) of channel c, sample s at [c][y % sh][x % sw][y // sh][s][x // sw],
    or unfolded (dims[8] = kw taps, stride 1: _taps) at [c][j][y][s][x - j*dw] for each
    tap j whose plane rows, wq long, hold column x; the interior through the input hook
    (aff: (2, C) scale and shift, `mode`; aff None: a build without the hook, whose
    branches Numba prunes before compiling). The padding
    is zeroed with `clear` (a thread's first samples of a call: the workspace may be
    another layer's in between), else left as the last call wrote it: the same places
    every call, and no call writes them. Slots past ns keep the last samples (their
    columns are junk, which nothing reads or multiplies by a nonzero gradient). `split`
    None: a build without the stride-2 vector copies (_split), else True."""
    sh, sw, pt, pl, dw, taps = dims[0], dims[1], dims[2], dims[3], dims[5], dims[8]
    c_, h_, w_ = x.shape[1], x.shape[2], x.shape[3]
    if clear:
        xpad[:] = 0
    zero = xpad.dtype.type(0)  # a literal 0.0 would make the ReLU's select (and its
    # vectors) float64
    line = spt * wq  # a row of a plane: the samples side by side
    phase = hq * line  # a plane
    # divisions hoisted out of the row loops (they cost more than a row's copy: 16 -> 32
    # channels at stride 2, 32x32, b128: 3.5 -> 1.0 ms): per phase ph, its first input
    # column, how many columns, and where they land
    # (flat: a 2-d np.empty compiled one more Numba function on a cold start)
    first = np.empty(3 * sw, np.int64)
    x0 = (sw - pl % sw) % sw  # (ph - pl) % sw, counted along: as divisions, this loop was
    for ph in range(sw):  # vectorised when a caller re-optimised this function (4x its code)
        m = (w_ - x0 + sw - 1) // sw
        first[ph], first[sw + ph] = x0, m if m > 0 else 0
        first[2 * sw + ph] = ph * phase + (x0 + pl) // sw
        x0 = x0 + 1 if x0 + 1 < sw else 0
    one, two = np.uint64(1), np.uint64(2)
    pairs = w_ // 2
    x_flat = x.reshape(-1)  # (x is C-contiguous)
    for c in range(c_):
        if aff is not None:
            ca = c if mode != IN_COPY else 0
            a, b = aff[0, ca], aff[1, ca]
        for s in range(ns):
            if split is not None and sw == 2:  # even and odd columns, a vector of pairs
                # at a time, the rows of a row phase in one call
                for j in range(sh if sh < h_ else h_):  # input rows j, j + sh, ...
                    rows = (h_ - j + sh - 1) // sh
                    at = (((c * sh + (j + pt) % sh) * sw) * hq + (j + pt) // sh) * line + s * wq
                    de, do = at + first[4 + pl % 2], at + first[4 + 1 - pl % 2]
                    row = ((n0 + s) * c_ + c) * h_ * w_ + j * w_  # (x is C-contiguous)
                    u = deinterleave(x, row, sh * w_, xpad, de, xpad, do, line, pairs, rows)
                    for r in range(rows):
                        yi, e0, o0 = j + r * sh, np.uint64(de + r * line), np.uint64(do + r * line)
                        for v in range(np.uint64(u), np.uint64(pairs)):
                            xpad[e0 + v] = x[n0 + s, c, yi, two * v]
                            xpad[o0 + v] = x[n0 + s, c, yi, two * v + one]
                        if w_ > 2 * pairs:
                            xpad[e0 + np.uint64(pairs)] = x[n0 + s, c, yi, w_ - 1]
                        if aff is not None and mode != IN_COPY:  # (IN_COPY: x * 1 + 0)
                            for d, m in ((e0, w_ - pairs), (o0, pairs)):
                                for v in range(np.uint64(m)):
                                    e = xpad[d + v] * a + b
                                    xpad[d + v] = e if (mode != IN_AFFINE_RELU or e > 0) else zero
                continue
            if sh == 1 and sw == 1:  # the planes' rows in vectors
                for j in range(taps):
                    u, m, x0 = _tap_run(j, dw, pl, w_, wq)
                    if m > 0:
                        plane = ((n0 + s) * c_ + c) * h_ * w_ + x0
                        at = ((c * taps + j) * hq + pt) * line + s * wq + u
                        if aff is None:  # (alone in its test: pruned in the build without)
                            masked_rows(x_flat, plane, w_, x_flat, xpad, at, line, h_, m, 0)
                        elif mode == IN_COPY:
                            masked_rows(x_flat, plane, w_, x_flat, xpad, at, line, h_, m, 0)
                        else:  # the input hook: x * scale + shift (then its ReLU)
                            relu = 1 if mode == IN_AFFINE_RELU else 0
                            affine_rows(x_flat, plane, w_, xpad, at, line, h_, m, a, b, relu)
                continue
            py, qy = pt % sh, pt // sh  # row y = yi + pt: plane row y % sh, at y // sh
            for yi in range(h_):
                at = (((c * sh + py) * sw * taps) * hq + qy) * line + s * wq  # phase 0's row
                if sw == 1:  # whole rows: a contiguous copy (a strided view is 5x slower)
                    for j in range(taps):
                        u, m, x0 = _tap_run(j, dw, pl, w_, wq)
                        if m <= 0:
                            continue
                        d, src = np.uint64(at + j * hq * line + u), np.uint64(x0)
                        if aff is None:  # (the loops written out: a helper cost two more
                            for v in range(np.uint64(m)):  # compiled signatures cold)
                                xpad[d + v] = x[n0 + s, c, yi, src + v]
                        else:  # one loop for every mode (a loop per mode: 10% slower)
                            for v in range(np.uint64(m)):
                                t = x[n0 + s, c, yi, src + v] * a + b
                                xpad[d + v] = t if (mode != IN_AFFINE_RELU or t > 0) else zero
                else:
                    for ph in range(sw):  # every sw-th input column lands in phase ph
                        m, d = first[sw + ph], np.uint64(at + first[2 * sw + ph])
                        x0u, swu = np.uint64(first[ph]), np.uint64(sw)
                        for u in range(np.uint64(m)):  # (unsigned throughout: an index
                            # both signed and unsigned would be typed float64)
                            e = x[n0 + s, c, yi, x0u + u * swu]
                            if aff is not None:
                                e = e * a + b
                                e = e if (mode != IN_AFFINE_RELU or e > 0) else zero
                            xpad[d + u] = e
                py += 1
                if py == sh:
                    py = 0
                    qy += 1


# No views of rows in the copies' loops (x[n, c, y], xpad[a:b]): indices, unsigned
# where their sign is not plain to Numba (else each gets a wrap-around check, which
# stops LLVM vectorising the loop: a 10x slower copy). A view is reference counted,
# two atomic operations a row, which Numba's pruning removed or not as the code
# around it changed: once kept, 28% of a 16-channel 32x32 conv's forward.


@njit(**HELPER, nogil=True)
def _unpad_samples(dxpad, n0, ns, spt, dims, hq, wq, dx, accumulate, split):
    """dx[n0 : n0 + ns] = (or +=, `accumulate`) the interior of the phase-split dxpad
    (the adjoint of padding; of unfolding: the taps' planes added up). Indices, not
    row views (see above): with views, LeNet-5's c3 (rows of 14) paid two reference-count
    increments and decrements a row, 0.13 ms a call against 0.027 without them. `split`
    as in _pad_samples."""
    sh, sw, pt, pl, dw, taps = dims[0], dims[1], dims[2], dims[3], dims[5], dims[8]
    c_, h_, w_ = dx.shape[1], dx.shape[2], dx.shape[3]
    line = spt * wq
    phase = hq * line
    one, two = np.uint64(1), np.uint64(2)
    pairs = w_ // 2
    dx_flat = dx.reshape(-1)  # (dx is C-contiguous)
    if taps > 1:  # unfolded: the taps' planes added up, their rows in vectors, a tap at a
        # time. Rows closer than a vector are taken `k` apart (k passes): each load of a
        # row overlapping the vector just stored to the row before waited for that store
        # (LeNet-5's c3, b64, dx rows of 14, 512-bit: these sums 0.21 -> 0.05 ms)
        k = -(-(VECTOR_BYTES // dx.itemsize) // w_)
        first, size = n0 * c_ * h_ * w_, ns * c_ * h_ * w_
        if not accumulate:
            for v in range(np.uint64(size)):
                dx_flat[np.uint64(first) + v] = 0
        for j in range(taps):
            u, m, x0 = _tap_run(j, dw, pl, w_, wq)
            for c in range(c_ if m > 0 else 0):
                for s in range(ns):
                    at = ((c * taps + j) * hq + pt) * line + s * wq + u
                    plane = ((n0 + s) * c_ + c) * h_ * w_ + x0
                    for q in range(k if k < h_ else h_):
                        rows = (h_ - q + k - 1) // k
                        add_rows(dxpad, at + q * line, k * line, dx_flat, plane + q * w_,
                                 k * w_, rows, m)  # fmt: skip
        return
    for c in range(c_):
        for s in range(ns):
            if split is not None and sw == 2:  # even and odd columns, a vector of pairs
                # at a time, the rows of a row phase in one call
                for j in range(sh if sh < h_ else h_):  # dx rows j, j + sh, ...
                    rows = (h_ - j + sh - 1) // sh
                    at = (((c * sh + (j + pt) % sh) * sw) * hq + (j + pt) // sh) * line + s * wq
                    de = at + (pl % 2) * phase + pl // 2
                    do = at + (1 - pl % 2) * phase + (pl + 1) // 2
                    row = ((n0 + s) * c_ + c) * h_ * w_ + j * w_  # (dx is C-contiguous)
                    u = interleave(dxpad, de, dxpad, do, line, dx, row, sh * w_, pairs, rows,
                                   accumulate)  # fmt: skip
                    for r in range(rows):
                        yi, e0, o0 = j + r * sh, np.uint64(de + r * line), np.uint64(do + r * line)
                        for v in range(np.uint64(u), np.uint64(pairs)):
                            e, o = dxpad[e0 + v], dxpad[o0 + v]
                            if accumulate:
                                e += dx[n0 + s, c, yi, two * v]
                                o += dx[n0 + s, c, yi, two * v + one]
                            dx[n0 + s, c, yi, two * v], dx[n0 + s, c, yi, two * v + one] = e, o
                        if w_ > 2 * pairs:
                            e = dxpad[e0 + np.uint64(pairs)]
                            if accumulate:
                                e += dx[n0 + s, c, yi, w_ - 1]
                            dx[n0 + s, c, yi, w_ - 1] = e
                continue
            if not accumulate and sh == 1 and sw == 1:  # the plane's rows in vectors
                plane = ((n0 + s) * c_ + c) * h_ * w_
                at = (c * hq + pt) * line + s * wq + pl
                masked_rows(dxpad, at, line, dxpad, dx_flat, plane, w_, h_, w_, 0)
                continue
            py, qy = pt % sh, pt // sh  # row y = yi + pt: plane row y % sh, at y // sh
            for yi in range(h_):
                at = (((c * sh + py) * sw) * hq + qy) * line + s * wq  # phase 0's row
                if sw == 1:
                    d = np.uint64(at + pl)
                    if accumulate:
                        for v in range(np.uint64(w_)):
                            dx[n0 + s, c, yi, v] += dxpad[d + v]
                    else:
                        for v in range(np.uint64(w_)):
                            dx[n0 + s, c, yi, v] = dxpad[d + v]
                else:
                    for ph in range(sw):
                        x0 = (ph - pl) % sw
                        m = (w_ - x0 + sw - 1) // sw
                        d = np.uint64(at + ph * phase + (x0 + pl) // sw)
                        x0u, swu = np.uint64(x0), np.uint64(sw)
                        for u in range(np.uint64(m if m > 0 else 0)):
                            e = dxpad[d + u]
                            if accumulate:
                                e += dx[n0 + s, c, yi, x0u + u * swu]
                            dx[n0 + s, c, yi, x0u + u * swu] = e
                py += 1
                if py == sh:
                    py = 0
                    qy += 1


@njit(**HELPER, nogil=True)
def _patch_offset(k, dims, spt, hq, wq):
    """Where im2col row k = (c, i, j) starts in the phase-split padded samples (or the
    unfolded ones: _taps)."""
    sh, sw, dh, dw, kh, kw = dims[0], dims[1], dims[4], dims[5], dims[6], dims[7]
    c = k // (kh * kw)
    i = (k - c * kh * kw) // kw
    j = k - c * kh * kw - i * kw
    if dims[8] > 1:  # plane (c, j) from row i (stride 1)
        return ((c * kw + j) * hq + i * dh) * spt * wq
    plane = (c * sh + (i * dh) % sh) * sw + (j * dw) % sw
    return (plane * hq + (i * dh) // sh) * spt * wq + (j * dw) // sw


# The transposed dx product (dx += W^T dout, into the padded dx) reads, adds and writes
# its MR rows of C one after another. In im2col order, rows (c, i, j) and (c, i, j + 1)
# overlap one column apart: each row's loads waited on the stores of the row before
# (a store cannot be forwarded to a load it only partly covers). Taken j-major, a
# block's rows are (c, i) apart, image rows apart, and do not overlap: LeNet-5's c3
# (6 -> 16 channels, 5x5, 14x14), its dx product 1.3x faster (1 thread, Zen 5, 512-bit).
@njit(inline="always", nogil=True)  # inlined in Numba's IR: no compile of its own
def _dx_row(r, kg, kw):
    """The im2col row (c, i, j) = (c*kh + i)*kw + j of row r of the dx product's C (and
    of its A, W^T): r = j*(kg/kw) + c*kh + i."""
    per = kg // kw
    return (r % per) * kw + r // per


@njit(**HELPER, nogil=True)
def _pack(w3, transpose, rows_p, kw, wpack):
    """wpack[g][r // MR][q][r % MR] = A[g, r, q], zero rows r up to rows_p: the bcast
    kernel's A. A is w3 (forward: rows are output channels) or, with `transpose`,
    its transpose, rows in :func:`_dx_row`'s order (dx: rows are im2col rows; kw the
    kernel's width). Callers pass a literal False / True: a build per direction, each
    without the other's loops. The conv kernels link it in and compile it again, so one
    build taking either cost more than the second compilation (LeNet-5's cold step:
    1.7K of the kernels' 14.4K machine instructions, ~0.3 s of CPU)."""
    g_, og, kg = w3.shape
    rows, inner = (kg, og) if transpose else (og, kg)
    for g in range(g_):
        for rb in range(rows_p // MR):
            if transpose:  # row by row: _dx_row's divisions once a row, not once an
                for i in range(MR):  # element (LeNet-5's c3, 150 x 16: 5.9 -> 1.8 us a call)
                    r = rb * MR + i
                    src = _dx_row(r, kg, kw)
                    at = (g * (rows_p // MR) + rb) * inner * MR + i
                    for q in range(inner):
                        wpack[at + q * MR] = w3[g, q, src] if r < rows else 0.0
            else:
                for q in range(inner):
                    at = ((g * (rows_p // MR) + rb) * inner + q) * MR
                    for i in range(MR):
                        r = rb * MR + i
                        wpack[at + i] = w3[g, r, q] if r < rows else 0.0


@njit(**HELPER, nogil=True)
def _regions(geo, g_, base):
    """Where the buffers of a thread starting at `base` are: padded x, padded dx, zero
    row, sink row, product (or dout), then dW and db."""
    tcp, ogb, ogd, pad_size = geo[5], geo[6], geo[7], geo[10]
    dx_at = base + pad_size
    zero_at = dx_at + pad_size
    sink_at = zero_at + tcp
    prod_at = sink_at + tcp
    dw_at = prod_at + g_ * (ogb if ogb > ogd else ogd) * tcp
    return base, dx_at, zero_at, sink_at, prod_at, dw_at


@njit(**HELPER, nogil=True)
def _tables(w3, dims, geo, x_at, dx_at, zero_at, sink_at, prod_at, prod_stride):
    """The micro-kernels' row offsets into the workspace: im2col rows (B of the
    forward and dW products; padding rows read a zero row), dx rows (C of the dx
    product, in :func:`_dx_row`'s order; padding rows write a sink row), product (or
    dout) rows, `prod_stride` apart from `prod_at`."""
    g_, og, kg = w3.shape
    hq, wq, spt = geo[0], geo[1], geo[4]
    ogb, ogd, kgb, kgd = geo[6], geo[7], geo[8], geo[9]
    rows_b = np.empty(g_ * kgd, np.int64)
    rows_dx = np.empty(g_ * kgb, np.int64)
    rows_p = np.empty(g_ * (ogb if ogb > ogd else ogd), np.int64)
    for g in range(g_):
        for kk in range(kgd):
            at = _patch_offset(g * kg + kk, dims, spt, hq, wq)
            rows_b[g * kgd + kk] = x_at + at if kk < kg else zero_at
        for kk in range(kgb):
            at = _patch_offset(g * kg + _dx_row(kk, kg, dims[7]), dims, spt, hq, wq)
            rows_dx[g * kgb + kk] = dx_at + at if kk < kg else sink_at
    for r in range(rows_p.shape[0]):
        rows_p[r] = prod_at + r * prod_stride
    return rows_b, rows_dx, rows_p


@njit(**HELPER, nogil=True)
def _tile_at(tile, spt, tiles, rows, n_, oh):
    """(first sample, samples, first output row, rows) of forward tile number `tile`."""
    if spt > 1:
        n0 = tile * spt
        return n0, spt if spt < n_ - n0 else n_ - n0, 0, oh
    n0 = tile // tiles
    oy0 = (tile - n0 * tiles) * rows
    return n0, 1, oy0, rows if rows < oh - oy0 else oh - oy0


# dout's planes (and y's), read one after another by _gather, are prefetched a plane
# ahead (`ahead`) where dout is this large and no dx products prefetch them while they
# multiply (a conv without dx: the network's first): each plane started a new page,
# with its stall. ResNet-20's first conv (16 channels, 32x32, b128: 8 MiB each), 1
# thread, AMD EPYC Zen 5: its gather alone from memory 1.5 -> 1.25 ms. Where the dx
# products prefetch them as well, the convs after it ran 2-3% slower.
PREFETCH_DOUT = 1 << 22  # bytes


# The output-gradient hook (`dout_affine`, _common's OUT_* modes) is applied here, as
# dout is gathered (norm_rows).


@njit(**HELPER, nogil=True, fastmath={"reassoc"})
def _gather(
    dout, y, act, n0, ns, oy0, nr, rs, wq, ogd, g_, tcp, dst, at0, lda, db, gk, gmode, ahead
):
    """Row g*ogd + o of a tile's dout, dst[at0 + (g*ogd + o)*lda:][:tcp] (the product's
    rows, or the padded dout's), at r*rs + s*wq + v = dout[n0 + s, g*og + o, oy0 + r, v] for
    the tile's samples s < ns (rs = samples per tile * wq), masked where a fused ReLU's
    output y is 0 (or through the output-gradient hook: gk rows ka, kb, kc, scale,
    shift; None: a build without it); other columns are left as they are (zero).
    db[o] += the sum of its row ('reassoc' vectorises the sum, in an order fixed at
    compile time). `ahead`: prefetch each next plane (PREFETCH_DOUT)."""
    o_, oh, ow = dout.shape[1], dout.shape[2], dout.shape[3]
    og = o_ // g_
    flat, flat_y = dout.reshape(-1), y.reshape(-1)
    line = 64 // dout.itemsize
    band = nr * ow  # a plane's rows in this tile
    ahead = ahead and dout.size * dout.itemsize >= PREFETCH_DOUT
    for o in range(o_):
        g = o // og
        at = at0 + (g * ogd + o - g * og) * lda
        row = dst[at : at + tcp]
        if gk is not None:
            oc = o if gmode != OUT_PLAIN else 0
            ka, kb, kc, sa, sb = gk[0, oc], gk[1, oc], gk[2, oc], gk[3, oc], gk[4, oc]
        for s in range(ns):
            # the next plane's rows, (s + 1, o) or (0, o + 1), prefetched (PREFETCH_DOUT)
            nxt = (n0 + s + 1) * o_ + o if s + 1 < ns else n0 * o_ + o + 1
            if ahead and nxt < (n0 + ns) * o_:
                first = nxt * oh * ow + oy0 * ow
                for q in range(0, band, line):
                    prefetch(flat, first + q)
                    prefetch(flat_y, first + q)
            plane = ((n0 + s) * o_ + o) * oh * ow + oy0 * ow
            if gk is None or gmode == OUT_PLAIN:
                masked_rows(flat, plane, ow, flat_y, dst, at + s * wq, rs, nr, ow, act)
            else:  # (whole vectors: a Numba loop left short rows to its scalar tail)
                relu = 1 if gmode == OUT_NORM_RELU else 0
                norm_rows(
                    flat, plane, ow, flat_y, dst, at + s * wq, rs, nr, ow, ka, kb, kc, sa, sb, relu
                )
        # one long sum per row, not one per image row inside the loops above: each of
        # those ended in a horizontal sum over ~32 values
        acc = 0.0
        for v in range(tcp):
            acc += row[v]
        db[o] += acc


_SUMS = {"reassoc"}  # vectorised float64 sums, in an order fixed at compile time


@njit(inline="always", nogil=True)  # inlined in Numba's IR: no compile of its own (a
def _ahead(first, per, lines):  # cold LeNet-5 step compiles each helper once: test_first_run)
    """One micro-kernel call's share of the prefetches, lines first to first + per of
    the inputs' (`lines`: how many each) laid end to end: (which input, its first line,
    lines), stopping at the end of an input. Calls are short (LeNet-5's transposed dx
    products: 6 steps), so the divisions are the caller's, once a sample."""
    for which in range(len(lines)):
        if first < lines[which]:
            left = lines[which] - first
            return which, first, per if per < left else left
        first -= lines[which]
    return 0, 0, 0


@Builds
def _forward_tiles(
    x, w3, bias, act, dims, geo, T, out, ws, aff, mode, moments, want_moments, split, res
):
    # res: None (the build without it), or a residual shaped as out, flat, added in the
    # epilogue
    hq, wq, rows, tiles, spt, tcp, ogb, _ogd, _kgb, kgd, pad_size, per, _, _swap = geo
    n_ = x.shape[0]
    o_, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    g_, og, kg = w3.shape
    nr_ = NV * (VECTOR_BYTES // x.itemsize)  # panel width
    mr = MR
    wpack = ws[T * per :]
    _pack(w3, False, ogb, dims[7], wpack)
    total = -(-n_ // spt) if spt > 1 else n_ * tiles
    has_bias = bias.shape[0] > 0
    zero = out.dtype.type(0)  # a literal 0.0 made the float32 epilogue compute in float64
    # prefetched (_ahead): the next tile's x, and this tile's output rows, which the
    # epilogue writes (where they are one run: tiles of whole samples)
    inputs = (x.reshape(-1), out.reshape(-1))
    sample, osample, line = x.size // n_, out.size // n_, 64 // x.itemsize
    calls = g_ * (tcp // nr_) * (ogb // mr)  # micro-kernel calls a tile
    # the epilogue: one intrinsic a plane (epilogue_rows), the moments in vector registers
    # across its rows: Numba's row loops (a 16x8-wide loop and a remainder each) and a pass
    # of float64 sums over the rows written cost 0.35-0.45 ms of a 3.1-3.3 ms forward
    # (ResNet-20 b128's 16 stride-1 3x3 convs, 1 thread, Zen 5, 512-bit: 1.04-1.07x)
    flat_out = out.reshape(-1)
    want = 0  # the epilogue's moments
    if moments is not None and want_moments:
        want = 1
    for t in prange(T):
        x_at, dx_at, zero_at, sink_at, prod_at, _dw_at = _regions(geo, g_, t * per)
        rows_b, _rows_dx, rows_p = _tables(
            w3, dims, geo, x_at, dx_at, zero_at, sink_at, prod_at, tcp
        )
        xpad = ws[x_at : x_at + pad_size]
        prod = ws[prod_at : prod_at + g_ * ogb * tcp]
        last = -1
        first, end = t * total // T, (t + 1) * total // T
        for tile in range(first, end):
            n0, ns, oy0, nr = _tile_at(tile, spt, tiles, rows, n_, oh)
            if n0 != last:
                _pad_samples(x, n0, ns, spt, dims, hq, wq, xpad, aff, mode, last == -1, split)
                last = n0
            ahead = 0  # lines of the next tile's samples, where it starts new ones
            if tile + 1 < end:
                n1, ns1, _, _ = _tile_at(tile + 1, spt, tiles, rows, n_, oh)
                if n1 != n0:
                    ahead = -(-ns1 * sample // line)
            lines = (ahead, -(-ns * osample // line) if tiles == 1 else 0)
            starts = ((n0 + ns) * sample, n0 * osample)
            per_call = -(-(lines[0] + lines[1]) // calls)  # prefetched by each call
            q = 0
            for g in range(g_):
                for p in range(tcp // nr_):
                    for ob in range(ogb // mr):
                        which, at, count = _ahead(q * per_call, per_call, lines)
                        bcast_ahead(
                            wpack, (g * (ogb // mr) + ob) * kg * mr,
                            ws, rows_b, g * kgd, oy0 * wq + p * nr_,
                            ws, rows_p, g * ogb + ob * mr, p * nr_, kg, 0,
                            inputs[which], starts[which] + at * line, count, og - ob * mr,
                        )  # fmt: skip
                        q += 1
            for s in range(ns):
                for o in range(o_):
                    b = bias[o] if has_bias else zero
                    g = o // og
                    at = (g * ogb + o - g * og) * tcp + s * wq
                    shift = 0.0
                    if moments is not None and want_moments:  # (None: a build without hooks)
                        if tile == first and s == 0:  # the shift: the thread's first value
                            yv = prod[at] + b
                            moments[t, o] = (yv if yv > 0 else zero) if act == 1 else yv
                        shift = moments[t, o]
                    a, a2 = epilogue_rows(
                        prod, at, spt * wq, flat_out, ((n0 + s) * o_ + o) * oh * ow + oy0 * ow,
                        nr, ow, b, act, shift, want, res,
                    )  # fmt: skip
                    if moments is not None and want_moments:
                        moments[t, o_ + o] += a
                        moments[t, 2 * o_ + o] += a2
            if moments is not None and want_moments:
                moments[t, 3 * o_] += ns * nr * ow


@njit(**HELPER, nogil=True)
def _pack_flipped(w3, kh, kw, rows_p, wpack):
    """_pack's layout for the dx convolution's A: A[g, c, (o, i, j)] = w[g*og + o, c,
    kh-1-i, kw-1-j] (w3 = w as (g, og, cg*kh*kw)), zero rows c up to rows_p."""
    g_, og, kg = w3.shape
    cg, khw = kg // (kh * kw), kh * kw
    inner = og * khw
    for g in range(g_):
        for rb in range(rows_p // MR):
            for o in range(og):
                for ij in range(khw):
                    at = ((g * (rows_p // MR) + rb) * inner + o * khw + ij) * MR
                    for i in range(MR):
                        c = rb * MR + i
                        wpack[at + i] = w3[g, o, c * khw + khw - 1 - ij] if c < cg else 0.0


@njit(**HELPER, nogil=True)
def _dout_to_padded(dprod, o_, og, ogd, tcp, wq, oy0, nr, ns, spt, ow, dxc, dpad):
    """Copies a tile's gathered dout (dprod's rows, as dW reads them) into the padded
    samples of dout the dx convolution reads: [o][y][s][x], y and x shifted by dout's
    padding (its zeros written once per thread)."""
    hq2, wq2, qt, ql = dxc[0], dxc[1], dxc[2], dxc[3]
    for o in range(o_):
        g = o // og
        at = (g * ogd + o - g * og) * tcp
        for r in range(nr):
            for s in range(ns):
                d = ((o * hq2 + qt + oy0 + r) * spt + s) * wq2 + ql
                src = dprod[at + (r * spt + s) * wq : at + (r * spt + s) * wq + ow]
                dst = dpad[d : d + ow]
                for v in range(ow):
                    dst[v] = src[v]


@njit(**HELPER, nogil=True)
def _dx_tables(g_, og, dims, dxc, spt, dpad_at, prod_at):
    """The dx convolution's row offsets: im2col rows (o, i, j) of the padded dout (B),
    product rows (C)."""
    kh, kw = dims[6], dims[7]
    hq2, wq2, tcp2, cgb = dxc[0], dxc[1], dxc[6], dxc[7]
    flat = (1, 1, 0, 0, dims[4], dims[5], kh, kw, 1)  # stride 1, dout's padding made already
    rows_b = np.empty(g_ * og * kh * kw, np.int64)
    for k in range(rows_b.shape[0]):
        rows_b[k] = dpad_at + _patch_offset(k, flat, spt, hq2, wq2)
    rows_p = np.empty(g_ * cgb, np.int64)
    for r in range(rows_p.shape[0]):
        rows_p[r] = prod_at + r * tcp2
    return rows_b, rows_p


@njit(**HELPER, nogil=True)
def _write_dx(prod, cg, cgb, tcp2, wq2, n0, ns, spt, y0, nr, dx, accumulate):
    """dx[n0 : n0 + ns, :, y0 : y0 + nr] = (or +=, `accumulate`) a band's product."""
    c_, w_ = dx.shape[1], dx.shape[3]
    for s in range(ns):
        for c in range(c_):
            g = c // cg
            at = (g * cgb + c - g * cg) * tcp2 + s * wq2
            for r in range(nr):
                src = prod[at + r * spt * wq2 : at + r * spt * wq2 + w_]
                dst = dx[n0 + s, c, y0 + r]
                if accumulate:
                    for v in range(w_):
                        dst[v] += src[v]
                else:
                    for v in range(w_):
                        dst[v] = src[v]


@njit(**HELPER, nogil=True)
def _dx_convolve(
    wpack, ws, rows_b, rows_p, prod, g_, og, kg, dims, dxc, n0, ns, spt, dx, acc, ahead
):
    """dx[n0 : n0 + ns] = (or +=, `acc`) the dx convolution of the padded dout, band by
    band: the forward's tiled product (B rows: rows_b, C rows: rows_p into `prod`),
    prefetching `ahead` = (inputs, starts, lines), :func:`_ahead`'s."""
    inputs, starts, lines = ahead
    kh, kw = dims[6], dims[7]
    wq2, rows2, tiles2, tcp2, cgb = dxc[1], dxc[4], dxc[5], dxc[6], dxc[7]
    k2 = og * kh * kw  # its reduction
    cg = kg // (kh * kw)  # its output channels
    nr_ = NV * (VECTOR_BYTES // dx.itemsize)
    mr = MR
    line = 64 // dx.itemsize
    calls = tiles2 * g_ * (-(-rows2 * spt * wq2 // nr_)) * (cgb // mr)
    total = 0
    for n in lines:
        total += n
    per_call = -(-total // calls)
    q = 0
    for b in range(tiles2):
        y0 = b * rows2
        nr = rows2 if rows2 < dx.shape[2] - y0 else dx.shape[2] - y0
        for g in range(g_):
            for p in range(-(-nr * spt * wq2 // nr_)):
                for cb in range(cgb // mr):
                    which, at, count = _ahead(q * per_call, per_call, lines)
                    bcast_ahead(
                        wpack, (g * (cgb // mr) + cb) * k2 * mr,
                        ws, rows_b, g * k2, y0 * spt * wq2 + p * nr_,
                        ws, rows_p, g * cgb + cb * mr, p * nr_, k2, 0,
                        inputs[which], starts[which] + at * line, count, cg - cb * mr,
                    )  # fmt: skip
                    q += 1
        _write_dx(prod, cg, cgb, tcp2, wq2, n0, ns, spt, y0, nr, dx, acc)


# The input-gradient hook (`dx_sums`): when the conv reads a batch norm's output through
# `in_affine` and is its only reader, its dx is the norm's output gradient g, and the
# norm's backward needs only sum(g) and sum(g * (x - mean)) per channel (g masked by
# the norm's ReLU). Taken here, over each chunk of samples right after its dx is
# written (in L2: one 32x32 sample of 16 channels is 64 KB), instead of in a pass of
# the norm's own over g and x from memory; the same float operations as the norm's.


@njit(**HELPER, nogil=True, fastmath=_SUMS)
def _dx_sums(dx, x, n0, ns, aff, mode, dsum):
    """dsum[1, c] += sum(g), dsum[2, c] += sum(g * (x - mean)) over samples n0 .. n0 + ns,
    in float64, g = dx masked where the input hook's ReLU was 0 (aff: its scale and
    shift; dsum[0]: the norm's mean). Planes as 1-d rows of 3-d views, the loop written
    here: a helper per plane, on 2-d views reshaped, cost 2.5x as much on 8x8 maps."""
    relu = mode == IN_AFFINE_RELU
    d3 = dx.reshape(dx.shape[0], dx.shape[1], -1)
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    zero = dx.dtype.type(0)
    for s in range(ns):
        for c in range(dx.shape[1]):
            mu, a, b = x.dtype.type(dsum[0, c]), aff[0, c], aff[1, c]
            g, xc = d3[n0 + s, c], x3[n0 + s, c]
            s1 = 0.0
            s2 = 0.0
            for v in range(g.shape[0]):
                xv = xc[v]
                gv = g[v] if (not relu or xv * a + b > 0) else zero
                s1 += gv
                s2 += gv * (xv - mu)
            dsum[1, c] += s1
            dsum[2, c] += s2


# The ReLU hook (`relu_dx`): when the conv's input x is a ReLU's output (the ReLU fused
# into the add before it) and the conv is the last to write that ReLU's gradient, it
# applies the ReLU's mask to dx, once written or added to, instead of the add's own
# pass: x is in L2 (copied into the padded samples for this chunk).


@njit(**HELPER, nogil=True)
def _relu_dx(dx, x, n0, ns):
    """dx[n0 : n0 + ns] = 0 where x <= 0."""
    d3 = dx.reshape(dx.shape[0], dx.shape[1], -1)
    x3 = x.reshape(x.shape[0], x.shape[1], -1)
    zero = dx.dtype.type(0)
    for s in range(ns):
        for c in range(dx.shape[1]):
            g, xc = d3[n0 + s, c], x3[n0 + s, c]
            for v in range(g.shape[0]):
                xv = xc[v]  # loaded unconditionally: a conditional load blocks SIMD
                g[v] = g[v] if xv > 0 else zero


# fmt: off
@Builds
def _backward_samples(
    x, w3, dout, y, act, want_dx, dims, geo, T, dx, ws, aff, mode, accumulate, gk, gmode, dxc,
    dsums, relu_dx, split, dw_index, dw_out, db_out,
):
    # fmt: on
    hq, wq, rows, tiles, spt, tcp, ogb, ogd, kgb, kgd, pad_size, per, _, swap = geo
    n_ = x.shape[0]
    o_, oh = dout.shape[1], dout.shape[2]
    g_, og, kg = w3.shape
    nr_ = NV * (VECTOR_BYTES // x.itemsize)
    mr, md, nd = MR, MD, ND
    go = g_ * ogd  # rows of dout
    wpack = ws[T * per :]
    # dxc: the dx convolution's sizes (a _DxConv), or None: dx the transposed way. Each
    # is a build of its own without the other's code (Numba prunes `dxc is None`
    # branches before compiling): LeNet-5 compiles only the second one.
    if dxc is not None:
        _pack_flipped(w3, dims[6], dims[7], dxc[7], wpack)
    elif want_dx:
        _pack(w3, True, kgb, dims[7], wpack)
    # prefetched by the dx products (by the dW products: 16 channels, 32x32, no faster):
    # the samples' dx, which they write (where it is one run), the next samples' x,
    # dout (and y)
    inputs = (dx.reshape(-1), x.reshape(-1), dout.reshape(-1), y.reshape(-1))
    dx_run = want_dx and (dxc is None or dxc[5] == 1)  # whole samples a band
    sample, osample, line = x.size // n_, dout.size // n_, 64 // x.itemsize
    reads_y = act != 0 or gk is not None  # else y is dout, or unread
    calls = tiles * g_ * (tcp // nr_) * (kgb // mr)  # the transposed dx products
    runs = (tcp + _DW_COLUMNS // 2) // _DW_COLUMNS  # the dW products' column runs
    share = -(-tcp // runs) if runs > 1 else tcp
    run = -(-share // nr_) * nr_  # whole panels (as tcp)
    for t in prange(T):
        x_at, dx_at, zero_at, sink_at, prod_at, dw_at = _regions(geo, g_, t * per)
        xpad = ws[x_at : x_at + pad_size]
        dxpad = ws[dx_at : dx_at + pad_size]
        dprod = ws[prod_at : prod_at + go * tcp]
        dwt = ws[dw_at : dw_at + go * kgd]
        db = ws[dw_at + go * kgd : dw_at + go * kgd + o_]
        dwt[:] = 0
        db[:] = 0
        ws[zero_at : zero_at + tcp] = 0
        # dout's tile (_gather's): dprod's rows, or (dxc[10]) the padded dout's channels
        dst, at0, lda = ws, prod_at, tcp
        if dxc is not None:  # its region ends the thread's: padded dout, then the product
            dpad_at = (t + 1) * per - dxc[9]
            dpad = ws[dpad_at : dpad_at + dxc[8]]
            if not dxc[10]:  # dout's padding; the interior is written for every sample
                dpad[:] = 0  # (gathered there: zeroed with each new tile shape, the first too)
            prod2 = ws[dpad_at + dxc[8] : (t + 1) * per]
            rows_b2, rows_p2 = _dx_tables(g_, og, dims, dxc, spt, dpad_at, dpad_at + dxc[8])
            if dxc[10]:
                lda = dxc[0] * spt * dxc[1]
                at0 = dpad_at + dxc[2] * spt * dxc[1] + dxc[3]
        # rows_p: dout's rows, read by the dx and dW products through the table (so dW
        # is one call site of the micro-kernel, whichever way round it runs)
        rows_b, rows_dx, rows_p = _tables(w3, dims, geo, x_at, dx_at, zero_at, sink_at, at0, lda)
        n0, hi = t * n_ // T, (t + 1) * n_ // T
        shape = (-1, -1)  # (rows, samples) of the tile in dprod
        while n0 < hi:
            ns = spt if spt < hi - n0 else hi - n0
            ns1 = spt if spt < hi - n0 - ns else hi - n0 - ns  # the next samples
            nxt = n0 + ns
            starts = (n0 * sample, nxt * sample, nxt * osample, nxt * osample)
            xl, ol = -(-ns1 * sample // line), -(-ns1 * osample // line)
            lines = (-(-ns * sample // line) if dx_run else 0, xl, ol, ol if reads_y else 0)
            per_call = -(-(lines[0] + lines[1] + lines[2] + lines[3]) // calls)
            q = 0
            _pad_samples(x, n0, ns, spt, dims, hq, wq, xpad, aff, mode, n0 == t * n_ // T, split)
            if dxc is None:
                if want_dx:
                    dxpad[:] = 0
            for b in range(tiles):
                oy0 = b * rows
                nr = rows if rows < oh - oy0 else oh - oy0
                if (nr, ns) != shape:  # junk and padding columns, padding rows: zero
                    if dxc is not None and dxc[10]:  # (and samples past ns)
                        dpad[:] = 0
                    else:  # gradient. A tile of the same shape overwrites just what
                        dprod[:] = 0  # the last one wrote (a memset per tile wrote as much)
                    shape = (nr, ns)
                _gather(
                    dout, y, act, n0, ns, oy0, nr, spt * wq, wq, ogd, g_, tcp, dst, at0, lda, db,
                    gk, gmode, not want_dx,
                )  # fmt: skip
                # dW += dout im2col^T, or (swap) dW^T += im2col dout^T: the products' A
                # and B rows (table, first column, rows a group)
                ta, ca, na, tb, cb, nb = rows_p, 0, ogd, rows_b, oy0 * wq, kgd
                if swap:
                    ta, ca, na, tb, cb, nb = rows_b, oy0 * wq, kgd, rows_p, 0, ogd
                for c0 in range(0, tcp, run):  # (_DW_COLUMNS)
                    cn = run if run < tcp - c0 else tcp - c0
                    for g in range(g_):
                        for i in range(0, na, md):
                            for j in range(0, nb, nd):
                                dot_rows(
                                    ws, ta, g * na + i, ca + c0,
                                    ws, tb, g * nb + j, cb + c0,
                                    dwt, (g * na + i) * nb + j * md, cn,
                                )  # fmt: skip
                if dxc is not None:
                    if not dxc[10]:  # (else gathered there)
                        _dout_to_padded(dprod, o_, og, ogd, tcp, wq, oy0, nr, ns, spt,
                                        dout.shape[3], dxc, dpad)  # fmt: skip
                elif want_dx:
                    for g in range(g_):  # dx += W^T dout, straight into the padded dx
                        for p in range(tcp // nr_):
                            for kb in range(kgb // mr):
                                which, at, count = _ahead(q * per_call, per_call, lines)
                                bcast_ahead(
                                    wpack, (g * (kgb // mr) + kb) * og * mr,
                                    ws, rows_p, g * ogd, p * nr_,
                                    ws, rows_dx, g * kgb + kb * mr, oy0 * wq + p * nr_, og, 1,
                                    inputs[which], starts[which] + at * line, count,
                                    kg - kb * mr,
                                )  # fmt: skip
                                q += 1
            if dxc is not None:
                _dx_convolve(wpack, ws, rows_b2, rows_p2, prod2, g_, og, kg, dims, dxc, n0, ns,
                             spt, dx, accumulate, (inputs, starts, lines))  # fmt: skip
            elif want_dx:
                _unpad_samples(dxpad, n0, ns, spt, dims, hq, wq, dx, accumulate, split)
            # (None: the build without hooks)
            if aff is not None and relu_dx:
                _relu_dx(dx, x, n0, ns)
            # dsums None: the build without hooks; no channels: no sums wanted
            if dsums is not None and dsums.shape[2] > 0:
                _dx_sums(dx, x, n0, ns, aff, mode, dsums[t])
            n0 += ns
    # dW (dw_index: where each of its elements is in the sums) and db: the threads'
    # private sums, added in thread order (the same bits every run). Here, not in numpy
    # after the call: ~8 us a call less (LeNet-5's c3, Intel Xeon model 207)
    dw0 = _regions(geo, g_, per)[5] - per  # (thread 1's less its start: an int argument
    # typed as the prange's, so one build of _regions)
    for j in range(dw_index.size):
        v = ws[dw0 + dw_index[j]]
        for t in range(1, T):
            v += ws[t * per + dw0 + dw_index[j]]
        dw_out[j] = v
    for j in range(db_out.size):
        v = ws[dw0 + go * kgd + j]
        for t in range(1, T):
            v += ws[t * per + dw0 + go * kgd + j]
        db_out[j] = v


def _check(x, w, out, groups, ws, key=None):
    """The shapes checked once per `key` (:func:`_key`: a layer calls with the same
    every step), the dtypes every call."""
    if key is None or key not in _CHECKED:
        check_grouped_conv(x, w, out, groups)
        if key is not None:
            _CHECKED.add(key)
    if x.dtype != w.dtype or x.dtype != out.dtype or x.dtype != ws.dtype:
        raise ValueError("conv2d arrays must share one dtype")


_CHECKED: set = set()  # shape keys whose shapes passed check_grouped_conv


def _key(x, w, out, stride, pad, dilation, groups) -> tuple:
    """A call's shapes and geometry as one hashable tuple, made once per call: what
    winograd.chooses's cache and :func:`_call`'s take (LeNet-5's four conv calls had
    made and hashed them twice each, ~20 us of a step)."""
    return (x.shape, w.shape, out.shape, tuple(stride), tuple(pad), tuple(dilation), groups)


class _Call(NamedTuple):
    """What a conv call needs besides its arrays, worked out once per shape (a layer
    calls with the same shapes every step: it was ~25 us of the ~80 us that LeNet-5's
    c3 backward spent outside its kernel at batch 1, AMD EPYC Zen 3)."""

    geo: _Geometry
    args: tuple  # the kernels' (dims, geo, threads)
    dxc: tuple | None  # the dx convolution's sizes (backward with dx), else None
    dw_index: np.ndarray | None  # where dW's elements are in a thread's sums (backward)


def _plan(key, w, ws, itemsize, backward=False, want_dx=False):
    """The call's plan (:func:`_call`) for its checked shape key, the flat workspace and
    w as (groups, outputs a group, inputs a group x kernel)."""
    o, cg, kh, kw = w.shape
    g = int(key[6])
    call = _call(*key[:6], itemsize, ws.size, thread_count(), backward, want_dx)
    return call, ws.reshape(-1), w.reshape(g, o // g, cg * kh * kw)


@lru_cache(maxsize=1024)
def _call(x_shape, w_shape, out_shape, stride, pad, dilation, itemsize, space, threads, backward,
          want_dx):  # fmt: skip
    """The plan of a call of these shapes (see :class:`_Call`)."""
    shapes = (x_shape, w_shape, out_shape, stride, pad, dilation)
    geo, threads = _tiles(*shapes, itemsize, space, threads)
    sh, sw, pt, _pb, pl, _pr, dh, dw = _unpack(stride, pad, dilation)
    taps = _taps(*shapes)
    dims = (sh, sw, pt, pl, dh, dw, int(w_shape[2]), int(w_shape[3]), taps)
    dxc = _dx_conv(*shapes, geo.rows, geo.spt, panel(itemsize)) if want_dx else None
    g = x_shape[1] // w_shape[1]
    index = None
    if backward:  # where each of dW's elements is in the sums (the int's size picks the
        # dot blocks' order: dot_unblock)
        og, kg = w_shape[0] // g, w_shape[1] * w_shape[2] * w_shape[3]
        at = np.arange(g * geo.ogd * geo.kgd, dtype=np.int32 if itemsize == 4 else np.int64)
        if geo.swap:
            at = dot_unblock(at, g * geo.kgd, geo.ogd).reshape(g, geo.kgd, geo.ogd)
            at = at.transpose(0, 2, 1)
        else:
            at = dot_unblock(at, g * geo.ogd, geo.kgd).reshape(g, geo.ogd, geo.kgd)
        index = np.ascontiguousarray(at[:, :og, :kg]).reshape(-1)
        index.flags.writeable = False
    args = (dims, tuple(geo), threads)
    return _Call(geo, args, None if dxc is None else tuple(dxc), index)


def _tiles(x_shape, w_shape, out_shape, stride, pad, dilation, itemsize, space, threads):
    """All of `threads` if the workspace (`space` elements) has room for one tile row
    each, fewer otherwise, and their tiles. One thread runs the kernels' serial builds.
    (:func:`_call`, which caches its plan, is its one caller: LeNet-5's four conv calls
    had spent ~0.04 ms of a step working the tiles out, 1 thread, AMD EPYC Zen 5.)"""
    shapes = (x_shape, w_shape, out_shape, stride, pad, dilation, itemsize)
    one = _geometry(*shapes, 1, rows=1)
    threads = min(threads, (space - one.wpack) // one.per_thread)
    if threads < 1:
        need = one.per_thread + one.wpack
        raise ValueError(f"conv2d workspace has {space} elements, need {need}")
    geo = _geometry(*shapes, threads, space=(space - one.wpack) // threads)
    return geo, threads


def _bias_or_empty(b, dtype):
    return np.zeros(0, dtype) if b is None else b


def conv2d_forward(
    x,
    w,
    b,
    stride,
    pad,
    dilation,
    groups,
    out,
    ws,
    act=ACT_NONE,
    in_affine=None,
    stats=None,
    residual=None,
):
    """out = act(conv2d(h(x), w) + b), PyTorch cross-correlation; `ws` is a workspace
    (any shape, C-contiguous, x's dtype) of :func:`conv2d_workspace` elements. With
    `residual` (shaped as out), out = act((conv2d(h(x), w) + b) + residual): a residual
    add and its ReLU fused into the conv's epilogue, the same bits as the add after it.

    The fusion hooks, both optional (a batch norm around the conv uses them):
    - in_affine = (scale, shift, relu): h(x) = x * scale + shift per input channel,
      then max(., 0) if relu; h(x) = x without it. The padding is h(x)'s: zeros.
    - stats: a float64 (2, O) array that receives the mean and the biased variance of
      each output channel over the batch, taken while the output tiles are in cache."""
    check_c(x=x, w=w, out=out, ws=ws, residual=residual)
    if residual is not None:
        check_shape("residual", residual, out.shape)
        if residual.dtype != out.dtype:
            raise ValueError("conv2d arrays must share one dtype")
    bias = _bias_or_empty(b, x.dtype)
    if stats is not None:
        check_shape("stats", stats, (2, w.shape[0]))
    # (stats with a residual: the sum's, which only the direct conv's epilogue sees)
    plain_out = residual is None or stats is None
    key = _key(x, w, out, stride, pad, dilation, groups)
    _check(x, w, out, groups, ws, key)
    if plain_out and winograd.chooses_key(key):
        if residual is None:
            winograd.forward(x, w, bias, pad, out, ws, act, in_affine, stats)
        else:  # the add after it, as its own pass (the same bits)
            winograd.forward(x, w, bias, pad, out, ws, ACT_NONE, in_affine, stats)
            merge.add_forward([out, residual], out, act)
        return
    call, flat, w3 = _plan(key, w, ws, x.itemsize)
    dims, geo, threads = call.args
    o = w.shape[0]
    # no hooks: the build without them (LeNet-5 compiles only that)
    aff, mode, moments = forward_hooks(in_affine, stats, x, o, threads)
    args = (
        x, w3, bias, int(act), dims, geo, threads, out, flat, aff, mode, moments,
        stats is not None, _split(stride), None if residual is None else residual.reshape(-1),
    )  # fmt: skip
    kernel = _forward_tiles.now(threads == 1, args)
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        conv_numpy.conv2d_forward(
            x, w, b, stride, pad, dilation, groups, out, act, residual, in_affine, stats
        )
        return
    kernel(*args)
    if stats is not None:
        stats[0], stats[1] = merge_moments(moments)


def conv2d_backward(
    x,
    w,
    dout,
    stride,
    pad,
    dilation,
    groups,
    ws,
    dx,
    dw,
    db,
    out=None,
    act=ACT_NONE,
    in_affine=None,
    accumulate=False,
    dout_affine=None,
    dx_sums=None,
    relu_dx=False,
):
    """Gradients of :func:`conv2d_forward`; `out` is needed when an activation was
    fused, `in_affine` when the forward had it (dW is taken against h(x), dx is
    d/d h(x)). dx / db may be None; dw is overwritten; dx too, or added to with
    `accumulate` (a second reader of the conv's input adds its gradient in place).

    dout_affine = (k, affine, relu), when the output feeds only a batch norm: dout is
    the norm's output gradient g, and the conv's own is k[0]*g' + k[1]*y + k[2] per
    channel (y = out), g' = g masked where y*affine[0] + affine[1] <= 0 with relu:
    the norm's backward (:func:`batchnorm2d_backward` with `dx_coeffs`) writes no dx.

    dx_sums = (mean, sums), with in_affine, when the input is a batch norm's output that
    only this conv reads: sums (float64 (2, C)) receives sum(g) and sum(g * (x - mean))
    per input channel, g = dx masked where the hook's ReLU was 0 (what the norm's
    backward reads from its output gradient: :func:`batchnorm2d_backward` `sums`).

    relu_dx: x is a ReLU's output and this conv the last to write (or add to) the
    gradient of it: dx, once complete, becomes the gradient of the ReLU's input (0 where
    x <= 0), in place of the pass of the layer the ReLU is fused into."""
    check_c(x=x, w=w, dout=dout, ws=ws, dx=dx, dw=dw)
    check_shape("dw", dw, w.shape)
    key = _key(x, w, dout, stride, pad, dilation, groups)
    _check(x, w, dout, groups, ws, key)
    if act and out is None:
        raise ValueError("a fused activation needs the forward output")
    if dx is not None:
        check_shape("dx", dx, x.shape)
    if db is not None:
        check_shape("db", db, (w.shape[0],))
    if dx_sums is not None and (dx is None or in_affine is None or accumulate):
        raise ValueError("dx_sums needs dx, written (not accumulated), and in_affine")
    if relu_dx and (dx is None or in_affine is not None):
        raise ValueError("relu_dx needs dx and a plain input (no in_affine)")
    y = out if out is not None else dout
    gk, gmode = None, OUT_PLAIN
    if dout_affine is not None:
        if out is None or act:
            raise ValueError("dout_affine needs the forward output and no fused activation")
        k, affine, relu = dout_affine
        gk = np.empty((5, w.shape[0]), x.dtype)
        gk[:3], gk[3:] = k, affine
        gmode = OUT_NORM_RELU if relu else OUT_NORM
    if dx_sums is not None:
        check_shape("dx_sums mean", dx_sums[0], (x.shape[1],))
        check_shape("dx_sums", dx_sums[1], (2, x.shape[1]))
    if winograd.chooses_key(key):
        hooks = (in_affine, accumulate, gk, gmode, dx_sums, relu_dx)
        if winograd.backward(x, w, dout, pad, ws, dx, dw, db, y, act, *hooks):
            return
        conv_numpy.conv2d_backward(  # a first run, the kernel compiling in a child
            x, w, dout, stride, pad, dilation, groups, dx, dw, db, out, act, in_affine,
            accumulate, dout_affine, dx_sums, relu_dx,
        )  # fmt: skip
        return
    want_dx = dx is not None
    call, flat, w3 = _plan(key, w, ws, x.itemsize, True, want_dx)
    dims, geo, threads = call.args
    dx_arg = dx if want_dx else np.empty((1, 1, 1, 1), x.dtype)
    aff, mode, gk, dsums = backward_hooks(in_affine, gk, relu_dx, dx_sums, x, threads)
    args = (
        x, w3, dout, y, int(act), want_dx, dims, geo, threads, dx_arg, flat, aff, mode,
        bool(accumulate), gk, gmode, call.dxc, dsums, int(relu_dx), _split(stride),
        call.dw_index, dw.reshape(-1), db if db is not None else flat[:0],
    )  # fmt: skip
    kernel = _backward_samples.now(threads == 1, args)
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        conv_numpy.conv2d_backward(
            x, w, dout, stride, pad, dilation, groups, dx, dw, db, out, act, in_affine,
            accumulate, dout_affine, dx_sums, relu_dx,
        )  # fmt: skip
        return
    kernel(*args)
    merge_dx_sums(dx_sums, dsums)


def conv2d_mask_gradient(dw, mask):
    """dw *= mask: entries a connection table leaves out get no gradient (stay zero)."""
    np.multiply(dw, mask, out=dw)
