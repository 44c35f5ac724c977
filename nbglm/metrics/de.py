"""Differential expression of every perturbation against control, all genes at once.

Reproduces pdex 0.3 (cell-eval's DE engine): two-sided Mann-Whitney U with the normal
approximation, tie and continuity corrections, Benjamini-Hochberg within each perturbation, and
log2 fold changes of ``expm1(mean(log1p x))`` pseudobulks.

pdex re-ranks the control cells for every perturbation and gene. Here every stored value of the
matrix is packed into one integer key ``gene | value | group`` and all keys are sorted once
(numpy's vectorised sort, the two halves in two threads); one compiled pass over the sorted keys
then gives every group's rank sum against control: control sorts first within a tie block, so a
running count of control entries is each entry's rank among the controls. Zeros are never
stored or sorted: with non-negative data they form one tie block whose contribution has a closed
form. The passes are numba kernels (compiled once, cached on disk), parallel over rows or genes.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp
from scipy.special import erfc
from scipy.stats import false_discovery_control

_F32_VALUE_BITS = 31  # bit patterns of non-negative float32 values sort like the values
_SPLIT_SORT = 1 << 20  # key arrays at least this long are sorted in two halves, one thread each

Matrix = np.ndarray | sp.spmatrix | sp.sparray


@dataclass(frozen=True)
class RankSum:
    """Mann-Whitney U of each perturbation's cells (rows) against control, per gene (columns).

    `group_sums` (groups x genes, control first) are the column sums over each group's rows;
    divided by the row counts they are the pseudobulks.
    """

    u_statistic: np.ndarray
    pvalue: np.ndarray
    group_sums: np.ndarray


def n_threads() -> int:
    """CPUs this process may use (respects affinity masks)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@functools.cache
def threadsafe_kernels() -> bool:
    """Whether two threads may run the parallel kernels at once: numba's tbb and omp layers allow
    it, its fallback workqueue layer does not. The layer is chosen at the first parallel call."""
    _build_keys(np.zeros(1, np.uint32), np.zeros(1, np.int64), np.array([0, 1]), np.zeros(1, np.int64), 32, 1)
    return numba.threading_layer() != "workqueue"


def _positive_csr(x: Matrix) -> sp.csr_matrix:
    """CSR without stored zeros: zeros are the one tie block that is never sorted."""
    if not sp.issparse(x):
        return sp.csr_matrix(np.asarray(x))
    x = sp.csr_matrix(x)
    if (x.data == 0).any():
        x = x.copy()
        x.eliminate_zeros()
    return x


@numba.njit(parallel=True, cache=True)
def _build_keys(codes, indices, indptr, groups, gene_shift, group_bits):  # pragma: no cover - compiled
    """One int64 key ``gene | value code | group`` per stored entry."""
    keys = np.empty(codes.size, dtype=np.int64)
    for row in numba.prange(indptr.size - 1):
        group = groups[row]
        for k in range(indptr[row], indptr[row + 1]):
            keys[k] = (np.int64(indices[k]) << gene_shift) | (np.int64(codes[k]) << group_bits) | group
    return keys


@numba.njit(parallel=True, cache=True)
def _group_sums(data, indices, indptr, groups, n_groups, n_genes, n_blocks):  # pragma: no cover - compiled
    """Column sums per group in float64: each thread sums a block of rows, then the blocks add up."""
    n_rows = indptr.size - 1
    partial = np.zeros((n_blocks, n_groups, n_genes))
    for b in numba.prange(n_blocks):
        for row in range(b * n_rows // n_blocks, (b + 1) * n_rows // n_blocks):
            g = groups[row]
            for k in range(indptr[row], indptr[row + 1]):
                partial[b, g, indices[k]] += data[k]
    return partial.sum(axis=0)


@numba.njit(parallel=True, cache=True)
def _rank_pass(keys, gene_edge, group_bits, n_groups, group_w):  # pragma: no cover - compiled
    """Per (group, gene) from the sorted keys: stored entries, the control entries below them
    (a tied control entry counts one half; weighted) and the tie term of the nonzero values.

    For control the tie term is its own; for a perturbation it is what its entries add to the
    control's: a value held by a (weighted) perturbation entries and c control entries adds
    (a + c)^3 - (a + c) - (c^3 - c).
    """
    n_genes = gene_edge.size - 1
    mask = (np.int64(1) << group_bits) - 1
    count = np.zeros((n_groups, n_genes), dtype=np.int64)
    below = np.zeros((n_groups, n_genes))
    ties = np.zeros((n_groups, n_genes))
    w0 = group_w[0]
    for j in numba.prange(n_genes):
        i, hi, ctrl_below = gene_edge[j], gene_edge[j + 1], 0.0
        while i < hi:
            value = keys[i] >> group_bits
            c = 0
            while i < hi and keys[i] == (value << group_bits):  # control entries of this value
                c += 1
                i += 1
            cw = c * w0
            count[0, j] += c
            ties[0, j] += cw * cw * cw - cw
            while i < hi and (keys[i] >> group_bits) == value:  # then each group's run
                g = keys[i] & mask
                a = 0
                while i < hi and keys[i] == ((value << group_bits) | g):
                    a += 1
                    i += 1
                aw = a * group_w[g]
                count[g, j] += a
                below[g, j] += aw * (ctrl_below + 0.5 * cw)
                t = aw + cw
                ties[g, j] += t * t * t - t - (cw * cw * cw - cw)
            ctrl_below += cw
    return count, below, ties


def _sort(keys: np.ndarray) -> None:
    """Sort in place: split at the median (a linear partition), then sort the halves in threads."""
    if n_threads() < 2 or keys.size < _SPLIT_SORT:
        keys.sort()
        return
    half = keys.size // 2
    keys.partition(half)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(np.ndarray.sort, (keys[:half], keys[half:])))


def rank_sum_test(
    x: Matrix, groups: np.ndarray, n_groups: int, group_weights: np.ndarray | None = None
) -> RankSum:
    """Mann-Whitney U test of every group against group 0 (control) for every gene.

    `x` (cells x genes, dense or sparse, non-negative, no NaN) is compared column by column;
    `groups[i]` in [0, n_groups) is cell i's group. `group_weights[g]` (default 1) says how many
    identical cells each row of group g stands for, so a group of identical cells can be one row.
    Returns (n_groups - 1, genes) arrays for groups 1.. in order, equal to
    ``scipy.stats.mannwhitneyu(pert, control, method="asymptotic", use_continuity=True)``
    (U of the perturbation) as pdex computes it.
    """
    groups = np.asarray(groups, dtype=np.int64)
    x = _positive_csr(x)
    n_genes = x.shape[1]
    group_w = np.ones(n_groups) if group_weights is None else np.asarray(group_weights, dtype=np.float64)
    n_per_group = np.bincount(groups, minlength=n_groups) * group_w

    group_bits = max(1, int(n_groups - 1).bit_length())
    if x.dtype == np.float32:  # the bit patterns sort like the values
        value_bits, codes = _F32_VALUE_BITS, x.data.view(np.uint32)
    else:  # ranks among the distinct values
        uniques, codes = np.unique(x.data, return_inverse=True)
        value_bits = max(1, int(uniques.size).bit_length())
    gene_shift = value_bits + group_bits
    if max(1, int(n_genes - 1).bit_length()) + gene_shift > 63:
        raise ValueError(f"too many genes x groups x distinct values to rank: {x.shape}, {n_groups} groups")

    indices, indptr = x.indices, x.indptr  # int32 or int64, as stored: no copy of the indices
    keys = _build_keys(codes, indices, indptr, groups, gene_shift, group_bits)
    _sort(keys)
    gene_edge = np.searchsorted(keys, np.arange(n_genes + 1, dtype=np.int64) << gene_shift)
    count, below, ties = _rank_pass(keys, gene_edge, group_bits, n_groups, group_w)
    sums = _group_sums(x.data, indices, indptr, groups, n_groups, n_genes, numba.get_num_threads())

    w = group_w[1:, None]
    n_ctrl = n_per_group[0]
    ctrl_zeros = n_ctrl - count[0] * group_w[0]
    pert_nnz = count[1:] * w
    zeros = n_per_group[1:, None] - pert_nnz
    u1 = group_w[0] * below[1:] + pert_nnz * ctrl_zeros + 0.5 * zeros * ctrl_zeros
    z_all = zeros + ctrl_zeros
    tie_term = (z_all * z_all * z_all - z_all) + (ties[0] + ties[1:])
    return RankSum(u1, _mwu_pvalue(u1, n_per_group[1:, None], n_ctrl, tie_term), sums)


def _mwu_pvalue(u1: np.ndarray, n1: np.ndarray, n2: float, tie_term: np.ndarray) -> np.ndarray:
    """Two-sided asymptotic p-value, in numba_mwu's order of floating-point operations."""
    n = n1 + n2
    u = np.maximum(u1, n1 * n2 - u1)
    mu = n1 * n2 / 2.0
    var_inner = (n + 1.0) - tie_term / (n * (n - 1.0))
    s_sq = n1 * n2 / 12.0 * var_inner
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (u - mu - 0.5) / np.sqrt(s_sq)
        p = 0.5 * erfc(z / math.sqrt(2.0)) * 2.0
    return np.where(s_sq <= 0.0, 1.0, np.clip(p, 0.0, 1.0))


def benjamini_hochberg(pvalue: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values along the last axis (genes), as pdex computes them."""
    return false_discovery_control(pvalue, axis=-1)


def log2_fold_change(mean_log1p: np.ndarray, ctrl_mean_log1p: np.ndarray) -> np.ndarray:
    """log2 of the ratio of ``expm1(mean(log1p x))`` pseudobulks; 0 where both are 0, as pdex."""
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(np.expm1(mean_log1p) / np.expm1(ctrl_mean_log1p))
    lfc[np.isnan(lfc)] = 0.0
    return lfc
