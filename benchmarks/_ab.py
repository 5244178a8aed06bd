"""What benchmarks/winograd_ab.py and benchmarks/unfold_ab.py share: one conv layer timed
forward (ReLU fused) and backward (dx, dW, db) each of two ways, in alternating rounds in
one process, and their command line."""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np


def best_times(ways, switch, batch, c, k, side, kernel, pad, rounds, dtype=np.float32):
    """{way: best (forward, backward) seconds} of a stride-1 conv, `switch(way)` setting
    each way before its calls (the caller restores what it changes). Round 0 compiles
    and warms up; each way's first calls after a switch are untimed too (plans made
    again)."""
    from cnnspec.kernels.cpu import conv

    geometry = ((1, 1), (pad,) * 4, (1, 1), 1)  # stride, padding, dilation, groups
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, c, side, side)).astype(dtype)
    w = (rng.standard_normal((k, c, kernel, kernel)) * np.sqrt(2 / (kernel**2 * c))).astype(dtype)
    b = np.zeros(k, dtype)
    o = side + 2 * pad - kernel + 1
    out = np.empty((batch, k, o, o), dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)

    def forward():
        conv.conv2d_forward(x, w, b, *geometry, out, ws, act=conv.ACT_RELU)

    def backward():
        conv.conv2d_backward(x, w, dout, *geometry, ws, dx, dw, db, out=out, act=conv.ACT_RELU)

    sizes = []
    for way in ways:
        switch(way)
        sizes.append(conv.conv2d_workspace(x.shape, w.shape, out.shape, *geometry[:3]))
    ws = np.empty(max(sizes), dtype)
    best = {}
    for round_ in range(rounds + 1):
        for way in ways:
            switch(way)
            forward()
            backward()
            t0 = time.perf_counter()
            forward()
            t1 = time.perf_counter()
            backward()
            t2 = time.perf_counter()
            if round_:
                f, g = best.get(way, (np.inf, np.inf))
                best[way] = (min(f, t1 - t0), min(g, t2 - t1))
    return best


def command_line(doc, argv):
    """The options both tools take; sets Numba's threads and says what runs."""
    from cnnspec.kernels.cpu._common import VECTOR_BITS

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="Numba threads")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per shape")
    parser.add_argument("--only", default="", help="shapes whose name contains this")
    parser.add_argument("--batch", type=int, default=None, help="every shape's batch")
    args = parser.parse_args(argv)
    if args.threads:
        numba.set_num_threads(args.threads)
    threads = numba.get_num_threads()
    print(f"{VECTOR_BITS}-bit kernels, {threads} thread(s), best of {args.rounds} rounds")
    return args
