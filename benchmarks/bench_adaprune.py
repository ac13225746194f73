"""AdaPrune solver timings, Gram accumulation throughput and a mask-score study.

    python benchmarks/bench_adaprune.py                 # solvers + gram (default)
    python benchmarks/bench_adaprune.py --solvers       # BERT-base-sized layers
    python benchmarks/bench_adaprune.py --gram          # Gram accumulation throughput
    python benchmarks/bench_adaprune.py --masks         # which mask score re-fits best
    python benchmarks/bench_adaprune.py --model bert25m # whole-model re-fit estimate
    python benchmarks/bench_adaprune.py --calib         # statistics of a 25 M encoder

Prints what it measured: wall and CPU seconds per layer (median of --repeat
runs), the relative reconstruction error tr(DHDᵀ)/tr(WHWᵀ) each method reaches,
and for the Gram accumulation rows/s and GFLOP/s (2·rows·K² counted as GEMM work;
the SYRK does half). The machine may be shared: compare methods within one run,
quote ratios, and look at CPU seconds next to wall seconds.

Synthetic data: H = XᵀX of n = 4K samples of correlated activations: a random
rotation of a decaying spectrum (λ_i ∝ 1/i), a non-zero mean, and a few outlier
channels (×10), i.e. the features ONNX models' activations show. W is Gaussian.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from nmcompile.passes import adaprune_solver as ap
from nmcompile.passes.adaprune_solver import blas_single_thread, cpu_workers
from nmcompile.passes.statistics import LayerSpec, _Accumulator, _run_jobs


def correlated_x(K: int, n: int, seed: int = 0, outliers: bool = True,
                 decay: float = 1.0) -> np.ndarray:
    """(n, K) float32 activations with a decaying spectrum, a mean and outliers."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((K, K)).astype(np.float32))
    lam = (1.0 + np.arange(K, dtype=np.float32)) ** -decay
    X = (rng.standard_normal((n, K)).astype(np.float32) * np.sqrt(lam)) @ Q.T
    X += 0.3 * np.sqrt(lam.mean())
    if outliers:
        idx = rng.choice(K, max(1, K // 256), replace=False)
        X[:, idx] *= 10.0
    return X


def gram_of(X: np.ndarray) -> np.ndarray:
    X64 = X.astype(np.float64)
    return X64.T @ X64


def timed(fn, repeat: int):
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


# --------------------------------------------------------------------------- solvers


def bench_solvers(shapes, repeat: int, direct_rows: int, pattern=(2, 4)):
    n, m = pattern
    print(f"\n== AdaPrune re-fit per layer, {n}:{m}, damp=0.01 "
          f"(median of {repeat}; wall / CPU seconds) ==")
    print(f"{'layer O×K':>12} {'method':>10} {'wall s':>8} {'cpu s':>8} {'rel.err':>9} "
          f"{'vs exact':>9}  notes")
    for O, K in shapes:
        X = correlated_x(K, 4 * K, seed=K)
        H = gram_of(X)
        del X
        rng = np.random.default_rng(O + K)
        W = rng.standard_normal((O, K)).astype(np.float32)
        S = ap.nm_mask_from_scores(np.abs(W), n, m)
        e_mask = ap.reconstruction_error(W, W * S, H)
        rows = []
        # exact, by CG (float32 products, tol 1e-6)
        info: dict = {}
        w, c, Wc = timed(lambda: ap.adaprune_rows(W, S, H, method="cg", info=info), repeat)
        e_exact = ap.reconstruction_error(W, Wc, H)
        rows.append(("cg", w, c, e_exact,
                     f"{info['iterations']} iterations, {info['row_iterations'] / O:.1f}"
                     f"/row, rank {info['rank']}"))
        # exact, direct: all rows, or a subset extrapolated
        sub = O if (K <= 1024 or direct_rows <= 0 or direct_rows >= O) else direct_rows
        Ws, Ss = W[:sub], S[:sub]
        w, c, Wd = timed(lambda: ap.adaprune_rows(Ws, Ss, H, method="direct"),
                         repeat if sub == O else 1)
        note = "" if sub == O else f"timed on {sub} rows, scaled ×{O / sub:.0f}"
        e_d = ap.reconstruction_error(Ws, Wd, H)
        e_cg_sub = ap.reconstruction_error(Ws, Wc[:sub], H)
        rows.append(("direct", w * O / sub, c * O / sub,
                     e_exact * e_d / e_cg_sub if sub != O else e_d, note))
        w, c, Wo = timed(lambda: ap.obs_prune_update(W, S, H), repeat)
        rows.append(("obs", w, c, ap.reconstruction_error(W, Wo, H), "same mask"))
        w, c, (Sg, Wg) = timed(lambda: ap.sparsegpt_mask_and_update(W, H, n, m), repeat)
        rows.append(("sparsegpt", w, c, ap.reconstruction_error(W, Wg, H),
                     "own mask (w²/[H⁻¹]_ii in the sweep)"))
        Wge = ap.adaprune_rows(W, Sg, H, method="cg")
        print(f"{f'{O}×{K}':>12} {'mask only':>10} {'':>8} {'':>8} {e_mask:9.5f} "
              f"{e_mask / e_exact:9.3f}")
        for name, w, c, e, note in rows:
            print(f"{'':>12} {name:>10} {w:8.2f} {c:8.2f} {e:9.5f} {e / e_exact:9.3f}  {note}")
        print(f"{'':>12} {'sgpt+cg':>10} {'':>8} {'':>8} "
              f"{ap.reconstruction_error(W, Wge, H):9.5f} "
              f"{ap.reconstruction_error(W, Wge, H) / e_exact:9.3f}  SparseGPT mask, exact re-fit")
        sys.stdout.flush()


# --------------------------------------------------------------------------- gram


def bench_gram(repeat: int, batch: int):
    print(f"\n== Gram accumulation (float32 products, float64 accumulator; "
          f"median of {repeat}) ==")
    print(f"{'layer':>34} {'rows':>8} {'K':>6} {'wall s':>8} {'cpu s':>8} {'Mrows/s':>8} "
          f"{'GFLOP/s':>8}")
    rng = np.random.default_rng(0)
    workers = cpu_workers()
    cases = [
        ("conv 3×3 C=64 56×56 pad 1", LayerSpec("c1", "x", "conv", kernel_shape=(3, 3),
                                                pads=(1, 1, 1, 1)), (batch, 64, 56, 56)),
        ("conv 3×3 C=256 14×14 s1 pad 1", LayerSpec("c2", "x", "conv", kernel_shape=(3, 3),
                                                    pads=(1, 1, 1, 1)), (batch, 256, 14, 14)),
        ("conv 3×3 C=128 56×56 s2 pad 1", LayerSpec("c3", "x", "conv", kernel_shape=(3, 3),
                                                    strides=(2, 2), pads=(1, 1, 1, 1)),
         (batch, 128, 56, 56)),
        ("conv 7×7 C=3 224×224 s2 pad 3", LayerSpec("c4", "x", "conv", kernel_shape=(7, 7),
                                                    strides=(2, 2), pads=(3, 3, 3, 3)),
         (batch, 3, 224, 224)),
        ("depthwise 3×3 C=256 28×28", LayerSpec("c5", "x", "conv", kernel_shape=(3, 3),
                                                pads=(1, 1, 1, 1), group=256),
         (batch, 256, 28, 28)),
        ("dense K=768 (tokens 128)", LayerSpec("d1", "x"), (batch, 128, 768)),
        ("dense K=3072 (tokens 128)", LayerSpec("d2", "x"), (batch, 128, 3072)),
    ]
    for name, spec, shape in cases:
        x = rng.standard_normal(shape).astype(np.float32)
        def run():
            acc = _Accumulator(spec, np.float32, 32 << 20)
            jobs = [(acc, j) for j in acc.jobs(x)]
            with blas_single_thread(), ThreadPoolExecutor(workers) as pool:
                _run_jobs(jobs, pool, workers)
            return acc

        run()  # warm up
        w, c, a = timed(run, repeat)
        G, K = a.shape
        flops = 2.0 * a.count * K * K * G
        print(f"{name:>34} {a.count:8d} {K:6d} {w:8.3f} {c:8.3f} {a.count / w / 1e6:8.2f} "
              f"{flops / w / 1e9:8.1f}")
        if spec.kind == "conv":  # im2col copy alone
            from nmcompile.passes.statistics import _patches_T, _window_view
            G = spec.group
            w2, _, _ = timed(lambda: _patches_T(_window_view(x[:1], spec), G, np.float32),
                             repeat)
            w2 *= x.shape[0]
            print(f"{'  im2col copy alone (1 thread)':>34} {'':>8} {'':>6} {w2:8.3f}")
        sys.stdout.flush()
    bench_collect(batch)


def bench_collect(batch: int):
    """End to end through ONNX Runtime: a small conv net, all conv inputs."""
    from onnx import TensorProto, helper, numpy_helper

    from nmcompile.passes.statistics import collect_statistics, spec_from_node

    rng = np.random.default_rng(1)
    chans = [3, 64, 128, 256]
    nodes, inits, cur = [], [], "x"
    for i in range(3):
        Wt = (rng.standard_normal((chans[i + 1], chans[i], 3, 3)) * 0.1).astype(np.float32)
        inits.append(numpy_helper.from_array(Wt, f"W{i}"))
        nodes.append(helper.make_node("Conv", [cur, f"W{i}"], [f"c{i}"], name=f"conv{i}",
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                      strides=[2, 2]))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        cur = f"r{i}"
    g = helper.make_graph(nodes, "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                         ["N", 3, 112, 112])],
                          [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    specs = [spec_from_node(n) for n in model.graph.node if n.op_type == "Conv"]
    nb = 8
    batches = [{"x": rng.standard_normal((batch, 3, 112, 112)).astype(np.float32)}
               for _ in range(nb)]
    c0, t0 = time.process_time(), time.perf_counter()
    st = collect_statistics(model, specs, batches, progress=False)
    w, c = time.perf_counter() - t0, time.process_time() - c0
    rows = sum(s.count for s in st.values())
    print(f"{'collect_statistics, 3-conv net':>34} {rows:8d} {'':>6} {w:8.3f} {c:8.3f} "
          f"{'':>8} {'':>8}  ({nb * batch / w:.0f} images/s, 112×112, ORT + Gram)")


# --------------------------------------------------------------------------- masks


def conv_like_x(C: int, n_img: int, size: int, seed: int) -> np.ndarray:
    """im2col patches (3×3, pad 1) of spatially smooth, channel-correlated
    feature maps → (rows, C·9)."""
    from numpy.fft import irfft2, rfft2

    from nmcompile.passes.statistics import im2col

    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n_img, C, size, size)).astype(np.float32)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    filt = np.exp(-(fx**2 + fy**2) / (2 * 0.08**2)).astype(np.float32)
    z = irfft2(rfft2(z) * filt, s=(size, size)).astype(np.float32)
    mix = np.eye(C, dtype=np.float32) + 0.5 * rng.standard_normal((C, C)).astype(np.float32) / np.sqrt(C)
    z = np.einsum("dc,nchw->ndhw", mix, z)
    z = np.maximum(z + 0.2 * z.std(), 0)  # post-ReLU
    spec = LayerSpec("c", "x", "conv", kernel_shape=(3, 3), pads=(1, 1, 1, 1))
    return im2col(z, spec)[0]


def bench_masks(O: int, K: int, patterns, seeds: int):
    print(f"\n== Which mask scores re-fit best? O={O}, K={K}, {seeds} seeds; relative "
          "error after the exact re-fit (lower is better), mean over seeds ==")
    datasets = {
        "gauss-decay": lambda s: correlated_x(K, 4 * K, seed=s, outliers=False),
        "gauss-outliers": lambda s: correlated_x(K, 4 * K, seed=s, outliers=True),
        "gauss-steep": lambda s: correlated_x(K, 4 * K, seed=s, outliers=True, decay=2.0),
        "conv-3x3-relu": lambda s: conv_like_x(K // 9 + (K % 9 > 0), 8, 24, s)[:, :K],
    }
    weights = {
        "iid": lambda rng, H: rng.standard_normal((O, K)),
        # trained-like: weights shrink where inputs are large (a layer that
        # normalises its inputs), so |w| and importance disagree
        "1/σ": lambda rng, H: rng.standard_normal((O, K)) / np.sqrt(np.diag(H) / np.diag(H).mean()),
    }
    scores = ["magnitude", "activation", "obs", "group-nocomp", "group-h", "group-hinv",
              "sparsegpt", "sparsegpt-group"]
    for n, m in patterns:
        for dname, make in datasets.items():
            for wname, mkw in weights.items():
                acc = {s: [] for s in scores}
                pre = {s: [] for s in scores}
                for seed in range(seeds):
                    X = make(seed)
                    H = gram_of(X)
                    rng = np.random.default_rng(seed + 77)
                    W = mkw(rng, H)
                    for sname in scores:
                        if sname in ("magnitude", "activation", "obs"):
                            S = ap.nm_mask_from_scores(ap.saliency(W, H, sname), n, m)
                        elif sname.startswith("group-"):
                            S = ap.best_group_mask_exact(W, H, n, m, local=sname[6:])
                        elif sname == "sparsegpt":
                            S, _ = ap.sparsegpt_mask_and_update(W, H, n, m)
                        else:
                            S, _ = ap.sparsegpt_mask_and_update(W, H, n, m, select="group")
                        pre[sname].append(ap.reconstruction_error(W, W * S, H))
                        Wn = ap.adaprune_rows(W, S, H, method="cg")
                        acc[sname].append(ap.reconstruction_error(W, Wn, H))
                base = np.mean(acc["magnitude"])
                best = min(scores, key=lambda s: np.mean(acc[s]))
                print(f"{n}:{m} {dname:>15} W={wname:<4} " + "  ".join(
                    f"{s}={np.mean(acc[s]):.4f}({np.mean(acc[s]) / base:.2f})"
                    for s in scores) + f"  best={best}")
                print(f"{'':>28}before re-fit: " + "  ".join(
                    f"{s}={np.mean(pre[s]):.4f}" for s in scores))
                sys.stdout.flush()


def encoder_model(hidden: int, ffn: int, blocks: int, seed: int = 0):
    """A BERT-shaped stack of linear layers for timing calibration: per block
    Q, K, V (summed; attention mixing left out, it is not what costs here), O,
    residual, FFN1, ReLU, FFN2, residual. Returns (model, specs)."""
    from onnx import TensorProto, helper, numpy_helper

    from nmcompile.passes.statistics import spec_from_node

    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"

    def lin(name, inp, k, o):
        w = (rng.standard_normal((k, o)) / np.sqrt(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.w"))
        nodes.append(helper.make_node("MatMul", [inp, f"{name}.w"], [f"{name}.y"], name=name))
        return f"{name}.y"

    for b in range(blocks):
        q, k, v = (lin(f"b{b}.{n}", cur, hidden, hidden) for n in "qkv")
        nodes.append(helper.make_node("Sum", [q, k, v], [f"b{b}.qkv"]))
        o = lin(f"b{b}.o", f"b{b}.qkv", hidden, hidden)
        nodes.append(helper.make_node("Add", [cur, o], [f"b{b}.r1"]))
        f1 = lin(f"b{b}.ffn1", f"b{b}.r1", hidden, ffn)
        nodes.append(helper.make_node("Relu", [f1], [f"b{b}.act"]))
        f2 = lin(f"b{b}.ffn2", f"b{b}.act", ffn, hidden)
        nodes.append(helper.make_node("Add", [f"b{b}.r1", f2], [f"b{b}.out"]))
        cur = f"b{b}.out"
    g = helper.make_graph(
        nodes, "enc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", hidden])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    specs = [spec_from_node(n) for n in model.graph.node if n.op_type == "MatMul"]
    return model, specs


def bench_calib(samples: int, batch: int, tokens: int):
    """collect_statistics on a 25 M-weight encoder (hidden 512, FFN 2048, 8 blocks)."""
    import threading

    from nmcompile.passes.statistics import collect_statistics

    model, specs = encoder_model(512, 2048, 8)
    size = sum(np.prod(t.dims) * 4 for t in model.graph.initializer)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((samples, tokens, 512)).astype(np.float32)
    batches = [{"x": data[i:i + batch]} for i in range(0, samples, batch)]

    def rss():
        with open("/proc/self/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0]) * 1024

    base, peak, stop = rss(), [0], [False]

    def poll():
        while not stop[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.01)

    th = threading.Thread(target=poll)
    th.start()
    c0, t0 = time.process_time(), time.perf_counter()
    st = collect_statistics(model, specs, batches, progress=False)
    w, c = time.perf_counter() - t0, time.process_time() - c0
    stop[0] = True
    th.join()
    grams = sum(v.nbytes for v in {id(v): v for v in st.values()}.values())
    print(f"\n== Calibration statistics, 25 M-weight encoder ({size / 2**20:.0f} MiB fp32), "
          f"{samples}×{tokens} tokens, batch {batch} ==")
    print(f"  {w:.1f} s wall, {c:.1f} s cpu ({samples * tokens / w:.0f} tokens/s); "
          f"{len(specs)} layers, {len({s.key() for s in specs})} distinct inputs; "
          f"Grams {grams / 2**20:.0f} MiB; RSS above the loaded model + data: "
          f"{(peak[0] - base) / 2**20:.0f} MiB ({(peak[0] - base) / size:.2f}× the weights)")


# --------------------------------------------------------------------------- models


MODELS = {
    # hidden 512, FFN 2048, 8 blocks: 8·(4·512² + 2·512·2048) = 25.2 M weights
    "bert25m": [((512, 512), 32), ((2048, 512), 8), ((512, 2048), 8)],
    # BERT-base encoder: 85 M weights
    "bert-base": [((768, 768), 48), ((3072, 768), 12), ((768, 3072), 12)],
    # ResNet-50 convs as (O, C·kh·kw): 23.5 M weights (fc excluded)
    "resnet50": [((64, 64), 3), ((64, 576), 3), ((256, 64), 4), ((64, 256), 2),
                 ((128, 256), 1), ((128, 1152), 4), ((512, 128), 4), ((512, 256), 1),
                 ((128, 512), 3), ((256, 512), 1), ((256, 2304), 6), ((1024, 256), 6),
                 ((1024, 512), 1), ((256, 1024), 5), ((512, 1024), 1), ((512, 4608), 3),
                 ((2048, 512), 3), ((2048, 1024), 1), ((512, 2048), 2)],
}


def bench_model(name: str, method: str):
    layers = MODELS[name]
    nw = sum(O * K * c for (O, K), c in layers)
    print(f"\n== Whole-model re-fit estimate: {name} ({nw / 1e6:.1f} M weights, 2:4, "
          f"method={method}); each distinct shape timed once ==")
    total_w = total_c = 0.0
    for (O, K), count in layers:
        X = correlated_x(K, 4 * K, seed=K)
        H = gram_of(X)
        del X
        W = np.random.default_rng(O).standard_normal((O, K)).astype(np.float32)
        info: dict = {}
        if method == "obs":
            fn = lambda: ap.obs_prune_update(W, ap.nm_mask_from_scores(np.abs(W), 2, 4), H)
        else:
            fn = lambda: ap.adaprune_rows(W, ap.nm_mask_from_scores(np.abs(W), 2, 4), H,
                                          method=method, info=info)
        w, c, _ = timed(fn, 1)
        total_w += w * count
        total_c += c * count
        print(f"{f'{O}×{K}':>12} ×{count:<3d} {w:8.2f} s wall {c:8.2f} s cpu  "
              f"{info.get('method', method)}")
        sys.stdout.flush()
    print(f"{'total':>12}      {total_w:8.1f} s wall {total_c:8.1f} s cpu")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solvers", action="store_true", help="time the re-fit solvers")
    p.add_argument("--gram", action="store_true", help="time Gram accumulation")
    p.add_argument("--masks", action="store_true", help="compare mask scores after re-fit")
    p.add_argument("--model", choices=sorted(MODELS), help="whole-model re-fit estimate")
    p.add_argument("--calib", action="store_true",
                   help="collect_statistics on a 25 M-weight encoder (time, memory)")
    p.add_argument("--samples", type=int, default=128, help="sequences for --calib")
    p.add_argument("--method", default="auto", help="solver for --model: auto|cg|direct|obs")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--direct-rows", type=int, default=96,
                   help="time the direct solver on this many rows of layers with K>1024 "
                        "and scale (0: all rows)")
    p.add_argument("--batch", type=int, default=8, help="images / sequences per batch")
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    a = p.parse_args(argv)
    if not (a.solvers or a.gram or a.masks or a.model or a.calib):
        a.solvers = a.gram = True
    print(f"nmcompile AdaPrune benchmark — {os.cpu_count()} CPUs, numpy {np.__version__}")
    if a.solvers:
        shapes = [(768, 768), (3072, 768), (768, 3072)]
        if a.quick:
            shapes = [(256, 256), (256, 1024)]
        bench_solvers(shapes, a.repeat, a.direct_rows)
    if a.gram:
        bench_gram(a.repeat, 2 if a.quick else a.batch)
    if a.masks:
        if a.quick:
            bench_masks(64, 144, [(2, 4)], 2)
        else:
            bench_masks(256, 576, [(2, 4), (4, 8)], 3)
    if a.model:
        bench_model(a.model, a.method)
    if a.calib:
        bench_calib(a.samples, a.batch, 128)


if __name__ == "__main__":
    main()
