"""Padded samples unfolded by the column taps against the phase-split ones, layer by
layer: the measure behind the rule in cnnspec/kernels/cpu/conv.py (`_taps`: which
stride-1 convs unfold, by their share of junk columns). Run it on a CPU the rule has
not been measured on:

    python benchmarks/unfold_ab.py --threads 1
    CNNSPEC_VECTOR_BITS=256 NUMBA_CACHE_DIR=/tmp/nc256 python benchmarks/unfold_ab.py

Each shape runs forward (ReLU fused) and backward (dx, dW, db) both ways in alternating
rounds in one process; it prints the share of junk columns the phase-split rows carry,
the best times, phase-split / unfolded ratios (above 1: unfolding is faster) and what
the rule picks for that shape.
"""

from __future__ import annotations

import _ab  # (benchmarks/, beside this file)

# name, batch, in channels, out channels, map side, kernel side, padding (all sides)
SHAPES = [
    ("LeNet-5 c1", 64, 1, 6, 32, 5, 0),
    ("LeNet-5 c3", 64, 6, 16, 14, 5, 0),
    ("LeNet-5 c3 b256", 256, 6, 16, 14, 5, 0),
    ("3x3 valid 32 ch 12x12", 64, 32, 32, 12, 3, 0),
    ("GoogLeNet 5x5 48->128 7x7 b32", 32, 48, 128, 7, 5, 2),
    ("GoogLeNet 3x3 192->384 7x7 b32", 32, 192, 384, 7, 3, 1),
    ("ResNet-20 64 ch 8x8", 128, 64, 64, 8, 3, 1),
    ("AlexNet 3x3 384->256 13x13 b32", 32, 384, 256, 13, 3, 1),
]
UNFOLDED, PHASE_SPLIT = 0.0, 2.0  # conv._UNFOLD_JUNK: every stride-1 conv / none


def measure(batch, c, k, side, kernel, pad, rounds):
    """Best (forward, backward) seconds with phase-split and with unfolded samples."""
    from cnnspec.kernels.cpu import conv

    rule = conv._UNFOLD_JUNK

    def switch(way):
        conv._UNFOLD_JUNK = way
        conv._call.cache_clear()  # (plans are cached per shape, the layout included)

    try:
        best = _ab.best_times((PHASE_SPLIT, UNFOLDED), switch, batch, c, k, side, kernel, pad,
                              rounds)  # fmt: skip
    finally:
        switch(rule)
    return best[PHASE_SPLIT], best[UNFOLDED]


def main(argv=None) -> list[dict]:
    args = _ab.command_line(__doc__, argv)
    from cnnspec.kernels.cpu import conv

    print(f"{'shape':31} junk {'phase-split ms fwd / bwd':>24} {'unfolded ms':>19}"
          f" {'ratio':>13}  rule")  # fmt: skip
    rows = []
    for name, batch, c, k, side, kernel, pad in SHAPES:
        if args.only not in name:
            continue
        batch = args.batch or batch
        (sf, sb), (uf, ub) = measure(batch, c, k, side, kernel, pad, args.rounds)
        o = side + 2 * pad - kernel + 1
        wq = conv._split_width(side, kernel, pad, pad, 1)  # the phase-split rows' columns
        shapes = ((batch, c, side, side), (k, c, kernel, kernel), (batch, k, o, o), (1, 1))
        picks = conv._taps(*shapes, (pad,) * 4, (1, 1)) > 1
        rows.append(dict(name=name, split=(sf, sb), unfolded=(uf, ub), picks=picks))
        print(
            f"{name:31} {(wq - o) / wq:4.0%} {sf * 1e3:12.3f} / {sb * 1e3:9.3f}"
            f" {uf * 1e3:8.3f} / {ub * 1e3:8.3f} {sf / uf:5.2f} / {sb / ub:5.2f}"
            f"  {'unfold' if picks else 'phase-split'}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
