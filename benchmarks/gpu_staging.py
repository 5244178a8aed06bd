"""On a GPU: train steps with every input batch handed over a step early (`Model.stage`,
as the trainer does: the batch's copy to the device runs on a second stream while the
step before computes) against batches given at their step, interleaved round by round
in one process. Both models start from the same seed and see the same batches, from a
host buffer refilled after every hand-over: their weights must end identical.

    python benchmarks/gpu_staging.py [--out FILE.json] [--rounds 5] [--steps 20]
                                     [--spec PATH --batch B]  # else LeNet-5 b64, ResNet-20 b128
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cnnspec  # noqa: E402
from cnnspec.train.loop import handed_early  # noqa: E402

RUNS = (("specs/lenet5.yaml", 64), ("specs/resnet20-cifar.yaml", 128))


def batches(pool_x, pool_y, steps):
    """`steps` batches from the pool through one reused buffer, as Batches yields them."""
    x, y = np.empty_like(pool_x[0]), np.empty_like(pool_y[0])
    for i in range(steps):
        np.copyto(x, pool_x[i % len(pool_x)])
        np.copyto(y, pool_y[i % len(pool_y)])
        yield x, y, len(y)


def timed(model, pool_x, pool_y, steps) -> float:
    """Milliseconds per SGD step over `steps` steps handed the trainer's way."""
    model.backend.synchronize()
    started = time.perf_counter()
    for x, y, _ in handed_early(model, batches(pool_x, pool_y, steps)):
        model.step(x, y, lr=0.01, momentum=0.9)
    model.backend.synchronize()
    return (time.perf_counter() - started) * 1e3 / steps


def measure(spec: str, batch: int, rounds: int, steps: int) -> dict:
    net = cnnspec.load(spec)
    staged, plain = (net.compile(device="cuda", batch_size=batch, seed=0) for _ in range(2))
    plain.stage = None  # handed_early gives it each batch at its step
    rng = np.random.default_rng(0)
    pool_x = rng.standard_normal((4, batch, *net.input_shape), dtype=np.float32)
    pool_y = rng.integers(0, staged.num_outputs, (4, batch))
    for model in (staged, plain):  # compile and warm up outside the timing
        timed(model, pool_x, pool_y, 2)
    found = {"staged_ms": [], "plain_ms": []}
    for _ in range(rounds):
        found["plain_ms"].append(timed(plain, pool_x, pool_y, steps))
        found["staged_ms"].append(timed(staged, pool_x, pool_y, steps))
    to_host = staged.backend.to_host
    same = all(
        np.array_equal(to_host(v), to_host(plain.params[k])) for k, v in staged.params.items()
    )
    best = {k: min(v) for k, v in found.items()}
    return {
        "spec": spec,
        "batch": batch,
        **found,
        "speedup": best["plain_ms"] / best["staged_ms"],
        "identical_weights": same,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--spec")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    runs = [(args.spec, args.batch)] if args.spec else RUNS
    results = [measure(spec, batch, args.rounds, args.steps) for spec, batch in runs]
    for r in results:
        print(
            f"{Path(r['spec']).stem} b{r['batch']}: {min(r['plain_ms']):.3f} ms/step given at "
            f"the step, {min(r['staged_ms']):.3f} staged a step early ({r['speedup']:.2f}x); "
            f"weights identical: {r['identical_weights']}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if all(r["identical_weights"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
