"""Differential expression of every perturbation against control, all genes at once.

Reproduces pdex 0.3 (cell-eval's DE engine): two-sided Mann-Whitney U with the normal
approximation, tie and continuity corrections, Benjamini-Hochberg within each perturbation, and
log2 fold changes of ``expm1(mean(log1p x))`` pseudobulks.

pdex re-ranks the control cells for every perturbation and gene. Here every stored value of the
matrix is packed into one integer key ``gene | value | group``, and the keys are scattered into
blocks of consecutive genes with about equal numbers of keys (a counting sort; its counting pass
also sums each group's values). A pool of threads then sorts each block with a radix sort (see
:mod:`nbglm.metrics.radix`; numpy's sort where a probe finds it faster on this CPU) and runs one
compiled scan over it that gives every group's rank sum against control (U and p-values from the
scans' sums: :mod:`nbglm.metrics.mwu`; a matrix with more
entries than `WINDOW_KEYS` is ranked a window of consecutive genes at a time, so that its keys
never take more than 256 MiB):
control sorts first within a tie block, so a running count of control entries is each entry's
rank among the controls. Zeros are never stored or sorted: with non-negative data they form one
tie block whose contribution has a closed form. Value codes count from the smallest stored
value, so that a block's keys span few bits. The sort and the kernels release the GIL.

Two variants share the packing, sorting and windows: `nbglm.metrics.de_control` ranks blocks of a
prediction against control cells sorted once, `nbglm.metrics.de_parts` ranks many partitions of one
matrix's cells from one sort.

Why sort everything rather than look each perturbation entry up among its gene's sorted control
values: the lookups hit a table larger than L2 in a data-dependent order; a compiled bucket lookup
of the rank sums alone measured slower than this whole function, before counting any ties. Done a
block at a time after the scatter, where a block's control values fit L1 (a bucket table, a
branchless search within the bucket, a bitset that flags candidate ties), the lookups still took
15-18 ns per key against the sort and scan's 11-12 (one thread, an AVX2 EPYC, VCC-size blocks): each
is a chain of dependent loads, where the radix passes stream.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.data.rows import as_csr
from nbglm.metrics.buffers import borrowed
from nbglm.metrics.mwu import RankSum, rank_sum_result
from nbglm.metrics.prefetch import prefetch_for_write
from nbglm.metrics.radix import radix_is_faster, radix_sort, sort_keys, sort_keys_within
from nbglm.metrics.threads import n_threads, on_threads, per_thread, thread_pool

BLOCK_KEYS = 1 << 15  # keys per block (256 KiB, and as much scratch: sorted and scanned in L2)
WINDOW_KEYS = 1 << 25  # keys packed at once (256 MiB): a larger matrix is ranked a window of genes at a time
_MAX_BLOCKS = WINDOW_KEYS // BLOCK_KEYS  # a full window's blocks sort in L2 without a split (fewer,
# larger blocks are split in cache first, see nbglm.metrics.radix: 8.0 against 5.5 ns per key)
_TASKS_PER_THREAD = 8  # runs of blocks per thread, so that uneven blocks even out
_INTEGER_SCAN_ROWS = 1 << 20  # rows up to which an unweighted scan's tie terms (< rows^3) fit in int64
_LONG_RUNS = 5  # keys per row and block from which the scatter keeps a run's cursor in a register (1 thread, this
# AMD EPYC: 2.96 against 4.14 ns per key at 6.8 per row and block, 3.21 against 3.61 the other way at 4.2)
_PREFETCH_KEYS = 32  # how far past a block's cursor the scatter asks for the line it will write (4 lines)

Matrix = np.ndarray | sp.spmatrix | sp.sparray


class KeysTooWide(ValueError):
    """A gene, a value and a group (or cell) do not fit in one 63-bit key."""


@dataclass(frozen=True)
class EntryCounts:
    """What one counting pass over a matrix finds (see `count_entries`)."""

    chunk_entries: np.ndarray  # (row chunks, genes) nonzero entries per gene in each chunk of rows
    group_entries: np.ndarray  # (groups, genes) nonzero entries per group and gene
    sums: np.ndarray  # (groups, genes) column sums over each group's rows
    code_lo: int  # the smallest and ...
    code_hi: int  # ... the largest value code of a nonzero entry
    rows_in_order: bool  # every row's indices ascending


def count_entries(data: np.ndarray, codes: np.ndarray, indices: np.ndarray, indptr: np.ndarray, groups: np.ndarray,
                  n_groups: int, n_genes: int, n_chunks: int) -> EntryCounts:
    """Per chunk of rows (one task each, on the thread pool): nonzero entries per group and gene;
    float64 column sums per group; the smallest and largest value code of a nonzero entry; and
    whether every row's indices are in order (what scipy's has_sorted_indices finds in a pass of
    its own). The entries per group spare the unweighted scan a counter (see `scan_unweighted`)."""
    counts = np.zeros((n_chunks, n_groups, n_genes), dtype=np.int32 if indptr[-1] < 2**31 else np.int64)
    sums = np.zeros((n_chunks, n_groups, n_genes))
    code_lo = np.full(n_chunks, np.iinfo(np.int64).max)
    code_hi = np.zeros(n_chunks, dtype=np.int64)
    in_order = np.ones(n_chunks, dtype=np.bool_)
    on_threads(_count_chunk, n_chunks, data, codes, indices, indptr, groups, counts, sums, code_lo, code_hi, in_order)
    return EntryCounts(counts.sum(axis=1, dtype=np.int64), counts.sum(axis=0, dtype=np.int64), sums.sum(axis=0),
                       int(code_lo.min()), int(code_hi.max()), bool(in_order.all()))


@numba.njit(nogil=True, cache=True)
def _count_chunk(c, n_chunks, data, codes, indices, indptr, groups, counts, sums, code_lo, code_hi,
                 in_order):  # pragma: no cover - compiled
    """`count_entries` of chunk c of the rows."""
    n_rows = indptr.size - 1
    lo, hi, ordered = code_lo[c], code_hi[c], True
    for row in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
        group_counts, group_sums = counts[c, groups[row]], sums[c, groups[row]]
        before = np.int64(-1)
        # unsigned indices here and below: numba checks a signed index for wrapping around
        for k in range(np.uintp(indptr[row]), np.uintp(indptr[row + 1])):
            gene = np.int64(indices[k])
            ordered &= gene >= before
            before = gene
            if data[k] != 0:
                j = np.uintp(gene)
                group_counts[j] += 1
                group_sums[j] += data[k]
                lo, hi = min(lo, np.int64(codes[k])), max(hi, np.int64(codes[k]))
    code_lo[c], code_hi[c], in_order[c] = lo, hi, ordered


@numba.njit(nogil=True, cache=True)
def _scatter_keys(c, n_chunks, data, codes, code_lo, indices, indptr, row_start, gene_end, groups, gene_block, start,
                  keys, gene_shift, group_bits, long_runs):  # pragma: no cover - compiled
    """Chunk c of the rows' share of filling `keys` with the int64 keys ``gene | value code - code_lo
    | group``, one per nonzero entry of a gene below `gene_end`, reading each row from
    `row_start[row]` (its first entry of this window of genes; left at the next window's first
    entry); chunk c writes block b's keys from `start[c, b]` on, so that each block's keys end up
    contiguous.

    A row's entries come in runs of one block (its genes are consecutive). With `long_runs` a run
    keeps its block's cursor in a register and stores it when the block changes; otherwise each
    entry loads and stores its block's cursor, with no branch on the block changing (which with
    short runs is mispredicted at most entries). On reaching a block it asks for the line
    `_PREFETCH_KEYS` keys past the block's cursor (`nbglm.metrics.prefetch`; AVX2 EPYC, a VCC-size
    window: 7.6 -> 6.3-6.6 ns per key on one thread, 4.4 -> 3.4-3.9 on two)."""
    n_rows = indptr.size - 1
    one = np.uintp(1)  # unsigned indices: numba checks a signed index for wrapping around
    cursor = start[c].copy()
    last = np.uintp(keys.size - 1)
    for row in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
        g = groups[row]
        k, end = np.uintp(row_start[row]), np.uintp(indptr[row + 1])
        run_block, pos = np.uintp(0), cursor[0]
        while k < end and indices[k] < gene_end:
            if data[k] != 0:
                j = indices[k]
                block = np.uintp(gene_block[np.uintp(j)])
                if not long_runs:
                    pos = cursor[block]
                    prefetch_for_write(keys, min(np.uintp(pos) + np.uintp(_PREFETCH_KEYS), last))
                elif block != run_block:
                    cursor[run_block] = pos
                    run_block, pos = block, cursor[block]
                    prefetch_for_write(keys, min(np.uintp(pos) + np.uintp(_PREFETCH_KEYS), last))
                keys[np.uintp(pos)] = (np.int64(j) << gene_shift) | ((np.int64(codes[k]) - code_lo) << group_bits) | g
                pos += 1
                if not long_runs:
                    cursor[block] = pos
            k += one
        if long_runs:
            cursor[run_block] = pos
        row_start[row] = k


@numba.njit(nogil=True, cache=True)
def scan_keys(keys, gene_shift, group_bits, group_w, count, below, ties):  # pragma: no cover - compiled
    """Per (gene, group) from sorted keys: nonzero entries, the (weighted) control entries below
    them, a tied one counting one half, and the tie term of the nonzero values.

    Control sorts first within a value, so at a perturbation entry the running control count
    `ctrl` includes its value's controls and `ctrl_block` (the count where the value began)
    excludes them: below = (ctrl + ctrl_block) / 2. A value held by a weighted perturbation
    entries and c control entries adds (a + c)^3 - (a + c) - (c^3 - c) to the control's own tie
    term; each entry adds its step of that sum, so the loop has no data-dependent branch.
    """
    mask = (np.int64(1) << group_bits) - 1
    w0 = group_w[0]
    gene, prev = np.int64(-1), np.int64(-1)
    ctrl, ctrl_block, run = 0.0, 0.0, 0
    for i in range(keys.size):
        key = keys[i]
        if key >> gene_shift != gene:
            gene, ctrl, ctrl_block = key >> gene_shift, 0.0, 0.0
        if (key >> group_bits) != (prev >> group_bits):
            ctrl_block = ctrl
        run = run + 1 if key == prev else 1
        g = np.uintp(key & mask)  # unsigned indices: numba checks a signed one for wrapping around
        at = (np.uintp(gene), g)
        w = group_w[g]
        t1 = run * w + (0.0 if g == 0 else ctrl - ctrl_block)
        t0 = t1 - w
        count[at] += 1
        below[at] += w * 0.5 * (ctrl + ctrl_block)
        ties[at] += (t1 * t1 * t1 - t1) - (t0 * t0 * t0 - t0)
        ctrl += w0 if g == 0 else 0.0
        prev = key


@numba.njit(nogil=True, cache=True)
def scan_unweighted(keys, gene_shift, group_bits, below2, ties):  # pragma: no cover - compiled
    """`scan_keys` with every group's weight 1, in int64: `below2` gets twice the control entries
    below, and the tie term grows only at a tied value (t1 > 1), a branch that rarely goes the other
    way; the entries per group and gene come from the counting pass (`EntryCounts.group_entries`).
    2.6 against 3.4 ns per key (one thread, an AMD EPYC of family 25 model 17), and 2.6 against
    3.2 for the counter left to the counting pass (model 1); exact while a tie term fits in int64
    (see `_INTEGER_SCAN_ROWS`)."""
    mask = (np.int64(1) << group_bits) - 1
    gene, prev = np.int64(-1), np.int64(-1)
    ctrl, ctrl_block, run = 0, 0, 0
    for i in range(keys.size):
        key = keys[i]
        if key >> gene_shift != gene:
            gene, ctrl, ctrl_block = key >> gene_shift, 0, 0
        if (key >> group_bits) != (prev >> group_bits):
            ctrl_block = ctrl
        run = run + 1 if key == prev else 1
        g = np.uintp(key & mask)  # unsigned indices: numba checks a signed one for wrapping around
        at = (np.uintp(gene), g)
        t1 = run + (0 if g == 0 else ctrl - ctrl_block)
        below2[at] += ctrl + ctrl_block
        if t1 > 1:  # (t1^3 - t1) - (t0^3 - t0) with t0 = t1 - 1
            ties[at] += 3 * t1 * (t1 - 1)
        ctrl += g == 0
        prev = key


@numba.njit(nogil=True, cache=True)
def _scan(keys, gene_shift, group_bits, group_w, count, below, ties):  # pragma: no cover - compiled
    """`scan_unweighted` where `group_w` is None (int64 sums; `count` is left to the counting pass),
    else `scan_keys`."""
    if group_w is None:
        scan_unweighted(keys, gene_shift, group_bits, below, ties)
    else:
        scan_keys(keys, gene_shift, group_bits, group_w, count, below, ties)


@numba.njit(nogil=True, cache=True)
def _radix_sort_and_scan(keys, edges, gene_edges, scratch, gene_shift, group_bits, group_w, count, below,
                         ties):  # pragma: no cover
    """Blocks ``keys[edges[i]:edges[i + 1]]`` one after the other: radix sorted, then scanned
    (`_scan`) while still in cache. Block i holds genes gene_edges[i] to gene_edges[i + 1] - 1, which
    bound its keys: the sort need not find their minimum and maximum."""
    for b in range(edges.size - 1):
        block = keys[edges[b] : edges[b + 1]]
        lo, hi = gene_edges[b] << gene_shift, (gene_edges[b + 1] << gene_shift) - 1
        in_scratch = sort_keys_within(block, scratch, lo, max(lo, hi))
        _scan(scratch[: block.size] if in_scratch else block, gene_shift, group_bits, group_w, count, below, ties)


@dataclass(frozen=True)
class KeyLayout:
    """What the keys of every window of genes share, from one counting pass over the matrix."""

    codes: np.ndarray  # each stored value's code
    code_lo: int  # the smallest code of a nonzero value
    gene_shift: int
    group_bits: int
    chunk_entries: np.ndarray  # (row chunks, genes) nonzero entries per gene in each chunk of rows
    group_entries: np.ndarray  # (groups, genes) nonzero entries per group and gene
    sums: np.ndarray  # (groups, genes) column sums over each group's rows
    rows_in_order: bool  # every row's indices ascending, so that a window of genes is a run of each row

    @property
    def entries(self) -> np.ndarray:
        return self.chunk_entries.sum(axis=0)


@dataclass(frozen=True)
class PackedKeys:
    """One int64 key ``gene << gene_shift | value code << group_bits | group`` per nonzero entry of
    a window of genes, in blocks of consecutive genes: block i is ``keys[edges[i]:edges[i + 1]]``,
    unsorted."""

    keys: np.ndarray
    edges: np.ndarray
    gene_shift: int
    group_bits: int
    gene_edges: np.ndarray | None = None  # block i's genes: gene_edges[i] to gene_edges[i + 1] - 1, where known


def key_layout(x: sp.csr_matrix, groups: np.ndarray, n_groups: int, low_bits: int | None = None) -> KeyLayout:
    """Count the entries of CSR `x` (int64 `groups` per row) per gene, and the bits a key needs
    (`low_bits`: the bits below the value, when they hold more than the group, e.g. a cell)."""
    n_genes = x.shape[1]
    group_bits = max(1, int(n_groups - 1).bit_length()) if low_bits is None else low_bits
    if x.dtype == np.float32:  # the bit patterns of non-negative float32 values sort like the values
        codes = x.data.view(np.uint32)
    elif x.dtype.kind in "iu" and x.dtype.itemsize <= 4:  # small integers sort as themselves
        codes = x.data
    else:  # ranks among the distinct values
        codes = np.unique(x.data, return_inverse=True)[1]
    counted = count_entries(x.data, codes, x.indices, x.indptr, groups, n_groups, n_genes, n_threads())
    code_lo = counted.code_lo
    value_bits = max(1, int(max(0, counted.code_hi - code_lo)).bit_length())  # only the bits the values use
    gene_shift = value_bits + group_bits
    if max(1, int(n_genes - 1).bit_length()) + gene_shift > 63:
        raise KeysTooWide(f"too many genes x groups x distinct values to rank: {x.shape}, {n_groups} groups")
    return KeyLayout(codes, code_lo, gene_shift, group_bits, counted.chunk_entries, counted.group_entries,
                     counted.sums, counted.rows_in_order)


def gene_windows(entries: np.ndarray, max_keys: int) -> list[tuple[int, int]]:
    """Consecutive gene ranges of at most `max_keys` entries each (a gene with more has its own)."""
    ends = np.cumsum(entries)
    windows, lo = [], 0
    while lo < entries.size:
        before = ends[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(ends, before + max_keys, side="right")))
        windows.append((lo, min(hi, entries.size)))
        lo = windows[-1][1]
    return windows


def pack_keys(x: sp.csr_matrix, groups: np.ndarray, layout: KeyLayout, genes: tuple[int, int],
              row_start: np.ndarray, out: np.ndarray | None = None) -> PackedKeys:
    """The keys of the genes in [genes[0], genes[1]) of CSR `x` (indices sorted within rows when
    there are several windows), scattered into blocks of about equal size, written to `out` (bytes,
    at least 8 per key) when given. `row_start`: each row's first entry of this window, moved on to
    the next window's by the scatter (start with ``x.indptr[:-1]`` and the first window)."""
    lo, hi = genes
    counts_by_chunk = layout.chunk_entries[:, lo:hi]
    entries = counts_by_chunk.sum(axis=0)
    n_keys = int(entries.sum())
    n_blocks = int(np.clip(n_keys // BLOCK_KEYS, 1, _MAX_BLOCKS))
    gene_block = np.full(x.shape[1], -1, dtype=np.int64)
    # blocks of about equal keys; genes with no entries after the last key join the last block
    gene_block[lo:hi] = np.minimum((np.cumsum(entries) - entries) * n_blocks // max(1, n_keys), n_blocks - 1)
    counts = np.stack([np.bincount(gene_block[lo:hi], weights=row, minlength=n_blocks)
                       for row in counts_by_chunk]).astype(np.int64)
    start = np.cumsum(counts.T.ravel()).reshape(n_blocks, -1).T - counts  # block-major: a block's chunks in a row
    keys = np.empty(n_keys, dtype=np.int64) if out is None else out[: 8 * n_keys].view(np.int64)
    long_runs = n_keys >= _LONG_RUNS * x.shape[0] * n_blocks
    on_threads(_scatter_keys, start.shape[0], x.data, layout.codes, layout.code_lo, x.indices, x.indptr, row_start, hi,
               groups, gene_block, start, keys, layout.gene_shift, layout.group_bits, long_runs)
    gene_edges = lo + np.searchsorted(gene_block[lo:hi], np.arange(n_blocks + 1))  # gene_block ascends over [lo, hi)
    return PackedKeys(keys, np.append(start[0], n_keys), layout.gene_shift, layout.group_bits, gene_edges)


def each_run(packed: PackedKeys, work: Callable[[slice, np.ndarray | None], None]) -> None:
    """`work(run, scratch)` on runs of blocks on the thread pool (`run`: the slice of `packed.edges`
    that bounds the run's blocks, ``edges[run]``); `scratch` is the thread's radix-sort buffer, None
    where numpy's sort is the faster one here."""
    edges = packed.edges
    workers = n_threads()
    radix = radix_is_faster()
    scratch: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
    for _ in range(workers if radix else 0):  # one buffer per thread, reused by every block
        scratch.put(np.empty(int(np.diff(edges).max(initial=0)), dtype=np.int64))

    def one(run: slice) -> None:
        spare = scratch.get() if radix else None
        work(run, spare)
        if spare is not None:
            scratch.put(spare)

    n_blocks = edges.size - 1
    cuts = np.unique(np.linspace(0, n_blocks, min(n_blocks, workers * _TASKS_PER_THREAD) + 1).astype(np.int64))
    list(thread_pool(workers).map(one, [slice(a, b + 1) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]))


def _sort_and_scan(packed: PackedKeys, group_w: np.ndarray | None, out: tuple[np.ndarray, ...]) -> None:
    """Sort and scan every block, adding to `out` (see `scan_arrays` and :func:`_scan`)."""
    keys, shifts = packed.keys, (packed.gene_shift, packed.group_bits)

    def work(run: slice, spare: np.ndarray | None) -> None:
        edges = packed.edges[run]
        if spare is not None:  # sorted and scanned while in cache, in one call
            _radix_sort_and_scan(keys, edges, packed.gene_edges[run], spare, *shifts, group_w, *out)
            return
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            keys[lo:hi].sort()
            _scan(keys[lo:hi], *shifts, group_w, *out)

    each_run(packed, work)


def sort_blocks(packed: PackedKeys, scan: Callable[[np.ndarray], None]) -> None:
    """Sort every block of `packed` on the thread pool and hand it, sorted, to `scan` on that thread
    (the keys may be in the thread's scratch: wherever the sort left them)."""
    keys = packed.keys

    def work(run: slice, spare: np.ndarray | None) -> None:
        edges = packed.edges[run]
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            block = keys[lo:hi]
            if spare is None:
                block.sort()
            elif sort_keys(block, spare):
                block = spare[: block.size]
            scan(block)

    each_run(packed, work)


def sort_in_place(keys: np.ndarray, spare: np.ndarray | None) -> None:
    """Sort `keys` in place: the radix sort with its scratch, or numpy's where that is faster here."""
    if spare is not None:
        radix_sort(keys, spare)
    else:
        keys.sort()


def rank_sum_test(
    x: Matrix, groups: np.ndarray, n_groups: int, group_weights: np.ndarray | None = None,
    max_keys: int = WINDOW_KEYS,
) -> RankSum:
    """Mann-Whitney U test of every group against group 0 (control) for every gene.

    `x` (cells x genes, dense or sparse, non-negative, no NaN) is compared column by column;
    `groups[i]` in [0, n_groups) is cell i's group. `group_weights[g]` (default 1) says how many
    identical cells each row of group g stands for, so a group of identical cells can be one row.
    Returns (n_groups - 1, genes) arrays for groups 1.. in order, equal to
    ``scipy.stats.mannwhitneyu(pert, control, method="asymptotic", use_continuity=True)``
    (U of the perturbation) as pdex computes it. `max_keys`: the most keys packed at once (8 bytes each).
    """
    groups = np.asarray(groups, dtype=np.int64)
    x = as_csr(x)
    group_w = np.ones(n_groups) if group_weights is None else np.asarray(group_weights, dtype=np.float64)
    n_per_group = np.bincount(groups, minlength=n_groups) * group_w
    integer = group_weights is None and x.shape[0] <= _INTEGER_SCAN_ROWS
    count, below, ties = out = scan_arrays(x.shape[1], n_groups, np.int64 if integer else np.float64)
    layout = scan_windows(x, groups, lambda m: key_layout(m, groups, n_groups), max_keys,
                          lambda packed: _sort_and_scan(packed, None if integer else group_w, out))
    if integer:  # exact integers (and halves) either way, so the float scan's values bit for bit
        count, below, ties = layout.group_entries.T, below * 0.5, ties.astype(np.float64)
    return rank_sum_result(count.T, below.T, ties.T, n_per_group, group_w, layout.sums)


def scan_arrays(n_genes: int, n_groups: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What scans add to, (genes x groups): nonzero entries, control entries below (twice them in
    int64, see `scan_unweighted`), tie terms."""
    return tuple(np.zeros((n_genes, n_groups), dtype=t) for t in (np.int64, dtype, dtype))


def scan_windows(x: sp.csr_matrix, row_bits: np.ndarray, layout_of: Callable[[sp.csr_matrix], KeyLayout],
                 max_keys: int, on_window: Callable[[PackedKeys], None]) -> KeyLayout:
    """Pack the keys of `x` a window of genes at a time (at most `max_keys` keys, in a borrowed
    buffer; `row_bits[row]`: the low bits of the row's keys, its group) and hand each window's keys
    to `on_window`; returns the layout."""
    layout = layout_of(x)
    windows = gene_windows(layout.entries, max_keys)
    if len(windows) > 1 and not layout.rows_in_order:  # a window is a run of each row's entries
        x = x.sorted_indices()
        layout = layout_of(x)
    most = max((int(layout.entries[lo:hi].sum()) for lo, hi in windows), default=0)
    row_start = x.indptr[:-1].astype(np.int64)
    with borrowed("de keys", 8 * most) as buffer:
        for genes in windows:
            on_window(pack_keys(x, row_bits, layout, genes, row_start, buffer))
    return layout


def log2_fold_change(mean_log1p: np.ndarray, ctrl_mean_log1p: np.ndarray) -> np.ndarray:
    """log2 of the ratio of ``expm1(mean(log1p x))`` pseudobulks; 0 where both are 0, as pdex.
    Rows of `mean_log1p` (perturbations x genes) in chunks on the thread pool: numpy's expm1 and
    log2 are scalar libm on CPUs without AVX-512 (16 ms at 50 x 18,080 on an AVX2 EPYC)."""
    shape = np.broadcast_shapes(np.shape(mean_log1p), np.shape(ctrl_mean_log1p))
    mean_log1p, ctrl = np.atleast_2d(mean_log1p), np.expm1(ctrl_mean_log1p)
    lfc = np.empty(np.broadcast_shapes(mean_log1p.shape, ctrl.shape), np.result_type(mean_log1p, ctrl))
    cuts = np.linspace(0, lfc.shape[0], per_thread(lfc.shape[0]) + 1).astype(np.int64)

    def rows(lo: int, hi: int) -> None:
        with np.errstate(divide="ignore", invalid="ignore"):  # numpy's error state is per thread
            part = np.divide(np.expm1(mean_log1p[lo:hi]), ctrl, out=lfc[lo:hi])
            np.log2(part, out=part)
        part[np.isnan(part)] = 0.0

    list(thread_pool(n_threads()).map(rows, cuts[:-1].tolist(), cuts[1:].tolist()))
    return lfc.reshape(shape)
