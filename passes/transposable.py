"""Transposable N:M mask solvers.

A score matrix ``S`` of shape ``(R, C)`` (R output rows, C reduction columns,
both multiples of M) is cut into M×M tiles.  A *transposable* N:M mask keeps,
in every tile, exactly N entries in every row and exactly N in every column, so
that both ``W`` and ``W.T`` are N:M.  Each tile is solved independently to
maximise the sum of kept scores.

Solvers (``solver=``):

``"exact"``
    The optimum of every tile.  For small patterns (every M=4 pattern, and any
    (N, M) with M <= 6 and at most :data:`ENUM_LIMIT` valid tiles) the valid
    tiles are enumerated (computed, 2:4 has 90) and each tile picks the best,
    lowest index in :func:`enumerate_transposable_tiles` on ties; the search
    meets in the middle (best top half and best bottom half for each vector
    of column counts) instead of scoring all patterns.  Otherwise each tile is
    a transportation problem (a max-weight N-regular b-matching on the
    complete bipartite graph K_{M,M}), solved by successive shortest paths
    with node potentials: start from the row-wise top-N selection (optimal
    once column capacities are ignored, with explicit dual potentials), then
    move each surplus unit from an over-full column to an under-full one along
    a shortest path of reduced cost (Dijkstra).  The bipartite b-matching LP
    is integral, so this is the LP optimum (up to float64 rounding of sums).
``"greedy"``
    The seed paper's 2-approximation: visit entries in descending score order
    (ties: lower row-major index in the tile first) and keep an entry while its
    row and its column each hold fewer than N.  Rows/columns may end
    under-filled: the output is "at most N", not "exactly N".
``"approx"``
    ``greedy`` followed by a repair that fills every under-full row and column
    along augmenting paths (best direct fill, then best 3-edge path, then any
    BFS path), then :data:`TWO_OPT_PASSES` pass(es) of 2-opt swaps (the best
    improving 4-cycle for each pair of rows).  Always exactly N per row and
    column.  ~99.76% of the optimum on random |gaussian| 4:8 scores.
``"auto"``
    ``exact`` when the enumeration applies (always for M=4) or M <= 16 (exact
    runs at tens of M weights/s there); for M=32, ``exact`` while
    ``weights * M <= AUTO_EXACT_BUDGET`` (250 M weights), else ``approx``.

"At most N" (greedy's output, and the wording of the hardware rule) is a
relaxation of "exactly N": a greedy tile can keep *more* score than the
exactly-N optimum when its under-full rows and columns can only be completed
by dropping a kept entry (~2% of random 2:4 tiles).  So approx >= greedy
holds on totals, not on every tile; greedy is within 1/2 of the exactly-N
optimum on every tile.

All solvers are deterministic: tiles are independent, so splitting them across
threads (``numba.get_num_threads()`` Python threads running GIL-free numba
kernels) cannot change any result, and ties are broken by index.  Kernels are
compiled once per input dtype (float32 / float64) and cached on disk.
Scores may contain ties and zeros (and negative values, which are simply
maximised too); NaN / inf are rejected.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import numba
import numpy as np
from numba import njit

try:  # LLVM cttz; an internal numba helper, so keep a fallback
    from numba.cpython.unsafe.numbers import trailing_zeros
except ImportError:  # pragma: no cover
    @njit(cache=True, inline="always")
    def trailing_zeros(v):
        c = 0
        while (v & np.uint64(1)) == 0:
            v >>= np.uint64(1)
            c += 1
        return c

__all__ = [
    "AUTO_EXACT_BUDGET",
    "ENUM_LIMIT",
    "SOLVERS",
    "check_transposable",
    "count_transposable_tiles",
    "enumerate_transposable_tiles",
    "mask_diversity",
    "solve_tiles",
    "tile_optimality_gap",
    "transposable_mask",
]

SOLVERS = ("exact", "approx", "greedy", "auto")

#: Exact solves by enumeration when (N, M) has at most this many valid tiles
#: (M=4: 24, 90, 24; 1:5 and 4:5: 120).
ENUM_LIMIT = 128

#: ``auto`` picks ``exact`` for M > 16 only while weights * M stays below this
#: (the successive-shortest-path cost grows roughly linearly with M per weight).
AUTO_EXACT_BUDGET = 8_000_000_000

#: Maximum number of 2-opt passes over all row pairs in ``approx``.
TWO_OPT_PASSES = 1



# ---------------------------------------------------------------------------
# Counting and enumerating valid tiles
# ---------------------------------------------------------------------------


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise TypeError(f"n and m must be integers, got {n!r}, {m!r}")
    if not (0 < n < m <= 32):
        raise ValueError(f"need 0 < n < m <= 32, got n={n}, m={m}")


@cache
def count_transposable_tiles(n: int, m: int) -> int:
    """Number of m×m 0/1 matrices with every row and column sum equal to n
    (2:4 -> 90, 4:8 -> 116963796250).

    Dynamic programme over rows; the state is the multiset of column counts
    ``(a_0, ..., a_n)`` (a_k = columns already holding k ones), packed into
    one integer.  A row picks t_k columns from each class k (sum n) in
    prod C(a_k, t_k) ways, taken class by class from k = n-1 down so that
    states share work.  Only the top m//2 rows are run: the bottom half must
    produce the complementary column counts, and both halves have the same
    counts, so the total is sum_S W(S) W(S') / #vectors(S).  Uses
    count(n, m) == count(m - n, m) (complements).  Fast for m <= 16 (8:16
    takes about 2 s); for m = 32 only min(n, m - n) <= 4 is allowed (8:32
    already takes minutes), else ValueError.
    """
    if not (0 <= n <= m):
        return 0
    n = min(n, m - n)
    if n == 0:
        return 1
    if m > 16 and n > 4:
        raise ValueError(f"counting {n}:{m} transposable tiles is too expensive")
    B = m + 1
    P = [B**k for k in range(n + 2)]
    comb = [[math.comb(a, t) for t in range(a + 1)] for a in range(m + 1)]

    def half(h):
        states = {m * P[0]: 1}
        for r in range(h):
            cur = {st * (n + 1) + n: w for st, w in states.items()}  # (state, left)
            for k in range(n - 1, -1, -1):
                nxt: dict = {}
                pk = P[k]
                step = P[k + 1] - pk
                for key, w in cur.items():
                    st, left = divmod(key, n + 1)
                    ak = (st // pk) % B
                    lo = left if k == 0 else 0
                    cr = comb[ak]
                    for t in range(lo, min(left, ak) + 1):
                        nk = (st + t * step) * (n + 1) + (left - t)
                        nxt[nk] = nxt.get(nk, 0) + w * cr[t]
                cur = nxt
            rows_left = m - r - 1
            states = {}
            for key, w in cur.items():
                st = key // (n + 1)
                # a column holding k ones needs n - k more from rows_left rows
                if any((st // P[k]) % B for k in range(max(0, n - rows_left))):
                    continue
                states[st] = states.get(st, 0) + w
        return states

    h = m // 2
    top = half(h)
    bot = top if m - h == h else half(m - h)
    total = 0
    fm = math.factorial(m)
    for st, w in top.items():
        a = [(st // P[k]) % B for k in range(n + 1)]
        wb = bot.get(sum(a[k] * P[n - k] for k in range(n + 1)))
        if wb:
            nvec = fm
            for v in a:
                nvec //= math.factorial(v)
            total += w * wb // nvec
    return total


@cache
def _enum_tables(n: int, m: int):
    """Tables of the meet-in-the-middle enumeration solver.

    combos: (K, n) column indices of the n-subsets of range(m), lexicographic.
    The top h = m // 2 rows take a *prefix* (h combo indices) and the bottom
    m - h rows a *suffix*; a prefix's state is its vector of column counts
    and a suffix fits the prefixes of state s when its column counts are
    n minus s.  Prefixes and suffixes are listed lexicographically, so the
    valid patterns in lexicographic order of their m row combos are the
    pairs (prefix, fitting suffix) in lexicographic order.

    Returns (combos, pre, pre_state, suf, suf_state, nstates).
    """
    from itertools import combinations, product

    combos = [c for c in combinations(range(m), n)]
    K = len(combos)
    h = m // 2

    def counts(seq):
        c = [0] * m
        for k in seq:
            for j in combos[k]:
                c[j] += 1
        return tuple(c)

    states: dict = {}
    pre, pre_state = [], []
    for seq in product(range(K), repeat=h):
        c = counts(seq)
        if max(c) > n or min(c) < n - (m - h):
            continue
        s = states.setdefault(c, len(states))
        pre.append(seq)
        pre_state.append(s)
    suf, suf_state = [], []
    for seq in product(range(K), repeat=m - h):
        c = counts(seq)
        comp = tuple(n - v for v in c)
        s = states.get(comp)
        if s is None:
            continue
        suf.append(seq)
        suf_state.append(s)
    return (np.array(combos, dtype=np.int64).reshape(K, n),
            np.array(pre, dtype=np.int64).reshape(-1, h),
            np.array(pre_state, dtype=np.int64),
            np.array(suf, dtype=np.int64).reshape(-1, m - h),
            np.array(suf_state, dtype=np.int64),
            len(states))


def enumerate_transposable_tiles(n: int, m: int) -> np.ndarray:
    """All valid transposable N:M tiles as a (P, m, m) bool array, in
    lexicographic order of their rows' column subsets.  The exact
    enumeration solver breaks ties by the lowest index in this list.
    Only for small counts (see :func:`count_transposable_tiles`)."""
    _check_nm(n, m)
    cnt = count_transposable_tiles(n, m) if m <= 8 else None
    if cnt is None or cnt > 100_000:
        raise ValueError(f"{n}:{m} has {cnt} transposable tiles; too many to enumerate")
    combos, pre, pre_state, suf, suf_state, _ = _enum_tables(n, m)
    rows = np.zeros((combos.shape[0], m), dtype=bool)
    for k in range(combos.shape[0]):
        rows[k, combos[k]] = True
    out = []
    for p in range(pre.shape[0]):
        for q in np.flatnonzero(suf_state == pre_state[p]):
            out.append(np.concatenate([pre[p], suf[q]]))
    seqs = np.array(out, dtype=np.int64).reshape(-1, m)
    return rows[seqs]


# ---------------------------------------------------------------------------
# numba kernels.  Every kernel works on a 2-D C-contiguous score matrix
# S (R, C) and writes a bool mask of the same shape; tile t is at
# (t // (C // M), t % (C // M)).  A (T, M, M) batch is the (T*M, M) matrix.
# Per-tile work is independent, so the parallel loop is deterministic.
# ---------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _load_tile(S, r0, c0, M, w):
    for i in range(M):
        for j in range(M):
            # + 0.0 turns -0.0 into +0.0 (keys below see one zero)
            w[i * M + j] = S[r0 + i, c0 + j] + 0.0


@njit(cache=True, inline="always")
def _store_tile(out, r0, c0, M, x):
    for i in range(M):
        for j in range(M):
            out[r0 + i, c0 + j] = x[i * M + j] != 0


_SIGN = np.uint64(1) << np.uint64(63)
_LOWMASK = np.uint64(0x3FF)  # 10 bits: the index of an entry in a tile (K <= 1024)


@njit(cache=True, inline="always")
def _make_keys(wb, K, keys, packed):
    """Sort keys: ascending key = descending score.  ``wb`` holds the float64
    bits of the tile.  With ``packed`` (scores that came from float32, whose
    low 29 mantissa bits are zero) the entry index sits in the low 10 bits,
    so keys are unique and ties go to the lower index with one comparison."""
    for k in range(K):
        b = wb[k]
        if b & _SIGN:
            o = ~b
        else:
            o = b | _SIGN
        d = ~o
        if packed:
            keys[k] = (d & ~_LOWMASK) | np.uint64(k)
        else:
            keys[k] = d


@njit(cache=True, inline="always")
def _order_desc(keys, lo, K, order, packed):
    """order[r] = k for the entry k of rank r among keys[lo : lo + K]
    (ascending key = descending score; ties: lower index first).  Counting
    ranks is branch-free and vectorises, which beats sorting for K <= 1024."""
    if packed:
        for k in range(K):
            v = keys[lo + k]
            r = 0
            for l in range(K):
                r += keys[lo + l] < v
            order[r] = k
    else:
        for k in range(K):
            v = keys[lo + k]
            r = 0
            for l in range(k):
                r += keys[lo + l] <= v
            for l in range(k + 1, K):
                r += keys[lo + l] < v
            order[r] = k


_BLK = 64  # tiles of one strip scored together (SIMD across tiles)


@njit(cache=True, nogil=True)
def _enum_kernel(S, out, n, m, combos, pre, pre_state, suf, suf_state, nstates, j_lo, j_hi):
    """Meet-in-the-middle enumeration, vectorised across the tiles of a strip
    (m rows of S): for each block of up to _BLK tiles, row-combination sums
    rs[i, k, b]; the best prefix (top h rows) and best suffix (bottom rows)
    of every column-count state; then the best state.  Ties: lowest prefix
    index, then lowest suffix index = lowest pattern index."""
    R, C = S.shape
    tpr = C // m
    strips = R // m
    nblk = (tpr + _BLK - 1) // _BLK
    njobs = strips * nblk
    K = combos.shape[0]
    h = pre.shape[1]
    Pp = pre.shape[0]
    Ps = suf.shape[0]
    rs = np.empty((m, K, _BLK), np.float64)
    tb = np.empty((nstates, _BLK), np.float64)
    ta = np.empty((nstates, _BLK), np.int64)
    bb = np.empty((nstates, _BLK), np.float64)
    ba = np.empty((nstates, _BLK), np.int64)
    v = np.empty(_BLK, np.float64)
    best = np.empty(_BLK, np.float64)
    bta = np.empty(_BLK, np.int64)
    bst = np.empty(_BLK, np.int64)
    for job in range(j_lo, min(njobs, j_hi)):
        st = job // nblk
        b0 = (job % nblk) * _BLK
        nb = min(_BLK, tpr - b0)
        r0 = st * m
        for i in range(m):
            row = S[r0 + i]
            for k in range(K):
                for b in range(nb):
                    acc = 0.0
                    base = (b0 + b) * m
                    for q in range(n):
                        acc += row[base + combos[k, q]]
                    rs[i, k, b] = acc
        for s in range(nstates):
            for b in range(nb):
                tb[s, b] = -np.inf
                bb[s, b] = -np.inf
                ta[s, b] = 0
                ba[s, b] = 0
        for p in range(Pp):
            s = pre_state[p]
            for b in range(nb):
                v[b] = 0.0
            for r in range(h):
                kk = pre[p, r]
                for b in range(nb):
                    v[b] += rs[r, kk, b]
            for b in range(nb):
                better = v[b] > tb[s, b]
                tb[s, b] = v[b] if better else tb[s, b]
                ta[s, b] = p if better else ta[s, b]
        for p in range(Ps):
            s = suf_state[p]
            for b in range(nb):
                v[b] = 0.0
            for r in range(m - h):
                kk = suf[p, r]
                for b in range(nb):
                    v[b] += rs[h + r, kk, b]
            for b in range(nb):
                better = v[b] > bb[s, b]
                bb[s, b] = v[b] if better else bb[s, b]
                ba[s, b] = p if better else ba[s, b]
        for b in range(nb):
            best[b] = -np.inf
            bta[b] = Pp
            bst[b] = 0
        for s in range(nstates):
            for b in range(nb):
                tot = tb[s, b] + bb[s, b]
                better = (tot > best[b]) | ((tot == best[b]) & (ta[s, b] < bta[b]))
                best[b] = tot if better else best[b]
                bta[b] = ta[s, b] if better else bta[b]
                bst[b] = s if better else bst[b]
        for b in range(nb):
            c0 = (b0 + b) * m
            for i in range(m):
                for j in range(m):
                    out[r0 + i, c0 + j] = False
            pidx = bta[b]
            sidx = ba[bst[b], b]
            for r in range(h):
                kk = pre[pidx, r]
                for q in range(n):
                    out[r0 + r, c0 + combos[kk, q]] = True
            for r in range(m - h):
                kk = suf[sidx, r]
                for q in range(n):
                    out[r0 + h + r, c0 + combos[kk, q]] = True


@njit(cache=True)
def _ssp_tile(w, keys, packed, x, M, N, order, pr, pc, dr, dc, predr, predc, rowb, colb, colcnt):
    """Exact max-weight N-regular b-matching on one M×M tile (w row-major).

    Residual graph: row i -> col j when x[i,j]=0 (cost -w), col j -> row i
    when x[i,j]=1 (cost +w).  Reduced costs c(u,v) + pot(u) - pot(v) stay
    >= 0 (row potentials pr, column potentials pc).  Start: each row keeps
    its top N (pr[i] = its best unused score, pc = 0), which is optimal when
    column capacities are ignored; then every surplus unit moves from an
    over-full column to the nearest under-full column along a shortest
    path (Dijkstra over columns; rows are relaxed in passing), and the
    potentials move by min(dist, D) - D.  The kept sets live in bitmasks
    (rowb[i]: columns kept in row i; colb[j]: rows kept in column j).
    Returns False only if no path exists (impossible on K_{M,M}).
    """
    one = np.uint64(1)
    for i in range(M):
        _order_desc(keys, i * M, M, order, packed)
        b = np.uint64(0)
        for q in range(N):
            b |= one << np.uint64(order[q])
        rowb[i] = b
        pr[i] = w[i * M + order[N]]
    excess = 0
    for j in range(M):
        cb = np.uint64(0)
        c = 0
        for i in range(M):
            bit = (rowb[i] >> np.uint64(j)) & one
            cb |= bit << np.uint64(i)
            c += np.int64(bit)
        colb[j] = cb
        colcnt[j] = c
        pc[j] = 0.0
        if c > N:
            excess += c - N
    full = (one << np.uint64(M)) - one if M < 64 else ~np.uint64(0)
    while excess > 0:
        for v in range(M):
            dc[v] = np.inf
            dr[v] = np.inf
            predc[v] = -1
        for j in range(M):
            if colcnt[j] > N:
                dc[j] = 0.0
        U = full
        target = -1
        while U != 0:
            u = -1
            du = np.inf
            bb = U
            while bb != 0:
                v = np.int64(trailing_zeros(bb))
                bb &= bb - one
                if dc[v] < du:
                    du = dc[v]
                    u = v
            if u < 0:
                break
            U &= ~(one << np.uint64(u))
            if colcnt[u] < N:
                target = u
                break
            b = colb[u]
            while b != 0:
                i = np.int64(trailing_zeros(b))
                b &= b - one
                rc = w[i * M + u] + pc[u] - pr[i]
                nd = du + max(rc, 0.0)
                if nd < dr[i]:
                    dr[i] = nd
                    predr[i] = u
                    cbits = ~rowb[i] & U
                    while cbits != 0:
                        j = np.int64(trailing_zeros(cbits))
                        cbits &= cbits - one
                        rc2 = pr[i] - pc[j] - w[i * M + j]
                        nd2 = nd + max(rc2, 0.0)
                        if nd2 < dc[j]:
                            dc[j] = nd2
                            predc[j] = i
        if target < 0:
            return False
        D = dc[target]
        for v in range(M):
            if dc[v] < D:
                pc[v] += dc[v] - D
            if dr[v] < D:
                pr[v] += dr[v] - D
        v = target
        while True:
            i = predc[v]
            u = predr[i]
            rowb[i] ^= (one << np.uint64(v)) | (one << np.uint64(u))
            colb[v] |= one << np.uint64(i)
            colb[u] &= ~(one << np.uint64(i))
            v = u
            if predc[v] < 0:
                break
        colcnt[v] -= 1
        colcnt[target] += 1
        excess -= 1
    for i in range(M):
        for j in range(M):
            x[i * M + j] = (rowb[i] >> np.uint64(j)) & one
    return True


@njit(cache=True, nogil=True)
def _ssp_kernel(S, out, n, m, packed, t_lo, t_hi):
    R, C = S.shape
    tpr = C // m
    T = (R // m) * tpr
    K = m * m
    w = np.empty(K, np.float64)
    wb = w.view(np.uint64)
    keys = np.empty(K, np.uint64)
    x = np.empty(K, np.uint8)
    order = np.empty(m, np.int64)
    pr = np.empty(m, np.float64)
    pc = np.empty(m, np.float64)
    dr = np.empty(m, np.float64)
    dc = np.empty(m, np.float64)
    predr = np.empty(m, np.int64)
    predc = np.empty(m, np.int64)
    rowb = np.empty(m, np.uint64)
    colb = np.empty(m, np.uint64)
    colcnt = np.empty(m, np.int64)
    for t in range(t_lo, min(T, t_hi)):
        r0 = (t // tpr) * m
        c0 = (t % tpr) * m
        _load_tile(S, r0, c0, m, w)
        _make_keys(wb, K, keys, packed)
        _ssp_tile(w, keys, packed, x, m, n, order, pr, pc, dr, dc, predr, predc, rowb, colb, colcnt)
        _store_tile(out, r0, c0, m, x)


@njit(cache=True)
def _greedy_tile(keys, packed, x, M, N, order, rc, cc):
    """Seed-paper greedy: entries in descending score order (ties: lower
    row-major index), kept while row and column hold fewer than N."""
    K = M * M
    _order_desc(keys, 0, K, order, packed)
    for k in range(K):
        x[k] = 0
    for i in range(M):
        rc[i] = 0
        cc[i] = 0
    kept = 0
    full = N * M
    for k in range(K):
        e = order[k]
        i = e // M
        j = e - i * M
        keep = (rc[i] < N) & (cc[j] < N)  # branch-free: scores are random
        x[e] = keep
        rc[i] += keep
        cc[j] += keep
        kept += keep
        if kept == full:
            break
    return kept


@njit(cache=True)
def _repair_tile(w, x, M, N, rc, cc, kept, qbuf, pred, vis, bfval, bfidx):
    """Fill every under-full row/column of a partial b-matching (all counts
    <= N) until all counts are exactly N: best direct fill, else best
    3-edge augmenting path, else any augmenting path (BFS).  Returns False
    if stuck (cannot happen: an augmenting path always exists on K_{M,M})."""
    full = N * M
    while kept < full:
        # 1. best direct fill: deficit row i, deficit col j, x[i,j] = 0
        bi = -1
        bj = -1
        bv = -np.inf
        for i in range(M):
            if rc[i] < N:
                for j in range(M):
                    if cc[j] < N and x[i * M + j] == 0:
                        v = w[i * M + j]
                        if v > bv:
                            bv = v
                            bi = i
                            bj = j
        if bi >= 0:
            x[bi * M + bj] = 1
            rc[bi] += 1
            cc[bj] += 1
            kept += 1
            continue
        # 2. best 3-edge path: i (deficit) -> c (x[i,c]=0) -> r (x[r,c]=1)
        #    -> j (deficit, x[r,j]=0); bf[r] = best such j for row r
        for r in range(M):
            bfv = -np.inf
            bfj = -1
            for j in range(M):
                if cc[j] < N and x[r * M + j] == 0:
                    v = w[r * M + j]
                    if v > bfv:
                        bfv = v
                        bfj = j
            bfval[r] = bfv
            bfidx[r] = bfj
        bi = -1
        bc = -1
        br = -1
        bv = -np.inf
        for i in range(M):
            if rc[i] < N:
                for c in range(M):
                    if x[i * M + c] == 0:
                        for r in range(M):
                            if x[r * M + c] != 0 and bfidx[r] >= 0:
                                v = w[i * M + c] - w[r * M + c] + bfval[r]
                                if v > bv:
                                    bv = v
                                    bi = i
                                    bc = c
                                    br = r
        if bi >= 0:
            bj = bfidx[br]
            x[bi * M + bc] = 1
            x[br * M + bc] = 0
            x[br * M + bj] = 1
            rc[bi] += 1
            cc[bj] += 1
            kept += 1
            continue
        # 3. any augmenting path by BFS (nodes: cols 0..M-1, rows M..2M-1)
        V = 2 * M
        for v in range(V):
            pred[v] = -1
            vis[v] = 0
        qh = 0
        qt = 0
        for i in range(M):
            if rc[i] < N:
                vis[M + i] = 1
                qbuf[qt] = M + i
                qt += 1
        target = -1
        while qh < qt and target < 0:
            u = qbuf[qh]
            qh += 1
            if u >= M:
                i = u - M
                for j in range(M):
                    if x[i * M + j] == 0 and vis[j] == 0:
                        vis[j] = 1
                        pred[j] = u
                        if cc[j] < N:
                            target = j
                            break
                        qbuf[qt] = j
                        qt += 1
            else:
                for i in range(M):
                    if x[i * M + u] != 0 and vis[M + i] == 0:
                        vis[M + i] = 1
                        pred[M + i] = u
                        qbuf[qt] = M + i
                        qt += 1
        if target < 0:
            return False
        v = target
        while pred[v] >= 0:
            p = pred[v]
            if v < M:
                x[(p - M) * M + v] = 1
            else:
                x[(v - M) * M + p] = 0
            v = p
        rc[v - M] += 1
        cc[target] += 1
        kept += 1
    return True


@njit(cache=True, fastmath={"nnan", "nsz", "reassoc"})
def _two_opt_tile(w, x, M, max_passes):
    """For each pair of rows, the best swap (an improving 4-cycle): row r1
    gives column ca to r2 and takes column cb from it.  Repeated until a pass
    changes nothing or max_passes passes ran.  Row/column sums unchanged.
    (Scores are finite, so the no-NaN fast-math flags are safe; they let the
    max-reductions vectorise.)"""
    for _ in range(max_passes):
        improved = False
        for r1 in range(M - 1):
            for r2 in range(r1 + 1, M):
                ga = -np.inf
                gb = -np.inf
                for c in range(M):
                    a = x[r1 * M + c]
                    b = x[r2 * M + c]
                    d = w[r2 * M + c] - w[r1 * M + c]
                    ga = max(ga, d if a > b else -np.inf)
                    gb = max(gb, -d if b > a else -np.inf)
                if ga + gb > 0.0:
                    ca = -1
                    cb = -1
                    for c in range(M):
                        a = x[r1 * M + c]
                        b = x[r2 * M + c]
                        d = w[r2 * M + c] - w[r1 * M + c]
                        if ca < 0 and a > b and d == ga:
                            ca = c
                        if cb < 0 and b > a and -d == gb:
                            cb = c
                    if ca >= 0 and cb >= 0:
                        x[r1 * M + ca] = 0
                        x[r2 * M + ca] = 1
                        x[r2 * M + cb] = 0
                        x[r1 * M + cb] = 1
                        improved = True
        if not improved:
            break


@njit(cache=True, nogil=True)
def _greedy_kernel(S, out, n, m, packed, repair, two_opt_passes, t_lo, t_hi):
    R, C = S.shape
    tpr = C // m
    T = (R // m) * tpr
    K = m * m
    w = np.empty(K, np.float64)
    wb = w.view(np.uint64)
    keys = np.empty(K, np.uint64)
    x = np.empty(K, np.uint8)
    order = np.empty(K, np.int64)
    rc = np.empty(m, np.int64)
    cc = np.empty(m, np.int64)
    qbuf = np.empty(2 * m, np.int64)
    pred = np.empty(2 * m, np.int64)
    vis = np.empty(2 * m, np.uint8)
    f1 = np.empty(m, np.float64)
    f2 = np.empty(m, np.float64)
    f3 = np.empty(m, np.float64)
    f4 = np.empty(m, np.float64)
    i1 = np.empty(m, np.int64)
    i2 = np.empty(m, np.int64)
    ub1 = np.empty(m, np.uint64)
    ub2 = np.empty(m, np.uint64)
    for t in range(t_lo, min(T, t_hi)):
        r0 = (t // tpr) * m
        c0 = (t % tpr) * m
        _load_tile(S, r0, c0, m, w)
        _make_keys(wb, K, keys, packed)
        kept = _greedy_tile(keys, packed, x, m, n, order, rc, cc)
        if repair:
            if not _repair_tile(w, x, m, n, rc, cc, kept, qbuf, pred, vis, f1, i1):
                # unreachable in theory; never emit an invalid tile
                _ssp_tile(w, keys, packed, x, m, n, order, f1, f2, f3, f4, i1, i2, ub1, ub2, cc)
            elif two_opt_passes > 0:
                _two_opt_tile(w, x, m, two_opt_passes)
        _store_tile(out, r0, c0, m, x)


# ---------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------


def _as_scores(scores) -> np.ndarray:
    a = np.asarray(scores)
    if a.dtype not in (np.float32, np.float64):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"scores must be real numbers, got dtype {a.dtype}")
        a = a.astype(np.float64)
    a = np.ascontiguousarray(a)
    if a.size and not np.isfinite(a).all():
        raise ValueError("scores contain NaN or inf")
    return a


def _use_enum(n: int, m: int) -> bool:
    return m <= 6 and count_transposable_tiles(n, m) <= ENUM_LIMIT


def _resolve_solver(solver: str, n: int, m: int, size: int) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if solver != "auto":
        return solver
    if _use_enum(n, m) or m <= 16 or size * m <= AUTO_EXACT_BUDGET:
        return "exact"
    return "approx"


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
#: Smallest number of work items (tiles, or blocks of tiles) worth a thread.
_MIN_ITEMS_PER_THREAD = 256


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                       thread_name_prefix="nmcompile-transposable")
        return _POOL


def _run(kernel, items: int, *args) -> None:
    """kernel(*args, lo, hi) over [0, items), split across
    ``numba.get_num_threads()`` threads (the kernels release the GIL).
    Items are independent, so the split never changes the result."""
    threads = max(1, min(numba.get_num_threads(), items // _MIN_ITEMS_PER_THREAD))
    if threads == 1:
        kernel(*args, 0, items)
        return
    # many parts, so a thread slowed by other load takes fewer of them
    parts = max(threads, min(16 * threads, items // _MIN_ITEMS_PER_THREAD))
    bounds = [items * k // parts for k in range(parts + 1)]
    futures = [_pool().submit(kernel, *args, bounds[k], bounds[k + 1]) for k in range(parts)]
    for f in futures:
        f.result()


def _solve_2d(S: np.ndarray, n: int, m: int, solver: str) -> np.ndarray:
    """S: C-contiguous float32/float64 (R, C), R and C multiples of m."""
    solver = _resolve_solver(solver, n, m, S.size)
    out = np.empty(S.shape, dtype=np.bool_)
    if S.size == 0:
        return out
    # float32 scores: exact packed sort keys (see _make_keys)
    packed = S.dtype == np.float32
    R, C = S.shape
    tiles = (R // m) * (C // m)
    if solver == "exact":
        if _use_enum(n, m):
            jobs = (R // m) * (-(-(C // m) // _BLK))
            _run(_enum_kernel, jobs, S, out, n, m, *_enum_tables(n, m))
        else:
            _run(_ssp_kernel, tiles, S, out, n, m, packed)
    elif solver == "approx":
        _run(_greedy_kernel, tiles, S, out, n, m, packed, True, TWO_OPT_PASSES)
    else:  # greedy
        _run(_greedy_kernel, tiles, S, out, n, m, packed, False, 0)
    return out


def solve_tiles(tiles, n: int, solver: str = "exact") -> np.ndarray:
    """Solve a (T, M, M) batch of score tiles; returns a (T, M, M) bool mask
    with exactly ``n`` kept per row and column of every tile (``greedy``: at
    most ``n``)."""
    a = _as_scores(tiles)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"tiles must have shape (T, M, M), got {a.shape}")
    T, m, _ = a.shape
    _check_nm(n, m)
    n, m = int(n), int(m)
    if _resolve_solver(solver, n, m, a.size) == "exact" and _use_enum(n, m):
        # the enumeration kernel scores the tiles of a strip together: lay the
        # batch out as one (m, T*m) strip (a copy), and back
        strip = np.ascontiguousarray(a.transpose(1, 0, 2)).reshape(m, T * m)
        out = _solve_2d(strip, n, m, "exact")
        return np.ascontiguousarray(out.reshape(m, T, m).transpose(1, 0, 2))
    # (T, m, m) is the (T*m, m) matrix: no copy
    return _solve_2d(a.reshape(T * m, m), n, m, solver).reshape(T, m, m)


def transposable_mask(scores, n: int, m: int, solver: str = "exact") -> np.ndarray:
    """Transposable N:M mask of a (R, C) score matrix (R, C multiples of m):
    in every m×m tile exactly n kept per row and per column, maximising the
    kept score (``solver="exact"``) or approximately so.  Returns bool (R, C)."""
    _check_nm(n, m)
    a = _as_scores(scores)
    if a.ndim != 2 or a.shape[0] % m or a.shape[1] % m:
        raise ValueError(f"scores shape {a.shape} is not tileable by {m}x{m} tiles")
    return _solve_2d(a, int(n), int(m), solver)


def check_transposable(mask, n: int, m: int, exact: bool = True) -> bool:
    """True if every m×m tile of the (R, C) mask has exactly n (or, with
    ``exact=False``, at most n) kept in every row and column."""
    mk = np.asarray(mask, dtype=bool)
    R, C = mk.shape
    if R % m or C % m:
        return False
    t = mk.reshape(R // m, m, C // m, m)
    rows = t.sum(axis=3)
    cols = t.sum(axis=1)
    if exact:
        return bool((rows == n).all() and (cols == n).all())
    return bool((rows <= n).all() and (cols <= n).all())


def tile_optimality_gap(scores, mask, n: int, m: int) -> float:
    """Retained score of ``mask`` relative to the exact transposable optimum
    (1.0 = optimal).  Returns 1.0 when the optimum is 0 (all-zero scores)."""
    a = _as_scores(scores)
    mk = np.asarray(mask, dtype=bool)
    if mk.shape != a.shape:
        raise ValueError(f"mask shape {mk.shape} != scores shape {a.shape}")
    best = transposable_mask(a, n, m, solver="exact")
    opt = float(a[best].sum(dtype=np.float64))
    got = float(a[mk].sum(dtype=np.float64))
    if opt == 0.0:
        return 1.0
    return got / opt


def mask_diversity(n: int, m: int, transposable: bool, weights: int = 64,
                   *, unstructured: bool = False) -> int | None:
    """Number of valid masks for ``weights`` weights.

    - ``unstructured=True``: any mask at density n/m: C(weights, weights*n/m).
    - ``transposable=True``: (#M×M 0/1 matrices with all row/col sums N) **
      (weights / M²).
    - otherwise plain N:M: C(m, n) ** (weights / m).

    Returns None when the weights don't tile (e.g. 16:32-T at 64 weights).
    """
    if not (0 < n < m):
        raise ValueError(f"need 0 < n < m, got n={n}, m={m}")
    if unstructured:
        if (weights * n) % m:
            return None
        return math.comb(weights, weights * n // m)
    if transposable:
        if weights % (m * m):
            return None
        return count_transposable_tiles(n, m) ** (weights // (m * m))
    if weights % m:
        return None
    return math.comb(m, n) ** (weights // m)
