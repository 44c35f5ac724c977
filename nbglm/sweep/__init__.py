"""Hyperparameter sweeps on Ray Tune + Optuna, and the seed units the multi-seed mode shares.

space.py (spec parsing and validation), units.py (one seed as a Ray task), trainable.py (one Tune
trial per config), search.py (searcher, Optuna study, samplers, ASHA), runner.py (the `launch.py`
driver), aggregate.py (export, Pareto front, progress line, TensorBoard),
cluster.py (local or attached Ray). Ray and Optuna are imported only inside this package (and
nbglm.multiseed), never by the layers below.
"""
