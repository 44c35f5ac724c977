"""Getting onto Ray: reuse the Ray this process already has, attach to a cluster, or start a local one.

Only the code that initialised Ray shuts it down, so a test session (or a notebook) can hold one
Ray and run many multi-seed runs and sweeps on it. Attaching ships the `nbglm` package to the
workers in a `runtime_env`; an unreachable address is one line, not a minute-long hang.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import nbglm
from nbglm.errors import NbglmError

log = logging.getLogger("nbglm")

_ATTACH_HINT = ("is a cluster running there (`ray start --head`)? With token auth, set RAY_AUTH_MODE=token "
                "and provide the cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token")


def package_runtime_env() -> dict:
    """Ship this checkout's `nbglm` to every worker of an attached cluster."""
    return {"py_modules": [str(Path(nbglm.__file__).resolve().parent)], "excludes": ["__pycache__", "*.pyc"]}


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _check_reachable(address: str) -> None:
    """Fail fast (seconds) on HOST:PORT or ray://HOST:PORT that nothing listens on."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise NbglmError(f"bad Ray address '{address}': expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise NbglmError(f"cannot reach Ray at {address} ({exc.strerror or exc}); start the cluster "
                         "(`ray start --head`) or fix --address") from None


def connect(address: str | None, units: int = 1) -> bool:
    """Make sure Ray is up; True when this call initialised it (the caller then shuts it down).

    No address (and no RAY_ADDRESS in the environment, which Ray's own tools also honour) starts a
    local Ray sized to the machine (its real CPUs and GPUs, no GPU declared when there is none).
    Token auth, on by default for a new local Ray, needs nothing from us; an attached cluster's
    token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token.
    `units` is how many seed units run at once: a local Ray keeps that many idle workers (Ray's
    default is one per CPU), so the next config's units reuse warm workers instead of paying a
    process start and the torch import each time.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        keep = max(units, os.cpu_count() or 1)
        try:
            ray.init(address="local", include_dashboard=False, _system_config={"num_workers_soft_limit": keep})
        except Exception as exc:  # e.g. no writable ~/.ray for the auth token, no room in /tmp
            raise NbglmError(f"could not start a local Ray: {_first_line(exc)}") from None
        return True
    _check_reachable(address)
    try:
        ray.init(address=address, runtime_env=package_runtime_env())
    except Exception as exc:  # ConnectionError, AuthenticationError, ...: one line for the user
        raise NbglmError(f"could not attach to Ray at {address}: {_first_line(exc)} ({_ATTACH_HINT})") from None
    return True


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return Path(path).exists()


def check_shared_storage(directory: Path) -> None:
    """Every node writes seed records into the sweep directory, so on a multi-node cluster it must be
    one every node mounts: fail in seconds naming the nodes that cannot see it, not lose their results."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".probe_{secrets.token_hex(4)}"
    probe.touch()
    try:
        seen = ray.get([_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(str(probe)) for n in nodes], timeout=300)
    finally:
        probe.unlink(missing_ok=True)
    blind = [f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n, ok in zip(nodes, seen) if not ok]
    if blind:
        raise NbglmError(f"storage_path: {directory} is not visible on node(s) {', '.join(blind)}; on a multi-node "
                         "cluster put storage_path on a filesystem every node mounts (NFS, or a bucket mounted with "
                         "s3fs/gcsfuse)")


@contextmanager
def ray_session(address: str | None, units: int = 1) -> Iterator[bool]:
    """`connect` for the duration of a block; shut down only a Ray this block initialised."""
    started = connect(address, units)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


def unit_resources(cpu: float, gpu: float) -> tuple[float, float]:
    """(cpu, gpu) that one seed unit requests on this cluster, checked against what exists.

    A GPU request on a cluster without GPUs falls back to 0 with one warning instead of waiting
    forever; a request that no node can meet is an error (units that fit queue for their turn).
    """
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    node_cpu = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    node_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
    if gpu > 0 and ray.cluster_resources().get("GPU", 0.0) == 0:
        log.warning("resources.gpu=%g but the Ray cluster has no GPU: seed units run with gpu=0 on CPU", gpu)
        gpu = 0.0
    if gpu > node_gpu:
        raise NbglmError(f"resources.gpu={gpu:g} per seed unit but the largest node has {node_gpu:g} GPU(s); "
                         "lower resources.gpu")
    if cpu > node_cpu:
        raise NbglmError(f"resources.cpu={cpu:g} per seed unit but the largest node has {node_cpu:g} CPU(s); "
                         "lower resources.cpu")
    return cpu, gpu
