"""Tests of the numerical core of quantization (nmcompile.passes.quant_math)."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nmcompile.passes import quant_math as qm

# ---------------------------------------------------------------------------
# Reference: TensorRT entropy calibration, written as a plain slow loop from
# the published description ("8-bit Inference with TensorRT", GTC 2017), with
# MXNet / ONNX Runtime's smooth_distribution for the zeros.
# ---------------------------------------------------------------------------


def _ref_smooth(dist, eps=1e-4):
    n_zeros = sum(1 for v in dist if v == 0)
    n_nonzeros = len(dist) - n_zeros
    if n_nonzeros == 0:
        return None
    eps1 = eps * n_zeros / n_nonzeros
    out = [eps if v == 0 else v - eps1 for v in dist]
    if any(v <= 0 for v in out):
        return None
    return out


def ref_kl_curve(counts, num_levels=128, start_bin=128):
    counts = [float(c) for c in counts]
    nbins = len(counts)
    result = []
    for i in range(min(start_bin, nbins), nbins + 1):
        # reference distribution P: first i bins, outliers folded into the last one
        p = counts[:i]
        p[i - 1] += sum(counts[i:])
        # candidate Q: quantize the first i bins into num_levels levels ...
        level_of = [(j * num_levels) // i for j in range(i)]
        level_sum = [0.0] * num_levels
        level_nonzeros = [0] * num_levels
        for j in range(i):
            level_sum[level_of[j]] += counts[j]
            if counts[j] != 0:
                level_nonzeros[level_of[j]] += 1
        # ... and expand back to i bins, uniformly over the nonzero bins
        q = [0.0] * i
        for j in range(i):
            if counts[j] != 0:
                q[j] = level_sum[level_of[j]] / level_nonzeros[level_of[j]]
        p = _ref_smooth(p)
        q = _ref_smooth(q)
        if p is None or q is None:
            result.append(math.inf)
            continue
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            pn, qn = pj / sp, qj / sq
            kl += pn * math.log(pn / qn)
        result.append(kl)
    return result


def _long_tailed_counts(rng, nbins, n=200_000):
    x = np.abs(rng.laplace(size=n))
    x = np.concatenate([x, rng.uniform(10, 40, size=20)])  # a few far outliers
    counts, _ = np.histogram(x, bins=nbins, range=(0, x.max()))
    return counts, x.max() / nbins


def test_level_mapping_matches_pytorch_quantization_digitize():
    # pytorch-quantization maps bin j to np.digitize(j, linspace(0, i, L+1)) - 1;
    # we use exact integers floor(j * L / i).  They agree for every i we search.
    for i in range(128, 2049):
        a = np.digitize(np.arange(i), np.linspace(0, i, 129)) - 1
        b = (np.arange(i) * 128) // i
        assert np.array_equal(a, b), i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_curve_matches_slow_reference(seed):
    rng = np.random.default_rng(seed)
    nbins = 400
    shape = np.exp(-np.linspace(0, rng.uniform(3, 8), nbins))
    counts = rng.poisson(2000 * shape)
    counts[rng.integers(0, nbins, 30)] = 0  # some empty bins, including (maybe) inside the search
    counts[-1] = max(counts[-1], 1)
    cands, kl = qm.kl_divergence_curve(counts, 128, 128)
    ref = ref_kl_curve(counts, 128, 128)
    assert list(cands) == list(range(128, nbins + 1))
    np.testing.assert_allclose(kl, ref, rtol=1e-9, atol=1e-12)
    w = 0.01
    i_ref = 128 + int(np.argmin(ref))
    assert qm.kl_threshold(counts, w) == pytest.approx((i_ref + 0.5) * w, rel=0, abs=1e-12)
    assert qm.kl_threshold(counts, w, convention="edge") == pytest.approx(i_ref * w, rel=0, abs=1e-12)


def test_kl_curve_matches_reference_small_levels_and_sparse_histogram():
    rng = np.random.default_rng(7)
    counts = rng.poisson(3.0, size=90) * (rng.random(90) < 0.4)
    counts[-1] = 5
    cands, kl = qm.kl_divergence_curve(counts, 16, 20)
    np.testing.assert_allclose(kl, ref_kl_curve(counts, 16, 20), rtol=1e-9, atol=1e-12)


def test_kl_hand_checked_tiny_case():
    # 8 bins, 2 levels, search i = 2..8.
    counts = [100, 50, 0, 0, 0, 0, 0, 1]
    cands, kl = qm.kl_divergence_curve(counts, num_quant_levels=2, start_bin=2)
    assert list(cands) == [2, 3, 4, 5, 6, 7, 8]
    # i = 2: P = [100, 51] (the outlier folded in), Q = [100, 50] (each level one bin); no zeros.
    p = np.array([100, 51]) / 151
    q = np.array([100, 50]) / 150
    assert kl[0] == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-12)
    assert kl[0] == pytest.approx(4.36e-5, rel=1e-2)
    # i = 8: level 0 = bins 0..3 -> 150 spread over the 2 nonzero bins: Q = [75, 75, 0, ..., 0, 1].
    # Up to the 1e-4 smoothing of the 5 zero bins, KL = (100 ln(100/75) + 50 ln(50/75)) / 151.
    assert kl[-1] == pytest.approx((100 * math.log(100 / 75) + 50 * math.log(50 / 75)) / 151, rel=1e-3)
    # Clipping at 2 bins wins: TensorRT's threshold (i + 0.5) * width.
    assert int(np.argmin(kl)) == 0
    assert qm.kl_threshold(counts, 0.5, 2, 2) == pytest.approx(1.25)
    assert qm.kl_threshold(counts, 0.5, 2, 2, convention="edge") == pytest.approx(1.0)


def test_kl_uniform_histogram_keeps_everything():
    counts = [2, 2, 2, 2]
    cands, kl = qm.kl_divergence_curve(counts, 2, 2)
    assert kl[-1] == 0.0 and kl[0] > 0.1 and kl[1] > 0
    assert kl[0] == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)
    assert qm.kl_threshold(counts, 1.0, 2, 2) == pytest.approx(4.5)


def test_kl_differs_from_minmax_on_long_tail():
    rng = np.random.default_rng(3)
    counts, w = _long_tailed_counts(rng, 2048)
    t_kl = qm.kl_threshold(counts, w)
    t_max = 2048 * w
    assert t_kl < 0.5 * t_max
    assert t_kl > 128 * w  # within the search range, and not degenerate
    # and the histogram helper sees the same thing
    h = qm.StreamingHistogram().update(np.abs(rng.laplace(size=100_000))).update([35.0])
    assert h.kl_threshold() < 0.5 * qm.minmax_threshold(h)


def test_kl_edge_cases():
    assert qm.kl_threshold([], 1.0) == 0.0
    assert qm.kl_threshold([0, 0, 0], 1.0) == 0.0
    # fewer bins than start_bin: the only candidate is keeping everything
    assert qm.kl_threshold([5, 3, 1], 1.0) == pytest.approx(3.5)
    assert qm.kl_threshold([5, 3, 1], 1.0, convention="edge") == pytest.approx(3.0)
    with pytest.raises(ValueError):
        qm.kl_threshold([1, 2], 1.0, convention="middle")
    # suppress_zero_bin replaces the first count with the second one
    c = np.r_[10_000, np.full(300, 10)]
    _, a = qm.kl_divergence_curve(c, 16, 16, suppress_zero_bin=True)
    _, b = qm.kl_divergence_curve(np.r_[10, c[1:]], 16, 16)
    np.testing.assert_allclose(a, b)


def _kl_histogram(kind, rng, nbins):
    """Histogram families the vectorized KL search has to get right."""
    if kind == "dense":  # no empty bin below the tail: no smoothing until the outliers
        c = rng.poisson(5000 * np.exp(-np.linspace(0, 6, nbins))) + 1
    elif kind == "sparse-tail":  # long-tailed activations: empty bins past the bulk
        c = rng.poisson(3000 * np.exp(-np.linspace(0, 14, nbins)))
    elif kind == "few-values":  # an input with a handful of distinct values (image pixels)
        c = np.zeros(nbins)
        c[np.sort(rng.choice(nbins, 17, replace=False))] = rng.integers(100, 5000, 17)
    elif kind == "relu-spike":  # exact zeros after a ReLU: one huge first bin
        c = rng.poisson(800 * np.exp(-np.linspace(0, 9, nbins)))
        c[0] = 10**6
    elif kind == "fractional":  # non-integer weights below the smoothing epsilon: the direct path
        c = (3e-4 + rng.random(nbins)) * (rng.random(nbins) < 0.3)
    else:  # ones and zeros only: epsilon / count as large as it gets for counts
        c = (rng.random(nbins) < 0.05).astype(float)
    c = np.asarray(c, dtype=float)
    c[-1] = max(c[-1], 1.0)
    return c


@pytest.mark.parametrize("kind", ["dense", "sparse-tail", "few-values", "relu-spike", "fractional", "binary"])
@pytest.mark.parametrize("suppress", [False, True])
def test_kl_curve_matches_slow_reference_on_histogram_families(kind, suppress):
    # The curve is computed in O(candidates x levels) with per-level tables and
    # series in the smoothing epsilon: it must equal the bin-by-bin definition.
    rng = np.random.default_rng(sum(map(ord, kind)))  # a fixed seed per family
    c = _kl_histogram(kind, rng, 300)
    ref_counts = c.copy()
    if suppress:
        ref_counts[0] = ref_counts[1]
    cands, kl = qm.kl_divergence_curve(c, 128, 128, suppress_zero_bin=suppress)
    ref = np.array(ref_kl_curve(ref_counts, 128, 128))
    assert np.array_equal(np.isfinite(kl), np.isfinite(ref))
    fin = np.isfinite(ref)
    assert fin.any()
    np.testing.assert_allclose(kl[fin], ref[fin], rtol=1e-9, atol=1e-12)
    assert int(np.argmin(kl)) == int(np.argmin(ref))


@pytest.mark.parametrize("kind", ["dense", "sparse-tail", "few-values", "relu-spike", "binary"])
def test_kl_fast_path_equals_direct_evaluation_at_2048_bins(kind):
    # TensorRT's size (2048 bins, 128 levels) is too slow for the pure-Python
    # reference: compare the table/series path with the direct one-log-per-level
    # evaluation (itself checked against the reference above, via "fractional").
    rng = np.random.default_rng(11)
    c = _kl_histogram(kind, rng, 2048)
    cands, fast = qm.kl_divergence_curve(c)
    direct = np.full(cands.size, np.inf)
    qm._kl_curve_direct(c, cands, 128, qm._SMOOTH_EPS, direct)
    assert np.array_equal(np.isfinite(fast), np.isfinite(direct))
    fin = np.isfinite(fast)
    np.testing.assert_allclose(fast[fin], direct[fin], rtol=1e-9, atol=1e-13)
    assert int(np.argmin(fast)) == int(np.argmin(direct))


def test_int8_calibration_math_does_not_load_numba():
    # numba costs ~0.4 s and ~60 MB to import and ~0.2 s per cached kernel: the
    # histogram, KL / percentile / MSE thresholds and int8 weights are numpy only.
    code = (
        "import sys, numpy as np\n"
        "from nmcompile.passes import quant_math as qm\n"
        "x = np.random.default_rng(0).standard_t(3, 100000).astype(np.float32)\n"
        "h = qm.StreamingHistogram().update(x).update(2 * x)\n"
        "h.kl_threshold(suppress_zero_bin=True); qm.choose_threshold_auto(h, methods=('kl', 'minmax', 'percentile', 'mse'))\n"
        "qm.quantize_weight_per_channel(x.reshape(100, -1))\n"
        "assert 'numba' not in sys.modules, 'numba was imported'\n"
        "qm.kmeans_1d_optimal(x[:2000], 15)\n"  # the k-means DP compiles it on first use
        "print('numba' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


# ---------------------------------------------------------------------------
# Streaming histogram
# ---------------------------------------------------------------------------


def _batches(rng, scales, n=20_000):
    return [rng.standard_normal(n).astype(np.float32) * s for s in scales]


def test_streamed_histogram_equals_all_at_once_with_growing_ranges():
    rng = np.random.default_rng(0)
    batches = [np.zeros(100, np.float32)] + _batches(rng, [0.1, 0.05, 1.0, 3.0, 2.0, 50.0, 49.0, 1e4, 1.0])
    batches.insert(3, np.array([np.nan, np.inf, -np.inf, 0.5], np.float32))
    h = qm.StreamingHistogram(2048)
    ranges = []
    for b in batches:
        h.update(b)
        ranges.append(h.range_max)
    assert h.num_growths >= 3
    # every growth multiplies the range by a power of two
    r = [x for x in ranges if x > 0]
    for a, b in zip(r, r[1:]):
        f = b / a
        assert f == 2.0 ** round(math.log2(f))
    allv = np.concatenate(batches)
    once = qm.StreamingHistogram(2048, range_max=h.range_max).update(allv)
    assert once.num_growths == 0
    np.testing.assert_array_equal(h.counts, once.counts)
    finite = allv[np.isfinite(allv)].astype(np.float64)
    ref, _ = np.histogram(np.abs(finite), bins=2048, range=(0, h.range_max))
    np.testing.assert_array_equal(h.counts, ref)
    assert h.total == finite.size and h.counts.sum() == finite.size
    assert h.sumsq == pytest.approx(float(np.sum(finite**2)), rel=1e-12)
    assert h.nonfinite_count == 3
    assert h.max_abs == np.abs(finite).max()
    assert h.min == finite.min() and h.max == finite.max()
    assert h.max_abs < h.range_max <= 2 * h.max_abs * (1 + 2**-20)
    np.testing.assert_allclose(h.edges[[0, -1]], [0, h.range_max])
    assert h.bin_width == h.range_max / 2048


def test_streamed_histogram_any_batching_equals_all_at_once_with_its_final_range():
    # The final range depends on the first batch (its max sets the first range),
    # but whatever the batching, the counts equal the all-at-once histogram over
    # that final range; and the same batches always give the same histogram.
    rng = np.random.default_rng(1)
    x = rng.standard_normal(50_000) * np.repeat([1.0, 4.0, 0.5, 100.0, 3.0], 10_000)
    a = qm.StreamingHistogram(512, chunk_size=777).update(x)
    b = qm.StreamingHistogram(512).update(x[:10_000]).update(x[10_000:30_000]).update(x[30_000:])
    for h in (a, b):
        once = qm.StreamingHistogram(512, range_max=h.range_max).update(x)
        np.testing.assert_array_equal(h.counts, once.counts)
    b2 = qm.StreamingHistogram(512).update(x[:10_000]).update(x[10_000:30_000]).update(x[30_000:])
    np.testing.assert_array_equal(b.counts, b2.counts)
    assert b.range_max == b2.range_max


def test_two_pass_histogram_spans_all_bins():
    rng = np.random.default_rng(4)
    batches = _batches(rng, [1.0, 2.0, 8.0], n=5000)
    m = max(float(np.abs(b).max()) for b in batches)
    h = qm.StreamingHistogram.from_max_abs(m, 256)
    for b in batches:
        h.update(b)
    assert h.num_growths == 0 and h.counts[-1] > 0
    assert m < h.range_max <= m * (1 + 2**-19)
    ref, _ = np.histogram(np.abs(np.concatenate(batches)).astype(np.float64), 256, range=(0, h.range_max))
    np.testing.assert_array_equal(h.counts, ref)
    # the same range as a streamed histogram whose first batch holds the max
    first = qm.StreamingHistogram(256).update(np.concatenate(batches[::-1]))
    assert first.range_max == h.range_max


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-30, 30), st.integers(1, 400), st.integers(0, 2**31 - 1)),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from([1, 7, 64, 2048]),
)
def test_streamed_histogram_property(specs, nbins):
    batches = []
    for log2s, n, seed in specs:
        rng = np.random.default_rng(seed)
        batches.append(rng.standard_normal(n) * 2.0**log2s)
    h = qm.StreamingHistogram(nbins)
    for b in batches:
        h.update(b)
    once = qm.StreamingHistogram(nbins, range_max=h.range_max).update(np.concatenate(batches))
    np.testing.assert_array_equal(h.counts, once.counts)
    assert h.counts.sum() == sum(b.size for b in batches)


def test_histogram_integer_input_and_bad_dtype():
    h = qm.StreamingHistogram(16).update(np.array([-3, 0, 1, 2], dtype=np.int32))
    assert h.max_abs == 3 and h.min == -3 and h.max == 2 and h.total == 4
    with pytest.raises(TypeError):
        qm.StreamingHistogram().update(np.array(["a"]))
    with pytest.raises(ValueError):
        qm.StreamingHistogram(0)


def test_percentile_and_minmax_thresholds():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(200_000)
    h = qm.StreamingHistogram().update(x)
    assert qm.minmax_threshold(h) == np.abs(x).max() == qm.minmax_threshold(x)
    for pct in (50.0, 99.0, 99.99):
        t = qm.percentile_threshold(h, pct)
        exact = np.percentile(np.abs(x), pct)
        assert exact <= t + 1e-12  # never clips more than (100 - pct)%
        assert t - exact <= h.bin_width + 1e-12
        assert np.mean(np.abs(x) <= t) >= pct / 100
    assert qm.percentile_threshold(h, 100.0) == h.max_abs
    assert qm.percentile_threshold(([0, 10, 0, 10], 0.5), 50) == 1.0
    with pytest.raises(ValueError):
        qm.percentile_threshold(h, 101)


# ---------------------------------------------------------------------------
# Errors and automatic choice
# ---------------------------------------------------------------------------


def test_quantization_error_symmetric_and_asymmetric():
    x = np.array([-1.0, -0.26, 0.0, 0.5, 2.0])
    s = 1.0 / 127
    expect = np.clip(np.rint(x / s), -127, 127) * s
    assert qm.quantization_error(x, 1.0) == pytest.approx(np.mean((expect - x) ** 2))
    assert qm.quantization_error(x, 0.0) == pytest.approx(np.mean(x**2))
    # 2-bit symmetric: levels {-1, 0, 1} * T
    assert qm.quantization_error([0.4, 0.6, 3.0], 1.0, bits=2) == pytest.approx((0.16 + 0.16 + 4.0) / 3)
    # asymmetric uint8 over [0, 2.55]: scale 0.01, zero point 0
    y = np.array([0.0, 0.014, 1.0, 3.0])
    assert qm.quantization_error(y, (0.0, 2.55), symmetric=False) == pytest.approx(
        np.mean(np.array([0, 0.004, 0, 0.45]) ** 2)
    )


def test_histogram_error_estimate_tracks_sample_error():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(400_000)
    h = qm.StreamingHistogram(2048).update(x)
    for t in (1.0, 2.5, 4.0, h.max_abs):
        est = qm.histogram_quantization_error(h, t)
        true = qm.quantization_error(x, t)
        assert est == pytest.approx(true, rel=0.05)
    tm = qm.mse_threshold(h)
    assert qm.quantization_error(x, tm) <= 1.02 * min(qm.quantization_error(x, t) for t in np.linspace(2, h.max_abs, 40))


def test_choose_threshold_auto():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.laplace(size=100_000), [60.0, -45.0]])
    h = qm.StreamingHistogram().update(x)
    res = qm.choose_threshold_auto(h, samples=x)
    assert res.error_source == "samples"
    assert set(res.thresholds) == {"kl", "minmax", "percentile99.9", "percentile99.99", "percentile99.999"}
    assert res.errors[res.method] == min(res.errors.values())
    assert res.threshold == res.thresholds[res.method]
    assert res.method != "minmax" and res.threshold < h.max_abs
    assert res.thresholds["kl"] < 0.5 * h.max_abs
    for k, t in res.thresholds.items():
        assert res.errors[k] == pytest.approx(qm.quantization_error(x, t))
    res2 = qm.choose_threshold_auto(h, methods=("kl", "minmax", "mse"))
    assert res2.error_source == "histogram" and res2.method == "mse"
    res3 = qm.choose_threshold_auto((h.counts, h.bin_width), methods=("minmax", "kl"))
    for k, t in res3.thresholds.items():
        assert res3.errors[k] == pytest.approx(qm.histogram_quantization_error(h, t))
    assert res3.errors[res3.method] == min(res3.errors.values())
    with pytest.raises(ValueError):
        qm.choose_threshold_auto(h, methods=("bogus",))


# ---------------------------------------------------------------------------
# Per-channel int8
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_int8_keeps_zeros(axis):
    rng = np.random.default_rng(8)
    w = rng.standard_normal((6, 8, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    ch = [slice(None)] * 3
    ch[axis] = 2
    w[tuple(ch)] = 0.0  # an all-zero channel
    q, s = qm.quantize_weight_per_channel(w, axis)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (w.shape[axis],)
    assert np.all(q[w == 0] == 0)
    assert s[2] == 1.0
    assert np.abs(q).max() == 127
    wm = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    qm_ = np.moveaxis(q, axis, 0).reshape(w.shape[axis], -1)
    for c in range(wm.shape[0]):
        if np.any(wm[c]):
            assert s[c] == np.float32(np.abs(wm[c]).max() / 127)
            assert np.abs(qm_[c]).max() == 127
    deq = qm.dequantize_per_channel(q, s, axis)
    sb = s.reshape([-1 if i == axis % 3 else 1 for i in range(3)])
    assert np.all(np.abs(deq - w) <= sb / 2 * (1 + 1e-5))
    assert np.all(deq[w == 0] == 0)


def test_per_channel_4bit_range():
    w = np.array([[1.0, -0.6, 0.0, 0.26]])
    q, s = qm.quantize_weight_per_channel(w, 0, bits=4)
    assert q.tolist() == [[7, -4, 0, 2]]
    assert s[0] == np.float32(1 / 7)


# ---------------------------------------------------------------------------
# Logarithmic quantization
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_log_quantize_decodes_to_signed_powers_of_two_and_keeps_zeros(bits):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((5, 40)) * np.exp(rng.uniform(-4, 2, (5, 1)))).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0.0
    w[3] = 0.0
    codes, scale, table = qm.log_quantize(w, bits, axis=0)
    assert codes.dtype == np.uint8 and codes.shape == w.shape and codes.max() < 2**bits
    assert table.shape == (2**bits,) and table[0] == 0 and table[2 ** (bits - 1)] == 0
    assert scale[3] == 1.0
    deq = qm.log_dequantize(codes, scale, table, axis=0)
    assert np.all(codes[w == 0] == 0) and np.all(deq[w == 0] == 0)
    # each channel's largest magnitude is exact
    for c in range(5):
        if np.any(w[c]):
            j = np.argmax(np.abs(w[c]))
            assert deq[c, j] == w[c, j]
    # every decoded value is 0 or +-scale * 2^-e, with e in [0, 2^(b-1) - 2]
    K = 2 ** (bits - 1) - 1
    rel = np.abs(deq.astype(np.float64)) / scale[:, None]
    nzr = rel[rel > 0]
    e = -np.log2(nzr)
    assert np.allclose(e, np.round(e)) and e.min() >= 0 and e.max() <= K - 1
    assert np.all(np.sign(deq[deq != 0]) == np.sign(w[deq != 0]))
    # nearest level (brute force over the channel's table)
    for c in range(5):
        lv = table.astype(np.float64) * float(scale[c])
        best = np.min(np.abs(w[c][:, None].astype(np.float64) - lv[None, :]), axis=1)
        np.testing.assert_allclose(np.abs(w[c] - deq[c]), best, rtol=1e-6, atol=1e-30)


def test_log_quantize_per_tensor_and_table_layout():
    table = qm.log_decode_table(4)
    assert table.tolist() == [0, 1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625] + [
        -0.0,
        -1,
        -0.5,
        -0.25,
        -0.125,
        -0.0625,
        -0.03125,
        -0.015625,
    ]
    w = np.array([0.0, -0.0, 8.0, -4.0, 3.0, 2.9, 0.05, -0.2])
    codes, scale, table = qm.log_quantize(w, 4, axis=None)
    assert scale.shape == () and scale == 8.0
    # 3.0 is exactly between 2 and 4 -> lower; 2.9 -> 2; 0.05 is below half of 8/64 -> 0;
    # -0.2 is nearer to -8/32 than to -8/64
    assert codes.tolist() == [0, 0, 1, 8 + 2, 3, 3, 0, 8 + 6]
    np.testing.assert_array_equal(qm.log_dequantize(codes, scale, table, None), [0, 0, 8, -4, 2, 2, 0, -0.25])


# ---------------------------------------------------------------------------
# Exact 1-D k-means and LUT
# ---------------------------------------------------------------------------


def _brute_force_kmeans_cost(values, weights, k):
    u, inv = np.unique(values, return_inverse=True)
    uw = np.bincount(inv, weights=weights)
    n = u.size
    k = min(k, n)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        cost = 0.0
        for lo, hi in zip(b, b[1:]):
            x, w = u[lo:hi], uw[lo:hi]
            m = np.dot(w, x) / w.sum()
            cost += float(np.dot(w, (x - m) ** 2))
        best = min(best, cost)
    return best


def _lloyd(x, w, k, rng, iters=100):
    c = np.sort(rng.choice(x, size=k, replace=False))
    for _ in range(iters):
        a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        for j in range(k):
            if np.any(a == j):
                c[j] = np.dot(w[a == j], x[a == j]) / w[a == j].sum()
    a = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
    return float(np.sum(w * (x - c[a]) ** 2))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(-20, 20), min_size=1, max_size=10),
    st.integers(1, 4),
    st.booleans(),
    st.integers(0, 2**31 - 1),
)
def test_kmeans_dp_equals_brute_force(ints, k, weighted, seed):
    rng = np.random.default_rng(seed)
    x = np.array(ints, dtype=np.float64) * 0.37
    w = rng.uniform(0.1, 3.0, x.size) if weighted else np.ones(x.size)
    centers, asg = qm.kmeans_1d_optimal(x, k, w if weighted else None)
    assert centers.size == min(k, np.unique(x).size)
    assert np.all(np.diff(centers) > 0)
    cost = qm.kmeans_cost(x, centers, asg, w)
    ref = _brute_force_kmeans_cost(x, w, k)
    assert cost == pytest.approx(ref, rel=1e-9, abs=1e-9)


def _quadratic_dp_cost(x, w, k):
    """Plain O(k n^2) DP over sorted distinct values (no monotonicity shortcut)."""
    u, inv = np.unique(x, return_inverse=True)
    uw = np.bincount(inv, weights=w)
    n = u.size
    W = np.r_[0, np.cumsum(uw)]
    S = np.r_[0, np.cumsum(uw * u)]
    Q = np.r_[0, np.cumsum(uw * u * u)]
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = Q[j] - Q[i] - (S[j] - S[i]) ** 2 / (W[j] - W[i])
    cost = np.where(j > i, np.maximum(cost, 0), np.inf)
    D = cost[0].copy()
    for _ in range(2, min(k, n) + 1):
        D = np.min(D[:, None] + cost, axis=0)
    return D[n]


def test_kmeans_dp_equals_quadratic_dp_on_larger_inputs():
    rng = np.random.default_rng(13)
    for trial in range(5):
        n = int(rng.integers(100, 250))
        x = np.round(rng.standard_t(3, n), 2)  # heavy tail, some duplicates
        w = rng.uniform(0.2, 2.0, n)
        k = int(rng.integers(2, 16))
        centers, asg = qm.kmeans_1d_optimal(x, k, w)
        assert qm.kmeans_cost(x, centers, asg, w) == pytest.approx(_quadratic_dp_cost(x, w, k), rel=1e-9, abs=1e-12)


def test_kmeans_dp_never_worse_than_lloyd():
    rng = np.random.default_rng(11)
    for trial in range(6):
        n = int(rng.integers(50, 400))
        x = np.concatenate([rng.standard_normal(n), rng.standard_normal(n // 3) * 0.1 + 3])
        w = rng.uniform(0.5, 2.0, x.size)
        k = int(rng.integers(2, 12))
        centers, asg = qm.kmeans_1d_optimal(x, k, w)
        cost = qm.kmeans_cost(x, centers, asg, w)
        for _ in range(3):
            assert cost <= _lloyd(x, w, k, rng) * (1 + 1e-12) + 1e-12
        # the optimum assigns every point to its nearest center
        nearest = np.min(np.abs(x[:, None] - centers[None, :]), axis=1)
        np.testing.assert_allclose(np.abs(x - centers[asg]), nearest, atol=1e-12)


def test_kmeans_compressed_path_is_sane():
    rng = np.random.default_rng(12)
    x = rng.standard_normal(5000)
    c_full, a_full = qm.kmeans_1d_optimal(x, 8)
    c_cmp, a_cmp = qm.kmeans_1d_optimal(x, 8, max_unique=500)
    full = qm.kmeans_cost(x, c_full, a_full)
    cmp_ = qm.kmeans_cost(x, c_cmp, a_cmp)
    assert full <= cmp_ <= full * 1.01
    assert np.all(np.diff(c_cmp) > 0)


def test_kmeans_edge_cases():
    c, a = qm.kmeans_1d_optimal([3.0, 3.0, 1.0], 5)
    assert c.tolist() == [1.0, 3.0] and a.tolist() == [1, 1, 0]
    c, a = qm.kmeans_1d_optimal(np.zeros((2, 3)), 4)
    assert c.tolist() == [0.0] and a.shape == (2, 3)
    c, a = qm.kmeans_1d_optimal([1.0, 2.0, 10.0], 1, weights=[1, 1, 0])
    assert c.tolist() == [1.5] and a.tolist() == [0, 0, 0]
    c, a = qm.kmeans_1d_optimal([], 3)
    assert c.size == 0 and a.size == 0
    with pytest.raises(ValueError):
        qm.kmeans_1d_optimal([1.0, np.nan], 2)
    with pytest.raises(ValueError):
        qm.kmeans_1d_optimal([1.0], 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lut_quantize_per_tensor_keeps_zeros_and_is_optimal(bits):
    rng = np.random.default_rng(20 + bits)
    w = rng.standard_normal((32, 24)).astype(np.float32)
    w[:, ::2] = 0.0  # 2:4-like zeros
    codes, book = qm.lut_quantize(w, bits)
    assert codes.dtype == np.uint8 and codes.shape == w.shape and book.shape == (2**bits,)
    assert book[0] == 0.0 and np.all(np.diff(book[1:]) > 0)
    deq = qm.lut_dequantize(codes, book)
    np.testing.assert_array_equal(deq, book[codes])
    assert np.all(codes[w == 0] == 0) and np.all(deq[w == 0] == 0)
    assert np.all(codes[w != 0] > 0)
    nz = w[w != 0].astype(np.float64)
    c, a = qm.kmeans_1d_optimal(nz, 2**bits - 1)
    np.testing.assert_allclose(book[1:], c.astype(np.float32))
    # beats symmetric uniform quantization with the same number of levels (0 and 2^b - 1 nonzero)
    lut_sse = np.sum((deq - w).astype(np.float64) ** 2)
    q, s = qm.quantize_weight_per_channel(w.reshape(1, -1), 0, bits=bits)
    uni_sse = np.sum((qm.dequantize_per_channel(q, s, 0).reshape(w.shape) - w).astype(np.float64) ** 2)
    assert lut_sse <= uni_sse


def test_lut_quantize_per_channel():
    rng = np.random.default_rng(30)
    w = rng.standard_normal((4, 5, 50)).astype(np.float32) * np.array([1, 10, 0.1, 3], np.float32).reshape(4, 1, 1)
    w[rng.random(w.shape) < 0.5] = 0.0
    w[2] = 0.0
    codes, books = qm.lut_quantize(w, 3, axis=0)
    assert books.shape == (4, 8) and codes.shape == w.shape
    deq = qm.lut_dequantize(codes, books, axis=0)
    for c in range(4):
        np.testing.assert_array_equal(deq[c], books[c][codes[c]])
    assert np.all(deq[w == 0] == 0) and np.all(books[:, 0] == 0)
    assert np.all(books[2] == 0)
    # axis other than 0 gives the same as moving that axis first
    codes1, books1 = qm.lut_quantize(np.moveaxis(w, 0, 2), 3, axis=2)
    np.testing.assert_array_equal(books1, books)
    np.testing.assert_array_equal(np.moveaxis(codes1, 2, 0), codes)
    np.testing.assert_array_equal(qm.lut_dequantize(codes1, books1, axis=2), np.moveaxis(deq, 0, 2))


def test_lut_few_distinct_values_is_lossless_and_weights_matter():
    w = np.array([0.0, 1.0, 2.0, 2.0, -1.0, 0.0])
    codes, book = qm.lut_quantize(w, 2)
    np.testing.assert_array_equal(qm.lut_dequantize(codes, book), w)
    x = np.array([1.0, 2.0, 3.0, 10.0])
    _, b_plain = qm.lut_quantize(x, 2, reserve_zero=False)
    assert b_plain.tolist() == [1, 2, 3, 10]
    _, b_w = qm.lut_quantize(x, 1, reserve_zero=False, sample_weight=[1, 1, 1, 100])
    assert b_w[1] == 10.0 and b_w[0] == 2.0


# ---------------------------------------------------------------------------
# 4-bit packing and SQNR
# ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 15), max_size=41))
def test_pack_unpack_roundtrip(vals):
    codes = np.array(vals, dtype=np.uint8)
    packed = qm.pack_4bit(codes)
    assert packed.dtype == np.uint8 and packed.size == (codes.size + 1) // 2
    np.testing.assert_array_equal(qm.unpack_4bit(packed, codes.size), codes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-8, 7), max_size=41))
def test_pack_unpack_signed_roundtrip(vals):
    codes = np.array(vals, dtype=np.int8)
    np.testing.assert_array_equal(qm.unpack_4bit(qm.pack_4bit(codes), codes.size, signed=True), codes)


def test_pack_layout_matches_onnx_int4():
    from onnx import TensorProto, helper, numpy_helper

    assert qm.pack_4bit(np.array([1, 2, 3], np.uint8)).tolist() == [0x21, 0x03]
    rng = np.random.default_rng(0)
    u = rng.integers(0, 16, size=(3, 7)).astype(np.uint8)
    t = helper.make_tensor("u", TensorProto.UINT4, u.shape, vals=qm.pack_4bit(u).tobytes(), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.uint8), u)
    s = rng.integers(-8, 8, size=(5, 3)).astype(np.int8)
    t = helper.make_tensor("s", TensorProto.INT4, s.shape, vals=qm.pack_4bit(s).tobytes(), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t).astype(np.int8), s)
    with pytest.raises(ValueError):
        qm.pack_4bit(np.array([16], np.uint8))
    with pytest.raises(ValueError):
        qm.unpack_4bit(np.zeros(2, np.uint8), 5)


def test_sqnr_db():
    r = np.array([1.0, -1.0, 2.0])
    assert qm.sqnr_db(r, r) == math.inf
    assert qm.sqnr_db(r, r + np.array([0.1, 0, 0])) == pytest.approx(10 * math.log10(6 / 0.01))
    assert qm.sqnr_db(np.zeros(3), np.ones(3)) == -math.inf


# ---------------------------------------------------------------------------
# GPTQ rounding
# ---------------------------------------------------------------------------


def _ref_gptq(w, s, H, damp=0.01, qmax=127):
    """Unblocked GPTQ written from the OBQ formulas: quantize column i, spread its error
    over the later columns with the inverse Hessian of the columns still free, then
    remove column i from that inverse (a rank-one downdate)."""
    W = w.astype(np.float64).copy()
    O, K = W.shape
    Hd = H + damp * np.mean(np.diag(H)) * np.eye(K)
    Hinv = np.linalg.inv(Hd)
    keep = w != 0
    Q = np.zeros((O, K))
    for i in range(K):
        q = np.where(keep[:, i], np.clip(np.rint(W[:, i] / s), -qmax, qmax), 0.0)
        err = (W[:, i] - q * s) / Hinv[i, i]
        W[:, i:] -= np.outer(err, Hinv[i, i:])
        Hinv = Hinv - np.outer(Hinv[:, i], Hinv[i, :]) / Hinv[i, i]
        Q[:, i] = q
    return Q


def _correlated_layer(rng, O=24, K=48, N=600):
    mix = rng.standard_normal((K, K)) * 0.4 + np.eye(K)
    X = rng.standard_normal((N, K)) @ mix  # correlated inputs (rows are samples)
    return rng.standard_normal((O, K)), X


@pytest.mark.parametrize("bits", [8, 4])
def test_gptq_round_lowers_layer_output_error(bits):
    """Compensated rounding: lower ||(W - W_hat) X||^2 than nearest rounding, computed directly on X."""
    rng = np.random.default_rng(1)
    w, X = _correlated_layer(rng)
    H = X.T @ X
    q_near, scale = qm.quantize_weight_per_channel(w, axis=0, bits=bits)
    s = scale.astype(np.float64)
    q, e_new, e_old = qm.gptq_round(w, s, H, bits=bits, return_errors=True)
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q).max() <= (1 << (bits - 1)) - 1

    def out_err(codes):
        return float(np.sum(((w - codes.astype(np.float64) * s[:, None]) @ X.T) ** 2))

    assert out_err(q) < 0.75 * out_err(q_near)
    assert e_new.sum() == pytest.approx(out_err(q), rel=1e-9) and e_old.sum() == pytest.approx(out_err(q_near), rel=1e-9)
    # rows are independent: a stack of two layers' rows gets each layer's codes
    q2 = qm.gptq_round(np.vstack([w, w[::-1]]), np.concatenate([s, s[::-1]]), H, bits=bits)
    np.testing.assert_array_equal(q2, np.vstack([q, q[::-1]]))
    # the blocked, Cholesky-factored sweep is the textbook algorithm
    np.testing.assert_array_equal(q, _ref_gptq(w, s, H, qmax=(1 << (bits - 1)) - 1).astype(np.int8))
    np.testing.assert_array_equal(q, qm.gptq_round(w, s, H, bits=bits, blocksize=7))  # block size: same result
    np.testing.assert_array_equal(q, qm.gptq_round(w, s, H, bits=bits))  # deterministic
    wf = np.asfortranarray(w)  # e.g. a MatMul weight [K, N] seen as rows: a transposed view
    np.testing.assert_array_equal(q, qm.gptq_round(wf, s, H, bits=bits))
    np.testing.assert_array_equal(wf, w)  # the input is left alone


def test_gptq_round_keeps_zeros_and_never_worsens_a_row():
    rng = np.random.default_rng(2)
    w, X = _correlated_layer(rng, O=16, K=32)
    w.reshape(16, 8, 4)[:, :, :2] = 0.0  # 2:4 along K
    H = X.T @ X
    _, scale = qm.quantize_weight_per_channel(w, axis=0)
    s = scale.astype(np.float64)
    q = qm.gptq_round(w, s, H)
    assert np.all(q[w == 0] == 0)  # pruned weights stay exactly zero
    near = np.clip(np.rint(w / s[:, None]), -127, 127)
    for r in range(16):
        d_new = w[r] - q[r] * s[r]
        d_old = w[r] - near[r] * s[r]
        assert d_new @ H @ d_new <= d_old @ H @ d_old + 1e-12
    # a zero Gram (no signal): nothing to compensate, plain rounding
    np.testing.assert_array_equal(qm.gptq_round(w, s, np.zeros((32, 32))), near.astype(np.int8))
    with pytest.raises(ValueError):
        qm.gptq_round(w, s, H[:5, :5])
