"""On a GPU: can numba-cuda capture cnnspec's kernels into a CUDA graph here, and what
would replaying a step's launches save? (Training steps are not captured yet: README,
"On a GPU", says what capturing one needs.)

numba-cuda since NVIDIA/numba-cuda#836 (0.30.4 has it) takes a cuda.core GraphBuilder
where a launch takes a stream: `kernel[grid, block, builder](...)` records the launch instead
of running it. This captures N launches of a small cnnspec kernel (memory._fill, one
block), replays the graph and checks that the last launch's value landed, then times N
launches issued one by one against one replay of the graph of N (launch overhead: a
ResNet-20 step is a few hundred launches).

    python benchmarks/gpu_graph_probe.py [--launches 300] [--replays 20] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=300)
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from cuda.core import Device
    from numba import cuda

    from cnnspec.kernels.cuda._common import THREADS
    from cnnspec.kernels.cuda.memory import _fill

    n, found = args.launches, {"launches": args.launches}
    a = cuda.device_array(THREADS, np.float32)
    _fill[1, THREADS](a, 0.0)  # compiled here, before any timing
    cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.replays):
        for i in range(n):
            _fill[1, THREADS](a, float(i))
    cuda.synchronize()
    found["eager_us_per_launch"] = (time.perf_counter() - started) * 1e6 / (args.replays * n)

    device = Device()
    device.set_current()  # numba's context is the primary one, as cuda.core's
    stream = device.create_stream()
    builder = device.create_graph_builder()
    builder.begin_building()
    try:
        for i in range(n):
            _fill[1, THREADS, builder](a, float(i + 1))
    except TypeError as e:  # a numba-cuda without GraphBuilder launches
        found["captured"] = f"no: {e}"
        return report(found, args.out, ok=False)
    graph = builder.end_building().complete()
    _fill[1, THREADS](a, -1.0)
    cuda.synchronize()
    graph.launch(stream)
    stream.sync()
    found["captured"] = "yes" if (a.copy_to_host() == n).all() else "replay gave wrong values"
    started = time.perf_counter()
    for _ in range(args.replays):
        graph.launch(stream)
    stream.sync()
    found["graph_us_per_launch"] = (time.perf_counter() - started) * 1e6 / (args.replays * n)
    return report(found, args.out, ok=found["captured"] == "yes")


def report(found: dict, out: Path | None, ok: bool) -> int:
    print(json.dumps(found))
    if out:
        out.write_text(json.dumps(found, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
