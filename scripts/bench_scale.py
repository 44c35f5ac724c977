"""Measured inputs of docs/scaling.md: a sweep's driver preparation, its object-store bytes, one seed unit.

    python scripts/bench_scale.py                               # VCC genes and perturbations, 60 cells each
    python scripts/bench_scale.py --cells-per-pert 1800 --controls 30000   # the VCC shape: ~300,000 cells
    python scripts/bench_scale.py --device cuda                 # the unit on a GPU, and 4 units sharing it

The synthetic dataset (18,080 genes, 150 training and 50 held-out perturbations, generated in chunks
of cells and cached on disk as h5ad files) is read back from those files, as a user's would be.

Driver (its own process): what `nbglm sweep` does before Ray starts — read the files, assign
`--folds` folds, build every fold's dataset and ground-truth cache and the refit's — timed, with its
peak RSS (VmHWM), and the bytes those objects take in Ray's object store (pickle protocol 5, numpy
buffers out of band, as `ray.put` stores them). Concise units get each fold's per-group sums
(`nbglm.data.summary`); `--set train.fit_mode=whole` ships the cells instead.

Unit (its own process, fed fold 0's objects): one `run_experiment` as a sweep's cross-validation
unit runs it (fit with the validation signal, sampling, evaluation against the cache): fit s/epoch,
sampling s, evaluation s, peak RSS, and on CUDA the peak GPU memory torch allocated. With
`--pack N` (default 4 on CUDA) N units run at once and their throughput is compared with one at a time;
`--threads T` gives every unit, alone or packed, T torch and numba threads (as a Ray unit with `cpu: T`
gets), so that the packed units do not compete for more cores than one unit had.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import pickle
import platform
import tempfile
import threading
import time
from pathlib import Path

# The VCC shape where it matters for cost: 18,080 genes, 150 training and 50 held-out perturbations.
VCC = ["data.synthetic.n_genes=18080", "data.synthetic.n_train_perts=150", "data.synthetic.n_test_perts=50",
       "sampling.n_cells_default=300", "pipeline.keep_preds=false"]


def object_store_bytes(obj: object) -> int:
    """Bytes `ray.put(obj)` stores: the pickle stream plus its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return len(stream) + sum(b.raw().nbytes for b in buffers)


def peak_mib() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would carry the parent's peak across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssTrace:
    """This process's RSS every 20 ms on a thread, so that a call's peak can be split by phase."""

    def __init__(self) -> None:
        self.points: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        status = Path("/proc/self/status")
        while not self._stop.wait(0.02):
            rss = next(line for line in status.read_text().splitlines() if line.startswith("VmRSS:"))
            self.points.append((time.perf_counter(), int(rss.split()[1]) / 1024))

    def peaks(self, start: float, phases: list[tuple[str, float]]) -> dict[str, float]:
        """Peak RSS (MiB) of each phase, given as (name, seconds) in order from `start`."""
        self._stop.set()
        self._thread.join()
        out, t = {}, start
        for name, seconds in phases:
            inside = [mib for at, mib in self.points if t <= at < t + seconds]
            out[name], t = max(inside, default=float("nan")), t + seconds
        return out


class Phases:
    """Seconds and peak RSS of each phase of a process (the peak is reset between phases)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []
        self._t = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass

    def end(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append((name, now - self._t, peak_mib()))
        self._t = now
        self._reset()


def files(overrides: list[str]) -> list[str]:
    """The synthetic dataset as files (generated once, cached), as `paths.*` overrides."""
    from nbglm.config import load_config
    from nbglm.data.synthetic import _cache_dir, make_synthetic

    cfg = load_config(None, overrides)
    make_synthetic(cfg.data.synthetic, cfg.data.pert_name_col, cfg.data.control_name)
    d = _cache_dir(cfg.data.synthetic, cfg.data.pert_name_col, cfg.data.control_name)
    return [f"paths.train_h5ad={d / 'train.h5ad'}", f"paths.test_h5ad={d / 'test.h5ad'}",
            f"paths.gene_embedding={d / 'gene_embedding.csv'}", f"paths.pert_embedding={d / 'pert_embedding.csv'}"]


def driver(overrides: list[str], folds: int, out: str) -> dict:
    """The sweep driver's preparation; fold 0's objects are written to `out` for the unit."""
    from nbglm.config import load_config
    from nbglm.data.folds import assign_folds
    from nbglm.data.load import assemble, check_inputs, read_inputs
    from nbglm.pipeline import load_inputs
    from nbglm.sweep.folds import build_fold, for_units

    cfg = load_config(None, overrides)
    phases = Phases()
    inputs = read_inputs(cfg, on_disk=True)  # as `nbglm sweep` reads them: checked, left in their files
    check_inputs(cfg, inputs)
    phases.end("read and check")
    table = assign_folds(inputs, cfg.data.pert_name_col, cfg.data.control_name, folds, 0)
    store = 0
    for fold in range(folds):
        built = build_fold(cfg, inputs, table, fold)
        store += sum(object_store_bytes(o) for o in built)
        if fold == 0:
            Path(out).write_bytes(pickle.dumps(built, protocol=5))
        del built
        phases.end(f"fold {fold}")
    data, cache = load_inputs(cfg, assemble(cfg, inputs))
    store += object_store_bytes(for_units(cfg, data)) + object_store_bytes(cache)
    del data, cache
    phases.end("refit data")
    cells = inputs.train.n_obs + inputs.test.n_obs
    nnz = inputs.train_x.nnz() + inputs.test_x.nnz()
    return {"cells": cells, "genes": inputs.train.n_vars, "density": nnz / (cells * inputs.train.n_vars),
            "matrix_bytes": 8 * nnz, "read_s": phases.rows[0][1], "prep_s": sum(r[1] for r in phases.rows),
            "store": store, "peak": max(r[2] for r in phases.rows), "phases": phases.rows}


def unit(overrides: list[str], path: str, threads: int | None = None, start=None) -> dict:
    """One cross-validation unit on fold 0's objects; packed units wait at the barrier `start` once
    their imports, data and CUDA context are ready, so that only the experiments themselves overlap."""
    if threads:
        os.environ["NUMBA_NUM_THREADS"] = str(threads)  # before numba is first imported
    import torch

    if threads:
        torch.set_num_threads(threads)

    from nbglm.config import load_config
    from nbglm.pipeline import run_experiment

    cfg = load_config(None, overrides)
    data, cache = pickle.loads(Path(path).read_bytes())
    cuda = cfg.experiment.device.startswith("cuda")
    if cuda:
        torch.zeros((), device=cfg.experiment.device)  # the CUDA context, outside the timed span
        torch.cuda.reset_peak_memory_stats()
    if start is not None:
        start.wait()
    with tempfile.TemporaryDirectory() as tmp:
        trace = RssTrace()
        t0, began = time.perf_counter(), time.time()
        result = run_experiment(cfg, data, bundle_dir=Path(tmp) / "unit", de_cache=cache, val_signal=True)
        wall = time.perf_counter() - t0
    t = result.timings
    phases = trace.peaks(t0, [("fit", t.get("load_s", 0.0) + t["train_s"]), ("sample", t["sample_s"]),
                              ("eval", t["eval_s"])])
    gpu = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {**result.timings, "epochs": len(result.history), "wall": wall, "began": began, "ended": began + wall,
            "peak": peak_mib(), "phase_peaks": phases, "gpu_mib": gpu, "threads": torch.get_num_threads()}


def _child(fn, args, queue) -> None:
    queue.put(fn(*args))


def in_child(fn, *args, n: int = 1, barrier: bool = False) -> list[dict]:
    """Run `fn(*args)` in `n` fresh processes at once (spawned: no memory shared with this one);
    with `barrier`, `fn` also gets a barrier for the `n` processes as its last argument."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = (*args, ctx.Barrier(n)) if barrier else args
    procs = [ctx.Process(target=_child, args=(fn, args, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"a child process failed (exit {p.exitcode})")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells-per-pert", type=int, default=60)
    parser.add_argument("--controls", type=int, default=1000, help="control cells (in training and test)")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--driver-only", action="store_true", help="measure the driver's preparation only")
    parser.add_argument("--pack", type=int, help="units at once for the packing ratio (default: 4 on CUDA, off on CPU)")
    parser.add_argument("--threads", type=int, help="torch and numba threads per unit (default: their own choice)")
    args = parser.parse_args()
    synthetic = [*VCC, f"data.synthetic.cells_per_pert={args.cells_per_pert}", f"data.synthetic.n_control={args.controls}"]
    overrides = [*synthetic, f"experiment.device={args.device}", *args.overrides]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}")
    t0 = time.perf_counter()
    paths = files(synthetic)
    print(f"synthetic files ready in {time.perf_counter() - t0:.1f}s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        fold0 = str(Path(tmp) / "fold0.pkl")
        (d,) = in_child(driver, [*overrides, *paths], args.folds, fold0)
        print(f"dataset: {d['cells']:,} cells x {d['genes']:,} genes, density {d['density']:.4f}, count matrix "
              f"{d['matrix_bytes'] / 2**30:.2f} GiB as float32 CSR")
        print(f"driver: read {d['read_s']:.1f}s, preparation (read + {args.folds} folds + refit) {d['prep_s']:.1f}s, "
              f"peak RSS {d['peak']:,.0f} MiB")
        print("  " + "; ".join(f"{name} {sec:.1f}s peak {mib:,.0f} MiB" for name, sec, mib in d["phases"]))
        print(f"object store per sweep ({args.folds} folds + refit, data + caches): {d['store'] / 2**20:,.1f} MiB", flush=True)
        if args.driver_only:
            return
        (u,) = in_child(unit, [*overrides, *paths], fold0, args.threads)
        print(f"unit on {args.device} ({u['threads']} torch threads): fit {u['train_s']:.1f}s for {u['epochs']} epochs "
              f"({u['train_s'] / u['epochs']:.2f}s/epoch), sample {u['sample_s']:.1f}s, eval {u['eval_s']:.1f}s, "
              f"wall {u['wall']:.1f}s; peak RSS {u['peak']:,.0f} MiB"
              + (f"; peak GPU memory allocated by torch {u['gpu_mib']:,.0f} MiB" if u["gpu_mib"] is not None else ""))
        print("  unit RSS by phase (20 ms samples): " + ", ".join(f"{k} {v:,.0f} MiB" for k, v in u["phase_peaks"].items()))
        pack = args.pack if args.pack is not None else (4 if args.device.startswith("cuda") else 0)
        if pack > 1:
            packed = in_child(unit, [*overrides, *paths], fold0, args.threads, n=pack, barrier=True)
            together = max(p["ended"] for p in packed) - min(p["began"] for p in packed)
            fits = ", ".join(f"{p['train_s'] / p['epochs']:.2f}" for p in packed)
            print(f"{pack} units at once: {together:.1f}s from the first start to the last end (s/epoch {fits}); "
                  f"throughput {pack * u['wall'] / together:.2f}x one at a time (one took {u['wall']:.1f}s)")


if __name__ == "__main__":
    main()
