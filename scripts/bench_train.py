"""Benchmark the two fit modes and the full default experiment on the built-in synthetic data.

    python scripts/bench_train.py                      # CPU: whole vs concise, then the default experiment
    python scripts/bench_train.py --device cpu cuda    # also on the GPU, with GPU/CPU ratios
    python scripts/bench_train.py --set train.epochs=10

Each measurement runs in its own subprocess, so peak RSS is per mode. Throughput counts the
training cell x gene elements an epoch covers (the same data for both modes: whole reads every
cell once per epoch, concise fits their pseudobulk sums `train.steps_per_epoch` times).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = ("whole", "concise", "experiment")


def _worker(job: str, device: str, overrides: list[str], threads: int | None) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    from nbglm.config import load_config
    from nbglm.data import load_dataset, make_synthetic
    from nbglm.sample import sample_heldout
    from nbglm.checkpoint import save_checkpoint
    from nbglm.train import fit

    t0 = time.perf_counter()
    mode = job if job in ("whole", "concise") else "concise"
    cfg = load_config(None, [f"experiment.device={device}", f"train.fit_mode={mode}", *overrides])
    data = load_dataset(cfg)
    out = {"job": job, "device": device, "load_s": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}
    if job == "data":
        return out
    result = fit(cfg, data)
    epochs = [h["epoch_s"] for h in result.history]
    n_cells = int((data.train.obs[data.pert_col].astype(str) != data.control).sum())
    out.update(train_s=result.wall_time_s, epochs=len(epochs), epoch_s=float(np.mean(epochs)),
               elements_per_s=n_cells * len(data.gene_names) / float(np.mean(epochs)))
    model = result.model
    syn = make_synthetic(cfg.data.synthetic, cfg.data.pert_name_col, cfg.data.control_name)
    with torch.no_grad():
        eff = model.effects(model.pert_index(data.heldout_perts)).cpu().numpy()
    out["heldout_r"] = float(np.corrcoef(eff.ravel(), syn.true_lfc.loc[data.heldout_perts].to_numpy().ravel())[0, 1])
    if job == "experiment":
        t1 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp) / "ckpt" / "model.pt", model, cfg)
        pred = sample_heldout(model, data, cfg, seed=cfg.experiment.seed)
        out.update(sample_s=time.perf_counter() - t1, pred_cells=pred.n_obs)
    out["total_s"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out["cpu_s"] = usage.ru_utime + usage.ru_stime  # less sensitive than wall time to a busy machine
    out["peak_rss_mib"] = usage.ru_maxrss / 1024
    if device.startswith("cuda"):
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _run(job: str, device: str, overrides: list[str], threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", job, "--device", device]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += [a for o in overrides for a in ("--set", o)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{job} on {device} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["cpu"], help="devices to measure, e.g. cpu cuda")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per measurement, interleaved; the fastest is reported (robust to a busy machine)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice); "
                        "1 gives CPU seconds that a busy machine barely distorts")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker, args.device[0], args.overrides, args.threads)))
        return

    _run("data", args.device[0], args.overrides, args.threads)  # first use builds the cached synthetic data: not timed
    results: dict[tuple[str, str], dict] = {}
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    print(f"{'device':8} {'job':10} {'epochs':>6} {'s/epoch':>8} {'cell-gene/s':>12} {'train s':>8} "
          f"{'sample s':>8} {'total s':>8} {'CPU s':>7} {'RSS MiB':>8} {'r(heldout)':>10}")
    for device in args.device:
        runs = [{job: _run(job, device, args.overrides, args.threads) for job in JOBS} for _ in range(args.repeat)]
        for job in JOBS:
            r = results[device, job] = min((run[job] for run in runs), key=lambda x: x["total_s"])
            sample = f"{r['sample_s']:8.2f}" if "sample_s" in r else f"{'-':>8}"
            print(f"{device:8} {job:10} {r['epochs']:6d} {r['epoch_s']:8.3f} {r['elements_per_s']:12.3g} "
                  f"{r['train_s']:8.2f} {sample} {r['total_s']:8.2f} {r['cpu_s']:7.1f} {r['peak_rss_mib']:8.0f} "
                  f"{r['heldout_r']:10.3f}", flush=True)
        whole, concise = results[device, "whole"], results[device, "concise"]
        print(f"{device}: concise/whole time per epoch {concise['epoch_s'] / whole['epoch_s']:.3f}, "
              f"train time {concise['train_s'] / whole['train_s']:.3f}; default experiment (concise, train + "
              f"sample, data load included) {results[device, 'experiment']['total_s']:.1f}s "
              f"(torch threads {whole['torch_threads']})")
    cpu = next((d for d in args.device if d == "cpu"), None)
    for device in (d for d in args.device if d.startswith("cuda") and cpu):
        for job in JOBS:
            key = "total_s" if job == "experiment" else "epoch_s"
            ratio = results[device, job][key] / results[cpu, job][key]
            print(f"GPU/CPU {job}: {ratio:.3f} ({key})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
