"""The metric registry: every metric nbglm reports is registered here once, with its profile, the
direction that is better, its best value and a one-line description.

It is the only list of metric names: the metric computations, sweep spec validation, the export,
TensorBoard, the report and the scripts all read it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from nbglm.errors import NbglmError


@dataclass(frozen=True)
class Metric:
    name: str
    profile: str  # the scoring suite it belongs to, e.g. vcc2025
    direction: Literal["max", "min"]
    best: float  # the value of a perfect prediction
    title: str  # short name for tables and figure titles
    description: str  # a few words with the scale or units: "{title} ({description})" labels an axis
    compute: Callable[..., Any] | None = None  # per-perturbation (pred, real) -> MetricResult; None: aggregate
    # or computed jointly with its profile's other members
    path: tuple[str, ...] = ()  # where the value sits in an evaluation result; () = the top-level key `name`

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "max" else "↓"

    @property
    def label(self) -> str:
        return f"{self.title} ({self.description})"

    def sign(self) -> int:
        """+1 when larger is better, -1 when smaller is."""
        return 1 if self.direction == "max" else -1

    def value(self, result: dict[str, Any]) -> Any:
        """This metric's value (None when absent) in an evaluation result, where a profile may nest
        its members (`path`), or in a flat {name: value} record such as a sweep unit's."""
        if self.name in result:
            return result[self.name]
        node: Any = result
        for key in self.path:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node if self.path else None


METRICS: dict[str, Metric] = {}


def register(metric: Metric) -> Metric:
    if metric.name in METRICS:
        raise ValueError(f"metric {metric.name!r} is registered twice")
    METRICS[metric.name] = metric
    return metric


def metric(name: str, profile: str, direction: Literal["max", "min"], best: float, title: str,
           description: str) -> Callable[[Callable], Callable]:
    """Decorator: register the per-perturbation function under `name`."""
    def wrap(fn: Callable) -> Callable:
        register(Metric(name, profile, direction, best, title, description, fn))
        return fn
    return wrap


def profile_metrics(profile: str = "vcc2025") -> list[Metric]:
    """The metrics of one profile, in registration order (the aggregate score first)."""
    found = [m for m in METRICS.values() if m.profile == profile]
    if not found:
        raise NbglmError(f"unknown metric profile {profile!r}; known: {', '.join(profiles())}")
    return found


def profiles() -> list[str]:
    return list(dict.fromkeys(m.profile for m in METRICS.values()))


def names(profile: str = "vcc2025") -> tuple[str, ...]:
    return tuple(m.name for m in profile_metrics(profile))


def values(result: dict[str, Any], profile: str = "vcc2025") -> dict[str, Any]:
    """{name: value} of a profile's metrics in one evaluation result, in registry order."""
    return {m.name: m.value(result) for m in profile_metrics(profile)}


def get(name: str) -> Metric:
    """The registered metric `name`, or a one-line error listing the known ones."""
    if name not in METRICS:
        raise NbglmError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]
