"""Numerical core of post-training quantization: pure functions, no ONNX.

Everything here works on numpy arrays and is deterministic (same input, same
output bits).  The ONNX rewriting lives elsewhere and calls into this module.

Contents
--------
Activation calibration
    StreamingHistogram          |x| histogram streamed over batches, bounded memory
    kl_divergence_curve         TensorRT entropy search, KL for every candidate
    kl_threshold                TensorRT entropy calibration threshold
    minmax_threshold            max |x|
    percentile_threshold        percentile of |x| from the histogram
    mse_threshold               threshold minimizing the histogram-estimated MSE
    fake_quantize               quantize-dequantize with a threshold (symmetric or (lo, hi))
    quantization_error          MSE of fake-quantizing samples with a threshold
    histogram_quantization_error  the same, estimated from a histogram
    choose_threshold_auto       pick among kl / minmax / percentile by error

Weights
    quantize_weight_per_channel / dequantize_per_channel   symmetric int8 (or fewer bits)
    gptq_round                                             error-compensating rounding (GPTQ) on those grids
    log_quantize / log_dequantize / log_decode_table       sign + power-of-two codes
    kmeans_1d_optimal / kmeans_cost                        exact 1-D k-means (DP)
    lut_quantize / lut_dequantize                          k-means look-up-table codebooks
    pack_4bit / unpack_4bit                                ONNX INT4/UINT4 nibble packing
    sqnr_db

Conventions (read these before using the results)
-------------------------------------------------
* Symmetric integer grids use [-(2^(b-1)-1), 2^(b-1)-1] (int8: [-127, 127]),
  the TensorRT convention; a threshold T maps to scale T / 127.  Rounding is
  round-half-to-even (numpy ``rint``), like ONNX QuantizeLinear.
* Exact zeros stay exactly zero in every weight quantizer here (per-channel int8,
  log, LUT), so N:M sparsity patterns survive quantization bit-exactly.
* The KL threshold follows the "8-bit Inference with TensorRT" (GTC 2017)
  description; the threshold is ``(i + 0.5) * bin_width`` for the chosen number
  of kept bins ``i`` (the paper's rule).  ``convention="edge"`` gives
  ``i * bin_width`` (what pytorch-quantization and ONNX Runtime return).
* Activation calibration (histograms, KL / percentile / MSE thresholds) is
  plain numpy: no JIT compilation, numba is not even imported.  Only the
  k-means dynamic program is compiled, by numba on its first call.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np


def _lazy_njit(**jit_kwargs):
    """Compile ``fn`` with numba on its first call (numba is imported only then).

    Only the k-means dynamic program needs compiled code; importing numba (and
    with it llvmlite and parts of scipy) costs ~0.4 s and ~60 MB of resident
    memory, and loading a cached kernel ~0.2 s more, which the int8 calibration
    path (pure numpy) must not pay.  Without numba the plain Python function
    runs (slowly, same results).
    """

    def deco(fn):
        compiled = None

        def call(*args):
            nonlocal compiled
            if compiled is None:
                try:
                    from numba import njit
                except Exception:  # pragma: no cover - numba is a declared dependency
                    compiled = fn
                else:
                    compiled = njit(**jit_kwargs)(fn)
            return compiled(*args)

        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    return deco


__all__ = [
    "StreamingHistogram",
    "kl_divergence_curve",
    "kl_threshold",
    "minmax_threshold",
    "percentile_threshold",
    "mse_threshold",
    "fake_quantize",
    "quantization_error",
    "histogram_quantization_error",
    "ThresholdChoice",
    "choose_threshold_auto",
    "quantize_weight_per_channel",
    "dequantize_per_channel",
    "gptq_round",
    "log_decode_table",
    "log_quantize",
    "log_dequantize",
    "kmeans_1d_optimal",
    "kmeans_cost",
    "lut_quantize",
    "lut_dequantize",
    "pack_4bit",
    "unpack_4bit",
    "sqnr_db",
]


# ---------------------------------------------------------------------------
# Streaming histogram
# ---------------------------------------------------------------------------

_RANGE_HEADROOM = 2.0**-20  # the first range is max_abs * (1 + 2^-20): max_abs sits strictly inside


class StreamingHistogram:
    """Histogram of |x| over calibration batches, in ``num_bins`` counters.

    Binning rule (exact, documented so that it can be reproduced): with the
    current range ``R`` and ``n = num_bins``, a finite value ``v`` goes to bin
    ``floor(|v| * (n / R))`` computed in float64.  Bins are half-open
    ``[k*R/n, (k+1)*R/n)``; ``R`` is always strictly above every value seen, so
    no value is clamped into the last bin.

    Growth rule: the first batch with a nonzero value sets
    ``R = max_abs * (1 + 2^-20)``.  When a later batch holds a value that would
    land at bin ``>= n``, ``R`` is multiplied by the smallest power of two
    ``2^m`` that makes room, and old bin ``k`` is merged into bin ``k >> m``.
    Because multiplying ``R`` by ``2^m`` divides ``n / R`` by ``2^m`` exactly in
    binary floating point, ``floor(v * n/(R 2^m)) == floor(v * n/R) >> m`` for
    every value: the streamed histogram is *identical* to the histogram of all
    the data at once built with the same final range
    (``StreamingHistogram(n, range_max=h.range_max).update(all_data)``), and it
    agrees with ``np.histogram(|x|, n, range=(0, R))`` except for values within
    a rounding error of a bin edge.

    Cost of exactness: after growth the data occupy between ``n/2`` and ``n``
    bins (``max_abs / range_max`` in (1/2, 1]); threshold searches trim the
    trailing empty bins, so they see a histogram ending at ``max_abs`` with at
    least ``n/2`` bins of resolution.

    Two-pass calibration reproduces TensorRT's setting exactly (``n`` bins
    spanning [0, max|x|]): find max|x| first (a cheap min/max pass), then
    stream into ``StreamingHistogram.from_max_abs(max_abs, n)``, which never
    grows.  The streamed range depends on the first batch, so a given sequence
    of batches always gives the same histogram, but re-batching the same data
    can change the final range (never the exactness above).

    Non-finite values (NaN, +-inf) are not binned; they are counted in
    ``nonfinite_count`` so that callers can refuse or report them.  Signed
    ``min`` / ``max`` of the finite values are tracked for MinMax calibration.
    """

    def __init__(self, num_bins: int = 2048, range_max: float | None = None, *, chunk_size: int = 1 << 18):
        num_bins = int(num_bins)
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        self.num_bins = num_bins
        self._counts = np.zeros(num_bins, dtype=np.int64)
        self._range: float | None = None
        if range_max is not None:
            r = float(range_max)
            if not (math.isfinite(r) and r > 0):
                raise ValueError(f"range_max must be finite and > 0, got {range_max!r}")
            self._range = r
        self._chunk = max(1, int(chunk_size))
        self._max_abs = 0.0
        self._min = math.inf
        self._max = -math.inf
        self._total = 0
        self._nonfinite = 0
        self._sumsq = 0.0
        self.num_growths = 0

    @classmethod
    def from_max_abs(cls, max_abs: float, num_bins: int = 2048, **kwargs) -> "StreamingHistogram":
        """Histogram whose range is set as if the first batch had max |x| = ``max_abs``.

        Values up to ``max_abs`` never make it grow, so the data span all ``num_bins``.
        """
        m = float(max_abs)
        if not (math.isfinite(m) and m > 0):
            raise ValueError(f"max_abs must be finite and > 0, got {max_abs!r}")
        return cls(num_bins, range_max=cls._initial_range(m, int(num_bins)), **kwargs)

    @staticmethod
    def _initial_range(amax: float, n: int) -> float:
        r = amax * (1.0 + _RANGE_HEADROOM)
        while amax * (n / r) >= n:  # pragma: no cover - guard against rounding
            r = float(np.nextafter(r, math.inf))
        return r

    # -- properties ---------------------------------------------------------
    @property
    def counts(self) -> np.ndarray:
        """Copy of the ``num_bins`` int64 counters."""
        return self._counts.copy()

    @property
    def range_max(self) -> float:
        """Upper edge R of the last bin (0.0 while only zeros have been seen)."""
        return 0.0 if self._range is None else self._range

    @property
    def bin_width(self) -> float:
        return self.range_max / self.num_bins

    @property
    def edges(self) -> np.ndarray:
        """``num_bins + 1`` bin edges ``k * R / n`` (float64)."""
        return np.arange(self.num_bins + 1, dtype=np.float64) * (self.range_max / self.num_bins)

    @property
    def max_abs(self) -> float:
        """Exact max |x| of the finite values seen."""
        return self._max_abs

    @property
    def min(self) -> float:
        """Signed minimum of the finite values seen (+inf if none)."""
        return self._min

    @property
    def max(self) -> float:
        """Signed maximum of the finite values seen (-inf if none)."""
        return self._max

    @property
    def total(self) -> int:
        """Number of finite values binned."""
        return self._total

    @property
    def nonfinite_count(self) -> int:
        return self._nonfinite

    @property
    def sumsq(self) -> float:
        """Sum of the squares of the finite values seen (float64 arithmetic)."""
        return self._sumsq

    # -- updating -----------------------------------------------------------
    def _grow(self, top: float) -> None:
        """Make room for a value whose bin index (as a float) is ``top >= n``."""
        n = self.num_bins
        m = max(1, math.ceil(math.log2(top / n))) if top / n > 1 else 1
        while top >= math.ldexp(n, m):
            m += 1
        while m > 1 and top < math.ldexp(n, m - 1):
            m -= 1
        assert self._range is not None
        self._range = math.ldexp(self._range, m)
        if m >= 63 or (n - 1) >> m == 0:
            merged = np.zeros(n, dtype=np.int64)
            merged[0] = self._counts.sum()
        else:
            merged = np.zeros(n, dtype=np.int64)
            np.add.at(merged, np.arange(n) >> m, self._counts)
        self._counts = merged
        self.num_growths += 1

    def update(self, x) -> "StreamingHistogram":
        """Add the values of ``x`` (any shape, any real dtype). Returns self."""
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"cannot histogram values of dtype {a.dtype}")
        a = a.reshape(-1)
        for start in range(0, a.size, self._chunk):
            self._update_chunk(a[start : start + self._chunk])
        return self

    def _update_chunk(self, v: np.ndarray) -> None:
        if v.dtype not in (np.float32, np.float64):
            v = v.astype(np.float64)
        mn = v.min()
        mx = v.max()
        if not (math.isfinite(mn) and math.isfinite(mx)):  # NaN or +-inf somewhere
            fin = np.isfinite(v)
            nfin = int(np.count_nonzero(fin))
            self._nonfinite += v.size - nfin
            if nfin == 0:
                return
            v = v[fin]
            mn = v.min()
            mx = v.max()
        mn = float(mn)
        mx = float(mx)
        nfin = v.size
        self._min = min(self._min, mn)
        self._max = max(self._max, mx)
        amax = max(-mn, mx)
        self._max_abs = max(self._max_abs, amax)
        self._total += int(nfin)
        n = self.num_bins
        if amax == 0.0:  # only zeros: bin 0 whatever the range is (merging keeps bin 0 at 0)
            self._counts[0] += nfin
            return
        if self._range is None:
            self._range = self._initial_range(amax, n)
        scale = n / self._range
        top = amax * scale
        if top >= n:
            self._grow(top)
            scale = n / self._range
        a, ia = _chunk_buffers(v.size)
        np.multiply(v, scale, out=a, dtype=np.float64)  # float64, the binning rule's arithmetic
        np.abs(a, out=a)
        self._sumsq += float(np.einsum("i,i->", a, a)) / (scale * scale)
        np.copyto(ia, a, casting="unsafe")  # truncation = floor (a >= 0)
        self._counts += np.bincount(ia, minlength=n)

    # -- thresholds (convenience wrappers) ----------------------------------
    def trimmed_counts(self) -> np.ndarray:
        """Counts up to and including the last nonzero bin (the histogram "ends at max_abs")."""
        nz = np.flatnonzero(self._counts)
        return self._counts[: (nz[-1] + 1 if nz.size else 0)].copy()

    def kl_threshold(self, num_quant_levels: int = 128, start_bin: int = 128, **kwargs) -> float:
        """TensorRT entropy threshold on the trimmed histogram, clamped to ``max_abs``."""
        c = self.trimmed_counts()
        if c.size == 0 or self.max_abs == 0.0:
            return 0.0
        t = kl_threshold(c, self.bin_width, num_quant_levels, start_bin, **kwargs)
        return min(t, self.max_abs)

    def percentile_threshold(self, pct: float = 99.99) -> float:
        return percentile_threshold(self, pct)


_chunk_scratch = threading.local()


def _chunk_buffers(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread float64 and int64 work buffers of ``size`` for one histogram chunk.

    Shared by every histogram of the thread (one chunk is binned at a time), so
    that neither the memory nor the page faults of fresh temporaries are paid
    per chunk or per histogram.
    """
    bufs = getattr(_chunk_scratch, "bufs", None)
    if bufs is None or bufs[0].size < size:
        bufs = (np.empty(size, np.float64), np.empty(size, np.int64))
        _chunk_scratch.bufs = bufs
    return bufs[0][:size], bufs[1][:size]


def _as_hist(hist) -> tuple[np.ndarray, float, float]:
    """(counts float64, bin_width, max_abs) from a StreamingHistogram or ``(counts, bin_width)``.

    For a plain tuple, ``max_abs`` is taken as the upper edge of the last nonzero bin.
    """
    if isinstance(hist, StreamingHistogram):
        return hist.trimmed_counts().astype(np.float64), hist.bin_width, hist.max_abs
    counts, bin_width = hist
    counts = np.asarray(counts, dtype=np.float64).reshape(-1)
    if (counts < 0).any():
        raise ValueError("histogram counts must be >= 0")
    nz = np.flatnonzero(counts)
    counts = counts[: (nz[-1] + 1 if nz.size else 0)]
    return counts, float(bin_width), counts.size * float(bin_width)


# ---------------------------------------------------------------------------
# KL (entropy) calibration, TensorRT's algorithm
# ---------------------------------------------------------------------------

_SMOOTH_EPS = 1e-4


def kl_divergence_curve(
    counts,
    num_quant_levels: int = 128,
    start_bin: int = 128,
    *,
    suppress_zero_bin: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) for every candidate number of kept bins ``i``.

    Returns ``(candidates, divergences)`` with ``candidates = start_bin..nbins``
    (or just ``[nbins]`` when the histogram has no more than ``start_bin`` bins).

    For each ``i`` (TensorRT, "8-bit Inference with TensorRT", GTC 2017):

    * reference ``P = counts[:i]`` with the outliers ``sum(counts[i:])`` added to
      ``P[i-1]``;
    * candidate ``Q``: bin ``j < i`` goes to level ``floor(j * L / i)``
      (``L = num_quant_levels``: uniform merging, the remainder spread over the
      levels as pytorch-quantization's ``linspace/digitize`` does, computed with
      exact integers); each level's total is spread uniformly over the level's
      *nonzero* bins, zero bins of ``counts[:i]`` stay zero in ``Q`` (so ``Q``
      does not see the outliers);
    * both are smoothed like MXNet / ONNX Runtime ``smooth_distribution``
      (zeros -> 1e-4 on raw counts, taken off the nonzeros), normalized, and
      ``KL = sum P log(P / Q)`` in nats, float64.

    ``suppress_zero_bin`` replaces ``counts[0]`` with ``counts[1]`` first
    (pytorch-quantization's trick against the spike of exact zeros after ReLU).

    Computed for all candidates at once in numpy, O(candidates x levels)
    instead of O(candidates x bins) (see ``_kl_curve``): each level's merged
    mass and nonzero-bin count come from prefix sums, the level terms from
    tables over all (start, width) intervals, the smoothing epsilons through
    series in e / c whose terms are kept while they can move KL by 2^-52
    (histograms where e / c could exceed 1/4, i.e. fractional counts, take a
    direct one-log-per-level evaluation); the last kept bin, which carries the
    outliers, is added on its own; the normalizers are the exact sums (total
    for P, the kept mass for Q).  The result equals the bin-by-bin definition
    up to float64 rounding (values within rounding noise of 0 are reported as
    0: KL is never negative).
    A few ms for 2048 bins and 128 levels (the compiled bin-by-bin loop it
    replaces took ~20 ms, plus ~0.2 s to load).
    """
    c = np.asarray(counts, dtype=np.float64).reshape(-1).copy()
    if (c < 0).any() or not np.isfinite(c).all():
        raise ValueError("histogram counts must be finite and >= 0")
    L = int(num_quant_levels)
    if L < 1:
        raise ValueError("num_quant_levels must be >= 1")
    nb = c.size
    if nb == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    if suppress_zero_bin and nb > 1:
        c[0] = c[1]
    first = min(max(int(start_bin), 1), nb)
    cands = np.arange(first, nb + 1, dtype=np.int64)
    out = np.full(cands.size, np.inf)
    if c.sum() <= 0:
        return cands, out
    _kl_curve(c, first, L, _SMOOTH_EPS, out)
    return cands, out


_SERIES_MAX_RATIO = 0.25  # e / c above this: sum (c - e) log(c - e) bin by bin
_TRUNCATION = 2.0**-52  # series terms are dropped once they change KL by less than this


_BLOCK = 256  # candidates per gather: small work buffers, cache-friendly


@functools.lru_cache(maxsize=8)
def _level_layout(nb: int, first: int, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Where every candidate's levels lie: ``(I, idx, idx_last, W)``.

    Candidate ``i`` merges bins ``[ceil(k i / L), ceil((k+1) i / L))`` into level
    ``k``; ``idx[t, k] = start * (W + 1) + width`` indexes a table of all
    (start, width) intervals (``W`` the widest level); ``idx_last[t]`` is the
    level holding the last kept bin ``i - 1``.  Depends only on the sizes, so
    it is shared by every histogram of the same size (read-only arrays; int32
    where it fits: 1 MB for 2048 bins and 128 levels).
    """
    I = np.arange(first, nb + 1, dtype=np.int64)
    W = -(-nb // L)  # the widest level: ceil(nb / L)
    k = np.arange(L + 1, dtype=np.int64)
    dt = np.int32 if (nb + 1) * (W + 1) < 2**31 else np.int64
    idx = np.empty((I.size, L), dt)
    for b0 in range(0, I.size, _BLOCK):
        B = (k[None, :] * I[b0 : b0 + _BLOCK, None] + (L - 1)) // L
        idx[b0 : b0 + _BLOCK] = B[:, :-1] * (W + 1) + (B[:, 1:] - B[:, :-1])
    klev = ((I - 1) * L) // I
    idx_last = idx[np.arange(I.size), klev].astype(np.intp)
    for a in (I, idx, idx_last):
        a.setflags(write=False)
    return I, idx, idx_last, W


_scratch = threading.local()


def _level_sums(tables: list[np.ndarray], idx: np.ndarray) -> list[np.ndarray]:
    """``[t[idx].sum(axis=1) for t in tables]``, two tables per gather (the list is emptied).

    Pairs of tables travel as the real and imaginary parts of one complex
    table (one gather, one reduction for both); candidates are gathered
    ``_BLOCK`` at a time into a reused per-thread buffer (512 KB: fresh
    full-size results cost more in page faults and memory than the gathers;
    ``np.take`` writes straight into ``out`` only with mode="clip", and the
    indices are in range by construction).
    """
    T, L = idx.shape
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.shape[1] != L:
        buf = np.empty((_BLOCK, L), np.complex128)
        _scratch.buf = buf
    out: list[np.ndarray] = []
    for j in range(0, len(tables), 2):
        t = np.empty(tables[j].shape, np.complex128)
        t.real = tables[j]
        if j + 1 < len(tables):
            t.imag = tables[j + 1]
        else:
            t.imag = 0.0
        tables[j : j + 2] = [None] * len(tables[j : j + 2])  # the caller's list: free them as we go
        s = np.empty(T, np.complex128)
        for b0 in range(0, T, _BLOCK):
            ib = idx[b0 : b0 + _BLOCK]
            v = buf[: ib.shape[0]]
            np.take(t, ib, out=v, mode="clip")
            s[b0 : b0 + _BLOCK] = v.sum(axis=1)
        out.append(s.real.copy())
        if j + 1 < len(tables):
            out.append(s.imag.copy())
    return out


def _candidate_terms(c: np.ndarray, I: np.ndarray, eps: float) -> tuple:
    """What both KL evaluations need per candidate ``I`` (bins kept): prefix sums of
    the counts and of the nonzero bins, the outliers folded into P's last kept bin,
    the zero-bin smoothing of P and Q (zeros -> eps, the same mass taken off the
    nonzeros), and the running minimum of the nonzero counts."""
    nz = c > 0
    C = np.concatenate(([0.0], np.cumsum(c)))
    N = np.concatenate(([0], np.cumsum(nz, dtype=np.int64)))
    total = C[-1]
    last = c[I - 1]
    last_nz = nz[I - 1]
    extra = total - C[I]  # the outliers, folded into the last kept bin of P
    nnz_q = N[I]  # nonzero bins of Q (those of counts[:i])
    n_zero_q = I - nnz_q
    forced = ~last_nz & (last + extra > 0)  # an empty last bin made nonzero by the outliers
    n_zero_p = n_zero_q - forced
    nnz_p = I - n_zero_p
    ok = (nnz_q > 0) & (nnz_p > 0)
    eps_p = eps * n_zero_p / np.maximum(nnz_p, 1)
    eps_q = eps * n_zero_q / np.maximum(nnz_q, 1)
    p_last = last + extra - eps_p
    has_last = last_nz | forced
    pmin = np.concatenate(([np.inf], np.minimum.accumulate(np.where(nz, c, np.inf))))  # min nonzero count of counts[:k]
    return nz, C, N, total, last_nz, extra, nnz_q, n_zero_q, forced, n_zero_p, nnz_p, ok, eps_p, eps_q, p_last, has_last, pmin


def _kl_curve(c: np.ndarray, first: int, L: int, eps: float, out: np.ndarray) -> None:
    """KL(P || Q) of every candidate ``first..nb`` into ``out`` (see kl_divergence_curve).

    Per candidate, with U_k and a_k the level's smoothed P mass (outliers apart)
    and its Q value (mean of the level's nonzero counts), e_p and e_q the
    smoothing of P and Q:

        sum_j P_j log P_j = sum_{c_j > 0, j < i-1} f(c_j - e_p) + f(last kept bin),
            f(c - e) = c log c - e (1 + log c) + sum_{m>=2} e^m / (m (m-1) c^(m-1)),
            all prefix sums over the bins;
        sum_j P_j log Q_j = sum_k U_k log(a_k - e_q) + (outliers) log(Q of the last bin),
            sum_k U_k log(a_k - e_q) = sum_k (M_k - NN_k e_p) (log a_k - sum_{m>=1} (e_q / a_k)^m / m),

    whose per-level parts (M log a, NN log a, NN a^(1-m)) are tables over every
    (start, width) interval, summed per candidate by one gather each.  Series
    terms are kept while they can change KL by more than 2^-52 (bounded with
    the smallest nonzero count); when e / c could exceed 1/4 (fractional counts)
    the direct evaluation runs instead.
    """
    nb = c.size
    I, idx, idx_last, W = _level_layout(nb, first, L)
    if (nb + 1) * (W + 1) > idx.size:  # few levels: the interval table would be the larger one
        _kl_curve_direct(c, I, L, eps, out)
        return
    (nz, C, N, total, last_nz, extra, nnz_q, n_zero_q, forced, n_zero_p, nnz_p, ok,
     eps_p, eps_q, p_last, has_last, pmin) = _candidate_terms(c, I, eps)
    cmin_p = pmin[I - 1]  # smallest nonzero count before the last kept bin
    cmin_q = pmin[I]  # ... of counts[:i]
    smooth_p = (n_zero_p > 0) & (eps_p > 0)
    ok &= ~(smooth_p & ((cmin_p - eps_p <= 0) | (has_last & (p_last <= 0))))
    if not ok.any():
        return
    ep = np.where(ok, eps_p, 0.0)
    eq = np.where(ok, eps_q, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rp = float(np.max(np.where(ep > 0, ep / cmin_p, 0.0)))
        rq = float(np.max(np.where(eq > 0, eq / cmin_q, 0.0)))
    if rp > _SERIES_MAX_RATIO or rq > _SERIES_MAX_RATIO:
        _kl_curve_direct(c, I, L, eps, out)
        return
    # rq <= 1/4: every a_k - e_q >= 3/4 a_k > 0, so Q is valid wherever P is
    tol = _TRUNCATION * total
    # -- sum_j P_j log Q_j ------------------------------------------------------
    # (the interval tables are (nb + 1) x (W + 1) float64 each, 0.28 MB for 2048 bins:
    # temporaries are dropped as soon as they are used, they set the peak memory)
    s0 = np.arange(nb + 1)[:, None]
    s1 = np.minimum(s0 + np.arange(W + 1)[None, :], nb)
    M = (C[s1] - C[s0]).ravel()
    NN = (N[s1] - N[s0]).astype(np.float64).ravel()
    del s0, s1
    has = NN > 0
    a = np.where(has, M, 1.0)
    a /= np.where(has, NN, 1.0)  # level value of Q (1.0 for empty levels)
    la = np.log(a)
    la_max = float(np.abs(la).max())
    M *= la
    cols = [np.where(has, M, 0.0)]
    del M, has
    if ep.any():
        cols.append(NN * la)
    del la
    n_terms = 0  # terms m = 1..n_terms of the e_q series, which need R_2 .. R_(n_terms + 1)
    if eq.any():
        # term m of candidate t is at most e_q nnz (e_q / c_min)^(m-1) / m (every a_k >= c_min)
        sel = eq > 0
        lead = eq[sel] * nnz_q[sel]
        rq_t = eq[sel] / cmin_q[sel]
        n_terms = 1
        while float(np.max(lead * rq_t**n_terms)) / (n_terms + 1) >= tol and n_terms < 200:
            n_terms += 1
        inv_a = 1.0 / a
        R_tab = NN
        for _ in range(n_terms):
            R_tab = R_tab * inv_a  # NN a^(1-m): R_m = sum_k NN_k a_k^(1-m), m = 2 ..
            cols.append(R_tab)
        del inv_a, R_tab
    del NN
    a_last = a[idx_last]
    del a
    sums = _level_sums(cols, idx)
    del cols
    SQ = sums[0]
    if ep.any():
        SQ = SQ - ep * sums[1]
    if n_terms:
        R = [None, nnz_q.astype(np.float64)] + sums[len(sums) - n_terms :]  # R[m], R_1 = sum_k NN_k
        for m in range(1, n_terms + 1):
            SQ = SQ - eq**m / m * (R[m] - ep * R[m + 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        corr_q = np.where(last_nz, extra * np.log(a_last - eq), np.where(forced, p_last * math.log(eps), 0.0))
    SQ += corr_q
    # -- sum_j P_j log P_j ------------------------------------------------------
    cn = np.where(nz, c, 1.0)
    logc = np.log(cn)
    clogc = np.where(nz, c * logc, 0.0)
    A0 = np.concatenate(([0.0], np.cumsum(clogc)))
    SP = A0[I - 1]
    if ep.any():
        A1 = np.concatenate(([0.0], np.cumsum(np.where(nz, 1.0 + logc, 0.0))))
        SP = SP - ep * A1[I - 1]
        inv = np.where(nz, 1.0 / cn, 0.0)
        sel = ep > 0
        lead = ep[sel] * nnz_p[sel]
        rp_t = ep[sel] / cmin_p[sel]
        powm = inv
        m = 2
        while float(np.max(lead * rp_t ** (m - 1))) / (m * (m - 1)) >= tol and m <= 200:
            SP = SP + ep**m / (m * (m - 1)) * np.concatenate(([0.0], np.cumsum(powm)))[I - 1]
            powm = powm * inv
            m += 1
    with np.errstate(divide="ignore", invalid="ignore"):
        p_log_p = np.where(has_last, p_last * np.log(np.where(has_last, p_last, 1.0)), 0.0)
    SP = SP + p_log_p
    # -- KL of the normalized distributions (sums: total for P, C[i] for Q) ----
    with np.errstate(divide="ignore", invalid="ignore"):
        kl = (SP - SQ) / total + np.log(C[I] / total)
    mag = np.concatenate(([0.0], np.cumsum(np.abs(clogc))))[I - 1] + np.abs(p_log_p) + C[I] * la_max
    noise = 64 * 2.0**-53 * (mag / total + 1.0)
    kl = np.where(kl <= noise, 0.0, kl)
    out[ok] = kl[ok]


def _kl_curve_direct(c: np.ndarray, I: np.ndarray, L: int, eps: float, out: np.ndarray) -> None:
    """KL(P || Q) of every candidate ``I`` into ``out``: one log per (candidate, level), any counts."""
    (nz, C, N, total, last_nz, extra, nnz_q, n_zero_q, forced, n_zero_p, nnz_p, ok,
     eps_p, eps_q, p_last, has_last, pmin) = _candidate_terms(c, I, eps)
    pmin_reg = pmin[I - 1]  # over the bins before the last kept one
    smooth_p = (n_zero_p > 0) & (eps_p > 0)
    ok &= ~(smooth_p & ((pmin_reg - eps_p <= 0) | (has_last & (p_last <= 0))))
    # Q level by level: bin j < i is in level floor(j L / i), levels start at ceil(k i / L)
    k = np.arange(L + 1, dtype=np.int64)
    B = (k[None, :] * I[:, None] + (L - 1)) // L
    CB = C[B]
    NB = N[B]
    M = CB[:, 1:] - CB[:, :-1]
    NN = NB[:, 1:] - NB[:, :-1]
    has = NN > 0
    avg = M / np.where(has, NN, 1)
    smooth_q = (n_zero_q > 0) & (eps_q > 0)
    amin = np.where(has, avg, np.inf).min(axis=1)
    ok &= ~(smooth_q & (amin - eps_q <= 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        logq = np.log(np.where(has, avg - eps_q[:, None], 1.0))
        U = M - NN * eps_p[:, None]  # smoothed P mass of each level's nonzero bins (outliers apart)
        SQ_terms = np.where(has, U * logq, 0.0)
        SQ = SQ_terms.sum(axis=1)
        mag = np.abs(SQ_terms).sum(axis=1)
        klev = ((I - 1) * L) // I
        logq_last = np.take_along_axis(logq, klev[:, None], axis=1)[:, 0]
        corr_q = np.where(last_nz, extra * logq_last, np.where(forced, p_last * math.log(eps), 0.0))
        SQ = SQ + corr_q
        mag += np.abs(corr_q)
        # P: sum over the nonzero bins before the last kept one of f(c - e), f(x) = x log x
        cn = np.where(nz, c, 1.0)
        logc = np.log(cn)
        A0 = np.concatenate(([0.0], np.cumsum(np.where(nz, c * logc, 0.0))))
        A0abs = np.concatenate(([0.0], np.cumsum(np.where(nz, np.abs(c * logc), 0.0))))
        SP = A0[I - 1].copy()
        mag += A0abs[I - 1]
        e = np.where(ok, eps_p, 0.0)
        use = e > 0
        if use.any():
            ratio = np.where(use, e / pmin_reg, 0.0)
            direct = ratio > _SERIES_MAX_RATIO
            series = use & ~direct
            if series.any():
                # f(c - e) = c log c - e (1 + log c) + sum_{m>=2} e^m / (m (m-1) c^(m-1))
                r = float(ratio[series].max())
                A1 = np.concatenate(([0.0], np.cumsum(np.where(nz, 1.0 + logc, 0.0))))
                es = np.where(series, e, 0.0)
                SP -= es * A1[I - 1]
                inv = np.where(nz, 1.0 / cn, 0.0)
                m, powm, high = 2, inv.copy(), np.zeros(I.size)
                while True:
                    Am = np.concatenate(([0.0], np.cumsum(powm)))[I - 1]
                    high += es**m / (m * (m - 1)) * Am
                    if r**m / (m * (m - 1)) < 2.0**-64 or m >= 200:
                        break
                    m += 1
                    powm *= inv
                SP += high
            for t in np.flatnonzero(direct):
                i = int(I[t])
                v = c[: i - 1][nz[: i - 1]] - e[t]
                SP[t] = float(np.sum(v * np.log(v)))
        p_log_p = np.where(has_last, p_last * np.log(np.where(has_last, p_last, 1.0)), 0.0)
        SP += p_log_p
        mag += np.abs(p_log_p)
        sp = total
        sq = C[I]
        kl = (SP - SQ) / sp + np.log(sq / sp)
    noise = 64 * 2.0**-53 * (mag / sp + 1.0)
    kl = np.where(kl <= noise, 0.0, kl)
    out[ok] = kl[ok]


def kl_threshold(
    counts,
    bin_width: float,
    num_quant_levels: int = 128,
    start_bin: int = 128,
    *,
    convention: str = "trt",
    suppress_zero_bin: bool = False,
) -> float:
    """TensorRT entropy-calibration threshold for a histogram of |x|.

    ``counts[k]`` counts values in ``[k*bin_width, (k+1)*bin_width)``; the
    histogram is expected to end at max |x| (trim trailing empty bins, as
    ``StreamingHistogram.kl_threshold`` does).  The candidate ``i`` with the
    smallest KL (see ``kl_divergence_curve``) wins; ties go to the smallest
    ``i`` (first minimum, like the paper's pseudo-code and ONNX Runtime).

    ``convention="trt"`` returns ``(i + 0.5) * bin_width`` (the paper's
    ``threshold = (m + 0.5) * width of a bin``); ``convention="edge"`` returns
    ``i * bin_width`` (the upper edge of the last kept bin, pytorch-quantization
    and ONNX Runtime).  The result is not clamped: with ``"trt"`` and no
    clipping it is half a bin above the histogram; callers that know max |x|
    clamp to it.  An empty histogram gives 0.0.
    """
    if convention not in ("trt", "edge"):
        raise ValueError(f"convention must be 'trt' or 'edge', got {convention!r}")
    cands, kl = kl_divergence_curve(counts, num_quant_levels, start_bin, suppress_zero_bin=suppress_zero_bin)
    if cands.size == 0 or not np.isfinite(kl).any():
        c = np.asarray(counts).reshape(-1)
        return float(c.size * bin_width) if c.size and np.any(c > 0) else 0.0
    i = int(cands[int(np.argmin(kl))])
    return float((i + 0.5) * bin_width if convention == "trt" else i * bin_width)


# ---------------------------------------------------------------------------
# Other thresholds and error measures
# ---------------------------------------------------------------------------


def minmax_threshold(x) -> float:
    """max |x|: of a StreamingHistogram, or of an array of samples."""
    if isinstance(x, StreamingHistogram):
        return x.max_abs
    a = np.asarray(x)
    if a.size == 0:
        return 0.0
    a = a[np.isfinite(a)] if a.dtype.kind == "f" else a
    return float(np.max(np.abs(a.astype(np.float64)))) if a.size else 0.0


def percentile_threshold(hist, pct: float = 99.99) -> float:
    """Threshold below which at least ``pct`` % of |x| lies, from a histogram.

    ``hist`` is a StreamingHistogram or ``(counts, bin_width)``.  The result is
    the upper edge of the first bin where the cumulative count reaches
    ``pct/100 * total`` (so at most ``100 - pct`` % of the values are clipped),
    clamped to max |x|.
    """
    if not 0.0 <= pct <= 100.0:
        raise ValueError(f"pct must be in [0, 100], got {pct}")
    counts, w, max_abs = _as_hist(hist)
    total = counts.sum()
    if total <= 0:
        return 0.0
    cdf = np.cumsum(counts)
    k = int(np.searchsorted(cdf, pct / 100.0 * total, side="left"))
    k = min(k, counts.size - 1)
    return float(min((k + 1) * w, max_abs))


def _qmax(bits: int) -> int:
    bits = int(bits)
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    return (1 << (bits - 1)) - 1


def fake_quantize(x, threshold, bits: int = 8, symmetric: bool = True) -> np.ndarray:
    """Quantize then dequantize ``x`` (float64 result).

    Symmetric: scale = T / (2^(b-1)-1), levels [-qmax, qmax].  Asymmetric:
    ``threshold`` is ``(lo, hi)`` (a scalar T means ``(-T, T)``), the range is
    widened to contain 0, levels [0, 2^b - 1] with an integer zero point, like
    ONNX Runtime's uint8 activations.
    """
    x = np.asarray(x, dtype=np.float64)
    if symmetric:
        t = float(np.max(np.abs(threshold)))
        if t <= 0:
            return np.zeros_like(x)
        qm = _qmax(bits)
        s = t / qm
        return np.clip(np.rint(x / s), -qm, qm) * s
    if np.ndim(threshold) == 0:
        lo, hi = -float(threshold), float(threshold)
    else:
        lo, hi = (float(v) for v in threshold)
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo <= 0:
        return np.zeros_like(x)
    levels = (1 << int(bits)) - 1
    s = (hi - lo) / levels
    zp = float(np.clip(np.rint(-lo / s), 0, levels))
    return (np.clip(np.rint(x / s) + zp, 0, levels) - zp) * s


def quantization_error(x, threshold, bits: int = 8, symmetric: bool = True) -> float:
    """Mean squared error of fake-quantizing the samples ``x`` with ``threshold``."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return 0.0
    d = fake_quantize(x, threshold, bits, symmetric) - x
    return float(np.mean(d * d))


def _saw_integral(u: np.ndarray) -> np.ndarray:
    """F(u) = integral_0^u (t - round(t))^2 dt for u >= 0 (1/12 per unit period)."""
    fl = np.floor(u)
    f = u - fl
    g = np.where(f <= 0.5, f, f - 1.0)
    return fl / 12.0 + np.where(f <= 0.5, 0.0, 1.0 / 12.0) + g * g * g / 3.0


def _hist_mse(counts: np.ndarray, w: float, thresholds: np.ndarray, bits: int) -> np.ndarray:
    """Expected symmetric fake-quant MSE for each threshold, values uniform within each bin.

    For a bin [lo, hi) and threshold t (scale s = t / qmax): the rounding error
    on [lo, min(hi, t)] integrates to s^3 (F(min(hi, t)/s) - F(lo/s)), the
    clipping error on [max(lo, t), hi] to ((hi - t)^3 - (max(lo, t) - t)^3) / 3;
    each bin's integral is divided by its width and weighted by its count.
    """
    qmx = float(_qmax(bits))
    keep = counts > 0
    cnt = np.asarray(counts[keep], dtype=np.float64)
    lo = np.flatnonzero(keep).astype(np.float64) * w
    hi = lo + w
    total = float(cnt.sum())
    th = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    out = np.empty(th.size)
    step = max(1, (1 << 18) // max(1, cnt.size))  # bounded temporaries for long threshold lists
    for k in range(0, th.size, step):
        t = th[k : k + step, None]
        pos = t > 0.0
        s = np.where(pos, t / qmx, 1.0)
        top = np.minimum(hi, t)
        rnd = np.where(pos & (lo < t), s**3 * (_saw_integral(top / s) - _saw_integral(lo / s)), 0.0)
        b0 = np.maximum(lo, t) - t
        b1 = hi - t
        clip = np.where(hi > t, (b1 * b1 * b1 - b0 * b0 * b0) / 3.0, 0.0)
        out[k : k + step] = ((rnd + clip) * cnt / w).sum(axis=1) / total
    return out


def histogram_quantization_error(hist, threshold: float, bits: int = 8) -> float:
    """Symmetric fake-quant MSE estimated from a |x| histogram.

    Values are assumed uniformly spread inside each bin; the squared rounding
    error and the clipping error are integrated exactly under that assumption.
    ``hist`` is a StreamingHistogram or ``(counts, bin_width)``.
    """
    counts, w, _ = _as_hist(hist)
    if counts.sum() <= 0 or w <= 0:
        return 0.0
    return float(_hist_mse(counts, w, np.array([float(threshold)]), bits)[0])


def mse_threshold(hist, bits: int = 8) -> float:
    """Threshold (a bin edge, or max |x|) minimizing ``histogram_quantization_error``."""
    counts, w, max_abs = _as_hist(hist)
    if counts.sum() <= 0 or w <= 0:
        return 0.0
    cands = np.unique(np.minimum(np.arange(1, counts.size + 1) * w, max_abs))
    err = _hist_mse(counts, w, cands, bits)
    return float(cands[int(np.argmin(err))])


@dataclass
class ThresholdChoice:
    """Result of ``choose_threshold_auto``."""

    method: str  # winning candidate, e.g. "kl", "minmax", "percentile99.99"
    threshold: float
    thresholds: dict[str, float] = field(default_factory=dict)  # every candidate
    errors: dict[str, float] = field(default_factory=dict)  # MSE of every candidate
    error_source: str = "histogram"  # "samples" or "histogram"


def choose_threshold_auto(
    hist,
    samples=None,
    *,
    bits: int = 8,
    methods: Sequence[str] = ("kl", "minmax", "percentile"),
    percentiles: Iterable[float] = (99.9, 99.99, 99.999),
    num_quant_levels: int = 128,
    start_bin: int = 128,
) -> ThresholdChoice:
    """Pick the calibration threshold with the lowest quantization MSE.

    ``hist`` is a StreamingHistogram (or ``(counts, bin_width)``) of |x| over
    the calibration data; candidates are computed from it: ``"kl"`` (TensorRT
    entropy, clamped to max |x|), ``"minmax"`` (max |x|), ``"percentile"`` (one
    candidate per entry of ``percentiles``, named ``"percentile99.99"`` etc.) and,
    if asked for, ``"mse"`` (``mse_threshold``).

    The error of each candidate is the symmetric ``bits``-bit fake-quant MSE on
    ``samples`` when given (a representative subset of the calibration values;
    exact), else estimated from the histogram (``histogram_quantization_error``).
    Ties go to the earlier candidate in ``methods`` order.
    """
    _, w, max_abs = _as_hist(hist)
    cands: dict[str, float] = {}
    for m in methods:
        if m == "kl":
            if isinstance(hist, StreamingHistogram):
                cands["kl"] = hist.kl_threshold(num_quant_levels, start_bin)
            else:
                counts, w, max_abs = _as_hist(hist)
                cands["kl"] = min(kl_threshold(counts, w, num_quant_levels, start_bin), max_abs)
        elif m == "minmax":
            cands["minmax"] = hist.max_abs if isinstance(hist, StreamingHistogram) else max_abs
        elif m == "percentile":
            for p in percentiles:
                cands[f"percentile{p:g}"] = percentile_threshold(hist, p)
        elif m == "mse":
            cands["mse"] = mse_threshold(hist, bits)
        else:
            raise ValueError(f"unknown threshold method {m!r}")
    if not cands:
        raise ValueError("no threshold methods given")
    if samples is not None:
        s = np.asarray(samples, dtype=np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        errors = {k: quantization_error(s, t, bits) for k, t in cands.items()}
        source = "samples"
    else:
        errors = {k: histogram_quantization_error(hist, t, bits) for k, t in cands.items()}
        source = "histogram"
    best = min(cands, key=lambda k: (errors[k], list(cands).index(k)))
    return ThresholdChoice(best, cands[best], cands, errors, source)


# ---------------------------------------------------------------------------
# Per-channel symmetric integer weights
# ---------------------------------------------------------------------------


def _move_axis_first(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, int | None]:
    if axis is None:
        return w.reshape(1, -1), None
    axis = int(axis)
    if not -w.ndim <= axis < w.ndim:
        raise ValueError(f"axis {axis} out of range for a {w.ndim}-D weight")
    axis %= w.ndim
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1), axis


def _bshape(ndim: int, axis: int) -> tuple[int, ...]:
    shp = [1] * ndim
    shp[axis] = -1
    return tuple(shp)


def quantize_weight_per_channel(w, axis: int = 0, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel quantization: ``(q int8, scale float32[C])``.

    ``scale[c] = max|w[c]| / (2^(b-1)-1)`` (stored as float32, and ``q`` is
    computed against that float32 scale), ``q = clip(rint(w / scale), -qmax,
    qmax)``.  ``w == 0`` gives ``q == 0`` exactly.  All-zero channels get
    ``scale = 1.0`` (ONNX needs a positive scale; their q are all 0); a scale
    that would underflow float32 is raised to the smallest normal float32.
    Dequantize: ``q * scale`` broadcast along ``axis``.
    """
    w = np.asarray(w)
    if w.ndim == 0:
        raise ValueError("weight must have at least one dimension")
    qm = _qmax(bits)
    if bits > 8:
        raise ValueError("bits must be <= 8 for int8 storage")
    w2, ax = _move_axis_first(w.astype(np.float64, copy=False), axis)
    amax = np.max(np.abs(w2), axis=1) if w2.shape[1] else np.zeros(w2.shape[0])
    scale = (amax / qm).astype(np.float32)
    scale[amax == 0] = 1.0
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    bs = _bshape(w.ndim, ax)
    q = np.clip(np.rint(w.astype(np.float64) / scale.astype(np.float64).reshape(bs)), -qm, qm).astype(np.int8)
    return q, scale


def gptq_round(w, scale, gram, bits: int = 8, damp: float = 0.01, blocksize: int = 128,
               return_errors: bool = False):
    """Error-compensating rounding of a (O, K) weight onto fixed per-row grids (GPTQ).

    Why: rounding every weight to its nearest level minimizes the weight error,
    not the layer's output error ``sum_rows (w - w_hat) H (w - w_hat)^T`` on the
    calibration inputs (H = sum x x^T, the Gram matrix of the layer's input, K x K).
    GPTQ quantizes the columns in order and moves each column's rounding error onto
    the columns not yet quantized along the inverse-Hessian direction (row i of the
    upper Cholesky factor U of (H + lambda I)^-1, lambda = damp * mean(diag H)),
    the optimal compensation given the columns already fixed (Frantar et al., 2022).

    ``scale`` [O] is each row's grid step (kept as given: ``quantize_weight_per_channel``'s
    max-|w| scale), levels ``[-qmax, qmax]`` (updated weights beyond them are clipped,
    and that error is compensated too). Exact zeros of ``w`` (N:M pruned weights) get
    code 0 and their drift is compensated like a rounding error, so they stay exactly
    zero. Safeguard: a row whose output error (undamped H) is not lower than plain
    rounding's keeps plain rounding, so no row gets worse on the calibration data.
    Returns int8 codes (O, K); deterministic (float64 numpy, fixed order; rows are
    independent, so stacking the rows of layers that share an input gives each the same
    codes). With ``return_errors``: (codes, per-row output error of the result, per-row
    output error of plain rounding), against the undamped H.
    """
    w = np.asarray(w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError("w must be (O, K)")
    O, K = w.shape
    H = np.asarray(gram)  # float32 or float64: copied to float64 once, reversed, below
    if H.shape != (K, K):
        raise ValueError(f"gram must be ({K}, {K}), got {H.shape}")
    s = np.asarray(scale, dtype=np.float64).reshape(-1)
    if s.shape != (O,) or not np.all(s > 0):
        raise ValueError("scale must be O positive values")
    qm = _qmax(bits)
    keep = w != 0
    nearest = np.clip(np.rint(w / s[:, None]), -qm, qm)
    if O == 0 or K == 0:
        return (nearest.astype(np.int8), np.zeros(O), np.zeros(O)) if return_errors else nearest.astype(np.int8)
    # U upper with (H + lambda I)^-1 = U^T U: the Cholesky factor of the inverse, the
    # SparseGPT sweep's own factorization (one float64 K x K copy of H, factored in place)
    from .adaprune_solver import damp_in_place, inverse_cholesky_upper

    U = inverse_cholesky_upper(damp_in_place(np.array(H, dtype=np.float64), damp), overwrite=True)
    sparse = not keep.all()
    # columns are stored as rows (W transposed) so each step touches contiguous memory
    WT = np.array(w.T, order="C", copy=True)  # never a view of w (w may be Fortran-ordered)
    QT = np.zeros((K, O))
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        E1 = np.zeros((i2 - i1, O))
        for i in range(i2 - i1):
            c = i1 + i
            col = WT[c]
            q = np.rint(col / s)
            np.clip(q, -qm, qm, out=q)
            if sparse:
                q[~keep[:, c]] = 0.0
            err = (col - q * s) / U[c, c]
            WT[c + 1 : i2] -= U[c, c + 1 : i2, None] * err  # the rest of the block, at once
            QT[c] = q
            E1[i] = err
        WT[i2:] -= U[i1:i2, i2:].T @ E1
    Q = QT.T
    del U, WT
    H64 = np.asarray(H, dtype=np.float64)
    d_g = w - Q * s[:, None]
    d_n = w - nearest * s[:, None]
    err_g = np.einsum("ok,ok->o", d_g @ H64, d_g)
    err_n = np.einsum("ok,ok->o", d_n @ H64, d_n)
    worse = err_g >= err_n
    Q[worse] = nearest[worse]
    if return_errors:
        return Q.astype(np.int8), np.where(worse, err_n, err_g), err_n
    return Q.astype(np.int8)


def dequantize_per_channel(q, scale, axis: int = 0) -> np.ndarray:
    """``q * scale`` along ``axis``, float32 (what ONNX DequantizeLinear computes)."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    return (q.astype(np.float32) * scale.reshape(_bshape(q.ndim, int(axis) % q.ndim))).astype(np.float32)


# ---------------------------------------------------------------------------
# Logarithmic (power-of-two) weights
# ---------------------------------------------------------------------------


def log_decode_table(bits: int) -> np.ndarray:
    """Unit decode table of ``log_quantize``: ``2^bits`` float32 entries.

    Code layout: bit ``bits-1`` is the sign, the low ``bits-1`` bits are the
    magnitude code ``m``; ``m = 0`` is exact zero (both signs decode to 0; the
    quantizer emits only code 0), ``m >= 1`` decodes to ``2^-(m-1)`` (times the
    channel scale).  4 bits: 0, +-{1, 1/2, ..., 1/64}.
    """
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"bits must be in [2, 8], got {bits}")
    bits = int(bits)
    half = 1 << (bits - 1)
    mag = np.zeros(half, dtype=np.float32)
    mag[1:] = np.ldexp(1.0, -np.arange(half - 1)).astype(np.float32)
    return np.concatenate([mag, -mag]).astype(np.float32)


def log_quantize(w, bits: int = 4, axis: int | None = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sign + power-of-two codes relative to a per-channel scale.

    Returns ``(codes uint8 shaped like w, scale float32 [C] (or shape () when
    axis is None), table float32 [2^bits])`` with
    ``w_hat = table[codes] * scale`` (see ``log_decode_table`` for the layout).
    ``scale[c] = max|w[c]|`` (float32), so each channel's largest weight is
    exact.  Each weight goes to the *nearest* level in value (not in log
    domain) among {0, 2^-(K-1), ..., 1/2, 1} * scale, K = 2^(b-1) - 1; ties at a
    midpoint go to the smaller magnitude.  Exact zeros (and values nearer to 0
    than to the smallest level) get code 0, which decodes to exactly 0.
    All-zero channels get scale 1.0.
    """
    table = log_decode_table(bits)
    w = np.asarray(w)
    w64 = w.astype(np.float64)
    w2, ax = _move_axis_first(w64, axis)
    amax = np.max(np.abs(w2), axis=1) if w2.shape[1] else np.zeros(w2.shape[0])
    scale = amax.astype(np.float32)
    scale[scale == 0] = 1.0
    half = 1 << (bits - 1)
    K = half - 1
    levels = np.concatenate(([0.0], np.ldexp(1.0, -np.arange(K - 1, -1, -1)).astype(np.float64)))  # ascending
    mids = (levels[:-1] + levels[1:]) / 2.0
    if ax is None:
        r = np.abs(w64) / float(scale[0])
    else:
        r = np.abs(w64) / scale.astype(np.float64).reshape(_bshape(w.ndim, ax))
    j = np.searchsorted(mids, r, side="left")  # r == mid -> lower level
    mag = np.where(j == 0, 0, K - j + 1)  # level index j>=1 is 2^-(K-j) -> m = K-j+1
    sign = (w64 < 0) & (mag > 0)
    codes = (mag + sign * half).astype(np.uint8)
    return codes, (scale.reshape(()) if ax is None else scale), table


def log_dequantize(codes, scale, table, axis: int | None = 0) -> np.ndarray:
    """``table[codes] * scale`` (scale broadcast along ``axis``), float32."""
    codes = np.asarray(codes)
    table = np.asarray(table, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    v = table[codes]
    if axis is None or scale.ndim == 0:
        return (v * scale.reshape(())).astype(np.float32)
    return (v * scale.reshape(_bshape(codes.ndim, int(axis) % codes.ndim))).astype(np.float32)


# ---------------------------------------------------------------------------
# Exact 1-D k-means and LUT (codebook) quantization
# ---------------------------------------------------------------------------


@_lazy_njit(cache=True)
def _kmeans_dp_kernel(x, w, k):  # pragma: no cover - compiled
    """Optimal contiguous partition of sorted x (weights w > 0) into k groups.

    D[m][j] = min_{i} D[m-1][i] + cost(i, j), segment [i, j); the optimal i is
    monotone in j (the 1-D k-means cost is Monge), so each layer is computed by
    divide and conquer in O(n log n).  Returns the label of every point.
    """
    n = x.shape[0]
    W = np.zeros(n + 1)
    S = np.zeros(n + 1)
    Q = np.zeros(n + 1)
    for i in range(n):
        W[i + 1] = W[i] + w[i]
        S[i + 1] = S[i] + w[i] * x[i]
        Q[i + 1] = Q[i] + w[i] * x[i] * x[i]
    prev = np.empty(n + 1)
    cur = np.empty(n + 1)
    prev[0] = np.inf
    for j in range(1, n + 1):
        s = S[j]
        c = Q[j] - s * s / W[j]
        prev[j] = c if c > 0.0 else 0.0
    split = np.zeros((k + 1, n + 1), dtype=np.int32)
    stack = np.empty((256, 4), dtype=np.int64)
    for m in range(2, k + 1):
        for j in range(n + 1):
            cur[j] = np.inf
        top = 0
        stack[0, 0] = m
        stack[0, 1] = n
        stack[0, 2] = m - 1
        stack[0, 3] = n - 1
        top = 1
        while top > 0:
            top -= 1
            jlo = stack[top, 0]
            jhi = stack[top, 1]
            olo = stack[top, 2]
            ohi = stack[top, 3]
            if jlo > jhi:
                continue
            mid = (jlo + jhi) // 2
            lo = olo if olo > m - 1 else m - 1
            hi = ohi if ohi < mid - 1 else mid - 1
            best = np.inf
            bi = lo
            for i in range(lo, hi + 1):
                dw = W[mid] - W[i]
                ds = S[mid] - S[i]
                c = Q[mid] - Q[i] - ds * ds / dw
                if c < 0.0:
                    c = 0.0
                v = prev[i] + c
                if v < best:
                    best = v
                    bi = i
            cur[mid] = best
            split[m, mid] = bi
            stack[top, 0] = mid + 1
            stack[top, 1] = jhi
            stack[top, 2] = bi
            stack[top, 3] = ohi
            top += 1
            stack[top, 0] = jlo
            stack[top, 1] = mid - 1
            stack[top, 2] = olo
            stack[top, 3] = bi
            top += 1
        for j in range(n + 1):
            prev[j] = cur[j]
    labels = np.empty(n, dtype=np.int64)
    j = n
    for m in range(k, 0, -1):
        i = split[m, j] if m > 1 else 0
        for t in range(i, j):
            labels[t] = m - 1
        j = i
    return labels


def _weighted_centers(x: np.ndarray, w: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    sw = np.bincount(labels, weights=w, minlength=k)
    sx = np.bincount(labels, weights=w * x, minlength=k)
    return sx / sw


def kmeans_1d_optimal(
    values,
    k: int,
    weights=None,
    *,
    max_unique: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact weighted 1-D k-means: ``(centers sorted ascending, assignment)``.

    Minimizes ``sum_i weights_i (values_i - centers[assignment_i])^2``.  The
    values are first compressed to their sorted distinct values with summed
    weights (exact: equal values share a cluster in some optimum), then the
    optimal contiguous partition is found by dynamic programming with a
    divide-and-conquer layer update, O(k n log n) for n distinct values.

    If there are more than ``max_unique`` distinct values, they are compressed
    further to a ``max_unique``-bin weighted histogram over [min, max] (each bin
    represented by the weighted mean of its values); the result is then optimal
    *for the compressed data* only, and points are assigned to their nearest
    center.  Returns ``min(k, n_distinct)`` centers; ``assignment`` has the
    shape of ``values`` (int64).  Points with weight 0 do not influence the
    centers and are assigned to their nearest center.
    """
    x = np.asarray(values, dtype=np.float64)
    shape = x.shape
    x = x.reshape(-1)
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    if weights is None:
        wt = np.ones_like(x)
    else:
        wt = np.broadcast_to(np.asarray(weights, dtype=np.float64), shape).reshape(-1)
        if (wt < 0).any() or not np.isfinite(wt).all():
            raise ValueError("weights must be finite and >= 0")
    if x.size == 0:
        return np.zeros(0), np.zeros(shape, dtype=np.int64)
    pos = wt > 0
    if not pos.any():  # nothing weighs anything: one center at the plain mean
        return np.array([float(x.mean())]), np.zeros(shape, dtype=np.int64)
    all_pos = bool(pos.all())
    xp = x if all_pos else x[pos]
    u, inv = np.unique(xp, return_inverse=True)
    uw = np.bincount(inv, weights=wt if all_pos else wt[pos], minlength=u.size)
    compressed = False
    if u.size > max_unique:
        compressed = True
        lo, hi = u[0], u[-1]
        b = np.minimum(((u - lo) * (max_unique / (hi - lo))).astype(np.int64), max_unique - 1)
        hw = np.bincount(b, weights=uw, minlength=max_unique)
        hx = np.bincount(b, weights=uw * u, minlength=max_unique)
        keep = hw > 0
        pts, pw = hx[keep] / hw[keep], hw[keep]
        pts = np.maximum.accumulate(pts)  # guard against rounding making it non-monotone
    else:
        pts, pw = u, uw
    kk = min(k, pts.size)
    if kk == pts.size:
        labels = np.arange(pts.size, dtype=np.int64)
    else:
        mu = float(np.dot(pw, pts) / pw.sum())
        labels = _kmeans_dp_kernel(pts - mu, pw, kk)
    centers = _weighted_centers(pts, pw, labels, kk)
    if compressed or not all_pos:
        assignment = _nearest_sorted(centers, x)
    else:
        assignment = labels[inv]
    return centers, assignment.reshape(shape)


def _nearest_sorted(centers: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centers`` for every x (ties to the lower)."""
    if centers.size == 1:
        return np.zeros(x.shape, dtype=np.int64)
    mids = (centers[:-1] + centers[1:]) / 2.0
    return np.searchsorted(mids, x, side="left").astype(np.int64)


def kmeans_cost(values, centers, assignment, weights=None) -> float:
    """Weighted SSE of a clustering (helper for tests and benchmarks)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    c = np.asarray(centers, dtype=np.float64)[np.asarray(assignment).reshape(-1)]
    wt = 1.0 if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    return float(np.sum(wt * (x - c) ** 2))


def _lut_one(v: np.ndarray, sw, bits: int, reserve_zero: bool, max_unique: int) -> tuple[np.ndarray, np.ndarray]:
    ncode = 1 << bits
    book = np.zeros(ncode, dtype=np.float64)
    codes = np.zeros(v.shape, dtype=np.uint8)
    if reserve_zero:
        nz = v != 0
        if nz.any():
            cen, asg = kmeans_1d_optimal(v[nz], ncode - 1, None if sw is None else sw[nz], max_unique=max_unique)
            book[1 : 1 + cen.size] = cen
            codes[nz] = (asg + 1).astype(np.uint8)
    else:
        cen, asg = kmeans_1d_optimal(v, ncode, sw, max_unique=max_unique)
        book[: cen.size] = cen
        codes[:] = asg.astype(np.uint8)
    return codes, book.astype(np.float32)


def lut_quantize(
    w,
    bits: int = 4,
    axis: int | None = None,
    *,
    reserve_zero: bool = True,
    sample_weight=None,
    max_unique: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """k-means look-up-table quantization: ``(codes uint8 shaped like w, codebook float32)``.

    ``axis=None``: one codebook of ``2^bits`` entries for the whole tensor;
    ``axis=int``: one codebook per slice along ``axis``, shape ``[C, 2^bits]``.
    With ``reserve_zero`` (default) code 0 is exact 0.0 and only the nonzero
    weights are clustered, into ``2^bits - 1`` optimal centers (codes 1..;
    sorted ascending), so zeros (N:M pruned weights) decode to exactly 0; a
    slice without zeros pays one unused code.  Without it, all values share
    ``2^bits`` centers and zeros are not guaranteed exact.  Unused codebook
    entries (fewer distinct values than codes) are 0.0.  ``sample_weight``
    (same shape as w, >= 0) weighs the squared error of each weight (e.g. a
    Hessian diagonal).  Clustering is exact 1-D k-means
    (``kmeans_1d_optimal``, see its note on > ``max_unique`` distinct values).
    """
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in [1, 8], got {bits}")
    if reserve_zero and bits < 2:
        raise ValueError("reserve_zero needs bits >= 2")
    w = np.asarray(w)
    w64 = w.astype(np.float64)
    sw = None if sample_weight is None else np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), w.shape)
    if axis is None:
        codes, book = _lut_one(w64.reshape(-1), None if sw is None else sw.reshape(-1), bits, reserve_zero, max_unique)
        return codes.reshape(w.shape), book
    w2, ax = _move_axis_first(w64, axis)
    sw2 = None if sw is None else _move_axis_first(sw, axis)[0]
    codes2 = np.zeros(w2.shape, dtype=np.uint8)
    books = np.zeros((w2.shape[0], 1 << bits), dtype=np.float32)
    for c in range(w2.shape[0]):
        codes2[c], books[c] = _lut_one(w2[c], None if sw2 is None else sw2[c], bits, reserve_zero, max_unique)
    moved_shape = (w.shape[ax],) + tuple(s for i, s in enumerate(w.shape) if i != ax)
    codes = np.moveaxis(codes2.reshape(moved_shape), 0, ax)
    return np.ascontiguousarray(codes), books


def lut_dequantize(codes, codebook, axis: int | None = None) -> np.ndarray:
    """Decode ``lut_quantize`` output: ``codebook[codes]`` (per slice along ``axis``), float32."""
    codes = np.asarray(codes)
    book = np.asarray(codebook, dtype=np.float32)
    if axis is None or book.ndim == 1:
        return book[codes]
    ax = int(axis) % codes.ndim
    c2 = np.moveaxis(codes, ax, 0).reshape(codes.shape[ax], -1)
    out = np.take_along_axis(book, c2.astype(np.intp), axis=1)
    moved_shape = (codes.shape[ax],) + tuple(s for i, s in enumerate(codes.shape) if i != ax)
    return np.ascontiguousarray(np.moveaxis(out.reshape(moved_shape), 0, ax))


# ---------------------------------------------------------------------------
# 4-bit packing, SQNR
# ---------------------------------------------------------------------------


def pack_4bit(codes) -> np.ndarray:
    """Pack 4-bit codes two per byte, first element in the low nibble (ONNX INT4/UINT4 layout).

    Accepts unsigned codes 0..15 or signed values -8..7 (stored two's
    complement).  The array is flattened in C order; an odd count leaves the
    last high nibble 0.  Returns ``ceil(n / 2)`` uint8.
    """
    c = np.asarray(codes).reshape(-1)
    if c.dtype.kind not in "iu":
        raise TypeError(f"codes must be integers, got {c.dtype}")
    ci = c.astype(np.int64)
    if c.size and (ci.min() < -8 or ci.max() > 15 or (ci.min() < 0 and ci.max() > 7)):
        raise ValueError("codes must be in 0..15 (unsigned) or -8..7 (signed)")
    nib = (ci & 0xF).astype(np.uint8)
    if nib.size % 2:
        nib = np.concatenate([nib, np.zeros(1, dtype=np.uint8)])
    return (nib[0::2] | (nib[1::2] << 4)).astype(np.uint8)


def unpack_4bit(packed, count: int | None = None, *, signed: bool = False) -> np.ndarray:
    """Inverse of ``pack_4bit``: ``count`` codes (default ``2 * len(packed)``).

    ``signed=True`` sign-extends the nibbles to int8 (-8..7); otherwise uint8 (0..15).
    """
    p = np.asarray(packed, dtype=np.uint8).reshape(-1)
    out = np.empty(p.size * 2, dtype=np.uint8)
    out[0::2] = p & 0xF
    out[1::2] = p >> 4
    if count is not None:
        count = int(count)
        if not 0 <= count <= out.size:
            raise ValueError(f"count {count} does not fit in {p.size} packed bytes")
        out = out[:count]
    if signed:
        return ((out.astype(np.int16) ^ 8) - 8).astype(np.int8)
    return out


def sqnr_db(reference, approx) -> float:
    """Signal-to-quantization-noise ratio, ``10 log10(sum ref^2 / sum (ref - approx)^2)`` dB.

    +inf when the approximation is exact; -inf when the reference is all zero but
    the approximation is not.
    """
    r = np.asarray(reference, dtype=np.float64)
    a = np.asarray(approx, dtype=np.float64)
    noise = float(np.sum((r - a) ** 2))
    sig = float(np.sum(r * r))
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)
