"""Hyperparameter sweeps on Ray Tune + Optuna: spec (space.py), trainable, driver (runner.py), export.

Ray and Optuna are imported only inside this package (and nbglm.multiseed), never by the layers below.
"""
