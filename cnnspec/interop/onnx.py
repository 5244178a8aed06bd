"""ONNX export: a compiled model's graph and weights as one ONNX file (opset 17).

Every layer becomes one ONNX node named after it where ONNX has the operator, or the
exact composition of standard operators where it does not (scaled tanh, LeNet-5's
subsampling and RBF units, maxout, channel_pad, LRN with an even window). The
network's outputs are its output layers' values (softmax probabilities, linear
values, RBF distances), named after the layers; auxiliary heads are extra outputs
unless left out. The batch dimension is symbolic ("N"). Needs the `onnx` package
(`pip install 'cnnspec[onnx]'`).
"""

from __future__ import annotations

import os

import numpy as np

from ..kernels import SCALED_TANH_A, SCALED_TANH_S

OPSET = 17
INPUT_NAME = "input"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ImportError(
            "ONNX export needs the onnx package: pip install 'cnnspec[onnx]'"
        ) from None
    return onnx


class _Builder:
    """Collects nodes and initialisers; hands out unique names for intermediate tensors."""

    def __init__(self, onnx):
        self.onnx = onnx
        self.helper = onnx.helper
        self.nodes = []
        self.inits = []
        self.names: set[str] = set()

    def const(self, name: str, value) -> str:
        value = np.asarray(value)
        name = self._unique(name)
        self.inits.append(self.onnx.numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def step(self, op: str, inputs: list[str], layer: str, part: str, **attrs) -> str:
        """A node inside a layer's composition: named LAYER/PART."""
        name = self._unique(f"{layer}/{part}")
        return self.node(op, inputs, name, name, **attrs)

    def _unique(self, name: str) -> str:
        base, k = name, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        return name


def _pads(p) -> list[int]:
    """cnnspec's [top, bottom, left, right] -> ONNX's [top, left, bottom, right]."""
    return [p[0], p[2], p[1], p[3]]


def _f32(v) -> np.ndarray:
    return np.asarray(v, np.float32)


def _shape_const(b: _Builder, layer: str, dims) -> str:
    return b.const(f"{layer}/shape", np.asarray(dims, np.int64))


def _emit(b: _Builder, name: str, layer, xs: list[str], params: dict) -> str:
    """The ONNX nodes of one layer; returns the name of its output tensor (the layer's name)."""
    a = layer.attrs
    t = type(layer).type_name  # aliases resolve to the class's own name
    x = xs[0]

    def w(key, value=None):
        return b.const(f"{name}.{key}", _f32(params[key] if value is None else value))

    if t in ("conv2d", "conv_transpose2d"):
        weight = params["weight"]
        mask = getattr(layer, "connection_mask", None)
        if mask is not None:  # the connection table: a convolution whose absent taps are zero
            weight = weight * mask
        ins = [x, w("weight", weight)] + ([w("bias")] if "bias" in params else [])
        attrs = dict(
            kernel_shape=a["kernel"],
            strides=a["stride"],
            pads=_pads(a["padding"]),
            dilations=a["dilation"],
            group=a["groups"],
        )
        if t == "conv2d":
            return b.node("Conv", ins, name, name, **attrs)
        return b.node("ConvTranspose", ins, name, name, output_padding=a["output_padding"], **attrs)
    if t in ("maxpool2d", "avgpool2d"):
        return _pool(b, name, x, t, a, layer.in_shapes[0], layer.out_shape)
    if t == "subsample2d":  # window mean * coefficient + bias, per map
        c = layer.in_shapes[0][0]
        pooled = b.step(
            "AveragePool", [x], name, "mean", kernel_shape=a["kernel"], strides=a["stride"]
        )
        scaled = b.step(
            "Mul", [pooled, w("weight", params["weight"].reshape(c, 1, 1))], name, "scale"
        )
        return b.node("Add", [scaled, w("bias", params["bias"].reshape(c, 1, 1))], name, name)
    if t == "upsample2d":  # nearest: input floor(o/s); bilinear: PyTorch's half-pixel taps
        scales = b.const(f"{name}/scales", np.asarray([1, 1, *a["scale"]], np.float32))
        if a["mode"] == "nearest":
            how = dict(
                mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"
            )
        else:
            how = dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
        return b.node("Resize", [x, "", scales], name, name, **how)
    if t == "global_avgpool2d":
        return b.node("GlobalAveragePool", [x], name, name)
    if t == "flatten":
        return b.node("Flatten", [x], name, name, axis=1)
    if t == "dense":
        if len(layer.in_shapes[0]) != 1:
            x = b.step("Flatten", [x], name, "flatten", axis=1)
        ins = [x, w("weight")] + ([w("bias")] if "bias" in params else [])
        return b.node("Gemm", ins, name, name, transB=1)
    if t in ("dropout",):
        return b.node("Identity", [x], name, name)  # inference: dropout is the identity
    if t == "batchnorm2d":
        ins = [x] + [w(k) for k in ("weight", "bias", "running_mean", "running_var")]
        return b.node("BatchNormalization", ins, name, name, epsilon=float(a["eps"]))
    if t == "lrn":
        return _lrn(b, name, x, a, layer.in_shapes[0])
    if t == "relu":
        return b.node("Relu", [x], name, name)
    if t == "leaky_relu":
        return b.node("LeakyRelu", [x], name, name, alpha=float(a["alpha"]))
    if t == "rrelu":  # inference: the mean slope
        return b.node("LeakyRelu", [x], name, name, alpha=float((a["lower"] + a["upper"]) / 2))
    if t == "elu":
        return b.node("Elu", [x], name, name, alpha=float(a["alpha"]))
    if t == "sigmoid":
        return b.node("Sigmoid", [x], name, name)
    if t == "tanh":
        return b.node("Tanh", [x], name, name)
    if t == "scaled_tanh":  # A * tanh(S * x)
        inner = b.step("Mul", [x, b.const(f"{name}/S", _f32(SCALED_TANH_S))], name, "scale_in")
        th = b.step("Tanh", [inner], name, "tanh")
        return b.node("Mul", [th, b.const(f"{name}/A", _f32(SCALED_TANH_A))], name, name)
    if t == "prelu":
        slope = params["weight"]
        if len(layer.in_shapes[0]) == 3:
            slope = slope.reshape(-1, 1, 1)
        return b.node("PRelu", [x, w("weight", slope)], name, name)
    if t == "maxout":  # channel k = max over input channels k*pieces .. k*pieces + pieces-1
        c, *rest = layer.in_shapes[0]
        k = a["pieces"]
        grouped = b.step(
            "Reshape", [x, _shape_const(b, name, [0, c // k, k, *rest])], name, "groups"
        )
        return b.node("ReduceMax", [grouped], name, name, axes=[2], keepdims=0)
    if t == "concat":
        return b.node("Concat", xs, name, name, axis=1)
    if t == "add":
        return b.node("Sum", xs, name, name)
    if t == "channel_pad":
        rank = len(layer.in_shapes[0]) + 1
        pads = [0] * (2 * rank)
        pads[rank + 1] = a["channels"] - layer.in_shapes[0][0]  # after the last channel
        return b.node("Pad", [x, b.const(f"{name}/pads", np.asarray(pads, np.int64))], name, name)
    if t in ("softmax", "linear", "rbf"):
        if len(layer.in_shapes[0]) != 1:
            x = b.step("Flatten", [x], name, "flatten", axis=1)
        if t == "softmax":
            return b.node("Softmax", [x], name, name, axis=1)
        if t == "linear":
            return b.node("Identity", [x], name, name)
        # y[n, k] = sum_f (x[n, f] - centre[k, f])^2, term by term as the kernel computes it
        x3 = b.step("Unsqueeze", [x, b.const(f"{name}/axis", np.asarray([1], np.int64))], name, "x")
        diff = b.step("Sub", [x3, w("weight")], name, "diff")
        sq = b.step("Mul", [diff, diff], name, "square")
        axes = b.const(f"{name}/axes", np.asarray([2], np.int64))
        return b.node("ReduceSum", [sq, axes], name, name, keepdims=0)
    raise NotImplementedError(f"no ONNX export for layer type '{t}'")


def _pool(b: _Builder, name: str, x: str, t: str, a: dict, in_shape, out_shape) -> str:
    """Pooling in floor mode: ceil mode's last window (PyTorch's rule: none starts in the
    right padding; opset 17's shape inference lacks that rule) becomes extra end padding.
    Average pooling that counts padding divides an overhanging window by its part inside
    the padded input (PyTorch and ONNX runtimes agree): the padding becomes zeros of a Pad
    node, and the overhang uncounted padding."""
    pads = list(a["padding"])
    for axis, (n, o, k, s_) in enumerate(
        zip(in_shape[1:], out_shape[1:], a["kernel"], a["stride"], strict=True)
    ):
        last = (o - 1) * s_ + k - n - pads[2 * axis]  # the end padding the last window needs
        pads[2 * axis + 1] = max(pads[2 * axis + 1], last)
    attrs = dict(kernel_shape=a["kernel"], strides=a["stride"])
    if t == "maxpool2d":
        return b.node("MaxPool", [x], name, name, pads=_pads(pads), **attrs)
    if not a["count_include_pad"] or pads == a["padding"]:
        return b.node(
            "AveragePool",
            [x],
            name,
            name,
            pads=_pads(pads),
            count_include_pad=int(a["count_include_pad"]),
            **attrs,
        )
    p = a["padding"]
    zeros = np.asarray([0, 0, p[0], p[2], 0, 0, p[1], p[3]], np.int64)
    padded = b.step("Pad", [x, b.const(f"{name}/pads", zeros)], name, "pad")
    overhang = [0, 0, pads[1] - p[1], pads[3] - p[3]]
    return b.node("AveragePool", [padded], name, name, pads=overhang, count_include_pad=0, **attrs)


def _lrn(b: _Builder, name: str, x: str, a: dict, shape) -> str:
    """ONNX's LRN centres an even window one channel later than PyTorch's (and cnnspec's):
    x / (k + alpha/size * sum of x^2 over c - size//2 .. c + (size-1)//2)^beta. Odd sizes
    use LRN itself; even ones the same sum as a channel pad and an average over the window."""
    size = a["size"]
    if size % 2:
        return b.node(
            "LRN",
            [x],
            name,
            name,
            size=size,
            alpha=float(a["alpha"]),
            beta=float(a["beta"]),
            bias=float(a["k"]),
        )
    c, h, w = shape
    sq = b.step("Mul", [x, x], name, "square")
    pads = np.asarray([0, size // 2, 0, 0, 0, (size - 1) // 2, 0, 0], np.int64)
    padded = b.step("Pad", [sq, b.const(f"{name}/pads", pads)], name, "pad")
    planes = b.step(
        "Reshape",
        [padded, _shape_const(b, name, [0, 1, c + size - 1, h * w])],
        name,
        "planes",
    )
    mean = b.step("AveragePool", [planes], name, "mean", kernel_shape=[size, 1])
    back = b.step("Reshape", [mean, _shape_const(b, name, [0, c, h, w])], name, "unplanes")
    scaled = b.step("Mul", [back, b.const(f"{name}/alpha", _f32(a["alpha"]))], name, "alpha")
    base = b.step("Add", [scaled, b.const(f"{name}/k", _f32(a["k"]))], name, "k")
    denom = b.step("Pow", [base, b.const(f"{name}/beta", _f32(-a["beta"]))], name, "pow")
    return b.node("Mul", [x, denom], name, name)


def _kept(model, aux: bool) -> tuple[list, list]:
    """The layers the exported outputs need, in order, and those outputs."""
    outputs = list(model.outputs) if aux else [model.head]
    if not outputs:
        outputs = [model.head]
    by_name = {i.name: i for i in model.infos}
    needed, stack = set(), [o.name for o in outputs]
    while stack:
        n = stack.pop()
        if n in needed or n not in by_name:
            continue
        needed.add(n)
        stack.extend(by_name[n].node.inputs)
    return [i for i in model.infos if i.name in needed], outputs


def to_onnx(model, aux: bool = True):
    """The model (its weights as they are now) as an onnx.ModelProto, checked."""
    from ..graph import INPUT

    b = _Builder(_onnx())
    b.names.add(INPUT_NAME)
    tensors = {INPUT: INPUT_NAME}
    infos, outputs = _kept(model, aux)
    b.names.update(info.name for info in infos)
    for info in infos:
        params = {k: np.asarray(v) for k, v in model.layer_params[info.name].items()}
        xs = [tensors[i] for i in info.node.inputs]
        tensors[info.name] = _emit(b, info.name, info.layer, xs, params)
    inputs = [(INPUT_NAME, model.input_shape)]
    heads = [(o.name, o.layer.out_shape) for o in outputs]
    doc = f"exported by cnnspec from {os.path.basename(model.net.file)}"
    return _checked_model(b, model.net.name, inputs, heads, doc)


def layer_to_onnx(layer, params: dict, name: str = "layer"):
    """One layer alone (inputs x0, x1, ...; output `name`) as a checked onnx.ModelProto:
    how the tests hold every conformance case against onnxruntime."""
    b = _Builder(_onnx())
    inputs = [(f"x{k}", shape) for k, shape in enumerate(layer.in_shapes)]
    b.names.update([name, *(n for n, _ in inputs)])
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    fused = getattr(layer, "fused_act", 0)  # a ReLU the layer applies itself
    inner = _emit(b, f"{name}/linear" if fused else name, layer, [n for n, _ in inputs], params)
    if fused:
        b.node("Relu", [inner], name, f"{name}/relu")
    return _checked_model(b, name, inputs, [(name, layer.out_shape)], type(layer).type_name)


def _checked_model(b: _Builder, name: str, inputs, outputs, doc: str):
    """Graph and model around the builder's nodes: float32 tensors with a symbolic batch."""
    onnx = b.onnx
    h = onnx.helper

    def value(n, shape):
        return h.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["N", *shape])

    graph = h.make_graph(
        b.nodes, name, [value(*i) for i in inputs], [value(*o) for o in outputs], b.inits
    )
    graph.doc_string = doc
    proto = h.make_model(
        graph,
        producer_name="cnnspec",
        opset_imports=[h.make_opsetid("", OPSET)],
        doc_string=f"{name}: float32 [N, C, H, W] in, named outputs",
    )
    proto.ir_version = min(proto.ir_version, 9)  # readable by older onnxruntime releases
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model, path, aux: bool = True) -> None:
    """Write the model as an ONNX file (opset 17, dynamic batch, onnx.checker clean)."""
    onnx = _onnx()
    from .weights import replace_atomically

    proto = to_onnx(model, aux)
    replace_atomically(path, lambda tmp: onnx.save(proto, os.fspath(tmp)))
