"""The search space of a sweep spec: one `Param` per dotted config key, parsed with one-line errors.

Categorical choices may be lists (MLP depth and width in one knob: `[[], [128], [256, 128]]`).
Optuna and TensorBoard's HParams only take scalar choices, so a list choice travels through the
searcher as its YAML flow label (`"[256, 128]"`) and is decoded back when the config is built.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from nbglm.errors import NbglmError

# Keys a sampled config cannot change: the data files and labels the folds were cut from, the modes
# and seeds the sweep itself sets, where results go.
FIXED_KEYS = ("paths.", "pipeline.", "experiment.", "evaluate.", "data.pert_name_col", "data.control_name",
              "data.use_split", "data.synthetic.")



@dataclass(frozen=True)
class Param:
    """One search-space entry over a dotted config key."""

    key: str
    type: Literal["int", "float", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def labels(self) -> list[Any]:
        """Choices as the searcher sees them: scalars as they are, lists as their YAML label."""
        return [label(c) for c in self.choices]

    def decode(self, value: Any) -> Any:
        """The config value for what the searcher suggested."""
        if self.type == "categorical":
            return dict(zip(self.labels(), self.choices))[value]
        return value

    def distribution(self) -> Any:
        import optuna.distributions as od

        if self.type == "int":
            return od.IntDistribution(int(self.low), int(self.high), log=self.log)
        if self.type == "float":
            return od.FloatDistribution(float(self.low), float(self.high), log=self.log)
        return od.CategoricalDistribution(self.labels())


def label(choice: Any) -> Any:
    return yaml.safe_dump(choice, default_flow_style=True).strip() if isinstance(choice, list) else choice


def suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def parse_param(key: str, raw: Any, config_keys: list[str]) -> Param:
    where = f"search.space['{key}']"
    if key not in config_keys:
        raise NbglmError(f"{where}: '{key}' is not a config key{suggest(key, config_keys)}")
    if key.startswith(FIXED_KEYS):
        raise NbglmError(f"{where}: '{key}' cannot act in a sweep (the data files, labels, folds, modes and seeds "
                         "are fixed for the whole sweep); set it under 'overrides' instead")
    if not isinstance(raw, dict):
        raise NbglmError(f"{where} must be a mapping like {{type: int, low: 2, high: 64, log: true}}")
    allowed = {"type", "low", "high", "log", "choices"}
    for k in raw:
        if k not in allowed:
            raise NbglmError(f"{where}: unknown field '{k}'{suggest(str(k), sorted(allowed))}")
    kind = raw.get("type")
    if kind in ("int", "float"):
        low, high, log = raw.get("low"), raw.get("high"), raw.get("log", False)
        if "choices" in raw:
            raise NbglmError(f"{where}: 'choices' is for type categorical; {kind} takes low and high")
        number = int if kind == "int" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, number) for v in (low, high)):
            raise NbglmError(f"{where}: type {kind} needs {kind} 'low' and 'high', got low={low!r} high={high!r}")
        if not isinstance(log, bool):
            raise NbglmError(f"{where}: 'log' must be true or false, got {log!r}")
        if not low < high:
            raise NbglmError(f"{where}: needs low < high, got low={low} high={high}")
        if log and low <= 0:
            raise NbglmError(f"{where}: a log scale needs low > 0, got low={low}")
        return Param(key, kind, low=low, high=high, log=log)
    if kind == "categorical":
        choices = raw.get("choices")
        if set(raw) - {"type", "choices"}:
            raise NbglmError(f"{where}: type categorical takes only 'choices'")
        if not isinstance(choices, list) or not choices:
            raise NbglmError(f"{where}: type categorical needs a non-empty list 'choices'")
        param = Param(key, "categorical", choices=tuple(choices))
        if len(set(map(str, param.labels()))) != len(choices):
            raise NbglmError(f"{where}: duplicate choices {choices}")
        return param
    raise NbglmError(f"{where}: 'type' must be one of int, float, categorical, got {kind!r}")
