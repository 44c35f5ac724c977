"""Checkpoints: one file that rebuilds the model with no other input (no data, no config file).

Holds the learned state dict, the model config, gene / perturbation names, the fixed inputs G, P
(all rows, held-out included), mu_ctrl and theta, and the resolved experiment config for reference.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nbglm import atomic
from nbglm.config import Config, from_dict, to_dict
from nbglm.errors import NbglmError
from nbglm.model import LowRankNBGLM

CKPT_FORMAT = 1


def save_checkpoint(path: str | Path, model: LowRankNBGLM, cfg_dict: dict | Config,
                    gene_names: list[str] | None = None, pert_names: list[str] | None = None) -> Path:
    """Write `path` (e.g. <bundle>/ckpt/model.pt) atomically: a temp file beside it, then os.replace.

    Holds the learned state dict, the model config, gene / perturbation names (default: the
    model's), the fixed inputs G, P (all rows, held-out included), mu_ctrl and theta, and the
    resolved experiment config for reference.
    """
    genes = model.gene_names if gene_names is None else list(gene_names)
    perts = model.pert_names if pert_names is None else list(pert_names)
    if len(genes) != model.n_genes or len(perts) != model.P.shape[0]:
        raise ValueError("gene_names / pert_names do not match the model's G / P rows")
    payload = {
        "format": CKPT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": model.model_config(),
        "config": to_dict(cfg_dict) if isinstance(cfg_dict, Config) else cfg_dict,
        "gene_names": genes,
        "pert_names": perts,
        "G": model.G.cpu(),
        "P": model.P.cpu(),
        "mu_ctrl": model.log_mu_ctrl.exp().cpu(),
        "theta": model.theta.detach().cpu(),
    }
    path = Path(path)
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LowRankNBGLM:
    """Rebuild the model (in eval mode, names attached) from a checkpoint file alone."""
    path = Path(path)
    if not path.is_file():
        raise NbglmError(f"checkpoint not found: {path}")
    atomic.refuse_failed(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        fmt = ckpt.get("format")
    except Exception as exc:  # torch raises many types for a truncated or foreign file
        raise NbglmError(f"cannot read checkpoint {path}: {type(exc).__name__} (is it an nbglm ckpt/model.pt?)") from None
    if fmt != CKPT_FORMAT:
        raise NbglmError(f"checkpoint {path} has format {fmt!r}; this nbglm reads format {CKPT_FORMAT}")
    mcfg = from_dict({"model": ckpt["model_config"]}).model
    model = LowRankNBGLM(ckpt["G"], ckpt["P"], ckpt["mu_ctrl"], ckpt["theta"], mcfg,
                         gene_names=ckpt["gene_names"], pert_names=ckpt["pert_names"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval()
