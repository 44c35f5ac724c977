"""One experiment end to end: every mode, the bundle, reproducibility, atomic writes, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from nbglm.cli import main
from nbglm.config import Config, load_config
from nbglm.data import Dataset, load_dataset
from nbglm.pipeline import run_experiment

TINY = [
    "data.synthetic.n_genes=120",
    "data.synthetic.n_train_perts=16",
    "data.synthetic.n_test_perts=5",
    "data.synthetic.cells_per_pert=30",
    "data.synthetic.n_control=150",
    "model.g_mlp_hidden=[32]",
    "model.g_out_dim=16",
    "model.p_mlp_hidden=[32]",
    "model.p_out_dim=16",
    "model.rank=4",
    "train.epochs=4",
    "train.steps_per_epoch=5",
    "train.lr=5e-3",
]


def tiny(tmp_path: Path, *extra: str) -> Config:
    return load_config(None, [*TINY, f"paths.outputs_root={tmp_path / 'outputs'}", *extra])


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_dataset(load_config(None, TINY))


def read_metrics(bundle: Path) -> dict:
    return json.loads((bundle / "metrics" / "metrics.json").read_text())


def test_train_sample_eval_writes_the_full_bundle(tmp_path: Path, data: Dataset) -> None:
    res = run_experiment(tiny(tmp_path), data)
    b = res.bundle
    assert b.parent == (tmp_path / "outputs").resolve() and b.name.startswith("nbglm__")
    for rel in ("config.yaml", "ckpt/model.pt", "preds/pred.h5ad", "metrics/metrics.json", "logs/run.log"):
        assert (b / rel).is_file(), rel
    saved = read_metrics(b)
    assert saved["seed"] == 42 and saved["mode"] == "train_sample_eval"
    for key in ("des", "pds", "mae", "overall_score"):
        assert saved[key] == pytest.approx(res.metrics[key])
    assert len(saved["history"]) == 4 and set(saved["per_perturbation"]) == set(data.heldout_perts)
    assert load_config(b / "config.yaml") == tiny(tmp_path)  # the resolved config reruns as is
    pred = ad.read_h5ad(b / "preds" / "pred.h5ad")
    assert list(pred.var_names) == data.gene_names
    values = pred.X.data
    assert values.max() > 1 and np.array_equal(values, np.round(values))  # counts: the scoring's log1p is in memory only
    assert not list(b.rglob("*.tmp*"))  # no temp file left behind
    assert "overall=" in (b / "logs" / "run.log").read_text()


def test_same_seed_same_metrics_other_seed_differs(tmp_path: Path, data: Dataset) -> None:
    a = run_experiment(tiny(tmp_path, "experiment.seed=3"), data).metrics
    b = run_experiment(tiny(tmp_path, "experiment.seed=3"), data).metrics
    c = run_experiment(tiny(tmp_path, "experiment.seed=4"), data).metrics
    assert a["per_perturbation"] == b["per_perturbation"] and a["overall_score"] == b["overall_score"]
    assert a["mae"] != c["mae"]


def test_sample_eval_from_checkpoint_reproduces_train_sample_eval(tmp_path: Path, data: Dataset) -> None:
    full = run_experiment(tiny(tmp_path), data)
    trained = run_experiment(tiny(tmp_path, "pipeline.mode=train_sample"), data)
    assert trained.metrics == {} and (trained.bundle / "ckpt" / "model.pt").is_file()
    ckpt = trained.bundle / "ckpt" / "model.pt"
    again = run_experiment(tiny(tmp_path, "pipeline.mode=sample_eval", f"pipeline.pretrained_ckpt={ckpt}"), data)
    assert again.metrics["per_perturbation"] == full.metrics["per_perturbation"]
    assert again.metrics["overall_score"] == full.metrics["overall_score"]
    assert not (again.bundle / "ckpt").exists()  # nothing trained, nothing checkpointed

    only = run_experiment(tiny(tmp_path, "pipeline.mode=sample", f"pipeline.pretrained_ckpt={ckpt}"), data)
    assert only.metrics == {} and (only.bundle / "preds" / "pred.h5ad").is_file()

    pred = full.bundle / "preds" / "pred.h5ad"
    scored = run_experiment(tiny(tmp_path, "pipeline.mode=evaluate_only", f"paths.pred_h5ad={pred}"), data)
    assert scored.metrics["per_perturbation"] == full.metrics["per_perturbation"]


def test_interrupted_write_leaves_no_bundle_and_no_partial_file(tmp_path: Path, data: Dataset,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def crash_mid_write(self: ad.AnnData, filename: Path, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"\x89HDF\r\n half of a file")
        raise KeyboardInterrupt  # the user pressed Ctrl-C (or the node died) while writing

    monkeypatch.setattr(ad.AnnData, "write_h5ad", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny(tmp_path), data)
    # The bundle is filled under a temp name and renamed only once complete: nothing looks like a run.
    assert not list((tmp_path / "outputs").rglob("*"))


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    other_genes = tmp_path / "other_genes.h5ad"
    ad.AnnData(X=__import__("numpy").ones((3, 4), dtype="float32")).write_h5ad(other_genes)
    return [
        (["--set", "pipeline.mode=train_only"], "pipeline.mode"),
        (["--set", "pipeline.mode=sample_eval"], "needs pipeline.pretrained_ckpt"),
        (["--set", "pipeline.mode=sample_eval", "--set", f"pipeline.pretrained_ckpt={tmp_path}/no.pt"],
         "checkpoint not found"),
        (["--set", "pipeline.mode=evaluate_only"], "needs paths.pred_h5ad"),
        (["--set", "pipeline.mode=evaluate_only", "--set", f"paths.pred_h5ad={other_genes}"], "other genes"),
        (["--config", str(tmp_path / "missing.yaml")], "config file not found"),
        (["--set", "model.rank"], "expected KEY=VALUE"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "outputs"
    for argv, needle in bad_inputs(tmp_path):
        code = main(["run", *argv, *[a for kv in TINY for a in ("--set", kv)], "--set", f"paths.outputs_root={out}"])
        err = capsys.readouterr().err.strip()
        assert code == 2, argv
        assert err.startswith("error: ") and needle in err and "\n" not in err, (argv, err)
        assert not out.exists(), argv


def test_a_prediction_kept_on_disk_is_not_sized_against_memory(tmp_path: Path, data: Dataset,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A model's prediction is sampled to disk and scored from there (vcc2025), so only its cells'
    labels and depths are sized against memory; a baseline's, or one the vcc2026 profile scores, is
    held and sized whole (tests/test_hostile.py: a held-out list too long for the labels is refused)."""
    from dataclasses import replace

    import nbglm.config
    from nbglm.errors import NbglmError
    from nbglm.pipeline import check_sizes

    monkeypatch.setattr(nbglm.config, "available_memory", lambda: 1e9)
    many = replace(data, heldout=data.heldout.assign(n_cells=1_000_000))  # 5e6 cells x 120 genes: ~4.8 GB as CSR
    check_sizes(tiny(tmp_path), many)
    for held in ("model.name=cell_mean", "evaluate.profile=vcc2026"):
        with pytest.raises(NbglmError, match="the prediction"):
            check_sizes(tiny(tmp_path, held), many)
