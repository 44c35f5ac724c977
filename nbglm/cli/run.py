"""`nbglm run`: one experiment (train -> sample -> evaluate) and its bundle; `multi_seed` on Ray."""

from __future__ import annotations

import argparse
import logging
import sys

from nbglm.cli._args import add_config_args, add_connect_timeout


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("run", help="run one experiment (train -> sample -> evaluate) and write its bundle")
    add_config_args(p)
    p.add_argument("--address", help="Ray address for pipeline.mode=multi_seed (default: start a local Ray)")
    add_connect_timeout(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm.config import load_config
    from nbglm.pipeline import new_bundle_dir, run_experiment, summary_line

    cfg = load_config(args.config, args.overrides)
    if sys.stdout.isatty():
        from rich.logging import RichHandler

        logging.getLogger("nbglm").addHandler(RichHandler(show_path=False))
    if cfg.pipeline.mode != "multi_seed":
        result = run_experiment(cfg)
        print(summary_line(result.metrics, result.timings.get("total_s", 0.0), result.bundle, cfg.evaluate.profile))
        return 0
    from nbglm.sweep.multiseed import run_multi_seed  # several seeds at once are Ray work

    multi = run_multi_seed(cfg, bundle_dir=new_bundle_dir(cfg), address=args.address,
                           connect_timeout=args.connect_timeout)
    print(summary_line(multi.metrics, multi.total_s, multi.bundle, cfg.evaluate.profile))
    if multi.failed_seeds:
        print(f"error: seeds {multi.failed_seeds} failed; see {multi.bundle}/metrics/multi_seed_metrics.json",
              file=sys.stderr)
        return 1
    return 0
