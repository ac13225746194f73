"""N:M mask throughput and end-to-end compile time on a ResNet-50-shaped model (25 M weights).

Prints, in one run: weights/s of nmcompile's mask pass (blocked pairwise ranks,
numpy) for 2:4 and 4:8 next to a plain numpy argsort implementation; compile time next to plain onnx load+save of
the same model. Medians of several repeats; ratios are what to quote.

    python benchmarks/bench_masks.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from nmcompile import modelzoo
from nmcompile.passes.nm_mask import nm_mask
from nmcompile.pipeline import compile_model


def numpy_argsort_mask(scores: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    moved = np.moveaxis(scores, axis, -1)
    groups = moved.reshape(-1, m)
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    model = modelzoo.resnet50()
    weights = []
    for init in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.ndim == 4 and arr.shape[1] % 8 == 0:
            weights.append(np.abs(arr))
        elif arr.ndim == 2:
            weights.append(np.abs(arr))
    total = sum(w.size for w in weights)
    print(f"ResNet-50-shaped model: {len(weights)} prunable weights, {total / 1e6:.1f} M weights")

    rows = []
    for n, m in ((2, 4), (4, 8)):
        nm_mask(weights[1], n, m, axis=1)  # warm-up
        ours = median_time(lambda: [nm_mask(w, n, m, axis=1) for w in weights], args.repeats)
        ref = median_time(lambda: [numpy_argsort_mask(w, n, m, axis=1) for w in weights], args.repeats)
        same = all(np.array_equal(nm_mask(w, n, m, 1), numpy_argsort_mask(w, n, m, 1)) for w in weights[:5])
        rows.append((f"{n}:{m}", total / ours / 1e6, total / ref / 1e6, ref / ours, same))
    print()
    print(f"{'pattern':8} {'nmcompile M w/s':>16} {'numpy argsort M w/s':>20} {'speed-up':>9}  same masks")
    for pat, ours, ref, ratio, same in rows:
        print(f"{pat:8} {ours:16.1f} {ref:20.1f} {ratio:8.1f}x  {same}")

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "resnet50.onnx"
        onnx.save(model, str(src))
        compile_model(src, output=Path(tmp) / "warm.onnx")  # warm-up

        def load_save():
            onnx.save(onnx.load(str(src)), str(Path(tmp) / "copy.onnx"))

        base = median_time(load_save, args.repeats)
        comp = median_time(lambda: compile_model(src, output=Path(tmp) / "out.onnx"), args.repeats)
    print()
    print(f"{'end to end':24} {'seconds (median)':>16}")
    print(f"{'onnx load + save':24} {base:16.3f}")
    print(f"{'nmcompile --pattern 2:4':24} {comp:16.3f}")
    print(f"compile / (load+save) = {comp / base:.2f}x")


if __name__ == "__main__":
    main()
