"""One experiment = train -> sample -> evaluate, written as one output bundle.

`run_experiment` is the single entry point the CLI and the sweep's seed units call. This layer
knows nothing of Ray: several seeds at once (`pipeline.mode=multi_seed`) are the sweep layer's
job (`nbglm.sweep.multiseed`), which the command line dispatches to. A bundle `outputs/{name}__{timestamp}/` holds `config.yaml` (resolved), `ckpt/model.pt`,
`preds/pred.h5ad`, `metrics/metrics.json` and `logs/run.log`; every file is written atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import anndata as ad

from nbglm import atomic
from nbglm.baselines import BASELINES, predict_baseline
from nbglm.config import Config, to_yaml
from nbglm.data import Dataset, load_dataset
from nbglm.errors import NbglmError
from nbglm.metrics import GroundTruthCache, build_de_cache, evaluate, load_de_cache, profile_metrics
from nbglm.model import LowRankNBGLM
from nbglm.sample import sample_heldout
from nbglm.train import EpochCallback, FitResult, fit, load_checkpoint, save_checkpoint

log = logging.getLogger("nbglm")

EVALUATING_MODES = ("train_sample_eval", "sample_eval", "evaluate_only")  # modes that score a prediction


@dataclass
class ExperimentResult:
    metrics: dict[str, Any]  # des, pds, mae, overall_score, baseline, per_perturbation; {} without eval
    bundle: Path
    timings: dict[str, float]
    seed: int
    history: list[dict] = field(default_factory=list)  # per-epoch {'epoch', 'loss', 'lr'}


def check_mode_inputs(cfg: Config) -> None:
    """Fail before any work when the mode lacks an input it needs, naming the key to set."""
    mode = cfg.pipeline.mode
    if cfg.model.name in BASELINES and mode in {"sample_eval", "sample"}:
        raise NbglmError(f"model.name={cfg.model.name} is a baseline with no checkpoint: "
                         "use pipeline.mode=train_sample_eval or train_sample")
    if mode in {"sample_eval", "sample"}:
        ckpt = cfg.pipeline.pretrained_ckpt
        if not ckpt:
            raise NbglmError(f"pipeline.mode={mode} needs pipeline.pretrained_ckpt (a ckpt/model.pt from a previous run)")
        if not Path(ckpt).is_file():
            raise NbglmError(f"checkpoint not found: {ckpt} (set pipeline.pretrained_ckpt to an existing ckpt/model.pt)")
    if mode == "evaluate_only":
        pred = cfg.paths.pred_h5ad
        if not pred:
            raise NbglmError("pipeline.mode=evaluate_only needs paths.pred_h5ad (the predictions to score)")
        if not Path(pred).is_file():
            raise NbglmError(f"prediction file not found: {pred} (check paths.pred_h5ad)")
    if mode in EVALUATING_MODES and cfg.paths.train_h5ad and not cfg.paths.test_h5ad:
        raise NbglmError(f"pipeline.mode={mode} scores predictions against real held-out cells: "
                         "set paths.test_h5ad, or use pipeline.mode=train_sample")
    if cfg.evaluate.de_cache and not Path(cfg.evaluate.de_cache).is_dir():
        raise NbglmError(f"DE cache not found: {cfg.evaluate.de_cache} (build it with `nbglm build-de-cache`)")


def new_bundle_dir(cfg: Config) -> Path:
    """`{outputs_root}/{name}__{timestamp}`, made unique if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(cfg.paths.outputs_root).resolve() / f"{cfg.experiment.name}__{stamp}"
    bundle, n = base, 1
    while bundle.exists():
        bundle, n = base.with_name(f"{base.name}-{n}"), n + 1
    return bundle


@contextmanager
def _run_log(bundle: Path) -> Iterator[None]:
    """Send the `nbglm` logger to logs/run.log for the duration of the run."""
    (bundle / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(bundle / "logs" / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def write_h5ad(adata: ad.AnnData, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def run_experiment(
    cfg: Config,
    data: Dataset | None = None,
    *,
    bundle_dir: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    de_cache: GroundTruthCache | None = None,
    val_signal: bool = False,
) -> ExperimentResult:
    """Run `cfg.pipeline.mode` and write its bundle; `data`/`de_cache` let callers load once.

    `val_signal`: per-epoch 'val_nll' on `data.test` (`nbglm.train.fit`); for cross-validation units only."""
    if cfg.pipeline.mode == "multi_seed":
        raise NbglmError("pipeline.mode=multi_seed runs several seeds on Ray: start it with `nbglm run`, "
                         "or call nbglm.sweep.multiseed.run_multi_seed")
    check_mode_inputs(cfg)
    # Inputs first: a bad file fails here, before the bundle exists.
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if data is None:
        data = load_dataset(cfg)
        timings["load_s"] = time.perf_counter() - t_start
    mode, seed = cfg.pipeline.mode, cfg.experiment.seed
    pred = _read_pred(cfg.paths.pred_h5ad, data) if mode == "evaluate_only" else None
    model = _load_pretrained(cfg.pipeline.pretrained_ckpt, data) if mode in {"sample_eval", "sample"} else None

    bundle = Path(bundle_dir).resolve() if bundle_dir else new_bundle_dir(cfg)
    bundle.mkdir(parents=True, exist_ok=True)
    atomic.write_text(bundle / "config.yaml", to_yaml(cfg))
    history: list[dict] = []
    with _run_log(bundle):
        log.info("run %s mode=%s seed=%d bundle=%s", cfg.experiment.name, mode, seed, bundle)
        if pred is None:
            if model is None and cfg.model.name not in BASELINES:
                fitted = _train(cfg, data, bundle, on_epoch_end, val_signal)
                model, history, timings["train_s"] = fitted.model, fitted.history, fitted.wall_time_s
            t0 = time.perf_counter()
            pred = predict_baseline(cfg, data, seed) if model is None else sample_heldout(model, data, cfg, seed=seed)
            write_h5ad(pred, bundle / "preds" / "pred.h5ad")
            timings["sample_s"] = time.perf_counter() - t0
            log.info("sampled %d cells in %.1fs", pred.n_obs, timings["sample_s"])

        metrics: dict[str, Any] = {}
        if mode in EVALUATING_MODES:
            t0 = time.perf_counter()
            metrics = _evaluate(cfg, data, pred, de_cache)
            timings["eval_s"] = time.perf_counter() - t0
            log.info("%s (eval %.1fs)", scores_text(metrics), timings["eval_s"])
        timings["total_s"] = time.perf_counter() - t_start
        atomic.write_json(bundle / "metrics" / "metrics.json",
                          {**metrics, "seed": seed, "mode": mode, "timings": timings, "history": history})
    return ExperimentResult(metrics=metrics, bundle=bundle, timings=timings, seed=seed, history=history)


def _read_pred(path: str, data: Dataset) -> ad.AnnData:
    """The predictions to score, checked against the data's genes before anything is written."""
    pred = ad.read_h5ad(path)
    if list(pred.var_names) != data.gene_names:
        raise NbglmError(f"predictions {path} have other genes than the data ({pred.n_vars} vs "
                         f"{len(data.gene_names)}, or another order): predict on the training genes")
    return pred


def _load_pretrained(path: str, data: Dataset) -> LowRankNBGLM:
    model = load_checkpoint(path)
    model.check_genes(data.gene_names)
    return model


def _train(cfg: Config, data: Dataset, bundle: Path, on_epoch_end: EpochCallback | None,
           val_signal: bool) -> FitResult:
    """Fit a new model and checkpoint it before anything is sampled from it."""
    result = fit(cfg, data, on_epoch_end=on_epoch_end, val_signal=val_signal)
    save_checkpoint(bundle / "ckpt" / "model.pt", result.model, cfg)
    log.info("trained %d epochs in %.1fs, final loss %.4f", len(result.history), result.wall_time_s,
             result.history[-1]["loss"] if result.history else float("nan"))
    return result


def _evaluate(cfg: Config, data: Dataset, pred: ad.AnnData, de_cache: GroundTruthCache | None) -> dict[str, Any]:
    if data.test is None:
        raise NbglmError("no real held-out cells to score against: set paths.test_h5ad")
    if de_cache is None and cfg.evaluate.de_cache:
        de_cache = load_de_cache(cfg.evaluate.de_cache)
    return evaluate(pred, data.test, pert_col=data.pert_col, control=data.control,
                    train=None if de_cache else data.train, cache=de_cache)


def load_inputs(cfg: Config, data: Dataset | None = None) -> tuple[Dataset, GroundTruthCache | None]:
    """The dataset and, when `cfg`'s mode scores against real held-out cells, the ground-truth DE
    cache: built once by a caller that runs many experiments on the same data."""
    if data is None:
        data = load_dataset(cfg)
    if cfg.pipeline.mode not in EVALUATING_MODES or data.test is None:
        return data, None
    if cfg.evaluate.de_cache:
        return data, load_de_cache(cfg.evaluate.de_cache)
    return data, build_de_cache(data.test, train=data.train, pert_col=data.pert_col, control=data.control)


def scores_text(metrics: dict[str, Any]) -> str:
    """`overall=0.3441 DES=0.3690 PDS=0.8900 MAE=0.0790`: the scores a run reports, in registry order."""
    return " ".join(f"{'overall' if m.name == 'overall_score' else m.title}={metrics[m.name]:.4f}"
                    for m in profile_metrics() if metrics.get(m.name) is not None)


def summary_line(metrics: dict[str, Any], total_s: float, bundle: Path) -> str:
    """The one line a user reads at the end of a run."""
    scores = scores_text(metrics)
    return f"{scores + ' ' if scores else ''}wall={total_s:.1f}s bundle={bundle}"


def with_seed(cfg: Config, seed: int) -> Config:
    """A copy of `cfg` whose experiment runs with `seed`."""
    return replace(cfg, experiment=replace(cfg.experiment, seed=seed))
