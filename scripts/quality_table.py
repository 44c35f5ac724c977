"""Held-out quality of the NB-GLM beside the baselines, mean +/- std over seeds, as a Markdown table.

    python scripts/quality_table.py                      # synthetic (default config) and real Jurkat data
    python scripts/quality_table.py --datasets synthetic --seeds 1 2 3

The real data (../shared/data/scperturb_testdata_jurkat_crispr.h5ad) is split by perturbation with
a fixed list: two of the six targets that are among its genes are held out (only those have a
derived embedding, so only they can be predicted), the rest train the model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np

from nbglm.config import Config, from_dict, load_config, to_dict
from nbglm.data import load_dataset
from nbglm.data.split import split_by_perturbation
from nbglm.metrics import names
from nbglm.pipeline import run_experiment

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "scperturb_testdata_jurkat_crispr.h5ad"
REAL_HELDOUT = ["EGR1", "RELA"]
MODELS = {  # row label -> overrides
    "lowrank_nb_glm": ["model.name=lowrank_nb_glm"],
    "lowrank_nb_glm, NB cells + real controls": ["model.name=lowrank_nb_glm", "sampling.sampler=nb",
                                                 "sampling.control_cells=real"],
    "linear": ["model.name=linear"], "cell_mean": ["model.name=cell_mean"], "control": ["model.name=control"],
}
METRICS = names()


def real_config(workdir: Path) -> list[str]:
    """Split the Jurkat data into files in `workdir`; return the overrides that point a run at them."""
    train, test, val = split_by_perturbation(ad.read_h5ad(REAL), "target_gene", "control", test_perts=REAL_HELDOUT)
    train.write_h5ad(workdir / "train.h5ad")
    test.write_h5ad(workdir / "test.h5ad")
    val.to_csv(workdir / "val_list.csv", index=False)
    return [f"paths.train_h5ad={workdir / 'train.h5ad'}", f"paths.test_h5ad={workdir / 'test.h5ad'}",
            f"paths.val_list_csv={workdir / 'val_list.csv'}", "data.control_name=control"]


def table(cfg: Config, seeds: list[int], outputs: Path) -> list[str]:
    """One Markdown row per model: mean +/- std over `seeds` of each metric."""
    data = load_dataset(cfg)
    rows = []
    for i, (model, overrides) in enumerate(MODELS.items()):
        runs = []
        for seed in seeds:
            run_cfg = from_dict(to_dict(cfg), [*overrides, f"experiment.seed={seed}"])
            runs.append(run_experiment(run_cfg, data, bundle_dir=outputs / f"{i}_{seed}").metrics)
        cells = [f"{np.mean([r[m] for r in runs]):.3f} ± {np.std([r[m] for r in runs]):.3f}" for m in METRICS]
        rows.append(f"| {model} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "real"], choices=["synthetic", "real"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.datasets:
            if name == "real" and not REAL.is_file():
                print(f"real data not found at {REAL}: skipped")
                continue
            extra = real_config(work) if name == "real" else []
            cfg = load_config(args.config, [*args.overrides, *extra])
            print(f"\n{name} data, seeds {args.seeds}\n\n| model | overall | DES | PDS | MAE |\n|---|---|---|---|---|")
            table(cfg, args.seeds, work / name)


if __name__ == "__main__":
    main()
