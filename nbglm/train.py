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
import pandas as pd
import scipy.sparse as sp
import torch

from nbglm.config import Config, ModelConfig
from nbglm.data import PHASES, Dataset
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


def phase_indices(obs: pd.DataFrame, phase_col: str | None) -> np.ndarray:
    """Phase labels G1/S/G2M -> 0/1/2; any other label is an NbglmError listing it."""
    if phase_col is None or phase_col not in obs.columns:
        raise NbglmError(f"model.use_cycle is on but the data has no phase column {phase_col!r}: "
                         "set data.phase_column to the obs column with G1/S/G2M, or model.use_cycle=false")
    labels = obs[phase_col].astype(str).to_numpy()
    codes = pd.Categorical(labels, categories=PHASES).codes.astype(np.int64)
    if (codes < 0).any():
        bad = sorted(set(labels[codes < 0]))
        raise NbglmError(f"phase column {phase_col!r} has values {bad[:5]}; expected only {list(PHASES)}")
    return codes


def control_stats(x: sp.csr_matrix, sf: np.ndarray, mcfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Control mean per unit size factor, and per-gene NB dispersion by method of moments.

    Under y ~ NB(s m, theta), Var(y/s) averages to m E[1/s] + m^2/theta, hence
    theta = m^2 / (Var(y/s) - m E[1/s]); genes with no excess variance get theta_max.
    A gene never seen in controls gets mu_ctrl = 0.1 counts over all control cells, so log mu is finite.
    """
    total_sf = float(sf.sum())
    mu = np.asarray(x.sum(axis=0)).ravel() / total_sf
    norm = sp.diags(1.0 / sf) @ x
    mean = np.asarray(norm.mean(axis=0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(axis=0)).ravel() - mean**2
    excess = var - mean * float(np.mean(1.0 / sf))
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, mean**2 / excess, mcfg.theta_max)
    theta = np.clip(np.nan_to_num(theta, nan=mcfg.theta_max), mcfg.theta_min, mcfg.theta_max)
    return np.maximum(mu, 0.1 / total_sf), theta


def build_model(cfg: Config, data: Dataset, mu_ctrl: np.ndarray, theta: np.ndarray) -> LowRankNBGLM:
    """A fresh model over all embedding rows of `data` (training and held-out perturbations)."""
    return LowRankNBGLM(
        gene_emb=torch.tensor(np.asarray(data.gene_emb, dtype=np.float32)),  # copies: object-store arrays are read-only
        pert_emb=torch.tensor(data.pert_emb.to_numpy(dtype=np.float32)),
        mu_ctrl=torch.as_tensor(mu_ctrl, dtype=torch.float32),
        theta=torch.as_tensor(theta, dtype=torch.float32),
        cfg=cfg.model, gene_names=data.gene_names, pert_names=[str(p) for p in data.pert_emb.index],
    )


@dataclass
class _Cells:
    """Training cells in CPU numpy form, before they move to the device."""

    x: sp.csr_matrix  # counts, cells x genes
    pert: np.ndarray  # index into the model's P, CONTROL_IDX for control cells
    sf: np.ndarray  # size factors (1 when size_factor.use_sf is off)
    phase: np.ndarray | None  # 0/1/2, with model.use_cycle only


def _prepare(cfg: Config, data: Dataset) -> tuple[LowRankNBGLM, _Cells, float]:
    """Control statistics, the model, the cells the fit sees, and the reference total count that
    turns a cell's total into its size factor."""
    mcfg = cfg.model
    adata = data.train
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    labels = adata.obs[data.pert_col].astype(str).to_numpy()
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    ref = float(np.median(totals))
    if ref <= 0:
        raise NbglmError("the median total count of the training cells is 0: the training matrix must hold raw counts")
    sf = totals / ref if cfg.size_factor.use_sf else np.ones_like(totals)
    phase = phase_indices(adata.obs, data.phase_col) if mcfg.use_cycle else None

    is_ctrl = labels == data.control
    if not is_ctrl.any():
        raise NbglmError(f"no control cells ('{data.control}' in obs['{data.pert_col}']) in the training data: "
                         "set data.control_name")
    ref_ctrl = is_ctrl & (phase == 0) if phase is not None and (is_ctrl & (phase == 0)).any() else is_ctrl
    mu_ctrl, theta = control_stats(x[ref_ctrl & (totals > 0)], sf[ref_ctrl & (totals > 0)], mcfg)
    model = build_model(cfg, data, mu_ctrl, theta)

    train_perts = set(data.train_perts)
    if not train_perts:
        raise NbglmError("no training perturbation has an embedding: check the perturbation embedding table")
    keep = np.isin(labels, list(train_perts)) & (totals > 0)  # a cell with no counts has no size factor
    if mcfg.use_cycle or mcfg.learn_theta:
        keep |= is_ctrl & (totals > 0)
    pert = np.full(len(labels), CONTROL_IDX, dtype=np.int64)
    pos = {name: i for i, name in enumerate(model.pert_names)}
    pert[keep & ~is_ctrl] = [pos[p] for p in labels[keep & ~is_ctrl]]
    cells = _Cells(x=x[keep], pert=pert[keep], sf=sf[keep], phase=None if phase is None else phase[keep])
    return model, cells, ref


def _validation_cells(cfg: Config, data: Dataset, model: LowRankNBGLM, ref: float) -> _Cells | None:
    """The cells of `data.test` whose perturbation the model knows and the fit never saw (a sweep
    unit's validation perturbations), sized like the training cells; None when there are none."""
    if data.test is None:
        return None
    x = sp.csr_matrix(data.test.X, dtype=np.float32)
    labels = data.test.obs[data.pert_col].astype(str).to_numpy()
    totals = np.asarray(x.sum(axis=1)).ravel().astype(np.float64)
    pos = {name: i for i, name in enumerate(model.pert_names)}
    keep = np.isin(labels, list(set(pos) - set(data.train_perts) - {data.control})) & (totals > 0)
    if not keep.any():
        return None
    sf = totals / ref if cfg.size_factor.use_sf else np.ones_like(totals)
    phase = phase_indices(data.test.obs, data.phase_col)[keep] if cfg.model.use_cycle else None
    return _Cells(x=x[keep], pert=np.array([pos[p] for p in labels[keep]], dtype=np.int64), sf=sf[keep], phase=phase)


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
    """AdamW; weight decay on weight matrices and the kernel only, not on biases, norms, alpha, theta."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and name != "cycle" else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


class _WholeBatches:
    """Cells on the device, dense when that is smaller than CSR (density >= 1/3: 4 bytes per element
    versus 12 per non-zero), else as CSR arrays whose batches are densified by index arithmetic."""

    def __init__(self, cells: _Cells, device: torch.device, batch_size: int, seed: int):
        x = cells.x
        self.n, self.n_genes, self.batch_size, self.device = x.shape[0], x.shape[1], batch_size, device
        if 3 * x.nnz >= self.n * self.n_genes:
            self.x = torch.as_tensor(x.toarray(), device=device)
        else:
            self.x = None
            self.crow = torch.as_tensor(x.indptr.astype(np.int64), device=device)
            self.col = torch.as_tensor(x.indices.astype(np.int64), device=device)
            self.val = torch.as_tensor(x.data, device=device)
        self.pert = torch.as_tensor(cells.pert, device=device)
        self.log_sf = torch.as_tensor(np.log(cells.sf), dtype=torch.float32, device=device)
        self.phase = None if cells.phase is None else torch.as_tensor(cells.phase, device=device)
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def _rows(self, idx: torch.Tensor) -> torch.Tensor:
        if self.x is not None:
            return self.x[idx]
        start = self.crow[idx]
        counts = self.crow[idx + 1] - start
        rows = torch.repeat_interleave(torch.arange(len(idx), device=self.device), counts)
        offsets = torch.cumsum(counts, 0) - counts
        nnz_pos = torch.arange(rows.numel(), device=self.device) - offsets[rows] + start[rows]
        out = torch.zeros(len(idx), self.n_genes, device=self.device)
        out[rows, self.col[nnz_pos]] = self.val[nnz_pos]
        return out

    def epoch(self):
        perm = torch.randperm(self.n, generator=self.gen).to(self.device)
        for idx in perm.split(self.batch_size):
            phase = None if self.phase is None else self.phase[idx]
            yield self.pert[idx], self.log_sf[idx], phase, self._rows(idx)


class _Pseudobulk:
    """Per perturbation (x phase) sums: Y (groups x genes), S, Q = sum s^2, n; on the device."""

    def __init__(self, cells: _Cells, device: torch.device):
        key = (cells.pert + 1) * len(PHASES) + (0 if cells.phase is None else cells.phase)
        uniq, inv = np.unique(key, return_inverse=True)
        ind = sp.csr_matrix((np.ones(len(inv), dtype=np.float64), (inv, np.arange(len(inv)))),
                            shape=(len(uniq), len(inv)))
        as_t = dict(dtype=torch.float32, device=device)
        self.y = torch.as_tensor((ind @ cells.x.astype(np.float64)).toarray(), **as_t)
        self.s = torch.as_tensor(np.bincount(inv, weights=cells.sf), **as_t)
        self.q = torch.as_tensor(np.bincount(inv, weights=cells.sf**2), **as_t)
        self.n = torch.as_tensor(np.bincount(inv), **as_t)
        self.pert = torch.as_tensor(uniq // len(PHASES) - 1, device=device)
        self.phase = torch.as_tensor(uniq % len(PHASES), device=device) if cells.phase is not None else None
        self.n_elements = float(len(inv)) * cells.x.shape[1]

    @torch.no_grad()
    def nb_nll(self, model: LowRankNBGLM) -> float:
        """NB negative log-likelihood per cell-gene element of the pseudobulks, the model in eval mode:
        the validation signal of early stopping (no sampling, one forward pass)."""
        was_training = model.training
        model.eval()
        value = float(self.loss(model, "nb_nll"))
        model.train(was_training)
        return value

    def loss(self, model: LowRankNBGLM, name: str) -> torch.Tensor:
        fn = LOSSES[name]
        if name == "mse_log1p":
            log_mu = model(self.pert, (self.s / self.n).log(), self.phase)
            return (self.n[:, None] * fn(log_mu, self.y / self.n[:, None])).sum() / self.n_elements
        log_mu = model(self.pert, self.s.log(), self.phase)
        theta = model.theta * (self.s.square() / self.q)[:, None]
        return fn(log_mu, self.y, theta).sum() / self.n_elements


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
    model, cells, ref = _prepare(cfg, data)
    model.to(device).train()
    held = _validation_cells(cfg, data, model, ref) if val_signal else None
    val_bulk = _Pseudobulk(held, device) if held is not None else None
    loss_name, tcfg = cfg.model.losses.primary, cfg.train

    if tcfg.fit_mode == "whole":
        batches = _WholeBatches(cells, device, tcfg.batch_size, cfg.experiment.seed)
        steps_per_epoch = len(batches)
        fn = LOSSES[loss_name]
    else:
        bulk = _Pseudobulk(cells, device)
        steps_per_epoch = tcfg.steps_per_epoch
    del cells

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
            if not math.isfinite(epoch_loss) or not all(torch.isfinite(p).all() for p in params):
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
