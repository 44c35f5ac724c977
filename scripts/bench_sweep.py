"""Benchmark the sweep machinery: the same N configs x seeds run (b) as a sweep on a local Ray and
(a) sequentially with `run_experiment` in this process, side by side.

    python scripts/bench_sweep.py [--configs 2] [--set KEY=VALUE ...]

Prints both wall times, the speed-up, and Ray's overhead per seed unit: sweep time x parallelism /
sum of the bare (sequential) unit times, minus 1 -- the fraction of a unit's own run time that the
sweep spends on top of it. Parallelism is what the machine can really run at once: min(CPU cores,
seed units in flight). The same ratio over the span from the first unit's start to the last unit's
end separates the per-trial cost (scheduling, trial hand-over, reporting, cores shared by concurrent
units) from the once-per-sweep start-up (Ray start, Tune set-up, first worker processes). On a
shared machine the wall times include other people's load, so the CPU seconds the units burned in
each mode, and the cores the sweep's units actually got, are printed too.
`--set` takes sweep-spec overrides, e.g. --set overrides.train.epochs=40.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The default-sized synthetic dataset and its 50 epochs: one seed unit takes ~20 s on one core.
DEFAULTS = [
    "overrides.data.synthetic.n_genes=2000", "overrides.data.synthetic.n_train_perts=120",
    "overrides.data.synthetic.n_test_perts=30", "overrides.data.synthetic.cells_per_pert=100",
    "overrides.data.synthetic.n_control=1500", "overrides.train.epochs=50", "overrides.sampling.n_cells_default=100",
    "search.sampler=random", "resources.cpu=1", "resources.gpu=0", "max_concurrent=2",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default=str(ROOT / "sweeps" / "rank_search.yaml"))
    parser.add_argument("--configs", type=int, default=4, help="number of sampled configs (each runs every seed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for (a); 1 = what each seed unit gets in the sweep (Ray sets "
                             "OMP_NUM_THREADS=1 for fractional-CPU tasks), so (a) gives the bare unit times")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from nbglm.config import from_dict, to_dict
    from nbglm.multiseed import shared_inputs
    from nbglm.pipeline import run_experiment, with_seed
    from nbglm.sweep import runner
    from nbglm.sweep.space import load_spec

    runner.report_after_sweep = lambda sweep_dir: None  # the HTML report (baselines, figures) is not sweep machinery

    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    sets = [*DEFAULTS, f"search.num_samples={args.configs}", f"storage_path={work}", *args.sets]
    spec = load_spec(args.spec, sets)
    shared_inputs(spec.resolve_base(), None)  # warm the synthetic-data cache so neither side pays for creating it

    t0 = time.perf_counter()
    rows = runner.run_sweep(args.spec, sets=sets)
    sweep_s = time.perf_counter() - t0

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    base_cfg = spec.resolve_base()
    base = to_dict(base_cfg)
    data, de_cache = shared_inputs(base_cfg, None)
    bare, bare_cpu = [], 0.0
    for row in rows:
        cfg = from_dict(spec.experiment_dict({k: row[k] for k in spec.space}, base))
        for seed in spec.seeds:
            t_unit, c_unit = time.perf_counter(), time.process_time()
            run_experiment(with_seed(cfg, seed), data, de_cache=de_cache,
                           bundle_dir=work / "sequential" / row["trial_id"] / f"seed_{seed}")
            bare.append(time.perf_counter() - t_unit)
            bare_cpu += time.process_time() - c_unit
    sequential_s = time.perf_counter() - t0

    units = len(bare)
    in_flight = min(spec.max_concurrent, args.configs) * len(spec.seeds)
    parallelism = min(os.cpu_count() or 1, in_flight)
    overhead = sweep_s * parallelism / sum(bare) - 1
    print(f"\n{args.configs} configs x {len(spec.seeds)} seeds = {units} seed units; {os.cpu_count()} CPU cores; "
          f"torch threads in (a): {args.threads}; resources per unit in (b): cpu={spec.resources.cpu:g} "
          f"gpu={spec.resources.gpu:g}")
    print(f"(a) sequential, one process : {sequential_s:7.1f} s  (bare unit mean {sum(bare) / units:.1f} s, "
          f"min {min(bare):.1f}, max {max(bare):.1f})")
    in_sweep = list(csv.DictReader((work / spec.name / "results" / "trials.csv").open()))
    span = max(float(r["end"]) for r in in_sweep) - min(float(r["start"]) for r in in_sweep)
    unit_mean = sum(float(r["wall_s"]) for r in in_sweep) / len(in_sweep)
    print(f"(b) sweep on local Ray      : {sweep_s:7.1f} s  (incl. Ray start; {in_flight} units in flight, "
          f"unit mean {unit_mean:.1f} s while sharing the cores)")
    print(f"speed-up (a)/(b)            : {sequential_s / sweep_s:7.2f} x")
    print(f"Ray overhead per unit       : {overhead:7.1%} of a bare unit "
          f"(= {sweep_s:.1f} s x {parallelism} / {sum(bare):.1f} s - 1)")
    print(f"  once per sweep            : {sweep_s - span:7.1f} s  (before the first unit starts, after the last ends)")
    print(f"  per trial (first unit start to last unit end): {span * parallelism / sum(bare) - 1:.1%} "
          f"(= {span:.1f} s x {parallelism} / {sum(bare):.1f} s - 1)")
    sweep_cpu = sum(float(r["cpu_s"]) for r in in_sweep)
    print(f"CPU time of the units       : {sweep_cpu:7.1f} s in (b) vs {bare_cpu:.1f} s in (a) "
          f"({sweep_cpu / bare_cpu - 1:+.1%}); over the span the units got {sweep_cpu / span:.2f} of "
          f"{parallelism} cores (the rest went to other processes on the machine)")
    print(f"load average (1/5/15 min) before: {' '.join(f'{x:.1f}' for x in load_before)}, after: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} -- other processes on the machine skew both sides")
    print(f"results: {work}")


if __name__ == "__main__":
    main()
