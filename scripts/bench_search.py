"""Benchmark ASHA early stopping: the same sweep spec with and without `early_stopping`, one after
the other on a local Ray, side by side.

    python scripts/bench_search.py [--configs 12] [--min-epochs 2] [--reduction-factor 3] [--set KEY=VALUE ...]

Both sweeps use the random sampler with one seed, so they evaluate the same configs in the same
order and differ only in what ASHA stops. Printed per sweep: the best cross-validated score found,
the unit-epochs spent (epochs trained, summed over every fold x seed unit), and the unit-epochs
spent by the time a config within TOLERANCE of the full sweep's best had finished (every epoch of
every unit that ended by then, from the per-epoch end times in the unit records). Then the
validation signal's Spearman correlation with the final metric across the full sweep's configs, at
ASHA's first rung and at the last epoch: how well the signal ASHA reads ranks what the sweep chooses.
Everything is cross-validation: the test set is read only by each sweep's refit, and not here.
`--set` takes sweep-spec overrides for both sweeps, e.g. --set overrides.train.epochs=40.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.005

# The built-in synthetic data at the flagship spec's size; 20 epochs; 2 folds x 1 seed per config,
# one config at a time so its two units run side by side on the 2 cores: a config reports an epoch
# once all its units passed it, so units queued behind another config's would train on unchecked.
DEFAULTS = [
    "search.sampler=random", "search.seed=0", "seeds=[1]", "selection.folds=2", "max_concurrent=1",
    "resources.cpu=1", "resources.gpu=0", "overrides.train.epochs=20",
]


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _records(sweep_dir: Path) -> dict[str, list[dict]]:
    """Every unit record of every config, by trial id."""
    return {d.name.removeprefix("config_"): [json.loads(p.read_text()) for p in sorted((d / "units").glob("*.json"))]
            for d in sorted(sweep_dir.glob("config_*"))}


def _figures(sweep_dir: Path, target: float | None) -> dict:
    """Best CV score, unit-epochs spent, and unit-epochs spent until a config reached `target`."""
    configs = _csv(sweep_dir / "results" / "configs.csv")
    records = _records(sweep_dir)
    epoch_ends = sorted(e["t"] for recs in records.values() for r in recs for e in r["history"])
    done = sorted((max(r["end"] for r in records[c["trial_id"]]), float(c["overall_score_mean"]))
                  for c in configs if c["status"] == "ok")
    best = max((s for _, s in done), default=math.nan)
    reach = next((t for t, s in done if target is not None and s >= target - TOLERANCE), None)
    return {
        "configs": len(configs),
        "stopped": sum(c["status"] == "stopped" for c in configs),
        "best": best,
        "unit_epochs": len(epoch_ends),
        "unit_epochs_to_best": None if reach is None else sum(t <= reach for t in epoch_ends),
    }


def _spearman(sweep_dir: Path, epoch: int, best_so_far: bool) -> tuple[float, int]:
    """Spearman correlation across configs of the signal at `epoch` (mean over units of -val_nll, or of
    -the lowest val_nll up to `epoch`: what ASHA reads) with the CV score."""
    from scipy.stats import spearmanr

    records = _records(sweep_dir)
    pairs = []
    for c in _csv(sweep_dir / "results" / "configs.csv"):
        vals = []
        for r in records[c["trial_id"]]:
            seen = [e["val_nll"] for e in r["history"] if e["epoch"] <= epoch and e.get("val_nll") is not None]
            if len(seen) == epoch:
                vals.append(min(seen) if best_so_far else seen[-1])
        if c["status"] == "ok" and vals:
            pairs.append((-sum(vals) / len(vals), float(c["overall_score_mean"])))
    rho = spearmanr(*zip(*pairs)).statistic if len(pairs) >= 3 else math.nan
    return float(rho), len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=12)
    parser.add_argument("--spec", default=str(ROOT / "sweeps" / "rank_search.yaml"))
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--min-epochs", type=int, default=2, help="ASHA's first rung (default: %(default)s)")
    parser.add_argument("--reduction-factor", type=float, default=3, help="ASHA's reduction factor (default: %(default)s)")
    args = parser.parse_args()
    asha = f"early_stopping={{type: asha, min_epochs: {args.min_epochs}, reduction_factor: {args.reduction_factor:g}}}"

    import ray

    from nbglm.sweep.runner import run_sweep
    from nbglm.sweep.space import load_spec

    out = Path(tempfile.mkdtemp(prefix="bench_search_"))
    common = [*DEFAULTS, f"search.num_samples={args.configs}", *args.sets]
    spec = load_spec(args.spec, [*common, asha])
    epochs = spec.resolve_base().train.epochs
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    walls = {}
    for name, extra in (("full", []), ("asha", [asha])):
        t0 = time.perf_counter()
        run_sweep(args.spec, sets=[*common, *extra, f"storage_path={out}", f"name={name}"])
        walls[name] = time.perf_counter() - t0
    full = _figures(out / "full", None)
    rows = {"full": _figures(out / "full", full["best"]), "asha": _figures(out / "asha", full["best"])}
    es = spec.early_stopping
    print(f"\nbench_search: {args.configs} configs (random sampler, seed 0) x {spec.selection.folds} folds x "
          f"{len(spec.seeds)} seed(s), {epochs} epochs; ASHA min_epochs={es.min_epochs} "
          f"reduction_factor={es.reduction_factor:g}; results in {out}")
    print(f"{'':32}{'full':>12}{'asha':>12}")
    lines = [("configs stopped early", "stopped", "{}"), ("best CV overall_score", "best", "{:.4f}"),
             ("unit-epochs spent", "unit_epochs", "{}"),
             (f"unit-epochs to reach full best-{TOLERANCE}", "unit_epochs_to_best", "{}")]
    for label, key, fmt in lines:
        cells = ["never" if rows[n][key] is None else fmt.format(rows[n][key]) for n in ("full", "asha")]
        print(f"{label:32}{cells[0]:>12}{cells[1]:>12}")
    print(f"{'wall s (sweep + refit)':32}{walls['full']:>12.0f}{walls['asha']:>12.0f}")
    asha, full_row = rows["asha"], rows["full"]
    share = asha["unit_epochs"] / full_row["unit_epochs"]
    met = asha["best"] >= full_row["best"] - TOLERANCE and share <= 0.5
    print(f"ASHA: best {asha['best'] - full_row['best']:+.4f} vs full, {share:.0%} of the unit-epochs; target "
          f"(within {TOLERANCE}, <= 50%): {'met' if met else 'not met'}")
    rungs = [es.min_epochs]
    while rungs[-1] * es.reduction_factor < epochs:
        rungs.append(int(rungs[-1] * es.reduction_factor))
    print(f"Spearman correlation with the CV overall_score across the full sweep's configs, at ASHA's rungs "
          f"{rungs} and the last epoch:")
    for epoch in (*rungs, epochs):
        (raw, n), (best, _) = _spearman(out / "full", epoch, False), _spearman(out / "full", epoch, True)
        print(f"  epoch {epoch:>3}: -val_nll {raw:+.3f}   -val_nll_best (ASHA's signal) {best:+.3f}   ({n} configs)")
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), {os.cpu_count()} CPUs", flush=True)


if __name__ == "__main__":
    main()
