"""Rank a prediction too large to hold a block of perturbations at a time against control cells
whose keys were sorted once (`rank_control`, `rank_sum_against`).

The value code is the float32 bit pattern itself, so that the control and every block share one
key layout (see :mod:`nbglm.metrics.de`), and each block's sorted keys are merged into the
control's rather than sorted with them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.metrics.de import (BLOCK_KEYS, WINDOW_KEYS, KeyLayout, PackedKeys, count_entries, each_run, gene_windows,
                              scan_arrays, scan_keys, scan_windows, sort_blocks, sort_in_place)
from nbglm.metrics.mwu import RankSum, rank_sum_result
from nbglm.metrics.threads import n_threads


@dataclass(frozen=True)
class RankedControl:
    """The control cells' keys, sorted once (`rank_control`), so that many blocks of perturbations
    are ranked against them (`rank_sum_against`) without sorting the control again: float32
    values' bit patterns as the value code (so every block shares one layout), group 0."""

    keys: np.ndarray  # gene << gene_shift | value bits << group_bits, sorted
    gene_start: np.ndarray  # gene g's keys are keys[gene_start[g]:gene_start[g + 1]]
    count: np.ndarray  # nonzero entries per gene
    ties: np.ndarray  # the control's own tie term per gene
    sums: np.ndarray  # column sums
    n_rows: int
    gene_shift: int
    group_bits: int


def _float32_layout(x: sp.csr_matrix, groups: np.ndarray, n_groups: int, group_bits: int) -> KeyLayout:
    """The key layout of float32 `x` with 32 value bits: one layout for the control and every block."""
    if x.dtype != np.float32:
        raise ValueError(f"ranking against a sorted control needs float32 values, not {x.dtype}")
    n_genes = x.shape[1]
    gene_shift = 32 + group_bits
    if max(1, int(n_genes - 1).bit_length()) + gene_shift > 63:
        raise ValueError(f"too many genes x groups to rank against a sorted control: {x.shape}, {n_groups} groups")
    codes = x.data.view(np.uint32)
    counted = count_entries(x.data, codes, x.indices, x.indptr, groups, n_groups, n_genes, n_threads())
    return KeyLayout(codes, 0, gene_shift, group_bits, counted.chunk_entries, counted.group_entries, counted.sums,
                     counted.rows_in_order)


@numba.njit(nogil=True, cache=True)
def _gene_entries(data, indices, entries, sums):  # pragma: no cover - compiled
    """Add each gene's nonzero entries and float64 sum over a chunk of rows."""
    for k in range(data.size):
        if data[k] != 0:
            entries[indices[k]] += 1
            sums[indices[k]] += data[k]


@numba.njit(nogil=True, cache=True)
def _place_keys(data, indices, cursor, keys, gene_shift, group_bits):  # pragma: no cover - compiled
    """Write the group-0 key of each nonzero entry of a chunk at its gene's cursor, and move it on."""
    codes = data.view(np.uint32)
    for k in range(data.size):
        if data[k] != 0:
            j = indices[k]
            keys[cursor[j]] = (np.int64(j) << gene_shift) | (np.int64(codes[k]) << group_bits)
            cursor[j] += 1


def rank_control(chunks: Callable[[], Iterable[sp.csr_matrix]], n_genes: int, max_groups: int) -> RankedControl:
    """Sort the keys of the control cells once. `chunks()` yields them as float32 CSR row chunks and
    is read twice (count each gene's entries, then place them), so that the keys (8 bytes per
    stored entry) are the only copy in memory; `max_groups`: the most groups, control included, of
    any block later ranked against them (`rank_sum_against`)."""
    group_bits = max(1, int(max_groups - 1).bit_length())
    gene_shift = 32 + group_bits
    if max(1, int(n_genes - 1).bit_length()) + gene_shift > 63:
        raise ValueError(f"too many genes x groups to rank against a sorted control: {n_genes} genes, {max_groups} groups")
    entries, sums, n_rows = np.zeros(n_genes, dtype=np.int64), np.zeros(n_genes), 0
    for chunk in chunks():
        if chunk.dtype != np.float32:
            raise ValueError(f"ranking against a sorted control needs float32 values, not {chunk.dtype}")
        _gene_entries(chunk.data, chunk.indices, entries, sums)
        n_rows += chunk.shape[0]
    gene_start = np.concatenate([[0], np.cumsum(entries)])
    keys = np.empty(int(gene_start[-1]), dtype=np.int64)
    cursor = gene_start[:-1].copy()
    for chunk in chunks():
        _place_keys(chunk.data, chunk.indices, cursor, keys, gene_shift, group_bits)
    if not np.array_equal(cursor, gene_start[1:]):
        raise ValueError("the control cells changed between the two passes over them")
    # runs of whole genes of about BLOCK_KEYS keys, each sorted in place: the whole array is sorted
    edges = gene_start[np.array([lo for lo, _ in gene_windows(entries, BLOCK_KEYS)] + [n_genes], dtype=np.int64)]

    def sort_run(run: slice, spare: np.ndarray | None) -> None:
        bounds = edges[run]
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            sort_in_place(keys[lo:hi], spare)

    each_run(PackedKeys(keys, edges, gene_shift, group_bits), sort_run)
    count, below, ties = np.zeros((n_genes, 1), np.int64), np.zeros((n_genes, 1)), np.zeros((n_genes, 1))
    scan_keys(keys, gene_shift, group_bits, np.ones(1), count, below, ties)
    return RankedControl(keys, gene_start, count[:, 0], ties[:, 0], sums, n_rows, gene_shift, group_bits)


def rank_sum_against(control: RankedControl, x: sp.csr_matrix, groups: np.ndarray, n_groups: int,
                     max_keys: int = WINDOW_KEYS) -> RankSum:
    """`rank_sum_test` of the control cells of `control` stacked above `x` (float32 CSR of
    perturbed cells, `groups` in 1..n_groups - 1), equal to it bit for bit, with only the keys of
    `x` sorted: each perturbation entry finds its control entries below and tied by two pointers
    into the control's sorted keys of its gene."""
    groups = np.asarray(groups, dtype=np.int64)
    if n_groups > 1 << control.group_bits:
        raise ValueError(f"{n_groups} groups do not fit the {control.group_bits} group bits the control was sorted with")
    group_w = np.ones(n_groups)
    out = scan_arrays(x.shape[1], n_groups)

    def on_window(packed: PackedKeys) -> None:
        sort_blocks(packed, lambda keys: _merge_scan(keys, control.keys, control.gene_start, packed.gene_shift,
                                                     packed.group_bits, group_w, *out))

    layout = scan_windows(x, groups, lambda m: _float32_layout(m, groups, n_groups, control.group_bits), max_keys,
                          on_window)
    count, below, ties = (a.T for a in out)
    count[0], ties[0] = control.count, control.ties
    layout.sums[0] = control.sums
    n_per_group = np.bincount(groups, minlength=n_groups).astype(np.float64)
    n_per_group[0] = control.n_rows
    return rank_sum_result(count, below, ties, n_per_group, group_w, layout.sums)


@numba.njit(nogil=True, cache=True)
def _merge_scan(keys, ctrl_keys, ctrl_start, gene_shift, group_bits, group_w, count, below, ties):  # pragma: no cover
    """`scan_keys` of the sorted union of `keys` (perturbation entries, sorted) and the control's sorted
    keys, reading the control's without merging them: at a perturbation entry, the control entries
    of its gene below its value (`lt`) and at most its value (`le`) are two pointers that only move
    forward. Only the perturbation groups are updated (the control's own count and tie term come
    from `rank_control`); the sums run in `scan_keys`'s order, so the results are its, bit for bit."""
    mask = (np.int64(1) << group_bits) - 1
    w0 = group_w[0]
    gene, prev = np.int64(-1), np.int64(-1)
    base, end, lt, le, run = 0, 0, 0, 0, 0
    for i in range(keys.size):
        key = keys[i]
        if key >> gene_shift != gene:
            gene = key >> gene_shift
            base, end = ctrl_start[gene], ctrl_start[gene + 1]
            lt, le = base, base
        value = key >> group_bits
        while lt < end and (ctrl_keys[lt] >> group_bits) < value:
            lt += 1
        le = max(le, lt)
        while le < end and (ctrl_keys[le] >> group_bits) <= value:
            le += 1
        run = run + 1 if key == prev else 1
        g = key & mask
        w = group_w[g]
        ctrl, ctrl_block = (le - base) * w0, (lt - base) * w0
        t1 = run * w + (ctrl - ctrl_block)
        t0 = t1 - w
        count[gene, g] += 1
        below[gene, g] += w * 0.5 * (ctrl + ctrl_block)
        ties[gene, g] += (t1 * t1 * t1 - t1) - (t0 * t0 * t0 - t0)
        prev = key
