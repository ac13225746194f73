"""Streamed activation statistics (Gram matrices and means) through ONNX Runtime.

For every target layer we need the Gram matrix ``H = Σ x xᵀ`` and the mean of the
vectors ``x`` the layer's weight multiplies:

* dense (MatMul / Gemm): ``x`` runs along ``feature_axis`` of the layer's input
  tensor; every other axis is flattened into samples (batch, sequence, ...).
* conv: ``x`` is one im2col patch: for output position (n, oh, ow) and group g,
  the input values ``xpad[n, g·Cg + c, oh·s + kh·d, ow·s + kw·d]`` in the order
  c, kh, kw — exactly the column order of ``W.reshape(O, -1)`` for a weight
  W [O, C/G, kh, kw]. Zero padding is part of the patch (it is what the conv
  multiplies), so ``W_g.reshape(O/G, -1) @ patch`` is the conv output.

How it runs: a copy of the graph is made that keeps only the nodes needed to
compute the layers' input tensors and lists those tensors as its outputs. Large
float initializers are not copied into it: they become graph inputs fed on every
run from numpy arrays (views of the protobuf bytes, memory maps of external
files, or caller-supplied ``overrides``), which ORT reads in place — it copies
initializers, even ones passed with ``add_external_initializers``. One CPU
InferenceSession (no arena, idle threads told not to spin) runs batch by batch,
a batch split into runs whose requested activations stay within
``activation_bytes``; each run's activations are cut into chunk jobs
(≤ ``chunk_bytes`` of patch rows, 32 MiB by default) that worker threads turn
into partial ``Pᵀ P`` and ``Σ P`` with single-threaded BLAS, merged into the
float64 accumulators in job order, so the numbers do not depend on the thread
count. For K ≥ ``BLOCKED_FROM_K`` a job returns its patches and the merge adds
the upper triangle of ``Pᵀ P`` in row blocks straight into the sums, spread
over the threads (no K×K partial product). Peak: one run's requested
activations, plus the jobs in flight (capped near 64 MiB but at least one job
per worker); never all activations. The accumulators hold the upper triangle of each Gram,
G·K(K+1)/2 float64 per distinct layer input — for a transformer still ~1.6× its
fp32 weights — and the caller splits the layers over several passes when that
is too much (``adaprune.plan_chunks``).

Precision: with ``precision="float32"`` (default) each chunk's product ``PᵀP`` is
one float32 SYRK/GEMM (at most ``chunk_bytes`` of rows, a few thousand rows) and
is added to a float64 accumulator; sums are float64. Relative error per entry is
~1e-6, far below sampling noise, at twice float64 speed. ``precision="float64"``
does the products in float64.

The Gram is the plain sum over samples (not divided by ``count``); ``mean`` is
the average sample vector.

Padded tokens: when a batch carries a 0/1 ``attention_mask`` (or ``input_mask``)
of shape (batch, sequence), dense layers whose token rows line up with it
(leading shape (batch, sequence), or batch·sequence rows) count only the rows
where it is 1. Padded positions are computed but their outputs are discarded,
so fitting them would spend the re-fit on vectors no prediction uses.
"""

from __future__ import annotations

import math
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from nmcompile.graph import names_read, upstream
from nmcompile.graphio import read_tensor

__all__ = [
    "LayerSpec",
    "LayerStats",
    "collect_statistics",
    "CrossStats",
    "collect_cross_statistics",
    "im2col",
    "conv_pads",
    "conv_output_shape",
    "spec_from_node",
    "stats_nbytes",
    "pack_upper",
    "unpack_upper",
    "graph_input_names",
    "fixed_batch_size",
    "token_mask",
    "TOKEN_MASK_INPUTS",
]

_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
# Inputs that mark real tokens (1) and padding (0), as transformer exports name them.
TOKEN_MASK_INPUTS = ("attention_mask", "input_mask")
# Initializers at least this large are handed to ORT by reference, not copied.
_EXTERNAL_MIN_BYTES = 16 << 10


# --------------------------------------------------------------------------- specs


@dataclass
class LayerSpec:
    """One layer whose input statistics are wanted.

    ``input`` names the activation tensor the weight multiplies. ``kind`` "dense":
    ``feature_axis`` holds the K features. ``kind`` "conv": ONNX Conv attributes
    (``pads`` in ONNX order, all begins then all ends; ``None`` means the ONNX
    default) with ``kernel_shape`` required; the input is [N, C, *spatial].
    """

    name: str
    input: str
    kind: str = "dense"
    feature_axis: int = -1
    kernel_shape: Sequence[int] | None = None
    strides: Sequence[int] | None = None
    pads: Sequence[int] | None = None
    dilations: Sequence[int] | None = None
    group: int = 1
    auto_pad: str = "NOTSET"

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "conv"):
            raise ValueError(f"layer {self.name}: kind must be 'dense' or 'conv'")
        if self.kind == "conv":
            if not self.kernel_shape:
                raise ValueError(f"layer {self.name}: conv needs kernel_shape")
            nd = len(self.kernel_shape)
            self.kernel_shape = tuple(int(k) for k in self.kernel_shape)
            self.strides = tuple(int(s) for s in self.strides) if self.strides else (1,) * nd
            self.dilations = (tuple(int(d) for d in self.dilations)
                              if self.dilations else (1,) * nd)
            self.pads = tuple(int(p) for p in self.pads) if self.pads else (0,) * (2 * nd)
            ap = self.auto_pad.decode() if isinstance(self.auto_pad, bytes) else self.auto_pad
            self.auto_pad = ap or "NOTSET"
            if self.auto_pad not in _AUTO_PADS:
                raise ValueError(f"layer {self.name}: unknown auto_pad {self.auto_pad!r}")
            if (len(self.strides) != nd or len(self.dilations) != nd
                    or len(self.pads) != 2 * nd):
                raise ValueError(f"layer {self.name}: conv attributes disagree in rank")
            if (min(self.kernel_shape) < 1 or min(self.strides) < 1
                    or min(self.dilations) < 1 or min(self.pads) < 0 or self.group < 1):
                raise ValueError(f"layer {self.name}: invalid conv attributes")

    def key(self) -> tuple:
        """Layers with equal keys share one accumulator (e.g. Q, K, V projections)."""
        if self.kind == "dense":
            return ("dense", self.input, self.feature_axis)
        return ("conv", self.input, self.kernel_shape, self.strides, self.pads,
                self.dilations, self.group, self.auto_pad)


def _tri_offsets(K: int) -> np.ndarray:
    """Start of row i's segment (columns i..K-1) in the packed upper triangle."""
    i = np.arange(K + 1, dtype=np.int64)
    return i * K - i * (i - 1) // 2


def pack_upper(full: np.ndarray) -> np.ndarray:
    """(G, K, K) symmetric → (G, K(K+1)/2) upper triangle, row by row."""
    G, K, _ = full.shape
    out = np.empty((G, K * (K + 1) // 2), np.float64)
    off = _tri_offsets(K)
    for i in range(K):
        out[:, off[i]:off[i + 1]] = full[:, i, i:]
    return out


def unpack_upper(packed: np.ndarray, K: int) -> np.ndarray:
    """(G, K(K+1)/2) packed upper triangle → (G, K, K) symmetric float64."""
    G = packed.shape[0]
    full = np.empty((G, K, K), np.float64)
    off = _tri_offsets(K)
    for i in range(K):
        seg = packed[:, off[i]:off[i + 1]]
        full[:, i, i:] = seg
        full[:, i + 1:, i] = seg[:, 1:]
    return full


@dataclass
class LayerStats:
    """Statistics of one layer input. ``gram`` (G, K, K) float64 = Σ x xᵀ, built on
    access from ``packed`` (the upper triangle, (G, K(K+1)/2) float64: half the
    memory while many layers' statistics are held); ``mean`` (G, K) float64;
    ``count`` the number of sample vectors. G = conv group count (1 for dense).
    Layers that read the same input with the same geometry share one LayerStats
    object: treat it as read-only. ``gram`` returns a new array on every access;
    ``gram_group(g)`` builds one group's (K, K)."""

    packed: np.ndarray
    mean: np.ndarray
    count: int
    fourth: np.ndarray | None = None  # (G,) Σ ‖x‖⁴: how much the Gram varies from vector to vector

    @classmethod
    def from_gram(cls, gram: np.ndarray, mean: np.ndarray, count: int) -> "LayerStats":
        return cls(pack_upper(np.asarray(gram, np.float64)), np.asarray(mean), int(count))

    def shrinkage(self) -> float | None:
        """Ledoit-Wolf's shrinkage intensity of the second-moment matrix S = H/n toward
        mean(diag S)·I, from Σ‖x‖⁴ (mean over groups; None without it): ~0 where the
        calibration vectors pin S down, 1 where S is mostly sampling noise (few vectors,
        or inputs with no structure to fit)."""
        if self.fourth is None or self.count == 0:
            return None
        n, K = float(self.count), self.features
        out = []
        off = _tri_offsets(K)
        step = 1 << 19  # float64 slices of 4 MB: a float32 triangle is not copied whole
        for g in range(self.groups):
            packed = self.packed[g]
            d = packed[off[:-1]].astype(np.float64)  # the diagonal: the first entry of each row segment
            squares = sum(float(np.dot(c, c)) for c in (packed[i:i + step].astype(np.float64) for i in range(0, packed.size, step)))
            frob = 2.0 * squares - float(d @ d)  # ‖H‖_F²
            mu = float(d.sum()) / (K * n)
            s2 = frob / n**2  # ‖S‖_F²
            d2 = s2 - mu * mu * K  # ‖S − μI‖_F²
            b2 = (float(self.fourth[g]) - n * s2) / n**2
            out.append(1.0 if d2 <= 0 else min(1.0, max(0.0, b2 / d2)))
        return float(np.mean(out))

    @property
    def groups(self) -> int:
        return self.packed.shape[0]

    @property
    def features(self) -> int:
        return self.mean.shape[1]

    @property
    def gram(self) -> np.ndarray:
        return unpack_upper(self.packed, self.features)

    def gram_group(self, g: int, order: np.ndarray | None = None, dtype=np.float64,
                   out: np.ndarray | None = None) -> np.ndarray:
        """One group's (K, K), rows and columns permuted by ``order`` (H[order][:, order]),
        built straight from the packed triangle: no full-size intermediate. With
        ``out`` the matrix is added into it."""
        K = self.features
        packed = self.packed[g]
        off = _tri_offsets(K)
        if out is None:
            out = np.zeros((K, K), dtype)
        if order is None:  # row segments of the triangle, mirrored
            for i in range(K):
                seg = packed[off[i]:off[i + 1]]
                out[i, i:] += seg
                out[i + 1:, i] += seg[1:]
            return out
        idx = np.asarray(order, np.int64)
        # a few int64 index arrays of step × K each: ~2 MB apiece
        step = max(1, (2 << 20) // (8 * max(K, 1)))
        for r0 in range(0, K, step):
            rows = idx[r0:r0 + step, None]
            lo = np.minimum(rows, idx[None, :])
            out[r0:r0 + step] += packed[off[lo] + np.abs(idx[None, :] - rows)]
        return out

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.mean.nbytes


def spec_from_node(node: onnx.NodeProto, weight_shape: Sequence[int] | None = None,
                   name: str | None = None) -> LayerSpec:
    """LayerSpec for a MatMul / Gemm / Conv node (the weight is input 1; for Conv
    ``weight_shape`` supplies kernel_shape when the attribute is absent)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    name = name or node.name or node.output[0]
    if node.op_type == "MatMul":
        return LayerSpec(name, node.input[0], "dense", feature_axis=-1)
    if node.op_type == "Gemm":
        return LayerSpec(name, node.input[0], "dense",
                         feature_axis=0 if attrs.get("transA", 0) else -1)
    if node.op_type == "Conv":
        ks = attrs.get("kernel_shape")
        if not ks:
            if weight_shape is None:
                raise ValueError(f"Conv {name}: kernel_shape unknown, pass weight_shape")
            ks = list(weight_shape[2:])
        ap = attrs.get("auto_pad", b"NOTSET")
        return LayerSpec(name, node.input[0], "conv", kernel_shape=ks,
                         strides=attrs.get("strides"), pads=attrs.get("pads"),
                         dilations=attrs.get("dilations"), group=int(attrs.get("group", 1)),
                         auto_pad=ap.decode() if isinstance(ap, bytes) else ap)
    raise ValueError(f"no statistics for op {node.op_type}")


# --------------------------------------------------------------------------- conv geometry


def conv_pads(spec: LayerSpec, in_spatial: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begins, ends) padding per spatial axis, honouring auto_pad the way ONNX
    Runtime does (SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the
    beginning; both aim at out = ceil(in / stride))."""
    nd = len(spec.kernel_shape)
    if len(in_spatial) != nd:
        raise ValueError(f"layer {spec.name}: input has {len(in_spatial)} spatial dims, "
                         f"kernel {nd}")
    if spec.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        b, e = [], []
        for i in range(nd):
            n, s = int(in_spatial[i]), spec.strides[i]
            dk = (spec.kernel_shape[i] - 1) * spec.dilations[i] + 1
            total = max(0, (-(-n // s) - 1) * s + dk - n)
            head = (total + 1) // 2 if spec.auto_pad == "SAME_LOWER" else total // 2
            b.append(head)
            e.append(total - head)
        return b, e
    if spec.auto_pad == "VALID":
        return [0] * nd, [0] * nd
    return list(spec.pads[:nd]), list(spec.pads[nd:])


def conv_output_shape(spec: LayerSpec, in_spatial: Sequence[int]) -> list[int]:
    b, e = conv_pads(spec, in_spatial)
    out = []
    for i in range(len(in_spatial)):
        dk = (spec.kernel_shape[i] - 1) * spec.dilations[i] + 1
        out.append((int(in_spatial[i]) + b[i] + e[i] - dk) // spec.strides[i] + 1)
    return out


def _window_view(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """View (n, C, *out, *kernel) of the zero-padded input (pads copy x once)."""
    nd = len(spec.kernel_shape)
    b, e = conv_pads(spec, x.shape[2:])
    if any(b) or any(e):
        x = np.pad(x, [(0, 0), (0, 0)] + list(zip(b, e)))
    dk = [(k - 1) * d + 1 for k, d in zip(spec.kernel_shape, spec.dilations)]
    if any(x.shape[2 + i] < dk[i] for i in range(nd)):
        raise ValueError(f"layer {spec.name}: kernel larger than padded input")
    v = sliding_window_view(x, dk, axis=tuple(range(2, 2 + nd)))
    sl = ((slice(None), slice(None))
          + tuple(slice(None, None, s) for s in spec.strides)
          + tuple(slice(None, None, d) for d in spec.dilations))
    return v[sl]


def _patches_T(v: np.ndarray, G: int, dtype) -> np.ndarray:
    """(n, C, *out, *k) window view → (G, K, rows) contiguous patches (transposed:
    the copy's inner loop runs along output positions, the long axis)."""
    n, C = v.shape[:2]
    nd = (v.ndim - 2) // 2
    out_sp = v.shape[2:2 + nd]
    ks = v.shape[2 + nd:]
    Cg = C // G
    K = Cg * math.prod(ks)
    rows = n * math.prod(out_sp)
    P = np.empty((G, K, rows), dtype=dtype)
    # destination index order: g, c, *k, n, *out
    dst = P.reshape((G, Cg) + tuple(ks) + (n,) + tuple(out_sp))
    src = v.reshape((n, G, Cg) + tuple(out_sp) + tuple(ks))
    perm = ((1, 2) + tuple(range(3 + nd, 3 + 2 * nd)) + (0,) + tuple(range(3, 3 + nd)))
    np.copyto(dst, src.transpose(perm), casting="unsafe")
    return P


def im2col(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Conv patches of ``x`` [N, C, *spatial] as (G, N·Π(out), K): row
    ``n·Π(out) + flat output position``, column ``c·Π(k) + flat kernel position``
    (c within the group), so ``W_g.reshape(O/G, -1) @ patches[g].T`` is the conv
    output of group g. Same dtype as ``x``."""
    x = np.asarray(x)
    if x.ndim != len(spec.kernel_shape) + 2:
        raise ValueError(f"layer {spec.name}: input rank {x.ndim} does not match kernel")
    if x.shape[1] % spec.group:
        raise ValueError(f"layer {spec.name}: {x.shape[1]} channels not divisible by "
                         f"group {spec.group}")
    return _patches_T(_window_view(x, spec), spec.group, x.dtype).transpose(0, 2, 1)


# --------------------------------------------------------------------------- accumulators


class _Accumulator:
    """Running Σ PᵀP and Σ P for one layer input. ``jobs(x)`` cuts one batch into
    chunk jobs; each job returns its partial sums, which ``merge`` adds in job
    order — so results do not depend on how many threads ran the jobs."""

    def __init__(self, spec: LayerSpec, dtype, chunk_bytes: int, float32_sums_from: int | None = None):
        self.spec = spec
        self.dtype = np.dtype(dtype)
        self.chunk_bytes = chunk_bytes
        self.float32_sums_from = float32_sums_from
        self.packed: np.ndarray | None = None  # (G, K(K+1)/2) upper triangle
        self.sums: np.ndarray | None = None
        self.fourth: np.ndarray | None = None
        self.shape: tuple[int, int] | None = None
        self.count = 0

    def _init(self, G: int, K: int) -> None:
        if self.packed is None:
            self.shape = (G, K)
            wide = self.float32_sums_from is not None and K >= self.float32_sums_from
            self.packed = np.zeros((G, K * (K + 1) // 2), np.float32 if wide else np.float64)
            self.sums = np.zeros((G, K), np.float64)
            self.fourth = np.zeros(G, np.float64)
            self.offsets = _tri_offsets(K)
            # small K: one gather with a cached index; large K: row slices
            self.tri_index = np.flatnonzero(np.triu(np.ones((K, K), bool))) if K <= 512 else None
        elif self.shape != (G, K):
            raise ValueError(f"layer {self.spec.name}: input feature size changed "
                             f"between batches ({self.shape} → {(G, K)})")

    def add(self, x: np.ndarray) -> None:
        """Accumulate one batch in this thread."""
        for _, job in self.jobs(x):
            self.merge(job())

    def merge(self, part, pool=None) -> None:
        prod, sums, fourth = part  # prod (G, K, K) float32/64, symmetric; or the patches themselves
        G, K = self.shape
        self.fourth += fourth
        if isinstance(prod, _Patches):
            for g in range(G):
                _add_upper_products(self.packed[g], self.offsets, prod.rows[g], pool)
            self.sums += sums
            return
        if self.tri_index is not None:
            self.packed += prod.reshape(G, K * K)[:, self.tri_index]
        else:
            off = self.offsets
            for i in range(K):
                self.packed[:, off[i]:off[i + 1]] += prod[:, i, i:]
        self.sums += sums

    def jobs(self, x: np.ndarray, tokens: np.ndarray | None = None) -> list:
        """``tokens``: the batch's real-token mask (``token_mask``), applied to dense inputs it lines up with."""
        x = np.asarray(x)
        if self.spec.kind == "dense":
            return self._dense_jobs(x, tokens)
        return self._conv_jobs(x)

    def _dense_jobs(self, x: np.ndarray, tokens: np.ndarray | None = None) -> list:
        if x.ndim == 0:
            raise ValueError(f"layer {self.spec.name}: scalar input")
        ax = self.spec.feature_axis
        if not -x.ndim <= ax < x.ndim:
            raise ValueError(f"layer {self.spec.name}: feature_axis {ax} out of range "
                             f"for input of rank {x.ndim}")
        K = x.shape[ax]
        self._init(1, K)
        X = token_rows(np.moveaxis(x, ax, -1), tokens)
        self.count += X.shape[0]
        step = max(256, self.chunk_bytes // max(1, K * self.dtype.itemsize))
        dtype = self.dtype

        blocked = K >= BLOCKED_FROM_K

        def job(r0):
            c = np.ascontiguousarray(X[r0:r0 + step], dtype=dtype)
            norms = np.einsum("ij,ij->i", c, c).astype(np.float64)  # in c's dtype: no float64 copy of the chunk
            fourth = np.array([norms @ norms])
            if blocked:
                return _Patches(np.ascontiguousarray(c.T)[None]), c.sum(axis=0, dtype=np.float64)[None], fourth
            prod = np.matmul(c.T, c)  # SYRK: c.T and c share memory
            return prod[None], c.sum(axis=0, dtype=np.float64)[None], fourth

        cost = (0 if blocked else K * K * dtype.itemsize) + step * K * dtype.itemsize
        return [(cost, lambda r0=r0: job(r0)) for r0 in range(0, X.shape[0], step)]

    def _conv_jobs(self, x: np.ndarray) -> list:
        spec = self.spec
        nd = len(spec.kernel_shape)
        if x.ndim != nd + 2:
            raise ValueError(f"layer {spec.name}: conv input rank {x.ndim}, expected {nd + 2}")
        N, C = x.shape[:2]
        G = spec.group
        if C % G:
            raise ValueError(f"layer {spec.name}: {C} channels not divisible by group {G}")
        K = (C // G) * math.prod(spec.kernel_shape)
        self._init(G, K)
        out = conv_output_shape(spec, x.shape[2:])
        if min(out) < 1:
            raise ValueError(f"layer {spec.name}: empty conv output {out}")
        self.count += N * math.prod(out)
        per_sample = G * K * math.prod(out) * self.dtype.itemsize
        n_step = max(1, self.chunk_bytes // per_sample)
        # a single sample larger than the budget: split along the first output axis
        h_step = out[0] if n_step > 1 else max(1, self.chunk_bytes * out[0] // per_sample)
        dtype = self.dtype

        blocked = K >= BLOCKED_FROM_K

        def job(n0, h0):
            v = _window_view(x[n0:n0 + n_step], spec)  # pads this sample chunk only
            P = _patches_T(v[:, :, h0:h0 + h_step], G, dtype)  # (G, K, rows)
            norms = np.einsum("gkr,gkr->gr", P, P).astype(np.float64)  # in P's dtype: no float64 copy of the patches
            fourth = np.einsum("gr,gr->g", norms, norms)
            if blocked:
                return _Patches(P), P.sum(axis=2, dtype=np.float64), fourth
            if G == 1:
                prod = np.matmul(P[0], P[0].T)[None]  # SYRK
            else:
                prod = np.matmul(P, P.transpose(0, 2, 1))
            return prod, P.sum(axis=2, dtype=np.float64), fourth

        cost = (0 if blocked else G * K * K * dtype.itemsize) + min(per_sample * n_step, self.chunk_bytes)
        return [(cost, lambda n0=n0, h0=h0: job(n0, h0))
                for n0 in range(0, N, n_step) for h0 in range(0, out[0], h_step)]

    def result(self) -> LayerStats:
        if self.packed is None or self.count == 0:
            raise ValueError(f"layer {self.spec.name}: no calibration samples")
        _require_finite(self.spec, self.packed, self.sums)
        return LayerStats(self.packed, self.sums / self.count, self.count, self.fourth)


def _require_finite(spec: LayerSpec, *sums: np.ndarray) -> None:
    """Sums that overflowed (or inputs that became NaN inside the model) would give
    NaN weights and a model that computes nothing: the data's problem, said in one line."""
    if all(np.isfinite(a).all() for a in sums):
        return
    from nmcompile.errors import UserError

    layer = spec.name.split("#")[0]
    raise UserError(f"layer {layer}: its input is not finite on the calibration data, or its "
                    f"statistics overflow float32 (NaN or inf inside the model, or values too large)")


# From this reduction length on, a job hands back its patches and the merge builds
# the Gram's upper triangle a block of rows at a time straight into the float64
# sums (spread over the worker threads): no K×K partial product per job, which
# for a 3×3×512 conv is 85 MB per job in flight.
BLOCKED_FROM_K = 1024


def require_features(spec: LayerSpec, got: int, want: int) -> None:
    """A layer input whose vectors are not as long as the weight's reduction: the model's
    declared shapes disagree with its weights (ORT may run the input straight from the data)."""
    if got != want:
        from nmcompile.errors import UserError

        raise UserError(f"layer {spec.name.split('#')[0]}: its input has {got} values per vector where its weight "
                        f"takes {want}: the model's shapes and weights disagree")


def token_mask(batch: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """(batch, sequence) bool, True at real tokens, from the batch's attention mask;
    None when it has none (or one that is not 0/1: an additive mask says nothing sure)."""
    for name in TOKEN_MASK_INPUTS:
        m = batch.get(name)
        if m is None:
            continue
        m = np.asarray(m)
        if m.ndim == 2 and m.dtype.kind in "biuf" and np.isin(m, (0, 1)).all():
            return m != 0
    return None


def token_rows(x: np.ndarray, tokens: np.ndarray | None) -> np.ndarray:
    """x (..., K) as rows (n, K), keeping only real tokens when x's leading axes are
    the mask's (batch, sequence) or their product; other inputs keep every row."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    if tokens is not None and (lead == tokens.shape or lead == (tokens.size,)):
        return x.reshape(-1, K)[tokens.reshape(-1)]
    return x.reshape(-1, K)


@dataclass
class _Patches:
    rows: np.ndarray  # (G, K, samples): the job's patch rows, transposed


def _add_upper_products(packed: np.ndarray, offsets: np.ndarray, P: np.ndarray, pool) -> None:
    """packed (upper triangle of a K×K) += upper triangle of P Pᵀ, computed in
    row blocks. The blocks own disjoint parts of ``packed``, so running them on
    threads leaves the result independent of scheduling."""
    K = P.shape[0]
    step = max(32, min(256, (4 << 20) // max(1, K * P.dtype.itemsize)))

    def block(i0: int) -> None:
        i1 = min(i0 + step, K)
        prod = np.matmul(P[i0:i1], P[i0:].T)  # (i1 - i0, K - i0)
        for i in range(i0, i1):
            packed[offsets[i]:offsets[i + 1]] += prod[i - i0, i - i0:]

    starts = range(0, K, step)
    if pool is None:
        for i0 in starts:
            block(i0)
    else:
        list(pool.map(block, starts))


def _run_jobs(jobs: list, pool, workers: int, budget: int = 64 << 20) -> None:
    """Run (accumulator, (cost, job)) pairs on ``pool``, merging results in list
    order. At most 2·workers jobs are in flight, and fewer once their estimated
    bytes (partial products + patches) pass ``budget`` — but never fewer than
    ``workers``."""
    if pool is None:
        for acc, (_, job) in jobs:
            acc.merge(job())
        return
    inflight: deque = deque()
    used = 0
    for acc, (cost, job) in jobs:
        while inflight and (len(inflight) >= 2 * workers or
                            (used + cost > budget and len(inflight) >= workers)):
            a, c, f = inflight.popleft()
            a.merge(f.result(), pool)
            used -= c
        inflight.append((acc, cost, pool.submit(job)))
        used += cost
    while inflight:
        a, _, f = inflight.popleft()
        a.merge(f.result(), pool)


# --------------------------------------------------------------------------- model surgery


def graph_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that are real inputs (not initializers)."""
    inits = {t.name for t in model.graph.initializer}
    inits |= {t.values.name for t in model.graph.sparse_initializer}
    return [i.name for i in model.graph.input if i.name not in inits]


def fixed_batch_size(model: onnx.ModelProto) -> int | None:
    """The fixed first dimension of the model's inputs (e.g. 1): a single fixed
    input fixes the batch for all; None when every input's first dimension is
    symbolic or unknown. Conflicting fixed values raise ValueError."""
    names = set(graph_input_names(model))
    fixed: set[int] = set()
    for vi in model.graph.input:
        if vi.name not in names:
            continue
        t = vi.type.tensor_type
        if not t.HasField("shape") or len(t.shape.dim) == 0:
            continue
        d0 = t.shape.dim[0]
        if d0.HasField("dim_value") and d0.dim_value > 0:
            fixed.add(int(d0.dim_value))
    if len(fixed) > 1:
        raise ValueError(f"model inputs have different fixed batch sizes {sorted(fixed)}")
    return fixed.pop() if fixed else None


def _tensor_array(t: TensorProto, base_dir: str | None) -> np.ndarray | None:
    """A numpy array of the initializer, sharing memory where possible: a view of
    ``raw_data`` (one bytes copy, made by protobuf) or a read-only memmap of an
    external file. None for types numpy cannot hold (ORT then gets a copy)."""
    try:
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
    except Exception:
        return None
    if dtype.kind not in "biuf" or t.data_type in (TensorProto.BFLOAT16,) or \
            t.data_type >= TensorProto.FLOAT8E4M3FN:
        return None
    dims = tuple(int(d) for d in t.dims)
    if t.data_location == TensorProto.EXTERNAL:
        if base_dir is None:
            raise ValueError(f"initializer {t.name} has external data that is not loaded; "
                             "load it or pass base_dir")
        return read_tensor(t, Path(base_dir))  # memory-mapped, location checked
    if t.HasField("raw_data"):
        return np.frombuffer(t.raw_data, dtype=dtype.newbyteorder("<")).reshape(dims)
    return numpy_helper.to_array(t)


_FEEDABLE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE)


def _subgraph(model: onnx.ModelProto, wanted: list[str]) -> tuple[onnx.ModelProto, list[int], set[str]]:
    """(model of the nodes that compute ``wanted`` with the graph's inputs, no
    initializers or outputs yet; indices of those nodes; the names they read)."""
    g = model.graph
    kept, used = upstream(g.node, wanted)
    m = onnx.ModelProto()
    m.ir_version = model.ir_version
    m.opset_import.extend(model.opset_import)
    m.functions.extend(model.functions)
    m.graph.node.extend(g.node[i] for i in kept)
    m.graph.input.extend(g.input)
    return m, kept, used


def _build_session(model: onnx.ModelProto, wanted: list[str], base_dir: str | None,
                   overrides: Mapping[str, np.ndarray] | None, by_reference: bool = True):
    """(session, weight feeds): a session over the nodes needed for ``wanted``.

    With ``by_reference``, large float initializers read only by standard-domain
    nodes become graph inputs fed on every run from numpy arrays (views of the
    protobuf bytes, memory maps, or ``overrides``): ORT reads fed CPU arrays in
    place, while it copies initializers — even ones handed over with
    ``add_external_initializers`` (measured: +1.0× the weights) — and fed weights
    cost little speed (no pre-packing; ~equal at 1024 rows per batch).
    """
    import onnxruntime as ort

    g = model.graph
    m, kept, used = _subgraph(model, wanted)
    readers: dict[str, set[str]] = {}
    for i in kept:
        for r in names_read([g.node[i]]):
            readers.setdefault(r, set()).add(g.node[i].domain or "")

    mg = m.graph
    mg.name = g.name or "stats"
    declared = {vi.name for vi in g.input}
    typed = {vi.name: vi for vi in list(g.value_info) + list(g.output)}
    mg.value_info.extend(vi for vi in g.value_info if vi.name in used)
    for t in wanted:
        mg.output.append(typed[t] if t in typed else onnx.ValueInfoProto(name=t))

    feeds: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.name not in used:
            continue
        if overrides is not None and t.name in overrides:
            dt = helper.tensor_dtype_to_np_dtype(t.data_type)
            arr = np.ascontiguousarray(overrides[t.name], dtype=dt)
            if arr.shape != tuple(t.dims):
                raise ValueError(f"override for {t.name}: shape {arr.shape}, "
                                 f"initializer {tuple(t.dims)}")
        elif t.data_location == TensorProto.EXTERNAL:
            arr = _tensor_array(t, base_dir)  # memory-mapped
        elif t.ByteSize() >= _EXTERNAL_MIN_BYTES:
            arr = _tensor_array(t, None)
        else:
            arr = None
        feedable = (by_reference and arr is not None and t.data_type in _FEEDABLE_TYPES
                    and readers.get(t.name, {""}) <= {"", "ai.onnx"})
        if feedable:
            feeds[t.name] = arr
            if t.name not in declared:
                mg.input.append(helper.make_tensor_value_info(t.name, t.data_type,
                                                              list(arr.shape)))
        elif arr is not None:
            mg.initializer.append(numpy_helper.from_array(np.asarray(arr), t.name))
        elif t.data_location == TensorProto.EXTERNAL:
            tt = mg.initializer.add()  # a type numpy cannot hold: load a copy
            tt.CopyFrom(t)
            onnx.external_data_helper.load_external_data_for_tensor(tt, base_dir)
        else:
            mg.initializer.append(t)
    mg.sparse_initializer.extend(s for s in g.sparse_initializer if s.values.name in used)

    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions: no log lines of ORT's own
    # No arena: it keeps the peak of every run's intermediates for the session's
    # life; freed blocks go straight back (see adaprune.return_large_blocks_to_os)
    so.enable_cpu_mem_arena = False
    # ORT's idle threads spin by default and would fight our Gram threads for the
    # cores between runs
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    blob = m.SerializeToString()
    del m
    try:
        sess = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        if not feeds:  # the model itself: ORT cannot load it (say, inconsistent shapes)
            from nmcompile.errors import UserError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load the model to calibrate it: {first}") from None
        # some kernel insists on a constant weight: embed copies instead
        del blob
        return _build_session(model, wanted, base_dir, overrides, by_reference=False)
    return sess, feeds


# --------------------------------------------------------------------------- driver


def collect_statistics(model: onnx.ModelProto, specs: Sequence[LayerSpec],
                       batches: Iterable[Mapping[str, np.ndarray]], progress: bool = True,
                       *, precision: str = "float32", chunk_bytes: int = 32 << 20,
                       base_dir: str | None = None,
                       overrides: Mapping[str, np.ndarray] | None = None,
                       threads: int | None = None,
                       activation_bytes: int = 64 << 20,
                       float32_sums_from: int | None = None) -> dict[str, LayerStats]:
    """Run the calibration ``batches`` (dicts input name → array, e.g. from
    ``nmcompile.calibdata.iter_batches``) through ``model`` once and return each
    spec's LayerStats, keyed by ``spec.name``.

    ``base_dir``: folder for initializers whose external data is not loaded
    (memory-mapped, never ``..``/absolute/links). ``overrides``: initializer name →
    array used instead of the model's value (e.g. already-pruned weights, for
    sequential calibration) without editing the proto; passing the arrays the
    caller holds anyway also saves the one copy of the weights this function
    otherwise makes (protobuf hands out ``raw_data`` only as a new bytes object).
    ``threads``: worker threads for the Gram products (default: all cores), each
    running single-threaded BLAS; results do not depend on the count.
    ``activation_bytes``: when the model's batch axis is free, a batch runs in
    parts whose requested activations stay within this (sized from a first
    one-sample run, so deterministic): ORT holds every requested output of a run
    at once, e.g. 1.1 GB for ResNet-50's early layers at 32 images.
    ``float32_sums_from``: inputs at least this wide (per group) sum their Gram in
    float32 (half the memory of the largest statistics; for callers whose solver
    rounds them to float32 anyway). The means are float64 sums always.
    """
    if precision not in ("float32", "float64"):
        raise ValueError("precision must be 'float32' or 'float64'")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate layer names in specs")
    accs: dict[tuple, _Accumulator] = {}
    for s in specs:
        if s.key() not in accs:
            accs[s.key()] = _Accumulator(s, np.dtype(precision), chunk_bytes, float32_sums_from)
    if not specs:
        return {}

    from .adaprune_solver import blas_single_thread, cpu_workers  # scipy: kept off this module's import

    wanted = _internal_inputs(model, specs)
    runners = [_Runner(model, wanted, base_dir, overrides)] if wanted else []
    workers = cpu_workers() if threads is None else max(1, int(threads))
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for part, outs in _runs(runners, batches, activation_bytes, progress, "calibration"):
            tensors = outs[0] if outs else {}
            tokens = token_mask(part)
            jobs = []
            for acc in accs.values():
                t = acc.spec.input
                jobs += [(acc, j) for j in acc.jobs(tensors[t] if t in tensors else part[t], tokens)]
            with blas_single_thread():
                _run_jobs(jobs, pool, workers)
            del outs, tensors, jobs
    finally:
        if pool is not None:
            pool.shutdown()
        del runners

    results = {k: acc.result() for k, acc in accs.items()}
    return {s.name: results[s.key()] for s in specs}


def _internal_inputs(model: onnx.ModelProto, specs: Sequence[LayerSpec]) -> list[str]:
    """The layer inputs a session must compute (graph inputs come with the batch)."""
    inputs = graph_input_names(model)
    produced = {o for n in model.graph.node for o in n.output if o}
    inits = {t.name for t in model.graph.initializer}
    wanted: list[str] = []
    for s in specs:
        t = s.input
        if t in inputs:
            continue
        if t in inits and t not in produced:
            raise ValueError(f"layer {s.name}: input {t!r} is a constant initializer")
        if t not in produced:
            raise ValueError(f"layer {s.name}: tensor {t!r} is not in the graph")
        if t not in wanted:
            wanted.append(t)
    return wanted


@dataclass
class CrossStats:
    """What fitting W' x_s to the dense output W x_d needs (sequential calibration),
    with x_s a layer's input in the compressed model and x_d in the dense one:
    ``stats`` Σ x_s x_sᵀ (packed) and the mean of x_s; ``target`` (G, K, O/G)
    Σ x_s (W_g x_d)ᵀ, the right-hand side of the normal equations; ``energy`` (G,)
    Σ ‖W_g x_d‖²; ``mean_dense`` (G, K) the mean of x_d. No K×K matrix but the
    packed Gram: the dense-side Gram and the cross Gram enter only through W."""

    stats: LayerStats
    target: np.ndarray
    energy: np.ndarray
    mean_dense: np.ndarray


class _CrossAccumulator:
    """Σ x_s (W x_d)ᵀ, Σ ‖W x_d‖² and Σ x_d for one layer, over matching chunks of
    x_s and x_d (the Gram of x_s is a plain ``_Accumulator`` beside it)."""

    def __init__(self, spec: LayerSpec, blocks: Sequence[np.ndarray], chunk_bytes: int):
        self.spec = spec
        self.blocks = [np.ascontiguousarray(b, np.float32) for b in blocks]  # (O/G, K) per group
        self.chunk_bytes = chunk_bytes
        G, K = len(self.blocks), self.blocks[0].shape[1]
        self.target = np.zeros((G, K, self.blocks[0].shape[0]))
        self.energy = np.zeros(G)
        self.sums = np.zeros((G, K))

    def merge(self, part, pool=None) -> None:
        target, energy, sums = part
        self.target += target
        self.energy += energy
        self.sums += sums

    def _part(self, Ps: np.ndarray, Pd: np.ndarray):
        """Ps, Pd (G, K, rows) float32 patches of the same positions."""
        target = np.empty(self.target.shape)
        energy = np.empty(len(self.blocks))
        for g, w in enumerate(self.blocks):
            y = w @ Pd[g]  # (O/G, rows): the dense layer's output, bias aside
            target[g] = Ps[g] @ y.T
            energy[g] = float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        return target, energy, Pd.sum(axis=2, dtype=np.float64)

    def jobs(self, xs: np.ndarray, xd: np.ndarray, tokens: np.ndarray | None = None) -> list:
        spec, (G, K, O) = self.spec, self.target.shape
        if xs.shape != xd.shape:
            raise ValueError(f"layer {spec.name}: compressed and dense inputs differ in shape")
        if spec.kind == "dense":
            ax = spec.feature_axis
            require_features(spec, xs.shape[ax], K)
            Xs = token_rows(np.moveaxis(xs, ax, -1), tokens)
            Xd = token_rows(np.moveaxis(xd, ax, -1), tokens)
            step = max(256, self.chunk_bytes // (8 * K))

            def job(r0):
                Ps = np.ascontiguousarray(Xs[r0:r0 + step].T, np.float32)[None]
                Pd = np.ascontiguousarray(Xd[r0:r0 + step].T, np.float32)[None]
                return self._part(Ps, Pd)

            cost = 2 * step * K * 4 + K * O * 8
            return [(cost, lambda r0=r0: job(r0)) for r0 in range(0, Xs.shape[0], step)]
        require_features(spec, xs.shape[1] // G * math.prod(spec.kernel_shape), K)
        out = conv_output_shape(spec, xs.shape[2:])
        per_sample = G * K * math.prod(out) * 4
        n_step = max(1, self.chunk_bytes // (2 * per_sample))
        h_step = out[0] if n_step > 1 else max(1, self.chunk_bytes * out[0] // (2 * per_sample))

        def job(n0, h0):
            Ps = _patches_T(_window_view(xs[n0:n0 + n_step], spec)[:, :, h0:h0 + h_step], G, np.float32)
            Pd = _patches_T(_window_view(xd[n0:n0 + n_step], spec)[:, :, h0:h0 + h_step], G, np.float32)
            return self._part(Ps, Pd)

        cost = min(2 * per_sample * n_step, self.chunk_bytes) + G * K * O * 8
        return [(cost, lambda n0=n0, h0=h0: job(n0, h0))
                for n0 in range(0, xs.shape[0], n_step) for h0 in range(0, out[0], h_step)]


def collect_cross_statistics(dense: tuple[onnx.ModelProto, Mapping[str, np.ndarray] | None],
                             current: tuple[onnx.ModelProto, Mapping[str, np.ndarray] | None],
                             specs: Sequence[LayerSpec], weights: Mapping[str, Sequence[np.ndarray]],
                             batches: Iterable[Mapping[str, np.ndarray]], progress: bool = False,
                             *, base_dir: str | None = None, chunk_bytes: int = 32 << 20,
                             threads: int | None = None,
                             activation_bytes: int = 64 << 20,
                             float32_sums_from: int | None = None) -> dict[str, CrossStats]:
    """One streamed pass through the dense and the current model (each a (model,
    overrides) pair) together: each spec's CrossStats, its dense output computed
    with ``weights[spec.name]`` (the dense weight's (O/G, K) row blocks). Runs are
    split and chunked as in ``collect_statistics``, so memory stays at one run's
    activations of both models, the jobs in flight, the packed Grams and the
    (K, O) targets. ``float32_sums_from`` as in ``collect_statistics`` (the Grams)."""
    from .adaprune_solver import blas_single_thread, cpu_workers  # scipy: kept off this module's import

    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("duplicate layer names in specs")
    if not specs:
        return {}
    grams = {}  # layers reading the same input (Q, K, V) share one Gram
    for s in specs:
        grams.setdefault(s.key(), _Accumulator(s, np.float32, chunk_bytes, float32_sums_from))
    cross = {s.name: _CrossAccumulator(s, weights[s.name], chunk_bytes) for s in specs}
    wanted = _internal_inputs(current[0], specs)
    runners = [_Runner(m, wanted, base_dir, o) for m, o in (dense, current)] if wanted else []
    workers = cpu_workers() if threads is None else max(1, int(threads))
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for part, outs in _runs(runners, batches, activation_bytes, progress, "calibration (sequential)"):
            got_d, got_s = outs or ({}, {})
            tokens = token_mask(part)
            jobs = []
            for acc in grams.values():
                xs = got_s.get(acc.spec.input, part.get(acc.spec.input))
                jobs += [(acc, j) for j in acc.jobs(xs, tokens)]
            for s in specs:
                xs = got_s.get(s.input, part.get(s.input))
                xd = got_d.get(s.input, part.get(s.input))
                jobs += [(cross[s.name], j) for j in cross[s.name].jobs(np.asarray(xs), np.asarray(xd), tokens)]
            with blas_single_thread():
                _run_jobs(jobs, pool, workers)
            del outs, got_d, got_s, jobs
    finally:
        if pool is not None:
            pool.shutdown()
        del runners
    results = {key: acc.result() for key, acc in grams.items()}
    del grams
    out = {}
    for s in specs:
        h, c = results[s.key()], cross.pop(s.name)
        _require_finite(s, c.target, c.energy, c.sums)
        out[s.name] = CrossStats(h, c.target, c.energy, c.sums / h.count)
    return out


class _Runner:
    """A statistics session over the nodes that compute ``wanted``, with its weight feeds."""

    def __init__(self, model: onnx.ModelProto, wanted: list[str], base_dir: str | None,
                 overrides: Mapping[str, np.ndarray] | None):
        self.wanted = wanted
        self.model = model
        self.sess, self.weights = _build_session(model, wanted, base_dir, overrides)
        self.inputs = [i.name for i in self.sess.get_inputs()]
        self.dynamic = all(not isinstance(i.shape[0], int) for i in self.sess.get_inputs()
                           if i.name not in self.weights and i.shape)

    def largest(self, part: Mapping[str, np.ndarray]) -> int:
        """_largest_activation with the graph inputs' sizes past the batch axis
        taken from ``part`` (sequence lengths left symbolic in the model become known)."""
        return _largest_activation(self.model, self.wanted, {k: np.shape(v) for k, v in part.items()})

    def __call__(self, part: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: part[k] for k in self.inputs if k in part}
        feed.update(self.weights)
        try:
            return dict(zip(self.wanted, self.sess.run(self.wanted, feed)))
        except MemoryError:
            raise
        except Exception as exc:  # e.g. token ids beyond the embedding table: the data's fault, said in one line
            from nmcompile.errors import UserError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime could not run the model on the calibration data: {first}") from None


def _largest_activation(model: onnx.ModelProto, wanted: list[str],
                        input_shapes: Mapping[str, tuple] | None = None) -> int:
    """Bytes per sample of the largest tensor the nodes computing ``wanted`` produce,
    among those whose shape past the batch axis shape inference knows (0 if none).
    ``input_shapes``: shapes of graph inputs as fed; their axes past the first replace
    the declared ones, so symbolic sequence lengths (a transformer's attention
    scores grow with their square) are sized too.
    The runs are sized by it too: for the deepest layers the requested outputs are
    small (7×7 maps) while the stem's 112×112 maps pass through ORT on the way,
    which for 8 images is ~80 MB that no requested output shows."""
    g = model.graph
    m, _, used = _subgraph(model, wanted)
    declared = {vi.name for vi in g.input}
    for vi in m.graph.input:
        shape = (input_shapes or {}).get(vi.name)
        dims = vi.type.tensor_type.shape.dim if vi.type.tensor_type.HasField("shape") else None
        if shape is None or dims is None or len(dims) != len(shape) or not len(shape):
            continue
        for d, n in zip(list(dims)[1:], shape[1:]):
            d.dim_value = int(n)  # replaces a dim_param
    for t in g.initializer:
        if t.name in declared or t.name not in used:  # only what the kept nodes read
            continue
        if t.data_type in (TensorProto.INT64, TensorProto.INT32) and t.data_location != TensorProto.EXTERNAL and len(t.dims) <= 1:
            m.graph.initializer.append(t)  # shape constants: Reshape targets (attention heads) become known
        else:
            m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    try:
        inferred = onnx.shape_inference.infer_shapes(m)
    except Exception:  # a model shape inference cannot follow: size by the outputs alone
        return 0
    best = 0
    for vi in inferred.graph.value_info:
        t = vi.type.tensor_type
        dims = list(t.shape.dim)[1:] if t.HasField("shape") else None
        if not dims or any(not d.HasField("dim_value") for d in dims):
            continue
        try:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        except Exception:
            continue
        best = max(best, math.prod(d.dim_value for d in dims) * itemsize)
    return best


def _runs(runners: list[_Runner], batches, activation_bytes: int, progress: bool, desc: str):
    """(part, [tensors of each runner]) for every run: a batch is split into parts
    whose requested activations (all runners together) stay within
    ``activation_bytes`` when every runner's batch axis is free, sized from a
    first one-sample run, so the split is deterministic. ORT holds every
    requested output of a run at once (1.1 GB for ResNet-50's early layers at
    32 images), so whole batches would set the peak."""
    total = len(batches) if hasattr(batches, "__len__") else None
    it: Iterator = iter(batches)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=desc, unit="batch", total=total, file=sys.stderr, leave=False)
    dynamic = bool(runners) and all(r.dynamic for r in runners)
    per_run: int | None = None  # samples per run once known
    for batch in it:
        n = batch_samples(batch)
        split = dynamic and n > 1 and all(np.ndim(v) for v in batch.values())
        start = 0
        while True:
            size = min(n - start, per_run or 1) if split else n
            part = {k: v[start:start + size] for k, v in batch.items()} if split else batch
            start += size
            outs = [r(part) for r in runners]
            if dynamic and per_run is None:
                per_sample = sum(o.nbytes for t in outs for o in t.values()) / max(1, batch_samples(part))
                # ORT's own intermediates on the way: an op's input and output and a skip branch
                per_sample += 3 * max(r.largest(part) for r in runners)
                per_run = max(1, int(activation_bytes // max(per_sample, 1.0)))
            yield part, outs
            del outs
            if start >= n:
                break


def batch_samples(batch: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the arrays' common first-axis length (1 when they have none, 0 when empty)."""
    lengths = {np.shape(v)[0] if np.ndim(v) else 1 for v in batch.values()}
    if not lengths:
        return 0
    return lengths.pop() if len(lengths) == 1 else 1


# --------------------------------------------------------------------------- planning


def stats_nbytes(groups: int, features: int) -> int:
    """Bytes one accumulator holds: the packed float64 upper triangle and sums
    (plus, transiently, one float32 partial product per job in flight)."""
    return groups * (features * (features + 1) // 2 + features) * 8
