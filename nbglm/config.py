"""Typed experiment config: dataclass defaults <- YAML file <- dotted `--set key=value` overrides.

Every command resolves its config through `load_config`, so the same validation applies
everywhere and the resolved config (`to_dict`) is exactly what a run saves next to its outputs.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nbglm.config_rules import AGREE, RANGES
from nbglm.errors import NbglmError

Activation = Literal["relu", "gelu", "silu", "tanh", "identity"]
Norm = Literal["none", "batchnorm", "layernorm"]
Loss = Literal["nb_nll", "nb_deviance", "poisson_deviance", "poisson_nll", "mse_log1p"]
Mode = Literal["train_sample_eval", "train_sample", "sample_eval", "sample", "evaluate_only", "multi_seed"]
PhaseStrategy = Literal["ignore", "global", "control", "fixed_G1", "fixed_S", "fixed_G2M"]


@dataclass
class ExperimentConfig:
    name: str = "nbglm"
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class PathsConfig:
    """Input files; all empty means: use the built-in synthetic dataset."""

    train_h5ad: str | None = None
    train_split_h5ad: str | None = None
    test_h5ad: str | None = None
    val_list_csv: str | None = None
    gene_embedding: str | None = None
    pert_embedding: str | None = None
    outputs_root: str = "outputs"
    pred_h5ad: str | None = None


@dataclass
class SyntheticConfig:
    """Size and seed of the built-in dataset (used when no train_h5ad is given)."""

    seed: int = 0
    n_genes: int = 2000
    n_train_perts: int = 120
    n_test_perts: int = 30
    cells_per_pert: int = 100
    n_control: int = 1500


@dataclass
class DataConfig:
    pert_name_col: str = "target_gene"
    control_name: str = "non-targeting"
    use_split: bool = False  # train on paths.train_split_h5ad instead of paths.train_h5ad
    phase_column: str | None = "phase"
    normalize_embeddings: bool = True  # row-wise L2 normalisation of G and P
    derived_embedding_dim: int = 64  # PCA dimension when embeddings are derived from the data
    # Principal components of the training perturbations' pseudobulk effects appended to every
    # gene's embedding (0 = off): how each gene has responded, which a prior embedding lacks.
    effect_pcs: int = 32
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class LossConfig:
    primary: Loss = "nb_nll"


@dataclass
class RegularizationConfig:
    l1: float = 0.0
    l2: float = 0.0


@dataclass
class ModelConfig:
    name: Literal["lowrank_nb_glm", "linear", "cell_mean", "control"] = "lowrank_nb_glm"
    rank: int | None = 16  # None = full-rank kernel K
    g_mlp_hidden: list[int] = field(default_factory=lambda: [384])
    g_out_dim: int = 192
    p_mlp_hidden: list[int] = field(default_factory=lambda: [384])
    p_out_dim: int = 192
    gp_activation: Activation = "gelu"
    gp_norm: Norm = "layernorm"
    gp_dropout: float = 0.1
    alpha_init: float = 2.0
    use_cycle: bool = False
    learn_theta: bool = False
    theta_min: float = 0.01
    theta_max: float = 1000.0
    ridge_lambda: float = 1.0  # only for model.name=linear
    losses: LossConfig = field(default_factory=LossConfig)
    regularization: RegularizationConfig = field(default_factory=RegularizationConfig)


@dataclass
class LrScheduleConfig:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_frac: float = 0.05
    min_lr: float = 1e-5


@dataclass
class TrainConfig:
    fit_mode: Literal["concise", "whole"] = "concise"
    epochs: int = 50
    steps_per_epoch: int = 20  # concise mode: full-batch steps over the pseudobulks per epoch
    batch_size: int = 2048
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    lr_schedule: LrScheduleConfig = field(default_factory=LrScheduleConfig)


@dataclass
class SizeFactorConfig:
    use_sf: bool = True


@dataclass
class GammaHeterogeneityConfig:
    enable: bool = False
    r0: float = 50.0


@dataclass
class SamplingConfig:
    sampler: Literal["nb", "poisson", "gp_mixture"] = "poisson"
    # Control cells of pred.h5ad: `real` ones, or `model` ones drawn like the predicted cells (zero
    # effect), so sampler noise and its log1p bias cancel when the metrics compare the two.
    control_cells: Literal["real", "model"] = "model"
    n_cells_default: int = 100
    median_umi_default: float | None = None  # None = median UMI of the control cells
    library_size_cv: float = 0.3  # spread of drawn library sizes around the median (log-normal)
    phase_strategy: PhaseStrategy = "ignore"
    batch_cells: int = 256  # cells drawn at once: ~20 B x batch_cells x genes (90 MB at 18,080 genes)
    gamma_heterogeneity: GammaHeterogeneityConfig = field(default_factory=GammaHeterogeneityConfig)


@dataclass
class EvaluateConfig:
    de_cache: str | None = None  # directory from `nbglm build-de-cache`; None = compute per run
    # metric profile (nbglm.metrics.registry): vcc2025 = DES/PDS/MAE (cell-eval 0.8); vcc2026 = the six
    # cell-eval2 0.20 members scaled between baseline and replicate, on raw counts (no baseline models)
    profile: Literal["vcc2025", "vcc2026"] = "vcc2025"


@dataclass
class ResourcesConfig:
    cpu: float = 1.0
    gpu: float = 0.0


@dataclass
class PipelineConfig:
    mode: Mode = "train_sample_eval"
    pretrained_ckpt: str | None = None
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    multi_seed_base_mode: Mode = "train_sample_eval"
    max_workers: int | None = None
    keep_preds: bool = True
    address: str | None = None  # Ray address for multi_seed; None starts a local Ray
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)


@dataclass
class Config:
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    size_factor: SizeFactorConfig = field(default_factory=SizeFactorConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


def _describe(tp: Any) -> str:
    """Human-readable name of an annotation, for error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise NbglmError naming the key, the value and what is allowed."""
    origin = typing.get_origin(tp)
    bad = NbglmError(f"config key '{key}' = {value!r} is invalid: expected {_describe(tp)}")
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except NbglmError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _floats(value: Any) -> list[float]:
    """The floats of a coerced leaf value (a float, or a list of them)."""
    items = value if isinstance(value, list) else [value]
    return [v for v in items if isinstance(v, float)]


def _from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (partial) dict, rejecting unknown keys with a suggestion."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise NbglmError(f"config section '{prefix}' must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
            raise NbglmError(f"unknown config key '{full}'{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
        if not all(math.isfinite(v) for v in _floats(kwargs[key])):
            raise NbglmError(f"config key '{full}' = {value!r} is invalid: expected a finite number (no inf or nan)")
        if full in RANGES and not RANGES[full][0](kwargs[key]):
            raise NbglmError(f"config key '{full}' = {value!r} is invalid: expected {RANGES[full][1]}")
    return cls(**kwargs)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the config (used to validate sweep search spaces)."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        full = f"{prefix}{f.name}"
        keys.extend(all_keys(tp, full + ".") if dataclasses.is_dataclass(tp) else [full])
    return keys


def parse_override(item: str) -> tuple[str, Any]:
    """Split one `key=value` override; the value is parsed as YAML (`[256,128]`, `null`, `1e-3`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise NbglmError(f"bad --set '{item}': expected KEY=VALUE, e.g. --set model.rank=16")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise NbglmError(f"bad --set '{item}': the value is not valid YAML") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `raw[a][b][c] = value` for key 'a.b.c', creating sections as needed."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise NbglmError(f"cannot set '{key}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with one-line errors for a missing file or bad syntax."""
    p = Path(path)
    if not p.is_file():
        raise NbglmError(f"config file not found: {p} (check the path)")
    try:
        raw = yaml.safe_load(p.read_text())
    except UnicodeDecodeError:
        raise NbglmError(f"config file {p} is not text (not UTF-8); give a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise NbglmError(f"config file {p} is not valid YAML{where}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise NbglmError(f"config file {p} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def from_dict(raw: dict, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve a config from a raw mapping plus `key=value` overrides."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy of plain data
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    cfg = _from_dict(Config, raw)
    for agree, message in AGREE:
        if not agree(cfg):
            raise NbglmError(message(cfg))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Resolve the config every command runs with: defaults <- YAML file <- overrides."""
    return from_dict(read_yaml(path) if path else {}, overrides)


def available_memory() -> int:
    """Bytes this process can still allocate without swapping: MemAvailable of /proc/meminfo,
    else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(nbytes: float, what: str, knob: str) -> None:
    """Refuse, before any work, an allocation larger than the memory available: a one-line error
    naming the knob, instead of a traceback (or the OOM killer) minutes later."""
    free = available_memory()
    if nbytes > free:
        raise NbglmError(f"{what} needs about {nbytes / 1e9:.3g} GB but {free / 1e9:.3g} GB of memory is "
                         f"available: lower {knob}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
