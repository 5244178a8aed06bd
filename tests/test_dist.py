"""Data-parallel training on MPI (mpi4py): sharding and launch checks in process, and real
`mpiexec -n 2 python -m mpi4py -m cnnspec train` runs as subprocesses: the same curve as one
process, batch norm kept identical on the ranks, a killed or hung rank ending the job with the
last checkpoint intact, and resuming with another number of processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli_train import TINY  # the same tiny digits network as the one-process tests

from cnnspec.train import Batches, Dataset, learning_rate, load_checkpoint
from cnnspec.train.dist import (
    DistError,
    Local,
    Watchdog,
    adapt_resumed,
    check_slurm,
    scale_learning_rate,
    world,
)

REPO = Path(__file__).resolve().parent.parent
MPIEXEC = shutil.which(
    "mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
)
try:
    import mpi4py  # noqa: F401  (the package only: MPI itself is never initialised here)

    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(
    not (HAVE_MPI4PY and MPIEXEC),
    reason="needs mpi4py and mpiexec: pip install -e '.[dist]'",
)
LAUNCH_TIMEOUT = 240  # seconds; a run here takes a few


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "NUMBA_NUM_THREADS": "1"}


def _mpi_command(n: int, *args) -> list[str]:
    return [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", *map(str, args)]


def _mpi_train(n: int, *args) -> subprocess.CompletedProcess:
    cmd = _mpi_command(n, "-m", "cnnspec", "train", *args, "--no-progress")
    return subprocess.run(
        cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


# ---------------------------------------------------------------- in process


def _digits_like(n: int) -> Dataset:
    x = np.arange(n * 16, dtype=np.float32).reshape(n, 1, 4, 4) / (n * 16)
    return Dataset(x, np.arange(n, dtype=np.int64) % 3, 3, "ramp")


def test_shards_are_the_one_process_batch_split_between_ranks():
    ds, b, replicas = _digits_like(23), 4, 2  # 23 images: one dropped so both ranks get 11

    def epochs(shard, batch):
        batches = Batches(
            ds,
            batch,
            shuffle=True,
            rng=np.random.default_rng(7),
            drop_last=True,
            crop_padding=1,
            hflip=True,
            shard=shard,
        )
        return len(batches), [(x.copy(), y.copy()) for x, y, _ in batches.epoch()]

    steps_one, one = epochs(None, b * replicas)
    parts = [epochs((r, replicas), b) for r in range(replicas)]
    assert [p[0] for p in parts] == [steps_one] * replicas == [2] * replicas  # equal counts
    for step, (x, y) in enumerate(one):
        # rank r holds the global batch's images r, r + N, r + 2N, ... (augmented alike)
        for r, (_, shard_batches) in enumerate(parts):
            xs, ys = shard_batches[step]
            np.testing.assert_array_equal(xs, x[r::replicas])
            np.testing.assert_array_equal(ys, y[r::replicas])
    with pytest.raises(ValueError, match="drop_last"):
        Batches(ds, b, shuffle=True, rng=np.random.default_rng(0), shard=(0, 2))


def test_plain_process_is_local_and_does_not_start_mpi():
    assert type(world({})) is Local
    assert type(world({"PMI_SIZE": "1", "PMI_RANK": "0"})) is Local
    assert "mpi4py.MPI" not in sys.modules


def test_slurm_world_size_must_match_its_tasks():
    srun_step = {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "4"}
    with pytest.raises(DistError, match="srun --mpi=pmix"):
        check_slurm(1, srun_step)  # srun without PMI: four one-process jobs
    with pytest.raises(DistError, match="mpiexec -n 4"):
        check_slurm(2, {"SLURM_NTASKS": "4"})
    check_slurm(4, srun_step)
    check_slurm(1, {"SLURM_NTASKS": "4"})  # one process in the batch script: allowed
    check_slurm(1, {})


def test_scale_lr_warms_up_from_the_one_process_rate_to_n_times_it():
    cfg = {"lr": 0.1, "epochs": 20}
    note = scale_learning_rate(cfg, 4)
    assert cfg["lr"] == pytest.approx(0.4) and cfg["warmup_epochs"] == 5
    assert learning_rate(cfg, 0) == pytest.approx(0.1)  # Goyal et al.: start at lr
    assert learning_rate(cfg, 2.5) == pytest.approx(0.25)  # linear in between
    assert learning_rate(cfg, 5) == pytest.approx(0.4)
    assert "lr 0.1 x 4 = 0.4, warm-up over 5 epochs from 0.1" in note
    short = {"lr": 0.1, "epochs": 4}
    scale_learning_rate(short, 2)
    assert short["warmup_epochs"] == 2  # at most half the run
    given = {"lr": 0.1, "epochs": 20, "warmup_epochs": 1}
    scale_learning_rate(given, 2)
    assert given["warmup_epochs"] == 1 and "warmup_start_factor" not in given  # kept


def test_watchdog_aborts_when_steps_stop_coming():
    fired, messages = threading.Event(), []

    def abort(message):
        messages.append(message)
        fired.set()

    with Watchdog(0.05, abort) as dog:
        dog.beat()  # armed by the first step; no further beat follows
        assert fired.wait(LAUNCH_TIMEOUT)
    assert "no training step finished for 0.05 s (--step-timeout)" in messages[0]


def test_step_timeout_watches_a_one_process_run_and_then_goes(cli, spec, tmp_path):
    result = cli("train", spec, "--out", tmp_path / "run", "--epochs", 1, "--step-timeout", 600)
    assert result.exit_code == 0, result.output
    assert not [t for t in threading.enumerate() if t.name == "cnnspec-watchdog"]
    assert "mpi4py.MPI" not in sys.modules  # a plain run never starts MPI


def test_resuming_mid_epoch_with_more_processes_continues_after_the_images_seen():
    class State:
        world_size, global_batch, step, loss_sum = 1, 16, 10, 5.0

    state = State()
    text = adapt_resumed(state, 2, 32, 17)
    assert state.step == 5 and state.loss_sum == pytest.approx(2.5)  # same mean loss so far
    assert "1-process run with 2 processes: 16 -> 32 images per step" in text
    assert (state.world_size, state.global_batch) == (2, 32)
    same = State()
    assert adapt_resumed(same, 1, 16, 35) is None and same.step == 10


# ---------------------------------------------------------------- under mpiexec


@needs_mpi
def test_two_processes_follow_the_one_process_curve(cli, spec, tmp_path):
    """Global batch 32 either way, same seed, with augmentation: one epoch (35 steps)."""
    flags = ["--epochs", 1, "--crop-padding", 1, "--hflip"]
    one, two = tmp_path / "one", tmp_path / "two"
    result = cli("train", spec, "--out", one, "--batch-size", 32, "--no-progress", *flags)
    assert result.exit_code == 0, result.output
    run = _mpi_train(2, spec, "--out", two, "--batch-size", 16, *flags)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 processes x batch 16 = 32 per step" in run.stdout
    assert run.stdout.count("epoch 1/1") == 1  # only rank 0 prints
    a, b = _metrics(one)[0], _metrics(two)[0]
    # float32 sums in another order (two halves, then the allreduce): ~1e-7 relative here
    for key in ("train_loss", "val_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-5), key
    assert (b["train_acc"], b["val_acc"]) == (a["train_acc"], a["val_acc"])
    params_one, _ = load_checkpoint(one / "last.npz")
    params_two, meta = load_checkpoint(two / "last.npz")
    assert meta["world_size"] == 2
    for key, value in params_one.items():
        if key.startswith("param/"):
            np.testing.assert_allclose(params_two[key], value, atol=1e-5, err_msg=key)


BN_SCRIPT = """
import sys
import numpy as np
from cnnspec.network import build
from cnnspec.spec.load import load_file
from cnnspec.train import fit, load_builtin_digits, split_dataset
from cnnspec.train.dist import world

net = build(load_file(sys.argv[1]))
processes = world()
train, val = split_dataset(load_builtin_digits("train"), 0.2, 0)
model = net.compile(batch_size=16, seed=0)
cfg = {"epochs": 2, "lr": 0.05, "momentum": 0.9}
fit(model, train, val, cfg, sys.argv[2], progress=False, world=processes)
np.savez(f"{sys.argv[2]}/rank{processes.rank}.npz", **model.params)
"""

BN_SPEC = """
name: tiny-bn
input: [1, 8, 8]
layers:
  - {name: conv, type: conv2d, filters: 8, kernel: 3, padding: same, bias: false}
  - {name: bn, type: batchnorm2d}
  - {name: relu, type: relu}
  - {name: pool, type: maxpool2d, kernel: 2}
  - {name: fc, type: dense, units: 10}
  - {name: prob, type: softmax}
"""


@needs_mpi
def test_batch_norm_statistics_agree_across_ranks(tmp_path):
    (tmp_path / "bn.yaml").write_text(BN_SPEC)
    (tmp_path / "train_bn.py").write_text(BN_SCRIPT)
    out = tmp_path / "run"
    cmd = _mpi_command(2, tmp_path / "train_bn.py", tmp_path / "bn.yaml", out)
    run = subprocess.run(
        cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT
    )
    assert run.returncode == 0, run.stdout + run.stderr
    records = _metrics(out)
    assert records[-1]["val_acc"] > 0.5  # it trains: far above chance (0.1)
    with np.load(out / "rank0.npz") as r0, np.load(out / "rank1.npz") as r1:
        mean, var = r0["bn.running_mean"], r0["bn.running_var"]
        assert np.abs(mean).max() > 1e-3 and np.abs(var - 1).max() > 1e-3  # they were updated
        for key in r0.files:  # the same weights and statistics on both ranks, bit for bit
            np.testing.assert_array_equal(r1[key], r0[key], err_msg=key)
    saved, meta = load_checkpoint(out / "last.npz")
    np.testing.assert_array_equal(saved["param/bn.running_mean"], mean)
    assert meta["world_size"] == 2


def _rank_pid(out: Path, rank: int) -> int | None:
    """The process of ``rank`` among the ones training into ``out`` (MPICH or Open MPI)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmdline and b"-m" in cmdline and b"cnnspec" in cmdline:
            ranks = {f"{v}={rank}".encode() for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK")}
            if ranks & set(environ):
                return int(entry.name)
    return None


def _start_long_run(spec: Path, out: Path, *flags) -> subprocess.Popen:
    """A 2-process run of many epochs, returned once its first checkpoint is on disk."""
    cmd = _mpi_command(
        2, "-m", "cnnspec", "train", spec, "--out", out, "--batch-size", 16,
        "--epochs", 10000, "--no-progress", *flags,
    )  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    for _ in range(LAUNCH_TIMEOUT * 10):  # polls until the file exists; no timing is asserted
        if (out / "last.npz").exists() or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert (out / "last.npz").exists(), proc.communicate(timeout=LAUNCH_TIMEOUT)
    return proc


def _signal_rank(spec: Path, out: Path, rank: int, sig: int, *flags) -> tuple[int, str]:
    """Send ``sig`` to one rank of a long 2-process run; the job's exit code and stderr."""
    proc = _start_long_run(spec, out, *flags)
    pid = _rank_pid(out, rank)
    try:
        assert pid is not None
        os.kill(pid, sig)
        _, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if pid is not None and sig == signal.SIGSTOP:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # ended with the job, as it should
                pass
    return proc.returncode, stderr


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_killed_rank_ends_the_job_and_resume_works_with_one_and_two_processes(cli, spec, tmp_path):
    out = tmp_path / "run"
    code, _ = _signal_rank(spec, out, 1, signal.SIGKILL)
    assert code != 0
    _, meta = load_checkpoint(out / "last.npz")  # intact: loads, and is a full state
    done = meta["epoch"]
    assert done >= 1 and meta["world_size"] == 2
    # the metrics line of an epoch follows its checkpoint, so it may be one behind
    assert [r["epoch"] for r in _metrics(out)] in (list(range(1, n + 1)) for n in (done, done - 1))

    result = cli("train", spec, "--out", out, "--epochs", done + 1, "--resume", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "resuming a 2-process run with 1 process: 32 -> 32 images per step" in result.output
    run = _mpi_train(2, spec, "--out", out, "--batch-size", 8, "--epochs", done + 2, "--resume")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "resuming a 1-process run with 2 processes: 32 -> 16 images per step" in run.stdout
    records = _metrics(out)
    assert [r["epoch"] for r in records] == list(range(1, done + 3))
    assert records[-1]["val_acc"] > 0.5
    assert load_checkpoint(out / "last.npz")[1]["world_size"] == 2


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_hung_rank_is_aborted_by_the_step_timeout(spec, tmp_path):
    out = tmp_path / "run"
    # a stopped rank hangs: rank 0 would wait in the allreduce for ever
    code, stderr = _signal_rank(spec, out, 1, signal.SIGSTOP, "--step-timeout", 3)
    assert code != 0
    assert "no training step finished for 3 s (--step-timeout)" in stderr
    assert load_checkpoint(out / "last.npz")[1]["epoch"] >= 1


@needs_mpi
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds ranks through /proc")
def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(cli, spec, tmp_path):
    """Each rank's flag changes whenever its signal arrives; the ranks agree on it in the
    step's allreduce (and at the epoch's end), else one would save while the other waits."""
    out = tmp_path / "run"
    code, stderr = _signal_rank(spec, out, 0, signal.SIGINT)
    assert code == 130, stderr
    assert "interrupted:" in stderr and "continue with --resume" in stderr
    _, meta = load_checkpoint(out / "last.npz")
    result = cli("train", spec, "--out", out, "--epochs", meta["epoch"] + 1, "--resume")
    assert result.exit_code == 0, result.output
    assert "resuming a 2-process run with 1 process" in result.output
    assert [r["epoch"] for r in _metrics(out)] == list(range(1, meta["epoch"] + 2))
