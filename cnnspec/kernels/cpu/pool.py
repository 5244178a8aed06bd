"""Pooling kernels (max, average, global average, LeNet-5 trainable subsampling).

Output spatial sizes come from the ``out`` arrays (the caller handles ceil_mode).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _llvm
from ._common import SplitBySize, check_c, check_shape

__all__ = [
    "maxpool2d_forward",
    "maxpool2d_backward",
    "avgpool2d_forward",
    "avgpool2d_backward",
    "global_avgpool2d_forward",
    "global_avgpool2d_backward",
    "subsample2d_forward",
    "subsample2d_backward",
]


def _tiled(shape, out_shape, kh, kw, sh, sw, pads):
    """Windows that tile the input without overlap or padding."""
    h, w = shape[2], shape[3]
    oh, ow = out_shape[2], out_shape[3]
    return (
        (sh, sw) == (kh, kw)
        and not any(pads)
        and (oh - 1) * sh + kh <= h
        and (ow - 1) * sw + kw <= w
    )


# --------------------------------------------------------------------------- max pool
@SplitBySize
def _maxpool_fwd(x, kh, kw, sh, sw, pt, pl, out, argmax):
    n_, c_, h_, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        op = out[n, c]
        ap = argmax[n, c]
        for oy in range(oh):
            hs = oy * sh - pt
            he = min(hs + kh, h_)
            hs = max(hs, 0)
            for ox in range(ow):
                ws = ox * sw - pl
                we = min(ws + kw, w_)
                ws = max(ws, 0)
                if hs >= he or ws >= we:  # window entirely in the padding
                    op[oy, ox] = -np.inf
                    ap[oy, ox] = -1
                    continue
                best = xp[hs, ws]
                idx = hs * w_ + ws
                nan_probe = xp[hs, ws] - xp[hs, ws]  # becomes NaN if any NaN/inf is seen
                for iy in range(hs, he):
                    xr = xp[iy]
                    for ix in range(ws, we):
                        v = xr[ix]
                        nan_probe += v
                        if v > best:
                            best = v
                            idx = iy * w_ + ix
                if nan_probe != nan_probe:
                    # rare slow path, PyTorch's exact rule: (v > best) or isnan(v) wins
                    best = -np.inf
                    idx = hs * w_ + ws
                    for iy in range(hs, he):
                        for ix in range(ws, we):
                            v = xp[iy, ix]
                            if v > best or v != v:
                                best = v
                                idx = iy * w_ + ix
                op[oy, ox] = best
                ap[oy, ox] = idx


# Each kernel's numpy stand-in (`_numpy`) computes a first run's first steps while a
# child compiles the kernel's builds (background.py; LeNet-5's pools and loss had been
# ~1.4 s of CPU before its first step, AMD EPYC Zen 3): the kernels' values and indices,
# in their order of operations (float64 sums excepted: their last bits may differ).
def _maxpool_fwd_numpy(x, kh, kw, sh, sw, pt, pl, out, argmax):
    # windows clipped to the input, scanned row by row from -inf: PyTorch's rule, which
    # the kernel's fast path agrees with on finite values; the padding (-inf) never wins
    n, c, h, w = x.shape
    oh, ow = out.shape[2], out.shape[3]
    rows, cols = (oh - 1) * sh + kh, (ow - 1) * sw + kw
    xp = np.full((n, c, max(rows, pt + h), max(cols, pl + w)), -np.inf, x.dtype)
    xp[:, :, pt : pt + h, pl : pl + w] = x
    y0, x0 = np.arange(oh)[:, None] * sh - pt, np.arange(ow) * sw - pl  # windows' corners
    best = np.full(out.shape, -np.inf, x.dtype)
    first = np.maximum(y0, 0) * w + np.maximum(x0, 0)
    pick = np.broadcast_to(first, out.shape).astype(np.int32)
    for i in range(kh):
        for j in range(kw):
            v = xp[:, :, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw]
            wins = (v > best) | np.isnan(v)
            best = np.where(wins, v, best)
            pick = np.where(wins, (y0 + i) * w + x0 + j, pick)
    empty = (np.minimum(y0 + kh, h) <= np.maximum(y0, 0)) | (
        np.minimum(x0 + kw, w) <= np.maximum(x0, 0)
    )
    out[...] = best
    argmax[...] = np.where(empty, -1, pick)


@SplitBySize
def _maxpool_bwd(dout, argmax, dx):
    # 2-D views: dout/argmax (NC, OH*OW), dx (NC, H*W)
    nc_, hw = dx.shape
    lo = dout.shape[1]
    for nc in prange(nc_):
        for i in range(hw):
            dx[nc, i] = 0
        for o in range(lo):
            idx = argmax[nc, o]
            if idx >= 0:
                dx[nc, idx] += dout[nc, o]


def _maxpool_bwd_numpy(dout, argmax, dx):
    dx[...] = 0
    rows, cols = np.nonzero(argmax >= 0)  # row by row, as the kernel adds them
    np.add.at(dx, (rows, argmax[rows, cols]), dout[rows, cols])


# 2x2 windows in vectors of outputs: rows as short as LeNet-5's (5 and 14 outputs) fell
# to the scalar tail of the loops LLVM vectorised. LeNet-5's pools, b64, 1 thread, AMD
# EPYC Zen 5 (512-bit): S4's max forward (64x16x10x10) 0.065 -> 0.028 ms.
def _pair_lanes(builder, vec, row, j, left):
    """The even and odd elements of row[2j:][:2 * vec.count], as two vectors, loaded
    masked where fewer than vec.count outputs are `left` (None: a whole vector's;
    masked-off lanes 0)."""
    n = vec.count
    first = builder.mul(j, _llvm.const(2))
    two = None if left is None else builder.mul(left, _llvm.const(2))

    def half(k):  # elements 2j + k*n .. of the row, the first 2*left - k*n of them
        ptr = _llvm.vec_ptr(builder, row, builder.add(first, _llvm.const(k * n)), vec)
        return _llvm.load(
            builder, vec, ptr, None if two is None else builder.sub(two, _llvm.const(k * n))
        )

    a, b = half(0), half(1)
    take = [ir.Constant(ir.VectorType(_llvm.I32, n), list(range(k, 2 * n, 2))) for k in (0, 1)]
    return builder.shuffle_vector(a, b, take[0]), builder.shuffle_vector(a, b, take[1])


def _window(builder, vec, plane, w, oy, j, left):
    """The 2x2 windows of outputs (oy, j..): their first element's index in the plane
    (2oy*w + 2j), the window's four elements as vectors (top left, top right, bottom
    left, bottom right; rows `w` apart, _pair_lanes' masking), and their sum in the
    loops' order, ((x00 + x01) + x10) + x11."""
    top = builder.mul(builder.mul(oy, _llvm.const(2)), w)
    r0 = builder.gep(plane, [top])
    v0, v1 = _pair_lanes(builder, vec, r0, j, left)
    v2, v3 = _pair_lanes(builder, vec, builder.gep(r0, [w]), j, left)
    total = builder.fadd(builder.fadd(builder.fadd(v0, v1), v2), v3)
    return builder.add(top, builder.mul(j, _llvm.const(2))), (v0, v1, v2, v3), total


def _rows_2x2(builder, n, oh, ow, body, zero):
    """body(oy, j, left, carried) for each output row oy < oh and each vector of n
    outputs from column j (_llvm.vectors: whole vectors with left None, then the row's
    rest), carrying one value (from `zero`) through all; returns it."""

    def row(oy, carried):
        return [_llvm.vectors(builder, ow, n, carried[0], lambda j, left, c: body(oy, j, left, c))]

    return _llvm.loop(builder, oh, 1, zero, row, False)[0]


@intrinsic
def max_rows_2x2(typingctx, x, x_at, w, out, argmax, out_at, oh, ow):
    """2x2 max pooling of a plane: out[out_at + oy*ow + ox] = the largest of x's window
    (rows 2oy and 2oy + 1 of the plane at x_at, rows `w` apart; columns 2ox, 2ox + 1),
    the first of equals; argmax the index in the plane. Returns 1 if a window held a
    NaN or an infinity (or its sum overflowed): the caller takes such planes PyTorch's
    way."""
    i64 = types.int64
    sig = i64(x, i64, i64, out, argmax, i64, i64, i64)

    def codegen(context, builder, signature, args):
        x_ary, x_at, w, o_ary, a_ary, o_at, oh, ow = args
        vec = _llvm.vector(signature.args[0].dtype)
        n = vec.count
        ivec, bvec = ir.VectorType(_llvm.I32, n), ir.VectorType(ir.IntType(1), n)
        px = _llvm.base(context, builder, signature.args[0], x_ary, x_at)
        po = _llvm.base(context, builder, signature.args[3], o_ary, o_at)
        pa = _llvm.base(context, builder, signature.args[4], a_ary, o_at)
        lanes2 = ir.Constant(ivec, list(range(0, 2 * n, 2)))  # 2 * lane
        w32 = builder.trunc(w, _llvm.I32)
        # where each of the window's 4 elements is, past its first
        steps = [ir.Constant(_llvm.I32, 1), w32, builder.add(w32, ir.Constant(_llvm.I32, 1))]

        def chunk(oy, j, left, bad):
            first, (v0, *rest), s = _window(builder, vec, px, w, oy, j, left)
            # a NaN or inf makes s - s NaN (masked-off lanes are 0)
            nonfinite = builder.fcmp_unordered("!=", builder.fsub(s, s), _llvm.zeros(vec))
            at = builder.add(_llvm.splat(builder, ivec, builder.trunc(first, _llvm.I32)), lanes2)
            best, idx = v0, at
            for v, step in zip(rest, steps, strict=True):
                wins = builder.fcmp_ordered(">", v, best)
                idx = builder.select(wins, builder.add(at, _llvm.splat(builder, ivec, step)), idx)
                best = builder.select(wins, v, best)
            at_out = builder.add(builder.mul(oy, ow), j)
            _llvm.store(builder, vec, _llvm.vec_ptr(builder, po, at_out, vec), best, left)
            _llvm.store(builder, ivec, _llvm.vec_ptr(builder, pa, at_out, ivec), idx, left)
            return builder.or_(bad, nonfinite)

        bad = _rows_2x2(builder, n, oh, ow, chunk, ir.Constant(bvec, [0] * n))
        wide = ir.IntType(n)
        any_bad = builder.icmp_unsigned("!=", builder.bitcast(bad, wide), ir.Constant(wide, 0))
        return builder.zext(any_bad, ir.IntType(64))

    return sig, codegen


@intrinsic
def avg_rows_2x2(typingctx, x, x_at, w, out, out_at, oh, ow):
    """2x2 average pooling of a plane (windows as max_rows_2x2's): ((x00 + x01) + x10 +
    x11) * 0.25, the order and values of the loops it replaces."""
    i64 = types.int64
    sig = types.void(x, i64, i64, out, i64, i64, i64)

    def codegen(context, builder, signature, args):
        x_ary, x_at, w, o_ary, o_at, oh, ow = args
        vec = _llvm.vector(signature.args[0].dtype)
        n = vec.count
        px = _llvm.base(context, builder, signature.args[0], x_ary, x_at)
        po = _llvm.base(context, builder, signature.args[3], o_ary, o_at)
        quarter = ir.Constant(vec, [0.25] * n)

        def chunk(oy, j, left, carried):
            s = _window(builder, vec, px, w, oy, j, left)[2]
            at_out = builder.add(builder.mul(oy, ow), j)
            _llvm.store(
                builder,
                vec,
                _llvm.vec_ptr(builder, po, at_out, vec),
                builder.fmul(s, quarter),
                left,
            )
            return carried

        _rows_2x2(builder, n, oh, ow, chunk, _llvm.const(0))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def avg_rows_2x2_backward(typingctx, dout, at, dx, dx_at, w, oh, ow):
    """The gradient of avg_rows_2x2: dout * 0.25 into each of its window's 4 elements
    (rows 2oy, 2oy + 1 of the plane at dx_at, `w` apart); nothing else is written."""
    i64 = types.int64
    sig = types.void(dout, i64, dx, i64, i64, i64, i64)

    def codegen(context, builder, signature, args):
        d_ary, at, dx_ary, dx_at, w, oh, ow = args
        vec = _llvm.vector(signature.args[0].dtype)
        n = vec.count
        pd = _llvm.base(context, builder, signature.args[0], d_ary, at)
        px = _llvm.base(context, builder, signature.args[2], dx_ary, dx_at)
        quarter = ir.Constant(vec, [0.25] * n)
        twice = [ir.Constant(ir.VectorType(_llvm.I32, n), [k + i // 2 for i in range(n)])
                 for k in (0, n // 2)]  # fmt: skip

        def chunk(oy, j, left, carried):
            ptr = _llvm.vec_ptr(builder, pd, builder.add(builder.mul(oy, ow), j), vec)
            g = builder.fmul(_llvm.load(builder, vec, ptr, left), quarter)
            r0 = builder.gep(px, [builder.mul(builder.mul(oy, _llvm.const(2)), w)])
            for k, half in enumerate(twice):  # lanes 0..n/2-1 doubled, then the rest
                v = builder.shuffle_vector(g, g, half)
                rest = (
                    None
                    if left is None
                    else builder.sub(builder.mul(left, _llvm.const(2)), _llvm.const(k * n))
                )
                col = builder.add(builder.mul(j, _llvm.const(2)), _llvm.const(k * n))
                for r in (r0, builder.gep(r0, [w])):
                    _llvm.store(builder, vec, _llvm.vec_ptr(builder, r, col, vec), v, rest)
            return carried

        _rows_2x2(builder, n, oh, ow, chunk, _llvm.const(0))
        return context.get_dummy_value()

    return sig, codegen


# 2x2 windows are kernels of their own, not a branch of the general ones: a model that
# runs only 2x2 pools (LeNet-5) does not compile the general loops (~0.2 s of CPU each on a
# cold start), and one with other windows does not compile the 2x2 code.
@SplitBySize
def _maxpool_fwd_2x2(x, out, argmax):
    # 2x2 windows inside the input: whole planes in vectors (max_rows_2x2)
    n_, c_, h_, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    xf, of, af = x.reshape(-1), out.reshape(-1), argmax.reshape(-1)
    for nc in prange(n_ * c_):
        if max_rows_2x2(xf, nc * h_ * w_, w_, of, af, nc * oh * ow, oh, ow) == 0:
            continue
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        for oy in range(oh):
            orow, arow = out[n, c, oy], argmax[n, c, oy]
            top = 2 * oy * w_
            for ox in range(ow):  # PyTorch's rule: (v > best) or isnan(v) wins
                best = -np.inf
                idx = top + 2 * ox
                for iy in range(2 * oy, 2 * oy + 2):
                    for ix in range(2 * ox, 2 * ox + 2):
                        v = xp[iy, ix]
                        if v > best or v != v:
                            best = v
                            idx = iy * w_ + ix
                orow[ox] = best
                arow[ox] = idx


def _maxpool_fwd_2x2_numpy(x, out, argmax):
    _maxpool_fwd_numpy(x, 2, 2, 2, 2, 0, 0, out, argmax)  # (its windows, unpadded)


@SplitBySize
def _maxpool_fwd_tiled(x, kh, kw, out, argmax):
    # non-overlapping windows inside the input: no bounds per window
    n_, c_, _h, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        for oy in range(oh):
            orow, arow = out[n, c, oy], argmax[n, c, oy]
            for ox in range(ow):
                hs, ws = oy * kh, ox * kw
                best = xp[hs, ws]
                idx = hs * w_ + ws
                nan_probe = best - best  # becomes NaN if any NaN/inf is seen
                for iy in range(hs, hs + kh):
                    xr = xp[iy]
                    for ix in range(ws, ws + kw):
                        v = xr[ix]
                        nan_probe += v
                        gt = v > best  # selects, not branches: random data mispredicts
                        idx = iy * w_ + ix if gt else idx
                        best = v if gt else best
                if nan_probe != nan_probe:  # PyTorch's rule: (v > best) or isnan(v) wins
                    best = -np.inf
                    for iy in range(hs, hs + kh):
                        for ix in range(ws, ws + kw):
                            v = xp[iy, ix]
                            if v > best or v != v:
                                best = v
                                idx = iy * w_ + ix
                orow[ox] = best
                arow[ox] = idx


@SplitBySize
def _pick(x, sh, sw, out, argmax):
    # 1x1 windows (ResNet's option-A shortcut subsamples): every sh-th row, sw-th column
    n_, c_, _h, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        for oy in range(oh):
            src = x[n, c, oy * sh]
            orow, arow = out[n, c, oy], argmax[n, c, oy]
            for ox in range(ow):
                orow[ox] = src[ox * sw]
                arow[ox] = oy * sh * w_ + ox * sw


def _pick_numpy(x, sh, sw, out, argmax):
    oh, ow = out.shape[2], out.shape[3]
    out[...] = x[:, :, : oh * sh : sh, : ow * sw : sw]
    argmax[...] = np.arange(oh)[:, None] * sh * x.shape[3] + np.arange(ow) * sw


def maxpool2d_forward(x, kh, kw, sh, sw, pt, pl, out, argmax):
    """Max pooling; argmax (int32, like out) gets the flat h*W+w index in x's plane."""
    check_c(x=x, out=out, argmax=argmax)
    n, c = x.shape[:2]
    check_shape("out", out, (n, c, out.shape[2], out.shape[3]))
    check_shape("argmax", argmax, out.shape)
    if argmax.dtype != np.int32:
        raise ValueError("argmax must be int32")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError("empty input plane")
    if (kh, kw, pt, pl) == (1, 1, 0, 0):
        _pick.or_stand_in(_pick_numpy, x, int(sh), int(sw), out, argmax)
        return
    if _tiled(x.shape, out.shape, kh, kw, sh, sw, (pt, pl)):
        if (kh, kw) == (2, 2):
            _maxpool_fwd_2x2.or_stand_in(_maxpool_fwd_2x2_numpy, x, out, argmax)
        else:
            _maxpool_fwd_tiled(x, int(kh), int(kw), out, argmax)
        return
    args = (x, int(kh), int(kw), int(sh), int(sw), int(pt), int(pl), out, argmax)
    _maxpool_fwd.or_stand_in(_maxpool_fwd_numpy, *args)


def maxpool2d_backward(dout, argmax, dx):
    """dx <- scatter of dout to the argmax positions (overwrites dx)."""
    check_c(dout=dout, argmax=argmax, dx=dx)
    check_shape("argmax", argmax, dout.shape)
    n, c = dx.shape[:2]
    check_shape("dout", dout, (n, c, dout.shape[2], dout.shape[3]))
    views = dout.reshape(n * c, -1), argmax.reshape(n * c, -1), dx.reshape(n * c, -1)
    _maxpool_bwd.or_stand_in(_maxpool_bwd_numpy, *views)


# ----------------------------------------------------------------------- average pool
@njit(cache=True)
def _avg_window(o, s, k, p_before, size, p_after):
    """PyTorch AvgPool2d window: clipped [start, end) and the padded pool extent."""
    start = o * s - p_before
    end = min(start + k, size + p_after)
    extent = end - start
    start = max(start, 0)
    end = min(end, size)
    return start, end, extent


@SplitBySize
def _avgpool_fwd(x, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, out):
    n_, c_, h_, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        op = out[n, c]
        for oy in range(oh):
            hs, he, ph = _avg_window(oy, sh, kh, pt, h_, pb)
            for ox in range(ow):
                ws, we, pw = _avg_window(ox, sw, kw, pl, w_, pr)
                if count_include_pad:
                    div = ph * pw
                else:
                    div = (he - hs) * (we - ws)
                acc = 0.0
                for iy in range(hs, he):
                    xr = xp[iy]
                    for ix in range(ws, we):
                        acc += xr[ix]
                op[oy, ox] = acc / div if div > 0 else 0.0


@SplitBySize
def _avgpool_bwd(dout, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, dx):
    n_, c_, h_, w_ = dx.shape
    oh, ow = dout.shape[2], dout.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        dp = dx[n, c]
        gp = dout[n, c]
        dp[:, :] = 0
        for oy in range(oh):
            hs, he, ph = _avg_window(oy, sh, kh, pt, h_, pb)
            for ox in range(ow):
                ws, we, pw = _avg_window(ox, sw, kw, pl, w_, pr)
                if count_include_pad:
                    div = ph * pw
                else:
                    div = (he - hs) * (we - ws)
                if div <= 0:
                    continue
                g = gp[oy, ox] / div
                for iy in range(hs, he):
                    dr = dp[iy]
                    for ix in range(ws, we):
                        dr[ix] += g


# Non-overlapping windows inside the input (stride = kernel, no padding: LeNet's,
# VGG's and most pools) take loops without per-window bounds: 3-6x faster.
@SplitBySize
def _avgpool_fwd_2x2(x, out):
    n_, c_, h_, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    xf, of = x.reshape(-1), out.reshape(-1)
    for nc in prange(n_ * c_):
        avg_rows_2x2(xf, nc * h_ * w_, w_, of, nc * oh * ow, oh, ow)


def _avgpool_fwd_2x2_numpy(x, out):
    n, c, oh, ow = out.shape
    win = x[:, :, : 2 * oh, : 2 * ow].reshape(n, c, oh, 2, ow, 2)
    v0, v1, v2, v3 = (win[:, :, :, i, :, j] for i in (0, 1) for j in (0, 1))
    out[...] = (((v0 + v1) + v2) + v3) * x.dtype.type(0.25)  # avg_rows_2x2's order


@SplitBySize
def _avgpool_fwd_tiled(x, kh, kw, out):
    n_, c_ = x.shape[0], x.shape[1]
    oh, ow = out.shape[2], out.shape[3]
    scale = 1.0 / (kh * kw)
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        xp = x[n, c]
        for oy in range(oh):
            orow = out[n, c, oy]
            for ox in range(ow):
                orow[ox] = 0.0
            for i in range(kh):
                xr = xp[oy * kh + i]
                for ox in range(ow):
                    acc = orow[ox]
                    for j in range(kw):
                        acc += xr[ox * kw + j]
                    orow[ox] = acc
            for ox in range(ow):
                orow[ox] *= scale


@SplitBySize
def _avgpool_bwd_tiled(dout, kh, kw, dx):
    n_, c_ = dx.shape[0], dx.shape[1]
    oh, ow = dout.shape[2], dout.shape[3]
    scale = 1.0 / (kh * kw)
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        dp = dx[n, c]
        if oh * kh < dp.shape[0] or ow * kw < dp.shape[1]:
            dp[:, :] = 0  # rows / columns no window covers
        for oy in range(oh):
            grow = dout[n, c, oy]
            for i in range(kh):
                dr = dp[oy * kh + i]
                for ox in range(ow):
                    g = grow[ox] * scale
                    for j in range(kw):
                        dr[ox * kw + j] = g


@SplitBySize
def _avgpool_bwd_2x2(dout, dx):
    # windows that cover dx exactly: every element written
    n_, c_, h_, w_ = dx.shape
    oh, ow = dout.shape[2], dout.shape[3]
    df, dxf = dout.reshape(-1), dx.reshape(-1)
    for nc in prange(n_ * c_):
        avg_rows_2x2_backward(df, nc * oh * ow, dxf, nc * h_ * w_, w_, oh, ow)


def _avgpool_bwd_2x2_numpy(dout, dx):
    n, c, oh, ow = dout.shape
    g = dout * dout.dtype.type(0.25)
    dx.reshape(n, c, oh, 2, ow, 2)[...] = g[:, :, :, None, :, None]


_NONE = (0, 0, 0, 0, False)  # no padding (t, b, l, r), the divisor counted in the input


def _avg_windows(shape, out_shape, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad):
    """Each output's window as the kernels take it: (oy, ox, rows, columns, divisor)."""
    h, w = shape[2], shape[3]
    for oy in range(out_shape[2]):
        hs, he, ph = _avg_window.py_func(oy, sh, kh, pt, h, pb)
        for ox in range(out_shape[3]):
            ws, we, pw = _avg_window.py_func(ox, sw, kw, pl, w, pr)
            div = ph * pw if count_include_pad else (he - hs) * (we - ws)
            yield oy, ox, slice(hs, he), slice(ws, we), div


def _avgpool_fwd_numpy(x, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, out):
    window = (kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad)
    for oy, ox, rows, cols, div in _avg_windows(x.shape, out.shape, *window):
        total = x[:, :, rows, cols].sum(axis=(2, 3), dtype=np.float64)
        out[:, :, oy, ox] = total / div if div > 0 else 0.0


def _avgpool_bwd_numpy(dout, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, dx):
    dx[...] = 0
    window = (kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad)
    for oy, ox, rows, cols, div in _avg_windows(dx.shape, dout.shape, *window):
        if div > 0:  # (a float64 quotient, as the kernel's, added window by window)
            dx[:, :, rows, cols] += (dout[:, :, oy, ox] / np.float64(div))[:, :, None, None]


def avgpool2d_forward(x, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, out):
    """PyTorch AvgPool2d (divisor rule generalised to asymmetric padding)."""
    check_c(x=x, out=out)
    n, c = x.shape[:2]
    check_shape("out", out, (n, c, out.shape[2], out.shape[3]))
    if _tiled(x.shape, out.shape, kh, kw, sh, sw, (pt, pb, pl, pr)):
        if (kh, kw) == (2, 2):
            _avgpool_fwd_2x2.or_stand_in(_avgpool_fwd_2x2_numpy, x, out)
        else:
            _avgpool_fwd_tiled(x, int(kh), int(kw), out)
        return
    window = (int(kh), int(kw), int(sh), int(sw), int(pt), int(pb), int(pl), int(pr))
    _avgpool_fwd.or_stand_in(_avgpool_fwd_numpy, x, *window, bool(count_include_pad), out)


def avgpool2d_backward(dout, kh, kw, sh, sw, pt, pb, pl, pr, count_include_pad, dx):
    """Gradient of :func:`avgpool2d_forward` (overwrites dx)."""
    check_c(dout=dout, dx=dx)
    n, c = dx.shape[:2]
    check_shape("dout", dout, (n, c, dout.shape[2], dout.shape[3]))
    if _tiled(dx.shape, dout.shape, kh, kw, sh, sw, (pt, pb, pl, pr)):
        if (kh, kw) == (2, 2) and dx.shape[2:] == (2 * dout.shape[2], 2 * dout.shape[3]):
            _avgpool_bwd_2x2.or_stand_in(_avgpool_bwd_2x2_numpy, dout, dx)
            return
        _avgpool_bwd_tiled(dout, int(kh), int(kw), dx)
        return
    window = (int(kh), int(kw), int(sh), int(sw), int(pt), int(pb), int(pl), int(pr))
    _avgpool_bwd.or_stand_in(_avgpool_bwd_numpy, dout, *window, bool(count_include_pad), dx)


# ---------------------------------------------------------------- global average pool
@SplitBySize
def _gap_fwd(x, out):
    # x (NC, HW), out (NC,)
    nc_, hw = x.shape
    for nc in prange(nc_):
        acc = 0.0
        for i in range(hw):
            acc += x[nc, i]
        out[nc] = acc / hw


@SplitBySize
def _gap_bwd(dout, dx):
    nc_, hw = dx.shape
    for nc in prange(nc_):
        g = dout[nc] / hw
        for i in range(hw):
            dx[nc, i] = g


def _gap_fwd_numpy(x, out):
    out[...] = x.sum(axis=1, dtype=np.float64) / x.shape[1]  # (float64, as the kernel's)


def _gap_bwd_numpy(dout, dx):
    dx[...] = (dout / np.float64(dx.shape[1]))[:, None]  # (float64 before it is stored)


def global_avgpool2d_forward(x, out):
    """out (N, C) = mean of x (N, C, H, W) over H, W."""
    check_c(x=x, out=out)
    n, c = x.shape[:2]
    check_shape("out", out, (n, c))
    _gap_fwd.or_stand_in(_gap_fwd_numpy, x.reshape(n * c, -1), out.reshape(n * c))


def global_avgpool2d_backward(dout, dx):
    check_c(dout=dout, dx=dx)
    n, c = dx.shape[:2]
    check_shape("dout", dout, (n, c))
    _gap_bwd.or_stand_in(_gap_bwd_numpy, dout.reshape(n * c), dx.reshape(n * c, -1))


# ------------------------------------------------------ LeNet-5 trainable subsampling
@SplitBySize
def _subsample_fwd(x, coef, bias, kh, kw, sh, sw, out, pooled):
    n_, c_, h_, w_ = x.shape
    oh, ow = out.shape[2], out.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = coef[c]
        b = bias[c]
        for oy in range(oh):
            hs = oy * sh
            he = min(hs + kh, h_)
            for ox in range(ow):
                ws = ox * sw
                we = min(ws + kw, w_)
                acc = 0.0
                for iy in range(hs, he):
                    for ix in range(ws, we):
                        acc += x[n, c, iy, ix]
                cnt = (he - hs) * (we - ws)
                p = acc / cnt if cnt > 0 else 0.0
                pooled[n, c, oy, ox] = p
                out[n, c, oy, ox] = a * pooled[n, c, oy, ox] + b


@SplitBySize
def _subsample_bwd_dx(dout, coef, kh, kw, sh, sw, dx):
    n_, c_, h_, w_ = dx.shape
    oh, ow = dout.shape[2], dout.shape[3]
    for nc in prange(n_ * c_):
        n = nc // c_
        c = nc - n * c_
        a = coef[c]
        for iy in range(h_):
            for ix in range(w_):
                dx[n, c, iy, ix] = 0
        for oy in range(oh):
            hs = oy * sh
            he = min(hs + kh, h_)
            for ox in range(ow):
                ws = ox * sw
                we = min(ws + kw, w_)
                cnt = (he - hs) * (we - ws)
                if cnt <= 0:
                    continue
                g = a * dout[n, c, oy, ox] / cnt
                for iy in range(hs, he):
                    for ix in range(ws, we):
                        dx[n, c, iy, ix] += g


@SplitBySize
def _subsample_bwd_params(dout, pooled, dcoef, dbias):
    # dout/pooled (N, C, L); per-channel sums in fixed (n, l) order -> deterministic
    n_, c_, l_ = dout.shape
    for c in prange(c_):
        sa = 0.0
        sb = 0.0
        for n in range(n_):
            for i in range(l_):
                g = dout[n, c, i]
                sa += g * pooled[n, c, i]
                sb += g
        dcoef[c] = sa
        dbias[c] = sb


def _subsample_fwd_numpy(x, coef, bias, kh, kw, sh, sw, out, pooled):
    # the average pool's windows without padding: clipped to the input, counted inside it
    for oy, ox, rows, cols, count in _avg_windows(x.shape, out.shape, kh, kw, sh, sw, *_NONE):
        total = x[:, :, rows, cols].sum(axis=(2, 3), dtype=np.float64)
        pooled[:, :, oy, ox] = total / count if count > 0 else 0.0
    out[...] = coef[:, None, None] * pooled + bias[:, None, None]


def _subsample_bwd_dx_numpy(dout, coef, kh, kw, sh, sw, dx):
    dx[...] = 0
    for oy, ox, rows, cols, count in _avg_windows(dx.shape, dout.shape, kh, kw, sh, sw, *_NONE):
        if count > 0:  # (a float64 quotient, as the kernel's, added window by window)
            g = coef * dout[:, :, oy, ox] / np.float64(count)
            dx[:, :, rows, cols] += g[:, :, None, None]


def _subsample_bwd_params_numpy(dout, pooled, dcoef, dbias):
    dcoef[...] = (dout * pooled).sum(axis=(0, 2), dtype=np.float64)
    dbias[...] = dout.sum(axis=(0, 2), dtype=np.float64)


def subsample2d_forward(x, coef, bias, kh, kw, sh, sw, out, pooled):
    """LeNet-5 subsampling: pooled = window mean (no padding), out = coef[c]*pooled + bias[c]."""
    check_c(x=x, coef=coef, bias=bias, out=out, pooled=pooled)
    n, c = x.shape[:2]
    check_shape("out", out, (n, c, out.shape[2], out.shape[3]))
    check_shape("pooled", pooled, out.shape)
    check_shape("coef", coef, (c,))
    check_shape("bias", bias, (c,))
    args = (x, coef, bias, int(kh), int(kw), int(sh), int(sw), out, pooled)
    _subsample_fwd.or_stand_in(_subsample_fwd_numpy, *args)


def subsample2d_backward(dout, pooled, coef, kh, kw, sh, sw, dx, dcoef, dbias):
    """Gradients of :func:`subsample2d_forward`; dx may be None."""
    check_c(dout=dout, pooled=pooled, coef=coef, dx=dx, dcoef=dcoef, dbias=dbias)
    n, c = dout.shape[:2]
    check_shape("pooled", pooled, dout.shape)
    check_shape("dcoef", dcoef, (c,))
    check_shape("dbias", dbias, (c,))
    views = dout.reshape(n, c, -1), pooled.reshape(n, c, -1), dcoef, dbias
    _subsample_bwd_params.or_stand_in(_subsample_bwd_params_numpy, *views)
    if dx is not None:
        check_shape("dx", dx, (n, c, dx.shape[2], dx.shape[3]))
        args = (dout, coef, int(kh), int(kw), int(sh), int(sw), dx)
        _subsample_bwd_dx.or_stand_in(_subsample_bwd_dx_numpy, *args)
