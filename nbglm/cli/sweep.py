"""`nbglm sweep SPEC`: an Optuna x seeds sweep on Ray Tune (`python launch.py SPEC` is the same)."""

from __future__ import annotations

import argparse
import sys

from nbglm.cli._args import add_connect_timeout


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help="run an Optuna x seeds sweep on Ray Tune",
                       description="Run an Optuna x seeds sweep on Ray Tune; results in <storage_path>/<name>/.")
    p.add_argument("spec", help="sweep spec YAML, e.g. sweeps/rank_search.yaml")
    p.add_argument("--address", help="attach to a Ray cluster (auto, HOST:PORT or ray://HOST:PORT); "
                   "default: start a local Ray for this sweep")
    add_connect_timeout(p)
    p.add_argument("--resume", action="store_true", help="continue the interrupted sweep in <storage_path>/<name>")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key (repeatable): --set search.num_samples=4 --set overrides.train.epochs=5")
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm.report import report_after_sweep
    from nbglm.sweep.runner import run_sweep

    try:
        result = run_sweep(args.spec, address=args.address, resume=args.resume, sets=args.sets,
                           connect_timeout=args.connect_timeout)
    except KeyboardInterrupt:
        print("interrupted; continue with --resume", file=sys.stderr)
        return 130
    report_after_sweep(result.sweep_dir)  # figures + report.html; a failure is a warning, never a failed sweep
    print(f"sweep '{result.name}': results in {result.sweep_dir}/results (trials.csv, configs.csv, "
          f"best_config.yaml); tensorboard --logdir {result.sweep_dir}", flush=True)
    return 0 if any(r["n_units_ok"] for r in result.rows) else 1
