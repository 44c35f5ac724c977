"""Gene/perturbation embedding tables: reading, validation, alignment, and derivation from data.

A table is a float32 DataFrame indexed by gene symbol (or perturbation label). Accepted files:
- `.csv` / `.tsv` / `.txt` (tab-separated): first column = symbol, other columns = the embedding;
- `.npy`: an (n, d) array, with the symbols one per line in `<stem>.names.txt` beside it
  (`emb.npy` -> `emb.names.txt`);
- `.pt`: a dict `{"names": [...], "emb": tensor}`, or a bare (n, d) tensor with `<stem>.names.txt`;
- `.h5ad`: obs_names = symbols, X = the embedding (dense or sparse).
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from nbglm.data.rows import Rows, pseudobulks, row_totals
from nbglm.errors import NbglmError

log = logging.getLogger("nbglm")

FORMATS = ".csv, .tsv, .txt, .npy (+ .names.txt), .pt, .h5ad"


def _names_file(path: Path) -> list[str]:
    names_path = path.with_suffix(".names.txt")
    if not names_path.is_file():
        raise NbglmError(f"embedding {path} needs its row names in {names_path} (one symbol per line)")
    return [line.strip() for line in names_path.read_text().splitlines() if line.strip()]


def _load_pt(path: Path) -> tuple[np.ndarray, list[str]]:
    import torch  # only needed for this format

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise NbglmError(f"cannot read embedding {path} with torch.load: {exc}".splitlines()[0]) from None
    if isinstance(obj, dict):
        if "names" not in obj or "emb" not in obj:
            raise NbglmError(f"embedding {path} is a dict with keys {sorted(obj)}; expected 'names' and 'emb'")
        emb, names = obj["emb"], [str(n) for n in obj["names"]]
    elif isinstance(obj, torch.Tensor):
        emb, names = obj, _names_file(path)
    else:
        raise NbglmError(f"embedding {path} holds a {type(obj).__name__}; expected a dict with 'names' "
                         "and 'emb', or a tensor with a .names.txt file")
    return np.asarray(emb.detach().cpu().numpy() if isinstance(emb, torch.Tensor) else emb), names


def read_embedding(path: str | Path) -> pd.DataFrame:
    """Read an embedding table (formats in the module docstring); NaN/inf values are an error."""
    p = Path(path)
    if not p.is_file():
        raise NbglmError(f"embedding file not found: {p} (check paths.gene_embedding / paths.pert_embedding)")
    suffix = p.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(p, sep="," if suffix == ".csv" else "\t", index_col=0)
            bad = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
            if bad:
                raise NbglmError(f"embedding {p} has non-numeric columns {bad[:3]}; expected the symbol "
                                 "in the first column and numbers in all others")
            values, names = frame.to_numpy(dtype=np.float64), [str(n) for n in frame.index]
        elif suffix == ".npy":
            values, names = np.load(p, allow_pickle=False), _names_file(p)
        elif suffix == ".pt":
            values, names = _load_pt(p)
        elif suffix == ".h5ad":
            emb = ad.read_h5ad(p)
            values = emb.X.toarray() if sp.issparse(emb.X) else np.asarray(emb.X)
            names = list(emb.obs_names)
        else:
            raise NbglmError(f"embedding {p} has an unsupported extension '{suffix}'; use one of {FORMATS}")
    except NbglmError:
        raise
    except Exception as exc:
        raise NbglmError(f"cannot read embedding {p}: {exc}".splitlines()[0]) from None
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise NbglmError(f"embedding {p} must be a 2-D table (symbols x dims), got shape {values.shape}")
    if values.shape[0] != len(names):
        raise NbglmError(f"embedding {p} has {values.shape[0]} rows but {len(names)} names")
    frame = pd.DataFrame(values, index=pd.Index(names, dtype=str), columns=[f"e{i}" for i in range(values.shape[1])])
    return check_table(frame, str(p))


def check_table(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Reject NaN/inf and duplicated symbols; return a float32 copy."""
    values = frame.to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        rows = frame.index[~finite.all(axis=1)]
        raise NbglmError(f"embedding {source} has {int((~finite).sum())} NaN/inf values in {len(rows)} rows "
                         f"(e.g. {', '.join(map(str, rows[:3]))}); fill or drop those rows")
    dup = frame.index[frame.index.duplicated()]
    if len(dup):
        raise NbglmError(f"embedding {source} lists {len(dup)} symbols twice (e.g. {', '.join(map(str, dup[:3]))}); "
                         "keep one row per symbol")
    return frame.astype(np.float32)


def l2_normalize(values: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation; all-zero rows stay zero instead of becoming NaN."""
    norms = np.linalg.norm(values, axis=1, keepdims=True)
    return (values / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def align_genes(table: pd.DataFrame, genes: list[str], source: str, normalize: bool) -> np.ndarray:
    """Gene embedding rows in the data's gene order; every data gene must have one."""
    missing = pd.Index(genes).difference(table.index, sort=False)
    if len(missing):
        raise NbglmError(f"gene embedding {source} lacks {len(missing)} of the data's {len(genes)} genes "
                         f"(e.g. {', '.join(map(str, missing[:3]))}); give a table covering every gene "
                         "or leave paths.gene_embedding empty to derive one")
    values = table.loc[genes].to_numpy(dtype=np.float32)
    return l2_normalize(values) if normalize else values


def select_perts(table: pd.DataFrame, train_perts: list[str], heldout: list[str], source: str,
                 normalize: bool) -> pd.DataFrame:
    """Embedding rows for the training perturbations that have one and every held-out one.

    Training perturbations without an embedding are left out of the fit with one warning line;
    a held-out one without an embedding cannot be predicted, so it is an error.
    """
    lacking = [p for p in heldout if p not in table.index]
    if lacking:
        raise NbglmError(f"held-out perturbation(s) {', '.join(lacking[:5])}"
                         f"{f' (+{len(lacking) - 5} more)' if len(lacking) > 5 else ''} have no embedding in "
                         f"{source}; add them to the table or drop them from the held-out list")
    dropped = [p for p in train_perts if p not in table.index]
    if dropped:
        log.warning("%d training perturbation(s) have no embedding in %s and are left out of the fit: %s",
                    len(dropped), source, ", ".join(dropped))
    keep = list(dict.fromkeys([p for p in train_perts if p in table.index] + list(heldout)))
    values = table.loc[keep].to_numpy(dtype=np.float32)
    return pd.DataFrame(l2_normalize(values) if normalize else values, index=pd.Index(keep, dtype=str),
                        columns=table.columns)


def lognormalize(counts: sp.csr_matrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """log1p(counts / total * target_sum) per cell; stays sparse (log1p(0) = 0)."""
    counts = sp.csr_matrix(counts)
    totals = np.asarray(counts.sum(axis=1, dtype=np.float64)).ravel()
    scale = target_sum / np.where(totals > 0, totals, 1.0)
    values = counts.data * np.repeat(scale, np.diff(counts.indptr))
    return sp.csr_matrix((np.log1p(values, out=values), counts.indices, counts.indptr), shape=counts.shape)


def derive_gene_embedding(counts: sp.csr_matrix, genes: list[str], dim: int, seed: int = 0) -> pd.DataFrame:
    """PCA gene loadings (singular vector x singular value) of the log-normalised cells x genes matrix.

    Randomised SVD with implicit centring (the sparse matrix is never densified), seeded so the
    result is reproducible; the dimension is capped by the data size.
    """
    x = lognormalize(counts)
    n_cells, n_genes = x.shape
    d = max(1, min(dim, n_cells - 1, n_genes))
    q = min(d + 10, n_cells, n_genes)
    mean = np.asarray(x.mean(axis=0)).ravel()

    def right(m: np.ndarray) -> np.ndarray:  # (x - mean) @ m
        return x @ m - np.outer(np.ones(n_cells), mean @ m)

    def left(m: np.ndarray) -> np.ndarray:  # (x - mean).T @ m
        return x.T @ m - np.outer(mean, m.sum(axis=0))

    def orth(m: np.ndarray) -> np.ndarray:  # orthonormal basis via the small Gram matrix (cheaper than QR)
        w, v = np.linalg.eigh(m.T @ m)
        keep = w > w.max() * 1e-10
        return m @ (v[:, keep] / np.sqrt(w[keep]))

    rng = np.random.default_rng(seed)
    basis = orth(right(rng.normal(size=(n_genes, q))))
    for _ in range(3):  # power iterations sharpen the spectrum
        basis = orth(right(orth(left(basis))))
    _, s, vt = np.linalg.svd(left(basis).T, full_matrices=False)
    loadings = vt[:d].T * s[:d]
    signs = np.sign(loadings[np.abs(loadings).argmax(axis=0), np.arange(d)])  # deterministic sign
    loadings *= np.where(signs == 0, 1.0, signs)
    return pd.DataFrame(loadings.astype(np.float32), index=pd.Index(genes, dtype=str),
                        columns=[f"pc{i}" for i in range(d)])


def effect_gene_embedding(counts: sp.csr_matrix | Rows, labels: np.ndarray, control: str, dim: int) -> np.ndarray:
    """Gene loadings of the top principal components of the training perturbations' effects.

    An effect is a perturbation's log-normalised pseudobulk minus the control's. A gene's row says
    how it responded across the training perturbations, which a prior gene embedding only guesses;
    held-out perturbations play no part. Rows are scaled to a mean L2 norm of 1 (not each to 1:
    a gene that never responds keeps a near-zero row), so the block sits beside a normalised table.
    """
    target = float(np.median(row_totals(counts)))
    names, bulks = pseudobulks(counts, np.asarray(labels, dtype=str), lambda rows: lognormalize(rows, target))
    is_ctrl = names == control
    effects = bulks[~is_ctrl] - bulks[is_ctrl]
    effects -= effects.mean(axis=0)
    d = max(1, min(dim, effects.shape[0] - 1, effects.shape[1]))
    _, s, vt = np.linalg.svd(effects, full_matrices=False)
    loadings = vt[:d].T * s[:d]
    mean_norm = np.linalg.norm(loadings, axis=1).mean()
    return (loadings / (mean_norm if mean_norm > 0 else 1.0)).astype(np.float32)
