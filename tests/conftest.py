"""Shared test fixtures."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

# idle workers the session's Ray keeps, as `connect` keeps one per unit in flight: 2 smoke configs x 4 units
WARM_WORKERS = 8


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """One local Ray for the whole session: 2 CPUs and 2 *logical* GPUs, so fractional-GPU packing is
    tested on a machine without one. The multi-seed runner and the sweep driver find it initialised,
    reuse it and leave it running.

    Ray 2.60 starts a local cluster with token auth on and, lacking a token, writes one to
    ~/.ray/auth_token; a per-session token in RAY_AUTH_TOKEN keeps auth on without touching $HOME
    (and reaches the sweep driver subprocesses the tests spawn). It starts as the driver's own local
    Ray does (`start_local`: every socket on 127.0.0.1), which test_hostile checks, and keeps as many
    idle workers as `connect` would (`WARM_WORKERS`): a sweep's next config reuses workers that have
    already imported torch.
    """
    import ray

    from nbglm.sweep.cluster import start_local

    own_token = not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if own_token:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    start_local(num_cpus=2, num_gpus=2, object_store_memory=200 * 1024**2,
                _system_config={"num_workers_soft_limit": WARM_WORKERS})
    try:
        yield ray
    finally:
        ray.shutdown()
        if own_token:
            os.environ.pop("RAY_AUTH_TOKEN", None)


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Small tensors gain nothing from threads, and thread sync crawls on a busy shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_data():
    """The reduced synthetic dataset (tests/small.py), loaded once per session."""
    from small import small_cfg

    from nbglm.data import load_dataset

    return load_dataset(small_cfg())
