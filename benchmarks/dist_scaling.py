"""Data-parallel scaling on one machine: the same global batch as 1 process x T threads and as
N processes x T/N threads (mpiexec, the path `cnnspec train` takes under MPI), and the time of
each step spent in the gradient allreduce.

    python benchmarks/dist_scaling.py                      # LeNet-5 and ResNet-20, 1x2 vs 2x1
    python benchmarks/dist_scaling.py --steps 50 --json results/dist_scaling.json

Each configuration runs in fresh processes (``--worker``): compile, warm up, then time
``--steps`` SGD steps on random data, split into compute (forward, loss, backward), allreduce
(``MPIWorld.reduce_step``: the in-place sum of the flat gradients plus the small buffer of
loss, counts and batch-norm statistics, including the wait for the slower rank) and the
update. ``allreduce alone`` times the gradient Allreduce after a barrier: the communication
cost without the wait. Wall-clock numbers: run it on a quiet machine (the ``other load``
column says how quiet it was).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = {  # name: (spec, global batch)
    "lenet5": ("specs/lenet5.yaml", 64),
    "resnet20": ("specs/resnet20-cifar.yaml", 64),
}


def _cpu_seconds_of_all_ranks(w) -> float:
    """CPU seconds this job has used so far, every rank's (a collective call under MPI)."""
    import numpy as np

    t = os.times()
    own = np.array([t.user + t.system])
    if w.size > 1:
        w.comm.Allreduce(w.MPI.IN_PLACE, own, op=w.MPI.SUM)
    return float(own[0])


def worker(spec: str, global_batch: int, steps: int, warmup: int) -> None:
    import numba
    import numpy as np

    from cnnspec.bench import random_batch
    from cnnspec.machine_load import LoadMeter
    from cnnspec.network import build
    from cnnspec.spec.load import load_file
    from cnnspec.train import SGD
    from cnnspec.train.dist import world

    w = world()
    batch = global_batch // w.size
    model = build(load_file(str(REPO / spec))).compile(batch_size=batch, seed=0)
    opt = SGD({k: model.params[k] for k in sorted(model.trainable)}, lr=0.01, momentum=0.9)
    x, y = random_batch(model, seed=w.rank)
    parts: dict[str, list[float]] = {"compute": [], "allreduce": [], "update": []}

    def step(record: bool) -> None:
        t0 = time.perf_counter()
        loss, grads = model.loss_and_grads(x, y)
        t1 = time.perf_counter()
        w.reduce_step(model, float(loss), 0, batch, False)
        t2 = time.perf_counter()
        opt.step(grads, lr=0.01)
        t3 = time.perf_counter()
        if record:
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[key].append(seconds * 1e3)

    for _ in range(warmup):
        step(False)
    alone: list[float] = []
    if w.size > 1:
        grads = model.flat_grads.copy()
        for _ in range(max(5, steps // 2)):
            w.comm.Barrier()
            t = time.perf_counter()
            w.comm.Allreduce(w.MPI.IN_PLACE, grads, op=w.MPI.SUM)
            alone.append((time.perf_counter() - t) * 1e3)
        w.comm.Barrier()
    meter = LoadMeter(own=lambda: _cpu_seconds_of_all_ranks(w))  # the job's ranks are "own"
    started = time.perf_counter()
    for _ in range(steps):
        step(True)
    wall = time.perf_counter() - started
    other_load = meter.external_cores() or 0.0
    if w.root:
        step_ms = wall / steps * 1e3
        print(
            json.dumps(
                {
                    "spec": spec,
                    "processes": w.size,
                    "threads": numba.get_num_threads(),
                    "batch_per_process": batch,
                    "gradient_floats": int(model.flat_grads.size),
                    "step_ms": step_ms,
                    "images_per_s": global_batch / step_ms * 1e3,
                    **{f"{k}_ms": statistics.median(v) for k, v in parts.items()},
                    "allreduce_alone_ms": statistics.median(alone) if alone else 0.0,
                    "other_load": other_load,
                    "final_loss_finite": bool(np.isfinite(model.loss_and_grads(x, y)[0])),
                }
            )
        )


def run_case(name: str, processes: int, threads: int, steps: int, warmup: int) -> dict:
    spec, global_batch = CASES[name]
    env = {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": str(threads)}
    args = [__file__, "--worker", spec, "--batch", str(global_batch)]
    args += ["--steps", str(steps), "--warmup", str(warmup)]
    if processes == 1:
        cmd = [sys.executable, *args]
    else:
        mpiexec = shutil.which(
            "mpiexec", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        )
        if mpiexec is None:
            sys.exit("mpiexec not found: pip install -e '.[dist]'")
        cmd = [mpiexec, "-n", str(processes), sys.executable, "-m", "mpi4py", *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} {processes}x{threads} failed:\n{done.stderr}")
    return {"case": name, **json.loads(done.stdout.strip().splitlines()[-1])}


def table(rows: list[dict]) -> str:
    lines = [
        "| network | processes x threads | batch | img/s | ms/step | compute | allreduce "
        "(wait incl.) | allreduce alone | update | other load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['processes']} x {r['threads']} | "
            f"{r['processes']} x {r['batch_per_process']} | {r['images_per_s']:,.0f} | "
            f"{r['step_ms']:.2f} | {r['compute_ms']:.2f} | {r['allreduce_ms']:.2f} | "
            f"{r['allreduce_alone_ms']:.3f} | {r['update_ms']:.2f} | {r['other_load']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: lenet5,resnet20")
    p.add_argument("--cores", type=int, default=2, help="threads of the 1-process run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, a.batch, a.steps, a.warmup)
        return
    rows = []
    for name in a.cases.split(","):
        for processes, threads in ((1, a.cores), (a.cores, 1)):
            rows.append(run_case(name, processes, threads, a.steps, a.warmup))
    print(table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
