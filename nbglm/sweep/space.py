"""Sweep spec (`sweeps/*.yaml`): parsed and fully validated before Ray starts.

A spec names a base experiment config plus `overrides`, a typed search space over dotted config
keys, the seeds every sampled config runs with, the metric, per-seed resources and where results
go. Every problem (unknown key, a space key that is not a config key, a value the config rejects,
no seeds) is one `NbglmError` line, so a typo never costs a cluster start.

The search space itself (`Param`, what a key may not be) is in `nbglm.sweep.params`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nbglm import atomic
from nbglm.config import (Config, ResourcesConfig, _from_dict, all_keys, from_dict,
                          parse_override, read_yaml, set_dotted, to_dict)
from nbglm.config_rules import PLAIN_NAME, is_plain_name
from nbglm.errors import NbglmError
from nbglm.metrics import METRICS
from nbglm.metrics import names as metric_names
from nbglm.metrics.registry import get as get_metric
from nbglm.sweep.params import Param, parse_param, suggest

SAMPLERS = ("tpe", "random", "nsga2", "cmaes")
CALLBACKS = ("mlflow",)  # experiment trackers a sweep can log to
EARLY_STOPPING_TYPES = ("asha",)


@dataclass
class SearchSettings:
    num_samples: int = 8  # sampled configs in total (each runs every seed)
    sampler: str = "tpe"  # one of SAMPLERS
    seed: int | None = 0  # sampler seed; null = nondeterministic
    warm_start: str | None = None  # an earlier sweep dir whose finished configs seed the study

    def startup_trials(self) -> int:
        """Random configs before a model-based sampler takes over: a quarter of the budget (at least
        4), so a 16-config sweep spends 12 on TPE instead of Optuna's fixed 10 at random."""
        return max(4, self.num_samples // 4)


@dataclass
class EarlyStopping:
    """`early_stopping: {type: asha, min_epochs: m, reduction_factor: r}`: Tune's ASHA stops configs
    whose validation signal (mean over folds x seeds) falls behind at epochs m, m*r, m*r^2, ..."""

    type: str = "asha"
    min_epochs: int = 1
    reduction_factor: float = 3.0


@dataclass
class SelectionSettings:
    """How configs are chosen: K-fold cross-validation over the training perturbations, then the
    top `refit_top` configs are refit on all of them and predict the held-out list."""

    folds: int = 3
    seed: int = 0  # fold assignment seed
    refit_top: int = 1


@dataclass
class SpecFields:
    """The scalar part of a spec (typed like the experiment config); `search.space` and
    `overrides` are free-form and parsed separately."""

    name: str = "sweep"
    base_config: str | None = None  # experiment YAML, relative to the spec file; null = defaults
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    metric: str | list[str] = "overall_score"  # registry metric(s); a list is a multi-objective search
    mode: str | list[str] = "max"  # max or min, one per metric
    resources: ResourcesConfig = field(default_factory=lambda: ResourcesConfig(cpu=1.0, gpu=0.25))  # per seed
    max_concurrent: int = 2  # configs in flight at once
    max_failures: int = 1  # retries of a crashed config trial
    storage_path: str = "sweep_results"  # results go to <storage_path>/<name>/
    callbacks: list[str] = field(default_factory=list)  # trackers: mlflow (local store <sweep dir>/mlflow.db)


@dataclass
class SweepSpec(SpecFields):
    """A validated spec: the scalar fields plus the search settings, space and overrides."""

    path: Path = Path()  # the spec file (base_config is relative to it)
    search: SearchSettings = field(default_factory=SearchSettings)
    selection: SelectionSettings = field(default_factory=SelectionSettings)
    early_stopping: EarlyStopping | None = None
    space: dict[str, Param] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted config key -> value
    raw: dict = field(default_factory=dict)  # the spec as resolved (after --set), saved with the results

    @property
    def objectives(self) -> list[tuple[str, str]]:
        """(metric, mode) of each objective the searcher optimises."""
        if isinstance(self.metric, list):
            return list(zip(self.metric, self.mode))
        return [(self.metric, str(self.mode))]

    @property
    def profile(self) -> str:
        """The metric profile every unit is scored with: the one the objectives belong to."""
        return get_metric(self.objectives[0][0]).profile

    @property
    def metrics(self) -> tuple[str, ...]:
        """The registry names a unit record, the exports, TensorBoard and the report carry."""
        return metric_names(self.profile)

    @property
    def multi_objective(self) -> bool:
        return isinstance(self.metric, list)

    @property
    def rank_metric(self) -> str:
        """The metric that ranks configs (best config, refit, tables); see `rank_objective`."""
        return rank_objective(self.metric, self.mode)[0]

    @property
    def rank_mode(self) -> str:
        return rank_objective(self.metric, self.mode)[1]

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage_path.removeprefix("file://")).expanduser().resolve() / self.name

    def base_raw(self) -> dict:
        """The base experiment config with the overrides, as a plain dict (no sampled params)."""
        raw = read_yaml(self._base_path()) if self.base_config else {}
        for key, value in self.overrides.items():
            set_dotted(raw, key, value)
        return raw

    def resolve_base(self) -> Config:
        try:
            return from_dict(self.base_raw())
        except NbglmError as exc:
            raise NbglmError(f"base config with overrides: {exc}") from None

    def experiment_dict(self, params: dict[str, Any], base: dict | None = None) -> dict:
        """The resolved experiment config (plain dict) for one sampled point of the space."""
        raw = yaml.safe_load(yaml.safe_dump(base if base is not None else to_dict(self.resolve_base())))
        for key, value in params.items():
            set_dotted(raw, key, self.space[key].decode(value))
        return raw

    def units(self) -> list[tuple[int, int]]:
        """Every (fold, seed) a config runs."""
        return [(fold, seed) for fold in range(self.selection.folds) for seed in self.seeds]

    def optuna_space(self) -> dict[str, Any]:
        return {key: p.distribution() for key, p in self.space.items()}

    def _base_path(self) -> Path:
        return (self.path.parent / str(self.base_config)).resolve()


def rank_objective(metric: str | list[str], mode: str | list[str]) -> tuple[str, str]:
    """(metric, mode) that ranks configs: the objective of a single-objective search; for several
    objectives the stated rule, the profile's aggregate score (the registry's first metric), which
    picks best_config.yaml and the refit from the Pareto front."""
    if isinstance(metric, list):
        name = metric_names(get_metric(metric[0]).profile)[0]
        return name, get_metric(name).direction
    return metric, str(mode)


def _flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted leaves (`{train: {epochs: 5}}` -> `{'train.epochs': 5}`)."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def _check_values(spec: SweepSpec) -> None:
    """Build the base config once per bound/choice so the config's own checks reject bad values now."""
    base = to_dict(spec.resolve_base())
    for key, param in spec.space.items():
        values = list(param.choices) if param.type == "categorical" else [param.low, param.high]
        for value in values:
            raw = yaml.safe_load(yaml.safe_dump(base))
            set_dotted(raw, key, value)
            try:
                from_dict(raw)
            except NbglmError as exc:
                raise NbglmError(f"search.space['{key}']: value {value!r} is rejected: {exc}") from None


def _set_override(raw: dict, item: str) -> None:
    """Apply one `--set` to the raw spec; `search.space.<config key>.<field>` addresses a space entry."""
    key, value = parse_override(item)
    prefix = "search.space."
    if key.startswith(prefix):
        space = raw.setdefault("search", {}).setdefault("space", {})
        rest = key[len(prefix):]
        for entry in sorted(space, key=len, reverse=True):
            if rest == entry:
                space[entry] = value
                return
            if rest.startswith(entry + "."):
                space[entry][rest[len(entry) + 1:]] = value
                return
        space[rest] = value
        return
    set_dotted(raw, key, value)


def load_spec(path: str | Path, sets: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Read, override (`--set`) and validate a sweep spec; every problem is one NbglmError line."""
    path = Path(path).resolve()
    raw = read_yaml(path)
    for item in sets:
        _set_override(raw, item)
    raw = yaml.safe_load(yaml.safe_dump(raw))
    try:
        return _parse(path, raw)
    except NbglmError as exc:
        msg = str(exc)
        if msg.startswith(("unknown config key", "config key")):  # the typed parser's wording
            msg = msg.replace("config key '", "key '", 1)
        raise NbglmError(f"sweep spec {path.name}: {msg}") from None


def _parse(path: Path, raw: dict) -> SweepSpec:
    body = dict(raw)
    search_raw = body.pop("search", None) or {}
    selection_raw = body.pop("selection", None) or {}
    stopping_raw = body.pop("early_stopping", None)
    overrides_raw = body.pop("overrides", None) or {}
    if not isinstance(search_raw, dict):
        raise NbglmError("'search' must be a mapping with space, num_samples, sampler, seed")
    if not isinstance(overrides_raw, dict):
        raise NbglmError("'overrides' must be a mapping of experiment config keys")
    search_raw = dict(search_raw)
    space_raw = search_raw.pop("space", None) or {}
    known = [f.name for f in dataclasses.fields(SpecFields)] + ["search", "selection", "early_stopping", "overrides"]
    for key in body:
        if key not in known:
            raise NbglmError(f"unknown key '{key}'{suggest(str(key), known)}")
    fields = _from_dict(SpecFields, body)
    search = _from_dict(SearchSettings, search_raw, "search")
    selection = _from_dict(SelectionSettings, selection_raw, "selection")
    stopping = None if stopping_raw is None else _from_dict(EarlyStopping, stopping_raw, "early_stopping")
    if not fields.seeds:
        raise NbglmError("'seeds' is empty: list at least one seed, e.g. seeds: [1, 2, 3]")
    if len(set(fields.seeds)) != len(fields.seeds):
        raise NbglmError(f"'seeds' has duplicates: {fields.seeds}")
    scheme, sep, _ = fields.storage_path.partition("://")
    if sep and scheme != "file":
        raise NbglmError(f"storage_path {fields.storage_path!r}: only local paths and file:// are supported: every "
                         "node writes seed records straight into the sweep directory, so on a cluster use a path all "
                         "nodes mount (NFS, or the bucket mounted with s3fs/gcsfuse)")
    if not is_plain_name(fields.name):
        raise NbglmError(f"'name' must be {PLAIN_NAME}, got {fields.name!r}")
    _check_objectives(fields.metric, fields.mode)
    checks = [
        (search.num_samples >= 1, "search.num_samples must be >= 1"),
        (search.sampler in SAMPLERS, f"search.sampler = {search.sampler!r} is invalid: expected one of "
                                     f"{', '.join(SAMPLERS)}"),
        (selection.folds >= 2, f"selection.folds = {selection.folds}: cross-validation needs at least 2 folds"),
        (selection.refit_top >= 1, f"selection.refit_top = {selection.refit_top}: refit at least 1 config"),
        (fields.max_concurrent >= 1, "max_concurrent must be >= 1"),
        (fields.max_failures >= 0, "max_failures must be >= 0"),
        (fields.resources.cpu > 0, "resources.cpu must be > 0 (each seed unit needs some CPU)"),
        (fields.resources.gpu >= 0, f"resources.gpu = {fields.resources.gpu:g}: a GPU share must be >= 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise NbglmError(msg)
    if not isinstance(space_raw, dict) or not space_raw:
        raise NbglmError("search.space is empty: add at least one entry, "
                         "e.g. model.rank: {type: int, low: 2, high: 64}")
    atomic.check_writable_dir(Path(fields.storage_path.removeprefix("file://")).expanduser().resolve() / fields.name,
                              "storage_path")
    config_keys = all_keys()
    space = {str(k): parse_param(str(k), v, config_keys) for k, v in space_raw.items()}
    overrides = _profile_override(path, body.get("base_config"), _flatten(overrides_raw), fields.metric)
    spec = SweepSpec(**vars(fields), path=path, search=search, selection=selection, early_stopping=stopping,
                     space=space, overrides=overrides, raw=raw)
    if fields.base_config and not spec._base_path().is_file():
        raise NbglmError(f"base_config not found: {spec._base_path()} (it is relative to the spec file)")
    base = spec.resolve_base()
    if base.pipeline.mode != "train_sample_eval":
        raise NbglmError(f"the base config runs pipeline.mode={base.pipeline.mode}; a sweep trains every config "
                         "on each fold's training part and scores its validation part: use train_sample_eval")
    _check_values(spec)
    _check_search(spec, base.train.epochs)
    return spec


def _profile_override(path: Path, base_config: Any, overrides: dict[str, Any], metric: str | list[str]) -> dict[str, Any]:
    """The overrides with `evaluate.profile` set to the objectives' profile; one line when the base
    config or the overrides already ask for another (the units would report the wrong metrics)."""
    first = metric[0] if isinstance(metric, list) else metric
    profile = get_metric(first).profile
    base = path.parent / str(base_config)
    set_in_base = (read_yaml(base).get("evaluate") or {}).get("profile") if base_config and base.is_file() else None
    for where, value in (("overrides", overrides.get("evaluate.profile")), (f"base_config {base_config}", set_in_base)):
        if value is not None and value != profile:
            raise NbglmError(f"'metric' = {first!r} is a {profile} metric but {where} sets evaluate.profile={value}: "
                             f"set evaluate.profile={profile} or pick a {value} metric")
    return {**overrides, "evaluate.profile": profile}


def _check_objectives(metric: Any, mode: Any) -> None:
    """One metric with one mode, or equally long lists of distinct registry metrics and modes."""
    metrics = metric if isinstance(metric, list) else [metric]
    modes = mode if isinstance(mode, list) else [mode]
    if isinstance(metric, list) != isinstance(mode, list) or len(metrics) != len(modes):
        raise NbglmError(f"'metric' {metric!r} and 'mode' {mode!r} differ in length: give one mode per metric")
    if not metrics or len(set(metrics)) != len(metrics):
        raise NbglmError(f"'metric' {metric!r} needs at least one metric and no repeats")
    for m in metrics:
        if m not in METRICS:
            raise NbglmError(f"'metric' = {m!r} is invalid: expected one of {', '.join(METRICS)}")
    if len({get_metric(m).profile for m in metrics}) > 1:
        raise NbglmError(f"'metric' {metric!r} mixes metric profiles: every unit is scored with one profile")
    for m in modes:
        if m not in ("max", "min"):
            raise NbglmError(f"'mode' = {m!r} is invalid: expected max or min")


def _check_search(spec: SweepSpec, epochs: int) -> None:
    """Early stopping, sampler and warm start fit the objectives and the space."""
    es, sampler = spec.early_stopping, spec.search.sampler
    if es is not None:
        if es.type not in EARLY_STOPPING_TYPES:
            raise NbglmError(f"early_stopping.type = {es.type!r} is unknown: expected one of "
                             f"{', '.join(EARLY_STOPPING_TYPES)}")
        if spec.multi_objective:
            raise NbglmError("early_stopping (asha) ranks configs by one validation signal, so it cannot serve "
                             f"several objectives {spec.metric}: drop early_stopping or use one metric")
        if "train.epochs" in spec.space:
            raise NbglmError("early_stopping needs one epoch budget for every config: remove train.epochs from "
                             "search.space")
        if not 1 <= es.min_epochs < epochs:
            raise NbglmError(f"early_stopping.min_epochs = {es.min_epochs} must be >= 1 and below train.epochs = "
                             f"{epochs}, or no config could be stopped early")
        if not es.reduction_factor > 1:
            raise NbglmError(f"early_stopping.reduction_factor = {es.reduction_factor} must be > 1")
    if sampler == "cmaes":
        if spec.multi_objective:
            raise NbglmError("search.sampler = cmaes optimises one objective: use nsga2 or tpe for several")
        if importlib.util.find_spec("cmaes") is None:
            raise NbglmError("search.sampler = cmaes needs the cmaes package: pip install 'nbglm[cmaes]'")
    if spec.search.warm_start is not None:
        warm_start_rows(spec)
    for name in spec.callbacks:
        if name not in CALLBACKS:
            raise NbglmError(f"callbacks: {name!r} is unknown: expected one of {', '.join(CALLBACKS)}")
        if importlib.util.find_spec(name) is None:
            raise NbglmError(f"callbacks: {name} needs the {name} package: pip install 'nbglm[{name}]'")


def warm_start_rows(spec: SweepSpec) -> list[dict[str, str]]:
    """The finished configs (configs.csv rows, status ok) of the sweep `search.warm_start` names;
    a directory that is not a sweep, or one over another space, is one line."""
    import csv

    where = Path(str(spec.search.warm_start)).expanduser().resolve()
    saved, configs = where / "sweep.yaml", where / "results" / "configs.csv"
    if not saved.is_file() or not configs.is_file():
        raise NbglmError(f"search.warm_start: {where} is not a sweep directory (no sweep.yaml and results/configs.csv)")
    old_space = ((yaml.safe_load(saved.read_text()) or {}).get("spec") or {}).get("search", {}).get("space")
    if old_space != spec.raw.get("search", {}).get("space"):
        raise NbglmError(f"search.warm_start: {where} searched another space; warm start needs the same "
                         "search.space (keys, types, bounds and choices)")
    with configs.open() as f:
        return [row for row in csv.DictReader(f) if row.get("status") == "ok"]
