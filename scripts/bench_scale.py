"""Measured inputs of docs/scaling.md: a dataset's bytes in Ray's object store and one seed unit's cost.

    python scripts/bench_scale.py                      # VCC genes and perturbations, synthetic cells
    python scripts/bench_scale.py --device cuda        # the seed unit on a GPU (adds peak GPU memory)
    python scripts/bench_scale.py --set paths.train_h5ad=T.h5ad --set paths.test_h5ad=V.h5ad --cells 300000

Object store: the dataset is serialised as `ray.put` does (pickle protocol 5, numpy buffers out of
band) and its bytes are split into the count matrices' non-zeros and the rest; the non-zero part
is scaled to `--cells` at the measured non-zeros per cell (`--density` replaces that with a
fraction of genes, for a dataset denser than the synthetic one). Seed unit: one `run_experiment`
(concise fit, sampling, evaluation) in this process, as a sweep's seed unit runs it: time per
epoch, sample and eval times, peak RSS, and on CUDA the peak GPU memory torch allocated.
"""

from __future__ import annotations

import argparse
import pickle
import resource
import tempfile
import time
from pathlib import Path

# The VCC shape where it matters for cost: 18,080 genes, 150 training and 50 held-out perturbations.
VCC = ["data.synthetic.n_genes=18080", "data.synthetic.n_train_perts=150", "data.synthetic.n_test_perts=50",
       "data.synthetic.cells_per_pert=60", "data.synthetic.n_control=1000", "sampling.n_cells_default=300",
       "pipeline.keep_preds=false"]


def object_store_bytes(data: object) -> int:
    """Bytes `ray.put(data)` stores: the pickle stream plus its out-of-band buffers."""
    buffers: list[pickle.PickleBuffer] = []
    stream = pickle.dumps(data, protocol=5, buffer_callback=buffers.append)
    return len(stream) + sum(b.raw().nbytes for b in buffers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cells", type=int, default=300_000, help="cells to extrapolate the object store to")
    parser.add_argument("--density", type=float, help="fraction of non-zero counts to assume instead of the measured one")
    args = parser.parse_args()

    import torch

    from nbglm.config import load_config
    from nbglm.data import load_dataset
    from nbglm.pipeline import run_experiment

    cfg = load_config(None, [*VCC, f"experiment.device={args.device}", *args.overrides])
    t0 = time.perf_counter()
    data = load_dataset(cfg)
    load_s = time.perf_counter() - t0
    mats = [a.X for a in (data.train, data.test) if a is not None]
    cells, genes = sum(m.shape[0] for m in mats), mats[0].shape[1]
    nnz = sum(m.nnz for m in mats)
    nnz_bytes = sum(m.data.nbytes + m.indices.nbytes for m in mats)
    total = object_store_bytes(data)
    rest = total - nnz_bytes
    density = args.density if args.density is not None else nnz / (cells * genes)
    per_nnz = nnz_bytes / nnz
    scaled = args.cells * genes * density * per_nnz + rest * args.cells / cells
    print(f"dataset: {cells:,} cells x {genes:,} genes, density {nnz / (cells * genes):.4f}, loaded in {load_s:.1f}s")
    print(f"object store: {total / 2**20:,.1f} MiB measured ({nnz_bytes / 2**20:,.1f} MiB non-zeros at "
          f"{per_nnz:.0f} B each, {rest / 2**20:,.1f} MiB rest)")
    print(f"object store at {args.cells:,} cells, density {density:.4f}: {scaled / 2**30:,.2f} GiB "
          f"(= cells x genes x density x {per_nnz:.0f} B + rest scaled by cells)")

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_experiment(cfg, data, bundle_dir=Path(tmp) / "unit")
    t = result.timings
    epochs = len(result.history)
    print(f"seed unit on {args.device} ({torch.get_num_threads()} torch threads): fit {t['train_s']:.1f}s for {epochs} "
          f"epochs x {cfg.train.steps_per_epoch} steps ({t['train_s'] / epochs:.2f}s/epoch), sample "
          f"{t['sample_s']:.1f}s, eval {t['eval_s']:.1f}s, unit total {t['train_s'] + t['sample_s'] + t['eval_s']:.1f}s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB")
    if args.device.startswith("cuda"):
        print(f"peak GPU memory allocated by torch: {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB")


if __name__ == "__main__":
    main()
