"""Benchmark a compiled network: throughput, per-layer times, achieved GFLOP/s, cold start.

``bench(net)`` compiles ``net`` for one batch size and measures, on random data:

* the median images/s of an eval forward (``model.forward(x, train=False)`` on a model
  compiled with ``training=False``, as inference runs), of a train
  forward + loss + backward (``model.loss_and_grads``) and of a full SGD step with momentum
  (``model.step``);
* a per-layer table in the manner of ``caffe time``: the median forward (train mode; an
  output layer's loss is counted in its forward) and backward milliseconds of every layer,
  each layer's share of their sum, and its eval-mode forward. The layers are timed while
  the model runs its own ``loss_and_grads`` / ``forward`` (their methods are wrapped for the
  measurement), so the table follows the model's execution plan: a layer the model fuses
  into another (a ReLU run in a convolution's epilogue) shows as not run;
* achieved GFLOP/s: 2 * MACs * batch per forward, three times that for a train pass or step,
  and its share of the machine's fp32 GEMM peak, measured in the same run as the better of
  cnnspec's micro-kernel on every thread and a numpy float32 ``n x n`` matmul on the same
  thread count (best of a few each);
* cold start: the time to compile the model and run its first step, and whether Numba's
  on-disk cache was warm (kernels loaded), cold (kernels compiled) or not involved at all
  (kernels already in this process: then the number is not a cold start).

Every number is wall-clock time on a machine that may be shared: ``result["machine"]``
records the load average before the run and the CPU that *other* processes used during it
(``external_load_cores``); a busy machine makes every number here unreliable.

The result is a JSON-serialisable dict (keys listed in ``RESULT_KEYS``, ``PHASE_KEYS``,
``LAYER_KEYS``); ``render_bench(result, console)`` prints it with rich.
"""

from __future__ import annotations

import ctypes
import os
import platform
import statistics
import sys
import time
from contextlib import contextmanager

import numpy as np

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
    "ran",
    "fused_into",
)
PHASES = (
    ("eval_forward", "eval forward", 1),
    ("train_fwd_bwd", "train fwd+bwd", 3),
    ("step", "SGD step", 3),
)


# ---- BLAS threads (no threadpoolctl: the OpenBLAS numpy loaded, through ctypes) ------------
_BLAS: list | None = None


def _openblas():
    """(get, set) functions of the OpenBLAS this process loaded, or None."""
    global _BLAS
    if _BLAS is None:
        _BLAS = [None]
        try:
            with open("/proc/self/maps") as f:
                paths = sorted(
                    {line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line}
                )
        except OSError:
            paths = []
        for path in paths:
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for prefix in ("scipy_", ""):
                for suffix in ("64_", ""):
                    get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                    put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                    if get is not None and put is not None:
                        get.restype = ctypes.c_int
                        put.argtypes = [ctypes.c_int]
                        _BLAS = [(get, put)]
                        return _BLAS[0]
    return _BLAS[0]


def blas_threads() -> int | None:
    """Threads numpy's OpenBLAS uses, or None when that cannot be told."""
    fns = _openblas()
    return int(fns[0]()) if fns else None


def set_blas_threads(n: int) -> bool:
    """Set numpy's OpenBLAS thread count; False when it cannot be set from here."""
    fns = _openblas()
    if not fns:
        return False
    fns[1](int(n))
    return True


@contextmanager
def threads_set(threads: int | None):
    """Numba and BLAS threads set to ``threads`` (None: leave them), restored afterwards."""
    import numba

    before = (numba.get_num_threads(), blas_threads())
    if threads is not None:
        numba.set_num_threads(threads)
        set_blas_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            numba.set_num_threads(before[0])
            if before[1] is not None:
                set_blas_threads(before[1])


# ---- machine ------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class LoadMeter:
    """The CPU other processes use while we measure: machine busy time minus ours."""

    def __init__(self, own=_own_seconds):
        self.own = own
        self.start()

    def start(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), self.own()

    def external_cores(self) -> float | None:
        busy = _busy_seconds()
        wall = time.perf_counter() - self.t0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        return max(0.0, (busy - self.busy0 - (self.own() - self.own0)) / wall)


def machine_info() -> dict:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "loadavg_before": load,
        "platform": platform.platform(),
    }


def versions() -> dict:
    import numba

    out = {"python": platform.python_version(), "numpy": np.__version__, "numba": numba.__version__}
    try:
        from . import __version__

        out["cnnspec"] = __version__
    except ImportError:  # pragma: no cover
        pass
    return out


# ---- Numba kernels and their on-disk cache ----------------------------------------------------
def _dispatchers():
    from numba.core.dispatcher import Dispatcher

    seen = {}
    for name, mod in list(sys.modules.items()):
        if not name.startswith("cnnspec") or mod is None:
            continue
        for obj in list(vars(mod).values()):
            if isinstance(obj, Dispatcher):
                seen[id(obj)] = obj
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
    if new == 0:
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
    from .kernels.cpu import conv

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
            t = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                cell = now.setdefault(name, {})
                cell[kind] = cell.get(kind, 0.0) + clock() - t

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
    rows = []
    for info in model.infos:
        name = info.name
        f, b, e = med(train, name, "f"), med(train, name, "b"), med(evals, name, "f")
        macs = int(info.layer.macs())
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
                "ran": any(name in p for p in train),
                "fused_into": fused.get(name),
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
) -> dict:
    """Measure `net` compiled for `batch` (see the module docstring); returns a JSON-ready dict.

    threads: Numba and BLAS threads for the run (None: as they are); restored afterwards.
    """
    import numba

    from .backend import get_backend

    get_backend("cpu").load_all()  # every kernel imported: their compile state is visible

    if batch < 1 or repeat < 1 or warmup < 0:
        raise ValueError("batch and repeat must be at least 1, warmup at least 0")
    machine = machine_info()
    with threads_set(threads):
        meter = LoadMeter()
        result = {
            "name": net.name,
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
        model = net.compile(batch_size=batch, seed=seed)
        t1 = time.perf_counter()
        x, y = random_batch(model, seed)
        t2 = time.perf_counter()
        model.step(x, y, lr=lr, momentum=momentum)
        t3 = time.perf_counter()
        cold = {"compile_s": t1 - t0, "first_step_s": t3 - t2, "total_s": (t1 - t0) + (t3 - t2)}
        cold.update(cache_verdict(before, kernel_state()))
        result["cold_start"] = cold

        fwd_flops = 2.0 * macs * batch
        # inference as users run it: a forward-only model (activations share memory)
        infer = net.compile(batch_size=batch, seed=seed, training=False)
        runs = {
            "eval_forward": lambda: infer.forward(x, train=False),
            "train_fwd_bwd": lambda: model.loss_and_grads(x, y),
            "step": lambda: model.step(x, y, lr=lr, momentum=momentum),
        }
        times = {key: _timed(runs[key], warmup, repeat) for key, _, _ in PHASES}
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


# ---- rendering --------------------------------------------------------------------------------
def busy_warning(machine: dict) -> str | None:
    """A warning when other processes used a noticeable share of the CPU, else None."""
    cores = machine.get("cores") or 1
    ext = machine.get("external_load_cores")
    load = (machine.get("loadavg_before") or [0.0])[0]
    if (ext is not None and ext > 0.2) or load > 0.5 * cores:
        ext_text = f"{ext:.2f} cores" if ext is not None else "unknown"
        return (
            f"the machine was busy (load average {load:.2f} before the run, other processes "
            f"used {ext_text} of {cores} during it): these numbers are unreliable"
        )
    return None


def _fmt_ms(v: float) -> str:
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def render_bench(result: dict, console, top: int = 5) -> None:
    from rich.table import Table

    from .report import human

    th = result["threads"]
    blas = th["blas"] if th["blas"] is not None else "?"
    console.print(
        f"[bold]{result['name']}[/]  batch {result['batch']}, threads: numba "
        f"{th['numba']}, BLAS {blas}; median of {result['repeat']} runs after "
        f"{result['warmup']} warm-up; {human(result['macs_per_image'])} MACs/image, "
        f"{result['params']:,} params"
    )
    table = Table(title_justify="left", pad_edge=False)
    for col in ("phase", "ms/batch", "min ms", "images/s", "GFLOP/s", "of peak"):
        table.add_column(col, justify="left" if col == "phase" else "right", no_wrap=True)
    for key, label, _ in PHASES:
        p = result[key]
        share = f"{p['peak_share']:.1%}" if p["peak_share"] is not None else "-"
        table.add_row(
            label,
            _fmt_ms(p["median_ms"]),
            _fmt_ms(p["min_ms"]),
            f"{p['images_per_s']:,.0f}",
            f"{p['gflops']:.1f}",
            share,
        )
    console.print(table)
    rows = result["layers"]
    if rows:
        lt = Table(
            title="per layer (medians; fwd and bwd in train mode, the loss in its "
            "output layer's fwd)",
            title_justify="left",
            pad_edge=False,
        )
        for col in (
            "layer",
            "type",
            "fwd ms",
            "bwd ms",
            "total ms",
            "share",
            "eval ms",
            "fwd GFLOP/s",
        ):
            lt.add_column(
                col, justify="left" if col in ("layer", "type") else "right", no_wrap=True
            )
        for r in rows:
            if not r["ran"]:
                what = f"fused into {r['fused_into']}" if r["fused_into"] else "not run"
                lt.add_row(r["name"], r["type"], f"[dim]{what}[/]", "", "", "", "", "")
                continue
            bar = "#" * round(r["share"] * 20)
            lt.add_row(
                r["name"],
                r["type"],
                _fmt_ms(r["forward_ms"]),
                _fmt_ms(r["backward_ms"]),
                _fmt_ms(r["total_ms"]),
                f"{r['share']:6.1%} [cyan]{bar:<20}[/]",
                _fmt_ms(r["eval_ms"]),
                f"{r['forward_gflops']:.1f}" if r["macs"] else "-",
            )
        lt.add_row(
            "[bold]total[/]",
            "",
            _fmt_ms(sum(r["forward_ms"] for r in rows)),
            _fmt_ms(sum(r["backward_ms"] for r in rows)),
            _fmt_ms(result["layers_total_ms"]),
            "",
            _fmt_ms(sum(r["eval_ms"] for r in rows)),
            "",
        )
        console.print(lt)
        ranked = sorted(rows, key=lambda r: -r["total_ms"])[:top]
        console.print(
            "top layers: "
            + ", ".join(f"{r['name']} {r['share']:.0%}" for r in ranked)
            + f"  [dim](layers account for {result['layers_coverage']:.0%} of a "
            "train pass; the rest is the model's own bookkeeping)[/]"
        )
        console.print(
            "by type: "
            + ", ".join(
                f"{k} {v['share']:.0%} (fwd {v['forward_ms']:.1f} + bwd {v['backward_ms']:.1f} ms)"
                for k, v in result["by_type"].items()
                if v["share"] >= 0.005
            )
        )
    peak = result["peak"]
    if peak:
        console.print(
            f"GEMM peak: {peak['gflops']:.1f} GFLOP/s, the better of cnnspec's "
            f"micro-kernel ({peak['kernel_gflops']:.1f}) and a numpy float32 {peak['n']}x"
            f"{peak['n']} matmul ({peak['blas_gflops']:.1f}, {peak['blas_threads'] or '?'} "
            "BLAS threads); best of a few each"
        )
    c = result["cold_start"]
    cache = {
        "warm": f"Numba cache warm: {c['kernels_loaded']} kernels loaded from disk",
        "cold": f"Numba cache cold: {c['kernels_compiled']} kernels compiled",
        "partial": f"Numba cache partly warm: {c['kernels_loaded']} kernels loaded, "
        f"{c['kernels_compiled']} compiled",
        "in-process": "kernels were already compiled in this process: not a cold start",
    }.get(c["numba_cache"], "Numba cache state unknown")
    console.print(
        f"cold start: compile {c['compile_s'] * 1e3:.0f} ms + first step "
        f"{c['first_step_s']:.2f} s = {c['total_s']:.2f} s ({cache})"
    )
    warning = busy_warning(result["machine"])
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
