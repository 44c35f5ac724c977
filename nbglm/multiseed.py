"""`multi_seed` mode: one experiment per seed, run in parallel as Ray tasks, then aggregated.

Each seed is a *seed unit*: `run_experiment` for that seed on the shared dataset and DE cache (one
object-store copy each, whatever the number of seeds), writing its own sub-bundle `seed_{seed}/`,
with `pipeline.resources` (fractional GPU allowed). A unit is a streaming-generator task: it yields
per-epoch progress while it trains and its record last, which is how the sweep trainable, reusing
the same unit, reports live loss. A seed that crashes becomes a `failed` record carrying its error;
the other seeds still finish, and the caller decides the exit code from `failed_seeds`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import statistics
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from nbglm import atomic
from nbglm.config import Config, to_yaml
from nbglm.data import Dataset, load_dataset
from nbglm.errors import NbglmError
from nbglm.pipeline import ExperimentResult, check_mode_inputs, run_experiment, with_seed
from nbglm.sweep.cluster import ray_session, unit_resources

log = logging.getLogger("nbglm")

METRICS = ("overall_score", "des", "pds", "mae")
_EVALUATING = {"train_sample_eval", "sample_eval", "evaluate_only"}


@dataclass
class MultiSeedResult(ExperimentResult):
    per_seed: list[dict] = field(default_factory=list)  # one record per seed, in cfg.pipeline.seeds order
    summary: dict[str, dict] = field(default_factory=dict)  # metric -> mean/std/min/max/n over ok seeds


def one_line(exc: BaseException) -> str:
    """An exception as the single line a results table can hold."""
    text = str(exc) if isinstance(exc, NbglmError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def _unit(cfg: Config, seed: int, data: Dataset | None, de_cache: Any, bundle_dir: str) -> Iterator[tuple]:
    """Run one seed; yield ("epoch", seed, epoch, {'loss', 'lr'}) per epoch, then ("done", seed, record).

    The experiment runs in a thread so the generator can hand epochs to the caller while it trains.
    """
    ctx = ray.get_runtime_context()
    record: dict[str, Any] = {
        "seed": seed, "status": "ok", "error": None, **{m: None for m in METRICS},
        "wall_s": None, "start": time.time(), "end": None, "node_id": ctx.get_node_id(),
        "gpu_ids": [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])], "pid": os.getpid(),
        "bundle": bundle_dir,
    }
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            if seed in cfg.debug.fail_seeds:
                raise RuntimeError(f"debug.fail_seeds: injected failure of seed {seed}")
            result = run_experiment(with_seed(cfg, seed), data, bundle_dir=Path(bundle_dir), de_cache=de_cache,
                                    on_epoch_end=lambda epoch, m: events.put(("epoch", seed, epoch, dict(m))))
            record.update({m: result.metrics.get(m) for m in METRICS}, timings=result.timings)
            if not cfg.pipeline.keep_preds:
                shutil.rmtree(result.bundle / "preds", ignore_errors=True)
        except Exception as exc:
            record.update(status="failed", error=one_line(exc))
            atomic.write_text(Path(bundle_dir) / "logs" / "error.txt", traceback.format_exc())
        finally:
            record["end"] = time.time()
            record["wall_s"] = record["end"] - record["start"]
            events.put(("done", seed, record))

    threading.Thread(target=work, name=f"seed-{seed}", daemon=True).start()
    while True:
        item = events.get()
        yield item
        if item[0] == "done":
            return


seed_unit = ray.remote(_unit)


def launch_unit(cfg: Config, seed: int, data_ref: Any, de_cache_ref: Any, bundle_dir: Path, *,
                cpu: float, gpu: float, scheduling_strategy: Any = None) -> Any:
    """Start one seed unit as a Ray task; returns its ObjectRefGenerator."""
    options: dict[str, Any] = {"num_cpus": cpu, "num_gpus": gpu}
    if scheduling_strategy is not None:
        options["scheduling_strategy"] = scheduling_strategy
    return seed_unit.options(**options).remote(cfg, seed, data_ref, de_cache_ref, str(bundle_dir))


def failed_record(seed: int, exc: BaseException, bundle_dir: Path) -> dict:
    """The record of a unit whose worker or node died (Ray has already retried it)."""
    return {"seed": seed, "status": "failed", "error": one_line(exc), **{m: None for m in METRICS},
            "wall_s": None, "start": None, "end": None, "node_id": None, "gpu_ids": [], "pid": None,
            "bundle": str(bundle_dir)}


class UnitPool:
    """Seed units in flight; `poll` hands back what they yielded (epochs, then one final record)."""

    def __init__(self) -> None:
        self._live: dict[Any, tuple[int, Path]] = {}  # ObjectRefGenerator -> (seed, bundle dir)

    def __len__(self) -> int:
        return len(self._live)

    def submit(self, seed: int, bundle_dir: Path, generator: Any) -> None:
        self._live[generator] = (seed, bundle_dir)

    def poll(self, timeout: float) -> list[tuple]:
        """Events from every unit with news, waiting at most `timeout` seconds for the first."""
        live = list(self._live)
        if not live:
            return []
        ready, _ = ray.wait(live, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(live, num_returns=len(live), timeout=0)
        events = []
        for gen in ready:
            seed, bundle_dir = self._live[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                del self._live[gen]
                continue
            except Exception as exc:  # the task itself failed: worker or node lost
                item = ("done", seed, failed_record(seed, exc, bundle_dir))
            if item[0] == "done":
                del self._live[gen]
            events.append(item)
        return events


def seed_stats(records: list[dict], metrics: tuple[str, ...] = METRICS) -> dict[str, dict]:
    """mean/std/min/max (std: sample, n-1; null below 2 seeds) of each metric over the ok seeds."""
    out = {}
    for m in metrics:
        vals = [float(r[m]) for r in records if r["status"] == "ok" and r.get(m) is not None
                and math.isfinite(float(r[m]))]
        out[m] = {
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
            "n": len(vals),
        }
    return out


def shared_inputs(cfg: Config, data: Dataset | None) -> tuple[Dataset, Any]:
    """The dataset and, when the runs evaluate, the ground-truth DE cache: built once, shared by all."""
    if data is None:
        data = load_dataset(cfg)
    if cfg.pipeline.mode not in _EVALUATING or data.test is None:
        return data, None
    from nbglm.metrics import load_de_cache
    from nbglm.metrics.de_cache import build_de_cache

    if cfg.evaluate.de_cache:
        return data, load_de_cache(cfg.evaluate.de_cache)
    return data, build_de_cache(data.test, train=data.train, pert_col=data.pert_col, control=data.control)


def run_multi_seed(cfg: Config, data: Dataset | None = None, *, bundle_dir: Path,
                   address: str | None = None) -> MultiSeedResult:
    """Run every seed of `cfg.pipeline.seeds` in parallel on Ray and write the aggregated metrics."""
    ps = cfg.pipeline
    if ps.multi_seed_base_mode == "multi_seed":
        raise NbglmError("pipeline.multi_seed_base_mode cannot be multi_seed; use e.g. train_sample_eval")
    base = replace(cfg, pipeline=replace(ps, mode=ps.multi_seed_base_mode))
    check_mode_inputs(base)
    bundle = Path(bundle_dir).resolve()
    bundle.mkdir(parents=True, exist_ok=True)
    atomic.write_text(bundle / "config.yaml", to_yaml(cfg))
    t0 = time.perf_counter()
    data, de_cache = shared_inputs(base, data)
    records: dict[int, dict] = {}
    with ray_session(address or ps.address):
        cpu, gpu = unit_resources(ps.resources.cpu, ps.resources.gpu)
        data_ref = ray.put(data)
        cache_ref = ray.put(de_cache) if de_cache is not None else None
        pending, pool = list(ps.seeds), UnitPool()
        limit = ps.max_workers or len(pending)
        while pending or len(pool):
            while pending and len(pool) < limit:
                seed = pending.pop(0)
                unit_dir = bundle / f"seed_{seed}"
                pool.submit(seed, unit_dir, launch_unit(base, seed, data_ref, cache_ref, unit_dir, cpu=cpu, gpu=gpu))
            for event in pool.poll(timeout=1.0):
                if event[0] == "done":
                    rec = records[event[1]] = event[2]
                    log.info("seed %d %s%s", rec["seed"], rec["status"],
                             f": {rec['error']}" if rec["error"] else f" overall={rec['overall_score']}")
    per_seed = [records[s] for s in ps.seeds]
    summary = seed_stats(per_seed)
    failed = [r["seed"] for r in per_seed if r["status"] != "ok"]
    total_s = time.perf_counter() - t0
    atomic.write_json(bundle / "metrics" / "multi_seed_metrics.json", {
        "seeds": list(ps.seeds), "base_mode": ps.multi_seed_base_mode, "n_ok": len(per_seed) - len(failed),
        "failed_seeds": failed, "summary": summary, "per_seed": per_seed, "total_s": total_s,
    })
    means = {m: s["mean"] for m, s in summary.items()} if summary["overall_score"]["n"] else {}
    return MultiSeedResult(metrics=means, bundle=bundle, timings={"total_s": total_s}, seed=cfg.experiment.seed,
                           failed_seeds=failed, per_seed=per_seed, summary=summary)
