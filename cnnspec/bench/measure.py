"""Measuring a compiled network: its phases, its layers, the machine's GEMM peak and the
kernels' cold start (see the package docstring)."""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from ..machine_load import LoadMeter
from .probes import blas_threads, machine_info, threads_set, versions

RESULT_KEYS = (
    "name",
    "batch",
    "threads",
    "warmup",
    "repeat",
    "macs_per_image",
    "params",
    "eval_forward",
    "train_fwd_bwd",
    "step",
    "layers",
    "by_type",
    "layers_total_ms",
    "layers_coverage",
    "peak",
    "cold_start",
    "final_loss",
    "machine",
    "versions",
)
PHASE_KEYS = ("median_ms", "min_ms", "images_per_s", "gflops", "peak_share", "flops_per_batch")
LAYER_KEYS = (
    "name",
    "type",
    "macs",
    "forward_ms",
    "backward_ms",
    "total_ms",
    "share",
    "eval_ms",
    "forward_gflops",
    "backward_gflops",
    "ran",
    "fused_into",
    "winograd",
)
PHASES = (
    ("eval_forward", "eval forward", 1),
    ("train_fwd_bwd", "train fwd+bwd", 3),
    ("step", "SGD step", 3),
)


# ---- Numba kernels and their on-disk cache ----------------------------------------------------
def _dispatchers():
    from numba.core.dispatcher import Dispatcher

    seen = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("cnnspec") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            # a kernel's two builds (kernels/cpu/_common.py's Builds) are Dispatchers too
            for d in (obj, getattr(obj, "parallel", None), getattr(obj, "serial", None)):
                if isinstance(d, Dispatcher):
                    seen[id(d)] = d
    cuda = sys.modules.get("cnnspec.kernels.cuda._common")  # numba-cuda's are no Dispatcher
    for kernel in getattr(cuda, "KERNELS", ()):
        if hasattr(kernel, "stats"):  # not the simulator's stand-ins
            seen[id(kernel)] = kernel
    return list(seen.values())


def kernel_state() -> dict:
    """Compiled signatures and on-disk cache hits/misses of cnnspec's Numba kernels so far."""
    sigs = hits = misses = 0
    cache_path = None
    for d in _dispatchers():
        sigs += len(d.overloads)
        stats = d.stats
        hits += sum(stats.cache_hits.values())
        misses += sum(stats.cache_misses.values())
        cache_path = cache_path or stats.cache_path
    return {"signatures": sigs, "hits": hits, "misses": misses, "cache_path": cache_path}


def cache_verdict(before: dict, after: dict) -> dict:
    new = after["signatures"] - before["signatures"]
    hits = after["hits"] - before["hits"]
    misses = after["misses"] - before["misses"]
    if new == 0 and before["signatures"] == 0:
        # none compiled or loaded yet: a first run's steps on numpy stand-ins while a
        # child process compiles the builds (kernels/cpu/background.py)
        state = "stand-ins"
    elif new == 0:
        state = "in-process"  # kernels were compiled earlier in this process
    elif misses == 0 and hits > 0:
        state = "warm"
    elif hits == 0 and misses > 0:
        state = "cold"
    elif hits and misses:
        state = "partial"
    else:
        state = "unknown"
    return {
        "numba_cache": state,
        "kernels_loaded": hits,
        "kernels_compiled": misses,
        "new_signatures": new,
        "cache_path": after["cache_path"],
    }


# ---- inputs -----------------------------------------------------------------------------------
def random_batch(model, seed: int = 0):
    """A random input batch and matching targets (class labels, or regression targets)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((model.batch_size, *model.input_shape), dtype=np.float32)
    head = model.outputs[0] if model.outputs else model.head
    units = int(np.prod(head.layer.out_shape))
    if getattr(head.layer, "loss_name", "cross_entropy") == "mse":
        y = rng.standard_normal((model.batch_size, units)).astype(model.dtype)
    else:
        y = rng.integers(0, units, model.batch_size).astype(np.int64)
    return x, y


# ---- measurement ------------------------------------------------------------------------------
def _then(fn, after):
    def both():
        fn()
        after()

    return both


def _timed(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeat)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def gemm_peak(n: int = 2048, repeat: int = 5) -> dict:
    """The machine's practical fp32 GEMM ceiling: the better of a numpy float32 n x n
    matmul on the current BLAS thread count and cnnspec's own micro-kernel on every
    Numba thread (OpenBLAS may run narrower vectors than the CPU has)."""
    from ..kernels.cpu import conv

    kernel = conv.peak_gflops(repeat)  # first: OpenBLAS's threads spin a while after
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), np.float32)
    best = min(_timed(lambda: np.matmul(a, b, out=c), 1, repeat))
    blas = 2.0 * n**3 / best / 1e9
    return {
        "gflops": max(blas, kernel),
        "blas_gflops": blas,
        "kernel_gflops": kernel,
        "n": n,
        "best_ms": best * 1e3,
        "blas_threads": blas_threads(),
    }


def _winograd_runs() -> int:
    """Winograd convolutions run so far in this process (none before the CPU kernels load)."""
    module = sys.modules.get("cnnspec.kernels.cpu.winograd")
    return sum(module.RUNS.values()) if module is not None else 0


class _LayerClock:
    """Times every layer's forward, backward and loss calls while the model itself runs, by
    shadowing those methods on the layer objects (undone on exit). So the table follows
    whatever Model.loss_and_grads / forward do: layers the model skips (a ReLU fused into
    the conv before it) simply record nothing."""

    def __init__(self, model):
        self.model = model
        self.now: dict[str, dict[str, float]] = {}
        self.patched = []

    def _wrap(self, name, kind, fn):
        clock, now = time.perf_counter, self.now

        def timed(*args, **kwargs):
            runs, t = _winograd_runs(), clock()
            try:
                return fn(*args, **kwargs)
            finally:
                cell = now.setdefault(name, {})
                cell[kind] = cell.get(kind, 0.0) + clock() - t
                if _winograd_runs() != runs:
                    cell["winograd_" + kind] = True

        return timed

    def __enter__(self):
        for info in self.model.infos:
            layer = info.layer
            for method, kind in (("forward", "f"), ("loss", "f"), ("backward", "b")):
                fn = getattr(layer, method, None)
                if fn is not None and method not in vars(layer):
                    setattr(layer, method, self._wrap(info.name, kind, fn))
                    self.patched.append((layer, method))
        return self

    def __exit__(self, *exc):
        for layer, method in self.patched:
            vars(layer).pop(method, None)
        self.patched.clear()

    def run(self, fn, passes: int) -> tuple[list[dict], list[float]]:
        """Per pass: {layer: {'f': s, 'b': s}} and the pass's wall time."""
        per_pass, walls = [], []
        for _ in range(passes):
            self.now.clear()
            t = time.perf_counter()
            fn()
            walls.append(time.perf_counter() - t)
            per_pass.append({k: dict(v) for k, v in self.now.items()})
        return per_pass, walls


def layer_times(model, x, y, warmup: int = 1, repeat: int = 10, infer=None) -> dict:
    """Per-layer medians (ms) of train forward (loss included) and backward, and of the
    eval forward (on `infer`, a forward-only model of the same network, if given); plus
    the share of each pass no layer accounts for."""
    infer = infer or model
    with _LayerClock(model) as clock:
        clock.run(lambda: model.loss_and_grads(x, y), warmup)
        train, train_wall = clock.run(lambda: model.loss_and_grads(x, y), max(1, repeat))
    with _LayerClock(infer) as clock:
        clock.run(lambda: infer.forward(x, train=False), min(warmup, 1))
        evals, eval_wall = clock.run(lambda: infer.forward(x, train=False), max(1, repeat))

    def med(passes, name, kind):
        return statistics.median(p.get(name, {}).get(kind, 0.0) for p in passes) * 1e3

    fused = getattr(model, "fused", None) or {}
    passes = (("train forward", train, "f"), ("backward", train, "b"), ("eval", evals, "f"))
    rows = []
    for info in model.infos:
        name = info.name
        f, b, e = med(train, name, "f"), med(train, name, "b"), med(evals, name, "f")
        macs = int(info.layer.macs())
        # a product layer's backward repeats its MACs for the weight gradient, and again
        # for the input gradient when its input needs one
        computes_dx = any(t is not None for t in (getattr(model, "dx_targets", {}).get(name) or ()))
        bwd_flops = 2.0 * macs * model.batch_size * (2 if computes_dx else 1)
        rows.append(
            {
                "name": name,
                "type": info.node.type,
                "macs": macs,
                "forward_ms": f,
                "backward_ms": b,
                "total_ms": f + b,
                "share": 0.0,
                "eval_ms": e,
                "forward_gflops": 2.0 * macs * model.batch_size / (f * 1e6) if macs and f else 0.0,
                "backward_gflops": bwd_flops / (b * 1e6) if macs and b else 0.0,
                "ran": any(name in p for p in train),
                "fused_into": fused.get(name),
                # which of its passes ran Winograd (CPU convs the rule picks; the eval
                # forward may differ, where batch-norm hooks keep the train one direct)
                "winograd": [
                    label
                    for label, runs, kind in passes
                    if any(f"winograd_{kind}" in p.get(name, {}) for p in runs)
                ],
            }
        )
    total = sum(r["total_ms"] for r in rows)
    for r in rows:
        r["share"] = r["total_ms"] / total if total else 0.0
    layer_sums = [sum(v.get("f", 0.0) + v.get("b", 0.0) for v in p.values()) for p in train]
    return {
        "rows": rows,
        "train_pass_ms": statistics.median(train_wall) * 1e3,
        "eval_pass_ms": statistics.median(eval_wall) * 1e3,
        # median over passes of (time inside layers / pass time)
        "coverage": statistics.median(s / w for s, w in zip(layer_sums, train_wall, strict=True)),
    }


def by_type(rows: list[dict]) -> dict:
    """Per-layer times summed by layer type, largest share first."""
    out: dict[str, dict] = {}
    for r in rows:
        t = out.setdefault(
            r["type"],
            {"count": 0, "forward_ms": 0.0, "backward_ms": 0.0, "total_ms": 0.0, "share": 0.0},
        )
        t["count"] += 1
        for k in ("forward_ms", "backward_ms", "total_ms", "share"):
            t[k] += r[k]
        # GFLOP/s x ms = MFLOP: the type's GFLOP/s over its layers' time
        t["_fwd_mflop"] = t.get("_fwd_mflop", 0.0) + r.get("forward_gflops", 0.0) * r["forward_ms"]
        t["_bwd_mflop"] = (
            t.get("_bwd_mflop", 0.0) + r.get("backward_gflops", 0.0) * r["backward_ms"]
        )
    for t in out.values():
        fwd, bwd = t.pop("_fwd_mflop"), t.pop("_bwd_mflop")
        t["forward_gflops"] = fwd / t["forward_ms"] if t["forward_ms"] else 0.0
        t["backward_gflops"] = bwd / t["backward_ms"] if t["backward_ms"] else 0.0
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["total_ms"]))


def _phase(times: list[float], batch: int, flops: float, peak: float | None) -> dict:
    med = statistics.median(times)
    gflops = flops / med / 1e9
    return {
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "images_per_s": batch / med,
        "gflops": gflops,
        "peak_share": gflops / peak if peak else None,
        "flops_per_batch": flops,
    }


def bench(
    net,
    batch: int = 64,
    threads: int | None = None,
    warmup: int = 3,
    repeat: int = 20,
    *,
    seed: int = 0,
    lr: float = 0.01,
    momentum: float = 0.9,
    peak_n: int = 2048,
    peak_repeat: int = 5,
    layers: bool = True,
    device: str = "cpu",
) -> dict:
    """Measure `net` compiled for `batch` (see the module docstring); returns a JSON-ready dict.

    threads: Numba and BLAS threads for the run (None: as they are); restored afterwards.
    device: on a GPU each timed run ends when the device is done; the per-layer times
    and the CPU's GEMM peak are CPU measurements and are left out.
    """
    import numba

    from ..backend import get_backend

    backend = get_backend(device)
    backend.load_all()  # every kernel imported: their compile state is visible
    if device != "cpu":
        layers, peak_n = False, 0

    if batch < 1 or repeat < 1 or warmup < 0:
        raise ValueError("batch and repeat must be at least 1, warmup at least 0")
    machine = machine_info()
    with threads_set(threads):
        meter = LoadMeter()
        result = {
            "name": net.name,
            "device": device,
            "batch": batch,
            "threads": {
                "requested": threads,
                "numba": numba.get_num_threads(),
                "blas": blas_threads(),
            },
            "warmup": warmup,
            "repeat": repeat,
        }
        totals = net.totals()
        macs = int(totals["macs"])
        result["macs_per_image"] = macs
        result["params"] = int(totals["trainable_params"])

        # cold start first: compile, then the first step (kernels load or compile here)
        before = kernel_state()
        t0 = time.perf_counter()
        model = net.compile(device=device, batch_size=batch, seed=seed)
        t1 = time.perf_counter()
        x, y = random_batch(model, seed)
        t2 = time.perf_counter()
        model.step(x, y, lr=lr, momentum=momentum)
        backend.synchronize()
        t3 = time.perf_counter()
        cold = {"compile_s": t1 - t0, "first_step_s": t3 - t2, "total_s": (t1 - t0) + (t3 - t2)}
        cold.update(cache_verdict(before, kernel_state()))
        result["cold_start"] = cold

        fwd_flops = 2.0 * macs * batch
        # inference as users run it: a forward-only model (activations share memory)
        infer = net.compile(device=device, batch_size=batch, seed=seed, training=False)
        runs = {
            "eval_forward": lambda: infer.forward(x, train=False),
            "train_fwd_bwd": lambda: model.loss_and_grads(x, y),
            "step": lambda: model.step(x, y, lr=lr, momentum=momentum),
        }
        times = {
            key: _timed(_then(runs[key], backend.synchronize), warmup, repeat)
            for key, _, _ in PHASES
        }
        # the peak after the runs: OpenBLAS's threads keep spinning a while after a matmul
        peak = gemm_peak(peak_n, peak_repeat) if peak_n else None
        result["peak"] = peak
        peak_gflops = peak["gflops"] if peak else None
        for key, _, factor in PHASES:
            result[key] = _phase(times[key], batch, factor * fwd_flops, peak_gflops)

        loss = float(model.loss_and_grads(x, y)[0])
        result["final_loss"] = loss if np.isfinite(loss) else None
        timed = layer_times(model, x, y, min(warmup, 1), repeat, infer) if layers else None
        rows = timed["rows"] if timed else []
        result["layers"] = rows
        result["by_type"] = by_type(rows)
        result["layers_total_ms"] = sum(r["total_ms"] for r in rows)
        result["layers_coverage"] = timed["coverage"] if timed else None
        machine["external_load_cores"] = meter.external_cores()
    result["machine"] = machine
    result["versions"] = versions()
    return result
