"""Sampling predicted cells for the held-out perturbations -> AnnData (the pred.h5ad layout).

Per held-out perturbation: n_cells library sizes are drawn log-normally around its median UMI
(rescaled so their median is exactly that median), the model's mean profile is scaled to each
library size, and counts are drawn from it. The model fixes the composition of a cell; the drawn
library size fixes its depth, so the requested median UMI holds whatever the size-factor setting.
"""

from __future__ import annotations

from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from nbglm.config import Config
from nbglm.data import PHASES, Dataset
from nbglm.data.rows import return_freed_memory, stack_csr
from nbglm.errors import NbglmError
from nbglm.model import LowRankNBGLM


def _column(frame: pd.DataFrame, name: str, default: float) -> np.ndarray:
    """A numeric column of the held-out list with missing values (or a missing column) = default."""
    if name not in frame.columns:
        return np.full(len(frame), default, dtype=np.float64)
    return pd.to_numeric(frame[name], errors="coerce").fillna(default).to_numpy(dtype=np.float64)


def _phase_probs(strategy: str, data: Dataset) -> np.ndarray:
    """Probabilities of G1/S/G2M for the predicted cells' cycle offsets."""
    if strategy == "ignore":
        return np.array([1.0, 0.0, 0.0])
    if strategy.startswith("fixed_"):
        return np.eye(len(PHASES))[PHASES.index(strategy.removeprefix("fixed_"))]
    if data.phase_col is None:
        raise NbglmError(f"sampling.phase_strategy={strategy} needs a phase column in the training data: "
                         "set data.phase_column, or use phase_strategy ignore / fixed_G1 / fixed_S / fixed_G2M")
    if data.sums is not None:
        sums = data.sums.train
        use = sums.labels == data.control if strategy == "control" else np.ones(sums.labels.size, bool)
        freq = np.bincount(sums.phase[use & (sums.phase >= 0)], weights=sums.n_all[use & (sums.phase >= 0)],
                           minlength=len(PHASES)).astype(np.float64)
    else:
        obs = data.train.obs
        if strategy == "control":
            obs = obs[obs[data.pert_col].astype(str) == data.control]
        counts = obs[data.phase_col].astype(str).value_counts()
        freq = np.array([counts.get(p, 0) for p in PHASES], dtype=np.float64)
    if freq.sum() == 0:
        raise NbglmError(f"no G1/S/G2M labels in '{data.phase_col}' for phase_strategy={strategy}")
    return freq / freq.sum()


def library_sizes(rng: np.random.Generator, n: int, median: float, cv: float) -> np.ndarray:
    """n log-normal library sizes with coefficient of variation `cv`, rescaled to median `median`."""
    sigma = np.sqrt(np.log1p(cv**2))
    sizes = np.exp(rng.normal(0.0, sigma, n))
    return sizes * (median / np.median(sizes))


_TRIM_BYTES = 64 << 20


def _stack(blocks: list[sp.csr_matrix]) -> sp.csr_matrix:
    """The float32 CSR blocks stacked by rows; each block is freed as it is copied, so the peak is
    the result plus one block (`sp.vstack` holds the blocks and the result). The blocks are small
    arrays that glibc carves from its heap and keeps when they are freed, so their pages are given
    back every 64 MiB of copied blocks, not only at the end (which would hold blocks and result)."""
    shape = (sum(b.shape[0] for b in blocks), blocks[0].shape[1])
    nnz = sum(b.nnz for b in blocks)

    def popped() -> Iterator[tuple[int, sp.csr_matrix]]:
        row, copied = 0, 0
        while blocks:
            block = blocks.pop(0)
            yield row, block
            row, copied = row + block.shape[0], copied + block.data.nbytes + block.indices.nbytes
            del block
            if copied >= _TRIM_BYTES:
                return_freed_memory()
                copied = 0

    x = stack_csr(popped(), shape, nnz, np.float32)
    return_freed_memory()
    return x


@torch.inference_mode()
def sample_heldout(model: LowRankNBGLM, data: Dataset, cfg: Config, seed: int) -> ad.AnnData:
    """Predicted cells for every held-out perturbation of `data`, plus control cells: the real ones
    or, with sampling.control_cells=model, as many drawn from the model with no effect.

    Returns float32 CSR integer counts, genes in training order, obs[pert_col] = perturbation
    (the control label for control cells). See `sample_blocks` for the same cells a block at a time.
    """
    obs, blocks = sample_blocks(model, data, cfg, seed)
    x = _stack(list(blocks))
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=pd.Index(model.gene_names)))


def sample_blocks(model: LowRankNBGLM, data: Dataset, cfg: Config,
                  seed: int) -> tuple[pd.DataFrame, Iterator[sp.csr_matrix]]:
    """The cells of `sample_heldout` as (their obs, an iterator of float32 CSR row blocks): cells are
    drawn in batches of sampling.batch_cells as the iterator is read, so memory is bounded by
    batch_cells x n_genes whatever the total, and a caller that writes each block to disk never
    holds the prediction. Every check runs before this returns."""
    scfg = cfg.sampling
    model.check_genes(data.gene_names)
    perts = [str(p) for p in data.heldout["target_gene"]]
    if not perts:
        raise NbglmError("the held-out list is empty: there are no perturbations to sample")
    pert_idx = model.pert_index(perts)
    ctrl_totals = data.control_totals()
    ctrl_median = float(np.median(ctrl_totals)) if ctrl_totals.size else None
    median_default = ctrl_median if scfg.median_umi_default is None else scfg.median_umi_default
    if median_default is None:
        raise NbglmError("sampling.median_umi_default is null but there are no control cells to take it from")
    n_cells = np.round(_column(data.heldout, "n_cells", scfg.n_cells_default)).astype(np.int64)
    medians = _column(data.heldout, "median_umi_per_cell", median_default)
    if (n_cells < 1).any() or (medians <= 0).any():
        bad = perts[int(np.flatnonzero((n_cells < 1) | (medians <= 0))[0])]
        raise NbglmError(f"held-out perturbation {bad} has n_cells < 1 or median_umi_per_cell <= 0 in the held-out list")

    rng = np.random.default_rng(seed)
    with torch.inference_mode():
        was_training = model.training
        model.eval()
        profile = (model.log_mu_ctrl + model.effects(pert_idx)).cpu()  # log mean at unit size factor, G1
        cycle = None if model.cycle is None else torch.nn.functional.pad(model.cycle, (1, 0)).T.cpu()
        theta = model.theta.cpu().numpy().astype(np.float32)
        model.train(was_training)
    labels = np.array(perts, dtype=object)
    if scfg.control_cells == "model":  # one more group: no effect, the real controls' count and depth
        if ctrl_median is None:
            raise NbglmError("sampling.control_cells=model draws as many control cells as the data has, but it "
                             "has none; add control cells or set sampling.control_cells=real")
        profile = torch.cat([profile, model.log_mu_ctrl.detach().cpu()[None]])
        n_cells, medians = np.append(n_cells, ctrl_totals.size), np.append(medians, ctrl_median)
        labels = np.append(labels, data.control)

    cell_pert = np.repeat(np.arange(len(labels)), n_cells)
    depth = np.concatenate([library_sizes(rng, n, m, scfg.library_size_cv) for n, m in zip(n_cells, medians)])
    phase = (rng.choice(len(PHASES), size=len(cell_pert), p=_phase_probs(scfg.phase_strategy, data))
             if cycle is not None else None)
    gamma = scfg.sampler == "gp_mixture" or scfg.gamma_heterogeneity.enable
    r0 = scfg.gamma_heterogeneity.r0
    obs = pd.DataFrame({data.pert_col: labels[cell_pert]}, index=[f"pred_{i}" for i in range(len(cell_pert))])
    controls = data.control_cells() if scfg.control_cells == "real" else None
    if controls is not None:
        obs = pd.concat([obs, pd.DataFrame({data.pert_col: data.control}, index=controls.obs_names.astype(str))])
    obs[data.pert_col] = pd.Categorical(obs[data.pert_col])

    def blocks() -> Iterator[sp.csr_matrix]:
        for start in range(0, len(cell_pert), scfg.batch_cells):
            sl = slice(start, start + scfg.batch_cells)
            log_mu = profile[cell_pert[sl]]
            if cycle is not None:
                log_mu = log_mu + cycle[phase[sl]]
            scale = depth[sl] * (rng.gamma(r0, 1.0 / r0, len(depth[sl])) if gamma else 1.0)
            mu = torch.softmax(log_mu, dim=1).numpy()  # in place from here: a batch is ~16 B per cell x gene
            mu *= scale[:, None].astype(np.float32)
            if scfg.sampler == "nb":
                mu /= theta
                mu *= rng.standard_gamma(np.broadcast_to(theta, mu.shape), dtype=np.float32)
            counts = rng.poisson(mu)
            del mu, log_mu
            yield sp.csr_matrix(counts).astype(np.float32)
            del counts
        if controls is not None:
            yield sp.csr_matrix(controls.X, dtype=np.float32)

    return obs, blocks()
