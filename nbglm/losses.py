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


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "nb_nll": nb_nll, "nb_deviance": nb_deviance, "poisson_nll": poisson_nll,
    "poisson_deviance": poisson_deviance, "mse_log1p": mse_log1p,
}
