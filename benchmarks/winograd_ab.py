"""Direct conv against Winograd F(4x4, 3x3), layer by layer: the measure behind the rule
in cnnspec/kernels/cpu/winograd.py (which 3x3 convs take Winograd). Run it on a CPU the
rule has not been measured on:

    python benchmarks/winograd_ab.py --threads 1
    CNNSPEC_VECTOR_BITS=256 NUMBA_CACHE_DIR=/tmp/nc256 python benchmarks/winograd_ab.py

Each shape runs forward (ReLU fused) and backward (dx, dW, db) both ways in alternating
rounds in one process; it prints the best times and direct / Winograd ratios (above 1:
Winograd is faster) and whether the rule picks Winograd for that shape.
"""

from __future__ import annotations

import _ab  # (benchmarks/, beside this file)

# name, batch, in channels, out channels, map side
SHAPES = [
    ("ResNet-20 16 ch 32x32", 128, 16, 16, 32),
    ("ResNet-20 32 ch 16x16", 128, 32, 32, 16),
    ("ResNet-20 64 ch 8x8", 128, 64, 64, 8),
    ("VGG-small 64 ch 32x32", 64, 64, 64, 32),
    ("VGG-small 64->128 16x16", 64, 64, 128, 16),
    ("VGG-small 128 ch 16x16", 64, 128, 128, 16),
    ("VGG-16 64 ch 56x56 b16", 16, 64, 64, 56),
    ("VGG-16 128 ch 28x28 b16", 16, 128, 128, 28),
    ("128 ch 14x14 b16", 16, 128, 128, 14),
    ("256 ch 14x14 b16", 16, 256, 256, 14),
    ("512 ch 14x14 b16", 16, 512, 512, 14),
    ("256 ch 8x8 b16", 16, 256, 256, 8),
    ("512 ch 7x7 b16", 16, 512, 512, 7),
]
GEOMETRY = ((1, 1), (1, 1, 1, 1), (1, 1), 1)  # stride, padding, dilation, groups


def measure(batch, c, k, side, rounds):
    """Best (forward, backward) seconds of the direct conv and of Winograd."""
    from cnnspec.kernels.cpu import winograd

    mode = winograd.MODE

    def switch(way):
        winograd.MODE = way

    try:
        best = _ab.best_times(("0", "1"), switch, batch, c, k, side, 3, 1, rounds)
    finally:
        winograd.MODE = mode
    return best["0"], best["1"]


def main(argv=None) -> list[dict]:
    args = _ab.command_line(__doc__, argv)
    from cnnspec.kernels.cpu import winograd

    print(f"{'shape':26} {'direct ms fwd / bwd':>21} {'Winograd ms':>19} {'ratio':>13}  rule")
    rows = []
    for name, batch, c, k, side in SHAPES:
        if args.only not in name:
            continue
        batch = args.batch or batch
        (df, db_), (wf, wb) = measure(batch, c, k, side, args.rounds)
        shapes = ((batch, c, side, side), (k, c, 3, 3), (batch, k, side, side))
        picks = winograd.chooses(*shapes, *GEOMETRY)
        rows.append(dict(name=name, direct=(df, db_), winograd=(wf, wb), picks=picks))
        print(
            f"{name:26} {df * 1e3:9.2f} / {db_ * 1e3:8.2f} {wf * 1e3:8.2f} / {wb * 1e3:8.2f}"
            f" {df / wf:5.2f} / {db_ / wb:5.2f}  {'Winograd' if picks else 'direct'}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
