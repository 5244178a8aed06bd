"""SGD parity with torch.optim.SGD and learning-rate schedules against torch's schedulers."""

import numpy as np
import pytest
import torch

from cnnspec.train.optim import SGD
from cnnspec.train.schedules import learning_rate, validate_schedule

SHAPES = {"w": (5, 3, 3, 3), "b": (5,), "fc": (10, 20)}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def make_grads(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [
        (0.0, False, 0.0),
        (0.0, False, 5e-4),
        (0.9, False, 0.0),
        (0.9, False, 1e-2),
        (0.9, True, 0.0),
        (0.8, True, 1e-3),
    ],
)
def test_sgd_matches_torch(momentum, nesterov, weight_decay):
    params = make_params()
    tparams = {k: torch.tensor(v.copy(), requires_grad=True) for k, v in params.items()}
    storage = {k: v for k, v in params.items()}  # the arrays must be updated in place
    opt = SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    topt = torch.optim.SGD(
        tparams.values(), lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    rng = np.random.default_rng(1)
    for step, lr in enumerate([0.1, 0.1, 0.05, 0.2, 0.01, 0.1]):
        grads = make_grads(rng)
        for k, t in tparams.items():
            t.grad = torch.from_numpy(grads[k].copy())
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(grads, lr=lr)
        for k in SHAPES:
            assert params[k] is storage[k]
            np.testing.assert_allclose(
                params[k],
                tparams[k].detach().numpy(),
                atol=1e-6,
                rtol=0,
                err_msg=f"{k} step {step}",
            )
    assert opt.steps == 6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.0, False, 5e-4), (0.9, False, 0.0),
                                         (0.9, True, 1e-2)],
)  # fmt: skip
def test_sgd_kernel_matches_its_numpy_stand_in_bit_for_bit(dtype, first, momentum, nesterov,
                                                           weight_decay):  # fmt: skip
    """The one-pass kernel and the numpy passes that stand in for it on a first run: the
    same bits, subnormal flushes, NaN and infinities included (numpy in chunks of 7)."""
    from cnnspec.kernels.cpu import optim

    tiny = np.finfo(dtype).tiny
    rng = np.random.default_rng(3)
    special = np.array([0, -0.0, np.nan, np.inf, -np.inf, tiny, -tiny * 1.05, tiny * 0.5, 3e-37,
                        tiny * 20, 1e-30, -2.5, 1e3], dtype)  # fmt: skip

    def arrays():
        a = (rng.standard_normal(200) * 10.0 ** rng.integers(-40, 2, 200)).astype(dtype)
        a[rng.integers(0, 200, 40)] = rng.choice(special, 40)
        return a

    p, grad, buf = arrays(), arrays(), arrays()
    t = dtype
    args = (grad, buf, t(0.01), t(momentum), t(weight_decay), nesterov, first, t(tiny))
    floor = t(tiny / 0.01)
    ours = p.copy(), buf.copy()
    with np.errstate(all="ignore"):
        optim._sgd.serial(ours[0], grad, ours[1], *args[2:], floor)
        scratch = (np.empty(7, dtype), np.empty(7, dtype), np.empty(7, bool))
        ref = p.copy(), buf.copy()
        optim._sgd_numpy(ref[0], grad, ref[1], *args[2:], floor, scratch)
    np.testing.assert_array_equal(ours[0].view(np.uint8), ref[0].view(np.uint8))
    np.testing.assert_array_equal(ours[1].view(np.uint8), ref[1].view(np.uint8))
    if momentum:  # nothing subnormal stored, NaN kept
        stored = np.abs(ours[1])
        assert not np.any((stored > 0) & (stored < tiny))
        assert np.isnan(ours[1]).any()


def test_sgd_flushes_subnormal_momentum_as_torch_with_flush_denormal():
    """A parameter whose gradient stops (a dead unit's, without weight decay): its momentum
    decays by 0.9 a step and would spend ~150 steps subnormal. Ours is 0 where torch's
    entry is subnormal, torch's own otherwise, and torch's exactly with
    torch.set_flush_denormal(True); the parameters as torch's."""
    grad = np.full(4, 1e-3, np.float32) * np.array([1, -2, 3, 0.5], np.float32)
    for flush in [False, True]:
        params = {"w": np.ones(4, np.float32)}
        opt = SGD(params, lr=0.01, momentum=0.9)
        tw = torch.ones(4, requires_grad=True)
        topt = torch.optim.SGD([tw], lr=0.01, momentum=0.9)
        subnormal_steps = 0
        if flush and not torch.set_flush_denormal(True):
            pytest.skip("torch cannot flush denormals on this CPU (no SSE3)")
        try:
            for step in range(900):
                g = grad if step == 0 else np.zeros(4, np.float32)
                tw.grad = torch.from_numpy(g.copy())
                topt.step()
                opt.step({"w": g})
                theirs = topt.state[tw]["momentum_buffer"].numpy()
                ours = opt._buffers["w"]
                sub = (theirs != 0) & (np.abs(theirs) < np.finfo(np.float32).tiny)
                subnormal_steps += bool(sub.any())
                np.testing.assert_array_equal(ours, np.where(sub, 0, theirs))
                np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-6)
        finally:
            torch.set_flush_denormal(False)
        assert (subnormal_steps > 100) != flush  # torch's own buffers went subnormal
        assert not ours.any()  # and reached 0 (at ~830 steps)


def test_sgd_update_of_a_large_array_runs_its_parallel_build():
    """Above SERIAL_BELOW elements on more than one thread: the prange build, the same bits
    as the serial one."""
    import numba

    from cnnspec.kernels.cpu import optim

    rng = np.random.default_rng(0)
    n = 1 << 16
    p, g, buf = (rng.standard_normal(n).astype(np.float32) for _ in range(3))
    scratch = (np.empty(n, np.float32), np.empty(n, np.float32), np.empty(n, bool))
    ref = p.copy(), buf.copy()
    t = np.float32
    args = (t(0.1), t(0.9), t(1e-4), True, False, t(np.finfo(t).tiny), t(np.finfo(t).tiny / 0.1))
    optim._sgd.serial(ref[0], g, ref[1], *args)
    threads = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        optim.sgd_update(p, g, buf, 0.1, 0.9, 1e-4, True, False, scratch)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(p, ref[0])
    np.testing.assert_array_equal(buf, ref[1])


def test_sgd_updates_only_given_keys_and_does_not_touch_grads():
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    opt = SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    grads = {"b": np.ones(5, np.float32)}
    opt.step(grads)
    np.testing.assert_array_equal(params["w"], before["w"])
    np.testing.assert_array_equal(grads["b"], np.ones(5, np.float32))
    np.testing.assert_allclose(params["b"], before["b"] - 0.5 * (1 + 0.1 * before["b"]), rtol=1e-6)
    assert set(opt.state_dict()) == {"steps", "momentum_buffer/b"}


def test_sgd_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    grads = [make_grads(rng) for _ in range(5)]
    a = SGD(make_params(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    for g in grads[:2]:
        a.step(g)
    state = a.state_dict()
    b = SGD(
        {k: v.copy() for k, v in a.params.items()},
        lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-3,
    )
    b.load_state_dict(state)
    for g in grads[2:]:
        a.step(g)
        b.step(g)
    for k in SHAPES:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert b.steps == 5
    with pytest.raises(ValueError, match="unknown"):
        b.load_state_dict({**state, "momentum_buffer/zz": np.zeros(1)})


SMALL_NET = """
input: [2, 6, 6]
layers:
  - {type: conv2d, name: conv, filters: 3, kernel: 3}
  - {type: relu, name: act}
  - {type: dense, name: fc, units: 4}
  - {type: softmax, name: out}
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(
    "momentum, nesterov, weight_decay",
    [(0.0, False, 0.0), (0.0, False, 5e-4), (0.9, False, 1e-2), (0.8, True, 1e-3)],
)
def test_flat_sgd_of_a_model_matches_sgd_bit_for_bit(
    monkeypatch, dtype, momentum, nesterov, weight_decay
):
    """The CPU backend's optimizer updates the model's flat arrays in one pass: the same bits
    as SGD's numpy passes, also across a change of settings and a state_dict round trip
    (a partial momentum state takes SGD's own path)."""
    import cnnspec
    from cnnspec.train.optim import FlatSGD

    model = cnnspec.loads(SMALL_NET).compile(batch_size=2, dtype=dtype)
    flat = model.backend.optimizer(
        model, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay
    )
    assert isinstance(flat, FlatSGD)
    ref = {k: model.params[k].copy() for k in sorted(model.trainable)}
    opt = SGD(ref, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    per_parameter = []
    step = SGD.step
    monkeypatch.setattr(SGD, "step", lambda s, *a, **k: (per_parameter.append(s), step(s, *a, **k)))
    rng = np.random.default_rng(5)

    def both(lr):
        model.flat_grads[...] = rng.standard_normal(model.flat_grads.size)
        flat.step(model.grads, lr=lr)
        opt.step({k: g.copy() for k, g in model.grads.items()}, lr=lr)
        for k in ref:
            np.testing.assert_array_equal(model.params[k], ref[k], err_msg=k)

    for lr in [0.1, 0.05, 0.2]:
        both(lr)
    flat.configure(0.9, True, 1e-3)  # momentum starts (or goes on) with other settings
    opt.configure(0.9, True, 1e-3)
    both(0.1)
    both(0.3)
    assert flat not in per_parameter  # every step above took the one-pass path
    state = flat.state_dict()
    assert state.keys() == opt.state_dict().keys()
    for k, v in opt.state_dict().items():
        np.testing.assert_array_equal(state[k], v)
    fresh = FlatSGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    fresh.load_state_dict(state)
    flat = fresh
    both(0.1)
    assert flat not in per_parameter
    state = flat.state_dict()
    del state["momentum_buffer/fc.bias"]  # a partial state: that buffer starts afresh
    fresh = FlatSGD(model, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    fresh.load_state_dict(state)
    opt._has_buffer["fc.bias"] = False
    flat = fresh
    both(0.1)
    assert flat in per_parameter
    both(0.1)


def test_sgd_rejects_bad_settings():
    with pytest.raises(ValueError, match="nesterov"):
        SGD(make_params(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="floating"):
        SGD({"i": np.zeros(3, np.int64)}, lr=0.1)


# ---------------------------------------------------------------- schedules


def torch_lrs(make_scheduler, epochs, lr=0.1):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make_scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def ours(cfg, epochs):
    validate_schedule(cfg)
    return [learning_rate(cfg, e) for e in range(epochs)]


def test_constant():
    assert ours({"lr": 0.3}, 4) == [0.3] * 4


def test_step_matches_steplr():
    S = torch.optim.lr_scheduler
    ref = torch_lrs(lambda o: S.StepLR(o, step_size=3, gamma=0.5), 12)
    np.testing.assert_allclose(
        ours({"lr": 0.1, "schedule": "step", "step_size": 3, "gamma": 0.5}, 12), ref, rtol=1e-12
    )


def test_multistep_matches_multisteplr():
    S = torch.optim.lr_scheduler
    ref = torch_lrs(lambda o: S.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.1), 12)
    cfg = {"lr": 0.1, "schedule": "multistep", "milestones": [9, 2, 5], "gamma": 0.1}
    np.testing.assert_allclose(ours(cfg, 12), ref, rtol=1e-12)


def test_cosine_matches_cosineannealinglr():
    S = torch.optim.lr_scheduler
    ref = torch_lrs(lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=1e-3), 11)
    cfg = {"lr": 0.1, "schedule": "cosine", "epochs": 10, "min_lr": 1e-3}
    np.testing.assert_allclose(ours(cfg, 11), ref, rtol=1e-9)
    assert learning_rate(cfg, 25) == pytest.approx(1e-3)  # stays at the floor afterwards


def test_warmup_matches_linearlr():
    S = torch.optim.lr_scheduler
    ref = torch_lrs(lambda o: S.LinearLR(o, start_factor=0.1, total_iters=4), 8)
    np.testing.assert_allclose(ours({"lr": 0.1, "warmup_epochs": 4}, 8), ref, rtol=1e-12)


def test_warmup_then_cosine_matches_sequentiallr():
    S = torch.optim.lr_scheduler

    def make(o):
        warm = S.LinearLR(o, start_factor=0.1, total_iters=3)
        cos = S.CosineAnnealingLR(o, T_max=9, eta_min=0.0)
        return S.SequentialLR(o, [warm, cos], milestones=[3])

    ref = torch_lrs(make, 13)
    np.testing.assert_allclose(
        ours({"lr": 0.1, "schedule": "cosine", "epochs": 12, "warmup_epochs": 3}, 13),
        ref,
        rtol=1e-9,
        atol=1e-15,
    )


def test_fractional_epochs_are_smooth():
    cfg = {"lr": 1.0, "schedule": "cosine", "epochs": 10, "warmup_epochs": 2}
    values = [learning_rate(cfg, e / 10) for e in range(101)]
    assert values[0] == pytest.approx(0.1) and max(values) == pytest.approx(1.0)
    assert learning_rate(cfg, 1.0) == pytest.approx(0.55)
    assert all(b >= a for a, b in zip(values[:20], values[1:21], strict=True))
    assert all(b <= a for a, b in zip(values[20:-1], values[21:], strict=True))
    assert learning_rate({"lr": 1.0, "schedule": "step", "step_size": 2}, 1.999) == 1.0


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"lr": 0.1, "schedule": "exponential"}, "'schedule' must be one of 'constant'"),
        ({"lr": 0.1, "schedule": "cosin"}, "got 'cosin'; did you mean 'cosine'"),
        ({"lr": 0.1, "schedule": "step"}, "the step schedule needs step_size"),
        ({"lr": 0.1, "schedule": "multistep"}, "milestones"),
        ({"lr": 0.1, "schedule": "cosine"}, "epochs"),
        ({"lr": 0.1, "schedule": "cosine", "epochs": 3, "warmup_epochs": 3}, "epochs greater"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"lr": 0.1, "schedule": "step", "step_size": 0}, "step_size"),
    ],
)
def test_validate_schedule(cfg, message):
    with pytest.raises(ValueError, match=message):
        validate_schedule(cfg)
