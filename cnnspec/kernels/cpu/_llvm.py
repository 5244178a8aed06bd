"""LLVM-IR building blocks of the CPU kernels' intrinsics (conv.py's micro-kernels and
row copies, pool.py's 2x2 pools): vector types, loads and stores (masked at a row's
end), a counted loop that keeps its carried values in registers. Vectors are one
register wide (_common.VECTOR_BITS).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types

from ._common import VECTOR_BITS

I64 = ir.IntType(64)
I32 = ir.IntType(32)


def lanes(itemsize: int) -> int:
    """Elements of `itemsize` bytes in one vector register."""
    return VECTOR_BITS // 8 // itemsize


def vector(dtype):
    """The LLVM vector type of one register's worth of `dtype` (float32 or float64)."""
    real = ir.FloatType() if dtype == types.float32 else ir.DoubleType()
    return ir.VectorType(real, lanes(dtype.bitwidth // 8))


def fma(builder, vec, a, b, c):
    name = f"llvm.fma.v{vec.count}{'f32' if isinstance(vec.element, ir.FloatType) else 'f64'}"
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(vec, [vec] * 3), name
    )
    return builder.call(fn, [a, b, c])


def splat(builder, vec, x):
    v = builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(I32, 0))
    mask = ir.Constant(ir.VectorType(I32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(v, ir.Constant(vec, ir.Undefined), mask)


def base(context, builder, aryty, ary, offset):
    return builder.gep(context.make_array(aryty)(context, builder, ary).data, [offset])


def vec_ptr(builder, base, index, vec):
    return builder.bitcast(builder.gep(base, [index]), vec.as_pointer())


def const(n):
    return ir.Constant(I64, n)


def loop(builder, count, n_carried, zero, body, unroll=True):
    """for i in range(count): carried = body(i, carried); returns the final values
    (zero if count <= 0). Emitted as one basic block with phi nodes, so LLVM keeps
    the carried vectors in registers. unroll=False: LLVM may not unroll it (code that
    every conv build compiles, where unrolling gains nothing)."""
    entry = builder.block
    loop = builder.append_basic_block("mk.loop")
    done = builder.append_basic_block("mk.done")
    builder.cbranch(builder.icmp_signed(">", count, const(0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(I64)
    i.add_incoming(const(0), entry)
    carried = [builder.phi(zero.type) for _ in range(n_carried)]
    for p in carried:
        p.add_incoming(zero, entry)
    new = body(i, carried)
    tail = builder.block
    nxt = builder.add(i, const(1))
    i.add_incoming(nxt, tail)
    for p, v in zip(carried, new, strict=True):
        p.add_incoming(v, tail)
    back = builder.cbranch(builder.icmp_signed("<", nxt, count), loop, done)
    if not unroll:
        module = builder.module
        disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
        loop_id = ir.values.MDValue(module, [disable], name=str(len(module.metadata)))
        loop_id.operands = (loop_id, disable)  # a loop's ID names itself (LLVM's rule)
        back.set_metadata("llvm.loop", loop_id)
    builder.position_at_end(done)
    final = []
    for v in new:
        f = builder.phi(zero.type)
        f.add_incoming(zero, entry)
        f.add_incoming(v, tail)
        final.append(f)
    return final


def lane_mask(builder, count, left):
    """<count x i1>: lane i < left."""
    ivec = ir.VectorType(I64, count)
    index = ir.Constant(ivec, list(range(count)))
    at = builder.insert_element(ir.Constant(ivec, ir.Undefined), left, ir.Constant(I32, 0))
    at = builder.shuffle_vector(at, at, ir.Constant(ir.VectorType(I32, count), [0] * count))
    return builder.icmp_signed("<", index, at)


def masked(builder, vec, ptr, mask, value=None):
    """llvm.masked.load (value None; masked-off lanes 0) or llvm.masked.store of vec
    (float32, float64 or integer lanes)."""
    el = vec.element
    kind = f"i{el.width}" if isinstance(el, ir.IntType) else "f32"
    kind = "f64" if el == ir.DoubleType() else kind
    suffix = f"v{vec.count}{kind}.p0v{vec.count}{kind}"
    align = ir.Constant(I32, 4)
    if value is None:
        name, args, ret = "llvm.masked.load." + suffix, [ptr, align, mask, zeros(vec)], vec
    else:
        name, args, ret = "llvm.masked.store." + suffix, [value, ptr, align, mask], ir.VoidType()
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name
    )
    return builder.call(fn, args)


def zeros(vec):
    return ir.Constant(vec, [0 if isinstance(vec.element, ir.IntType) else 0.0] * vec.count)


def load(builder, vec, ptr, left=None):
    """A vector load, masked to its first `left` lanes (the others 0) unless left is None."""
    if left is None:
        return builder.load(ptr, align=4)
    return masked(builder, vec, ptr, lane_mask(builder, vec.count, left))


def store(builder, vec, ptr, value, left=None):
    """A vector store, of its first `left` lanes only unless left is None (none where
    left <= 0, all from vec.count on)."""
    if left is None:
        builder.store(value, ptr, align=4)
    elif VECTOR_BITS == 512:
        masked(builder, vec, ptr, lane_mask(builder, vec.count, left), value)
    else:
        _store_pieces(builder, vec, ptr, value, left)


# Without AVX-512 a masked store is vmaskmovps, slow on AMD's cores: one in a loop took
# 3.75 ns against a plain store's 0.63 on an AMD EPYC Zen 3, and LeNet-5 makes ~80,000 a
# step (the ends of its rows of 28, 14, 10 and 5). Stored in pieces instead, a half,
# then a quarter ... of the vector where `left` has that bit (branches a row length
# keeps predictable): 1.13 ns. Masked loads cost what plain ones do there.
def _store_pieces(builder, vec, ptr, value, left):
    n = vec.count
    left = builder.select(builder.icmp_signed("<", left, const(0)), const(0), left)
    left = builder.select(builder.icmp_signed(">", left, const(n)), const(n), left)
    element = builder.bitcast(ptr, vec.element.as_pointer())
    at, size = const(0), n  # (n's bit: all of it)
    while size >= 1:
        take = builder.icmp_signed("!=", builder.and_(left, const(size)), const(0))
        with builder.if_then(take):
            dst = builder.gep(element, [at])
            if size == n:
                builder.store(value, ptr, align=4)
            elif size == 1:
                builder.store(builder.extract_element(value, ir.Constant(I32, 0)), dst, align=4)
            else:
                piece = ir.VectorType(vec.element, size)
                first = ir.Constant(ir.VectorType(I32, size), list(range(size)))
                part = builder.shuffle_vector(value, value, first)
                builder.store(part, builder.bitcast(dst, piece.as_pointer()), align=4)
        # the lanes after the piece move to the front where it was stored
        after = ir.Constant(ir.VectorType(I32, n), [min(i + size, n - 1) for i in range(n)])
        value = builder.select(take, builder.shuffle_vector(value, value, after), value)
        at = builder.add(at, builder.select(take, const(size), const(0)))
        size //= 2


def vectors(builder, count, width, carried, body):
    """carried = body(j, left, carried) for each run of `width` elements from j = 0 up
    to `count`: the whole ones with left None (plain loads and stores), then the rest,
    `left` long, if any (masked ones; skipped where there is none: an empty masked store
    is not free without AVX-512). Returns the last carried value. Rows as short as
    LeNet-5's (28, 14, 10 and 5 columns) otherwise fall to the scalar tail of the loops
    LLVM vectorises; masked throughout, VGG-small's 32x32 pools ran at half the speed."""
    full = builder.sdiv(count, const(width))
    rest = builder.sub(count, builder.mul(full, const(width)))

    def whole(i, carried):
        return [body(builder.mul(i, const(width)), None, carried[0])]

    carried = loop(builder, full, 1, carried, whole, False)[0]
    before = builder.block
    with builder.if_then(builder.icmp_signed(">", rest, const(0))):
        tail = body(builder.mul(full, const(width)), rest, carried)
        tail_block = builder.block
    merged = builder.phi(carried.type)
    merged.add_incoming(carried, before)
    merged.add_incoming(tail, tail_block)
    return merged
