"""`nbglm synth --output DIR`: the built-in synthetic dataset as the files a user would bring."""

from __future__ import annotations

import argparse

from nbglm.cli._args import add_config_args


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("synth", help="write the built-in synthetic dataset as files (h5ad, CSV)")
    p.add_argument("--output", required=True, help="new or empty directory to write into")
    add_config_args(p)
    return p


def run(args: argparse.Namespace) -> int:
    from nbglm import atomic
    from nbglm.config import load_config
    from nbglm.data.io import describe
    from nbglm.data.synthetic import FILES, make_synthetic, write_synthetic

    cfg = load_config(args.config, args.overrides)
    atomic.check_new_output(args.output)
    pert_col, control = cfg.data.pert_name_col, cfg.data.control_name
    data = make_synthetic(cfg.data.synthetic, pert_col, control)
    with atomic.atomic_dir(args.output) as tmp:
        write_synthetic(data, tmp)
    print(f"wrote {args.output}/: {', '.join(FILES)}")
    print(f"train: {describe(data.train, pert_col, control)}")
    print(f"test:  {describe(data.test, pert_col, control)}")
    return 0
