"""int8 post-training quantization: nmcompile next to ONNX Runtime's quantize_static, in one run.

    python benchmarks/bench_quantize.py [--rounds 40] [--repeats 3] [--bert-layers 4] [--bert-hidden 256]

Models: the shipped digits CNN and digits encoder (test-set accuracy), and a
BERT-style encoder from nmcompile.modelzoo (random weights; output cosine
against fp32 on held-out random token ids).

Quantizers, each run in its own subprocess on the same calibration data (the
models' calibration .npz; for BERT 64 sequences), the output models all QDQ:

  ORT MinMax    onnxruntime.quantization.quantize_static, QuantFormat.QDQ,
                per_channel=True, CalibrationMethod.MinMax, other options default
                (int8 activations, asymmetric), a CalibrationDataReader over the batches
  ORT Entropy   the same with CalibrationMethod.Entropy (its defaults: 128 bins)
  nmc minmax    nmcompile's quantize pass, int8, at its defaults: calib_method="minmax"
                (no clipping), nearest weight rounding, no sensitivity pass
  nmc gptq      the same with weight_rounding="gptq" (error-compensating, from the
                layer-input Grams summed during calibration; --weight-rounding gptq)
  nmc auto      calib_method="auto" (per tensor the lowest-error of kl / minmax /
                percentiles, then checked against minmax on the model's output)
  nmc kl        calib_method="kl" (TensorRT entropy, 2048 bins)
  nmc min+sens  the default with the per-layer sensitivity pass (L+1 extra runs
                over the calibration data; what --max-error needs)

Each subprocess imports what its quantizer needs (onnxruntime.quantization, or
what the `nmcompile` command loads: its pipeline, scipy included) and loads the
calibration data, then records VmHWM
("base MB") and runs the quantizer. Printed per model and quantizer: accuracy
(or 1 - cosine for BERT) and 1 - cosine of the outputs against fp32 on the test
inputs; wall time of the quantizer call (calibration included: "quant s");
(each quantizer runs --repeats times, in fresh subprocesses: medians);
peak resident memory of the subprocess (VmHWM) at the end ("peak MB", the
interpreter and libraries included) and its increase over the base ("+MB", what
the call itself added); how many of the model's MatMul/Gemm/Conv
layers ORT CPU runs as integer kernels after its optimizer (QLinearConv, QGemm,
QLinearMatMul, MatMulIntegerToFloat, MatMulInteger, ConvInteger); CPU latency
(median of interleaved single runs of every model of the group, so that machine
noise hits all of them alike, and the ratio to fp32; one intra-op thread by
default, no spinning). Below each group, every nmcompile row against ORT
Entropy: time ratio, and peak memory as a fraction of ORT's, total and
increase.

Then file sizes of weight-only 4-bit log / LUT models against fp32, dense and
after 2:4 pruning (nmcompile compile_model --pattern 2:4, magnitude masks),
with their accuracy: "lut4" at the defaults (uint8 per-channel scales or
per-channel codebooks, float16 codebooks, N:M position patterns, large Gather
tables coded too, the other float parameters (biases, norms, position tables)
stored as float16 where that is within 2^-11), "lut4 f32 par" the same with
those parameters left float32 (float16_params=False), "lut4 layer" with one
codebook per layer and no per-channel scales (lut_granularity="layer":
smaller, less accurate), "log4" power-of-two codes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
INTEGER_OPS = ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger", "ConvInteger")


def vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- worker (subprocess)


def batches(npz: str, size: int):
    with np.load(npz) as f:
        data = {k: f[k] for k in f.files if k != "labels"}
    n = len(next(iter(data.values())))
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, n, size)]


def worker(spec: dict) -> dict:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    if spec["tool"] == "ort":
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, quantize_static
    else:
        import nmcompile.pipeline  # noqa: F401  what `nmcompile` loads (scipy included) before any work
        from nmcompile import graphio
        from nmcompile.passes.base import CompileContext
        from nmcompile.passes.canonicalize import canonicalize_passes
        from nmcompile.passes.quantize import Quantize
        from nmcompile.passes.targets import FindTargets
    feeds = batches(spec["calib"], spec["batch"])
    base_mb = vm_hwm_mb()  # after the quantizer's imports and loading the calibration data
    t0 = time.perf_counter()
    if spec["tool"] == "ort":

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(feeds)

            def get_next(self):
                return next(self.it, None)

        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}[spec["method"]]
        quantize_static(spec["model"], spec["out"], Reader(), quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=method)
    else:
        loaded = graphio.load_model(spec["model"])
        opts = SimpleNamespace(pattern=None, exclude=(), progress=False, quantize="int8", calib_method=spec["method"],
                               max_error=None, quant_sensitivity=spec["sensitivity"], weight_rounding=spec.get("rounding", "nearest"))
        ctx = CompileContext(model=loaded, options=opts)
        ctx.artifacts["calib_batches"] = lambda: iter(feeds)
        for p in canonicalize_passes() + [FindTargets(), Quantize()]:
            p(ctx)
        with graphio.AtomicWriter() as w:
            graphio.save_model(loaded, Path(spec["out"]), w)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "base_mb": base_mb, "peak_mb": vm_hwm_mb()}


# --------------------------------------------------------------------------- driver helpers


def run_worker(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_worker_median(spec: dict, repeats: int) -> dict:
    """Median of ``repeats`` fresh subprocesses (time and memory each), the runs in the result."""
    runs = []
    for _ in range(max(1, repeats)):
        res = run_worker(spec)
        if "error" in res:
            return res
        runs.append(res)
    med = {k: statistics.median(r[k] for r in runs) for k in ("seconds", "base_mb", "peak_mb")}
    med["increase_mb"] = statistics.median(r["peak_mb"] - r["base_mb"] for r in runs)
    med["runs"] = len(runs)
    return med


def session(path, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    # several sessions run in turn: idle thread pools must not spin against the running one
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def integer_kernels(path) -> int:
    from nmcompile.runtime.session import optimized_op_counts

    ops = optimized_op_counts(path)
    return sum(ops[o] for o in INTEGER_OPS)


def one_minus_cos(ref_path, path, feeds) -> float:
    from nmcompile.passes.quantize import measure_output_error

    return measure_output_error(ref_path, path, feeds)["one_minus_cosine"]


def interleaved_latency(paths: dict[str, Path], feed: dict, rounds: int, threads: int) -> dict[str, float]:
    sessions = {k: session(p, threads) for k, p in paths.items()}
    for s in sessions.values():  # warm-up
        for _ in range(3):
            s.run(None, feed)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def count_targets(path) -> int:
    from nmcompile import graphio
    from nmcompile.passes.targets import find_targets

    return len(find_targets(graphio.load_model(path)))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40, help="interleaved latency rounds per model")
    ap.add_argument("--repeats", type=int, default=3, help="quantizer runs (fresh subprocesses) per model: medians are printed")
    ap.add_argument("--threads", type=int, default=1, help="ORT intra-op threads for the latency runs (0: ORT default)")
    ap.add_argument("--bert-layers", type=int, default=4)
    ap.add_argument("--bert-hidden", type=int, default=256)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    import onnx
    import onnxruntime as ort

    from nmcompile import modelzoo

    ort.set_default_logger_severity(3)
    sys.path.insert(0, str(MODELS))
    from evaluate import accuracy

    tmp = Path(tempfile.mkdtemp(prefix="bench_quantize_"))
    # BERT-style encoder with random weights, calibration and held-out token ids
    bert = modelzoo.bert_encoder(layers=args.bert_layers, hidden=args.bert_hidden, heads=4, seq="S")
    bert_path = tmp / "bert.onnx"
    onnx.save(bert, str(bert_path))
    rng = np.random.default_rng(0)
    np.savez(tmp / "bert_calib.npz", input_ids=rng.integers(0, 512, size=(64, 64)).astype(np.int64))
    np.savez(tmp / "bert_test.npz", input_ids=rng.integers(0, 512, size=(32, 64)).astype(np.int64))

    groups = [
        ("digits CNN", MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_test.npz", 32, True),
        ("digits encoder", MODELS / "digits_encoder.onnx", MODELS / "digits_encoder_calib.npz", MODELS / "digits_encoder_test.npz", 32, True),
        (f"BERT-style L{args.bert_layers} H{args.bert_hidden} S64", bert_path, tmp / "bert_calib.npz", tmp / "bert_test.npz", 8, False),
    ]
    quantizers = [
        ("ORT MinMax", {"tool": "ort", "method": "minmax"}),
        ("ORT Entropy", {"tool": "ort", "method": "entropy"}),
        ("nmc minmax", {"tool": "nmc", "method": "minmax", "sensitivity": None}),
        ("nmc gptq", {"tool": "nmc", "method": "minmax", "sensitivity": None, "rounding": "gptq"}),
        ("nmc auto", {"tool": "nmc", "method": "auto", "sensitivity": None}),
        ("nmc kl", {"tool": "nmc", "method": "kl", "sensitivity": None}),
        ("nmc min+sens", {"tool": "nmc", "method": "minmax", "sensitivity": True}),
    ]
    print(f"onnxruntime {ort.__version__}, {os.cpu_count()} CPUs; quantizers: median of {args.repeats} runs; latency: median of "
          f"{args.rounds} interleaved runs, {args.threads or 'default'} intra-op thread(s), batch 64 (digits) / 4x64 tokens (BERT)")
    header = (f"{'model':<26} {'quantizer':<13} {'accuracy':>9} {'1-cos':>9} {'quant s':>8} {'peak MB':>8} {'base MB':>8} {'+MB':>6} "
              f"{'int ops':>8} {'latency ms':>11} {'vs fp32':>8}")
    print(header)
    print("-" * len(header))
    for name, model, calib, test, batch, labelled in groups:
        paths = {"fp32": Path(model)}
        info: dict[str, dict] = {"fp32": {}}
        for qname, spec in quantizers:
            out = tmp / f"{Path(model).stem}_{qname.replace(' ', '_')}.onnx"
            res = run_worker_median(dict(spec, model=str(model), calib=str(calib), out=str(out), batch=batch), args.repeats)
            info[qname] = res
            if "error" not in res:
                paths[qname] = out
        test_feeds = batches(str(test), 64)
        feed = test_feeds[0] if labelled else {k: v[:4] for k, v in test_feeds[0].items()}
        lat = interleaved_latency(paths, feed, args.rounds, args.threads)
        n_targets = count_targets(model)
        for qname in ["fp32"] + [q for q, _ in quantizers]:
            res = info[qname]
            if "error" in res:
                print(f"{name:<26} {qname:<13} failed: {res['error']}")
                continue
            p = paths[qname]
            acc = f"{accuracy(p, test) * 100:8.2f}%" if labelled else f"{'-':>9}"
            cos = one_minus_cos(model, p, test_feeds) if qname != "fp32" else 0.0
            kern = f"{integer_kernels(p)}/{n_targets}"
            secs = f"{res['seconds']:8.2f}" if res else f"{'-':>8}"
            peak = f"{res['peak_mb']:8.0f}" if res else f"{'-':>8}"
            base = f"{res['base_mb']:8.0f}" if res else f"{'-':>8}"
            incr = f"{res['increase_mb']:6.0f}" if res else f"{'-':>6}"
            print(f"{name:<26} {qname:<13} {acc} {cos:9.2e} {secs} {peak} {base} {incr} {kern:>8} {lat[qname] * 1e3:11.3f} "
                  f"{lat[qname] / lat['fp32']:8.2f}")
        ref = info.get("ORT Entropy", {})
        if ref and "error" not in ref:
            for qname, _ in quantizers:
                res = info[qname]
                if not qname.startswith("nmc") or "error" in res:
                    continue
                inc, ref_inc = res["increase_mb"], ref["increase_mb"]
                print(f"{'':<26} {qname:<13} vs ORT Entropy: {ref['seconds'] / res['seconds']:5.1f}x faster, peak memory "
                      f"{res['peak_mb'] / ref['peak_mb']:.2f}x total, {inc / ref_inc if ref_inc > 0 else float('nan'):.2f}x of the increase "
                      f"(targets: >= 3x faster, <= 0.20x)")
        print()

    # ------------------------------------------------------------------ weight-only file sizes
    from nmcompile import graphio
    from nmcompile.passes.base import CompileContext
    from nmcompile.passes.canonicalize import canonicalize_passes
    from nmcompile.passes.quantize import Quantize
    from nmcompile.passes.targets import FindTargets
    from nmcompile.patterns import Pattern
    from nmcompile.pipeline import compile_model

    def codebook(src, out, mode, pattern, granularity=None, float16_params=True):
        loaded = graphio.load_model(src)
        opts = SimpleNamespace(pattern=pattern, exclude=(), progress=False, quantize=mode, bits=4, calib_method=None, max_error=None,
                               lut_granularity=granularity, float16_params=float16_params)
        ctx = CompileContext(model=loaded, options=opts)
        for p in canonicalize_passes() + [FindTargets(), Quantize()]:
            p(ctx)
        with graphio.AtomicWriter() as w:
            graphio.save_model(loaded, Path(out), w)
        return ctx

    print("weight-only 4-bit codes: file bytes (ratio to the fp32 file of the same sparsity) and accuracy / 1-cos")
    header = f"{'model':<26} {'variant':<18} {'bytes':>9} {'ratio':>7} {'accuracy':>9} {'1-cos':>9}"
    print(header)
    print("-" * len(header))
    for name, model, calib, test, batch, labelled in groups:
        dense = tmp / f"{Path(model).stem}_fp32.onnx"
        compile_model(model, output=dense, pattern=None)
        sparse = tmp / f"{Path(model).stem}_2of4.onnx"
        compile_model(model, output=sparse, pattern="2:4")
        test_feeds = batches(str(test), 64)
        for label, src, pat in (("dense", dense, None), ("2:4", sparse, Pattern(2, 4))):
            base = os.path.getsize(src)
            rows = [(f"{label} fp32", src)]
            for mode, gran, f16, tag in (("lut", None, True, "lut4"), ("lut", None, False, "lut4 f32 par"), ("lut", "layer", True, "lut4 layer"),
                                         ("log", None, True, "log4")):
                out = tmp / f"{Path(model).stem}_{label.replace(':', 'of')}_{tag.replace(' ', '_')}.onnx"
                codebook(src, out, mode, pat, gran, f16)
                rows.append((f"{label} {tag}", out))
            for variant, p in rows:
                size = os.path.getsize(p)
                acc = f"{accuracy(p, test) * 100:8.2f}%" if labelled else f"{'-':>9}"
                cos = one_minus_cos(model, p, test_feeds)
                print(f"{name:<26} {variant:<18} {size:9d} {size / base:7.3f} {acc} {cos:9.2e}")
        print()
    print(f"(files in {tmp})")


if __name__ == "__main__":
    main()
