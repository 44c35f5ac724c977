"""Fitting: held-out quality on the synthetic data, concise vs whole, determinism, errors, checkpoints."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from nbglm.data import Dataset, make_synthetic
from nbglm.errors import NbglmError
from nbglm.losses import LOSSES, nb_nll
from nbglm.model import CONTROL_IDX, LowRankNBGLM
from nbglm.checkpoint import load_checkpoint, save_checkpoint
from nbglm.batches import Cells, Pseudobulk, WholeBatches
from nbglm.train import _fit_rows, _prepare, _whole_cells, control_stats, fit, resolve_device

from small import small_cfg

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def data(small_data: Dataset) -> Dataset:
    return small_data


@pytest.fixture(scope="module")
def true_lfc(data: Dataset) -> np.ndarray:
    cfg = small_cfg()
    syn = make_synthetic(cfg.data.synthetic, cfg.data.pert_name_col, cfg.data.control_name)
    return syn.true_lfc.loc[data.heldout_perts].to_numpy()


@pytest.fixture(scope="module")
def concise(data: Dataset) -> LowRankNBGLM:
    return fit(small_cfg(), data).model


def heldout_effects(model: LowRankNBGLM, data: Dataset) -> np.ndarray:
    with torch.no_grad():
        return model.effects(model.pert_index(data.heldout_perts)).numpy()


def heldout_cells(data: Dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pert labels' rows, log size factors vs the training median, dense counts) of held-out cells."""
    test = data.test[data.test.obs[data.pert_col].astype(str) != data.control]
    ref = np.median(np.asarray(data.train.X.sum(axis=1)).ravel())
    y = torch.as_tensor(test.X.toarray())
    log_sf = (y.sum(1) / float(ref)).log()
    return test.obs[data.pert_col].astype(str).tolist(), log_sf, y


def heldout_nb_nll(model: LowRankNBGLM, data: Dataset, control_only: bool = False) -> float:
    labels, log_sf, y = heldout_cells(data)
    with torch.no_grad():
        pert = torch.full((len(labels),), CONTROL_IDX) if control_only else model.pert_index(labels)
        return float(nb_nll(model(pert, log_sf), y, model.theta).mean())


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_heldout_lfc_correlates_with_truth(data: Dataset, true_lfc: np.ndarray, concise: LowRankNBGLM) -> None:
    r = pearson(heldout_effects(concise, data), true_lfc)
    # Control: the same fit with perturbation embeddings shuffled among perturbations.
    emb = data.pert_emb.copy()
    emb[:] = emb.to_numpy()[np.random.default_rng(0).permutation(len(emb))]
    shuffled = fit(small_cfg(), replace(data, pert_emb=emb)).model
    r_shuffled = pearson(heldout_effects(shuffled, data), true_lfc)
    assert r > 0.45, r
    assert r > r_shuffled + 0.3, (r, r_shuffled)


def test_heldout_nb_nll_beats_the_control_mean_model(data: Dataset, concise: LowRankNBGLM) -> None:
    trained, control = heldout_nb_nll(concise, data), heldout_nb_nll(concise, data, control_only=True)
    assert trained < control - 0.02, (trained, control)  # ~1.86 vs ~1.92 nats per cell-gene


def test_concise_and_whole_reach_similar_heldout_error(data: Dataset, true_lfc: np.ndarray,
                                                       concise: LowRankNBGLM) -> None:
    # ~4,800 cells / 1,024 = 5 minibatch steps per epoch: 100 steps, a third of concise's 15 x 20.
    whole = fit(small_cfg("train.fit_mode=whole", "train.batch_size=1024", "train.epochs=20"), data).model
    nll_c, nll_w = heldout_nb_nll(concise, data), heldout_nb_nll(whole, data)
    assert abs(nll_c - nll_w) / nll_w < 0.005, (nll_c, nll_w)
    mae_c = np.abs(heldout_effects(concise, data) - true_lfc).mean()
    mae_w = np.abs(heldout_effects(whole, data) - true_lfc).mean()
    assert abs(mae_c - mae_w) / mae_w < 0.1, (mae_c, mae_w)


@pytest.mark.parametrize("loss", ["poisson_nll", "poisson_deviance"])
def test_concise_poisson_gradient_equals_full_pass_over_cells(data: Dataset, loss: str) -> None:
    """Pseudobulk sums are exact sufficient statistics for the Poisson losses."""
    cfg = small_cfg(f"model.losses.primary={loss}", "model.gp_dropout=0", "model.use_cycle=true")
    model, sums, phase, ref = _prepare(cfg, data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    rows, pert = _fit_rows(cfg, data, sums, model)
    bulk = Pseudobulk(sums, rows, pert, phase, ref, True, torch.device("cpu"))
    cells = _whole_cells(cfg, data, model, ref)
    grad_bulk = torch.autograd.grad(bulk.loss(model, loss), model.V)[0]
    y = torch.as_tensor(cells.x.toarray())
    log_mu = model(torch.as_tensor(cells.pert), torch.as_tensor(np.log(cells.sf), dtype=torch.float32),
                   torch.as_tensor(cells.phase))
    grad_cells = torch.autograd.grad(LOSSES[loss](log_mu, y).mean(), model.V)[0]
    torch.testing.assert_close(grad_bulk, grad_cells, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize("density", [0.05, 0.6])
def test_whole_batches_hold_the_cells_dense_or_sparse(density: float) -> None:
    x = sp.random(300, 50, density=density, format="csr", dtype=np.float32, random_state=0)
    cells = Cells(x=x, pert=np.arange(300), sf=np.ones(300), phase=None)  # pert = row, to check rows
    batches = WholeBatches(cells, torch.device("cpu"), batch_size=64, seed=0)
    assert (batches.x is None) == (density < 1 / 3)
    order = []
    for pert, _, _, y in batches.epoch():
        assert torch.equal(y, torch.as_tensor(x[pert.numpy()].toarray()))
        order.append(pert)
    assert sorted(torch.cat(order).tolist()) == list(range(300))  # every cell once per epoch


def test_cycle_offsets_are_learned(data: Dataset) -> None:
    model = fit(small_cfg("model.use_cycle=true", "train.epochs=8"), data).model
    ctrl = data.train[data.train.obs[data.pert_col] == data.control]
    phase = ctrl.obs["phase"].astype(str).to_numpy()
    x = ctrl.X.toarray() / np.asarray(ctrl.X.sum(axis=1))
    observed = np.log(x[phase == "S"].mean(0) + 1e-6) - np.log(x[phase == "G1"].mean(0) + 1e-6)
    expressed = x.mean(0) > 1e-3
    learned = model.cycle.detach().numpy()[:, 0]
    assert pearson(learned[expressed], observed[expressed]) > 0.8


@pytest.mark.parametrize("mode", ["concise", "whole"])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_loss_trains_in_both_modes(data: Dataset, mode: str, loss: str) -> None:
    seen = []
    cfg = small_cfg(f"train.fit_mode={mode}", f"model.losses.primary={loss}", "train.epochs=2",
                    "train.steps_per_epoch=3", "train.batch_size=2048", "model.learn_theta=true",
                    "model.regularization.l1=1e-4", "model.regularization.l2=1e-3")
    result = fit(cfg, data, on_epoch_end=lambda epoch, m: seen.append((epoch, m)))
    assert [e for e, _ in seen] == [1, 2] and len(result.history) == 2
    assert all(np.isfinite(m["loss"]) and m["lr"] > 0 for _, m in seen)
    assert result.wall_time_s > 0
    assert torch.isfinite(result.model.theta).all()


def test_lr_schedule_warms_up_then_decays_to_min_lr(data: Dataset) -> None:
    cfg = small_cfg("train.epochs=10", "train.steps_per_epoch=2", "train.lr_schedule.warmup_frac=0.2",
                    "train.lr_schedule.min_lr=1e-5")
    lrs = [h["lr"] for h in fit(cfg, data).history]
    assert lrs[0] < lrs[1] == pytest.approx(2e-3)  # warm-up ends after 4 of 20 steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lrs[-1] == pytest.approx(1e-5)


def test_same_seed_same_parameters(data: Dataset) -> None:
    def params(*extra: str) -> list[torch.Tensor]:
        return [p.detach().clone() for p in fit(small_cfg("train.epochs=2", *extra), data).model.parameters()]

    for mode in ("concise", "whole"):
        a, b = params(f"train.fit_mode={mode}"), params(f"train.fit_mode={mode}")
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        c = params(f"train.fit_mode={mode}", "experiment.seed=7")
        assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_nan_loss_stops_with_an_error_naming_the_epoch(data: Dataset) -> None:
    with pytest.raises(NbglmError, match=r"diverged at epoch 1 .*lower train.lr"):
        fit(small_cfg("train.lr=1e10", "train.lr_schedule.warmup_frac=0"), data)


def test_use_cycle_without_phase_column_is_an_error(data: Dataset) -> None:
    with pytest.raises(NbglmError, match="no phase column"):
        fit(small_cfg("model.use_cycle=true"), replace(data, phase_col=None))
    train = data.train.copy()
    train.obs["phase"] = train.obs["phase"].astype(str).replace("S", "M")
    with pytest.raises(NbglmError, match=r"values \['M'\]"):
        fit(small_cfg("model.use_cycle=true"), replace(data, train=train))


def test_device_errors() -> None:
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(NbglmError, match="experiment.device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(NbglmError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_zero_count_cells_and_perts_without_embedding_are_left_out(data: Dataset) -> None:
    train = data.train.copy()
    x = train.X.tolil()
    x[5] = 0  # one empty cell
    train.X = sp.csr_matrix(x)
    emb = data.pert_emb.drop(index=data.train_perts[0])
    cfg, fewer = small_cfg(), replace(data, train=train, pert_emb=emb)
    model, sums, phase, ref = _prepare(cfg, fewer)
    labels = train.obs[data.pert_col].astype(str)
    expected = ((labels != data.control) & (labels != data.train_perts[0])).sum() - (labels.iloc[5] != data.control)
    cells = _whole_cells(replace(cfg, train=replace(cfg.train, fit_mode="whole")), fewer, model, ref)
    assert cells.x.shape[0] == expected
    assert (cells.pert != CONTROL_IDX).all() and np.isfinite(np.log(cells.sf)).all()
    rows, pert = _fit_rows(cfg, fewer, sums, model)
    bulk = Pseudobulk(sums, rows, pert, phase, ref, True, torch.device("cpu"))
    assert float(bulk.n.sum()) == expected and (bulk.pert != CONTROL_IDX).all()


@pytest.mark.parametrize("use_sf", [True, False])
@pytest.mark.parametrize("use_cycle", [True, False])
def test_control_stats_from_sums_equal_the_per_cell_moments(data: Dataset, use_sf: bool, use_cycle: bool) -> None:
    """mu_ctrl and theta from the control groups' sums are the per-cell method-of-moments values."""
    cfg = small_cfg(f"model.use_cycle={str(use_cycle).lower()}")
    _, sums, phase, ref = _prepare(cfg, data)
    mu, theta = control_stats(sums, ref, use_sf, phase, cfg.model)
    obs = data.train.obs
    x = data.train.X.toarray().astype(np.float64)
    t = x.sum(axis=1)
    ctrl = (obs[data.pert_col].astype(str) == data.control).to_numpy() & (t > 0)
    if use_cycle:
        ctrl &= (obs["phase"].astype(str) == "G1").to_numpy()
    sf = t[ctrl] / ref if use_sf else np.ones(ctrl.sum())
    norm = x[ctrl] / sf[:, None]
    mean = norm.mean(axis=0)
    excess = norm.var(axis=0) - mean * np.mean(1 / sf)
    want = np.clip(np.where(excess > 0, mean**2 / np.where(excess > 0, excess, 1), cfg.model.theta_max),
                   cfg.model.theta_min, cfg.model.theta_max)
    np.testing.assert_allclose(mu, np.maximum(x[ctrl].sum(axis=0) / sf.sum(), 0.1 / sf.sum()), rtol=1e-10)
    np.testing.assert_allclose(theta, want, rtol=1e-6)


def test_checkpoint_round_trip_reproduces_predictions(tmp_path: Path, data: Dataset) -> None:
    cfg = small_cfg("train.epochs=2", "model.use_cycle=true", "model.learn_theta=true", "model.rank=null")
    model = fit(cfg, data).model
    path = save_checkpoint(tmp_path / "ckpt" / "model.pt", model, cfg)
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temp file left
    loaded = load_checkpoint(path)
    assert loaded.gene_names == data.gene_names and loaded.pert_names == list(data.pert_emb.index)
    pert = loaded.pert_index(data.heldout_perts + data.train_perts[:3])
    log_sf, phase = torch.linspace(-1, 1, len(pert)), torch.arange(len(pert)) % 3
    with torch.no_grad():
        assert torch.equal(model(pert, log_sf, phase), loaded(pert, log_sf, phase))
    assert torch.equal(model.theta, loaded.theta) and torch.equal(model.G, loaded.G)


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(NbglmError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(NbglmError, match="cannot read checkpoint"):
        load_checkpoint(bad)
