"""Runs in a subprocess of tests/test_cuda.py with NUMBA_ENABLE_CUDASIM=1 (Numba's CUDA
simulator must be chosen before Numba is imported), or with --gpu on a real GPU
(benchmarks/gpu_check.sh): every conformance case of
`layer_cases.py` on the CUDA backend against the CPU backend (forward, loss, every
input and parameter gradient, running statistics, eval mode), a few SGD steps of small
networks on both backends, and the signature of every kernel launch (for the PTX test,
which runs outside the simulator). Writes its findings as JSON and a pickle.

    python tests/cuda_sim.py OUT_DIR [--gpu] [--only TYPE ...] [--spec PATH --batch B --steps S]
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import traceback
from pathlib import Path

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
assert SIMULATED or "--gpu" in sys.argv, "run with NUMBA_ENABLE_CUDASIM=1, or --gpu on a GPU"

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import cuda  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from layer_cases import ENTRIES, Case, random_params, random_target  # noqa: E402

from cnnspec.backend import get_backend  # noqa: E402
from cnnspec.layers import REGISTRY  # noqa: E402

BATCH = 2
CPU, CUDA = get_backend("cpu"), get_backend("cuda")
# The simulator runs a block's threads as Python threads while the launching thread
# polls them: with the default 5 ms switch interval every hand-over of the GIL waits
# out the poller's slice (4x the CPU time of the whole run, measured).
sys.setswitchinterval(5e-5)

# ---- the signature of every launch, for compile_ptx outside the simulator ----------
LAUNCHED: dict[tuple, set] = {}


def _key(fn) -> tuple:
    """(module, qualname): names a kernel the same way inside and outside the simulator
    (a kernel factory's tiles differ between the two; the argument types do not)."""
    return fn.__module__, fn.__qualname__


def _unwrap(a):
    return getattr(a, "_ary", a)


if SIMULATED:
    from numba.cuda.simulator import kernel as sim_kernel

    _launch = sim_kernel.FakeCUDAKernel.__call__

    def _recording_call(self, *args):
        if not self._device and not sim_kernel._kernel_context:  # a launch from the host
            sig = tuple(numba.typeof(_unwrap(a)) for a in args)
            LAUNCHED.setdefault(_key(self.fn), set()).add(sig)
        return _launch(self, *args)

    sim_kernel.FakeCUDAKernel.__call__ = _recording_call

    # The simulator hands every thread of a launch the same shared array per source line
    # of `cuda.shared.array`, created by the first thread that asks: a look-up, then an
    # np.empty, then a store, unlocked (numba-cuda 0.30). A GIL hand-over between them
    # lets a second thread create an array of its own, which the rest of the block never
    # sees: its tile share is lost and it reads np.empty garbage (the intermittent
    # 1e11-sized 'out' of dense-square, conv2d-1, batchnorm2d-1 in loaded full runs). Made
    # atomic here, and filled with NaN as a real GPU's shared memory holds no zeros: a
    # kernel reading a slot no thread wrote fails its comparison every time.
    import threading

    from numba.core import types as nb_types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support

    _shared_static = kernelapi.FakeCUDAShared.array
    _shared_lock = threading.Lock()

    def _shared_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory, or refused
            return _shared_static(self, shape, dtype, alignment)
        caller = sys._getframe(1)  # the simulator's key: the kernel's file and line
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _shared_lock:
            found = self._allocations.get(key)
            if found is None:
                if isinstance(dtype, nb_types.Type):
                    dtype = numpy_support.as_dtype(dtype)
                found = np.empty(shape, dtype)
                if found.dtype.kind in "fc":
                    found.fill(np.nan)
                self._allocations[key] = found
        return found

    kernelapi.FakeCUDAShared.array = _shared_array

    # The simulator's device arrays are numpy arrays underneath and would accept numpy
    # calls (`a.fill(0)`, `a *= m`, `-a`) that a real device array refuses: allow only
    # what numba-cuda's DeviceNDArray offers, so host code that only works in the
    # simulator fails here too.
    # (the simulator replaces numba.cuda's modules: DeviceNDArray's API is listed here)
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    DEVICE_API = {"T", "as_cuda_arg", "bind", "copy_to_device", "copy_to_host", "flags"}
    DEVICE_API |= {"getitem", "is_c_contiguous", "is_f_contiguous", "nbytes", "ravel"}
    DEVICE_API |= {"reshape", "setitem", "split", "squeeze", "transpose", "view"}
    DEVICE_API |= {"size", "ndim", "dtype", "shape", "strides", "itemsize", "stream"}
    _forward = FakeCUDAArray.__getattr__

    def _device_attribute(self, name):
        if name.startswith("_") or name in DEVICE_API:
            return _forward(self, name)
        raise AttributeError(f"a device array has no '{name}' (a numpy-only call)")

    def _no_host_arithmetic(self, *args):
        raise TypeError("arithmetic on a device array runs on the host only in the simulator")

    FakeCUDAArray.__getattr__ = _device_attribute
    for op in ("add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "lt", "le", "gt", "ge"):
        setattr(FakeCUDAArray, f"__{op}__", _no_host_arithmetic)


# ---- one layer on both backends ---------------------------------------------------
def _layer(type_name, case, backend):
    layer = REGISTRY[type_name](type_name, dict(case.attrs), list(case.inputs))
    layer.bind(backend)
    layer.fused_act = case.fused_act
    layer.allocate(BATCH, np.float32)
    layer.workspace = backend.zeros(max(layer.workspace_size(BATCH), 1), np.float32)
    return layer


def _dev(backend, host):
    a = backend.zeros(host.shape, host.dtype)
    backend.to_device(host, a)
    return a


def _run(type_name, case, backend, seed=0):
    """The layer's outputs and gradients as host arrays, from the same random data."""
    layer = _layer(type_name, case, backend)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal((BATCH, *s)).astype(np.float32) for s in case.inputs]
    p = random_params(layer, rng, np.float32)
    trainable = [d.name for d in layer.param_defs() if d.trainable]
    target = None
    if layer.role == "output":
        target = random_target(type_name, layer, BATCH, rng, np.float32)
    dout = rng.standard_normal((BATCH, *layer.out_shape)).astype(np.float32)

    dxs_ = [_dev(backend, np.full_like(x, np.nan)) for x in xs]  # kernels must overwrite
    xs_ = [_dev(backend, x) for x in xs]
    p_ = {k: _dev(backend, v) for k, v in p.items()}
    g_ = {k: _dev(backend, np.full(p[k].shape, np.nan, np.float32)) for k in trainable}
    out_ = backend.zeros((BATCH, *layer.out_shape), np.float32)
    result = {}
    layer.forward(xs_, out_, p_, True, np.random.default_rng(7))
    if layer.role == "output":
        result["loss"] = np.array(layer.loss(xs_, out_, target))
    result["out"] = backend.to_host(out_)
    layer.backward(xs_, out_, _dev(backend, dout), dxs_, p_, g_)
    for i, dx in enumerate(dxs_):
        result[f"dx{i}"] = backend.to_host(dx)
    for k in trainable:
        result[f"d{k}"] = backend.to_host(g_[k])
    for k in p_:
        if k not in trainable:  # running statistics, updated by the training forward
            result[k] = backend.to_host(p_[k])
    eval_out = backend.zeros((BATCH, *layer.out_shape), np.float32)
    layer.forward(xs_, eval_out, p_, False, np.random.default_rng(7))
    result["eval_out"] = backend.to_host(eval_out)
    return result


def compare(a: dict, b: dict) -> dict:
    """Per array: the largest difference relative to the array's scale."""
    errors = {}
    for k in a:
        x, y = a[k].astype(np.float64), b[k].astype(np.float64)
        if x.shape != y.shape:
            errors[k] = float("inf")
            continue
        scale = max(1.0, float(np.abs(x).max(initial=0.0)))
        diff = np.abs(x - y)
        errors[k] = float("inf") if not np.isfinite(y).all() else float(diff.max() / scale)
    return errors


# Shapes the conformance cases are too small to reach: conv2d's square tile (more than
# 16 output or input maps), dw's reduction split into slices, dense's large tile.
EXTRAS = {
    "conv2d-square": ("conv2d", Case({"filters": 17, "kernel": 3, "padding": 1}, ((2, 3, 3),), 1)),
    "conv2d-wide-input": ("conv2d", Case({"filters": 2, "kernel": 1}, ((17, 2, 2),))),
    "conv2d-slices": ("conv2d", Case({"filters": 2, "kernel": 2}, ((1, 9, 9),))),
    "dense-square": ("dense", Case({"units": 17}, ((5,),))),
}


def _attempt(results, name, fn):
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - reported per case, judged by the test
        line = f"{type(e).__name__}: {e}".splitlines()[0]
        results[name] = {"error": line, "trace": traceback.format_exc(limit=3)}


def _one_sided_add():
    """add's backward when only one input needs a gradient (a single masked copy)."""
    rng = np.random.default_rng(3)
    dout, out = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    found = {}
    for backend in (CPU, CUDA):
        dx = _dev(backend, np.full((2, 3, 4), np.nan, np.float32))
        backend.kernels("merge").add_backward(
            _dev(backend, dout.astype(np.float32)), _dev(backend, out.astype(np.float32)), 1,
            [None, dx],
        )  # fmt: skip
        found[backend.name] = {"dx1": backend.to_host(dx)}
    return compare(found["cpu"], found["cuda"])


def shared_memory_check(launches=10) -> dict:
    """Every thread of a block writes its slot of one shared array, then sums all the
    slots, with a GIL hand-over forced between the simulator's look-up of the array and
    its creation (where load makes one likely): with the allocation not atomic, some
    threads get arrays of their own and sums come out wrong. Simulator only."""
    from numba import float32  # `cuda` is global here: the simulator swaps globals

    threads = 32

    @cuda.jit
    def gather(out):
        slots = cuda.shared.array(threads, float32)
        t = cuda.threadIdx.x
        slots[t] = t
        cuda.syncthreads()
        total = float32(0.0)
        for i in range(threads):
            total += slots[i]
        out[t] = total

    class Yielding(dict):
        def get(self, key, default=None):
            found = dict.get(self, key, default)
            if found is None:
                time.sleep(0)  # releases the GIL: another thread may run here
            return found

    setup = kernelapi.FakeCUDAShared.__init__

    def yielding_setup(self, *args):
        setup(self, *args)
        self._allocations = Yielding()

    wrong = 0
    kernelapi.FakeCUDAShared.__init__ = yielding_setup
    try:
        for _ in range(launches):
            out = np.zeros(threads, np.float32)
            gather[1, threads](out)
            wrong += int(np.count_nonzero(out != threads * (threads - 1) / 2))
    finally:
        kernelapi.FakeCUDAShared.__init__ = setup
    return {"launches": launches, "wrong_sums": wrong}


def cases(only) -> dict:
    results = {}
    for type_name, entry in ENTRIES.items():
        if only and type_name not in only:
            continue
        for i, case in enumerate(entry.cases):
            name = f"{type_name}-{i}"
            _attempt(results, name, lambda t=type_name, c=case: _both(t, c))
    if not only:
        for name, (type_name, case) in EXTRAS.items():
            _attempt(results, name, lambda t=type_name, c=case: _both(t, c))
        _attempt(results, "add-one-gradient", _one_sided_add)
    return results


def _both(type_name, case):
    return compare(_run(type_name, case, CPU), _run(type_name, case, CUDA))


# ---- whole networks ---------------------------------------------------------------
LENET_LIKE = """
name: lenet-like
input: [1, 12, 12]
layers:
  - {name: c1, type: conv2d, filters: 4, kernel: 3}
  - {name: c1_relu, type: relu}
  - {name: s2, type: avgpool2d, kernel: 2}
  - {name: c3, type: conv2d, filters: 6, kernel: 3}
  - {name: c3_relu, type: relu}
  - {name: s4, type: maxpool2d, kernel: 2}
  - {name: f5, type: dense, units: 12}
  - {name: f5_relu, type: relu}
  - {name: logits, type: dense, units: 10}
  - {name: output, type: softmax}
"""

RESNET_LIKE = """
name: resnet-like
input: [3, 6, 6]
layers:
  - {name: stem, type: conv2d, filters: 4, kernel: 3, padding: same, bias: false}
  - {name: stem_bn, type: batchnorm2d}
  - {name: stem_relu, type: relu}
  - {name: a1, type: conv2d, filters: 4, kernel: 3, padding: same, bias: false}
  - {name: a1_bn, type: batchnorm2d}
  - {name: a1_relu, type: relu}
  - {name: a2, type: conv2d, filters: 4, kernel: 3, padding: same, bias: false}
  - {name: a2_bn, type: batchnorm2d}
  - {name: a_add, type: add, inputs: [a2_bn, stem_relu]}
  - {name: a_relu, type: relu}
  - {name: b1, type: conv2d, filters: 8, kernel: 3, stride: 2, padding: same, bias: false}
  - {name: b1_bn, type: batchnorm2d}
  - {name: b_proj, type: conv2d, inputs: [a_relu], filters: 8, kernel: 1, stride: 2}
  - {name: b_add, type: add, inputs: [b1_bn, b_proj]}
  - {name: b_relu, type: relu}
  - {name: pool, type: global_avgpool2d}
  - {name: drop, type: dropout, rate: 0.2}
  - {name: fc, type: dense, units: 5}
  - {name: prob, type: softmax}
"""


# (momentum, nesterov) of successive steps: plain SGD, then momentum starting its
# buffer, then Nesterov (the optimizer keeps its state across the changes)
SCHEDULE = [(0.0, False), (0.9, False), (0.9, True)]


def _reused_buffer(x, y):
    """The batches of x, y as the trainer's Batches yields them: the same arrays every
    time, overwritten (first with NaN, as by a careless caller) once the step is over."""
    bx, by = np.empty_like(x[0]), np.empty_like(y[0])
    for i in range(len(x)):
        bx[...], by[...] = x[i], y[i]
        yield bx, by, len(bx)
        bx[...], by[...] = np.nan, -1


def train(spec, batch, steps, staged=True) -> dict:
    """A few SGD steps (weight decay; momentum and Nesterov as SCHEDULE, then its last)
    of one network on both backends, and (`staged`) on CUDA once more with every batch
    staged one step ahead the way the trainer hands them (train.loop.handed_early) from
    a host buffer overwritten after each hand-over: on a GPU the copy runs on a second
    stream."""
    import cnnspec
    from cnnspec.train.loop import handed_early

    net = cnnspec.load(spec) if Path(spec).suffix in (".yaml", ".yml") else cnnspec.loads(spec)
    rng = np.random.default_rng(0)
    k = net.outputs[-1].layer.out_shape[0]
    x = rng.standard_normal((steps, batch, *net.input_shape)).astype(np.float32)
    y = rng.integers(0, k, (steps, batch))
    out = {}
    for run in ("cpu", "cuda", "staged") if staged else ("cpu", "cuda"):
        model = net.compile(device="cpu" if run == "cpu" else "cuda", batch_size=batch, seed=0)
        if run == "staged":
            batches = handed_early(model, _reused_buffer(x, y))
        else:
            model.stage = None  # handed_early hands each batch at its step
            batches = ((x[i], y[i], batch) for i in range(steps))
        losses = []
        for i, (xi, yi, _) in enumerate(batches):
            momentum, nesterov = SCHEDULE[min(i, len(SCHEDULE) - 1)]
            losses.append(model.step(xi, yi, 0.05, momentum, weight_decay=5e-4, nesterov=nesterov))
        params = {name: model.backend.to_host(v) for name, v in model.params.items()}
        out[run] = {"losses": losses, "scores": model.forward(x[0]), "params": params}
    a, b = out["cpu"], out["cuda"]
    found = {
        "losses_cpu": a["losses"],
        "losses_cuda": b["losses"],
        "scores": compare({"s": a["scores"]}, {"s": b["scores"]})["s"],
        "params": max(compare(a["params"], b["params"]).values()),
    }
    if staged:
        c = out["staged"]
        found["losses_staged"] = c["losses"]
        found["staged_params_identical"] = all(
            np.array_equal(b["params"][name], c["params"][name]) for name in b["params"]
        )
        found["stale_refused"] = _stale_refused(model, x[0])
    return found


def _stale_refused(model, x) -> bool:
    """Two slots: a batch staged three hand-overs ago has been overwritten, and the
    model says so instead of computing with the later batch."""
    first = model.stage(x)
    model.stage(x)
    model.stage(x)
    try:
        model.forward(first)
    except RuntimeError as e:
        return "overwritten" in str(e)
    return False


def cli_train(out_dir: Path) -> dict:
    """`cnnspec train --device cuda` for one epoch, then `cnnspec eval --device cuda` of its
    checkpoint: the parent test evaluates the same checkpoint on the CPU."""
    from typer.testing import CliRunner

    from cnnspec.cli import app

    spec = out_dir / "lenet-like.yaml"
    spec.write_text(LENET_LIKE)
    rng = np.random.default_rng(1)
    np.savez(out_dir / "data.npz", x=rng.random((6, 1, 12, 12)), y=rng.integers(0, 10, 6))
    run = CliRunner().invoke
    common = ["--data", str(out_dir / "data.npz"), "--device", "cuda"]
    trained = run(
        app,
        ["train", str(spec), *common, "--epochs", "1", "--batch-size", "2", "--val-split", "0",
         "--out", str(out_dir / "run"), "--no-progress"],
    )  # fmt: skip
    evaluated = run(
        app,
        ["eval", str(spec), *common, "--weights", str(out_dir / "run" / "best.npz"),
         "--split", "train", "--batch-size", "2", "--json"],
    )  # fmt: skip
    return {
        "train_exit": trained.exit_code,
        "train_output": trained.output[-2000:],
        "eval_exit": evaluated.exit_code,
        "eval": evaluated.output,
    }


def main(argv):
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    only = argv[argv.index("--only") + 1 :] if "--only" in argv else []
    report = {}
    if "--spec" in argv:
        spec = argv[argv.index("--spec") + 1]
        batch = int(argv[argv.index("--batch") + 1])
        steps = int(argv[argv.index("--steps") + 1])
        _attempt(report, "train", lambda: train(spec, batch, steps))
    else:
        report["cases"] = cases(only)
        if SIMULATED:
            _attempt(report, "shared_memory", shared_memory_check)
        if not only:
            report["networks"] = {}
            for name, text in (("lenet-like", LENET_LIKE), ("resnet-like", RESNET_LIKE)):
                # staging is the same for any network: the LeNet-like one shows it
                staged = name == "lenet-like"
                _attempt(report["networks"], name, lambda t=text, s=staged: train(t, 2, 3, s))
            _attempt(report, "cli", lambda: cli_train(out_dir))
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    with open(out_dir / "launches.pkl", "wb") as f:
        pickle.dump(LAUNCHED, f)
    if not SIMULATED:  # on a GPU this script is the judge (tests/test_cuda.py is, simulated)
        failures = verdict(report)
        print("\n".join(failures) or f"all {len(report.get('cases', {}))} cases agree with the CPU")
        sys.exit(1 if failures else 0)


TOLERANCE = 1e-4  # as tests/test_cuda.py: float32 against float32, relative to scale


def verdict(report: dict) -> list[str]:
    """One line per case, network or run that disagrees with the CPU or failed."""
    bad = []
    for name, errors in report.get("cases", {}).items():
        if "error" in errors:
            bad.append(f"{name}: {errors['error']}")
        elif any(not v <= TOLERANCE for v in errors.values()):
            bad.append(f"{name}: differs from the CPU: {errors}")
    runs = dict(report.get("networks", {}))
    if "train" in report:
        runs["train"] = report["train"]
    for name, found in runs.items():
        if "error" in found:
            bad.append(f"{name}: {found['error']}")
            continue
        a, b = np.array(found["losses_cpu"]), np.array(found["losses_cuda"])
        if not np.allclose(a, b, rtol=1e-3) or found["scores"] > 1e-3:
            bad.append(f"{name}: losses {list(b)} on CUDA, {list(a)} on the CPU")
        if "losses_staged" not in found:
            continue
        if found["losses_staged"] != found["losses_cuda"] or not found["staged_params_identical"]:
            bad.append(f"{name}: staged batches train differently: {found['losses_staged']}")
        if not found["stale_refused"]:
            bad.append(f"{name}: an overwritten staged batch was not refused")
    cli = report.get("cli")
    if cli and (cli.get("error") or cli["train_exit"] or cli["eval_exit"]):
        bad.append(f"cnnspec train/eval --device cuda failed: {cli}")
    return bad


if __name__ == "__main__":
    main(sys.argv[1:])
