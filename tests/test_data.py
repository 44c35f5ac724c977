"""Data layer: synthetic generator, file loading/validation, embeddings, split, and the data CLI."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from nbglm.cli import main
from nbglm.config import SyntheticConfig, load_config
from nbglm.data import load_dataset, make_synthetic
from nbglm.data.embeddings import derive_gene_embedding, effect_gene_embedding, read_embedding
from nbglm.data.io import read_counts
from nbglm.data.split import split_by_perturbation
from nbglm.errors import NbglmError

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JURKAT = SHARED_DATA / "scperturb_testdata_jurkat_crispr.h5ad"

SMALL = dict(n_genes=200, n_train_perts=20, n_test_perts=5, cells_per_pert=30, n_control=100)
SMALL_SET = [f"data.synthetic.{k}={v}" for k, v in SMALL.items()]


@pytest.fixture(autouse=True, scope="module")
def _cache_dir(tmp_path_factory):
    """Keep the synthetic cache out of the user's home, shared across this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBGLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def toy_counts(n_genes: int = 6, dense: bool = False, pert_col: str = "target_gene") -> ad.AnnData:
    """A tiny valid dataset: control + perturbations targeting its own genes A..F."""
    rng = np.random.default_rng(0)
    genes = [chr(ord("A") + i) for i in range(n_genes)]
    labels = ["ctrl"] * 6 + ["A"] * 4 + ["B"] * 4 + ["C"] * 4 + ["D"] * 4
    x = rng.poisson(3.0, (len(labels), n_genes)).astype(np.int64)
    return ad.AnnData(X=x if dense else sp.csr_matrix(x.astype(np.float32)),
                      obs=pd.DataFrame({pert_col: labels}, index=[f"c{i}" for i in range(len(labels))]),
                      var=pd.DataFrame(index=genes))


def toy_files(tmp_path: Path) -> dict[str, str]:
    """toy_counts split into train (A, B) / test (C, D) files plus a matching embedding CSV."""
    full = toy_counts()
    labels = full.obs["target_gene"].astype(str)
    full[labels.isin(["ctrl", "A", "B"]).to_numpy()].copy().write_h5ad(tmp_path / "train.h5ad")
    full[labels.isin(["ctrl", "C", "D"]).to_numpy()].copy().write_h5ad(tmp_path / "test.h5ad")
    emb = pd.DataFrame(np.random.default_rng(1).normal(size=(6, 3)), index=list(full.var_names))
    emb.to_csv(tmp_path / "emb.csv")
    return {"train_h5ad": str(tmp_path / "train.h5ad"), "test_h5ad": str(tmp_path / "test.h5ad"),
            "gene_embedding": str(tmp_path / "emb.csv")}


def toy_config(files: dict[str, str], *extra: str):
    return load_config(None, [f"paths.{k}={v}" for k, v in files.items()] + ["data.control_name=ctrl", *extra])


# --- synthetic ---------------------------------------------------------------------------------


def test_synthetic_is_deterministic_from_seed():
    a = make_synthetic(SyntheticConfig(**SMALL), cache=False)
    b = make_synthetic(SyntheticConfig(**SMALL), cache=False)
    c = make_synthetic(SyntheticConfig(**SMALL, seed=1), cache=False)
    assert (a.train.X != b.train.X).nnz == 0 and (a.test.X != b.test.X).nnz == 0
    pd.testing.assert_frame_equal(a.gene_emb, b.gene_emb)
    pd.testing.assert_frame_equal(a.pert_emb, b.pert_emb)
    pd.testing.assert_frame_equal(a.true_lfc, b.true_lfc)
    assert a.train.obs.equals(b.train.obs)
    assert a.train.shape != c.train.shape or (a.train.X != c.train.X).nnz > 0
    assert not a.gene_emb.equals(c.gene_emb)


def test_synthetic_cache_returns_identical_data():
    fresh = make_synthetic(SyntheticConfig(**SMALL, seed=7), cache=False)
    make_synthetic(SyntheticConfig(**SMALL, seed=7))  # generates and caches
    cached = make_synthetic(SyntheticConfig(**SMALL, seed=7))  # reads the cache
    assert (fresh.train.X != cached.train.X).nnz == 0
    assert fresh.train.obs.equals(cached.train.obs)
    pd.testing.assert_frame_equal(fresh.val, cached.val)
    pd.testing.assert_frame_equal(fresh.pert_emb, cached.pert_emb)
    pd.testing.assert_frame_equal(fresh.true_lfc, cached.true_lfc)


def test_synthetic_default_size_is_realistic():
    data = make_synthetic(SyntheticConfig())
    train, test, col = data.train, data.test, "target_gene"
    x = train.X
    assert sp.isspmatrix_csr(x) and x.dtype == np.float32
    assert np.array_equal(x.data, np.round(x.data)) and x.data.min() >= 0
    assert train.var_names.is_unique and train.obs_names.is_unique and train.n_vars == 2000
    labels = train.obs[col].astype(str)
    assert (labels == "non-targeting").sum() == 1500
    assert labels[labels != "non-targeting"].nunique() == 120
    sizes = labels[labels != "non-targeting"].value_counts()
    assert sizes.min() >= 80 and sizes.max() <= 120
    assert set(data.pert_emb.index) >= set(labels[labels != "non-targeting"]) | set(data.val["target_gene"])
    assert set(data.pert_emb.index) <= set(train.var_names)  # every target is a gene

    totals = np.asarray(x.sum(axis=1)).ravel()
    assert 2000 <= np.median(totals) <= 5000

    ctrl = x[np.flatnonzero(labels == "non-targeting")].toarray()
    mean, var = ctrl.mean(axis=0), ctrl.var(axis=0)
    assert mean.max() / np.median(mean) > 50  # means spread over orders of magnitude
    high = mean > 5
    assert high.sum() > 50 and np.mean(var[high] > 1.5 * mean[high]) > 0.9  # NB, not Poisson

    # CRISPRi knock-down of the target is visible in size-normalised expression.
    norm = sp.diags(1.0 / totals) @ x
    ctrl_frac = np.asarray(norm[np.flatnonzero(labels == "non-targeting")].mean(axis=0)).ravel()
    gene_index = {g: i for i, g in enumerate(train.var_names)}
    ratios = []
    for pert in sizes.index:
        g = gene_index[pert]
        ratios.append(norm[np.flatnonzero(labels == pert), g].mean() / ctrl_frac[g])
    assert np.mean(np.array(ratios) < 0.5) > 0.9
    true = data.true_lfc.to_numpy()
    assert np.abs(true).max() < 3.5 and np.median(np.abs(true)) < 0.2  # bounded, mostly small

    phases = train.obs["phase"].astype(str).value_counts(normalize=True)
    assert set(phases.index) == {"G1", "S", "G2M"} and abs(phases["G1"] - 0.5) < 0.05

    # Test = the same control cells + held-out perturbations; val list computed from it.
    test_labels = test.obs[col].astype(str)
    assert list(test.obs_names[test_labels == "non-targeting"]) == list(train.obs_names[labels == "non-targeting"])
    assert list(data.val.columns) == ["target_gene", "n_cells", "median_umi_per_cell"]
    assert list(data.val["target_gene"]) == list(pd.unique(test_labels[test_labels != "non-targeting"]))
    assert not set(data.val["target_gene"]) & set(labels)
    assert (data.val["n_cells"] == test_labels.value_counts()[data.val["target_gene"]].to_numpy()).all()


def test_load_dataset_synthetic_default_path():
    cfg = load_config(None, SMALL_SET)
    ds = load_dataset(cfg)
    # 64 given dims (unit rows) + data.effect_pcs, capped at n_train_perts - 1 = 19 components
    assert ds.gene_emb.shape == (200, 64 + 19) and ds.gene_emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(ds.gene_emb[:, :64], axis=1), 1.0, atol=1e-5)
    assert len(ds.train_perts) == 20 and len(ds.heldout_perts) == 5
    assert list(ds.pert_emb.index) == ds.train_perts + ds.heldout_perts
    assert ds.phase_col == "phase" and ds.control == "non-targeting" and ds.pert_col == "target_gene"
    assert list(ds.test.var_names) == ds.gene_names
    raw = load_dataset(load_config(None, [*SMALL_SET, "data.normalize_embeddings=false", "data.effect_pcs=0"]))
    assert raw.gene_emb.shape == (200, 64)
    assert not np.allclose(np.linalg.norm(raw.gene_emb, axis=1), 1.0)
    assert np.allclose(ds.gene_emb[:, :64], raw.gene_emb / np.linalg.norm(raw.gene_emb, axis=1, keepdims=True), atol=1e-6)


def test_effect_embedding_marks_the_genes_that_respond():
    """Gene 0 responds (x8) to perturbations A and B; the others only follow the depth."""
    rng = np.random.default_rng(0)
    labels = np.repeat(["ctrl", "A", "B", "C", "D"], 50)
    mean = np.full((labels.size, 30), 20.0)
    mean[np.isin(labels, ["A", "B"]), 0] *= 8
    counts = sp.csr_matrix(rng.poisson(mean).astype(np.float32))
    emb = effect_gene_embedding(counts, labels, "ctrl", dim=10)
    assert emb.shape == (30, 3)  # capped at 4 perturbations - 1
    assert np.linalg.norm(emb, axis=1).mean() == pytest.approx(1.0, rel=1e-5)
    norms = np.linalg.norm(emb, axis=1)
    assert norms[0] > 5 * np.median(norms[1:])


def test_synth_cli_files_load_like_the_builtin_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--output", str(out), *sum((["--set", s] for s in SMALL_SET), [])]) == 0
    printed = capsys.readouterr().out
    assert "20 perturbations" in printed and "5 perturbations" in printed and "UMI/cell" in printed
    builtin = load_dataset(load_config(None, SMALL_SET))
    files = load_dataset(load_config(None, [
        *SMALL_SET, f"paths.train_h5ad={out / 'train.h5ad'}", f"paths.test_h5ad={out / 'test.h5ad'}",
        f"paths.val_list_csv={out / 'val_list.csv'}", f"paths.gene_embedding={out / 'gene_embedding.csv'}",
        f"paths.pert_embedding={out / 'pert_embedding.csv'}"]))
    assert (builtin.train.X != files.train.X).nnz == 0 and (builtin.test.X != files.test.X).nnz == 0
    assert builtin.gene_names == files.gene_names and builtin.train_perts == files.train_perts
    assert list(builtin.train.obs_names) == list(files.train.obs_names)
    pd.testing.assert_frame_equal(builtin.heldout, files.heldout)
    np.testing.assert_array_equal(builtin.gene_emb, files.gene_emb)
    pd.testing.assert_frame_equal(builtin.pert_emb, files.pert_emb)
    assert files.phase_col == "phase"

    # Refuses to write into a non-empty directory, and says so in one line.
    assert main(["synth", "--output", str(out), *sum((["--set", s] for s in SMALL_SET), [])]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not an empty directory" in err and "\n" not in err


# --- embeddings ----------------------------------------------------------------------------------


def test_embedding_formats_read_the_same_table(tmp_path):
    names = ["A", "B", "C"]
    values = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    pd.DataFrame(values, index=names).to_csv(tmp_path / "e.csv")
    pd.DataFrame(values, index=names).to_csv(tmp_path / "e.tsv", sep="\t")
    np.save(tmp_path / "e.npy", values)
    (tmp_path / "e.names.txt").write_text("\n".join(names) + "\n")
    torch.save({"names": names, "emb": torch.from_numpy(values)}, tmp_path / "d.pt")
    torch.save(torch.from_numpy(values), tmp_path / "e.pt")
    ad.AnnData(X=values, obs=pd.DataFrame(index=names)).write_h5ad(tmp_path / "e.h5ad")
    for name in ("e.csv", "e.tsv", "e.npy", "d.pt", "e.pt", "e.h5ad"):
        table = read_embedding(tmp_path / name)
        assert list(table.index) == names, name
        np.testing.assert_allclose(table.to_numpy(), values, rtol=1e-6, err_msg=name)
    with pytest.raises(NbglmError, match="names.txt"):
        np.save(tmp_path / "lonely.npy", values)
        read_embedding(tmp_path / "lonely.npy")
    with pytest.raises(NbglmError, match="unsupported extension"):
        (tmp_path / "e.json").write_text("{}")
        read_embedding(tmp_path / "e.json")


def test_derived_embedding_is_deterministic_and_capped():
    x = sp.csr_matrix(toy_counts().X)
    a = derive_gene_embedding(x, list("ABCDEF"), dim=64)
    b = derive_gene_embedding(x, list("ABCDEF"), dim=64)
    assert a.shape == (6, 6) and a.equals(b)
    assert np.isfinite(a.to_numpy()).all()


def test_pert_without_embedding(tmp_path, caplog):
    files = toy_files(tmp_path)
    emb = pd.read_csv(files["gene_embedding"], index_col=0)
    emb.drop(index=["B"]).to_csv(tmp_path / "pert.csv")
    with caplog.at_level(logging.WARNING, logger="nbglm"):
        ds = load_dataset(toy_config({**files, "pert_embedding": str(tmp_path / "pert.csv")}))
    assert ds.train_perts == ["A"] and ds.heldout_perts == ["C", "D"]
    assert len(caplog.records) == 1 and "B" in caplog.records[0].getMessage()
    emb.drop(index=["D"]).to_csv(tmp_path / "pert.csv")
    with pytest.raises(NbglmError, match="held-out perturbation.*D.*no embedding"):
        load_dataset(toy_config({**files, "pert_embedding": str(tmp_path / "pert.csv")}))


# --- split ---------------------------------------------------------------------------------------


def test_split_by_fraction_is_seeded_and_keeps_controls():
    adata = read_counts_from(toy_counts())
    train, test, val = split_by_perturbation(adata, "target_gene", "ctrl", test_fraction=0.5, seed=3)
    again = split_by_perturbation(adata, "target_gene", "ctrl", test_fraction=0.5, seed=3)[1]
    assert list(test.obs_names) == list(again.obs_names)
    held = set(val["target_gene"])
    assert len(held) == 2 and not held & set(train.obs["target_gene"].astype(str))
    for part in (train, test):
        assert (part.obs["target_gene"] == "ctrl").sum() == 6
    assert (val["n_cells"] == 4).all()
    with pytest.raises(NbglmError, match="not in obs"):
        split_by_perturbation(adata, "target_gene", "ctrl", test_perts=["Z"])


def read_counts_from(adata: ad.AnnData) -> ad.AnnData:
    from nbglm.data.io import validate_counts

    return validate_counts(adata, "target_gene", "ctrl", "toy")


# --- the real data -------------------------------------------------------------------------------


@pytest.mark.skipif(not JURKAT.is_file(), reason="shared/data is not beside the repository")
def test_real_jurkat_split_derive_and_load(tmp_path, capsys, caplog):
    out = tmp_path / "split"
    rc = main(["split", "--input", str(JURKAT), "--control", "control", "--test-perts", "EGR1,JUN,RELA",
               "--output", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0 and set(printed[-1].removeprefix("held out: ").split(", ")) == {"EGR1", "JUN", "RELA"}
    val = pd.read_csv(out / "val_list.csv")
    assert set(val["target_gene"]) == {"EGR1", "JUN", "RELA"} and (val["n_cells"] > 0).all()
    cfg = load_config(None, [f"paths.train_h5ad={out / 'train.h5ad'}", f"paths.test_h5ad={out / 'test.h5ad'}",
                             "data.control_name=control"])
    with caplog.at_level(logging.WARNING, logger="nbglm"):
        ds = load_dataset(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0] and warnings[0].startswith("14 training perturbation")
    # 64 derived PCA dims + 16 effect PCs: all 17 training perturbations' effects count, embedded or not
    assert ds.gene_emb.shape == (2000, 64 + 16)
    assert sorted(ds.train_perts) == ["EGR3", "JUND", "NR4A1"]
    assert set(ds.heldout_perts) == {"EGR1", "JUN", "RELA"}
    counts = ds.test.obs["target_gene"].value_counts()
    assert (ds.heldout.set_index("target_gene")["n_cells"] == counts[ds.heldout["target_gene"]].to_numpy()).all()
    assert ds.phase_col is None and (ds.train.obs["target_gene"] == "control").sum() == 200
    assert ds.train.X.dtype == np.float32 and sp.isspmatrix_csr(ds.train.X)


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


def _bad_h5ad(kind: str, path: Path) -> None:
    adata = toy_counts(dense=kind == "noninteger")
    if kind == "no_pert_col":
        adata.obs = adata.obs.rename(columns={"target_gene": "guide"})
    elif kind == "negative":
        adata.X.data[3] = -2.0
    elif kind == "noninteger":
        adata.X = adata.X.astype(np.float64) + 0.5
    elif kind == "duplicate_genes":
        adata.var_names = ["A", "B", "A", "D", "E", "F"]
    if kind != "missing":
        adata.write_h5ad(path)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("kind, message", [
    ("missing", "file not found"),
    ("no_pert_col", "no obs column 'target_gene' (available: guide)"),
    ("no_control", "control label 'non-targeting' not found"),
    ("negative", "negative values"),
    ("noninteger", "non-integer values"),
    ("duplicate_genes", "appear more than once in var_names"),
])
def test_split_cli_rejects_bad_input(tmp_path, capsys, kind, message):
    path = tmp_path / "in.h5ad"
    _bad_h5ad(kind, path)
    out = tmp_path / "out"
    control = [] if kind == "no_control" else ["--control", "ctrl"]
    rc = main(["split", "--input", str(path), "--test-fraction", "0.5", "--output", str(out), *control])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and "\n" not in err and message in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ([] if kind == "missing" else ["in.h5ad"])


@pytest.mark.parametrize("kind, message", [
    ("embedding_missing_genes", "lacks 2 of the data's 6 genes (e.g. E, F)"),
    ("embedding_nan", "NaN/inf values"),
    ("val_unknown", "not in the test data: Q"),
    ("val_nonpositive", "n_cells must be a positive number, but is not for D"),
    ("test_genes_differ", "test data genes differ"),
    ("heldout_without_test", "no held-out perturbations"),
])
def test_load_dataset_rejects_bad_input(tmp_path, kind, message):
    files = toy_files(tmp_path)
    emb = pd.read_csv(files["gene_embedding"], index_col=0)
    if kind == "embedding_missing_genes":
        emb.iloc[:4].to_csv(files["gene_embedding"])
    elif kind == "embedding_nan":
        emb.iloc[2, 1] = np.nan
        emb.to_csv(files["gene_embedding"])
    elif kind.startswith("val_"):
        n_cells = -1 if kind == "val_nonpositive" else 4
        pd.DataFrame({"target_gene": ["C", "D" if kind == "val_nonpositive" else "Q"], "n_cells": [4, n_cells],
                      "median_umi_per_cell": [20.0, 20.0]}).to_csv(tmp_path / "val.csv", index=False)
        files["val_list_csv"] = str(tmp_path / "val.csv")
    elif kind == "test_genes_differ":
        test = ad.read_h5ad(files["test_h5ad"])
        test[:, ::-1].copy().write_h5ad(files["test_h5ad"])
    elif kind == "heldout_without_test":
        del files["test_h5ad"]
    with pytest.raises(NbglmError) as info:
        load_dataset(toy_config(files))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_val_list_without_test_checks_embeddings(tmp_path):
    files = toy_files(tmp_path)
    del files["test_h5ad"]
    pd.DataFrame({"target_gene": ["C", "ZZ"], "n_cells": [4, 4], "median_umi_per_cell": [20.0, 20.0]}).to_csv(
        tmp_path / "val.csv", index=False)
    with pytest.raises(NbglmError, match="held-out perturbation.*ZZ.*no embedding"):
        load_dataset(toy_config({**files, "val_list_csv": str(tmp_path / "val.csv")}))
    pd.DataFrame({"target_gene": ["C"], "n_cells": [7], "median_umi_per_cell": [25.0]}).to_csv(
        tmp_path / "val.csv", index=False)
    ds = load_dataset(toy_config({**files, "val_list_csv": str(tmp_path / "val.csv")}))
    assert ds.test is None and ds.heldout_perts == ["C"] and ds.heldout["n_cells"].tolist() == [7]


def test_read_counts_accepts_dense_integer_matrix(tmp_path):
    toy_counts(dense=True).write_h5ad(tmp_path / "d.h5ad")
    adata = read_counts(tmp_path / "d.h5ad", "target_gene", "ctrl")
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.float32


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_read_counts_reads_the_matrix_in_chunks_into_float32_csr(tmp_path: Path, layout: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """read_counts reads X in chunks into memory; open_counts checks it the same way and leaves it on disk."""
    from nbglm.data import io

    monkeypatch.setattr("nbglm.data.rows.CHUNK_ROWS", 7)  # 50 cells: 8 chunks, the last one short
    rng = np.random.default_rng(0)
    counts = rng.poisson(0.7, (50, 12)).astype(np.int64)
    x = counts if layout == "dense" else (sp.csr_matrix if layout == "csr" else sp.csc_matrix)(counts)
    obs = pd.DataFrame({"target_gene": ["ctrl"] * 20 + ["A"] * 30}, index=[f"c{i}" for i in range(50)])
    path = tmp_path / "counts.h5ad"
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(12)])).write_h5ad(path)
    got = io.read_counts(path, "target_gene", "ctrl")
    assert sp.isspmatrix_csr(got.X) and got.X.dtype == np.float32 and got.X.has_sorted_indices
    np.testing.assert_array_equal(got.X.toarray(), counts)
    cells, on_disk = io.open_counts(path, "target_gene", "ctrl")
    assert cells.X is None and cells.obs_names.equals(got.obs_names) and on_disk.shape == (50, 12)
    np.testing.assert_array_equal(on_disk.take().toarray(), counts)
    every_third = on_disk.subset(np.arange(50) % 3 == 0)
    np.testing.assert_array_equal(every_third.take().toarray(), counts[::3])
    np.testing.assert_array_equal(every_third.totals(), counts[::3].sum(axis=1))
    shipped = pickle.loads(pickle.dumps(every_third))  # as Ray ships it to the fold store: the path, reopened
    np.testing.assert_array_equal(shipped.take().toarray(), counts[::3])
    del on_disk, every_third, shipped  # their file handle: the file is rewritten below
    counts = counts.astype(np.float64)
    counts[48, 3] = 0.5  # a non-integer value in the last chunk
    ad.AnnData(X=counts if layout == "dense" else sp.csr_matrix(counts), obs=obs,
               var=pd.DataFrame(index=[f"g{i}" for i in range(12)])).write_h5ad(path)
    for read in (io.read_counts, io.open_counts):
        with pytest.raises(NbglmError, match="non-integer values"):
            read(path, "target_gene", "ctrl")


def test_chunks_hold_at_most_chunk_entries_unless_one_row_has_more(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Dense rows make short chunks (their copies stay small); a row with more entries than the bound
    is a chunk of its own; the chunks still cover every selected row once, in memory and on disk."""
    from nbglm.data.rows import OnDisk, Rows

    monkeypatch.setattr("nbglm.data.rows.CHUNK_ENTRIES", 40)
    rng = np.random.default_rng(3)
    x = sp.csr_matrix(rng.poisson(rng.uniform(0.05, 3, (60, 1)), (60, 80)).astype(np.float32))
    assert np.diff(x.indptr).max() > 40 and x.nnz > 10 * 40
    path = tmp_path / "x.h5ad"
    ad.AnnData(X=x).write_h5ad(path)
    for matrix in (x, OnDisk(path)):
        for rows in (Rows(matrix), Rows(matrix).subset(np.arange(60) % 4 != 1)):
            chunks = list(rows.chunks())
            assert all(block.nnz <= 40 or block.shape[0] == 1 for _, block in chunks)
            assert [pos for pos, _ in chunks] == list(np.cumsum([0] + [b.shape[0] for _, b in chunks[:-1]]))
            expected = x.toarray() if rows.rows is None else x.toarray()[rows.rows]
            np.testing.assert_array_equal(rows.take().toarray(), expected)


def test_chunks_of_an_in_memory_csr_are_views_and_unsorted_rows_are_sorted_copies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from nbglm.data.rows import Rows

    monkeypatch.setattr("nbglm.data.rows.CHUNK_ROWS", 4)
    x = sp.random(10, 6, density=0.5, format="csr", random_state=0, dtype=np.float32)
    chunks = list(Rows(x).chunks())
    assert [pos for pos, _ in chunks] == [0, 4, 8]
    assert all(np.shares_memory(block.data, x.data) for _, block in chunks)  # a sorted CSR is not copied
    np.testing.assert_array_equal(sp.vstack([block for _, block in chunks]).toarray(), x.toarray())
    picked = Rows(x).subset(np.arange(10) % 3 == 1)
    np.testing.assert_array_equal(picked.take().toarray(), x.toarray()[1::3])
    unsorted = sp.csr_matrix((x.data[::-1].copy(), x.indices.copy(), x.indptr.copy()), shape=x.shape)
    for r in range(10):  # reverse each row's entries: the same matrix, indices unsorted
        a, b = unsorted.indptr[r], unsorted.indptr[r + 1]
        unsorted.indices[a:b], unsorted.data[a:b] = x.indices[a:b][::-1], x.data[a:b][::-1]
    unsorted.has_sorted_indices = False
    before = unsorted.indices.copy()
    blocks = [block for _, block in Rows(unsorted).chunks()]
    assert all(block.has_sorted_indices for block in blocks)
    np.testing.assert_array_equal(sp.vstack(blocks).toarray(), x.toarray())
    np.testing.assert_array_equal(unsorted.indices, before)  # the caller's matrix is left as it was


def test_counts_on_disk_give_the_baseline_of_the_same_file_read_into_memory(tmp_path: Path) -> None:
    """Dense or CSR on disk, with a cell that has no counts (the dense and sparse normalisation
    medians differ on it): the cell-mean baseline scored from the file's rows equals the one
    scored from the file read into memory."""
    from nbglm.data import io
    from nbglm.metrics import build_de_cache

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.uniform(0.5, 4.0, (60, 1)), (60, 15)).astype(np.int64)
    counts[[1, 5, 8, 22, 23, 41, 47, 55]] = 0  # enough cells without counts to move the median
    obs = pd.DataFrame({"target_gene": ["ctrl"] * 20 + ["A"] * 20 + ["B"] * 20}, index=[f"c{i}" for i in range(60)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(15)])
    real = ad.AnnData(X=sp.csr_matrix(rng.poisson(1.5, (40, 15)).astype(np.float32)),
                      obs=pd.DataFrame({"target_gene": ["ctrl"] * 20 + ["C"] * 20}, index=[f"r{i}" for i in range(40)]),
                      var=var.copy())
    for layout in ("dense", "csr"):
        path = tmp_path / f"{layout}.h5ad"
        ad.AnnData(X=counts if layout == "dense" else sp.csr_matrix(counts), obs=obs, var=var).write_h5ad(path)
        memory = io.read_counts(path, "target_gene", "ctrl")
        cells, rows = io.open_counts(path, "target_gene", "ctrl")
        a = build_de_cache(real, memory, control="ctrl")
        b = build_de_cache(real, cells, control="ctrl", train_counts=rows)
        assert a.baseline == b.baseline and a.baseline is not None
