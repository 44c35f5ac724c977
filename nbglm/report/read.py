"""Reading a sweep directory back: the spec it ran, its configs and its seed units.

Everything the report shows is rebuilt from what the sweep wrote (`sweep.yaml`, `folds.csv`,
`results/*.csv`, each unit's bundle `config_<trial>/fold_<f>/seed_<s>/metrics/metrics.json`,
`results/final/metrics.json`), so a report is exact mid-sweep too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import json

import pandas as pd
import yaml

from nbglm.errors import NbglmError
from nbglm.metrics import get, names
from nbglm.sweep.params import Param
from nbglm.sweep.space import SpecFields, rank_objective


@dataclass
class Sweep:
    """What the report reads from one sweep directory."""

    path: Path
    name: str
    space: dict[str, Param]
    metric: str  # ranks the configs (the aggregate score when several objectives were searched)
    mode: str
    objectives: list[tuple[str, str]]  # (metric, mode) the searcher optimised
    base: dict  # the resolved base experiment config (no sampled params)
    configs: pd.DataFrame  # results/configs.csv, params as their searcher labels (strings)
    trials: pd.DataFrame  # results/trials.csv: one row per config x fold x seed
    folds: pd.DataFrame  # folds.csv: the fold of every training perturbation and control cell
    final: dict | None  # results/final/metrics.json: CV and test scores of the refit configs

    @property
    def profile(self) -> str:
        return get(self.objectives[0][0]).profile

    @property
    def metrics(self) -> tuple[str, ...]:
        """The registry names of the sweep's profile (the aggregate first): its CSVs' metric columns."""
        return names(self.profile)

    @property
    def seeds(self) -> list[int]:
        return sorted(int(s) for s in self.trials["seed"].unique())

    @property
    def n_folds(self) -> int:
        return int(self.folds["fold"].max()) + 1

    def ranked(self) -> pd.DataFrame:
        """Finished configs with a cross-validated score, best mean first."""
        done = self.configs["status"].isin(["ok", "partial"])
        scored = self.configs[done & self.configs[f"{self.metric}_mean"].notna()]
        return scored.sort_values(f"{self.metric}_mean", ascending=self.mode == "min", kind="stable")

    def unit_bundle(self, trial_id: str, fold: int, seed: int) -> Path:
        return self.path / f"config_{trial_id}" / f"fold_{fold}" / f"seed_{seed}"


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
                         "(written by `nbglm sweep SPEC` once a config finishes)")
    state = yaml.safe_load(saved.read_text())
    spec = state["spec"]
    defaults = SpecFields()
    space = {str(k): _param(str(k), v) for k, v in spec["search"]["space"].items()}
    final = path / "results" / "final" / "metrics.json"
    metric, mode = spec.get("metric", defaults.metric), spec.get("mode", defaults.mode)
    metrics = names(get(metric[0] if isinstance(metric, list) else metric).profile)
    stats = [f"{m}_{s}" for m in metrics for s in ("mean", "std", "min", "max")]
    objectives = list(zip(metric, mode)) if isinstance(metric, list) else [(metric, mode)]
    rank_metric, rank_mode = rank_objective(metric, mode)
    configs = _read_csv(configs_csv, [*stats, "n_units_ok", "n_units"])
    if "pareto" in configs:
        configs["pareto"] = configs["pareto"] == "True"
    return Sweep(
        path=path, name=spec.get("name", defaults.name), space=space, metric=rank_metric, mode=rank_mode,
        objectives=objectives, base=state["base_config"], configs=configs,
        trials=_read_csv(path / "results" / "trials.csv", [*metrics, "fold", "seed"]),
        folds=pd.read_csv(path / "folds.csv", dtype={"label": str}),
        final=json.loads(final.read_text()) if final.is_file() else None,
    )
