"""What one step of a fit sees (`nbglm.train`): shuffled minibatches of cells on the device
(fit_mode whole), or every perturbation's pseudobulk sums at once (concise, see the loss notes in
:mod:`nbglm.train`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from nbglm.data import PHASES
from nbglm.data.dataset import GroupSums
from nbglm.losses import LOSSES, nb_nll_sum
from nbglm.model import LowRankNBGLM, group_perts


@dataclass
class Cells:
    """Training cells in CPU numpy form, before they move to the device (fit_mode whole)."""

    x: sp.csr_matrix  # counts, cells x genes
    pert: np.ndarray  # index into the model's P, CONTROL_IDX for control cells
    sf: np.ndarray  # size factors (1 when size_factor.use_sf is off)
    phase: np.ndarray | None  # 0/1/2, with model.use_cycle only


class WholeBatches:
    """Cells on the device, dense when that is smaller than CSR (density >= 1/3: 4 bytes per element
    versus 12 per non-zero), else as CSR arrays whose batches are densified by index arithmetic."""

    def __init__(self, cells: Cells, device: torch.device, batch_size: int, seed: int):
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


class Pseudobulk:
    """Per perturbation (x phase) sums: Y (groups x genes), S, Q = sum s^2, n; on the device.

    Built from group sums (`rows` of `sums`, their model index `pert`), merged by (perturbation,
    phase) with `phase`, by perturbation without."""

    def __init__(self, sums: GroupSums, rows: np.ndarray, pert: np.ndarray, phase: np.ndarray | None, ref: float,
                 use_sf: bool, device: torch.device):
        key = (pert + 1) * len(PHASES) + (0 if phase is None else phase[rows])
        uniq, inv = np.unique(key, return_inverse=True)
        merge = sp.csr_matrix((np.ones(rows.size), (inv, np.arange(rows.size))), shape=(uniq.size, rows.size))
        n = sums.n[rows].astype(np.float64)
        s, q = (sums.t1[rows] / ref, sums.t2[rows] / ref**2) if use_sf else (n, n)
        as_t = dict(dtype=torch.float32, device=device)
        self.y = torch.as_tensor(merge @ sums.y[rows], **as_t)
        self.s = torch.as_tensor(merge @ s, **as_t)
        self.q = torch.as_tensor(merge @ q, **as_t)
        self.n = torch.as_tensor(merge @ n, **as_t)
        self.pert = torch.as_tensor(uniq // len(PHASES) - 1, device=device)
        self.groups = group_perts(self.pert)
        self.phase = torch.as_tensor(uniq % len(PHASES), device=device) if phase is not None else None
        self.n_elements = float(n.sum()) * sums.y.shape[1]

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
            log_mu = model(self.pert, (self.s / self.n).log(), self.phase, self.groups)
            return (self.n[:, None] * fn(log_mu, self.y / self.n[:, None])).sum() / self.n_elements
        log_mu = model(self.pert, self.s.log(), self.phase, self.groups)
        theta = model.theta * (self.s.square() / self.q)[:, None]
        total = nb_nll_sum(log_mu, self.y, theta) if name == "nb_nll" else fn(log_mu, self.y, theta).sum()
        return total / self.n_elements
