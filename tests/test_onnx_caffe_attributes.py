"""What ONNX and Caffe can say and the language now says too: grouped transposed
convolutions, and pooling padding up to the kernel less one (average pooling's divisor
following count_include_pad as ONNX defines it)."""

import numpy as np
import pytest

import cnnspec.network as network
from cnnspec.kernels.cpu import conv_transpose as conv
from cnnspec.kernels.cpu import pool
from cnnspec.kernels.cpu.gradcheck import numerical_grad, rel_error

# ---------------------------------------------------------------- grouped transposed conv


def _convt(groups, dtype, seed=0, n=2, cin=4, h=4, w=3, cout=8, k=(3, 2)):
    rng = np.random.default_rng(seed)
    stride, pad, dil = (2, 1), (1, 0, 0, 1), (1, 2)
    x = rng.standard_normal((n, cin, h, w)).astype(dtype)
    wt = rng.standard_normal((cin, cout // groups, *k)).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    oh = (h - 1) * stride[0] - pad[0] - pad[1] + dil[0] * (k[0] - 1) + 1
    ow = (w - 1) * stride[1] - pad[2] - pad[3] + dil[1] * (k[1] - 1) + 1
    out = np.empty((n, cout, oh, ow), dtype)
    cols = np.empty((n, cout * k[0] * k[1], h * w), dtype)
    return x, wt, b, (stride, pad, dil), out, cols, rng


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_conv_transpose_finite_differences(groups):
    x, w, b, geometry, out, cols, rng = _convt(groups, np.float64)
    r = rng.standard_normal(out.shape)

    def loss():
        conv.conv_transpose2d_forward(x, w, b, *geometry, out, cols, groups)
        return float(np.sum(out * r))

    loss()
    dx, dw, db = np.empty_like(x), np.empty_like(w), np.empty_like(b)
    conv.conv_transpose2d_backward(x, w, r, *geometry, cols, dx, dw, db, groups)
    assert rel_error(dx, numerical_grad(loss, x)) < 1e-6
    assert rel_error(dw, numerical_grad(loss, w)) < 1e-6
    assert rel_error(db, numerical_grad(loss, b)) < 1e-6


def test_grouped_conv_transpose_matches_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch is the reference")
    groups = 2
    x, w, b, (stride, pad, dil), out, cols, rng = _convt(groups, np.float32, seed=1)
    conv.conv_transpose2d_forward(x, w, b, stride, pad, dil, out, cols, groups)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    full = torch.nn.functional.conv_transpose2d(xt, wt, None, stride, 0, 0, groups, dil)
    oh, ow = out.shape[2:]
    ref = full[:, :, pad[0] : pad[0] + oh, pad[2] : pad[2] + ow] + torch.tensor(b).view(1, -1, 1, 1)
    assert rel_error(out, ref.detach().numpy()) < 1e-4
    dout = rng.standard_normal(out.shape).astype(np.float32)
    ref.backward(torch.tensor(dout))
    dx, dw = np.empty_like(x), np.empty_like(w)
    conv.conv_transpose2d_backward(x, w, dout, stride, pad, dil, cols, dx, dw, None, groups)
    assert rel_error(dx, xt.grad.numpy()) < 1e-4
    assert rel_error(dw, wt.grad.numpy()) < 1e-4


def test_grouped_conv_transpose_layer():
    net = network.loads(
        "input: [4, 5, 5]\nlayers:\n"
        "  - {name: up, type: conv_transpose2d, filters: 6, kernel: 3, stride: 2, groups: 2}\n"
    )
    (info,) = net.infos
    assert info.layer.out_shape == (6, 11, 11)
    assert [d.shape for d in info.layer.param_defs()] == [(4, 3, 3, 3), (6,)]
    assert net.totals()["params"] == 4 * 3 * 9 + 6
    model = net.compile(batch_size=2, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 4, 5, 5)).astype(np.float32)
    loss, grads = model.loss_and_grads(x, np.zeros((2, 6, 11, 11), np.float32))
    assert np.isfinite(loss) and grads["up.weight"].shape == (4, 3, 3, 3)


def test_groups_must_divide_both_sides():
    from cnnspec.errors import SpecError

    with pytest.raises(SpecError, match=r"groups \(4\) must divide filters \(6\)"):
        network.loads(
            "input: [4, 5, 5]\nlayers:\n  - {type: conv_transpose2d, filters: 6, kernel: 3,"
            " groups: 4}\n"
        )


# ---------------------------------------------------------------- pooling padding < kernel

POOLS = [  # kernel, stride, padding [t, b, l, r], ceil_mode
    ((3, 3), (1, 1), (2, 2, 2, 2), False),
    ((3, 2), (2, 1), (2, 1, 0, 1), False),
    ((4, 4), (3, 3), (3, 3, 2, 3), True),
    ((2, 3), (2, 2), (1, 0, 2, 2), True),
]


def _pool_layer(kind, kernel, stride, padding, ceil_mode, include=True, shape=(3, 7, 6)):
    extra = "" if kind == "maxpool2d" else f", count_include_pad: {str(include).lower()}"
    net = network.loads(
        f"input: {list(shape)}\nlayers:\n"
        f"  - {{name: p, type: {kind}, kernel: {list(kernel)}, stride: {list(stride)},"
        f" padding: {list(padding)}, ceil_mode: {str(ceil_mode).lower()}{extra}}}\n"
    )
    return net


def test_padding_up_to_the_kernel_less_one_is_accepted():
    net = _pool_layer("maxpool2d", (3, 3), (1, 1), (2, 2, 2, 2), False)
    assert net.infos[0].layer.out_shape == (3, 9, 8)  # (7 + 4 - 3) / 1 + 1, (6 + 4 - 3) + 1


@pytest.mark.parametrize("include", [True, False])
@pytest.mark.parametrize("case", POOLS, ids=str)
def test_average_pooling_backward_is_the_adjoint(case, include):
    kernel, stride, padding, ceil_mode = case
    layer = _pool_layer("avgpool2d", kernel, stride, padding, ceil_mode, include).infos[0].layer
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, *layer.in_shapes[0]))
    out = np.empty((2, *layer.out_shape))
    args = (*kernel, *stride, *padding, include)
    pool.avgpool2d_forward(x, *args, out)
    r = rng.standard_normal(out.shape)
    dx = np.empty_like(x)
    pool.avgpool2d_backward(r, *args, dx)
    assert np.isclose(np.sum(out * r), np.sum(x * dx))


@pytest.mark.parametrize("kind", ["maxpool2d", "avgpool2d", "avgpool2d-exclude"])
@pytest.mark.parametrize("case", POOLS, ids=str)
def test_pooling_with_wide_padding_matches_onnxruntime(kind, case):
    """onnxruntime's own MaxPool/AveragePool (ONNX's definition of count_include_pad);
    in ceil mode onnxruntime's output size may count a window starting in the padding,
    which PyTorch's rule (and cnnspec's) leaves out: the rows both have must agree."""
    onnx = pytest.importorskip("onnx", reason="the reference is ONNX's definition")
    ort = pytest.importorskip("onnxruntime", reason="the reference runs in onnxruntime")
    kernel, stride, padding, ceil_mode = case
    layer_type, include = kind.split("-")[0], not kind.endswith("exclude")
    net = _pool_layer(layer_type, kernel, stride, padding, ceil_mode, include)
    model = net.compile(batch_size=2, training=False)
    x = np.random.default_rng(5).standard_normal((2, 3, 7, 6)).astype(np.float32)
    model.forward(x)
    got = model.buf["p"]
    h = onnx.helper
    attrs = dict(
        kernel_shape=list(kernel),
        strides=list(stride),
        pads=[padding[0], padding[2], padding[1], padding[3]],
        ceil_mode=int(ceil_mode),
    )
    if layer_type == "avgpool2d":
        node = h.make_node("AveragePool", ["x"], ["y"], count_include_pad=int(include), **attrs)
    else:
        node = h.make_node("MaxPool", ["x"], ["y"], **attrs)
    graph = h.make_graph(
        [node],
        "pool",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(x.shape))],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 19)])
    proto.ir_version = 9
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (want,) = session.run(None, {"x": x})
    oh, ow = got.shape[2:]
    assert want.shape[2] in (oh, oh + 1) and want.shape[3] in (ow, ow + 1)
    np.testing.assert_allclose(got, want[:, :, :oh, :ow], rtol=1e-5, atol=1e-6)
