"""Honest model selection: folds over the training perturbations, no leakage, the test set read once."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from nbglm.cli import main
from nbglm.data.folds import assign_folds, fold_inputs
from nbglm.data.load import assemble, read_inputs
from nbglm.errors import NbglmError
from nbglm.sweep.space import load_spec
from nbglm.train import fit

from small import small_cfg

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
SYNTH = ["data.synthetic.n_genes=100", "data.synthetic.n_train_perts=12", "data.synthetic.n_test_perts=4",
         "data.synthetic.cells_per_pert=30", "data.synthetic.n_control=120"]


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


# --- folds --------------------------------------------------------------------------------------


def test_folds_hold_out_whole_perturbations_and_their_own_controls() -> None:
    cfg = small_cfg()
    inputs = read_inputs(cfg)
    folds = assign_folds(inputs, "target_gene", "non-targeting", 3, seed=0)
    perts = folds[folds["kind"] == "perturbation"]
    assert sorted(perts["label"]) == sorted(set(inputs.train.obs["target_gene"].astype(str)) - {"non-targeting"})
    assert set(np.bincount(perts["fold"])) <= {len(perts) // 3, len(perts) // 3 + 1}  # balanced
    seen_val_perts = []
    for f in range(3):
        part = fold_inputs(inputs, folds, f, "target_gene", "non-targeting")
        train_cells, val_cells = set(part.train.obs_names), set(part.test.obs_names)
        assert not train_cells & val_cells and len(train_cells) + len(val_cells) == inputs.train.n_obs
        val_perts = set(part.heldout["target_gene"])
        assert val_perts == set(perts.loc[perts["fold"] == f, "label"])
        assert not val_perts & set(part.train.obs["target_gene"].astype(str))
        assert (part.test.obs["target_gene"] == "non-targeting").sum() > 0  # validation has its own controls
        seen_val_perts += sorted(val_perts)
    assert sorted(seen_val_perts) == sorted(perts["label"])  # every training perturbation validated once
    again = assign_folds(inputs, "target_gene", "non-targeting", 3, seed=0)
    assert again.equals(folds)  # fixed by the seed


def test_a_folds_fitted_model_never_sees_its_validation_cells_or_the_test_set(torch_one_thread) -> None:
    cfg = small_cfg("train.epochs=3")
    inputs = read_inputs(cfg)
    folds = assign_folds(inputs, "target_gene", "non-targeting", 3, seed=0)

    def fitted(inp):
        data = assemble(cfg, fold_inputs(inp, folds, 0, "target_gene", "non-targeting"))
        torch.manual_seed(0)
        return data, fit(cfg, data).model.state_dict()

    data, state = fitted(inputs)
    part = fold_inputs(inputs, folds, 0, "target_gene", "non-targeting")
    changed = inputs.train.copy()
    rows = np.flatnonzero(np.isin(changed.obs_names, part.test.obs_names))  # fold 0's validation cells
    x = changed.X.tolil()
    x[rows, :] = 7.0
    changed.X = x.tocsr().astype(np.float32)
    test = inputs.test.copy()
    test.X = test.X * 3
    data2, state2 = fitted(replace(inputs, train=changed, test=test))
    assert np.array_equal(data.gene_emb, data2.gene_emb) and data.pert_emb.loc[data.train_perts].equals(
        data2.pert_emb.loc[data2.train_perts])
    assert state.keys() == state2.keys()
    assert all(torch.equal(state[k], state2[k]) for k in state), "the fold's model depends on held-out cells"


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sets, message", [
    (["selection.folds=1"], "at least 2 folds"),
    (["selection.refit_top=0"], "refit at least 1 config"),
    (["search.space.data.synthetic.n_genes={type: int, low: 50, high: 100}"], "cannot act in a sweep"),
    (["search.space.paths.test_h5ad={type: categorical, choices: [a.h5ad, b.h5ad]}"], "cannot act in a sweep"),
    (["overrides.pipeline.mode=sample_eval", "overrides.pipeline.pretrained_ckpt=x.pt"], "use train_sample_eval"),
])
def test_bad_selection_settings_are_one_line_errors(sets: list[str], message: str) -> None:
    with pytest.raises(NbglmError, match=message) as info:
        load_spec(SMOKE, sets)
    assert "\n" not in str(info.value)


def _synth_files(tmp_path: Path) -> Path:
    out = tmp_path / "synth"
    assert main(["synth", "--output", str(out), *[a for s in SYNTH for a in ("--set", s)]]) == 0
    return out


def _file_sets(tmp_path: Path, files: Path, test: str = "test.h5ad", *extra: str) -> list[str]:
    return [f"storage_path={tmp_path / 'results'}", f"overrides.paths.train_h5ad={files / 'train.h5ad'}",
            f"overrides.paths.test_h5ad={files / test}", f"overrides.paths.gene_embedding={files / 'gene_embedding.csv'}",
            f"overrides.paths.pert_embedding={files / 'pert_embedding.csv'}", "selection.folds=2", *extra]


def test_too_many_folds_and_a_held_out_training_perturbation_are_one_line_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = _synth_files(tmp_path)
    assert main(["sweep", str(SMOKE), *(f"--set={s}" for s in _file_sets(tmp_path, files, "test.h5ad",
                                                                         "selection.folds=13"))]) == 2
    err = capsys.readouterr().err
    assert "only 12 perturbations" in err and err.count("\n") == 1
    leaky = ad.read_h5ad(files / "train.h5ad")
    ad.concat([ad.read_h5ad(files / "test.h5ad"), leaky[leaky.obs["target_gene"] == leaky.obs["target_gene"].iloc[-1]]]
              ).write_h5ad(tmp_path / "leaky.h5ad")
    assert main(["sweep", str(SMOKE), *(f"--set={s}" for s in _file_sets(tmp_path, files, str(tmp_path / "leaky.h5ad"))
                                        )]) == 2
    err = capsys.readouterr().err
    assert "also have training cells" in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()


# --- a sweep with folds -------------------------------------------------------------------------


def test_selection_ignores_the_test_set_which_is_scored_once_at_the_end(ray_local, tmp_path: Path) -> None:
    files = _synth_files(tmp_path)
    test = ad.read_h5ad(files / "test.h5ad")
    labels = test.obs["target_gene"].astype(str).to_numpy()
    perturbed = np.flatnonzero(labels != "non-targeting")
    labels[perturbed] = np.random.default_rng(0).permutation(labels[perturbed])
    test.obs["target_gene"] = labels
    test.write_h5ad(files / "shuffled.h5ad")

    results = {}
    for name, test_file in (("real", "test.h5ad"), ("shuffled", "shuffled.h5ad")):
        sets = _file_sets(tmp_path, files, test_file, f"name={name}", "search.num_samples=2", "seeds=[1]",
                          "selection.refit_top=2")
        assert main(["sweep", str(SMOKE), *(f"--set={s}" for s in sets)]) == 0
        results[name] = tmp_path / "results" / name

    def selection(sweep_dir: Path) -> list[dict]:
        keep = ("status", "n_units_ok", "n_units", "overall_score_mean", "overall_score_std", "des_mean", "mae_mean",
                "model.rank", "train.lr", "model.g_mlp_hidden", "model.gp_activation")
        return [{k: row[k] for k in keep} for row in _csv(sweep_dir / "results" / "configs.csv")]

    real, shuffled = results["real"], results["shuffled"]
    trials = _csv(real / "results" / "trials.csv")
    assert len(trials) == 2 * 2 * 1 and {t["fold"] for t in trials} == {"0", "1"}  # configs x folds x seeds
    assert (real / "folds.csv").read_text() == (shuffled / "folds.csv").read_text()
    assert selection(real) == selection(shuffled)
    chosen = [yaml.safe_load((d / "results" / "best_config.yaml").read_text()) for d in (real, shuffled)]
    assert [{k: v for k, v in c.items() if k != "paths"} for c in chosen] == [
        {k: v for k, v in chosen[0].items() if k != "paths"}] * 2
    final_real = json.loads((real / "results" / "final" / "metrics.json").read_text())
    final_shuffled = json.loads((shuffled / "results" / "final" / "metrics.json").read_text())
    assert len(final_real["configs"]) == 2
    cv = [c["cv"]["overall_score"]["mean"] for c in final_real["configs"]]
    assert cv == [c["cv"]["overall_score"]["mean"] for c in final_shuffled["configs"]]
    assert [c["test"]["pds"]["mean"] for c in final_real["configs"]] != [
        c["test"]["pds"]["mean"] for c in final_shuffled["configs"]]
    pred = ad.read_h5ad(real / "results" / "final" / "pred.h5ad")
    assert set(pred.obs["target_gene"].astype(str)) == set(ad.read_h5ad(files / "test.h5ad").obs["target_gene"])
    assert np.array_equal(pred.X.data, np.round(pred.X.data)) and pred.X.min() >= 0  # raw integer counts
    from cell_eval._cli._prep import strip_anndata

    strip_anndata(pred, str(tmp_path / "pred.vcc"), list(pred.var_names), ntc_name="non-targeting",
                  exp_gene_dim=None)
    assert (tmp_path / "pred.vcc").stat().st_size > 0



def test_without_ground_truth_the_sweep_predicts_the_held_out_list(ray_local, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    files = _synth_files(tmp_path)
    sets = [s for s in _file_sets(tmp_path, files, "test.h5ad", "name=blind", "search.num_samples=1", "seeds=[1]")
            if "test_h5ad" not in s] + [f"overrides.paths.val_list_csv={files / 'val_list.csv'}"]
    assert main(["sweep", str(SMOKE), *(f"--set={s}" for s in sets)]) == 0
    final = tmp_path / "results" / "blind" / "results" / "final"
    assert "no ground truth" in capsys.readouterr().out
    assert (final / "pred.h5ad").is_file() and (final / "config.yaml").is_file()
    assert not (final / "metrics.json").exists()
    pred = ad.read_h5ad(final / "pred.h5ad")
    wanted = pd.read_csv(files / "val_list.csv")
    counts = pred.obs["target_gene"].astype(str).value_counts()
    assert {p: int(counts[p]) for p in wanted["target_gene"]} == dict(zip(wanted["target_gene"], wanted["n_cells"]))
    assert counts["non-targeting"] > 0
