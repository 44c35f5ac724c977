"""Read an h5ad file for evaluation: only what the metrics use.

Why not ``anndata.read_h5ad``: it reads every obs and var column, obsm, layers and uns, which the
metrics never look at; at command level reading the files is most of the time left. This reads
X (sparse as stored, in its stored dtype), the perturbation column and the gene names, as `Cells`.
Labels and genes in anndata's usual encodings (string arrays, categoricals of strings) and CSR X
are read with h5py alone; anything else goes through anndata's reader, imported only then.

X's values and indices, when stored as they lie in memory (no compression, native byte order), are
read from the file's bytes on a few threads at once (`read_array`): HDF5 copies chunk after chunk
through its cache on one thread, 0.18 s for a VCC-size file's 560 MB here, against 0.05 s.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp

from nbglm.data.rows import csr_on
from nbglm.errors import NbglmError
from nbglm.metrics.cells import Cells, genes_of, labels_of


class ReadBuffers:
    """Arrays that the X of several files, read one after the other, are read into (each file's X
    is dropped before the next is read), so that a second and third file land in memory the first
    one touched. Each array is touched (filled) before HDF5 reads into it: a read into fresh
    memory took 0.11-0.59 s for 280 MB here, a fill 0.03 s and the read then 0.1 s."""

    def __init__(self, paths: list[Path | str]) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._entries = max(map(_stored_entries, paths), default=0)  # the largest file's, so they never grow

    def array(self, name: str, size: int, dtype: np.dtype) -> np.ndarray:
        """`size` elements of `dtype` (contents undefined), the same memory on every call."""
        key = f"{name}:{np.dtype(dtype).str}"
        kept = self._arrays.get(key)
        if kept is None or kept.size < size:
            kept = self._arrays[key] = np.empty(max(size, self._entries), dtype=dtype)
            kept.fill(0)
        return kept[:size]


def _stored_entries(path: Path | str) -> int:
    try:
        with h5py.File(path, "r") as f:
            data = f.get("X/data")
            return int(data.shape[0]) if isinstance(data, h5py.Dataset) else 0
    except OSError:
        return 0  # not a readable h5ad: reading it says so


def read_counts_for_eval(path: Path | str, pert_col: str, what: str, into: ReadBuffers | None = None,
                         values: bool = True) -> Cells:
    """X, ``obs[pert_col]`` and var_names of the h5ad file at `path` (`what` names it in errors:
    "pred", "real", "train"); a CSR X's values and indices are read `into` those buffers when
    given; without `values`, X is left None. Files without anndata's dataframe encoding (written by
    anndata before 0.7) are read whole by anndata."""
    path = Path(path)
    if not path.is_file():
        raise NbglmError(f"{what} file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if not all(_is_dataframe(f.get(part)) for part in ("obs", "var")):
                labels = None
            else:
                obs, var = f["obs"], f["var"]
                if pert_col not in obs:
                    columns = ", ".join(str(c) for c in np.atleast_1d(obs.attrs.get("column-order", [])))
                    raise NbglmError(
                        f"{what} has no obs column {pert_col!r} (columns: {columns}); set the perturbation column"
                    )
                labels = _read_strings(obs[pert_col])
                genes = _read_strings(var[var.attrs["_index"]])
                x = None if "X" not in f or not values else _read_csr(f["X"], into) if _is_csr(f["X"]) \
                    else _read_elem(f["X"])
        if labels is None:
            import anndata as ad

            adata = ad.read_h5ad(path)
            return Cells(adata.X, pert_col, labels_of(adata, pert_col, what), genes_of(adata))
    except NbglmError:
        raise
    except Exception as error:  # h5py/anndata raise many kinds; the user needs the file and reason
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise NbglmError(f"cannot read {what} file {path} as h5ad: {reason}") from error
    return Cells(x, pert_col, labels, genes)


def _read_strings(element: h5py.Group | h5py.Dataset) -> np.ndarray:
    """A column or index as str: a string array, or a categorical of strings with no missing
    values, read with h5py; any other encoding as anndata reads it, then as str (what
    ``obs[col].to_numpy(str)`` gives)."""
    kind = element.attrs.get("encoding-type")
    if kind == "string-array" and isinstance(element, h5py.Dataset):
        return np.asarray(element.asstr()[()], dtype=str)
    if kind == "categorical" and element["categories"].attrs.get("encoding-type") == "string-array":
        codes = element["codes"][()]
        if codes.size == 0 or codes.min() >= 0:
            return np.asarray(element["categories"].asstr()[()], dtype=str)[codes]
    value = _read_elem(element)
    return np.asarray(value.to_numpy(str) if hasattr(value, "to_numpy") else value, dtype=str)


def _read_elem(element: h5py.Group | h5py.Dataset) -> object:
    from anndata.io import read_elem

    return read_elem(element)


def _is_dataframe(element: h5py.Group | h5py.Dataset | None) -> bool:
    return isinstance(element, h5py.Group) and element.attrs.get("encoding-type") == "dataframe"


def _is_csr(x: h5py.Group | h5py.Dataset) -> bool:
    return isinstance(x, h5py.Group) and x.attrs.get("encoding-type") == "csr_matrix"


def _read_csr(x: h5py.Group, into: ReadBuffers | None) -> sp.csr_matrix:
    """A CSR matrix whose values and indices were read straight into `into`'s arrays (new ones
    without `into`)."""
    arrays = []
    for name in ("data", "indices"):
        dataset = x[name]
        size = dataset.shape[0]
        arrays.append(np.empty(size, dataset.dtype) if into is None else into.array(name, size, dataset.dtype))
        if arrays[-1].size:
            read_array(dataset, arrays[-1])
    indptr, shape = x["indptr"][:], tuple(int(n) for n in x.attrs["shape"])
    if indptr.size and indptr[-1] > np.iinfo(arrays[1].dtype).max:  # scipy widens the indices (a copy)
        return sp.csr_matrix((arrays[0], arrays[1], indptr), shape=shape)
    if indptr.size != shape[0] + 1 or (indptr.size and (indptr[0] != 0 or indptr[-1] != arrays[0].size)) \
            or arrays[0].size != arrays[1].size:
        raise ValueError(f"X is not a well-formed CSR matrix of shape {shape}")  # what scipy's constructor checks
    return csr_on(arrays[0], arrays[1], indptr.astype(arrays[1].dtype, copy=False), shape)


_READ_THREADS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_THREAD_BYTES = 8 << 20  # the least a thread reads: fewer bytes are read faster than a thread starts


def read_array(dataset: h5py.Dataset, out: np.ndarray) -> None:
    """All of the 1-D `dataset` into `out`: its stored bytes read straight from the file by a few
    threads when they are the values as they lie in memory (see `stored_runs`), else through h5py."""
    runs = stored_runs(dataset) if out.dtype == dataset.dtype and out.flags.c_contiguous else None
    if runs is None:
        dataset.read_direct(out)
        return
    raw, item = memoryview(out).cast("B"), out.itemsize
    threads = int(np.clip(out.nbytes // _THREAD_BYTES, 1, _READ_THREADS))
    cuts = np.linspace(0, out.size, threads + 1).astype(np.int64) * item

    def read(lo: int, hi: int) -> None:  # bytes [lo, hi) of `out`
        for first, offset, n in runs:
            a, b = max(lo, first * item), min(hi, (first + n) * item)
            while a < b:
                done = os.preadv(fd, [raw[a:b]], offset + a - first * item)
                if done <= 0:
                    raise OSError(f"{dataset.name}: the file ends inside its stored values")
                a += done

    fd = os.open(dataset.file.filename, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, cuts[:-1], cuts[1:]))
    finally:
        os.close(fd)


def stored_runs(dataset: h5py.Dataset) -> list[tuple[int, int, int]] | None:
    """Where the elements of 1-D `dataset` lie in its file: (first element, byte offset, elements)
    runs, in order, covering all of them, when the file holds them as they lie in memory (native
    byte order, a number type, no filter such as compression, contiguous or chunked, every chunk
    written, a plain file without user block); None otherwise (h5py then reads it)."""
    dtype, plist, f = dataset.dtype, dataset.id.get_create_plist(), dataset.file
    if dataset.ndim != 1 or dataset.size == 0 or dtype.kind not in "fiu" or not dtype.isnative \
            or plist.get_nfilters() or f.driver != "sec2" or f.userblock_size or not hasattr(os, "preadv"):
        return None
    size, item = dataset.size, dtype.itemsize
    if plist.get_layout() == h5py.h5d.CONTIGUOUS:
        offset = dataset.id.get_offset()
        return None if offset is None else [(0, offset, size)]
    if plist.get_layout() != h5py.h5d.CHUNKED or not hasattr(dataset.id, "chunk_iter"):
        return None
    chunks: list[tuple[int, int]] = []
    dataset.id.chunk_iter(lambda info: chunks.append((info.chunk_offset[0], info.byte_offset)))
    length = dataset.chunks[0]
    chunks.sort()
    if [first for first, _ in chunks] != list(range(0, size, length)):
        return None  # a chunk never written reads as the fill value: h5py knows it
    runs: list[tuple[int, int, int]] = []
    for first, offset in chunks:
        n = min(length, size - first)
        if runs and runs[-1][1] + runs[-1][2] * item == offset:  # the chunk follows the last one in the file
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + n)
        else:
            runs.append((first, offset, n))
    return runs
