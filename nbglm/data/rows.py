"""Count matrices read a chunk of rows at a time: in memory or in an h5ad file on disk, whole or a
subset of their rows.

Why: a sweep's driver needs each fold's training part only to sum it (group sums, effect PCs, the
baseline's pseudobulks), so a fold's part is `Rows` of the training matrix, never a copy of it; and
at the VCC shape (300,000 cells x 18,080 genes, 4.4 GiB as float32 CSR) that matrix need not be in
memory at all: `OnDisk` reads it from the file when a pass asks for it (a pass over a file in the
page cache takes seconds). Every pass goes through `row_chunks`, so no dense, float64 or log copy
of a whole matrix is ever made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numba
import numpy as np
import scipy.sparse as sp

from nbglm.errors import NbglmError

CHUNK_ROWS = 4096  # rows per chunk ...
CHUNK_ENTRIES = 1 << 20  # ... and at most about this many stored entries (4 MiB per float32 array), so that a
# chunk's copies (read, subset, normalised) stay a few tens of MB however dense the rows


class OnDisk:
    """The X of an h5ad file stored as CSR or dense, read a range of rows at a time. Pickled as its
    path (a Ray worker on the same node reopens the file); anndata writes CSC column-contiguous, so
    a CSC file is read into memory by the caller instead."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._x: Any = None  # the file is opened on the first read, and kept open
        self._indptr: np.ndarray | None = None
        with h5py.File(self.path, "r") as f:
            x = f["X"]
            self.shape = tuple(int(n) for n in (x.attrs["shape"] if isinstance(x, h5py.Group) else x.shape))
            self.dtype = np.dtype((x["data"] if isinstance(x, h5py.Group) else x).dtype)

    @staticmethod
    def readable(path: str | Path) -> bool:
        """True when the file's X can be read by rows: CSR or dense."""
        with h5py.File(path, "r") as f:
            x = f.get("X")
            return isinstance(x, h5py.Dataset) or (isinstance(x, h5py.Group) and
                                                    x.attrs.get("encoding-type") == "csr_matrix")

    def _open(self) -> Any:
        if self._x is None:
            self._x = h5py.File(self.path, "r")["X"]
            if isinstance(self._x, h5py.Group):
                self._indptr = self._x["indptr"][:]
        return self._x

    def indptr(self) -> np.ndarray | None:
        """The row pointers (CSR files), without reading the values."""
        self._open()
        return self._indptr

    def __getitem__(self, rows: slice) -> sp.csr_matrix | np.ndarray:
        x = self._open()
        start, stop, _ = rows.indices(self.shape[0])
        if self._indptr is None:
            return x[start:stop]
        lo, hi = int(self._indptr[start]), int(self._indptr[stop])
        return sp.csr_matrix((x["data"][lo:hi], x["indices"][lo:hi], self._indptr[start:stop + 1] - lo),
                             shape=(stop - start, self.shape[1]))

    def __getstate__(self) -> dict:
        return {"path": self.path, "shape": self.shape, "dtype": self.dtype}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _x=None, _indptr=None)


def csr_on(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix on these very arrays. scipy's constructor copies an array that is a view of one
    more than twice its size (``_prune_array``): values in a lent byte buffer, a block of a larger
    matrix; a copy of a whole file's values in fresh memory took 0.6 s at the VCC size."""
    x = sp.csr_matrix(shape, dtype=data.dtype)
    x.data, x.indices, x.indptr = data, indices, indptr
    return x


def as_csr(block: Any) -> sp.csr_matrix:
    """`block` as a CSR matrix; one already is stays itself (scipy's constructor would copy the
    values of a view, see `csr_on`)."""
    if isinstance(block, sp.csr_matrix):
        return block
    return sp.csr_matrix(block) if sp.issparse(block) else sp.csr_matrix(np.asarray(block))


class Rows:
    """Some rows of a matrix (in memory, anndata-backed or `OnDisk`), in increasing order, read in
    chunks of `CHUNK_ROWS` of the matrix's own rows; each chunk keeps its stored dtype.

    `counts_totals`: every row total of the whole matrix, given when its values were checked as
    counts (`nbglm.data.io.open_counts`): totals then need no pass over the file."""

    def __init__(self, x: Any, rows: np.ndarray | None = None, counts_totals: np.ndarray | None = None) -> None:
        self.x = x
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)
        self.counts_totals = counts_totals
        if self.rows is not None and self.rows.size and (np.diff(self.rows) <= 0).any():
            raise ValueError("Rows: row indices must be strictly increasing")

    @property
    def sparse(self) -> bool:
        """Whether the matrix counts as sparse for cell-eval's normalisation (its median differs for
        dense data): counts in a file are, as `read_counts` reads any file into CSR."""
        return isinstance(self.x, OnDisk) or sp.issparse(self.x) or hasattr(self.x, "format")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0] if self.rows is None else self.rows.size, self.x.shape[1])

    def subset(self, mask: np.ndarray) -> Rows:
        """The rows where `mask` (one entry per row of self) is true."""
        picked = np.flatnonzero(mask)
        return Rows(self.x, picked if self.rows is None else self.rows[picked], self.counts_totals)

    def chunks(self, check: Callable[[np.ndarray], None] | None = None) -> Iterator[tuple[int, sp.csr_matrix]]:
        """(position of the chunk's first row among self's rows, the chunk as CSR with sorted
        indices); `check` sees each chunk's stored values as read, before any conversion."""
        starts = self._window_starts()
        done = 0  # rows of self yielded so far
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist()):
            take = None
            if self.rows is not None:  # the selected rows in this window; only their span is read
                end = done + int(np.searchsorted(self.rows[done:], hi))
                if end == done:
                    continue
                lo, hi = int(self.rows[done]), int(self.rows[end - 1]) + 1
                take = self.rows[done:end] - lo
            block = self._window(lo, hi)
            if check is not None:
                check(block.data if sp.issparse(block) else np.asarray(block))
            block = as_csr(block)
            if take is not None and take.size < hi - lo:
                block = block[take]
            block.sort_indices()
            yield (lo if take is None else done), block
            done += block.shape[0]

    def _window_starts(self) -> np.ndarray:
        """Rows of the matrix where its chunks begin, and its row count: chunks of at most `CHUNK_ROWS`
        rows and, where the row pointers are known, `CHUNK_ENTRIES` stored entries (or one row)."""
        n, indptr = self.x.shape[0], self._indptr()
        starts, lo = [], 0
        while lo < n:
            starts.append(lo)
            hi = min(lo + CHUNK_ROWS, n)
            if indptr is not None:
                fits = int(np.searchsorted(indptr, np.int64(indptr[lo]) + CHUNK_ENTRIES, side="right")) - 1
                hi = min(hi, max(lo + 1, fits))
            lo = hi
        return np.array([*starts, n], dtype=np.int64)

    def _indptr(self) -> np.ndarray | None:
        """The whole matrix's row pointers, where it has them (CSR in memory, on disk or anndata-backed)."""
        if sp.issparse(self.x):
            return self.x.indptr if self.x.format == "csr" else None
        if isinstance(self.x, OnDisk):
            return self.x.indptr()
        if hasattr(self.x, "group"):  # an anndata-backed CSR
            return self.x.group["indptr"][:]
        return None

    def _window(self, lo: int, hi: int) -> Any:
        """Rows lo:hi of the matrix; of an in-memory CSR with sorted indices a view of its arrays
        (scipy's row slice copies them, which costs as much as the pass that reads the chunk)."""
        x = self.x
        if not (sp.issparse(x) and x.format == "csr" and x.has_sorted_indices):
            return x[lo:hi]
        a, b = x.indptr[lo], x.indptr[hi]
        indptr = (x.indptr[lo:hi + 1] - a).astype(x.indices.dtype)
        view = csr_on(x.data[a:b], x.indices[a:b], indptr, (hi - lo, x.shape[1]))
        view.has_sorted_indices = True
        return view

    def totals(self) -> np.ndarray:
        """Each row's sum, float64 (exact for counts)."""
        if self.counts_totals is not None:
            return self.counts_totals if self.rows is None else self.counts_totals[self.rows]
        out = np.zeros(self.shape[0])
        for pos, block in self.chunks():
            out[pos:pos + block.shape[0]] = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
        return out

    def take(self, check: Callable[[np.ndarray], None] | None = None,
             transform: Callable[[sp.csr_matrix], Any] | None = None,
             out: tuple[np.ndarray, np.ndarray] | None = None) -> sp.csr_matrix:
        """The rows as one CSR, written chunk by chunk into arrays allocated once: float32 counts,
        or `transform(chunk)` of each chunk (same stored entries, e.g. normalised values) in the
        dtype it returns; `out`: (values, indices) arrays to write into instead (see `stack_csr`)."""
        blocks = ((pos, block if transform is None else sp.csr_matrix(transform(block)))
                  for pos, block in self.chunks(check))
        return stack_csr(blocks, self.shape, self.nnz(), np.float32 if transform is None else None, out)

    def row_nnz(self) -> np.ndarray | None:
        """Stored entries of each of these rows, from the row pointers; None where there are none."""
        indptr = self._indptr()
        if indptr is None:
            return None
        per_row = np.diff(indptr)
        return per_row if self.rows is None else per_row[self.rows]

    def nnz(self) -> int:
        """Stored entries of these rows: from the row pointers where there are some, else by a pass."""
        per_row = self.row_nnz()
        return sum(block.nnz for _, block in self.chunks()) if per_row is None else int(per_row.sum())


def stack_csr(blocks: Iterable[tuple[int, sp.csr_matrix]], shape: tuple[int, int], nnz: int,
              dtype: np.dtype | type | None, out: tuple[np.ndarray, np.ndarray] | None = None) -> sp.csr_matrix:
    """CSR row blocks, (first row, block), written into one CSR whose arrays are allocated once
    (`nnz` entries; values in `dtype`, or the first block's when None): never a second copy of the
    result, as `sp.vstack` makes while it holds the blocks. `out`: (values, indices) arrays of at
    least `nnz` entries, reused by a caller that stacks many matrices in turn; the result's arrays
    are views of their first `nnz` entries."""
    n_rows, n_cols = shape
    if out is not None:
        data, indices = out[0][:nnz], out[1][:nnz]
    else:
        data = None if dtype is None else np.empty(nnz, dtype)
        indices = np.empty(nnz, np.int32 if n_cols < 2**31 else np.int64)
    indptr = np.zeros(n_rows + 1, np.int32 if nnz < 2**31 else np.int64)
    end = 0
    for pos, block in blocks:
        data = np.empty(nnz, block.dtype) if data is None else data
        begin, end = end, end + block.nnz
        if end > nnz:
            raise NbglmError("the count matrix changed while it was read; read it again")
        data[begin:end], indices[begin:end] = block.data, block.indices
        indptr[pos + 1:pos + 1 + block.shape[0]] = block.indptr[1:] + begin
    if data is None:
        data = np.empty(0, np.float32)
    if out is None:
        return sp.csr_matrix((data, indices, indptr), shape=shape)
    return csr_on(data, indices, indptr, shape)


def row_chunks(x: Any) -> Iterator[tuple[int, sp.csr_matrix]]:
    """(first row, CSR chunk) over `x`: a matrix, or `Rows`."""
    return (x if isinstance(x, Rows) else Rows(x)).chunks()


def row_totals(x: Any) -> np.ndarray:
    """Each row's float64 sum of `x`: a matrix, or `Rows`."""
    return (x if isinstance(x, Rows) else Rows(x)).totals()


@numba.njit(parallel=True, cache=True)
def _add_rows(data, indices, indptr, order, starts, out):  # pragma: no cover - compiled
    for g in numba.prange(starts.size - 1):
        sums = out[g]
        for row in order[starts[g]:starts[g + 1]]:
            # unsigned indices: numba checks a signed index for wrapping around
            for k in range(np.uintp(indptr[row]), np.uintp(indptr[row + 1])):
                sums[np.uintp(indices[k])] += data[k]


def add_rows(x: sp.csr_matrix, group: np.ndarray, out: np.ndarray) -> None:
    """out[group[i]] += row i of CSR `x`, for every row with group[i] >= 0 (`out`: float64 groups
    x columns). One compiled pass over the stored entries: no indicator matrix, no float64 copy;
    groups on the thread pool, each group's rows in order (the sums' bits do not depend on the
    thread count)."""
    group = np.asarray(group, dtype=np.int64)
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(out.shape[0] + 1))
    _add_rows(x.data, x.indices, x.indptr, order, starts, out)


def pseudobulks(x: sp.spmatrix | np.ndarray | Rows, labels: np.ndarray,
                transform: Callable[[sp.spmatrix | np.ndarray], sp.spmatrix | np.ndarray] | None = None,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct labels and the mean row of `x` per label (of `transform(rows)`, applied per
    chunk of rows, so a transformed copy of the whole matrix never exists)."""
    names, codes = np.unique(labels, return_inverse=True)
    sums = np.zeros((names.size, x.shape[1]))
    if transform is None and sp.issparse(x) and x.format == "csr":  # in memory already: one pass
        add_rows(x, codes, sums)
        return names, sums / np.bincount(codes, minlength=names.size)[:, None]
    for start, rows in row_chunks(x):
        add_rows(sp.csr_matrix(rows if transform is None else transform(rows)), codes[start:start + rows.shape[0]], sums)
    return names, sums / np.bincount(codes, minlength=names.size)[:, None]


def return_freed_memory() -> None:
    """Give the OS back the pages of freed arrays that glibc keeps in its heap (arrays under its
    mmap threshold, ~32 MiB, are carved from the heap, and the heap is not shrunk when they are
    freed); a no-op where the C library has no `malloc_trim`."""
    trim = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    if trim is not None:
        trim(0)
