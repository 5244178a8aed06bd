"""The trainer: mini-batch SGD over a compiled model, with metrics, checkpoints and resume.

The model protocol (implemented by the compiled model)::

    model.batch_size: int                  # fixed: buffers are static
    model.input_shape: tuple               # (C, H, W)
    model.num_outputs: int
    model.params: dict[str, np.ndarray]    # all state arrays (trainable and running stats)
    model.trainable: set[str]              # the keys SGD updates
    model.loss_and_grads(x, y) -> (float, dict[str, np.ndarray])   # train-mode step
    model.forward(x, train=False) -> np.ndarray (B, num_outputs)     # scores, higher = likelier
    model.rng: np.random.Generator         # dropout etc.; saved in checkpoints
    model.last_scores: np.ndarray          # OPTIONAL: the (B, K) scores of the last
                                           # loss_and_grads; without it the training accuracy
                                           # costs one extra eval-mode forward per step
    model.stage(x) -> handle               # OPTIONAL: takes a batch ahead of its step
                                           # (a GPU copies it in while the step before runs);
                                           # forward and loss_and_grads take the handle as x

Output directory: ``metrics.jsonl`` (one JSON object per epoch), ``last.npz`` (every epoch, and
on Ctrl-C at a step boundary) and ``best.npz`` (best validation accuracy); ``metrics.csv`` and
the other callbacks' files (cnnspec.train.callbacks).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

from .callbacks import Callback, CsvLog
from .checkpoint import (
    CheckpointError,
    check_spec_hash,
    fault_point,
    load_checkpoint,
    save_checkpoint,
)
from .data import Batches, DataError, Dataset, check_labels, input_range
from .dist import LOCAL, Local, adapt_resumed
from .optim import SGD
from .rundir import RunDirError, locked_run_dir, os_error_text
from .schedules import DEFAULTS as SCHEDULE_DEFAULTS
from .schedules import learning_rate, validate_schedule

DEFAULTS: dict[str, Any] = {
    "epochs": 10,
    "batch_size": None,  # None: the model's; anything else must equal it
    "lr": 0.01,
    "momentum": 0.9,
    "nesterov": False,
    "weight_decay": 0.0,
    **SCHEDULE_DEFAULTS,
    "seed": 0,
    "crop_padding": 0,
    "hflip": False,
    "spec_hash": None,
    "inputs": None,  # the training inputs' range and scaling (data.input_range), recorded
    # Recorded, not used by the loop: a resume must keep the split and the data it was made of.
    "data": None,
    "val_split": None,
}
# What `cnnspec train` takes where neither the spec's `train:` nor a flag says; with
# DEFAULTS, the one place the CLI and the loop read training defaults from.
RUN_DEFAULTS: dict[str, Any] = {"data": "digits", "val_split": 0.1, "batch_size": 32}
SPLIT_SETTINGS = ("seed", "val_split", "data")
STATE_KIND = "cnnspec-train-state"


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM during training; ``saved`` tells whether ``checkpoint`` now holds this
    point; ``signum`` is the signal that asked (the CLI exits with 128 + it)."""

    def __init__(
        self, message: str, checkpoint: Path, saved: bool, signum: int = signal.SIGINT
    ) -> None:
        super().__init__(message)
        self.checkpoint, self.saved, self.signum = checkpoint, saved, int(signum)


class TrainingDiverged(Exception):
    """The loss or the weights became NaN or infinite."""


# ---------------------------------------------------------------- configuration


def resolve_config(cfg: dict[str, Any], model: Any) -> dict[str, Any]:
    """Defaults filled in and every option checked; unknown names are refused (typos)."""
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(DEFAULTS))}"
        )
    c = {**DEFAULTS, **cfg}
    if c["batch_size"] is None:
        c["batch_size"] = model.batch_size
    if c["batch_size"] != model.batch_size:
        raise ValueError(
            f"batch_size {c['batch_size']} differs from the compiled model's {model.batch_size}; "
            "compile the model with the batch size you train with"
        )
    if not (isinstance(c["epochs"], int) and c["epochs"] >= 1):
        raise ValueError(f"epochs must be a positive integer, got {c['epochs']!r}")
    if not 0 <= c["momentum"] < 1:
        raise ValueError(f"momentum must be in [0, 1), got {c['momentum']}")
    if c["nesterov"] and not c["momentum"]:
        raise ValueError("nesterov needs momentum > 0")
    if c["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0, got {c['weight_decay']}")
    if not (isinstance(c["crop_padding"], int) and c["crop_padding"] >= 0):
        raise ValueError(f"crop_padding must be an integer >= 0, got {c['crop_padding']!r}")
    validate_schedule(c)
    return c


# ---------------------------------------------------------------- evaluation


def _log_softmax_loss(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of softmax(scores), in float64 for a stable sum."""
    s = scores.astype(np.float64)
    top = s.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(s - top).sum(axis=1))
    return lse - s[np.arange(len(y)), y]


def handed_early(model: Any, batches):
    """``batches`` with each input handed to the model one step early (``model.stage``,
    when it has one): batch k+1 is staged before step k runs. Batches yields the same
    arrays every time, so the labels of the batch held back are copied."""
    stage = getattr(model, "stage", None)
    if stage is None:
        yield from batches
        return
    held = None
    for x, y, n in batches:
        staged = (stage(x), y.copy(), n)
        if held is not None:
            yield held
        held = staged
    if held is not None:
        yield held


def evaluate(model: Any, ds: Dataset, batch_size: int | None = None) -> dict[str, Any]:
    """Loss (cross-entropy of softmax of the scores), top-1 accuracy, top-5 accuracy (when
    there are more than 5 outputs), confusion matrix (rows: true label, columns: prediction)
    and count. Exact: the padded rows of the last batch are never counted."""
    k = int(model.num_outputs)
    check_labels(ds, k)
    batches = Batches(ds, batch_size or model.batch_size)
    loss_sum, top5 = 0.0, 0
    confusion = np.zeros((k, k), np.int64)
    for x, y, n in handed_early(model, batches):
        scores = np.asarray(model.forward(x, train=False))[:n]
        labels = y[:n]
        loss_sum += float(_log_softmax_loss(scores, labels).sum())
        predicted = scores.argmax(axis=1)
        confusion += np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
        if k > 5:
            best5 = np.argpartition(scores, k - 5, axis=1)[:, k - 5 :]
            top5 += int((best5 == labels[:, None]).any(axis=1).sum())
    count = len(ds)
    result: dict[str, Any] = {
        "loss": loss_sum / count,
        "accuracy": float(np.trace(confusion)) / count,
        "confusion": confusion.tolist(),
        "count": count,
    }
    if k > 5:
        result["top5"] = top5 / count
    return result


# ---------------------------------------------------------------- state in checkpoints


def _jsonable(obj: Any) -> Any:
    """numpy bit-generator states (nested dicts, big ints, maybe arrays) -> JSON-safe data."""
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    return obj


class _RunState:
    """Where training stands: enough, with the arrays, to continue bit for bit."""

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.step = 0  # completed steps in the current epoch
        self.global_step = 0
        self.loss_sum = 0.0  # running sums of the current epoch
        self.correct = 0
        self.seen = 0
        self.seconds = 0.0
        self.epoch_rng_state: dict[str, Any] | None = None  # data generator at epoch start
        self.best: float | None = None
        self.history: list[dict[str, Any]] = []
        self.world_size = 1  # processes that trained it (data-parallel training)
        self.global_batch: int | None = None  # images per step over all of them

    def to_meta(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "partial": {
                "loss_sum": self.loss_sum,
                "correct": self.correct,
                "seen": self.seen,
                "seconds": self.seconds,
            },
            "data_rng": _jsonable(self.epoch_rng_state),
            "best": self.best,
            "history": self.history,
            "world_size": self.world_size,
            "global_batch": self.global_batch,
        }

    @classmethod
    def from_meta(cls, m: dict[str, Any]) -> _RunState:
        s = cls()
        s.epoch, s.step, s.global_step = int(m["epoch"]), int(m["step"]), int(m["global_step"])
        p = m["partial"]
        s.loss_sum, s.correct, s.seen, s.seconds = (
            p["loss_sum"],
            p["correct"],
            p["seen"],
            p["seconds"],
        )
        s.epoch_rng_state = _from_jsonable(m["data_rng"])
        s.best, s.history = m["best"], list(m["history"])
        s.world_size, s.global_batch = int(m.get("world_size", 1)), m.get("global_batch")
        return s


def _save_state(
    path: Path, model: Any, opt: SGD, state: _RunState, cfg: dict, n_train: int
) -> None:
    arrays = {f"param/{k}": _host(model, v) for k, v in model.params.items()}
    arrays.update({f"optim/{k}": v for k, v in opt.state_dict().items()})
    meta = {
        "kind": STATE_KIND,
        "spec_hash": cfg["spec_hash"],
        "config": cfg,
        "n_train": n_train,
        "model_rng": _jsonable(model.rng.bit_generator.state),
        **state.to_meta(),
    }
    save_checkpoint(path, arrays, meta)


def _host(model: Any, array) -> np.ndarray:
    """A host copy of one of the model's arrays (a compiled model's may be on a GPU)."""
    backend = getattr(model, "backend", None)
    return backend.to_host(array) if backend is not None else np.array(array)


def _load_params(model: Any, params: dict[str, np.ndarray]) -> None:
    backend = getattr(model, "backend", None)
    for k, v in params.items():
        if backend is not None:
            backend.to_device(v, model.params[k])
        else:
            np.copyto(model.params[k], v)


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def _check_params(model: Any, params: dict[str, np.ndarray], path: str | Path) -> None:
    missing, extra = (
        sorted(set(model.params) - set(params)),
        sorted(set(params) - set(model.params)),
    )
    if missing or extra:
        raise CheckpointError(
            f"{path}: the checkpoint does not match this network (missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'}); was it trained from another spec?"
        )
    for k, v in params.items():
        if v.shape != model.params[k].shape:
            raise CheckpointError(
                f"{path}: array {k!r} has shape {v.shape} but the network's is "
                f"{model.params[k].shape}; was it trained from another spec?"
            )
        if not np.issubdtype(v.dtype, np.floating):
            raise CheckpointError(
                f"{path}: array {k!r} is {v.dtype}, not floating-point weights like the "
                f"network's {model.params[k].dtype}; convert the file or retrain"
            )
        if not np.isfinite(v).all():
            bad = int(v.size - np.isfinite(v).sum())
            raise CheckpointError(
                f"{path}: array {k!r} holds {bad} NaN or infinite value(s); these weights come "
                "from a diverged or damaged run: use an earlier checkpoint"
            )


def restore_model(model: Any, path: str | Path, spec_hash: str | None = None) -> dict[str, Any]:
    """Copy a checkpoint's weights into ``model.params`` (in place) and return its meta.

    Refuses, with CheckpointError, a checkpoint of another spec or with other arrays."""
    arrays, meta = load_checkpoint(path)
    check_spec_hash(meta, spec_hash, path)
    params = _prefixed(arrays, "param/")
    _check_params(model, params, path)
    _load_params(model, params)
    model.trained_inputs = (meta.get("config") or {}).get("inputs")
    return meta


def _check_same_split(saved: dict[str, Any], cfg: dict[str, Any], path: Path) -> None:
    """A resumed run must see the same training/validation split and shuffle as before."""
    for key in SPLIT_SETTINGS:
        before, now = saved.get(key), cfg.get(key)
        if before is not None and now is not None and before != now:
            flag = "--" + key.replace("_", "-")
            raise CheckpointError(
                f"{path}: the run was started with {key} {before}, not {now}; changing it "
                f"mid-run would re-split or re-shuffle the data: resume with {flag} {before}, "
                "or start a new run (another --out, or --overwrite)"
            )


def check_resume_settings(out_dir: str | Path, cfg: dict[str, Any]) -> None:
    """Refuse, before any work, resuming ``out_dir`` with another split (reads the metadata of
    last.npz only; everything else is checked when the run resumes)."""
    path = Path(out_dir) / "last.npz"
    if path.is_file():
        _check_same_split(load_checkpoint(path, meta_only=True)[1].get("config", {}), cfg, path)


def _resume(path: Path, model: Any, opt: SGD, cfg: dict, n_train: int) -> _RunState:
    """Load ``path`` into model and optimizer; every check happens before anything changes."""
    if not path.is_file():
        raise CheckpointError(
            f"{path}: nothing to resume from (no last.npz); train without --resume"
        )
    arrays, meta = load_checkpoint(path)
    check_spec_hash(meta, cfg["spec_hash"], path)
    if meta.get("kind") != STATE_KIND:
        raise CheckpointError(f"{path}: not a training-state checkpoint; cannot resume from it")
    params = _prefixed(arrays, "param/")
    _check_params(model, params, path)
    _check_same_split(meta.get("config", {}), cfg, path)
    state = _RunState.from_meta(meta)
    if state.step and meta["n_train"] != n_train:
        raise CheckpointError(
            f"{path}: stopped in the middle of an epoch over {meta['n_train']} training images, "
            f"but the training set now has {n_train}; resume with the same data"
        )
    try:
        opt.load_state_dict(_prefixed(arrays, "optim/"))
    except (ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: the optimizer state does not fit this network ({e})"
        ) from None
    _load_params(model, params)
    model.rng.bit_generator.state = _from_jsonable(meta["model_rng"])
    return state


# ---------------------------------------------------------------- Ctrl-C and SIGTERM

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # SIGTERM: what SLURM and Kubernetes send first


class _StopFlag:
    """First Ctrl-C or SIGTERM: ask the loop to stop at the next step boundary (weights are
    never left half-updated). A second one: the usual KeyboardInterrupt, immediately."""

    def __init__(self) -> None:
        self.signum: int | None = None  # the signal that asked to stop
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_signal(self) -> int:
        """The signal to report; under MPI another rank's may have stopped this one."""
        return self.signum or signal.SIGINT

    @property
    def what(self) -> str:
        return "terminated (SIGTERM)" if self.signum == signal.SIGTERM else "interrupted"

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():  # signals need the main thread
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- the loop


def _write_metrics(path: Path, history: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
    tmp.replace(path)


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _weights_finite(model: Any) -> bool:
    # A sum is NaN/inf whenever any element is: one cheap pass instead of a boolean array.
    # All floating arrays, running statistics included: they are saved and used for eval too.
    return all(
        math.isfinite(float(_host(model, a).sum(dtype=np.float64)))
        for a in model.params.values()
        if np.issubdtype(a.dtype, np.floating)
    )


def _summary(r: dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {r['epoch']}/{epochs}  lr {r['lr']:.4g}  loss {r['train_loss']:.4f}  "
        f"acc {r['train_acc']:.2%}"
    )
    if r["val_loss"] is not None:
        text += f"  val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.2%}"
    return text + f"  {r['images_per_s']:.0f} img/s  {r['seconds']:.1f}s"


def _check_data(model: Any, ds: Dataset, what: str) -> None:
    if ds.image_shape != tuple(model.input_shape):
        raise DataError(
            f"{ds.name}: {what} images are {list(ds.image_shape)} but the network's input is "
            f"{list(model.input_shape)}; adapt them with fit_to_input"
        )
    check_labels(ds, model.num_outputs)


def fit(
    model: Any,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: dict[str, Any],
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    console: Console | None = None,
    world: Local = LOCAL,
    overwrite: bool = False,
    callbacks: list[Callback] | tuple = (),
) -> list[dict[str, Any]]:
    """Train ``model`` in place and return the per-epoch metrics (all epochs, resumed ones too).

    ``resume=True`` continues from ``out_dir/last.npz`` exactly as if never stopped;
    ``overwrite=True`` starts afresh in a directory that holds a run; without either such a
    directory is refused. The directory is locked for the run. The progress bar
    shows only when ``progress`` and the console is a terminal; a one-line summary per epoch
    is always printed. Raises TrainingInterrupted (Ctrl-C), TrainingDiverged (NaN/inf),
    DataError, CheckpointError, RunDirError (the directory cannot be used or written), and
    ValueError for a bad ``cfg``.
    ``callbacks`` (cnnspec.train.callbacks) see each epoch's record and may stop training
    early.

    ``world`` (see :mod:`.dist`) trains data-parallel on MPI processes: ``batch_size`` is then
    each process's, and only rank 0 prints, writes and locks the directory.
    """
    if not world.root:
        console = Console(quiet=True)
    console = console or Console(highlight=False)
    trainer = _Trainer(model, train_ds, val_ds, cfg, Path(out_dir), console, world)
    trainer.callbacks = [CsvLog(Path(out_dir) / "metrics.csv"), *callbacks]

    def say(text: str) -> None:
        console.print(text, markup=False, soft_wrap=True)

    with contextlib.ExitStack() as run_dir:
        for callback in trainer.callbacks:
            run_dir.callback(callback.close)

        def lock() -> None:  # on rank 0; a refusal there reaches every rank
            run_dir.enter_context(locked_run_dir(Path(out_dir), resume, overwrite, say))

        world.from_root(lock, errors=(RunDirError,))
        trainer.start(resume)
        return trainer.run(progress)


class _Trainer:
    """One training run: the objects a step needs, kept together instead of passed around."""

    def __init__(
        self,
        model: Any,
        train_ds: Dataset,
        val_ds: Dataset | None,
        cfg: dict[str, Any],
        out: Path,
        console: Console,
        world: Local = LOCAL,
    ) -> None:
        self.cfg = cfg = resolve_config(cfg, model)
        self.world = world
        cfg["inputs"] = input_range(train_ds)
        _check_data(model, train_ds, "training")
        if val_ds is not None:
            _check_data(model, val_ds, "validation")
        self.model, self.train_ds, self.val_ds, self.console = model, train_ds, val_ds, console
        self.val_part = world.shard_of(val_ds) if val_ds is not None else None
        self.last, self.best, self.metrics = (
            out / "last.npz",
            out / "best.npz",
            out / "metrics.jsonl",
        )
        self.data_rng = np.random.default_rng(cfg["seed"])
        self.batches = Batches(
            train_ds,
            cfg["batch_size"],
            shuffle=True,
            rng=self.data_rng,
            drop_last=True,  # a padded batch would put fake images into the gradient
            crop_padding=cfg["crop_padding"],
            hflip=cfg["hflip"],
            shard=world.shard,
        )
        self.steps = len(self.batches)
        self.global_batch = world.size * cfg["batch_size"]
        if self.steps == 0:
            raise DataError(
                f"{train_ds.name}: {len(train_ds)} training images are fewer than one batch of "
                f"{world.describe(cfg['batch_size'])}; use more data or a smaller batch size"
            )
        settings = {k: cfg[k] for k in ("lr", "momentum", "nesterov", "weight_decay")}
        backend = getattr(model, "backend", None)  # a compiled model updates where it lives
        if backend is not None:
            self.opt = backend.optimizer(model, **settings)
        else:
            self.opt = SGD({k: model.params[k] for k in sorted(model.trainable)}, **settings)
        self.best_key = "val_acc" if val_ds is not None else "train_acc"
        self.state = _RunState()
        self.callbacks: list[Callback] = []

    def start(self, resume: bool) -> None:
        w = self.world
        if resume:  # only rank 0 reads the checkpoint; the others get its state from it
            meta = w.from_root(
                lambda: _resume(
                    self.last, self.model, self.opt, self.cfg, len(self.train_ds)
                ).to_meta(),
                errors=(CheckpointError,),
            )
            self.state = _RunState.from_meta(meta)
            self.data_rng.bit_generator.state = self.state.epoch_rng_state
            change = adapt_resumed(self.state, w.size, self.global_batch, self.steps)
            if change:
                self.console.print(change, markup=False, soft_wrap=True)
        else:
            self.state.world_size, self.state.global_batch = w.size, self.global_batch
        w.replicate(self.model, self.opt, self.cfg["seed"], self.state.global_step)
        # On resume this drops any line written after the checkpoint; otherwise starts afresh.
        self.write(self.metrics, lambda: _write_metrics(self.metrics, self.state.history))
        if self.world.root:
            for callback in self.callbacks:  # they write files: rank 0 only
                callback.on_start(self.state.history)

    def write(self, path: Path, fn: Callable[[], None]) -> None:
        """``fn()`` writes ``path``, on rank 0 only. A failed write (full disk, read-only
        directory) ends the run with one line, on every rank (none waits for ever)."""

        def on_root() -> None:
            fault_point(f"before:{path.name}")
            try:
                fn()
            except OSError as e:
                raise RunDirError(
                    f"{path}: cannot write ({os_error_text(e)}); {self.last_kept()}"
                ) from None
            fault_point(f"after:{path.name}")

        self.world.from_root(on_root, errors=(RunDirError,))

    def last_kept(self) -> str:
        kept = "holds the last completed save" if self.last.is_file() else "was never written"
        return f"{self.last} {kept}"

    def save(self, path: Path) -> None:
        with self.world.root_writes():
            self.write(
                path,
                lambda: _save_state(
                    path, self.model, self.opt, self.state, self.cfg, len(self.train_ds)
                ),
            )

    def run(self, progress: bool) -> list[dict[str, Any]]:
        state, epochs = self.state, self.cfg["epochs"]
        if state.epoch >= epochs:
            self.console.print(
                f"nothing to do: {self.last} has already trained {state.epoch} epochs",
                markup=False,
                soft_wrap=True,
            )
        columns = (
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.2%}"),
            TextColumn("{task.fields[ips]:.0f} img/s"),
            TimeRemainingColumn(),
        )
        show = progress and self.console.is_terminal
        bar = Progress(*columns, console=self.console, disable=not show, transient=True)
        stop = _StopFlag()
        try:
            with stop, bar, self.world.watch():
                task = bar.add_task("train", total=self.steps, epoch="", loss=0.0, acc=0.0, ips=0.0)
                while state.epoch < epochs and not self.stopped_early():
                    record = self.train_epoch(stop, bar, task)
                    if record is None:  # stopped inside the epoch, saved at a step boundary
                        raise TrainingInterrupted(
                            f"training {stop.what} at epoch {state.epoch + 1}, step "
                            f"{state.step}/{self.steps}; the state is saved in {self.last}; "
                            "continue with --resume",
                            self.last,
                            saved=True,
                            signum=stop.exit_signal,
                        )
                    self.finish_epoch(record)
                    if self.world.agree(stop.requested):
                        raise TrainingInterrupted(
                            f"training {stop.what} after epoch {state.epoch}; the state is saved "
                            f"in {self.last}; continue with --resume",
                            self.last,
                            saved=True,
                            signum=stop.exit_signal,
                        )
        except KeyboardInterrupt:
            # A second Ctrl-C, or one where no handler could be installed (not the main
            # thread): the weights may be mid-update, so nothing is saved.
            raise TrainingInterrupted(
                f"training aborted during epoch {state.epoch + 1}; nothing was saved, "
                f"{self.last_kept()}",
                self.last,
                saved=False,
                signum=stop.exit_signal,
            ) from None
        return state.history

    def train_epoch(self, stop: _StopFlag, bar: Progress, task: Any) -> dict[str, Any] | None:
        """Run the rest of the current epoch; its metrics record, or None after Ctrl-C."""
        model, state, steps, cfg = self.model, self.state, self.steps, self.cfg
        if state.step == 0:
            state.epoch_rng_state = self.data_rng.bit_generator.state
        else:  # resuming mid-epoch: replay the epoch's shuffle, skip the batches already done
            self.data_rng.bit_generator.state = state.epoch_rng_state
        epoch_lr = learning_rate(cfg, state.epoch)  # reported: the rate the epoch starts with
        # reset() replaces all of a task's fields, so every column's field is given again.
        fields = {
            "epoch": f"{state.epoch + 1}/{cfg['epochs']}",
            "loss": 0.0,
            "acc": 0.0,
            "ips": 0.0,
        }
        bar.reset(task, total=steps, completed=state.step, **fields)
        has_scores = hasattr(model, "last_scores")
        started = time.perf_counter()
        batches = handed_early(model, self.batches.epoch(start=state.step))
        for s, (x, y, n) in enumerate(batches, start=state.step):
            lr = learning_rate(cfg, state.epoch + s / steps)
            if not has_scores:  # before the step, so that it sees the weights the loss sees
                correct = int((model.forward(x, train=False).argmax(axis=1) == y).sum())
            loss, grads = model.loss_and_grads(x, y)
            if has_scores:
                correct = int((model.last_scores.argmax(axis=1) == y).sum())
            # data-parallel: gradients averaged, loss and counts over all ranks' shards
            loss, correct, n, stopping = self.world.reduce_step(
                model, float(loss), correct, n, stop.requested
            )
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"the loss became {loss} at epoch {state.epoch + 1}, step {s + 1}/{steps} "
                    f"(global step {state.global_step + 1}) with learning rate {lr:.4g}; "
                    f"{self.last} still holds the last good state. Lower the learning rate "
                    f"(e.g. {lr / 10:.4g}), add warm-up, or check the input data"
                )
            self.opt.step(grads, lr=lr)
            state.step, state.global_step = s + 1, state.global_step + 1
            fault_point(f"step:{state.global_step}")
            state.loss_sum += loss
            state.correct += correct
            state.seen += n
            elapsed = state.seconds + time.perf_counter() - started
            bar.update(
                task,
                completed=state.step,
                loss=state.loss_sum / state.step,
                acc=state.correct / state.seen,
                ips=state.seen / max(elapsed, 1e-9),
            )
            if stopping and state.step < steps:
                state.seconds = elapsed
                self.save(self.last)
                return None
        state.seconds += time.perf_counter() - started
        return {
            "epoch": state.epoch + 1,
            "lr": epoch_lr,
            "train_loss": state.loss_sum / steps,
            "train_acc": state.correct / state.seen,
            "val_loss": None,
            "val_acc": None,
            "images_per_s": state.seen / max(state.seconds, 1e-9),
            "seconds": state.seconds,
        }

    def finish_epoch(self, record: dict[str, Any]) -> None:
        """Validate, refuse a diverged state, then save checkpoints and metrics."""
        state = self.state
        started = time.perf_counter()
        if self.val_part is not None:
            val = evaluate(self.model, self.val_part, self.cfg["batch_size"])
            val = self.world.combine_eval(val)
            record["val_loss"], record["val_acc"] = val["loss"], val["accuracy"]
        record["seconds"] += time.perf_counter() - started
        val_finite = record["val_loss"] is None or math.isfinite(record["val_loss"])
        if not (val_finite and _weights_finite(self.model)):
            raise TrainingDiverged(
                f"the weights or the validation loss became NaN/infinite during epoch "
                f"{state.epoch + 1} (lr {record['lr']:.4g}); {self.last} still holds the last "
                "good state. Lower the learning rate (or add warm-up) and train again"
            )
        state.history.append(record)
        state.epoch, state.step = state.epoch + 1, 0
        state.loss_sum, state.correct, state.seen, state.seconds = 0.0, 0, 0, 0.0
        state.epoch_rng_state = self.data_rng.bit_generator.state
        improved = state.best is None or record[self.best_key] > state.best
        if improved:
            state.best = record[self.best_key]
        # best.npz before last.npz: until last.npz records this epoch, a resume redoes it (bit
        # for bit) and rewrites best.npz, so a kill at any instant leaves the two consistent.
        if improved:
            self.save(self.best)
        self.save(self.last)
        # after last.npz: a resume rewrites the metrics from there
        self.write(self.metrics, lambda: _append_metrics(self.metrics, record))
        self.console.print(_summary(record, self.cfg["epochs"]), markup=False, soft_wrap=True)
        if self.world.root:
            for callback in self.callbacks:
                callback.on_epoch_end(record, state.history, self.model)

    def stopped_early(self) -> bool:
        """A callback's reason to stop (early stopping), said once; False to go on. Every
        rank holds the same (reduced) history; agreeing on the answer keeps them in step."""
        reasons = [c.stop_reason(self.state.history) for c in self.callbacks]
        reasons = [r for r in reasons if r]
        if not self.world.agree(bool(reasons)):
            return False
        self.console.print(reasons[0] if reasons else "stopped early", markup=False, soft_wrap=True)
        return True
