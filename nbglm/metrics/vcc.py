"""The Virtual Cell Challenge metrics (DES, PDS, MAE) and the baseline-scaled overall score.

Numbers match cell-eval 0.8 (profile ``vcc``, ``score_agg_metrics``) on the same files: inputs
are normalised as cell-eval does, DE is pdex's Wilcoxon test (see :mod:`nbglm.metrics.de`), and
each metric follows cell-eval's definition, including its float32 casts where they decide ties.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numba
import numpy as np
import scipy.sparse as sp

from nbglm.data.rows import Rows, pseudobulks, return_freed_memory
from nbglm.errors import NbglmError
from nbglm.metrics.cells import CellsLike, genes_of, labels_of
from nbglm.metrics.de import gene_windows, log2_fold_change, rank_sum_test
from nbglm.metrics.de_control import rank_control, rank_sum_against
from nbglm.metrics.fdr import benjamini_hochberg
from nbglm.metrics.normalise import Matrix, log1p_of, log1p_transform, to_log1p
from nbglm.metrics.registry import Metric, metric, profile_metrics, register
from nbglm.metrics.threads import on_threads, per_thread

if TYPE_CHECKING:
    import anndata as ad
    import pandas as pd

FDR_THRESHOLD = 0.05
BLOCK_ENTRIES = 1 << 22  # stored entries of the perturbations ranked at once by `summarize_rows` (32 MiB) ...
WINDOW_KEYS = 1 << 22  # ... and the DE keys it packs at once (32 MiB)
PROFILE = "vcc2025"

# overall score: the mean of DES, PDS and MAE, each scaled from the cell-mean baseline (0) to its best (1)
register(Metric("overall_score", PROFILE, "max", 1.0, "overall score", "VCC, baseline-scaled"))


@dataclass(frozen=True)
class FileSummary:
    """What the metrics need from one file, in log1p space: pseudobulks and DE against control.

    Rows of the per-perturbation arrays follow `perts` (sorted labels, control excluded).
    """

    genes: np.ndarray
    perts: np.ndarray
    n_cells: np.ndarray
    control_mean: np.ndarray
    pert_mean: np.ndarray
    pvalue: np.ndarray
    fdr: np.ndarray
    log2_fold_change: np.ndarray


@dataclass(frozen=True)
class MetricResult:
    """One metric: its `values` per perturbation (in the order of `perts`) and, as `mean`, what
    the leaderboard reports."""

    values: np.ndarray
    perts: np.ndarray

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def per_perturbation(self) -> pd.Series:
        import pandas as pd

        return pd.Series(self.values, index=self.perts)


def check_pair(pred: CellsLike, real: CellsLike, pert_col: str, control: str) -> None:
    """Raise a one-line NbglmError unless pred and real can be compared."""
    pred_genes, real_genes = genes_of(pred), genes_of(real)
    if not np.array_equal(pred_genes, real_genes):
        if set(pred_genes) == set(real_genes) and len(pred_genes) == len(real_genes):
            raise NbglmError(
                "pred has the same genes as real but in another order: reorder it with pred[:, real.var_names]"
            )
        only_pred, only_real = np.setdiff1d(pred_genes, real_genes), np.setdiff1d(real_genes, pred_genes)
        raise NbglmError(
            f"pred and real have different genes ({pred_genes.size} vs {real_genes.size}; "
            f"{only_pred.size} only in pred, e.g. {_some(only_pred)}; "
            f"{only_real.size} only in real, e.g. {_some(only_real)})"
        )
    pred_perts = set(labels_of(pred, pert_col, "pred").tolist())  # Python str: three times faster to hash than numpy's
    real_perts = set(labels_of(real, pert_col, "real").tolist())
    for which, perts in (("real", real_perts), ("pred", pred_perts)):
        if control not in perts:
            raise NbglmError(
                f"control label {control!r} not found in {which}.obs[{pert_col!r}] "
                f"(labels include {_some(sorted(perts))}); set the control label"
            )
    if pred_perts != real_perts:
        raise NbglmError(
            f"pred and real have different perturbations: only in pred: {_some(sorted(pred_perts - real_perts))}; "
            f"only in real: {_some(sorted(real_perts - pred_perts))}"
        )
    if len(real_perts) < 2:
        raise NbglmError(f"real has no perturbations besides the control {control!r}")


def _some(items: np.ndarray | list[str], n: int = 5) -> str:
    items = list(items)
    if not items:
        return "none"
    return ", ".join(map(str, items[:n])) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def group_codes(labels: np.ndarray, control: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted perturbation names (control excluded) and each cell's group: 0 = control, i = perts[i-1]."""
    names, codes = np.unique(labels, return_inverse=True)
    ctrl = int(np.searchsorted(names, control))
    perts = np.delete(names, ctrl)
    codes = codes + 1
    codes[codes == ctrl + 1] = 0
    codes[codes > ctrl + 1] -= 1
    return perts, codes


def summarize(
    x: Matrix,
    groups: np.ndarray,
    genes: np.ndarray,
    perts: np.ndarray,
    group_weights: np.ndarray | None = None,
) -> FileSummary:
    """Pseudobulks and DE of one log1p matrix whose cells are in `groups` (0 = control)."""
    n_groups = perts.size + 1
    rows = _group_rows(groups, n_groups, perts)
    test = rank_sum_test(x, groups, n_groups, group_weights)
    return _file_summary(genes, perts, rows, test.group_sums, test.pvalue, group_weights)


def _group_rows(groups: np.ndarray, n_groups: int, perts: np.ndarray) -> np.ndarray:
    rows = np.bincount(groups, minlength=n_groups)
    if (rows == 0).any():
        raise NbglmError(f"no cells for {_some(np.append(['control'], perts)[rows == 0])}")
    return rows


def _file_summary(genes: np.ndarray, perts: np.ndarray, rows: np.ndarray, group_sums: np.ndarray,
                  pvalue: np.ndarray, group_weights: np.ndarray | None = None) -> FileSummary:
    mean = group_sums / rows[:, None]
    weights = np.ones(rows.size) if group_weights is None else np.asarray(group_weights)
    return FileSummary(
        genes=genes,
        perts=perts,
        n_cells=(rows * weights)[1:].astype(np.int64),
        control_mean=mean[0],
        pert_mean=mean[1:],
        pvalue=pvalue,
        fdr=benjamini_hochberg(pvalue),
        log2_fold_change=log2_fold_change(mean[1:], mean[0]),
    )


def summarize_rows(counts: Rows, adata: CellsLike, pert_col: str, control: str, which: str,
                   block_entries: int = BLOCK_ENTRIES) -> FileSummary:
    """`summarize_adata` of a file's counts read as `Rows` (`adata`: its obs and var), holding the
    control cells' sorted DE keys and one block of perturbations at a time (blocks of about
    `block_entries` stored entries), never the whole normalised matrix. The same numbers: a
    perturbation's test sees its own cells and the control's, each chunk is normalised to the whole
    file's target, and the control cells are sorted once (`rank_control`), each block's entries
    then ranked against them (`rank_sum_against`)."""
    perts, groups = group_codes(labels_of(adata, pert_col, which), control)
    rows = _group_rows(groups, perts.size + 1, perts)
    transform = log1p_transform(counts, which)
    row_nnz = counts.row_nnz()
    if row_nnz is None:
        row_nnz = np.concatenate([np.diff(block.indptr) for _, block in counts.chunks()])
    entries = np.bincount(groups, weights=row_nnz, minlength=perts.size + 1).astype(np.int64)
    windows = gene_windows(entries[1:], block_entries)  # consecutive perturbations, not genes
    ctrl = counts.subset(groups == 0)
    ranked = rank_control(lambda: (sp.csr_matrix(transform(chunk)) for _, chunk in ctrl.chunks()), counts.shape[1],
                          1 + max((hi - lo for lo, hi in windows), default=1))
    most = max((int(entries[1 + lo:1 + hi].sum()) for lo, hi in windows), default=0)
    values, indices = np.empty(most, np.float32), np.empty(most, np.int32 if most < 2**31 else np.int64)
    sums, pvalue = np.empty((perts.size + 1, counts.shape[1])), np.empty((perts.size, counts.shape[1]))
    sums[0] = ranked.sums
    for lo, hi in windows:
        keep = (groups > lo) & (groups <= hi)
        part = counts.subset(keep).take(transform=transform, out=(values, indices))
        test = rank_sum_against(ranked, part, groups[keep] - lo, hi - lo + 1, max_keys=WINDOW_KEYS)
        sums[1 + lo:1 + hi], pvalue[lo:hi] = test.group_sums[1:], test.pvalue
        return_freed_memory()  # a block's chunks and keys: the next block's differ in size, so glibc's heap would grow
    return _file_summary(genes_of(adata), perts, rows, sums, pvalue)


def summarize_adata(adata: CellsLike, pert_col: str, control: str, which: str, overwrite: bool = False) -> FileSummary:
    """Normalise one AnnData as cell-eval does and summarise it (`overwrite`: see `log1p_of`)."""
    with log1p_of(adata, which, overwrite) as x:
        return summarize_log1p(x, adata, pert_col, control, which)


def summarize_log1p(x: Matrix, adata: CellsLike, pert_col: str, control: str, which: str) -> FileSummary:
    """Summarise `adata` from its log1p matrix `x`."""
    perts, groups = group_codes(labels_of(adata, pert_col, which), control)
    return summarize(x, groups, genes_of(adata), perts)


def _significant(s: FileSummary) -> np.ndarray:
    # cell-eval stores the FDR as float32 and compares it with 0.05 in float32.
    return s.fdr.astype(np.float32) < np.float32(FDR_THRESHOLD)


@metric("des", PROFILE, "max", 1.0, "DES", "DE-gene overlap, 0–1")
def des(pred: FileSummary, real: FileSummary) -> MetricResult:
    """DE overlap (cell-eval ``overlap_at_N``): share of real's significant genes among pred's top N.

    N is the number of genes significant in real (FDR < 0.05); pred's significant genes are
    ranked by |log2 fold change| (float32, ties in gene order) and the top N kept.
    """
    real_sig, pred_sig = _significant(real), _significant(pred)
    pred_abs = np.abs(pred.log2_fold_change).astype(np.float32)
    values = np.zeros(real.perts.size)
    for i in range(real.perts.size):
        n = int(real_sig[i].sum())
        candidates = np.flatnonzero(pred_sig[i])
        if n == 0 or candidates.size == 0:
            continue
        top = candidates[_largest(pred_abs[i, candidates], n)]
        values[i] = np.count_nonzero(real_sig[i, top]) / n
    return MetricResult(values, real.perts)


def _largest(values: np.ndarray, n: int) -> np.ndarray:
    """Positions of the `n` largest `values`, ties in position order, NaN last: the set of the first
    n of a stable sort of -values, found with one partition instead of a sort (a baseline's
    prediction has most genes significant: a sort of each row was most of scoring it)."""
    if n >= values.size:
        return np.arange(values.size)
    key = np.where(np.isnan(values), -np.inf, values)  # abs values: nothing else is -inf
    nth = np.partition(key, values.size - n)[values.size - n]
    above = np.flatnonzero(key > nth)
    return np.concatenate([above, np.flatnonzero(key == nth)[: n - above.size]])


@metric("pds", PROFILE, "max", 1.0, "PDS", "perturbation discrimination, 0–1")
def pds(pred: FileSummary, real: FileSummary) -> MetricResult:
    """Perturbation discrimination (cell-eval ``discrimination_score_l1``).

    Each file's effect is its pseudobulk minus its own control pseudobulk. For perturbation p,
    the L1 distance (the gene named p left out) from pred's effect to every real effect ranks
    the real perturbations; PDS_p = 1 - rank(p) / N, ties in name order.
    """
    real_effect = real.pert_mean - real.control_mean
    pred_effect = pred.pert_mean - pred.control_mean
    dist = _l1_distances(pred_effect, real_effect)  # (pred p, real q)
    for p, gene in _genes_named(real.perts, real.genes):
        dist[p] -= np.abs(real_effect[:, gene] - pred_effect[p, gene])
    own = np.diag(dist)[:, None]
    rank = (dist < own).sum(axis=1) + np.tril(dist == own, k=-1).sum(axis=1)
    return MetricResult(1.0 - rank / real.perts.size, real.perts)


def _genes_named(names: np.ndarray, genes: np.ndarray) -> list[tuple[int, int]]:
    """(i, j) for every gene j named names[i], in the order of i then j: a search in the sorted
    gene names (comparing every name with every gene took 9 ms at 50 x 18,080)."""
    order = np.argsort(genes, kind="stable")
    first, last = (np.searchsorted(genes[order], names, side) for side in ("left", "right"))
    return [(i, int(j)) for i in range(names.size) for j in order[first[i]:last[i]]]


@metric("mae", PROFILE, "min", 0.0, "MAE", "log1p expression")
def mae(pred: FileSummary, real: FileSummary) -> MetricResult:
    """Mean absolute error between pred and real pseudobulks, over all genes (cell-eval ``mae``)."""
    return MetricResult(np.abs(pred.pert_mean - real.pert_mean).mean(axis=1), real.perts)


def _l1_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """scipy's ``cdist(a, b, "cityblock")`` bit for bit (each sum in gene order, as scipy adds),
    without importing scipy.spatial (a tenth of a second of a command's start-up); rows of `a` in
    chunks on the thread pool."""
    out = np.empty((a.shape[0], b.shape[0]))
    on_threads(_l1_chunk, per_thread(a.shape[0]), a, b, out)
    return out


@numba.njit(nogil=True, cache=True)
def _l1_chunk(c, n_chunks, a, b, out):  # pragma: no cover - compiled
    """Rows of chunk c of `a` against four rows of `b` at a time: four sums, each in gene order,
    added side by side (one sum waits on its previous add; four keep the adder busy)."""
    n_b = b.shape[0]
    for i in range(c * a.shape[0] // n_chunks, (c + 1) * a.shape[0] // n_chunks):
        x = a[i]
        for j in range(0, n_b - n_b % 4, 4):
            y0, y1, y2, y3 = b[j], b[j + 1], b[j + 2], b[j + 3]
            t0 = t1 = t2 = t3 = 0.0
            for k in range(x.size):
                t0 += abs(x[k] - y0[k])
                t1 += abs(x[k] - y1[k])
                t2 += abs(x[k] - y2[k])
                t3 += abs(x[k] - y3[k])
            out[i, j], out[i, j + 1], out[i, j + 2], out[i, j + 3] = t0, t1, t2, t3
        for j in range(n_b - n_b % 4, n_b):
            total = 0.0
            for k in range(x.size):
                total += abs(x[k] - b[j, k])
            out[i, j] = total


def score(pred: FileSummary, real: FileSummary) -> dict[str, MetricResult]:
    """All three VCC metrics of pred against real."""
    return {m.name: m.compute(pred, real) for m in profile_metrics(PROFILE) if m.compute}


def scaled_scores(scores: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """Each metric relative to the baseline, as cell-eval ``score_agg_metrics``: NaN -> 0, clipped at 0."""
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name, best in ((m.name, m.best) for m in profile_metrics(PROFILE) if m.compute):
            user, base = np.float64(scores[name]), np.float64(baseline[name])
            value = 1.0 - user / base if best == 0.0 else (user - base) / (1.0 - base)
            out[name] = float(max(0.0, 0.0 if np.isnan(value) else value))
    return out


def overall_score(scores: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Mean of the baseline-scaled DES, PDS and MAE (the VCC leaderboard shows 100x this)."""
    return float(np.mean(list(scaled_scores(scores, baseline).values())))


def baseline_vector(train: CellsLike, real: CellsLike, pert_col: str, train_counts: Rows | None = None,
                    overwrite: bool = False) -> np.ndarray:
    """The cell-mean baseline's profile: the mean over the training groups' log1p pseudobulks,
    control included as cell-eval does (`real`: only its genes are read). A matrix in train.X is
    normalised whole (`overwrite`: in its own values, see `log1p_of`) and summed in one pass;
    `train_counts` (the counts when train.X is None, e.g. a sweep fold's training part) are
    normalised a chunk at a time."""
    if not np.array_equal(genes_of(train), genes_of(real)):
        raise NbglmError("train and real have different genes or gene order: the baseline needs the same genes")
    x = train.X if train_counts is None else train_counts
    if x is None:
        raise NbglmError("train has no expression matrix (X is empty)")
    labels = labels_of(train, pert_col, "train")
    if train_counts is not None:
        return pseudobulks(x, labels, log1p_transform(x, "train"))[1].mean(axis=0).astype(np.float32)
    with log1p_of(train, "train", overwrite) as logged:
        _, bulks = pseudobulks(logged, labels)
    return bulks.mean(axis=0).astype(np.float32)


def cell_mean_baseline(
    train: CellsLike, real: CellsLike, *, pert_col: str = "target_gene", control: str = "non-targeting"
) -> ad.AnnData:
    """The cell-mean baseline as a prediction of `real` (cell-eval ``build_base_mean_adata``).

    Every cell of every perturbation in `real` (as many cells as real has) gets the mean of the
    training data's group pseudobulks (log1p); real's control cells (log1p) are appended.
    """
    import anndata as ad
    import pandas as pd

    labels = labels_of(real, pert_col, "real")
    if control not in labels:
        raise NbglmError(f"control label {control!r} not found in real.obs[{pert_col!r}]; set the control label")
    vector = baseline_vector(train, real, pert_col)
    x = to_log1p(real, "real")
    is_ctrl = labels == control
    ctrl = x[np.flatnonzero(is_ctrl)]
    ctrl = ctrl.toarray() if sp.issparse(ctrl) else ctrl
    pert_labels = labels[~is_ctrl]
    return ad.AnnData(
        X=np.vstack([np.broadcast_to(vector, (pert_labels.size, vector.size)), ctrl]),
        obs=pd.DataFrame(
            {pert_col: np.concatenate([pert_labels, labels[is_ctrl]])},
            index=[f"baseline_{i}" for i in range(labels.size)],
        ),
        var=pd.DataFrame(index=pd.Index(genes_of(real), dtype=str)),
    )


def baseline_summary(vector: np.ndarray, real: CellsLike, pert_col: str, control: str,
                     control_log1p: Matrix | None = None) -> FileSummary:
    """Summary of :func:`cell_mean_baseline` (profile `vector`, see `baseline_vector`) without
    building it (`control_log1p`: real's control cells' rows of `to_log1p(real)`, when the caller
    has them). Every perturbation's cells are `vector`, so perturbations with as many cells have
    the same test: one row, weighted by the cell count, per distinct count is tested against the
    control cells (each test sees only its own group and the control) and its results are shared."""
    perts, groups = group_codes(labels_of(real, pert_col, "real"), control)
    ctrl = to_log1p(real, "real")[np.flatnonzero(groups == 0)] if control_log1p is None else control_log1p
    sizes, size_of = np.unique(np.bincount(groups, minlength=perts.size + 1)[1:], return_inverse=True)
    rows = np.broadcast_to(vector, (sizes.size, vector.size))
    compact = sp.vstack([sp.csr_matrix(ctrl), sp.csr_matrix(rows)], format="csr")
    compact_groups = np.concatenate([np.zeros(ctrl.shape[0], dtype=np.int64), np.arange(1, sizes.size + 1)])
    by_size = summarize(compact, compact_groups, genes_of(real), sizes.astype(str), np.concatenate([[1.0], sizes]))
    per_pert = ("n_cells", "pert_mean", "pvalue", "fdr", "log2_fold_change")
    return replace(by_size, perts=perts, **{name: getattr(by_size, name)[size_of] for name in per_pert})
