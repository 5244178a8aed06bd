"""Batch norm fused into the convs beside it and gradients summed in place (the CPU
backend's plan): the fused model must compute what the unfused one does
(CNNSPEC_FUSION=0), in float32 and float64, train and eval, and match finite
differences."""

import numpy as np
import pytest

import cnnspec
from tests.test_model import _fd_check

# bn1 (+ ReLU) feeds two convs, one strided (applied, no output written), bn2 an add
# (applied as it reads it), bn3 two convs (their gradients add in place), bn4 is kept
NET = """
input: [3, 7, 7]
layers:
  - {name: c1, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: bn1, type: batchnorm2d}
  - {name: r1, type: relu}
  - {name: c2, type: conv2d, filters: 4, kernel: 3, padding: 1, stride: 2}
  - {name: bn2, type: batchnorm2d}
  - {name: short, type: conv2d, filters: 4, kernel: 1, stride: 2, inputs: [r1]}
  - {name: sum, type: add, inputs: [bn2, short]}
  - {name: r2, type: relu}
  - {name: c3, type: conv2d, filters: 5, kernel: 3, padding: 1}
  - {name: bn3, type: batchnorm2d}
  - {name: a, type: conv2d, filters: 3, kernel: 3, padding: 1, inputs: [bn3]}
  - {name: b, type: conv2d, filters: 3, kernel: 1, inputs: [bn3]}
  - {name: ab, type: concat, inputs: [a, b]}
  - {name: c4, type: conv2d, filters: 3, kernel: 2}
  - {name: bn4, type: batchnorm2d}
  - {name: r4, type: relu}
  - {name: c5, type: conv2d, filters: 4, kernel: 1}
  - {name: fc, type: dense, units: 3}
  - {name: prob, type: softmax}
"""


def _pair(monkeypatch, dtype, training=True, keep=(), text=NET, batch=3):
    models = []
    for flag in ("1", "0"):
        monkeypatch.setenv("CNNSPEC_FUSION", flag)
        net = cnnspec.loads(text)
        models.append(
            net.compile(batch_size=batch, seed=3, dtype=dtype, training=training, keep=keep)
        )
    return models


def test_the_plan_fuses_what_it_can(monkeypatch):
    fused, plain = _pair(monkeypatch, np.float32, keep=("bn4",))
    assert fused.norm_stats == {"bn1": "c1", "bn2": "c2", "bn3": "c3", "bn4": "c4"}
    assert fused.unwritten == {"bn1", "bn2", "bn3"}  # bn4 is kept
    assert fused.norm_applied == {"bn1": ["c2", "short"], "bn2": ["sum"], "bn3": ["a", "b"]}
    assert fused.buf["bn1"] is fused.buf["c1"]
    by = {i.name: i.layer for i in fused.infos}
    assert by["a"].accumulate_dx != by["b"].accumulate_dx  # one writes, one adds
    assert by["c2"].accumulate_dx or by["short"].accumulate_dx  # r1's two readers
    assert fused.dbuf["bn2"] is fused.dbuf["short"]  # the add writes its gradient once
    assert not fused.fan_in_sums
    assert not plain.unwritten and not plain.norm_stats and plain.fan_in_sums
    # the conv that alone reads a norm's output takes the norm's backward sums
    sums = {i.name for i in fused.infos if getattr(i.layer, "sums_in_reader", False)}
    assert sums == set()  # bn1, bn3: two readers; bn2: an add; bn4: kept
    whole, _ = _pair(monkeypatch, np.float32)
    assert {i.name for i in whole.infos if getattr(i.layer, "sums_in_reader", False)} == {"bn4"}
    assert whole._by_name["c5"].layer.dx_sums[1] is whole._by_name["bn4"].layer.dx_sums


def test_a_norm_of_the_input_writes_its_output(monkeypatch):
    """The input's buffer is replaced by a staged batch's slot: a norm reading it is
    not left for its readers to apply (they would read the old buffer)."""
    text = NET.replace("input: [3, 7, 7]\nlayers:\n", "input: [3, 7, 7]\nlayers:\n"
                       "  - {name: bn0, type: batchnorm2d}\n")  # fmt: skip
    fused, plain = _pair(monkeypatch, np.float32, text=text)
    assert "bn0" not in fused.unwritten and "bn1" in fused.unwritten
    rng = np.random.default_rng(9)
    x, y = rng.normal(size=(2, 3, 3, 7, 7)).astype(np.float32), rng.integers(0, 3, 3)
    for batch in x:
        np.testing.assert_allclose(
            fused.loss_and_grads(fused.stage(batch), y)[0], plain.loss_and_grads(batch, y)[0],
            rtol=1e-5,
        )  # fmt: skip


@pytest.mark.parametrize("keep", [("bn4",), ()])  # (): c5 takes bn4's backward sums
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_training_computes_what_unfused_does(monkeypatch, dtype, keep):
    fused, plain = _pair(monkeypatch, dtype, keep=keep)
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 3, 7, 7)) * 2 + 1).astype(dtype)
    y = rng.integers(0, 3, 3)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for _ in range(2):  # two SGD steps: the running statistics and weights move alike
        la, lb = fused.step(x, y, lr=0.1, momentum=0.9), plain.step(x, y, lr=0.1, momentum=0.9)
        assert np.isclose(la, lb, **tol)
        for k in plain.grads:
            np.testing.assert_allclose(fused.grads[k], plain.grads[k], **tol, err_msg=k)
        for k in plain.params:  # running_mean / running_var too
            np.testing.assert_allclose(fused.params[k], plain.params[k], **tol, err_msg=k)
    np.testing.assert_allclose(fused.forward(x), plain.forward(x), **tol)  # eval mode
    if not keep:
        return
    kept_a = fused.forward(x, train=True, outputs=["bn4"])["bn4"]
    kept_b = plain.forward(x, train=True, outputs=["bn4"])["bn4"]
    np.testing.assert_allclose(kept_a, kept_b, **tol)


# eval mode folds each norm into the conv before it: w * scale, b * scale + shift (the
# same numbers up to rounding, in another order)
FOLD_TOL = {np.float32: {"rtol": 1e-5, "atol": 1e-6}, np.float64: {"rtol": 1e-12, "atol": 1e-13}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [False, True])
def test_fused_inference_predicts_what_unfused_does(monkeypatch, dtype, training):
    """Eval forward with the norms folded into the convs' weights, on an inference model
    (a folded norm's output lives in its conv's buffer) and on a training one (where the
    kept bn4 has a buffer of its own, which c4 writes); refolded when the weights and
    running statistics change."""
    train, _ = _pair(monkeypatch, dtype)
    keep = ("bn4",) if training else ()
    fused, plain = _pair(monkeypatch, dtype, training=training, keep=keep)
    assert fused.unwritten == {"bn1", "bn2", "bn3", "bn4"} - set(keep)
    assert fused.folded == {"c1": "bn1", "c2": "bn2", "c3": "bn3", "c4": "bn4"}
    assert not plain.folded  # CNNSPEC_FUSION=0: the norms run
    assert (fused.buf["bn4"] is fused.buf["c4"]) != training
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 3, 7, 7)).astype(dtype)
    for _ in range(2):
        for k, v in train.params.items():  # trained-looking running statistics
            if k.endswith("running_var"):
                v[...] = rng.uniform(0.5, 2.0, v.shape)
            elif k.endswith("running_mean") or k.endswith(".bias"):
                v[...] = rng.normal(size=v.shape)
            else:
                v[...] = v * rng.uniform(0.5, 1.5, v.shape)
            fused.params[k][...] = plain.params[k][...] = v
        want = plain.forward(x)
        np.testing.assert_allclose(fused.forward(x), want, **FOLD_TOL[dtype])
        if training:
            got, want4 = (m.forward(x, outputs=["bn4"])["bn4"] for m in (fused, plain))
            np.testing.assert_allclose(got, want4, **FOLD_TOL[dtype])
        assert not np.allclose(want, plain.forward(x * 0.5))  # (not constant)
    for k, v in plain.params.items():  # the folded weights are the convs' own
        np.testing.assert_array_equal(fused.params[k], v, err_msg=k)


def test_fused_network_gradients_match_finite_differences(monkeypatch):
    monkeypatch.setenv("CNNSPEC_FUSION", "1")
    model = cnnspec.loads(NET).compile(batch_size=3, seed=2, dtype=np.float64)
    assert model.unwritten and model.norm_stats
    rng = np.random.default_rng(4)
    _fd_check(model, rng.normal(size=(3, 3, 7, 7)), rng.integers(0, 3, 3), n_checks=3)


def test_input_gradient_through_fused_norms(monkeypatch):
    fused, plain = _pair(monkeypatch, np.float64)
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(3, 3, 7, 7)), rng.integers(0, 3, 3)
    np.testing.assert_allclose(
        fused.input_gradient(x, y), plain.input_gradient(x, y), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize(("layer", "shown"), [("bn1", "r1"), ("c1", "c1")])
def test_show_maps_of_a_norm_its_readers_apply(cli, tmp_path, monkeypatch, layer, shown):
    """`show maps` of a batch norm that writes no output (its convs apply it) shows what
    it would write, and of a conv with a norm folded into it in eval mode (which writes
    the norm's output) its own: the model is compiled keeping it."""
    import cnnspec.plots as plots

    monkeypatch.setenv("CNNSPEC_FUSION", "1")
    seen = {}
    monkeypatch.setattr(plots, "plot_maps", lambda image, maps, *a, **k: seen.update(maps=maps))
    spec = tmp_path / "net.yaml"
    spec.write_text(NET)
    x = np.random.default_rng(6).random((1, 3, 7, 7)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = cli("show", "maps", spec, "--image", tmp_path / "x.npy", "--layer", layer,
                 "-o", tmp_path / "maps.png")  # fmt: skip
    assert result.exit_code == 0, result.output
    model = cnnspec.loads(NET).compile(batch_size=1, keep=(shown,))
    expected = model.forward(x, outputs=[shown])[shown][0]
    np.testing.assert_allclose(seen["maps"], expected, rtol=1e-5, atol=1e-6)
    assert (seen["maps"] >= 0).all() == (layer == "bn1")  # after its ReLU, as others' maps


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inputs", [2, 3])
def test_add_applies_a_norm_to_its_inputs_as_it_reads_them(dtype, inputs):
    from cnnspec.kernels.cpu import merge

    rng = np.random.default_rng(7)
    xs = [rng.normal(size=(2, 3, 4, 5)).astype(dtype) for _ in range(inputs)]
    hooks = [None] * inputs
    hooks[0] = (rng.normal(size=3).astype(dtype), rng.normal(size=3).astype(dtype), 1)
    hooks[-1] = (rng.normal(size=3).astype(dtype), rng.normal(size=3).astype(dtype), 0)
    applied = list(xs)
    for k, h in enumerate(hooks):
        if h is not None:
            v = xs[k] * h[0][:, None, None] + h[1][:, None, None]
            applied[k] = np.maximum(v, 0) if h[2] else v
    for act in (0, 1):
        out, expect = np.empty_like(xs[0]), np.empty_like(xs[0])
        merge.add_forward(xs, out, act, in_affine=hooks)
        merge.add_forward(applied, expect, act)
        np.testing.assert_allclose(out, expect, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_stand_ins_give_the_kernels_bits(dtype):
    """A residual add reading two norms (or plain inputs), and the ReLU mask: their numpy
    stand-ins (a first run's, while a child compiles the kernels) give the same bits."""
    from cnnspec.kernels.cpu import merge
    from cnnspec.kernels.cpu._common import IN_AFFINE, IN_AFFINE_RELU, IN_COPY

    rng = np.random.default_rng(8)
    x, y = (rng.normal(size=(2, 3, 20)).astype(dtype) for _ in range(2))
    aff = rng.normal(size=(2, 3)).astype(dtype)
    copy = np.array([[1], [0]], dtype)
    for (ax, mx), (ay, my) in (((aff, IN_AFFINE_RELU), (aff, IN_AFFINE)),
                               ((copy, IN_COPY), (aff, IN_AFFINE_RELU))):  # fmt: skip
        for act in (0, 1):
            out = [np.full_like(x, np.nan) for _ in range(2)]
            merge._add2_hooked_numpy(x, y, ax, mx, ay, my, act, out[0])
            merge._add2_hooked(x, y, ax, mx, ay, my, act, out[1])
            np.testing.assert_array_equal(out[0], out[1])
            added = [np.full(x.size, np.nan, dtype) for _ in range(2)]
            merge._add2_numpy(x.reshape(-1), y.reshape(-1), act, added[0])
            merge._add2(x.reshape(-1), y.reshape(-1), act, added[1])
            np.testing.assert_array_equal(added[0], added[1])
            added = [np.full(x.size, np.nan, dtype) for _ in range(2)]
            merge._add2_numpy(x.reshape(-1), y.reshape(-1), act, added[0])
            merge._add2(x.reshape(-1), y.reshape(-1), act, added[1])
            np.testing.assert_array_equal(added[0], added[1])
            masked = [np.full(x.size, np.nan, dtype) for _ in range(2)]
            merge._mask_numpy(x.reshape(-1), y.reshape(-1), act, masked[0])
            merge._mask(x.reshape(-1), y.reshape(-1), act, masked[1])
            np.testing.assert_array_equal(masked[0], masked[1])


# Residual blocks as ResNet-20's (option-A shortcut in the second): each block's bn1 feeds
# only its conv2, which takes the norm's backward sums; a1 and a2 pass their gradient
# through (their ReLUs' masks applied by c3 and c5, the convs that write those gradients
# last), a3 keeps its pass (the pool after it writes its gradient)
RESIDUAL = """
input: [3, 8, 8]
layers:
  - {name: c0, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: bn0, type: batchnorm2d}
  - {name: r0, type: relu}
  - {name: c1, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: bn1, type: batchnorm2d}
  - {name: r1, type: relu}
  - {name: c2, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: bn2, type: batchnorm2d}
  - {name: a1, type: add, inputs: [bn2, r0]}
  - {name: q1, type: relu}
  - {name: c3, type: conv2d, filters: 6, kernel: 3, padding: 1, stride: 2, bias: false}
  - {name: bn3, type: batchnorm2d}
  - {name: r3, type: relu}
  - {name: c4, type: conv2d, filters: 6, kernel: 3, padding: 1, bias: false}
  - {name: bn4, type: batchnorm2d}
  - {name: sub, type: maxpool2d, kernel: 1, stride: 2, inputs: [q1]}
  - {name: pad, type: channel_pad, channels: 6}
  - {name: a2, type: add, inputs: [bn4, pad]}
  - {name: q2, type: relu}
  - {name: c5, type: conv2d, filters: 6, kernel: 3, padding: 1, bias: false}
  - {name: bn5, type: batchnorm2d}
  - {name: r5, type: relu}
  - {name: c6, type: conv2d, filters: 6, kernel: 3, padding: 1, bias: false}
  - {name: bn6, type: batchnorm2d}
  - {name: a3, type: add, inputs: [bn6, q2]}
  - {name: q3, type: relu}
  - {name: gap, type: global_avgpool2d}
  - {name: fc, type: dense, units: 3}
  - {name: prob, type: softmax}
"""


def _flagged(model, flag):
    return {i.name for i in model.infos if getattr(i.layer, flag, False)}


@pytest.mark.parametrize("text", [NET, RESIDUAL], ids=["net", "residual"])
def test_convs_with_fusion_hooks_run_winograd_where_it_is_picked(monkeypatch, text):
    """Winograd honours the hooks: with the rule forced, every 3x3 stride-1 conv of the
    fused model runs it, hooks and all (statistics, the norm's affine and ReLU on its
    input; backward the norm's gradient, dx added to or masked, the norm's sums), and
    the model computes what the unfused one does."""
    from cnnspec.kernels.cpu import winograd

    monkeypatch.setattr(winograd, "MODE", "1")
    fused, plain = _pair(monkeypatch, np.float64, text=text)
    picked = [
        i.layer for i in fused.infos
        if i.node.type == "conv2d"
        and i.layer.attrs["kernel"] == [3, 3] and i.layer.attrs["stride"] == [1, 1]
    ]  # fmt: skip
    assert any(c.stats_out is not None or c.in_affine is not None for c in picked)
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(3, *fused.input_shape)), rng.integers(0, 3, 3)
    runs = dict(winograd.RUNS)
    la, ga = fused.loss_and_grads(x, y, copy=True)
    assert winograd.RUNS["forward"] - runs["forward"] == len(picked)
    assert winograd.RUNS["backward"] - runs["backward"] == len(picked)
    lb, gb = plain.loss_and_grads(x, y, copy=True)
    assert np.isclose(la, lb, rtol=1e-9)
    for k in gb:
        np.testing.assert_allclose(ga[k], gb[k], rtol=1e-7, atol=1e-9, err_msg=k)


def test_residual_blocks_pass_gradients_through_and_take_norm_sums(monkeypatch):
    fused, plain = _pair(monkeypatch, np.float64, text=RESIDUAL)
    assert _flagged(fused, "sums_in_reader") == {"bn1", "bn3", "bn5"}
    assert _flagged(fused, "dout_masked") == {"a1", "a2"}
    assert _flagged(fused, "relu_dx") == {"c3", "c5"}
    assert fused.eval_adds == {"a1": "c2", "a3": "c6"}  # a2's shortcut runs after c4
    # an add's gradient and its inputs': one buffer
    assert fused.dbuf["bn4"] is fused.dbuf["pad"] is fused.dbuf["a2"]
    assert fused.dbuf["bn2"] is fused.dbuf["r0"] is fused.dbuf["a1"]
    assert not (_flagged(plain, "sums_in_reader") | _flagged(plain, "dout_masked"))
    assert not _flagged(plain, "relu_dx")
    rng = np.random.default_rng(12)
    x = (rng.normal(size=(3, 3, 8, 8)) * 2 + 1).astype(np.float64)
    y = rng.integers(0, 3, 3)
    for _ in range(2):
        la, lb = fused.step(x, y, lr=0.1, momentum=0.9), plain.step(x, y, lr=0.1, momentum=0.9)
        assert np.isclose(la, lb, rtol=1e-10)
        for k in plain.grads:
            np.testing.assert_allclose(fused.grads[k], plain.grads[k], rtol=1e-9, atol=1e-12,
                                       err_msg=k)  # fmt: skip
    np.testing.assert_allclose(
        fused.input_gradient(x, y), plain.input_gradient(x, y), rtol=1e-9, atol=1e-12
    )
    model = cnnspec.loads(RESIDUAL).compile(batch_size=3, seed=2, dtype=np.float64)
    _fd_check(model, x, y, n_checks=2)


# identity shortcuts: a norm folded into its conv, then an add (with and without a ReLU
# after it; the norm first and second); a third add whose shortcut (a conv listed after
# the norm's conv) is not computed yet when that conv runs
SHORTCUTS = """
input: [3, 6, 6]
layers:
  - {name: c0, type: conv2d, filters: 4, kernel: 3, padding: 1}
  - {name: r0, type: relu}
  - {name: c1, type: conv2d, filters: 4, kernel: 3, padding: 1, bias: false}
  - {name: bn1, type: batchnorm2d}
  - {name: sum1, type: add, inputs: [bn1, r0]}
  - {name: r1, type: relu}
  - {name: c2, type: conv2d, filters: 4, kernel: 3, padding: 1}
  - {name: bn2, type: batchnorm2d}
  - {name: sum2, type: add, inputs: [r1, bn2]}
  - {name: c3, type: conv2d, filters: 4, kernel: 3, padding: 1}
  - {name: bn3, type: batchnorm2d}
  - {name: short, type: conv2d, filters: 4, kernel: 1, inputs: [sum2]}
  - {name: sum3, type: add, inputs: [bn3, short]}
  - {name: fc, type: dense, units: 3}
  - {name: prob, type: softmax}
"""


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [False, True])
def test_eval_adds_run_in_the_conv_before_them(monkeypatch, dtype, training):
    """In eval mode a residual add after a folded norm runs in that norm's conv's
    epilogue: the same bits as the add on its own, on an inference model (the add's
    output in the conv's buffer) and a training one."""
    fused, plain = _pair(monkeypatch, dtype, training=training, text=SHORTCUTS)
    monkeypatch.setenv("CNNSPEC_FUSION", "1")
    monkeypatch.setattr(cnnspec.compile.Model, "_fuse_eval_adds", lambda self: None)
    apart = cnnspec.loads(SHORTCUTS).compile(batch_size=3, seed=3, dtype=dtype, training=training)
    assert fused.eval_adds == {"sum1": "c1", "sum2": "c2"}  # sum3's shortcut runs after c3
    assert not apart.eval_adds and not plain.eval_adds
    assert (fused.buf["sum1"] is fused.buf["c1"]) != training
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 3, 6, 6)).astype(dtype)
    for k, v in fused.params.items():  # trained-looking running statistics
        if k.endswith("running_var"):
            v[...] = rng.uniform(0.5, 2.0, v.shape)
        elif k.endswith("running_mean"):
            v[...] = rng.normal(size=v.shape)
        apart.params[k][...] = plain.params[k][...] = v
    got = fused.forward(x).copy()
    np.testing.assert_array_equal(got, apart.forward(x))
    np.testing.assert_allclose(got, plain.forward(x), **FOLD_TOL[dtype])
