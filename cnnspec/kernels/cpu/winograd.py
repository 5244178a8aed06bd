"""Winograd F(4x4, 3x3) for 3x3, stride-1, dilation-1, ungrouped conv2d.

Each 4x4 block of outputs (a tile) comes from a 6x6 patch of the padded input d:
Y = A^T [(G g G^T) . (B^T d B)] A (interpolation points 0, 1, -1, 2, -2 and infinity),
so the 144 multiplies of a direct 4x4 block become 36, one per transform point p, and
the channel sums become 36 GEMMs: M[p] (K x tiles) = U[p] (K x C) V[p] (C x tiles), run
on conv.py's register-blocked ``bcast`` kernel. Backward, with dM = A dY A^T (the output
transform's adjoint): dU[p] = dM[p] V[p]^T on the ``dot`` kernel (then dW = G^T dU G),
and dV[p] = U[p]^T dM[p] on ``bcast`` (then dx += B dV B^T, tiles overlapping by 2). dx
and dW share dM and V, so the backward pass takes both the Winograd way or neither.

F(4x4, 3x3) replaced F(2x2, 3x3) (16 points, 2.25x fewer multiplies against 4x here),
measured on one core of an AMD EPYC Zen 3 (256-bit kernels, 2026-12-05, float32, ReLU
fused, best of 4-5 interleaved; ms forward / backward, direct / F(2x2) / F(4x4) / F(4x4)
once its input rows went through a padded line, measured in a later run against the
column before it):
  VGG-small b64, 64 ch 32x32       61.4 / 130   42.5 / 92.1   32.7 / 72.1   27.5 / 69.4
                 64->128 16x16     30.0 / 68.2  19.6 / 43.8   21.0 / 48.1   16.7 / 45.2
                 128 ch 16x16      59.1 / 137   39.7 / 88.4   36.6 / 81.9   30.7 / 78.0
VGG-small's whole train step went 356 -> 311 ms (1 thread) and 177 -> 171 ms (2 threads)
with the first F(4x4), and ran 287 / 174 ms in `benchmarks/vs_torch.py` with the second
(PyTorch 524 / 285). Its products are 56% of F(2x2)'s; its transforms cost more, its 6x6
tiles cover maps that are not a multiple of 4 with waste (14x14: 16x16 of tiles), and
its dU products (the ``dot`` kernel, ~45-57 GFLOP/s here against ``bcast``'s ~85) are
now a quarter of its backward.

Error: the transforms multiply by 2, 4, 5, 8 and 1/4, 1/6, 1/12, 1/24, which amplify
rounding. Measured (random normal data, He-scaled weights, padding 1) as the largest
difference from a float64 direct conv over the largest magnitude of the result, float32,
direct / Winograd:
  shape (C -> K, map)      y                  dx                 dW
  16 -> 16, 32x32          3.8e-7 / 4.1e-6    4.4e-7 / 2.0e-6    2.4e-7 / 2.0e-6
  64 -> 64, 32x32          1.0e-6 / 7.0e-6    9.7e-7 / 4.3e-6    1.7e-7 / 3.0e-6
  128 -> 128, 16x16        1.4e-6 / 1.1e-5    2.3e-6 / 5.1e-6    1.3e-7 / 1.9e-6
  256 -> 256, 16x16        2.4e-6 / 1.2e-5    2.2e-6 / 7.2e-6    1.4e-7 / 2.3e-6
  512 -> 512, 14x14        2.6e-6 / 1.6e-5    3.4e-6 / 1.2e-5    1.3e-7 / 3.1e-6
(F(2x2, 3x3) had 2e-7 - 5e-7; ~1e-5 of the output's scale is the price of F(4x4)'s
speed, as in other frameworks' F(4x4, 3x3) kernels). Float64 Winograd against float64 direct:
<= 1e-14. The test tolerance, Winograd against direct on tiny shapes: 2e-5 (float32),
1e-13 (float64) of the output's scale.

Layout per thread (flat workspace, elements): V [36][C][tp] (transformed input, tp
tile columns padded to whole bcast panels; _GAP elements after each point's rows, as in
M and dV), M / dM [36][km][tp], dV [36][cb][tp],
a zero row (tp), dU [36][kd][cd] (as the dot kernel's blocks), db [K], padded dx of a
group of samples ([sample][C][4 ty + 2][4 tx + 2]). Tiles run in blocks: several whole
samples (small maps) or a band of tile rows of one sample, like the direct conv's tiles.
The forward pass splits blocks among threads; the backward pass gives each thread whole
samples (their dx tiles overlap) and private dU / db sums, added up afterwards in thread
order (the same bits every run). The transforms' planes live in three scratch arrays a
thread (_Scratch), allocated per call; the transforms' passes over them are intrinsics
(_planes_intrinsic, _rows_intrinsic, conv's *_samples row copies), as are the
micro-kernels.

The micro-kernels are conv.py's. Kernels as in conv.py: a parallel and a serial build
(one thread), helpers without entry points.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# conv imports this module for its dispatch: its names are looked up when used
from . import _llvm, conv, conv_numpy
from ._common import (
    HELPER,
    IN_AFFINE_RELU,
    IN_COPY,
    OUT_NORM_RELU,
    OUT_PLAIN,
    Builds,
    backward_hooks,
    forward_hooks,
    merge_dx_sums,
    merge_moments,
)
from .threads import count as thread_count

# CNNSPEC_WINOGRAD: "auto" (default) takes the measured rule below, "0" never uses
# Winograd (the direct conv everywhere: A/B runs, tests), "1" uses it wherever it applies.
MODE = os.environ.get("CNNSPEC_WINOGRAD", "auto")

TILE = 4  # outputs per tile side (6 inputs)
P = 36  # transform points
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
# the micro-kernels' loops too short (dU's dot products most). Re-checked for F(4x4, 3x3)
# (2026-12-05, same CPU): targets of 96, 192, 320, 400 and 600 columns ran VGG-small's
# 32x32 and 128-channel 16x16 convs within ~8% of each other (this host's noise).
# Whole samples whose blocks pad alike (16x16 maps: 16 tiles a sample, a panel 48 or
# 24 of them: 3, 6, ... 18 samples a block fill whole panels) take the shortest block of
# 96 columns or more: VGG-small's 16x16 convs at b64 (AMD EPYC Zen 4, 512-bit, ms forward
# / backward, best of 7 interleaved), blocks of 6 samples against 15: 2 threads 64->128
# 8.35 / 16.6 against 9.08 / 18.5, 128 ch 15.3 / 32.0 against 17.7 / 34.0; 1 thread (6
# against 18) 15.0 / 29.4 against 15.7 / 29.9, 25.4 / 50.1 against 26.3 / 52.9. Its
# train step 130 -> 123 ms at 2 threads, 241 -> 231 ms at 1; 256-bit 254 -> 240 ms at 1.
# Among blocks as long (or as short) as that, those within 5% of the fewest columns a
# thread computes come first (_thread_columns; the slack keeps VGG-small's 16x16 blocks
# of 6 at 256 bits and 2 threads, where 16 samples a block would compute 4% fewer): the
# forward's blocks were capped at half a thread's samples, which left 512 channels on 7x7
# maps at b16 and 2 threads 16 columns in each 48-column panel, 3x the products, no
# faster than 1 thread (30.8 -> 23.0 ms, Intel Xeon, 512-bit). The backward keeps the
# cap: a thread's samples in one block ran 256 channels on 14x14 maps slower there (45
# against 34 ms).
_BLOCK_COLUMNS = 320
_BLOCK_MAX_ELEMENTS = 1 << 23
_MIN_BLOCK_COLUMNS = 96
# Elements between one point's rows of V / M / dV and the next's: their 36 planes, a
# multiple of 4 KiB apart (64 channels x 192 columns), fell into the same cache sets as
# the transforms read and wrote them across the points. VGG-small b64, 1 thread, ms fwd /
# bwd without / with: 64 ch 32x32 27.5 / 67.0 -> 25.1 / 62.3, 64->128 16x16 17.4 / 40.4
# -> 15.8 / 40.3, 128 ch 16x16 32.1 / 78.9 -> 28.1 / 71.8; its step 313 -> 298 ms best
# of 7 interleaved (1 thread), the same at 2 threads (noise there).
_GAP = 48


def _round_up(n, m):
    return -(-n // m) * m


def applies(x_shape, w_shape, stride, pad, dilation, groups) -> bool:
    """Whether F(4x4, 3x3) computes this conv: 3x3, stride 1, dilation 1, ungrouped."""
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
# F(2x2, 3x3) served the 256-bit kernels only, both directions (F(4x4): the end of this).
# On a CPU without AVX-512, an AMD EPYC Zen 3 (2026-12-04, 1 thread, best of 5
# interleaved), the same picture, forward / backward: ResNet-20's 16, 32, 64 channels
# 0.56 / 0.37, 0.79 / 0.57, 0.87 / 0.70;
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
# F(4x4, 3x3) (2026-12-05, same CPU, 256-bit; ms forward / backward, direct against
# Winograd, best of 3-4): ResNet-20 b128's 16 ch 32x32 7.7 / 15.9 against 10.2 / 20.6,
# 32 ch 16x16 7.7 / 16.3 against 10.5 / 21.4, 64 ch 8x8 8.4 / 18.3 against 10.9 / 22.7
# (still lose); maps of 14 at b16, 1 thread / 2 threads: 128 ch 11.0 / 27.1 against
# 9.4 / 22.8, but 5.7 / 13.8 against 6.6 / 15.5; 256 ch 47.2 / 105 against 39.3 / 89.3,
# but 23.0 / 56.6 against 25.0 / 62.5; 512 ch 227 / 427 against 124 / 316 and 113 / 244
# against 80.3 / 229; 256 ch 8x8 14.6 / 44.4 against 19.7 / 48.9, 512 ch 7x7 57.1 / 175
# against 54.3 / 189 (1 thread). So maps of 14 qualify from 512 channels.
# F(4x4, 3x3) against the 512-bit kernels, on an AMD EPYC Zen 4 (AVX-512 on 256-bit
# units; 2026-12-05, benchmarks/winograd_ab.py at 1 | 2 threads; direct time over
# Winograd's, forward / backward): ResNet-20 b128's 16, 32, 64 ch 0.77 / 0.81, 0.82 /
# 0.90, 1.16 / 1.08 | 0.78 / 0.82, 0.74 / 0.83, 1.07 / 0.98; VGG-small b64's 64 ch 32x32
# 1.88 / 1.95 | 1.79 / 1.88, 64->128 16x16 1.66 / 1.69 | 1.41 / 1.43, 128 ch 16x16 1.84 /
# 1.81 | 1.60 / 1.62; b16: 64 ch 56x56 1.88 / 1.85 | 1.88 / 1.78, 128 ch 28x28 1.91 /
# 1.88 | 1.70 / 1.61, 128 ch 14x14 1.27 / 1.34 | 0.87 / 0.95, 256 ch 14x14 1.50 / 1.50 |
# 1.25 / 1.11, 512 ch 14x14 1.72 / 1.43 | 1.44 / 0.99, 256 ch 8x8 1.06 / 1.10 | 0.69 /
# 0.63, 512 ch 7x7 1.27 / 0.97 | 0.76 / 0.53. The 256-bit kernels' rule fits both
# columns, so it serves both widths: VGG-small's train step 385 -> 242 ms at 1 thread,
# 198 -> 139 ms at 2 (512-bit, interleaved in one process). Not measured on a CPU with
# full-width 512-bit units (the Zen 5 above), where the direct conv and the products run
# twice as fast and the transforms less so: benchmarks/winograd_ab.py tells there.
# It told, on an Intel Xeon (AVX-512 and AMX, 2 FMA units of 512 bits; 2026-12-06,
# 1 | 2 threads, direct time over Winograd's, forward / backward): ResNet-20's 16, 32, 64
# ch 0.82 / 0.69, 0.79 / 0.84, 0.94 / 0.82 | 0.74 / 0.63, 0.81 / 0.81, 0.77 / 0.79 (at 256
# bits 1.10 / 0.99, 1.22 / 1.24, 1.40 / 1.23 | 1.06 / 0.92, 1.12 / 1.19, 1.09 / 1.14: the
# direct conv at half its peak there, but a CPU without AVX-512, the Zen 3 above, loses);
# VGG-small's 1.54 / 1.60, 1.36 / 1.50, 1.71 / 1.77 | 1.57 / 1.51, 1.28 / 1.43, 1.39 /
# 1.45. Its wide layers on small maps (b16) ran U's packing and dW's unblocking (32 and
# 72 ms of a 512-channel 14x14 conv's 84 / 255 ms, serial) and, at 2 threads, forward
# blocks of a third of a panel: after those (_pack_u, _weight_adjoint, _thread_columns),
# 128, 256, 512 ch 14x14 1.26 / 1.31, 1.61 / 1.57, 1.54 / 1.39 | 1.10 / 1.12, 1.36 /
# 1.15, 1.44 / 0.98 (before: 1.10 / 0.95, 1.21 / 1.11, 1.24 / 1.00 | 0.76 / 0.77, 0.91 /
# 0.79, 1.02 / 0.70), 256 ch 8x8 and 512 ch 7x7 1.40 / 1.48, 1.34 / 1.16 | 1.06 / 0.68,
# 1.20 / 0.62; at 256 bits 128, 256 ch 14x14 1.73 / 1.68, 1.91 / 1.56 | 1.32 / 1.24, 1.56
# / 1.27. So maps of 14 qualify from 256 channels (128: 2 threads gain little here and
# lost on both AMD CPUs before; 8x8 and 7x7 maps lose at 2 threads).
# The transforms in flat loops over a block's tiles (2026-12-06, another Intel Xeon with
# full-width AVX-512, 2 MiB L2 a core; direct time over Winograd's, forward / backward,
# 512-bit kernels 1 | 2 threads; 256-bit in brackets): ResNet-20's 16, 32, 64 ch 0.65 /
# 0.62, 1.15 / 1.01, 1.46 / 1.23 | 0.78 / 0.71, 1.26 / 1.10, 1.37 / 1.17 (1.06 / 1.03,
# 1.78 / 1.59, 2.10 / 1.93 | 1.22 / 1.14, 1.99 / 1.74, 1.79 / 1.84); VGG-small's 1.49 /
# 1.41, 1.93 / 1.90, 2.29 / 2.11 | 1.54 / 1.47, 1.75 / 1.69, 2.12 / 1.73; b16: 128 ch
# 14x14 1.59 / 1.44 | 1.18 / 1.10, 256 ch 8x8 1.54 / 1.43 | 1.05 / 0.79, 512 ch 7x7 1.49
# / 1.37 | 1.09 / 0.70 (256-bit 1.16 / 1.02 and 1.24 / 0.97 at 2 threads). The old
# transforms had had ResNet-20's 32 and 64 channels at 0.87 / 0.88 and 0.99 / 0.96 on the
# Zen 3 (AVX2); the new ones run them 1.6 / 1.5 and 1.8 / 1.8 times as fast here (1
# thread, 512-bit, against a worktree of the old code); its 16 channels lose at 512 bits,
# and lost there. So from 32 channels and maps of 8, with 256 tiles or more
# in the batch: fewer (8x8 and 7x7 maps at b16, 4 tiles a sample) leave the backward's
# blocks, a thread's samples at most, short of a panel at 2 threads.
# With the transforms' passes as intrinsics (2026-12-06, the same Xeon, d698550, best of
# 5; direct time over Winograd's, forward / backward, 1 | 2 threads, 256-bit in
# brackets): ResNet-20's 16, 32, 64 ch 1.01 / 1.01, 1.54 / 1.40, 1.72 / 1.51 | 0.87 /
# 1.07, 1.97 / 1.15, 1.30 / 1.37 (1.13 / 1.29, 2.09 / 2.04, 2.43 / 2.30 | 1.14 / 1.32,
# 2.09 / 1.93, 2.06 / 2.20). 16 channels break even at 512 bits and gain at 256, where
# this Xeon's direct conv runs at half its peak; on the Zen 3 (256-bit units) they lost
# with the old transforms: not measured there since, so the rule stays.
MIN_CHANNELS = 32
MIN_MAP = 8
MIN_TILES = 256


def chooses(x_shape, w_shape, out_shape, stride, pad, dilation, groups) -> bool:
    """Whether the dispatch runs this conv (forward and backward) the Winograd way."""
    shapes = (tuple(x_shape), tuple(w_shape), tuple(out_shape))
    geometry = (tuple(stride), tuple(pad), tuple(dilation), int(groups))
    return _chooses(MODE, *shapes, *geometry)


def chooses_key(key) -> bool:
    """:func:`chooses` for conv.py's shape key (x, w, out shapes, stride, padding,
    dilation as tuples, groups)."""
    return _chooses(MODE, *key)


@lru_cache(maxsize=1024)  # a layer asks with the same shapes every call (~4 us saved)
def _chooses(mode, x_shape, w_shape, out_shape, stride, pad, dilation, groups) -> bool:
    if mode == "0" or not applies(x_shape, w_shape, stride, pad, dilation, groups):
        return False
    if mode == "1":
        return True
    channels = min(int(x_shape[1]), int(w_shape[0]))
    oh, ow = int(out_shape[2]), int(out_shape[3])
    tiles = int(out_shape[0]) * -(-oh // TILE) * -(-ow // TILE)
    return channels >= MIN_CHANNELS and min(oh, ow) >= MIN_MAP and tiles >= MIN_TILES


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
    hp: int  # rows of a sample's padded dx (4 * ty + 2)
    wp: int  # columns of a padded dx row (4 * tx + 2)
    per_thread: int
    upack: int  # packed U (shared)


def _geometry(x_shape, w_shape, out_shape, itemsize, threads, backward):
    n, c = int(x_shape[0]), int(x_shape[1])
    k = int(w_shape[0])
    oh, ow = int(out_shape[2]), int(out_shape[3])
    ty, tx = -(-oh // TILE), -(-ow // TILE)
    nr = conv.panel(itemsize)
    cb, cd = _round_up(c, conv.MR), _round_up(c, conv.ND)
    kb, kd = _round_up(k, conv.MR), _round_up(k, conv.MD)
    km = max(kb, kd)
    per_column = P * (c + km + (cb if backward else 0))  # V, M or dM, dV
    cols = max(nr, min(_BLOCK_COLUMNS, _BLOCK_MAX_ELEMENTS // per_column))
    # whole samples a block where they fit, else bands of tile rows (the last shorter)
    if ty * tx <= cols:
        # (the backward's blocks at most half a thread's samples: see _BLOCK_COLUMNS)
        most = max(1, min(cols // (ty * tx), -(-n // ((2 if backward else 1) * threads))))

        tt = ty * tx
        work = {s: _thread_columns(n, s, tt, nr, threads, backward) for s in range(1, most + 1)}

        def long(s):
            return s * tt >= _MIN_BLOCK_COLUMNS

        least = {k: min((w for s, w in work.items() if long(s) == k), default=0) for k in (0, 1)}

        def rank(s):  # blocks of _MIN_BLOCK_COLUMNS or more, within 5% of the fewest
            # columns a thread computes with such blocks, the least panel padding, then the
            # shortest of those long blocks (else the longest)
            fill = s * tt / _round_up(s * tt, nr)
            return long(s), work[s] <= 1.05 * least[long(s)], fill, -s if long(s) else s

        spb = max(range(1, most + 1), key=rank)
        rows, bands = ty, 1
    else:
        spb = 1

        def fill(r):
            full, last = divmod(ty, r)
            return ty * tx / (full * _round_up(r * tx, nr) + _round_up(last * tx, nr))

        rows = max((fill(r), r) for r in range(1, max(1, cols // tx) + 1))[1]
        bands = -(-ty // rows)
    tp = _round_up(spb * rows * tx, nr)
    hp, wp = TILE * ty + 2, TILE * tx + 2
    upack = P * max(kb * c, cb * k)
    geo = _Geometry(ty, tx, spb, rows, bands, tp, km, kd, cb, cd, hp, wp, 0, upack)
    db_at = _regions.py_func(geo, c, 0)[5]  # V, M / dM, dV, the zero row, dU before db
    # db, the padded dx; each thread's buffers a whole vector apart (see _aligned)
    per_thread = _round_up(db_at + k + spb * c * hp * wp, _llvm.lanes(itemsize))
    return geo._replace(per_thread=per_thread)


def _thread_columns(n, spb, tiles, nr, threads, backward):
    """The most columns (whole panels) any thread's blocks of `spb` samples compute: the
    forward shares the blocks out, the backward the samples (each thread's in blocks)."""
    most = 0
    for th in range(threads):
        if backward:
            left = (th + 1) * n // threads - th * n // threads
            sizes = [spb] * (left // spb) + ([left % spb] if left % spb else [])
        else:
            total = -(-n // spb)
            blocks = range(th * total // threads, (th + 1) * total // threads)
            sizes = [min(spb, n - b * spb) for b in blocks]
        most = max(most, sum(_round_up(s * tiles, nr) for s in sizes))
    return most


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
    return need + _llvm.lanes(itemsize)  # (_aligned's shift)


@njit(**HELPER, nogil=True)
def _regions(geo, c_, base):
    """Where a thread's buffers start: V, M, dV, zero row, dU, db (padded dx after db),
    and the distance between one point's rows and the next's in V, M and dV."""
    tp, km, kd, cb, cd = geo[5], geo[6], geo[7], geo[8], geo[9]
    vs, ms, dvs = c_ * tp + _GAP, km * tp + _GAP, cb * tp + _GAP
    v_at = base
    m_at = v_at + P * vs
    dv_at = m_at + P * ms
    zero_at = dv_at + P * dvs
    du_at = zero_at + tp
    db_at = du_at + P * kd * cd
    return v_at, m_at, dv_at, zero_at, du_at, db_at, vs, ms, dvs


# The four 1-D transforms (each applied along rows, then along columns), with the
# constants in the data's own type (a float64 literal would widen float32 math):
# B^T d (input), A^T m (output), their adjoints A y (output gradient) and B v (input
# gradient), for the points 0, 1, -1, 2, -2 and infinity.


@njit(inline="always", nogil=True)  # inlined in Numba's IR: no compile of its own
def _bt(d0, d1, d2, d3, d4, d5, two, four, five):
    a, b = d4 - four * d2, d3 - four * d1
    c, e = d4 - d2, two * (d3 - d1)
    return four * d0 - five * d2 + d4, a + b, a - b, c + e, c - e, four * d1 - five * d3 + d5


@njit(inline="always", nogil=True)
def _at(m0, m1, m2, m3, m4, m5, two, four, eight):
    p12, m12 = m1 + m2, m1 - m2
    p34, m34 = m3 + m4, m3 - m4
    return m0 + p12 + p34, m12 + two * m34, p12 + four * p34, m12 + eight * m34 + m5


@njit(inline="always", nogil=True)
def _a(y0, y1, y2, y3, two, four, eight):
    p, q = y0 + y2, y1 + y3
    r, s = y0 + four * y2, two * y1 + eight * y3
    return y0, p + q, p - q, r + s, r - s, y3


@njit(inline="always", nogil=True)
def _b(v0, v1, v2, v3, v4, v5, two, four, five):
    s12, d12 = v1 + v2, v2 - v1
    s34, d34 = v3 + v4, v3 - v4
    return (
        four * v0,
        four * d12 - two * d34 + four * v5,
        -five * v0 - four * s12 - s34,
        two * d34 - d12 - five * v5,
        v0 + s12 + s34,
        v5,
    )


@njit(inline="always", nogil=True)
def _g(g0, g1, g2):
    """G g for one column of a 3x3 filter (float64: U is rounded once)."""
    return (
        g0 / 4.0,
        -(g0 + g1 + g2) / 6.0,
        -(g0 - g1 + g2) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    )


@njit(inline="always", nogil=True)
def _gt(u0, u1, u2, u3, u4, u5):
    """G^T u: the adjoint of :func:`_g`."""
    return (
        u0 / 4.0 - (u1 + u2) / 6.0 + (u3 + u4) / 24.0,
        (u2 - u1) / 6.0 + (u3 - u4) / 12.0,
        (u3 + u4 - u1 - u2) / 6.0 + u5,
    )


class _Lanes:
    """A vector in the IR of the planes' intrinsics below, with the float operators the
    transforms use: the same _bt, _at, _a and _b write their vector code (an operation
    for each of Numba's scalar ones, in the same order: the same bits)."""

    __slots__ = ("builder", "value")

    def __init__(self, builder, value):
        self.builder, self.value = builder, value

    def __add__(self, other):
        return _Lanes(self.builder, self.builder.fadd(self.value, other.value))

    def __sub__(self, other):
        return _Lanes(self.builder, self.builder.fsub(self.value, other.value))

    def __mul__(self, other):
        return _Lanes(self.builder, self.builder.fmul(self.value, other.value))

    def __neg__(self):
        return _Lanes(self.builder, self.builder.fneg(self.value))


def _planes_intrinsic(transform, n_in, constants):
    """An intrinsic (src, at, step, dst, dst_at, dst_step, n): dst[dst_at + j * dst_step
    + e] = transform(src[at + i * step + e] for i < n_in)[j] for e < n, in whole vectors
    and a masked one. Numba's loops over the planes ran scalar where LLVM could not rule
    out overlaps among the ~10 planes (the output transform's columns: 24 ns a tile and
    channel, 1 thread, Intel Xeon model 207)."""

    def codegen(context, builder, signature, args):
        s_ary, s_at, s_step, d_ary, d_at, d_step, n = args
        vec = _llvm.vector(signature.args[0].dtype)
        ps = _llvm.base(context, builder, signature.args[0], s_ary, s_at)
        pd = _llvm.base(context, builder, signature.args[3], d_ary, d_at)
        srcs = [builder.gep(ps, [builder.mul(s_step, _llvm.const(i))]) for i in range(n_in)]
        cs = [_Lanes(builder, ir.Constant(vec, [c] * vec.count)) for c in constants]

        def run(at, left, carried):
            ins = [_llvm.load(builder, vec, _llvm.vec_ptr(builder, s, at, vec), left) for s in srcs]
            values = transform.py_func(*(_Lanes(builder, v) for v in ins), *cs)
            for j, v in enumerate(values):
                dst = builder.gep(pd, [builder.add(builder.mul(d_step, _llvm.const(j)), at)])
                _llvm.store(builder, vec, builder.bitcast(dst, vec.as_pointer()), v.value, left)
            return carried

        _llvm.vectors(builder, n, vec.count, _llvm.const(0), run)
        return context.get_dummy_value()

    @intrinsic
    def planes(typingctx, src, at, step, dst, dst_at, dst_step, n):
        i64 = types.int64
        return types.void(src, i64, i64, dst, i64, i64, i64), codegen

    return planes


_bt_planes = _planes_intrinsic(_bt, 6, (2.0, 4.0, 5.0))  # the input's B^T d
_at_planes = _planes_intrinsic(_at, 6, (2.0, 4.0, 8.0))  # the output's A^T m
_a_planes = _planes_intrinsic(_a, 4, (2.0, 4.0, 8.0))  # the output gradient's A y
_b_planes = _planes_intrinsic(_b, 6, (2.0, 4.0, 5.0))  # the input gradient's B v


# The row passes: a tile's row is 4 (or 6) consecutive elements of a padded row, one of
# each of the 4 (or 6) planes of a tile row's values. Numba's loops over them ran scalar
# (the stride-4 loads and stores: ~20-34 ns a tile and channel, 1 thread, Intel Xeon model
# 207); these load 4 vectors' worth of a row and sort it into one vector per column with
# shuffles, or the reverse, a vector of tiles at a time.


def _split(builder, wide, factor):
    """The `factor` vectors of every factor-th lane of `wide` (lanes k, k + factor, ...)."""
    n = wide.type.count // factor
    return [
        builder.shuffle_vector(wide, wide, ir.Constant(ir.VectorType(_llvm.I32, n),
                                                       list(range(k, factor * n, factor))))
        for k in range(factor)
    ]  # fmt: skip


def _merge(builder, vectors):
    """One wide vector of 2 or 4 vectors' lanes in turn (lane i of each, then i + 1, ...):
    the inverse of _split."""
    n = vectors[0].type.count

    def join(a, b):
        m = 2 * a.type.count
        return builder.shuffle_vector(
            a, b, ir.Constant(ir.VectorType(_llvm.I32, m), list(range(m)))
        )

    both = join(*vectors) if len(vectors) == 2 else join(join(*vectors[:2]), join(*vectors[2:]))
    f = len(vectors)
    order = [k * n + i for i in range(n) for k in range(f)]
    return builder.shuffle_vector(both, both, ir.Constant(ir.VectorType(_llvm.I32, f * n), order))


def _rows_intrinsic(kind):
    """The row passes' intrinsics; `kind`: "input", "output", "dout" or "adjoint"."""

    def codegen(context, builder, signature, args):
        vec = _llvm.vector(signature.args[0].dtype)
        n = vec.count
        wide2, wide4 = ir.VectorType(vec.element, 2 * n), ir.VectorType(vec.element, 4 * n)
        zero = _llvm.zeros(vec)
        c = (2.0, 4.0, 5.0) if kind in ("input", "adjoint") else (2.0, 4.0, 8.0)
        consts = [_Lanes(builder, ir.Constant(vec, [v] * n)) for v in c]

        def at(i, ary, offset):
            return _llvm.base(context, builder, signature.args[i], ary, offset)

        def planes(p, step, count):
            return [builder.gep(p, [builder.mul(step, _llvm.const(j))]) for j in range(count)]

        def times(left, k):
            return None if left is None else builder.mul(left, _llvm.const(k))

        def load(p, z, v, left):
            return _llvm.load(builder, v, _llvm.vec_ptr(builder, p, z, v), left)

        def store(p, z, v, value, left):
            _llvm.store(builder, v, _llvm.vec_ptr(builder, p, z, v), value, left)

        if kind == "input":  # (sb, src, tails, last, nt, ws, at, ps)
            sb, src, tails, last, nt, ws, w_at, ps = args
            row, tail, marks = at(0, sb, src), at(0, sb, tails), at(0, sb, last)
            outs = planes(at(5, ws, w_at), ps, 6)

            def run(z, left, carried):
                q = _split(builder, load(row, builder.mul(z, _llvm.const(4)), wide4,
                                         times(left, 4)), 4)  # fmt: skip
                # columns 4 and 5: the next tile's 0 and 1, or at a row's end its tail
                nxt = builder.add(builder.mul(z, _llvm.const(4)), _llvm.const(4))
                r = _split(builder, load(row, nxt, wide4, times(left, 4)), 4)
                t = _split(builder, load(tail, builder.mul(z, _llvm.const(2)), wide2,
                                         times(left, 2)), 2)  # fmt: skip
                end = builder.fcmp_unordered("!=", load(marks, z, vec, left), zero)
                e4, e5 = builder.select(end, t[0], r[0]), builder.select(end, t[1], r[1])
                ins = [_Lanes(builder, v) for v in (*q, e4, e5)]
                for p, v in zip(outs, _bt.py_func(*ins, *consts), strict=True):
                    store(p, z, vec, v.value, left)
                return carried

            _llvm.vectors(builder, nt, n, _llvm.const(0), run)
            return context.get_dummy_value()

        if kind == "output":  # (sa, t, ts, nt, b, act, sb, d)
            sa, t, ts, nt, b, act, sb, d = args
            ins, out = planes(at(0, sa, t), ts, 6), at(6, sb, d)
            bias = _Lanes(builder, _llvm.splat(builder, vec, b))
            relu = builder.icmp_signed("==", act, _llvm.const(1))
            relu = _llvm.splat(builder, ir.VectorType(ir.IntType(1), n), relu)

            def run(z, left, carried):
                m = [_Lanes(builder, load(p, z, vec, left)) for p in ins]
                ys = []
                for y in _at.py_func(*m, *consts):
                    y = (y + bias).value  # max(y, 0) as Numba's: y unless 0 > y
                    below = builder.and_(builder.fcmp_ordered(">", zero, y), relu)
                    ys.append(builder.select(below, zero, y))
                store(out, builder.mul(z, _llvm.const(4)), wide4, _merge(builder, ys),
                      times(left, 4))  # fmt: skip
                return carried

            _llvm.vectors(builder, nt, n, _llvm.const(0), run)
            return context.get_dummy_value()

        if kind == "dout":  # (sa, src, nt, sb, o, ts) -> the sum of the rows read
            sa, src, nt, sb, o, ts = args
            row, outs = at(0, sa, src), planes(at(3, sb, o), ts, 6)

            def run(z, left, acc):
                d = _split(builder, load(row, builder.mul(z, _llvm.const(4)), wide4,
                                         times(left, 4)), 4)  # fmt: skip
                acc = builder.fadd(acc, builder.fadd(builder.fadd(d[0], d[1]),
                                                     builder.fadd(d[2], d[3])))  # fmt: skip
                ds = [_Lanes(builder, v) for v in d]
                for p, v in zip(outs, _a.py_func(*ds, *consts), strict=True):
                    store(p, z, vec, v.value, left)
                return acc

            acc = _llvm.vectors(builder, nt, n, zero, run)
            total = builder.extract_element(acc, ir.Constant(_llvm.I32, 0))
            for i in range(1, n):
                total = builder.fadd(total, builder.extract_element(acc, ir.Constant(_llvm.I32, i)))
            return total

        # "adjoint": (sa, t, ts, nt, first, sb, row, st, tails)
        sa, t, ts, nt, first, sb, row, st, tails = args
        ins, marks = planes(at(0, sa, t), ts, 6), at(0, sa, first)
        out, tail = at(5, sb, row), at(7, st, tails)
        back = ir.Constant(ir.VectorType(_llvm.I32, n), [n - 1 + i for i in range(n)])

        def run(z, left, carried):  # carried: the last vector's columns 4 and 5, merged
            v = [_Lanes(builder, load(p, z, vec, left)) for p in ins]
            d = [x.value for x in _b.py_func(*v, *consts)]
            last4, last5 = _split(builder, carried, 2)
            # each tile's left neighbour's columns 4 and 5 (lane 0: the last vector's)
            c4 = builder.shuffle_vector(last4, d[4], back)
            c5 = builder.shuffle_vector(last5, d[5], back)
            start = builder.fcmp_unordered("!=", load(marks, z, vec, left), zero)
            d0 = builder.fadd(d[0], builder.select(start, zero, c4))
            d1 = builder.fadd(d[1], builder.select(start, zero, c5))
            four = builder.mul(z, _llvm.const(4))
            store(out, four, wide4, _merge(builder, [d0, d1, d[2], d[3]]), times(left, 4))
            two = builder.mul(z, _llvm.const(2))
            store(tail, two, wide2, _merge(builder, [d[4], d[5]]), times(left, 2))
            return _merge(builder, [d[4], d[5]])

        _llvm.vectors(builder, nt, n, _llvm.zeros(wide2), run)
        return context.get_dummy_value()

    return codegen


@intrinsic
def _input_row(typingctx, sb, src, tails, last, nt, ws, at, ps):
    """ws[at + j * ps + z] = B^T of tile z's row of 6 (columns 4 z .. 4 z + 5 of the
    plane at sb[src:], but at a row's last tile (sb[last + z] != 0) columns 4 and 5 from
    sb[tails + 2 z:]) for z < nt."""
    i64 = types.int64
    return types.void(sb, i64, i64, i64, i64, ws, i64, i64), _rows_intrinsic("input")


@intrinsic
def _output_row(typingctx, sa, t, ts, nt, b, act, sb, d):
    """sb[d + 4 z + i] = act((A^T m)[i] + b), i < 4 (act 1: ReLU, as max(y, 0)), for
    tile z's row of 6 at sa[t + j * ts + z], z < nt."""
    i64 = types.int64
    return types.void(sa, i64, i64, i64, sa.dtype, i64, sb, i64), _rows_intrinsic("output")


@intrinsic
def _dout_row(typingctx, sa, src, nt, sb, o, ts):
    """sb[o + j * ts + z] = (A d)[j] for tile z's row of 4 at sa[src + 4 z:], z < nt;
    returns the sum of those rows."""
    i64 = types.int64
    return sa.dtype(sa, i64, i64, sb, i64, i64), _rows_intrinsic("dout")


@intrinsic
def _adjoint_row(typingctx, sa, t, ts, nt, first, sb, row, st, tails):
    """B applied to tile z's row of 6 at sa[t + j * ts + z], z < nt: columns 4 z .. 4 z + 5
    of a padded row. Columns 0 - 3 go to sb[row + 4 z:], with the left tile's columns 4 and
    5 added to the first two unless the tile starts a row (sa[first + z] != 0); columns 4
    and 5 to st[tails + 2 z:] (a row's last tile's are its tail)."""
    i64 = types.int64
    sig = types.void(sa, i64, i64, i64, i64, sb, i64, st, i64)
    return sig, _rows_intrinsic("adjoint")


@njit(**HELPER, nogil=True)
def _pack_u(w, transpose, rows_p, upack):
    """U = G g G^T of every (k, c), packed as bcast's A for each point p = 6 i + j:
    upack[p][r // MR][q][r % MR] with rows r = k, inner q = c (forward), or, with
    `transpose`, rows r = c, inner q = k (dx); rows up to rows_p are zero. A filter k's
    channels at once, in loops over c that vectorise (one (k, c) at a time, scattered:
    32 ms of a 512-channel conv's 84 ms forward, 14x14, b16, 1 thread, Intel Xeon; now
    12)."""
    k_, c_ = w.shape[0], w.shape[1]
    mr = _U(conv.MR)
    inner = k_ if transpose else c_
    zero = upack.dtype.type(0.0)
    gw = np.empty((6, 3, c_))  # G g of filter k's channels, along their rows
    u = np.empty((conv.MR, P, c_))  # U of a block of MR filters
    wf = w.reshape(-1)
    blocks = _U(rows_p) // mr
    for k in range(k_):
        uk = u[k % conv.MR]
        base = _U(k * c_ * 9)
        for j in range(3):
            for c in range(_U(c_)):
                at = base + c * _U(9) + _U(j)
                col = _g(np.float64(wf[at]), np.float64(wf[at + _U(3)]), np.float64(wf[at + _U(6)]))
                for i in range(6):
                    gw[i, j, c] = col[i]
        for i in range(6):  # (G g) G^T: along its columns
            for c in range(_U(c_)):
                row = _g(gw[i, 0, c], gw[i, 1, c], gw[i, 2, c])
                for j in range(6):
                    uk[i * 6 + j, c] = row[j]
        if transpose:  # rows r = c, inner q = k: MR channels' runs a filter
            for p in range(P):
                for c in range(_U(rows_p)):  # (rows past c_: zero)
                    v = uk[p, c] if c < _U(c_) else zero
                    upack[((_U(p) * blocks + c // mr) * _U(inner) + _U(k)) * mr + c % mr] = v
        elif k % conv.MR == conv.MR - 1 or k == k_ - 1:  # rows r = k: a block's runs at
            k0 = k - k % conv.MR  # once (a filter at a time, each cache line of upack was
            for p in range(P):  # written MR times, out of the cache in between)
                at = (_U(p) * blocks + _U(k0) // mr) * _U(inner) * mr
                for c in range(_U(c_)):
                    for r in range(mr):  # (rows past k_: zero)
                        v = u[r, p, c] if r < _U(k - k0 + 1) else zero
                        upack[at + c * mr + r] = v


@njit(cache=True, nogil=True)
def _weight_adjoint(flat, starts, order, kd, cd, dw):
    """dw[k, c] = G^T du[:, k, c] G, du ([36][kd][cd] in ``dot`` blocks of MD x ND, their
    elements in the order `order` inverts: conv.dot_order) the sum of the threads' sums
    at flat[starts[t]:], added in thread order. Read in place, a block of (k, c) at a
    time: 36 runs of MD * ND elements (unblocking and summing them with numpy first took
    72 ms of a 512-channel conv's backward, 14x14, b16, 1 thread, Intel Xeon; now 12)."""
    k_, c_ = dw.shape[0], dw.shape[1]
    md, nd = conv.MD, conv.ND
    e_ = md * nd
    d = np.empty((P, e_), flat.dtype)  # a block's du
    t = np.empty((3, 6, e_))  # G^T du, then G^T du G, a block at once
    g = np.empty((3, 3, e_))
    for kb in range(0, kd, md):
        for cb in range(0, cd, nd):
            for p in range(P):  # the block of rows p * kd + kb .., columns cb ..
                at = _U((p * kd + kb) * cd + cb * md)
                first = _U(starts[0]) + at
                for e in range(_U(e_)):
                    d[p, e] = flat[first + e]
                for th in range(1, starts.shape[0]):  # in thread order: the same bits
                    more = _U(starts[th]) + at
                    for e in range(_U(e_)):
                        d[p, e] += flat[more + e]
            for q in range(6):  # G^T du: along the rows
                for e in range(e_):
                    col = _gt(
                        np.float64(d[q, e]), np.float64(d[6 + q, e]), np.float64(d[12 + q, e]),
                        np.float64(d[18 + q, e]), np.float64(d[24 + q, e]),
                        np.float64(d[30 + q, e]),
                    )  # fmt: skip
                    t[0, q, e], t[1, q, e], t[2, q, e] = col[0], col[1], col[2]
            for m in range(3):  # (G^T du) G: along the columns
                for e in range(e_):
                    row = _gt(t[m, 0, e], t[m, 1, e], t[m, 2, e], t[m, 3, e], t[m, 4, e],
                              t[m, 5, e])  # fmt: skip
                    g[m, 0, e], g[m, 1, e], g[m, 2, e] = row[0], row[1], row[2]
            for i in range(min(md, k_ - kb)):
                for j in range(min(nd, c_ - cb)):
                    e = order[i * nd + j]
                    for m in range(3):
                        for n in range(3):
                            dw[kb + i, cb + j, m, n] = g[m, n, e]


# The transforms work on a block's tiles of one channel (input and its gradient) or one
# filter (output and its gradient) at once, all its samples, in flat loops: Numba's loops
# over the tiles of a row (8 at 32x32, 2 at 8x8) had run below the vector width, scalar.
# Rows of tiles go into planes first, one per row of the 6 (or 4) a tile reads or writes
# (padded rows 4 r + l), with 4 tx columns a row (a tile's first 4 columns, 4 t .. 4 t + 3,
# read or written with stride 4, which LLVM vectorises with shuffles) and, apart, the 2
# columns past a row's last tile (columns 4 and 5 of a tile are the next tile's 0 and 1
# elsewhere). Measured (1 thread, Intel Xeon, 512-bit, ms, old / new): ResNet-20's 64 ch
# 8x8 at b128, input 2.49 / 1.28, output 2.12 / 0.75, output gradient 4.23 / 1.08, input
# gradient 2.62 / 1.92; VGG-small's 128 ch 16x16 at b64 6.28 / 4.08, 5.90 / 2.36, 8.49 /
# 3.55, 7.91 / 5.53; its 64 ch 32x32 (8 tiles a row, where the old loops did best) 5.82 /
# 6.36 (input), 7.32 / 4.96, 11.4 / 5.45, 8.91 / 8.56. Indices are uint64 (`_U`), which
# Numba does not check for negative wraparound: with int64 ones the loops stayed scalar
# (VGG-small's 64 x 32x32 input transform at b64: 18.4 ms against 6.9), and a view per
# row, reference counted with atomic operations, was slower still (6x, in cache). As in
# conv.py's copies. One pass is one function: LLVM left the 6 row passes' loop scalar
# when they shared one (16.7 against 7.4 ns a tile, 32x32).
_U = np.uint64


def _spread(n):
    """A plane's stride, at least n elements: a multiple of 16 whose first 12 multiples
    are not within 32 elements of a multiple of 1024, so that planes read and written
    together fall in different cache sets (4 KiB aliasing: a pass over 6 planes of 400
    elements ran 4x slower than over planes of 776)."""
    m = _round_up(n, 16)
    while any(min(k * m % 1024, -k * m % 1024) < 32 for k in range(1, 13)):
        m += 16
    return m


class _Scratch(NamedTuple):
    """Where a thread's scratch regions start (elements), in three arrays: a pass reads
    one and writes another (LLVM kept a pass over 6 planes scalar, 2x slower, when it
    read and wrote the same array)."""

    pls: int  # stride of an input plane: 4 tx columns a tile row, then the 2-column tails
    tails: int  # where a plane's tails start (after the most tiles' rows, on a vector's
    # boundary: the same place in every block, so that what a longer block left is not
    # read as a zero tail)
    ts: int  # stride of a plane of one value a tile
    dps: int  # stride of an output-gradient plane (4 tx columns a tile row)
    # first array: the 6 input planes, then
    dp: int  # the output gradient's 4 planes (rows 4 r + a)
    tv: int  # the output's transform along the columns (4 x 6 planes) or the input
    # gradient's (6 x 6)
    first: int  # 1 at each tile row's first tile, else 0
    size: int
    # second array: the 6 input planes' transform along the columns (tails included), or
    # the input gradient's rows (4 tx columns a tile row), then
    last: int  # 1 at each tile row's last tile, else 0
    buf: int  # output rows (4 planes of pls)
    dm: int  # the output gradient's transform along the columns (4 x 6 planes)
    size_b: int
    tps: int  # third array: the input gradient rows' tails, 6 planes of this stride
    # (written beside those rows into the second, they left their pass scalar: 4x slower)


def _scratch(geo):
    nt = geo.spb * geo.rows * geo.tx  # tiles of a block
    pls, ts, dps = _spread(6 * nt + 24), _spread(nt + 8), _spread(4 * nt + 8)
    dp = 6 * pls
    tv = dp + 4 * dps
    first = tv + 36 * ts
    last = 6 * pls
    buf = last + ts
    dm = buf + 4 * pls
    tps = _spread(2 * nt + 8)
    return _Scratch(
        pls, _round_up(4 * nt, 16), ts, dps, dp, tv, first, first + ts, last, buf, dm,
        dm + 24 * ts, tps,
    )  # fmt: skip


@njit(**HELPER, nogil=True)
def _zeros(n, dtype):
    """np.zeros(n, dtype) from a 64-byte boundary (a vector's at most: see _aligned)."""
    raw = np.zeros(n + 16, dtype)
    at = (-(raw.ctypes.data // raw.itemsize)) % 16
    return raw[at : at + n]


@njit(**HELPER, nogil=True)
def _new_scratch(sc, tiles, tx_, dtype):
    """A thread's three scratch arrays: zero (the planes' padding columns are never
    written) but for the marks of each tile row's first and last tiles."""
    _, _, _, _, _, _, first, size, last, _, _, size_b, tps = sc
    sa, sb, st = _zeros(size, dtype), _zeros(size_b, dtype), _zeros(6 * tps, dtype)
    for z in range(tiles):
        sa[first + z] = 1.0 if z % tx_ == 0 else 0.0
        sb[last + z] = 1.0 if z % tx_ == tx_ - 1 else 0.0
    return sa, sb, st


@njit(inline="always", nogil=True)
def _copy_samples(xf, src, stride, step, sa, at, d_stride, d_step, count, rows, n, hook, a, b,
                  relu):  # fmt: skip
    """conv.masked_samples' copy of `rows` rows of n for `count` samples, or with `hook`
    x * a + b (then its ReLU if relu), as the direct conv applies the input hook."""
    if hook:
        conv.affine_samples(xf, src, stride, sa, at, d_stride, rows, n, a, b, relu, count,
                            step, d_step)  # fmt: skip
    else:
        conv.masked_samples(xf, src, stride, xf, sa, at, d_stride, rows, n, 0, count, step,
                            d_step)  # fmt: skip


@njit(**HELPER, nogil=True)
def _input_planes(x, n0, ns, c, r0, nrows, pt, pl, tx_, sa, pls, tails, aff, mode):
    """Plane l of sa (l * pls): padded rows 4 (r0 + r) + l of h(x[n0 .. n0 + ns, c]) (the
    input hook: _copy_samples), 4 tx columns a row (tile row r of sample s at (s * nrows + r)
    * 4 tx), and each row's columns 4 tx and 4 tx + 1 at tails + 2 z for the row's last
    tile z. Padding columns are left as they are (zero: never written); padding rows are
    cleared: the padding is h(x)'s, zeros."""
    zero = sa.dtype.type(0.0)
    h_, w_ = x.shape[2], x.shape[3]
    s_ = 4 * tx_
    xf = x.reshape(-1)
    ncopy = min(w_, s_ - pl)
    c4 = s_ - pl  # x's column of a row's tail
    ntail = max(0, min(2, w_ - c4))
    # the hook's scalars, taken here: aff passed on to the copies cost ~35 ns a call (4x
    # the planes' time on 8x8 maps)
    hook, a, b, relu = False, zero, zero, 0
    if aff is not None and mode != IN_COPY:
        hook, a, b, relu = True, aff[0, c], aff[1, c], 1 if mode == IN_AFFINE_RELU else 0
    step = x.shape[1] * h_ * w_  # from one sample to the next
    for l in range(6):
        lo, hi = 0, nrows  # tile rows whose row y = 4 (r0 + r) + l - pt is inside x
        while lo < nrows and 4 * (r0 + lo) + l - pt < 0:
            lo += 1
        while hi > lo and 4 * (r0 + hi - 1) + l - pt >= h_:
            hi -= 1
        for s in range(ns if lo > 0 or hi < nrows else 0):
            row0 = l * pls + s * nrows * s_
            tail0 = l * pls + tails + 2 * (s * nrows * tx_ + tx_ - 1)
            for r in range(nrows):
                if r < lo or r >= hi:
                    o = _U(row0 + r * s_)
                    for i in range(_U(s_)):
                        sa[o + i] = zero
                    sa[tail0 + 2 * r * tx_] = sa[tail0 + 2 * r * tx_ + 1] = zero
        if hi > lo:
            src = (n0 * x.shape[1] + c) * h_ * w_ + (4 * (r0 + lo) + l - pt) * w_
            at = l * pls + lo * s_ + pl
            rows = hi - lo
            _copy_samples(xf, src, 4 * w_, step, sa, at, s_, nrows * s_, ns, rows, ncopy, hook,
                          a, b, relu)  # fmt: skip
            if ntail > 0:
                at = l * pls + tails + 2 * (tx_ - 1) + 2 * lo * tx_
                _copy_samples(xf, src + c4, 4 * w_, step, sa, at, 2 * tx_, 2 * nrows * tx_, ns,
                              rows, ntail, hook, a, b, relu)  # fmt: skip


@njit(**HELPER, nogil=True)
def _input_tiles(x, n0, ns, c, r0, nrows, pt, pl, tx_, sa, sb, sc, ws, at, ps, aff, mode):
    """V[p][at + z] = (B^T d B)[p] for the tiles z of tile rows r0 .. r0 + nrows of
    h(x[n0 .. n0 + ns, c]) (`ps`: the distance between points in ws; sample s's tile (r, t)
    is z = (s nrows + r) tx + t). Tile (r, t) reads padded rows 4r .. 4r + 5, columns
    4t .. 4t + 5: along its columns first (the planes' elements, tails included), then
    along its rows."""
    pls, tails, _, _, _, _, _, _, last, _, _, _, _ = sc
    nt = ns * nrows * tx_
    _input_planes(x, n0, ns, c, r0, nrows, pt, pl, tx_, sa, pls, tails, aff, mode)
    _bt_planes(sa, 0, pls, sb, 0, pls, 4 * nt)  # along the columns, tails too
    _bt_planes(sa, tails, pls, sb, tails, pls, 2 * nt)
    for i in range(6):
        src = _U(i * pls)
        _input_row(sb, src, src + _U(tails), _U(last), nt, ws, at + 6 * i * ps, ps)


@njit(**HELPER, nogil=True, fastmath={"reassoc"})
def _moments(y, at, n, shift):
    """(sum(e), sum(e^2)) over y[at : at + n] in float64, e = y - shift (the batch norm's
    statistics, as the direct conv's epilogue takes them; 'reassoc' vectorises the
    sums in an order fixed at compile time)."""
    s1, s2 = 0.0, 0.0
    for i in range(_U(at), _U(at + n)):
        e = np.float64(y[i]) - shift
        s1 += e
        s2 += e * e
    return s1, s2


@njit(**HELPER, nogil=True)
def _output_tiles(
    ws, at, ps, b, act, sa, sb, sc, out, n0, ns, k, r0, nrows, moments, want, th, first
):
    """out[n0 .. n0 + ns, k] rows 4 r0 .. 4 (r0 + nrows) = act(A^T M A + b) for those
    tile rows, M[p] at ws[at + p * ps:] (tiles numbered as in _input_tiles): along the
    tiles' columns, then their rows into 4 planes (output rows 4 r + a, 4 tx columns a
    row), copied out; outputs past the map's edge are dropped. With `want`, moments (None:
    a build without them) += those rows' moments in thread th's row, as the direct conv
    takes them, shifted by the thread's `first` value."""
    pls, _, ts, _, _, tv, _, _, _, buf, _, _, _ = sc
    k_, oh, ow = out.shape[1], out.shape[2], out.shape[3]
    tx_ = -(-ow // 4)
    nt = ns * nrows * tx_
    s_ = 4 * tx_
    for j in range(6):
        _at_planes(ws, at + j * ps, 6 * ps, sa, tv + j * ts, 6 * ts, nt)
    for a in range(4):
        _output_row(sa, _U(tv + 6 * a * ts), _U(ts), nt, b, act, sb, _U(buf + a * pls))
    outf = out.reshape(-1)
    for a in range(4):
        rows = min(nrows, (oh - a + 3) // 4 - r0)  # output rows 4 (r0 + r) + a inside
        if rows > 0:
            dst = ((n0 * k_ + k) * oh + 4 * r0 + a) * ow
            src = buf + a * pls
            conv.masked_samples(sb, src, s_, sb, outf, dst, 4 * ow, rows, ow, 0, ns, nrows * s_,
                                k_ * oh * ow)  # fmt: skip
    if moments is not None and want:  # over the rows just written, a sample's in one run
        size = (min(4 * (r0 + nrows), oh) - 4 * r0) * ow
        start = ((n0 * k_ + k) * oh + 4 * r0) * ow
        if first:
            moments[th, k] = outf[start]
        shift = moments[th, k]
        s1, s2 = 0.0, 0.0
        for s in range(ns):
            m1, m2 = _moments(outf, start + s * k_ * oh * ow, size, shift)
            s1 += m1
            s2 += m2
        moments[th, k_ + k] += s1
        moments[th, 2 * k_ + k] += s2


@njit(**HELPER, nogil=True)
def _dout_tiles(dout, yout, act, n0, ns, k, r0, nrows, sa, sb, sc, ws, at, ps, db, gk, gmode):
    """dM[p] at ws[at + p * ps:] = (A dY A^T)[p] for the tiles of tile rows r0 .. r0 +
    nrows of dout[n0 .. n0 + ns, k] (masked where a fused ReLU's output is 0, or through
    the output-gradient hook: gk, gmode as the direct conv's, gk None: a build without
    it; zero past the edge; tiles numbered as in _input_tiles); db[k] += the sum of dY.
    Its rows go into 4 planes (rows 4 r + a, 4 tx columns a row), then along the tiles'
    columns, then their rows."""
    _, _, ts, dps, dp, _, _, _, _, _, dm, _, _ = sc
    oh, ow = dout.shape[2], dout.shape[3]
    tx_ = -(-ow // 4)
    nt = ns * nrows * tx_
    s_ = 4 * tx_
    df, yf = dout.reshape(-1), yout.reshape(-1)
    zero = ws.dtype.type(0.0)
    # the hook's scalars, taken here (see _input_planes)
    hook, ka, kb, kc, ga, gb, relu = False, zero, zero, zero, zero, zero, 0
    if gk is not None and gmode != OUT_PLAIN:
        hook, ka, kb, kc, ga, gb = True, gk[0, k], gk[1, k], gk[2, k], gk[3, k], gk[4, k]
        relu = 1 if gmode == OUT_NORM_RELU else 0
    step = dout.shape[1] * oh * ow  # from one sample to the next
    for a in range(4):
        rows = max(0, min(nrows, (oh - a + 3) // 4 - r0))  # rows 4 (r0 + r) + a inside
        for s in range(ns if rows < nrows else 0):  # those past the edge: zero
            row0 = dp + a * dps + s * nrows * s_
            for r in range(rows, nrows):
                o = _U(row0 + r * s_)
                for i in range(_U(s_)):
                    sa[o + i] = zero
        if rows > 0:
            src = ((n0 * dout.shape[1] + k) * oh + 4 * r0 + a) * ow
            row0, d_step = dp + a * dps, nrows * s_
            if not hook:
                conv.masked_samples(df, src, 4 * ow, yf, sa, row0, s_, rows, ow, act, ns, step,
                                    d_step)  # fmt: skip
            else:
                conv.norm_samples(df, src, 4 * ow, yf, sa, row0, s_, rows, ow, ka, kb, kc, ga,
                                  gb, relu, ns, step, d_step)  # fmt: skip
    acc = zero
    for a in range(4):
        acc += _dout_row(sa, _U(dp + a * dps), nt, sb, _U(dm + 6 * a * ts), _U(ts))
    db[k] += acc
    for j in range(6):
        _a_planes(sb, dm + j * ts, 6 * ts, ws, at + j * ps, 6 * ps, nt)


@njit(**HELPER, nogil=True)
def _input_adjoint_tiles(ws, at, ps, tx_, ns, r0, nrows, sa, sb, st, sc, base, step, wp):
    """The padded dx of channel c (sample s's at ws[base + s * step:], rows of wp) +=
    B dV B^T for the tiles of tile rows r0 .. r0 + nrows, dV[p] at ws[at + p * ps:]
    (tiles numbered as in _input_tiles): along the tiles' columns, then their rows, into
    one plane per padded row 4 r + l (4 tx columns; the tails of 2 apart), added into dx
    a plane at a time. Tiles overlap by two rows and columns: every element adds up in the
    same order every run."""
    pls, _, ts, _, _, tv, first, _, _, _, _, _, tps = sc
    nt = ns * nrows * tx_
    s_ = 4 * tx_
    for j in range(6):
        _b_planes(ws, at + j * ps, 6 * ps, sa, tv + j * ts, 6 * ts, nt)
    for l in range(6):
        t = _U(tv + 6 * l * ts)
        _adjoint_row(sa, t, _U(ts), nt, _U(first), sb, _U(l * pls), st, _U(l * tps))
    for l in range(6):  # (an element's sums in the order of l: the same every run)
        dst = base + (4 * r0 + l) * wp
        conv.add_samples(sb, l * pls, s_, ws, dst, 4 * wp, nrows, s_, ns, nrows * s_, step)
        tail0 = l * tps + 2 * (tx_ - 1)
        conv.add_samples(st, tail0, 2 * tx_, ws, dst + s_, 4 * wp, nrows, 2, ns,
                         2 * nrows * tx_, step)  # fmt: skip


@njit(**HELPER, nogil=True)
def _unpad(dxpad, base, wp, pt, pl, dx, n, c, accumulate):
    """dx[n, c] = (or +=, `accumulate`) the interior of one sample-channel of the padded
    dx."""
    h_, w_ = dx.shape[2], dx.shape[3]
    src, dst = base + pt * wp + pl, (n * dx.shape[1] + c) * h_ * w_
    if accumulate:
        conv.add_rows(dxpad, src, wp, dx.reshape(-1), dst, w_, h_, w_)
    else:
        conv.masked_rows(dxpad, src, wp, dxpad, dx.reshape(-1), dst, w_, h_, w_, 0)


@njit(**HELPER, nogil=True)
def _products(upack, rows_out, inner, ws, rows_b, b_stride, rows_c, c_stride, cols):
    """For every point p: C = A[p] B, the rows of C at rows_c[p * c_stride:] (rows_out of
    them), of B at rows_b[p * b_stride:] (inner), their first `cols` columns (whole
    panels), A[p] packed by _pack_u."""
    nr_ = conv.NV * (conv.VECTOR_BYTES // ws.itemsize)
    mr = conv.MR
    for p in range(P):
        for pn in range(cols // nr_):
            for ob in range(rows_out // mr):
                conv.bcast(
                    upack, ((p * (rows_out // mr) + ob) * inner) * mr,
                    ws, rows_b, p * b_stride, pn * nr_,
                    ws, rows_c, p * c_stride + ob * mr, pn * nr_, inner, 0,
                )  # fmt: skip


@njit(**HELPER, nogil=True)
def _tables(geo, c_, v_at, m_at, dv_at, zero_at, vs, ms, dvs):
    """The micro-kernels' row offsets: V rows (per point, padded to cd with the zero
    row), M / dM rows, dV rows."""
    tp, km, cb, cd = geo[5], geo[6], geo[8], geo[9]
    rows_v = np.empty(P * cd, np.int64)
    rows_m = np.empty(P * km, np.int64)
    rows_dv = np.empty(P * cb, np.int64)
    for p in range(P):
        for c in range(cd):
            rows_v[p * cd + c] = v_at + p * vs + c * tp if c < c_ else zero_at
        for k in range(km):
            rows_m[p * km + k] = m_at + p * ms + k * tp
        for c in range(cb):
            rows_dv[p * cb + c] = dv_at + p * dvs + c * tp
    return rows_v, rows_m, rows_dv


@Builds
def _forward_blocks(x, w, bias, act, pads, geo, sc, T, out, ws, aff, mode, moments, want):
    # aff, moments: None (a build without the hooks), or the input hook and the output's
    # moments (taken if `want`)
    ty_, tx_, spb, rows, bands, tp, km, _kd, _cb, cd, _hp, _wp, per, _ = geo
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
        v_at, m_at, dv_at, zero_at, _du, _db, vs, ms, dvs = _regions(geo, c_, th * per)
        rows_v, rows_m, _rows_dv = _tables(geo, c_, v_at, m_at, dv_at, zero_at, vs, ms, dvs)
        ws[v_at:m_at] = 0.0  # panel padding columns: finite junk
        sa, sb, _ = _new_scratch(sc, spb * rows * tx_, tx_, x.dtype)
        first = th * total // T
        for block in range(first, (th + 1) * total // T):
            n0, ns, r0, nrows = conv._tile_at(block, spb, bands, rows, n_, ty_)
            for c in range(c_):
                at = v_at + c * tp
                _input_tiles(
                    x, n0, ns, c, r0, nrows, pt, pl, tx_, sa, sb, sc, ws, at, vs, aff, mode
                )
            cols = -(-(ns * nrows * tx_) // nr_) * nr_  # a short block: fewer panels
            _products(upack, kb, c_, ws, rows_v, cd, rows_m, km, cols)  # M = U V
            for k in range(k_):
                b = bias[k] if has_bias else ws.dtype.type(0.0)
                _output_tiles(
                    ws, m_at + k * tp, ms, b, act, sa, sb, sc, out, n0, ns, k, r0, nrows,
                    moments, want, th, block == first,
                )  # fmt: skip
            if moments is not None and want:
                oh, ow = out.shape[2], out.shape[3]
                moments[th, 3 * k_] += ns * (min(4 * (r0 + nrows), oh) - 4 * r0) * ow


# fmt: off
@Builds
def _backward_samples(
    x, w, dout, yout, act, want_dx, pads, geo, sc, T, dx, ws, aff, mode, accumulate, gk, gmode,
    dsums, relu_dx,
):
    # fmt: on
    # the direct conv's hooks (conv2d_backward); aff, gk, dsums None: a build without them
    ty_, tx_, spb, rows, bands, tp, km, kd, cb, cd, hp, wp, per, _ = geo
    n_, c_ = x.shape[0], x.shape[1]
    k_ = w.shape[0]
    pt, pl = pads[0], pads[1]
    md, nd = conv.MD, conv.ND
    nr_ = conv.NV * (conv.VECTOR_BYTES // ws.itemsize)
    upack = ws[T * per :]
    if want_dx:
        _pack_u(w, True, cb, upack)
    for th in prange(T):
        v_at, m_at, dv_at, zero_at, du_at, db_at, vs, ms, dvs = _regions(geo, c_, th * per)
        rows_v, rows_m, rows_dv = _tables(geo, c_, v_at, m_at, dv_at, zero_at, vs, ms, dvs)
        dx_at = db_at + k_
        ws[v_at:dx_at] = 0.0  # junk columns and padding rows: zero gradient
        sa, sb, st = _new_scratch(sc, spb * rows * tx_, tx_, x.dtype)
        db = ws[db_at : db_at + k_]
        n0, hi = th * n_ // T, (th + 1) * n_ // T
        while n0 < hi:
            ns = min(spb, hi - n0)
            if want_dx:
                ws[dx_at : dx_at + ns * c_ * hp * wp] = 0.0
            for band in range(bands):
                r0 = band * rows
                nrows = min(rows, ty_ - r0)
                # the products run over the block's whole panels (`cols`), not all tp
                # columns: a short block (the last band, the last samples) costs what it
                # holds. dM's columns past its tiles must be zero (dU sums over them):
                # only a wider block wrote there before, and only those are cleared
                # (clearing all of dM every block: ~15% of VGG-small's conv1_2 backward at
                # b64 with F(2x2, 3x3), its stores pushing V out of the cache)
                used = ns * nrows * tx_
                cols = -(-used // nr_) * nr_
                if used < cols:
                    for p in range(P):
                        for k in range(km):
                            row = m_at + p * ms + k * tp
                            ws[row + used : row + cols] = 0.0
                for c in range(c_):
                    at = v_at + c * tp
                    _input_tiles(
                        x, n0, ns, c, r0, nrows, pt, pl, tx_, sa, sb, sc, ws, at, vs, aff, mode
                    )
                for k in range(k_):
                    at = m_at + k * tp
                    _dout_tiles(
                        dout, yout, act, n0, ns, k, r0, nrows, sa, sb, sc, ws, at, ms, db, gk,
                        gmode,
                    )  # fmt: skip
                for p in range(P):  # dU += dM V^T
                    for ob in range(0, kd, md):
                        for cbk in range(0, cd, nd):
                            conv.dot(
                                ws, m_at + p * ms + ob * tp, tp,
                                ws, rows_v, p * cd + cbk, 0,
                                ws, du_at + (p * kd + ob) * cd + cbk * md, cols,
                            )  # fmt: skip
                if not want_dx:
                    continue
                _products(upack, cb, k_, ws, rows_m, km, rows_dv, cb, cols)  # dV = U^T dM
                for c in range(c_):
                    at, base = dv_at + c * tp, dx_at + c * hp * wp
                    _input_adjoint_tiles(
                        ws, at, dvs, tx_, ns, r0, nrows, sa, sb, st, sc, base, c_ * hp * wp, wp
                    )
            if want_dx:
                for s in range(ns):
                    for c in range(c_):
                        base = dx_at + (s * c_ + c) * hp * wp
                        _unpad(ws, base, wp, pt, pl, dx, n0 + s, c, accumulate)
                # the hooks over the chunk's dx while it is in cache, as the direct conv
                if aff is not None and relu_dx:
                    conv._relu_dx(dx, x, n0, ns)
                # (no channels: no sums wanted)
                if dsums is not None and dsums.shape[2] > 0:
                    conv._dx_sums(dx, x, n0, ns, aff, mode, dsums[th])
            n0 += ns


def _aligned(a):
    """a (flat) from its first element on a vector's boundary: the planes start whole
    vectors apart, so that none of the transforms' vector loads and stores straddles two
    cache lines (the output transform's columns, 320 tiles a pass, 1 thread, Intel Xeon
    model 207: 3.2 ns a tile and channel aligned, 8.0 ns not, as numpy leaves a large
    array 16 bytes past a page)."""
    lanes = _llvm.lanes(a.itemsize)
    return a[(-(a.ctypes.data // a.itemsize)) % lanes :]


def _plan(x, w, out, ws, backward):
    flat = _aligned(ws.reshape(-1))
    shapes = (x.shape, w.shape, out.shape, x.itemsize)
    geo, scratch, threads = _blocks(*shapes, flat.size, thread_count(), backward)
    return geo, scratch, threads, flat


@lru_cache(maxsize=1024)
def _blocks(x_shape, w_shape, out_shape, itemsize, space, threads, backward):
    """The most threads, up to `threads`, whose blocks fit in `space` elements of
    workspace, their geometry (each thread count has its own blocks) and scratch layout
    (a tuple, as the kernels take it). Cached: a layer asks with the same shapes every
    step (the layout alone took ~20 us a call)."""
    shapes = (x_shape, w_shape, out_shape, itemsize)
    for t in range(threads, 0, -1):
        geo = _geometry(*shapes, t, backward)
        if geo.per_thread * t + geo.upack <= space:
            return geo, tuple(_scratch(geo)), t
    one = _geometry(*shapes, 1, backward)
    raise ValueError(f"conv2d workspace has {space} elements, need {one.per_thread + one.upack}")


RUNS = {"forward": 0, "backward": 0}  # calls so far: `cnnspec bench` names the layers


def forward(x, w, bias, pad, out, ws, act, in_affine=None, stats=None):
    """out = act(conv2d(h(x), w) + bias), 3x3, stride 1 (checked by conv.py's caller),
    with conv.conv2d_forward's hooks: h(x) through `in_affine`, `stats` the output's
    batch mean and variance."""
    RUNS["forward"] += 1
    geo, sc, threads, flat = _plan(x, w, out, ws, False)
    pads = (int(pad[0]), int(pad[2]))
    aff, mode, moments = forward_hooks(in_affine, stats, x, w.shape[0], threads)
    want = stats is not None
    args = (x, w, bias, int(act), pads, tuple(geo), sc, threads, out, flat, aff, mode,
            moments, int(want))  # fmt: skip
    kernel = _forward_blocks.now(threads == 1, args)  # one thread: the serial build
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        conv_numpy.conv2d_forward(
            x, w, bias, (1, 1), pad, (1, 1), 1, out, act, None, in_affine, stats
        )
        return
    kernel(*args)
    if want:
        stats[0], stats[1] = merge_moments(moments)


def backward(
    x, w, dout, pad, ws, dx, dw, db, y, act, in_affine=None, accumulate=False, gk=None,
    gmode=OUT_PLAIN, dx_sums=None, relu_dx=False,
):  # fmt: skip
    """dx (None: skipped), dw, db (None: skipped) of :func:`forward`, with
    conv.conv2d_backward's hooks (gk, gmode: its `dout_affine` as the direct conv takes
    it). False, having done nothing, on a first run while the kernel compiles in a child:
    the caller runs its numpy stand-in."""
    RUNS["backward"] += 1
    geo, sc, threads, flat = _plan(x, w, dout, ws, True)
    pads = (int(pad[0]), int(pad[2]))
    want_dx = dx is not None
    dx_arg = dx if want_dx else np.empty((1, 1, 1, 1), x.dtype)
    aff, mode, gk, dsums = backward_hooks(in_affine, gk, relu_dx, dx_sums, x, threads)
    args = (
        x, w, dout, y, int(act), want_dx, pads, tuple(geo), sc, threads, dx_arg, flat, aff,
        mode, bool(accumulate), gk, gmode, dsums, int(relu_dx),
    )  # fmt: skip
    kernel = _backward_samples.now(threads == 1, args)
    if kernel is None:  # a first run, the kernel compiling in a child (conv_numpy.py)
        return False
    kernel(*args)
    merge_dx_sums(dx_sums, dsums)
    # the threads' private sums, added in thread order: the same bits every run
    k_ = w.shape[0]
    du_at, db_at = _regions.py_func(geo, x.shape[1], 0)[4:6]  # (a helper: no Python entry)
    starts = np.arange(threads, dtype=np.int64) * geo.per_thread
    order = conv._unblock_order(x.itemsize)  # (argsort's int64)
    _weight_adjoint(flat, starts + du_at, order, geo.kd, geo.cd, dw)
    if db is not None:
        db[...] = 0
        for t in range(threads):
            db += flat[starts[t] + db_at : starts[t] + db_at + k_]
    return True
