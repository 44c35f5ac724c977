"""Inputs normalised as cell-eval 0.8 sees them (scanpy's ``normalize_total`` then ``log1p``, in
the file's float dtype, bit for bit), whole, a chunk of rows at a time, or in place."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.data.rows import Rows, as_csr, csr_on
from nbglm.errors import NbglmError
from nbglm.metrics.buffers import borrowed
from nbglm.metrics.threads import n_threads, on_threads, per_thread, thread_pool

if TYPE_CHECKING:
    from nbglm.metrics.cells import CellsLike

_LOG1P_MAX = 15.0  # cell-eval's bound for data that is already log1p-normalised
_FRACTION_EPS = 1e-3  # cell-eval calls data with a fractional part above this "not counts"
BLOCK_ENTRIES = 1 << 17  # stored entries normalised at once by one thread: 512 KiB of float32, in L2
_LOOKUP_WIDTHS = (8, 16, 32, 64, 128, 256)  # table widths `_lookup_width` weighs

Matrix = np.ndarray | sp.csr_matrix


def to_log1p(adata: CellsLike, which: str, out: np.ndarray | None = None) -> Matrix:
    """X in log1p space as cell-eval sees it: counts are normalised, log1p data is kept.

    Integer counts are scaled per cell to the median total count of the file and log1p'd, with
    scanpy's ``normalize_total`` arithmetic (float32 stays float32, integers become float32; the
    median is over all cells for sparse X and over cells with counts for dense X, as scanpy
    does). Fractional data with min >= 0 and max < 15 is taken as log1p already. Anything else
    is an error. Normalised sparse values are written to `out` (bytes, enough for the stored
    entries in the result's dtype) when given.
    """
    x = adata.X
    if x is None:
        raise NbglmError(f"{which} has no expression matrix (X is empty)")
    x = _as_float(as_csr(x) if sp.issparse(x) else np.asarray(x))
    if not x.size or (sp.issparse(x) and not x.nnz):
        return x
    data, indptr = (x.data, x.indptr) if sp.issparse(x) else (x.ravel(), np.arange(0, x.size + 1, x.shape[1]))
    totals = _target(*_row_stats(data, indptr, *_limits(x.dtype)), which, sp.issparse(x), x.dtype,
                     lambda: (data.min(), data.max()))
    if totals is None:
        return x
    return _normalize_log1p(x, *totals, out)


def _as_float(x: Matrix) -> Matrix:
    """cell-eval's dtypes: float32 and float64 stay, anything else becomes float32."""
    return x.astype(np.float32) if x.dtype == np.float16 or not np.issubdtype(x.dtype, np.floating) else x


def _limits(dtype: np.dtype) -> tuple[np.floating, np.floating]:
    """`_row_stats`'s bounds in the data's dtype: a count's fraction, log1p data's largest value."""
    return dtype.type(_FRACTION_EPS), dtype.type(_LOG1P_MAX)


def _target(totals: np.ndarray, negative: np.ndarray, large: np.ndarray, fractional: np.ndarray, which: str,
            sparse: bool, dtype: np.dtype, extremes: Callable[[], tuple[float, float]],
            ) -> tuple[np.ndarray, np.floating] | None:
    """to_log1p's decision for a whole file from its row statistics (`_row_stats`): None for log1p
    data, else the row totals and the normalisation target (their median, over all cells for sparse
    X and over cells with counts for dense X, as scanpy); anything else is an error, which names the
    data's smallest or largest value (`extremes()`: their min and max, found only then)."""
    if not totals.size:
        return None
    if not np.isfinite(totals).all():  # a NaN or infinity makes its row's total one
        raise NbglmError(f"{which} has NaN or infinite values in X: remove or impute them before evaluating")
    if negative.any():
        raise NbglmError(
            f"{which} has negative values in X (min {extremes()[0]:.3g}): expected raw counts or log1p-normalised data"
        )
    if fractional.any():
        if large.any():
            raise NbglmError(
                f"{which} X is neither integer counts nor log1p data: fractional values up to {extremes()[1]:.3g} "
                f"(log1p data stays below {_LOG1P_MAX:g})"
            )
        return None
    totals = totals.astype(dtype)
    return totals, np.median(totals if sparse else totals[totals > 0])


def log1p_transform(x: Matrix | Rows, which: str) -> Callable[[Matrix], Matrix]:
    """`to_log1p` as a transform of row chunks of `x` (a matrix, or `Rows` of one in memory or on
    disk): one pass now decides for the whole file and finds its target (no pass for `Rows` of
    checked counts: their totals are known); each chunk is then normalised on its own, equal to
    the rows of `to_log1p` of the whole file."""
    rows = x if isinstance(x, Rows) else Rows(x)
    if not rows.shape[0]:
        return _as_float
    dtype = _as_float(np.empty(0, getattr(rows.x, "dtype", np.float32))).dtype
    if rows.counts_totals is not None:  # non-negative integers: counts, never log1p data
        totals = rows.totals().astype(dtype)
        plan = (totals, np.median(totals if rows.sparse else totals[totals > 0]))
    else:
        stats = [_row_stats(c.data, c.indptr, *_limits(dtype)) for _, c in rows.chunks() for c in [_as_float(c)]]
        plan = _target(*(np.concatenate(s) for s in zip(*stats)), which, rows.sparse, dtype, lambda: _extremes(rows))
    if plan is None:
        return _as_float
    target = plan[1]

    def transform(chunk: Matrix) -> Matrix:
        chunk = sp.csr_matrix(_as_float(chunk))
        totals = _row_stats(chunk.data, chunk.indptr, *_limits(chunk.dtype))[0].astype(chunk.dtype)
        return _normalize_log1p(chunk, totals, target, None)

    return transform


def _extremes(rows: Rows) -> tuple[float, float]:
    """The smallest and largest stored value of `rows`, a chunk at a time."""
    lows, highs = zip(*((c.data.min(), c.data.max()) if sp.issparse(c) else (c.min(), c.max())
                        for _, c in rows.chunks() if c.size))
    return min(lows), max(highs)


def _row_stats(data: np.ndarray, indptr: np.ndarray, eps: np.floating, log1p_max: np.floating,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per row in one pass (a chunk of rows per thread): the float64 total, and whether the row
    holds a negative value, one of at least `log1p_max`, one whose fraction exceeds `eps`
    (cell-eval's test for data that is not counts)."""
    n_rows = indptr.size - 1
    totals = np.zeros(n_rows)
    flags = np.zeros((3, n_rows), dtype=np.bool_)
    on_threads(_row_stats_chunk, per_thread(n_rows), data, indptr, eps, log1p_max, totals, *flags)
    return totals, *flags


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _row_stats_chunk(c, n_chunks, data, indptr, eps, log1p_max, totals, negative, large,
                     fractional):  # pragma: no cover - compiled
    """`_row_stats` of chunk c of the rows. The loop is vectorised: its entry index is unsigned
    (numba checks a signed one for wrapping around), it takes no min or max (whose NaN rules keep
    it scalar), and the sum may be reordered (`reassoc`: exact for counts in any order; a NaN or
    infinity still reaches it)."""
    n_rows = indptr.size - 1
    for row in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
        total, neg, big, frac = 0.0, False, False, False
        for k in range(np.uintp(indptr[row]), np.uintp(indptr[row + 1])):
            v = data[k]
            total += v
            neg |= v < 0
            big |= v >= log1p_max
            frac |= v - np.trunc(v) > eps
        totals[row], negative[row], large[row], fractional[row] = total, neg, big, frac


@numba.njit(nogil=True, cache=True)
def _divide_rows(data, indptr, scale, out, lo, hi):  # pragma: no cover - compiled
    """out = data / scale[row] per stored entry of rows lo..hi-1 (IEEE division: numpy's result, bit for bit).
    An unsigned entry index lets the loop be vectorised (numba checks a signed one for wrapping around)."""
    for row in range(lo, hi):
        s = scale[row]
        for k in range(np.uintp(indptr[row]), np.uintp(indptr[row + 1])):
            out[k] = data[k] / s


def _divide_log1p(data: np.ndarray, indptr: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out = log1p(data / scale[row]): blocks of rows of about `BLOCK_ENTRIES` entries are normalised
    while they are in cache, on the thread pool (numpy's log1p, whose bits the metrics keep,
    releases the GIL): one pass over memory instead of two, and both cores. Where numpy's log1p is
    slow (scalar libm: 10 ns per value on an AVX2 EPYC, against SVML's vectors with AVX-512) and
    each row holds many small counts, a row's counts 0..width-1 are log1p'd once and looked up (see
    `_lookup_width`)."""
    n_rows = indptr.size - 1
    firsts = np.searchsorted(indptr, np.arange(0, indptr[-1], BLOCK_ENTRIES), side="right") - 1  # rows of block starts
    cuts = np.unique(np.concatenate([[0], firsts, [n_rows]]))
    width = _lookup_width(data, n_rows)

    def blocks(run: np.ndarray) -> None:
        for lo, hi in zip(run[:-1].tolist(), run[1:].tolist(), strict=True):
            if width:
                _log1p_by_lookup(data, indptr, scale, out, lo, hi, width)
                continue
            _divide_rows(data, indptr, scale, out, lo, hi)
            part = out[indptr[lo]:indptr[hi]]
            np.log1p(part, out=part)

    workers = min(n_threads(), cuts.size - 1)
    if workers <= 1:
        blocks(cuts)
        return
    # a few runs of blocks per thread: a task per block spent more on handing tasks over than on some blocks
    ends = np.unique(np.linspace(0, cuts.size - 1, 4 * workers + 1).astype(np.int64))
    list(thread_pool(workers).map(blocks, [cuts[a:b + 1] for a, b in zip(ends[:-1], ends[1:], strict=True)]))


def _lookup_width(data: np.ndarray, n_rows: int) -> int:
    """The table width (counts 0..width-1 per row) that makes `_log1p_by_lookup` call log1p least
    often, or 0 where dividing and log1p'ing every value costs less: a table costs a log1p per row
    and count, a value outside it one more, and a lookup `lookup_cost()` log1p's (from a sample
    of the values)."""
    ratio = lookup_cost()
    if data.size < 4 * n_rows or ratio >= 0.5:  # sparse rows or a fast log1p: nothing to save
        return 0
    sample = np.sort(data[:: max(1, data.size // 8_192)])
    widths = np.array(_LOOKUP_WIDTHS)
    outside = (sample.size - np.searchsorted(sample, widths)) / sample.size * data.size
    cost = n_rows * widths + outside + ratio * data.size
    best = int(np.argmin(cost))
    return int(widths[best]) if cost[best] < data.size else 0


def _log1p_by_lookup(data: np.ndarray, indptr: np.ndarray, scale: np.ndarray, out: np.ndarray, lo: int, hi: int,
                     width: int) -> None:
    """Rows lo..hi-1 of `_divide_log1p`: log1p(c / scale[row]) for every count c < `width` by numpy
    (the same division and log1p as every value gets otherwise, so the same bits), looked up per
    value; a value that is not such a count (large, or fractional) is divided and log1p'd apart."""
    table = (np.arange(width, dtype=data.dtype)[None, :] / scale[lo:hi, None]).astype(out.dtype, copy=False)
    np.log1p(table, out=table)  # in out's dtype, as the values it stands for are log1p'd
    missed = np.empty(int(indptr[hi] - indptr[lo]), dtype=np.intp)
    missed = missed[: _look_up_rows(data, indptr, scale, table, out, lo, hi, missed)]
    if missed.size:
        out[missed] = np.log1p(out[missed])


@numba.njit(nogil=True, cache=True)
def _look_up_rows(data, indptr, scale, table, out, lo, hi, missed):  # pragma: no cover - compiled
    """out = table[row - lo, data] where data holds a count below the table's width, else data /
    scale[row] (IEEE division, as `_divide_rows`), its position noted in `missed` for a log1p; the
    number of those. `out` may be `data`: each value is read before its result is written."""
    top = data.dtype.type(table.shape[1] - 1)
    n = 0
    for row in range(lo, hi):
        values, s = table[row - lo], scale[row]
        for k in range(np.uintp(indptr[row]), np.uintp(indptr[row + 1])):
            v = data[k]
            c = np.int32(min(v, top))  # values are non-negative and finite here; a signed conversion is the fast one
            if v == c:
                out[k] = values[np.uintp(c)]
            else:
                out[k] = v / s
                missed[n] = k
                n += 1
    return n


@functools.cache
def lookup_cost() -> float:
    """What looking one value up in `_log1p_by_lookup` costs in numpy float32 log1p's on this CPU
    (best of three, each side timed on the same 65,536 counts): about 0.1 where numpy's log1p is
    scalar libm, 1 or more where it is vectorised."""
    rng = np.random.default_rng(0)
    n_rows, per_row = 64, 1_024
    data = rng.poisson(2.0, n_rows * per_row).astype(np.float32)
    indptr = np.arange(0, data.size + 1, per_row)
    scale = rng.uniform(0.5, 2.0, n_rows).astype(np.float32)
    table = np.log1p(np.arange(32, dtype=np.float32)[None, :] / scale[:, None])
    out, missed = np.empty_like(data), np.empty(data.size, dtype=np.intp)
    _look_up_rows(data, indptr, scale, table, out, 0, n_rows, missed)  # compiled or loaded outside the timing
    best = {"lookup": np.inf, "log1p": np.inf}
    for _ in range(3):
        start = time.perf_counter()
        _look_up_rows(data, indptr, scale, table, out, 0, n_rows, missed)
        best["lookup"] = min(best["lookup"], time.perf_counter() - start)
        start = time.perf_counter()
        np.log1p(data, out=out)
        best["log1p"] = min(best["log1p"], time.perf_counter() - start)
    return best["lookup"] / best["log1p"]


def _normalize_log1p(x: Matrix, totals: np.ndarray, target: np.floating, out: np.ndarray | None) -> Matrix:
    """scanpy ``normalize_total`` (to `target`) then ``log1p``, same dtype; sparse values go to
    `out` (bytes) when it is given and large enough."""
    scale = totals / target
    scale += scale == 0
    if sp.issparse(x):
        nbytes = x.data.nbytes
        data = np.empty_like(x.data) if out is None or out.size < nbytes else out[:nbytes].view(x.dtype)
        _divide_log1p(x.data, x.indptr, scale, data)
        return csr_on(data, x.indices, x.indptr, x.shape)
    out = np.divide(x, scale[:, None])
    return np.log1p(out, out=out)


@contextmanager
def log1p_of(adata: CellsLike, which: str, overwrite: bool = False) -> Iterator[Matrix]:
    """`to_log1p(adata)`, its sparse values in a buffer lent for the block (`nbglm.metrics.buffers`),
    or with `overwrite` in X's own values array (float CSR X only; X then holds log1p values)."""
    x = adata.X
    if overwrite and sp.issparse(x) and x.format == "csr" and x.dtype in (np.float32, np.float64):
        yield to_log1p(adata, which, x.data.view(np.uint8))
        return
    stored = adata.X.nnz if sp.issparse(adata.X) else 0
    itemsize = 8 if adata.X is not None and adata.X.dtype == np.float64 else 4
    with borrowed("log1p values", itemsize * stored) as out:
        yield to_log1p(adata, which, out)
