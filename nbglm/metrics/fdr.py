"""Benjamini-Hochberg adjustment of the DE p-values, within each perturbation."""

from __future__ import annotations

import numpy as np

from nbglm.metrics.threads import n_threads, thread_pool


def benjamini_hochberg(pvalue: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values along the last axis (genes): scipy's ``false_discovery_control``
    arithmetic, as pdex uses it, without its input checks (p-values here are always valid).
    Runs of rows go to the thread pool: numpy's argsort, most of the cost, releases the GIL."""
    rows = pvalue.reshape(-1, pvalue.shape[-1])
    out = np.empty_like(rows)
    cuts = np.linspace(0, rows.shape[0], min(n_threads(), rows.shape[0]) + 1).astype(np.int64)

    def adjust(lo: int, hi: int) -> None:
        out[lo:hi] = _bh_rows(rows[lo:hi])

    list(thread_pool(max(1, cuts.size - 1)).map(adjust, cuts[:-1], cuts[1:]))
    return out.reshape(pvalue.shape)


def _bh_rows(pvalue: np.ndarray) -> np.ndarray:
    m = pvalue.shape[-1]
    order = np.argsort(pvalue, axis=-1)
    adjusted = np.take_along_axis(pvalue, order, axis=-1)
    adjusted *= m / np.arange(1, m + 1, dtype=adjusted.dtype)
    np.minimum.accumulate(adjusted[..., ::-1], out=adjusted[..., ::-1], axis=-1)
    out = np.empty_like(adjusted)
    np.put_along_axis(out, order, adjusted, axis=-1)
    return np.clip(out, 0.0, 1.0, out=out)
