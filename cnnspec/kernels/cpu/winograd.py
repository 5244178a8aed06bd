"""Winograd F(2x2, 3x3) for 3x3, stride-1, dilation-1, ungrouped conv2d.

Each 2x2 block of outputs (a tile) comes from a 4x4 patch of the padded input d:
Y = A^T [(G g G^T) . (B^T d B)] A, so the 36 multiplies of a direct 2x2 block become
16, one per transform point p, and the channel sums become 16 GEMMs:
M[p] (K x tiles) = U[p] (K x C) V[p] (C x tiles), run on conv.py's register-blocked
``bcast`` kernel. Backward, with dM = A dY A^T (the output transform's adjoint):
dU[p] = dM[p] V[p]^T on the ``dot`` kernel (then dW = G^T dU G), and dV[p] = U[p]^T dM[p]
on ``bcast`` (then dx += B dV B^T, tiles overlapping by 2). dx and dW share dM and V,
so the backward pass takes both the Winograd way or neither.

Error: the transforms only add, subtract and halve. Measured (random normal data, He-
scaled weights, padding 1) as the largest difference from a float64 direct conv over
the largest magnitude of the result, float32:
  shape (C -> K, map)      y: direct / Winograd   dx: direct / Winograd   dW: direct / Winograd
  16 -> 16, 32x32          3.8e-7 / 2.2e-7        1.4e-7 / 2.0e-7         1.9e-7 / 2.7e-7
  64 -> 64, 32x32          8.9e-7 / 4.6e-7        2.0e-7 / 3.2e-7         1.6e-7 / 2.8e-7
  128 -> 128, 16x16        1.3e-6 / 4.7e-7        2.5e-7 / 4.2e-7         1.3e-7 / 2.2e-7
(the forward sums run over C per point instead of 9C, so y comes out closer; dx and
dW carry the transforms of dout and x: ~1.6x the direct error). Float64 Winograd
against float64 direct: <= 3e-15. The test tolerance, Winograd against direct on tiny
shapes: 2e-6 (float32), 1e-13 (float64) of the output's scale. F(4x4, 3x3) (4x fewer
multiplies than direct against 2.25x) was not tried: its transforms carry 2s, 4s and
quarters, which amplify rounding, and cost 6x6 per tile where the 4x4 ones already take
a third of the time here.

Layout per thread (flat workspace, elements): V [16][C][tp] (transformed input, tp
tile columns padded to whole bcast panels), M / dM [16][km][tp], dV [16][cb][tp],
a zero row (tp), dU [16][kd][cd] (as the dot kernel's blocks), db [K], padded dx of a
group of samples. Tiles run in blocks: several whole samples (small maps) or a band of
tile rows of one sample, like the direct conv's tiles. The forward pass splits blocks
among threads; the backward pass gives each thread whole samples (their dx tiles
overlap) and private dU / db sums, added up afterwards in thread order (the same bits
every run).

The micro-kernels are conv.py's. Kernels as in conv.py: a parallel and a serial build
(one thread), helpers without entry points.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
from numba import njit, prange

# conv imports this module for its dispatch: its names are looked up when used
from . import conv, conv_numpy
from ._common import HELPER, VECTOR_BITS, Builds

# CNNSPEC_WINOGRAD: "auto" (default) takes the measured rule below, "0" never uses
# Winograd (the direct conv everywhere: A/B runs, tests), "1" uses it wherever it applies.
MODE = os.environ.get("CNNSPEC_WINOGRAD", "auto")

P = 16  # transform points
# Tile columns of a block (the GEMMs' width: M[p] = U[p] V[p] is K x C times C x cols):
# about 320, whichever the channels, as whole samples where they fit, else bands of tile
# rows. Per-thread elements are capped for very wide layers (32 MiB in float32).
# Measured (1 thread, AMD EPYC Zen 3, 2026-12-04, after short blocks stopped paying for
# full ones; time over the best of targets 64-512 columns, noisy within ~10%):
#   conv (C -> K, map, batch)   forward: old rule / 320     backward: old rule / 320
#   64 -> 64, 32x32, b64        1.01 / 1.00                 1.11-1.28 / 1.00-1.01
#   64 -> 128, 16x16, b64       1.00 / 1.01                 1.09-1.11 / 1.00
#   128 -> 128, 16x16, b64      1.03 / 1.02                 1.00 / 1.00 (same blocks)
#   256 -> 256, 28x28, b16      1.01 / 1.04                 1.06-1.14 / 1.06
#   512 -> 512, 14x14, b16      1.45 / 1.04                 1.26 / 1.04
#   256 -> 256, 56x56, b8       1.34 / 1.05                 1.00 / 1.00 (same blocks)
#   512 -> 512, 28x28, b8       1.14 / 1.04                 1.02 / 1.01
#   128 -> 128, 56x56, b8       1.06 / 1.10                 1.02 / 1.01
#   64 -> 64, 112x112, b4       1.06 / 1.05                 1.06 / 1.05
# (the old rule: 2 MiB forward, 8 MiB backward of transformed tiles: few columns for
# wide layers, many for narrow ones). Longer blocks lose the cache, shorter ones run
# the micro-kernels' loops too short (dU's dot products most).
_BLOCK_COLUMNS = 320
_BLOCK_MAX_ELEMENTS = 1 << 23


def _round_up(n, m):
    return -(-n // m) * m


def applies(x_shape, w_shape, stride, pad, dilation, groups) -> bool:
    """Whether F(2x2, 3x3) computes this conv: 3x3, stride 1, dilation 1, ungrouped."""
    return (
        int(groups) == 1
        and tuple(int(k) for k in w_shape[2:]) == (3, 3)
        and tuple(int(s) for s in stride) == (1, 1)
        and tuple(int(d) for d in dilation) == (1, 1)
        and all(0 <= int(p) <= 2 for p in pad)
    )


# The rule, measured on one core of an AMD EPYC (Zen 5, AVX-512; 2026-12-03), float32,
# direct time over this one's, forward / backward (dx + dW + db, ReLU fused), best of 5
# (/work/notes/s9/wino.py; 2 threads: the same picture):
#                                  512-bit kernels   256-bit kernels
#   ResNet-20 b128, 16 ch 32x32      0.37 / 0.24       0.57 / 0.38
#                   32 ch 16x16      0.47 / 0.23       0.81 / 0.42
#                   64 ch 8x8        0.53 / 0.40       0.90 / 0.62
#   VGG-small b64,  64 ch 32x32      0.88 / 0.58       1.25 / 0.88
#                   64->128 16x16    0.97 / 0.55       1.35 / 0.91
#                   128 ch 16x16     1.02 / 0.74       1.42 / 1.09
# VGG-small's whole train step (1 thread, interleaved in one process, best of 5-9 rounds;
# /work/notes/s9/vggab.py), Winograd forward and backward / forward only / neither:
# 512-bit 257 / 223 / 221 ms; 256-bit 361-402 / 378-402 / 401-424 ms. At 2 threads (wall,
# best / median of 9 alternating rounds, /work/notes/s9/vggab2.py), Winograd on / off:
# 512-bit 134 / 145 against 112 / 122 ms; 256-bit 179 / 198 against 204 / 215 ms. So
# Winograd serves the 256-bit kernels only, both directions. On a CPU without AVX-512, an
# AMD EPYC Zen 3 (2026-12-04, 1 thread, best of 5 interleaved), the same picture, forward /
# backward: ResNet-20's 16, 32, 64 channels 0.56 / 0.37, 0.79 / 0.57, 0.87 / 0.70;
# VGG-small's 1.45 / 0.97, 1.47 / 1.18, 1.36 / 1.28; its train step 572 -> 413 ms and
# inference 173 -> 119 ms with Winograd; the blocks above at or near their best there
# (forward blocks of 256K / 512K elements on 64 channels at 32x32: 58.6 / 51.6 ms).
# The 512-bit direct conv runs at 75-85% of the micro-kernels' peak here; Winograd's
# transforms (LLVM's own vectorisation) run at cache speed and its products on K = C rows
# per point are short, so it gains only where the direct conv is slow. On an Intel Xeon
# (AVX-512) it had gained 0.99-1.28x at 512 bits on VGG-small's shapes, before the direct
# conv's backward became a convolution of its own and its kernels prefetch; not measured
# there since. Thin layers lose at any width.
# After the backward's rows went in vectors and its dM clears shrank (2026-12-04 evening,
# same CPU, 256-bit, b16-b128, same measure): ResNet-20's 16, 32, 64 channels 0.63 / 0.65,
# 0.81 / 0.74, 0.97 / 0.83 (still lose); VGG-small's 64 at 32x32 1.49 / 1.43, 128 at 16x16
# 1.49 / 1.64; and maps under 16 with wide layers, two runs each: 128 ch 14x14 1.27-1.35 /
# 1.11-1.17, 256 ch 14x14 1.01-1.23 / 1.08-1.13, 512 ch 14x14 1.08-1.16 / 0.95-1.11
# (VGG-16's last block at 224x224), against 64 ch 14x14 0.97-1.17 / 0.77-0.87, 128 ch 8x8
# 1.17-1.21 / 0.95-1.09, 256 ch 7x7 0.93 / 0.94, 512 ch 7x7 0.88-0.92 / 1.14-1.26: so from
# 128 channels maps of 14 qualify too. With blocks of ~320 columns (fe70cad; same CPU,
# same measure, 1 / 2 threads): ResNet-20's 16, 32, 64 channels 0.67 / 0.74, 0.87 / 0.88,
# 0.99 / 0.96 at 1 thread; 64 ch 14x14 1.05-1.06 / 1.07 (2 threads 0.98 / 0.95); 128 ch
# 8x8 1.17-1.25 / 1.14-1.18 (0.99-1.09 / 1.04-1.19); 256 ch 8x8 1.10-1.12 / 1.38-1.40
# (0.96 / 0.91); 128, 256 ch 7x7 0.89-0.91 / 0.89-1.01; 512 ch 7x7 1.12-1.13 / 1.25-1.28
# (1.08 / 0.99): gains at 1 thread that 2 threads do not keep, so the rule stays.
AUTO = VECTOR_BITS == 256  # whether "auto" uses Winograd at all
MIN_CHANNELS = 64
MIN_MAP = 16
WIDE_CHANNELS, WIDE_MIN_MAP = 128, 14


def chooses(x_shape, w_shape, out_shape, stride, pad, dilation, groups) -> bool:
    """Whether the dispatch runs this conv (forward and backward) the Winograd way."""
    if MODE == "0" or not applies(x_shape, w_shape, stride, pad, dilation, groups):
        return False
    if MODE == "1":
        return True
    if not AUTO:
        return False
    channels = min(int(x_shape[1]), int(w_shape[0]))
    size = min(int(out_shape[2]), int(out_shape[3]))
    return (channels >= MIN_CHANNELS and size >= MIN_MAP) or (
        channels >= WIDE_CHANNELS and size >= WIDE_MIN_MAP
    )


class _Geometry(NamedTuple):
    ty: int  # tile rows / columns of a sample
    tx: int
    spb: int  # samples per block (small maps), else 1
    rows: int  # tile rows per block (of each sample)
    bands: int  # blocks per sample (when spb == 1)
    tp: int  # tile columns of a block, padded to whole panels
    km: int  # rows of M / dM: K padded to whole bcast and dot blocks
    kd: int  # K padded to whole dot blocks
    cb: int  # C padded to whole bcast blocks (rows of dV)
    cd: int  # C padded to whole dot blocks
    hp: int  # rows of a sample's padded dx (2 * ty + 2)
    per_thread: int
    upack: int  # packed U (shared)


def _geometry(x_shape, w_shape, out_shape, itemsize, threads, backward):
    n, c = int(x_shape[0]), int(x_shape[1])
    k = int(w_shape[0])
    oh, ow = int(out_shape[2]), int(out_shape[3])
    ty, tx = -(-oh // 2), -(-ow // 2)
    nr = conv.panel(itemsize)
    cb, cd = _round_up(c, conv.MR), _round_up(c, conv.ND)
    kb, kd = _round_up(k, conv.MR), _round_up(k, conv.MD)
    km = max(kb, kd)
    per_column = P * (c + km + (cb if backward else 0))  # V, M or dM, dV
    cols = max(nr, min(_BLOCK_COLUMNS, _BLOCK_MAX_ELEMENTS // per_column))
    # the block with the least panel padding (the larger on a tie): whole samples,
    # else bands of tile rows (the last one shorter)
    if ty * tx <= cols:
        most = max(1, min(cols // (ty * tx), -(-n // (2 * threads))))
        spb = max((s * ty * tx / _round_up(s * ty * tx, nr), s) for s in range(1, most + 1))[1]
        rows, bands = ty, 1
    else:
        spb = 1

        def fill(r):
            full, last = divmod(ty, r)
            return ty * tx / (full * _round_up(r * tx, nr) + _round_up(last * tx, nr))

        rows = max((fill(r), r) for r in range(1, max(1, cols // tx) + 1))[1]
        bands = -(-ty // rows)
    tp = _round_up(spb * rows * tx, nr)
    hp = 2 * ty + 2
    size = (
        P * c * tp  # V
        + P * km * tp  # M / dM
        + P * cb * tp  # dV
        + tp  # zero row
        + P * kd * cd  # dU
        + k  # db
        + spb * c * hp * 2 * (tx + 1)  # padded dx, columns split into even / odd
    )
    upack = P * max(kb * c, cb * k)
    return _Geometry(ty, tx, spb, rows, bands, tp, km, kd, cb, cd, hp, size, upack)


def workspace(x_shape, w_shape, out_shape, itemsize) -> int:
    """Elements of workspace the Winograd kernels need on any number of threads up to
    Numba's: a model may run on fewer than it was built for (beside busy processes), and
    fewer threads take larger blocks (samples are shared out two blocks or more each)."""
    shapes = (x_shape, w_shape, out_shape, itemsize)
    need = 0
    for t in range(1, numba.get_num_threads() + 1):
        for backward in (0, 1):
            geo = _geometry(*shapes, t, backward)
            need = max(need, geo.per_thread * t + geo.upack)
    return need


@njit(**HELPER, nogil=True)
def _regions(geo, c_, base):
    """Where a thread's buffers start: V, M, dV, zero row, dU, db, padded dx."""
    tp, km, kd, cb, cd = geo[5], geo[6], geo[7], geo[8], geo[9]
    v_at = base
    m_at = v_at + 16 * c_ * tp
    dv_at = m_at + 16 * km * tp
    zero_at = dv_at + 16 * cb * tp
    du_at = zero_at + tp
    db_at = du_at + 16 * kd * cd
    return v_at, m_at, dv_at, zero_at, du_at, db_at


@njit(**HELPER, nogil=True)
def _pack_u(w, transpose, rows_p, upack):
    """U = G g G^T of every (k, c), packed as bcast's A for each point p:
    upack[p][r // MR][q][r % MR] with rows r = k, inner q = c (forward), or, with
    `transpose`, rows r = c, inner q = k (dx); rows up to rows_p are zero."""
    k_, c_ = w.shape[0], w.shape[1]
    mr = conv.MR
    rows, inner = (c_, k_) if transpose else (k_, c_)
    upack[: 16 * rows_p * inner] = 0.0
    t = np.empty((4, 3), w.dtype)
    u = np.empty(4, w.dtype)
    for k in range(k_):
        for c in range(c_):
            g = w[k, c]
            for j in range(3):  # G g: rows
                t[0, j] = g[0, j]
                t[1, j] = 0.5 * (g[0, j] + g[1, j] + g[2, j])
                t[2, j] = 0.5 * (g[0, j] - g[1, j] + g[2, j])
                t[3, j] = g[2, j]
            r, q = (c, k) if transpose else (k, c)
            for i in range(4):  # (G g) G^T: columns
                u[0] = t[i, 0]
                u[1] = 0.5 * (t[i, 0] + t[i, 1] + t[i, 2])
                u[2] = 0.5 * (t[i, 0] - t[i, 1] + t[i, 2])
                u[3] = t[i, 2]
                for j in range(4):
                    p = i * 4 + j
                    at = ((p * (rows_p // mr) + r // mr) * inner + q) * mr + r % mr
                    upack[at] = u[j]


@njit(cache=True, nogil=True)
def _weight_adjoint(du, dw):
    """dw[k, c] = G^T du[:, k, c] G (du as [16][kd][cd], summed over the threads)."""
    k_, c_ = dw.shape[0], dw.shape[1]
    t = np.empty((3, 4), du.dtype)
    for k in range(k_):
        for c in range(c_):
            for j in range(4):  # G^T du: rows
                u0, u1, u2, u3 = du[j, k, c], du[4 + j, k, c], du[8 + j, k, c], du[12 + j, k, c]
                t[0, j] = u0 + 0.5 * (u1 + u2)
                t[1, j] = 0.5 * (u1 - u2)
                t[2, j] = 0.5 * (u1 + u2) + u3
            for i in range(3):  # (G^T du) G: columns
                dw[k, c, i, 0] = t[i, 0] + 0.5 * (t[i, 1] + t[i, 2])
                dw[k, c, i, 1] = 0.5 * (t[i, 1] - t[i, 2])
                dw[k, c, i, 2] = 0.5 * (t[i, 1] + t[i, 2]) + t[i, 3]


# The transforms work on a block's tile rows of one (sample, channel) at once, in
# long flat loops (per call: a few views, then loops LLVM vectorizes; a call per tile
# row with views per loop measured 4x slower on ResNet-20's 32x32 maps).


@njit(**HELPER, nogil=True)
def _input_tiles(x, n, c, r0, nrows, pt, pl, tx_, xs, tmp, ws, at, ps):
    """V[p][at + r * tx + t] = (B^T d B)[p] for the tiles t of tile rows r0 .. r0 + nrows
    of x[n, c] (`ps`: the distance between points in ws). Tile t of padded row y reads
    its columns 2t, 2t + 1, 2t + 2, 2t + 3; they go to xs as four planes, each
    [row parity][e, o, e1, o1][y // 2][t] (zero outside x), so that the row transform
    (into tmp[row parity][j][y // 2][t]) and the column transform are flat loops."""
    h_, w_ = x.shape[2], x.shape[3]
    rs = (nrows + 1) * tx_  # one plane
    xs[: 8 * rs] = 0.0
    xf = x.reshape(-1)
    for yy in range(2 * nrows + 2):
        y = 2 * r0 - pt + yy
        if y < 0 or y >= h_:
            continue
        src = ((n * x.shape[1] + c) * h_ + y) * w_ - pl
        for kind in range(4):  # padded column 2 (t + shift) + b, input column that - pl
            b, shift = kind % 2, kind // 2
            lo = max(0, (pl - b + 1) // 2 - shift)
            hi = min(tx_, (w_ - b + pl + 1) // 2 - shift)
            d = ((yy % 2) * 4 + kind) * rs + (yy // 2) * tx_
            for t in range(lo, hi):  # short: no views
                xs[d + t] = xf[src + 2 * (t + shift) + b]
    for q in range(2):  # row transform
        e, o = xs[q * 4 * rs : (q * 4 + 1) * rs], xs[(q * 4 + 1) * rs : (q * 4 + 2) * rs]
        e1, o1 = xs[(q * 4 + 2) * rs : (q * 4 + 3) * rs], xs[(q * 4 + 3) * rs : (q * 4 + 4) * rs]
        h0, h1 = tmp[(q * 4) * rs : (q * 4 + 1) * rs], tmp[(q * 4 + 1) * rs : (q * 4 + 2) * rs]
        h2, h3 = tmp[(q * 4 + 2) * rs : (q * 4 + 3) * rs], tmp[(q * 4 + 3) * rs : (q * 4 + 4) * rs]
        for i in range(rs):
            d0, d1, d2, d3 = e[i], o[i], e1[i], o1[i]
            h0[i] = d0 - d2
            h1[i] = d1 + d2
            h2[i] = d2 - d1
            h3[i] = d1 - d3
    size = nrows * tx_
    for j in range(4):  # column transform: padded rows 2r, 2r + 1, 2r + 2, 2r + 3
        a0, a1 = tmp[j * rs : j * rs + size], tmp[(4 + j) * rs : (4 + j) * rs + size]
        a2, a3 = tmp[j * rs + tx_ : (j + 1) * rs], tmp[(4 + j) * rs + tx_ : (5 + j) * rs]
        v0, v1 = ws[at + j * ps : at + j * ps + size], ws[at + (4 + j) * ps :]
        v2, v3 = ws[at + (8 + j) * ps :], ws[at + (12 + j) * ps :]
        for i in range(size):
            v0[i] = a0[i] - a2[i]
            v1[i] = a1[i] + a2[i]
            v2[i] = a2[i] - a1[i]
            v3[i] = a1[i] - a3[i]


@njit(**HELPER, nogil=True)
def _output_tiles(ws, at, ps, b, act, tmp, out, n, k, r0, nrows):
    """out[n, k] rows 2 r0 .. 2 (r0 + nrows) = act(A^T M A + b) for those tile rows,
    M[p] at ws[at + p * ps:]; outputs past the map's edge are dropped."""
    oh, ow = out.shape[2], out.shape[3]
    tx_ = -(-ow // 2)
    size = nrows * tx_
    for j in range(4):  # column transform: tmp[a][j][r * tx + t]
        m0, m1 = ws[at + j * ps : at + j * ps + size], ws[at + (4 + j) * ps :]
        m2, m3 = ws[at + (8 + j) * ps :], ws[at + (12 + j) * ps :]
        s0, s1 = tmp[j * size : (j + 1) * size], tmp[(4 + j) * size : (5 + j) * size]
        for i in range(size):
            s0[i] = m0[i] + m1[i] + m2[i]
            s1[i] = m1[i] - m2[i] - m3[i]
    for a in range(2):  # row transform: even / odd output columns at tmp[8 + 2a (+1)]
        q0, q1 = tmp[a * 4 * size : (a * 4 + 1) * size], tmp[(a * 4 + 1) * size :]
        q2, q3 = tmp[(a * 4 + 2) * size :], tmp[(a * 4 + 3) * size :]
        ev, od = tmp[(8 + 2 * a) * size : (9 + 2 * a) * size], tmp[(9 + 2 * a) * size :]
        for i in range(size):
            y0 = q0[i] + q1[i] + q2[i] + b
            y1 = q1[i] - q2[i] - q3[i] + b
            if act == 1:
                y0 = max(y0, 0.0)
                y1 = max(y1, 0.0)
            ev[i] = y0
            od[i] = y1
    outf = out.reshape(-1)
    half = ow // 2
    # interleaved into the output rows 2 (r0 + r) + a that are in the map, a vector of
    # pairs at a time (a loop per row and pair: 7.7 ms of VGG-small's conv1_2 forward at
    # b64 against 5.8)
    for a in range(2):
        ev = (8 + 2 * a) * size
        rows = min(nrows, (oh - a + 1) // 2 - r0)
        first = ((n * out.shape[1] + k) * oh + 2 * r0 + a) * ow
        done = conv.interleave(tmp, ev, tmp, ev + size, tx_, outf, first, 2 * ow, half, rows, 0)
        for r in range(rows):  # the columns left: under a vector's worth of pairs, an odd last
            src, dst = ev + r * tx_, first + 2 * r * ow
            for t in range(done, half):
                outf[dst + 2 * t] = tmp[src + t]
                outf[dst + 2 * t + 1] = tmp[src + size + t]
            if ow % 2:
                outf[dst + ow - 1] = tmp[src + half]


@njit(**HELPER, nogil=True, fastmath={"reassoc"})
def _dout_tiles(dout, yout, act, n, k, r0, nrows, tmp, ws, at, ps, db):
    """dM[p] at ws[at + p * ps:] = (A dY A^T)[p] for tile rows r0 .. r0 + nrows of
    dout[n, k] (masked where a fused ReLU's output is 0; zero past the edge);
    db[k] += the sum of dY."""
    oh, ow = dout.shape[2], dout.shape[3]
    tx_ = -(-ow // 2)
    size = nrows * tx_
    ye = tmp[: 4 * size]  # [row a][even / odd column][r * tx + t]
    ye[:] = 0.0
    line = tmp[12 * size : 12 * size + ow]  # one masked row (the adjoints use 4-12 size)
    half = ow // 2
    acc = 0.0
    for r in range(nrows):
        for a in range(2):
            y = 2 * (r0 + r) + a
            if y >= oh:
                break
            src, yr = dout[n, k, y], yout[n, k, y]
            # the row masked in one contiguous loop (vectorised, no branch), then split into
            # even / odd columns; a masked loop per column parity (stride 2) branched on
            # the mask instead: 32 ms of VGG-small's conv1_2 backward against 8.9 (b64)
            for i in range(ow):
                mv = yr[i]  # loaded unconditionally: a conditional load blocks SIMD
                d = src[i] if (mv > 0 or act == 0) else 0.0
                line[i] = d
                acc += d
            e0 = (a * 2) * size + r * tx_
            done = conv.deinterleave(line, 0, 0, ye, e0, ye, e0 + size, 0, half, 1)
            for t in range(done, half):
                ye[e0 + t] = line[2 * t]
                ye[e0 + size + t] = line[2 * t + 1]
            if ow % 2:
                ye[e0 + half] = line[ow - 1]
    db[k] += acc
    for a in range(2):  # row adjoint: tmp[4 size + (a * 4 + j) size + i]
        e, o = ye[2 * a * size : (2 * a + 1) * size], ye[(2 * a + 1) * size : (2 * a + 2) * size]
        q = (4 + a * 4) * size
        q0, q1 = tmp[q : q + size], tmp[q + size : q + 2 * size]
        q2, q3 = tmp[q + 2 * size : q + 3 * size], tmp[q + 3 * size : q + 4 * size]
        for i in range(size):
            q0[i] = e[i]
            q1[i] = e[i] + o[i]
            q2[i] = e[i] - o[i]
            q3[i] = -o[i]
    for j in range(4):  # column adjoint
        a0, a1 = tmp[(4 + j) * size : (5 + j) * size], tmp[(8 + j) * size : (9 + j) * size]
        v0, v1 = ws[at + j * ps : at + j * ps + size], ws[at + (4 + j) * ps :]
        v2, v3 = ws[at + (8 + j) * ps :], ws[at + (12 + j) * ps :]
        for i in range(size):
            v0[i] = a0[i]
            v1[i] = a0[i] + a1[i]
            v2[i] = a0[i] - a1[i]
            v3[i] = -a1[i]


@njit(**HELPER, nogil=True)
def _input_adjoint_tiles(ws, at, ps, tx_, r0, nrows, tmp, dxpad, base):
    """The padded dx of one (sample, channel) at dxpad[base:] ([row][even / odd][m], m
    up to tx) += B dV B^T for tile rows r0 .. r0 + nrows, dV[p] at ws[at + p * ps:]."""
    m_ = tx_ + 1
    size = nrows * tx_
    for j in range(4):  # column adjoint: tmp[a][j][r * tx + t]
        v0, v1 = ws[at + j * ps : at + j * ps + size], ws[at + (4 + j) * ps :]
        v2, v3 = ws[at + (8 + j) * ps :], ws[at + (12 + j) * ps :]
        e0, e1 = tmp[j * size : (j + 1) * size], tmp[(4 + j) * size : (5 + j) * size]
        e2, e3 = tmp[(8 + j) * size : (9 + j) * size], tmp[(12 + j) * size : (13 + j) * size]
        for i in range(size):
            e0[i] = v0[i]
            e1[i] = v1[i] - v2[i] + v3[i]
            e2[i] = v1[i] + v2[i] - v0[i]
            e3[i] = -v3[i]
    for r in range(nrows):
        for a in range(4):  # row adjoint; tile t covers padded columns 2t .. 2t + 3
            f = a * 4 * size + r * tx_
            row = base + (2 * (r0 + r) + a) * 2 * m_
            # each plane of the padded row in a loop of its own, so that no element is
            # written twice in a loop and each vectorises (one loop over all four had
            # tile t + 1 read what tile t wrote); in this order each element adds up as
            # it did then (tile t - 1's part first): VGG-small's conv1_2 (b64) 7.9 ms, not 20
            e, o = dxpad[row : row + m_], dxpad[row + m_ : row + 2 * m_]
            f0, f1 = tmp[f : f + tx_], tmp[f + size : f + size + tx_]
            f2, f3 = tmp[f + 2 * size : f + 2 * size + tx_], tmp[f + 3 * size : f + 3 * size + tx_]
            for t in range(tx_):
                e[1 + t] += f1[t] + f2[t] - f0[t]
            for t in range(tx_):
                o[1 + t] -= f3[t]
            for t in range(tx_):
                e[t] += f0[t]
            for t in range(tx_):
                o[t] += f1[t] - f2[t] + f3[t]


@njit(**HELPER, nogil=True)
def _unpad_row(dxpad, base, m_, pt, pl, dx, n, c):
    """dx[n, c] = the interior of one sample-channel of the padded, even / odd split dx."""
    h_, w_ = dx.shape[2], dx.shape[3]
    for y in range(h_):
        row = base + (y + pt) * 2 * m_
        dst = dx[n, c, y]
        for b in range(2):  # input column x sits at padded column x + pl
            x0 = (b - pl) % 2
            cnt = (w_ - x0 + 1) // 2
            src = dxpad[row + ((x0 + pl) % 2) * m_ + (x0 + pl) // 2 :]
            d = dst[x0:]
            for v in range(cnt):
                d[2 * v] = src[v]


@njit(**HELPER, nogil=True)
def _products(upack, rows_out, inner, ws, rows_b, b_stride, rows_c, c_stride, cols):
    """For every point p: C = A[p] B, the rows of C at rows_c[p * c_stride:] (rows_out of
    them), of B at rows_b[p * b_stride:] (inner), their first `cols` columns (whole
    panels), A[p] packed by _pack_u."""
    nr_ = conv.NV * (conv.VECTOR_BYTES // ws.itemsize)
    mr = conv.MR
    for p in range(16):
        for pn in range(cols // nr_):
            for ob in range(rows_out // mr):
                conv.bcast(
                    upack, ((p * (rows_out // mr) + ob) * inner) * mr,
                    ws, rows_b, p * b_stride, pn * nr_,
                    ws, rows_c, p * c_stride + ob * mr, pn * nr_, inner, 0,
                )  # fmt: skip


@njit(**HELPER, nogil=True)
def _tables(geo, c_, k_, v_at, m_at, dv_at, zero_at):
    """The micro-kernels' row offsets: V rows (per point, padded to cd with the zero
    row), M / dM rows, dV rows."""
    tp, km, cb, cd = geo[5], geo[6], geo[8], geo[9]
    rows_v = np.empty(16 * cd, np.int64)
    rows_m = np.empty(16 * km, np.int64)
    rows_dv = np.empty(16 * cb, np.int64)
    for p in range(16):
        for c in range(cd):
            rows_v[p * cd + c] = v_at + (p * c_ + c) * tp if c < c_ else zero_at
        for k in range(km):
            rows_m[p * km + k] = m_at + (p * km + k) * tp
        for c in range(cb):
            rows_dv[p * cb + c] = dv_at + (p * cb + c) * tp
    return rows_v, rows_m, rows_dv


@Builds
def _forward_blocks(x, w, bias, act, pads, geo, T, out, ws):
    ty_, tx_, spb, rows, bands, tp, km, _kd, _cb, cd, _hp, per, _ = geo
    n_, c_ = x.shape[0], x.shape[1]
    k_ = w.shape[0]
    pt, pl = pads[0], pads[1]
    kb = -(-k_ // conv.MR) * conv.MR
    upack = ws[T * per :]
    _pack_u(w, False, kb, upack)
    total = -(-n_ // spb) if spb > 1 else n_ * bands
    has_bias = bias.shape[0] > 0
    nr_ = conv.NV * (conv.VECTOR_BYTES // ws.itemsize)
    for th in prange(T):
        v_at, m_at, dv_at, zero_at, _du, _db = _regions(geo, c_, th * per)
        rows_v, rows_m, _rows_dv = _tables(geo, c_, k_, v_at, m_at, dv_at, zero_at)
        ws[v_at : v_at + 16 * c_ * tp] = 0.0  # panel padding columns: finite junk
        xs = np.empty(8 * (rows + 1) * tx_, x.dtype)
        tmp = np.empty(16 * (rows + 1) * (tx_ + 1), x.dtype)
        for block in range(th * total // T, (th + 1) * total // T):
            n0, ns, r0, nrows = conv._tile_at(block, spb, bands, rows, n_, ty_)
            for c in range(c_):
                for s in range(ns):
                    at = v_at + c * tp + s * nrows * tx_
                    _input_tiles(x, n0 + s, c, r0, nrows, pt, pl, tx_, xs, tmp, ws, at, c_ * tp)
            cols = -(-(ns * nrows * tx_) // nr_) * nr_  # a short block: fewer panels
            _products(upack, kb, c_, ws, rows_v, cd, rows_m, km, cols)  # M = U V
            for k in range(k_):
                b = bias[k] if has_bias else 0.0
                for s in range(ns):
                    at = m_at + k * tp + s * nrows * tx_
                    _output_tiles(ws, at, km * tp, b, act, tmp, out, n0 + s, k, r0, nrows)


@Builds
def _backward_samples(x, w, dout, yout, act, want_dx, pads, geo, T, dx, ws):
    ty_, tx_, spb, rows, bands, tp, km, kd, cb, cd, hp, per, _ = geo
    n_, c_ = x.shape[0], x.shape[1]
    k_ = w.shape[0]
    pt, pl = pads[0], pads[1]
    md, nd = conv.MD, conv.ND
    nr_ = conv.NV * (conv.VECTOR_BYTES // ws.itemsize)
    m_ = tx_ + 1
    upack = ws[T * per :]
    if want_dx:
        _pack_u(w, True, cb, upack)
    for th in prange(T):
        v_at, m_at, dv_at, zero_at, du_at, db_at = _regions(geo, c_, th * per)
        rows_v, rows_m, rows_dv = _tables(geo, c_, k_, v_at, m_at, dv_at, zero_at)
        dx_at = db_at + k_
        ws[v_at:dx_at] = 0.0  # junk columns and padding rows: zero gradient
        xs = np.empty(8 * (rows + 1) * tx_, x.dtype)
        tmp = np.empty(16 * (rows + 1) * m_, x.dtype)
        db = ws[db_at : db_at + k_]
        n0, hi = th * n_ // T, (th + 1) * n_ // T
        while n0 < hi:
            ns = min(spb, hi - n0)
            if want_dx:
                ws[dx_at : dx_at + ns * c_ * hp * 2 * m_] = 0.0
            for band in range(bands):
                r0 = band * rows
                nrows = min(rows, ty_ - r0)
                # the products run over the block's whole panels (`cols`), not all tp
                # columns: a short block (the last band, the last samples) costs what it
                # holds. dM's columns past its tiles must be zero (dU sums over them):
                # only a wider block wrote there before, and only those are cleared
                # (clearing all of dM every block: ~15% of VGG-small's conv1_2 backward at
                # b64, its 89 MB of stores pushing V out of the cache)
                used = ns * nrows * tx_
                cols = -(-used // nr_) * nr_
                if used < cols:
                    for row in range(16 * km):
                        ws[m_at + row * tp + used : m_at + row * tp + cols] = 0.0
                for c in range(c_):
                    for s in range(ns):
                        at = v_at + c * tp + s * nrows * tx_
                        _input_tiles(x, n0 + s, c, r0, nrows, pt, pl, tx_, xs, tmp, ws, at, c_ * tp)
                for k in range(k_):
                    for s in range(ns):
                        at = m_at + k * tp + s * nrows * tx_
                        _dout_tiles(dout, yout, act, n0 + s, k, r0, nrows, tmp, ws, at, km * tp, db)
                for p in range(16):  # dU += dM V^T
                    for ob in range(0, kd, md):
                        for cbk in range(0, cd, nd):
                            conv.dot(
                                ws, m_at + (p * km + ob) * tp, tp,
                                ws, rows_v, p * cd + cbk, 0,
                                ws, du_at + (p * kd + ob) * cd + cbk * md, cols,
                            )  # fmt: skip
                if not want_dx:
                    continue
                _products(upack, cb, k_, ws, rows_m, km, rows_dv, cb, cols)  # dV = U^T dM
                for c in range(c_):
                    for s in range(ns):
                        base = dx_at + (s * c_ + c) * hp * 2 * m_
                        at = dv_at + c * tp + s * nrows * tx_
                        _input_adjoint_tiles(ws, at, cb * tp, tx_, r0, nrows, tmp, ws, base)
            if want_dx:
                for s in range(ns):
                    for c in range(c_):
                        base = dx_at + (s * c_ + c) * hp * 2 * m_
                        _unpad_row(ws, base, m_, pt, pl, dx, n0 + s, c)
            n0 += ns


def _plan(x, w, out, ws, backward):
    flat = ws.reshape(-1)
    shapes = (x.shape, w.shape, out.shape, x.itemsize)
    geo, threads = _blocks(*shapes, flat.size, numba.get_num_threads(), backward)
    return geo, threads, flat


@lru_cache(maxsize=1024)
def _blocks(x_shape, w_shape, out_shape, itemsize, space, threads, backward):
    """The most threads, up to `threads`, whose blocks fit in `space` elements of
    workspace, and their geometry (each thread count has its own blocks). Cached: a
    layer asks with the same shapes every step."""
    shapes = (x_shape, w_shape, out_shape, itemsize)
    for t in range(threads, 0, -1):
        geo = _geometry(*shapes, t, backward)
        if geo.per_thread * t + geo.upack <= space:
            return geo, t
    one = _geometry(*shapes, 1, backward)
    raise ValueError(f"conv2d workspace has {space} elements, need {one.per_thread + one.upack}")


RUNS = {"forward": 0, "backward": 0}  # calls so far: `cnnspec bench` names the layers


def forward(x, w, bias, pad, out, ws, act):
    """out = act(conv2d(x, w) + bias), 3x3, stride 1 (checked by conv.py's caller)."""
    RUNS["forward"] += 1
    geo, threads, flat = _plan(x, w, out, ws, False)
    pads = (int(pad[0]), int(pad[2]))
    args = (x, w, bias, int(act), pads, tuple(geo), threads, out, flat)
    kernel = _forward_blocks.now(threads == 1, args)  # one thread: the serial build
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        conv_numpy.conv2d_forward(x, w, bias, (1, 1), pad, (1, 1), 1, out, act)
        return
    kernel(*args)


def backward(x, w, dout, pad, ws, dx, dw, db, y, act):
    """dx (None: skipped), dw, db (None: skipped) of :func:`forward`."""
    RUNS["backward"] += 1
    geo, threads, flat = _plan(x, w, dout, ws, True)
    pads = (int(pad[0]), int(pad[2]))
    want_dx = dx is not None
    dx_arg = dx if want_dx else np.empty((1, 1, 1, 1), x.dtype)
    args = (x, w, dout, y, int(act), want_dx, pads, tuple(geo), threads, dx_arg, flat)
    kernel = _backward_samples.now(threads == 1, args)
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        conv_numpy.conv2d_backward(x, w, dout, (1, 1), pad, (1, 1), 1, dx, dw, db, y, act)
        return
    kernel(*args)
    # the threads' private sums, added in thread order: the same bits every run
    k_ = w.shape[0]
    du_at, db_at = _regions.py_func(geo, x.shape[1], 0)[4:6]  # (a helper: no Python entry)
    size = P * geo.kd * geo.cd
    du = np.zeros(size, x.dtype)
    dbs = np.zeros(k_, x.dtype)
    for t in range(threads):
        start = t * geo.per_thread
        du += flat[start + du_at : start + du_at + size]
        dbs += flat[start + db_at : start + db_at + k_]
    _weight_adjoint(conv.dot_unblock(du, P * geo.kd, geo.cd).reshape(P, geo.kd, geo.cd), dw)
    if db is not None:
        db[...] = dbs
