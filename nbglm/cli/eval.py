"""`nbglm eval`: score a prediction against real cells with the VCC metrics, as cell-eval 0.8
(`--profile vcc2025`) or cell-eval2 0.20 (`--profile vcc2026`) does."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from nbglm.cli._args import add_real_data, begin_scoring

LEAVE_AT_ONCE = True  # its work ends in files and printed output: see `nbglm.cli.process`


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="score pred.h5ad against real.h5ad (VCC 2025 or 2026 metrics)",
                       description="Score a prediction with the Virtual Cell Challenge metrics: vcc2025 (DES, PDS, "
                                   "MAE, overall score) numerically as cell-eval 0.8, or vcc2026 (six members scaled "
                                   "between baseline and replicate, raw counts) as cell-eval2 0.20.")
    p.add_argument("--pred", required=True, type=Path, help="predicted cells (h5ad), control cells included")
    add_real_data(p)
    baseline = p.add_mutually_exclusive_group()
    baseline.add_argument("--train", type=Path, help="training data (h5ad) for the cell-mean baseline of the "
                          "vcc2025 overall score (vcc2026 draws its baseline from --real)")
    baseline.add_argument("--de-cache", type=Path, help="cache directory from `nbglm build-de-cache` (same profile)")
    p.add_argument("--output", type=Path, help="write the metrics as JSON to this file")
    return p


def run(args: argparse.Namespace) -> int:
    begin_scoring(args)
    from rich.console import Console

    from nbglm import atomic
    from nbglm.metrics import baseline_vector, build_cache, evaluate, load_cache, read_counts_for_eval
    from nbglm.metrics.de_cache import build_de_cache
    from nbglm.metrics.evaluate import load_kernels
    from nbglm.metrics.io import ReadBuffers
    from nbglm.metrics.vcc import check_pair

    if args.output:
        atomic.check_new_file(args.output)
    atomic.refuse_failed(args.pred)
    opts = {"pert_col": args.pert_col, "control": args.control}
    # labels and genes first, so that a prediction that cannot be scored is refused before any work
    real_meta = read_counts_for_eval(args.real, args.pert_col, "real", values=False)
    pred_meta = read_counts_for_eval(args.pred, args.pert_col, "pred", values=False)
    if args.profile == "vcc2025":
        check_pair(pred_meta, real_meta, args.pert_col, args.control)
    # train, then real, then pred, each read into the memory the one before used (and then dropped),
    # with numba's first loads on a thread meanwhile (h5py's reads let it run)
    buffers = ReadBuffers([path for path in (args.train, args.real, args.pred) if path])
    cache = load_cache(args.de_cache) if args.de_cache else None
    real = real_meta
    with ThreadPoolExecutor(1) as pool:
        kernels = pool.submit(load_kernels, args.profile)

        def read(path: Path, what: str) -> Any:
            adata = read_counts_for_eval(path, args.pert_col, what, buffers)
            kernels.result()  # loaded (or failed) before anything is computed
            return adata

        if cache is None:
            baseline = None
            if args.train:  # only the baseline's profile is kept
                baseline = baseline_vector(read(args.train, "train"), real_meta, args.pert_col, overwrite=True)
            real = read(args.real, "real")
            cache = build_de_cache(real, **opts, overwrite=True, baseline=baseline) if args.profile == "vcc2025" \
                else build_cache(real, **opts, profile=args.profile)
            real.X = None  # its memory is pred's next
        pred = read(args.pred, "pred")
    result = evaluate(pred, real, **opts, cache=cache, profile=args.profile, overwrite_pred=True)
    Console().print(_table(result) if args.profile == "vcc2025" else _table_2026(result))
    if args.output:
        atomic.write_text(args.output, json.dumps(result, indent=2) + "\n")
    return 0


def _table(result: dict[str, Any]) -> Any:
    from rich.table import Table

    from nbglm.metrics import profile_metrics

    table = Table(title=f"VCC metrics ({result['n_perturbations']} perturbations, {result['n_genes']} genes)")
    for column in ("metric", "value", "baseline", "scaled"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    baseline, scaled = result["baseline"] or {}, result["scaled"] or {}
    for m in profile_metrics():
        if m.compute is not None:
            table.add_row(f"{m.title} (best {m.best:g})", f"{result[m.name]:.4f}", _fmt(baseline.get(m.name)),
                          _fmt(scaled.get(m.name)))
    overall = result["overall_score"]
    shown = "n/a (no baseline)" if overall is None else f"{overall:.4f} (x100 = {100 * overall:.2f})"
    table.add_row("overall score", "", "", shown)
    return table


def _table_2026(result: dict[str, Any]) -> Any:
    """Each member's panel mean beside the two ends of its scale and its scaled score, then their mean."""
    from rich.table import Table

    from nbglm.metrics import profile_metrics

    table = Table(title=f"VCC 2026 metrics ({result['n_perturbations']} perturbations, {result['n_genes']} genes)")
    for column in ("metric", "value", "baseline", "replicate", "scaled"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    score, *members = profile_metrics("vcc2026")
    for m in members:
        table.add_row(f"{m.name} {m.arrow}", _fmt(result["vcc2026"][m.name]), _fmt(result["vcc2026_baseline"][m.name]),
                      _fmt(result["vcc2026_replicate"][m.name]), _fmt(result["vcc2026_scaled"][m.name]))
    table.add_row(score.title, "", "0 by definition", "1 by definition", _fmt(result[score.name]))
    return table


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
