"""The cross-validation data of a sweep: each fold's dataset and ground-truth cache, built once per
distinct data config and shared through Ray's object store.

What goes to a unit is what its fit needs: in concise mode the cells' sums (`nbglm.data.summary`),
a few megabytes per fold, not the count matrix; fit_mode whole and the baselines get the cells.

A `FoldStore` actor holds the training inputs and the fold table. The first trial that asks for a
data config (the `data.*` part of its experiment config) has the store assemble every fold from
that fold's training part and put it into the object store; every later trial with the same data
config gets the same object refs. So a `data.*` key in the search space acts, and costs one build
per value, not one per trial.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd
import ray

from nbglm.config import Config
from nbglm.data import Dataset
from nbglm.data.folds import fold_inputs
from nbglm.data.summary import summarized
from nbglm.data.load import Inputs, assemble
from nbglm.pipeline import load_inputs


def summarises(cfg: Config) -> bool:
    """A concise fit of the NB-GLM sees its cells only through their sums."""
    return cfg.model.name == "lowrank_nb_glm" and cfg.train.fit_mode == "concise"


def data_key(cfg: Config) -> str:
    """What decides a fold's dataset: the data section (the paths are the sweep's, fixed) and what
    a unit needs of the cells (their sums, and whether predictions carry the real control cells)."""
    shipped = {"sums": summarises(cfg), "controls": cfg.sampling.control_cells == "real"}
    return json.dumps({"data": asdict(cfg.data), "shipped": shipped}, sort_keys=True)


def for_units(cfg: Config, data: Dataset) -> Dataset:
    """`data` as `cfg`'s units get it: summarised when the fit needs only sums, else as it is."""
    return summarized(data, keep_controls=cfg.sampling.control_cells == "real") if summarises(cfg) else data.in_memory()


def build_fold(cfg: Config, inputs: Inputs, folds: pd.DataFrame, fold: int) -> tuple[Any, Any]:
    """(Dataset, ground-truth cache) of one fold: everything learned from its training part only."""
    data = assemble(cfg, fold_inputs(inputs, folds, fold, cfg.data.pert_name_col, cfg.data.control_name))
    data, cache = load_inputs(cfg, data)
    return for_units(cfg, data), cache


@ray.remote(num_cpus=0)
class FoldStore:
    def __init__(self, inputs: Inputs, folds: pd.DataFrame) -> None:
        self._inputs, self._folds = inputs, folds
        self._refs: dict[str, list[tuple[Any, Any]]] = {}

    def refs(self, cfg: Config) -> list[tuple[Any, Any]]:
        """[(dataset ref, cache ref)] per fold for `cfg`'s data config, built on first request."""
        key = data_key(cfg)
        if key not in self._refs:
            n_folds = int(self._folds["fold"].max()) + 1
            built = [build_fold(cfg, self._inputs, self._folds, f) for f in range(n_folds)]
            self._refs[key] = [(ray.put(data), ray.put(cache)) for data, cache in built]
        return self._refs[key]
