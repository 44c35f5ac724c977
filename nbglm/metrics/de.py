"""Differential expression of every perturbation against control, all genes at once.

Reproduces pdex 0.3 (cell-eval's DE engine): two-sided Mann-Whitney U with the normal
approximation, tie and continuity corrections, Benjamini-Hochberg within each perturbation, and
log2 fold changes of ``expm1(mean(log1p x))`` pseudobulks. pdex re-ranks the control cells for
every perturbation and gene; here every stored value of the matrix is packed into one integer key
``gene | value | group`` and all keys are sorted once, after which each group's rank sum against
control is a running count of control entries. Zeros are never sorted: with non-negative data
they form one tie block whose contribution has a closed form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.special import erfc
from scipy.stats import false_discovery_control

# Keys are built, and sorted keys reduced, in pieces of about this many entries: big enough to
# amortise the per-piece Python overhead, small enough for the passes over a piece to stay in
# cache and for its temporaries to be reused instead of freshly mapped.
_PIECE = 1 << 17
# Key arrays at least this long are sorted in two halves, one thread each.
_SPLIT_SORT = 1 << 20
_F32_VALUE_BITS = 31  # bit patterns of non-negative float32 values sort like the values

Matrix = np.ndarray | sp.spmatrix | sp.sparray


@dataclass(frozen=True)
class RankSum:
    """Mann-Whitney U of each perturbation's cells (rows) against control, per gene (columns).

    `group_sums` (groups x genes, control first) are the column sums over each group's rows,
    which the ranking gets for free; divided by the row counts they are the pseudobulks.
    """

    u_statistic: np.ndarray
    pvalue: np.ndarray
    group_sums: np.ndarray


def n_threads() -> int:
    """CPUs this process may use (respects affinity masks)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _in_threads(work: Callable[[int, int], None], edges: np.ndarray) -> None:
    """Run work(edges[i], edges[i+1]) for every piece, the pieces split into one run per thread.

    numpy releases the GIL inside each call; one long run per thread keeps the Python between
    calls from contending for it.
    """
    n_runs = max(1, min(n_threads(), edges.size - 1))
    bounds = np.linspace(0, edges.size - 1, n_runs + 1).astype(int)

    def run(i: int) -> None:
        for a, b in zip(edges[bounds[i] : bounds[i + 1]], edges[bounds[i] + 1 : bounds[i + 1] + 1], strict=True):
            work(int(a), int(b))

    if n_runs == 1:
        run(0)
        return
    with ThreadPoolExecutor(n_runs) as pool:
        list(pool.map(run, range(n_runs)))


def _positive_csr(x: Matrix) -> sp.csr_matrix:
    """CSR without stored zeros: zeros are the one tie block that is never sorted."""
    if not sp.issparse(x):
        return sp.csr_matrix(np.asarray(x))
    x = sp.csr_matrix(x)
    if (x.data == 0).any():
        x = x.copy()
        x.eliminate_zeros()
    return x


@dataclass(frozen=True)
class _Layout:
    """Bit layout of the keys ``gene | value | group`` (below bit 63, so keys are int64).

    Values are float32 bit patterns or, for other dtypes, ranks among the distinct values
    (`uniques`, with `codes` the rank of each stored value).
    """

    value_bits: int
    group_bits: int
    uniques: np.ndarray | None = None
    codes: np.ndarray | None = None

    @property
    def gene_shift(self) -> int:
        return self.value_bits + self.group_bits

    @property
    def group_mask(self) -> int:
        return (1 << self.group_bits) - 1

    def values(self, keys: np.ndarray) -> np.ndarray:
        """The matrix values the keys encode."""
        if self.uniques is None:
            bits = (keys >> self.group_bits).astype(np.uint32)
            bits &= (1 << self.value_bits) - 1
            return bits.view(np.float32)
        return self.uniques[(keys >> self.group_bits) & ((1 << self.value_bits) - 1)]


def _pieces(bounds: np.ndarray, size: int) -> np.ndarray:
    """Indices into the increasing `bounds` cutting [0, bounds[-1]) into ~`size` pieces."""
    cut = np.searchsorted(bounds, np.arange(0, int(bounds[-1]), size), side="right") - 1
    return np.unique(np.concatenate([[0], cut, [bounds.size - 1]]))


def _build_keys(x: sp.csr_matrix, groups: np.ndarray, layout: _Layout) -> np.ndarray:
    """Keys of all stored entries, built in row pieces (threads) into one array."""
    keys = np.empty(x.nnz, dtype=np.int64)
    rows = _pieces(x.indptr, _PIECE)

    def build(r0: int, r1: int) -> None:
        lo, hi = x.indptr[r0], x.indptr[r1]
        key = keys[lo:hi]
        key[:] = x.indices[lo:hi]
        key <<= layout.gene_shift
        code = x.data[lo:hi].view(np.uint32) if layout.codes is None else layout.codes[lo:hi]
        key |= code.astype(np.int64) << layout.group_bits
        key |= np.repeat(groups[r0:r1], np.diff(x.indptr[r0 : r1 + 1]))

    _in_threads(build, rows)
    return keys


def _sort(keys: np.ndarray) -> None:
    """Sort in place: split at the median (a linear partition), then sort the halves in threads."""
    if n_threads() < 2 or keys.size < _SPLIT_SORT:
        keys.sort()
        return
    half = keys.size // 2
    keys.partition(half)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(np.ndarray.sort, (keys[:half], keys[half:])))


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal neighbours in a sorted array."""
    new = np.ones(sorted_values.size, dtype=bool)
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=new[1:])
    start = np.flatnonzero(new)
    return start, np.diff(start, append=sorted_values.size)


def _slice_sums(
    keys: np.ndarray, gene_nnz: np.ndarray, n_groups: int, group_w: np.ndarray, layout: _Layout
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rank sums over the sorted keys of a run of whole genes (rows of the outputs: groups).

    Returns the entry counts, the summed control entries ranked strictly below each entry (a tied
    control entry counts one half; control rows meaningless), the tie-correction terms (for a
    perturbation, what its entries add to the control's ties; for control, the control's ties)
    and the sums of the values.
    Only ties that involve control or two entries of one group matter; they are rare enough to
    be found from the control entries and the runs of equal keys, without a pass over all ties.
    """
    n, n_genes = keys.size, gene_nnz.size
    group = keys & layout.group_mask
    cpos = np.flatnonzero(group == 0)
    # Control entries at positions <= i: a step function, cheaper to repeat than to cumsum.
    below = np.repeat(np.arange(cpos.size + 1, dtype=np.float64), np.diff(cpos, prepend=0, append=n))
    cell = np.repeat(np.arange(0, n_genes * n_groups, n_groups), gene_nnz)
    cell += group
    gene_start = np.cumsum(gene_nnz) - gene_nnz
    ctrl_before_gene = np.where(gene_start > 0, below[np.maximum(gene_start - 1, 0)], 0.0) if n else 0.0

    # Runs of equal keys: one group's entries tied with each other.
    pair = np.flatnonzero(keys[1:] == keys[:-1])  # entry pair+1 equals entry pair
    first = np.ones(pair.size, dtype=bool)
    np.not_equal(pair[1:], pair[:-1] + 1, out=first[1:])
    start = pair[first]
    length = np.diff(np.flatnonzero(first), append=pair.size) + 1
    run_pos = np.repeat(start, length) + _ramp(length)
    run_len = np.repeat(length, length)
    if (group_w != 1.0).any():  # a row standing for w > 1 cells ties with itself: a run of w cells
        alone = np.setdiff1d(np.flatnonzero(group_w[group] != 1.0), run_pos, assume_unique=True)
        run_pos = np.concatenate([run_pos, alone])
        run_len = np.concatenate([run_len, np.ones(alone.size, dtype=np.int64)])
        order = np.argsort(run_pos)
        run_pos, run_len = run_pos[order], run_len[order]
    # Entries tied with control: control sorts first within a tie block, so each block holding
    # control runs from the last control entry of its value to the first key of the next value.
    c_start, c_len = _runs(keys[cpos])
    last = cpos[c_start + c_len - 1]
    block_end = np.searchsorted(keys, ((keys[last] >> layout.group_bits) + 1) << layout.group_bits)
    span = block_end - last - 1
    e_pos = np.repeat(last + 1, span) + _ramp(span)
    e_ctrl = np.repeat(c_len, span).astype(np.float64)
    below[e_pos] -= 0.5 * e_ctrl

    # Tie-correction term per entry, summed per (group, gene) below: a run of t rows of a group
    # (weight w, so T = t w cells) in a block with C control cells adds T^3 - T + 3 C T (C + T).
    w_run = group_w[group[run_pos]]
    big_t = run_len * w_run
    e_w = group_w[group[e_pos]]
    e_t = np.ones(e_pos.size)
    if run_pos.size and e_pos.size:
        at = np.searchsorted(run_pos, e_pos)
        hit = (at < run_pos.size) & (run_pos[np.minimum(at, run_pos.size - 1)] == e_pos)
        e_t[hit] = run_len[at[hit]]
    e_big_t = e_t * e_w
    e_big_c = e_ctrl * group_w[0]
    ties = np.bincount(
        np.concatenate([cell[run_pos], cell[e_pos]]),
        weights=np.concatenate([w_run * (big_t * big_t - 1.0), e_w * 3.0 * e_big_c * (e_big_c + e_big_t)]),
        minlength=n_genes * n_groups,
    )

    shape = (n_genes, n_groups)
    count = np.bincount(cell, minlength=n_genes * n_groups).reshape(shape).T
    below_sum = np.bincount(cell, weights=below, minlength=n_genes * n_groups).reshape(shape).T
    below_sum = below_sum - count * ctrl_before_gene
    sums = np.bincount(cell, weights=layout.values(keys), minlength=n_genes * n_groups).reshape(shape).T
    return count, below_sum, ties.reshape(shape).T, sums


def _ramp(length: np.ndarray) -> np.ndarray:
    """0, 1, ..., length[0]-1, 0, 1, ..., length[1]-1, ... (positions within runs)."""
    total = int(length.sum())
    return np.arange(total) - np.repeat(np.cumsum(length) - length, length)


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
    if x.dtype == np.float32:
        layout = _Layout(_F32_VALUE_BITS, group_bits)
    else:
        uniques, codes = np.unique(x.data, return_inverse=True)
        layout = _Layout(max(1, int(uniques.size).bit_length()), group_bits, uniques, codes)
    if max(1, int(n_genes - 1).bit_length()) + layout.gene_shift > 63:
        raise ValueError(f"too many genes x groups x distinct values to rank: {x.shape}, {n_groups} groups")

    keys = _build_keys(x, groups, layout)
    _sort(keys)
    gene_edge = np.searchsorted(keys, np.arange(n_genes + 1, dtype=np.int64) << layout.gene_shift)
    cut = _pieces(gene_edge, _PIECE)

    count = np.empty((n_groups, n_genes), dtype=np.int64)
    below, ties, sums = (np.empty((n_groups, n_genes)) for _ in range(3))

    def reduce(g0: int, g1: int) -> None:
        part = keys[gene_edge[g0] : gene_edge[g1]]
        out = _slice_sums(part, np.diff(gene_edge[g0 : g1 + 1]), n_groups, group_w, layout)
        count[:, g0:g1], below[:, g0:g1], ties[:, g0:g1], sums[:, g0:g1] = out

    _in_threads(reduce, cut)

    w = group_w[1:, None]
    n_ctrl = n_per_group[0]
    ctrl_zeros = n_ctrl - count[0] * group_w[0]
    pert_nnz = count[1:] * w
    zeros = n_per_group[1:, None] - pert_nnz
    u1 = w * group_w[0] * below[1:] + pert_nnz * ctrl_zeros + 0.5 * zeros * ctrl_zeros
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


def group_sums(x: Matrix, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """Per-group column sums in float64 (exact for float32 input, so pseudobulks are order-free)."""
    groups = np.asarray(groups, dtype=np.int64)
    indicator = sp.csr_matrix((np.ones(groups.size), (groups, np.arange(groups.size))), shape=(n_groups, groups.size))
    out = indicator @ x
    return out.toarray() if sp.issparse(out) else np.asarray(out)
