"""Memory computed before allocating: the estimate bounds what a compiled model really takes,
and a model that cannot fit is refused with the figure and the largest batch that fits."""

import json

import numpy as np
import pytest
from test_cli_train import TINY
from test_dist import _mpi_train, needs_mpi

import cnnspec
from cnnspec.memory import LIMIT_ENV, MemoryLimitError, available, check_fits, estimate


def allocated(model) -> int:
    """Bytes of every distinct array a compiled training model holds, plus SGD's state."""
    arrays = {}

    def add(a):
        while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
            a = a.base
        if isinstance(a, np.ndarray):
            arrays[id(a)] = a

    for a in [*model.buf.values(), *model.dbuf.values(), model.flat_params, model.flat_grads]:
        add(a)
    add(model.flat_fixed)
    for parts in model.fan_in_sums.values():
        for a in parts:
            add(a)
    for a in model._stager.slots if model._stager else []:
        add(a)
    for info in model.infos:
        for a in vars(info.layer).values():
            add(a)
    sgd = model.flat_params.nbytes  # momentum buffers
    return sum(a.nbytes for a in arrays.values()) + sgd


@pytest.mark.parametrize("spec", ["specs/lenet5.yaml", "specs/resnet20-cifar.yaml"])
def test_estimate_bounds_what_the_model_allocates(spec, monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "off")
    net = cnnspec.load(spec)
    model = net.compile(batch_size=4)
    model.stage(np.zeros((4, *net.input_shape), np.float32))  # as the trainer does
    real, guess = allocated(model), estimate(net, 4).total
    assert real <= guess <= 1.6 * real, (real, guess)


def test_too_large_a_batch_is_refused_with_the_largest_that_fits(monkeypatch):
    net = cnnspec.load("specs/lenet5.yaml")
    budget = estimate(net, 100).total
    monkeypatch.setenv(LIMIT_ENV, str(budget))
    with pytest.raises(MemoryLimitError) as info:
        net.compile(batch_size=1000)
    message = str(info.value)
    assert message.startswith("training lenet5 at batch 1000 needs about ")
    assert f"but {LIMIT_ENV}={budget} is" in message
    fits = int(message.rsplit("--batch-size ", 1)[1].rstrip(")"))
    assert estimate(net, fits).total <= budget < estimate(net, fits + 1).total
    assert 100 <= fits < 1000
    check_fits(net, fits)  # and that one passes


def test_a_network_that_fits_nowhere_says_so(monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "1G")
    net = cnnspec.loads(
        "input: [3, 1000, 1000]\nlayers:\n  - {type: dense, units: 1000000}\n  - {type: softmax}\n"
    )
    with pytest.raises(MemoryLimitError, match="parameters 10.91 TiB.*not even one image fits"):
        net.compile(batch_size=1, training=False)


def test_available_memory_and_its_override(monkeypatch):
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    room, source = available()
    assert room > 0 and ("MemAvailable" in source or "cgroup" in source)
    monkeypatch.setenv(LIMIT_ENV, "512M")
    assert available() == (512 << 20, f"{LIMIT_ENV}=512M")
    monkeypatch.setenv(LIMIT_ENV, "off")
    assert available() is None
    monkeypatch.setenv(LIMIT_ENV, "lots")
    with pytest.raises(MemoryLimitError, match="not a size"):
        available()


def test_cli_summary_shows_training_memory_and_train_refuses_before_work(cli, monkeypatch):
    result = cli("summary", "specs/lenet5.yaml", "--batch-size", "64")
    assert result.exit_code == 0
    assert "training at batch 64 takes about" in result.stdout and "activations" in result.stdout
    result = cli("summary", "specs/lenet5.yaml", "--batch-size", "64", "--json")
    memory = json.loads(result.stdout)["training_memory"]
    assert memory["batch_size"] == 64 and memory["bytes"] == sum(
        v for k, v in memory.items() if k not in ("batch_size", "bytes")
    )
    monkeypatch.setenv(LIMIT_ENV, "3M")
    result = cli("train", "specs/lenet5.yaml", "--out", "/nonexistent/never", "--no-progress")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "training lenet5 at batch 64 needs about" in result.output
    assert "the largest batch that fits is" in result.output
    assert "training lenet5 on" not in result.output  # refused before loading any data


def test_the_cgroup_chain_limits_the_room(tmp_path):
    """A SLURM job's or container's limit may sit on any cgroup above the process's own."""
    from cnnspec.memory import _cgroup_room

    root = tmp_path / "cgroup"
    job = root / "slurm" / "job_7" / "step_0"
    job.mkdir(parents=True)
    (root / "slurm" / "job_7" / "memory.max").write_text(f"{8 << 30}\n")
    (root / "slurm" / "job_7" / "memory.current").write_text(f"{3 << 30}\n")
    (job / "memory.max").write_text("max\n")
    (job / "memory.current").write_text(f"{1 << 30}\n")
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/slurm/job_7/step_0\n")
    assert _cgroup_room(str(proc), root) == 5 << 30
    v1 = root / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{1 << 29}\n")
    (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    proc.write_text("4:memory:/docker/abc\n0::/\n")
    assert _cgroup_room(str(proc), root) == (2 << 30) - (1 << 29)
    proc.write_text("4:memory:/\n")
    assert _cgroup_room(str(proc), root) is None  # no limit anywhere


def test_processes_on_one_machine_share_its_memory(monkeypatch):
    net = cnnspec.load("specs/lenet5.yaml")
    need = estimate(net, 64).total
    monkeypatch.setenv(LIMIT_ENV, str(need + need // 2))
    check_fits(net, 64)  # one process fits
    with pytest.raises(MemoryLimitError, match="shared by 2 processes on this machine"):
        check_fits(net, 64, sharing=2)


@needs_mpi
def test_under_mpi_the_ranks_of_a_node_share_its_memory(tmp_path, monkeypatch):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY)
    net = cnnspec.load(spec)
    need = estimate(net, 32).total
    monkeypatch.setenv(LIMIT_ENV, str(need + need // 2))  # the ranks inherit it
    result = _mpi_train(2, spec, "--out", tmp_path / "run", "--batch-size", "32")
    assert result.returncode == 1, result.stderr
    assert "shared by 2 processes on this machine" in result.stderr
    assert result.stderr.count("error:") == 1  # process 0 speaks for both
