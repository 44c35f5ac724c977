"""multi_seed mode on the session's local Ray (2 CPUs, 2 logical GPUs, 0.25 GPU per seed)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from nbglm.config import load_config
from nbglm.sweep.multiseed import run_multi_seed
from nbglm.metrics import names
from nbglm.sweep.units import FAULTS_ENV

METRICS = names()

TINY = [
    "data.synthetic.n_genes=100", "data.synthetic.n_train_perts=12", "data.synthetic.n_test_perts=4",
    "data.synthetic.cells_per_pert=30", "data.synthetic.n_control=120", "data.derived_embedding_dim=16",
    "model.g_mlp_hidden=[32]", "model.g_out_dim=16", "model.p_mlp_hidden=[32]", "model.p_out_dim=16",
    "model.rank=4", "train.epochs=3", "train.steps_per_epoch=5", "sampling.n_cells_default=30",
]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(None, [*TINY, "pipeline.mode=multi_seed", "pipeline.seeds=[1,2,3]",
                              "pipeline.resources.cpu=0.5", "pipeline.resources.gpu=0.25",
                              f"paths.outputs_root={tmp_path}", *extra])


def _peak_overlap(records: list[dict]) -> int:
    """Most seed units running at the same instant, from their [start, end] intervals."""
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    peak = running = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_seeds_run_concurrently_and_aggregate_matches_per_seed_files(ray_local, tmp_path: Path) -> None:
    result = run_multi_seed(_cfg(tmp_path, "pipeline.keep_preds=false"), bundle_dir=tmp_path / "ms")
    assert result.failed_seeds == []
    saved = json.loads((tmp_path / "ms" / "metrics" / "multi_seed_metrics.json").read_text())
    records = saved["per_seed"]
    assert [r["seed"] for r in records] == [1, 2, 3] and all(r["status"] == "ok" for r in records)
    assert _peak_overlap(records) >= 2, "seed units did not overlap in time"
    assert all(r["gpu_ids"] and set(r["gpu_ids"]) <= {"0", "1"} for r in records)  # fractional logical GPU
    for m in METRICS:
        per_seed = [json.loads((tmp_path / "ms" / f"seed_{s}" / "metrics" / "metrics.json").read_text())[m]
                    for s in (1, 2, 3)]
        assert [r[m] for r in records] == pytest.approx(per_seed)
        stats = saved["summary"][m]
        assert stats["mean"] == pytest.approx(statistics.fmean(per_seed))
        assert stats["std"] == pytest.approx(statistics.stdev(per_seed))
        assert (stats["min"], stats["max"], stats["n"]) == (min(per_seed), max(per_seed), 3)
        assert result.metrics[m] == pytest.approx(stats["mean"])
    assert not any((tmp_path / "ms" / f"seed_{s}" / "preds").exists() for s in (1, 2, 3))  # keep_preds=false
    assert ray_local.is_initialized()  # reused the session's Ray, did not shut it down


def test_a_crashing_seed_is_reported_and_the_others_finish(ray_local, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULTS_ENV, '{"fail_seeds": [2]}')
    result = run_multi_seed(_cfg(tmp_path), bundle_dir=tmp_path / "ms")
    assert result.failed_seeds == [2]
    saved = json.loads((tmp_path / "ms" / "metrics" / "multi_seed_metrics.json").read_text())
    by_seed = {r["seed"]: r for r in saved["per_seed"]}
    assert by_seed[2]["status"] == "failed" and "injected failure of seed 2" in by_seed[2]["error"]
    assert (tmp_path / "ms" / "seed_2" / "logs" / "error.txt").is_file()  # full traceback kept
    assert by_seed[1]["status"] == by_seed[3]["status"] == "ok"
    assert saved["failed_seeds"] == [2] and saved["summary"]["overall_score"]["n"] == 2
    assert saved["summary"]["overall_score"]["mean"] == pytest.approx(
        statistics.fmean([by_seed[1]["overall_score"], by_seed[3]["overall_score"]]))
    assert (tmp_path / "ms" / "seed_1" / "preds" / "pred.h5ad").is_file()  # keep_preds defaults to true
