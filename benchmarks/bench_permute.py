"""Channel permutation before N:M: how much more L1 the mask keeps, and what the search costs.

Prints, in one run, for ResNet-50 (width 1, 25 M weights, random weights with BN
folded, built by nmcompile.modelzoo) and the shipped digits CNN (trained weights):
the share of |w| that 2:4 keeps with no permutation, with only the search's
starting point (round-robin deal of channels by column norm, no local search) and
with the full search, over the layers the pass could permute and over all pruned
layers; how many layers were permuted; and the time of the permute-channels pass
(median of --repeats runs, plus the first run, which includes numba's JIT load).

    python benchmarks/bench_permute.py [--repeats 3] [--pattern 2:4] [--skip-resnet]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import onnx

from nmcompile import graphio, modelzoo
from nmcompile.passes.base import CompileContext, PassManager
from nmcompile.passes.canonicalize import canonicalize_passes
from nmcompile.passes.nm_mask import NMMask
from nmcompile.passes.permute import PermuteChannels
from nmcompile.passes.targets import FindTargets
from nmcompile.patterns import parse_pattern

ROOT = Path(__file__).resolve().parent.parent


def run(path: Path, pattern, permute: PermuteChannels | None):
    """(ctx, seconds of the permute pass) after canonicalize, targets, [permute], nm-mask."""
    loaded = graphio.load_model(path)
    opts = SimpleNamespace(pattern=pattern, permute=permute is not None, exclude=(), progress=False, sequential=False, transposable=False, solver="auto")
    ctx = CompileContext(model=loaded, options=opts)
    PassManager(canonicalize_passes() + [FindTargets()])(ctx)
    seconds = 0.0
    if permute is not None:
        t = time.perf_counter()
        permute(ctx)
        seconds = time.perf_counter() - t
    NMMask()(ctx)
    return ctx, seconds


def kept(ctx, names=None) -> float:
    k = t = 0.0
    for name, row in ctx.layers.items():
        if "_l1" in row and (names is None or name in names):
            k += row["_l1"][0]
            t += row["_l1"][1]
    return k / t if t else float("nan")


def bench(label: str, path: Path, pattern, repeats: int) -> None:
    base, _ = run(path, pattern, None)
    start_only, _ = run(path, pattern, PermuteChannels(work_budget=0, min_rounds=0))
    _, first = run(path, pattern, PermuteChannels())  # also loads numba's cached kernels
    times, full = [], None
    for _ in range(repeats):
        full, sec = run(path, pattern, PermuteChannels())
        times.append(sec)
    permuted = {n for n, r in full.layers.items() if r.get("permute", {}).get("applied") and r["permute"].get("retained_before") is not None}
    size = 0
    for t in full.artifacts["targets"]:
        if t.name in permuted:
            n = 1
            for d in t.primary.eff_shape:
                n *= d
            size += n
    pruned = sum(1 for r in full.layers.values() if "_l1" in r)
    print(f"\n{label}: {pattern} on {pruned} pruned layers, {len(permuted)} permuted ({size / 1e6:.2f} M weights in them)")
    print(f"  {'':34s} {'permuted layers':>16s} {'all pruned layers':>18s}")
    for name, ctx in (("no permutation", base), ("round-robin start only", start_only), ("permute-channels (full search)", full)):
        print(f"  {name:34s} {kept(ctx, permuted):16.4%} {kept(ctx):18.4%}")
    gain = kept(full, permuted) - kept(base, permuted)
    print(f"  gain on the permuted layers: {gain * 100:+.3f} points of |w| kept")
    med = statistics.median(times)
    print(f"  permute-channels pass: median {med:.2f} s over {repeats} run(s) (first run in this process {first:.2f} s), {os.cpu_count()} CPUs")
    best = sorted(permuted, key=lambda n: full.layers[n]["permute"]["retained_after"] - full.layers[n]["permute"]["retained_before"], reverse=True)[:3]
    for n in best:
        r = full.layers[n]["permute"]
        print(f"    e.g. {n}: {r['retained_before']:.4f} -> {r['retained_after']:.4f} (producer {r['producer']})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    pattern = parse_pattern(args.pattern)
    bench("digits CNN (models/digits_cnn.onnx, trained)", ROOT / "models" / "digits_cnn.onnx", pattern, args.repeats)
    if not args.skip_resnet:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "resnet50.onnx"
            onnx.save(modelzoo.resnet50(), str(path))
            bench("ResNet-50 (modelzoo.resnet50(), random weights, BN folded)", path, pattern, args.repeats)


if __name__ == "__main__":
    main()
