"""The `quantize` pass: int8 QDQ graphs, and weight-only logarithmic / LUT codebooks.

Options read from ``ctx.options`` (``getattr`` with these defaults):

``quantize``            "int8" | "log" | "lut" (the pass does nothing when it is None).
``bits``                code width for log / lut, 2..8 (default 4); int8 is always 8.
``calib_method``        "kl" | "minmax" | "percentile" | "auto" (default "minmax"):
                        how each activation threshold is chosen from its histogram.
                        minmax clips nothing: on the real PP-OCRv4 text recognizer
                        (benchmarks/bench_real_models.py: 64 calibration lines, 128
                        held out) it reads 64.8% of the lines (float 68.8%),
                        percentile 55.5%, auto 35.2% and kl 0%, though auto has the
                        highest output cosine; ORT's quantize_static 47.7%.
``max_error``           None, or the output-error budget (see *Output error* below):
                        the most sensitive layers are kept in float until the
                        quantized model's error on the calibration data is within it.
``quant_percentile``    percentile for calib_method="percentile" (default 99.99).
``quant_sensitivity``   None (default: on only with max_error, where the fallback
                        needs it; it costs L+1 runs over the samples), True or
                        False: measure every layer's effect on the output (needs
                        calibration data).
``sensitivity_samples`` at most this many calibration samples (first axis) are used
                        for sensitivity and output-error measurements (default 512).
``quantize_outputs``    True (default): also quantize Conv / Gemm outputs, which ORT
                        CPU needs to fuse QLinearConv / QGemm (see *int8 graph*).
``lut_granularity``     "auto" | "layer" | "tensor" | "channel" (default "auto", see *log / lut*).
``nm_storage``          "auto" | "dense" | "compressed" (default "auto", see *log / lut*).
``quantize_tables``     log / lut: also code large float Gather tables (default True).
``float16_params``      log / lut: store biases and other float parameters as float16
                        where that is within 2^-11 (default True, see *log / lut*).
``pattern``             the N:M pattern the weights were pruned to (compressed storage).
``weight_rounding``     int8: "nearest" (default) | "gptq", see *int8 graph*.
``damp``                gptq damping, a fraction of the mean Gram diagonal (default 0.01).

Artifacts: needs ``targets``; reads ``calib_batches`` (a zero-argument callable
returning a fresh iterator of feed dicts; required for int8); leaves
``quantization`` (the summary; log / lut add ``tables``, the coded Gather tables
with their rows, and ``float16_parameters``) and a ``quant`` entry in every
layer's report row.

int8 graph
----------
Weights: per-channel symmetric int8 along the output channel of the weight as
the node sees it (Conv [O, I/g, kh, kw] axis 0; Gemm transB=1 axis 0, transB=0
axis 1; MatMul B [K, N] axis 1): an int8 initializer ``W_quantized`` with a
float scale per channel and an int8 zero point 0, and a DequantizeLinear with
that axis feeding the node directly (layout chains such as Transpose are folded
into the stored int8 tensor). Exact zeros (N:M pruned weights) quantize to 0.
Biases stay float (TensorRT wants them float; ORT CPU fuses either way).

Weight rounding (``weight_rounding``): the scales are max|w| per channel either
way; "nearest" (the default) rounds every weight to its nearest level, "gptq"
chooses the int8 codes that keep the layer's *output* on the calibration inputs
close: ``qm.gptq_round`` quantizes the input columns in order and moves each
column's rounding error onto the columns not yet quantized through the inverse
Gram matrix of the layer's input (GPTQ; the issue's "AdaPrune may re-fit against
the quantized weights"), with a row-wise safeguard (a row keeps nearest rounding
where that is no worse). N:M zeros keep code 0. The Grams (float32, one per
distinct layer input) are summed in the histogram pass, no extra run over the
data; layers with more than GPTQ_MAX_FEATURES inputs, or beyond GPTQ_GRAM_BYTES
of Grams, keep nearest rounding. Rows of dense layers that share an input (Q,
K, V) go through one sweep. Measured (benchmarks/bench_quantize.py, test sets, with
the default min/max thresholds): 1 - cosine 7.53e-5 -> 5.84e-5 on the digits CNN,
1.08e-4 -> 9.15e-5 on the digits encoder, 9.05e-4 -> 7.18e-4 on a BERT-style L4
H256 encoder (ORT Entropy: 1.2e-4, 4.5e-4, 2.8e-3), and (measured with auto
thresholds in an earlier round) lower as well when fitted on one half of each
calibration set and measured on the other, so not an overfit to the calibration
data; test accuracies unchanged. Cost: the Gram products and
an O(K^3 + O K^2) sweep per layer: the BERT-style encoder's quantize call 0.50 s
-> 1.36 s (ORT Entropy 1.98 s: 4.0x -> 1.5x faster), peak increase 87 -> 110 MB
(ORT Entropy 942 MB).
No test-set top-1 changes on the shipped models, so the fast path stays the
default and gptq is asked for (--weight-rounding gptq).
The report row gives ``weight_rounding`` and ``weight_output_error_vs_nearest``
(the layer's output error on the calibration inputs over nearest rounding's).

Activations: per-tensor symmetric int8 (zero point 0), the form TensorRT's
explicit quantization requires. Quantized: the activation input of every
quantized Conv / MatMul / Gemm, and the output of every quantized Conv and
Gemm where that is free or needed:

* A Conv or Gemm output that reaches the next quantized input only through
  Relu / MaxPool / layout ops gets that input's threshold, and so do the
  tensors on the way: the ops are monotone, so quantizing twice with one scale
  costs nothing. ORT CPU fuses DQ -> Conv -> Q into QLinearConv and
  DQ -> Gemm -> Q into QGemm.
* Any other Conv output read only by quantization-tolerant ops (Relu, Add,
  Concat, pooling, layout ops, ...) is quantized with its own threshold (ORT
  has no integer Conv with a float output from QDQ); a Conv output read by
  e.g. Softmax or LayerNormalization, or that is a graph output, stays float
  (that Conv then runs in float in ORT).
* Any other Gemm keeps a float output and its bias C moves to an Add after it:
  ORT fuses a Gemm without C (or with an int32 C, which TensorRT rejects) into
  QGemm with a float output.
* MatMul outputs stay float: ORT fuses DQ -> MatMul into MatMulIntegerToFloat.

A tensor read only by quantized layers gets a QuantizeLinear ->
DequantizeLinear pair per reading node, each pair with its own scale and
zero-point initializers (same values): ORT turns int8 DQ -> MatMul into
MatMulIntegerToFloat only when the Q feeds that one DQ, and its common
subexpression elimination merges pairs that share initializer names (measured:
the Q, K, V projections of a shared LayerNorm output stay float MatMuls with
one shared Q). A Conv/Gemm output gets one Q (the node must feed exactly one
Q) and a DequantizeLinear per reading node. Softmax inputs, normalizations and
the attention products (MatMul of two activations) are never quantized.

Measured with onnxruntime 1.31 CPU (ORT_ENABLE_EXTENDED or ALL): every
quantized Conv becomes QLinearConv, Gemm QGemm, MatMul MatMulIntegerToFloat;
a DequantizeLinear -> Relu -> QuantizeLinear between two layers stays (ORT
drops a Relu before a Q only when the zero point is the type's minimum, i.e.
asymmetric, which TensorRT does not take). TensorRT was not available to test
the int8 graphs: they follow its explicit-quantization rules (int8 Q/DQ, zero
point 0, per-channel weight scales on the output axis, float biases).

Calibration: the tensors to quantize are added as outputs of a copy of the
graph (only the nodes they need); one ONNX Runtime session runs the
calibration batches twice: max |x| first, then a 2048-bin
``StreamingHistogram.from_max_abs`` per tensor (TensorRT's setting: 2048 bins
spanning [0, max |x|]). Only one batch of activations is held at a time.
Statistics are collected for the activation inputs and for the Conv outputs
that need a threshold of their own: one that reaches the next quantized input
through monotone ops takes that input's threshold (below), so it needs none
(with a sensitivity pass or an error budget, which can keep layers float and
break such chains, every Conv output is measured). The first pass also keeps
the float model's outputs on the first ``sensitivity_samples`` samples (the
same session computes them), the reference of every output-error measurement.
Thresholds: "kl" TensorRT entropy (2048 bins, 128 levels,
with pytorch-quantization's suppression of the zero bin: counts[0] := counts[1]),
"minmax" max |x|, "percentile" the quant_percentile of |x|, "auto"
``choose_threshold_auto`` (lowest histogram-estimated MSE among kl, minmax and
three percentiles). All of it is numpy (no JIT compilation, no numba import).
Activation SQNR in the report is 10 log10(E[x^2] / MSE), E[x^2] from the
histogram's sum of squares, the MSE estimated from the histogram.

Output error
------------
``output_error`` = 1 - cosine similarity between the float model's outputs and
the quantized model's outputs, each output tensor flattened over all the
measured calibration samples (streamed: sums of a*b, a*a, b*b), the worst over
the model's float outputs. The relative L2 error ||a - b|| / ||a|| is reported
beside it. ``measure_output_error`` computes both for any two models, so a
budget can be checked independently.

Sensitivity (int8 by default): the all-quantized model's error is measured,
then for every layer the error with only that layer kept float
(leave-one-out, L+1 runs over the sensitivity samples). With ``max_error``,
layers are ranked by that error (lowest first: keeping them float helps most),
and the smallest prefix of the ranking whose measured error is within the
budget is kept float (binary search over the prefix length, every probe
measured; all layers float is the float model, error 0).

log / lut (weight-only)
-----------------------
No calibration data needed. Every target weight (the stored initializer, so
every use and layout chain stays as it was), and every float Gather table of at
least TABLE_MIN_ELEMENTS values read only by Gather (an embedding: its rows are
weights too; coded per slice along the Gather axis; ``quantize_tables``,
default True), is replaced by one node that computes a tensor of the same name,
a call of an ONNX local function (domain "nmcompile", defined once per decoding
layout in the model's function list, named f0, f1, ... with the layout, see
``_Layout.name``, as its doc string and in the report row's ``decode_layout``):

    data (uint8 [codes | N:M positions | uint8 scales]) -> Slice the sections
        (lengths from the shape input: ReduceProd, ceiling divisions) -> Cast int32
        -> Div [[1], [16]] -> Mod 16 -> Reshape -> Slice -> Reshape
        [-> Add per-channel offsets] -> Gather(codebook) [-> Cast float]
        [-> Mul per-channel scale (Cast float first)]

Names: what the pass creates is named short, because every byte of a name is
in the file once per reference (on the 2:4 digits encoder the descriptive names
were ~3 KB of a 44.6 KB file): for the k-th coded weight c<k> (code data), b<k>
(codebook), a<k> (a separate aux tensor) and node d<k> (its output keeps the
weight's name); s<dims> shared shape constants; p (the float16 parameters), p32,
pn, pc, ps, pf<i>, pr<i> for their decoding. Names already in the graph get a
_<n> suffix. The graph's inputs, outputs, node names and the weights' own names
are left as they are; the report rows list every created name.

Packing is planar base-R digits (``pack_radix``): with 4-bit codes (R = 16),
byte i holds code i in its low nibble and code i + P in its high nibble,
P = ceil(n/2) (2-bit: four planes), so Div by the plane weights and Mod give
every plane at once. Widths that do not divide a byte take words of several
bytes (``radix_word``: 3-bit codes eight to a 3-byte word, 5-bit eight to 5
bytes, 6-bit four to 3), stored as byte planes and summed back into int32/int64
words before the Div and Mod, so every width costs its bits. All of it is
integer arithmetic of opset 10 (no BitShift, no UINT4, which needs opset 21,
external-data support and Cast support). Each node's inputs are the data, the
weight's shape (a small int64 constant shared by value), the codebook, and only
where needed a separate aux tensor (per-channel codebook offsets, a log scale;
below opset 10 a uint8 scale too): one data tensor per weight keeps the graph's
own bytes small next to the codes. ONNX Runtime inlines the function and folds
it into a float constant at load, before partitioning the graph among
execution providers: the file shrinks, runtime memory and speed are those of
the float model.

log: sign + power-of-two codes times a per-channel max |w| (``log_quantize``;
the float scale is a separate input in the weight's dtype: each channel's
largest weight stays exact).
lut: exact 1-D k-means codebooks (``lut_quantize``; in a weight with exact
zeros, e.g. N:M pruned, zero has its own code 0, else all 2^bits codes are
levels). ``lut_granularity`` "tensor": one codebook for the weight divided by
per-channel scales, the k-means weighted by scale^2 (so it minimizes the error
of the real weights); the scales are uint8 multiples q[c] of one unit
(``_uint8_scales``: unit = max|w| / 255, q[c] = ceil(max|w[c]| / unit)),
stored in the data, and the unit is folded into the codebook, so W =
(codebook * unit)[code] * q[c]; a coarse q only normalizes a little less,
the k-means fits the scales as they are. "channel": one codebook per output
channel (Add of c * 2^bits before the Gather, no Mul); "layer": one codebook
for the raw weight, no scale (the smallest file; measured on the digits models
it costs ~1 dB of weight SQNR, doubles the CNN's output error and loses points
on a 2:4 model, so it is not the default); "auto": channel where the codebooks
cost at most 1/8 of the codes (>= 512 weights per channel at 4 bits), tensor
elsewhere (layer for a weight with no channel axis). Codebooks of float32
weights are stored as float16 where the rounding of every level is within
2^-11 of its codebook's largest level (``_fits_half``: ~66 dB, far below
4-bit code noise) and cast back to float32 in the decoding function.

Float parameters (``float16_params``, default True): once any weight is coded,
the float32 initializers read only as biases, normalization gains and shifts,
Add/Sub/Mul operands or small Gather tables (at least HALF_MIN_ELEMENTS values;
every read of the tensor such a slot, see _ADDITIVE_SLOTS) are stored together
as one float16 initializer, restored by one Cast and one Split (and a Reshape
per tensor of rank > 1), where float16 holds them within 2^-11: of the tensor's
largest value for additive slots, of each value (zero or normal float16) for
multiplicative ones; integer-valued tensors only where float16 holds them exactly
(positions, counts); others stay float32. On the digits encoder these are
9 KB of a 285 KB file, as much as a third of its 2:4 codes.

N:M storage: a weight whose every group of M along the reduction axis holds at
most N nonzeros can store only N codes per group plus where they sit, decoded
with ConstantOfShape + ScatterElements on the reduction axis split into
(groups, M) (opset 11). Where sit: one index per group into the C(M, N) sorted
position patterns, base C(M, N) digits (2:4: 6 patterns, three groups a byte,
2.67 bits a group; 4:8: 70, one a byte), expanded by a Gather from the pattern
table, where that is smaller than each kept weight's position in
ceil(log2 M) bits (1:4). For 2:4 at 4 bits that is 2.67 bits per weight
instead of 4. ``nm_storage`` "compressed" takes it wherever it applies, "dense"
never, "auto" per layer where the serialized data and node are smaller, then
moves all layers of a decoding function to their other storage where that makes
the file smaller counting each function's bytes once (``_choose_storage``: a
layout used by one small layer costs more than its codes save). Only for
weights read by one node with no layout chain. N:M zeros decode to exactly 0
in every mode (code 0, and scatter's zeros).

Opset: int8 per-channel weights need DequantizeLinear's ``axis`` (opset 13).
The default-domain opset import is raised only when every op of the graph has
the same definition at both versions (``onnx.defs`` since_version), which
changes no node's meaning; otherwise int8 weights fall back to per-tensor
scales (opset 10-12); log/lut store one code per byte below opset 10 and use
no N:M-compressed storage below opset 11.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nmcompile.errors import UserError
from nmcompile.graph import GraphIndex, attr, names_read, opset_version, upstream
from nmcompile.graphio import iter_graphs

from . import quant_math as qm
from .base import CompileContext, Pass, PassResult
from .statistics import batch_samples, token_mask
from .targets import LAYOUT_OPS, Target, Use, WeightView, chain_problem

__all__ = [
    "Quantize",
    "QuantOptions",
    "measure_output_error",
    "OutputErrorMeter",
    "pack_planar",
    "unpack_planar",
    "radix_word",
]

MODES = ("int8", "log", "lut")
CALIB_METHODS = ("kl", "minmax", "percentile", "auto")
NUM_BINS = 2048
INT8_OPSET = 13  # DequantizeLinear axis (per-channel)
QDQ_MIN_OPSET = 10
PACK_OPSET = 10  # Mod, Slice with inputs
SCATTER_OPSET = 11  # ScatterElements
_EXTERNAL_MIN_BYTES = 16 << 10
_PLACEHOLDER = "nmcompile-quantize-placeholder.bin"

# Ops through which a Conv output may reach the next quantized input with the same scale.
_MONOTONE = {"Relu", "MaxPool"} | (LAYOUT_OPS - {"Identity"}) | {"Identity"}
# Consumers that may read a quantized Conv output.
_OUTPUT_OK = {
    "Relu", "Clip", "LeakyRelu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "Add", "Concat", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity",
    "Conv", "MatMul", "Gemm", "Resize", "Pad", "Slice", "Split",
}


# --------------------------------------------------------------------------- options


@dataclass
class QuantOptions:
    mode: str
    bits: int = 4
    calib_method: str = "minmax"
    max_error: float | None = None
    percentile: float = 99.99
    sensitivity: bool | None = None
    sensitivity_samples: int = 512
    quantize_outputs: bool = True
    lut_granularity: str = "auto"
    nm_storage: str = "auto"
    pattern: tuple[int, int] | None = None
    float16_params: bool = True
    quantize_tables: bool = True
    weight_rounding: str = "nearest"
    damp: float = 0.01

    @classmethod
    def from_options(cls, opts) -> "QuantOptions | None":
        mode = getattr(opts, "quantize", None)
        if mode is None or mode in ("none", ""):
            return None
        if mode not in MODES:
            raise UserError(f"--quantize {mode!r}: expected one of {', '.join(MODES)}")
        bits = getattr(opts, "bits", None)
        bits = 8 if mode == "int8" else (4 if bits is None else bits)  # int8 ignores --bits
        try:
            bits = int(bits)
        except (TypeError, ValueError):
            raise UserError(f"--bits {bits!r}: expected an integer") from None
        if mode != "int8" and not 2 <= bits <= 8:
            raise UserError(f"--bits {bits}: {mode} codes take 2 to 8 bits")
        method = getattr(opts, "calib_method", None) or "minmax"
        if method not in CALIB_METHODS:
            raise UserError(f"--calib-method {method!r}: expected one of {', '.join(CALIB_METHODS)}")
        max_error = getattr(opts, "max_error", None)
        if max_error is not None:
            try:
                max_error = float(max_error)
            except (TypeError, ValueError):
                raise UserError(f"--max-error {max_error!r}: expected a number") from None
            if not (math.isfinite(max_error) and max_error >= 0):
                raise UserError(f"--max-error {max_error}: expected a number >= 0")
        pct = float(getattr(opts, "quant_percentile", None) or 99.99)
        if not 0 < pct <= 100:
            raise UserError(f"percentile {pct}: expected a value in (0, 100]")
        gran = getattr(opts, "lut_granularity", None) or "auto"
        if gran not in ("auto", "layer", "tensor", "channel"):
            raise UserError(f"lut granularity {gran!r}: expected auto, layer, tensor or channel")
        storage = getattr(opts, "nm_storage", None) or "auto"
        if storage not in ("auto", "dense", "compressed"):
            raise UserError(f"nm storage {storage!r}: expected auto, dense or compressed")
        pattern = getattr(opts, "pattern", None)
        nm = None
        if pattern is not None and hasattr(pattern, "n") and hasattr(pattern, "m"):
            nm = (int(pattern.n), int(pattern.m))
        elif isinstance(pattern, (tuple, list)) and len(pattern) == 2:
            nm = (int(pattern[0]), int(pattern[1]))
        samples = int(getattr(opts, "sensitivity_samples", None) or 512)
        rounding = getattr(opts, "weight_rounding", None) or "nearest"
        if rounding not in ("gptq", "nearest"):
            raise UserError(f"--weight-rounding {rounding!r}: expected gptq or nearest")
        return cls(
            mode=mode,
            bits=bits,
            calib_method=method,
            max_error=max_error,
            percentile=pct,
            sensitivity=getattr(opts, "quant_sensitivity", None),
            sensitivity_samples=max(1, samples),
            quantize_outputs=bool(getattr(opts, "quantize_outputs", True)),
            lut_granularity=gran,
            nm_storage=storage,
            pattern=nm,
            float16_params=_flag(getattr(opts, "float16_params", None), True),
            quantize_tables=_flag(getattr(opts, "quantize_tables", None), True),
            weight_rounding=rounding,
            damp=0.01 if getattr(opts, "damp", None) is None else float(opts.damp),
        )


# --------------------------------------------------------------------------- small helpers


def _flag(value, default: bool) -> bool:
    return default if value is None else bool(value)


def _finite_or_none(x: float | None, ndigits: int = 3):
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), ndigits)


class _Namer:
    """Fresh, deterministic names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto):
        taken = {t.name for t in graph.initializer}
        taken |= {i.name for i in graph.input} | {o.name for o in graph.output}
        for node in graph.node:
            taken.add(node.name)
            taken.update(node.output)
            taken.update(node.input)
        taken |= names_read(graph.node)
        self.taken = taken

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _can_raise_opset(model: onnx.ModelProto, new: int) -> bool:
    """True when every default-domain op in the model means the same at opset `new`."""
    old = opset_version(model)
    if old >= new:
        return True
    if old <= 0:
        return False

    all_nodes = [n for g in iter_graphs(model.graph) for n in g.node]
    for f in model.functions:
        all_nodes.extend(f.node)
    for op in sorted({n.op_type for n in all_nodes if n.domain in ("", "ai.onnx")}):
        try:
            a = onnx.defs.get_schema(op, old, "").since_version
            b = onnx.defs.get_schema(op, new, "").since_version
        except Exception:
            return False
        if a != b:
            return False
    return True


# --------------------------------------------------------------------------- code packing


def pack_planar(codes: np.ndarray, width: int) -> np.ndarray:
    """Pack unsigned codes `width` bits each (2, 4 or 8), planar: plane j holds codes j*P .. j*P+P-1.

    Byte i = sum_j codes[j*P + i] << (j*width), P = ceil(n / (8/width)); the tail is 0.
    """
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    f = 8 // width
    if f == 1:
        return c.copy()
    if c.size and int(c.max()) >= (1 << width):
        raise ValueError(f"codes do not fit in {width} bits")
    p = -(-c.size // f)
    padded = np.zeros(f * p, np.uint8)
    padded[: c.size] = c
    planes = padded.reshape(f, p)
    out = np.zeros(p, np.uint8)
    for j in range(f):
        out |= (planes[j] << (j * width)).astype(np.uint8)
    return out


def unpack_planar(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of pack_planar: `count` uint8 codes."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    f = 8 // width
    if f == 1:
        return p[:count].copy()
    mask = (1 << width) - 1
    planes = [(p >> (j * width)) & mask for j in range(f)]
    return np.concatenate(planes)[:count].astype(np.uint8)


MAX_WORD_BYTES = 7  # a word of digits stays exact in int64 arithmetic, its digits too


def radix_word(radix: int) -> tuple[int, int]:
    """(k, f): how many base-`radix` digits a word of k bytes holds, radix^f <= 256^k,
    for the k <= MAX_WORD_BYTES with the fewest bits per digit (the shortest word among
    equals). 16 -> (1, 2), 8 -> (3, 8): 3-bit codes in 3 bits, not a nibble; 32 -> (5, 8);
    6 (the 2:4 patterns) -> (1, 3); 70 (the 4:8 patterns) -> (7, 9), 6.2 bits, not 8."""
    if not 2 <= radix <= 256:
        raise ValueError(f"radix {radix}: expected 2..256")
    best = (1, 1)
    for k in range(1, MAX_WORD_BYTES + 1):
        f = 1
        while radix ** (f + 1) <= 256**k:
            f += 1
        if f * best[0] > best[1] * k:
            best = (k, f)
    return best


def digit_bits(radix: int) -> float:
    """Bits one base-`radix` digit takes in ``pack_radix``'s words."""
    k, f = radix_word(radix)
    return 8 * k / f


def packed_bytes(count: int, radix: int) -> int:
    k, f = radix_word(radix)
    return k * -(-count // f)


def pack_radix(values: np.ndarray, radix: int) -> np.ndarray:
    """Pack values in [0, radix) as base-`radix` digits in words of k bytes, planar:
    word i = sum_j v[j*P + i] * radix^j, (k, f) = radix_word(radix), P = ceil(n / f);
    byte plane b (bytes b*P .. b*P+P-1) holds byte b of every word; the tail is 0.
    With one-byte words and a power-of-two radix 2^w this is exactly
    ``pack_planar(values, w)``; the 6 patterns of a 2:4 group go three a byte
    (2.67 bits each instead of 4), 3-bit codes eight to three bytes.
    """
    v = np.asarray(values).reshape(-1)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= radix):
        raise ValueError(f"values do not fit in radix {radix}")
    k, f = radix_word(radix)
    if f == 1:
        return v.astype(np.uint8)
    p = -(-v.size // f)
    if k == 1:  # uint8 all the way (no wide temporaries): every partial sum is < radix^f <= 256
        out = np.zeros(p, np.uint8)
        v = v.astype(np.uint8, copy=False)
        for j in range(f):
            plane = v[j * p : (j + 1) * p]
            out[: plane.size] += plane * np.uint8(radix**j)
        return out
    words = np.zeros(p, np.uint64)
    for j in range(f):
        plane = v[j * p : (j + 1) * p]
        words[: plane.size] += plane.astype(np.uint64) * np.uint64(radix**j)
    shifts = (8 * np.arange(k, dtype=np.uint64))[:, None]
    return ((words[None, :] >> shifts) & np.uint64(255)).astype(np.uint8).reshape(-1)


def unpack_radix(packed: np.ndarray, count: int, radix: int) -> np.ndarray:
    """Inverse of pack_radix: `count` values (uint8)."""
    p = np.asarray(packed, dtype=np.uint8).reshape(-1).astype(np.int64)
    k, f = radix_word(radix)
    if f == 1:
        return p[:count].astype(np.uint8)
    words = p.reshape(k, -1)
    words = sum(words[b] << (8 * b) for b in range(k)) if k > 1 else words[0]
    planes = [(words // radix**j) % radix for j in range(f)]
    return np.concatenate(planes)[:count].astype(np.uint8)


# --------------------------------------------------------------------------- ONNX Runtime sessions


class _Sessions:
    """Builds CPU sessions over edited node lists without copying large initializers."""

    def __init__(self, loaded):
        self.loaded = loaded

    def _array_for(self, t: TensorProto) -> np.ndarray | None:
        loaded = self.loaded
        try:
            dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        except Exception:
            return None
        if dtype.kind not in "biuf" or t.data_type in (TensorProto.BFLOAT16,) or t.data_type >= TensorProto.FLOAT8E4M3FN:
            return None
        if t.name in loaded.changed:
            return np.ascontiguousarray(loaded.array(t.name))
        if t.data_location == TensorProto.EXTERNAL:
            return loaded.array(t.name)
        if t.ByteSize() < _EXTERNAL_MIN_BYTES:
            return None
        if t.HasField("raw_data") or t.raw_data:
            return np.frombuffer(t.raw_data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(t.dims))
        return numpy_helper.to_array(t)

    def create(self, nodes: list[onnx.NodeProto], outputs: list[str], new_inits: Mapping[str, np.ndarray] | None = None,
               removed: set[str] | frozenset = frozenset(), opset: int | None = None, drop_inputs: set[str] | frozenset = frozenset(),
               prune: bool = False, functions: list[onnx.FunctionProto] = (), domains: Mapping[str, int] | None = None):
        import onnxruntime as ort

        src = self.loaded.model
        new_inits = dict(new_inits or {})
        if prune:
            nodes = _needed_nodes(nodes, outputs)
        m = onnx.ModelProto()
        m.ir_version = src.ir_version
        for op in src.opset_import:
            o = m.opset_import.add()
            o.CopyFrom(op)
            if opset is not None and op.domain in ("", "ai.onnx"):
                o.version = max(o.version, opset)
        m.functions.extend(src.functions)
        m.functions.extend(functions)
        for dom, ver in (domains or {}).items():
            if not any(o.domain == dom for o in m.opset_import):
                m.opset_import.append(helper.make_opsetid(dom, ver))
        if functions and m.ir_version < 8:
            m.ir_version = 8
        g = m.graph
        g.name = src.graph.name or "graph"
        g.node.extend(nodes)
        refs = names_read(nodes)
        src_inits = {t.name for t in src.graph.initializer} | {t.values.name for t in src.graph.sparse_initializer}
        g.input.extend(i for i in src.graph.input
                       if i.name not in drop_inputs and i.name not in removed and (i.name not in src_inits or i.name in refs))
        g.sparse_initializer.extend(t for t in src.graph.sparse_initializer if t.values.name in refs and t.values.name not in removed)
        typed = {vi.name: vi for vi in list(src.graph.value_info) + list(src.graph.output)}
        for o in outputs:
            g.output.append(typed[o] if o in typed else onnx.ValueInfoProto(name=o))
        produced = {o for n in nodes for o in n.output}
        g.value_info.extend(vi for vi in src.graph.value_info if vi.name in produced and vi.name not in set(outputs))
        names, values, keep = [], [], []

        def add(name: str, t: TensorProto | None, arr: np.ndarray | None):
            if arr is None or arr.nbytes < _EXTERNAL_MIN_BYTES:
                if t is None:
                    g.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
                else:
                    tt = g.initializer.add()
                    tt.CopyFrom(t)
                    if tt.data_location == TensorProto.EXTERNAL:
                        if arr is None:
                            onnx.external_data_helper.load_external_data_for_tensor(tt, str(self.loaded.base_dir))
                        else:
                            del g.initializer[-1]
                            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
                    elif name in self.loaded.changed and arr is not None:
                        del g.initializer[-1]
                        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
                return
            arr = np.ascontiguousarray(arr)
            ph = g.initializer.add()
            ph.name = name
            ph.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
            ph.dims.extend(arr.shape)
            ph.data_location = TensorProto.EXTERNAL
            e = ph.external_data.add()
            e.key, e.value = "location", _PLACEHOLDER
            keep.append(arr)
            names.append(name)
            values.append(ort.OrtValue.ortvalue_from_numpy(arr))

        for t in src.graph.initializer:
            if t.name in removed or t.name in new_inits or t.name not in refs:
                continue
            arr = self._array_for(t)
            if arr is None and t.name in self.loaded.changed:
                arr = np.ascontiguousarray(self.loaded.array(t.name))
            add(t.name, t, arr)
        for name, arr in new_inits.items():
            if name in refs:
                add(name, None, np.asarray(arr))
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions: no log lines of ORT's own
        # numpy works between runs (histograms, error sums): idle ORT threads must not spin
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # these sessions fetch many intermediate tensors: ORT's memory pattern plans one block
        # for every output of a run on top of the arena (measured: 10 MB of the 105 MB a
        # BERT-style L4 H256 calibration added, no time lost; no change on the digits models)
        so.enable_mem_pattern = False
        if names:
            so.add_external_initializers(names, values)
        blob = m.SerializeToString()
        del m
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        sess._nmcompile_keepalive = (keep, values)  # the OrtValues borrow these buffers
        return sess


def _needed_nodes(nodes: list[onnx.NodeProto], outputs: list[str]) -> list[onnx.NodeProto]:
    return [nodes[i] for i in upstream(nodes, outputs)[0]]


def _feed(sess, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    return {k: batch[k] for k in names if k in batch}


# --------------------------------------------------------------------------- output error


class OutputErrorMeter:
    """Streams 1 - cosine and relative L2 between reference and test outputs."""

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.sums = {n: np.zeros(4) for n in names}  # ab, aa, bb, (a-b)^2

    def add(self, ref: list[np.ndarray], test: list[np.ndarray], tokens: np.ndarray | None = None) -> None:
        """``tokens``: the batch's real-token mask; outputs laid out (batch, sequence, ...)
        count real tokens only, as the calibration statistics do."""
        for n, a, b in zip(self.names, ref, test):
            a, b = np.asarray(a), np.asarray(b)
            if tokens is not None and a.ndim >= 2 and a.shape[:2] == tokens.shape:
                a, b = a[tokens], b[tokens]
            a = a.astype(np.float64).reshape(-1)
            b = b.astype(np.float64).reshape(-1)
            d = a - b
            # np.sum of products, not BLAS dot: OpenBLAS threads wake slowly next to ORT's pool
            self.sums[n] += (float(np.sum(a * b)), float(np.sum(a * a)), float(np.sum(b * b)), float(np.sum(d * d)))

    def result(self) -> dict:
        per = {}
        for n, (ab, aa, bb, dd) in self.sums.items():
            if aa == 0 and bb == 0:
                cos = 1.0
            elif aa == 0 or bb == 0:
                cos = 0.0
            else:
                cos = ab / math.sqrt(aa * bb)
            rel = math.sqrt(dd / aa) if aa > 0 else (0.0 if dd == 0 else math.inf)
            per[n] = {"cosine": float(cos), "one_minus_cosine": float(max(0.0, 1.0 - cos)), "rel_l2": float(rel)}
        worst = max((p["one_minus_cosine"] for p in per.values()), default=0.0)
        worst_rel = max((p["rel_l2"] for p in per.values()), default=0.0)
        return {"one_minus_cosine": worst, "rel_l2": worst_rel, "outputs": per}


_FLOAT_TYPES = ("tensor(float)", "tensor(double)", "tensor(float16)")


def _float_outputs(sess) -> list[str]:
    return [o.name for o in sess.get_outputs() if o.type in _FLOAT_TYPES]


def measure_output_error(reference, candidate, batches: Iterable[Mapping[str, np.ndarray]]) -> dict:
    """Output error of `candidate` against `reference` (paths, bytes or ModelProtos) over `batches`.

    Returns {"one_minus_cosine": worst over float outputs, "rel_l2": worst, "outputs": {name: {...}}}:
    the same measure the quantize pass budgets with ``max_error``.
    """
    import onnxruntime as ort

    def sess_of(m):
        so = ort.SessionOptions()
        so.log_severity_level = 4  # errors come back as exceptions: no log lines of ORT's own
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if isinstance(m, onnx.ModelProto):
            m = m.SerializeToString()
        return ort.InferenceSession(m if isinstance(m, bytes) else str(m), so, providers=["CPUExecutionProvider"])

    ra, rb = sess_of(reference), sess_of(candidate)
    names = _float_outputs(ra)
    meter = OutputErrorMeter(names)
    for batch in batches:
        meter.add(ra.run(names, _feed(ra, batch)), rb.run(names, _feed(rb, batch)), token_mask(batch))
    return meter.result()


@dataclass
class _Reference:
    """The float model's outputs on a fixed set of calibration batches."""

    names: list[str]
    batches: list[dict] = field(default_factory=list)
    outputs: list[list[np.ndarray]] = field(default_factory=list)
    samples: int = 0

    def add(self, batch: Mapping[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        self.batches.append(dict(batch))
        self.outputs.append(list(outputs))
        self.samples += batch_samples(batch)


class _Evaluator:
    """Output error of graph edits against the float model on a fixed set of calibration batches."""

    def __init__(self, sessions: _Sessions, batches: list[dict], base_nodes: list[onnx.NodeProto],
                 reference: _Reference | None = None):
        self.sessions = sessions
        if reference is not None:  # computed during calibration
            self.batches = reference.batches
            self.names = reference.names
            self.reference = reference.outputs if self.names else []
        else:
            self.batches = batches
            graph = sessions.loaded.model.graph
            outputs = [o.name for o in graph.output]
            ref = sessions.create(base_nodes, outputs)
            self.names = _float_outputs(ref)
            self.reference = [ref.run(self.names, _feed(ref, b)) for b in batches] if self.names else []
        self.samples = sum(batch_samples(b) for b in self.batches)
        self.runs = 0

    @property
    def usable(self) -> bool:
        return bool(self.names) and bool(self.batches)

    def error(self, edit: "_GraphEdit") -> dict:
        sess = self.sessions.create(edit.nodes, self.names, edit.new_inits, edit.removed, edit.opset, edit.drop_inputs,
                                    functions=edit.functions, domains=edit.domains)
        meter = OutputErrorMeter(self.names)
        for b, ref in zip(self.batches, self.reference):
            meter.add(ref, sess.run(self.names, _feed(sess, b)), token_mask(b))
        self.runs += 1
        return meter.result()


def _take_samples(make: Callable[[], Iterable[Mapping[str, np.ndarray]]], limit: int) -> list[dict]:
    out, n = [], 0
    for b in make():
        out.append(dict(b))
        n += batch_samples(b)
        if n >= limit:
            break
    return out


# --------------------------------------------------------------------------- graph edits


@dataclass
class _GraphEdit:
    nodes: list[onnx.NodeProto]
    new_inits: dict[str, np.ndarray]
    removed: set[str]
    opset: int | None = None
    drop_inputs: set[str] = field(default_factory=set)
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    domains: dict[str, int] = field(default_factory=dict)


def _dead_chain_nodes(nodes: list[onnx.NodeProto], candidates: set[str], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop candidate nodes (weight layout chains) whose outputs nobody reads any more."""
    nodes = list(nodes)
    while True:
        used = names_read(nodes) | graph_outputs
        keep = [n for n in nodes if n.name not in candidates or any(o in used for o in n.output if o)]
        if len(keep) == len(nodes):
            return keep
        nodes = keep


def _finish_edit(loaded, nodes: list[onnx.NodeProto], new_inits: dict[str, np.ndarray], chain_nodes: set[str],
                 candidates: set[str], opset: int | None, drop_inputs: set[str] | None = None) -> _GraphEdit:
    graph = loaded.model.graph
    outs = {o.name for o in graph.output}
    nodes = _dead_chain_nodes(nodes, chain_nodes, outs)
    refs = names_read(nodes) | outs
    removed = {name for name in candidates if name not in refs and loaded.initializer(name) is not None}
    return _GraphEdit(nodes, new_inits, removed, opset, set(drop_inputs or ()) | removed)


def _chain_signature(use: Use) -> tuple:
    return tuple((n.op_type, tuple(n.input[1:]), tuple(a.SerializeToString() for a in n.attribute)) for n in use.chain)


def _weight_feed(target: Target, use: Use) -> str:
    return use.chain[-1].output[0] if use.chain else target.weight


def _chain_problem(loaded, target: Target) -> str | None:
    stored = loaded.initializer(target.weight)
    if stored is None:
        return "weight initializer not found"
    for use in target.uses:
        problem = chain_problem(use.chain, stored)
        if problem:
            return problem
    return None


def _weight_problem(loaded, target: Target) -> str | None:
    """Why a weight cannot be quantized (every mode), as the report says it; None: it can."""
    problem = _chain_problem(loaded, target)
    if problem:
        return f"weight not quantizable: {problem}"
    if any(u.chain and u.chain[0].op_type == "DequantizeLinear" for u in target.uses):
        # a quantized model compiled again: its codes would be coded twice
        return "weight already quantized (read through DequantizeLinear)"
    return None


# --------------------------------------------------------------------------- int8


@dataclass
class _QUse:
    node: onnx.NodeProto
    use: Use
    w_slot: int
    act: str
    wkey: tuple


@dataclass
class _WeightQ:
    q: np.ndarray
    scale: np.ndarray
    axis: int | None
    sqnr: float
    rounding: str = "nearest"
    output_error_ratio: float | None = None  # gptq: layer output error on calibration data / nearest's


@dataclass
class _Int8Layer:
    target: Target
    quses: list[_QUse]
    reason: str | None = None
    weights: dict[tuple, _WeightQ] = field(default_factory=dict)


@dataclass
class _ActStats:
    dtype: str | None = None
    max_abs: float = 0.0
    sumsq: float = 0.0
    count: int = 0
    nonfinite: int = 0
    hist: qm.StreamingHistogram | None = None
    threshold: float = 0.0
    method: str = ""
    candidates: dict = field(default_factory=dict)
    sqnr: float | None = None


@dataclass
class _Point:
    tensor: str
    threshold: float
    all_consumers: bool
    consumers: set[str]  # node names reading the quantized value (when not all_consumers)
    source: str  # tensor whose statistics chose the threshold


class _Int8:
    def __init__(self, ctx: CompileContext, qopts: QuantOptions, targets: list[Target]):
        self.ctx = ctx
        self.loaded = ctx.model
        self.qopts = qopts
        self.targets = targets
        graph = self.loaded.model.graph
        self.base_nodes = list(graph.node)
        names = [n.name for n in self.base_nodes]
        if len(set(names)) != len(names) or any(not n for n in names):
            raise RuntimeError("quantize needs unique node names (run the name-nodes pass first)")
        self.index = GraphIndex(graph)
        self.graph_outputs = {o.name for o in graph.output}
        self.graph_inputs = {i.name for i in graph.input} - set(self.index.initializers)
        opset = opset_version(self.loaded.model)
        self.opset_new: int | None = None
        self.per_channel = True
        if opset < INT8_OPSET:
            if _can_raise_opset(self.loaded.model, INT8_OPSET):
                self.opset_new = INT8_OPSET
            elif opset >= QDQ_MIN_OPSET:
                self.per_channel = False
            else:
                raise UserError(f"--quantize int8 needs opset >= {QDQ_MIN_OPSET} (QuantizeLinear); the model has opset {opset}")
        self.layers = [self._layer(t) for t in targets]
        self.stats: dict[str, _ActStats] = {}
        self.weight_names: dict[tuple, dict] = {}  # initializer names chosen by the latest edit()
        # gptq rounding: (layer name, wkey, node name) -> (activation tensor, LayerSpec); the Gram per spec key
        self.gram_specs: dict[tuple, tuple[str, Any]] = {}
        self.grams: dict[tuple, np.ndarray] = {}
        self.gram_skipped: dict[tuple, str] = {}

    # -- plan -----------------------------------------------------------------
    def _layer(self, target: Target) -> _Int8Layer:
        layer = _Int8Layer(target, [])
        layer.reason = _weight_problem(self.loaded, target)
        if layer.reason:
            return layer
        for use in target.uses:
            node = use.node
            feed = _weight_feed(target, use)
            if node.op_type == "MatMul":
                if node.input[1] == feed:
                    w_slot = 1
                else:
                    layer.reason = "weight is MatMul's first input (no per-channel integer MatMul for it)"
                    return layer
            else:
                w_slot = 1
            act = node.input[0]
            if not act or act in self.index.initializers:
                layer.reason = "activation input is a constant"
                return layer
            if node.op_type == "MatMul" and len(use.eff_shape) != 2:
                layer.reason = f"{len(use.eff_shape)}-D MatMul weight"
                return layer
            layer.quses.append(_QUse(node, use, w_slot, act, (tuple(use.eff_shape), use.out_axis, _chain_signature(use))))
        return layer

    def active(self, float_set: set[str]) -> list[_Int8Layer]:
        return [l for l in self.layers if l.reason is None and l.target.name not in float_set]

    def calibration_tensors(self, all_outputs: bool = True) -> list[str]:
        """Tensors whose statistics calibration collects.

        The activation input of every quantizable layer, and (with
        quantize_outputs) Conv outputs that may need a threshold of their own.
        With ``all_outputs=False`` only those that do with every quantizable
        layer quantized: a Conv output that reaches the next quantized input
        through monotone ops takes that input's threshold and needs no
        statistics (the digits CNN: all three).  The sensitivity pass and the
        error budget keep layers float, which can break such chains, so they
        ask for every Conv output.
        """
        wanted: list[str] = []
        active = self.active(set())
        inputs = {q.act for layer in active for q in layer.quses}
        for layer in active:
            for q in layer.quses:
                if q.act not in wanted:
                    wanted.append(q.act)
        if not self.qopts.quantize_outputs:
            return wanted
        for layer in active:
            for q in layer.quses:
                if q.node.op_type != "Conv":
                    continue
                y = q.node.output[0]
                if y in self.graph_outputs or y in wanted:
                    continue
                if not all_outputs:
                    z, chain = self._walk(y, inputs)
                    if z is not None and chain:
                        continue  # takes the threshold of the quantized input it reaches
                    if z == y or not all(n.op_type in _OUTPUT_OK for n, _ in self.index.uses(y)):
                        continue  # already an input point, or stays float
                wanted.append(y)
        return wanted

    # -- calibration ------------------------------------------------------------
    def calibrate(self, make_batches, sessions: _Sessions, *, all_outputs: bool = True,
                  reference_samples: int = 0) -> "_Reference | None":
        """Activation statistics over the calibration batches (two passes: max |x|, then histograms).

        With ``reference_samples`` > 0 the first pass also keeps the float model's
        outputs on the first batches holding that many samples (the same session
        computes them beside the calibration tensors), for the output-error
        measurement: returned as a _Reference.
        """
        wanted = self.calibration_tensors(all_outputs)
        run_names = [t for t in wanted if t not in self.graph_inputs]
        graph_outs = [o.name for o in self.loaded.model.graph.output]
        out_names = list(run_names)
        if reference_samples > 0:
            out_names += [o for o in graph_outs if o not in out_names]
        stats = {t: _ActStats() for t in wanted}
        try:  # the model as it came: if ORT cannot load it, the model is at fault, not an edit of ours
            sess = sessions.create(self.base_nodes, out_names, prune=True) if out_names else None
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load the model to calibrate it: {first}") from None
        ref: _Reference | None = None
        if reference_samples > 0 and sess is not None:
            types = {o.name: o.type for o in sess.get_outputs()}
            ref = _Reference([o for o in graph_outs if types.get(o) in _FLOAT_TYPES])

        def tensors_of(batch, names):
            outs = dict(zip(names, sess.run(names, _feed(sess, batch)))) if sess is not None and names else {}
            for t in wanted:
                if t in self.graph_inputs:
                    if t not in batch:
                        raise UserError(f"calibration data has no array for model input {t!r}")
                    outs[t] = np.asarray(batch[t])
            return outs

        nbatches = 0
        for batch in self.ctx.progress(make_batches(), desc="calibration: max |x|"):
            nbatches += 1
            keep_ref = ref is not None and ref.samples < reference_samples
            outs = tensors_of(batch, out_names if keep_ref else run_names)
            if keep_ref:
                ref.add(batch, [outs[n] for n in ref.names])
            for t in wanted:
                a = outs[t]
                s = stats[t]
                s.dtype = str(a.dtype)
                if a.dtype.kind != "f" or a.size == 0:
                    continue
                mn, mx = a.min(), a.max()
                if not (math.isfinite(mn) and math.isfinite(mx)):  # NaN or +-inf present
                    fin = np.isfinite(a)
                    s.nonfinite += int(a.size - np.count_nonzero(fin))
                    a = a[fin]
                    if a.size == 0:
                        continue
                    mn, mx = a.min(), a.max()
                s.max_abs = max(s.max_abs, -float(mn), float(mx))
        if nbatches == 0:
            raise UserError("calibration data holds no batches")
        for s in stats.values():
            if s.dtype == "float32" and s.max_abs > 0:
                s.hist = qm.StreamingHistogram.from_max_abs(s.max_abs, NUM_BINS)
        hist_names = [t for t in run_names if stats[t].hist is not None]
        self._plan_grams(stats)
        gram_by_tensor: dict[str, list] = {}
        for key, (t, spec) in {spec.key(): (t, spec) for t, spec in self.gram_specs.values()}.items():
            gram_by_tensor.setdefault(t, []).append((key, spec))
        # BLAS single-threaded for the Gram products: OpenBLAS's own threads stall next to ORT's pool
        # (measured: running them on a worker thread beside ORT's next batch saved nothing here)
        if gram_by_tensor:
            from .adaprune_solver import blas_single_thread  # gptq only: scipy stays unloaded otherwise
        with blas_single_thread() if gram_by_tensor else contextlib.nullcontext():
            for batch in self.ctx.progress(make_batches(), desc="calibration: histograms"):
                tokens = token_mask(batch) if gram_by_tensor else None
                for t, a in tensors_of(batch, hist_names).items():
                    h = stats[t].hist
                    if h is not None:
                        h.update(a)
                        for key, spec in gram_by_tensor.get(t, ()):
                            _add_gram(self.grams, key, spec, a, tokens)
        for t, s in stats.items():
            if s.hist is not None:
                s.sumsq, s.count = s.hist.sumsq, s.hist.total
            self._threshold(s)
        self.stats = stats
        for layer in self.layers:
            if layer.reason:
                continue
            for q in layer.quses:
                d = stats[q.act].dtype
                if d != "float32":
                    layer.reason = f"activation {q.act!r} is {d}, not float32"
                    break
        return ref

    def _plan_grams(self, stats: dict[str, "_ActStats"]) -> None:
        """Which layers get gptq rounding: the input Gram matrix each needs, within bounds.

        One (G, K, K) float32 Gram per distinct layer input and geometry (Q, K and V
        projections of one tensor share it), accumulated in the histogram pass (no extra
        run over the data). Layers with more than GPTQ_MAX_FEATURES inputs, or beyond
        GPTQ_GRAM_BYTES of Grams in all, keep nearest rounding (the report says why).
        """
        from .statistics import spec_from_node

        self.gram_specs, self.grams, self.gram_skipped = {}, {}, {}
        if self.qopts.weight_rounding != "gptq" or not self.per_channel:
            return
        total = 0
        for layer in self.active(set()):
            for q in layer.quses:
                s = stats.get(q.act)
                if s is None or s.hist is None:
                    continue  # a constant-zero (or non-float) input: nothing to compensate against
                node = q.node
                spec = spec_from_node(node, q.use.eff_shape, name=node.name)
                if node.op_type == "Conv":
                    G, K = int(spec.group), int(np.prod(q.use.eff_shape[1:]))
                else:
                    G, K = 1, int(q.use.eff_shape[q.use.red_axis])
                if K > GPTQ_MAX_FEATURES:
                    self.gram_skipped[(layer.target.name, q.wkey)] = f"{K} inputs > {GPTQ_MAX_FEATURES}"
                    continue
                key = spec.key()
                if key not in {v[1].key() for v in self.gram_specs.values()}:
                    if total + G * K * K * 4 > GPTQ_GRAM_BYTES:
                        self.gram_skipped[(layer.target.name, q.wkey)] = "Gram matrices over budget"
                        continue
                    total += G * K * K * 4
                self.gram_specs[(layer.target.name, q.wkey, node.name)] = (q.act, spec)

    def _threshold(self, s: _ActStats) -> None:
        if s.hist is None:
            s.threshold, s.method = 1.0, "zero-tensor"
            return
        method = self.qopts.calib_method
        h = s.hist
        mse = None
        if method == "kl":
            # pytorch-quantization's zero-bin suppression: the spike of exact zeros after a
            # Relu otherwise drags the KL optimum far below the data (1.9 dB SQNR measured on
            # the digits encoder's MLP activation without it)
            t = h.kl_threshold(128, 128, suppress_zero_bin=True)
        elif method == "minmax":
            t = h.max_abs
        elif method == "percentile":
            t = h.percentile_threshold(self.qopts.percentile)
        else:
            choice = qm.choose_threshold_auto(h, bits=8)
            t, method = choice.threshold, choice.method
            s.candidates = {k: float(v) for k, v in choice.thresholds.items()}
            mse = choice.errors.get(method)  # the histogram estimate below, already computed
        if not (t > 0 and math.isfinite(t)):
            t, method, mse = h.max_abs, method + "->minmax", None
        s.threshold, s.method = float(t), method
        if mse is None:
            mse = qm.histogram_quantization_error(h, s.threshold, 8)
        power = s.sumsq / s.count if s.count else 0.0
        s.sqnr = math.inf if mse == 0 else (10 * math.log10(power / mse) if power > 0 else -math.inf)

    def guard_clipping(self, evaluator: "_Evaluator") -> dict | None:
        """auto picks each tensor's threshold by that tensor's own error, which can clip
        values later layers need (bench_real_models: on the PP-OCRv4 text recognizer
        auto reads 35.2% of the lines, minmax 64.8%, float 68.8%). Both threshold sets
        are measured on the model's output over the calibration data and the one with
        the lower error is kept; that catches clipping the output shows, not all of it
        (the recognizer's output cosine favours auto). Returns that error (the
        all-layers-quantized one), or None when auto clipped nothing."""
        clipped = [s for s in self.stats.values() if s.hist is not None and s.threshold < s.max_abs]
        if not clipped:
            return None
        auto_err = evaluator.error(self.edit(set()))
        saved = [(s, s.threshold, s.method, s.sqnr) for s in clipped]
        for s in clipped:
            self._set_threshold(s, s.max_abs, "minmax (auto's clipping raised the output error)")
        minmax_err = evaluator.error(self.edit(set()))
        if minmax_err["one_minus_cosine"] <= auto_err["one_minus_cosine"]:
            return minmax_err
        for s, threshold, method, sqnr in saved:
            s.threshold, s.method, s.sqnr = threshold, method, sqnr
        return auto_err

    def _set_threshold(self, s: _ActStats, threshold: float, method: str) -> None:
        s.threshold, s.method = float(threshold), method
        mse = qm.histogram_quantization_error(s.hist, s.threshold, 8)
        power = s.sumsq / s.count if s.count else 0.0
        s.sqnr = math.inf if mse == 0 else (10 * math.log10(power / mse) if power > 0 else -math.inf)

    # -- weights -----------------------------------------------------------------
    def quantize_weights(self) -> None:
        """int8 codes and per-channel scales of every quantizable weight (see *Weight rounding*).

        gptq: the rows of all dense layers that read the same input (the Q, K and V
        projections) are rounded in one ``gptq_round`` call: one factorization and one
        column sweep instead of three, the same codes (rows are independent). Weights are
        read one group at a time, and each Gram is freed once its layers are done.
        """
        groups: dict[Any, tuple] = {}  # Gram key (or a unique key) -> (Gram or None, [(layer, q)])
        for layer in self.layers:
            if layer.reason:
                continue
            seen = set()
            for q in layer.quses:
                if q.wkey in seen:
                    continue
                seen.add(q.wkey)
                key, gram = self._gram_for(layer, q.wkey) if self.per_channel else (None, None)
                if gram is not None and not np.all(np.isfinite(gram)):
                    self.gram_skipped[(layer.target.name, q.wkey)] = "non-finite calibration inputs"
                    key, gram = None, None
                if gram is None or q.use.op == "Conv":  # conv: its own sweep per group of channels
                    key = ("single", layer.target.name, q.wkey)
                groups.setdefault(key, (gram, []))[1].append((layer, q))
        self.grams = {}  # the groups hold what is still needed
        for key in list(groups):
            gram, members = groups.pop(key)
            self._quantize_group(gram, members)
            del gram

    def _quantize_group(self, gram: np.ndarray | None, members: list) -> None:
        effs = [WeightView(self.loaded, layer.target.weight, q.use).effective().astype(np.float32) for layer, q in members]
        if not self.per_channel:
            for (layer, q), eff in zip(members, effs):
                wq, scale = qm.quantize_weight_per_channel(eff.reshape(1, -1), axis=0, bits=8)
                wq, scale = wq.reshape(eff.shape), scale.reshape(())
                layer.weights[q.wkey] = _WeightQ(wq, scale.astype(np.float32), None, qm.sqnr_db(eff, wq.astype(np.float32) * scale))
            return
        near = [qm.quantize_weight_per_channel(eff, axis=q.use.out_axis, bits=8) for (_, q), eff in zip(members, effs)]
        if gram is None:
            for (layer, q), eff, (wq, scale) in zip(members, effs, near):
                self._set_weight(layer, q, eff, wq, scale, "nearest", None)
            return
        from .adaprune_solver import blas_single_thread

        try:
            with blas_single_thread():
                if members[0][1].use.op == "Conv":
                    (layer, q), eff, (_, scale) = members[0], effs[0], near[0]
                    wq, ratio = _gptq_conv_weight(eff, scale, gram, self.qopts.damp)
                    self._set_weight(layer, q, eff, wq, scale, "gptq", ratio)
                    return
                rows = [_rows_of(eff, q.use) for (_, q), eff in zip(members, effs)]
                scales = np.concatenate([np.asarray(sc, np.float64).reshape(-1) for _, sc in near])
                codes, e_new, e_old = qm.gptq_round(np.concatenate(rows), scales, gram[0], bits=8,
                                                    damp=self.qopts.damp, return_errors=True)
        except np.linalg.LinAlgError:  # pragma: no cover - the damping keeps H positive definite
            for (layer, q), eff, (wq, scale) in zip(members, effs, near):
                self.gram_skipped[(layer.target.name, q.wkey)] = "Gram matrix not positive definite"
                self._set_weight(layer, q, eff, wq, scale, "nearest", None)
            return
        start = 0
        for (layer, q), eff, (_, scale), r in zip(members, effs, near, rows):
            sl = slice(start, start + r.shape[0])
            start = sl.stop
            old = float(e_old[sl].sum())
            ratio = float(e_new[sl].sum()) / old if old > 0 else None
            self._set_weight(layer, q, eff, _from_rows(codes[sl], eff.shape, q.use), scale, "gptq", ratio)

    def _set_weight(self, layer: _Int8Layer, q: _QUse, eff, wq, scale, rounding: str, ratio) -> None:
        deq = qm.dequantize_per_channel(wq, scale, q.use.out_axis)
        layer.weights[q.wkey] = _WeightQ(wq, scale.astype(np.float32), q.use.out_axis, qm.sqnr_db(eff, deq), rounding, ratio)

    def _gram_for(self, layer: _Int8Layer, wkey: tuple) -> tuple[tuple | None, np.ndarray | None]:
        """(key, summed input Gram) of every use of this weight layout; (None, None): nearest rounding."""
        keys = [self.gram_specs.get((layer.target.name, q.wkey, q.node.name)) for q in layer.quses if q.wkey == wkey]
        if not keys or any(k is None or k[1].key() not in self.grams for k in keys):
            return None, None
        grams = {k[1].key(): self.grams[k[1].key()] for k in keys}  # one use per distinct input
        # No minimum sample count: with the damping, gptq lowered the output error on held-out
        # calibration halves even where the Gram is singular (digits CNN fc1: 180 vectors, 1024 inputs).
        key = tuple(sorted(grams, key=repr))
        return key, (next(iter(grams.values())) if len(grams) == 1 else sum(grams.values()))

    # -- graph -------------------------------------------------------------------
    def points(self, active: list[_Int8Layer]) -> dict[str, _Point]:
        pts: dict[str, _Point] = {}
        for layer in active:
            for q in layer.quses:
                s = self.stats[q.act]
                p = pts.setdefault(q.act, _Point(q.act, s.threshold, False, set(), q.act))
                p.consumers.add(q.node.name)
        if not self.qopts.quantize_outputs:
            return pts
        inputs = set(pts)
        for layer in active:
            for q in layer.quses:
                if q.node.op_type not in ("Conv", "Gemm"):
                    continue
                y = q.node.output[0]
                if y in self.graph_outputs:
                    continue
                z, chain = self._walk(y, inputs)
                if z is not None and chain:
                    for t in chain:
                        if t not in pts:
                            pts[t] = _Point(t, pts[z].threshold, True, set(), z)
                        else:
                            pts[t].all_consumers = True
                    continue
                if not all(n.op_type in _OUTPUT_OK for n, _ in self.index.uses(y)):
                    continue
                if z == y:
                    pts[y].all_consumers = True
                elif q.node.op_type == "Conv" and y in self.stats and self.stats[y].dtype == "float32":
                    pts[y] = _Point(y, self.stats[y].threshold, True, set(), y)
        return pts

    def _walk(self, y: str, inputs: set[str]) -> tuple[str | None, list[str]]:
        t, chain = y, []
        for _ in range(64):
            if t in inputs:
                return t, chain
            cons = self.index.uses(t)
            if len(cons) != 1 or t in self.graph_outputs:
                return None, []
            n, _ = cons[0]
            if n.op_type not in _MONOTONE or n.domain not in ("", "ai.onnx") or len([o for o in n.output if o]) != 1:
                return None, []
            if n.op_type in LAYOUT_OPS and any(i and i not in self.index.initializers for i in n.input[1:]):
                return None, []
            chain.append(t)
            t = n.output[0]
        return None, []

    def edit(self, float_set: set[str]) -> _GraphEdit:
        graph = self.loaded.model.graph
        namer = _Namer(graph)
        active = self.active(float_set)
        pts = self.points(active)
        new_inits: dict[str, np.ndarray] = {}
        head: list[onnx.NodeProto] = []
        # weights
        wname: dict[tuple[str, tuple], str] = {}
        for layer in active:
            w = layer.target.weight
            for key, wq in layer.weights.items():
                qn = namer(f"{w}_quantized")
                sn = namer(f"{w}_scale")
                zn = namer(f"{w}_zero_point")
                out = namer(f"{w}_dequantized")
                new_inits[qn] = wq.q
                new_inits[sn] = wq.scale
                new_inits[zn] = np.zeros(wq.scale.shape, np.int8)
                kw = {} if wq.axis is None else {"axis": int(wq.axis)}
                head.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [out], name=namer(f"{w}_DequantizeLinear"), **kw))
                wname[(w, key)] = out
                self.weight_names[(w, key)] = {"weight": qn, "scale": sn, "zero_point": zn, "axis": wq.axis}
        # activations. A tensor read only by quantized layers (an input point) gets a
        # QuantizeLinear -> DequantizeLinear pair per reading node, each with its own scale and
        # zero-point initializers (same values): ORT CPU fuses DQ -> MatMul into
        # MatMulIntegerToFloat only when the int8 Q feeds that one DQ, and its common
        # subexpression elimination would merge pairs that share initializer names. A tensor
        # all of whose readers take the quantized value (a Conv/Gemm output) gets one Q, so that
        # the Conv/Gemm feeds exactly one Q, and a DequantizeLinear per reading node.
        rename: dict[tuple[str, str], str] = {}  # (node name, tensor) -> dequantized tensor
        after: dict[str, list[onnx.NodeProto]] = {}  # producer node name ("" for graph inputs) -> nodes to emit after it
        for t, p in pts.items():
            readers: list[onnx.NodeProto] = []
            for n, _ in self.index.uses(t):
                if (p.all_consumers or n.name in p.consumers) and all(r.name != n.name for r in readers):
                    readers.append(n)
            scale = np.array(p.threshold / 127.0, np.float32)
            nodes: list[onnx.NodeProto] = []

            def quantizer():
                sn, zn, qn = namer(f"{t}_scale"), namer(f"{t}_zero_point"), namer(f"{t}_quantized")
                new_inits[sn] = scale
                new_inits[zn] = np.array(0, np.int8)
                nodes.append(helper.make_node("QuantizeLinear", [t, sn, zn], [qn], name=namer(f"{t}_QuantizeLinear")))
                return qn, sn, zn

            shared = quantizer() if p.all_consumers else None
            for n in readers:
                qn, sn, zn = shared if shared is not None else quantizer()
                dq = namer(f"{t}_dequantized")
                nodes.append(helper.make_node("DequantizeLinear", [qn, sn, zn], [dq], name=namer(f"{t}_DequantizeLinear")))
                rename[(n.name, t)] = dq
            prod = self.index.producer.get(t)
            after.setdefault(prod.name if prod is not None else "", []).extend(nodes)
        wslot = {q.node.name: (q.w_slot, wname[(l.target.weight, q.wkey)]) for l in active for q in l.quses}
        split = {q.node.name for l in active for q in l.quses if self._split_bias(q, pts)}
        out_nodes = list(head) + after.get("", [])
        replaced: set[str] = set()  # Gemm biases moved into an Add as bias * beta
        for node in self.base_nodes:
            n = onnx.NodeProto()
            n.CopyFrom(node)
            if node.name in wslot:
                slot, name = wslot[node.name]
                n.input[slot] = name
            for i, x in enumerate(n.input):
                r = rename.get((node.name, x))
                if r is not None:
                    n.input[i] = r
            out_nodes.append(n)
            if node.name in split:
                # Gemm without C -> QGemm with a float output in ORT; the bias becomes an Add
                y = node.output[0]
                bias = node.input[2]
                beta = float(attr(node, "beta", 1.0))
                if beta != 1.0:
                    scaled = namer(f"{bias}_times_beta")
                    new_inits[scaled] = (np.asarray(self.loaded.array(bias), np.float32) * np.float32(beta)).astype(np.float32)
                    replaced.add(bias)  # dropped below unless something else reads it
                    bias = scaled
                tmp = namer(f"{y}_without_bias")
                del n.input[2:]
                n.output[0] = tmp
                keep_attrs = [a for a in n.attribute if a.name != "beta"]
                del n.attribute[:]
                n.attribute.extend(keep_attrs)
                out_nodes.append(helper.make_node("Add", [tmp, bias], [y], name=namer(f"{node.name}_bias")))
            out_nodes.extend(after.get(node.name, []))
        chain_nodes = {c.name for l in active for q in l.quses for c in q.use.chain}
        candidates = {l.target.weight for l in active} | replaced
        for l in active:
            for q in l.quses:
                for c in q.use.chain:
                    candidates.update(i for i in c.input[1:] if i)
        opset = self.opset_new if active else None
        return _finish_edit(self.loaded, out_nodes, new_inits, chain_nodes, candidates, opset)

    def _split_bias(self, q: _QUse, pts: dict[str, _Point]) -> bool:
        """A Gemm whose output stays float: move its bias C into an Add (ORT fuses QGemm only without C then)."""
        node = q.node
        if node.op_type != "Gemm" or len(node.input) < 3 or not node.input[2]:
            return False
        y = node.output[0]
        if y in pts and pts[y].all_consumers:
            return False
        bias = node.input[2]
        if bias not in self.index.initializers:
            return False
        c = self.loaded.initializer(bias)
        return c is not None and c.data_type == TensorProto.FLOAT

    # -- report ----------------------------------------------------------------------
    def row(self, layer: _Int8Layer, pts: dict[str, _Point] | None, is_float: str | None) -> dict:
        row: dict[str, Any] = {"mode": "int8", "bits": 8}
        if layer.weights:
            scales = np.concatenate([w.scale.reshape(-1) for w in layer.weights.values()])
            row["weight_scale_min"] = float(scales.min())
            row["weight_scale_max"] = float(scales.max())
            row["weight_granularity"] = "per-channel" if self.per_channel else "per-tensor"
            row["weight_sqnr_db"] = _finite_or_none(min(w.sqnr for w in layer.weights.values()), 2)
            roundings = sorted({w.rounding for w in layer.weights.values()})
            row["weight_rounding"] = roundings[0] if len(roundings) == 1 else roundings
            ratios = [w.output_error_ratio for w in layer.weights.values() if w.output_error_ratio is not None]
            if ratios:  # the layer's output error on the calibration inputs, relative to nearest rounding
                row["weight_output_error_vs_nearest"] = round(max(ratios), 4)
            skipped = [self.gram_skipped[(layer.target.name, k)] for k in layer.weights if (layer.target.name, k) in self.gram_skipped]
            if skipped:
                row["weight_rounding_note"] = f"nearest: {skipped[0]}"
            if not is_float:
                row["initializers"] = [self.weight_names[(layer.target.weight, k)] for k in layer.weights if (layer.target.weight, k) in self.weight_names]
        acts = []
        for q in layer.quses:
            s = self.stats.get(q.act)
            if s is None or any(a["tensor"] == q.act for a in acts):
                continue
            a = {"tensor": q.act, "threshold": s.threshold, "method": s.method, "sqnr_db": _finite_or_none(s.sqnr, 2)}
            if s.candidates:
                a["candidates"] = s.candidates
            if s.nonfinite:
                a["nonfinite_values"] = s.nonfinite
            acts.append(a)
        if acts:
            row["activation_threshold"] = acts[0]["threshold"]
            row["activation_method"] = acts[0]["method"]
            row["activation_sqnr_db"] = acts[0]["sqnr_db"]
            row["activations"] = acts
        if pts is not None and not is_float:
            outs = []
            for q in layer.quses:
                y = q.node.output[0]
                if y in pts and pts[y].all_consumers:
                    outs.append({"tensor": y, "threshold": pts[y].threshold, "threshold_from": pts[y].source})
            if outs:
                row["outputs"] = outs
            elif any(q.node.op_type == "Conv" for q in layer.quses):
                row["output"] = "float (graph output or read by an op kept float)"
            elif any(self._split_bias(q, pts) for q in layer.quses):
                row["output"] = "float (bias moved to an Add: ORT fuses QGemm with a float output)"
        if is_float:
            row["float"] = is_float
            row["bits"] = None
        return row


GPTQ_MAX_FEATURES = 4096  # gptq rounding for layers with at most this many inputs (a K x K float32 Gram)
GPTQ_GRAM_BYTES = 512 << 20  # and at most this much Gram memory in all; beyond, nearest rounding


def _add_gram(grams: dict, key: tuple, spec, a: np.ndarray, tokens: np.ndarray | None = None) -> None:
    """grams[key] += sum of x x^T over the batch `a` of the layer input (G, K, K float32).

    Dense: x runs along the spec's feature axis, every other axis is samples. Conv: x
    is an im2col patch (statistics.im2col, the column order of W.reshape(O/G, -1)),
    built a few samples at a time. float32 products over bounded chunks, summed in
    float32: half the memory of float64 sums, and their ~1e-6 relative error is far
    below the 1% damping gptq adds to the diagonal. ``tokens``: the batch's real-token
    mask (statistics.token_mask): padded positions do not count.
    """
    from .statistics import im2col, token_rows

    a = np.asarray(a, np.float32)
    if spec.kind == "dense":
        x = token_rows(np.moveaxis(a, spec.feature_axis, -1), tokens)[None]
        parts = [x]
    else:
        per = max(1, int(a[:1].size * int(np.prod(spec.kernel_shape))))  # patch values of one sample
        step = max(1, (16 << 20) // (4 * per))
        parts = (im2col(a[i : i + step], spec) for i in range(0, a.shape[0], step))
    for P in parts:
        G, rows, K = P.shape
        acc = grams.get(key)
        if acc is None:
            acc = grams[key] = np.zeros((G, K, K), np.float32)
        step = max(1, (16 << 20) // (4 * K))
        for g in range(G):
            for r0 in range(0, rows, step):
                c = P[g, r0 : r0 + step]
                acc[g] += c.T @ c  # numpy runs c.T @ c as one SYRK (half the flops of a product)


def _rows_of(eff: np.ndarray, use: Use) -> np.ndarray:
    """A dense layer's effective weight as (outputs, inputs) rows."""
    return np.moveaxis(eff, use.out_axis, 0).reshape(eff.shape[use.out_axis], -1)


def _from_rows(rows: np.ndarray, shape: tuple, use: Use) -> np.ndarray:
    moved = [shape[use.out_axis]] + [d for i, d in enumerate(shape) if i != use.out_axis]
    return np.moveaxis(rows.reshape(moved), 0, use.out_axis)


def _gptq_conv_weight(eff: np.ndarray, scale: np.ndarray, gram: np.ndarray,
                      damp: float) -> tuple[np.ndarray, float | None]:
    """gptq_round on each conv group's (O/G, K) rows of an effective conv weight [O, I/G, kh, kw].

    Returns the int8 weight and the layer's output error on the calibration inputs
    (sum over rows of d H d^T) relative to nearest rounding's. (Dense layers go
    through one gptq_round call with the rows of every layer sharing their input.)
    """
    O = eff.shape[0]
    per = O // gram.shape[0]
    rows = eff.reshape(O, -1)
    blocks = [(slice(g * per, (g + 1) * per), g) for g in range(gram.shape[0])]
    s = np.asarray(scale, np.float64).reshape(-1)
    out = np.empty(rows.shape, np.int8)
    e_new = e_old = 0.0
    for sl, g in blocks:
        out[sl], e1, e0 = qm.gptq_round(rows[sl], s[sl], gram[g], bits=8, damp=damp, return_errors=True)
        e_new += float(e1.sum())
        e_old += float(e0.sum())
    return out.reshape(eff.shape), (e_new / e_old if e_old > 0 else None)


# --------------------------------------------------------------------------- log / lut


@dataclass
class _CodeLayer:
    target: Target
    reason: str | None = None
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: dict[str, np.ndarray] = field(default_factory=dict)
    function: str = ""
    row: dict = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    table: bool = False  # a Gather table (embedding), not a MatMul/Gemm/Conv target
    pending: Any = None  # (storage -> (function, bytes), finish(storage)) until the storage is chosen


def _stored_axis(loaded, target: Target) -> int | None:
    """The stored tensor's axis that holds the primary use's output channels, or None."""
    use = target.primary
    stored = loaded.initializer(target.weight)
    shape = tuple(int(d) for d in stored.dims)
    view = WeightView(loaded, target.weight, use)
    idx = view.index_map()
    if idx is None:
        return use.out_axis if len(shape) == len(use.eff_shape) else None
    oc = np.broadcast_to(
        np.arange(use.eff_shape[use.out_axis]).reshape([-1 if i == use.out_axis else 1 for i in range(len(use.eff_shape))]),
        use.eff_shape,
    ).reshape(-1)
    stored_oc = np.empty(int(np.prod(shape)), np.int64)
    stored_oc[idx.reshape(-1)] = oc
    stored_oc = stored_oc.reshape(shape)
    for ax in range(len(shape)):
        if shape[ax] != use.eff_shape[use.out_axis]:
            continue
        ref = np.arange(shape[ax]).reshape([-1 if i == ax else 1 for i in range(len(shape))])
        if np.array_equal(stored_oc, np.broadcast_to(ref, shape)):
            return ax
    return None


FUNCTION_DOMAIN = "nmcompile"
TABLE_MIN_ELEMENTS = 4096  # a float Gather table (embedding) at least this large is coded like a weight
HALF_MIN_ELEMENTS = 16  # float32 parameters smaller than this (scalars, epsilons, small constants) stay float32
_HALF_REL = 2.0**-11  # float16 rounding: half an ulp of a normal float16, relative

# Where a float32 initializer is a parameter that float16 storage holds well (op, input slot): additive
# ones (biases, shifts, position tables, embedding rows) are judged by the rounding relative to the
# tensor's largest value, multiplicative ones (gains, slopes) value by value.
_ADDITIVE_SLOTS = {
    ("Conv", 2), ("ConvTranspose", 2), ("Gemm", 2), ("LayerNormalization", 2), ("InstanceNormalization", 2),
    ("GroupNormalization", 2), ("BatchNormalization", 2), ("Add", 0), ("Add", 1), ("Sub", 0), ("Sub", 1), ("Gather", 0),
}
# Not Mul operands: a product may feed something periodic (rotary angles from a
# frequency table), where a relative 2^-11 is not small.
_MULTIPLICATIVE_SLOTS = {
    ("LayerNormalization", 1), ("InstanceNormalization", 1), ("GroupNormalization", 1), ("BatchNormalization", 1),
    ("PRelu", 1),
}


def _fits_half(values, rows: int = 1, relative: bool = False) -> bool:
    """True when float16 storage of `values` is within 2^-11 of what it must keep.

    ``relative``: every value is 0 or a normal float16 (each value within 2^-11 of
    itself). Else the rounding of every value is within 2^-11 of the largest |v| of
    its row (the values split into `rows` rows), which lets values far below the
    row's scale round to float16 subnormals (codebook levels near 0, small biases).
    """
    a = np.asarray(values, dtype=np.float64).reshape(max(1, rows), -1)
    if a.size == 0:
        return True
    m = np.abs(a)
    if not np.all(np.isfinite(a)) or float(m.max()) > 65504.0:
        return False
    if relative:
        return bool(np.all((m == 0) | (m >= 2.0**-14)))
    err = np.abs(a.astype(np.float16).astype(np.float64) - a)
    return bool(np.all(err <= _HALF_REL * m.max(axis=1, keepdims=True)))


class _Body:
    """Nodes of one decoding function. Intermediate tensors get short generated names
    (the body is stored once per function, but every byte of it is in the file);
    each small constant is defined once."""

    def __init__(self, opset: int):
        self.nodes: list[onnx.NodeProto] = []
        self.known: dict[str, str] = {}  # key -> tensor name (constants, counts)
        self.k = 0
        self.opset = opset

    def _fresh(self) -> str:
        self.k += 1
        return f"t{self.k}"

    def add(self, op: str, inputs: list[str], output: str | None = None, **kw) -> str:
        output = output or self._fresh()
        self.nodes.append(helper.make_node(op, inputs, [output], **kw))
        return output

    def const(self, key: str, value) -> str:
        if key not in self.known:
            name = self._fresh()
            self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value))))
            self.known[key] = name
        return self.known[key]

    def i64(self, *values: int) -> str:
        """A [len] int64 constant (Constant value_ints from opset 12: a few bytes smaller)."""
        key = f"i64{values}"
        if key not in self.known and self.opset >= 12:
            name = self._fresh()
            self.nodes.append(helper.make_node("Constant", [], [name], value_ints=[int(v) for v in values]))
            self.known[key] = name
        return self.const(key, np.array(values, np.int64))

    def count(self, shape: str) -> str:
        """[1] int64: the number of elements of a tensor of shape `shape`."""
        key = f"count:{shape}"
        if key not in self.known:
            self.known[key] = self.add("ReduceProd", [shape], keepdims=1)
        return self.known[key]

    def ceil_div(self, x: str, f: int) -> str:
        return x if f == 1 else self.add("Div", [self.add("Add", [x, self.i64(f - 1)]), self.i64(f)])

    def packed_bytes(self, count: str, radix: int) -> str:
        """[1] int64: the bytes pack_radix takes for `count` digits."""
        k, f = radix_word(radix)
        words = self.ceil_div(count, f)
        return words if k == 1 else self.add("Mul", [words, self.i64(k)])

    def digits(self, packed: str, radix: int, count: str | None) -> str:
        """uint8 bytes of pack_radix(v, radix) -> the flat int32 values (the first `count`).
        Words of several bytes are summed from their byte planes first (int32 while they fit)."""
        k, f = radix_word(radix)
        wide = 256**k > 2**31
        itype, npt = (TensorProto.INT64, np.int64) if wide else (TensorProto.INT32, np.int32)
        c = self.add("Cast", [packed], to=itype)
        if f == 1:  # one value per byte: nothing to split, no tail
            return c
        if k > 1:  # word = sum_b plane_b * 256^b, by Add: ORT's int64 ReduceSum rounds past 2^53
            planes = self.add("Reshape", [c, self.i64(k, -1)])
            word = None
            for byte in range(k):
                row = self.add("Gather", [planes, self.const(f"row{byte}", np.array(byte, np.int64))], axis=0)
                if byte:
                    row = self.add("Mul", [row, self.const(f"byte{byte}{itype}", np.array(256**byte, npt))])
                word = row if word is None else self.add("Add", [word, row])
            c = word
        div = self.const(f"div{radix}", (radix ** np.arange(f, dtype=np.int64)).astype(npt).reshape(f, 1))
        mod = self.const(f"mod{radix}{itype}", np.array(radix, npt))
        flat = self.add("Reshape", [self.add("Mod", [self.add("Div", [c, div]), mod]), self.i64(-1)])
        flat = self.add("Slice", [flat, self.i64(0), count])
        return self.add("Cast", [flat], to=TensorProto.INT32) if wide else flat


@dataclass(frozen=True)
class _Layout:
    """What a decoding function needs to know beyond its inputs (one function per distinct layout)."""

    storage: str  # "dense" | "nm"
    width: int  # bits per code (1-8; 8 where codes are stored a byte each)
    aux: str  # "none" | "offsets" | "scale" (float) | "qscale" (uint8)
    dtype: int  # the weight's TensorProto type
    side: int  # the codebook's stored type
    rank: int  # rank of the stored weight
    channel: int | None  # its channel axis (where a per-channel scale varies)
    merged: bool  # codes, positions and a uint8 scale in one uint8 tensor (opset >= 10)
    red: int = 0  # nm: the reduction axis, split into (groups, m)
    n: int = 0
    m: int = 0
    positions: tuple = ()  # nm: ("positional", bits) or ("pattern",)

    @property
    def separate_aux(self) -> bool:
        return self.aux in ("offsets", "scale") or (self.aux == "qscale" and not self.merged)

    def name(self, prefix: str) -> str:
        """E.g. nm2of4_w4_pat_r0_d2_c1_qscale_f16: 2:4 storage, 4-bit code fields, pattern
        positions, reduction axis 0 of a rank-2 weight, uint8 scale along axis 1 (in the
        data), float16 codebook (to float32); dense_w4_d4_none_f32; ..._sep: scale or
        codes apart (below opset 10). The function itself is named f0, f1, ... (every node
        names its function) with this as its doc string and the report row's decode_layout."""
        short = {TensorProto.FLOAT: "f32", TensorProto.FLOAT16: "f16", TensorProto.DOUBLE: "f64"}
        if self.storage == "dense":
            s = f"dense_w{self.width}"
        else:
            pos = f"pos{self.positions[1]}" if self.positions[0] == "positional" else "pat"
            s = f"nm{self.n}of{self.m}_w{self.width}_{pos}_r{self.red}"
        s += f"_d{self.rank}"
        if self.aux == "qscale" and not self.separate_aux:
            s += f"_c{self.channel}"
        side = short[self.side] if self.dtype == TensorProto.FLOAT else f"{short[self.side]}to{short[self.dtype][1:]}"
        return prefix + s + f"_{self.aux}_{side}" + ("" if self.merged else "_sep")


def _decode_function(name: str, L: _Layout, opset: int) -> onnx.FunctionProto:
    """One ONNX local function per decoding layout: each weight is then a single node.

    Inputs (data, shape, codebook[, aux]) -> W. ``data`` (uint8) holds, one after
    the other (opset >= 10, "merged"): the packed codes, for N:M storage the packed
    positions, and a uint8 per-channel scale; every section's length follows from
    ``shape`` (ReduceProd and ceiling divisions), the scale runs to the end. Below
    opset 10 ``data`` is the codes alone (one per byte) and a scale is ``aux``.
    N:M storage derives the group layout from ``shape`` too: the reduction axis r
    split into (shape[r]/m, m) (zeros scattered into), (shape[r]/m, n) (the kept
    codes), (shape[r]/m, 1) (one pattern index per group). Positions: ("positional",
    w) each kept weight's position in its group, w bits; ("pattern",) one index per
    group into the C(m, n) sorted position patterns (pack_radix, radix C(m, n)),
    expanded by a Gather from the pattern table. aux: "scale" (float per-channel
    scale, Mul after the Gather), "qscale" (uint8 per-channel scale: Cast, Mul; the
    codebook holds the unit), "offsets" (per-channel codebook offsets, Add before the
    Gather) or "none". Per-channel tensors broadcast against the (kept) code layout.
    """
    b = _Body(opset)
    inputs = ["data", "shape", "codebook"] + (["aux"] if L.separate_aux else [])
    R = L.rank
    if L.storage == "dense":
        code_shape = "shape"
    else:
        r = L.red
        head = [b.add("Slice", ["shape", b.i64(0), b.i64(r)])] if r > 0 else []
        tail = [b.add("Slice", ["shape", b.i64(r + 1), b.i64(R)])] if r + 1 < R else []
        groups = b.add("Div", [b.add("Slice", ["shape", b.i64(r), b.i64(r + 1)]), b.i64(L.m)])
        group_shape, kept_shape = (b.add("Concat", head + [groups, b.i64(k)] + tail, axis=0) for k in (L.m, L.n))
        if L.positions[0] == "pattern":
            pattern_shape = b.add("Concat", head + [groups, b.i64(1)] + tail, axis=0)
        code_shape = kept_shape
    code_radix = 1 << L.width
    count = b.count(code_shape) if L.merged or radix_word(code_radix)[1] > 1 else None
    aux = "aux"
    if L.merged:
        end = b.packed_bytes(count, code_radix)
        codes = b.add("Slice", ["data", b.i64(0), end])
        if L.storage != "dense":
            if L.positions[0] == "positional":
                pos_radix, pos_count = 1 << L.positions[1], count
            else:
                pos_radix, pos_count = math.comb(L.m, L.n), b.count(pattern_shape)
            pos_end = b.add("Add", [end, b.packed_bytes(pos_count, pos_radix)])
            positions = b.add("Slice", ["data", end, pos_end])
            end = pos_end
        if L.aux == "qscale":
            layout_rank = R if L.storage == "dense" else R + 1
            ch = L.channel if L.storage == "dense" or L.channel < L.red else L.channel + 1
            bshape = [-1 if i == ch else 1 for i in range(layout_rank)]
            q = b.add("Slice", ["data", end, b.i64(np.iinfo(np.int64).max)])
            aux = b.add("Reshape", [q, b.i64(*bshape)])
    else:
        codes = "data"
    index = b.add("Reshape", [b.digits(codes, code_radix, count), code_shape])
    target = "W" if L.storage == "dense" else None
    if L.storage != "dense":
        if L.positions[0] == "positional":
            pos = b.add("Reshape", [b.digits(positions, 1 << L.positions[1], count), kept_shape])
        else:
            combos = np.array(list(itertools.combinations(range(L.m), L.n)), np.int32)
            pattern = b.add("Reshape", [b.digits(positions, len(combos), pos_count), pattern_shape])
            # position of slot k of a group with pattern p: table[p * n + k]
            slots = np.arange(L.n, dtype=np.int32).reshape([L.n] + [1] * (R - L.red - 1))
            index_n = b.add("Add", [b.add("Mul", [pattern, b.const("n", np.array(L.n, np.int32))]), b.const("slots", slots)])
            pos = b.add("Gather", [b.const("patterns", combos.reshape(-1)), index_n], axis=0)
    cast = L.side != L.dtype  # codebook stored narrower than the weight

    def gather(idx: str, out: str | None) -> str:
        if not cast:
            return b.add("Gather", ["codebook", idx], out, axis=0)
        return b.add("Cast", [b.add("Gather", ["codebook", idx], axis=0)], out, to=L.dtype)

    if L.aux == "offsets":
        values = gather(b.add("Add", [index, aux]), target)
    elif L.aux == "none":
        values = gather(index, target)
    elif L.dtype == TensorProto.FLOAT16:
        # the product in float32, then one rounding to float16: the same bits (two float16
        # factors, or one and a uint8 scale, multiply exactly in float32), but ORT's CPU has
        # no float16 Mul, so a float16 product would be decoded on every run, not folded at load
        book = b.add("Cast", [b.add("Gather", ["codebook", index], axis=0)], to=TensorProto.FLOAT)
        product = b.add("Mul", [book, b.add("Cast", [aux], to=TensorProto.FLOAT)])
        values = b.add("Cast", [product], target, to=TensorProto.FLOAT16)
    else:
        scale = b.add("Cast", [aux], to=L.dtype) if L.aux == "qscale" else aux  # a float scale has the weight's dtype
        values = b.add("Mul", [gather(index, None), scale], target)
    if L.storage != "dense":
        zero = np.zeros(1, helper.tensor_dtype_to_np_dtype(L.dtype))
        zeros = b.add("ConstantOfShape", [group_shape], value=numpy_helper.from_array(zero))
        b.add("Reshape", [b.add("ScatterElements", [zeros, pos, values], axis=L.red + 1), "shape"], "W")
    return helper.make_function(FUNCTION_DOMAIN, name, inputs, ["W"], b.nodes, opset_imports=[helper.make_opsetid("", opset)])


class _Codebook:
    def __init__(self, ctx: CompileContext, qopts: QuantOptions, targets: list[Target]):
        self.ctx = ctx
        self.loaded = ctx.model
        self.qopts = qopts
        graph = self.loaded.model.graph
        self.base_nodes = list(graph.node)
        opset = opset_version(self.loaded.model)
        if opset < 9:
            raise UserError(f"--quantize {qopts.mode} needs opset >= 9; the model has opset {opset}")
        self.opset_new: int | None = None
        if opset < SCATTER_OPSET and _can_raise_opset(self.loaded.model, SCATTER_OPSET):
            self.opset_new = SCATTER_OPSET
        self.opset = self.opset_new or opset
        self.packed = self.opset >= PACK_OPSET  # Mod, Slice with inputs
        self.can_scatter = self.opset >= SCATTER_OPSET
        self.namer = _Namer(graph)
        self.index = GraphIndex(graph)
        self.functions: dict[str, onnx.FunctionProto] = {}
        self.shared: dict[str, np.ndarray] = {}  # small int64 constants, named by value
        self._shared_names: dict[tuple, str] = {}  # (kind, values) -> name
        self._serial = 0  # coded weights so far: their tensors and nodes are named by this number
        weights = {t.weight for t in targets}
        tables = self._find_tables(weights) if qopts.quantize_tables else []
        self.layers = [self._layer(t) for t in ctx.progress(targets, desc=f"{qopts.mode} codes")]
        self.layers += [self._layer(t, axis) for t, axis in tables]
        self._choose_storage()
        self.params = self._find_params(weights | {t.weight for t, _ in tables}) if qopts.float16_params else []
        self.params_edit = self._params_edit(self.params) if self.params else None

    def _shared(self, kind: str, values) -> str:
        """One int64 initializer per distinct value, e.g. ``s64x128`` for the shape [64, 128].

        Names the pass creates are short (every byte of a name is in the file, once per
        reference: on the 2:4 digits encoder the long descriptive names were ~5% of the
        file); the report says which initializer holds what.
        """
        arr = np.asarray(values, np.int64).reshape(-1)
        key = (kind, tuple(int(v) for v in arr))
        if key not in self._shared_names:
            name = self.namer(f"{kind[0]}{'x'.join(str(int(v)) for v in arr)}")
            self._shared_names[key] = name
            self.shared[name] = arr
        return self._shared_names[key]

    def _peek(self, base: str) -> str:
        name, k = base, 1
        while name in self.namer.taken:
            name, k = f"{base}_{k}", k + 1
        return name

    def _function(self, layout: _Layout) -> str:
        name = layout.name("")
        if name not in self.functions:
            self.functions[name] = _decode_function(name, layout, self.opset)
        return name

    # -- what else the codes cover ------------------------------------------------
    def _find_tables(self, taken: set[str]) -> list[tuple[Target, int]]:
        """Large float initializers read only as the data of Gather nodes (embedding tables).

        They are weights like the others: coded with one scale (or codebook) per slice
        along the Gather axis, the rows a lookup reads.
        """
        graph = self.loaded.model.graph
        inputs = {i.name for i in graph.input}
        out = []
        for t in graph.initializer:
            name = t.name
            if name in taken or name in inputs or name in self.index.graph_outputs:
                continue
            if t.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
                continue
            dims = [int(d) for d in t.dims]
            if len(dims) < 2 or int(np.prod(dims)) < TABLE_MIN_ELEMENTS:
                continue
            uses = self.index.uses(name)
            if not uses or any(n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or i != 0 for n, i in uses):
                continue
            axes = {int(attr(n, "axis", 0)) % len(dims) for n, _ in uses}
            if len(axes) != 1:
                continue
            out.append((Target(name=uses[0][0].name or name, weight=name, uses=[]), axes.pop()))
        return out

    def _find_params(self, taken: set[str]) -> list[str]:
        """float32 initializers that float16 storage holds within 2^-11 (see _ADDITIVE_SLOTS).

        Biases, normalization gains and shifts, position tables, small embedding tables:
        every read of the tensor must be such a parameter slot of a default-domain node
        (none inside a subgraph), at least HALF_MIN_ELEMENTS values, not a graph input or
        output, and not integer-valued beyond what float16 holds exactly (|v| > 2048).
        """
        graph = self.loaded.model.graph
        inputs = {i.name for i in graph.input}
        out = []
        for t in graph.initializer:
            name = t.name
            if name in taken or name in inputs or name in self.index.graph_outputs or t.data_type != TensorProto.FLOAT:
                continue
            if int(np.prod([int(d) for d in t.dims])) < HALF_MIN_ELEMENTS:
                continue
            uses = self.index.uses(name)
            if not uses or any(n.domain not in ("", "ai.onnx") for n, _ in uses):
                continue
            slots = {(n.op_type, i) for n, i in uses}
            if not slots <= (_ADDITIVE_SLOTS | _MULTIPLICATIVE_SLOTS):
                continue
            a = np.asarray(self.loaded.array(name))
            if not _fits_half(a, relative=bool(slots & _MULTIPLICATIVE_SLOTS)):
                continue
            # integer-valued floats (positions, counts, index arithmetic) must stay exact:
            # float16 holds integers exactly only up to 2048
            if np.array_equal(a, np.round(a)) and not np.array_equal(a.astype(np.float16).astype(a.dtype), a):
                continue
            out.append(name)
        return out

    def _params_edit(self, names: list[str]) -> tuple[list[onnx.NodeProto], dict[str, np.ndarray], dict]:
        """One float16 initializer holding every parameter, one Cast and one Split back to the float32 names."""
        arrays = [np.asarray(self.loaded.array(n), np.float32) for n in names]
        # short generated names (p: the float16 blob, p32 its float32 cast, pf<i> flat tensors)
        blob = self.namer("p")
        wide = self.namer("p32")
        outs, tail = [], []
        for i, (name, a) in enumerate(zip(names, arrays)):
            if a.ndim == 1:
                outs.append(name)
            else:
                flat = self.namer(f"pf{i}")
                outs.append(flat)
                tail.append(helper.make_node("Reshape", [flat, self._shared("shape", a.shape)], [name], name=self.namer(f"pr{i}")))
        inits: dict[str, np.ndarray] = {blob: np.concatenate([a.reshape(-1) for a in arrays]).astype(np.float16)}
        if len(arrays) == 1:
            nodes = [helper.make_node("Cast", [blob], outs, name=self.namer("pc"), to=TensorProto.FLOAT)]
        else:
            nodes = [helper.make_node("Cast", [blob], [wide], name=self.namer("pc"), to=TensorProto.FLOAT)]
            sizes = [int(a.size) for a in arrays]
            if self.opset >= 13:
                split = self.namer("pn")
                inits[split] = np.array(sizes, np.int64)
                nodes.append(helper.make_node("Split", [wide, split], outs, name=self.namer("ps"), axis=0))
            else:
                nodes.append(helper.make_node("Split", [wide], outs, name=self.namer("ps"), axis=0, split=sizes))
        n = int(sum(a.size for a in arrays))
        info = {"tensors": len(names), "values": n, "bytes_before": 4 * n, "bytes_after": 2 * n, "initializer": blob,
                "rule": "float16 within 2^-11 of each tensor's largest value (additive) or of each value (multiplicative)"}
        return nodes + tail, inits, info

    # -- encoding ---------------------------------------------------------------
    def _layer(self, target: Target, table_axis: int | None = None) -> _CodeLayer:
        layer = _CodeLayer(target, table=table_axis is not None)
        loaded = self.loaded
        serial = self._serial
        self._serial += 1
        stored = loaded.initializer(target.weight)
        if table_axis is None:
            layer.reason = _weight_problem(loaded, target)
            if layer.reason:
                return layer
        if stored.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE):
            layer.reason = f"weight is {TensorProto.DataType.Name(stored.data_type)}"
            return layer
        w = np.asarray(loaded.array(target.weight))
        dtype = w.dtype
        w32 = w.astype(np.float32)
        nd = w32.ndim
        axis = _stored_axis(loaded, target) if table_axis is None else table_axis
        bits = self.qopts.bits
        K = 1 << bits
        n = w32.size
        width = bits if self.packed else 8  # one code a byte where there is no Mod to unpack them
        granularity = None
        offsets = None
        scale = None
        bshape = [-1 if i == axis else 1 for i in range(nd)]
        if self.qopts.mode == "log":
            codes, scale, book = qm.log_quantize(w32, bits, axis)
            # the scale stays in the weight's dtype: each channel's largest weight is exact
            codes, book_t, scale_t, offsets, decoded = self._variant(codes, book, scale, None, axis, dtype, bshape, half_side=False)
            kind = "log2"
        else:
            C = w32.shape[axis] if axis is not None else 1
            gran = self.qopts.lut_granularity
            reserve_zero = bool(np.any(w32 == 0))  # code 0 = exact 0 only where zeros exist (N:M)
            if gran == "auto":
                # per-channel codebooks where they cost at most 1/8 of the codes (float16 side
                # information: >= 512 weights per channel at 4 bits), else one codebook for the
                # weight over per-channel scales. Measured on the digits models, one codebook for
                # the raw weight ("layer": no per-channel scales) costs about 1 dB of weight SQNR
                # but doubles the output error of the CNN and loses 6 points on the 2:4 encoder:
                # not a default.
                side = 2 if w.dtype == np.float32 else w.itemsize
                if axis is None:
                    gran = "layer"
                elif C * K * side * 8 <= n * width / 8:
                    gran = "channel"
                else:
                    gran = "tensor"
            elif gran in ("channel", "tensor") and axis is None:
                gran = "layer"  # no channel axis: one codebook (a scalar scale would fold into it)
            granularity = gran
            if gran == "channel":
                codes, books = qm.lut_quantize(w32, bits, axis=axis, reserve_zero=reserve_zero)
                offsets = (np.arange(C, dtype=np.int32) * K).reshape(bshape)
                variant = self._variant(codes, books, None, offsets, axis, dtype, bshape)
            elif gran == "layer":
                codes, book = qm.lut_quantize(w32, bits, axis=None, reserve_zero=reserve_zero)
                variant = self._variant(codes, book, None, None, axis, dtype, bshape)
            else:
                q, unit = _uint8_scales(w32, axis)
                s = q.astype(np.float64).reshape(bshape) * unit
                u = w32.astype(np.float64) / s
                sw = np.broadcast_to(s**2, w32.shape)
                codes, book = qm.lut_quantize(u, bits, axis=None, sample_weight=sw, reserve_zero=reserve_zero)
                # the unit folds into the codebook: W = (codebook * unit)[code] * q[channel]
                variant = self._variant(codes, book.astype(np.float64) * unit, q.reshape(bshape), None, axis, dtype, bshape)
            codes, book_t, scale_t, offsets, decoded = variant
            kind = "kmeans"
        if np.any((w32 == 0) & (decoded != 0)):  # pragma: no cover - guaranteed by the quantizers
            raise RuntimeError(f"{target.name}: a zero weight did not decode to 0")

        compressed = None
        if self.qopts.nm_storage != "dense" and self.packed and self.can_scatter and table_axis is None:
            compressed = self._compressed(target, w32, codes)
        builds = {"dense": self._build(target, serial, "dense", codes, width, book_t, scale_t, offsets, axis, None, dtype)}
        if compressed is not None:
            builds["compressed"] = self._build(target, serial, "compressed", codes, width, book_t, scale_t, offsets, axis, compressed, dtype)
        sqnr = _finite_or_none(qm.sqnr_db(w32, decoded.astype(np.float32)), 2)

        def finish(storage: str, short: Mapping[str, str]) -> None:
            node, inits, layout_name, nbytes, names, sections = builds[storage]
            fn = short[layout_name]
            node.op_type = fn
            self.namer.taken.update(inits)
            self.namer.taken.add(node.name)
            layer.nodes = [node]
            layer.inits = inits
            layer.function = fn
            layer.bytes_before = int(w.nbytes)
            layer.bytes_after = int(sum(np.asarray(a).nbytes for a in inits.values()))
            packing: dict[str, Any] = {"code_width": width, "code_word": list(radix_word(1 << width)), "layout": "planar", "sections": sections}
            if storage == "compressed":
                if compressed["positions"][0] == "positional":
                    packing["position_width"] = compressed["positions"][1]
                else:
                    packing["position_patterns"] = math.comb(self.qopts.pattern[1], self.qopts.pattern[0])
                    packing["position_word"] = list(radix_word(packing["position_patterns"]))
            row = {
                "mode": self.qopts.mode,
                "bits": bits,
                "codebook": kind if granularity is None else f"{kind}-{granularity}",
                "storage": "nm-compressed" if storage == "compressed" else "dense",
                "channel_axis": axis,
                "weight_sqnr_db": sqnr,
                "bytes_before": layer.bytes_before,
                "bytes_after": layer.bytes_after,
                "packing": packing,
                "initializers": names,
                "decode_function": f"{FUNCTION_DOMAIN}.{fn}",
                "decode_layout": layout_name,
                "decode_node": node.name,
            }
            if table_axis is not None:
                row["table"] = {"gather_axis": table_axis}
            if storage == "compressed":
                row["nm"] = {"n": self.qopts.pattern[0], "m": self.qopts.pattern[1], "axis": target.primary.red_axis}
            if scale_t is not None:
                eff = np.asarray(scale_t, np.float64).reshape(-1)
                if scale_t.dtype == np.uint8:  # the real scale is q times the unit held in the codebook
                    eff = eff * unit
                    row["scale_encoding"] = "uint8 per channel; the codebook holds the unit"
                row["weight_scale_min"] = float(eff.min())
                row["weight_scale_max"] = float(eff.max())
            if "compressed" in builds:
                row["serialized_bytes"] = {"dense": builds["dense"][3], "nm-compressed": builds["compressed"][3]}
            layer.row = row

        layer.pending = ({k: (v[2], v[3]) for k, v in builds.items()}, finish)
        return layer

    def _choose_storage(self) -> None:
        """Dense or N:M-compressed storage per layer, counting each decoding function once.

        "compressed" / "dense" take that storage wherever it exists. "auto" starts with
        each layer's smaller serialized form, then moves every layer of one decoding
        function to its other storage where that makes the file smaller, the function's
        bytes counted (a layout used by one small layer costs more than its codes save).
        """
        pending = [l for l in self.layers if l.pending is not None]
        mode = self.qopts.nm_storage
        choice = {}
        for i, l in enumerate(pending):
            opts = l.pending[0]
            if "compressed" in opts and (mode == "compressed" or (mode == "auto" and opts["compressed"][1] < opts["dense"][1])):
                choice[i] = "compressed"
            else:
                choice[i] = "dense"
        fbytes = {name: f.ByteSize() for name, f in self.functions.items()}

        def total(ch: dict) -> int:
            used = {pending[i].pending[0][st][0] for i, st in ch.items()}
            return sum(pending[i].pending[0][st][1] for i, st in ch.items()) + sum(fbytes[f] for f in used)

        if mode == "auto":
            for _ in range(len(self.functions) + 1):
                best, best_total = None, total(choice)
                for fn in sorted({pending[i].pending[0][st][0] for i, st in choice.items()}):
                    members = [i for i, st in choice.items() if pending[i].pending[0][st][0] == fn]
                    if not all(len(pending[i].pending[0]) == 2 for i in members):
                        continue
                    trial = dict(choice)
                    for i in members:
                        trial[i] = "dense" if choice[i] == "compressed" else "compressed"
                    t = total(trial)
                    if t < best_total:
                        best, best_total = trial, t
                if best is None:
                    break
                choice = best
        # the functions in use get short names in order of first use (every coded weight's
        # node names its function): f0, f1, ... skipping names of functions already there
        # (a model compiled twice); the layout name is the function's doc string
        taken = {f.name for f in self.loaded.model.functions if f.domain == FUNCTION_DOMAIN}
        short: dict[str, str] = {}
        for i, l in enumerate(pending):
            layout_name = l.pending[0][choice[i]][0]
            if layout_name not in short:
                k = len(short)
                while f"f{k}" in taken:
                    k += 1
                short[layout_name] = f"f{k}"
                taken.add(short[layout_name])
        self.functions = {new: self._renamed(self.functions[old], new) for old, new in short.items()}
        for i, l in enumerate(pending):
            l.pending[1](choice[i], short)
            l.pending = None

    @staticmethod
    def _renamed(fn: onnx.FunctionProto, name: str) -> onnx.FunctionProto:
        out = onnx.FunctionProto()
        out.CopyFrom(fn)
        out.doc_string = f"layout {fn.name}"
        out.name = name
        return out

    @staticmethod
    def _variant(codes, book, scale, offsets, axis, dtype, bshape, half_side: bool = True) -> tuple:
        """(codes uint8, codebook and scale as stored, offsets, what the graph decodes in ``dtype``).

        Codebooks of float32 weights are stored as float16 where the rounding is within
        2^-11 of each codebook's largest level (about 66 dB, against the ~20 dB of 4-bit
        codes), halving the side information; the graph casts them back before use, and
        ``decoded`` is what it computes. A uint8 scale (``_uint8_scales``) is cast to the
        weight's dtype and multiplied in; a float scale keeps the weight's dtype.
        """
        codes = np.asarray(codes, dtype=np.uint8)
        book = np.asarray(book, dtype=np.float64)
        rows = book.shape[0] if book.ndim == 2 else 1
        book = book.reshape(-1)
        side = np.dtype(dtype)
        if half_side and dtype == np.float32 and _fits_half(book.astype(np.float32), rows):
            side = np.dtype(np.float16)
        book_t = book.astype(dtype).astype(side)
        idx = codes.astype(np.int64)
        if offsets is not None:
            idx = idx + offsets.astype(np.int64)
        decoded = book_t[idx].astype(dtype)
        scale_t = None
        if scale is not None:
            scale_t = np.asarray(scale) if np.asarray(scale).dtype == np.uint8 else np.asarray(scale, dtype=dtype)
            if axis is not None and scale_t.ndim:
                scale_t = scale_t.reshape(bshape)
            decoded = (decoded * scale_t.astype(dtype)).astype(dtype)
        return codes, book_t, scale_t, offsets, decoded

    def _build(self, target: Target, serial: int, storage: str, codes, width, book_t, scale_t, offsets, axis, comp, wdtype):
        """(node, initializers, function name, serialized bytes, initializer names, sections) for one storage.

        The tensors and the node are named by the weight's serial number k: c<k> the
        code data, b<k> the codebook, a<k> a separate aux tensor, d<k> the node (its
        output keeps the weight's name). Short names because every byte of a name is
        in the file, once per reference; the report row lists them.
        """
        W = target.weight
        shape = list(codes.shape)
        names: dict[str, str] = {}
        inits: dict[str, np.ndarray] = {}
        prefix = {"codes": "c", "codebook": "b", "scale": "a", "codebook_offsets": "a"}

        def fresh(key: str, arr) -> str:
            name = self._peek(f"{prefix[key]}{serial}")  # registered only for the storage that is kept
            inits[name] = np.asarray(arr)
            names[key] = name
            return name

        if offsets is not None:
            aux_kind = "offsets"
        elif scale_t is None:
            aux_kind = "none"
        else:
            aux_kind = "qscale" if scale_t.dtype == np.uint8 else "scale"
        merged = self.packed
        if storage == "dense":
            layout = _Layout("dense", width, aux_kind, helper.np_dtype_to_tensor_dtype(np.dtype(wdtype)),
                             helper.np_dtype_to_tensor_dtype(book_t.dtype), len(shape), axis, merged)
            parts = [("codes", pack_radix(codes, 1 << width))]
        else:
            r = comp["red_axis"]
            layout = _Layout("nm", width, aux_kind, helper.np_dtype_to_tensor_dtype(np.dtype(wdtype)),
                             helper.np_dtype_to_tensor_dtype(book_t.dtype), len(shape), axis, merged, r,
                             self.qopts.pattern[0], self.qopts.pattern[1], comp["positions"])
            parts = [("codes", pack_radix(comp["codes"], 1 << width)), ("positions", pack_radix(comp["position_values"], comp["radix"]))]
        aux_arr = offsets if offsets is not None else scale_t
        if aux_kind == "qscale" and merged:
            parts.append(("scale", np.asarray(scale_t, np.uint8).reshape(-1)))
        sections, start = {}, 0
        for key, arr in parts:
            sections[key] = [start, start + int(arr.size)]
            start += int(arr.size)
        data = fresh("codes", np.concatenate([a for _, a in parts]) if len(parts) > 1 else parts[0][1])
        book = fresh("codebook", book_t)
        aux = []
        if layout.separate_aux:
            if storage != "dense" and aux_arr.ndim:
                # per-channel aux in the kept layout (the reduction axis split in two: groups, kept)
                kshape = [1] * (len(shape) + 1)
                if axis is not None:
                    kshape[axis if axis < comp["red_axis"] else axis + 1] = -1
                aux_arr = aux_arr.reshape(kshape)
            aux = [fresh("codebook_offsets" if offsets is not None else "scale", aux_arr)]
        fn = self._function(layout)
        inputs = [data, self._shared("shape", shape), book] + aux
        node = helper.make_node(fn, inputs, [W], name=self._peek(f"d{serial}"), domain=FUNCTION_DOMAIN)
        nbytes = node.ByteSize() + sum(numpy_helper.from_array(np.asarray(a), k).ByteSize() for k, a in inits.items())
        return node, inits, fn, nbytes, names, sections

    def _compressed(self, target: Target, w32: np.ndarray, codes: np.ndarray) -> dict | None:
        """Kept codes and positions when the weight is N:M along its reduction axis, else None.

        Layout: the reduction axis r of the weight is split into (groups, M); the kept codes
        are stored as shape[:r] + [groups, N] + shape[r+1:]. Positions: where the C(M, N)
        patterns of a group pack tighter than N positions of ceil(log2 M) bits (2:4: 6
        patterns, three groups a byte, 2.67 bits a group instead of 4), one pattern index
        per group (lexicographic order of the sorted positions; the layout of the codes
        without their N axis), else each kept weight's position.
        """
        pat = self.qopts.pattern
        if pat is None or len(target.uses) != 1 or target.primary.chain:
            return None
        n_keep, m = pat
        if n_keep >= m:
            return None
        use = target.primary
        r = use.red_axis
        shape = list(w32.shape)
        if tuple(shape) != tuple(use.eff_shape) or shape[r] % m:
            return None
        G = shape[r] // m
        gshape = shape[:r] + [G, m] + shape[r + 1 :]
        grp = w32.reshape(gshape)
        nz = grp != 0
        if nz.size and int(nz.sum(axis=r + 1).max()) > n_keep:
            return None
        order = np.argsort(~nz, axis=r + 1, kind="stable")
        pos = np.sort(np.take(order, np.arange(n_keep), axis=r + 1), axis=r + 1)
        kcodes = np.take_along_axis(codes.reshape(gshape), pos, axis=r + 1).astype(np.uint8)
        pos_width = max(1, math.ceil(math.log2(m)))
        patterns = math.comb(m, n_keep)
        if patterns <= 256 and digit_bits(patterns) < n_keep * digit_bits(1 << pos_width):
            combos = np.array(list(itertools.combinations(range(m), n_keep)), np.int64)
            rows = np.moveaxis(pos.astype(np.int64), r + 1, -1)
            if m ** n_keep < 2**62:
                # lexicographic rank of each group's sorted positions, by a base-m key
                place = m ** np.arange(n_keep - 1, -1, -1, dtype=np.int64)
                rank = np.searchsorted(combos @ place, rows @ place)
            else:  # the base-m key would overflow int64 (e.g. 31:32): look the distinct rows up
                uniq, inv = np.unique(rows.reshape(-1, n_keep), axis=0, return_inverse=True)
                lookup = {c: i for i, c in enumerate(map(tuple, combos.tolist()))}
                rank = np.array([lookup[tuple(u)] for u in uniq.tolist()], np.int64)[inv.reshape(-1)].reshape(rows.shape[:-1])
            positions, values, radix = ("pattern", n_keep, m), rank, patterns
        else:
            positions, values, radix = ("positional", pos_width), pos, 1 << pos_width
        return {
            "codes": kcodes,
            "positions": positions,
            "position_values": values,
            "radix": radix,
            "kept_shape": shape[:r] + [G, n_keep] + shape[r + 1 :],
            "group_shape": gshape,
            "red_axis": r,
        }

    # -- graph --------------------------------------------------------------------
    def edit(self, float_set: set[str]) -> _GraphEdit:
        head: list[onnx.NodeProto] = []
        inits: dict[str, np.ndarray] = {}
        removed: set[str] = set()
        functions: dict[str, onnx.FunctionProto] = {}
        active = [l for l in self.layers if l.reason is None and l.target.name not in float_set]
        for l in active:
            head.extend(l.nodes)
            inits.update(l.inits)
            removed.add(l.target.weight)
            functions[l.function] = self.functions[l.function]
        if active and self.params_edit is not None:
            nodes, p_inits, _ = self.params_edit
            head.extend(nodes)
            inits.update(p_inits)
            removed.update(self.params)
        for node in head:
            for i in node.input:
                if i in self.shared:
                    inits[i] = self.shared[i]
        nodes = head + [self._copy(n) for n in self.base_nodes]
        opset = self.opset_new if active else None
        return _GraphEdit(nodes, inits, removed, opset, set(removed), functions=list(functions.values()),
                          domains={FUNCTION_DOMAIN: 1} if active else {})

    @staticmethod
    def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
        n = onnx.NodeProto()
        n.CopyFrom(node)
        return n


def _uint8_scales(w: np.ndarray, axis: int) -> tuple[np.ndarray, float]:
    """Per-channel scales as uint8 multiples of one unit: (q [C] uint8 >= 1, unit).

    unit = max|w| / 255 and q[c] = ceil(max|w[c]| / unit), so every channel's
    values divided by its scale q[c] * unit lie in [-1, 1]; the k-means runs on
    those normalized values (weighted by the scale squared, so it minimizes the
    error of the real weights), so a coarse q costs only a little of the
    normalization, never accuracy of the decode. One byte per channel instead of a
    float16 scale; the unit is folded into the codebook.
    """
    C = w.shape[axis]
    wc = np.abs(np.moveaxis(w, axis, 0).reshape(C, -1).astype(np.float64))
    amax = wc.max(axis=1) if wc.shape[1] else np.zeros(C)
    top = float(amax.max()) if C else 0.0
    if not top > 0:
        return np.ones(C, np.uint8), 1.0
    unit = top / 255.0
    return np.clip(np.ceil(amax / unit), 1, 255).astype(np.uint8), unit


# --------------------------------------------------------------------------- the pass


def _apply(loaded, edit: _GraphEdit) -> None:
    """Write a graph edit into the LoadedModel."""
    graph = loaded.model.graph
    for name in sorted(edit.removed):
        loaded.remove_initializer(name)
    for name, arr in edit.new_inits.items():
        loaded.add_initializer(name, np.asarray(arr))
    del graph.node[:]
    graph.node.extend(edit.nodes)
    if edit.drop_inputs:
        keep = [i for i in graph.input if i.name not in edit.drop_inputs]
        if len(keep) != len(graph.input):
            del graph.input[:]
            graph.input.extend(keep)
    produced = {o for n in graph.node for o in n.output} | {i.name for i in graph.input} | {t.name for t in graph.initializer}
    vi = [v for v in graph.value_info if v.name in produced]
    if len(vi) != len(graph.value_info):
        del graph.value_info[:]
        graph.value_info.extend(vi)
    if edit.functions:
        loaded.model.functions.extend(edit.functions)
        if loaded.model.ir_version < 8:
            loaded.model.ir_version = 8
    for dom, ver in edit.domains.items():
        if not any(o.domain == dom for o in loaded.model.opset_import):
            loaded.model.opset_import.append(helper.make_opsetid(dom, ver))
    if edit.opset is not None:
        for op in loaded.model.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < edit.opset:
                op.version = edit.opset
        if edit.opset >= 13 and loaded.model.ir_version < 7:
            loaded.model.ir_version = 7
    loaded.refresh_index()


class Quantize(Pass):
    """int8 QDQ (calibrated) or weight-only log / LUT codes for every target weight."""

    name = "quantize"
    requires = ("targets",)
    provides = ("quantization",)

    def run(self, ctx: CompileContext) -> PassResult:
        qopts = QuantOptions.from_options(ctx.options)
        if qopts is None:
            ctx.artifacts["quantization"] = {"mode": None}
            return PassResult(False)
        targets: list[Target] = list(ctx.artifacts["targets"])
        make_batches = ctx.artifacts.get("calib_batches")
        if qopts.mode == "int8" and make_batches is None:
            raise UserError("--quantize int8 needs --calib DATA (calibration inputs for the activation thresholds)")
        if qopts.max_error is not None and make_batches is None:
            raise UserError("--max-error needs --calib DATA (the output error is measured on it)")
        sessions = _Sessions(ctx.model)
        notes: list[str] = []
        sens_on = qopts.sensitivity
        if sens_on is None:
            sens_on = qopts.max_error is not None
        reference = None
        if qopts.mode == "int8":
            impl: Any = _Int8(ctx, qopts, targets)
            # layers may be kept float only with a sensitivity pass or an error budget
            reference = impl.calibrate(make_batches, sessions, all_outputs=bool(sens_on or qopts.max_error is not None),
                                       reference_samples=qopts.sensitivity_samples)
            impl.quantize_weights()
        else:
            impl = _Codebook(ctx, qopts, targets)
        layers = impl.layers
        evaluator = None
        if make_batches is not None:
            batches = [] if reference is not None else _take_samples(make_batches, qopts.sensitivity_samples)
            if batches or (reference is not None and reference.batches):
                evaluator = _Evaluator(sessions, batches, impl.base_nodes, reference)
                if not evaluator.usable:
                    notes.append("quantize: the model has no float output; output error not measured")
                    evaluator = None
        if qopts.max_error is not None and evaluator is None:
            raise UserError("--max-error needs a model with a float output to measure the error on")
        candidates = [l for l in layers if l.reason is None]
        float_set: set[str] = set()
        sens: dict[str, float] = {}
        err_all = None
        if qopts.mode == "int8" and qopts.calib_method == "auto" and evaluator is not None and candidates:
            err_all = impl.guard_clipping(evaluator)
        if evaluator is not None and candidates and (sens_on or qopts.max_error is not None):
            err_all = err_all or evaluator.error(impl.edit(set()))
            if sens_on or (qopts.max_error is not None and err_all["one_minus_cosine"] > qopts.max_error):
                for l in ctx.progress(candidates, desc="quantization sensitivity"):
                    sens[l.target.name] = evaluator.error(impl.edit({l.target.name}))["one_minus_cosine"]
            if qopts.max_error is not None and err_all["one_minus_cosine"] > qopts.max_error:
                float_set = self._fit_budget(evaluator, impl, candidates, sens, qopts.max_error)
        final_edit = impl.edit(float_set)
        final_err = None
        if evaluator is not None:
            final_err = err_all if not float_set and err_all is not None else evaluator.error(final_edit)
        # report rows
        if qopts.mode == "int8":
            pts = impl.points(impl.active(float_set))
        float_layers = []
        tables = []
        before = after = 0
        for l in layers:
            t = l.target
            reason = l.reason or (f"kept float: output error budget {qopts.max_error:g}" if t.name in float_set else None)
            if qopts.mode == "int8":
                row = impl.row(l, pts, reason)
            else:
                row = dict(l.row) if not reason else {"mode": qopts.mode, "bits": None, "float": reason}
                if reason and l.row:
                    row.update({k: v for k, v in l.row.items() if k in ("weight_sqnr_db", "codebook")})
                    row["bits"] = None
            if t.name in sens:
                row["sensitivity"] = {"output_error_if_float": sens[t.name], "output_error_all_quantized": err_all["one_minus_cosine"]}
            if not reason:
                b, a = self._bytes(ctx.model, l, qopts.mode)
                before += b
                after += a
            if getattr(l, "table", False):  # a Gather table: listed in the summary, not a layer row
                tables.append({"name": t.name, "tensor": t.weight, **row})
                continue
            if reason:
                float_layers.append({"name": t.name, "reason": reason})
            rep = ctx.layer(t.name)
            rep["quant"] = row
            if "zeros_after" not in rep:
                stored = ctx.model.initializer(t.weight)
                if stored is not None:
                    arr = ctx.model.array(t.weight)
                    rep["zeros_after"] = int(arr.size - np.count_nonzero(arr))
        _apply(ctx.model, final_edit)
        summary = {
            "mode": qopts.mode,
            "bits": qopts.bits,
            "calib_method": qopts.calib_method if qopts.mode == "int8" else None,
            "activations": "int8 symmetric per-tensor (zero point 0)" if qopts.mode == "int8" else None,
            "weights": ("int8 symmetric per-channel" if getattr(impl, "per_channel", False) else "int8 symmetric per-tensor")
            if qopts.mode == "int8" else f"{qopts.bits}-bit {qopts.mode} codes",
            "quantized_layers": sum(1 for l in layers if not getattr(l, "table", False)) - len(float_layers),
            "float_layers": float_layers,
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_compression": (after / before) if before else None,
            "max_error": qopts.max_error,
            "error_metric": "1 - cosine(float outputs, quantized outputs), worst output, over the calibration samples",
            "output_error": None if final_err is None else {
                "one_minus_cosine": final_err["one_minus_cosine"],
                "rel_l2": final_err["rel_l2"],
                "samples": evaluator.samples,
            },
            "evaluations": evaluator.runs if evaluator is not None else 0,
            "opset_raised_to": final_edit.opset,
        }
        if qopts.mode != "int8":
            summary["tables"] = tables
            params = impl.params_edit[2] if impl.params_edit is not None and impl.params and final_edit.functions else None
            summary["float16_parameters"] = dict(params, names=list(impl.params)) if params else None
        if qopts.mode == "int8" and not impl.per_channel:
            notes.append(f"quantize: opset {opset_version(ctx.model.model)} < 13 could not be raised safely: per-tensor weight scales")
        if qopts.mode != "int8" and not impl.packed:
            notes.append("quantize: opset < 10 (no Mod): codes stored one per byte")
        if qopts.mode != "int8" and not impl.can_scatter and qopts.pattern is not None:
            notes.append("quantize: opset < 11 could not be raised safely: no N:M-compressed storage (needs ScatterElements)")
        ctx.artifacts["quantization"] = summary
        return PassResult(bool(summary["quantized_layers"]) or any("float" not in t for t in summary.get("tables") or ()), notes)

    @staticmethod
    def _bytes(loaded, layer, mode: str) -> tuple[int, int]:
        if mode != "int8":
            return layer.bytes_before, layer.bytes_after
        t = loaded.initializer(layer.target.weight)
        from nmcompile.graphio import tensor_nbytes

        before = tensor_nbytes(t) if t is not None else 0
        # int8 values + float32 scales + int8 zero points
        after = sum(w.q.nbytes + w.scale.nbytes + w.scale.size for w in layer.weights.values())
        return before, after

    @staticmethod
    def _fit_budget(evaluator: _Evaluator, impl, candidates, sens: dict[str, float], budget: float) -> set[str]:
        """Smallest prefix of the sensitivity ranking kept float whose measured error fits the budget.

        Ranking: the error with only that layer float, lowest first. Binary search over the
        prefix length: error(0) was measured above the budget; all candidates float is the
        float model (error 0); every prefix length the search settles on was measured.
        """
        pos = {l.target.name: i for i, l in enumerate(candidates)}
        names = sorted(pos, key=lambda n: (sens.get(n, 0.0), pos[n]))
        lo, hi = 0, len(names)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if evaluator.error(impl.edit(set(names[:mid])))["one_minus_cosine"] <= budget:
                hi = mid
            else:
                lo = mid
        return set(names[:hi])
