"""Ground-truth cache: the real data's side of the VCC metrics, computed once per test set.

The real file's pseudobulks, DE table and the baseline's scores do not depend on the model, so a
sweep computes them once (``nbglm build-de-cache``) and every trial only summarises its own
prediction. The cache records the genes, perturbations and cell counts it was built from and
refuses to score other data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nbglm import atomic
from nbglm.errors import NbglmError
from nbglm.data.rows import Rows
from nbglm.metrics.cells import CellsLike, genes_of, labels_of
from nbglm.metrics.normalise import log1p_of, log1p_transform
from nbglm.metrics.vcc import (PROFILE, FileSummary, baseline_summary, baseline_vector, group_codes, score,
                               summarize_log1p)

CACHE_VERSION = 1
_ARRAYS = "ground_truth.npz"
META = "meta.json"  # every profile's cache directory has one, naming its profile


@dataclass(frozen=True)
class DataIdentity:
    """What a cache was built from: enough to refuse other data without reading its matrix."""

    pert_col: str
    control: str
    genes: tuple[str, ...]
    perts: tuple[str, ...]
    n_cells: tuple[int, ...]  # control first, then perts in order

    @classmethod
    def of(cls, adata: CellsLike, pert_col: str, control: str) -> DataIdentity:
        labels = labels_of(adata, pert_col, "real")
        if control not in labels:
            raise NbglmError(f"control label {control!r} not found in real.obs[{pert_col!r}]; set the control label")
        perts, groups = group_codes(labels, control)
        counts = np.bincount(groups, minlength=perts.size + 1)
        genes = tuple(genes_of(adata).tolist())
        return cls(pert_col, control, genes, tuple(perts.tolist()), tuple(counts.tolist()))

    @property
    def fingerprint(self) -> str:
        sizes = f"{len(self.genes)} genes, {len(self.perts)} perturbations"
        parts = (self.pert_col, self.control, sizes, *self.genes, *self.perts, *map(str, self.n_cells))
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def check(self, real: CellsLike, pert_col: str, control: str) -> None:
        """Raise a one-line NbglmError unless `real` is the data described by this identity."""
        other = DataIdentity.of(real, pert_col, control)
        mine = self
        rebuild = "rebuild it with `nbglm build-de-cache`"
        if (other.pert_col, other.control) != (mine.pert_col, mine.control):
            raise NbglmError(
                f"the DE cache was built with perturbation column {mine.pert_col!r} and control {mine.control!r}, "
                f"not {other.pert_col!r} and {other.control!r}; {rebuild}"
            )
        if other.genes != mine.genes:
            if set(other.genes) == set(mine.genes):
                what = "in another order"
            else:
                what = f"different ({len(mine.genes)} cached vs {len(other.genes)})"
            raise NbglmError(f"the DE cache was built from other genes (genes {what}); {rebuild}")
        if other.perts != mine.perts:
            missing, extra = set(other.perts) - set(mine.perts), set(mine.perts) - set(other.perts)
            raise NbglmError(
                f"the DE cache was built from other perturbations (not cached: {sorted(missing)[:5]}; "
                f"cached but absent: {sorted(extra)[:5]}); {rebuild}"
            )
        if other.n_cells != mine.n_cells:  # the rest of the fingerprint is checked above
            raise NbglmError(f"the DE cache was built from data with other cell counts per perturbation; {rebuild}")


@dataclass(frozen=True)
class GroundTruthCache:
    """The real data summarised once, plus the baseline's scores when training data was given."""

    identity: DataIdentity
    real: FileSummary
    baseline: dict[str, float] | None

    def check(self, real: CellsLike, pert_col: str, control: str) -> None:
        """Raise a one-line NbglmError unless `real` is the data this cache was built from."""
        self.identity.check(real, pert_col, control)

    def save(self, directory: str | Path) -> Path:
        """Write the cache to `directory` (arrays as npz, the rest as JSON), each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self.real, name) for name in FileSummary.__dataclass_fields__}
        atomic.write_bytes(directory / _ARRAYS, lambda f: np.savez(f, **arrays))
        write_meta(directory, PROFILE, CACHE_VERSION, self.identity, baseline=self.baseline)
        return directory


def build_de_cache(
    real: CellsLike,
    train: CellsLike | None = None,
    *,
    pert_col: str = "target_gene",
    control: str = "non-targeting",
    train_counts: Rows | None = None,
    real_counts: Rows | None = None,
    overwrite: bool = False,
    baseline: np.ndarray | None = None,
) -> GroundTruthCache:
    """Summarise `real` and, with `train` (or `baseline`), score the cell-mean baseline against it.

    `train_counts` / `real_counts`: the counts when train.X / real.X is None (a sweep fold's parts,
    or files on disk), read a chunk at a time; only real's log1p matrix is then held in memory.
    `overwrite`: real.X's values may become their log1p (the caller is done with them).
    `baseline`: the baseline's profile instead of `train` (`baseline_vector(train, real)`, found
    before real was read, so that train's matrix was freed first)."""
    identity = DataIdentity.of(real, pert_col, control)
    is_ctrl = labels_of(real, pert_col, "real") == control
    if real_counts is None:
        with log1p_of(real, "real", overwrite) as x:
            summary = summarize_log1p(x, real, pert_col, control, "real")
            ctrl = None if train is None and baseline is None else x[np.flatnonzero(is_ctrl)]
    else:  # normalised a chunk at a time; the control cells again once the whole matrix is freed
        transform = log1p_transform(real_counts, "real")
        summary = summarize_log1p(real_counts.take(transform=transform), real, pert_col, control, "real")
        ctrl = None if train is None and baseline is None else real_counts.subset(is_ctrl).take(transform=transform)
    if train is not None:
        baseline = baseline_vector(train, real, pert_col, train_counts)
    if baseline is None:
        return GroundTruthCache(identity, summary, None)
    base = baseline_summary(baseline, real, pert_col, control, ctrl)
    return GroundTruthCache(identity, summary, {name: result.mean for name, result in score(base, summary).items()})


def write_meta(directory: Path, profile: str, version: int, identity: DataIdentity, **extra: object) -> None:
    """meta.json of a cache directory: its profile, format version and the data it was built from."""
    meta = {"version": version, "profile": profile, "identity": asdict(identity), "fingerprint": identity.fingerprint,
            **extra}
    atomic.write_text(directory / META, json.dumps(meta))


def read_meta(directory: Path, profile: str, version: int, arrays: str) -> tuple[dict, DataIdentity]:
    """(meta.json, identity) of a `profile` cache directory, or a one-line error saying what to do."""
    meta_path = directory / META
    if not meta_path.is_file() or not (directory / arrays).is_file():
        raise NbglmError(f"no DE cache in {directory} (a {profile} cache has {META} and {arrays}); build one with "
                         f"`nbglm build-de-cache --profile {profile}`")
    meta = json.loads(meta_path.read_text())
    if meta.get("profile", "vcc2025") != profile:
        raise NbglmError(f"the DE cache in {directory} is a {meta['profile']} cache, not a {profile} one; score with "
                         f"the profile {meta['profile']}, or rebuild it with `nbglm build-de-cache --profile {profile}`")
    if meta.get("version") != version:
        raise NbglmError(f"the cache in {directory} has format {meta.get('version')}, expected {version}; rebuild it")
    identity = DataIdentity(**{k: v if isinstance(v, str) else tuple(v) for k, v in meta["identity"].items()})
    if identity.fingerprint != meta["fingerprint"]:
        raise NbglmError(f"the cache in {directory} is inconsistent (fingerprint mismatch); rebuild it")
    return meta, identity


def load_de_cache(directory: str | Path) -> GroundTruthCache:
    """Read a cache written by :meth:`GroundTruthCache.save`."""
    directory = Path(directory)
    meta, identity = read_meta(directory, PROFILE, CACHE_VERSION, _ARRAYS)
    with np.load(directory / _ARRAYS, allow_pickle=False) as npz:
        real = FileSummary(**{name: npz[name] for name in FileSummary.__dataclass_fields__})
    if tuple(real.genes.tolist()) != identity.genes or tuple(real.perts.tolist()) != identity.perts:
        raise NbglmError(f"the DE cache in {directory} is inconsistent (arrays and metadata disagree); rebuild it")
    return GroundTruthCache(identity, real, meta["baseline"])
