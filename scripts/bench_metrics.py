"""Time cell-eval's `vcc` profile against nbglm's evaluation on the same synthetic pair.

    python scripts/bench_metrics.py            # 30 perts x 2,000 genes x 150 cells, then 50 x 18,080 x 300
    python scripts/bench_metrics.py --quick    # the small size only
    python scripts/bench_metrics.py --profile vcc2026   # cell-eval2 0.20 vs nbglm's vcc2026 (see bench_2026)

First a line that names the machine: CPU model, cores, and the SIMD features numpy sees (numpy's
sort speed depends on them). Then, per size:

Three sides, each in its own child process so that their peak RSS (ru_maxrss) do not mix:
cell-eval 0.8 (``MetricsEvaluator(...).compute(profile="vcc")``, all CPUs), nbglm
``evaluate(pred, real)``, and nbglm with a ground-truth cache built beforehand
(``evaluate(pred, real, cache=...)``). Each child loads the two h5ad files and makes one untimed
warm-up call; then the timed calls are interleaved across the children, one at a time, so that a
change in machine load hits every side alike. Files are re-read before every call, outside the
timed region (cell-eval normalises its inputs in place). Reported: median and min seconds per
call, speed-ups over cell-eval, peak RSS, the load average, and the largest difference between
the two tools' DES/PDS/MAE means.

The DE keys' sort: nanoseconds per key for numpy's sort and nbglm's radix sort on the same keys
(the prediction's, as the engine packs them), on one thread and on the engine's thread pool, and
which one the engine's probe picks on this CPU.

Command level: the whole ``python -m nbglm eval --pred --real --train`` (process start to exit)
against ``cell-eval run --profile vcc`` on the same files with as many threads, each warmed once,
then interleaved. nbglm's command also scores the cell-mean baseline of --train (cell-eval's does not).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CONTROL = "non-targeting"
SIZES = {"small": (30, 2_000, 150, 2_000), "vcc": (50, 18_080, 300, 10_000)}  # perts, genes, cells, depth
SIDES = ("cell-eval", "nbglm", "nbglm+cache")
METRIC_COLUMNS = {"des": "overlap_at_N", "pds": "discrimination_score_l1", "mae": "mae"}


def synthetic_pair(n_perts: int, n_genes: int, n_cells: int, depth: int, seed: int = 0):
    """Real and predicted counts: gamma-Poisson cells, twice as many control cells, shared effects."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    genes = [f"GENE{i}" for i in range(n_genes)]
    perts = [genes[i * 7] if i % 2 == 0 else f"KO{i}" for i in range(n_perts)]
    base = rng.lognormal(0.0, 1.5, n_genes)
    effects = {p: (rng.choice(n_genes, 50, replace=False), rng.lognormal(0.0, 1.0, 50)) for p in perts}

    def cells(file_seed: int, noise: float):
        file_rng = np.random.default_rng(file_seed)
        blocks, labels = [], []
        for pert, n in [(CONTROL, 2 * n_cells)] + [(p, n_cells) for p in perts]:
            profile = base.copy()
            if pert != CONTROL:
                hit, scale = effects[pert]
                profile[hit] *= scale * file_rng.lognormal(0.0, noise, hit.size)
            mu = file_rng.lognormal(np.log(depth), 0.3, n)[:, None] * (profile / profile.sum())[None, :]
            blocks.append(sp.csr_matrix(file_rng.poisson(file_rng.gamma(2.0, mu / 2.0)).astype(np.float32)))
            labels += [pert] * n
        obs = pd.DataFrame({"target_gene": labels}, index=[f"cell{i}" for i in range(len(labels))])
        return ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs, var=pd.DataFrame(index=genes))

    return cells(seed + 1, 0.0), cells(seed + 2, 0.5)


def worker(side: str, real_path: str, pred_path: str, cache_dir: str) -> None:
    """Child: warm up, then one timed call per "go" line on stdin; "stop" reports and exits."""
    import logging
    import warnings

    import anndata as ad

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if side == "cell-eval":
        from cell_eval import MetricsEvaluator

        def call(pred, real) -> dict[str, float]:
            outdir = tempfile.mkdtemp()
            evaluator = MetricsEvaluator(pred, real, control_pert=CONTROL, pert_col="target_gene", outdir=outdir)
            results, _ = evaluator.compute(profile="vcc", write_csv=False)
            return {name: float(results[column].mean()) for name, column in METRIC_COLUMNS.items()}
    else:
        from nbglm.metrics import evaluate, load_de_cache

        cache = load_de_cache(cache_dir) if side == "nbglm+cache" else None

        def call(pred, real) -> dict[str, float]:
            out = evaluate(pred, real, control=CONTROL, cache=cache)
            return {name: out[name] for name in METRIC_COLUMNS}

    def timed() -> tuple[float, dict[str, float]]:
        pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
        start = time.perf_counter()
        means = call(pred, real)
        return time.perf_counter() - start, means

    _, means = timed()
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "stop":
            break
        seconds, means = timed()
        print(json.dumps({"seconds": seconds}), flush=True)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"means": means, "peak_mib": peak_mib}), flush=True)


def _reply(child: subprocess.Popen, side: str, log: Path) -> str:
    line = child.stdout.readline()
    if not line:
        raise SystemExit(f"{side} failed:\n{log.read_text()[-3000:]}")
    return line


def bench(name: str, repeats: int, workdir: Path) -> None:
    from nbglm.metrics import build_de_cache

    n_perts, n_genes, n_cells, depth = SIZES[name]
    real, pred = synthetic_pair(n_perts, n_genes, n_cells, depth)
    real_path, pred_path, train_path, cache_dir = (
        str(workdir / f"{name}_{part}") for part in ("real.h5ad", "pred.h5ad", "train.h5ad", "cache")
    )
    real.write_h5ad(real_path)
    pred.write_h5ad(pred_path)
    synthetic_pair(n_perts, n_genes, n_cells, depth, seed=10)[0].write_h5ad(train_path)
    build_de_cache(real, control=CONTROL).save(cache_dir)
    density = real.X.nnz / (real.n_obs * real.n_vars)
    print(
        f"\n{n_perts} perts x {n_genes:,} genes x {n_cells} cells (+{2 * n_cells} control cells): "
        f"{real.n_obs:,} cells and {real.X.nnz:,} nonzeros ({density:.0%}) per file; "
        f"1 warm-up + {repeats} timed calls per side, interleaved",
        flush=True,
    )
    del real, pred
    children, logs = {}, {side: workdir / f"{name}_{side}.log" for side in SIDES}
    for side in SIDES:  # started one after the other so that the warm-ups do not overlap
        command = [sys.executable, __file__, "--worker", side, real_path, pred_path, cache_dir]
        with open(logs[side], "w") as log:  # stderr to a file: progress bars must not fill a pipe
            pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": log}
            children[side] = subprocess.Popen(command, text=True, **pipes)
        _reply(children[side], side, logs[side])
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    loads = []
    for round_ in range(repeats):
        for side in SIDES[round_ % 3 :] + SIDES[: round_ % 3]:  # rotate the order every round
            loads.append(os.getloadavg()[0])
            children[side].stdin.write("go\n")
            children[side].stdin.flush()
            times[side].append(json.loads(_reply(children[side], side, logs[side]))["seconds"])
    final = {}
    for side, child in children.items():
        child.stdin.write("stop\n")
        child.stdin.flush()
        final[side] = json.loads(_reply(child, side, logs[side]))
        child.wait()
    reference = statistics.median(times["cell-eval"])
    print(f"{'side':<13}{'median s':>10}{'min s':>9}{'speed-up':>10}{'peak RSS MiB':>14}")
    for side in SIDES:
        median = statistics.median(times[side])
        speed_up, peak = reference / median, final[side]["peak_mib"]
        print(f"{side:<13}{median:>10.3f}{min(times[side]):>9.3f}{speed_up:>9.1f}x{peak:>14.0f}")
    diff = max(abs(final["nbglm"]["means"][k] - final["cell-eval"]["means"][k]) for k in METRIC_COLUMNS)
    print(f"max |nbglm - cell-eval| over the DES/PDS/MAE means: {diff:.1e}; "
          f"1-min load average during the timed calls: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs")
    sort_figures(pred_path, repeats)
    command_times(pred_path, real_path, train_path, repeats, workdir / f"{name}_cell-eval-out")


def machine() -> str:
    """CPU model (with family/model numbers: some report only "AMD EPYC"), cores, numpy's SIMD."""
    from numpy._core._multiarray_umath import __cpu_baseline__, __cpu_dispatch__, __cpu_features__

    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = info.get("model name", "unknown CPU")
    ids = f" (family {info['cpu family']}, model {info['model']})" if "cpu family" in info and "model" in info else ""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    wide = [k for k, on in __cpu_features__.items() if on and (k.startswith("AVX512") or k in ("AVX2", "FMA3"))]
    return (
        f"CPU: {model}{ids}, {os.cpu_count()} cores ({usable} usable); numpy {np.__version__}: "
        f"baseline {' '.join(__cpu_baseline__)}, dispatch {' '.join(__cpu_dispatch__)}; "
        f"CPU features numpy sees: {' '.join(wide) or 'none beyond SSE'}"
    )


def sort_figures(pred_path: str, repeats: int) -> None:
    """ns per key of numpy's sort and the radix sort on the prediction's DE key blocks."""
    try:
        from nbglm.metrics.de import WINDOW_KEYS, gene_windows, key_layout, pack_keys
        from nbglm.metrics.threads import n_threads
        from nbglm.metrics.io import read_counts_for_eval
        from nbglm.metrics.radix import radix_is_faster, radix_sort, sort_keys
    except ImportError as error:  # a tree from before the radix sort: numpy's sort only
        print(f"DE keys' sort: not timed ({error})", flush=True)
        return
    from nbglm.metrics.normalise import to_log1p
    from nbglm.metrics.vcc import group_codes

    pred = read_counts_for_eval(pred_path, "target_gene", "pred")
    perts, groups = group_codes(pred.labels, CONTROL)
    x, groups = to_log1p(pred, "pred"), groups.astype(np.int64)
    layout, row_start, blocks = key_layout(x, groups, perts.size + 1), x.indptr[:-1].astype(np.int64), []
    for genes in gene_windows(layout.entries, WINDOW_KEYS):  # the engine's windows and blocks
        packed = pack_keys(x, groups, layout, genes, row_start)
        edges = packed.edges
        blocks += [packed.keys[lo:hi] for lo, hi in zip(edges[:-1], edges[1:], strict=True) if hi > lo]
    n_keys = sum(block.size for block in blocks)
    check = [block.copy() for block in blocks]
    scratch = np.empty(max(block.size for block in blocks), dtype=np.int64)
    for block in check:
        radix_sort(block, scratch)
    if not all(np.array_equal(ours, np.sort(block)) for ours, block in zip(check, blocks, strict=True)):
        raise SystemExit("the radix sort disagrees with numpy's sort")
    del check

    def numpy_sort(block: np.ndarray, _: np.ndarray) -> None:
        block.sort()

    def radix(block: np.ndarray, buffer: np.ndarray) -> None:
        sort_keys(block, buffer)

    figures: dict[tuple[str, int], list[float]] = {}
    for threads in sorted({1, n_threads()}):
        buffers: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(threads):
            buffers.put(np.empty_like(scratch))

        def run(sort, block: np.ndarray) -> None:
            buffer = buffers.get()
            sort(block, buffer)
            buffers.put(buffer)

        with ThreadPoolExecutor(threads) as pool:
            for _ in range(repeats):
                for label, sort in (("numpy", numpy_sort), ("radix", radix)):
                    work = [block.copy() for block in blocks]
                    start = time.perf_counter()
                    list(pool.map(lambda block, sort=sort: run(sort, block), work))
                    figures.setdefault((label, threads), []).append((time.perf_counter() - start) / n_keys * 1e9)
    cells = "; ".join(
        f"{threads} thread{'s' if threads > 1 else ''}: numpy {statistics.median(figures['numpy', threads]):.1f}, "
        f"radix {statistics.median(figures['radix', threads]):.1f}"
        for threads in sorted({t for _, t in figures})
    )
    print(
        f"DE keys' sort, ns per key (median of {repeats}; {n_keys:,} keys in {len(blocks)} blocks): {cells}; "
        f"the engine's probe picks {'radix' if radix_is_faster() else 'numpy'}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def command_times(pred: str, real: str, train: str, repeats: int, outdir: Path) -> None:
    """Whole commands, process start to exit: nbglm eval vs cell-eval run (vcc profile)."""
    cell_eval = shutil.which("cell-eval", path=str(Path(sys.executable).parent)) or shutil.which("cell-eval")
    if cell_eval is None:
        raise SystemExit("cell-eval's command not found next to this Python or on PATH")
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commands = {
        "cell-eval run": [
            cell_eval, "run", "-ap", pred, "-ar", real, "--control-pert", CONTROL, "--pert-col", "target_gene",
            "--profile", "vcc", "--num-threads", str(threads), "-o", str(outdir),
        ],
        "nbglm eval": [
            sys.executable, "-m", "nbglm", "eval", "--pred", pred, "--real", real, "--train", train,
            "--control", CONTROL, "--pert-col", "target_gene",
        ],
    }
    times: dict[str, list[float]] = {side: [] for side in commands}
    loads = []
    for round_ in range(repeats + 1):  # round 0 warms each command (imports, numba's cache, page cache)
        for side in list(commands)[round_ % 2 :] + list(commands)[: round_ % 2]:
            loads.append(os.getloadavg()[0])
            start = time.perf_counter()
            done = subprocess.run(commands[side], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"{side} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
            if round_:
                times[side].append(seconds)
    reference, ours = (statistics.median(times[side]) for side in commands)
    print(
        f"command level (median of {repeats} after a warm-up, s): cell-eval run {reference:.2f}, "
        f"nbglm eval {ours:.2f} ({reference / ours:.1f}x); load {min(loads):.1f} to {max(loads):.1f}",
        flush=True,
    )


# --- vcc2026: cell-eval2 0.20 against nbglm ---------------------------------------------------------
#
# cell-eval2 lives in its own venv (its pins clash with nbglm's; the parity tests build it): its
# in-process side runs this file with that venv's python, so the worker imports nothing of nbglm.
# In-process sides, each in its own child (warm-up call, then timed calls; peak RSS = ru_maxrss):
#   cell-eval2 full    compute_metrics + build_generic_baseline + compute_replicate_anchor + scores
#   nbglm full         evaluate_vcc2026(pred, real): the same numbers from scratch
#   cell-eval2 metrics compute_metrics alone (what `cell-eval2 run --preset vcc2026` computes)
#   nbglm+cache        evaluate_vcc2026(pred, real, cache=...): the pred side, the real side cached
# Whole commands (one warm-up run each, then timed runs; peak RSS of the command's process tree
# root): `cell-eval2 run --preset vcc2026` and `nbglm eval --profile vcc2026`, with and without
# a reference built by `nbglm build-de-cache --profile vcc2026`.

SIDES_2026 = ("cell-eval2 full", "nbglm full", "cell-eval2 metrics", "nbglm+cache")


def _celleval2_python() -> str:
    root = Path(os.environ.get("NBGLM_CELLEVAL2_VENV", Path.home() / ".cache" / "nbglm" / "celleval2-0.20.0"))
    python = root / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"no cell-eval2 venv at {root}: run tests/test_vcc2026.py once, or set NBGLM_CELLEVAL2_VENV")
    return str(python)


def worker_2026(side: str, real_path: str, pred_path: str, cache_dir: str, repeats: str, warmup: str = "1") -> None:
    """Child: `warmup` untimed calls, then `repeats` timed ones; prints the times, the six means and peak RSS."""
    import logging
    import warnings

    import anndata as ad

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    if side.startswith("cell-eval2"):
        from dataclasses import replace

        import polars as pl
        from cell_eval2.anchor import compute_replicate_anchor
        from cell_eval2.baseline import build_generic_baseline
        from cell_eval2.config import EvalConfig
        from cell_eval2.run import aggregate_metrics_wide, compute_metrics, metric_output_names

        cfg = replace(EvalConfig.from_preset("vcc2026"), pert_col="target_gene", control=CONTROL)
        names = metric_output_names(cfg)

        def means(agg) -> dict[str, float]:
            row = agg.filter(pl.col("statistic") == "mean")
            return {m: float(row[m][0]) for m in agg.columns if m != "statistic"}

        def call(pred, real) -> dict[str, float]:
            user = means(aggregate_metrics_wide(compute_metrics(pred, real, config=cfg), metrics=names))
            if side == "cell-eval2 full":
                build_generic_baseline(real, config=cfg)
                compute_replicate_anchor(real, config=cfg)
            return user
    else:
        from nbglm.metrics import Reference, evaluate_vcc2026

        cache = Reference.load(cache_dir) if side == "nbglm+cache" else None

        def call(pred, real) -> dict[str, float]:
            return evaluate_vcc2026(pred, real, pert_col="target_gene", control=CONTROL, cache=cache)["vcc2026"]

    times = []
    for i in range(int(repeats) + int(warmup)):
        pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
        start = time.perf_counter()
        means_ = call(pred, real)
        if i >= int(warmup):
            times.append(time.perf_counter() - start)
    print(json.dumps({"times": times, "means": means_, "peak_mib": _own_peak_mib()}), flush=True)


def _own_peak_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux keeps that across exec, so a child
    would report the driver's peak from building the synthetic files."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _command_peak(command: list[str], log: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one command, measured by GNU time on its root process."""
    with open(log, "a") as out:
        start = time.perf_counter()
        run = subprocess.run(["/usr/bin/time", "-f", "%M", *command], stdout=out, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
    if run.returncode:
        raise SystemExit(f"{command[0]} failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return seconds, int(run.stderr.strip().splitlines()[-1]) / 1024


def bench_2026(name: str, repeats: int, workdir: Path, commands: bool, full: bool, cold: bool = False) -> None:
    """`cold`: cell-eval2 in-process without its warm-up call and its command not run (at the VCC size
    on a loaded machine each cell-eval2 call takes many minutes); the commands then compare with its
    in-process time, a lower bound of its command's."""
    from nbglm.metrics import build_reference

    n_perts, n_genes, n_cells, depth = SIZES[name]
    real, pred = synthetic_pair(n_perts, n_genes, n_cells, depth)
    real_path, pred_path, cache_dir = (str(workdir / f"{name}_{part}") for part in ("real.h5ad", "pred.h5ad", "ref"))
    real.write_h5ad(real_path)
    pred.write_h5ad(pred_path)
    build_reference(real, pert_col="target_gene", control=CONTROL).save(cache_dir)
    print(f"\nvcc2026, {n_perts} perts x {n_genes:,} genes x {n_cells} cells (+{2 * n_cells} control cells): "
          f"{real.n_obs:,} cells, {real.X.nnz:,} nonzeros per file; 1 warm-up + {repeats} timed calls per side, "
          "sides one after the other", flush=True)
    del real, pred
    results, loads = {}, {}
    sides = SIDES_2026 if full else tuple(side for side in SIDES_2026 if "full" not in side)
    for side in sides:
        python = _celleval2_python() if side.startswith("cell-eval2") else sys.executable
        before = os.getloadavg()[0]
        warmup = "0" if cold and side.startswith("cell-eval2") else "1"
        run = subprocess.run([python, __file__, "--worker2026", side, real_path, pred_path, cache_dir, str(repeats),
                              warmup], capture_output=True, text=True)
        if run.returncode:
            raise SystemExit(f"{side} failed:\n{run.stderr[-3000:]}")
        results[side] = json.loads(run.stdout.strip().splitlines()[-1])
        loads[side] = (before, os.getloadavg()[0])
    print(f"{'in-process':<20}{'median s':>10}{'min s':>9}{'speed-up':>10}{'peak RSS MiB':>14}{'1-min load':>14}")
    for side in sides:
        median, reference = statistics.median(results[side]["times"]), None
        if side.startswith("nbglm"):
            reference = statistics.median(results["cell-eval2 full" if side == "nbglm full" else "cell-eval2 metrics"]["times"])
        speed = f"{reference / median:>9.1f}x" if reference else f"{'':>10}"
        print(f"{side:<20}{median:>10.2f}{min(results[side]['times']):>9.2f}{speed}{results[side]['peak_mib']:>14.0f}"
              f"{loads[side][0]:>7.1f}-{loads[side][1]:<6.1f}")
    mine, theirs = results["nbglm+cache"]["means"], results["cell-eval2 metrics"]["means"]
    diff = max(abs(mine[m] - theirs[m]) for m in mine)
    print(f"max |nbglm - cell-eval2| over the six panel means: {diff:.1e}")
    if not commands:
        return
    labels = ["--pert-col", "target_gene", "--control", CONTROL]
    nbglm = [sys.executable, "-m", "nbglm", "eval", "--profile", "vcc2026", "--pred", pred_path, "--real", real_path,
             *labels]
    ce2 = [str(Path(_celleval2_python()).parent / "cell-eval2"), "run", "--preset", "vcc2026", "-ap", pred_path,
           "-ar", real_path, *labels, "-o", str(workdir / f"{name}_ce2_out")]
    runs = {"cell-eval2 run": ce2, "nbglm eval --de-cache": [*nbglm, "--de-cache", cache_dir], "nbglm eval": nbglm}
    if cold:
        del runs["cell-eval2 run"]
    print(f"{'command':<24}{'median s':>10}{'min s':>9}{'speed-up':>10}{'peak RSS MiB':>14}{'1-min load':>14}")
    measured = {}
    for label, command in runs.items():
        before = os.getloadavg()[0]
        timed = [_command_peak(command, workdir / f"{name}_commands.log") for _ in range(repeats + 1)][1:]
        measured[label] = ([t for t, _ in timed], max(p for _, p in timed), (before, os.getloadavg()[0]))
    for label, (times, peak, load) in measured.items():
        median = statistics.median(times)
        reference = (statistics.median(results["cell-eval2 metrics"]["times"]) if cold
                     else statistics.median(measured["cell-eval2 run"][0]))
        speed = f"{reference / median:>9.1f}x" if label != "cell-eval2 run" else f"{'':>10}"
        print(f"{label:<24}{median:>10.2f}{min(times):>9.2f}{speed}{peak:>14.0f}{load[0]:>7.1f}-{load[1]:<6.1f}")
    print("speed-ups: nbglm full over cell-eval2 full; nbglm+cache and the commands over cell-eval2's metrics alone "
          "(`run --preset vcc2026` computes no baseline or anchor; `nbglm eval` without a cache computes both)"
          + ("; cell-eval2 cold: one call without a warm-up, its command not run, the commands compared with its "
             "in-process time" if cold else ""))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:6])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker2026":
        worker_2026(*sys.argv[2:8])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the small size")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per side and size (default: %(default)s)")
    parser.add_argument("--profile", choices=("vcc2025", "vcc2026"), default="vcc2025",
                        help="vcc2025: cell-eval 0.8 vs nbglm; vcc2026: cell-eval2 0.20 vs nbglm (default: %(default)s)")
    parser.add_argument("--size", choices=("small", "vcc", "both"), default="both", help="sizes to time (default: both)")
    parser.add_argument("--no-commands", action="store_true", help="vcc2026: skip the whole-command timings")
    parser.add_argument("--cold-celleval2", action="store_true",
                        help="vcc2026: cell-eval2 without its warm-up call, its command not run (commands are then "
                             "compared with its in-process time)")
    parser.add_argument("--full-at-vcc", action="store_true",
                        help="vcc2026: also time the full sides (baseline and anchor) at the VCC size (cell-eval2 "
                             "takes about 7 metric runs there)")
    args = parser.parse_args()
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = ("small",) if args.quick else ("small", "vcc") if args.size == "both" else (args.size,)
        for name in sizes:
            if args.profile == "vcc2026":
                bench_2026(name, args.repeats, Path(tmp), not args.no_commands, name == "small" or args.full_at_vcc,
                           args.cold_celleval2)
            else:
                bench(name, args.repeats, Path(tmp))


if __name__ == "__main__":
    main()
