"""Data-parallel training over MPI: one process per replica, each on its own shard of every
batch, and the gradients averaged with one in-place ``Allreduce`` of the model's flat gradient
array per step.

``world()`` finds out how the process was started. Without an MPI launcher it returns a
:class:`Local` world, whose hooks do nothing, so a plain ``cnnspec train`` runs exactly the
single-process loop and never imports mpi4py. Under ``mpiexec``/``srun`` with more than one
process it returns an :class:`MPIWorld`; the trainer then calls its hooks:

- ``shard``: rank r takes every N-th image of the epoch's permutation (the same seed, so the same
  permutation, on every rank), the set cut to a multiple of N so every rank runs as many steps;
- ``reduce_step``: gradients summed in place and averaged; the loss, the counts, a pending
  Ctrl-C and the batch-norm running statistics averaged/summed in a second small buffer, so
  every rank takes the same decisions and holds the same state after every step;
- ``replicate``: parameters, fixed arrays and optimizer state broadcast from rank 0 at start and
  after ``--resume`` (only rank 0 reads the checkpoint);
- ``root_writes``: only rank 0 writes metrics and checkpoints, between two barriers.

Only buffer methods (``Allreduce``, ``Bcast``) are used; the lowercase ones pickle. The model
must keep its state in the compiled model's contiguous arrays (``flat_params``, ``flat_fixed``,
``flat_grads``: one message each, whatever the number of layers).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

# Set by MPI launchers in every process they start (MPICH/Hydra and Intel MPI: PMI_*,
# Open MPI: OMPI_*, PMIx launchers such as srun --mpi=pmix: PMIX_*, MVAPICH: MV2_*).
LAUNCHER_VARS = (
    "PMI_RANK",
    "PMI_SIZE",
    "PMIX_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "MPI_LOCALRANKID",
    "MV2_COMM_WORLD_SIZE",
)
SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
ABORT_CODE = 3
ABORT_GRACE_S = 1.0


class DistError(Exception):
    """A distributed launch that cannot work; the message is meant for the user."""


class Watchdog:
    """Aborts the job when no step (or validation pass, or checkpoint save) has finished for
    ``seconds``: a rank that hangs would otherwise block the others in MPI for ever (MPI has
    no timeout on a collective). Armed by the first completed step, so the first step, which
    may compile kernels, is not timed."""

    def __init__(self, seconds: float, abort: Callable[[str], None]) -> None:
        self.seconds, self.abort = float(seconds), abort
        self.last: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="cnnspec-watchdog", daemon=True)

    def beat(self) -> None:
        self.last = time.monotonic()

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(min(self.seconds / 4, 1.0)):
            last = self.last
            if last is not None and time.monotonic() - last > self.seconds:
                self.abort(
                    f"no training step finished for {self.seconds:g} s (--step-timeout): a "
                    "process hangs or died; aborting the job. The checkpoint holds the last "
                    "completed save; continue with --resume"
                )
                return


class Local:
    """One process: every hook does nothing and training is the single-process loop."""

    size = 1
    rank = 0
    root = True
    shard: tuple[int, int] | None = None

    def __init__(self) -> None:
        self.watchdog: Watchdog | None = None
        self.step_timeout: float | None = None

    def describe(self, batch_size: int) -> str:
        return f"batch {batch_size}"

    def reduce_step(self, model: Any, loss: float, correct: int, n: int, stop: bool):
        """After averaging the gradients: the loss averaged and the counts summed over the
        ranks, and whether any rank asked to stop (Ctrl-C), so that all stop at this step."""
        self.beat()
        return loss, correct, n, stop

    def agree(self, stop: bool) -> bool:
        """Whether any rank asks to stop: every rank gets the same answer (a rank's own flag
        can change at any moment, from its signal handler)."""
        return stop

    def from_root(self, fn: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> Any:
        """``fn()`` run on rank 0 only; its JSON result (or its error) reaches every rank."""
        return fn()

    def replicate(self, model: Any, opt: Any, seed: int, global_step: int) -> None:
        """Make every rank hold rank 0's parameters, fixed arrays and optimizer state."""

    def shard_of(self, ds: Any) -> Any:
        """This rank's part of an evaluation set (every N-th image)."""
        return ds

    def combine_eval(self, result: dict[str, Any]) -> dict[str, Any]:
        """The whole set's evaluation from every rank's part."""
        self.beat()
        return result

    @contextlib.contextmanager
    def root_writes(self) -> Iterator[bool]:
        """``with world.root_writes() as writer: if writer: ...``, between barriers."""
        yield True
        self.beat()

    def beat(self) -> None:
        if self.watchdog is not None:
            self.watchdog.beat()

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Run the --step-timeout watchdog (if one was asked for) while training."""
        if not self.step_timeout:
            yield
            return
        self.watchdog = Watchdog(self.step_timeout, self.abort)
        try:
            with self.watchdog:
                yield
        finally:
            self.watchdog = None

    def abort(self, message: str) -> None:
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
        os._exit(ABORT_CODE)  # from the watchdog thread: the main thread may never return


LOCAL = Local()  # fit()'s default; world() hands out its own, whose step_timeout may be set


class MPIWorld(Local):
    def __init__(self, comm: Any, mpi: Any) -> None:
        super().__init__()
        self.comm, self.MPI = comm, mpi
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.root = self.rank == 0
        self.shard = (self.rank, self.size)
        self._stats: np.ndarray | None = None
        self._running: list[np.ndarray] = []

    def describe(self, batch_size: int) -> str:
        return f"{self.size} processes x batch {batch_size} = {self.size * batch_size} per step"

    # ---- every step
    def reduce_step(self, model: Any, loss: float, correct: int, n: int, stop: bool):
        grads = getattr(model, "flat_grads", None)
        if not (isinstance(grads, np.ndarray) and grads.flags.c_contiguous):
            raise TypeError("data-parallel training needs the model's contiguous flat_grads")
        self.comm.Allreduce(self.MPI.IN_PLACE, grads, op=self.MPI.SUM)
        grads *= grads.dtype.type(1.0 / self.size)
        stats = self._step_buffer(model)
        stats[:4] = (loss, correct, n, stop)
        at = 4
        for a in self._running:
            stats[at : at + a.size] = a.ravel()
            at += a.size
        self.comm.Allreduce(self.MPI.IN_PLACE, stats, op=self.MPI.SUM)
        at = 4
        for a in self._running:  # running statistics: the mean over the ranks
            a.ravel()[...] = stats[at : at + a.size] / self.size
            at += a.size
        self.beat()
        return float(stats[0]) / self.size, int(stats[1]), int(stats[2]), bool(stats[3])

    def agree(self, stop: bool) -> bool:
        flag = np.array([stop], np.int32)
        self.comm.Allreduce(self.MPI.IN_PLACE, flag, op=self.MPI.MAX)
        return bool(flag[0])

    def _step_buffer(self, model: Any) -> np.ndarray:
        """Allocated once: loss, correct, images, stop, then every running statistic. Averaging
        them every step is what averaging per-rank exponential moving averages amounts to
        (they are linear), and keeps every rank's state identical at any checkpoint."""
        if self._stats is None:
            self._running = [
                a
                for key, a in sorted(model.params.items())
                if key not in model.trainable and key.rsplit(".", 1)[-1].startswith("running_")
            ]
            self._stats = np.zeros(4 + sum(a.size for a in self._running), np.float64)
        return self._stats

    # ---- start and resume
    def _bcast_bytes(self, data: bytes | None) -> bytes:
        length = np.array([len(data) if self.root and data is not None else 0], np.int64)
        self.comm.Bcast(length, root=0)
        buf = np.empty(int(length[0]), np.uint8)
        if self.root and data is not None:
            buf[:] = np.frombuffer(data, np.uint8)
        self.comm.Bcast(buf, root=0)
        return buf.tobytes()

    def _bcast_json(self, obj: Any) -> Any:
        return json.loads(self._bcast_bytes(json.dumps(obj).encode() if self.root else None))

    def from_root(self, fn: Callable[[], Any], errors: tuple[type[Exception], ...] = ()) -> Any:
        reply: dict[str, Any] = {}
        if self.root:
            try:
                reply = {"value": fn()}
            except errors as e:  # every rank raises it, none waits for a broadcast for ever
                reply = {"error": str(e), "type": type(e).__name__}
        reply = self._bcast_json(reply)
        if "error" in reply:
            kind = next((e for e in errors if e.__name__ == reply["type"]), RuntimeError)
            raise kind(reply["error"])
        return reply["value"]

    def _bcast_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's arrays on every rank (names, shapes and dtypes first, then the data)."""
        layout = self._bcast_json(
            {k: [list(a.shape), a.dtype.str] for k, a in arrays.items()} if self.root else None
        )
        out = {}
        for key, (shape, dtype) in layout.items():
            a = np.ascontiguousarray(arrays[key]) if self.root else np.empty(shape, dtype)
            self.comm.Bcast(a, root=0)
            out[key] = a
        return out

    def replicate(self, model: Any, opt: Any, seed: int, global_step: int) -> None:
        for flat in (model.flat_params, model.flat_fixed):
            self.comm.Bcast(flat, root=0)
        state = self._bcast_arrays(opt.state_dict() if self.root else {})
        if not self.root:
            opt.load_state_dict(state)
            # Dropout masks must differ between the ranks' shards; rank 0 keeps the model's
            # (checkpointed) generator, the others derive theirs from the seed and the step.
            model.rng = np.random.default_rng([seed, self.rank, global_step])

    # ---- evaluation and writing
    def shard_of(self, ds: Any) -> Any:
        if len(ds) < self.size:
            from .data import DataError

            raise DataError(
                f"{ds.name}: {len(ds)} validation images are fewer than the {self.size} "
                "processes; use a larger --val-split or fewer processes"
            )
        return ds.subset(np.arange(self.rank, len(ds), self.size))

    def combine_eval(self, result: dict[str, Any]) -> dict[str, Any]:
        count = result["count"]
        sums = np.array([result["loss"] * count, result.get("top5", 0.0) * count, count])
        self.comm.Allreduce(self.MPI.IN_PLACE, sums, op=self.MPI.SUM)
        confusion = np.ascontiguousarray(result["confusion"], np.int64)
        self.comm.Allreduce(self.MPI.IN_PLACE, confusion, op=self.MPI.SUM)
        total = int(sums[2])
        combined = {
            **result,
            "loss": float(sums[0]) / total,
            "accuracy": float(np.trace(confusion)) / total,
            "confusion": confusion.tolist(),
            "count": total,
        }
        if "top5" in result:
            combined["top5"] = float(sums[1]) / total
        self.beat()
        return combined

    @contextlib.contextmanager
    def root_writes(self) -> Iterator[bool]:
        # The first barrier: every rank has finished the step being saved. The second: no rank
        # goes on (and can fail) before the file is complete on disk.
        self.comm.Barrier()
        yield self.root
        self.comm.Barrier()
        self.beat()

    def abort(self, message: str) -> None:
        sys.stderr.write(f"error: rank {self.rank}: {message}\n")
        sys.stderr.flush()
        # The launcher forwards our stderr through a pipe and stops reading it once it hears
        # of the abort: give it a moment to pass the message on first.
        time.sleep(ABORT_GRACE_S)
        self.comm.Abort(ABORT_CODE)


# ---------------------------------------------------------------- how the process was started


def _launched(env: dict[str, str]) -> bool:
    """Started by an MPI launcher with more than one process (or by python -m mpi4py)."""
    for var in SIZE_VARS:
        if var in env:
            return env[var].strip() != "1"
    return any(var in env for var in LAUNCHER_VARS) or "mpi4py.MPI" in sys.modules


def check_slurm(size: int, env: dict[str, str]) -> None:
    """Under SLURM the world must be the job step's tasks: an MPI built without PMI/PMIx
    support, started by srun, silently runs every task as a separate one-process job."""
    ntasks = env.get("SLURM_NTASKS")
    if not ntasks or not ntasks.isdigit():
        return
    in_srun_step = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1
    if int(ntasks) != size and (size > 1 or in_srun_step):
        raise DistError(
            f"SLURM started {ntasks} tasks (SLURM_NTASKS) but MPI sees {size} process"
            f"{'es' if size != 1 else ''}: "
            + (
                "this MPI does not talk to SLURM's process manager, so every task would train "
                "alone; launch with srun --mpi=pmix (or pmi2; see srun --mpi=list) or with "
                "mpiexec inside the sbatch script"
                if size == 1
                else f"give mpiexec -n {ntasks}, or ask sbatch for --ntasks={size}"
            )
        )


def world(env: dict[str, str] | None = None) -> Local:
    """The processes this training runs on: one (:class:`Local`) unless started by an MPI
    launcher with more than one process. Raises DistError for a launch that cannot work."""
    env = dict(os.environ) if env is None else env
    if not _launched(env):
        check_slurm(1, env)
        return Local()
    try:
        from mpi4py import MPI
    except ImportError:
        raise DistError(
            "started by an MPI launcher, but mpi4py is not installed: pip install "
            "'cnnspec[dist]' (mpi4py, and the mpich wheel where the site has no MPI)"
        ) from None
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    check_slurm(size, env)
    return Local() if size == 1 else MPIWorld(comm, MPI)


def launch_note(w: Local) -> str | None:
    """What to say when the launch works but an error would hang the job instead of ending it."""
    if w.size > 1 and "mpi4py.run" not in sys.modules:
        return (
            "started without python -m mpi4py: an error in one process would leave the others "
            "waiting; launch as mpiexec -n N python -m mpi4py -m cnnspec train ..."
        )
    return None


def ranks_on_node(w: Local) -> int:
    """How many of the job's processes share this machine, its cores and its memory (a
    collective call: every rank makes it)."""
    if w.size == 1:
        return 1
    local = w.comm.Split_type(w.MPI.COMM_TYPE_SHARED, key=w.rank)
    per_node = local.Get_size()
    local.Free()
    return per_node


def default_threads(w: Local) -> tuple[int | None, str | None]:
    """Numba threads for each rank: the node's cores over the ranks on the node (None: keep
    Numba's default), and a note when the launcher pinned the rank to fewer cores."""
    if w.size == 1:
        return None, None
    import numba

    per_node = ranks_on_node(w)
    cores = os.cpu_count() or 1
    threads = max(1, cores // per_node)
    note = None
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    if allowed < threads:
        note = (
            f"the launcher pinned this rank to {allowed} core(s) of {cores}; with Open MPI "
            "add --bind-to none so each of the node's ranks gets its share"
        )
        threads = allowed
    return min(threads, numba.config.NUMBA_NUM_THREADS), note


def scale_learning_rate(cfg: dict[str, Any], size: int) -> str:
    """``--scale-lr``: the learning rate times the world size, reached by a linear warm-up
    from the one-process rate (Goyal et al. 2017: 5 epochs, here at most half the run); a
    warm-up the user set stays as set. Changes ``cfg``; says what it did."""
    from .loop import DEFAULTS

    base = float(cfg.get("lr", DEFAULTS["lr"]))
    cfg["lr"] = base * size
    if not cfg.get("warmup_epochs"):
        cfg["warmup_epochs"] = min(5.0, cfg.get("epochs", DEFAULTS["epochs"]) / 2)
        cfg["warmup_start_factor"] = 1.0 / size
    return (
        f"--scale-lr: lr {base:g} x {size} = {cfg['lr']:g}, warm-up over "
        f"{cfg['warmup_epochs']:g} epochs from {cfg['lr'] * cfg.get('warmup_start_factor', 0.1):g}"
    )


def adapt_resumed(state: Any, size: int, global_batch: int, steps: int) -> str | None:
    """A checkpoint of another world size or batch: what changes, and the step of the current
    epoch that continues it (an epoch stopped midway goes on after the images already seen).
    ``state`` is the resumed run state; it then describes this run."""
    old_size = int(state.world_size)
    old_batch = int(state.global_batch or old_size * global_batch // size)
    state.world_size, state.global_batch = size, global_batch
    if (old_size, old_batch) == (size, global_batch):
        return None
    if old_size == size:
        text = f"resuming with {global_batch} images per step instead of {old_batch}"
    else:
        text = (
            f"resuming a {old_size}-process run with {size} process{'es' if size > 1 else ''}: "
            f"{old_batch} -> {global_batch} images per step"
        )
    if state.step:
        new_step = min(state.step * old_batch // global_batch, steps)
        # the epoch's mean loss so far stays what it was
        state.loss_sum = state.loss_sum * new_step / state.step
        text += f"; the epoch goes on at step {new_step}/{steps} (was {state.step})"
        state.step = new_step
    return text + "; the learning rate is the one given now"
