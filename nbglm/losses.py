"""Losses of the NB-GLM, elementwise over (cells or pseudobulks) x genes, by config name.

Each takes the model's log mean, the observed counts and the per-gene NB dispersion (ignored by
the Poisson and MSE losses) and returns the elementwise loss; training reduces it. Values are computed from log-means, so huge or
tiny means never overflow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def _nb_log_prob(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    log_theta = theta.log()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    return (torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
            + theta * (log_theta - log_theta_mu) + y * (log_mu - log_theta_mu))


def nb_nll(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative-binomial negative log-likelihood, elementwise."""
    return -_nb_log_prob(log_mu, y, theta)


def nb_deviance(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """2 [y log(y/mu) - (y + theta) log((y + theta)/(mu + theta))], elementwise."""
    y_theta = y + theta
    return 2 * (torch.xlogy(y, y) - y * log_mu
                - y_theta * (y_theta.log() - torch.logaddexp(theta.log(), log_mu)))


def poisson_nll(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    return log_mu.exp() - y * log_mu + torch.lgamma(y + 1)


def poisson_deviance(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    return 2 * (torch.xlogy(y, y) - y * log_mu - y + log_mu.exp())


def mse_log1p(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
    """(log1p(mu) - log1p(y))^2; softplus(log mu) = log1p(mu) without forming mu."""
    return (F.softplus(log_mu) - torch.log1p(y)).square()


_ROWS = 64  # rows per slice of a fused loss: its transients stay a few MB at 18,080 genes


def _nb_nll_grads(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor,
                  need_theta: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """d nb_nll / d log_mu = (theta + y) p - y and d nb_nll / d theta = -(digamma(y + theta) - digamma(theta)
    + log(1 - p) + p - y (1 - p) / theta), with p = mu / (theta + mu) = sigmoid(log mu - log theta)."""
    log_theta = theta.log()
    p = torch.sigmoid(log_mu - log_theta)
    d_mu = (theta + y) * p - y
    if not need_theta:
        return d_mu, None
    d_theta = (torch.digamma(theta) - torch.digamma(y + theta) + F.softplus(log_mu - log_theta)
               - p + y * (1 - p) / theta)
    return d_mu, d_theta


class _NBNLLSum(torch.autograd.Function):
    """sum(nb_nll) computed and differentiated a slice of rows at a time: autograd keeps only the
    inputs, not the dozen (rows x genes) intermediates of the elementwise formula (at 18,080 genes
    and a few hundred pseudobulks those are ~0.4 GiB a step)."""

    @staticmethod
    def forward(ctx, log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(log_mu, y, theta)
        total = log_mu.new_zeros((), dtype=torch.float64)
        for rows in zip(*(t.split(_ROWS) for t in (log_mu, y, theta))):
            total += nb_nll(*rows).sum(dtype=torch.float64)
        return total.to(log_mu.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, torch.Tensor | None]:
        log_mu, y, theta = ctx.saved_tensors
        need_mu, _, need_theta = ctx.needs_input_grad
        d_mu = torch.empty_like(log_mu) if need_mu else None
        d_theta = torch.empty_like(theta) if need_theta else None
        for i, rows in enumerate(zip(*(t.split(_ROWS) for t in (log_mu, y, theta)))):
            mu_part, theta_part = _nb_nll_grads(*rows, need_theta)
            sl = slice(i * _ROWS, i * _ROWS + rows[0].shape[0])
            if need_mu:
                torch.mul(mu_part, grad, out=d_mu[sl])
            if need_theta:
                torch.mul(theta_part, grad, out=d_theta[sl])
        return d_mu, None, d_theta


def nb_nll_sum(log_mu: torch.Tensor, y: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """sum(nb_nll(log_mu, y, theta)) over (rows x genes) tensors of one shape, with the memory of its inputs only."""
    return _NBNLLSum.apply(log_mu, y, theta)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "nb_nll": nb_nll, "nb_deviance": nb_deviance, "poisson_nll": poisson_nll,
    "poisson_deviance": poisson_deviance, "mse_log1p": mse_log1p,
}
