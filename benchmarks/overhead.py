"""The framework's own time in a step: each row runs a model's step (or inference) as it
is, then with every compiled kernel and BLAS product replaced by a call that returns at
once, so what is left is cnnspec's Python and numpy around them (checks, plans, small
array passes, the model's loops). Small networks and small batches feel it most: it runs
on one thread while the kernels' workers wait.

    python benchmarks/overhead.py --threads 2
    python benchmarks/overhead.py --threads 1 --only lenet5

The stubs reach into cnnspec's internals (kernels/cpu/_common.py's builds, dense.py's
products): a measuring tool, not an API. Best of --rounds rounds of --steps steps each.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name, spec, batch, mode (train: model.step with momentum; eval: model.forward)
ROWS = [
    ("LeNet-5 b64 train", "lenet5.yaml", 64, "train"),
    ("LeNet-5 b1 eval", "lenet5.yaml", 1, "eval"),
    ("ResNet-20 b128 train", "resnet20-cifar.yaml", 128, "train"),
]


def _runner(model, x, y, mode):
    if mode == "train":
        return lambda: model.step(x, y, lr=0.01, momentum=0.9)
    return lambda: model.forward(x, train=False)


def _best_us(run, steps, rounds) -> float:
    for _ in range(max(3, steps // 10)):
        run()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        best = min(best, (time.perf_counter() - t0) / steps)
    return best * 1e6


def _stub_kernels():
    """Every kernel call returns at once from here on (this process only)."""
    from cnnspec.kernels.cpu import _common, dense

    def nothing(*args, **kwargs):
        return None

    _common.Builds.pick = lambda self, serial: nothing
    _common.Builds.now = lambda self, serial, args: nothing
    dense.matmul = nothing


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="Numba threads")
    parser.add_argument("--steps", type=int, default=500, help="steps per round (LeNet-5)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--only", default="", help="rows whose spec name contains this")
    args = parser.parse_args(argv)

    import numba

    import cnnspec
    from cnnspec import bench as cb
    from cnnspec.backend import get_backend
    from cnnspec.kernels.cpu._common import VECTOR_BITS

    get_backend("cpu").load_all()
    if args.threads:
        numba.set_num_threads(args.threads)
    rows = [r for r in ROWS if args.only in r[1]]
    runs = []
    for name, spec, batch, mode in rows:
        net = cnnspec.load(ROOT / "specs" / spec)
        model = net.compile(device="cpu", batch_size=batch, seed=0, training=mode == "train")
        x, y = cb.random_batch(model, 0)
        steps = max(5, args.steps * 64 // (batch * (40 if "resnet" in spec else 1)))
        runs.append((name, _runner(model, x, y, mode), steps))
    real = {name: _best_us(run, steps, args.rounds) for name, run, steps in runs}
    _stub_kernels()
    threads = numba.get_num_threads()
    print(f"{VECTOR_BITS}-bit kernels, {threads} thread(s), best of {args.rounds} rounds")
    print(f"{'row':22} {'step us':>10} {'kernels stubbed us':>19} {'share':>6}")
    out = []
    for name, run, steps in runs:
        own = _best_us(run, steps * 4, args.rounds)
        share = own / real[name]
        print(f"{name:22} {real[name]:10.1f} {own:19.1f} {share:6.1%}")
        out.append({"row": name, "step_us": real[name], "own_us": own, "threads": threads})
    return out


if __name__ == "__main__":
    main()
