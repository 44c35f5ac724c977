"""From a config to the `Dataset` every later layer consumes, in two steps.

`read_inputs` reads what the files (or the built-in synthetic data) hold; `assemble` learns what is
learned from the training cells (derived embeddings, effect PCs), checks that the parts fit and
builds the Dataset. Splitting the two lets a sweep assemble each cross-validation fold from its own
training part (`nbglm.data.folds`), so nothing learned from data ever sees a fold's validation cells.
"""

from __future__ import annotations

from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from nbglm.config import Config
from nbglm.data.dataset import Dataset
from nbglm.data.embeddings import (align_genes, derive_gene_embedding, effect_gene_embedding, read_embedding,
                                   select_perts)
from nbglm.data.io import check_val_perts, open_counts, pert_labels, read_counts, read_val_list, val_list
from nbglm.data.rows import Rows
from nbglm.data.synthetic import make_synthetic
from nbglm.errors import NbglmError


@dataclass
class Inputs:
    """What a run's files hold, before anything is learned from them."""

    train: ad.AnnData
    test: ad.AnnData | None
    heldout: pd.DataFrame
    gene_table: pd.DataFrame | None  # None: derived from the training cells by `assemble`
    pert_table: pd.DataFrame | None  # None: a perturbation's row is its target gene's
    gene_source: str
    pert_source: str | None
    train_x: Rows | None = None  # train's counts when train.X is None: a fold's part, or a file on disk
    test_x: Rows | None = None  # test's counts when test.X is None: a fold's validation part, or a file on disk

    def train_counts(self) -> Rows:
        """The training counts, read a chunk of rows at a time."""
        return self.train_x if self.train_x is not None else Rows(self.train.X)


def check_inputs(cfg: Config, inputs: Inputs) -> list[str]:
    """The checks that need no learning: same genes in train and test, some training perturbations,
    no held-out perturbation among them. Returns the training perturbations."""
    pert_col, control = cfg.data.pert_name_col, cfg.data.control_name
    genes = list(inputs.train.var_names)
    if inputs.test is not None and list(inputs.test.var_names) != genes:
        missing = pd.Index(genes).difference(inputs.test.var_names)
        detail = (f"{len(missing)} training genes are absent (e.g. {', '.join(missing[:3])})" if len(missing)
                  else "same genes but a different number or order")
        raise NbglmError(f"test data genes differ from the training genes: {detail}; "
                         "test and train must have identical var_names in the same order")
    train_perts = pert_labels(inputs.train, pert_col, control)
    if not train_perts:
        raise NbglmError(f"training data has no perturbed cells: every obs['{pert_col}'] is '{control}'")
    overlap = sorted(set(inputs.heldout["target_gene"]) & set(train_perts))
    if overlap:
        raise NbglmError(f"held-out perturbation(s) {', '.join(overlap[:5])} also have training cells: a held-out "
                         "perturbation must be unseen; remove it from the held-out list or from the training data")
    return train_perts


def assemble(cfg: Config, inputs: Inputs) -> Dataset:
    """Check that train/test/held-out/embeddings fit together and build the Dataset.

    Everything learned from data is learned from `inputs.train` only. With no perturbation table, a
    perturbation's embedding is its target gene's row of the gene table (the label must be a gene symbol).
    """
    pert_col, control = cfg.data.pert_name_col, cfg.data.control_name
    train, heldout = inputs.train, inputs.heldout
    genes = list(train.var_names)
    train_perts = check_inputs(cfg, inputs)
    gene_table = inputs.gene_table
    if gene_table is None:
        x = train.X if inputs.train_x is None else inputs.train_x.take()
        gene_table = derive_gene_embedding(x, genes, cfg.data.derived_embedding_dim)
    normalize = cfg.data.normalize_embeddings
    gene_emb = align_genes(gene_table, genes, inputs.gene_source, normalize)
    if cfg.data.effect_pcs:
        labels = train.obs[pert_col].astype(str).to_numpy()
        effects = effect_gene_embedding(inputs.train_counts(), labels, control, cfg.data.effect_pcs)
        gene_emb = np.hstack([gene_emb, effects])
    pert_emb = select_perts(gene_table if inputs.pert_table is None else inputs.pert_table, train_perts,
                            list(heldout["target_gene"]), inputs.pert_source or inputs.gene_source, normalize)
    phase = cfg.data.phase_column
    return Dataset(
        train=train,
        train_x=inputs.train_x,
        test=inputs.test,
        test_x=inputs.test_x,
        heldout=heldout.reset_index(drop=True),
        gene_emb=gene_emb,
        pert_emb=pert_emb,
        pert_col=pert_col,
        control=control,
        phase_col=phase if phase is not None and phase in train.obs.columns else None,
    )


def read_inputs(cfg: Config, on_disk: bool = False) -> Inputs:
    """The built-in synthetic data when no training file is configured, else the configured files:
    read into memory, or with `on_disk` checked and left in their files (`nbglm.data.rows`), as a
    sweep's driver reads them."""
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
        return Inputs(syn.train, syn.test, syn.val, syn.gene_emb, syn.pert_emb,
                      "the synthetic gene embedding", "the synthetic perturbation embedding")

    train_x = test_x = None
    if on_disk:
        train, train_x = open_counts(train_path, pert_col, control, f"training data ({train_key})")
        test, test_x = (open_counts(paths.test_h5ad, pert_col, None, "test data (paths.test_h5ad)")
                        if paths.test_h5ad else (None, None))
    else:
        train = read_counts(train_path, pert_col, control, f"training data ({train_key})")
        test = read_counts(paths.test_h5ad, pert_col, None, "test data (paths.test_h5ad)") if paths.test_h5ad else None
    if paths.val_list_csv:
        heldout = read_val_list(paths.val_list_csv)
        if test is not None:
            check_val_perts(heldout, pert_labels(test, pert_col, control), paths.val_list_csv, "the test data")
    elif test is not None:
        heldout = val_list(test, pert_col, control, None if test_x is None else test_x.totals())
        if heldout.empty:
            raise NbglmError(f"test data {paths.test_h5ad} has no perturbed cells (only '{control}'); "
                             "it must hold the held-out perturbations' cells")
    else:
        raise NbglmError("no held-out perturbations to predict: set paths.test_h5ad or paths.val_list_csv")
    gene_table = read_embedding(paths.gene_embedding) if paths.gene_embedding else None
    gene_source = paths.gene_embedding or "the gene embedding derived from the training data"
    pert_table = read_embedding(paths.pert_embedding) if paths.pert_embedding else None
    return Inputs(train, test, heldout, gene_table, pert_table, gene_source, paths.pert_embedding, train_x, test_x)


def load_dataset(cfg: Config) -> Dataset:
    """The dataset a run uses: `read_inputs`, then `assemble`."""
    return assemble(cfg, read_inputs(cfg))
