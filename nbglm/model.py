"""The low-rank NB-GLM: per-gene control means shifted by an embedding-bilinear, tanh-bounded effect.

For cell c with perturbation p, size factor s_c and gene g::

    log mu[c, g] = log mu_ctrl[g] + alpha * tanh((G' K P'^T)[g, p] + b[g])
                   (+ beta[g, phase_c], G1 = 0) + log s_c

G' = g_mlp(G), P' = p_mlp(P) embed fixed gene / perturbation embeddings, K = U V^T (rank r) or a
full matrix. Nothing is learned per perturbation, so any perturbation with an embedding row can be
predicted. Control cells have no P row: their effect term is 0 (pert index -1).

This module knows tensors only: no data loading, no training loop, no Ray.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nbglm.config import ModelConfig
from nbglm.data import PHASES
from nbglm.errors import NbglmError

CONTROL_IDX = -1  # pert index of control cells: no effect term

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}


def build_mlp(in_dim: int, hidden: Sequence[int], out_dim: int, activation: str = "gelu",
              norm: str = "none", dropout: float = 0.0) -> nn.Module:
    """Linear -> norm -> activation -> dropout per hidden width, then Linear to `out_dim`.

    With no hidden layers this is the identity (output dim = `in_dim`, `out_dim` unused): a lone
    Linear in front of the kernel K would only re-parametrise K, so it adds nothing but cost.
    """
    if not hidden:
        return nn.Identity()
    layers: list[nn.Module] = []
    prev = in_dim
    for width in hidden:
        layers.append(nn.Linear(prev, width))
        if norm == "batchnorm":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layernorm":
            layers.append(nn.LayerNorm(width))
        layers.append(_ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        prev = width
    layers.append(nn.Linear(prev, out_dim))
    return nn.Sequential(*layers)


class PertGroups(NamedTuple):
    perts: torch.Tensor  # the distinct perturbation indices, control excluded
    inverse: torch.Tensor  # each row's position in [control, *perts] (with a control) or in perts
    has_ctrl: bool


def group_perts(pert_idx: torch.Tensor) -> PertGroups:
    """The distinct perturbations of a batch of rows. On a GPU this waits for the device (the number
    of distinct values decides a shape), so rows that never change are grouped once, not every step."""
    uniq, inv = torch.unique(pert_idx, return_inverse=True)
    has_ctrl = bool(uniq.numel()) and bool(uniq[0] < 0)
    return PertGroups(uniq[1:] if has_ctrl else uniq, inv, has_ctrl)


class LowRankNBGLM(nn.Module):
    """Low-rank NB-GLM over fixed gene (G) and perturbation (P) embeddings.

    Fixed buffers: G, P, log_mu_ctrl, and log_theta unless `cfg.learn_theta` makes it a parameter.
    `gene_names` / `pert_names` label the rows of G / P; pert index i in `forward` means P[i].
    """

    def __init__(self, gene_emb: torch.Tensor, pert_emb: torch.Tensor, mu_ctrl: torch.Tensor,
                 theta: torch.Tensor, cfg: ModelConfig, gene_names: Sequence[str], pert_names: Sequence[str]):
        super().__init__()
        n_genes, d_g = gene_emb.shape
        if len(gene_names) != n_genes or len(pert_names) != pert_emb.shape[0]:
            raise ValueError("gene_names / pert_names must label the rows of gene_emb / pert_emb")
        self.cfg = cfg
        self.gene_names = list(gene_names)
        self.pert_names = list(pert_names)
        self._pert_pos = {name: i for i, name in enumerate(self.pert_names)}

        # Fixed inputs are non-persistent buffers: a checkpoint stores them once, by name (nbglm.checkpoint).
        self.register_buffer("G", gene_emb.float(), persistent=False)
        self.register_buffer("P", pert_emb.float(), persistent=False)
        self.register_buffer("log_mu_ctrl", mu_ctrl.float().log(), persistent=False)
        log_theta = theta.float().clamp(cfg.theta_min, cfg.theta_max).log()
        if cfg.learn_theta:
            self.log_theta = nn.Parameter(log_theta)
        else:
            self.register_buffer("log_theta", log_theta, persistent=False)

        mlp = dict(activation=cfg.gp_activation, norm=cfg.gp_norm, dropout=cfg.gp_dropout)
        self.g_mlp = build_mlp(d_g, cfg.g_mlp_hidden, cfg.g_out_dim, **mlp)
        self.p_mlp = build_mlp(pert_emb.shape[1], cfg.p_mlp_hidden, cfg.p_out_dim, **mlp)
        dg_out = cfg.g_out_dim if cfg.g_mlp_hidden else d_g
        dp_out = cfg.p_out_dim if cfg.p_mlp_hidden else pert_emb.shape[1]
        # K starts at 0 (V = 0, or K = 0 at full rank): the untrained model is the control-mean model.
        if cfg.rank is None:
            self.K = nn.Parameter(torch.zeros(dg_out, dp_out))
        else:
            self.U = nn.Parameter(torch.randn(dg_out, cfg.rank) / dg_out**0.5)
            self.V = nn.Parameter(torch.zeros(dp_out, cfg.rank))
        self.b = nn.Parameter(torch.zeros(n_genes))
        self.alpha = nn.Parameter(torch.tensor(float(cfg.alpha_init)))
        self.cycle = nn.Parameter(torch.zeros(n_genes, len(PHASES) - 1)) if cfg.use_cycle else None

    @property
    def n_genes(self) -> int:
        return self.G.shape[0]

    @property
    def theta(self) -> torch.Tensor:
        """Per-gene NB dispersion (variance = mu + mu^2 / theta), kept in [theta_min, theta_max]."""
        return self.log_theta.exp().clamp(self.cfg.theta_min, self.cfg.theta_max)

    def kernel(self) -> torch.Tensor:
        """K (d_g' x d_p'), of rank <= cfg.rank."""
        return self.K if self.cfg.rank is None else self.U @ self.V.T

    def penalty(self) -> torch.Tensor:
        """l1 * |K|_1 + l2 * |K|_F^2 (on K itself, so the rank does not change what is penalised)."""
        reg = self.cfg.regularization
        if reg.l1 == 0 and reg.l2 == 0:
            return self.b.new_zeros(())
        k = self.kernel()
        return reg.l1 * k.abs().sum() + reg.l2 * k.square().sum()

    def effects(self, pert_idx: torch.Tensor) -> torch.Tensor:
        """Log fold change over control, alpha * tanh(G' K P'^T + b), for perts `pert_idx` (k x n_genes).

        The gene side is computed once for all genes; the factored form keeps it O(n_genes * r).
        """
        g = self.g_mlp(self.G)
        p = self.p_mlp(self.P[pert_idx])
        if self.cfg.rank is None:
            raw = p @ (g @ self.K).T
        else:
            raw = (p @ self.V) @ (g @ self.U).T
        return self.alpha * torch.tanh(raw + self.b)

    def forward(self, pert_idx: torch.Tensor, log_sf: torch.Tensor, phase_idx: torch.Tensor | None = None,
                groups: PertGroups | None = None) -> torch.Tensor:
        """Log-mean counts (n x n_genes) for cells with perturbation index (-1 = control),
        log size factor and phase index (0/1/2 = G1/S/G2M; None = G1). `groups`: `group_perts(pert_idx)`,
        for a caller that passes the same rows every step."""
        perts, inv, has_ctrl = groups if groups is not None else group_perts(pert_idx)
        eff = self.effects(perts)
        if has_ctrl:
            eff = F.pad(eff, (0, 0, 1, 0))  # the control row: no effect
        # index_select, not eff[inv]: its backward sums in a fixed order, so CPU fits are reproducible.
        log_mu = self.log_mu_ctrl + eff.index_select(0, inv) + log_sf.unsqueeze(1)
        if self.cycle is not None and phase_idx is not None:
            log_mu = log_mu + F.pad(self.cycle, (1, 0)).T.index_select(0, phase_idx)
        return log_mu

    def pert_index(self, names: Sequence[str]) -> torch.Tensor:
        """Row indices in P for perturbation labels; a label with no embedding is an NbglmError."""
        missing = [n for n in names if n not in self._pert_pos]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise NbglmError(f"{len(missing)} perturbation(s) have no embedding: {shown} "
                             "(add them to the perturbation embedding table)")
        return torch.tensor([self._pert_pos[n] for n in names], dtype=torch.long, device=self.P.device)

    def check_genes(self, gene_names: Sequence[str]) -> None:
        """Refuse data whose genes (or gene order) differ from the ones the model was trained on."""
        genes = list(gene_names)
        if genes == self.gene_names:
            return
        if len(genes) != len(self.gene_names):
            raise NbglmError(f"the model was trained on {len(self.gene_names)} genes but the data has {len(genes)}: "
                             "use the checkpoint that was trained on this data")
        i = next(i for i, (a, b) in enumerate(zip(genes, self.gene_names)) if a != b)
        raise NbglmError(f"gene {i} is '{genes[i]}' in the data but '{self.gene_names[i]}' in the model: "
                         "the data's genes must be the training genes, in the training order")

    def model_config(self) -> dict:
        return dataclasses.asdict(self.cfg)
