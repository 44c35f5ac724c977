"""Profile members of the VCC 2026 profile: `pds_cosine` and `expr_mse_unbiased_capped_norm`.

Both read group profiles log1p(5e4 * group sum / group total), as cell-eval2 0.20 does; the
expression error subtracts each group's delete-one jackknife sampling correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.errors import NbglmError

BULK_TARGET = 5e4


@dataclass(frozen=True)
class Profiles:
    """Group profiles (rows: control first, then `labels`) and their jackknife corrections."""

    labels: np.ndarray
    bulk: np.ndarray
    jackknife: np.ndarray


def profiles(counts: sp.csr_matrix, codes: np.ndarray, labels: np.ndarray) -> Profiles:
    """Profiles and jackknife corrections of group 0 (control) and groups 1.. (`labels`)."""
    counts = sp.csr_matrix(counts)
    n_groups = labels.size + 1
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
    sums, lib = _group_sums(counts.data, counts.indices, counts.indptr, order, bounds, counts.shape[1])
    totals = sums.sum(axis=1)
    scale = np.zeros_like(totals)
    scale[totals > 0] = BULK_TARGET / totals[totals > 0]
    bulk = np.log1p(sums * scale[:, None])
    s1, s2 = _jackknife_sums(counts.data, counts.indices, counts.indptr, order, bounds, sums, totals, lib)
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


@numba.njit(parallel=True, cache=True)
def _jackknife_sums(data, indices, indptr, order, bounds, sums, totals, lib):  # pragma: no cover - compiled
    """Per group and gene, the sums of v and v^2 over the group's cells, v = the delete-one profile
    minus the group's profile: log1p(5e4 (p - x_i) / (T - lib_i)) - log1p(5e4 p / T), 0 - the
    profile where the cell holds everything. Every gene of every cell is visited (the deleted
    cell's zeros move the profile too); its stored entries replace their zero-count term."""
    n_groups, n_genes = sums.shape
    s1 = np.zeros((n_groups, n_genes))
    s2 = np.zeros((n_groups, n_genes))
    for g in numba.prange(n_groups):
        total = totals[g]
        if bounds[g + 1] - bounds[g] < 2 or total <= 0:
            continue
        b = np.log1p(BULK_TARGET * sums[g] / total)
        for c in range(bounds[g], bounds[g + 1]):
            cell = order[c]
            r = total - lib[cell]
            for j in range(n_genes):
                v = (np.log1p(BULK_TARGET * sums[g, j] / r) if r > 0 else 0.0) - b[j]
                s1[g, j] += v
                s2[g, j] += v * v
            if r > 0:
                for k in range(indptr[cell], indptr[cell + 1]):
                    j = indices[k]
                    zero = np.log1p(BULK_TARGET * sums[g, j] / r) - b[j]
                    v = np.log1p(BULK_TARGET * (sums[g, j] - data[k]) / r) - b[j]
                    s1[g, j] += v - zero
                    s2[g, j] += v * v - zero * zero
    return s1, s2


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
