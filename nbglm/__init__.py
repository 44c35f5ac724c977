"""nbglm: a low-rank negative-binomial GLM for unseen genetic perturbations, with Ray Tune sweeps."""

__version__ = "0.1.0"
