"""The VCC 2026 profile: six members scaled between a mean-response baseline and a split-half
replicate, numerically matching cell-eval2 0.20 under its `vcc2026` preset.

The real side (its profiles, DE table, control cells, baseline and replicate anchor) does not
depend on the submission: :func:`build_reference` computes it once and it can be saved and
loaded, so scoring a submission costs one pred-side summary and one comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numba
import numpy as np
import scipy.sparse as sp

from nbglm import atomic
from nbglm.data.rows import as_csr
from nbglm.errors import NbglmError
from nbglm.metrics.mwu import RankSum
from nbglm.metrics.de_cache import DataIdentity, read_meta, write_meta
from nbglm.metrics.de_parts import rank_sum_parts
from nbglm.metrics.registry import Metric, register
from nbglm.metrics.vcc2026_de import (DETable, Normalised, de_metrics, de_table, lfc_nmae_split, normalise,
                                      row_totals)
from nbglm.metrics.vcc2026_expr import (Profiles, exclusion_columns, expr_terms, pds_cosine, profiles,
                                        ratio_of_sums)

if TYPE_CHECKING:
    import pandas as pd

PROFILE = "vcc2026"
MAX_CELL_TOTAL = 1e6
N_SPLITS = 5
BASE_SEED = 0
CACHE_VERSION = 1
ARRAYS = "reference.npz"

# The registry holds the aggregate and the six raw panel means (their scaled scores, baseline and
# replicate anchor are in the evaluation result beside them, keyed by the same names).
register(Metric("vcc2026_score", PROFILE, "max", 1.0, "VCC 2026 score",
                "mean scaled member: 0 baseline, 1 replicate"))
_MEMBERS = (  # name, direction, best value (cell-eval2's scoring direction and anchor), title, description
    ("pds_cosine", "max", 1.0, "PDS cosine", "perturbation discrimination, 0–1"),
    ("expr_mse_unbiased_capped_norm", "min", 0.0, "expr MSE", "bias-corrected, / distance from control"),
    ("de_wilcoxon_direction_fidelity_yield_raw", "max", 1.0, "DE fidelity", "direction fidelity yield, 0–1"),
    ("de_wilcoxon_direction_reach_raw", "max", 1.0, "DE reach", "direction reach, 0–1"),
    ("de_wilcoxon_sig_jaccard", "max", 1.0, "DE Jaccard", "significant-gene Jaccard, 0–1"),
    ("de_wilcoxon_lfc_nmae", "min", 0.0, "LFC NMAE", "log2 fold-change error / mean |real|"),
)
MEMBERS = tuple(register(Metric(name, PROFILE, direction, best, title, description, path=(PROFILE, name))).name
                for name, direction, best, title, description in _MEMBERS)


@dataclass(frozen=True)
class Side:
    """One file's summary: sorted non-control labels, profiles, DE table, raw control cells (none
    kept for a side scored against another's control)."""

    labels: np.ndarray
    profiles: Profiles
    de: DETable
    control_counts: sp.csr_matrix


@dataclass(frozen=True)
class Reference:
    """The real side of a context, with the two ends of its scale (panel means per member)."""

    identity: DataIdentity
    genes: np.ndarray
    control: str
    real: Side
    baseline: dict[str, float]
    replicate: dict[str, float]

    def check(self, real, pert_col: str, control: str) -> None:
        """Raise a one-line NbglmError unless `real` is the data this reference was built from."""
        self.identity.check(real, pert_col, control)

    def save(self, directory: str | Path) -> Path:
        """A cache directory like the vcc2025 one: the arrays as npz, names and scale ends in meta.json."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        r, c = self.real, self.real.control_counts
        arrays = {"bulk": r.profiles.bulk, "jackknife": r.profiles.jackknife, "lfc": r.de.lfc, "pvalue": r.de.pvalue,
                  "padj": r.de.padj, "kept": r.de.kept, "ctrl_data": c.data, "ctrl_indices": c.indices,
                  "ctrl_indptr": c.indptr, "ctrl_shape": np.array(c.shape)}
        atomic.write_bytes(directory / ARRAYS, lambda f: np.savez(f, **arrays))
        write_meta(directory, PROFILE, CACHE_VERSION, self.identity, baseline=self.baseline, replicate=self.replicate)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Reference:
        """Read a reference written by :meth:`save`."""
        directory = Path(directory)
        meta, identity = read_meta(directory, PROFILE, CACHE_VERSION, ARRAYS)
        labels = np.array(identity.perts, dtype=object)
        with np.load(directory / ARRAYS, allow_pickle=False) as z:
            ctrl = sp.csr_matrix((z["ctrl_data"], z["ctrl_indices"], z["ctrl_indptr"]), shape=tuple(z["ctrl_shape"]))
            side = Side(labels, Profiles(labels, z["bulk"], z["jackknife"]),
                        DETable(labels, z["lfc"], z["pvalue"], z["padj"], z["kept"]), ctrl)
        return cls(identity, np.array(identity.genes, dtype=object), identity.control, side, meta["baseline"],
                   meta["replicate"])


def _counts(adata) -> sp.csr_matrix:
    return as_csr(adata.X)


def _codes(cell_labels: np.ndarray, control: str, labels: np.ndarray) -> np.ndarray:
    """0 for control cells, 1 + index into `labels` otherwise."""
    codes = np.searchsorted(labels, cell_labels) + 1
    codes[cell_labels == control] = 0
    return codes.astype(np.int64)


def _stack_rows(top: sp.csr_matrix, x: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """`top` above the rows of `x` where `rows` is True, copying `x`'s entries once (sp.vstack of
    `x[rows]` copies them twice: a VCC-size prediction is 600 MiB a copy)."""
    picked = np.flatnonzero(rows)
    lengths = np.concatenate([np.diff(top.indptr), np.diff(x.indptr)[picked]])
    total = int(lengths.sum())
    index_dtype = np.int32 if total < np.iinfo(np.int32).max else np.int64  # as scipy would choose
    indptr = np.zeros(lengths.size + 1, dtype=index_dtype)
    np.cumsum(lengths, out=indptr[1:])
    data = np.empty(total, dtype=np.result_type(top.data, x.data))
    indices = np.empty(total, dtype=index_dtype)
    data[:top.nnz], indices[:top.nnz] = top.data, top.indices
    _copy_rows(x.data, x.indices, x.indptr, picked, data, indices, indptr[top.shape[0]:])
    return sp.csr_matrix((data, indices, indptr), shape=(top.shape[0] + picked.size, x.shape[1]))


@numba.njit(parallel=True, cache=True)
def _copy_rows(data, indices, indptr, picked, out_data, out_indices, out_start):  # pragma: no cover - compiled
    """Row `picked[i]` of (data, indices, indptr) into the outputs from `out_start[i]` on."""
    for i in numba.prange(picked.size):
        lo, hi, at = indptr[picked[i]], indptr[picked[i] + 1], out_start[i]
        out_data[at:at + hi - lo] = data[lo:hi]
        out_indices[at:at + hi - lo] = indices[lo:hi]


def summarize(counts: sp.csr_matrix, cell_labels: np.ndarray, control: str,
              ref_control: sp.csr_matrix | None = None, cells: Normalised | None = None,
              ranks: RankSum | None = None, totals: np.ndarray | None = None) -> Side:
    """Summary of one file; with `ref_control` the DE compares against those control cells instead,
    and the file's own control cells are not summarised beyond their profile (a submission's are
    not scored). `cells`, when the caller holds it: the normalisation of the DE's rows, `counts` or,
    with `ref_control`, `ref_control` above the perturbed rows of `counts`; `ranks`: their rank-sum
    test when the caller ran it (see `de_table`); `totals`: the row totals of `counts` if known."""
    labels = np.array(sorted(set(cell_labels.tolist()) - {control}), dtype=object)
    codes = _codes(cell_labels, control, labels)
    prof = profiles(counts, codes, labels, control_jackknife=ref_control is None)
    if ref_control is None:
        de = de_table(counts, cells if cells is not None else normalise(counts, totals), codes, labels, ranks)
        return Side(labels, prof, de, sp.csr_matrix(counts[codes == 0]))
    pert = codes > 0
    both = _stack_rows(ref_control, counts, pert)
    if cells is None:
        cells = normalise(both, None if totals is None else np.concatenate([row_totals(ref_control), totals[pert]]))
    de = de_table(both, cells, np.concatenate([np.zeros(ref_control.shape[0], np.int64), codes[pert]]), labels)
    return Side(labels, prof, de, sp.csr_matrix((0, counts.shape[1]), dtype=counts.dtype))


def compare(pred: Side, real: Side, genes: np.ndarray, *, own_control: bool = False) -> dict:
    """Per-perturbation values and panel means of the six members, `pred` scored against `real`."""
    cols = exclusion_columns(real.labels, genes, real.labels)
    ctrl = pred.profiles.bulk[0] if own_control else real.profiles.bulk[0]
    per = {"pds_cosine": pds_cosine(pred.profiles.bulk[1:] - ctrl, real.profiles.bulk[1:] - real.profiles.bulk[0], cols)}
    num, den = expr_terms(pred.profiles, real.profiles, cols)
    per.update(de_metrics(real.de, pred.de, genes))
    means = {m: _nanmean(per[m]) for m in MEMBERS if m in per}
    means["expr_mse_unbiased_capped_norm"] = ratio_of_sums(num, den)
    per["expr_mse_unbiased_capped"], per["expr_distance_unbiased"] = num, den
    return {"per_perturbation": per, "means": {m: means[m] for m in MEMBERS}}


def _nanmean(v: np.ndarray) -> float:
    ok = np.isfinite(v)
    return float(v[ok].mean()) if ok.any() else float("nan")


@dataclass(frozen=True)
class BaselineCells:
    """The baseline's cells: row i is `rows[source[i]]`, labelled `labels[i]`. Its cells are
    control cells drawn with replacement, so few rows are distinct: the DE normalises those once."""

    rows: sp.csr_matrix
    source: np.ndarray
    labels: np.ndarray

    def counts(self) -> sp.csr_matrix:
        return self.rows[self.source]

    def normalised_under(self, control: sp.csr_matrix) -> Normalised:
        """`normalise` of `control` above `counts()`, from the distinct rows (a row's normalised
        values depend on that row alone, and the ranks on the distinct values only)."""
        cells = normalise(sp.vstack([control, self.rows], format="csr"))
        return cells.rows(np.concatenate([np.arange(control.shape[0]), control.shape[0] + self.source]))


def baseline_counts(counts: sp.csr_matrix, cell_labels: np.ndarray, control: str, genes: np.ndarray,
                    seed: int = 0) -> BaselineCells:
    """cell-eval2's dispersed mean-response baseline: control cells drawn with replacement per
    perturbation (sorted labels, one generator) and scaled gene-wise to the mean perturbation profile."""
    labels = np.array(sorted(set(cell_labels.tolist()) - {control}), dtype=object)
    codes = _codes(cell_labels, control, labels)
    sums = np.asarray((sp.csr_matrix((np.ones(codes.size), (codes, np.arange(codes.size))),
                                     shape=(labels.size + 1, codes.size)) @ counts.astype(np.float64)).todense())
    means = sums / np.bincount(codes, minlength=labels.size + 1)[:, None]
    pert = means[1:]
    total, count = pert.sum(axis=0), np.full(genes.size, float(labels.size))
    cols = exclusion_columns(labels, genes, labels)
    hit = np.flatnonzero(cols >= 0)
    np.subtract.at(total, cols[hit], pert[hit, cols[hit]])
    np.subtract.at(count, cols[hit], 1.0)
    if (count <= 0).any():
        raise NbglmError("vcc2026: every perturbation targets some gene, so the baseline's mean profile is undefined there")
    ctrl = counts[codes == 0]
    ctrl_mean = np.asarray(ctrl.astype(np.float64).mean(axis=0)).ravel()
    scale = np.where(ctrl_mean <= 0, 0.0, (total / count) / np.where(ctrl_mean <= 0, 1.0, ctrl_mean))
    rng = np.random.default_rng(seed)
    sizes = np.bincount(codes, minlength=labels.size + 1)[1:]
    source = np.concatenate([rng.integers(0, ctrl.shape[0], size=int(s)) for s in sizes])
    drawn, source = np.unique(source, return_inverse=True)
    rows = sp.csr_matrix(ctrl[drawn], dtype=ctrl.dtype, copy=True)
    rows.data = (rows.data * scale[rows.indices]).astype(np.float32)
    rows.eliminate_zeros()
    return BaselineCells(rows, source, np.repeat(labels, sizes))


def _halves(obs: pd.DataFrame, pert_col: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """cell-eval2's disjoint split: per group (pandas groupby order) a permutation, floor(n/2) each."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for idx in obs.groupby(pert_col, observed=True).indices.values():
        perm = rng.permutation(np.asarray(idx))
        h = perm.size // 2
        if h >= 1:
            a.append(perm[:h])
            b.append(perm[h:2 * h])
    return np.concatenate(a), np.concatenate(b)


def replicate_anchor(counts: sp.csr_matrix, obs: pd.DataFrame, pert_col: str, control: str,
                     genes: np.ndarray, full: Side, cells: Normalised) -> dict[str, float]:
    """Mean over 5 split-halves (seeds from SeedSequence(0)) of half B scored against half A, each
    half with its own control; `de_wilcoxon_lfc_nmae` takes its gate from the full reference."""
    cell_labels = obs[pert_col].astype(str).to_numpy()
    codes = _codes(cell_labels, control, full.labels)
    if (np.bincount(codes, minlength=full.labels.size + 1)[1:] < 2).any():  # a half would lack the perturbation
        raise NbglmError("vcc2026: a perturbation has fewer than 2 cells; the replicate anchor needs 2 or more per group")
    seeds = [int(s) for s in np.random.SeedSequence(BASE_SEED).generate_state(N_SPLITS)]
    halves = [_halves(obs, pert_col, seed) for seed in seeds]
    parts = np.full((N_SPLITS, codes.size), -1, dtype=np.int64)
    for split, (ia, ib) in zip(parts, halves, strict=True):
        split[ia], split[ib] = 0, 1
    ranks = rank_sum_parts(cells.ranked, codes, full.labels.size + 1, parts)  # the cells' keys sorted once
    runs = []
    for (ia, ib), (ranks_a, ranks_b) in zip(halves, ranks, strict=True):
        half_a = summarize(counts[ia], cell_labels[ia], control, cells=cells.rows(ia), ranks=ranks_a)
        half_b = summarize(counts[ib], cell_labels[ib], control, cells=cells.rows(ib), ranks=ranks_b)
        means = compare(half_b, half_a, genes, own_control=True)["means"]
        means["de_wilcoxon_lfc_nmae"] = _nanmean(lfc_nmae_split(full.de, half_a.de, half_b.de, genes))
        runs.append(means)
    return {m: float(np.mean([r[m] for r in runs])) for m in MEMBERS}


def build_reference(real, *, pert_col: str, control: str) -> Reference:
    """The real side, the baseline's panel means and the replicate anchor, computed once."""
    counts = _counts(real)
    genes = np.asarray(real.var_names, dtype=object)
    cell_labels = real.obs[pert_col].astype(str).to_numpy()
    if control not in set(cell_labels.tolist()):
        raise NbglmError(f"vcc2026: control label {control!r} not found in the real data's obs[{pert_col!r}]")
    cells = normalise(counts)
    side = summarize(counts, cell_labels, control, cells=cells)
    base = baseline_counts(counts, cell_labels, control, genes)
    b_side = summarize(base.counts(), base.labels, control, ref_control=side.control_counts,
                       cells=base.normalised_under(side.control_counts))
    baseline = compare(b_side, side, genes)["means"]
    replicate = replicate_anchor(counts, real.obs, pert_col, control, genes, side, cells)
    for m in MEMBERS:  # cell-eval2 refuses a scale it cannot define, rather than score against it
        if not math.isfinite(replicate[m] - baseline[m]) or replicate[m] == baseline[m]:
            raise NbglmError(f"vcc2026: the real data gives {m} no scale (baseline {baseline[m]:.4g}, replicate "
                             f"{replicate[m]:.4g}); it needs more cells, or perturbations with a measurable effect")
    return Reference(DataIdentity.of(real, pert_col, control), genes, control, side, baseline, replicate)


def scaled(user: dict[str, float], ref: Reference) -> dict[str, float]:
    """s = (u - b) / (r - b) per member with cell-eval2's clamps: the expression error in [0, 1],
    the fold-change error floored at -6; a missing value takes the member's floor."""
    out = {}
    for m in MEMBERS:
        b, r, u = ref.baseline[m], ref.replicate[m], user[m]
        if m == "expr_mse_unbiased_capped_norm":
            out[m] = 0.0 if not math.isfinite(u) else min(max((u - b) / (r - b), 0.0), 1.0)
        elif m == "de_wilcoxon_lfc_nmae":
            out[m] = -6.0 if not math.isfinite(u) else max((u - b) / (r - b), -6.0)
        else:
            out[m] = (0.0 - b) / (r - b) if not math.isfinite(u) else (u - b) / (r - b)
    return out


def check_submission(pred, ref: Reference, *, pert_col: str) -> np.ndarray:
    """The 2026 rules: raw counts (non-negative, integral, cell totals <= 1e6), the reference's
    gene axis and perturbation labels exactly (control included). Returns the cell totals (float64,
    exact for the integral counts it let through), found by the same pass."""
    genes = np.asarray(pred.var_names, dtype=object)
    if genes.size != ref.genes.size or not np.array_equal(genes, ref.genes):
        raise NbglmError("vcc2026: the prediction's genes differ from the reference's (names or order); "
                         "write the prediction on the reference's gene axis in its order")
    if pert_col not in pred.obs:
        raise NbglmError(f"vcc2026: the prediction has no obs[{pert_col!r}] column; add the perturbation labels")
    labels = set(pred.obs[pert_col].astype(str).tolist())
    want = set(ref.real.labels.tolist()) | {ref.control}
    if labels != want:
        extra, missing = sorted(labels - want)[:3], sorted(want - labels)[:3]
        raise NbglmError(f"vcc2026: the prediction's perturbation labels differ from the reference's "
                         f"(missing {missing}, unexpected {extra}); predict exactly the reference's labels, control included")
    x = _counts(pred)
    invalid, fractional, totals = _value_checks(x.data, x.indptr)
    if invalid:
        raise NbglmError("vcc2026: the prediction has negative or non-finite values; submit raw non-negative counts")
    if fractional:
        raise NbglmError("vcc2026: the prediction has fractional values; submit integral raw counts, not normalised data")
    if totals.size and totals.max() > MAX_CELL_TOTAL:
        raise NbglmError("vcc2026: a predicted cell totals more than 1e6 counts; downscale cells to at most 1e6 counts each")
    return totals


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"})
def _value_checks(data, indptr):  # pragma: no cover - compiled
    """One pass over the stored values: any negative or non-finite, any fractional, each cell's total
    (reassociated sums: exact for integral counts, and a fractional file is refused whatever its totals)."""
    n_rows = indptr.size - 1
    invalid = np.zeros(n_rows, dtype=np.bool_)
    fractional = np.zeros(n_rows, dtype=np.bool_)
    totals = np.zeros(n_rows)
    for row in numba.prange(n_rows):
        bad, frac, total = False, False, 0.0  # locals: a store per value would keep the loop scalar
        for k in range(indptr[row], indptr[row + 1]):
            v = np.float64(data[k])
            bad |= not (v >= 0.0 and v < np.inf)
            frac |= v != np.floor(v)
            total += v
        invalid[row], fractional[row], totals[row] = bad, frac, total
    return invalid.any(), fractional.any(), totals


def evaluate_vcc2026(pred, real, *, pert_col: str, control: str, cache: Reference | None = None) -> dict:
    """Score `pred` against `real` (raw-count AnnData); `cache` is `build_reference(real)` if held."""
    if cache is None:
        ref = build_reference(real, pert_col=pert_col, control=control)
    else:
        ref = cache
        ref.check(real, pert_col, control)
    totals = check_submission(pred, ref, pert_col=pert_col)
    side = summarize(_counts(pred), pred.obs[pert_col].astype(str).to_numpy(), control,
                     ref_control=ref.real.control_counts, totals=totals)
    result = compare(side, ref.real, ref.genes)
    sc = scaled(result["means"], ref)
    values = result["per_perturbation"]
    per = {str(lab): {m: (float(v[i]) if math.isfinite(v[i]) else None) for m, v in values.items()}
           for i, lab in enumerate(side.labels)}
    return {"vcc2026": result["means"], "vcc2026_scaled": sc, "vcc2026_score": float(np.mean(list(sc.values()))),
            "vcc2026_baseline": ref.baseline, "vcc2026_replicate": ref.replicate,
            "n_perturbations": int(side.labels.size), "n_genes": int(ref.genes.size), "per_perturbation": per}
