"""What a config value may be beyond its type: names that become paths, value ranges, and bounds
that must agree with each other. `nbglm.config` applies these rules to every config it resolves.
"""

from __future__ import annotations

import typing
from typing import Any


def is_plain_name(name: str) -> bool:
    """A name that becomes one directory entry: not empty, no separator, not `.`/`..`, no NUL.
    Every name that becomes a path (experiment.name, a sweep's name) is checked with this, so a
    bundle never leaves its root."""
    return bool(name) and "/" not in name and "\\" not in name and "\0" not in name and name not in (".", "..")


PLAIN_NAME = "a plain directory name (not empty, no '/', not '.' or '..')"

# Range checks that a type alone cannot express: key -> (predicate, what is allowed).
RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "experiment.name": (is_plain_name, PLAIN_NAME),
    "model.rank": (lambda v: v is None or v > 0, "a positive integer or null (full rank)"),
    "model.gp_dropout": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "model.g_out_dim": (lambda v: v > 0, "a positive integer"),
    "model.p_out_dim": (lambda v: v > 0, "a positive integer"),
    "model.g_mlp_hidden": (lambda v: all(h > 0 for h in v), "a list of positive integers"),
    "model.p_mlp_hidden": (lambda v: all(h > 0 for h in v), "a list of positive integers"),
    "model.theta_min": (lambda v: v > 0, "a positive number"),
    "model.ridge_lambda": (lambda v: v >= 0, "a non-negative number"),
    "model.regularization.l1": (lambda v: v >= 0, "a non-negative number"),
    "model.regularization.l2": (lambda v: v >= 0, "a non-negative number"),
    "train.epochs": (lambda v: v > 0, "a positive integer"),
    "train.steps_per_epoch": (lambda v: v > 0, "a positive integer"),
    "train.batch_size": (lambda v: v > 0, "a positive integer"),
    "train.lr": (lambda v: v > 0, "a positive number"),
    "train.weight_decay": (lambda v: v >= 0, "a non-negative number"),
    "train.grad_clip": (lambda v: v >= 0, "a non-negative number (0 = no clipping)"),
    "train.lr_schedule.warmup_frac": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    "train.lr_schedule.min_lr": (lambda v: v >= 0, "a non-negative number"),
    "sampling.n_cells_default": (lambda v: v > 0, "a positive integer"),
    "sampling.median_umi_default": (lambda v: v is None or v > 0, "a positive number or null"),
    "sampling.library_size_cv": (lambda v: v >= 0, "a non-negative number"),
    "sampling.batch_cells": (lambda v: v > 0, "a positive integer"),
    "sampling.gamma_heterogeneity.r0": (lambda v: v > 0, "a positive number"),
    "data.derived_embedding_dim": (lambda v: v > 0, "a positive integer"),
    "data.effect_pcs": (lambda v: v >= 0, "a non-negative integer (0 = off)"),
    "data.synthetic.n_genes": (lambda v: v >= 10, "an integer >= 10"),
    "data.synthetic.n_train_perts": (lambda v: v >= 2, "an integer >= 2"),
    "data.synthetic.n_test_perts": (lambda v: v >= 1, "a positive integer"),
    "data.synthetic.cells_per_pert": (lambda v: v >= 2, "an integer >= 2"),
    "data.synthetic.n_control": (lambda v: v >= 2, "an integer >= 2"),
    "pipeline.seeds": (lambda v: len(v) > 0, "a non-empty list of integers"),
    "pipeline.max_workers": (lambda v: v is None or v > 0, "a positive integer or null"),
    "pipeline.resources.cpu": (lambda v: v >= 0, "a non-negative number"),
    "pipeline.resources.gpu": (lambda v: v >= 0, "a non-negative number"),
}

# Bounds that must agree with each other: (predicate on the config, the message when they do not).
AGREE: list[tuple[typing.Callable[[Any], bool], typing.Callable[[Any], str]]] = [
    (lambda c: c.train.lr_schedule.min_lr <= c.train.lr,
     lambda c: f"train.lr_schedule.min_lr = {c.train.lr_schedule.min_lr:g} is above train.lr = {c.train.lr:g}: "
               "the schedule decays from lr down to min_lr; lower min_lr"),
    (lambda c: c.model.theta_min < c.model.theta_max,
     lambda c: f"model.theta_min = {c.model.theta_min:g} must be below model.theta_max = {c.model.theta_max:g}"),
    (lambda c: c.data.synthetic.n_train_perts + c.data.synthetic.n_test_perts <= c.data.synthetic.n_genes,
     lambda c: "data.synthetic.n_train_perts + n_test_perts must be <= data.synthetic.n_genes (every perturbation "
               "targets a distinct gene)"),
]
