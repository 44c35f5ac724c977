"""Rank-sum tests of many partitions of one matrix's cells, from one sort of its keys.

Why: the VCC 2026 replicate anchor tests five split-halves of the real cells, each half's
perturbations against its own control half: ten rank-sum tests of the same values (a cell's log1p
CPM depends on that cell alone). Here the keys are packed once with the cell, not its group, below
the value, and each block is sorted once; per partition, each block's keys are then split by part,
the cell replaced by its group, and each part scanned as `rank_sum_test` scans. Cells are numbered
group by group, control first, so a part's split keys are still sorted: the scans add what
:func:`nbglm.metrics.de.rank_sum_test` of the part adds, in the same order, and the results are
equal bit for bit. Ten halves of the small benchmark pair cost about half of ten tests."""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.metrics.de import (WINDOW_KEYS, KeysTooWide, PackedKeys, key_layout, rank_sum_test, scan_keys, scan_windows,
                              sort_blocks)
from nbglm.metrics.mwu import RankSum, rank_sum_result


def rank_sum_parts(x: sp.csr_matrix, groups: np.ndarray, n_groups: int, parts: np.ndarray,
                   max_keys: int = WINDOW_KEYS) -> list[list[RankSum]]:
    """`rank_sum_test` of each part of each partition of the rows of CSR `x` (cells in
    `groups`, 0 = control): row r is in part ``parts[p, r]`` of partition p (0, 1, ...; -1: in
    none). Returns, per partition, one RankSum per part, without group sums."""
    groups = np.asarray(groups, dtype=np.int64)
    parts = np.atleast_2d(np.asarray(parts, dtype=np.int64))
    n_parts, n_genes = int(parts.max(initial=-1)) + 1, x.shape[1]
    order = np.argsort(groups, kind="stable")  # cell numbers: group by group, control first
    cell = np.empty(groups.size, dtype=np.int64)
    cell[order] = np.arange(groups.size)
    cell_bits = max(1, int(groups.size - 1).bit_length())
    group_bits = max(1, int(n_groups - 1).bit_length())
    shape = (parts.shape[0], n_parts, n_genes, n_groups)
    count, below, ties = np.zeros(shape, np.int64), np.zeros(shape), np.zeros(shape)

    cell_group, cell_part = groups[order], np.ascontiguousarray(parts[:, order])

    def on_window(packed: PackedKeys) -> None:
        sort_blocks(packed, lambda keys: _scan_parts(keys, packed.gene_shift, cell_bits, group_bits, cell_group,
                                                     cell_part, count, below, ties))

    try:
        scan_windows(x, cell, lambda m: key_layout(m, groups, n_groups, cell_bits), max_keys, on_window)
    except KeysTooWide:  # no room for a cell's bits: one test per part
        return [[rank_sum_test(x[row_of == q], groups[row_of == q], n_groups, max_keys=max_keys)
                 for q in range(n_parts)] for row_of in parts]
    ones = np.ones(n_groups)
    return [[rank_sum_result(count[p, q].T, below[p, q].T, ties[p, q].T,
                             np.bincount(groups[row_of == q], minlength=n_groups) * ones, ones, None)
             for q in range(n_parts)] for p, row_of in enumerate(parts)]


@numba.njit(nogil=True, cache=True)
def _scan_parts(keys, gene_shift, cell_bits, group_bits, cell_group, cell_part, count, below, ties):  # pragma: no cover
    """Per partition p, split the sorted keys (low `cell_bits`: a cell) by part, each cell's group
    in place of the cell (cell c: group ``cell_group[c]``, part ``cell_part[p, c]``, -1: none),
    and scan each part's keys with `scan_keys` into ``count[p, q]`` etc.: a part's keys are still
    sorted, since cells are numbered group by group."""
    mask = (np.int64(1) << cell_bits) - 1
    n_parts = count.shape[1]
    group_shift = gene_shift - cell_bits + group_bits
    split = np.empty((n_parts, keys.size), dtype=np.int64)
    filled = np.zeros(n_parts, dtype=np.int64)
    ones = np.ones(count.shape[3])
    for p in range(cell_part.shape[0]):
        part_of = cell_part[p]
        filled[:] = 0
        for i in range(keys.size):
            c = keys[i] & mask
            q = part_of[c]
            if q >= 0:
                split[q, filled[q]] = ((keys[i] >> cell_bits) << group_bits) | cell_group[c]
                filled[q] += 1
        for q in range(n_parts):
            scan_keys(split[q, :filled[q]], group_shift, group_bits, ones, count[p, q], below[p, q], ties[p, q])
