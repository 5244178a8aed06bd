#!/usr/bin/env python
"""cnnspec against PyTorch on the CPU: training steps and inference, side by side.

    python benchmarks/vs_torch.py            # full run (~10 minutes): results/latest.{json,md}
    python benchmarks/vs_torch.py --quick    # a couple of minutes: results/quick.{json,md}
    python benchmarks/vs_torch.py --device cuda   # on a GPU: results/cuda.{json,md}

On a GPU (``--device cuda``) the rows are LeNet-5 b64, ResNet-20 b128 and VGG-small b64
training steps, and PyTorch runs twice: in strict fp32 (TF32 off for matmuls and cuDNN
convolutions, the arithmetic cnnspec does: the ratio) and with its defaults (cuDNN may use
TF32: a second column). Each timed iteration ends when the GPU is done with it.

Every measurement runs in worker subprocesses, one per framework, so each has its own peak
RSS (``resource.getrusage(...).ru_maxrss``) and neither pays for the other's imports. The
two workers of a row stay alive together but only one works at a time: the parent asks them
in turn for a round of timed iterations (cnnspec first in even rounds, torch first in odd
ones), so slow drifts of the machine hit both alike; throughput is the median over all
timed iterations. Both do the same work: a training step is forward, softmax cross-entropy,
backward and an SGD update with momentum 0.9 (lr 0.01, no weight decay); an inference row is
an eval-mode forward (cnnspec's ``model.forward(x, train=False)``, torch's ``model.eval()``
under ``torch.inference_mode()``, with the softmax both compute). Threads: numba, numpy's
OpenBLAS and torch's intra-op pool all get ``--threads`` (default 2).

Start-up: the wall time from spawning a fresh ``python`` to the end of its first training
step, for cnnspec with Numba's on-disk cache warm (as after any earlier run) and cold
(``NUMBA_CACHE_DIR`` pointing at a fresh temporary directory, so every kernel compiles), and
for torch as a reference. cnnspec's first step runs as `cnnspec train` runs it: kernels
that can compile in a background process do, while stand-ins or serial builds compute.

The machine may be shared: the runner waits (``--wait-quiet``) for other processes to go
quiet before it starts, and records per row how many cores *other* processes used while it
measured (from /proc/stat, less its own workers' CPU time). Numbers from a loaded machine are
unreliable, especially multi-threaded ones.

Instruction sets: ``CNNSPEC_VECTOR_BITS=256`` runs cnnspec's 256-bit micro-kernels, as on a
CPU without AVX-512. On a CPU that has it, ``--torch-isa auto`` (the default) then holds
PyTorch to AVX2 as well (``ATEN_CPU_CAPABILITY=avx2`` for its own kernels,
``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN's convolutions, ``MKL_ENABLE_INSTRUCTIONS=AVX2``),
and numpy's OpenBLAS, which runs cnnspec's dense layers, to its AVX2 kernels
(``OPENBLAS_CORETYPE=Haswell``), so the row compares what both would do on that CPU;
``--torch-isa native`` lets PyTorch use everything the CPU has. The report names both.

Against the machine's peak: the run measures the fp32 GEMM peak on its threads once (the
better of cnnspec's micro-kernel and numpy's matmul, as ``cnnspec bench`` does) and reports
each row's GFLOP/s for both frameworks and a ceiling: the ratio cnnspec / torch would be if
every multiply-add of cnnspec's ran at that peak and nothing else took time. A target above
the ceiling needs fewer multiply-adds (a fast algorithm), not faster kernels.

Graceful under load: a row with ``busy`` > 0 starts that many busy processes (``while True:
pass``) beside the workers for each round (killed after it; their CPU is not counted as other
load). A fair target is the 1-thread throughput beside one busy process: the cores left free.

The module can be imported (tests do): ``ROWS``, ``SPECS``, ``torch_model(spec_name)`` and
``param_count(module)`` have no side effects and import torch only when called.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PROTOCOL = "@@vs_torch "  # prefix of the workers' reply lines on stdout
LR, MOMENTUM = 0.01, 0.9

# spec name -> spec file (relative to the repository root)
SPECS = {
    "lenet5": "specs/lenet5.yaml",
    "resnet20-cifar": "specs/resnet20-cifar.yaml",
    "vgg-small": "benchmarks/vgg-small.yaml",
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    spec: str  # a key of SPECS
    batch: int
    mode: str  # train | eval
    busy: int = 0  # competing busy processes started beside the workers while they measure


GPU_ROWS = ["lenet5-b64", "resnet20-b128", "vgg-small-b64"]  # --device cuda's default rows
ROWS = [
    Row("lenet5-b64", "LeNet-5", "lenet5", 64, "train"),
    Row("lenet5-b256", "LeNet-5", "lenet5", 256, "train"),
    Row("resnet20-b128", "ResNet-20 (CIFAR)", "resnet20-cifar", 128, "train"),
    Row("vgg-small-b64", "VGG-small (32x32)", "vgg-small", 64, "train"),
    Row("lenet5-b256-eval", "LeNet-5", "lenet5", 256, "eval"),
    Row("resnet20-b128-eval", "ResNet-20 (CIFAR)", "resnet20-cifar", 128, "eval"),
    Row("lenet5-b64-busy1", "LeNet-5", "lenet5", 64, "train", busy=1),
]


# ---- the torch twins -------------------------------------------------------------------------
def _lenet5(nn):
    return nn.Sequential(
        nn.Conv2d(1, 6, 5),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 120, 5),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, 10),
    )


def _vgg_small(nn):
    def conv(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]

    return nn.Sequential(
        *conv(3, 64),
        *conv(64, 64),
        nn.MaxPool2d(2),
        *conv(64, 128),
        *conv(128, 128),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )


def _resnet20(nn):
    import torch.nn.functional as F

    class Basic(nn.Module):
        """3x3 conv-BN-ReLU-3x3 conv-BN + shortcut, ReLU; option A: x[:, :, ::2, ::2] with
        zero channels appended where the shape changes (cnnspec's maxpool k1 s2 + channel_pad)."""

        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.stride, self.extra = stride, cout - cin

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            short = x
            if self.stride != 1:
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.extra))
            return F.relu(out + short)

    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(Basic(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


_TWINS = {"lenet5": _lenet5, "resnet20-cifar": _resnet20, "vgg-small": _vgg_small}


def torch_model(spec_name: str):
    """The torch.nn equivalent of a spec in SPECS (fresh default initialisation)."""
    import torch.nn as nn

    return _TWINS[spec_name](nn)


def param_count(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---- helpers shared by the parent and the workers ----------------------------------------------
def _reply(obj) -> None:
    sys.stdout.write(PROTOCOL + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _held_to_avx2(choice: str) -> bool:
    from cnnspec.kernels.cpu import _common

    narrow = os.environ.get("CNNSPEC_VECTOR_BITS") == "256" and _common.cpu_has_avx512()
    return choice == "avx2" or (choice == "auto" and narrow)


def blas_isa_env(choice: str) -> dict:
    """The environment that holds numpy's OpenBLAS (cnnspec's dense layers, the peak's
    matmul) to its AVX2 kernels where PyTorch is held there (torch_isa_env), or {}."""
    return {"OPENBLAS_CORETYPE": "Haswell"} if _held_to_avx2(choice) else {}


def torch_isa_env(choice: str) -> dict:
    """The environment that holds PyTorch to AVX2 (see the module docstring), or {}."""
    if _held_to_avx2(choice):
        return {
            "ATEN_CPU_CAPABILITY": "avx2",
            "ONEDNN_MAX_CPU_ISA": "AVX2",
            "DNNL_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        }
    return {}


# glibc's malloc, left alone, hands large freed blocks back to the kernel in some processes
# and not in others (its thresholds move with the order of allocations): PyTorch, which
# allocates every step's activations anew, then takes ~1,600 page faults per LeNet-5 b64
# step in one run and none in the next, and its throughput moved 2-3x between runs of this
# script. Both workers keep freed memory (cnnspec allocates its buffers once: no effect).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def _thread_env(threads: int, env=None) -> dict:
    env = dict(os.environ if env is None else env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env.pop("NUMBA_NUM_THREADS", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(MALLOC_ENV)
    return env


# ---- workers ---------------------------------------------------------------------------------
class _CnnspecRunner:
    def __init__(self, spec_file, batch, mode, threads, device="cpu", first_run=False):
        t0 = time.perf_counter()
        import numba

        import cnnspec
        from cnnspec import bench as cb
        from cnnspec.backend import get_backend

        backend = get_backend(device)
        backend.load_all()
        self.sync = backend.synchronize

        numba.set_num_threads(threads)
        self.import_s = time.perf_counter() - t0
        self.rss_import_mb = _rss_now_mb()
        self.threads = {"numba": numba.get_num_threads(), "blas": cb.blas_threads()}
        from cnnspec.kernels.cpu._common import VECTOR_BITS

        self.isa = f"{VECTOR_BITS}-bit kernels"
        before = cb.kernel_state()
        t0 = time.perf_counter()
        net = cnnspec.load(ROOT / spec_file)
        self.macs_per_image = int(net.totals()["macs"])
        self.model = net.compile(device=device, batch_size=batch, seed=0, training=mode == "train")
        self.build_s = time.perf_counter() - t0
        self.x, self.y = cb.random_batch(self.model, 0)
        self.mode = mode
        t0 = time.perf_counter()
        if first_run:  # as `cnnspec train` takes it: kernels compiling in a child meanwhile
            with backend.compiling(lambda line: None):
                self.once()
        else:
            self.once()
        self.first_s = time.perf_counter() - t0
        self.cache = cb.cache_verdict(before, cb.kernel_state())

    def once(self):
        if self.mode == "train":
            self.model.step(self.x, self.y, lr=LR, momentum=MOMENTUM)
        else:
            self.model.forward(self.x, train=False)
        self.sync()


class _TorchRunner:
    def __init__(self, spec_name, batch, mode, threads, device="cpu", strict_fp32=True):
        t0 = time.perf_counter()
        import torch
        import torch.nn.functional as F

        torch.set_num_threads(threads)
        if device == "cuda" and strict_fp32:  # fp32 arithmetic, as cnnspec's kernels
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.import_s = time.perf_counter() - t0
        self.rss_import_mb = _rss_now_mb()
        self.threads = {"torch": torch.get_num_threads()}
        self.isa = torch.backends.cpu.get_cpu_capability()
        self.cache = None
        torch.manual_seed(0)
        t0 = time.perf_counter()
        self.model = torch_model(spec_name).to(device)
        shape = {"lenet5": (1, 32, 32)}.get(spec_name, (3, 32, 32))
        self.x = torch.randn(batch, *shape).to(device)
        self.y = torch.randint(0, 10, (batch,)).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.build_s = time.perf_counter() - t0
        self.torch, self.F, self.mode = torch, F, mode
        if mode == "eval":
            self.model.eval()
        t0 = time.perf_counter()
        self.once()
        self.first_s = time.perf_counter() - t0

    def once(self):
        if self.mode == "train":
            self.opt.zero_grad(set_to_none=True)
            loss = self.F.cross_entropy(self.model(self.x), self.y)
            loss.backward()
            self.opt.step()
        else:
            with self.torch.inference_mode():
                self.F.softmax(self.model(self.x), dim=1)
        self.sync()


def worker(args) -> None:
    """Set up one framework's model, then answer 'run K' / 'quit' lines on stdin; or
    (``peak``) measure the machine's fp32 GEMM peak on these threads and reply once."""
    if args.worker == "peak":
        import numba

        from cnnspec.bench.measure import gemm_peak

        numba.set_num_threads(args.threads)
        _reply(gemm_peak())
        return
    if args.worker == "cnnspec":
        runner = _CnnspecRunner(
            SPECS[args.spec], args.batch, args.mode, args.threads, args.device, args.startup
        )
    else:
        strict = args.worker == "torch"  # torch-default: PyTorch's own TF32 defaults
        runner = _TorchRunner(
            args.spec, args.batch, args.mode, args.threads, args.device, strict_fp32=strict
        )
    ready = {
        "import_s": runner.import_s,
        "build_s": runner.build_s,
        "first_s": runner.first_s,
        "rss_import_mb": runner.rss_import_mb,
        "threads": runner.threads,
        "isa": runner.isa,
        "cache": runner.cache,
        "macs_per_image": getattr(runner, "macs_per_image", None),
    }
    if args.startup:
        _reply(ready)
        return
    warm = []
    for _ in range(args.warmup):
        t = time.perf_counter()
        runner.once()
        warm.append(time.perf_counter() - t)
    ready["warmup_s"] = warm
    _reply(ready)
    clock = time.perf_counter
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            times = []
            for _ in range(int(cmd[1])):
                t = clock()
                runner.once()
                times.append(clock() - t)
            _reply({"times": times})
        elif cmd[0] == "quit":
            _reply({"peak_rss_mb": _peak_rss_mb()})
            return


# ---- parent: machine state ----------------------------------------------------------------------
def _pid_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Load:
    """Cores used by processes other than this one and the given pids, over an interval
    (cnnspec's LoadMeter, counting the workers as our own)."""

    def __init__(self, pids=()):
        from cnnspec.machine_load import LoadMeter

        pids = list(pids)

        def own():
            t = os.times()  # children_*: start-up subprocesses, once reaped
            own = t.user + t.system + t.children_user + t.children_system
            return own + sum(_pid_cpu_s(p) for p in pids)

        self.meter = LoadMeter(own)

    def cores(self) -> float:
        return self.meter.external_cores() or 0.0


def wait_for_quiet(
    max_wait: float, threshold: float = 0.2, window: float = 2.0, quiet: bool = False
) -> float:
    """Wait until other processes use at most `threshold` cores (at most `max_wait` s).
    Returns the last measured external load."""
    deadline = time.monotonic() + max_wait
    while True:
        meter = Load()
        time.sleep(window)
        cores = meter.cores()
        if cores <= threshold or time.monotonic() >= deadline:
            return cores
        if quiet:
            continue
        print(
            f"  machine busy: other processes use {cores:.2f} cores; waiting "
            f"(up to {deadline - time.monotonic():.0f} s more)",
            flush=True,
        )


def machine() -> dict:
    from cnnspec.bench import cpu_model

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "platform": platform.platform(),
        "gpu": _gpu_name(),
    }


def _gpu_name() -> str | None:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "numba", "numpy", "cnnspec"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            text=True,
            capture_output=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "cnnspec"],
            cwd=ROOT,
            text=True,
            capture_output=True,
        ).stdout.strip()
        out["git"] = commit + ("+uncommitted changes in cnnspec/" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        out["git"] = None
    return out


# ---- parent: driving workers --------------------------------------------------------------------
class Worker:
    def __init__(self, framework, row: Row, args, env=None, startup=False):
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--worker",
            framework,
            "--spec",
            row.spec,
            "--batch",
            str(row.batch),
            "--mode",
            row.mode,
            "--threads",
            str(args.threads),
            "--warmup",
            str(args.warmup),
            "--device",
            args.device,
        ]
        if startup:
            cmd.append("--startup")
        self.framework = framework
        self.err = tempfile.TemporaryFile(mode="w+")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.err,
            text=True,
            cwd=ROOT,
            env=_thread_env(args.threads, env)
            | (torch_isa_env if framework.startswith("torch") else blas_isa_env)(args.torch_isa),
        )

    def read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                self.err.seek(0)
                raise RuntimeError(
                    f"{self.framework} worker exited ({self.proc.returncode}):\n"
                    + self.err.read()[-3000:]
                )
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL) :])

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        reply = self.ask("quit")
        self.proc.wait(timeout=60)
        self.err.close()
        return reply


def _summary(times: list[float], rounds: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {
        "median_ms": med * 1e3,
        "images_per_s": batch / med,
        "iterations": len(times),
        "round_medians_ms": [r * 1e3 for r in rounds],
        "spread": (max(rounds) - min(rounds)) / med if len(rounds) > 1 else 0.0,
    }


def frameworks(args) -> tuple[str, ...]:
    """The workers of a row: on a GPU PyTorch runs in strict fp32 and with its defaults."""
    return ("cnnspec", "torch", "torch-default") if args.device == "cuda" else ("cnnspec", "torch")


@contextlib.contextmanager
def busy_processes(n: int):
    """n processes spinning on a core each, killed on leaving; yields their pids."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def run_row(row: Row, args) -> dict:
    """Alternating rounds, each started when the machine is quiet; a round during which
    other processes used more than --max-load cores is discarded and run again, as long as
    the row's time budget (--max-row-s) lasts."""
    beside = f", beside {row.busy} busy process(es)" if row.busy else ""
    print(f"{row.key}: {row.label}, batch {row.batch}, {row.mode}{beside} ...", flush=True)
    workers, ready = {}, {}
    try:
        for fw in frameworks(args):
            workers[fw] = Worker(fw, row, args)
            ready[fw] = workers[fw].read()
        return _measure_row(row, args, workers, ready)
    finally:
        for w in workers.values():
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()


def _measure_row(row: Row, args, workers: dict, ready: dict) -> dict:
    iters, per = {}, {}
    for fw, r in ready.items():
        per[fw] = statistics.median(r["warmup_s"]) if r["warmup_s"] else r["first_s"]
        iters[fw] = max(1, math.ceil(args.round_s / max(per[fw], 1e-6)))
    pids = [w.proc.pid for w in workers.values()]
    kept, discarded = [], []
    start = time.monotonic()
    deadline = start + args.max_row_s
    waited = 0.0
    while len(kept) < args.rounds and time.monotonic() < deadline:
        t = time.monotonic()
        wait_for_quiet(min(args.wait_quiet_row, deadline - t), args.max_load, 0.5, quiet=True)
        waited += time.monotonic() - t
        turn = len(kept) + len(discarded)  # who goes first rotates, round by round
        names = list(workers)
        order = names[turn % len(names) :] + names[: turn % len(names)]
        with busy_processes(row.busy) as busy:
            load = Load(pids + busy)
            got = {fw: workers[fw].ask(f"run {iters[fw]}")["times"] for fw in order}
            ext = load.cores()
        (kept if ext <= args.max_load else discarded).append((got, ext))
    note = ""
    if not kept:  # never quiet: report the loaded rounds, flagged
        kept, note = discarded, "no quiet round: all rounds were measured under load"
    times = {fw: [x for got, _ in kept for x in got[fw]] for fw in workers}
    rounds = {fw: [statistics.median(got[fw]) for got, _ in kept] for fw in workers}
    external = statistics.fmean(ext for _, ext in kept)
    out = {
        "row": asdict(row),
        "external_load_cores": external,
        "threads": args.threads,
        "rounds_kept": len(kept),
        "rounds_discarded": len(discarded) if not note else 0,
        "iterations_per_round": iters,
        "waited_for_quiet_s": waited,
        "elapsed_s": time.monotonic() - start,
        "note": note,
    }
    for fw, w in workers.items():
        closing = w.close()
        out[fw] = _summary(times[fw], rounds[fw], row.batch) | {
            "peak_rss_mb": closing["peak_rss_mb"],
            "rss_after_import_mb": ready[fw]["rss_import_mb"],
            "threads_seen": ready[fw]["threads"],
            "isa": ready[fw].get("isa"),
            "first_s": ready[fw]["first_s"],
            "cache": ready[fw]["cache"],
        }
    out["macs_per_image"] = ready["cnnspec"].get("macs_per_image")
    out["ratio"] = out["cnnspec"]["images_per_s"] / out["torch"]["images_per_s"]
    if "torch-default" in out:
        out["ratio_default"] = out["cnnspec"]["images_per_s"] / out["torch-default"]["images_per_s"]
    c, t = out["cnnspec"], out["torch"]
    print(
        f"  cnnspec {c['images_per_s']:,.0f} img/s ({c['median_ms']:.1f} ms), torch "
        f"{t['images_per_s']:,.0f} img/s ({t['median_ms']:.1f} ms): ratio {out['ratio']:.2f}; "
        f"peak RSS {c['peak_rss_mb']:.0f} / {t['peak_rss_mb']:.0f} MB; {len(kept)} rounds kept "
        f"(other load {external:.2f} cores), {out['rounds_discarded']} discarded, "
        f"{waited:.0f} s waiting" + (f"; {note}" if note else ""),
        flush=True,
    )
    return out


def measure_peak(args) -> dict | None:
    """The machine's fp32 GEMM peak on the run's threads (``cnnspec.bench.gemm_peak``: the
    better of cnnspec's micro-kernel and numpy's matmul), in a fresh process with the
    workers' thread settings; None if that process failed."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "peak"]
    cmd += ["--threads", str(args.threads)]
    env = _thread_env(args.threads) | blas_isa_env(args.torch_isa)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(PROTOCOL):
            return json.loads(line[len(PROTOCOL) :])
    print(f"  peak not measured: {done.stderr.strip()[-500:]}", flush=True)
    return None


def add_work(result: dict) -> None:
    """Each row's arithmetic against the machine's peak, as row["work"]: GFLOP a batch
    (2 per multiply-add of the forward pass; a training step 3 times that, as `cnnspec
    bench` counts it: forward, input and weight gradients), each framework's GFLOP/s and,
    but beside busy processes, the ceiling: the ratio cnnspec / torch were every
    multiply-add of cnnspec's at the peak and nothing else to do (a fast algorithm, as
    Winograd's, does fewer and can pass it)."""
    peak = (result.get("peak") or {}).get("gflops")
    for r in result["rows"]:
        macs, row = r.get("macs_per_image"), r["row"]
        if not macs:
            continue
        flops = 2.0 * macs * row["batch"] * (3 if row["mode"] == "train" else 1)
        work = {"gflop_per_batch": flops / 1e9, "peak_gflops": peak}
        for fw in ("cnnspec", "torch"):
            work[f"{fw}_gflops"] = flops / r[fw]["median_ms"] / 1e6
        if peak and not row.get("busy"):
            work["ceiling"] = r["torch"]["median_ms"] / (flops / peak / 1e6)
        r["work"] = work


def _work_label(row: dict) -> str:
    """A row's `work` cell: train step or inference, and its busy neighbours."""
    work = "train step" if row["mode"] == "train" else "inference"
    if row.get("busy"):
        work += f", with {row['busy']} competing busy process" + "es" * (row["busy"] > 1)
    return work


def _work_lines(rows: list[dict], result: dict) -> list[str]:
    """The table of add_work's figures (none where the rows have none)."""
    rows = [r for r in rows if r.get("work")]
    peak = result.get("peak") or {}
    if not rows or not peak.get("gflops"):
        return []
    threads = result["settings"]["threads"]
    lines = [
        "",
        f"Arithmetic against the machine's fp32 peak, {peak['gflops']:.0f} GFLOP/s on "
        f"{threads} thread{'s' * (threads != 1)} (the better of cnnspec's micro-kernel, "
        f"{peak['kernel_gflops']:.0f}, and numpy's {peak['n']}x{peak['n']} matmul, "
        f"{peak['blas_gflops']:.0f}). GFLOP a batch: 2 per multiply-add of the forward pass, "
        "3 times that for a training step (as `cnnspec bench` counts it). Ceiling: cnnspec / "
        "torch were every multiply-add of cnnspec's at that peak and nothing else to do; "
        "Winograd's convolutions, which do fewer, can pass it.",
        "",
        "| benchmark | batch | work | GFLOP a batch | cnnspec GFLOP/s (of peak) "
        "| torch GFLOP/s (of peak) | ceiling |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        row, w = r["row"], r["work"]
        work = _work_label(row)
        shares = [f"{w[f'{fw}_gflops']:.0f} ({w[f'{fw}_gflops'] / peak['gflops']:.0%})"
                  for fw in ("cnnspec", "torch")]  # fmt: skip
        ceiling = f"{w['ceiling']:.2f}" if w.get("ceiling") else "-"
        lines.append(
            f"| {row['label']} | {row['batch']} | {work} | {w['gflop_per_batch']:.2f} | "
            f"{shares[0]} | {shares[1]} | {ceiling} |"
        )
    return lines


def startup_once(framework: str, row: Row, args, env=None, attempts: int = 3) -> dict:
    """One start-up, run again (up to `attempts` times) while other processes load the
    machine; returns the least loaded attempt."""
    tries = []
    for _ in range(attempts):
        wait_for_quiet(args.wait_quiet_row, args.max_load, 0.5, quiet=True)
        if env and "NUMBA_CACHE_DIR" in env:  # a cold start needs an empty cache every time
            shutil.rmtree(env["NUMBA_CACHE_DIR"], ignore_errors=True)
        load = Load()
        w = Worker(framework, row, args, env=env, startup=True)
        reply = w.read()
        total = time.perf_counter() - w.t0
        w.proc.wait(timeout=60)
        w.err.close()
        tries.append(reply | {"total_s": total, "external_load_cores": load.cores()})
        if tries[-1]["external_load_cores"] <= args.max_load:
            break
    return min(tries, key=lambda r: r["external_load_cores"]) | {"attempts": len(tries)}


def run_startup(spec: str, args) -> dict:
    """Spawn-to-first-step times: cnnspec warm and cold Numba cache, torch."""
    row = Row(f"startup-{spec}", spec, spec, 64 if spec == "lenet5" else 128, "train")
    print(f"start-up {spec} ...", flush=True)
    startup_once("cnnspec", row, args, attempts=1)  # the on-disk cache gets these kernels
    out = {"spec": spec, "batch": row.batch}
    warm = [startup_once("cnnspec", row, args) for _ in range(args.startup_repeat)]
    out["cnnspec_warm"] = min(warm, key=lambda r: r["total_s"]) | {
        "all_total_s": [r["total_s"] for r in warm]
    }
    cache_dir = tempfile.mkdtemp(prefix="cnnspec-numba-cold-")
    try:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
        out["cnnspec_cold"] = startup_once("cnnspec", row, args, env=env)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    torch_runs = [startup_once("torch", row, args) for _ in range(args.startup_repeat)]
    out["torch"] = min(torch_runs, key=lambda r: r["total_s"]) | {
        "all_total_s": [r["total_s"] for r in torch_runs]
    }
    w, c, t = out["cnnspec_warm"], out["cnnspec_cold"], out["torch"]
    print(
        f"  cnnspec warm {w['total_s']:.2f} s ({w['cache']['numba_cache']}), cold "
        f"{c['total_s']:.2f} s ({c['cache']['numba_cache']}), torch {t['total_s']:.2f} s",
        flush=True,
    )
    return out


def check_twins() -> dict:
    """Assert every torch twin has exactly the spec's trainable parameter count."""
    import cnnspec

    counts = {}
    for name, path in SPECS.items():
        ours = cnnspec.load(ROOT / path).totals()["trainable_params"]
        theirs = param_count(torch_model(name))
        assert ours == theirs, f"{name}: cnnspec has {ours:,} parameters, torch twin {theirs:,}"
        counts[name] = ours
    return counts


# ---- report -----------------------------------------------------------------------------------
def _load_text(cores) -> str:
    return "?" if cores is None else f"{cores:.2f}"


def _gpu_lines(rows: list[dict], result: dict) -> list[str]:
    """The GPU table: PyTorch in strict fp32 (the ratio) and with its defaults."""
    lines = [
        "",
        f"GPU: {result['machine'].get('gpu') or '?'}. cnnspec computes in fp32; "
        "`torch fp32`: TF32 off for matmuls and cuDNN; `torch default`: PyTorch's own settings.",
        "",
        "| benchmark | batch | cnnspec img/s | torch fp32 img/s | cnnspec / torch fp32 "
        "| torch default img/s | cnnspec / torch default | cnnspec ms | torch fp32 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        row, c, t, d = r["row"], r["cnnspec"], r["torch"], r["torch-default"]
        lines.append(
            f"| {row['label']} | {row['batch']} | {c['images_per_s']:,.0f} | "
            f"{t['images_per_s']:,.0f} | **{r['ratio']:.2f}** | {d['images_per_s']:,.0f} | "
            f"{r['ratio_default']:.2f} | {c['median_ms']:.2f} | {t['median_ms']:.2f} |"
        )
    return lines


def _isa_text(rows: list[dict], settings: dict) -> str:
    """What each framework ran on, as its workers reported it."""
    seen = {fw: r[fw].get("isa") for r in rows for fw in ("cnnspec", "torch") if fw in r}
    text = f"cnnspec {seen.get('cnnspec') or '?'}, torch {seen.get('torch') or '?'}"
    if settings.get("torch_isa_env"):
        text += (
            f" (held there, as on a CPU without AVX-512: {_assignments(settings['torch_isa_env'])})"
        )
    if settings.get("blas_isa_env"):
        text += (
            "; numpy's OpenBLAS (cnnspec's dense layers, the peak's matmul) too: "
            + _assignments(settings["blas_isa_env"])
        )
    return text


def _assignments(env: dict) -> str:
    """Environment settings as the report names them: NAME=value, NAME=value."""
    return ", ".join(f"{k}={v}" for k, v in env.items())


def markdown(result: dict) -> str:
    m, v, s = result["machine"], result["versions"], result["settings"]
    rows = result["rows"]
    loaded = [r for r in rows if r.get("note") or r["external_load_cores"] > s["max_load"]]
    lines = [
        f"# cnnspec vs PyTorch ({s.get('device', 'cpu').upper()}) — {result['date']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}",
        f"- versions: torch {v['torch']}, numba {v['numba']}, numpy {v['numpy']}, "
        f"python {v['python']}, cnnspec {v['cnnspec']} (git {v['git']})",
        f"- settings: {s['mode']} run, {s['threads']} threads per framework; up to {s['rounds']} "
        f"alternating rounds of ~{s['round_s']} s per framework, {s['warmup']} warm-up "
        "iterations; throughput from the median over all kept iterations",
        f"- instruction sets: {_isa_text(rows, s)}",
        *(
            [
                "- malloc: both workers keep freed memory ("
                + _assignments(s["malloc_env"])
                + "): stock glibc made PyTorch's step times swing 2-3x between runs"
            ]
            if s.get("malloc_env")
            else []
        ),
        f"- machine load: load average {m['loadavg'][0]:.2f} at the start, "
        f"{m.get('loadavg_end', [float('nan')])[0]:.2f} at the end. Each round waits for a quiet "
        f"moment; a round during which other processes used more than {s['max_load']} cores is "
        "discarded and rerun while the row's time budget lasts. `other load`: mean cores used "
        "by other processes during the kept rounds; `rounds`: kept / discarded.",
        "",
        "> **Numbers measured while other processes use the CPU are unreliable**, multi-threaded "
        "ones especially: a thread that loses its core stalls every parallel region of the step. "
        + (
            f"{len(loaded)} of {len(rows)} rows below were measured under load (other load above "
            f"{s['max_load']} cores); rerun them on a quiet machine before drawing conclusions."
            if loaded
            else "Every row below was measured with the machine quiet."
        )
        + "",
        "",
        "| benchmark | batch | work | cnnspec img/s | torch img/s | cnnspec / torch "
        "| cnnspec ms | torch ms | cnnspec peak RSS | torch peak RSS | other load | rounds |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if s.get("device") == "cuda":  # its own table instead of the CPU one
        lines = lines[:-3] + _gpu_lines(rows, result)
        rows = []
    for r in rows:
        row, c, t = r["row"], r["cnnspec"], r["torch"]
        work = _work_label(row)
        flag = " ⚠" if r in loaded else ""
        lines.append(
            f"| {row['label']} | {row['batch']} | {work} | {c['images_per_s']:,.0f} | "
            f"{t['images_per_s']:,.0f} | **{r['ratio']:.2f}** | {c['median_ms']:.1f} | "
            f"{t['median_ms']:.1f} | {c['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB | "
            f"{r['external_load_cores']:.2f}{flag} | {r.get('rounds_kept', '?')} / "
            f"{r.get('rounds_discarded', '?')} |"
        )
    lines += _work_lines(rows, result)
    if result["startup"]:
        lines += [
            "",
            "Start-up: from spawning `python` to the end of the first training step (import, "
            "build the model, first step), best of the warm runs; in brackets the Numba cache "
            "verdict and the other processes' load during the run.",
            "",
            "| network | batch | cnnspec, warm cache | cnnspec, cold cache | torch | "
            "cnnspec warm: import / build / first step |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for st in result["startup"]:
            w, c, t = st["cnnspec_warm"], st["cnnspec_cold"], st["torch"]
            lines.append(
                f"| {st['spec']} | {st['batch']} | {w['total_s']:.2f} s "
                f"({w['cache']['numba_cache']}, load {_load_text(w.get('external_load_cores'))}) "
                f"| {c['total_s']:.2f} s ({c['cache']['numba_cache']}: "
                f"{c['cache']['kernels_compiled']} kernels compiled, load "
                f"{_load_text(c.get('external_load_cores'))}) | {t['total_s']:.2f} s (load "
                f"{_load_text(t.get('external_load_cores'))}) | {w['import_s']:.2f} / "
                f"{w['build_s']:.2f} / {w['first_s']:.2f} s |"
            )
    for f in result.get("failed", []):
        what = f["row"]["key"] if "row" in f else f"start-up {f['startup']}"
        last = f["error"].strip().splitlines()[-1] if f["error"].strip() else "?"
        lines += ["", f"**{what} failed**: `{last}` (full error in the JSON)"]
    first = rows[0] if rows else None
    lines += [
        "",
        "cnnspec / torch > 1 means cnnspec is faster. Peak RSS is each framework's own worker "
        "process (`ru_maxrss`): interpreter, imports, model, buffers and kernels"
        + (
            f"; right after imports alone it is {first['cnnspec']['rss_after_import_mb']:.0f} MB "
            f"for cnnspec and {first['torch']['rss_after_import_mb']:.0f} MB for torch."
            if first
            else "."
        ),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, shorter rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="where both frameworks run (cuda: the GPU rows, PyTorch in fp32 and by default)",
    )
    p.add_argument("--rounds", type=int, help="alternating rounds (default 7; quick 3)")
    p.add_argument(
        "--round-s", type=float, help="seconds per framework per round (default 1.0; quick 0.3)"
    )
    p.add_argument("--warmup", type=int, help="untimed iterations (default 3; quick 1)")
    p.add_argument(
        "--rows", help="comma-separated row keys (default: all): " + ", ".join(r.key for r in ROWS)
    )
    p.add_argument(
        "--torch-isa",
        choices=["auto", "native", "avx2"],
        default="auto",
        help="PyTorch's instruction set: avx2 holds it to AVX2; auto does so when "
        "CNNSPEC_VECTOR_BITS=256 on an AVX-512 CPU (both as on a CPU without AVX-512)",
    )
    p.add_argument("--no-startup", action="store_true", help="skip the start-up measurements")
    p.add_argument("--startup-repeat", type=int, help="warm start-ups to take the best of")
    p.add_argument(
        "--max-load",
        type=float,
        default=0.2,
        help="a round during which other processes used more cores than this is discarded "
        "and run again while the row's budget lasts (default 0.2)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        help="at the start, wait up to this many seconds for quiet (default 30; quick 5)",
    )
    p.add_argument(
        "--wait-quiet-row",
        type=float,
        help="before each round or start-up, wait up to this many seconds for quiet "
        "(default 10; quick 3)",
    )
    p.add_argument(
        "--max-row-s",
        type=float,
        help="time budget of a row's rounds, waits included, in seconds (default 60; quick 20)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        help="rows measured under load get a second try while the run is younger than "
        "this (default 7; quick 0: no second tries)",
    )
    p.add_argument(
        "--out", type=Path, help="output stem (default results/latest, quick: results/quick)"
    )
    # worker mode (internal)
    p.add_argument(
        "--worker", choices=["cnnspec", "torch", "torch-default", "peak"], help=argparse.SUPPRESS
    )
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--startup", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": (7, 3),
        "round_s": (1.0, 0.3),
        "warmup": (3, 1),
        "startup_repeat": (3, 1),
        "wait_quiet": (30.0, 5.0),
        "wait_quiet_row": (10.0, 3.0),
        "max_row_s": (60.0, 20.0),
        "max_minutes": (7.0, 0.0),
    }
    for k, (full, short) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, short if quick else full)
    if args.worker:
        worker(args)
        return 0

    rows = ROWS if args.device == "cpu" else [r for r in ROWS if r.key in GPU_ROWS]
    if args.rows:
        wanted = args.rows.split(",")
        unknown = set(wanted) - {r.key for r in ROWS}
        if unknown:
            p.error(f"unknown rows: {', '.join(sorted(unknown))}")
        rows = [r for r in ROWS if r.key in wanted]
    started = time.perf_counter()
    counts = check_twins()
    print(
        "torch twins match the specs' parameter counts: "
        + ", ".join(f"{k} {v:,}" for k, v in counts.items()),
        flush=True,
    )
    quiet = wait_for_quiet(args.wait_quiet, args.max_load)
    print(f"other processes use {quiet:.2f} cores; measuring", flush=True)
    peak = measure_peak(args) if args.device == "cpu" else None
    if peak:
        print(f"fp32 GEMM peak on {args.threads} threads: {peak['gflops']:.0f} GFLOP/s", flush=True)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": versions(),
        "quiet_check_cores": quiet,
        "settings": {
            "mode": "quick" if quick else "full",
            "threads": args.threads,
            "rounds": args.rounds,
            "round_s": args.round_s,
            "warmup": args.warmup,
            "max_load": args.max_load,
            "max_row_s": args.max_row_s,
            "lr": LR,
            "momentum": MOMENTUM,
            "device": args.device,
            "torch_isa": args.torch_isa,
            "torch_isa_env": torch_isa_env(args.torch_isa),
            "blas_isa_env": blas_isa_env(args.torch_isa),
            "malloc_env": MALLOC_ENV,
        },
        "param_counts": counts,
        "peak": peak,
        "rows": [],
        "failed": [],
        "startup": [],
    }
    for row in rows:
        try:
            result["rows"].append(run_row(row, args))
        except (RuntimeError, OSError) as exc:  # a worker died: report it, go on
            print(f"  failed: {exc}", flush=True)
            result["failed"].append({"row": asdict(row), "error": str(exc)[-2000:]})
    # rows that never got a quiet round: one more try each, while the time budget lasts
    for i, r in enumerate(result["rows"]):
        budget_left = args.max_minutes * 60 - (time.perf_counter() - started)
        if not r["note"] or budget_left < 2 * args.max_row_s:
            continue
        print(f"{r['row']['key']}: measured under load; trying again", flush=True)
        try:
            again = run_row(Row(**r["row"]), args)
        except (RuntimeError, OSError) as exc:
            print(f"  failed: {exc}", flush=True)
            continue
        if again["external_load_cores"] < r["external_load_cores"]:
            result["rows"][i] = again | {"retried": True}
    if not args.no_startup and args.device == "cpu":
        specs = ["lenet5"] if quick else ["lenet5", "resnet20-cifar"]
        for spec in specs:
            try:
                result["startup"].append(run_startup(spec, args))
            except (RuntimeError, OSError) as exc:
                print(f"  failed: {exc}", flush=True)
                result["failed"].append({"startup": spec, "error": str(exc)[-2000:]})
    add_work(result)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    result["elapsed_s"] = time.perf_counter() - started
    default = "cuda" if args.device == "cuda" else "quick" if quick else "latest"
    stem = args.out or RESULTS / default
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    stem.with_suffix(".md").write_text(text)
    print()
    print(text)
    print(
        f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')} "
        f"in {result['elapsed_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
