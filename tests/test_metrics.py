"""VCC metrics: agreement with cell-eval 0.8 and scipy, the ground-truth cache, input checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from numba_mwu import mannwhitneyu_columns  # pdex 0.3's test engine (cell-eval's dependency)
from scipy.stats import false_discovery_control, mannwhitneyu

import nbglm.data.rows
import nbglm.metrics.de
import nbglm.metrics.de_control
import nbglm.metrics.de_parts
from nbglm.errors import NbglmError
from nbglm.metrics import (
    baseline_vector,
    benjamini_hochberg,
    build_de_cache,
    cell_mean_baseline,
    evaluate,
    load_de_cache,
    overall_score,
    rank_sum_test,
    summarize_adata,
    to_log1p,
)
from nbglm.metrics.buffers import borrowed
from nbglm.metrics.io import read_counts_for_eval
from nbglm.metrics.radix import _BUCKET_KEYS, radix_is_faster, radix_sort, sort_keys, sort_keys_within
from nbglm.cli import main
from nbglm.metrics.vcc import group_codes, summarize_rows
from nbglm.data.io import write_h5ad_rows
from nbglm.data.rows import OnDisk, Rows

import cell_eval  # dev dependency: the reference implementation

CONTROL = "non-targeting"
REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "scperturb_testdata_jurkat_crispr.h5ad"
TOL = 1e-6
CELL_EVAL_NAMES = {"des": "overlap_at_N", "pds": "discrimination_score_l1", "mae": "mae"}


def make_counts(
    seed: int,
    n_perts: int = 8,
    n_genes: int = 120,
    n_cells: int = 30,
    n_control: int = 60,
    effect: float = 1.0,
    floor: bool = False,
) -> ad.AnnData:
    """Small integer counts with many ties; some perturbations are named after genes.

    With `floor`, every gene has a count in one cell of every group, so no log2 fold change is
    infinite and no two |log2 FC| tie exactly (cell-eval orders such ties arbitrarily).
    """
    rng = np.random.default_rng(seed)
    genes = [f"G{i}" for i in range(n_genes)]
    perts = [genes[3 * i] if i % 2 == 0 else f"KO{i}" for i in range(n_perts)]
    base = rng.gamma(0.6, 1.0, n_genes)
    blocks, labels = [], []
    for pert, n in [(CONTROL, n_control)] + [(p, n_cells) for p in perts]:
        mean = base.copy()
        if pert != CONTROL:
            hit = rng.choice(n_genes, 10, replace=False)
            mean[hit] *= np.exp(effect * rng.choice([-2.0, 2.0], 10))
        library = rng.choice([0.5, 1.0, 1.0, 2.0], n)  # few library sizes: ties after normalising
        block = rng.poisson(library[:, None] * mean[None, :])
        if floor:
            block[rng.integers(0, n, n_genes), np.arange(n_genes)] += 1
        blocks.append(block)
        labels += [pert] * n
    x = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame({"target_gene": labels}, index=[f"c{seed}_{i}" for i in range(len(labels))])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))


def cell_eval_run(pred: ad.AnnData, real: ad.AnnData, control: str, outdir: Path):
    """cell-eval's `vcc` profile: (per-perturbation frame, aggregate frame, evaluator)."""
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluator = cell_eval.MetricsEvaluator(
            adata_pred=pred.copy(), adata_real=real.copy(), control_pert=control, pert_col="target_gene",
            outdir=str(outdir), num_threads=1,
        )
        results, agg = evaluator.compute(profile="vcc", write_csv=False)
    logging.disable(logging.NOTSET)
    return results.to_pandas().set_index("perturbation"), agg, evaluator


def des_bounds(pred, real) -> tuple[np.ndarray, np.ndarray]:
    """Least and greatest DES per perturbation over every order of exactly tied |log2 FC|.

    cell-eval orders tied |log2 FC| (typically +-inf from genes with a zero mean in one group)
    with an unstable sort, so where such a tie straddles the top-N cut its DES is one of these
    values; we break ties in gene order. Elsewhere the bounds coincide.
    """
    real_sig = real.fdr.astype(np.float32) < np.float32(0.05)
    pred_sig = pred.fdr.astype(np.float32) < np.float32(0.05)
    lo, hi = np.zeros(real.perts.size), np.zeros(real.perts.size)
    for i in range(real.perts.size):
        n = int(real_sig[i].sum())
        score = np.abs(pred.log2_fold_change[i]).astype(np.float32)[pred_sig[i]]
        is_real = real_sig[i][pred_sig[i]]
        if n == 0 or score.size == 0:
            continue
        cut = np.sort(score)[::-1][min(n, score.size) - 1]
        above, tied = score > cut, score == cut
        slots = min(n, score.size) - int(above.sum())
        sure = int((above & is_real).sum())
        tied_real = int((tied & is_real).sum())
        lo[i] = (sure + max(0, slots - int((tied & ~is_real).sum()))) / n
        hi[i] = (sure + min(slots, tied_real)) / n
    return lo, hi


def assert_matches_cell_eval(ours: dict, results: pd.DataFrame, pred=None, real=None) -> None:
    """PDS and MAE within TOL; DES within TOL, or (given the summaries) within its tie bounds."""
    for name, column in (("pds", "discrimination_score_l1"), ("mae", "mae")):
        for pert, row in results.iterrows():
            assert ours["per_perturbation"][pert][name] == pytest.approx(row[column], abs=TOL), (name, pert)
        assert ours[name] == pytest.approx(results[column].mean(), abs=TOL), name
    theirs = results["overlap_at_N"]
    if pred is None:
        for pert, value in theirs.items():
            assert ours["per_perturbation"][pert]["des"] == pytest.approx(value, abs=TOL), pert
        assert ours["des"] == pytest.approx(theirs.mean(), abs=TOL)
        return
    lo, hi = des_bounds(pred, real)
    for i, pert in enumerate(real.perts):
        assert lo[i] - TOL <= ours["per_perturbation"][pert]["des"] <= hi[i] + TOL
        assert lo[i] - TOL <= theirs[pert] <= hi[i] + TOL, pert
        if lo[i] == hi[i]:
            assert ours["per_perturbation"][pert]["des"] == pytest.approx(theirs[pert], abs=TOL), pert


def summaries(pred: ad.AnnData, real: ad.AnnData, control: str) -> tuple:
    return summarize_adata(pred, "target_gene", control, "pred"), summarize_adata(real, "target_gene", control, "real")


def significant_sets(evaluator, which: str) -> dict[str, set[str]]:
    frame = getattr(evaluator.de_comparison, which).filter_to_significant(0.05).to_pandas()
    return {str(p): set(map(str, g.feature)) for p, g in frame.groupby("target", observed=True)}


def our_significant_sets(summary) -> dict[str, set[str]]:
    sig = summary.fdr.astype(np.float32) < np.float32(0.05)
    return {str(p): set(summary.genes[sig[i]]) for i, p in enumerate(summary.perts) if sig[i].any()}


def cell_eval_overall(user_agg, base_agg) -> float:
    scored = cell_eval.score_agg_metrics(user_agg, base_agg).to_pandas().set_index("metric")
    return float(scored.loc["avg_score", "from_baseline"])


# --- Wilcoxon and BH against scipy -------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_rank_sum_equals_scipy_on_tie_heavy_data(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if seed >= 3:  # many small gene blocks, each sorted and scanned on its own
        monkeypatch.setattr(nbglm.metrics.de, "BLOCK_KEYS", 16)
    rng = np.random.default_rng(seed)
    n_groups, n_genes = 4, 25
    groups = np.repeat(np.arange(n_groups), rng.integers(3, 25, n_groups))
    rng.shuffle(groups)
    x = rng.poisson(rng.uniform(0, 2, n_genes), (groups.size, n_genes)) * rng.choice([0.5, 1.0], (groups.size, 1))
    x[:, 0] = 0.0  # an all-zero gene
    x = x.astype([np.float32, np.float64][seed % 2])
    result = rank_sum_test(sp.csr_matrix(x) if seed % 3 else x, groups, n_groups)
    for g in range(1, n_groups):
        for j in range(n_genes):
            pert, ctrl = x[groups == g, j].astype(np.float64), x[groups == 0, j].astype(np.float64)
            ref = mannwhitneyu(pert, ctrl, method="asymptotic", use_continuity=True)
            assert result.u_statistic[g - 1, j] == ref.statistic
            expected = 1.0 if np.isnan(ref.pvalue) else ref.pvalue
            assert result.pvalue[g - 1, j] == pytest.approx(expected, rel=1e-12, abs=1e-300)
        pdex = mannwhitneyu_columns(x[groups == g].astype(np.float64), x[groups == 0].astype(np.float64))
        np.testing.assert_array_equal(result.pvalue[g - 1], pdex.pvalue)  # pdex's engine, bit for bit


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int16, np.int64])
def test_rank_sum_of_integer_values_equals_their_float_values(dtype) -> None:
    """Small integers (vcc2026's order codes) are sorted as themselves, wider ones by their ranks:
    either way the test sees the values' order and ties."""
    rng = np.random.default_rng(7)
    groups = np.repeat(np.arange(5), [30, 12, 9, 20, 7])
    x = rng.poisson(rng.uniform(0, 3, 40), (groups.size, 40)) * rng.choice([1, 37], (groups.size, 1))
    x[:, :2] = [0, 100]  # a gene with no entries; a gene of one value everywhere
    want = rank_sum_test(sp.csr_matrix(x.astype(np.float64)), groups, 5)
    got = rank_sum_test(sp.csr_matrix(x.astype(dtype)), groups, 5)
    for field in ("u_statistic", "pvalue", "tie_term", "group_sums"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))


@pytest.mark.parametrize(("dtype", "block_keys", "window_keys", "fallback"), [
    (np.int32, 1 << 15, 1 << 25, False), (np.float32, 16, 1 << 25, False), (np.float64, 16, 300, False),
    (np.int32, 1 << 15, 1 << 25, True)])
def test_ranking_partitions_from_one_sort_equals_ranking_each_part(dtype, block_keys: int, window_keys: int,
                                                                    fallback: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """rank_sum_parts (keys sorted once with the cell below the value, one scan per partition) gives
    each part's rank_sum_test bit for bit: tie-heavy values, parts that leave rows out, groups in
    shuffled rows, small blocks, windows of genes, and its one-test-per-part fallback."""
    from nbglm.metrics.de_parts import rank_sum_parts

    monkeypatch.setattr(nbglm.metrics.de, "BLOCK_KEYS", block_keys)
    if fallback:
        def too_wide(*args, **kwargs):
            raise nbglm.metrics.de.KeysTooWide("too many bits")
        monkeypatch.setattr(nbglm.metrics.de_parts, "key_layout", too_wide)
    rng = np.random.default_rng(9)
    groups = rng.permutation(np.repeat(np.arange(6), [40, 11, 25, 8, 30, 16]))
    x = rng.poisson(rng.uniform(0, 2.5, 30), (groups.size, 30)) * rng.choice([1, 3], (groups.size, 1))
    x[:, 0] = 0  # a gene with no entries
    x = sp.csr_matrix(x.astype(dtype))
    parts = rng.integers(-1, 3, (4, groups.size))  # 4 partitions of up to 3 parts, some rows in none
    parts[3] = 0  # one partition holds every row
    got = rank_sum_parts(x, groups, 6, parts, max_keys=window_keys)
    for p in range(4):
        for q in range(3):
            rows = parts[p] == q
            want = rank_sum_test(x[rows], groups[rows], 6)
            for field in ("u_statistic", "pvalue", "tie_term"):
                np.testing.assert_array_equal(getattr(got[p][q], field), getattr(want, field))
        assert len(got[p]) == 3


def _adversarial_keys(case: str) -> np.ndarray:
    rng = np.random.default_rng(11)
    top = np.iinfo(np.int64).max
    big = 5 * _BUCKET_KEYS  # split on its top bits before the in-cache sort
    return {
        "empty": np.array([], dtype=np.int64),
        "one": np.array([42], dtype=np.int64),
        "two equal": np.array([7, 7], dtype=np.int64),
        "all equal": np.full(big, 123456789, dtype=np.int64),
        "all equal at max": np.full(1000, top, dtype=np.int64),
        "tiny": rng.integers(0, 50, 20),
        "one block": rng.integers(1 << 40, (1 << 40) + (1 << 20), 5000),
        "full 63 bits": rng.integers(0, top, 3000, endpoint=True),
        "full 63 bits, large": np.concatenate([rng.integers(0, top, big), [0, top, top, 0]]),
        "only the top bit varies": (rng.integers(0, 2, 4000) << 62) | 12345,
        "only the lowest bit varies": rng.integers(0, 2, 4000) + (1 << 50),
        "few distinct": rng.choice(np.array([3, 1 << 33, (1 << 33) + 1, top]), big),
        "one outlier, large": np.append(rng.integers(0, 1000, big), top),
        "sorted": np.arange(big, dtype=np.int64) * 3,
        "reversed": np.arange(big, dtype=np.int64)[::-1].copy(),
        "gene blocks": (np.repeat(np.arange(40), 2000) << 37) | rng.integers(0, 1 << 37, 80_000),
        # two passes on the high bits leave runs of equal high bits in reverse: short runs are finished
        # by insertion, runs a key would cross more than 64 places of take every pass
        "short runs reversed below the high bits": (np.repeat(rng.integers(0, 1 << 20, 3000), 8) << 12)
        | np.tile(np.arange(8)[::-1] * 500, 3000),
        "long runs reversed below the high bits": (np.repeat(np.arange(200) * 80_000, 512) << 13)
        | np.tile(np.arange(512)[::-1] * 7, 200),
    }[case]


@pytest.mark.parametrize(
    "case",
    [
        "empty", "one", "two equal", "all equal", "all equal at max", "tiny", "one block", "full 63 bits",
        "full 63 bits, large", "only the top bit varies", "only the lowest bit varies", "few distinct",
        "one outlier, large", "sorted", "reversed", "gene blocks", "short runs reversed below the high bits",
        "long runs reversed below the high bits",
    ],
)
def test_radix_sort_equals_numpy_sort(case: str) -> None:
    keys = _adversarial_keys(case)
    expected = np.sort(keys)
    work, scratch = keys.copy(), np.full(keys.size + 3, -1, dtype=np.int64)  # a longer scratch is fine
    radix_sort(work, scratch)
    np.testing.assert_array_equal(work, expected)
    work = keys.copy()
    sorted_keys = scratch[: keys.size] if sort_keys(work, scratch) else work
    np.testing.assert_array_equal(sorted_keys, expected)
    if keys.size:  # bounds as a DE block's genes give them: exact, or looser than the keys' range
        top = np.iinfo(np.int64).max
        for lo, hi in ((keys.min(), keys.max()), (keys.min() // 2, keys.max() + (top - keys.max()) // 2)):
            work = keys.copy()
            sorted_keys = scratch[: keys.size] if sort_keys_within(work, scratch, lo, hi) else work
            np.testing.assert_array_equal(sorted_keys, expected)


def test_radix_sort_refuses_negative_keys() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        radix_sort(np.array([5, -1, 3], dtype=np.int64), np.empty(3, dtype=np.int64))


@pytest.mark.parametrize("block_keys", [1, 16, 1 << 15])
def test_rank_sum_radix_and_numpy_sorts_agree(block_keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sorts, with one block, many small blocks, and blocks left empty by all-zero genes."""
    assert isinstance(radix_is_faster(), bool)
    monkeypatch.setattr(nbglm.metrics.de, "BLOCK_KEYS", block_keys)
    rng = np.random.default_rng(block_keys)
    groups = np.repeat(np.arange(5), [60, 30, 25, 40, 1])
    x = rng.poisson(rng.uniform(0, 3, 40), (groups.size, 40)).astype(np.float32)
    x[:, 10:20] = 0.0  # ten all-zero genes: empty blocks
    x[:, 25] *= 1e30  # a wide range of values
    results = []
    for radix in (True, False):
        monkeypatch.setattr(nbglm.metrics.de, "radix_is_faster", lambda radix=radix: radix)
        results.append(rank_sum_test(sp.csr_matrix(x), groups, 5))
    np.testing.assert_array_equal(results[0].u_statistic, results[1].u_statistic)
    np.testing.assert_array_equal(results[0].pvalue, results[1].pvalue)
    for g in range(1, 5):
        for j in (0, 15, 25):
            ref = mannwhitneyu(x[groups == g, j], x[groups == 0, j], method="asymptotic", use_continuity=True)
            assert results[0].u_statistic[g - 1, j] == ref.statistic


def test_the_integer_and_float_scans_give_the_same_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unweighted tests scan in int64 (twice the control entries below; tie terms only at ties), up
    to `_INTEGER_SCAN_ROWS` rows; above it the float scan runs: the same U, p-values and tie terms
    bit for bit, on tie-heavy counts and on log1p values with few ties."""
    rng = np.random.default_rng(6)
    groups = rng.permutation(np.repeat(np.arange(4), [50, 20, 30, 25]))
    counts = rng.poisson(rng.uniform(0, 3, 40), (groups.size, 40)).astype(np.float32)  # ties at every value
    for x in (counts, np.log1p(counts * rng.uniform(0.5, 2, (groups.size, 1))).astype(np.float32)):
        integer = rank_sum_test(sp.csr_matrix(x), groups, 4)
        monkeypatch.setattr(nbglm.metrics.de, "_INTEGER_SCAN_ROWS", 0)
        floating = rank_sum_test(sp.csr_matrix(x), groups, 4)
        monkeypatch.undo()
        for field in ("u_statistic", "pvalue", "tie_term"):
            np.testing.assert_array_equal(getattr(integer, field), getattr(floating, field))


@pytest.mark.parametrize("block_keys", [16, 1 << 15])
def test_the_scatter_keeps_or_loads_block_cursors_to_the_same_keys(block_keys: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """pack_keys keeps a block's cursor in a register along a row's run of that block's genes (long
    runs) or loads and stores it at every entry (short runs): both give every nonzero entry's key,
    in the same places, over several windows of genes and many or one block."""
    from nbglm.metrics.de import gene_windows, key_layout, pack_keys

    monkeypatch.setattr(nbglm.metrics.de, "BLOCK_KEYS", block_keys)
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 4, 90)
    x = sp.csr_matrix(rng.poisson(rng.uniform(0, 2, 60), (90, 60)).astype(np.float32))
    layout = key_layout(x, groups, 4)
    windows = gene_windows(layout.entries, 400)
    assert len(windows) > 1
    packs = []
    for long_runs in (0, 10**9):  # every window one way, then the other
        monkeypatch.setattr(nbglm.metrics.de, "_LONG_RUNS", long_runs)
        row_start = x.indptr[:-1].astype(np.int64)
        packs.append([pack_keys(x, groups, layout, genes, row_start).keys.copy() for genes in windows])
    rows, genes = x.nonzero()
    codes = x.data.view(np.uint32).astype(np.int64) - layout.code_lo
    want = (genes.astype(np.int64) << layout.gene_shift) | (codes << layout.group_bits) | groups[rows]
    for (lo, hi), kept, loaded in zip(windows, *packs, strict=True):
        np.testing.assert_array_equal(kept, loaded)
        np.testing.assert_array_equal(np.sort(kept), np.sort(want[(genes >= lo) & (genes < hi)]))


@pytest.mark.parametrize("radix", [True, False])
@pytest.mark.parametrize("block_keys", [16, 1 << 15])
def test_ranking_against_a_control_sorted_once_equals_ranking_them_together(
        radix: bool, block_keys: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """rank_control + rank_sum_against (the control's keys sorted once, read in two passes over its
    chunks; each block's entries merged into them) give rank_sum_test's statistics of the stacked
    matrix bit for bit: ties across control and perturbations (few distinct log1p values), genes
    with no entries, windows of genes, both sorts, blocks with fewer groups than the control allows."""
    monkeypatch.setattr(nbglm.metrics.de, "radix_is_faster", lambda: radix)
    monkeypatch.setattr(nbglm.metrics.de, "BLOCK_KEYS", block_keys)
    rng = np.random.default_rng(block_keys)
    n_ctrl, n_genes = 80, 50
    counts = rng.poisson(rng.gamma(0.5, 2.0, n_genes), (n_ctrl + 120, n_genes)).astype(np.float32)
    counts[:, 7] = 0.0  # a gene with no entries
    counts[n_ctrl:, 9] = 0.0  # a gene only the control expresses
    x = np.log1p(counts * rng.choice([0.5, 1.0, 2.0], (counts.shape[0], 1))).astype(np.float32)
    ctrl = sp.csr_matrix(x[:n_ctrl])
    ranked = nbglm.metrics.de_control.rank_control(lambda: (ctrl[i:i + 13] for i in range(0, n_ctrl, 13)), n_genes, 9)
    for groups in (np.repeat([1, 2, 3, 4], 30), np.repeat([1, 2], [100, 20])):
        stacked = rank_sum_test(sp.csr_matrix(x), np.concatenate([np.zeros(n_ctrl, np.int64), groups]), groups.max() + 1)
        for max_keys in (1 << 25, 40):
            got = nbglm.metrics.de_control.rank_sum_against(ranked, sp.csr_matrix(x[n_ctrl:]), groups, groups.max() + 1,
                                                    max_keys=max_keys)
            for name in ("u_statistic", "pvalue", "tie_term"):
                np.testing.assert_array_equal(getattr(got, name), getattr(stacked, name), err_msg=name)
            np.testing.assert_array_equal(got.group_sums[1:], stacked.group_sums[1:])
            np.testing.assert_allclose(got.group_sums[0], stacked.group_sums[0], rtol=1e-12)  # another summation order
    with pytest.raises(ValueError, match="group bits"):
        nbglm.metrics.de_control.rank_sum_against(ranked, sp.csr_matrix(x[n_ctrl:]), np.arange(120) % 20 + 1, 21)
    with pytest.raises(ValueError, match="float32"):
        nbglm.metrics.de_control.rank_control(lambda: [ctrl.astype(np.float64)], n_genes, 3)


@pytest.mark.parametrize("window_keys", [1, 150, 1000])
def test_rank_sum_in_windows_of_genes_equals_one_window(window_keys: int) -> None:
    """A matrix ranked a window of genes at a time (one gene per window, windows cut between
    all-zero genes, a few windows) gives the statistics of one pass over all genes."""
    rng = np.random.default_rng(window_keys)
    groups = np.repeat(np.arange(4), [50, 30, 20, 25])
    x = rng.poisson(rng.uniform(0, 2, 60), (groups.size, 60)).astype(np.float32)
    x[:, 20:30] = 0.0
    x[:, -3:] = 0.0  # genes with no counts at the end of the matrix, and of a window
    whole = rank_sum_test(sp.csr_matrix(x), groups, 4)
    for j in (0, 19, 30, 59):
        ref = mannwhitneyu(x[groups == 2, j], x[groups == 0, j], method="asymptotic", use_continuity=True)
        assert whole.u_statistic[1, j] == ref.statistic
    assert len(nbglm.metrics.de.gene_windows(np.count_nonzero(x, axis=0), 1 << 25)) == 1
    n_windows = len(nbglm.metrics.de.gene_windows(np.count_nonzero(x, axis=0), window_keys))
    assert n_windows > 1
    a = sp.csr_matrix(x)
    backwards = np.concatenate([np.arange(a.indptr[r + 1] - 1, a.indptr[r] - 1, -1) for r in range(a.shape[0])])
    unsorted = sp.csr_matrix((a.data[backwards], a.indices[backwards], a.indptr), shape=a.shape)
    for matrix in (a, unsorted):  # a window is a run of each row's entries: unsorted rows are sorted first
        windowed = rank_sum_test(matrix, groups, 4, max_keys=window_keys)
        for name in ("u_statistic", "pvalue", "group_sums", "tie_term"):
            np.testing.assert_array_equal(getattr(windowed, name), getattr(whole, name), err_msg=name)
    assert not unsorted.has_sorted_indices


def test_rank_sum_ranks_a_csr_matrix_on_its_own_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    """Values that are a view of a larger byte buffer (a lent buffer) are ranked where they lie:
    scipy's constructor would copy them (280 MB at the VCC size), so a CSR matrix is not rebuilt."""
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(3), [30, 20, 10])
    x = sp.csr_matrix(rng.poisson(0.8, (groups.size, 25)).astype(np.float32))
    buffer = np.zeros(4 * x.data.nbytes, dtype=np.uint8)
    values = buffer[: x.data.nbytes].view(np.float32)
    values[:] = x.data
    lent = nbglm.data.rows.csr_on(values, x.indices, x.indptr, x.shape)
    ranked = []
    layout = nbglm.metrics.de.key_layout
    monkeypatch.setattr(nbglm.metrics.de, "key_layout", lambda m, *a, **k: ranked.append(m.data) or layout(m, *a, **k))
    got = rank_sum_test(lent, groups, 3)
    assert ranked and all(np.shares_memory(data, buffer) for data in ranked)
    want = rank_sum_test(x.toarray(), groups, 3)
    for name in ("u_statistic", "pvalue", "group_sums", "tie_term"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


def test_the_metrics_threads_are_started_once() -> None:
    """The kernels' pool of threads is kept between calls (starting threads cost about 1 ms each on
    a busy machine, a tenth of a small evaluation)."""
    import threading

    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(3), [40, 20, 20])
    x = sp.csr_matrix(rng.poisson(0.8, (groups.size, 30)).astype(np.float32))

    def pool_threads() -> set[int | None]:
        return {t.ident for t in threading.enumerate() if t.name.startswith("nbglm-metrics")}

    first = rank_sum_test(x, groups, 3, max_keys=200)  # several windows: the pool serves each
    started = pool_threads()
    again = rank_sum_test(x, groups, 3, max_keys=200)
    assert started and pool_threads() == started
    np.testing.assert_array_equal(again.pvalue, first.pvalue)


def test_scoring_in_memory_starts_no_openmp_threads() -> None:
    """A vcc2025 evaluation of matrices in memory (no train: its baseline's pseudobulks are summed
    in the data layer) runs every kernel on the metrics' own pool: numba's OpenMP threads spin
    after each parallel loop and took a core from the DE sort."""
    script = (
        "import numba, numpy as np, scipy.sparse as sp\n"
        "from nbglm.metrics import evaluate\n"
        "from nbglm.metrics.cells import Cells\n"
        "rng = np.random.default_rng(0)\n"
        "labels = np.repeat(['non-targeting', 'a', 'b'], [60, 30, 30])\n"
        "genes = np.array([f'g{j}' for j in range(50)])\n"
        "def cells():\n"
        "    return Cells(sp.csr_matrix(rng.poisson(2.0, (120, 50)).astype(np.float32)), 'p', labels, genes)\n"
        "evaluate(cells(), cells(), pert_col='p')\n"
        "try:\n"
        "    print(numba.threading_layer())\n"
        "except ValueError:\n"
        "    print('no threading layer')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "no threading layer"


def test_rank_sum_group_weights_equal_repeated_rows() -> None:
    rng = np.random.default_rng(7)
    control = rng.poisson(1.0, (40, 30)).astype(np.float32)
    rows = rng.poisson(1.0, (3, 30)).astype(np.float32)
    rows[0, :5] = control[0, :5]  # ties between a weighted row and control
    weights = np.array([1.0, 5.0, 12.0, 7.0])
    compact = rank_sum_test(np.vstack([control, rows]), np.r_[np.zeros(40, int), 1, 2, 3], 4, weights)
    expanded_x = np.vstack([control] + [np.repeat(rows[i : i + 1], int(weights[i + 1]), axis=0) for i in range(3)])
    expanded_groups = np.concatenate([np.zeros(40, int)] + [np.full(int(weights[i + 1]), i + 1) for i in range(3)])
    expanded = rank_sum_test(expanded_x, expanded_groups, 4)
    np.testing.assert_allclose(compact.u_statistic, expanded.u_statistic)
    np.testing.assert_allclose(compact.pvalue, expanded.pvalue, rtol=1e-12)


def test_benjamini_hochberg_equals_scipy() -> None:
    """BH orders p-values with a radix sort of their bits: ties (any order gives the same adjusted
    values), zeros, ones, p-values over 300 orders of magnitude (every radix pass), any leading
    shape; a NaN makes its own row NaN, as numpy's running minimum does."""
    rng = np.random.default_rng(3)
    p = np.round(rng.uniform(0, 1, (5, 200)) ** 3, 3)  # rounding makes ties
    p[0, :20], p[1, :20] = 0.0, 1.0
    p[2] = 10.0 ** -rng.uniform(0, 300, 200)
    p[3, ::2] = p[3, 1::2]
    np.testing.assert_array_equal(benjamini_hochberg(p), np.stack([false_discovery_control(row) for row in p]))
    np.testing.assert_array_equal(benjamini_hochberg(p.reshape(5, 2, 100)),
                                  false_discovery_control(p.reshape(5, 2, 100), axis=-1))
    p[4, 7] = np.nan
    adjusted = benjamini_hochberg(p)
    assert np.isnan(adjusted[4]).all()
    np.testing.assert_array_equal(adjusted[:4], np.stack([false_discovery_control(row) for row in p[:4]]))


def test_des_top_n_is_the_stable_sorts_first_n() -> None:
    """DES keeps pred's top N genes by |log2 FC|: the same set as the first N of a stable sort of
    -|log2 FC| (ties in gene order, NaN last), with ties straddling the cut, infinities and NaN."""
    from nbglm.metrics.vcc import _largest

    rng = np.random.default_rng(6)
    rows = [rng.choice(np.array([0.0, 0.5, 1.0, 2.0, np.inf, np.nan], dtype=np.float32), 60) for _ in range(40)]
    rows += [np.full(30, np.nan, dtype=np.float32), np.zeros(30, dtype=np.float32), rng.random(50).astype(np.float32)]
    for values in rows:
        for n in (1, 2, 5, 17, values.size - 1, values.size, values.size + 3):
            expected = np.argsort(-values, kind="stable")[:n]
            got = _largest(values, n)
            assert got.size == expected.size and set(got.tolist()) == set(expected.tolist()), (values, n)


def test_pds_finds_each_perturbations_own_genes_as_comparing_every_pair_would() -> None:
    """PDS leaves out the genes named as each perturbation: found by a search in the sorted gene
    names, they are every (perturbation, gene) pair whose names are equal, in order, also with
    repeated gene names and perturbations that name no gene."""
    from nbglm.metrics.vcc import _genes_named

    rng = np.random.default_rng(8)
    for _ in range(100):
        genes = rng.choice(np.array(["a", "b", "c", "d", "e"]), rng.integers(1, 12))
        names = np.unique(rng.choice(np.array(["a", "c", "e", "x"]), rng.integers(1, 5)))
        want = [(int(i), int(j)) for i, j in zip(*np.nonzero(names[:, None] == genes[None, :]), strict=True)]
        assert _genes_named(names, genes) == want


def test_labels_of_a_categorical_column_are_its_values_as_str() -> None:
    """anndata reads string columns as categoricals; their labels come from the codes, equal to
    converting every value, also with a missing value, unused or non-str categories."""
    from nbglm.metrics.cells import labels_of

    columns = (
        pd.Categorical(["KO2", "non-targeting", "KO2", "KO10"]),
        pd.Categorical(["KO2", None, "KO1"]),
        pd.Categorical(["a", "b"], categories=["a", "b", "a much longer unused category"]),
        pd.Categorical([3, 1, 3]),
        ["KO2", "non-targeting"],
    )
    for column in columns:
        adata = ad.AnnData(obs=pd.DataFrame({"target_gene": column}, index=[str(i) for i in range(len(column))]))
        got, expected = labels_of(adata, "target_gene", "pred"), np.asarray(column, dtype=object).astype(str)
        assert got.dtype.kind == "U" and got.tolist() == expected.tolist()


def test_l1_distances_equal_scipy_cdist_bit_for_bit() -> None:
    """PDS ranks by these distances, so a last-bit difference could flip a tie: the compiled sums
    must be scipy's cityblock cdist exactly, also where the order of additions shows (values of
    very different magnitudes, cancelling)."""
    from scipy.spatial.distance import cdist

    from nbglm.metrics.vcc import _l1_distances

    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(23, 1_001)), rng.normal(size=(17, 1_001))
    a[:, ::7] *= 1e12
    b[:, 3::11] *= 1e-9
    b[4] = a[2]  # a distance of exactly zero
    for x, y in ((a, b), (a[:, ::3], b[:, ::3]), (a[:1], a[:1])):
        assert np.array_equal(_l1_distances(x, y), cdist(x, y, metric="cityblock"))


@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("block_entries", [1 << 17, 37, 1])
def test_normalisation_is_scanpys_bit_for_bit(block_entries: int, lookup: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Also when sparse rows are divided and log1p'd in blocks on the thread pool (37 entries: block
    edges at odd offsets; 1: a block per row), and when each row's small counts are log1p'd once
    and looked up (`lookup`; values outside the table: large counts, a count with a fraction below
    cell-eval's bound for counts, stored zeros)."""
    import scanpy as sc
    from nbglm.metrics.normalise import _lookup_width

    monkeypatch.setattr("nbglm.metrics.normalise.BLOCK_ENTRIES", block_entries)
    monkeypatch.setattr("nbglm.metrics.normalise.lookup_cost", lambda: 0.0 if lookup else 1.0)
    rng = np.random.default_rng(5)
    counts = rng.poisson(3.0, (60, 30)).astype(np.float32)
    counts[[0, 17, 58, 59]] = 0  # empty cells, also at the end
    counts[5, :] = rng.poisson(400.0, 30)  # a row longer than a block
    counts[7, :4] = [2.0005, 7.0004, 300.0002, 1e4]
    stored_zeros = sp.csr_matrix(counts)
    stored_zeros.data[::11] = 0.0
    assert (_lookup_width(stored_zeros.data, 60) > 0) == lookup
    matrices = (sp.csr_matrix(counts), stored_zeros, sp.csr_matrix(counts.astype(np.float64)), counts,
                counts.astype(np.float64), counts.astype(np.int64))
    for x in matrices:
        reference = ad.AnnData(X=x.copy())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.normalize_total(reference)
            sc.pp.log1p(reference)
        expected = reference.X.toarray() if sp.issparse(reference.X) else reference.X
        in_place = x.copy()  # the values written over the counts they come from (evaluate's overwrite_*)
        outs = [None, in_place.data.view(np.uint8)] if sp.issparse(x) else [None]
        for out in outs:
            ours = to_log1p(ad.AnnData(X=in_place if out is not None else x.copy()), "x", out)
            got = ours.toarray() if sp.issparse(ours) else ours
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)


def test_values_that_are_neither_counts_nor_log1p_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A negative value, or fractional data with a value at log1p's bound (15) anywhere, is an
    error naming the smallest or largest value, for a whole matrix and a chunk of rows at a time."""
    from nbglm.metrics.normalise import log1p_transform

    monkeypatch.setattr(nbglm.data.rows, "CHUNK_ROWS", 4)  # 20 rows: 5 chunks
    counts = np.random.default_rng(2).poisson(2.0, (20, 6)).astype(np.float32)
    negative = counts.copy()
    negative[13, 2] = -2.5
    fractional = counts / 4.0 + 0.25
    fractional[9, 4] = 16.75
    mixed = counts.copy()  # integers at the bound in one row, fractions below it in another
    mixed[2, 0], mixed[17, :] = 20.0, 0.5
    cases = ((negative, "negative values in X \\(min -2.5\\)"), (fractional, "up to 16.8 "), (mixed, "up to 20 "))
    for x, message in cases:
        for matrix in (sp.csr_matrix(x), x):
            with pytest.raises(NbglmError, match=message):
                to_log1p(ad.AnnData(X=matrix), "x")
            with pytest.raises(NbglmError, match=message):
                log1p_transform(Rows(matrix), "x")
    assert log1p_transform(Rows(fractional.clip(max=14.0)), "x")(fractional[:3]) is not None  # log1p data: kept


def test_log1p_values_land_in_the_buffer_lent_for_them() -> None:
    """Not in a copy: scipy's constructor copies arrays that are views of much larger ones (a byte
    buffer is four times the float32 values' count), 0.6 s for a VCC-size file in fresh memory."""
    counts = sp.csr_matrix(np.random.default_rng(7).poisson(2.0, (50, 40)).astype(np.float32))
    lent = np.zeros(counts.data.nbytes + 64, dtype=np.uint8)
    ours = to_log1p(ad.AnnData(X=counts), "x", lent)
    assert np.shares_memory(ours.data, lent) and np.shares_memory(ours.indices, counts.indices)
    np.testing.assert_array_equal(ours.toarray(), to_log1p(ad.AnnData(X=counts), "x").toarray())


def test_layouts_and_dtypes_give_the_same_statistics() -> None:
    real = make_counts(80)
    x = to_log1p(real, "real")
    _, groups = group_codes(real.obs["target_gene"].to_numpy(str), CONTROL)
    reference = rank_sum_test(x, groups, groups.max() + 1)
    with_zeros = x.copy()
    with_zeros.data[::7] = 0.0  # explicit zeros must join the zero block
    dense = with_zeros.toarray()
    for variant in (sp.csc_matrix(with_zeros), dense, dense.astype(np.float64)):
        result = rank_sum_test(variant, groups, groups.max() + 1)
        expected = rank_sum_test(sp.csr_matrix(dense), groups, groups.max() + 1)
        np.testing.assert_array_equal(result.u_statistic, expected.u_statistic)
        np.testing.assert_allclose(result.pvalue, expected.pvalue, rtol=1e-12)
        np.testing.assert_allclose(result.group_sums, expected.group_sums, rtol=1e-12)
    assert not np.array_equal(reference.pvalue, expected.pvalue)  # the zeros did change the data


# --- agreement with cell-eval ------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_matches_cell_eval_on_tie_heavy_counts(seed: int, tmp_path: Path) -> None:
    real, pred = make_counts(2 * seed), make_counts(2 * seed + 1, effect=0.5)
    results, _, evaluator = cell_eval_run(pred, real, CONTROL, tmp_path)
    ours = evaluate(pred, real, control=CONTROL)
    pred_summary, real_summary = summaries(pred, real, CONTROL)
    assert_matches_cell_eval(ours, results, pred_summary, real_summary)
    assert our_significant_sets(real_summary) == significant_sets(evaluator, "real")
    assert our_significant_sets(pred_summary) == significant_sets(evaluator, "pred")


def test_matches_cell_eval_on_log1p_input(tmp_path: Path) -> None:
    real, pred = make_counts(10), make_counts(11)
    for adata in (real, pred):
        adata.X = np.log1p(adata.X.toarray() / 3.0)  # dense, fractional: used as is
    results, _, _ = cell_eval_run(pred, real, CONTROL, tmp_path)
    assert_matches_cell_eval(evaluate(pred, real, control=CONTROL), results, *summaries(pred, real, CONTROL))


def test_perfect_prediction(tmp_path: Path) -> None:
    real = make_counts(20, effect=2.0)
    ours = evaluate(real.copy(), real, control=CONTROL)
    assert (ours["des"], ours["pds"], ours["mae"]) == (1.0, 1.0, 0.0)
    results, _, _ = cell_eval_run(real.copy(), real, CONTROL, tmp_path)
    assert_matches_cell_eval(ours, results)


def test_baseline_prediction_scores_zero_and_overall_matches_cell_eval(tmp_path: Path) -> None:
    real, train, pred = make_counts(30, floor=True), make_counts(31, n_perts=12), make_counts(32, floor=True)
    baseline = cell_mean_baseline(train, real, control=CONTROL)
    on_baseline = evaluate(baseline, real, control=CONTROL, train=train)
    assert on_baseline["overall_score"] == 0.0
    for name in ("des", "pds", "mae"):
        assert on_baseline[name] == pytest.approx(on_baseline["baseline"][name], abs=1e-12)

    ours = evaluate(pred, real, control=CONTROL, train=train)
    user_results, user_agg, _ = cell_eval_run(pred, real, CONTROL, tmp_path / "user")
    base_results, base_agg, _ = cell_eval_run(baseline, real, CONTROL, tmp_path / "base")
    assert_matches_cell_eval(ours, user_results)
    assert_matches_cell_eval(on_baseline, base_results)
    assert ours["overall_score"] == pytest.approx(cell_eval_overall(user_agg, base_agg), abs=TOL)


def test_overwriting_inputs_gives_the_same_scores_and_leaves_log1p_values() -> None:
    """evaluate(..., overwrite_pred/real=True) normalises those matrices in place: the same numbers,
    X's values become their log1p (and only the named inputs change)."""
    real, train, pred = make_counts(40, floor=True), make_counts(41, n_perts=12), make_counts(42, floor=True)
    expected = evaluate(pred.copy(), real.copy(), control=CONTROL, train=train.copy())
    train_x = train.X.copy()
    for overwrite_real in (False, True):
        p, r = pred.copy(), real.copy()
        got = evaluate(p, r, control=CONTROL, train=train, overwrite_pred=True, overwrite_real=overwrite_real)
        assert got == expected
        np.testing.assert_array_equal(p.X.data, to_log1p(pred, "pred").data)
        np.testing.assert_array_equal(r.X.data, (to_log1p(real, "real") if overwrite_real else real.X).data)
        np.testing.assert_array_equal(train.X.data, train_x.data)  # train is never overwritten


@pytest.mark.parametrize("block_entries", [1, 2_000, 1 << 30])
def test_prediction_read_from_disk_in_blocks_gives_the_same_summary(block_entries: int, tmp_path: Path) -> None:
    """A prediction written in row blocks and summarised from its file a few perturbations at a time
    (one per block, a few, all) equals the summary of the whole matrix in memory, array for array;
    cells shuffled, so perturbations and controls are scattered over the file."""
    pred = make_counts(43, floor=True)
    pred = pred[np.random.default_rng(0).permutation(pred.n_obs)].copy()
    path = tmp_path / "pred.h5ad"
    totals = write_h5ad_rows(path, pred.obs, pred.var, (pred.X[i:i + 23] for i in range(0, pred.n_obs, 23)))
    np.testing.assert_array_equal(totals, np.asarray(pred.X.sum(axis=1, dtype=np.float64)).ravel())
    assert (ad.read_h5ad(path).X != pred.X).nnz == 0
    expected = summarize_adata(pred, "target_gene", CONTROL, "pred")
    counts = Rows(OnDisk(path), counts_totals=totals)
    got = summarize_rows(counts, pred, "target_gene", CONTROL, "pred", block_entries=block_entries)
    for name in expected.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name), err_msg=name)
    real = make_counts(44, floor=True)
    on_disk = evaluate(ad.AnnData(obs=pred.obs, var=pred.var), real.copy(), control=CONTROL, pred_counts=counts)
    assert on_disk == evaluate(pred, real, control=CONTROL)


def test_baseline_summary_shares_the_test_of_perturbations_with_as_many_cells() -> None:
    """One weighted row per distinct cell count gives every perturbation's summary exactly as one
    row per perturbation does (the summary the baseline had before), with unequal group sizes."""
    from nbglm.metrics.vcc import baseline_summary, summarize

    real, train = make_counts(83), make_counts(84)
    labels = real.obs["target_gene"].to_numpy(str)
    perts = np.unique(labels[labels != CONTROL])
    drop = np.flatnonzero(labels == perts[1])[:7].tolist() + np.flatnonzero(labels == perts[4])[:12].tolist()
    real = real[np.setdiff1d(np.arange(real.n_obs), drop)].copy()
    vector = baseline_vector(train, real, "target_gene")
    ours = baseline_summary(vector, real, "target_gene", CONTROL)
    names, groups = group_codes(real.obs["target_gene"].to_numpy(str), CONTROL)
    ctrl = sp.csr_matrix(to_log1p(real, "real")[np.flatnonzero(groups == 0)])
    rows = sp.csr_matrix(np.broadcast_to(vector, (names.size, vector.size)))
    cells = np.bincount(groups)[1:]
    assert len(set(cells.tolist())) == 3
    expected = summarize(sp.vstack([ctrl, rows], format="csr"),
                         np.concatenate([np.zeros(ctrl.shape[0], dtype=np.int64), np.arange(1, names.size + 1)]),
                         real.var_names.to_numpy(str), names, np.concatenate([[1.0], cells]))
    for field in expected.__dataclass_fields__:
        np.testing.assert_array_equal(getattr(ours, field), getattr(expected, field), err_msg=field)


def test_baseline_vector_matches_cell_eval() -> None:
    real, train = make_counts(40), make_counts(41, n_perts=12)
    ours = cell_mean_baseline(train, real, control=CONTROL)
    theirs = cell_eval.build_base_mean_adata(train.copy(), pert_col="target_gene", control_pert=CONTROL)
    pert_rows = ours.obs["target_gene"].to_numpy() != CONTROL
    their_rows = theirs.obs["target_gene"].to_numpy() != CONTROL
    their_x = theirs.X.toarray() if sp.issparse(theirs.X) else np.asarray(theirs.X)
    np.testing.assert_allclose(ours.X[pert_rows][0], their_x[their_rows][0], atol=1e-6)
    assert ours.obs["target_gene"].value_counts().to_dict() == real.obs["target_gene"].value_counts().to_dict()


def test_baseline_vector_whole_chunked_and_in_place_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.X normalised whole and summed in one pass (in its own values with `overwrite`), or
    counts read a chunk of rows at a time: the same profile, bit for bit."""
    real, train = make_counts(40), make_counts(41, n_perts=12)
    train.X = sp.csr_matrix(train.X, dtype=np.float32)
    whole = baseline_vector(train, real, "target_gene")
    monkeypatch.setattr(nbglm.data.rows, "CHUNK_ROWS", 7)
    chunked = baseline_vector(train, real, "target_gene", train_counts=Rows(train.X.copy()))
    counts = train.X.data.copy()
    in_place = baseline_vector(train, real, "target_gene", overwrite=True)
    np.testing.assert_array_equal(whole, chunked)
    np.testing.assert_array_equal(whole, in_place)
    assert not np.array_equal(train.X.data, counts)  # X now holds its log1p values


@pytest.fixture(scope="module")
def jurkat() -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    if not REAL_DATA.is_file():
        pytest.skip(f"real test data not found at {REAL_DATA}")
    return jurkat_split()


def jurkat_split() -> tuple[ad.AnnData, ad.AnnData, ad.AnnData]:
    """(real, train, pred): 5 held-out targets, the rest for training, controls split in two;
    pred resamples real cells of each target with binomial thinning and Poisson noise."""
    data = ad.read_h5ad(REAL_DATA)
    labels = data.obs["target_gene"].to_numpy(str)
    held_out = ["EGR1", "JUN", "LCK", "NFKB1", "RELA"]
    control_idx = np.flatnonzero(labels == "control")
    is_real = np.isin(labels, held_out)
    is_real[control_idx[::2]] = True
    real, train = data[is_real].copy(), data[~is_real].copy()
    rng = np.random.default_rng(0)
    counts = real.X.toarray()
    real_labels = real.obs["target_gene"].to_numpy(str)
    noisy = []
    for label in real_labels:
        row = counts[rng.choice(np.flatnonzero(real_labels == label))]
        if label != "control":
            row = rng.binomial(row.astype(np.int64), 0.8) + rng.poisson(0.02, row.size)
        noisy.append(row)
    x = sp.csr_matrix(np.asarray(noisy, dtype=np.float32))
    pred = ad.AnnData(X=x, obs=real.obs[["target_gene"]].copy(), var=real.var[[]].copy())
    return real, train, pred


def test_matches_cell_eval_on_real_data(jurkat, tmp_path: Path) -> None:
    real, train, pred = jurkat
    ours = evaluate(pred, real, control="control", train=train)
    user_results, user_agg, evaluator = cell_eval_run(pred, real, "control", tmp_path / "user")
    pred_summary, real_summary = summaries(pred, real, "control")
    assert_matches_cell_eval(ours, user_results, pred_summary, real_summary)
    assert our_significant_sets(real_summary) == significant_sets(evaluator, "real")
    assert our_significant_sets(pred_summary) == significant_sets(evaluator, "pred")

    baseline = cell_mean_baseline(train, real, control="control")
    base_results, base_agg, _ = cell_eval_run(baseline, real, "control", tmp_path / "base")
    base_summary = summarize_adata(baseline, "target_gene", "control", "baseline")
    assert_matches_cell_eval(evaluate(baseline, real, control="control"), base_results, base_summary, real_summary)
    # The overall score from the same three metrics and baseline scores as cell-eval's:
    means = {name: float(user_results[column].mean()) for name, column in CELL_EVAL_NAMES.items()}
    base = {name: float(base_results[column].mean()) for name, column in CELL_EVAL_NAMES.items()}
    assert overall_score(means, base) == pytest.approx(cell_eval_overall(user_agg, base_agg), abs=1e-12)
    # No tied |log2 FC| straddles a top-N cut here, so our DES, and hence the overall score, is cell-eval's.
    assert all(np.array_equal(*des_bounds(s, real_summary)) for s in (pred_summary, base_summary))
    assert ours["overall_score"] == pytest.approx(cell_eval_overall(user_agg, base_agg), abs=TOL)


# --- the ground-truth cache ---------------------------------------------------------------------


def test_cache_round_trip_gives_the_same_scores(jurkat, tmp_path: Path) -> None:
    real, train, pred = jurkat
    direct = evaluate(pred, real, control="control", train=train)
    build_de_cache(real, train, control="control").save(tmp_path / "cache")
    cached = evaluate(pred, real, control="control", cache=load_de_cache(tmp_path / "cache"))
    assert cached == direct


def test_cache_refuses_other_data(tmp_path: Path) -> None:
    real = make_counts(50)
    build_de_cache(real, control=CONTROL).save(tmp_path)
    cache = load_de_cache(tmp_path)
    fewer_genes = real[:, 1:].copy()
    other_perts = real[real.obs["target_gene"] != real.obs["target_gene"].iloc[-1]].copy()
    fewer_cells = real[1:].copy()
    mismatches = ((fewer_genes, "other genes"), (other_perts, "other perturbations"), (fewer_cells, "cell counts"))
    for other, message in mismatches:
        with pytest.raises(NbglmError, match=message):
            evaluate(other.copy(), other, control=CONTROL, cache=cache)
    with pytest.raises(NbglmError, match="control"):
        cache.check(real, "target_gene", "ctrl")
    with pytest.raises(NbglmError, match="no DE cache"):
        load_de_cache(tmp_path / "missing")


# --- input checks -------------------------------------------------------------------------------


def _with_x(adata: ad.AnnData, x) -> ad.AnnData:
    out = adata.copy()
    out.X = x
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: a[:, 1:].copy(), "different genes"),
        (lambda a: a[:, ::-1].copy(), "another order"),
        (lambda a: a[a.obs["target_gene"] != "KO1"].copy(), "different perturbations"),
        (lambda a: a[a.obs["target_gene"] != CONTROL].copy(), "control label"),
        (lambda a: _with_x(a, np.where(np.eye(*a.shape, dtype=bool), np.nan, a.X.toarray())), "NaN"),
        (lambda a: _with_x(a, -a.X.toarray()), "negative"),
        (lambda a: _with_x(a, a.X.toarray() * 20.5), "neither integer counts nor log1p"),
        (lambda a: ad.AnnData(X=a.X, obs=a.obs.rename(columns={"target_gene": "guide"}), var=a.var), "no obs column"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, message: str) -> None:
    real = make_counts(60)
    with pytest.raises(NbglmError, match=message) as info:
        evaluate(change(real), real, control=CONTROL)
    assert "\n" not in str(info.value)


# --- command line -------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    return main([*argv, "--control", CONTROL])


@pytest.mark.parametrize("command", ["eval", "build-de-cache"])
def test_scoring_commands_let_idle_threads_sleep(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`nbglm eval` and `build-de-cache` ask OpenMP's idle threads to sleep (they spun for ms after
    each parallel kernel, taking a core from the DE sort), unless the user chose otherwise."""
    real = make_counts(70)
    real.write_h5ad(tmp_path / "real.h5ad")
    args = {"eval": ["--pred", str(tmp_path / "real.h5ad")], "build-de-cache": ["--output", str(tmp_path / "c")]}[command]
    for preset, want in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if preset:
            environ["OMP_WAIT_POLICY"] = preset
        monkeypatch.setattr(os, "environ", environ)
        shutil.rmtree(tmp_path / "c", ignore_errors=True)
        assert _cli([command, *args, "--real", str(tmp_path / "real.h5ad")]) == 0
        assert environ["OMP_WAIT_POLICY"] == want


def test_cli_eval_and_build_de_cache(tmp_path: Path, capsys) -> None:
    real, train, pred = make_counts(70), make_counts(71, n_perts=12), make_counts(72)
    for name, adata in (("real", real), ("train", train), ("pred", pred)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    real_file, train_file = str(tmp_path / "real.h5ad"), str(tmp_path / "train.h5ad")
    common = ["--pred", str(tmp_path / "pred.h5ad"), "--real", real_file]
    assert _cli(["eval", *common, "--train", train_file, "--output", str(tmp_path / "m.json")]) == 0
    cache = str(tmp_path / "cache")
    assert _cli(["build-de-cache", "--real", real_file, "--train", train_file, "--output", cache]) == 0
    assert _cli(["eval", *common, "--de-cache", cache, "--output", str(tmp_path / "c.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads((tmp_path / "c.json").read_text())
    # the command reads train, real and pred into one pair of arrays; its numbers are evaluate's
    want = evaluate(pred, real, train=train, control=CONTROL)
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(want))
    assert "overall score" in capsys.readouterr().out
    assert _cli(["eval", "--pred", str(tmp_path / "missing.h5ad"), "--real", str(tmp_path / "real.h5ad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pred file not found") and err.count("\n") == 1


def test_the_nbglm_process_leaves_its_output_whole(tmp_path: Path) -> None:
    """eval and build-de-cache exit without Python's teardown: what they print and write is all there."""
    real, train, pred = make_counts(70), make_counts(71, n_perts=12), make_counts(72)
    for name, adata in (("real", real), ("train", train), ("pred", pred)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    files = {name: str(tmp_path / f"{name}.h5ad") for name in ("real", "train", "pred")}

    def nbglm(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "nbglm", *argv], capture_output=True, text=True, timeout=120)

    cache = nbglm("build-de-cache", "--real", files["real"], "--train", files["train"], "--output", str(tmp_path / "c"))
    assert cache.returncode == 0, cache.stderr
    done = nbglm("eval", "--pred", files["pred"], "--real", files["real"], "--de-cache", str(tmp_path / "c"),
                 "--output", str(tmp_path / "m.json"))
    assert done.returncode == 0 and "overall score" in done.stdout and done.stdout.rstrip().endswith("┘")
    want = evaluate(pred, real, train=train, control=CONTROL)
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(json.dumps(want))
    refused = nbglm("eval", "--pred", str(tmp_path / "missing.h5ad"), "--real", files["real"])
    assert refused.returncode == 2 and refused.stderr.startswith("error: pred file not found")
    assert refused.stderr.count("\n") == 1


def test_cli_eval_refuses_a_prediction_before_any_work_on_real(tmp_path: Path, monkeypatch, capsys) -> None:
    real = make_counts(70)
    real.write_h5ad(tmp_path / "real.h5ad")
    real[:, ::-1].copy().write_h5ad(tmp_path / "pred.h5ad")  # the genes in another order

    def no_work(*args, **kwargs):
        raise AssertionError("the real side was built before the prediction was checked")

    monkeypatch.setattr("nbglm.metrics.de_cache.build_de_cache", no_work)
    assert _cli(["eval", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad")]) == 2
    err = capsys.readouterr().err
    assert "same genes as real but in another order" in err and err.count("\n") == 1


def test_files_read_one_after_another_share_their_arrays(tmp_path: Path) -> None:
    """ReadBuffers: each file's X (smaller, larger, CSC) equals anndata's read of it, and the CSR
    ones land in the same memory, sized once for the largest file."""
    from nbglm.metrics.io import ReadBuffers

    files = {"small": make_counts(74, n_cells=10), "large": make_counts(75, n_cells=50), "csc": make_counts(76)}
    files["csc"].X = sp.csc_matrix(files["csc"].X)
    for name, adata in files.items():
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    buffers = ReadBuffers([tmp_path / f"{name}.h5ad" for name in files])
    got = {}
    for name, adata in files.items():  # each checked before the next file is read over it
        got[name] = read_counts_for_eval(tmp_path / f"{name}.h5ad", "target_gene", name, buffers)
        assert (sp.csr_matrix(got[name].X) != sp.csr_matrix(adata.X)).nnz == 0
    assert np.shares_memory(got["small"].X.data, got["large"].X.data)
    assert np.shares_memory(got["small"].X.indices, got["large"].X.indices)
    assert not np.shares_memory(got["csc"].X.data, got["large"].X.data)  # not CSR: read as anndata reads it
    assert read_counts_for_eval(tmp_path / "small.h5ad", "target_gene", "small", values=False).X is None
    with h5py.File(tmp_path / "small.h5ad", "r+") as f:  # a row pointer short: refused in one line, not read past
        indptr = f["X/indptr"][:-1]
        del f["X/indptr"]
        f["X/indptr"] = indptr
    with pytest.raises(NbglmError, match="cannot read pred file .* not a well-formed CSR matrix") as err:
        read_counts_for_eval(tmp_path / "small.h5ad", "target_gene", "pred", buffers)
    assert "\n" not in str(err.value)


def test_stored_values_are_read_from_the_file_as_h5py_reads_them(tmp_path: Path, monkeypatch) -> None:
    """read_array reads a dataset's bytes from the file itself where they are stored as they lie in
    memory (contiguous; chunked, in file order or not, last chunk part full), split over threads
    at any byte, and leaves every other dataset to h5py (compressed, big-endian, a chunk never
    written, a file with a user block); each read equals h5py's."""
    from nbglm.metrics import io

    monkeypatch.setattr(io, "_THREAD_BYTES", 1)  # 4 threads: pieces cut across runs and values
    monkeypatch.setattr(io, "_READ_THREADS", 4)
    values = np.random.default_rng(0).random(4000).astype(np.float32) * 1e4
    chunk = 600  # 2,400 bytes or more: HDF5 packs smaller ones into shared blocks
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["contiguous"] = values
        f.create_dataset("in_order", data=values.astype(np.int32), chunks=(chunk,))
        backwards = f.create_dataset("backwards", shape=values.shape, dtype=np.float64, chunks=(chunk,))
        gaps = f.create_dataset("gaps", shape=values.shape, dtype=np.float32, chunks=(chunk,))
        starts = range(0, values.size, chunk)
        for lo, back in zip(starts, starts[::-1]):  # a chunk is placed in the file when flushed: ...
            backwards[back : back + chunk] = values[back : back + chunk]  # ... the last one first, ...
            gaps[lo : lo + chunk] = values[lo : lo + chunk]  # ... and these in order, each after one of those
            f.flush()
        f.create_dataset("compressed", data=values, chunks=(chunk,), compression="gzip")
        f.create_dataset("big_endian", data=values.astype(">f4"))
        f.create_dataset("unwritten", shape=values.shape, dtype=np.float32, chunks=(chunk,))[:chunk] = values[:chunk]
    with h5py.File(tmp_path / "user_block.h5", "w", userblock_size=512) as f:
        f["contiguous"] = values
    for path, name, from_file in [("x.h5", "contiguous", True), ("x.h5", "in_order", True),
                                  ("x.h5", "backwards", True), ("x.h5", "gaps", True), ("x.h5", "compressed", False),
                                  ("x.h5", "big_endian", False), ("x.h5", "unwritten", False),
                                  ("user_block.h5", "contiguous", False)]:
        with h5py.File(tmp_path / path, "r") as f:
            dataset = f[name]
            runs = io.stored_runs(dataset)
            assert (runs is not None) == from_file, name
            out = np.full(dataset.shape, -1, dtype=dataset.dtype.newbyteorder("="))
            io.read_array(dataset, out)
            np.testing.assert_array_equal(out, dataset[()], err_msg=name)
            if name in ("backwards", "gaps"):  # no chunk follows the one before it in the file
                assert [first for first, _, _ in runs] == list(starts), name


def test_read_counts_for_eval_reads_what_the_metrics_use(tmp_path: Path) -> None:
    """X, the labels and the genes as anndata reads them, whatever the column's encoding: a
    categorical of strings, a string array, a categorical with a missing value and numbers (the
    last two through anndata's reader), and X dense or CSR."""
    real = make_counts(73)
    real.obs["other"] = np.arange(real.n_obs)
    real.obsm["pca"] = np.zeros((real.n_obs, 2))
    real.write_h5ad(tmp_path / "real.h5ad")
    ours = read_counts_for_eval(tmp_path / "real.h5ad", "target_gene", "real")
    assert sp.issparse(ours.X) and ours.X.dtype == real.X.dtype and ours.X.format == "csr"
    assert (ours.X != real.X).nnz == 0
    np.testing.assert_array_equal(ours.genes, real.var_names.to_numpy(str))
    np.testing.assert_array_equal(ours.labels, real.obs["target_gene"].to_numpy(str))
    assert ours.pert_col == "target_gene" and ours.genes.size == real.n_vars
    np.testing.assert_array_equal(read_counts_for_eval(tmp_path / "real.h5ad", "other", "real").labels,
                                  real.obs["other"].to_numpy(str))
    with h5py.File(tmp_path / "real.h5ad", "r+") as f:  # as a plain string array, as anndata writes one
        labels = f["obs/target_gene/categories"][()][f["obs/target_gene/codes"][()]]
        del f["obs/target_gene"]
        f["obs"].create_dataset("target_gene", data=labels, dtype=h5py.string_dtype())
        f["obs/target_gene"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
    assert ad.read_h5ad(tmp_path / "real.h5ad").obs["target_gene"].dtype == object
    np.testing.assert_array_equal(read_counts_for_eval(tmp_path / "real.h5ad", "target_gene", "real").labels,
                                  real.obs["target_gene"].to_numpy(str))
    missing = real.copy()
    missing.obs["target_gene"] = missing.obs["target_gene"].cat.add_categories("x")
    missing.obs.loc[missing.obs_names[:3], "target_gene"] = np.nan
    missing.write_h5ad(tmp_path / "missing.h5ad")
    got = read_counts_for_eval(tmp_path / "missing.h5ad", "target_gene", "real").labels
    np.testing.assert_array_equal(got, ad.read_h5ad(tmp_path / "missing.h5ad").obs["target_gene"].to_numpy(str))
    assert got[0] == "nan"
    dense = ad.AnnData(X=real.X.toarray(), obs=real.obs, var=real.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    np.testing.assert_array_equal(read_counts_for_eval(tmp_path / "dense.h5ad", "target_gene", "pred").X, dense.X)


def test_eval_command_imports_no_anndata_pandas_or_scipy_spatial(tmp_path: Path) -> None:
    """`nbglm eval` of h5ad files in anndata's usual encodings reads and scores them without
    anndata, pandas or scipy.spatial (half a second of a command's start-up), and scores them as
    in-memory AnnData objects are scored."""
    real, pred, train = make_counts(80), make_counts(81), make_counts(82)
    for name, adata in (("real", real), ("pred", pred), ("train", train)):
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
    script = (
        "import json, sys\n"
        "from nbglm.cli import main\n"
        f"code = main(['eval', '--pred', 'pred.h5ad', '--real', 'real.h5ad', '--train', 'train.h5ad', "
        f"'--control', '{CONTROL}', '--output', 'out.json'])\n"
        "heavy = ['anndata', 'pandas', 'zarr', 'scipy.spatial', 'torch', 'ray']\n"
        "print(json.dumps({'code': code, 'loaded': [m for m in heavy if m in sys.modules]}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}
    ours = json.loads((tmp_path / "out.json").read_text())
    expected = evaluate(pred, real, train=train, control=CONTROL)
    assert ours == json.loads(json.dumps(expected))


def test_read_counts_for_eval_errors_are_one_line(tmp_path: Path) -> None:
    make_counts(74).write_h5ad(tmp_path / "real.h5ad")
    (tmp_path / "junk.h5ad").write_bytes(b"not an hdf5 file")
    cases = [
        (tmp_path / "missing.h5ad", "target_gene", "pred file not found"),
        (tmp_path / "junk.h5ad", "target_gene", "cannot read pred file .*junk.h5ad as h5ad: "),
        (tmp_path / "real.h5ad", "perturbation", "pred has no obs column 'perturbation' \\(columns: target_gene"),
    ]
    for path, pert_col, message in cases:
        with pytest.raises(NbglmError, match=message) as error:
            read_counts_for_eval(path, pert_col, "pred")
        assert "\n" not in str(error.value)


def test_borrowed_buffers_are_never_lent_twice_at_once() -> None:
    with borrowed("test buffer", 64) as outer, borrowed("test buffer", 32) as inner:
        assert outer.size == 64 and inner.size == 32 and not np.shares_memory(outer, inner)
        outer[:] = 1
        inner[:] = 2
        assert (outer == 1).all()
    with borrowed("test buffer", 16) as again:  # the larger one was kept and is lent again
        assert again.size == 16 and again.base.size == 64
