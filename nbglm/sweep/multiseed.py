"""`multi_seed` mode: one experiment per seed, run in parallel as Ray tasks, then aggregated.

`nbglm run --set pipeline.mode=multi_seed` lands here: several seeds at once are Ray work, so they
live in the sweep layer, above the one-experiment pipeline.

Each seed is a seed unit (`nbglm.sweep.units`, the same unit a sweep trial runs per seed) with
`pipeline.resources`, at most `pipeline.max_workers` in flight, on one object-store copy of the
dataset and DE cache, writing its sub-bundle `seed_{seed}/`. A seed that crashes is reported in
`metrics/multi_seed_metrics.json` with its error while the others finish; the caller decides the
exit code from `failed_seeds`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import ray

from nbglm import atomic
from nbglm.config import Config, to_yaml
from nbglm.data import Dataset
from nbglm.errors import NbglmError
from nbglm.pipeline import check_mode_inputs, check_sizes, load_inputs
from nbglm.sweep.cluster import CONNECT_TIMEOUT_S, check_address, ray_session, unit_resources
from nbglm.metrics import names
from nbglm.sweep.units import UnitPool, injected_faults, unit_stats

log = logging.getLogger("nbglm")


@dataclass
class MultiSeedResult:
    metrics: dict[str, float]  # seed means over the ok seeds; {} when none scored
    bundle: Path
    total_s: float
    failed_seeds: list[int]
    per_seed: list[dict]  # one record per seed, in cfg.pipeline.seeds order
    summary: dict[str, dict]  # metric -> mean/std/min/max/n over ok seeds


def run_multi_seed(cfg: Config, data: Dataset | None = None, *, bundle_dir: Path,
                   address: str | None = None, connect_timeout: float = CONNECT_TIMEOUT_S) -> MultiSeedResult:
    """Run every seed of `cfg.pipeline.seeds` in parallel on Ray and write the aggregated metrics."""
    ps = cfg.pipeline
    if ps.multi_seed_base_mode == "multi_seed":
        raise NbglmError("pipeline.multi_seed_base_mode cannot be multi_seed; use e.g. train_sample_eval")
    base = replace(cfg, pipeline=replace(ps, mode=ps.multi_seed_base_mode))
    check_mode_inputs(base)
    if address or ps.address:
        check_address(address or ps.address, connect_timeout)  # before the data is read
    bundle = Path(bundle_dir).resolve()
    t0 = time.perf_counter()
    data, de_cache = load_inputs(base, data)
    check_sizes(base, data)
    metrics = names(base.evaluate.profile)
    records: dict[int, dict] = {}
    limit = min(ps.max_workers or len(ps.seeds), len(ps.seeds))
    with ray_session(address or ps.address, units=limit, timeout=connect_timeout):
        cpu, gpu = unit_resources(ps.resources.cpu, ps.resources.gpu)
        atomic.check_new_output(bundle)  # created once the inputs and Ray are there
        bundle.mkdir(parents=True, exist_ok=True)
        atomic.write_text(bundle / "config.yaml", to_yaml(cfg))
        try:
            _run_seeds(base, bundle, records, limit, cpu, gpu, data, de_cache)
        except BaseException as exc:
            atomic.mark_failed(bundle, f"{type(exc).__name__}: {exc}")
            raise
    per_seed = [records[s] for s in ps.seeds]
    summary = unit_stats(per_seed, metrics)
    failed = [r["seed"] for r in per_seed if r["status"] != "ok"]
    total_s = time.perf_counter() - t0
    atomic.write_json(bundle / "metrics" / "multi_seed_metrics.json", {
        "seeds": list(ps.seeds), "base_mode": ps.multi_seed_base_mode, "n_ok": len(per_seed) - len(failed),
        "failed_seeds": failed, "summary": summary, "per_seed": per_seed, "total_s": total_s,
    })
    means = {m: s["mean"] for m, s in summary.items()} if summary[metrics[0]]["n"] else {}
    return MultiSeedResult(metrics=means, bundle=bundle, total_s=total_s, failed_seeds=failed, per_seed=per_seed,
                           summary=summary)


def _run_seeds(base: Config, bundle: Path, records: dict[int, dict], limit: int, cpu: float, gpu: float,
               data: Dataset, de_cache: object) -> None:
    """Run every seed of `base` as a unit, at most `limit` at once, filling `records` by seed."""
    score = names(base.evaluate.profile)[0]
    data_ref = ray.put(data)
    cache_ref = ray.put(de_cache) if de_cache is not None else None
    pending, pool = list(base.pipeline.seeds), UnitPool(cpu, gpu, injected_faults())
    while pending or len(pool):
        while pending and len(pool) < limit:
            seed = pending.pop(0)
            pool.submit(base, seed, None, data_ref, cache_ref, bundle / f"seed_{seed}")
        for event in pool.poll(timeout=1.0):
            if event[0] == "done":
                rec = records[event[2]["seed"]] = event[2]
                log.info("seed %d %s%s", rec["seed"], rec["status"],
                         f": {rec['error']}" if rec["error"] else f" {score}={rec[score]}")
