"""The report's figures: matplotlib on the Agg canvas (no pyplot, no global backend), saved as PNG."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from nbglm import atomic
from nbglm.baselines import BASELINES
from nbglm.metrics import METRICS as REGISTRY
from nbglm.report.read import Sweep
from nbglm.sweep.params import Param

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

N_COMPARED = 3  # best configs shown beside the baselines
DPI = 110


def axis_label(metric: str) -> str:
    """Axis label, with the scale or units."""
    return REGISTRY[metric].label


def short(metric: str) -> str:
    """Title: the metric's name and which way is better."""
    return f"{REGISTRY[metric].title} {REGISTRY[metric].arrow}"


def _figure(width: float, height: float) -> Figure:
    """A figure on the Agg canvas, without pyplot (no global backend, safe in any process);
    matplotlib is imported here so `nbglm` commands that draw nothing stay quick to start."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def _log_axis(p: Param) -> bool:
    return p.type != "categorical" and (p.log or p.key.endswith(".rank"))


def _x_values(p: Param, column: pd.Series) -> np.ndarray:
    """Where each config sits on the param's axis: its value, or its choice's index."""
    if p.type != "categorical":
        return pd.to_numeric(column).to_numpy(float)
    index = {str(label): i for i, label in enumerate(p.labels())}
    return column.map(index).to_numpy(float)


def _spread(x: np.ndarray) -> np.ndarray:
    """Offsets that set configs sharing a category side by side instead of on top of each other."""
    out = np.zeros_like(x)
    for value in np.unique(x):
        idx = np.flatnonzero(x == value)
        width = min(0.6, 0.1 * idx.size)
        out[idx] = np.linspace(-width / 2, width / 2, idx.size) if idx.size > 1 else 0.0
    return out


def _param_axis(ax: Axes, p: Param) -> None:
    """The x axis spans the searched range (every choice, or low..high), so gaps in the sampling show."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    if p.type == "categorical":
        ax.set_xticks(range(len(p.choices)), [str(label) for label in p.labels()])
        ax.set_xlim(-0.6, len(p.choices) - 0.4)
    elif _log_axis(p):
        ax.set_xscale("log")
        ax.set_xlim(p.low / 1.15, p.high * 1.15)
        if p.type == "int":  # ranks and widths read best as plain powers of two
            ax.xaxis.set_major_locator(LogLocator(base=2))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        pad = 0.05 * (p.high - p.low)
        ax.set_xlim(p.low - pad, p.high + pad)
    ax.set_xlabel(p.key + (" (log scale)" if _log_axis(p) else ""))


def plot_metric_vs_params(sweep: Sweep, metric: str, path: Path) -> Path:
    """One panel per swept param: each config's CV mean ± std over folds x seeds (units as dots), best
    config starred."""
    ranked = sweep.ranked()
    best = ranked.iloc[0]
    ok_trials = sweep.trials[sweep.trials["status"] == "ok"]
    ncols = min(3, len(sweep.space))
    nrows = math.ceil(len(sweep.space) / ncols)
    fig = _figure(4.6 * ncols, 3.6 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, p) in zip(axes, sweep.space.items()):
        x = _x_values(p, ranked[key])
        if p.type == "categorical":
            x = x + _spread(x)
        where = dict(zip(ranked["trial_id"], x))  # each unit's dot sits on its config's position
        ax.scatter(ok_trials["trial_id"].map(where), ok_trials[metric], s=12, color="0.6", alpha=0.7,
                   label="single fold x seed", zorder=1)
        ax.errorbar(x, ranked[f"{metric}_mean"], yerr=ranked[f"{metric}_std"].fillna(0.0), fmt="o",
                    color="tab:blue", ecolor="tab:blue", capsize=3, label="config: CV mean ± std over folds x seeds",
                    zorder=2)
        ax.scatter([x[0]], [best[f"{metric}_mean"]], marker="*", s=180, color="tab:red", zorder=3,
                   label=f"best config ({best['trial_id']})")
        _param_axis(ax, p)
        ax.set_ylabel(axis_label(metric))
        ax.set_title(f"{short(metric)} vs {key.split('.')[-1]}")
        ax.grid(alpha=0.3)
    for ax in axes[len(sweep.space):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    fig.suptitle(f"Sweep '{sweep.name}': {short(metric)} vs each swept hyperparameter "
                 f"({len(ranked)} scored configs, {sweep.n_folds} folds x seeds {sweep.seeds})")
    return _save(fig, path)


def _model_stats(sweep: Sweep, base: pd.DataFrame) -> list[tuple[str, str, dict[str, tuple[float, float]]]]:
    """(label, colour, {metric: (mean, std)}) for the best configs, then each baseline, over folds x seeds."""
    out = []
    for rank, (_, row) in enumerate(sweep.ranked().head(N_COMPARED).iterrows(), 1):
        out.append((f"#{rank} {row['trial_id']}", f"C{rank - 1}",
                    {m: (row[f"{m}_mean"], 0.0 if pd.isna(row[f"{m}_std"]) else row[f"{m}_std"]) for m in sweep.metrics}))
    for model, grey in zip(BASELINES, ("0.35", "0.55", "0.75")):
        runs = base[base["model"] == model]
        if len(runs):
            out.append((model, grey, {m: (runs[m].mean(), runs[m].std() if len(runs) > 1 else 0.0) for m in sweep.metrics}))
    return out


def plot_best_vs_baselines(sweep: Sweep, base: pd.DataFrame, path: Path) -> Path:
    """Grouped bars of DES/PDS/MAE (left) and the overall score (right), best configs beside baselines."""
    models = _model_stats(sweep, base)
    fig = _figure(13, 4.8)
    left, right = fig.subplots(1, 2, width_ratios=[3, 1.4])
    width = 0.8 / len(models)
    for i, (label, color, stats) in enumerate(models):
        x = np.arange(3) + (i - (len(models) - 1) / 2) * width
        means, stds = zip(*(stats[m] for m in ("des", "pds", "mae")))
        bars = left.bar(x, means, width, yerr=stds, capsize=3, color=color, label=label)
        left.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        bar = right.bar([i], [stats["overall_score"][0]], yerr=[stats["overall_score"][1]], capsize=3, color=color)
        right.bar_label(bar, fmt="%.3f", fontsize=7, padding=2)
    left.set_xticks(range(3), ["DES ↑ (0–1)", "PDS ↑ (0–1)", "MAE ↓ (log1p expression)"])
    left.set_ylabel("CV score (mean ± std over folds x seeds)")
    left.set_title("Per-metric scores")
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=len(models))
    right.set_xticks(range(len(models)), [label for label, _, _ in models], rotation=35, ha="right")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel(axis_label("overall_score"))
    right.set_title(short("overall_score"))
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Sweep '{sweep.name}': best configs vs baselines on the same data and seeds {sweep.seeds}")
    return _save(fig, path)


def plot_per_perturbation(sweep: Sweep, table: pd.DataFrame, baseline: dict[str, float], trial_id: str,
                          path: Path) -> Path:
    """Each per-perturbation metric (the table's columns: DES/PDS/MAE, or the vcc2026 members) of each
    held-out perturbation for one config, sorted by the first (best at the top)."""
    metrics = list(dict.fromkeys(table.columns.get_level_values(0)))
    table = table.sort_values((metrics[0], "mean"), ascending=REGISTRY[metrics[0]].direction == "max")
    y = np.arange(len(table))
    fig = _figure(4.4 * len(metrics), max(3.5, 1.9 + 0.28 * len(table)))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False).ravel()
    what = "cell_mean baseline" if sweep.profile == "vcc2025" else f"{sweep.profile} mean-response baseline"
    for ax, metric in zip(axes, metrics):
        ax.barh(y, table[(metric, "mean")], xerr=table[(metric, "std")].fillna(0.0), capsize=2,
                color="tab:blue" if REGISTRY[metric].direction == "max" else "tab:orange",
                label="best config: mean ± std over seeds")
        if metric in baseline:
            ax.axvline(baseline[metric], color="black", linestyle="--", linewidth=1,
                       label=f"{what} (mean over perturbations)")
        ax.set_xlabel(axis_label(metric))
        ax.set_title(f"{short(metric)} per perturbation")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, table.index)
    axes[0].set_ylabel("held-out perturbation")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    fig.suptitle(f"Sweep '{sweep.name}': best config {trial_id}, per training perturbation scored in the fold "
                 "that held it out (mean ± std over seeds)")
    return _save(fig, path)


def plot_cv_vs_test(sweep: Sweep, path: Path) -> Path:
    """Every config's CV score (mean ± std over folds x seeds), best first; the refit configs' test
    scores (mean ± std over seeds) beside them, so the optimism of the selection shows."""
    metric, ranked = sweep.metric, sweep.ranked()
    x = np.arange(len(ranked))
    fig = _figure(max(8.0, 0.45 * len(ranked) + 3), 4.6)
    ax = fig.subplots()
    ax.errorbar(x, ranked[f"{metric}_mean"], yerr=ranked[f"{metric}_std"].fillna(0.0), fmt="o", capsize=3,
                color="tab:blue", label="CV score: mean ± std over folds x seeds (chooses the config)")
    refit = {c["trial_id"]: c["test"][metric] for c in (sweep.final or {}).get("configs", []) if c.get("test")}
    where = {t: i for i, t in enumerate(ranked["trial_id"])}
    tested = [(where[t], s["mean"], s["std"] or 0.0) for t, s in refit.items() if t in where and s["mean"] is not None]
    if tested:
        tx, ty, te = zip(*tested)
        ax.errorbar(np.asarray(tx) + 0.15, ty, yerr=te, fmt="D", capsize=3, color="tab:red",
                    label="test score of the refit: mean ± std over seeds (scored once, after the choice)")
    ax.set_xticks(x, ranked["trial_id"], rotation=60, ha="right", fontsize=7)
    ax.set_xlim(-0.6, len(ranked) - 0.4)
    ax.set_xlabel("config (best CV score first)")
    ax.set_ylabel(axis_label(metric))
    ax.grid(alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=1)
    fig.suptitle(f"Sweep '{sweep.name}': {short(metric)}, cross-validated per config; test score of the refit")
    return _save(fig, path)


def plot_pareto(sweep: Sweep, path: Path) -> Path:
    """Multi-objective sweeps: every finished config on each pair of objectives (cross-validated
    means), the Pareto front (configs.csv `pareto`) joined in red, the picked best config starred."""
    import itertools

    ranked = sweep.ranked()
    pairs = list(itertools.combinations([m for m, _ in sweep.objectives], 2))
    fig = _figure(4.4 * len(pairs), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(pairs)))
    front = ranked[ranked["pareto"]] if "pareto" in ranked else ranked.iloc[:0]
    for ax, (mx, my) in zip(axes, pairs):
        ax.scatter(ranked[f"{mx}_mean"], ranked[f"{my}_mean"], s=22, color="0.6", label="config (dominated)")
        line = front.sort_values(f"{mx}_mean")
        ax.plot(line[f"{mx}_mean"], line[f"{my}_mean"], "o", color="tab:red", label="Pareto front")
        if not ranked.empty:
            best = ranked.iloc[0]
            ax.scatter([best[f"{mx}_mean"]], [best[f"{my}_mean"]], marker="*", s=200, color="tab:red",
                       edgecolor="black", zorder=3, label=f"picked: best {short(sweep.metric)} on the front")
        ax.set_xlabel(axis_label(mx))
        ax.set_ylabel(axis_label(my))
        ax.set_title(f"{short(my)} vs {short(mx)}")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    fig.suptitle(f"Sweep '{sweep.name}': Pareto front of {', '.join(m for m, _ in sweep.objectives)} "
                 "(cross-validated means; a front projected on two objectives need not look convex)")
    return _save(fig, path)
