"""One experiment = train -> sample -> evaluate, written as one output bundle.

`run_experiment` is the single entry point the CLI and the sweep's seed units call. This layer
knows nothing of Ray: several seeds at once (`pipeline.mode=multi_seed`) are the sweep layer's
job (`nbglm.sweep.multiseed`), which the command line dispatches to. A bundle `outputs/{name}__{timestamp}/` holds `config.yaml` (resolved), `ckpt/model.pt`,
`preds/pred.h5ad`, `metrics/metrics.json` and `logs/run.log`; every file is written atomically.

Everything that can be checked is checked before the bundle exists (inputs, sizes against the
machine's memory, a writable outputs_root). A new bundle is filled under a temp name and renamed
into place at the end, so a run that fails later (a divergence, a full disk) leaves nothing; a
bundle directory the caller provides (a sweep's unit) is marked FAILED instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anndata as ad
import pandas as pd

from nbglm import atomic
from nbglm.baselines import BASELINES, predict_baseline
from nbglm.config import Config, check_fits, to_yaml
from nbglm.data import Dataset, load_dataset
from nbglm.data.io import write_h5ad_rows
from nbglm.data.rows import OnDisk, Rows, return_freed_memory
from nbglm.errors import NbglmError
from nbglm.metrics import GroundTruthCache, Reference, build_cache, cache_profile, evaluate, load_cache, profile_metrics
from nbglm.model import LowRankNBGLM
from nbglm.sample import sample_blocks
from nbglm.checkpoint import load_checkpoint, save_checkpoint
from nbglm.train import EpochCallback, FitResult, fit

log = logging.getLogger("nbglm")

EVALUATING_MODES = ("train_sample_eval", "sample_eval", "evaluate_only")  # modes that score a prediction


@dataclass
class ExperimentResult:
    metrics: dict[str, Any]  # des, pds, mae, overall_score, baseline, per_perturbation; {} without eval
    bundle: Path
    timings: dict[str, float]
    seed: int
    history: list[dict] = field(default_factory=list)  # per-epoch {'epoch', 'loss', 'lr'}


def check_mode_inputs(cfg: Config, data: Dataset | None = None) -> None:
    """Fail before any work when the mode lacks an input it needs, naming the key to set (`data`:
    the dataset a caller built, e.g. a cross-validation fold whose validation part plays the test set)."""
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
    if mode in EVALUATING_MODES and data is None and cfg.paths.train_h5ad and not cfg.paths.test_h5ad:
        raise NbglmError(f"pipeline.mode={mode} scores predictions against real held-out cells: "
                         "set paths.test_h5ad, or use pipeline.mode=train_sample")
    if cfg.model.name in BASELINES and cfg.evaluate.profile == "vcc2026" and mode in EVALUATING_MODES:
        raise NbglmError(f"model.name={cfg.model.name} predicts log1p expression, but evaluate.profile=vcc2026 scores "
                         "raw counts (its scale already starts at the mean-response baseline): use evaluate.profile=vcc2025")
    if cfg.evaluate.de_cache and not Path(cfg.evaluate.de_cache).is_dir():
        raise NbglmError(f"DE cache not found: {cfg.evaluate.de_cache} (build it with `nbglm build-de-cache`)")


def check_outputs_root(cfg: Config) -> Path:
    """paths.outputs_root must be (or be creatable as) a directory this process can write into."""
    root = Path(cfg.paths.outputs_root).expanduser().resolve()
    atomic.check_writable_dir(root, "paths.outputs_root")
    return root


def check_sizes(cfg: Config, data: Dataset) -> None:
    """Estimate the largest allocations of the run from the config and the data, and refuse now,
    naming the knob, what cannot fit in the memory available (not a traceback minutes later)."""
    n_genes, m = len(data.gene_names), cfg.model
    n_cells = (data.heldout["n_cells"].fillna(cfg.sampling.n_cells_default).sum()
               if "n_cells" in data.heldout else cfg.sampling.n_cells_default * len(data.heldout))
    n_cells = float(n_cells) + (data.control_totals().size if cfg.sampling.control_cells == "model" else 0)
    # The prediction: CSR float32 counts + int32 indices, up to every cell x gene element, when it is
    # held in memory: a baseline's, one read to be scored, or one the vcc2026 profile scores. A
    # model's is sampled to disk and scored from there by vcc2025: only its cells' labels, depths
    # and names (~100 B a cell) are held.
    mode = cfg.pipeline.mode
    held = m.name in BASELINES or mode == "evaluate_only" or (cfg.evaluate.profile != "vcc2025" and mode in EVALUATING_MODES)
    check_fits((8.0 * n_genes if held else 100.0) * n_cells, f"the prediction ({n_cells:.0f} cells x {n_genes} genes)",
               "the held-out list's n_cells (or sampling.n_cells_default)")
    check_fits(3 * 8.0 * min(cfg.sampling.batch_cells, n_cells) * n_genes,
               f"a sampling batch ({cfg.sampling.batch_cells} cells x {n_genes} genes)", "sampling.batch_cells")
    if m.name != "lowrank_nb_glm" or mode not in ("train_sample_eval", "train_sample"):
        return
    n_perts = len(data.pert_emb)
    # Parameters (x4: values, gradients, two AdamW moments) and the MLP activations over every row.
    g = _mlp_bytes(data.gene_emb.shape[1], m.g_mlp_hidden, m.g_out_dim, n_genes)
    p = _mlp_bytes(data.pert_emb.shape[1], m.p_mlp_hidden, m.p_out_dim, n_perts)
    g_out = m.g_out_dim if m.g_mlp_hidden else data.gene_emb.shape[1]
    p_out = m.p_out_dim if m.p_mlp_hidden else data.pert_emb.shape[1]
    kernel = 16.0 * (g_out * p_out if m.rank is None else (g_out + p_out) * m.rank)
    check_fits(g + p + kernel, "the model (parameters, optimizer state, activations)",
               "model.rank, model.g_mlp_hidden / p_mlp_hidden or model.g_out_dim / p_out_dim")
    rows = cfg.train.batch_size if cfg.train.fit_mode == "whole" else n_perts
    check_fits(4 * 4.0 * min(rows, data.n_train_cells + n_perts) * n_genes,
               f"a training step ({rows} rows x {n_genes} genes)",
               "train.batch_size" if cfg.train.fit_mode == "whole" else "the number of training perturbations")


def _mlp_bytes(in_dim: int, hidden: list[int], out_dim: int, n_rows: int) -> float:
    widths = [in_dim, *hidden, out_dim] if hidden else [in_dim]
    params = sum(a * b for a, b in zip(widths, widths[1:]))
    return 16.0 * params + 3 * 4.0 * n_rows * sum(widths[1:])


def new_bundle_dir(cfg: Config) -> Path:
    """`{outputs_root}/{name}__{timestamp}`, made unique if two runs start in the same second."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    root = check_outputs_root(cfg)
    base = root / f"{cfg.experiment.name}__{stamp}"
    if base.parent != root:  # the config check makes this impossible; a bundle never leaves its root
        raise NbglmError(f"experiment.name {cfg.experiment.name!r} would leave paths.outputs_root {root}")
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
    """Write `adata` atomically, after checking the disk has room for its matrix."""
    x = adata.X
    need = sum(a.nbytes for a in (x.data, x.indices, x.indptr)) if hasattr(x, "indptr") else x.nbytes
    with atomic.atomic_path(path, need=int(need)) as tmp:
        adata.write_h5ad(tmp)


def run_experiment(
    cfg: Config,
    data: Dataset | None = None,
    *,
    bundle_dir: Path | None = None,
    on_epoch_end: EpochCallback | None = None,
    de_cache: GroundTruthCache | Reference | None = None,
    val_signal: bool = False,
) -> ExperimentResult:
    """Run `cfg.pipeline.mode` and write its bundle; `data`/`de_cache` let callers load once.

    `val_signal`: per-epoch 'val_nll' on `data.test` (`nbglm.train.fit`); for cross-validation units only."""
    if cfg.pipeline.mode == "multi_seed":
        raise NbglmError("pipeline.mode=multi_seed runs several seeds on Ray: start it with `nbglm run`, "
                         "or call nbglm.sweep.multiseed.run_multi_seed")
    check_mode_inputs(cfg, data)
    final = Path(bundle_dir).resolve() if bundle_dir else new_bundle_dir(cfg)
    # Inputs first: a bad file fails here, before the bundle exists.
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if data is None:
        data = load_dataset(cfg)
        timings["load_s"] = time.perf_counter() - t_start
    mode = cfg.pipeline.mode
    pred = _read_pred(cfg.paths.pred_h5ad, data) if mode == "evaluate_only" else None
    model = _load_pretrained(cfg.pipeline.pretrained_ckpt, data) if mode in {"sample_eval", "sample"} else None
    check_sizes(cfg, data)
    fill = partial(_fill, cfg, data, final=final, pred=pred, model=model, timings=timings, t_start=t_start,
                   on_epoch_end=on_epoch_end, de_cache=de_cache, val_signal=val_signal)
    if bundle_dir is None:
        with atomic.atomic_dir(final) as tmp:  # appears only once complete
            return fill(tmp)
    final.mkdir(parents=True, exist_ok=True)
    try:
        return fill(final)
    except BaseException as exc:
        atomic.mark_failed(final, f"{type(exc).__name__}: {exc}")
        raise


def _fill(cfg: Config, data: Dataset, bundle: Path, *, final: Path, pred: ad.AnnData | None,
          model: LowRankNBGLM | None, timings: dict[str, float], t_start: float,
          on_epoch_end: EpochCallback | None, de_cache: GroundTruthCache | None,
          val_signal: bool) -> ExperimentResult:
    """Train / sample / evaluate as the mode says, writing into `bundle` (`final` once complete)."""
    mode, seed = cfg.pipeline.mode, cfg.experiment.seed
    atomic.write_text(bundle / "config.yaml", to_yaml(cfg))
    history: list[dict] = []
    pred_counts: Rows | None = None  # pred's counts on disk, when it was sampled straight into its file
    with _run_log(bundle):
        log.info("run %s mode=%s seed=%d bundle=%s", cfg.experiment.name, mode, seed, final)
        if pred is None:
            if model is None and cfg.model.name not in BASELINES:
                fitted = _train(cfg, data, bundle, on_epoch_end, val_signal)
                model, history, timings["train_s"] = fitted.model, fitted.history, fitted.wall_time_s
                return_freed_memory()  # the fit's activations, before the prediction takes the room
            t0 = time.perf_counter()
            if model is None:
                pred = predict_baseline(cfg, data, seed)
                write_h5ad(pred, bundle / "preds" / "pred.h5ad")
            else:
                pred, pred_counts = _sample_to_file(model, data, cfg, seed, bundle / "preds" / "pred.h5ad")
            timings["sample_s"] = time.perf_counter() - t0
            log.info("sampled %d cells in %.1fs", pred.n_obs, timings["sample_s"])

        metrics: dict[str, Any] = {}
        if mode in EVALUATING_MODES:
            t0 = time.perf_counter()
            metrics = _evaluate(cfg, data, pred, de_cache, pred_counts)  # pred's values are log1p from here on
            timings["eval_s"] = time.perf_counter() - t0
            log.info("%s (eval %.1fs)", scores_text(metrics, cfg.evaluate.profile), timings["eval_s"])
        timings["total_s"] = time.perf_counter() - t_start
        atomic.write_json(bundle / "metrics" / "metrics.json",
                          {**metrics, "seed": seed, "mode": mode, "timings": timings, "history": history})
    return ExperimentResult(metrics=metrics, bundle=final, timings=timings, seed=seed, history=history)


def _sample_to_file(model: LowRankNBGLM, data: Dataset, cfg: Config, seed: int, path: Path) -> tuple[ad.AnnData, Rows]:
    """Sample the held-out cells straight into `path`, a batch at a time: (their obs and var, their
    counts as `Rows` of the file). At the VCC shape the prediction is ~1.4 GiB: it is never in memory."""
    obs, blocks = sample_blocks(model, data, cfg, seed)
    var = pd.DataFrame(index=pd.Index(model.gene_names))
    with atomic.atomic_path(path) as tmp:
        totals = write_h5ad_rows(tmp, obs, var, blocks)
    return_freed_memory()  # the batches' arrays, freed into glibc's heap
    return ad.AnnData(obs=obs, var=var), Rows(OnDisk(path), counts_totals=totals)


def _read_pred(path: str, data: Dataset) -> ad.AnnData:
    """The predictions to score, checked against the data's genes before anything is written."""
    atomic.refuse_failed(path)
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


def _evaluate(cfg: Config, data: Dataset, pred: ad.AnnData, de_cache: GroundTruthCache | Reference | None,
              pred_counts: Rows | None = None) -> dict[str, Any]:
    if data.test is None:
        raise NbglmError("no real held-out cells to score against: set paths.test_h5ad")
    if de_cache is None and cfg.evaluate.de_cache:
        de_cache = load_cache(cfg.evaluate.de_cache)
    if de_cache is None and data.sums is not None:
        raise NbglmError("this dataset holds sums, not cells: score it with the ground-truth cache built from its cells")
    return evaluate(pred, data.test, pert_col=data.pert_col, control=data.control,
                    train=None if de_cache else data.train, cache=de_cache, profile=cfg.evaluate.profile,
                    overwrite_pred=True, pred_counts=pred_counts)


def load_inputs(cfg: Config, data: Dataset | None = None) -> tuple[Dataset, GroundTruthCache | Reference | None]:
    """The dataset and, when `cfg`'s mode scores against real held-out cells, the real side of
    `evaluate.profile` (the DE cache, or the vcc2026 reference): built once by a caller that runs
    many experiments on the same data."""
    if data is None:
        data = load_dataset(cfg)
    if cfg.pipeline.mode not in EVALUATING_MODES or data.test is None:
        return data, None
    profile = cfg.evaluate.profile
    if cfg.evaluate.de_cache:
        cache = load_cache(cfg.evaluate.de_cache)
        if cache_profile(cache) != profile:
            raise NbglmError(f"evaluate.de_cache {cfg.evaluate.de_cache} holds a {cache_profile(cache)} cache but "
                             f"evaluate.profile={profile}: rebuild it with `nbglm build-de-cache --profile {profile}`")
        return data, cache
    return data, build_cache(data.test, train=data.train, profile=profile, pert_col=data.pert_col,
                             control=data.control, train_counts=data.train_x, real_counts=data.test_x)


def scores_text(metrics: dict[str, Any], profile: str = "vcc2025") -> str:
    """`overall=0.3441 DES=0.3690 PDS=0.8900 MAE=0.0790`: the scores a run reports, in registry order;
    `overall` is the profile's aggregate."""
    shown = [("overall" if i == 0 else m.title.replace(" ", "_"), m.value(metrics))
             for i, m in enumerate(profile_metrics(profile))]
    return " ".join(f"{label}={value:.4f}" for label, value in shown if value is not None)


def summary_line(metrics: dict[str, Any], total_s: float, bundle: Path, profile: str = "vcc2025") -> str:
    """The one line a user reads at the end of a run."""
    scores = scores_text(metrics, profile)
    return f"{scores + ' ' if scores else ''}wall={total_s:.1f}s bundle={bundle}"


def with_seed(cfg: Config, seed: int) -> Config:
    """A copy of `cfg` whose experiment runs with `seed`."""
    return replace(cfg, experiment=replace(cfg.experiment, seed=seed))
