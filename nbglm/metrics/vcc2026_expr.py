"""Profile members of the VCC 2026 profile: `pds_cosine` and `expr_mse_unbiased_capped_norm`.

Both read group profiles log1p(5e4 * group sum / group total), as cell-eval2 0.20 does; the
expression error subtracts each group's delete-one jackknife sampling correction.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from threadpoolctl import ThreadpoolController

from nbglm.errors import NbglmError

BULK_TARGET = 5e4


@functools.cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def _one_blas_thread() -> ContextManager:
    """Run a small matrix product on one BLAS thread. Why: OpenBLAS's threads spin for a while
    after each call, on the cores the next compiled kernels need; right after a multi-threaded
    product the DE and jackknife kernels measured about twice as slow."""
    return _blas().limit(limits=1, user_api="blas")


@dataclass(frozen=True)
class Profiles:
    """Group profiles (rows: control first, then `labels`) and their jackknife corrections."""

    labels: np.ndarray
    bulk: np.ndarray
    jackknife: np.ndarray


def profiles(counts: sp.csr_matrix, codes: np.ndarray, labels: np.ndarray, control_jackknife: bool = True) -> Profiles:
    """Profiles and jackknife corrections of group 0 (control) and groups 1.. (`labels`); without
    `control_jackknife` the control's correction is left 0 (a side scored against another's control)."""
    counts = sp.csr_matrix(counts)
    n_groups = labels.size + 1
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    sums, lib = _group_sums(counts.data, counts.indices, counts.indptr, order, bounds, counts.shape[1])
    totals = sums.sum(axis=1)
    scale = np.zeros_like(totals)
    scale[totals > 0] = BULK_TARGET / totals[totals > 0]
    bulk = np.log1p(sums * scale[:, None])
    s1, s2 = _jackknife_sums(counts.data, counts.indices, counts.indptr, order, bounds, sums, totals, lib,
                             0 if control_jackknife else 1)
    n = np.diff(bounds).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        jk = (n - 1) / n * (s2 - s1**2 / n[:, None]).sum(axis=1)
    jk[(n < 2) | (totals <= 0)] = 0.0
    return Profiles(labels, bulk, np.maximum(jk, 0.0))


@numba.njit(parallel=True, cache=True)
def _group_sums(data, indices, indptr, order, bounds, n_genes):  # pragma: no cover - compiled
    """float64 column sums of each group's rows (rows `order[bounds[g]:bounds[g+1]]`) and each
    row's total, read from the stored values as they are (no float64 copy of the matrix)."""
    n_groups = bounds.size - 1
    sums = np.zeros((n_groups, n_genes))
    lib = np.zeros(indptr.size - 1)
    for g in numba.prange(n_groups):
        for c in range(bounds[g], bounds[g + 1]):
            row = order[c]
            total = 0.0
            for k in range(indptr[row], indptr[row + 1]):
                v = np.float64(data[k])
                sums[g, indices[k]] += v
                total += v
            lib[row] = total
    return sums, lib


_SERIES_TOL = 1e-17  # relative truncation error of the series path
_SERIES_MAX_DELTA = 0.5  # above this (a cell holding a third of its group or more) the series is slow
_SERIES_MAX_TERMS = 64


@numba.njit(parallel=True, cache=True)
def _jackknife_sums(data, indices, indptr, order, bounds, sums, totals, lib, first):  # pragma: no cover - compiled
    """Per group and gene, the sums of v and v^2 over the group's cells, v = the delete-one profile
    minus the group's profile: log1p(5e4 (p - x_i) / (T - lib_i)) - log1p(5e4 p / T), 0 - the
    profile where the cell holds everything. Every gene of every cell counts (deleting a cell
    moves the profile of the genes it has no count of too); stored entries replace their
    zero-count term. Groups from `first` on (1: the control's sums are left 0).

    Why a series: for a zero count, v = log1p(w d) exactly, with w = q / (1 + q) of the gene's
    profile q = 5e4 p / T and d = lib / (T - lib) of the cell. Expanding log1p and log1p^2 in
    powers of w d turns the cells x genes logarithms into per-group power sums of d and a short
    polynomial per gene. A group with a cell of d > 0.5, or fewer cells than terms, is summed
    directly.
    """
    n_groups, n_genes = sums.shape
    s1 = np.zeros((n_groups, n_genes))
    s2 = np.zeros((n_groups, n_genes))
    for g in numba.prange(first, n_groups):
        lo, hi, total = bounds[g], bounds[g + 1], totals[g]
        if hi - lo < 2 or total <= 0:
            continue
        b = np.log1p(BULK_TARGET * sums[g] / total)
        d_max = 0.0
        for c in range(lo, hi):
            r = total - lib[order[c]]
            d_max = max(d_max, lib[order[c]] / r if r > 0 else np.inf)
        terms = _series_terms(d_max)
        if 0 < terms < hi - lo:
            _zeros_by_series(s1[g], s2[g], order[lo:hi], sums[g], total, lib, terms)
        else:
            _zeros_directly(s1[g], s2[g], order[lo:hi], sums[g], total, lib, b)
        scaled = BULK_TARGET * sums[g]
        w = (scaled / total) / (1.0 + scaled / total)
        coef = np.zeros(terms + 1)
        for m in range(1, terms + 1):
            coef[m] = (1.0 if m % 2 == 1 else -1.0) / m
        most = 0
        for c in range(lo, hi):
            most = max(most, indptr[order[c] + 1] - indptr[order[c]])
        wd, zero, arg = np.empty(most), np.empty(most), np.empty(most)
        for c in range(lo, hi):
            cell = order[c]
            r = total - lib[cell]
            if r <= 0:
                continue
            d = lib[cell] / r
            k0, n = indptr[cell], indptr[cell + 1] - indptr[cell]
            for i in range(n):
                j = indices[k0 + i]
                wd[i] = w[j] * d
                # v - zero = log1p(5e4 (p - x) / r) - log1p(5e4 p / r), as one logarithm (of arg)
                arg[i] = -BULK_TARGET * data[k0 + i] / (r + scaled[j])
            if terms == 0:
                for i in range(n):
                    zero[i] = np.log1p(wd[i])
            else:  # each entry's zero-count term as the series summed it (Horner, entries innermost: SIMD)
                for i in range(n):
                    zero[i] = coef[terms]
                for m in range(terms - 1, 0, -1):
                    c_m = coef[m]  # a local: a load from coef in the loop could alias zero and keep it scalar
                    for i in range(n):
                        zero[i] = zero[i] * wd[i] + c_m
                for i in range(n):
                    zero[i] *= wd[i]
            for i in range(n):
                j = indices[k0 + i]
                step = np.log1p(arg[i])
                s1[g, j] += step
                s2[g, j] += step * (2.0 * zero[i] + step)
    return s1, s2


@numba.njit(cache=True)
def _log1p_by_series(x, coef, out):  # pragma: no cover - compiled
    """out = log1p(x) by the series with coefficients `coef` (Horner), or by log1p itself when
    there are none; the loop over entries is innermost, so it runs in SIMD lanes."""
    terms = coef.size - 1
    if terms == 0:
        for i in range(x.size):
            out[i] = np.log1p(x[i])
        return
    out[:] = coef[terms]
    for m in range(terms - 1, 0, -1):
        for i in range(x.size):
            out[i] = out[i] * x[i] + coef[m]
    for i in range(x.size):
        out[i] *= x[i]


@numba.njit(cache=True)
def _series_terms(d_max):  # pragma: no cover - compiled
    """Terms of the log1p series that bring its relative tail under _SERIES_TOL; 0: sum directly."""
    if d_max > _SERIES_MAX_DELTA:
        return 0
    if d_max <= 0.0:
        return 1
    return min(int(np.ceil(np.log(_SERIES_TOL * (1.0 - d_max)) / np.log(d_max))) + 1, _SERIES_MAX_TERMS)


@numba.njit(cache=True)
def _zeros_by_series(s1, s2, cells, p, total, lib, terms):  # pragma: no cover - compiled
    """Every cell's zero-count term of every gene, summed as power series in w d:
    log1p(x) = sum_m (-1)^(m+1) x^m / m and log1p(x)^2 = sum_m (-1)^m 2 H(m-1) x^m / m."""
    moments = np.zeros(terms + 1)
    for cell in cells:
        d = lib[cell] / (total - lib[cell])
        power = d
        for m in range(1, terms + 1):
            moments[m] += power
            power *= d
    c1 = np.zeros(terms + 1)
    c2 = np.zeros(terms + 1)
    harmonic = 0.0
    for m in range(1, terms + 1):
        sign = 1.0 if m % 2 == 1 else -1.0
        c1[m] = sign * moments[m] / m
        c2[m] = -sign * 2.0 * harmonic * moments[m] / m
        harmonic += 1.0 / m
    for j in range(p.size):
        q = BULK_TARGET * p[j] / total
        w = q / (1.0 + q)
        a1 = 0.0
        a2 = 0.0
        for m in range(terms, 0, -1):  # Horner
            a1 = a1 * w + c1[m]
            a2 = a2 * w + c2[m]
        s1[j] += a1 * w
        s2[j] += a2 * w


@numba.njit(cache=True)
def _zeros_directly(s1, s2, cells, p, total, lib, b):  # pragma: no cover - compiled
    """Every cell's zero-count term of every gene, one logarithm each: log1p(w d), or minus the
    profile where the cell holds all of its group's counts."""
    for cell in cells:
        r = total - lib[cell]
        d = lib[cell] / r if r > 0 else 0.0
        for j in range(p.size):
            q = BULK_TARGET * p[j] / total
            v = np.log1p(q / (1.0 + q) * d) if r > 0 else -b[j]
            s1[j] += v
            s2[j] += v * v


def exclusion_columns(labels: np.ndarray, genes: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """Each label's own gene column (-1 if none); an error when no panel label names a gene."""
    pos = {g: i for i, g in enumerate(genes)}
    if not any(str(lab) in pos for lab in panel):
        raise NbglmError(
            "vcc2026: no perturbation label names a gene on the gene axis, so target genes cannot be "
            "excluded (cell-eval2 refuses this too); label perturbations by their target gene symbol")
    return np.array([pos.get(str(lab), -1) for lab in labels], dtype=np.int64)


def pds_cosine(pred_eff: np.ndarray, real_eff: np.ndarray, panel_cols: np.ndarray) -> np.ndarray:
    """1 - midrank(own match among all real effects by cosine distance) / (n - 1), row by row.

    `pred_eff` rows are aligned with `real_eff` rows; the panel's target genes leave both.
    """
    keep = np.ones(real_eff.shape[1], dtype=bool)
    keep[panel_cols[panel_cols >= 0]] = False
    if not keep.any():
        raise NbglmError("vcc2026: every gene is some perturbation's target; pds_cosine has no genes left to rank")
    a, b = pred_eff[:, keep], real_eff[:, keep]
    with _one_blas_thread():
        sim = a @ b.T
    denom = np.sqrt(np.einsum("ig,ig->i", a, a))[:, None] * np.sqrt(np.einsum("jg,jg->j", b, b))[None, :]
    cos = np.zeros_like(sim)
    nz = denom != 0
    cos[nz] = sim[nz] / denom[nz]
    dist = np.clip(1.0 - cos, 0.0, 2.0)
    own = np.diag(dist)[:, None]
    rank = np.count_nonzero(dist < own, axis=1) + (np.count_nonzero(dist == own, axis=1) - 1) / 2.0
    n = real_eff.shape[0]
    return np.ones(n) if n <= 1 else 1.0 - rank / (n - 1)


def _drop_own(summed: np.ndarray, a: np.ndarray, b: np.ndarray, cols: np.ndarray, n_genes: int):
    """Remove each row's own gene from a summed squared distance; returns (summed, genes kept)."""
    n_row = np.full(summed.shape, float(n_genes))
    hit = np.flatnonzero(cols >= 0)
    out = summed.copy()
    out[hit] -= (a[hit, cols[hit]] - b[hit, cols[hit]]) ** 2
    n_row[hit] = n_genes - 1
    return out, n_row


def _budget(pred: np.ndarray, cols: np.ndarray, w: np.ndarray) -> float:
    """Weighted centred sum of squares of the predicted profiles across perturbations, own genes out."""
    dev = pred - pred.mean(axis=0)
    s1 = np.einsum("ij,i->j", dev, w)
    s2 = np.einsum("ij,ij,i->j", dev, dev, w)
    wsum = np.full(pred.shape[1], float(w.sum()))
    cnt = np.full(pred.shape[1], float(pred.shape[0]))
    hit = np.flatnonzero(cols >= 0)
    v = dev[hit, cols[hit]]
    np.subtract.at(s1, cols[hit], w[hit] * v)
    np.subtract.at(s2, cols[hit], w[hit] * v * v)
    np.subtract.at(wsum, cols[hit], w[hit])
    np.subtract.at(cnt, cols[hit], 1.0)
    ok = (cnt >= 2.0) & (wsum > 0.0)
    if not ok.any():
        return 0.0
    return float(np.maximum(s2[ok] - s1[ok] ** 2 / wsum[ok], 0.0).sum())


def expr_terms(pred: Profiles, real: Profiles, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-perturbation numerator (`expr_mse_unbiased_capped`) and denominator
    (`expr_distance_unbiased`); rows of `pred` and `real` are aligned, control at row 0."""
    n_genes = real.bulk.shape[1]
    pb, rb = pred.bulk[1:], real.bulk[1:]
    c_pred, c_real = pred.jackknife[1:], real.jackknife[1:]
    n_row = np.where(cols >= 0, n_genes - 1.0, float(n_genes))
    w = np.divide(1.0, n_row, out=np.zeros_like(n_row), where=n_row > 0)
    term = np.minimum(c_pred, c_real)
    claim = float((term * w).sum())
    if claim > 0.0:
        ratio = _budget(pb, cols, w) / claim
        if ratio < 1.0:
            term = term * ratio
    d = pb - rb
    num, n_num = _drop_own(np.einsum("ij,ij->i", d, d) - term - c_real, pb, rb, cols, n_genes)
    ctrl = np.broadcast_to(real.bulk[0], rb.shape)
    e = rb - ctrl
    den, n_den = _drop_own(np.einsum("ij,ij->i", e, e) - c_real - real.jackknife[0], rb, ctrl, cols, n_genes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num / n_num, den / n_den


def ratio_of_sums(num: np.ndarray, den: np.ndarray) -> float:
    """sum(num) / sum(den) over perturbations where both are finite; the reference must carry an effect."""
    ok = np.isfinite(num) & np.isfinite(den)
    total = float(den[ok].sum())
    if not ok.any() or total <= 0:
        raise NbglmError(
            f"vcc2026: the real data's summed expression distance from control is {total:.3g} (not positive), "
            "so expr_mse_unbiased_capped_norm is undefined; the reference carries no measurable effect at this depth")
    return float(num[ok].sum()) / total
