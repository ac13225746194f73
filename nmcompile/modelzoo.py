"""Builders of ONNX graphs in the layouts real exporters produce, for tests and benchmarks.

Weights are random (seeded) but the structures are real: ResNet-50's bottleneck
stages, a BERT encoder's attention and MLP blocks, Gemm with transB, weights
behind Transpose / Cast / DequantizeLinear, shared initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 8
OPSET = 17


class Builder:
    """A tiny graph builder: initializers and nodes with generated unique names."""

    def __init__(self, seed: int = 0, opset: int = OPSET):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.opset = opset
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}_{self._count}"

    def const(self, value: np.ndarray, name: str | None = None) -> str:
        name = name or self.fresh("w")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, fan_in: int | None = None, name: str | None = None) -> str:
        fan_in = fan_in or int(np.prod(shape[1:])) or 1
        w = self.rng.standard_normal(shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        return self.const(w, name)

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None, **attrs) -> str | list[str]:
        outs = [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name or self.fresh(op), **attrs))
        return outs[0] if n_out == 1 else outs

    def model(self, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto], name: str = "model") -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = IR_VERSION
        return model

    # -- blocks ---------------------------------------------------------------
    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, bias: bool = False, name: str | None = None) -> str:
        w = self.weight(cout, cin // group, k, k, fan_in=cin // group * k * k)
        ins = [x, w] + ([self.const(np.zeros(cout, np.float32))] if bias else [])
        pad = k // 2
        return self.node("Conv", ins, name=name, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        r = self.rng
        params = [
            (1.0 + 0.1 * r.standard_normal(c)).astype(np.float32),
            (0.1 * r.standard_normal(c)).astype(np.float32),
            (0.1 * r.standard_normal(c)).astype(np.float32),
            (0.5 + r.random(c)).astype(np.float32),
        ]
        return self.node("BatchNormalization", [x] + [self.const(p) for p in params], epsilon=1e-5)

    def linear(self, x: str, k: int, n: int, name: str | None = None) -> str:
        y = self.node("MatMul", [x, self.weight(k, n, fan_in=k)], name=name)
        return self.node("Add", [y, self.const((0.01 * self.rng.standard_normal(n)).astype(np.float32))])

    def layernorm(self, x: str, d: int) -> str:
        scale = self.const(np.ones(d, np.float32))
        bias = self.const(np.zeros(d, np.float32))
        if self.opset >= 17:
            return self.node("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)
        axes = self.const(np.array([-1], np.int64))
        mean = self.node("ReduceMean", [x], axes=[-1]) if self.opset < 18 else self.node("ReduceMean", [x, axes])
        cen = self.node("Sub", [x, mean])
        var = self.node("ReduceMean", [self.node("Mul", [cen, cen])], axes=[-1]) if self.opset < 18 else self.node("ReduceMean", [self.node("Mul", [cen, cen]), axes])
        std = self.node("Sqrt", [self.node("Add", [var, self.const(np.array(1e-5, np.float32))])])
        return self.node("Add", [self.node("Mul", [self.node("Div", [cen, std]), scale]), bias])

    def gelu(self, x: str) -> str:
        inner = self.node("Erf", [self.node("Div", [x, self.const(np.array(np.sqrt(2.0), np.float32))])])
        return self.node("Mul", [self.node("Mul", [x, self.node("Add", [inner, self.const(np.array(1.0, np.float32))])]), self.const(np.array(0.5, np.float32))])


def _vi(name: str, shape, dtype=TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


# -- small layouts -------------------------------------------------------------


def gemm_model(trans_b: int = 1, k: int = 64, n: int = 32, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    b = Builder(seed, opset)
    w = b.weight(n, k, fan_in=k) if trans_b else b.weight(k, n, fan_in=k)
    bias = b.const(np.zeros(n, np.float32))
    b.nodes.append(helper.make_node("Gemm", ["x", w, bias], ["y"], name="gemm", transB=trans_b, alpha=1.0, beta=1.0))
    return b.model([_vi("x", ["N", k])], [_vi("y", ["N", n])])


def matmul_model(k: int = 64, n: int = 32, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    b = Builder(seed, opset)
    h = b.node("MatMul", ["x", b.weight(k, n, fan_in=k)], name="mm1")
    h = b.node("Relu", [h])
    b.nodes.append(helper.make_node("MatMul", [h, b.weight(n, 16, fan_in=n)], ["y"], name="mm2"))
    return b.model([_vi("x", ["N", "S", k])], [_vi("y", ["N", "S", 16])])


def conv_model(group: int = 1, depthwise: bool = False, bn: bool = False, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """A stem conv then the conv under test (grouped, depthwise or with BN) and a 1x1 head."""
    b = Builder(seed, opset)
    h = b.node("Relu", [b.conv("x", 3, 32, 3, bias=True, name="stem")])
    if depthwise:
        h = b.conv(h, 32, 32, 3, group=32, name="dw")
    else:
        h = b.conv(h, 32, 64, 3, group=group, bias=not bn, name="conv")
    c = 32 if depthwise else 64
    if bn:
        h = b.bn(h, c)
    h = b.node("Relu", [h])
    b.nodes.append(helper.make_node("Conv", [h, b.weight(16, c, 1, 1)], ["y"], name="head", kernel_shape=[1, 1]))
    return b.model([_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 16, 8, 8])])


def chain_model(kind: str, k: int = 64, n: int = 32, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """MatMul whose weight reaches it through a see-through op: transpose, cast, reshape, dq, identity."""
    b = Builder(seed, opset)
    w = b.rng.standard_normal((k, n)).astype(np.float32)
    if kind == "transpose":
        src = b.node("Transpose", [b.const(np.ascontiguousarray(w.T))], perm=[1, 0])
    elif kind == "cast":
        src = b.node("Cast", [b.const(w.astype(np.float16))], to=TensorProto.FLOAT)
    elif kind == "reshape":
        src = b.node("Reshape", [b.const(w.reshape(-1)), b.const(np.array([k, n], np.int64))])
    elif kind == "identity":
        src = b.node("Identity", [b.const(w)])
    elif kind == "dq":
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        src = b.node("DequantizeLinear", [b.const(q), b.const(scale), b.const(np.zeros(n, np.int8))], axis=1)
    elif kind == "transpose_reshape":
        src = b.node("Reshape", [b.node("Transpose", [b.const(np.ascontiguousarray(w.T).reshape(n, k // 4, 4))], perm=[1, 2, 0]), b.const(np.array([k, n], np.int64))])
    else:
        raise ValueError(kind)
    b.nodes.append(helper.make_node("MatMul", ["x", src], ["y"], name="mm"))
    return b.model([_vi("x", ["N", k])], [_vi("y", ["N", n])])


def shared_weight_model(transposed_second_use: bool = False, k: int = 64, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """One square weight used by two MatMuls; the second through a Transpose when asked."""
    b = Builder(seed, opset)
    w = b.weight(k, k, fan_in=k, name="shared_w")
    h = b.node("Relu", [b.node("MatMul", ["x", w], name="use1")])
    second = b.node("Transpose", [w], perm=[1, 0]) if transposed_second_use else w
    b.nodes.append(helper.make_node("MatMul", [h, second], ["y"], name="use2"))
    return b.model([_vi("x", ["N", k])], [_vi("y", ["N", k])])


def constant_node_model(k: int = 32, n: int = 16, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """The weight comes from a Constant node rather than an initializer."""
    b = Builder(seed, opset)
    w = b.rng.standard_normal((k, n)).astype(np.float32)
    b.nodes.append(helper.make_node("Constant", [], ["cw"], name="const_w", value=numpy_helper.from_array(w, "cw_value")))
    b.nodes.append(helper.make_node("MatMul", ["x", "cw"], ["y"], name="mm"))
    return b.model([_vi("x", ["N", k])], [_vi("y", ["N", n])])


# -- realistic networks ------------------------------------------------------------


def resnet50(width: float = 1.0, image: int = 224, classes: int = 1000, seed: int = 0, opset: int = OPSET) -> onnx.ModelProto:
    """ResNet-50's topology (BN unfolded, as exporters write it). width=1 has 25.5 M weights."""
    b = Builder(seed, opset)
    ch = lambda c: max(8, int(round(c * width / 8)) * 8)
    h = b.node("Relu", [b.bn(b.conv("x", 3, ch(64), 7, stride=2, name="conv1"), ch(64))])
    h = b.node("MaxPool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = ch(64)
    for stage, (mid, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]):
        for i in range(blocks):
            s = stride if i == 0 else 1
            m, out = ch(mid), ch(mid * 4)
            prefix = f"layer{stage + 1}.{i}"
            y = b.node("Relu", [b.bn(b.conv(h, cin, m, 1, name=f"{prefix}.conv1"), m)])
            y = b.node("Relu", [b.bn(b.conv(y, m, m, 3, stride=s, name=f"{prefix}.conv2"), m)])
            y = b.bn(b.conv(y, m, out, 1, name=f"{prefix}.conv3"), out)
            if i == 0:
                sc = b.bn(b.conv(h, cin, out, 1, stride=s, name=f"{prefix}.downsample"), out)
            else:
                sc = h
            h = b.node("Relu", [b.node("Add", [y, sc])])
            cin = out
    h = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    w = b.weight(classes, cin, fan_in=cin)
    b.nodes.append(helper.make_node("Gemm", [h, w, b.const(np.zeros(classes, np.float32))], ["logits"], name="fc", transB=1))
    return b.model([_vi("x", ["N", 3, image, image])], [_vi("logits", ["N", classes])], name="resnet50")


def bert_encoder(layers: int = 2, hidden: int = 128, heads: int = 4, ffn: int | None = None, vocab: int = 512, seq: int | str = "S", seed: int = 0, opset: int = OPSET,
                 attention_mask: bool = False) -> onnx.ModelProto:
    """A BERT-style encoder: token embedding (Gather), LayerNorm, attention and GELU MLP blocks.

    bert_encoder(12, 768, 12) has BERT-base's 85 M encoder weights. ``attention_mask``:
    a second int64 input (1 token, 0 padding) that keeps padded keys out of attention,
    as Hugging Face exports do.
    """
    ffn = ffn or 4 * hidden
    b = Builder(seed, opset)
    emb = b.const((0.02 * b.rng.standard_normal((vocab, hidden))).astype(np.float32), "word_embeddings")
    h = b.layernorm(b.node("Gather", [emb, "input_ids"], axis=0), hidden)
    dh = hidden // heads
    shape4 = b.const(np.array([0, 0, heads, dh], np.int64))
    shape3 = b.const(np.array([0, 0, hidden], np.int64))
    bias = None
    if attention_mask:  # (1 - mask) * -10000, broadcast over heads and queries
        keep = b.node("Cast", ["attention_mask"], to=TensorProto.FLOAT)
        pad = b.node("Sub", [b.const(np.array(1.0, np.float32)), keep])
        additive = b.node("Mul", [pad, b.const(np.array(-10000.0, np.float32))])
        bias = (b.node("Unsqueeze", [additive, b.const(np.array([1, 2], np.int64))]) if opset >= 13
                else b.node("Unsqueeze", [additive], axes=[1, 2]))
    for i in range(layers):
        p = f"layer{i}"
        def split(t):
            return b.node("Transpose", [b.node("Reshape", [t, shape4])], perm=[0, 2, 1, 3])
        q = split(b.linear(h, hidden, hidden, name=f"{p}.query"))
        k = b.node("Transpose", [b.node("Reshape", [b.linear(h, hidden, hidden, name=f"{p}.key"), shape4])], perm=[0, 2, 3, 1])
        v = split(b.linear(h, hidden, hidden, name=f"{p}.value"))
        scores = b.node("Div", [b.node("MatMul", [q, k]), b.const(np.array(np.sqrt(dh), np.float32))])
        if bias is not None:
            scores = b.node("Add", [scores, bias])
        attn = b.node("Softmax", [scores], axis=-1)
        ctx = b.node("Reshape", [b.node("Transpose", [b.node("MatMul", [attn, v])], perm=[0, 2, 1, 3]), shape3])
        h = b.layernorm(b.node("Add", [h, b.linear(ctx, hidden, hidden, name=f"{p}.attention.output")]), hidden)
        mlp = b.linear(b.gelu(b.linear(h, hidden, ffn, name=f"{p}.intermediate")), ffn, hidden, name=f"{p}.output")
        h = b.layernorm(b.node("Add", [h, mlp]), hidden)
    b.nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="out"))
    inputs = [_vi("input_ids", ["N", seq], TensorProto.INT64)]
    if attention_mask:
        inputs.append(_vi("attention_mask", ["N", seq], TensorProto.INT64))
    return b.model(
        inputs,
        [_vi("last_hidden_state", ["N", seq, hidden])],
        name="bert_encoder",
    )


def save_with_external_data(model: onnx.ModelProto, path, location: str | None = None) -> None:
    """Save with every tensor over 1 KiB in one external data file beside the model."""
    import os

    location = location or os.path.basename(str(path)) + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=1024)


def random_inputs(model: onnx.ModelProto, batch: int = 2, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for every graph input: symbolic batch -> batch, other symbolic dims from `dims` (default 8)."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        shape = []
        for i, d in enumerate(inp.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                shape.append(batch if i == 0 else dims.get(d.dim_param, 8))
        elem = inp.type.tensor_type.elem_type
        if elem == TensorProto.INT64:
            feeds[inp.name] = rng.integers(0, 100, size=shape).astype(np.int64)
        else:
            feeds[inp.name] = rng.standard_normal(shape).astype(helper.tensor_dtype_to_np_dtype(elem))
    return feeds
