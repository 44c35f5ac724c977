"""`load_dataset`: the one entry point from a config to the `Dataset` every later layer consumes.

The built-in synthetic data and user files go through the same assembly (`assemble`), so both
paths validate, align and normalise embeddings identically.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from nbglm.config import Config
from nbglm.data.dataset import Dataset
from nbglm.data.embeddings import (align_genes, derive_gene_embedding, effect_gene_embedding, read_embedding,
                                   select_perts)
from nbglm.data.io import check_val_perts, pert_labels, read_counts, read_val_list, val_list
from nbglm.data.synthetic import make_synthetic
from nbglm.errors import NbglmError


def assemble(cfg: Config, train: ad.AnnData, test: ad.AnnData | None, heldout: pd.DataFrame,
             gene_table: pd.DataFrame, pert_table: pd.DataFrame | None,
             gene_source: str, pert_source: str | None) -> Dataset:
    """Check that train/test/held-out/embeddings fit together and build the Dataset.

    With no perturbation table, a perturbation's embedding is its target gene's row of the gene
    table (so the label must be a gene symbol).
    """
    pert_col, control = cfg.data.pert_name_col, cfg.data.control_name
    genes = list(train.var_names)
    if test is not None and list(test.var_names) != genes:
        missing = pd.Index(genes).difference(test.var_names)
        detail = (f"{len(missing)} training genes are absent (e.g. {', '.join(missing[:3])})" if len(missing)
                  else "same genes but a different number or order")
        raise NbglmError(f"test data genes differ from the training genes: {detail}; "
                         "test and train must have identical var_names in the same order")
    train_perts = pert_labels(train, pert_col, control)
    if not train_perts:
        raise NbglmError(f"training data has no perturbed cells: every obs['{pert_col}'] is '{control}'")
    normalize = cfg.data.normalize_embeddings
    gene_emb = align_genes(gene_table, genes, gene_source, normalize)
    if cfg.data.effect_pcs:
        labels = train.obs[pert_col].astype(str).to_numpy()
        gene_emb = np.hstack([gene_emb, effect_gene_embedding(train.X, labels, control, cfg.data.effect_pcs)])
    pert_emb = select_perts(gene_table if pert_table is None else pert_table, train_perts,
                            list(heldout["target_gene"]), pert_source or gene_source, normalize)
    phase = cfg.data.phase_column
    return Dataset(
        train=train,
        test=test,
        heldout=heldout.reset_index(drop=True),
        gene_emb=gene_emb,
        pert_emb=pert_emb,
        pert_col=pert_col,
        control=control,
        phase_col=phase if phase is not None and phase in train.obs.columns else None,
    )


def load_dataset(cfg: Config) -> Dataset:
    """The dataset a run uses: the built-in synthetic one when no training file is configured,
    else the configured files (embeddings derived from the training data when none is given)."""
    paths, data = cfg.paths, cfg.data
    pert_col, control = data.pert_name_col, data.control_name
    train_key = "paths.train_split_h5ad" if data.use_split else "paths.train_h5ad"
    train_path = paths.train_split_h5ad if data.use_split else paths.train_h5ad

    if not train_path:
        if data.use_split:
            raise NbglmError("data.use_split is true but paths.train_split_h5ad is empty; set it or "
                             "set data.use_split=false")
        stray = [k for k in ("test_h5ad", "val_list_csv", "gene_embedding", "pert_embedding") if getattr(paths, k)]
        if stray:
            raise NbglmError(f"paths.{stray[0]} is set but paths.train_h5ad is empty; set paths.train_h5ad "
                             "too, or clear the paths to use the built-in synthetic dataset")
        syn = make_synthetic(data.synthetic, pert_col, control)
        return assemble(cfg, syn.train, syn.test, syn.val, syn.gene_emb, syn.pert_emb,
                        "the synthetic gene embedding", "the synthetic perturbation embedding")

    train = read_counts(train_path, pert_col, control, f"training data ({train_key})")
    test = read_counts(paths.test_h5ad, pert_col, None, "test data (paths.test_h5ad)") if paths.test_h5ad else None
    if paths.val_list_csv:
        heldout = read_val_list(paths.val_list_csv)
        if test is not None:
            check_val_perts(heldout, pert_labels(test, pert_col, control), paths.val_list_csv, "the test data")
    elif test is not None:
        heldout = val_list(test, pert_col, control)
        if heldout.empty:
            raise NbglmError(f"test data {paths.test_h5ad} has no perturbed cells (only '{control}'); "
                             "it must hold the held-out perturbations' cells")
    else:
        raise NbglmError("no held-out perturbations to predict: set paths.test_h5ad or paths.val_list_csv")

    if paths.gene_embedding:
        gene_table, gene_source = read_embedding(paths.gene_embedding), paths.gene_embedding
    else:
        gene_table = derive_gene_embedding(train.X, list(train.var_names), data.derived_embedding_dim)
        gene_source = "the gene embedding derived from the training data"
    pert_table = read_embedding(paths.pert_embedding) if paths.pert_embedding else None
    return assemble(cfg, train, test, heldout, gene_table, pert_table, gene_source, paths.pert_embedding)
