"""The permute-channels pass: reorder input channels so N:M keeps more of the weight.

N:M groups are M consecutive input channels. Which channels share a group is an
accident of training; reordering them (NVIDIA ASP's channel permutation) lets the
pattern keep more magnitude (or calibration score) at no cost, provided the graph
still computes the same function. Here that is done on the ONNX graph: a layer L's
weight is permuted along its reduction axis, and the producer P of L's input
(a Conv/Gemm/MatMul with a constant weight) has its output channels permuted the
same way, so the tensor between them arrives already permuted. Everything on the
way from P to L must treat channels independently (activations, BatchNorm,
per-channel Add/Mul constants, pooling, depthwise convs): their per-channel
constants are permuted too. Every reader of P's output must agree: all of them
are weight layers that take the same permutation, or the pass leaves L alone and
says why.

Search (``search_permutation``): maximise the sum, over weight rows and kernel
positions, of the top-N scores in each group of M channels. Start from the best
of the identity and two round-robin deals of channels by column score, then local
search in the spirit of ASP's channel swaps: pairs of groups, scheduled as the
rounds of a round-robin tournament (each round a set of disjoint pairs), take the
best single channel swap between the two groups while it gains. The gain of a
swap is O(1) per row from each group's N-th and (N+1)-th largest scores, and the
row loop is branch-free and vectorized (float32 screening; the chosen swap's
gain is re-checked in float64 before it is taken), so a round costs O(K·R·M/2)
cheap operations. Rounds are bounded (a work budget per layer, at least MIN_ROUNDS) and
stop early once a full tournament cycle gains nothing (a swap-local optimum).
For M ≤ 4 a second phase re-partitions pairs of groups exhaustively (35 ways for
2:4), which also finds gains that need two simultaneous swaps; with two groups
(K = 2M) that is the exact optimum. Every accepted move gains, so the result
never keeps less than the identity. All of it is deterministic; independent
searches (one per producer) run on several threads (the kernels release the GIL).

Limits: only plain N:M is optimized (the pass stands aside under --sequential
and --transposable); a Flatten/Reshape/Transpose/Concat between P and L, a
residual Add (two computed inputs), a producer output that is a graph output or
also read by anything but channel-wise ops and weight layers, shared weights,
and a Conv reading a MatMul's output (or the reverse) all leave L unpermuted,
with the reason in its report row.
"""

from __future__ import annotations

import heapq
import itertools
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numba
import numpy as np
import onnx

from nmcompile.graph import GraphIndex, attr

from .base import CompileContext, Pass, PassResult
from .canonicalize import _fresh_name
from .targets import LAYOUT_OPS, Target, Use, WeightView, stored_axis

# -----------------------------------------------------------------------------
# search kernels


@numba.njit(cache=True, nogil=True, inline="always")
def _sort4(a, b, c, d):
    """Four values in descending order (a five-comparator sorting network, branch-free)."""
    a, b = max(a, b), min(a, b)
    c, d = max(c, d), min(c, d)
    a, c = max(a, c), min(a, c)
    b, d = max(b, d), min(b, d)
    b, c = max(b, c), min(b, c)
    return a, b, c, d


@numba.njit(cache=True, nogil=True)
def _group_stats(S, members, g, n, m, vn, vn1, buf):
    """For every row: the N-th and (N+1)-th largest score of group g."""
    rows = S.shape[1]
    if m == 4:
        s0 = S[members[g, 0]]
        s1 = S[members[g, 1]]
        s2 = S[members[g, 2]]
        s3 = S[members[g, 3]]
        out_n = vn[g]
        out_n1 = vn1[g]
        for r in range(rows):
            a, b, c, d = _sort4(s0[r], s1[r], s2[r], s3[r])
            if n == 1:
                out_n[r] = a
                out_n1[r] = b
            elif n == 2:
                out_n[r] = b
                out_n1[r] = c
            else:
                out_n[r] = c
                out_n1[r] = d
        return
    for r in range(rows):
        for i in range(m):
            v = S[members[g, i], r]
            j = i
            while j > 0 and buf[j - 1] < v:
                buf[j] = buf[j - 1]
                j -= 1
            buf[j] = v
        vn[g, r] = buf[n - 1]
        vn1[g, r] = buf[n]


@numba.njit(cache=True, nogil=True)
def _all_stats(S, members, n, m, vn, vn1):
    G = members.shape[0]
    buf = np.empty(m, np.float32)
    for g in range(G):
        _group_stats(S, members, g, n, m, vn, vn1, buf)


@numba.njit(cache=True, nogil=True)
def _objective(S, members, n, m):
    """Sum over groups and rows of the top-n scores (float64)."""
    G = members.shape[0]
    rows = S.shape[1]
    per = np.zeros(G, np.float64)
    for g in range(G):
        acc = 0.0
        if m == 4:
            acc = _split_score4(S, members[g], np.arange(4), n)
        else:
            buf = np.empty(m, np.float32)
            idx = np.arange(m)
            vals = np.empty(m, np.float32)
            for r in range(rows):
                for i in range(m):
                    vals[i] = S[members[g, i], r]
                acc += _topn_sum(vals, idx, n, buf)
        per[g] = acc
    return per.sum()


@numba.njit(cache=True, nogil=True, fastmath=True)
def _swap_gains(S, members, ga, gb, m, vn, vn1, acc):
    """acc[i, j]: objective gain of swapping members[ga, i] with members[gb, j].

    Replacing x by y in a group with N-th / (N+1)-th largest vN / vN1 changes its
    top-N sum by max(y, vN1) - x when x is in the top N (x >= vN), else by
    max(0, y - vN); ties give the same value either way. The row loop is
    innermost and branch-free, so it vectorizes.
    """
    rows = S.shape[1]
    nA = vn[ga]
    n1A = vn1[ga]
    nB = vn[gb]
    n1B = vn1[gb]
    for i in range(m):
        sa = S[members[ga, i]]
        for j in range(m):
            sb = S[members[gb, j]]
            total = 0.0
            for r in range(rows):
                x = sa[r]
                y = sb[r]
                gA = (max(y, n1A[r]) - x) if x >= nA[r] else max(np.float32(0.0), y - nA[r])
                gB = (max(x, n1B[r]) - y) if y >= nB[r] else max(np.float32(0.0), x - nB[r])
                total += np.float64(gA + gB)
            acc[i, j] = total


@numba.njit(cache=True, nogil=True)
def _exact_gain(S, members, ga, gb, i, j, vn, vn1):
    """The gain of one swap in float64 throughout (the screening above rounds per row to float32)."""
    sa = S[members[ga, i]]
    sb = S[members[gb, j]]
    total = 0.0
    for r in range(S.shape[1]):
        x = np.float64(sa[r])
        y = np.float64(sb[r])
        a = np.float64(vn[ga, r])
        b = np.float64(vn[gb, r])
        gA = (max(y, np.float64(vn1[ga, r])) - x) if x >= a else max(0.0, y - a)
        gB = (max(x, np.float64(vn1[gb, r])) - y) if y >= b else max(0.0, x - b)
        total += gA + gB
    return total


@numba.njit(cache=True, nogil=True)
def _pair_search(S, members, ga, gb, n, m, vn, vn1, eps, max_repeat):
    """Best single swaps between groups ga and gb while they gain more than eps."""
    acc = np.empty((m, m), np.float64)
    buf = np.empty(m, np.float32)
    total = 0.0
    for _ in range(max_repeat):
        _swap_gains(S, members, ga, gb, m, vn, vn1, acc)
        best = eps
        bi = -1
        bj = -1
        for i in range(m):
            for j in range(m):
                if acc[i, j] > best:
                    best = acc[i, j]
                    bi = i
                    bj = j
        if bi < 0:
            break
        best = _exact_gain(S, members, ga, gb, bi, bj, vn, vn1)
        if best <= eps:
            break
        tmp = members[ga, bi]
        members[ga, bi] = members[gb, bj]
        members[gb, bj] = tmp
        _group_stats(S, members, ga, n, m, vn, vn1, buf)
        _group_stats(S, members, gb, n, m, vn, vn1, buf)
        total += best
    return total


@numba.njit(cache=True, nogil=True)
def _swap_round(S, members, pa, pb, n, m, vn, vn1, eps, max_repeat):
    """One tournament round over disjoint group pairs; total gain."""
    gains = np.zeros(pa.shape[0], np.float64)
    for p in range(pa.shape[0]):
        gains[p] = _pair_search(S, members, pa[p], pb[p], n, m, vn, vn1, eps, max_repeat)
    return gains.sum()


@numba.njit(cache=True, nogil=True, inline="always")
def _topn_sum(vals, idx, n, buf):
    k = idx.shape[0]
    for i in range(k):
        v = vals[idx[i]]
        j = i
        while j > 0 and buf[j - 1] < v:
            buf[j] = buf[j - 1]
            j -= 1
        buf[j] = v
    s = 0.0
    for i in range(n):
        s += buf[i]
    return s


@numba.njit(cache=True, nogil=True, fastmath=True)
def _split_score4(S, chans, idx, n):
    """Sum over rows of the top-n of the four channels chans[idx] (M = 4)."""
    s0 = S[chans[idx[0]]]
    s1 = S[chans[idx[1]]]
    s2 = S[chans[idx[2]]]
    s3 = S[chans[idx[3]]]
    total = 0.0
    for r in range(S.shape[1]):
        a, b, c, d = _sort4(s0[r], s1[r], s2[r], s3[r])
        if n == 1:
            total += np.float64(a)
        elif n == 2:
            total += np.float64(a) + np.float64(b)
        else:
            total += np.float64(a) + np.float64(b) + np.float64(c)
    return total


@numba.njit(cache=True, nogil=True)
def _pair_exhaustive(S, members, ga, gb, n, m, parts, rest, eps):
    """Best re-partition of the 2m channels of groups ga, gb (parts[p] / rest[p]: local indices of each side)."""
    rows = S.shape[1]
    P = parts.shape[0]
    chans = np.empty(2 * m, np.int64)
    for i in range(m):
        chans[i] = members[ga, i]
        chans[m + i] = members[gb, i]
    score = np.zeros(P, np.float64)
    if m == 4:
        for p in range(P):
            score[p] = _split_score4(S, chans, parts[p], n) + _split_score4(S, chans, rest[p], n)
    else:
        vals = np.empty(2 * m, np.float32)
        buf = np.empty(m, np.float32)
        for r in range(rows):
            for i in range(2 * m):
                vals[i] = S[chans[i], r]
            for p in range(P):
                score[p] += _topn_sum(vals, parts[p], n, buf) + _topn_sum(vals, rest[p], n, buf)
    # parts[0] is the current split (0..m-1 | m..2m-1)
    best = score[0] + eps
    bp = 0
    for p in range(1, P):
        if score[p] > best:
            best = score[p]
            bp = p
    if bp == 0:
        return 0.0
    for i in range(m):
        members[ga, i] = chans[parts[bp, i]]
        members[gb, i] = chans[rest[bp, i]]
    return score[bp] - score[0]


@numba.njit(cache=True, nogil=True)
def _exhaustive_round(S, members, pa, pb, n, m, parts, rest, eps):
    gains = np.zeros(pa.shape[0], np.float64)
    for p in range(pa.shape[0]):
        gains[p] = _pair_exhaustive(S, members, pa[p], pb[p], n, m, parts, rest, eps)
    return gains.sum()


def _splits(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every way to split 2m local channels into two groups of m (channel 0 on side A), the identity first."""
    rows = [c for c in itertools.combinations(range(2 * m), m) if 0 in c]
    ident = tuple(range(m))
    rows.remove(ident)
    parts = np.array([ident] + rows, dtype=np.int64)
    rest = np.array([[i for i in range(2 * m) if i not in set(p)] for p in parts], dtype=np.int64)
    return parts, rest


def _round_pairs(k: int, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round k of a round-robin tournament (circle method) over len(labels) slots; -1 slots are byes."""
    gp = labels.shape[0]
    rot = (k + np.arange(gp - 1)) % (gp - 1) + 1
    order = np.concatenate(([0], rot))
    a = labels[order[: gp // 2]]
    b = labels[order[::-1][: gp // 2]]
    keep = (a >= 0) & (b >= 0)
    return np.ascontiguousarray(a[keep]), np.ascontiguousarray(b[keep])


@dataclass
class SearchResult:
    perm: np.ndarray  # new channel j = old channel perm[j]
    before: float  # objective of the identity
    after: float
    rounds: int = 0
    seconds: float = 0.0
    start: str = "identity"


# Work budget per search, in (pair of groups) x (row) evaluations: a round costs
# about K*R/(2M) of them. Small problems run to a swap-local optimum; large ones
# get at least MIN_ROUNDS rounds.
WORK_BUDGET = 3e7
MIN_ROUNDS = 24
MAX_CYCLES = 20
EXHAUSTIVE_MAX_SPLITS = 40


def search_permutation(
    S: np.ndarray,
    n: int,
    m: int,
    work_budget: float = WORK_BUDGET,
    min_rounds: int = MIN_ROUNDS,
    max_cycles: int = MAX_CYCLES,
    exhaustive: bool | None = None,
    seed: int = 0,
) -> SearchResult:
    """A permutation of the K channels of S [K, R] (scores, channel-major) that keeps more top-n-of-m score.

    Deterministic for a given input. `after` >= `before` always.
    """
    t0 = time.perf_counter()
    S = np.ascontiguousarray(S, dtype=np.float32)
    K, R = S.shape
    if K % m:
        raise ValueError(f"{K} channels do not split into groups of {m}")
    G = K // m
    ident = np.arange(K, dtype=np.int64).reshape(G, m)
    if G < 2 or R == 0:
        v = float(_objective(S, ident, n, m)) if R else 0.0
        return SearchResult(np.arange(K, dtype=np.int64), v, v, seconds=time.perf_counter() - t0)
    before = float(_objective(S, ident, n, m))
    # Starting points: identity; channels dealt round-robin by column score
    # (each group gets one channel from each of its M strata).
    colsum = S.astype(np.float64).sum(axis=1)
    order = np.argsort(-colsum, kind="stable")
    deal = np.ascontiguousarray(order.reshape(m, G).T)
    snake = order.reshape(m, G).copy()
    snake[1::2] = snake[1::2, ::-1]
    snake = np.ascontiguousarray(snake.T)
    best_name, members, best_val = "identity", ident.copy(), before
    for name, cand in (("round-robin", deal), ("snake", snake)):
        val = float(_objective(S, cand, n, m))
        if val > best_val + 1e-12 * abs(best_val):
            best_name, members, best_val = name, cand.copy(), val
    total = float(colsum.sum())
    eps = max(1e-12 * total, 1e-30)

    vn = np.empty((G, R), np.float32)
    vn1 = np.empty((G, R), np.float32)
    _all_stats(S, members, n, m, vn, vn1)

    gp = G + (G % 2)
    labels = np.random.default_rng(seed).permutation(gp).astype(np.int64)
    labels[labels >= G] = -1
    cycle = gp - 1
    per_round = max(1.0, G / 2 * R)
    max_rounds = min(max_cycles * cycle, max(min_rounds, int(work_budget / per_round)))
    rounds = 0
    quiet = 0
    for k in range(max_rounds):
        pa, pb = _round_pairs(k % cycle, labels)
        gain = _swap_round(S, members, pa, pb, n, m, vn, vn1, eps, m)
        rounds += 1
        quiet = quiet + 1 if gain <= 0 else 0
        if quiet >= cycle:
            break
    if exhaustive is None:
        exhaustive = len(_splits(m)[0]) <= EXHAUSTIVE_MAX_SPLITS
    if exhaustive:
        parts, rest = _splits(m)
        # each exhaustive round costs about len(parts) swap rounds' worth of work
        ex_rounds = min(max_cycles * cycle, max(min_rounds // 4, int(work_budget / per_round / len(parts) * 4)))
        quiet = 0
        for k in range(ex_rounds):
            pa, pb = _round_pairs(k % cycle, labels)
            gain = _exhaustive_round(S, members, pa, pb, n, m, parts, rest, eps)
            rounds += 1
            quiet = quiet + 1 if gain <= 0 else 0
            if quiet >= cycle:
                break
    members = np.sort(members, axis=1)
    members = members[np.argsort(members[:, 0], kind="stable")]
    perm = members.reshape(-1).astype(np.int64)
    after = float(_objective(S, np.ascontiguousarray(members), n, m))
    if after < before:  # cannot happen (every move gains), but never return worse than the identity
        perm, after = np.arange(K, dtype=np.int64), before
    return SearchResult(perm, before, after, rounds, time.perf_counter() - t0, best_name)


def retained(S: np.ndarray, n: int, m: int, perm: np.ndarray | None = None) -> float:
    """Sum of the top-n scores per group of m consecutive channels of S [K, R], after perm."""
    S = np.ascontiguousarray(S, dtype=np.float32)
    K = S.shape[0]
    members = (np.arange(K, dtype=np.int64) if perm is None else np.asarray(perm, np.int64)).reshape(K // m, m)
    return float(_objective(S, np.ascontiguousarray(members), n, m))


# -----------------------------------------------------------------------------
# the graph side: which channels can be permuted, and where the inverse goes

UNARY_OPS = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Floor",
    "Ceil", "Round", "Sign", "Sin", "Cos", "Identity", "Cast", "Clip", "Dropout", "IsNaN", "IsInf", "Not",
}  # fmt: skip
# Elementwise with broadcasting: every operand is a channel tensor or a constant that is
# a scalar or varies per channel (then permuted).
ELEMENTWISE_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Equal", "Less", "Greater"}
POOL_OPS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
NORM_OPS = {"BatchNormalization", "InstanceNormalization"}  # per-channel params on axis 1
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass
class _Edit:
    """One tensor to permute: an initializer along an axis, or a weight along an effective axis."""

    kind: str  # "const" | "weight"
    node: onnx.NodeProto | None = None  # const: the reader whose input slot is rewired if shared
    slot: int = -1
    name: str = ""
    axis: int = 0
    target: Target | None = None  # weight
    use: Use | None = None
    blocks: int = 1  # weight: permute per block of output rows (grouped conv consumers)


@dataclass
class _Group:
    producer: onnx.NodeProto
    ptarget: Target
    channels: int
    kind: str  # "nchw" or "last"
    blocks: int = 1
    consumers: list = field(default_factory=list)  # (node, target, use)
    edits: list = field(default_factory=list)
    nodes: list = field(default_factory=list)  # transparent nodes on the way


class _Fail(Exception):
    pass


class _Planner:
    def __init__(self, loaded, targets: list[Target], m: int):
        self.loaded = loaded
        self.graph = loaded.model.graph
        self.index = GraphIndex(self.graph)
        self.m = m
        self.graph_inputs = {i.name for i in self.graph.input}
        self.nodes = {id(nd): nd for nd in self.graph.node}
        self.position = {id(nd): i for i, nd in enumerate(self.graph.node)}
        self.by_node: dict[int, tuple[Target, Use]] = {}
        for t in targets:
            for u in t.uses:
                self.by_node[id(u.node)] = (t, u)

    # -- small checks ------------------------------------------------------------
    def const(self, name: str) -> bool:
        return bool(name) and name in self.index.initializers and name not in self.graph_inputs

    def weight_slot(self, node, use: Use) -> int:
        if node.op_type == "MatMul":
            return 1 if use.red_axis == len(use.eff_shape) - 2 else 0
        return 1

    def weight_private(self, target: Target, use: Use) -> str | None:
        """Why the weight cannot be rewritten for this node alone (None: it can)."""
        if len(target.uses) > 1:
            return f"weight {target.weight} is shared by {len(target.uses)} nodes"
        if target.weight in self.graph_inputs:
            return f"weight {target.weight} is also a graph input"
        if len(self.index.uses(target.weight)) != 1 or self.index.is_graph_output(target.weight):
            return f"weight {target.weight} is read elsewhere too"
        for node in use.chain:
            if len(self.index.uses(node.output[0])) != 1 or self.index.is_graph_output(node.output[0]):
                return f"weight {target.weight} is read elsewhere too (after {node.op_type})"
        view = WeightView(self.loaded, target.weight, use)
        if view.dq is not None:
            scale = self.loaded.array(view.dq.input[1])
            if np.asarray(scale).size > 1 and use.groups > 1:
                return "grouped weight behind a per-channel DequantizeLinear"
        return None

    def dq_ok(self, target: Target, use: Use, eff_axis: int) -> str | None:
        view = WeightView(self.loaded, target.weight, use)
        dq = view.dq
        if dq is None or np.asarray(self.loaded.array(dq.input[1])).size <= 1:
            return None
        stored = stored_axis(view, eff_axis)
        if stored is None:
            return "weight behind a per-channel DequantizeLinear whose layout chain mixes axes"
        return None

    def const_channel_axis(self, name: str, C: int, kind: str, rank: int | None) -> int | None:
        """The axis of a broadcast constant along the channel axis if it varies per channel, None if
        it is constant along channels; raises _Fail when it cannot be permuted with the channels."""
        shape = tuple(int(d) for d in self.loaded.initializer(name).dims)
        if int(np.prod(shape, dtype=np.int64)) == 1:
            return None
        r = len(shape)
        if kind == "last":
            ax = r - 1
        else:
            if rank is None or r > rank:
                raise _Fail(f"constant {name} {list(shape)} broadcasts beyond the activation")
            ax = r - rank + 1
            if ax < 0:
                return None
        if shape[ax] == 1:
            return None
        if shape[ax] != C:
            raise _Fail(f"constant {name} {list(shape)} does not match {C} channels")
        return ax

    # -- producers and consumers ---------------------------------------------------
    def depthwise(self, node) -> tuple[Target, Use] | None:
        """A depthwise conv (one input channel per group, multiplier 1) with a private constant weight."""
        if node.op_type != "Conv" or id(node) not in self.by_node:
            return None
        t, u = self.by_node[id(node)]
        if u.groups <= 1 or u.eff_shape[1] != 1 or u.eff_shape[0] != u.groups:
            return None
        return t, u

    def producer_info(self, node):
        """(target, use, kind, channels, rank, blocks) when node can be the producer P, else None / _Fail."""
        if id(node) not in self.by_node or node.domain not in ("", "ai.onnx"):
            return None
        t, u = self.by_node[id(node)]
        if node.op_type == "Conv":
            if self.depthwise(node) is not None:
                return None  # transparent, not a producer
            return t, u, "nchw", u.eff_shape[0], len(u.eff_shape), u.groups
        if node.op_type == "Gemm":
            return t, u, "last", u.eff_shape[u.out_axis], 2, 1
        if node.op_type == "MatMul":
            if self.weight_slot(node, u) != 1:
                return None
            return t, u, "last", u.eff_shape[u.out_axis], None, 1
        return None

    def consumer(self, node, slot: int, kind: str):
        """(target, use) when node multiplies the channel tensor at `slot` by a constant weight along channels."""
        info = self.by_node.get(id(node))
        if info is None:
            return None
        t, u = info
        op = node.op_type
        if op == "Conv":
            if slot != 0:
                raise _Fail(f"{node.name} reads the channels as a weight")
            if kind != "nchw":
                raise _Fail(f"{node.name} (Conv) reads a tensor whose channels are on the last axis")
            return t, u
        if op == "MatMul":
            if slot != 0 or self.weight_slot(node, u) != 1:
                raise _Fail(f"{node.name} (MatMul) does not reduce along the channel axis")
        elif op == "Gemm":
            if slot != 0 or attr(node, "transA", 0):
                raise _Fail(f"{node.name} (Gemm) does not reduce along the channel axis")
        if kind != "last":
            raise _Fail(f"{node.name} ({op}) reduces along the last axis, not the channel axis 1")
        return t, u

    # -- the region between P and its readers -------------------------------------
    def plan(self, node) -> _Group | None:
        info = self.producer_info(node)
        if info is None:
            return None
        pt, pu, kind, C, rank, pblocks = info
        group = _Group(producer=node, ptarget=pt, channels=C, kind=kind)
        why = self.weight_private(pt, pu) or self.dq_ok(pt, pu, pu.out_axis)
        if why:
            raise _Fail(f"producer {node.name}: {why}")
        group.edits.append(_Edit("weight", name=pt.weight, axis=pu.out_axis, target=pt, use=pu))
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
            if not self.const(bias):
                raise _Fail(f"producer {node.name} has a computed bias")
            shape = tuple(self.loaded.initializer(bias).dims)
            if int(np.prod(shape, dtype=np.int64)) > 1:
                if shape[-1] != C:
                    raise _Fail(f"producer {node.name}: bias {list(shape)} is not per channel")
                group.edits.append(_Edit("const", node=node, slot=2, name=bias, axis=len(shape) - 1))
        blocks = {pblocks} if pblocks > 1 else set()
        # Readers in graph (topological) order, so a node's inputs from the region are
        # all known when it is reached: a diamond of elementwise ops (GELU's x * f(x))
        # is accepted, a merge with any other computed tensor is refused right there.
        region: set[str] = set()
        heap: list[tuple[int, int]] = []
        queued: set[int] = set()

        def add(t: str) -> None:
            if self.index.is_graph_output(t):
                raise _Fail(f"channel tensor {t} is a graph output")
            region.add(t)
            for reader, slot in self.index.uses(t):
                if slot < 0:
                    raise _Fail(f"channel tensor {t} is read inside a subgraph of {reader.name}")
                if id(reader) not in queued:
                    queued.add(id(reader))
                    heapq.heappush(heap, (self.position[id(reader)], id(reader)))

        add(node.output[0])
        while heap:
            _, key = heapq.heappop(heap)
            reader = self.nodes[key]
            slots = [i for i, name in enumerate(reader.input) if name in region]
            dw = self.depthwise(reader) if kind == "nchw" and slots == [0] else None
            if dw is None:
                cons = self.consumer(reader, slots[0], kind) if len(slots) == 1 else None
                if cons is None and id(reader) in self.by_node:
                    raise _Fail(f"{reader.op_type} {reader.name} reads the channels in its weight slot too")
                if cons is not None:
                    ct, cu = cons
                    why = self.weight_private(ct, cu) or self.dq_ok(ct, cu, cu.red_axis)
                    if why:
                        raise _Fail(f"reader {reader.name}: {why}")
                    cin = cu.reduction * cu.groups
                    if cin != C:
                        raise _Fail(f"reader {reader.name} expects {cin} channels, producer has {C}")
                    if cu.groups > 1:
                        blocks.add(cu.groups)
                    group.consumers.append((reader, ct, cu))
                    group.edits.append(_Edit("weight", name=ct.weight, axis=cu.red_axis, target=ct, use=cu, blocks=cu.groups))
                    continue
            out = self.transparent(reader, kind, C, rank, group, dw)
            for slot, name in enumerate(reader.input):
                if not name or name in region or self._param_slot(reader, slot):
                    continue
                if not self.const(name):
                    raise _Fail(f"{reader.op_type} {reader.name} combines the channels with the computed tensor {name}")
                ax = self.const_channel_axis(name, C, kind, rank)
                if ax is not None:
                    group.edits.append(_Edit("const", node=reader, slot=slot, name=name, axis=ax))
            group.nodes.append(reader)
            add(out)
        if not group.consumers:
            raise _Fail("no weight layer reads the channels")
        if len(blocks) > 1:
            raise _Fail(f"readers/producer grouped differently ({sorted(blocks)} groups)")
        group.blocks = blocks.pop() if blocks else 1
        if C % group.blocks or (C // group.blocks) % self.m:
            raise _Fail(f"{C // group.blocks} channels per group is not a multiple of M={self.m}")
        return group

    def _param_slot(self, node, slot: int) -> bool:
        """Operands handled by transparent() itself (norm params, depthwise weight, QDQ params)."""
        if node.op_type in NORM_OPS or node.op_type in QDQ_OPS:
            return slot > 0
        if node.op_type == "Conv":
            return slot > 0
        return False

    def transparent(self, node, kind: str, C: int, rank, group: _Group, dw) -> str:
        """Check a reader of channel tensors that keeps channels apart; queue its param edits; its output."""
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Fail(f"channels reach {node.domain}.{op} {node.name}")
        extra = [o for o in node.output[1:] if o and (self.index.uses(o) or self.index.is_graph_output(o))]
        if extra:
            raise _Fail(f"{op} {node.name} has a second output in use")
        if dw is not None:
            t, u = dw
            why = self.weight_private(t, u) or self.dq_ok(t, u, u.out_axis)
            if why:
                raise _Fail(f"depthwise {node.name}: {why}")
            group.edits.append(_Edit("weight", name=t.weight, axis=u.out_axis, target=t, use=u))
            if len(node.input) > 2 and node.input[2]:
                if not self.const(node.input[2]):
                    raise _Fail(f"depthwise {node.name} has a computed bias")
                group.edits.append(_Edit("const", node=node, slot=2, name=node.input[2], axis=0))
            return node.output[0]
        if op in UNARY_OPS or op in ELEMENTWISE_OPS:
            return node.output[0]
        if op in POOL_OPS:
            if kind != "nchw":
                raise _Fail(f"{op} {node.name} pools a tensor whose channels are on the last axis")
            return node.output[0]
        if op in NORM_OPS:
            if op == "BatchNormalization" and attr(node, "training_mode", 0):
                raise _Fail(f"{node.name} is a training-mode BatchNormalization")
            if kind == "last" and rank != 2:
                raise _Fail(f"{op} {node.name} normalizes axis 1, not the channel axis")
            if op == "InstanceNormalization" and kind != "nchw":
                raise _Fail(f"{op} {node.name} on a tensor without spatial axes")
            for slot in range(1, len(node.input)):
                name = node.input[slot]
                if not self.const(name):
                    raise _Fail(f"{op} {node.name} has computed parameters")
                if tuple(self.loaded.initializer(name).dims) != (C,):
                    raise _Fail(f"{op} {node.name}: parameter {name} is not one per channel")
                group.edits.append(_Edit("const", node=node, slot=slot, name=name, axis=0))
            return node.output[0]
        if op in QDQ_OPS:
            if attr(node, "block_size", 0):
                raise _Fail(f"{op} {node.name} is blocked")
            ax = attr(node, "axis", 1)
            for slot in range(1, len(node.input)):
                name = node.input[slot]
                if not name:
                    continue
                if not self.const(name):
                    raise _Fail(f"{op} {node.name} has computed parameters")
                size = int(np.prod(self.loaded.initializer(name).dims, dtype=np.int64))
                if size == 1:
                    continue
                on_channels = (kind == "nchw" and ax == 1) or (kind == "last" and (ax == -1 or (rank is not None and ax == rank - 1)))
                if size != C or not on_channels:
                    raise _Fail(f"{op} {node.name}: per-axis parameters not along the channels")
                group.edits.append(_Edit("const", node=node, slot=slot, name=name, axis=0))
            return node.output[0]
        if op in LAYOUT_OPS or op in ("Concat", "Split", "Slice", "Gather", "Pad", "Resize", "Upsample"):
            raise _Fail(f"{op} {node.name} changes the channel layout")
        raise _Fail(f"channels reach {op} {node.name}, which mixes channels or is not known to keep them apart")

    def why_unreached(self, node, use: Use) -> str:
        """A reason for a target no producer's region reached: walk up from its input."""
        slot = 0
        if node.op_type == "MatMul" and self.weight_slot(node, use) == 0:
            return "weight is the left operand of the MatMul: its input channels are not a tensor's channel axis"
        if node.op_type == "Gemm" and attr(node, "transA", 0):
            return "Gemm with transA: input channels are not a tensor's last axis"
        name = node.input[slot]
        for _ in range(10000):
            prod = self.index.producer.get(name)
            if prod is None:
                return "its input is a graph input, with no producer to absorb the permutation"
            op = prod.op_type
            if id(prod) in self.by_node and self.depthwise(prod) is None:
                return f"its producer {prod.name} could not be permuted"
            computed = [i for i in prod.input if i and not self.const(i)]
            transparent = op in UNARY_OPS | ELEMENTWISE_OPS | POOL_OPS | NORM_OPS | QDQ_OPS or self.depthwise(prod) is not None
            if not transparent and (op in LAYOUT_OPS or op in ("Concat", "Split", "Slice", "Gather", "Pad", "Resize", "Upsample")):
                return f"{op} {prod.name} between it and its producer changes the channel layout"
            if not transparent:
                return f"its input comes from {op} {prod.name}, not through channel-wise ops from a Conv/Gemm/MatMul"
            if len(set(computed)) > 1:
                return f"{op} {prod.name} on its input path merges two computed tensors (e.g. a residual connection or a normalization)"
            if not computed:
                return "its input is computed from constants only"
            name = computed[0]
        return "input path too long"


# -----------------------------------------------------------------------------
# applying a permutation


def _permute_array(x: np.ndarray, axis: int, perm: np.ndarray, blocks: int, out_axis: int) -> np.ndarray:
    """x permuted along `axis` (new[..., j, ...] = x[..., perm[j], ...]); with blocks > 1, each block of
    rows along out_axis takes its own slice of perm (a grouped conv's input channels)."""
    if blocks <= 1:
        return np.take(x, perm, axis=axis)
    cb = perm.shape[0] // blocks
    rows = x.shape[out_axis] // blocks
    out = np.array(x, copy=True)
    for b in range(blocks):
        local = perm[b * cb : (b + 1) * cb] - b * cb
        sl = [slice(None)] * x.ndim
        sl[out_axis] = slice(b * rows, (b + 1) * rows)
        out[tuple(sl)] = np.take(x[tuple(sl)], local, axis=axis)
    return out


def _permute_weight(loaded, index: GraphIndex, edit: _Edit, perm: np.ndarray) -> None:
    """Permute a weight along an axis of its effective layout, exactly (stored values are moved, never recomputed)."""
    use = edit.use
    view = WeightView(loaded, edit.name, use)
    old = np.asarray(loaded.array(edit.name))
    idx = view.index_map()
    if idx is None:
        new = _permute_array(old.reshape(use.eff_shape), edit.axis, perm, edit.blocks, use.out_axis)
    else:
        # move stored elements: new effective e = old effective src[e]
        src = _permute_array(np.arange(old.size, dtype=np.int64).reshape(use.eff_shape), edit.axis, perm, edit.blocks, use.out_axis)
        flat_idx = idx.reshape(-1).astype(np.int64)
        flat = old.reshape(-1)
        new = np.empty_like(flat)
        new[flat_idx] = flat[flat_idx[src.reshape(-1)]]
    loaded.set_array(edit.name, new.reshape(old.shape))
    dq = view.dq
    if dq is None:
        return
    scale = np.asarray(loaded.array(dq.input[1]))
    if scale.size <= 1:
        return
    axis = attr(dq, "axis", 1)
    axis = axis + old.ndim if axis < 0 else axis
    if stored_axis(view, edit.axis) != axis:
        return  # the scales are constant along the moved axis
    for slot in (1, 2):
        if len(dq.input) > slot and dq.input[slot]:
            _permute_const(loaded, index, dq, slot, dq.input[slot], 0, perm)


def _permute_const(loaded, index: GraphIndex, node, slot: int, name: str, axis: int, perm: np.ndarray) -> None:
    value = np.take(np.asarray(loaded.array(name)), perm, axis=axis)
    if len(index.uses(name)) > 1 or index.is_graph_output(name):
        fresh = _fresh_name(index, f"{name}_perm")
        loaded.add_initializer(fresh, value)
        index.consumers[name] = [(n, s) for n, s in index.consumers[name] if not (n is node and s == slot)]
        index.consumers[fresh].append((node, slot))
        node.input[slot] = fresh
    else:
        loaded.set_array(name, value)


# -----------------------------------------------------------------------------
# the pass


def _score_blocks(score: np.ndarray, use: Use, blocks: int) -> list[np.ndarray]:
    """Per channel block: the layer's scores as [channels of the block, rows] (channel-major)."""
    eff = np.moveaxis(score, (use.out_axis, use.red_axis), (0, 1))
    out_rows = eff.shape[0]
    red = eff.shape[1]
    groups = use.groups
    mats = []
    if groups > 1:
        rows = out_rows // groups
        for b in range(groups):
            part = eff[b * rows : (b + 1) * rows]
            mats.append(np.ascontiguousarray(np.moveaxis(part, 1, 0).reshape(red, -1), dtype=np.float32))
        return mats
    whole = np.ascontiguousarray(np.moveaxis(eff, 1, 0).reshape(red, -1), dtype=np.float32)
    cb = red // blocks
    return [np.ascontiguousarray(whole[b * cb : (b + 1) * cb]) for b in range(blocks)]


class PermuteChannels(Pass):
    """Permutes each target's input channels to keep more score under N:M; the producer absorbs the inverse.

    Reports per layer ``ctx.layer(name)["permute"]`` and, for every permuted
    layer, ``ctx.artifacts["permutations"][name]`` (perm: new channel j is old
    channel perm[j]; producer; the tensor whose channels were reordered).
    Scores in ``ctx.artifacts["scores"]`` are permuted with their weights.
    Per-layer statistics gathered before this pass (Gram matrices) are not:
    collect them after it.
    """

    name = "permute-channels"
    requires = ("targets",)
    provides = ("permutations",)

    def __init__(self, work_budget: float = WORK_BUDGET, workers: int | None = None, min_rounds: int = MIN_ROUNDS):
        self.work_budget = work_budget
        self.min_rounds = min_rounds
        self.workers = workers  # threads for independent searches (default: one per CPU)

    def run(self, ctx: CompileContext) -> PassResult:
        opts = ctx.options
        perms: dict[str, dict] = ctx.artifacts.setdefault("permutations", {})
        pattern = getattr(opts, "pattern", None)
        if pattern is None or not getattr(opts, "permute", True):
            return PassResult(False)
        n, m = pattern.n, pattern.m
        loaded = ctx.model
        targets: list[Target] = ctx.artifacts["targets"]
        other = [flag for flag in ("sequential", "transposable") if getattr(opts, flag, False)]
        if other:
            # The search maximizes plain N:M; a sequential window depends on the order inside
            # each group, and transposable tiles also group the producer's rows.
            why = f"channel permutation optimizes plain N:M, not {other[0]} N:M"
            for target in targets:
                ctx.layer(target.name)["permute"] = {"applied": False, "retained_before": None, "retained_after": None, "producer": None, "reason": why}
            return PassResult(False, [f"permute-channels skipped: {why}"])
        scores_from: dict = ctx.artifacts.get("scores", {})
        planner = _Planner(loaded, targets, m)
        reasons: dict[str, str] = {}
        done: set[str] = set()
        changed = False
        kept_before = kept_after = 0.0
        applied_layers = 0

        # 1. plan every producer's group (regions are disjoint; nothing is edited yet)
        groups: list[_Group] = []
        for node in loaded.model.graph.node:
            if id(node) not in planner.by_node:
                continue
            try:
                group = planner.plan(node)
            except _Fail as exc:
                self._blame(planner, node, str(exc), reasons)
                continue
            if group is not None:
                groups.append(group)

        # 2. search, all on the unedited weights: independent, so several at once
        #    (the kernels release the GIL); results are used in plan order.
        workers = max(1, min(self.workers or os.cpu_count() or 1, len(groups)))
        solve = lambda g: self._solve(ctx, g, n, m, scores_from)  # noqa: E731
        if workers > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                outcomes = list(ctx.progress(pool.map(solve, groups), desc="permute", total=len(groups)))
        else:
            outcomes = [solve(g) for g in ctx.progress(groups, desc="permute")]

        # 3. apply in plan order
        for group, outcome in zip(groups, outcomes):
            node = group.producer
            names = [ct.name for _, ct, _ in group.consumers]
            if outcome["perm"] is None:
                for name in names:
                    reasons.setdefault(name, outcome["reason"])
                    if name in outcome["rows"]:
                        row = {k: v for k, v in outcome["rows"][name].items() if not k.startswith("_")}
                        ctx.layer(name)["permute"] = {**row, "applied": False, "producer": node.name, "reason": outcome["reason"]}
                        done.add(name)
                continue
            perm = outcome["perm"]
            for edit in group.edits:
                if edit.kind == "weight":
                    _permute_weight(loaded, planner.index, edit, perm)
                    if edit.target.name in scores_from:
                        sc = np.asarray(scores_from[edit.target.name])
                        scores_from[edit.target.name] = _permute_array(sc, edit.axis, perm, edit.blocks, edit.use.out_axis)
                else:
                    _permute_const(loaded, planner.index, edit.node, edit.slot, edit.name, edit.axis, perm)
            changed = True
            for reader, ct, cu in group.consumers:
                row = outcome["rows"].get(ct.name)
                info = {"applied": True, "producer": node.name, "reason": None}
                if row is None:
                    info.update({"retained_before": None, "retained_after": None, "reason": f"permuted to match its producer (not pruned: {ct.skip})"})
                else:
                    info.update(row)
                    applied_layers += 1
                    kept_before += row["retained_before"]
                    kept_after += row["retained_after"]
                ctx.layer(ct.name)["permute"] = {k: v for k, v in info.items() if not k.startswith("_")}
                perms[ct.name] = {
                    "perm": perm,
                    "producer": node.name,
                    "tensor": node.output[0],
                    "readers": [r.name for r, _, _ in group.consumers],
                    "seconds": outcome["seconds"],
                }
                done.add(ct.name)

        for target in targets:
            if target.name in done:
                continue
            row = {"applied": False, "retained_before": None, "retained_after": None, "producer": None}
            if target.skip:
                row["reason"] = f"not pruned: {target.skip}"
            elif len(target.uses) > 1:
                row["reason"] = f"weight shared by {len(target.uses)} nodes"
            else:
                use = target.primary
                row["reason"] = reasons.get(target.name) or planner.why_unreached(use.node, use)
                score = scores_from.get(target.name)
                score = np.abs(WeightView(loaded, target.weight, use).effective()) if score is None else np.asarray(score)
                mats = _score_blocks(score, use, 1)
                total = float(sum(np.sum(s, dtype=np.float64) for s in mats))
                v = sum(retained(s, n, m) for s in mats)
                row["retained_before"] = row["retained_after"] = v / total if total > 0 else 1.0
            ctx.layer(target.name)["permute"] = row
        notes = []
        if applied_layers:
            notes.append(
                f"permuted the input channels of {applied_layers} layer(s): mean share of score kept by {pattern} "
                f"{kept_before / applied_layers:.4f} -> {kept_after / applied_layers:.4f}"
            )
        return PassResult(changed, notes)

    @staticmethod
    def _blame(planner: _Planner, node, reason: str, reasons: dict[str, str]) -> None:
        """Record why P's readers cannot be permuted (for targets among them)."""
        msg = f"producer {node.name}: {reason}" if not reason.startswith("producer") else reason
        for out in node.output[:1]:
            stack, seen = [out], set()
            while stack:
                t = stack.pop()
                if t in seen:
                    continue
                seen.add(t)
                for reader, _ in planner.index.uses(t):
                    info = planner.by_node.get(id(reader))
                    if info is not None and planner.depthwise(reader) is None:
                        reasons.setdefault(info[0].name, msg)
                        continue
                    # through channel-wise ops, but not past a merge with another computed tensor:
                    # readers beyond it get their own reason from why_unreached
                    computed = {i for i in reader.input if i and not planner.const(i)}
                    if len(computed) > 1:
                        continue
                    if reader.op_type in UNARY_OPS | ELEMENTWISE_OPS | POOL_OPS | NORM_OPS | QDQ_OPS or planner.depthwise(reader) is not None:
                        stack.extend(o for o in reader.output[:1] if o)

    def _solve(self, ctx: CompileContext, group: _Group, n: int, m: int, scores_from: dict) -> dict:
        """Search one permutation for the whole group; per-reader retained fractions."""
        t0 = time.perf_counter()
        loaded = ctx.model
        C, B = group.channels, group.blocks
        cb = C // B
        layer_mats: dict[str, list[np.ndarray]] = {}
        totals: dict[str, float] = {}
        for reader, ct, cu in group.consumers:
            if ct.skip:
                continue
            score = scores_from.get(ct.name)
            score = np.abs(WeightView(loaded, ct.weight, cu).effective()) if score is None else np.asarray(score, np.float32)
            mats = _score_blocks(score, cu, B)
            layer_mats[ct.name] = mats
            totals[ct.name] = float(sum(np.sum(s, dtype=np.float64) for s in mats))
        rows: dict[str, dict] = {}
        if not layer_mats:
            return {"perm": None, "reason": "no reader of the channels is pruned", "rows": rows, "seconds": 0.0}
        perm = np.empty(C, np.int64)
        for b in range(B):
            parts = [layer_mats[k][b] / np.float32(max(totals[k], 1e-30)) for k in layer_mats]
            S = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
            res = search_permutation(S, n, m, work_budget=self.work_budget, min_rounds=self.min_rounds)
            perm[b * cb : (b + 1) * cb] = res.perm + b * cb
        better = False
        worse = []
        for name, mats in layer_mats.items():
            before = sum(retained(s, n, m) for s in mats)
            after = sum(retained(s, n, m, perm[b * cb : (b + 1) * cb] - b * cb) for b, s in enumerate(mats))
            tot = totals[name]
            rows[name] = {
                "retained_before": before / tot if tot > 0 else 1.0,
                "retained_after": after / tot if tot > 0 else 1.0,
                "_kept": (before, after),
            }
            if after < before - 1e-9 * max(tot, 1e-30):
                worse.append(name)
            elif after > before + 1e-9 * max(tot, 1e-30):
                better = True
        seconds = time.perf_counter() - t0
        if worse:
            for r in rows.values():
                r["retained_after"] = r["retained_before"]
            return {"perm": None, "reason": f"no permutation found that keeps more in every reader ({', '.join(worse)} would lose)", "rows": rows, "seconds": seconds}
        if not better or np.array_equal(perm, np.arange(C)):
            for r in rows.values():
                r["retained_after"] = r["retained_before"]
            return {"perm": None, "reason": "no permutation found that keeps more", "rows": rows, "seconds": seconds}
        return {"perm": perm, "reason": None, "rows": rows, "seconds": seconds}
