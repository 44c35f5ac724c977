"""Honest selection on the built-in data: the flagship sweep chooses a config by cross-validation,
and the chosen config, the default config, `linear` and `cell_mean` go through the same folds and
the same refit, each scored once on the held-out test perturbations.

    python scripts/honest_table.py                     # sweeps/rank_search.yaml, seeds 1 2 3
    python scripts/honest_table.py --set search.num_samples=16

Prints a Markdown table: CV score (mean ± std over folds x seeds), test score of the refit (mean ±
std over seeds) and CV - test, for the spec's metric and the three VCC metrics.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import pandas as pd

from nbglm.config import Config
from nbglm.data.load import assemble, read_inputs
from nbglm.metrics import names
from nbglm.pipeline import load_inputs, run_experiment, with_seed
from nbglm.sweep.folds import build_fold
from nbglm.sweep.runner import run_sweep
from nbglm.sweep.space import load_spec

ROOT = Path(__file__).resolve().parents[1]
METRICS = names()


def _pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def cv_and_test(cfg: Config, folds: pd.DataFrame, seeds: list[int], work: Path) -> dict[str, list[dict]]:
    """Every (fold, seed) unit and every refit seed of `cfg`, as the sweep runs them."""
    inputs = read_inputs(cfg)
    built = [build_fold(cfg, replace(inputs, test=None), folds, f) for f in range(int(folds["fold"].max()) + 1)]
    full = load_inputs(cfg, assemble(cfg, inputs))
    runs: dict[str, list[dict]] = {"cv": [], "test": []}
    for seed in seeds:
        for fold, (data, cache) in enumerate(built):
            runs["cv"].append(run_experiment(with_seed(cfg, seed), data, de_cache=cache,
                                             bundle_dir=work / f"fold_{fold}_seed_{seed}").metrics)
        runs["test"].append(run_experiment(with_seed(cfg, seed), full[0], de_cache=full[1],
                                           bundle_dir=work / f"refit_seed_{seed}").metrics)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "sweeps" / "rank_search.yaml"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="honest_") as tmp:
        work = Path(tmp)
        sets = [f"seeds={args.seeds}", f"storage_path={work}", *args.sets]
        spec = load_spec(args.spec, sets)
        result = run_sweep(args.spec, sets=sets)
        final = json.loads((result.sweep_dir / "final" / "summary.json").read_text())
        folds = pd.read_csv(result.sweep_dir / "folds.csv", dtype={"label": str})
        base = spec.resolve_base()
        chosen = final["configs"][0]
        rows = {f"selected by CV ({chosen['trial_id']})": {
            "cv": [json.loads((result.sweep_dir / f"config_{chosen['trial_id']}" / "units" /
                               f"fold_{f}_seed_{s}.json").read_text()) for f, s in spec.units()],
            "test": chosen["units"]}}
        for label, model in (("default config", base.model.name), ("linear", "linear"), ("cell_mean", "cell_mean")):
            cfg = replace(base, model=replace(base.model, name=model))
            rows[label] = cv_and_test(cfg, folds, args.seeds, work / label.replace(" ", "_"))
        print(f"\n{spec.name}: {spec.selection.folds} folds x seeds {args.seeds}, {spec.search.num_samples} configs\n")
        print("| model | " + " | ".join(f"CV {m} | test {m}" for m in METRICS) + f" | CV - test ({METRICS[0]}) |")
        print("|---|" + "---|---|" * len(METRICS) + "---|")
        for label, runs in rows.items():
            cells = [f"{_pm([r[m] for r in runs['cv']])} | {_pm([r[m] for r in runs['test']])}" for m in METRICS]
            gap = (statistics.fmean(r[METRICS[0]] for r in runs["cv"])
                   - statistics.fmean(r[METRICS[0]] for r in runs["test"]))
            print(f"| {label} | " + " | ".join(cells) + f" | {gap:+.3f} |", flush=True)


if __name__ == "__main__":
    main()
