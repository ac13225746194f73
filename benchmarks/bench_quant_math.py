"""Measured figures for nmcompile.passes.quant_math, side by side with the peers.

    python benchmarks/bench_quant_math.py [--quick]

Prints:
  1. |x| histogram streaming throughput (values/s): ours vs np.histogram over a
     known fixed range (no streaming, a lower bound on the work) vs ONNX
     Runtime's HistogramCollector.collect_absolute_value (its streaming path).
  2. KL (entropy) threshold search on a 2048-bin histogram: ours vs ONNX
     Runtime's HistogramCollector.get_entropy_threshold on its own 2048-bin
     histogram of the same data, with the thresholds and the int8 fake-quant
     SQNR each one gives on the data.  ORT at its quantize_static defaults
     (128 bins, 128 levels) is shown too.
  3. k-means LUT at 4 bits for a 1M-weight tensor: ours (exact DP) vs
     scipy.cluster.vq.kmeans2 (Lloyd, k-means++), time and SQNR.

Timings are medians of a few repeats on this machine, quoted with ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import numpy as np

from nmcompile.passes import quant_math as qm


def _median_time(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def _activation_batches(rng, nbatches, batch):
    # long-tailed activations (Student-t, df=3), slowly growing scale so that the
    # streamed range has to grow a few times
    return [
        (rng.standard_t(3, size=batch) * (1.0 + 0.05 * b)).astype(np.float32) for b in range(nbatches)
    ]


def bench_histogram(batches, repeats):
    n = sum(b.size for b in batches)

    def ours():
        h = qm.StreamingHistogram(2048)
        for b in batches:
            h.update(b)
        return h

    # warm-up (first-touch of the work buffers)
    qm.StreamingHistogram(2048).update(batches[0][:1000])
    t_ours, h = _median_time(ours, repeats)
    R = h.range_max

    def np_fixed():
        acc = np.zeros(2048, np.int64)
        for b in batches:
            acc += np.histogram(np.abs(b), bins=2048, range=(0, R))[0]
        return acc

    t_np, _ = _median_time(np_fixed, repeats)
    print("1. |x| histogram streaming, %d batches x %d float32 values" % (len(batches), batches[0].size))
    print("   ours StreamingHistogram   %8.1f M values/s  (%d bins, %d range growths)" % (n / t_ours / 1e6, 2048, h.num_growths))
    print("   np.histogram fixed range  %8.1f M values/s  (range known in advance)" % (n / t_np / 1e6))
    # numpy bins float32 input in float32 arithmetic (NEP 50); our rule is float64, so check on float64
    ref64 = sum(np.histogram(np.abs(b.astype(np.float64)), bins=2048, range=(0, R))[0] for b in batches)
    print("   identical counts to np.histogram(float64 |x|) over the final range: %s" % bool(np.array_equal(ref64, h.counts)))
    try:
        from onnxruntime.quantization.calibrate import HistogramCollector
    except Exception as e:  # pragma: no cover
        print("   ONNX Runtime HistogramCollector not importable: %s" % e)
        return h, None
    def ort():
        col = HistogramCollector("percentile", True, 2048, 128, 99.999, "same")
        for b in batches:
            col.collect_absolute_value({"x": b})
        return col

    t_ort, col = _median_time(ort, repeats)
    nb_ort = col.get_histogram_dict()["x"][0].size
    print("   ORT collect_absolute_value %7.1f M values/s  (its bin count grew to %d)" % (n / t_ort / 1e6, nb_ort))
    print("   ratio ours / ORT: %.1fx, ours / np.histogram: %.2fx" % (t_ort / t_ours, t_np / t_ours))
    return h, col


def bench_kl(h, data, repeats):
    c = h.trimmed_counts()
    t_ours, t_kl = _median_time(lambda: h.kl_threshold(), repeats)
    print()
    print("2. KL (entropy) threshold search")
    print("   ours: %d bins (trimmed from 2048 at max|x|), 128 levels: %.3f s  -> T = %.4f" % (c.size, t_ours, t_kl))
    x = np.concatenate(data)
    h2 = qm.StreamingHistogram.from_max_abs(h.max_abs, 2048)  # two-pass: TensorRT's exact setting
    for b in data:
        h2.update(b)
    t_full, t_kl_full = _median_time(lambda: h2.kl_threshold(), repeats)
    print("   ours: two-pass, 2048 bins over [0, max|x|] (1921 candidates): %.3f s  -> T = %.4f" % (t_full, t_kl_full))
    rows = [("ours kl, streamed (%d bins)" % c.size, t_kl), ("ours kl, two-pass (2048 bins)", t_kl_full)]
    try:
        from onnxruntime.quantization.calibrate import HistogramCollector
    except Exception:  # pragma: no cover
        HistogramCollector = None
    if HistogramCollector is not None:
        for nbins, label in ((2048, "ORT entropy, 2048 bins"), (128, "ORT entropy, defaults (128 bins)")):
            col = HistogramCollector("entropy", True, nbins, 128, 99.999, "same")
            with contextlib.redirect_stdout(io.StringIO()):
                for b in data:
                    col.collect_value({"x": b})
            hist = col.get_histogram_dict()["x"]
            t0 = time.perf_counter()
            lo, hi = col.get_entropy_threshold(hist, 128)
            t_ort = time.perf_counter() - t0
            t_sym = float(max(abs(lo), abs(hi)))
            ratio = "  (ours two-pass is %.0fx faster)" % (t_ort / t_full) if nbins == 2048 else ""
            print("   %-34s %.3f s  -> T = %.4f%s" % (label + ":", t_ort, t_sym, ratio))
            rows.append((label, t_sym))
    rows.append(("minmax", h.max_abs))
    rows.append(("percentile 99.99", qm.percentile_threshold(h, 99.99)))
    rows.append(("mse (histogram)", qm.mse_threshold(h)))
    auto = qm.choose_threshold_auto(h)
    rows.append(("auto -> %s" % auto.method, auto.threshold))
    print("   int8 symmetric fake-quant of all %d calibration values:" % x.size)
    for name, t in rows:
        xq = qm.fake_quantize(x, t)
        print("     %-34s T = %9.4f   SQNR %6.2f dB" % (name, t, qm.sqnr_db(x, xq)))


def bench_lut(rng, n, repeats):
    from scipy.cluster.vq import kmeans2

    w = (rng.standard_normal(n) * 0.02).astype(np.float32)
    w[rng.random(n) < 0.5] = 0.0  # 50% zeros, as after N:M pruning
    qm.lut_quantize(w[:1000], 4)  # warm-up (numba compiles or loads the k-means kernel)
    t_ours, (codes, book) = _median_time(lambda: qm.lut_quantize(w, 4), repeats)
    s_ours = qm.sqnr_db(w, qm.lut_dequantize(codes, book))
    nz = w[w != 0].astype(np.float64)

    def lloyd():
        c, lab = kmeans2(nz, 15, iter=30, minit="++", seed=0)
        deq = w.astype(np.float64).copy()
        deq[w != 0] = c[lab]
        return deq

    t_sp, deq_sp = _median_time(lloyd, max(1, repeats - 1))
    s_sp = qm.sqnr_db(w, deq_sp)
    q, s = qm.quantize_weight_per_channel(w.reshape(1, -1), 0, bits=4)
    s_uni = qm.sqnr_db(w, qm.dequantize_per_channel(q, s, 0).reshape(-1))
    codes_l, sc, tab = qm.log_quantize(w, 4, axis=None)
    s_log = qm.sqnr_db(w, qm.log_dequantize(codes_l, sc, tab, None))
    print()
    print("3. 4-bit codebook for a %d-weight tensor (50%% exact zeros, zero code reserved)" % n)
    print("   ours exact k-means LUT (DP)          %.3f s   SQNR %6.2f dB" % (t_ours, s_ours))
    print("   scipy kmeans2 (Lloyd, ++ init, 30 it) %.3f s   SQNR %6.2f dB   (ours %.1fx faster)" % (t_sp, s_sp, t_sp / t_ours))
    print("   uniform symmetric int4 (15 levels)     -        SQNR %6.2f dB" % s_uni)
    print("   logarithmic 4-bit (sign + 2^-k)        -        SQNR %6.2f dB" % s_log)
    per = w.reshape(1024, -1)
    t_pc, (c_pc, b_pc) = _median_time(lambda: qm.lut_quantize(per, 4, axis=0), 1)
    print("   ours per-channel LUT, %d channels   %.3f s   SQNR %6.2f dB" % (per.shape[0], t_pc, qm.sqnr_db(per, qm.lut_dequantize(c_pc, b_pc, axis=0))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller data, fewer repeats")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    nb, bs, reps = (8, 250_000, 2) if args.quick else (32, 1_000_000, 3)
    data = _activation_batches(rng, nb, bs)
    h, _ = bench_histogram(data, reps)
    bench_kl(h, data, reps)
    bench_lut(rng, 1 << 20, reps)


if __name__ == "__main__":
    main()
