"""Units: one `run_experiment` for one (fold, seed), run as a Ray task; shared by `multi_seed` and sweeps.

A sweep unit trains on a cross-validation fold's training part and scores its validation part; a
`multi_seed` unit (fold None) runs the experiment as configured.

Tests inject crashes through `NBGLM_TEST_FAULTS` (JSON, read once by the driver and handed to the
trials and units as `faults`): the config schema and saved configs know nothing of it.

A unit runs on the dataset and DE cache the caller put in the object store once (refs passed as
task arguments arrive zero-copy, whatever the number of units), writes its own sub-bundle, and
requests the caller's resources (fractional GPU allowed, or a placement-group bundle). It is a
streaming-generator task: it yields per-epoch progress while it trains and its record last, which
is how the sweep trainable reports live loss. A seed that raises becomes a `failed` record carrying
its error, so the other units still finish.

This module imports no torch: the sweep's coordinating trainable uses it too, and the pipeline is
imported inside the unit, before its clock starts, so `start`/`end` time the experiment alone.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import statistics
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from nbglm import atomic
from nbglm.config import Config
from nbglm.errors import NbglmError
from nbglm.metrics import names, values
FAULTS_ENV = "NBGLM_TEST_FAULTS"  # tests only: {"fail_seeds": [2], "fail_first_attempt": true}


def injected_faults() -> dict[str, Any]:
    """The faults a test asked for in the driver's environment ({} in real runs)."""
    return json.loads(os.environ.get(FAULTS_ENV) or "{}")


VAL_SIGNAL = "val_nll"  # per-epoch validation NB NLL of a cross-validation unit (nbglm.train.fit)
# What early stopping reads: per unit the lowest VAL_SIGNAL reached so far, averaged over a config's
# units. The raw NLL of the configs that score best rises late in training (they predict larger
# effects than the likelihood rewards), so the raw value ranks configs backwards after a few epochs
# while the best-so-far keeps its rank correlation (scripts/bench_search.py measures both).
ASHA_SIGNAL = "val_nll_best"


class UnitStopped(Exception):
    """Raised at an epoch end inside a unit whose task was cancelled (early stopping)."""


def unit_record(seed: int, fold: int | None, metrics: tuple[str, ...], **fields: Any) -> dict[str, Any]:
    """A unit's record (one row of trials.csv): every key present, the given ones filled; `metrics`
    are the registry names of the experiment's profile (`names(cfg.evaluate.profile)`).

    `history` holds one {'epoch', 'loss', VAL_SIGNAL, 't' (its end, epoch seconds)} per trained epoch,
    so a resumed trial knows the early-stopping signal of units that finished before the crash (and a
    benchmark knows when each epoch's compute was spent); `epochs_done` counts them."""
    return {"fold": fold, "seed": seed, "status": "ok", "error": None, **dict.fromkeys(metrics), "epochs_done": 0,
            "wall_s": None, "cpu_s": None, "start": None, "end": None, "node_id": None, "gpu_ids": [], "pid": None,
            "bundle": None, "history": [], **fields}


def one_line(exc: BaseException) -> str:
    """An exception as the single line a results table can hold."""
    text = str(exc) if isinstance(exc, NbglmError) else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())[:500]


def _unit(cfg: Config, seed: int, fold: int | None, data: Any, de_cache: Any, bundle_dir: str,
          faults: dict, record_file: str | None = None) -> Iterator[tuple]:
    """Run one unit; yield ("epoch", key, epoch, {'loss', 'lr', 't', ...}) per epoch, then ("done", key, record),
    with key = (fold, seed). A cross-validation unit (fold set) adds VAL_SIGNAL to each epoch.

    The experiment runs in a thread so the generator can hand epochs to the caller while it trains.
    Cancelling the task (`UnitPool.cancel`) stops the training at its next epoch end; the worker
    process lives on for the next unit, and the unit writes its record (status `stopped`, the epochs
    it trained) to `record_file`, over the caller's provisional one.
    """
    from nbglm.pipeline import run_experiment, with_seed

    ctx = ray.get_runtime_context()
    key = (fold, seed)
    record = unit_record(seed, fold, names(cfg.evaluate.profile), start=time.time(), node_id=ctx.get_node_id(), pid=os.getpid(), bundle=bundle_dir,
                         gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])])
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    cpu_start = time.process_time()  # the worker runs nothing else: its CPU time is this unit's

    def work() -> None:
        try:
            if seed in faults.get("fail_seeds", ()):
                raise RuntimeError(f"{FAULTS_ENV}: injected failure of seed {seed}")
            def on_epoch_end(epoch: int, metrics: dict) -> None:
                record["epochs_done"] = epoch
                now = time.time()
                record["history"].append({"epoch": epoch, "loss": metrics["loss"], VAL_SIGNAL: metrics.get(VAL_SIGNAL),
                                          "t": now})
                events.put(("epoch", key, epoch, {**metrics, "t": now}))
                if stop.is_set():
                    raise UnitStopped

            result = run_experiment(with_seed(cfg, seed), data, bundle_dir=Path(bundle_dir), de_cache=de_cache,
                                    on_epoch_end=on_epoch_end, val_signal=fold is not None)
            record.update(values(result.metrics, cfg.evaluate.profile), timings=result.timings)
            if not cfg.pipeline.keep_preds:
                shutil.rmtree(result.bundle / "preds", ignore_errors=True)
        except UnitStopped:
            record.update(status="stopped")
        except Exception as exc:
            record.update(status="failed", error=one_line(exc))
            atomic.write_text(Path(bundle_dir) / "logs" / "error.txt", traceback.format_exc())
        finally:
            record["end"] = time.time()
            record["wall_s"] = record["end"] - record["start"]
            record["cpu_s"] = time.process_time() - cpu_start
            events.put(("done", key, record))

    thread = threading.Thread(target=work, name=f"unit-{fold}-{seed}", daemon=True)
    thread.start()
    try:
        while True:
            try:  # wake up now and then: Ray's cancel interrupts the task between bytecodes
                item = events.get(timeout=0.5)
            except queue.Empty:
                continue
            yield item
            if item[0] == "done":
                return
    except (KeyboardInterrupt, GeneratorExit):  # ray.cancel: stop at the next epoch end, leave the worker clean
        stop.set()
        thread.join()
        if record_file:
            atomic.write_json(record_file, record)
        raise


seed_unit = ray.remote(_unit)


class UnitPool:
    """Units in flight; `poll` hands back what they yielded (epochs, then one final record)."""

    def __init__(self, cpu: float, gpu: float, faults: dict, scheduling_strategy: Any = None) -> None:
        self._options: dict[str, Any] = {"num_cpus": cpu, "num_gpus": gpu}
        if scheduling_strategy is not None:
            self._options["scheduling_strategy"] = scheduling_strategy
        self._faults = faults
        # ObjectRefGenerator -> (key, bundle, the unit's metric names)
        self._live: dict[Any, tuple[tuple[int | None, int], Path, tuple[str, ...]]] = {}

    def __len__(self) -> int:
        return len(self._live)

    def submit(self, cfg: Config, seed: int, fold: int | None, data_ref: Any, de_cache_ref: Any,
               bundle_dir: Path, record_file: Path | None = None) -> None:
        """Start unit (fold, seed) as a Ray task with the pool's resources; `record_file`: where a
        cancelled unit writes its final record."""
        generator = seed_unit.options(**self._options).remote(cfg, seed, fold, data_ref, de_cache_ref,
                                                              str(bundle_dir), self._faults,
                                                              str(record_file) if record_file else None)
        self._live[generator] = ((fold, seed), bundle_dir, names(cfg.evaluate.profile))

    def live(self) -> list[tuple[int | None, int]]:
        """Keys of the units still in flight."""
        return [key for key, _, _ in self._live.values()]

    def cancel(self) -> None:
        """Cancel every unit in flight (early stopping): each stops at its next epoch end and its
        worker stays up for the next unit (killing it would cost a worker start, seconds of torch import)."""
        for gen in self._live:
            ray.cancel(gen)
        self._live.clear()

    def poll(self, timeout: float) -> list[tuple]:
        """Events from every unit with news, waiting at most `timeout` seconds for the first."""
        live = list(self._live)
        if not live:
            return []
        ready, _ = ray.wait(live, num_returns=1, timeout=timeout)
        if ready:
            ready, _ = ray.wait(live, num_returns=len(live), timeout=0)
        events = []
        for gen in ready:
            (fold, seed), bundle_dir, metrics = self._live[gen]
            try:
                item = ray.get(next(gen))
            except StopIteration:
                del self._live[gen]
                continue
            except Exception as exc:  # the task itself failed: worker or node lost
                record = unit_record(seed, fold, metrics, status="failed", error=one_line(exc), bundle=str(bundle_dir))
                item = ("done", (fold, seed), record)
            if item[0] == "done":
                del self._live[gen]
            events.append(item)
        return events


def unit_stats(records: list[dict], metrics: tuple[str, ...]) -> dict[str, dict]:
    """mean/std/min/max (std: sample, n-1; null below 2 units) of each metric over the ok units."""
    out = {}
    for m in metrics:
        vals = [float(r[m]) for r in records if r["status"] == "ok" and r.get(m) is not None
                and math.isfinite(float(r[m]))]
        out[m] = {
            "mean": statistics.fmean(vals) if vals else None,
            "std": statistics.stdev(vals) if len(vals) >= 2 else None,
            "min": min(vals) if vals else None,
            "max": max(vals) if vals else None,
            "n": len(vals),
        }
    return out
