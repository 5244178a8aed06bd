"""Faults in a training run: kill -9 at every checkpoint-write boundary and at a random step,
SIGTERM, a second trainer, an existing run, a changed split, and an --out that cannot be
written. Each must leave a run that resumes to exactly the uninterrupted result, or stop with
one line and nothing lost. The trainer runs the small numpy model of test_train_loop, so a
killed subprocess costs well under a second."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli_train import TINY
from test_dist import _mpi_train, needs_mpi
from test_train_loop import CFG_AUG, FakeModel

from cnnspec.train.checkpoint import load_checkpoint
from cnnspec.train.data import load_builtin_digits, split_dataset
from cnnspec.train.loop import TrainingInterrupted, fit
from cnnspec.train.rundir import LOCK, RunDirError

TESTS = Path(__file__).resolve().parent
CFG = {**CFG_AUG, "epochs": 2, "seed": 0, "val_split": 0.2, "data": "digits"}
ONE_EPOCH = {**CFG, "epochs": 1, "warmup_epochs": 0}
STEPS = 320 // 32  # per epoch


def data():
    train, val = split_dataset(load_builtin_digits("train"), 0.2, seed=0)
    return train.subset(np.arange(320)), val.subset(np.arange(100))


def run(out, resume=False, overwrite=False, cfg=CFG, model=None):
    return fit(
        model or FakeModel(),
        *data(),
        cfg,
        out,
        resume=resume,
        overwrite=overwrite,
        progress=False,
    )


def run_killed(out, fault):
    """Train in a subprocess that $CNNSPEC_FAULT kills (SIGKILL) at ``fault``."""
    code = f"import test_train_faults as t; t.run({str(out)!r})"
    env = {**os.environ, "CNNSPEC_FAULT": fault, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr)


TIMING = ("seconds", "images_per_s")


def untimed(obj):
    if isinstance(obj, dict):
        return {k: untimed(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [untimed(v) for v in obj]
    return obj


def outcome(out):
    """Everything a run leaves, timing aside."""
    result = {}
    for name in ("last.npz", "best.npz"):
        arrays, meta = load_checkpoint(out / name)
        result[name] = ({k: v.tobytes() for k, v in arrays.items()}, untimed(meta))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    result["metrics"] = untimed([json.loads(line) for line in lines])
    result["files"] = sorted(p.name for p in out.iterdir())
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    history = run(out)
    improved = [r["epoch"] for i, r in enumerate(history) if r["val_acc"] > max(
        [h["val_acc"] for h in history[:i]], default=-1)]  # fmt: skip
    assert 2 in improved  # so that epoch 2 writes best.npz: the boundaries below exist
    return outcome(out)


# The K-th time each point is reached: best.npz #2 and last.npz #2 are the saves of epoch 2,
# the last, so no later epoch hides a stale best.npz; metrics.jsonl #1 is the rewrite at the
# start, #3 epoch 2's line.
BOUNDARIES = [
    f"{when}:{name}#{k}"
    for name, k in [("best.npz", 2), ("last.npz", 2), ("metrics.jsonl", 3)]
    for when in ("before", "during", "after")
    if not (when == "during" and name == "metrics.jsonl")
] + ["after:best.npz#1", "after:metrics.jsonl#1", "during:last.npz#1"]
RANDOM_STEP = int(np.random.default_rng().integers(1, 2 * STEPS))


@pytest.mark.parametrize("fault", [*BOUNDARIES, f"step:{RANDOM_STEP}"])
def test_kill_at_any_write_boundary_then_resume_equals_uninterrupted(tmp_path, reference, fault):
    out = tmp_path / "run"
    run_killed(out, fault)
    assert (out / LOCK).exists()  # the dead trainer's
    if (out / "last.npz").exists():
        run(out, resume=True)
    else:  # killed before the first last.npz: nothing to resume, start again
        run(out, overwrite=True)
    assert outcome(out) == reference


def test_a_kill_during_a_write_leaves_a_temporary_file_that_the_next_start_removes(
    tmp_path, capsys
):
    out = tmp_path / "run"
    run_killed(out, "during:last.npz#2")
    assert list(out.glob(".last.npz.*.tmp"))
    run(out, resume=True)
    assert not list(out.glob(".*.tmp")) and not (out / LOCK).exists()
    said = capsys.readouterr().out
    assert "removed 1 unfinished file" in said and "taking over the lock" in said


def test_sigterm_saves_at_the_next_step_and_says_so(tmp_path):
    model = FakeModel()
    model.hook = lambda call: call == STEPS + 3 and os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="terminated \\(SIGTERM\\) at epoch 2") as info:
        run(tmp_path / "run", model=model)
    assert info.value.saved and info.value.signum == signal.SIGTERM
    assert load_checkpoint(tmp_path / "run" / "last.npz")[1]["step"] == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored


def test_a_live_lock_refuses_a_second_trainer_a_dead_ones_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{os.getppid()}\n{os.uname().nodename}\n")  # a live process
    with pytest.raises(RunDirError, match=f"in use by another trainer \\(pid {os.getppid()}\\)"):
        run(out, cfg=ONE_EPOCH)
    assert not (out / "last.npz").exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    (out / LOCK).write_text(f"{dead}\n{os.uname().nodename}\n")
    run(out, cfg=ONE_EPOCH)
    assert f"taking over the lock of an earlier trainer (pid {dead})" in capsys.readouterr().out
    assert not (out / LOCK).exists()


def test_an_existing_run_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, cfg=ONE_EPOCH)
    before = (out / "last.npz").read_bytes()
    with pytest.raises(RunDirError, match="already holds a training run.*--resume.*--overwrite"):
        run(out, cfg=ONE_EPOCH)
    assert (out / "last.npz").read_bytes() == before
    run(out, cfg={**ONE_EPOCH, "lr": 0.1}, overwrite=True)
    assert (out / "last.npz").read_bytes() != before


def test_overwrite_clears_every_file_of_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    run(out, cfg=ONE_EPOCH)
    (out / "tensorboard").mkdir()
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old")
    (out / "metrics.csv.tmp").write_text("half a save")
    old_csv = (out / "metrics.csv").read_text()
    run(out, cfg={**ONE_EPOCH, "lr": 0.1}, overwrite=True)
    assert not (out / "tensorboard").exists()  # no old events mixed into the new curves
    assert not (out / "metrics.csv.tmp").exists()
    assert (out / "metrics.csv").read_text() != old_csv


@pytest.mark.parametrize(
    "key, value, flag", [("seed", 3, "--seed 0"), ("val_split", 0.3, "--val-split 0.2")]
)
def test_resume_refuses_another_split(tmp_path, key, value, flag):
    out = tmp_path / "run"
    run(out, cfg=ONE_EPOCH)
    with pytest.raises(Exception, match=f"started with {key} .*resume with {flag}"):
        run(out, resume=True, cfg={**ONE_EPOCH, key: value})


def test_an_out_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(RunDirError, match="is a file"):
        run(afile)
    with pytest.raises(RunDirError, match="under .*file, which is a file"):
        run(afile / "run")
    with monkeypatch.context() as m:  # a read-only file system (root writes anywhere else)

        def read_only(*args, **kwargs):
            raise OSError(30, "Read-only file system")

        m.setattr(os, "link", read_only)
        with pytest.raises(RunDirError, match="cannot write the run there \\(Read-only file"):
            run(tmp_path / "ro")

    out = tmp_path / "run"
    run(out, cfg=ONE_EPOCH)
    before = (out / "last.npz").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cnnspec.train.loop.save_checkpoint", disk_full)
    with pytest.raises(
        RunDirError,
        match=r"npz: cannot write \(No space left on device\); .*last.npz holds the last",
    ):
        run(out, resume=True, cfg={**ONE_EPOCH, "epochs": 2})
    assert (out / "last.npz").read_bytes() == before
    assert not (out / LOCK).exists()


def test_a_second_sigterm_aborts_at_once_and_exits_as_sigterm(tmp_path):
    model = FakeModel()

    def twice(call):
        if call == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    model.hook = twice
    with pytest.raises(TrainingInterrupted, match="aborted during epoch 1") as info:
        run(tmp_path / "run", model=model)
    assert not info.value.saved and info.value.signum == signal.SIGTERM


@needs_mpi
def test_under_mpi_process_0_holds_the_lock_and_a_refusal_reaches_every_rank(tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(f"{os.getpid()}\n{os.uname().nodename}\n")  # a live trainer
    result = _mpi_train(2, spec, "--out", out, "--epochs", "1")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("in use by another trainer") == 1, result.stderr
    assert not (out / "last.npz").exists()


@needs_mpi
def test_under_mpi_a_failed_write_ends_every_rank_with_one_line(cli, tmp_path):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    out = tmp_path / "run"
    assert cli("train", spec, "--out", out, "--epochs", "1", "--no-progress").exit_code == 0
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()  # process 0 cannot write it: no rank may wait for ever
    (out / "metrics.jsonl" / "x").write_text("")
    result = _mpi_train(2, spec, "--out", out, "--epochs", "2", "--resume")
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("error:") == 1 and "metrics.jsonl: cannot write" in result.stderr
