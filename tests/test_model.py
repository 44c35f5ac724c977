"""LowRankNBGLM: the forward formula, shapes, kernel rank, MLPs and the losses."""

import pytest
import torch
from torch import nn

from nbglm.config import load_config
from nbglm.errors import NbglmError
from nbglm.losses import LOSSES, nb_nll, nb_nll_sum
from nbglm.model import CONTROL_IDX, LowRankNBGLM, build_mlp, group_perts


def make_model(*overrides: str, n_genes: int = 40, n_perts: int = 7, d: int = 12) -> LowRankNBGLM:
    torch.manual_seed(0)
    cfg = load_config(None, ["model.g_mlp_hidden=[16]", "model.p_mlp_hidden=[16]", "model.g_out_dim=10",
                             "model.p_out_dim=9", *overrides]).model
    return LowRankNBGLM(torch.randn(n_genes, d), torch.randn(n_perts, d + 3), torch.rand(n_genes) + 0.1,
                        torch.full((n_genes,), 5.0), cfg, gene_names=[f"g{i}" for i in range(n_genes)],
                        pert_names=[f"p{i}" for i in range(n_perts)])


def randomize(model: LowRankNBGLM) -> None:
    """Move the parameters off their init (V = 0 makes every effect zero)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)


def test_build_mlp_shapes_and_identity() -> None:
    assert isinstance(build_mlp(12, [], 99), nn.Identity)  # [] hidden = identity, out_dim unused
    for norm in ("none", "batchnorm", "layernorm"):
        mlp = build_mlp(12, [32, 16], 5, activation="silu", norm=norm, dropout=0.1)
        assert mlp(torch.randn(4, 12)).shape == (4, 5)
    kinds = [type(m) for m in build_mlp(12, [8], 3, activation="relu", norm="layernorm", dropout=0.2)]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.ReLU, nn.Dropout, nn.Linear]


def test_forward_shape_and_formula() -> None:
    model = make_model("model.use_cycle=true")
    randomize(model)
    model.eval()
    pert = torch.tensor([3, CONTROL_IDX, 3, 0, 6])
    log_sf = torch.randn(5)
    phase = torch.tensor([0, 1, 2, 2, 0])
    out = model(pert, log_sf, phase)
    assert out.shape == (5, model.n_genes)
    g, p = model.g_mlp(model.G), model.p_mlp(model.P)
    effect = model.alpha * torch.tanh(g @ model.U @ model.V.T @ p.T + model.b[:, None])  # genes x perts
    cycle = torch.cat([torch.zeros(model.n_genes, 1), model.cycle], dim=1)  # G1 = 0
    for i in range(5):
        expected = model.log_mu_ctrl + log_sf[i] + cycle[:, phase[i]]
        if pert[i] != CONTROL_IDX:
            expected = expected + effect[:, pert[i]]
        torch.testing.assert_close(out[i], expected, rtol=1e-4, atol=1e-4)  # matmul order differs
    # No cycle term without phases; controls only: the control mean times the size factor.
    ctrl = model(torch.full((3,), CONTROL_IDX), torch.zeros(3))
    torch.testing.assert_close(ctrl, model.log_mu_ctrl.expand(3, -1))
    # Rows grouped once (as the pseudobulk fit does) give the same means, with and without a control.
    for rows in (pert, torch.tensor([6, 0, 6, 2])):
        groups = group_perts(rows)
        assert groups.has_ctrl == bool((rows == CONTROL_IDX).any())
        sf = torch.randn(len(rows))
        torch.testing.assert_close(model(rows, sf, groups=groups), model(rows, sf), rtol=0, atol=0)


def test_untrained_model_is_the_control_mean_model() -> None:
    model = make_model()
    assert torch.equal(model.effects(torch.arange(7)), torch.zeros(7, model.n_genes))


@pytest.mark.parametrize("rank", [1, 3, 5])
def test_rank_r_gives_rank_r_kernel(rank: int) -> None:
    model = make_model(f"model.rank={rank}")
    randomize(model)
    k = model.kernel()
    assert k.shape == (10, 9)
    assert torch.linalg.matrix_rank(k) == rank
    # The effect matrix over all genes x perts has rank <= rank before the bias and tanh.
    raw = model.p_mlp(model.P) @ model.kernel().T @ model.g_mlp(model.G).T
    assert torch.linalg.matrix_rank(raw) == rank


def test_full_rank_kernel_and_identity_mlps() -> None:
    model = make_model("model.rank=null", "model.g_mlp_hidden=[]", "model.p_mlp_hidden=[]")
    randomize(model)
    assert model.kernel().shape == (12, 15)  # raw embedding dims: the MLPs are identities
    assert torch.linalg.matrix_rank(model.kernel()) == 12
    assert model(torch.tensor([0, 1]), torch.zeros(2)).shape == (2, model.n_genes)


def test_penalty_is_on_k() -> None:
    model = make_model("model.regularization.l1=0.1", "model.regularization.l2=0.01")
    randomize(model)
    k = model.kernel()
    torch.testing.assert_close(model.penalty(), 0.1 * k.abs().sum() + 0.01 * k.square().sum())
    assert make_model().penalty() == 0


def test_losses_match_distributions_and_vanish_at_the_mean() -> None:
    y = torch.tensor([[0.0, 1.0, 5.0, 40.0]])
    mu = torch.tensor([[0.5, 2.0, 5.0, 30.0]])
    theta = torch.tensor([0.7, 3.0, 10.0, 200.0])
    nb = torch.distributions.NegativeBinomial(total_count=theta, logits=(mu / theta).log())
    torch.testing.assert_close(nb_nll(mu.log(), y, theta), -nb.log_prob(y))
    torch.testing.assert_close(LOSSES["poisson_nll"](mu.log(), y), -torch.distributions.Poisson(mu).log_prob(y))
    for name in ("nb_deviance", "poisson_deviance", "mse_log1p"):
        at_truth = LOSSES[name](y.clamp_min(1e-30).log(), y, theta)
        assert torch.allclose(at_truth, torch.zeros_like(y), atol=1e-5), name
        assert (LOSSES[name](mu.log(), y, theta) >= 0).all()
    # Log-space losses stay finite for extreme means.
    extreme = torch.tensor([[-80.0, 80.0, 0.0, 0.0]])
    for name, fn in LOSSES.items():
        if name.startswith("nb") or name == "mse_log1p":
            assert torch.isfinite(fn(extreme, y, theta)).all(), name


def test_fused_nb_nll_sum_equals_autograd_of_the_formula() -> None:
    """Values and gradients (log mean and dispersion) equal autograd's through nb_nll, over more
    rows than one slice of the fused loss, zeros and large counts included."""
    torch.manual_seed(0)
    rows, genes = 150, 13
    y = torch.poisson(torch.rand(rows, genes) * 30).double()
    y[::7] = 0
    log_mu = (torch.randn(rows, genes, dtype=torch.float64) * 2).requires_grad_()
    log_theta = torch.randn(genes, dtype=torch.float64).requires_grad_()
    scale = torch.rand(rows, 1, dtype=torch.float64) + 0.5
    grad_out = torch.tensor(0.37, dtype=torch.float64)
    values, grads = [], []
    for loss in (lambda t: nb_nll(log_mu, y, t).sum(), lambda t: nb_nll_sum(log_mu, y, t)):
        value = loss(log_theta.exp() * scale)
        values.append(value.detach())
        grads.append(torch.autograd.grad(value, (log_mu, log_theta), grad_out))
    torch.testing.assert_close(values[1], values[0], rtol=1e-12, atol=0)
    for fused, plain in zip(grads[1], grads[0]):
        torch.testing.assert_close(fused, plain, rtol=1e-9, atol=1e-12)
    # Only the gradients asked for are made: a fixed dispersion gets none.
    (g,) = torch.autograd.grad(nb_nll_sum(log_mu, y, log_theta.detach().exp() * scale), (log_mu,))
    torch.testing.assert_close(g, grads[0][0] / grad_out)


def test_pert_index_and_gene_check_errors() -> None:
    model = make_model()
    assert model.pert_index(["p2", "p0"]).tolist() == [2, 0]
    with pytest.raises(NbglmError, match="no embedding: MYC"):
        model.pert_index(["p1", "MYC"])
    model.check_genes([f"g{i}" for i in range(40)])
    with pytest.raises(NbglmError, match="40 genes but the data has 39"):
        model.check_genes([f"g{i}" for i in range(39)])
    with pytest.raises(NbglmError, match="gene 0 is 'g1'"):
        model.check_genes([f"g{i}" for i in (1, 0, *range(2, 40))])
