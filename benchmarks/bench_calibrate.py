"""Calibration + AdaPrune end to end: time, throughput and peak memory; accuracy on the shipped models.

Part 1 compiles, each in its own process (peak RSS read by the child, VmHWM,
after a warm-up compile of a tiny model whose RSS is printed as the base and
which is then cleared from the peak), a
ResNet-50-shaped net (25.5 M weights) and a BERT-base-sized encoder with
`--pattern 2:4 --calib`, and prints calibration throughput, total and per-layer
AdaPrune time, and peak RSS as a multiple of the model's size, next to plain
magnitude pruning of the same model in the same run.

Part 2 prints dense / magnitude-only / calibrated top-1 accuracy of the shipped
digits models at 2:4.

Part 3, padded calibration data: a BERT-style encoder with an attention mask
(random weights, L2 H128), 256 calibration and 64 held-out sequences of 48
positions with random lengths 4-48 (about half the positions padding), compiled
at 2:4 with ``--calib`` and with ``--calib --sequential-calib``, the statistics
counting real tokens only (what nmcompile does when the data carries an
``attention_mask``) and, for comparison, every position (what it did before:
``statistics.token_mask`` patched out). Printed: relative squared output error
against the dense model on the held-out real tokens.

Part 4, calibration vectors with nothing to learn: one 32x16 MatMul (random
weights) calibrated on 64 isotropic Gaussian vectors, held-out relative squared
error on 2000 more: magnitude pruning, ``--calib`` with its Ledoit-Wolf damping,
and ``--calib`` with the damping fixed at 1% (``adaprune.layer_damp`` patched
to its floor: what it did before).

With ``--sequential`` the ResNet-50-shaped net is also compiled with
``--sequential-calib`` (every layer's statistics from the model compressed so far,
one pass over the data through it and the dense model per layer wave).

    python benchmarks/bench_calibrate.py [--samples 32] [--image 224] [--skip-large] [--sequential] [--skip-padding]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

DRIVER = r"""
import json, os, sys, tempfile, time
import numpy as np, onnx
from nmcompile import modelzoo
from nmcompile.pipeline import compile_model
args = json.loads(sys.argv[1])
# The base: interpreter, libraries and compiled kernels, loaded by a compile of a
# tiny model; then the peak is reset so that VmHWM is the real compile's peak.
with tempfile.TemporaryDirectory() as d:
    onnx.save(modelzoo.conv_model(), os.path.join(d, "w.onnx"))
    np.savez(os.path.join(d, "c.npz"), x=np.random.default_rng(0).standard_normal((4, 3, 8, 8)).astype(np.float32))
    compile_model(os.path.join(d, "w.onnx"), os.path.join(d, "o.onnx"), pattern="2:4",
                  calib=os.path.join(d, "c.npz") if args.get("calib") else None)
base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (Linux >= 4.0)
start = time.perf_counter()
result = compile_model(**args)
elapsed = time.perf_counter() - start
# VmHWM, not ru_maxrss: ru_maxrss survives exec and starts at the forking parent's RSS
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
layers = [l for l in result.report["layers"] if l.get("reconstruction_error_adaprune") is not None]
print(json.dumps({
    "seconds": elapsed,
    "peak_rss": rss,
    "base_rss": base,
    "timings": result.timings,
    "errors": [(l["reconstruction_error_masked"], l["reconstruction_error_adaprune"]) for l in layers],
}))
"""


def run_driver(**kwargs) -> dict:
    kwargs = {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def large_models(samples: int, image: int, folder: Path, sequential: bool = False) -> None:
    from nmcompile import modelzoo

    rng = np.random.default_rng(0)
    cases = [
        ("ResNet-50 (25.5 M)", modelzoo.resnet50(image=image), {"x": rng.standard_normal((samples, 3, image, image)).astype(np.float32)}),
        (
            "BERT-base encoder (85 M + emb.)",
            modelzoo.bert_encoder(layers=12, hidden=768, heads=12, vocab=30522, seq=128),
            {"input_ids": rng.integers(0, 30522, size=(samples, 128)).astype(np.int64)},
        ),
    ]
    print(f"{'model':32} {'mode':10} {'seconds':>8} {'samples/s':>10} {'refit s (sum/median/max)':>26} {'peak RSS MB':>12} {'RSS/model':>10} {'(RSS-base)/model':>17} {'error masked->refit (median)':>30}")
    for name, model, data in cases:
        src = folder / "model.onnx"
        size = sum(t.ByteSize() for t in model.graph.initializer)
        if size > 1_500_000_000:
            from nmcompile.modelzoo import save_with_external_data

            save_with_external_data(model, src)
        else:
            onnx.save(model, str(src))
        del model
        np.savez(folder / "calib.npz", **data)
        mag = run_driver(model=src, output=folder / "mag.onnx", pattern="2:4")
        cal = run_driver(model=src, output=folder / "cal.onnx", pattern="2:4", calib=folder / "calib.npz", calib_batch=8)
        runs = [("magnitude", mag), ("calibrated", cal)]
        if sequential and name.startswith("ResNet"):
            runs.append(("sequential", run_driver(model=src, output=folder / "seq.onnx", pattern="2:4", calib=folder / "calib.npz",
                                                  calib_batch=8, sequential_calib=True)))
        for mode, res in runs:
            times = list(res["timings"].values())
            fit = f"{sum(times):.1f}/{statistics.median(times):.2f}/{max(times):.2f}" if times else "-"
            errs = res["errors"]
            err = f"{statistics.median(e[0] for e in errs):.4f}->{statistics.median(e[1] for e in errs):.4f}" if errs else "-"
            rate = f"{samples / res['seconds']:.1f}" if mode != "magnitude" else "-"
            print(
                f"{name:32} {mode:10} {res['seconds']:8.1f} {rate:>10} {fit:>26} {res['peak_rss'] / 1e6:12.0f} "
                f"{res['peak_rss'] / size:10.2f} {(res['peak_rss'] - res['base_rss']) / size:17.2f} {err:>30}"
            )
        print(f"{'':32} model weights {size / 1e6:.0f} MB; {samples} calibration samples; "
              f"base (interpreter, libraries, kernels) {cal['base_rss'] / 1e6:.0f} MB")


def shipped_accuracy(folder: Path) -> None:
    from evaluate import accuracy

    from nmcompile.pipeline import compile_model

    print()
    print(f"{'shipped model (2:4)':22} {'dense':>7} {'magnitude':>10} {'calibrated':>11} {'sequential':>11}")
    for model, calib, test in (
        ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"),
        ("digits_encoder.onnx", "digits_encoder_calib.npz", "digits_encoder_test.npz"),
    ):
        src, test_path = ROOT / "models" / model, ROOT / "models" / test
        mag = compile_model(src, output=folder / "m.onnx")
        cal = compile_model(src, output=folder / "c.onnx", calib=ROOT / "models" / calib)
        seq = compile_model(src, output=folder / "s.onnx", calib=ROOT / "models" / calib, sequential_calib=True)
        accs = [accuracy(str(p), str(test_path)) for p in (src, mag.paths.model, cal.paths.model, seq.paths.model)]
        print(f"{model:22} " + " ".join(f"{a:>{w}.2%}" for a, w in zip(accs, (7, 10, 11, 11))))


def padded_tokens(folder: Path) -> None:
    import onnxruntime as ort

    from nmcompile import modelzoo
    from nmcompile.passes import statistics
    from nmcompile.pipeline import compile_model

    model = modelzoo.bert_encoder(layers=2, hidden=128, heads=4, vocab=1000, attention_mask=True, seed=1)
    onnx.save(model, folder / "pad.onnx")
    rng = np.random.default_rng(0)

    def sequences(n, seq=48):
        ids = rng.integers(1, 1000, size=(n, seq)).astype(np.int64)
        mask = (np.arange(seq)[None] < rng.integers(4, seq + 1, size=n)[:, None]).astype(np.int64)
        ids[mask == 0] = 0
        return {"input_ids": ids, "attention_mask": mask}

    calib, test = sequences(256), sequences(64)
    np.savez(folder / "pad.npz", **calib)
    real = test["attention_mask"] != 0
    dense = ort.InferenceSession(str(folder / "pad.onnx")).run(None, test)[0][real]

    def error(path) -> float:
        out = ort.InferenceSession(str(path)).run(None, test)[0][real]
        return float(((out - dense) ** 2).sum() / (dense**2).sum())

    magnitude = error(compile_model(folder / "pad.onnx", folder / "pm.onnx").paths.model)
    print()
    print(f"padded calibration data (BERT-style L2 H128, {int(calib['attention_mask'].sum())} real tokens of "
          f"{calib['attention_mask'].size} positions); held-out relative squared error on real tokens, 2:4, magnitude {magnitude:.4f}")
    print(f"{'mode':22} {'every position':>15} {'real tokens':>12}")
    original = statistics.token_mask
    for mode, seq in (("--calib", False), ("--sequential-calib", True)):
        errs = []
        for counted in ("all", "real"):
            if counted == "all":
                statistics.token_mask = lambda batch: None
            try:
                res = compile_model(folder / "pad.onnx", folder / f"p{counted}.onnx", calib=folder / "pad.npz", sequential_calib=seq)
            finally:
                statistics.token_mask = original
            errs.append(error(res.paths.model))
        print(f"{mode:22} {errs[0]:15.4f} {errs[1]:12.4f}")


def isotropic_vectors(folder: Path) -> None:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from nmcompile.passes import adaprune
    from nmcompile.pipeline import compile_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(folder / "iso.onnx"))
    np.savez(folder / "iso.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    held_out = rng.standard_normal((2000, 32)).astype(np.float32)
    dense = held_out @ w

    def error(path) -> float:
        got = ort.InferenceSession(str(path)).run(None, {"x": held_out})[0]
        return float(((got - dense) ** 2).sum() / (dense**2).sum())

    magnitude = error(compile_model(folder / "iso.onnx", folder / "im.onnx").paths.model)
    auto = compile_model(folder / "iso.onnx", folder / "ia.onnx", calib=folder / "iso.npz")
    original = adaprune.layer_damp
    adaprune.layer_damp = lambda stats, floor: (floor, None)
    try:
        fixed = compile_model(folder / "iso.onnx", folder / "if.onnx", calib=folder / "iso.npz")
    finally:
        adaprune.layer_damp = original
    row = auto.report["layers"][0]
    print()
    print("64 isotropic calibration vectors for a 32-input layer, 2:4; held-out relative squared error: "
          f"magnitude {magnitude:.4f}, --calib with damping 1% {error(fixed.paths.model):.4f}, "
          f"--calib (shrinkage {row['shrinkage']:.2f}, damping {row['damping']:.3g}) {error(auto.paths.model):.4f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32, help="calibration samples for the large models")
    ap.add_argument("--image", type=int, default=224, help="ResNet input size")
    ap.add_argument("--skip-large", action="store_true", help="only the shipped models")
    ap.add_argument("--sequential", action="store_true", help="also --sequential-calib on the ResNet-50-shaped net (minutes)")
    ap.add_argument("--skip-padding", action="store_true", help="skip part 3 (padded calibration data)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if not args.skip_large:
            large_models(args.samples, args.image, folder, args.sequential)
        shipped_accuracy(folder)
        if not args.skip_padding:
            padded_tokens(folder)
        isotropic_vectors(folder)


if __name__ == "__main__":
    main()
