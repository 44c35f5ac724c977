"""Benchmark the sweep machinery: the same N configs x folds x seeds (plus the refit of the best
config on every seed) run (b) as a sweep on a local Ray,
(a) sequentially with `run_experiment` in this process, and (c) with `run_experiment` in as many
plain processes as the sweep runs units at once (no Ray), side by side.

    python scripts/bench_sweep.py [--configs 4] [--set KEY=VALUE ...]

Prints the wall times, the speed-up, and Ray's overhead per seed unit: sweep time x parallelism /
sum of the bare (sequential) unit times, minus 1 -- the fraction of a unit's own run time that the
sweep spends on top of it. Parallelism is what the machine can really run at once: min(CPU cores,
seed units in flight). The same ratio over the span from the first unit's start to the last unit's
end separates the per-trial cost (scheduling, trial hand-over, reporting, cores shared by concurrent
units) from the once-per-sweep start-up (Ray start, Tune set-up, first worker processes). Units
that share a machine slow each other down (caches, memory bandwidth, other tenants of a VM) with or
without Ray, so (c) runs the same units in that many plain processes: (b) / (c) - 1 is what Ray
and Tune themselves cost. The CPU seconds the units burned in each mode are printed too.
`--set` takes sweep-spec overrides, e.g. --set overrides.train.epochs=40.
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The default-sized synthetic dataset and its 50 epochs: one seed unit takes ~20 s on one core.
DEFAULTS = [
    "overrides.data.synthetic.n_genes=2000", "overrides.data.synthetic.n_train_perts=120",
    "overrides.data.synthetic.n_test_perts=30", "overrides.data.synthetic.cells_per_pert=100",
    "overrides.data.synthetic.n_control=1500", "overrides.train.epochs=50", "overrides.sampling.n_cells_default=100",
    "search.sampler=random", "resources.cpu=1", "resources.gpu=0", "max_concurrent=2",
]


_INPUTS: list = []  # (data, de_cache) per fold, then of the refit (all training data), loaded once per process


def _build_inputs(base: dict, folds_csv: str) -> list:
    """Each fold's (data, de_cache) as the sweep builds them, then the refit's on all training data."""
    import pandas as pd

    from nbglm.config import from_dict
    from nbglm.data.load import assemble, read_inputs
    from nbglm.pipeline import load_inputs
    from nbglm.sweep.folds import build_fold

    cfg = from_dict(base)
    inputs, folds = read_inputs(cfg), pd.read_csv(folds_csv, dtype={"label": str})
    n_folds = int(folds["fold"].max()) + 1
    return [build_fold(cfg, inputs, folds, f) for f in range(n_folds)] + [load_inputs(cfg, assemble(cfg, inputs))]


def _load_inputs(base: dict, folds_csv: str, threads: int) -> None:
    import torch

    global _INPUTS
    torch.set_num_threads(threads)
    _INPUTS = _build_inputs(base, folds_csv)


def _bare_unit(experiment: dict, part: int, seed: int, bundle_dir: str) -> tuple[float, float]:
    """One `run_experiment` in a (c) worker on fold `part` (-1: the refit): (wall s, CPU s)."""
    from nbglm.config import from_dict
    from nbglm.pipeline import run_experiment, with_seed

    t_unit, c_unit = time.perf_counter(), time.process_time()
    data, de_cache = _INPUTS[part]
    run_experiment(with_seed(from_dict(experiment), seed), data, de_cache=de_cache, bundle_dir=Path(bundle_dir))
    return time.perf_counter() - t_unit, time.process_time() - c_unit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "sweeps" / "rank_search.yaml"))
    parser.add_argument("--configs", type=int, default=4, help="number of sampled configs (each runs every unit)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for (a); 1 = what each seed unit gets in the sweep (Ray sets "
                             "OMP_NUM_THREADS=1 for fractional-CPU tasks), so (a) gives the bare unit times")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from nbglm.config import from_dict, to_dict
    from nbglm.data.load import read_inputs
    from nbglm.pipeline import run_experiment, with_seed
    from nbglm.sweep import runner
    from nbglm.sweep.aggregate import ranked_rows
    from nbglm.sweep.space import load_spec

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    sets = [*DEFAULTS, f"search.num_samples={args.configs}", "selection.refit_top=1", f"storage_path={work}",
            *args.sets]
    spec = load_spec(args.spec, sets)
    read_inputs(spec.resolve_base())  # warm the synthetic-data cache so neither side pays for creating it

    t0 = time.perf_counter()
    rows = runner.run_sweep(args.spec, sets=sets).rows  # the sweep without its report (not sweep machinery)
    sweep_s = time.perf_counter() - t0

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base = to_dict(spec.resolve_base())
    folds_csv = str(work / spec.name / "folds.csv")
    parts = _build_inputs(base, folds_csv)
    best = ranked_rows(spec, rows)[0]
    jobs = [(row, fold, seed) for row in rows for fold, seed in spec.units()] + [(best, -1, s) for s in spec.seeds]
    bare, bare_cpu = [], 0.0
    for row, part, seed in jobs:
        cfg = from_dict(spec.experiment_dict({k: row[k] for k in spec.space}, base))
        t_unit, c_unit = time.perf_counter(), time.process_time()
        data, de_cache = parts[part]
        run_experiment(with_seed(cfg, seed), data, de_cache=de_cache,
                       bundle_dir=work / "sequential" / row["trial_id"] / f"part_{part}_seed_{seed}")
        bare.append(time.perf_counter() - t_unit)
        bare_cpu += time.process_time() - c_unit
    sequential_s = time.perf_counter() - t0

    units = len(bare)
    in_flight = min(spec.max_concurrent, args.configs) * len(spec.units())
    parallelism = min(os.cpu_count() or 1, in_flight)

    t0 = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(parallelism, mp_context=spawn, initializer=_load_inputs,
                             initargs=(base, folds_csv, args.threads)) as pool:
        futures = [pool.submit(_bare_unit, spec.experiment_dict({k: row[k] for k in spec.space}, base), part, seed,
                               str(work / "processes" / row["trial_id"] / f"part_{part}_seed_{seed}"))
                   for row, part, seed in jobs]
        plain = [future.result() for future in futures]
    processes_s = time.perf_counter() - t0

    overhead = sweep_s * parallelism / sum(bare) - 1
    print(f"\n{args.configs} configs x {spec.selection.folds} folds x {len(spec.seeds)} seeds + {len(spec.seeds)} refit "
          f"units = {units} units; {os.cpu_count()} CPU cores; "
          f"torch threads in (a) and (c): {args.threads}; resources per unit in (b): cpu={spec.resources.cpu:g} "
          f"gpu={spec.resources.gpu:g}")
    print(f"(a) sequential, one process : {sequential_s:7.1f} s  (bare unit mean {sum(bare) / units:.1f} s, "
          f"min {min(bare):.1f}, max {max(bare):.1f})")
    print(f"(c) {parallelism} plain processes    : {processes_s:7.1f} s  (incl. process start and data loading; "
          f"unit mean {sum(w for w, _ in plain) / units:.1f} s while sharing the cores)")
    in_sweep = list(csv.DictReader((work / spec.name / "results" / "trials.csv").open()))
    final = json.loads((work / spec.name / "final" / "summary.json").read_text())
    in_sweep += [record for c in final["configs"] for record in c["units"]]
    span = max(float(r["end"]) for r in in_sweep) - min(float(r["start"]) for r in in_sweep)
    unit_mean = sum(float(r["wall_s"]) for r in in_sweep) / len(in_sweep)
    print(f"(b) sweep on local Ray      : {sweep_s:7.1f} s  (incl. Ray start; {in_flight} units in flight, "
          f"unit mean {unit_mean:.1f} s while sharing the cores)")
    print(f"speed-up (a)/(b)            : {sequential_s / sweep_s:7.2f} x")
    print(f"Ray and Tune's own cost     : {sweep_s / processes_s - 1:7.1%} ((b) / (c) - 1: the same units, "
          f"{parallelism} at a time, without Ray)")
    print(f"Ray overhead per unit       : {overhead:7.1%} of a bare unit "
          f"(= {sweep_s:.1f} s x {parallelism} / {sum(bare):.1f} s - 1)")
    print(f"  once per sweep            : {sweep_s - span:7.1f} s  (before the first unit starts, after the last ends)")
    print(f"  per trial (first unit start to last unit end): {span * parallelism / sum(bare) - 1:.1%} "
          f"(= {span:.1f} s x {parallelism} / {sum(bare):.1f} s - 1)")
    sweep_cpu = sum(float(r["cpu_s"]) for r in in_sweep)
    print(f"CPU time of the units       : {sweep_cpu:7.1f} s in (b), {sum(c for _, c in plain):.1f} s in (c), "
          f"{bare_cpu:.1f} s in (a); (b) vs (a) "
          f"({sweep_cpu / bare_cpu - 1:+.1%}); over the span the units got {sweep_cpu / span:.2f} of "
          f"{parallelism} cores (the rest went to other processes on the machine)")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.1f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} -- other processes on the machine skew both sides")
    print(f"results: {work}")


if __name__ == "__main__":
    main()
