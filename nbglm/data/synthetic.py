"""Built-in synthetic Perturb-seq dataset, so every command runs with no input files.

The generator plants a structure the model can actually learn: perturbation effects come from a
low-rank gene-program interaction z_g^T M z_t between each gene g and the perturbation's target t,
and the shipped embeddings are noisy linear images of the same latent z. Held-out perturbations
are therefore predictable from their embeddings alone, as on real data (only better behaved).

Counts are gamma-Poisson (negative binomial) around
    mu[c, g] = L_c * p_g * exp(lfc[p, g] + phase_offset[phase_c, g]) / norm[p, phase_c]
with log-normal baseline proportions p_g, log-normal library sizes L_c, a per-gene dispersion
that grows with the mean, CRISPRi-like knock-down of each target and G1/S/G2M phase offsets on a
few cycle genes. `norm` keeps each cell's expected total at L_c, so perturbations change the
composition, not the depth; `true_lfc` is the resulting log fold change of the mean versus
control at equal depth (G1 phase).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from nbglm import atomic
from nbglm.config import SyntheticConfig
from nbglm.data.dataset import PHASES
from nbglm.data.io import val_list
from nbglm.errors import NbglmError

log = logging.getLogger("nbglm")

# Bump when the generator changes, so stale caches are not reused.
GENERATOR_VERSION = 2

PHASE_PROBS = (0.5, 0.3, 0.2)
LATENT_DIM = 8  # rank of the planted gene-program structure
EMBED_DIM = 64  # width of the shipped gene/perturbation embeddings
MEDIAN_LIBRARY = 3000.0  # median UMIs per cell
LIBRARY_SIGMA = 0.4  # log-normal spread of library sizes
MAX_ABS_LFC = 2.0  # bound on downstream effects (natural log)
CHUNK_CELLS = 2048  # cells drawn per block: bounds memory, fixed so the RNG stream is too

FILES = ("train.h5ad", "test.h5ad", "val_list.csv", "gene_embedding.csv", "pert_embedding.csv",
         "true_lfc.csv")


@dataclass
class SyntheticData:
    """The built-in dataset in the same shapes a user's own files would have."""

    train: ad.AnnData  # control + training perturbations
    test: ad.AnnData  # the same control cells + held-out perturbations
    val: pd.DataFrame  # target_gene, n_cells, median_umi_per_cell for held-out perts (from test)
    gene_emb: pd.DataFrame  # index: gene symbols, EMBED_DIM float32 columns
    pert_emb: pd.DataFrame  # index: perturbation labels (train + held-out), float32 columns
    true_lfc: pd.DataFrame  # perturbations x genes, natural-log fold change of the mean vs control


def gene_symbols(n_genes: int) -> list[str]:
    width = max(4, len(str(n_genes)))
    return [f"G{i:0{width}d}" for i in range(1, n_genes + 1)]


def _generate(cfg: SyntheticConfig, pert_col: str, control: str) -> SyntheticData:
    rng = np.random.default_rng(cfg.seed)
    n_genes = cfg.n_genes
    n_perts = cfg.n_train_perts + cfg.n_test_perts
    if n_perts > n_genes:
        raise NbglmError(f"synthetic data needs n_train_perts + n_test_perts ({n_perts}) <= n_genes "
                         f"({n_genes}): every perturbation targets a distinct gene")
    genes = np.array(gene_symbols(n_genes))

    # Baseline composition: proportions spread over orders of magnitude.
    prop = np.exp(rng.normal(0.0, 1.6, n_genes))
    prop /= prop.sum()
    ctrl_mean = MEDIAN_LIBRARY * prop
    # Dispersion: theta grows with the mean (low genes near-Poisson in absolute terms, high
    # genes clearly over-dispersed relative to Poisson), with per-gene noise.
    theta = np.clip((0.5 + 2.0 * np.sqrt(ctrl_mean)) * np.exp(rng.normal(0.0, 0.3, n_genes)), 0.1, 100.0)

    # Gene programs: a sparse latent z_g per gene (most genes in no program) and an interaction M.
    member = rng.random((n_genes, LATENT_DIM)) < 0.12
    z = np.where(member, rng.normal(0.0, 1.0, (n_genes, LATENT_DIM)), 0.0)
    z += rng.normal(0.0, 0.1, (n_genes, LATENT_DIM))
    interaction = rng.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (LATENT_DIM, LATENT_DIM))

    # Targets are distinct expressed genes (so the knock-down is visible), mostly program members
    # (so most perturbations have downstream effects; the rest only knock down their target).
    expressed = np.argsort(-prop)[: max(n_perts, n_genes // 2)]
    weight = 0.25 + member[expressed].any(axis=1)
    targets = rng.choice(expressed, size=n_perts, replace=False, p=weight / weight.sum())
    labels = genes[targets]

    raw = z[targets] @ interaction.T @ z.T  # raw[p, g] = z_g^T M z_t
    raw /= np.quantile(np.abs(raw), 0.99) / MAX_ABS_LFC  # top 1% of effects reach the bound
    strength = rng.uniform(0.5, 1.5, n_perts)
    strength[rng.random(n_perts) < 0.15] *= 0.1  # near-null perturbations
    lfc = strength[:, None] * raw
    lfc = np.sign(lfc) * np.maximum(np.abs(lfc) - 0.05, 0.0)  # most genes: no effect at all
    lfc = MAX_ABS_LFC * np.tanh(lfc / MAX_ABS_LFC)
    lfc[np.arange(n_perts), targets] = -rng.uniform(1.5, 3.0, n_perts)  # CRISPRi knock-down

    # Cell-cycle: S and G2M raise two small disjoint sets of cycle genes (G1 = reference).
    phase_off = np.zeros((len(PHASES), n_genes))
    cycle = rng.permutation(n_genes)[: max(2, n_genes // 10)]
    s_genes, g2m_genes = cycle[: len(cycle) // 2], cycle[len(cycle) // 2:]
    phase_off[1, s_genes] = rng.uniform(0.5, 1.2, len(s_genes))
    phase_off[2, g2m_genes] = rng.uniform(0.5, 1.5, len(g2m_genes))

    # Group 0 is control; composition per (group, phase), renormalised to sum to one.
    group_lfc = np.vstack([np.zeros((1, n_genes)), lfc])
    comp = prop[None, None, :] * np.exp(group_lfc[:, None, :] + phase_off[None, :, :])
    norm = comp.sum(axis=2, keepdims=True)
    comp /= norm
    true_lfc = lfc - np.log(norm[1:, 0, :])  # vs control (norm 1) in G1

    # Cells: controls, then each perturbation with a slightly varying count.
    n_cells = rng.integers(int(0.8 * cfg.cells_per_pert), int(1.2 * cfg.cells_per_pert) + 1, n_perts)
    n_cells = np.maximum(n_cells, 2)
    group = np.repeat(np.arange(n_perts + 1), np.concatenate([[cfg.n_control], n_cells]))
    phase = rng.choice(len(PHASES), size=group.size, p=PHASE_PROBS)
    library = MEDIAN_LIBRARY * np.exp(rng.normal(0.0, LIBRARY_SIGMA, group.size))

    theta32 = theta.astype(np.float32)
    blocks = []
    for start in range(0, group.size, CHUNK_CELLS):
        sl = slice(start, start + CHUNK_CELLS)
        mu = library[sl, None] * comp[group[sl], phase[sl]]
        shape = np.broadcast_to(theta32, mu.shape)
        rate = rng.standard_gamma(shape, dtype=np.float32) * (mu / theta).astype(np.float32)
        blocks.append(sp.csr_matrix(rng.poisson(rate).astype(np.float32)))
    counts = sp.vstack(blocks, format="csr")

    all_labels = np.concatenate([[control], labels])
    width = len(str(group.size))
    obs = pd.DataFrame(
        {pert_col: all_labels[group], "phase": pd.Categorical(np.array(PHASES)[phase], categories=PHASES)},
        index=[f"cell{i:0{width}d}" for i in range(group.size)],
    )
    var = pd.DataFrame(index=genes)
    is_train = group <= cfg.n_train_perts  # control or a training perturbation
    is_test = (group == 0) | ~is_train

    def subset(mask: np.ndarray) -> ad.AnnData:
        sub_obs = obs[mask].copy()
        sub_obs[pert_col] = pd.Categorical(sub_obs[pert_col])
        return ad.AnnData(X=counts[np.flatnonzero(mask)], obs=sub_obs, var=var.copy())

    train, test = subset(is_train), subset(is_test)

    # Embeddings: a random linear image of z plus noise; a perturbation's is its target's + noise.
    signal = z @ rng.normal(0.0, 1.0 / np.sqrt(LATENT_DIM), (LATENT_DIM, EMBED_DIM))
    scale = signal.std()
    gene_emb = signal + rng.normal(0.0, 0.3 * scale, signal.shape)
    pert_emb = gene_emb[targets] + rng.normal(0.0, 0.1 * scale, (n_perts, EMBED_DIM))
    columns = [f"e{i}" for i in range(EMBED_DIM)]

    return SyntheticData(
        train=train,
        test=test,
        val=val_list(test, pert_col, control),
        gene_emb=pd.DataFrame(gene_emb.astype(np.float32), index=genes, columns=columns),
        pert_emb=pd.DataFrame(pert_emb.astype(np.float32), index=labels, columns=columns),
        true_lfc=pd.DataFrame(true_lfc.astype(np.float32), index=labels, columns=genes),
    )


def write_synthetic(data: SyntheticData, out_dir: str | Path) -> None:
    """Write the dataset as the files a user would bring (plus `true_lfc.csv`, the ground truth)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data.train.write_h5ad(out / "train.h5ad")
    data.test.write_h5ad(out / "test.h5ad")
    data.val.to_csv(out / "val_list.csv", index=False)
    data.gene_emb.to_csv(out / "gene_embedding.csv", index_label="gene", float_format="%.9g")
    data.pert_emb.to_csv(out / "pert_embedding.csv", index_label="target_gene", float_format="%.9g")
    data.true_lfc.to_csv(out / "true_lfc.csv", index_label="target_gene", float_format="%.9g")


def read_synthetic(directory: str | Path) -> SyntheticData:
    """Read back what `write_synthetic` wrote (float32 round-trips exactly through %.9g)."""
    d = Path(directory)

    def table(name: str) -> pd.DataFrame:
        frame = pd.read_csv(d / name, index_col=0).astype(np.float32)
        frame.index = frame.index.astype(str).rename(None)
        return frame

    val = pd.read_csv(d / "val_list.csv", dtype={"target_gene": str})
    return SyntheticData(
        train=ad.read_h5ad(d / "train.h5ad"),
        test=ad.read_h5ad(d / "test.h5ad"),
        val=val,
        gene_emb=table("gene_embedding.csv"),
        pert_emb=table("pert_embedding.csv"),
        true_lfc=table("true_lfc.csv"),
    )


def cache_root() -> Path:
    """`$NBGLM_CACHE_DIR`, else `~/.cache/nbglm`."""
    env = os.environ.get("NBGLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "nbglm"


def _cache_dir(cfg: SyntheticConfig, pert_col: str, control: str) -> Path:
    key = json.dumps({"version": GENERATOR_VERSION, "cfg": dataclasses.asdict(cfg),
                      "pert_col": pert_col, "control": control}, sort_keys=True)
    return cache_root() / "synthetic" / hashlib.sha256(key.encode()).hexdigest()[:16]


def make_synthetic(cfg: SyntheticConfig, pert_col: str = "target_gene", control: str = "non-targeting",
                   cache: bool = True) -> SyntheticData:
    """The built-in dataset, deterministic from `cfg` (incl. `cfg.seed`); cached on disk after first use.

    The cache entry is written into a temporary directory and renamed into place, so a crash never
    leaves a partial entry; if the cache cannot be written the data is simply regenerated next time.
    """
    target = _cache_dir(cfg, pert_col, control)
    if cache and all((target / f).is_file() for f in FILES):
        try:
            return read_synthetic(target)
        except Exception as exc:  # a corrupted cache entry: regenerate it
            log.warning("ignoring unreadable synthetic cache %s (%s)", target, exc)
            shutil.rmtree(target, ignore_errors=True)
    data = _generate(cfg, pert_col, control)
    if cache:
        _write_cache(data, target)
    return data


def _write_cache(data: SyntheticData, target: Path) -> None:
    try:
        with atomic.atomic_dir(target, new=False) as tmp:
            write_synthetic(data, tmp)
    except (OSError, NbglmError):  # read-only home, full disk, or another process won the race: fine
        pass
