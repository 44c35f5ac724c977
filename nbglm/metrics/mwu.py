"""Mann-Whitney U statistics and p-values from the DE scans' sums, as pdex 0.3 computes them.

The scans (:mod:`nbglm.metrics.de`) give, per gene and group, the nonzero entries, the control
entries below them and the tie terms of the nonzero values; zeros form one tie block with a closed
form. pdex's engine (numba_mwu) takes the normal approximation with tie and continuity corrections
and `math.erfc` in numba: the same operations in the same order here give its p-values bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from nbglm.metrics.threads import on_threads, per_thread


@dataclass(frozen=True)
class RankSum:
    """Mann-Whitney U of each perturbation's cells (rows) against control, per gene (columns).

    `group_sums` (groups x genes, control first) are the column sums over each group's rows;
    divided by the row counts they are the pseudobulks (None where they are not summed). `tie_term` is sum(t^3 - t) over the
    tie blocks of each perturbation-plus-control column, for tests with another p-value formula.
    """

    u_statistic: np.ndarray
    pvalue: np.ndarray
    group_sums: np.ndarray | None
    tie_term: np.ndarray | None = None


def rank_sum_result(count: np.ndarray, below: np.ndarray, ties: np.ndarray, n_per_group: np.ndarray,
                    group_w: np.ndarray, sums: np.ndarray | None) -> RankSum:
    """U statistics and p-values from the scans' (groups x genes) counts, control entries below and tie terms."""
    shape = (count.shape[0] - 1, count.shape[1])
    u1, pvalue, tie_term = np.empty(shape), np.empty(shape), np.empty(shape)
    on_threads(_u_and_pvalue, per_thread(shape[1]), count, below, ties,
               np.asarray(n_per_group, dtype=np.float64), group_w, u1, pvalue, tie_term)
    return RankSum(u1, pvalue, sums, tie_term)


@numba.njit(nogil=True, cache=True, error_model="numpy")  # a gene of one value divides by 0: inf, no error
def _u_and_pvalue(c, n_chunks, count, below, ties, n_per_group, group_w, u1, pvalue,
                  tie_term):  # pragma: no cover - compiled
    """Per perturbation and gene of chunk c of the genes: U of the perturbation (its zeros tie with
    the control's), the tie term with the zeros' block, and the two-sided asymptotic p-value with
    continuity correction, in numba_mwu's order of floating-point operations and with its erfc
    (pdex's p-values bit for bit).

    Per gene, a first loop over the perturbations has no branch or call, so it is vectorised (the
    divisions and square roots were half the time); a second calls erfc. NaN marks a gene of one
    value (no variance), whose p-value is 1."""
    n2 = n_per_group[0]
    n_groups, n_genes = count.shape
    u, tie, z = np.empty(n_groups), np.empty(n_groups), np.empty(n_groups)
    for gene in range(c * n_genes // n_chunks, (c + 1) * n_genes // n_chunks):
        ctrl_zeros = n2 - count[0, gene] * group_w[0]
        for g in range(1, n_groups):
            pert_nnz = count[g, gene] * group_w[g]
            zeros = n_per_group[g] - pert_nnz
            u[g] = group_w[0] * below[g, gene] + pert_nnz * ctrl_zeros + 0.5 * zeros * ctrl_zeros
            z_all = zeros + ctrl_zeros
            tie[g] = (z_all * z_all * z_all - z_all) + (ties[0, gene] + ties[g, gene])
            n1 = n_per_group[g]
            n = n1 + n2
            s_sq = n1 * n2 / 12.0 * ((n + 1.0) - tie[g] / (n * (n - 1.0)))
            z_g = (max(u[g], n1 * n2 - u[g]) - n1 * n2 / 2.0 - 0.5) / math.sqrt(s_sq)
            z[g] = z_g / math.sqrt(2.0) if s_sq > 0.0 else np.nan
        for g in range(1, n_groups):
            p = 1.0 if np.isnan(z[g]) else min(1.0, max(0.0, 0.5 * math.erfc(z[g]) * 2.0))
            u1[g - 1, gene], pvalue[g - 1, gene], tie_term[g - 1, gene] = u[g], p, tie[g]
