"""Time cell-eval's `vcc` profile against nbglm's evaluation on the same synthetic pair.

    python scripts/bench_metrics.py            # 30 perts x 2,000 genes x 150 cells, then 50 x 18,080 x 300
    python scripts/bench_metrics.py --quick    # the small size only

Each side runs in its own child process (so their peak RSS do not mix): it loads the two h5ad
files, makes one untimed warm-up call, then times `--repeats` calls, reloading the files before
each call (cell-eval normalises its inputs in place) outside the timed region. Sides: cell-eval
0.8 (`MetricsEvaluator(...).compute(profile="vcc")`, all CPUs), nbglm `evaluate(pred, real)`, and
nbglm with a ground-truth cache built beforehand (`evaluate(pred, real, cache=...)`). Reported:
the median time per call, the speed-ups over cell-eval, each child's peak RSS (ru_maxrss), the
load average, and the largest difference between the two tools' DES/PDS/MAE means.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTROL = "non-targeting"
SIZES = {"small": (30, 2_000, 150), "vcc": (50, 18_080, 300)}
METRIC_COLUMNS = {"des": "overlap_at_N", "pds": "discrimination_score_l1", "mae": "mae"}


def synthetic_pair(n_perts: int, n_genes: int, n_cells: int, depth: int, seed: int = 0):
    """Real and predicted Perturb-seq counts: NB cells, 2x as many control cells, shared effects."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(n_genes)]
    perts = [genes[i * 7] if i % 2 == 0 else f"KO{i}" for i in range(n_perts)]
    base = rng.lognormal(0.0, 1.5, n_genes)
    base /= base.sum()
    effects = {p: rng.choice(n_genes, 50, replace=False) for p in perts}
    scale = {p: rng.lognormal(0.0, 1.0, 50) for p in perts}

    def cells(file_seed: int, noise: float):
        file_rng = np.random.default_rng(file_seed)
        blocks, labels = [], []
        for pert, n in [(CONTROL, 2 * n_cells)] + [(p, n_cells) for p in perts]:
            profile = base.copy()
            if pert != CONTROL:
                profile[effects[pert]] *= scale[pert] * file_rng.lognormal(0.0, noise, 50)
            profile /= profile.sum()
            library = file_rng.lognormal(np.log(depth), 0.3, n)
            mu = library[:, None] * profile[None, :]
            blocks.append(sp.csr_matrix(file_rng.poisson(file_rng.gamma(2.0, mu / 2.0)).astype(np.float32)))
            labels += [pert] * n
        obs = pd.DataFrame({"target_gene": labels}, index=[f"cell{i}" for i in range(len(labels))])
        return ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=genes))

    return cells(seed + 1, 0.0), cells(seed + 2, 0.5)


def worker(side: str, real_path: str, pred_path: str, cache_dir: str, repeats: int) -> None:
    """Child process: warm up, time `repeats` calls, print one JSON line."""
    import logging
    import warnings

    import anndata as ad

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if side == "cell-eval":
        from cell_eval import MetricsEvaluator

        def call(pred, real):
            outdir = tempfile.mkdtemp()
            evaluator = MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert=CONTROL, pert_col="target_gene", outdir=outdir)
            results, _ = evaluator.compute(profile="vcc", write_csv=False)
            return {name: float(results[column].mean()) for name, column in METRIC_COLUMNS.items()}
    else:
        from nbglm.metrics import evaluate, load_de_cache

        cache = load_de_cache(cache_dir) if side == "nbglm+cache" else None

        def call(pred, real):
            out = evaluate(pred, real, control=CONTROL, cache=cache)
            return {name: out[name] for name in METRIC_COLUMNS}

    times, means = [], {}
    for i in range(repeats + 1):
        pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
        start = time.perf_counter()
        means = call(pred, real)
        if i:  # the first call is the warm-up
            times.append(time.perf_counter() - start)
        del pred, real
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": side, "times": times, "means": means, "peak_mib": peak_mib}))


def run_side(side: str, paths: dict[str, str], repeats: int) -> dict:
    command = [sys.executable, __file__, "--worker", side, paths["real"], paths["pred"], paths["cache"], str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(name: str, depth: int, repeats: int, workdir: Path) -> None:
    from nbglm.metrics import build_de_cache

    n_perts, n_genes, n_cells = SIZES[name]
    real, pred = synthetic_pair(n_perts, n_genes, n_cells, depth)
    paths = {"real": str(workdir / f"{name}_real.h5ad"), "pred": str(workdir / f"{name}_pred.h5ad"), "cache": str(workdir / f"{name}_cache")}
    real.write_h5ad(paths["real"])
    pred.write_h5ad(paths["pred"])
    build_de_cache(real, control=CONTROL).save(paths["cache"])
    density = real.X.nnz / (real.n_obs * real.n_vars)
    print(f"\n{n_perts} perts x {n_genes:,} genes x {n_cells} cells (+{2 * n_cells} control), {real.n_obs:,} cells/file, "
          f"{real.X.nnz:,} nonzeros/file ({density:.0%}); {repeats} timed call(s) after 1 warm-up; load avg {os.getloadavg()[0]:.2f}")
    rows = {side: run_side(side, paths, repeats) for side in ("cell-eval", "nbglm", "nbglm+cache")}
    reference = statistics.median(rows["cell-eval"]["times"])
    print(f"{'side':<13}{'median s':>10}{'min s':>9}{'speed-up':>10}{'peak RSS MiB':>14}")
    for side, row in rows.items():
        median = statistics.median(row["times"])
        print(f"{side:<13}{median:>10.3f}{min(row['times']):>9.3f}{reference / median:>9.1f}x{row['peak_mib']:>14.0f}")
    diff = max(abs(rows["nbglm"]["means"][k] - rows["cell-eval"]["means"][k]) for k in METRIC_COLUMNS)
    print(f"max |nbglm - cell-eval| over the DES/PDS/MAE means: {diff:.2e}; load avg now {os.getloadavg()[0]:.2f}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        side, real_path, pred_path, cache_dir, repeats = sys.argv[2:7]
        worker(side, real_path, pred_path, cache_dir, int(repeats))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small size")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and size (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench("small", 2_000, args.repeats, Path(tmp))
        if not args.quick:
            bench("vcc", 10_000, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
