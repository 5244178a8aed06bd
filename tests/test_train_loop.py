"""The trainer (cnnspec.train.loop) on a small numpy softmax-regression model that implements
the compiled model's protocol, including a running statistic and rng-driven input dropout so
that resuming has real state to get right."""

import io
import json
import os
import signal

import numpy as np
import pytest
from rich.console import Console

from cnnspec.train.checkpoint import CheckpointError, load_checkpoint
from cnnspec.train.data import DataError, Dataset, load_builtin_digits, split_dataset
from cnnspec.train.loop import (
    TrainingDiverged,
    TrainingInterrupted,
    evaluate,
    fit,
    restore_model,
)


class FakeModel:
    """Softmax regression over flattened pixels; the protocol of a compiled model."""

    def __init__(self, batch_size=32, input_shape=(1, 8, 8), num_outputs=10, seed=0, scores=True):
        d = int(np.prod(input_shape))
        rng = np.random.default_rng(seed)
        self.batch_size, self.input_shape, self.num_outputs = (
            batch_size,
            tuple(input_shape),
            num_outputs,
        )
        self.params = {
            "w": (rng.standard_normal((num_outputs, d)) * 0.01).astype(np.float32),
            "b": np.zeros(num_outputs, np.float32),
            "running_mean": np.zeros(d, np.float32),  # not trainable, like BN statistics
        }
        self.trainable = {"w", "b"}
        self.rng = np.random.default_rng(seed + 100)
        self._grads = {"w": np.zeros_like(self.params["w"]), "b": np.zeros_like(self.params["b"])}
        if scores:
            self.last_scores = np.zeros((batch_size, num_outputs), np.float32)
        self.calls = 0
        self.hook = None  # called with the call number at the start of loss_and_grads

    def _scores(self, flat):
        return flat @ self.params["w"].T + self.params["b"]

    def forward(self, x, train=False):
        assert x.shape == (self.batch_size, *self.input_shape) and not train
        return self._scores(x.reshape(len(x), -1))

    def loss_and_grads(self, x, y):
        self.calls += 1
        if self.hook:
            self.hook(self.calls)
        flat = x.reshape(len(x), -1)
        flat = flat * (self.rng.random(flat.shape) > 0.1) / np.float32(0.9)  # input dropout
        self.params["running_mean"] *= 0.9
        self.params["running_mean"] += 0.1 * flat.mean(axis=0)
        s = self._scores(flat)
        s = s - s.max(axis=1, keepdims=True)
        p = np.exp(s) / np.exp(s).sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y]).mean())
        p[np.arange(len(y)), y] -= 1
        p /= len(y)
        np.matmul(p.T, flat, out=self._grads["w"])
        np.sum(p, axis=0, out=self._grads["b"])
        if hasattr(self, "last_scores"):
            self.last_scores[...] = s
        return loss, self._grads


@pytest.fixture(scope="module")
def digits():
    train, val = split_dataset(load_builtin_digits("train"), 0.2, seed=0)
    # Small sets keep every test well under a second.
    return train.subset(np.arange(320)), val.subset(np.arange(100))


CFG = {"epochs": 2, "lr": 0.5, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}
CFG_AUG = {**CFG, "crop_padding": 1, "hflip": True, "schedule": "cosine", "warmup_epochs": 1}


def train(tmp_path, data, cfg, name="run", resume=False, model=None, **kw):
    model = model or FakeModel()
    history = fit(
        model, data[0], data[1], cfg, tmp_path / name, resume=resume, progress=False, **kw
    )
    return model, history


def same_params(a, b):
    return a.params.keys() == b.params.keys() and all(
        np.array_equal(a.params[k], b.params[k]) for k in a.params
    )


def strip_timing(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in history]


def test_learns_digits_and_writes_outputs(tmp_path, digits):
    model, history = train(tmp_path, digits, {**CFG, "epochs": 3})
    out = tmp_path / "run"
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert history[-1]["val_acc"] > 0.8 and history[-1]["train_loss"] < history[0]["train_loss"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == history
    assert set(lines[0]) == {
        "epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s", "seconds"
    }  # fmt: skip
    arrays, meta = load_checkpoint(out / "last.npz")
    assert meta["epoch"] == 3 and meta["step"] == 0
    np.testing.assert_array_equal(arrays["param/w"], model.params["w"])
    assert "param/running_mean" in arrays and "optim/momentum_buffer/w" in arrays
    best_epoch = max(history, key=lambda r: r["val_acc"])["epoch"]
    assert load_checkpoint(out / "best.npz")[1]["epoch"] == best_epoch


def test_summary_line_printed_without_progress_bar(tmp_path, digits, capsys):
    train(tmp_path, digits, {**CFG, "epochs": 1})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # one line per epoch, never wrapped at the console's width
    assert "epoch 1/1" in lines[0] and "val_acc" in lines[0] and "img/s" in lines[0]


def test_same_seed_same_run_other_seed_differs(tmp_path, digits):
    a, ha = train(tmp_path, digits, CFG_AUG, "a")
    b, hb = train(tmp_path, digits, CFG_AUG, "b")
    c, _ = train(tmp_path, digits, {**CFG_AUG, "seed": 1}, "c")
    assert same_params(a, b) and strip_timing(ha) == strip_timing(hb)
    assert not np.array_equal(a.params["w"], c.params["w"])


def test_resume_after_changing_epochs_is_bit_exact(tmp_path, digits):
    full, history = train(tmp_path, digits, CFG, "full")
    train(tmp_path, digits, {**CFG, "epochs": 1}, "split")
    resumed, history2 = train(tmp_path, digits, CFG, "split", resume=True)
    assert same_params(full, resumed)
    assert strip_timing(history) == strip_timing(history2)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2]


def test_ctrl_c_on_last_step_finishes_the_epoch_then_resumes_exactly(tmp_path, digits):
    full, history = train(tmp_path, digits, CFG_AUG, "full")
    model = FakeModel()
    model.hook = lambda call: call == 320 // 32 and os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="interrupted after epoch 1"):
        train(tmp_path, digits, CFG_AUG, "split", model=model)
    assert load_checkpoint(tmp_path / "split" / "last.npz")[1]["step"] == 0
    resumed, history2 = train(tmp_path, digits, CFG_AUG, "split", resume=True)
    assert same_params(full, resumed)
    assert strip_timing(history) == strip_timing(history2)


@pytest.mark.parametrize("scores", [True, False], ids=["last_scores", "extra_forward"])
def test_ctrl_c_mid_epoch_saves_at_step_boundary_and_resumes_exactly(tmp_path, digits, scores):
    full, history = train(tmp_path, digits, CFG_AUG, "full", model=FakeModel(scores=scores))
    steps = 320 // 32

    def press_ctrl_c(call):
        if call == steps + 4:  # during the 4th step of epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    model = FakeModel(scores=scores)
    model.hook = press_ctrl_c
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 4/10") as info:
        train(tmp_path, digits, CFG_AUG, "split", model=model)
    assert info.value.saved
    meta = load_checkpoint(tmp_path / "split" / "last.npz")[1]
    assert (meta["epoch"], meta["step"], meta["global_step"]) == (1, 4, steps + 4)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored

    resumed, history2 = train(
        tmp_path, digits, CFG_AUG, "split", resume=True, model=FakeModel(scores=scores, seed=5)
    )
    assert same_params(full, resumed)
    assert strip_timing(history) == strip_timing(history2)


def test_raw_keyboard_interrupt_saves_nothing(tmp_path, digits):
    model = FakeModel()
    train(tmp_path, digits, {**CFG, "epochs": 1}, "run", model=model)
    last = tmp_path / "run" / "last.npz"
    before = last.read_bytes()

    def interrupt(call):
        if call == 13:
            raise KeyboardInterrupt

    model.hook = interrupt
    with pytest.raises(TrainingInterrupted, match="nothing was saved") as info:
        train(tmp_path, digits, CFG, "run", resume=True, model=model)
    assert not info.value.saved
    assert last.read_bytes() == before


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
    model = FakeModel()
    train(tmp_path, digits, {**CFG, "epochs": 1}, "run", model=model)
    last = tmp_path / "run" / "last.npz"
    before = last.read_bytes()

    def poison(call):
        if call == 13:
            model.params["w"][0, 0] = np.inf

    model.hook = poison
    with pytest.raises(
        TrainingDiverged, match=r"epoch 2, step 3/10 .*learning rate 0.5.*Lower the"
    ):
        train(tmp_path, digits, {**CFG, "epochs": 3}, "run", resume=True, model=model)
    assert last.read_bytes() == before
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_evaluate_is_exact_over_padded_last_batch(digits):
    model = FakeModel(batch_size=32)
    model.params["w"][:] = np.random.default_rng(0).standard_normal(model.params["w"].shape)
    val = digits[1].subset(np.arange(77))  # 2 full batches + 13 images
    result = evaluate(model, val)
    flat = val.x.reshape(77, -1).astype(np.float64)
    scores = flat @ model.params["w"].T.astype(np.float64) + model.params["b"]
    shifted = scores - scores.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    assert result["count"] == 77
    assert result["loss"] == pytest.approx(-log_p[np.arange(77), val.y].mean(), rel=1e-5)
    predicted = scores.argmax(axis=1)
    assert result["accuracy"] == pytest.approx((predicted == val.y).mean())
    confusion = np.array(result["confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 77
    assert confusion.sum(axis=1).tolist() == np.bincount(val.y, minlength=10).tolist()
    top5 = np.argsort(-scores, axis=1)[:, :5]
    assert result["top5"] == pytest.approx((top5 == val.y[:, None]).any(axis=1).mean())


def test_evaluate_without_top5_for_few_outputs():
    rng = np.random.default_rng(0)
    ds = Dataset(rng.random((9, 1, 2, 2), dtype=np.float32), np.arange(9) % 3, 3, "tiny")
    result = evaluate(FakeModel(batch_size=4, input_shape=(1, 2, 2), num_outputs=3), ds)
    assert "top5" not in result and result["count"] == 9


def test_resume_refuses_other_spec_and_missing_checkpoint(tmp_path, digits):
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train(tmp_path, digits, CFG, "none", resume=True)
    train(tmp_path, digits, {**CFG, "epochs": 1, "spec_hash": "a" * 64}, "run")
    with pytest.raises(CheckpointError, match="different spec"):
        train(tmp_path, digits, {**CFG, "spec_hash": "b" * 64}, "run", resume=True)
    other = FakeModel(input_shape=(1, 4, 4))
    with pytest.raises(CheckpointError, match="shape"):
        restore_model(other, tmp_path / "run" / "last.npz")


def test_restore_model_copies_in_place(tmp_path, digits):
    trained, _ = train(tmp_path, digits, {**CFG, "epochs": 1, "spec_hash": "a" * 64})
    fresh = FakeModel(seed=9)
    storage = fresh.params["w"]
    restore_model(fresh, tmp_path / "run" / "best.npz", spec_hash="a" * 64)
    assert fresh.params["w"] is storage and same_params(fresh, trained)


def test_bad_inputs(tmp_path, digits):
    with pytest.raises(DataError, match="fewer than one batch"):
        fit(FakeModel(), digits[0].subset(np.arange(20)), None, CFG, tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="network's input"):
        fit(FakeModel(input_shape=(1, 9, 9)), digits[0], None, CFG, tmp_path / "b", progress=False)
    with pytest.raises(DataError, match="output units"):
        fit(FakeModel(num_outputs=5), digits[0], None, CFG, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="unknown training option"):
        fit(FakeModel(), digits[0], None, {"learning_rate": 0.1}, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="batch_size 64 differs"):
        fit(FakeModel(), digits[0], None, {"batch_size": 64}, tmp_path / "e", progress=False)


def test_without_validation_set_best_follows_train_accuracy(tmp_path, digits):
    model = FakeModel()
    history = fit(model, digits[0], None, {**CFG, "epochs": 2}, tmp_path / "r", progress=False)
    assert history[0]["val_acc"] is None
    assert (tmp_path / "r" / "best.npz").is_file()


def test_progress_bar_renders_on_a_terminal(tmp_path, digits):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    fit(FakeModel(), digits[0], digits[1], {**CFG, "epochs": 2}, tmp_path / "r", console=console)
    text = buffer.getvalue()
    assert "epoch 2/2" in text and "val_acc" in text


STAGED_SPEC = """
input: [1, 8, 8]
layers:
  - {type: conv2d, filters: 4, kernel: 3}
  - {type: relu}
  - {type: maxpool2d, kernel: 2}
  - {type: dropout, rate: 0.1}
  - {type: dense, units: 10}
  - {type: softmax}
"""


def test_batches_handed_a_step_early_train_the_same(tmp_path, digits):
    """The loop hands each batch to the model one step ahead (Model.stage; on a GPU its
    copy overlaps the step before) while Batches refills the same arrays: the run is the
    same, bit for bit, as handing each batch at its step."""
    import cnnspec

    net = cnnspec.loads(STAGED_SPEC)
    staged, plain = (net.compile(batch_size=32) for _ in range(2))
    handed = []
    stage = staged.stage
    staged.stage = lambda x: handed.append(1) or stage(x)
    plain.stage = None  # the loop then hands each batch at its step
    cfg = {**CFG, "epochs": 1, "lr": 0.1, "crop_padding": 1, "hflip": True}
    _, with_staging = train(tmp_path, digits, cfg, "staged", model=staged)
    _, without = train(tmp_path, digits, cfg, "plain", model=plain)
    assert len(handed) == 320 // 32 + 4  # every training and validation batch
    assert strip_timing(with_staging) == strip_timing(without)
    assert same_params(staged, plain)


def test_training_accuracy_needs_no_extra_forward_pass(tmp_path, digits):
    """The training accuracy comes from the scores loss_and_grads computed, from the very
    first step: no eval-mode forward per step (that doubled epoch 1's forward work)."""
    import cnnspec

    model = cnnspec.loads(STAGED_SPEC).compile(batch_size=32)
    forwards = []
    forward = model.forward
    model.forward = lambda *a, **k: forwards.append(k.get("train")) or forward(*a, **k)
    train(tmp_path, digits, {**CFG, "epochs": 1}, model=model)
    assert len(forwards) == 4  # the validation batches only
