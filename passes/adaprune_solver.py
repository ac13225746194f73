"""AdaPrune: re-fit the surviving weights of a pruned layer by least squares.

The problem, for one layer (or one group of a grouped convolution)::

    W   (O, K)  dense weights, rows = outputs. For a conv weight [O, C/G, kh, kw]
                of one group this is ``W.reshape(O, -1)`` (channel-major, then kh, kw);
                the N:M helpers group *consecutive* columns, so permute conv
                columns with ``channel_last_order`` first (groups along channels)
    S   (O, K)  bool mask, True = the weight survives
    H   (K, K)  Gram matrix of the layer's inputs on calibration data, H = X Xᵀ
                (X is (K, samples); see ``nmcompile.passes.statistics``)

    minimise over W':   ‖W X − (S ⊙ W') X‖²  =  Σ_rows (w − w') H (w − w')ᵀ

Rows are independent. For a row with support ``s`` (kept) and ``p`` (pruned) write
``w' = w_s + δ`` on ``s`` and ``e = w ⊙ ¬S`` (the pruned part of the row). The
optimum solves the small system ``H_ss δ = (H e)_s`` (equivalently
``w'_s = H_ss⁻¹ (H w)_s``).

Damping. Every solver here uses ``Hd = H + λI`` with ``λ = damp · mean(diag H)``
(``damp`` defaults to 0.01, SparseGPT's default). In the δ form above this is the
exact minimiser of ``(w − w') H (w − w')ᵀ + λ ‖w − w'‖²``: it shrinks the update
toward the plain masked weights (not toward zero, as damping ``H_ss`` in the
``H_ss⁻¹ (H w)_s`` form would), it keeps the systems positive definite when inputs
are dead (ReLU) or there are fewer samples than features, and it is the same
objective as the OBS / SparseGPT update below, so all solvers agree on what they
minimise. ``damp=0`` gives the undamped least-squares optimum (equal to
``np.linalg.lstsq`` on the explicit X when ``H_ss`` is non-singular).

Solvers (all exact for their stated problem; only the first two are the AdaPrune
optimum):

* ``adaprune_rows(..., method="direct")``: one dense solve per row. Rows with the
  same support size (every row of an N:M mask) are stacked into (B, s, s) systems
  solved by LAPACK, one single-threaded call per worker thread. Exact to rounding;
  ~(2/3)·O·s³ flops: the right tool for s ≲ 160.
* ``adaprune_rows(..., method="cg")``: the same optimum by preconditioned
  conjugate gradients on all rows at once: one (O, K)×(K, K) float32 product per
  iteration, per-row step sizes, each row stopped when a step lowers its objective
  by less than ``tol`` (1e-6) of it. Preconditioner: diagonal + top-64 eigen-part
  of H restricted to each row's support (Woodbury). ~10–25 iterations on
  correlated activations, so ~40·O·K² flops: ~10× cheaper than direct at K = 3072.
* ``method="auto"``: direct when the support is ≤ 160, else CG.
* ``obs_prune_update``: SparseGPT's column sweep, one shared factorisation of
  Hd⁻¹ (upper Cholesky factor), fixed mask. ~(2/3)K³ + 2·O·K² flops, but a weight
  only compensates on the columns to its right: on correlated activations its
  error is 1.6–1.8× the exact optimum's, and it can even be worse than plain
  masking (rows where it is are reset to the masked weights: ``safeguard``).
* ``sparsegpt_mask_and_update``: the sweep choosing each N:M group's mask on the
  fly, per weight (SparseGPT) or jointly per group (``select="group"``).
  Measured: its *mask* followed by the exact re-fit beats every static score.

Mask scores for calibration-aware masks: ``saliency`` (magnitude, activation,
obs) with ``nm_mask_from_scores``, and ``best_group_mask_exact`` (all C(M, N)
keep sets per group against a group-local error model).

Threads: large products run through ``parallel_matmul`` (rows split over worker
threads, BLAS single-threaded inside each): on a busy machine OpenBLAS's own
threading stalls badly, this does not.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import scipy.linalg

__all__ = [
    "damping",
    "adaprune_rows",
    "obs_prune_update",
    "sparsegpt_mask_and_update",
    "saliency",
    "nm_mask_from_scores",
    "best_group_mask_exact",
    "reconstruction_error",
    "quadratic_trace",
    "trace_of_product",
    "bias_correction",
    "inverse_cholesky_upper",
    "top_eigenpairs",
    "parallel_matmul",
    "blas_single_thread",
    "cpu_workers",
    "channel_last_order",
]

# Byte budget for the stacked (B, s, s) systems of the direct solver.
_DIRECT_BATCH_BYTES = 64 << 20
# Byte budget for the CG solver's per-row work arrays (rows are done in blocks).
_CG_BLOCK_BYTES = 32 << 20


# --------------------------------------------------------------------------- helpers


def _check(W: np.ndarray, H: np.ndarray, mask: np.ndarray | None = None) -> None:
    if W.ndim != 2:
        raise ValueError(f"W must be 2-D (O, K), got shape {W.shape}")
    K = W.shape[1]
    if H.shape != (K, K):
        raise ValueError(f"H must be ({K}, {K}) for W of shape {W.shape}, got {H.shape}")
    if mask is not None and mask.shape != W.shape:
        raise ValueError(f"mask shape {mask.shape} differs from W shape {W.shape}")


def _out_dtype(W: np.ndarray) -> np.dtype:
    return W.dtype if np.issubdtype(W.dtype, np.floating) else np.dtype(np.float64)


def cpu_workers() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


_CONTROLLER = None


@contextlib.contextmanager
def blas_single_thread():
    """Limit BLAS/LAPACK to one thread while we parallelise over threads ourselves.

    Measured on the shared 2-core machine this was written on: OpenBLAS's own
    threading collapses when the cores are busy (a 147×25088 SYRK took 0.6 s
    instead of 0.03 s; 384×384 solves 59 ms instead of 1.6 ms), while one
    single-threaded BLAS call per worker thread degrades gracefully and matches
    it on idle cores. No-op without threadpoolctl."""
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - optional dependency
        yield
        return
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(cpu_workers(), thread_name_prefix="nmcompile-blas")
        return _POOL


def parallel_matmul(A: np.ndarray, B: np.ndarray, out: np.ndarray | None = None,
                    workers: int | None = None) -> np.ndarray:
    """``A @ B`` with the rows of A split over worker threads, each running
    single-threaded BLAS (see ``blas_single_thread``). Small products run in the
    calling thread.

    The split depends on A's shape only (up to ``_MATMUL_PARTS`` parts of at
    least 32 rows), never on the number of workers: BLAS may round a row
    differently in a call with more or fewer rows, and results must not depend
    on the machine's core count."""
    n = A.shape[0]
    work = float(n) * A.shape[1] * B.shape[1]
    parts = 1 if work < 4e6 else min(_MATMUL_PARTS, max(1, n // 32))
    if out is None:
        out = np.empty((n, B.shape[1]), dtype=np.result_type(A, B))
    nw = min(workers or cpu_workers(), parts)
    bounds = np.linspace(0, n, parts + 1).astype(int)
    with blas_single_thread():
        if nw <= 1:
            for i in range(parts):
                np.matmul(A[bounds[i]:bounds[i + 1]], B, out=out[bounds[i]:bounds[i + 1]])
            return out
        futures = [_pool().submit(np.matmul, A[bounds[i]:bounds[i + 1]], B,
                                  out=out[bounds[i]:bounds[i + 1]]) for i in range(parts)]
        for f in futures:
            f.result()
    return out


# Row parts of a large product: as many as the cores this project targets use
# well, fixed so that the rounding does not depend on the core count.
_MATMUL_PARTS = 4


def _single_threaded(fn):
    """Run ``fn`` with BLAS limited to one thread (parallel_matmul and the direct
    solver add threads of their own)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with blas_single_thread():
            return fn(*args, **kwargs)
    return wrapper


def damping(H: np.ndarray, damp: float) -> float:
    """λ = damp · mean(diag H). Zero when H is zero (nothing to fit)."""
    if damp < 0:
        raise ValueError("damp must be >= 0")
    d = float(np.mean(np.diag(H))) if H.size else 0.0
    return damp * d if d > 0 else 0.0


def _damped(H: np.ndarray, damp: float) -> np.ndarray:
    return damp_in_place(np.array(H, dtype=np.float64, copy=True), damp)


def damp_in_place(Hd: np.ndarray, damp: float) -> np.ndarray:
    """Hd + λI, written into Hd (a K×K copy less for the widest layers)."""
    lam = damping(Hd, damp)
    diag = np.einsum("ii->i", Hd)  # a writable view of the diagonal
    diag += lam
    # Dead inputs (zero variance) with damp=0: their weights cannot matter to the
    # output; a unit diagonal keeps the factorisations defined (SparseGPT does this).
    diag[diag <= 0] = 1.0
    return Hd


def _reverse_in_place(a: np.ndarray) -> None:
    """a ← J a J (J the reversal permutation) by swapping rows, without a K×K temporary."""
    K = a.shape[0]
    for i in range(K // 2):
        j = K - 1 - i
        row = a[i, ::-1].copy()
        a[i] = a[j, ::-1]
        a[j] = row
    if K % 2:
        a[K // 2] = a[K // 2, ::-1].copy()


@_single_threaded
def inverse_cholesky_upper(Hd: np.ndarray, overwrite: bool = False) -> np.ndarray:
    """Upper triangular U with ``Hd⁻¹ = Uᵀ U`` (SparseGPT's ``Hinv``).

    Computed as J·inv(chol(J Hd J))·J with J the reversal permutation: one Cholesky
    and one triangular inverse (≈ 2/3 K³ flops) instead of SparseGPT's Cholesky,
    inverse and second Cholesky. Row i of U, divided by U[i, i], is the OBS
    compensation direction of column i given that columns < i are frozen, and
    U[i, i]² = [H_F⁻¹]_ii for F = {i, …, K−1}.

    ``overwrite``: Hd (C-contiguous float32/64) becomes the workspace and U is a
    reversed view of it: one K×K array in all, where the copying path holds three.
    """
    if overwrite and Hd.flags.c_contiguous and Hd.dtype in (np.float32, np.float64):
        _reverse_in_place(Hd)
        # Hd is symmetric: its transpose is the same matrix in Fortran order, which
        # LAPACK factors in place.
        potrf, trtri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "trtri"), (Hd,))
        L, info = potrf(Hd.T, lower=1, clean=1, overwrite_a=1)
        if info != 0:
            raise np.linalg.LinAlgError("Gram matrix is not positive definite; use damp > 0")
        Linv, info = trtri(L, lower=1, overwrite_c=1)
        if info != 0:  # pragma: no cover
            raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
        return Linv[::-1, ::-1]
    Hr = np.array(Hd[::-1, ::-1], order="C", copy=True)  # ascontiguousarray may return Hd itself (1×1)
    try:
        L = scipy.linalg.cholesky(Hr, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError as e:  # pragma: no cover - message only
        raise np.linalg.LinAlgError(
            "Gram matrix is not positive definite; use damp > 0") from e
    Linv, info = scipy.linalg.lapack.dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:  # pragma: no cover
        raise np.linalg.LinAlgError(f"triangular inverse failed (info={info})")
    return np.ascontiguousarray(Linv[::-1, ::-1])


# --------------------------------------------------------------------------- AdaPrune


@_single_threaded
def adaprune_rows(
    W: np.ndarray,
    mask: np.ndarray,
    H: np.ndarray,
    damp: float = 0.01,
    method: Literal["auto", "direct", "cg"] = "auto",
    tol: float = 1e-6,
    max_iter: int = 500,
    x0: np.ndarray | None = None,
    info: dict | None = None,
) -> np.ndarray:
    """Exact AdaPrune re-fit: the optimum of ``Σ_rows (w−w')Hd(w−w')ᵀ`` over ``w'``
    supported on ``mask`` (``Hd = H + damp·mean(diag H)·I``).

    Returns ``W'`` with the dtype of W (float64 for non-float W), zero off the mask.
    ``method``: "direct" (stacked dense solves, exact to rounding), "cg" (conjugate
    gradients over all rows, converged until one step lowers a row's objective by
    less than ``tol`` of it; started from ``x0`` or the masked weights), "auto"
    (direct for supports ≤ 160, else CG). If ``info`` is a dict it receives
    ``method`` and, for CG, ``iterations``, ``row_iterations`` (row products, the
    work done) and ``rank`` (of the preconditioner).
    """
    W = np.asarray(W)
    mask = np.asarray(mask, dtype=bool)
    H = np.asarray(H)
    _check(W, H, mask)
    out_dtype = _out_dtype(W)
    O, K = W.shape
    if O == 0 or K == 0:
        return np.zeros(W.shape, out_dtype)
    lam = damping(H, damp)
    if np.all(mask):
        return W.astype(out_dtype)
    if lam == 0.0 and not np.any(H):
        # No signal: every W' gives zero error; keep the masked weights.
        return np.where(mask, W, 0).astype(out_dtype)
    if method == "auto":
        method = _choose_method(mask, K)
    if info is not None:
        info["method"] = method
    if method == "direct":
        Wn = _direct(W.astype(np.float64), mask, H, lam)
    elif method == "cg":
        # W as given: CG converts one block of rows at a time to float64 and
        # writes its result in W's dtype (no whole-layer float64 copies)
        Wn = _cg(W, mask, H, damp, lam, tol, max_iter, x0, info, out_dtype=out_dtype)
    else:
        raise ValueError(f"unknown method {method!r}")
    return Wn.astype(out_dtype, copy=False)


def _choose_method(mask: np.ndarray, K: int) -> str:
    """Direct for small supports, CG otherwise. Measured (2 cores, 2:4): the two
    tie around K = 256 (s = 128); at K = 768 CG is ~2.4× faster, at K = 3072
    direct costs ~(2/3)·s³ per row and CG ~10× less."""
    s = int(mask.sum(axis=1).max()) if mask.size else 0
    return "direct" if s <= 160 else "cg"


def _direct(W: np.ndarray, mask: np.ndarray, H: np.ndarray, lam: float) -> np.ndarray:
    O, K = W.shape
    H = np.ascontiguousarray(H, dtype=np.float64)
    E = np.where(mask, 0.0, W)  # pruned part of each row
    rhs_full = parallel_matmul(E, H)  # (O, K): row r's right-hand side is rhs_full[r, s_r]
    out = np.where(mask, W, 0.0)
    sizes = mask.sum(axis=1)
    nw = cpu_workers()
    tasks = []
    for s in np.unique(sizes):
        s = int(s)
        if s == 0:
            continue
        rows = np.flatnonzero(sizes == s)
        B = max(1, min(-(-len(rows) // nw), _DIRECT_BATCH_BYTES // (nw * 8 * s * s)))
        tasks += [(s, rows[b0:b0 + B]) for b0 in range(0, len(rows), B)]

    def solve(task):
        s, r = task
        # support indices of these rows, (b, s), ascending
        ix = np.nonzero(mask[r])[1].reshape(len(r), s)
        A = H[ix[:, :, None], ix[:, None, :]]  # (b, s, s) gather
        if lam:
            A += lam * np.eye(s)
        rhs = np.take_along_axis(rhs_full[r], ix, axis=1)  # (b, s)
        try:
            delta = np.linalg.solve(A, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:
            # singular (damp=0 with dead or collinear inputs): minimum-norm
            # least squares per row
            delta = np.stack([np.linalg.lstsq(A[j], rhs[j], rcond=None)[0]
                              for j in range(len(r))])
        rowblock = out[r]  # fancy indexing: a copy, written back below
        cur = np.take_along_axis(rowblock, ix, axis=1)
        np.put_along_axis(rowblock, ix, cur + delta, axis=1)
        out[r] = rowblock  # row sets of the tasks are disjoint

    with blas_single_thread():
        if nw == 1 or len(tasks) == 1:
            for t in tasks:
                solve(t)
        else:
            with ThreadPoolExecutor(nw) as ex:
                list(ex.map(solve, tasks))
    return out


@_single_threaded
def top_eigenpairs(H: np.ndarray, k: int, power_iters: int = 2, oversample: int = 16,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Approximate top-``k`` eigenpairs (ascending values, (K, k) vectors) of the
    symmetric PSD ``H`` by randomized subspace iteration: ~2(2q+1)·K²·(k+p) flops."""
    K = H.shape[0]
    k = min(k, K)
    rng = np.random.default_rng(seed)
    # vectors in H's precision: a float64 operand would make BLAS copy a float32 H
    Y = parallel_matmul(H, rng.standard_normal((K, min(K, k + oversample))).astype(H.dtype))
    for _ in range(power_iters):
        Y, _ = np.linalg.qr(Y)
        Y = parallel_matmul(H, Y)
    Q, _ = np.linalg.qr(Y)
    ev, U = np.linalg.eigh((Q.T @ parallel_matmul(H, Q)).astype(np.float64))
    return ev[-k:], Q.astype(np.float64) @ U[:, -k:]


def _cg(W, mask, H, damp, lam, tol, max_iter, x0, info=None, rank=None, out_dtype=np.float64):
    """Preconditioned CG on all rows at once.

    Unknown D = W' − S⊙W (zero off the mask); operator A(V) = S ⊙ (V Hd); right-hand
    side b = S ⊙ (E H) with E = W ⊙ ¬S. The product V·H, the only O(O·K²) step, is
    done in float32 (vectors, step sizes and the stopping test stay float64: the
    objective's excess over the optimum stays ~1e-6 relative, measured); a
    ``tol`` below 1e-9 switches the product to float64.

    Preconditioner: per row the restriction to its support of M = D + V Λ Vᵀ,
    where V Λ Vᵀ is H's top-``rank`` eigen-part (randomized) and D the rest of the
    diagonal, applied by the Woodbury identity with one (rank × rank) matrix per
    row (rank 64 for K ≥ 512, 32 for K ≥ 256). Measured iterations at 256×576,
    2:4, Jacobi → rank 32 → rank 64: decaying spectrum 37 → 13 → 10, steep
    spectrum 118 → 14 → 8, conv-like (3×3 patches of smooth maps) 78 → 38 → 24.

    Rows leave the active set when their last step lowered their objective
    (w−w')Hd(w−w')ᵀ by less than ``tol`` times its value.
    """
    O, K = W.shape
    H = np.asarray(H)
    if H.dtype == np.float32:  # the widest layers: one K×K float32, no float64 copy
        H32 = H
    else:
        H = H.astype(np.float64, copy=False)
        # float32 products unless the caller asks for more than they can deliver
        H32 = H.astype(np.float32) if tol >= 1e-9 else None
    d = np.diag(H).astype(np.float64) + lam
    if rank is None:
        rank = 64 if K >= 512 else (32 if K >= 256 else 0)
    rank = min(rank, K // 4)
    ev = V = None
    if rank > 0:
        ev, V = top_eigenpairs(H, rank)
        keep = ev > 1e-12 * max(float(ev[-1]), 1e-300)
        ev, V = ev[keep], V[:, keep]
        rank = ev.size
    if rank > 0:
        Dres = np.maximum(d - (V * V) @ ev, max(lam, 1e-12 * float(d.max())))
        Dinv = 1.0 / Dres
    else:
        Dinv = 1.0 / np.maximum(d, 1e-300)
    shared = (H, H32, lam, Dinv, ev, V, tol, max_iter)
    # rows are independent: bound the ~12 (rows × K) float64 work arrays
    block = max(64, _CG_BLOCK_BYTES // (12 * 8 * K))
    out = np.empty(W.shape, out_dtype)
    its = work = 0
    for r0 in range(0, O, block):
        sl = slice(r0, r0 + block)
        out[sl], i, w = _cg_block(np.asarray(W[sl], dtype=np.float64), mask[sl], None if x0 is None else
                                  np.asarray(x0)[sl], shared)
        its, work = max(its, i), work + w
    if info is not None:
        info["iterations"] = its
        info["row_iterations"] = work
        info["rank"] = rank
    return out


def _cg_block(W, mask, x0, shared):
    H, H32, lam, Dinv, ev, V, tol, max_iter = shared
    O, K = W.shape
    Sf = mask.astype(np.float64)
    E = W * (1.0 - Sf)
    EH = parallel_matmul(E.astype(H.dtype, copy=False), H).astype(np.float64, copy=False)
    Bm = Sf * EH
    c = np.einsum("ij,ij->i", EH, E) + lam * np.einsum("ij,ij->i", E, E)
    del EH
    if x0 is None:
        D = np.zeros_like(W)
    else:
        D = Sf * (np.asarray(x0, dtype=np.float64) - W)  # on the support

    if V is not None and V.shape[1] > 0:
        rank = V.shape[1]
        # Mk[r] = Λ⁻¹ + Vᵀ diag(S_r D⁻¹) V, as one GEMM against the rows of V⊗V,
        # built a slab of K at a time
        SD = Sf * Dinv
        Mk = np.zeros((O, rank * rank))
        step = max(1, (4 << 20) // (8 * rank * rank))
        for k0 in range(0, K, step):
            Vk = V[k0:k0 + step]
            Mk += parallel_matmul(SD[:, k0:k0 + step],
                                  (Vk[:, :, None] * Vk[:, None, :]).reshape(-1, rank * rank))
        del SD
        Mk = Mk.reshape(O, rank, rank)
        Mk[:, np.arange(rank), np.arange(rank)] += 1.0 / ev
        Mkinv = np.linalg.inv(Mk)
        del Mk

        def precond(R, Sl, Ml):
            Z = R * Dinv
            t = np.matmul(Ml, (Z @ V)[:, :, None])[:, :, 0]
            Z -= Sl * Dinv * (t @ V.T)
            return Z
    else:
        Mkinv = np.zeros((O, 0, 0))

        def precond(R, Sl, Ml):
            return R * Dinv

    def Aop(P, Sl):
        if H32 is None:
            HP = parallel_matmul(P, H)
        else:
            HP = parallel_matmul(P.astype(np.float32), H32).astype(np.float64)
        HP += lam * P
        HP *= Sl
        return HP

    # Work on compacted copies of the active rows; converged rows are written back.
    Dfull = D
    rows = np.arange(O)
    Sl, Bl, cl, Ml = Sf, Bm, c, Mkinv
    R = Bl - Aop(D, Sl)
    Z = precond(R, Sl, Ml)
    P = Z.copy()
    rz = np.einsum("ij,ij->i", R, Z)
    it = work = 0
    live = rz > 0
    for it in range(1, max_iter + 2):
        if not live.all():
            Dfull[rows[~live]] = D[~live]
            rows = rows[live]
            D, R, P, rz = D[live], R[live], P[live], rz[live]
            Sl, Bl, cl, Ml = Sl[live], Bl[live], cl[live], Ml[live]
        if rows.size == 0 or it > max_iter:
            it -= 1
            break
        work += rows.size
        AP = Aop(P, Sl)
        pAp = np.einsum("ij,ij->i", P, AP)
        ok = pAp > 0
        alpha = np.where(ok, rz / np.where(ok, pAp, 1.0), 0.0)
        D += alpha[:, None] * P
        R -= alpha[:, None] * AP
        del AP
        decrease = alpha * rz  # decrease of the row objective f = c − 2bδ + δAδ
        f = cl - np.einsum("ij,ij->i", Bl + R, D)
        Z = precond(R, Sl, Ml)
        rz_new = np.einsum("ij,ij->i", R, Z)
        P *= (rz_new / np.where(rz > 0, rz, 1.0))[:, None]
        P += Z
        del Z
        rz = rz_new
        live = ok & (decrease > tol * np.maximum(f, 0.0)) & (rz_new > 0)
    if rows.size:
        Dfull[rows] = D
    return W * Sf + Dfull, it, work


# --------------------------------------------------------------------------- OBS / SparseGPT


def _sweep(W, H, damp, blocksize, mask=None, n=None, m=None, select="obs", overwrite_h=False):
    """SparseGPT column sweep. Fixed ``mask`` or, when ``mask`` is None, N:M
    selection per group of ``m`` columns (``select``: "obs" per-weight scores,
    "group" joint choice). ``overwrite_h``: H is the factorisation's workspace.
    Returns (mask, W_new), W_new in float32 for a float32 H, else float64."""
    O, K = W.shape
    # float32 work for a float32 H (the widest layers, SparseGPT's own precision)
    Wc = np.array(W, dtype=np.float32 if H.dtype == np.float32 else np.float64, copy=True)
    if overwrite_h:
        U = inverse_cholesky_upper(damp_in_place(H, damp), overwrite=True)
    else:
        U = inverse_cholesky_upper(_damped(H, damp))
    choose = mask is None
    if choose:
        mask = np.ones((O, K), dtype=bool)
        blocksize = max(m, (blocksize // m) * m)  # groups never straddle blocks
    else:
        mask = np.asarray(mask, dtype=bool)
    diag = np.diag(U).copy()
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1 = Wc[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        Err1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if choose and col % m == 0:
                width = min(col + m, K) - col
                prune = width - min(n, width)
                if prune > 0:
                    if select == "group":
                        blockmask = _group_choice(W1[:, i:i + width],
                                                  U1[i:i + width, i:i + width], n)
                    else:
                        score = W1[:, i:i + width] ** 2 / diag[col:col + width] ** 2
                        drop = np.argpartition(score, prune - 1, axis=1)[:, :prune]
                        blockmask = np.ones((O, width), dtype=bool)
                        np.put_along_axis(blockmask, drop, False, axis=1)
                    mask[:, col:col + width] = blockmask
            keep = mask[:, col]
            if keep.all():
                continue
            w = W1[:, i]
            err = np.where(keep, 0.0, w) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            W1[~keep, i] = 0.0
            Err1[:, i] = err
        Wc[:, i1:i2] = W1
        for c0 in range(i2, K, _SWEEP_COLUMNS):  # no (O, K) temporary beside Wc
            c1 = min(c0 + _SWEEP_COLUMNS, K)
            Wc[:, c0:c1] -= parallel_matmul(Err1, U[i1:i2, c0:c1])
    Wc[~mask] = 0.0
    return mask, Wc


# Columns per block of the sweep's trailing update (a few MB of product at a time).
_SWEEP_COLUMNS = 1024


def _group_choice(Wg: np.ndarray, Ug: np.ndarray, n: int) -> np.ndarray:
    """Keep set per row for one group inside the sweep: the pruned set p with the
    least joint OBS error w_p [(H_F⁻¹)_pp]⁻¹ w_pᵀ, where H_F⁻¹ is the inverse
    Hessian of the columns not yet passed; its group block is Ugᵀ Ug because U
    is upper triangular."""
    O, width = Wg.shape
    keep_n = min(n, width)
    B = Ug.T @ Ug
    best = np.full(O, np.inf)
    out = np.ones((O, width), dtype=bool)
    for keep in itertools.combinations(range(width), keep_n):
        p = [j for j in range(width) if j not in keep]
        Q = np.linalg.inv(B[np.ix_(p, p)])
        wp = Wg[:, p]
        err = np.einsum("oi,ij,oj->o", wp, Q, wp)
        better = err < best
        if better.any():
            best[better] = err[better]
            row = np.zeros(width, dtype=bool)
            row[list(keep)] = True
            out[better] = row
    return out


def _row_errors(W: np.ndarray, Wn: np.ndarray, H: np.ndarray) -> np.ndarray:
    D = W - Wn
    return np.einsum("ij,ij->i", parallel_matmul(D, H), D)


def _keep_better_rows(W, mask, Wn, H):
    """Per row, the masked weights where they beat the sweep's result. The sweep
    freezes each column once passed, so its result is *not* always better than
    plain masking (measured: 14 of 300 random small layers at damp=0.01, up to
    1.2× worse; 45/300 and 31× worse undamped)."""
    H = np.asarray(H, dtype=np.float64)
    Wm = np.where(mask, W, 0.0)
    worse = _row_errors(W, Wn, H) > _row_errors(W, Wm, H)
    if worse.any():
        Wn[worse] = Wm[worse]
    return Wn


@_single_threaded
def obs_prune_update(W: np.ndarray, mask: np.ndarray, H: np.ndarray,
                     damp: float = 0.01, blocksize: int = 128,
                     safeguard: bool = True) -> np.ndarray:
    """SparseGPT/OBS update for a fixed mask: columns left to right, each pruned
    weight's error is compensated on the columns to its right through one shared
    upper Cholesky factor of Hd⁻¹. Cheaper than the exact solve (≈ (2/3)K³ +
    2·O·K² flops) but not its optimum, and — because passed columns are frozen —
    not always better than plain masking: with ``safeguard`` (default) rows where
    plain masking has the lower error on H keep the masked weights (two more
    O×K×K products). Equal to ``adaprune_rows`` when every pruned column lies
    left of every kept one."""
    W = np.asarray(W)
    mask = np.asarray(mask, dtype=bool)
    H = np.asarray(H)
    _check(W, H, mask)
    if W.size == 0:
        return np.zeros(W.shape, _out_dtype(W))
    Wn = _sweep(W, H, damp, blocksize, mask=mask)[1]
    if safeguard:
        Wn = _keep_better_rows(W.astype(np.float64), mask, Wn, H)
    return Wn.astype(_out_dtype(W), copy=False)


@_single_threaded
def sparsegpt_mask_and_update(W: np.ndarray, H: np.ndarray, n: int, m: int,
                              damp: float = 0.01, blocksize: int = 128,
                              safeguard: bool = True,
                              select: Literal["obs", "group"] = "obs",
                              overwrite_h: bool = False,
                              ) -> tuple[np.ndarray, np.ndarray]:
    """SparseGPT N:M: while sweeping, at the first column of each group of ``m``
    consecutive input columns choose the group's mask from the current (already
    compensated) weights, then prune and compensate as in ``obs_prune_update``
    (``safeguard`` likewise, against plain masking with the chosen mask).

    ``select="obs"`` (SparseGPT): keep the ``n`` weights with the largest
    ``w² / [H_F⁻¹]_ii``, each scored alone. ``select="group"``: try all C(m, n)
    keep sets and take the one whose pruned set has the least joint OBS error
    ``w_p [(H_F⁻¹)_pp]⁻¹ w_pᵀ`` (accounts for correlated neighbours; C(m, n)
    small solves per group). A trailing partial group of r < m columns keeps
    min(n, r). ``overwrite_h`` (only without ``safeguard``, which needs H
    afterwards): H, C-contiguous, is destroyed and serves as the factorisation's
    workspace, so the widest layers need one K×K array, not four. Returns (mask, W_new)."""
    W = np.asarray(W)
    H = np.asarray(H)
    _check(W, H)
    _check_nm(n, m)
    if select not in ("obs", "group"):
        raise ValueError(f"unknown select {select!r}")
    if overwrite_h and safeguard:
        raise ValueError("overwrite_h needs safeguard=False: the safeguard measures errors on H")
    if W.size == 0:
        return np.zeros(W.shape, bool), np.zeros(W.shape, _out_dtype(W))
    mask, Wn = _sweep(W, H, damp, blocksize, n=n, m=m, select=select, overwrite_h=overwrite_h)
    if safeguard:
        Wn = _keep_better_rows(W.astype(np.float64), mask, Wn, H)
    return mask, Wn.astype(_out_dtype(W), copy=False)


# --------------------------------------------------------------------------- masks


def _check_nm(n: int, m: int) -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))
            and 0 < n <= m):
        raise ValueError(f"invalid N:M pattern {n}:{m}")


@_single_threaded
def saliency(W: np.ndarray, H: np.ndarray | None = None,
             kind: Literal["magnitude", "activation", "obs"] = "magnitude",
             damp: float = 0.01) -> np.ndarray:
    """Per-weight importance (higher = keep), shape of W.

    magnitude  |w|
    activation |w| · sqrt(diag Hd)      (Wanda; the output energy the weight carries, with
                                         the damping λ of the other scores, so inputs the
                                         data never moves still rank their weights by |w|)
    obs        w² / [Hd⁻¹]_ii           (Optimal Brain Surgeon: error of removing
                                         the weight alone with full compensation)
    """
    W = np.asarray(W)
    if kind == "magnitude":
        return np.abs(W).astype(np.float64)
    if H is None:
        raise ValueError(f"saliency {kind!r} needs the Gram matrix H")
    _check(W, np.asarray(H))
    if kind == "activation":
        return np.abs(W) * np.sqrt(np.maximum(np.diag(H), 0.0) + damping(H, damp))
    if kind == "obs":
        Hd = _damped(H, damp)
        c, low = scipy.linalg.cho_factor(Hd, lower=True, check_finite=False)
        hinv_diag = np.diag(scipy.linalg.cho_solve((c, low), np.eye(Hd.shape[0]),
                                                   check_finite=False))
        return W.astype(np.float64) ** 2 / hinv_diag
    raise ValueError(f"unknown saliency kind {kind!r}")


def nm_mask_from_scores(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep the ``n`` highest-scoring entries of each group of ``m`` consecutive
    columns (axis 1); ties go to the lower index. A trailing partial group of
    r < m columns keeps min(n, r)."""
    _check_nm(n, m)
    scores = np.asarray(scores)
    O, K = scores.shape
    mask = np.zeros((O, K), dtype=bool)
    full = (K // m) * m
    if full:
        g = scores[:, :full].reshape(O, K // m, m)
        order = np.argsort(-g, axis=2, kind="stable")[:, :, :n]
        mg = np.zeros(g.shape, dtype=bool)
        np.put_along_axis(mg, order, True, axis=2)
        mask[:, :full] = mg.reshape(O, full)
    if full < K:
        t = scores[:, full:]
        keep = min(n, K - full)
        order = np.argsort(-t, axis=1, kind="stable")[:, :keep]
        mt = np.zeros(t.shape, dtype=bool)
        np.put_along_axis(mt, order, True, axis=1)
        mask[:, full:] = mt
    return mask


@_single_threaded
def best_group_mask_exact(W: np.ndarray, H: np.ndarray, n: int, m: int,
                          damp: float = 0.01,
                          local: Literal["hinv", "h", "nocomp"] = "hinv") -> np.ndarray:
    """For each group of ``m`` input columns (K % m == 0) try all C(m, n) keep sets
    and take the one with the least error under a group-local model:

    hinv    w_p [(Hd⁻¹)_pp]⁻¹ w_pᵀ  — removing the group's pruned set p with full
            compensation by every other weight of the row (groups treated as
            independent). The block of the full inverse: the default.
    h       same with (H_GG)⁻¹ (block-diagonal H: compensation inside the group only)
    nocomp  w_p H_pp w_pᵀ (no compensation; block-diagonal output error)
    """
    _check_nm(n, m)
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H)
    _check(W, H)
    O, K = W.shape
    if K % m:
        raise ValueError(f"K={K} is not a multiple of m={m}")
    if n == m:
        return np.ones((O, K), dtype=bool)
    G = K // m
    Hd = _damped(H, damp)
    gi = np.arange(K).reshape(G, m)
    if local == "hinv":
        c = scipy.linalg.cho_factor(Hd, lower=True, check_finite=False)
        Hinv = scipy.linalg.cho_solve(c, np.eye(K), check_finite=False)
        blocks = Hinv[gi[:, :, None], gi[:, None, :]]
    elif local == "h":
        blocks = np.linalg.inv(Hd[gi[:, :, None], gi[:, None, :]])
    elif local == "nocomp":
        blocks = Hd[gi[:, :, None], gi[:, None, :]]
    else:
        raise ValueError(f"unknown local model {local!r}")
    Wg = W.reshape(O, G, m)
    combos = list(itertools.combinations(range(m), n))
    best = np.full((O, G), np.inf)
    best_c = np.zeros((O, G), dtype=np.int64)
    for ci, keep in enumerate(combos):
        p = np.array([j for j in range(m) if j not in keep])
        Bpp = blocks[:, p[:, None], p[None, :]]  # (G, q, q)
        Q = Bpp if local == "nocomp" else np.linalg.inv(Bpp)
        wp = Wg[:, :, p]  # (O, G, q)
        err = np.einsum("ogi,gij,ogj->og", wp, Q, wp, optimize=True)
        better = err < best
        best = np.where(better, err, best)
        best_c = np.where(better, ci, best_c)
    table = np.zeros((len(combos), m), dtype=bool)
    for ci, keep in enumerate(combos):
        table[ci, list(keep)] = True
    return table[best_c].reshape(O, K)


def channel_last_order(channels: int, kernel_shape) -> np.ndarray:
    """Column permutation for conv weights: ``W.reshape(O, -1)`` (and H = the
    statistics Gram) are in (c, kh, kw) order, but N:M groups run along input
    channels for each kernel position. With ``perm`` from here,
    ``W.reshape(O, -1)[:, perm] == W.transpose(0, 2, 3, 1).reshape(O, -1)`` puts
    each group's channels side by side: pass ``W2[:, perm]`` and
    ``H[np.ix_(perm, perm)]`` to the mask selectors and solvers, and map results
    back with ``out[:, perm] = result`` (or ``result[:, np.argsort(perm)]``).
    Identity for 1×1 kernels and dense layers."""
    kernel = tuple(int(k) for k in kernel_shape)
    idx = np.arange(channels * math.prod(kernel)).reshape((channels,) + kernel)
    return np.moveaxis(idx, 0, -1).reshape(-1)


# --------------------------------------------------------------------------- metrics


def _row_slices(rows: int, K: int, nbytes: int = 4 << 20):
    """Slices of rows of an (rows, K) operand of about ``nbytes`` in float64: the
    quadratic forms below then need no full-size float64 copy of their operands."""
    step = max(64, nbytes // (8 * max(K, 1)))
    return [slice(r0, r0 + step) for r0 in range(0, rows, step)]


def quadratic_trace(A: np.ndarray, H: np.ndarray, B: np.ndarray | None = None) -> float:
    """tr((A − B) H (A − B)ᵀ) (B = 0 if None), in row blocks, products in H's precision."""
    H = np.asarray(H)
    if H.dtype != np.float32:  # a float32 H (the widest layers) is used as it is
        H = H.astype(np.float64, copy=False)
    total = 0.0
    for sl in _row_slices(A.shape[0], A.shape[1]):
        D = np.asarray(A[sl], dtype=np.float64) if B is None else np.subtract(A[sl], B[sl], dtype=np.float64)
        total += float(np.einsum("ij,ij->", parallel_matmul(D.astype(H.dtype, copy=False), H), D))
    return total


def trace_of_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr(A B) for A (O, K) and B (K, O) in float64, a few MB of A's rows at a time
    (no whole-layer float64 copy of a float32 A; einsum: no BLAS threads)."""
    return float(sum(np.einsum("ij,ji->", np.asarray(a[sl], np.float64), b[:, sl])
                     for sl in _row_slices(a.shape[0], a.shape[1])))


@_single_threaded
def reconstruction_error(W: np.ndarray, W_new: np.ndarray, H: np.ndarray) -> float:
    """Relative output error ‖(W − W')X‖² / ‖W X‖² = tr(D H Dᵀ) / tr(W H Wᵀ),
    D = W − W'. Zero when ‖W X‖ is zero and D H Dᵀ is too; inf if only ‖W X‖ is."""
    W, Wn, H = np.asarray(W), np.asarray(W_new), np.asarray(H)
    _check(W, H, Wn)
    num = quadratic_trace(W, H, Wn)
    den = quadratic_trace(W, H)
    if den <= 0:
        return 0.0 if num <= 0 else math.inf
    return max(num, 0.0) / den


def bias_correction(W: np.ndarray, W_new: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """Bias shift (O,) that keeps each output's calibration mean: (W − W') @ mean_x.
    Add it to the layer's bias."""
    W, Wn = np.asarray(W), np.asarray(W_new)
    mean_x = np.asarray(mean_x, dtype=np.float64)
    if W.shape != Wn.shape or W.ndim != 2 or mean_x.shape != (W.shape[1],):
        raise ValueError("shapes: W (O, K), W_new (O, K), mean_x (K,)")
    out = np.empty(W.shape[0])
    for sl in _row_slices(W.shape[0], W.shape[1]):
        # einsum, not BLAS gemv: no library threads, so the rounding does not depend on the core count
        out[sl] = np.einsum("ij,j->i", np.asarray(W[sl], dtype=np.float64) - np.asarray(Wn[sl], dtype=np.float64), mean_x)
    return out
