"""Transposable N:M mask solvers: throughput and retained L1.

    python benchmarks/bench_transposable.py [--rows 4992 --cols 5008] [--repeats 3]

One random |gaussian| float32 matrix (default 4992 x 5008 = 25.0 M weights,
tileable by 4, 8 and 16).  For 2:4-T, 4:8-T and 8:16-T it prints weights/s
(median of --repeats runs, after a warm-up that compiles / loads the numba
cache) and the retained L1 relative to the exact optimum for:

  lp      scipy linprog (HiGHS) per tile, on a random sample of tiles
  greedy  the seed paper's greedy (rows/columns may stay under-filled)
  approx  greedy + repair + one 2-opt pass (exactly N per row/column)
  exact   enumeration (2:4) / successive shortest paths (M >= 8)

and the wall time of ``transposable_mask`` on the whole matrix at 4:8-T exact.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
from nmcompile.passes.transposable import check_transposable, transposable_mask
from scipy.optimize import linprog

PATTERNS = [(2, 4), (4, 8), (8, 16)]
LP_SAMPLE = {4: 400, 8: 200, 16: 40}


def timed(fn, repeats):
    out = None
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def lp_tile(tile: np.ndarray, n: int) -> np.ndarray:
    m = tile.shape[0]
    a = np.zeros((2 * m, m * m))
    for i in range(m):
        a[i, i * m:(i + 1) * m] = 1.0  # row i
        a[m + i, i::m] = 1.0  # column i
    res = linprog(-tile.reshape(-1).astype(np.float64), A_eq=a, b_eq=np.full(2 * m, float(n)),
                  bounds=(0, 1), method="highs")
    assert res.status == 0, res.message
    return (res.x > 0.5).reshape(m, m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4992)
    ap.add_argument("--cols", type=int, default=5008)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    s = np.abs(rng.standard_normal((args.rows, args.cols), dtype=np.float32))
    size = s.size
    print(f"matrix {args.rows} x {args.cols} = {size / 1e6:.1f} M weights, float32 |N(0,1)|; "
          f"numba threads {numba.get_num_threads()}, cpus {os.cpu_count()}, "
          f"load avg {os.getloadavg()[0]:.2f}; medians of {args.repeats} runs")

    # warm-up: compile or load every kernel used below
    small = s[:64, :64].copy()
    for n, m in PATTERNS:
        for solver in ("exact", "approx", "greedy"):
            transposable_mask(small, n, m, solver)

    rows = []
    exact_48_time = None
    for n, m in PATTERNS:
        if args.rows % m or args.cols % m:
            print(f"skip {n}:{m}-T: shape not tileable")
            continue
        exact, t_exact = timed(lambda n=n, m=m: transposable_mask(s, n, m, "exact"), args.repeats)
        assert check_transposable(exact, n, m)
        opt = float(s[exact].sum(dtype=np.float64))
        if (n, m) == (4, 8):
            exact_48_time = t_exact

        # per-tile LP on a sample of tiles
        tr, tc = args.rows // m, args.cols // m
        k = min(LP_SAMPLE.get(m, 40), tr * tc)
        idx = rng.choice(tr * tc, size=k, replace=False)
        tiles = [(int(t // tc) * m, int(t % tc) * m) for t in idx]
        t0 = time.perf_counter()
        lp_masks = [lp_tile(s[r:r + m, c:c + m], n) for r, c in tiles]
        t_lp = time.perf_counter() - t0
        lp_kept = sum(float(s[r:r + m, c:c + m][mk].sum(dtype=np.float64))
                      for (r, c), mk in zip(tiles, lp_masks))
        ex_kept = sum(float(s[r:r + m, c:c + m][exact[r:r + m, c:c + m]].sum(dtype=np.float64))
                      for r, c in tiles)
        rows.append((f"{n}:{m}-T", f"lp (HiGHS, {k} tiles)", k * m * m / t_lp, lp_kept / ex_kept, "yes"))

        for solver in ("greedy", "approx"):
            mask, t = timed(lambda n=n, m=m, sv=solver: transposable_mask(s, n, m, sv), args.repeats)
            kept = float(s[mask].sum(dtype=np.float64))
            valid = "yes" if check_transposable(mask, n, m) else "<= N"
            rows.append((f"{n}:{m}-T", solver, size / t, kept / opt, valid))
        rows.append((f"{n}:{m}-T", "exact", size / t_exact, 1.0, "yes"))

    w = [8, 22, 14, 16, 10]
    head = ("pattern", "solver", "M weights/s", "retained L1", "exactly N")
    line = "  ".join(h.ljust(x) if i < 2 else h.rjust(x) for i, (h, x) in enumerate(zip(head, w)))
    print()
    print(line)
    print("-" * len(line))
    last = None
    for pat, solver, wps, ret, valid in rows:
        if last is not None and pat != last:
            print()
        last = pat
        print("  ".join([pat.ljust(w[0]), solver.ljust(w[1]), f"{wps / 1e6:.3f}".rjust(w[2])
                         if wps < 1e6 else f"{wps / 1e6:.1f}".rjust(w[2]),
                         f"{100 * ret:.3f}%".rjust(w[3]), valid.rjust(w[4])]))
    print()
    print("retained L1: kept |score| / exact optimum (lp row: on its sample of tiles)")
    if exact_48_time is not None:
        print(f"4:8-T exact, whole {size / 1e6:.1f} M-weight matrix: {exact_48_time:.2f} s "
              f"(transposable_mask end to end)")


if __name__ == "__main__":
    main()
