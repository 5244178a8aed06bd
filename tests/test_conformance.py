"""One conformance suite for every layer type (PyTorch's OpInfo style): from each case
in `layer_cases.py` come the shape check, the receptive-field check against brute
force, the float64 finite-difference check of every input and parameter gradient,
and parity with PyTorch. Tiny shapes: the suite runs in CI on 2 cores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from layer_cases import ENTRIES, Case, random_params, random_target

from cnnspec.backend import get_backend
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error
from cnnspec.layers import REGISTRY, Field
from cnnspec.layers.docs import layer_classes

BATCH = 2
CASES = [
    pytest.param(t, i, c, id=f"{t}-{i}") for t, e in ENTRIES.items() for i, c in enumerate(e.cases)
]


def test_every_layer_type_has_a_case():
    missing = [c.type_name for c in layer_classes() if c.type_name not in ENTRIES]
    assert not missing, f"add conformance cases for {missing} in tests/layer_cases.py"
    assert set(ENTRIES) <= set(REGISTRY), "a case names a type that is not registered"


class Harness:
    """One layer with its own buffers, run the way a compiled model runs it."""

    def __init__(self, type_name: str, case: Case, dtype=np.float64, seed=0):
        self.layer = layer = REGISTRY[type_name](type_name, dict(case.attrs), list(case.inputs))
        layer.bind(get_backend("cpu"))
        layer.fused_act = case.fused_act
        layer.allocate(BATCH, dtype)
        layer.workspace = np.zeros(max(layer.workspace_size(BATCH), 1), dtype)
        rng = np.random.default_rng(seed)
        self.dtype = dtype
        self.xs = [rng.standard_normal((BATCH, *s)).astype(dtype) for s in case.inputs]
        self.out = np.zeros((BATCH, *layer.out_shape), dtype)
        self.p = random_params(layer, rng, dtype)
        self.g = {d.name: np.zeros(d.shape, dtype) for d in layer.param_defs() if d.trainable}
        self.is_output = layer.role == "output"
        self.target = None
        if self.is_output:
            self.target = random_target(type_name, layer, BATCH, rng, dtype)
        self.dout = rng.standard_normal(self.out.shape).astype(dtype)

    def forward(self, train=True):
        """Run the layer into self.out; return the scalar whose gradients the checks
        compare: an output layer's loss, or sum(out * dout). The same seed every call:
        dropout and RReLU draw the same mask for every finite difference."""
        self.layer.forward(self.xs, self.out, self.p, train, np.random.default_rng(7))
        if self.is_output:
            return float(self.layer.loss(self.xs, self.out, self.target))
        return float(np.sum(self.out * self.dout))

    def backward(self):
        """Input and parameter gradients; the buffers start as garbage: a layer
        overwrites them (the model does not zero them between steps)."""
        dxs = [np.full_like(x, np.nan) for x in self.xs]
        for v in self.g.values():
            v.fill(np.nan)
        self.forward()
        self.layer.backward(self.xs, self.out, self.dout, dxs, self.p, self.g)
        return dxs


@pytest.mark.parametrize(("type_name", "index", "case"), CASES)
def test_forward_fills_the_inferred_shape(type_name, index, case):
    """The kernels write every value of the inferred shape (PyTorch's output shape is
    compared in test_matches_pytorch, the field of every unit in the next test)."""
    h = Harness(type_name, case)
    h.out.fill(np.nan)
    h.forward(train=False)
    assert np.isfinite(h.out).all(), "the forward left part of its output unwritten"


def _span(mask_1d):
    idx = np.flatnonzero(mask_1d)
    return (idx.min(), idx.max()) if idx.size else None


@pytest.mark.parametrize(("type_name", "index", "case"), CASES)
def test_receptive_field_matches_brute_force(type_name, index, case):
    """Perturb each input position; the output units that change must be those whose
    field (size, jump, start) covers it, clipped to the input."""
    h = Harness(type_name, case)
    if len(h.layer.out_shape) != 3 or any(len(s) != 3 for s in case.inputs):
        pytest.skip("flat input or output: the field is the whole input by definition")
    _, in_h, in_w = case.inputs[0]
    fields = h.layer.receptive_field([(Field(), Field())] * len(case.inputs))
    h.forward(train=False)
    base = h.out.copy()
    _, _, out_h, out_w = base.shape
    seen = np.zeros((out_h, out_w, in_h, in_w), bool)
    originals = [x.copy() for x in h.xs]
    for i in range(in_h):
        for j in range(in_w):
            for x, x0 in zip(h.xs, originals, strict=True):
                x[...] = x0
                x[:, :, i, j] += 50.0
            h.forward(train=False)
            seen[:, :, i, j] = (h.out != base).any(axis=(0, 1))
    for x, x0 in zip(h.xs, originals, strict=True):
        x[...] = x0
    for axis, (f, n, m) in enumerate(zip(fields, (in_h, in_w), (out_h, out_w), strict=True)):
        slack = []  # per unit: how far inside the field's ends its true field lies
        for o in range(m):
            rows = seen[o].any(axis=(0, 2)) if axis == 0 else seen[:, o].any(axis=(0, 1))
            got = _span(rows)
            first = f.start + o * f.jump
            last = first + f.size - 1
            where = f"axis {axis} unit {o}: sees {got}, the field says [{first}, {last}]"
            if last < 0 or first > n - 1 or math.ceil(first) > math.floor(last):
                assert got is None, where  # padding only, or between inputs (stride > kernel)
                continue
            # within the field; its ends exact where they lie inside the input (inside,
            # a dilated kernel's holes may leave the clipped ends unseen)
            assert got is not None and first <= got[0] and got[1] <= last, where
            if f.jump >= 1:
                assert first < 0 or got[0] == first, where
                assert last > n - 1 or got[1] == last, where
            elif 0 <= first and last <= n - 1:
                slack.append((got[0] - first, last - got[1]))
        if slack:  # upsampling: units differ; the field is the smallest that holds them all
            assert min(s[0] for s in slack) == 0 and min(s[1] for s in slack) == 0, slack


@pytest.mark.parametrize(("type_name", "index", "case"), CASES)
def test_gradients_match_finite_differences(type_name, index, case):
    h = Harness(type_name, case)
    dxs = h.backward()
    for k, (x, dx) in enumerate(zip(h.xs, dxs, strict=True)):
        num = numerical_grad(h.forward, x)
        assert rel_error(dx, num) < 1e-6, f"d input {k}"
    for name, g in h.g.items():
        num = numerical_grad(h.forward, h.p[name])
        mask = getattr(h.layer, "connection_mask", None)
        if mask is not None and name == "weight":
            num = num * mask
        assert rel_error(g, num) < 1e-6, f"d {name}"
    if h.g and len(h.xs) == 1:  # a first layer: no input gradient, the same parameter ones
        grads = {k: v.copy() for k, v in h.g.items()}
        h.forward()  # the state of the unperturbed forward, as before
        h.layer.backward(h.xs, h.out, h.dout, [None], h.p, h.g)
        for name, g in h.g.items():
            np.testing.assert_array_equal(g, grads[name], err_msg=f"d {name} without dx")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("type_name", "index", "case"), CASES)
def test_matches_pytorch(type_name, index, case, dtype):
    """float64 to rounding; float32 (what training runs) to 1e-4 of the scale."""
    torch = pytest.importorskip("torch", reason="PyTorch parity needs torch")
    entry = ENTRIES[type_name]
    if entry.torch is None or not case.torch:
        pytest.skip("PyTorch has no twin of this layer or attribute set")
    h = Harness(type_name, case, dtype)
    tol = 1e-9 if dtype == np.float64 else 1e-4
    train = not entry.random
    loss = h.forward(train=train)
    dxs = [np.zeros_like(x) for x in h.xs]
    h.layer.backward(h.xs, h.out, h.dout, dxs, h.p, h.g)
    xs_t = [torch.tensor(x, requires_grad=True) for x in h.xs]
    p_t = {k: torch.tensor(v, requires_grad=k in h.g) for k, v in h.p.items()}
    if h.is_output:
        y, loss_t = entry.torch(xs_t, p_t, h.layer.attrs, torch.tensor(h.target))
        assert abs(loss - loss_t.item()) < tol * max(1.0, abs(loss))
    else:
        y = entry.torch(xs_t, p_t, h.layer.attrs)
        if case.fused_act:
            y = torch.relu(y)
        loss_t = (y * torch.tensor(h.dout)).sum()
    assert tuple(y.shape) == h.out.shape, "PyTorch's output shape differs"
    assert rel_error(h.out, y.detach().numpy()) < tol
    if not train:
        return  # the backward of a random layer in eval mode is not what training runs
    loss_t.backward()
    for k, (dx, xt) in enumerate(zip(dxs, xs_t, strict=True)):
        assert rel_error(dx, xt.grad.numpy()) < tol, f"d input {k}"
    mask = getattr(h.layer, "connection_mask", None)
    for name, g in h.g.items():
        want = p_t[name].grad.numpy()
        if mask is not None and name == "weight":
            want = want * mask  # entries the connection table leaves out are not parameters
        assert rel_error(g, want) < tol, f"d {name}"
