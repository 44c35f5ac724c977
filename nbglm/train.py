"""Fitting the low-rank NB-GLM (checkpoints: `nbglm.checkpoint`).

Two fit modes share one model and one loss registry:

- `whole`: per-cell likelihood on shuffled minibatches of cells (`train.batch_size`).
- `concise`: every step sees every training perturbation (x phase) at once, through pseudobulk
  sufficient statistics. Within a group k all cells share the mean profile m_k, cell c has mean
  s_c m_k; with Y_k = sum_c y_c, S_k = sum_c s_c, Q_k = sum_c s_c^2 and n_k cells:
  * poisson_nll / poisson_deviance: the per-cell sum equals the loss of Y_k at mean S_k m_k up to a
    constant, so loss gradients are exactly those of a full pass over the cells.
  * nb_nll / nb_deviance: Y_k is scored as NB(S_k m_k, theta * S_k^2 / Q_k). Exact when the size
    factors of a group are equal (a sum of NB with a common p is NB with summed dispersion); else
    the mean and variance of Y_k are exact and its shape is moment-matched.
  * mse_log1p: approximate; fits log1p of the group mean count, weighted by n_k, not the mean of
    per-cell log1p values.
  Concise losses are divided by the number of cell-gene elements, like whole-mode losses, so the
  gradient scale (and the learning rate) carries over; their values are not comparable across modes.

Control cells: they set mu_ctrl and theta. They also join the fit (effect term fixed at 0) when
they inform a parameter, i.e. with `model.use_cycle` (phase offsets) or `model.learn_theta`;
with use_cycle, mu_ctrl is the mean of the G1 control cells, the model's reference phase.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch

from nbglm.batches import Cells, Pseudobulk, WholeBatches
from nbglm.config import Config, ModelConfig
from nbglm.data import PHASES, Dataset
from nbglm.data.dataset import GroupSums
from nbglm.data.summary import group_sums, phase_codes
from nbglm.errors import NbglmError
from nbglm.losses import LOSSES
from nbglm.model import CONTROL_IDX, LowRankNBGLM

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict], None]


@dataclass
class FitResult:
    model: LowRankNBGLM
    history: list[dict] = field(default_factory=list)  # one {'epoch', 'loss', 'lr', 'epoch_s'} per epoch
    wall_time_s: float = 0.0


def resolve_device(name: str) -> torch.device:
    """`auto` = cuda when available; asking for cuda without one is a user error, not a silent CPU run."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NbglmError(f"experiment.device = {name!r} is invalid: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NbglmError(f"experiment.device = {name!r} but no CUDA GPU is available: use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise NbglmError(f"experiment.device = {name!r} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def control_stats(sums: GroupSums, ref: float, use_sf: bool, phase: np.ndarray | None,
                  mcfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Control mean per unit size factor, and per-gene NB dispersion by method of moments, from the
    control groups' sums (the G1 ones when `phase` is given and G1 control cells exist).

    Under y ~ NB(s m, theta), Var(y/s) averages to m E[1/s] + m^2/theta, hence
    theta = m^2 / (Var(y/s) - m E[1/s]); genes with no excess variance get theta_max. With size
    factors s = t / ref, sums of y/s and (y/s)^2 are ref and ref^2 times the stored sums of y/t, (y/t)^2.
    A gene never seen in controls gets mu_ctrl = 0.1 counts over all control cells, so log mu is finite.
    """
    ctrl = sums.control_rows
    use = np.ones(ctrl.size, bool)
    if phase is not None and ((phase[ctrl] == 0) & (sums.n_all[ctrl] > 0)).any():
        use = (phase[ctrl] == 0) & (sums.n_all[ctrl] > 0)
    rows = ctrl[use]
    n = float(sums.n[rows].sum())
    if n == 0:
        raise NbglmError("no control cell of the training data has any counts: the training matrix must hold raw counts")
    y = sums.y[rows].sum(axis=0)
    x2, xt, xt2 = sums.moments[:, use].sum(axis=1)
    if use_sf:
        total_sf = float(sums.t1[rows].sum()) / ref
        mean, m2, mean_inv_sf = ref * xt / n, ref**2 * xt2 / n, ref * float(sums.inv_t[use].sum()) / n
    else:
        total_sf, mean, m2, mean_inv_sf = n, y / n, x2 / n, 1.0
    excess = (m2 - mean**2) - mean * mean_inv_sf
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, mean**2 / excess, mcfg.theta_max)
    theta = np.clip(np.nan_to_num(theta, nan=mcfg.theta_max), mcfg.theta_min, mcfg.theta_max)
    return np.maximum(y / total_sf, 0.1 / total_sf), theta


def build_model(cfg: Config, data: Dataset, mu_ctrl: np.ndarray, theta: np.ndarray) -> LowRankNBGLM:
    """A fresh model over all embedding rows of `data` (training and held-out perturbations)."""
    return LowRankNBGLM(
        gene_emb=torch.tensor(np.asarray(data.gene_emb, dtype=np.float32)),  # copies: object-store arrays are read-only
        pert_emb=torch.tensor(data.pert_emb.to_numpy(dtype=np.float32)),
        mu_ctrl=torch.as_tensor(mu_ctrl, dtype=torch.float32),
        theta=torch.as_tensor(theta, dtype=torch.float32),
        cfg=cfg.model, gene_names=data.gene_names, pert_names=[str(p) for p in data.pert_emb.index],
    )


def _sums(data: Dataset, which: str) -> GroupSums | None:
    """The group sums of `data.train` or `data.test`: the summarised dataset's, or made from its cells."""
    if data.sums is not None:
        return getattr(data.sums, which)
    adata = getattr(data, which)
    if adata is None:
        return None
    counts = data.train_counts() if which == "train" else data.test_counts()
    return group_sums(counts, adata.obs, data.pert_col, data.control, data.phase_col)


def _phases(sums: GroupSums, data: Dataset, use_cycle: bool) -> np.ndarray | None:
    """Each group's phase 0/1/2 with model.use_cycle (an NbglmError when the data has none), else None."""
    if not use_cycle:
        return None
    if data.phase_col is None:
        raise NbglmError("model.use_cycle is on but the data has no phase column: set data.phase_column to the "
                         "obs column with G1/S/G2M, or model.use_cycle=false")
    if sums.bad_phases:
        raise NbglmError(f"phase column {data.phase_col!r} has values {list(sums.bad_phases)}; expected only {list(PHASES)}")
    return sums.phase


def _prepare(cfg: Config, data: Dataset) -> tuple[LowRankNBGLM, GroupSums, np.ndarray | None, float]:
    """Control statistics, the model, the training group sums and their phases, and the reference
    total count that turns a cell's total into its size factor."""
    sums = _sums(data, "train")
    ref = sums.median_total
    if ref <= 0:
        raise NbglmError("the median total count of the training cells is 0: the training matrix must hold raw counts")
    if not (sums.n_all[sums.control_rows] > 0).any():
        raise NbglmError(f"no control cells ('{data.control}' in obs['{data.pert_col}']) in the training data: "
                         "set data.control_name")
    phase = _phases(sums, data, cfg.model.use_cycle)
    mu_ctrl, theta = control_stats(sums, ref, cfg.size_factor.use_sf, phase, cfg.model)
    model = build_model(cfg, data, mu_ctrl, theta)
    if not data.train_perts:
        raise NbglmError("no training perturbation has an embedding: check the perturbation embedding table")
    return model, sums, phase, ref


def _fit_rows(cfg: Config, data: Dataset, sums: GroupSums, model: LowRankNBGLM) -> tuple[np.ndarray, np.ndarray]:
    """The training groups the fit sees and their index into the model's P: the training
    perturbations', and the controls' (CONTROL_IDX) when they inform a parameter."""
    keep = np.isin(sums.labels, data.train_perts) & (sums.n > 0)  # a cell with no counts has no size factor
    if cfg.model.use_cycle or cfg.model.learn_theta:
        keep |= (sums.labels == data.control) & (sums.n > 0)
    rows = np.flatnonzero(keep)
    pos = {name: i for i, name in enumerate(model.pert_names)}
    return rows, np.array([pos.get(label, CONTROL_IDX) for label in sums.labels[rows]], dtype=np.int64)


def _validation_bulk(cfg: Config, data: Dataset, model: LowRankNBGLM, ref: float,
                     device: torch.device) -> Pseudobulk | None:
    """Pseudobulks of the `data.test` perturbations the model knows and the fit never saw (a sweep
    unit's validation perturbations), sized like the training cells; None when there are none."""
    sums = _sums(data, "test")
    if sums is None:
        return None
    pos = {name: i for i, name in enumerate(model.pert_names)}
    unseen = set(pos) - set(data.train_perts) - {data.control}
    rows = np.flatnonzero(np.isin(sums.labels, list(unseen)) & (sums.n > 0))
    if not rows.size:
        return None
    pert = np.array([pos[label] for label in sums.labels[rows]], dtype=np.int64)
    return Pseudobulk(sums, rows, pert, _phases(sums, data, cfg.model.use_cycle), ref, cfg.size_factor.use_sf, device)


def _whole_cells(cfg: Config, data: Dataset, model: LowRankNBGLM, ref: float) -> Cells:
    """The training cells of fit_mode whole (the cells of `_fit_rows`' groups)."""
    if data.train is None:
        raise NbglmError("train.fit_mode=whole fits cells, but this dataset holds only their sums: "
                         "build it with its cells (concise mode alone is summarised)")
    x = sp.csr_matrix(data.in_memory().train.X, dtype=np.float32)
    labels = data.train.obs[data.pert_col].astype(str).to_numpy()
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    sf = totals / ref if cfg.size_factor.use_sf else np.ones_like(totals)
    phase = phase_codes(data.train.obs, data.phase_col)[0] if cfg.model.use_cycle else None  # checked by _prepare
    is_ctrl = labels == data.control
    keep = np.isin(labels, data.train_perts) & (totals > 0)
    if cfg.model.use_cycle or cfg.model.learn_theta:
        keep |= is_ctrl & (totals > 0)
    pert = np.full(len(labels), CONTROL_IDX, dtype=np.int64)
    pos = {name: i for i, name in enumerate(model.pert_names)}
    pert[keep & ~is_ctrl] = [pos[p] for p in labels[keep & ~is_ctrl]]
    return Cells(x=x[keep], pert=pert[keep], sf=sf[keep], phase=None if phase is None else phase[keep])


def _lr_lambda(cfg: Config, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over warmup_frac of the steps, then cosine to min_lr (or constant)."""
    sched, base = cfg.train.lr_schedule, cfg.train.lr
    warmup = int(sched.warmup_frac * total_steps)
    floor = min(sched.min_lr / base, 1.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if sched.name == "constant":
            return 1.0
        t = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

    return factor


def _optimizer(model: LowRankNBGLM, cfg: Config) -> torch.optim.AdamW:
    """AdamW; weight decay on weight matrices and the kernel only, not on biases, norms, alpha, theta.
    On a GPU the fused update (a few kernels per step instead of several per parameter)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name != "cycle" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=True if model.b.is_cuda else None)


def _progress_bar(enabled: bool | None, total: int):
    """A rich progress bar on an interactive terminal only; None elsewhere (library code stays quiet)."""
    if not (sys.stdout.isatty() if enabled is None else enabled):
        return None
    from rich.progress import Progress

    bar = Progress(transient=True)
    bar.start()
    return bar, bar.add_task("training", total=total)


def _check_initial(loss: torch.Tensor, cfg: Config) -> bool:
    """Before the first update: a loss that is already not finite comes from the model's starting
    values or the data, which no learning rate can cause; say so (returns False: checked once)."""
    if not math.isfinite(float(loss.detach())):
        m = cfg.model
        raise NbglmError(f"the loss is {float(loss.detach())} before the first update, so the learning rate is not the cause: "
                         f"check model.alpha_init (now {m.alpha_init:g}), model.theta_min / theta_max (now "
                         f"{m.theta_min:g} / {m.theta_max:g}) and model.losses.primary ({m.losses.primary})")
    return False


def fit(cfg: Config, data: Dataset, on_epoch_end: EpochCallback | None = None,
        progress: bool | None = None, val_signal: bool = False) -> FitResult:
    """Fit the model of `cfg` on `data.train`; deterministic on CPU for a given experiment.seed.

    `on_epoch_end(epoch, metrics)` gets {'loss', 'lr', 'epoch_s'} after every epoch (1-based).
    `progress`: show a progress bar (None = only when stdout is a terminal).
    `val_signal`: also put 'val_nll' in each epoch's metrics, the NB NLL of the pseudobulks of the
    `data.test` perturbations the fit never saw. Only a sweep's cross-validation unit asks for it
    (its `data.test` is the fold's validation part): early stopping must never see a test set.
    A non-finite loss stops the fit with an NbglmError naming the epoch.
    """
    if cfg.model.name != "lowrank_nb_glm":
        raise NbglmError(f"model.name = {cfg.model.name!r} is not fitted by nbglm.train: use lowrank_nb_glm")
    t_start = time.perf_counter()
    device = resolve_device(cfg.experiment.device)
    torch.manual_seed(cfg.experiment.seed)
    model, sums, phase, ref = _prepare(cfg, data)
    model.to(device).train()
    val_bulk = _validation_bulk(cfg, data, model, ref, device) if val_signal else None
    loss_name, tcfg = cfg.model.losses.primary, cfg.train

    if tcfg.fit_mode == "whole":
        batches = WholeBatches(_whole_cells(cfg, data, model, ref), device, tcfg.batch_size, cfg.experiment.seed)
        steps_per_epoch = len(batches)
        fn = LOSSES[loss_name]
    else:
        rows, pert = _fit_rows(cfg, data, sums, model)
        bulk = Pseudobulk(sums, rows, pert, phase, ref, cfg.size_factor.use_sf, device)
        steps_per_epoch = tcfg.steps_per_epoch
    del sums

    opt = _optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, tcfg.epochs * steps_per_epoch))
    params = list(model.parameters())
    bar = _progress_bar(progress, tcfg.epochs)

    def step(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        (loss + model.penalty()).backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tcfg.grad_clip)
        opt.step()
        sched.step()

    history: list[dict] = []
    first = True
    try:
        for epoch in range(1, tcfg.epochs + 1):
            t0 = time.perf_counter()
            total, weight = torch.zeros((), device=device), 0
            if tcfg.fit_mode == "whole":
                for pert, log_sf, phase, y in batches.epoch():
                    loss = fn(model(pert, log_sf, phase), y, model.theta).mean()
                    first = first and _check_initial(loss, cfg)
                    step(loss)
                    total += loss.detach() * len(pert)
                    weight += len(pert)
            else:
                for _ in range(steps_per_epoch):
                    loss = bulk.loss(model, loss_name)
                    first = first and _check_initial(loss, cfg)
                    step(loss)
                    total += loss.detach()
                    weight += 1
            epoch_loss = float(total) / weight
            if not math.isfinite(epoch_loss) or not torch.stack([torch.isfinite(p).all() for p in params]).all():
                clip = "" if tcfg.grad_clip > 0 else ", or set train.grad_clip > 0 (now 0: no clipping)"
                raise NbglmError(f"training diverged at epoch {epoch} (loss {epoch_loss}) after a finite start: "
                                 f"lower train.lr (now {tcfg.lr:g}){clip}")
            metrics = {"loss": epoch_loss, "lr": opt.param_groups[0]["lr"], "epoch_s": time.perf_counter() - t0}
            if val_bulk is not None:
                metrics["val_nll"] = val_bulk.nb_nll(model)
            history.append({"epoch": epoch, **metrics})
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if bar is not None:
                bar[0].update(bar[1], advance=1, description=f"training loss {epoch_loss:.4f}")
    finally:
        if bar is not None:
            bar[0].stop()
    model.eval()
    return FitResult(model=model, history=history, wall_time_s=time.perf_counter() - t_start)
