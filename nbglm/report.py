"""Sweep report: `nbglm report SWEEP_DIR` -> `SWEEP_DIR/report/` (PNG figures + one self-contained HTML).

Everything is rebuilt from what the sweep wrote (`sweep.yaml`, `results/*.csv`, each seed's bundle
`config_<trial>/seed_<s>/metrics/metrics.json`), so a report is exact mid-sweep too. The baselines
(cell_mean, linear, control) are not part of a sweep: the first report runs them on the sweep's base
experiment config and seeds, in a temp dir, and keeps their scores in `results/baselines.csv`.

The sweep driver writes a report when it ends (`report_after_sweep`); a failure there is a warning.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from nbglm import atomic
from nbglm.config import Config, from_dict, load_config
from nbglm.errors import NbglmError
from nbglm.sweep.space import Param, SpecFields

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

log = logging.getLogger("nbglm")

METRICS = ("overall_score", "des", "pds", "mae")
LABELS = {  # axis labels, with units
    "overall_score": "overall score (VCC, baseline-scaled)",
    "des": "DES (DE-gene overlap, 0–1)",
    "pds": "PDS (perturbation discrimination, 0–1)",
    "mae": "MAE (log1p expression)",
}
SHORT = {"overall_score": "overall score ↑", "des": "DES ↑", "pds": "PDS ↑", "mae": "MAE ↓"}  # titles
BASELINE_MODELS = ("cell_mean", "linear", "control")
BASELINE_COLUMNS = ["model", "seed", "des", "pds", "mae", "overall_score"]
N_COMPARED = 3  # best configs shown beside the baselines
DPI = 110


@dataclass
class Sweep:
    """What the report reads from one sweep directory."""

    path: Path
    name: str
    space: dict[str, Param]
    metric: str
    mode: str
    base: dict  # the resolved base experiment config (no sampled params)
    configs: pd.DataFrame  # results/configs.csv, params as their searcher labels (strings)
    trials: pd.DataFrame  # results/trials.csv

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.trials["seed"].unique())

    def ranked(self) -> pd.DataFrame:
        """Configs with a scored seed, best seed mean first."""
        scored = self.configs[self.configs[f"{self.metric}_mean"].notna()]
        return scored.sort_values(f"{self.metric}_mean", ascending=self.mode == "min", kind="stable")

    def seed_bundle(self, trial_id: str, seed: int) -> Path:
        return self.path / f"config_{trial_id}" / f"seed_{seed}"


# --- reading ------------------------------------------------------------------------------------


def _read_csv(path: Path, numeric: Iterable[str]) -> pd.DataFrame:
    """A results CSV with every column as text (trial ids and choice labels stay as written),
    then the numeric columns parsed; empty cells become NaN."""
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in numeric:
        if col in df:
            df[col] = pd.to_numeric(df[col].where(df[col] != ""))
    return df


def _param(key: str, raw: dict) -> Param:
    return Param(key, raw["type"], low=raw.get("low"), high=raw.get("high"), log=bool(raw.get("log", False)),
                 choices=tuple(raw.get("choices") or ()))


def load_sweep(sweep_dir: str | Path) -> Sweep:
    """The sweep in `sweep_dir`, or a one-line NbglmError when it is not one (yet)."""
    path = Path(sweep_dir).expanduser().resolve()
    saved, configs_csv = path / "sweep.yaml", path / "results" / "configs.csv"
    if not saved.is_file() or not configs_csv.is_file():
        raise NbglmError(f"{path} is not a sweep directory: it needs sweep.yaml and results/configs.csv "
                         "(written by `python launch.py SPEC` once a config finishes)")
    state = yaml.safe_load(saved.read_text())
    spec = state["spec"]
    defaults = SpecFields()
    space = {str(k): _param(str(k), v) for k, v in spec["search"]["space"].items()}
    stats = [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "min", "max")]
    return Sweep(
        path=path, name=spec.get("name", defaults.name), space=space, metric=spec.get("metric", defaults.metric),
        mode=spec.get("mode", defaults.mode), base=state["base_config"],
        configs=_read_csv(configs_csv, [*stats, "n_seeds_ok", "n_seeds"]),
        trials=_read_csv(path / "results" / "trials.csv", [*METRICS, "seed"]),
    )


# --- runs the sweep did not make: baselines, and a best config whose bundles are gone ------------


def _scored_runs(cfgs: list[Config]) -> Iterator[dict]:
    """The metrics of each experiment, run in-process on data loaded once; bundles go to a temp dir."""
    from nbglm.multiseed import shared_inputs
    from nbglm.pipeline import run_experiment

    data, de_cache = shared_inputs(cfgs[0], None)
    with tempfile.TemporaryDirectory(prefix="nbglm-report-") as tmp:
        for i, cfg in enumerate(cfgs):
            yield run_experiment(cfg, data, bundle_dir=Path(tmp) / f"run_{i}", de_cache=de_cache).metrics


def compute_baselines(sweep: Sweep) -> pd.DataFrame:
    """Each baseline for each seed of the sweep, on the sweep's base experiment config."""
    from nbglm.pipeline import with_seed

    base = from_dict(sweep.base)
    base = replace(base, pipeline=replace(base.pipeline, mode="train_sample_eval"))  # baselines have no ckpt
    jobs = [(model, seed) for model in BASELINE_MODELS for seed in sweep.seeds]
    cfgs = [with_seed(replace(base, model=replace(base.model, name=model)), seed) for model, seed in jobs]
    rows = [{"model": model, "seed": seed, **{m: metrics[m] for m in BASELINE_COLUMNS[2:]}}
            for (model, seed), metrics in zip(jobs, _scored_runs(cfgs))]
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


def baselines(sweep: Sweep) -> pd.DataFrame:
    """results/baselines.csv, computed and written (atomically) the first time."""
    path = sweep.path / "results" / "baselines.csv"
    if path.is_file():
        df = _read_csv(path, ["seed", *METRICS])
        missing = set(BASELINE_COLUMNS) - set(df)
        if missing:
            raise NbglmError(f"{path} lacks columns {sorted(missing)}; delete it and the report recomputes it")
        return df
    df = compute_baselines(sweep)
    atomic.write_text(path, df.to_csv(index=False))
    return df


def per_perturbation(sweep: Sweep, trial_id: str) -> tuple[pd.DataFrame, dict[str, float], str]:
    """(per-perturbation DES/PDS/MAE of a config over its ok seeds: mean and std per pert, the
    cell_mean baseline's mean scores, where they came from). Rerun for the first seed only if the
    sweep's seed bundles are gone."""
    ok = sweep.trials[(sweep.trials["trial_id"] == trial_id) & (sweep.trials["status"] == "ok")]
    files = [p for s in ok["seed"] if (p := sweep.seed_bundle(trial_id, int(s)) / "metrics" / "metrics.json").is_file()]
    if files:
        runs = [json.loads(p.read_text()) for p in files]
        source = f"{len(runs)} seed bundle(s) of trial {trial_id}"
    else:
        from nbglm.pipeline import with_seed

        cfg = load_config(sweep.path / "results" / "best_config.yaml")
        runs = list(_scored_runs([with_seed(cfg, sweep.seeds[0])]))
        source = f"a rerun of trial {trial_id} for seed {sweep.seeds[0]} (its seed bundles are gone)"
    rows = [{"pert": pert, **scores} for run in runs for pert, scores in run["per_perturbation"].items()]
    table = pd.DataFrame(rows).groupby("pert")[["des", "pds", "mae"]].agg(["mean", "std"])
    return table, dict(runs[0].get("baseline") or {}), source


# --- figures ------------------------------------------------------------------------------------


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
    """One panel per swept param: each config's seed mean ± std (seeds as dots), best config starred."""
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
        where = dict(zip(ranked["trial_id"], x))  # each seed's dot sits on its config's position
        ax.scatter(ok_trials["trial_id"].map(where), ok_trials[metric], s=12, color="0.6", alpha=0.7,
                   label="single seed", zorder=1)
        ax.errorbar(x, ranked[f"{metric}_mean"], yerr=ranked[f"{metric}_std"].fillna(0.0), fmt="o",
                    color="tab:blue", ecolor="tab:blue", capsize=3, label="config: mean ± std over seeds", zorder=2)
        ax.scatter([x[0]], [best[f"{metric}_mean"]], marker="*", s=180, color="tab:red", zorder=3,
                   label=f"best config ({best['trial_id']})")
        _param_axis(ax, p)
        ax.set_ylabel(LABELS[metric])
        ax.set_title(f"{SHORT[metric]} vs {key.split('.')[-1]}")
        ax.grid(alpha=0.3)
    for ax in axes[len(sweep.space):]:
        ax.set_visible(False)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    fig.suptitle(f"Sweep '{sweep.name}': {SHORT[metric]} vs each swept hyperparameter "
                 f"({len(ranked)} scored configs, seeds {sweep.seeds})")
    return _save(fig, path)


def _model_stats(sweep: Sweep, base: pd.DataFrame) -> list[tuple[str, str, dict[str, tuple[float, float]]]]:
    """(label, colour, {metric: (mean, std)}) for the best configs, then each baseline over its seeds."""
    out = []
    for rank, (_, row) in enumerate(sweep.ranked().head(N_COMPARED).iterrows(), 1):
        out.append((f"#{rank} {row['trial_id']}", f"C{rank - 1}",
                    {m: (row[f"{m}_mean"], 0.0 if pd.isna(row[f"{m}_std"]) else row[f"{m}_std"]) for m in METRICS}))
    for model, grey in zip(BASELINE_MODELS, ("0.35", "0.55", "0.75")):
        runs = base[base["model"] == model]
        if len(runs):
            out.append((model, grey, {m: (runs[m].mean(), runs[m].std() if len(runs) > 1 else 0.0) for m in METRICS}))
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
    left.set_ylabel("score (mean ± std over seeds)")
    left.set_title("Per-metric scores")
    fig.legend(*left.get_legend_handles_labels(), loc="outside lower center", ncols=len(models))
    right.set_xticks(range(len(models)), [label for label, _, _ in models], rotation=35, ha="right")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_ylabel(LABELS["overall_score"])
    right.set_title(SHORT["overall_score"])
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Sweep '{sweep.name}': best configs vs baselines on the same data and seeds {sweep.seeds}")
    return _save(fig, path)


def plot_per_perturbation(sweep: Sweep, table: pd.DataFrame, baseline: dict[str, float], trial_id: str,
                          path: Path) -> Path:
    """DES/PDS/MAE of each held-out perturbation for one config, sorted by DES (best at the top)."""
    table = table.sort_values(("des", "mean"))
    y = np.arange(len(table))
    fig = _figure(13, max(3.5, 1.9 + 0.28 * len(table)))
    axes = fig.subplots(1, 3, sharey=True)
    for ax, metric in zip(axes, ("des", "pds", "mae")):
        ax.barh(y, table[(metric, "mean")], xerr=table[(metric, "std")].fillna(0.0), capsize=2,
                color="tab:blue" if metric != "mae" else "tab:orange", label="best config: mean ± std over seeds")
        if metric in baseline:
            ax.axvline(baseline[metric], color="black", linestyle="--", linewidth=1,
                       label="cell_mean baseline (mean over perturbations)")
        ax.set_xlabel(LABELS[metric])
        ax.set_title(f"{SHORT[metric]} per perturbation")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, table.index)
    axes[0].set_ylabel("held-out perturbation")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    fig.suptitle(f"Sweep '{sweep.name}': best config {trial_id}, per held-out perturbation (mean ± std over seeds)")
    return _save(fig, path)


# --- HTML ---------------------------------------------------------------------------------------


def _mean_std(row: pd.Series, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    return f"{mean:.4f}" + ("" if pd.isna(std) else f" ± {std:.4f}")


def _param_text(p: Param, value: str) -> str:
    """A sampled value as a person reads it: floats to 4 significant digits, the rest as written."""
    return f"{float(value):.4g}" if p.type == "float" and value else value


def _table(sweep: Sweep, top: int) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("rank", "trial", "params", *(LABELS[m] for m in METRICS), "seeds ok"))
    rows = []
    for rank, (_, r) in enumerate(sweep.ranked().head(top).iterrows(), 1):
        params = "<br>".join(html.escape(f"{k} = {_param_text(p, r[k])}") for k, p in sweep.space.items())
        cells = [str(rank), html.escape(r["trial_id"]), params, *(_mean_std(r, m) for m in METRICS),
                 f"{int(r['n_seeds_ok'])}/{int(r['n_seeds'])}"]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f2f2f2}tbody tr:first-child{background:#fff6d5}figure{margin:2em 0}img{max-width:100%}
figcaption{color:#555;font-size:14px}"""


def render_html(sweep: Sweep, figures: list[tuple[Path, str]], top: int, notes: list[str]) -> str:
    """The page: summary line, top-configs table, then each figure (embedded) with its caption."""
    n_failed = int((sweep.configs["status"] == "failed").sum())
    summary = (f"{len(sweep.configs)} configs ({len(sweep.ranked())} scored, {n_failed} failed) × "
               f"seeds {sweep.seeds}; ranked by seed-mean {sweep.metric} ({sweep.mode}). Sweep directory: {sweep.path}. "
               f"Written {datetime.now():%Y-%m-%d %H:%M}.")
    body = [f"<h1>Sweep report: {html.escape(sweep.name)}</h1>", f"<p>{html.escape(summary)}</p>",
            "<h2>Top configs (mean ± std over seeds)</h2>", _table(sweep, top),
            *(f"<p>{html.escape(n)}</p>" for n in notes), "<h2>Figures</h2>",
            *(_img(path, caption) for path, caption in figures)]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>Sweep report: '
            f"{html.escape(sweep.name)}</title><style>{_STYLE}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")


# --- entry points -------------------------------------------------------------------------------


def write_report(sweep_dir: str | Path, top: int = 10) -> Path:
    """Write `<sweep_dir>/report/` (figures and report.html); returns the HTML path."""
    sweep = load_sweep(sweep_dir)
    ranked = sweep.ranked()
    if ranked.empty:
        raise NbglmError(f"no config of sweep '{sweep.name}' has a scored seed yet: nothing to report")
    out = sweep.path / "report"
    best = ranked.iloc[0]["trial_id"]
    table, cell_mean, source = per_perturbation(sweep, best)
    vs_params = {m: (plot_metric_vs_params(sweep, m, out / f"{m}_vs_params.png"),
                     f"{LABELS[m]} of each config (mean ± std over seeds; grey dots: single seeds) against each "
                     f"swept hyperparameter; red star: best config {best}.") for m in METRICS}
    figures = [
        vs_params["overall_score"],
        (plot_best_vs_baselines(sweep, baselines(sweep), out / "best_vs_baselines.png"),
         f"Top {min(N_COMPARED, len(ranked))} configs beside the baselines (cell_mean, linear, control) on the same "
         "data and seeds; error bars: std over seeds."),
        (plot_per_perturbation(sweep, table, cell_mean, best, out / "per_perturbation.png"),
         f"Best config {best}: DES, PDS and MAE of each held-out perturbation (from {source}); "
         "dashed: the cell_mean baseline's mean."),
        *(vs_params[m] for m in METRICS[1:]),
    ]
    notes = [f"Baselines: {sweep.path / 'results' / 'baselines.csv'}; "
             f"best config: {sweep.path / 'results' / 'best_config.yaml'}."]
    path = out / "report.html"
    atomic.write_text(path, render_html(sweep, figures, top, notes))
    return path


def report_after_sweep(sweep_dir: str | Path) -> None:
    """The sweep driver's last step: a report that fails is a warning, never a failed sweep."""
    try:
        path = write_report(sweep_dir)
    except Exception as exc:  # the sweep's results are already written; the report can be redone
        log.warning("sweep report not written (%s: %s); retry with: nbglm report %s",
                    type(exc).__name__, exc, sweep_dir)
        return
    print(f"sweep report: {path}", flush=True)


def _cmd_report(args: argparse.Namespace) -> int:
    print(write_report(args.sweep_dir, top=args.top))
    return 0


def add_report_parser(sub: Any) -> argparse.ArgumentParser:
    """Register `report`: figures and an HTML page for one sweep directory."""
    p = sub.add_parser("report", help="write SWEEP_DIR/report/: figures and a self-contained report.html",
                       description="Plot a sweep (metrics vs hyperparameters, best configs vs baselines, "
                                   "per-perturbation scores) and write one HTML page with the top configs.")
    p.add_argument("sweep_dir", type=Path, help="a sweep's directory, <storage_path>/<name>")
    p.add_argument("--top", type=int, default=10, help="configs in the table (default: %(default)s)")
    p.set_defaults(func=_cmd_report)
    return p
