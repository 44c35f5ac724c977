"""Getting onto Ray: reuse the Ray this process already has, attach to a cluster, or start a local one.

Only the code that initialised Ray shuts it down, so a test session (or a notebook) can hold one
Ray and run many multi-seed runs and sweeps on it. Attaching ships the `nbglm` package to the
workers in a `runtime_env`; an address where nothing answers as Ray within the connect deadline
(nothing listening, a server that is not Ray, a wrong token) is one line, not a minute-long hang
or a page of Ray's log. A local Ray listens on 127.0.0.1 only (`start_local`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import ray
from ray._private import ray_constants
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


CONNECT_TIMEOUT_S = 10.0  # default deadline of an attach attempt (--connect-timeout)


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail within `timeout` on HOST:PORT or ray://HOST:PORT where nothing listens, or where what
    listens does not speak gRPC (Ray's GCS and Ray Client both do): a gRPC server answers a call to
    a method it lacks with UNIMPLEMENTED at once, anything else fails or stays silent."""
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise NbglmError(f"bad Ray address '{address}': expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise NbglmError(f"cannot reach Ray at {address} ({exc.strerror or exc}); start the cluster "
                         "(`ray start --head`) or fix --address") from None
    channel = grpc.insecure_channel(hostport)
    try:
        channel.unary_unary("/nbglm.Probe/Ping", request_serializer=bytes, response_deserializer=bytes)(
            b"", timeout=timeout)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise NbglmError(f"{address} accepts connections but does not answer as Ray within {timeout:g}s; "
                             "check the port (the head's GCS port, 6379 by default, or ray://HOST:10001) "
                             "or raise --connect-timeout") from None
    finally:
        channel.close()


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Send this process's stderr (Ray's Python and C++ logs alike) to a scratch file for the
    duration of a connection attempt, so a failure is our one line, not Ray's page of log."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as scratch:
        os.dup2(scratch.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block (Ray and Tune read some at call time)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_auth_error(exc: BaseException | None) -> bool:
    while exc is not None:
        if type(exc).__name__ == "AuthenticationError" or "InvalidAuthToken" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def _loopback() -> Iterator[None]:
    """Ray with its node IP on the loopback address (see `start_local`), for one init."""
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with environ(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def start_local(**kwargs: Any) -> None:
    """`ray.init` of a new local Ray whose every socket listens on 127.0.0.1 only.

    Ray binds its gRPC servers (GCS, raylet, object manager, workers) and agents to the node IP,
    which it takes from the machine's outward interface unless Ray clusters are disabled
    (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read once by `ray_constants`): then the node IP is the
    loopback address. A loopback `_node_ip_address` alone is turned back into the outward IP by Ray.
    The setting is made for this start only (the processes Ray spawns inherit it); the dashboard,
    which would listen on its own host setting, is not started.
    """
    with _loopback():
        ray.init(address="local", include_dashboard=False, **kwargs)


def connect(address: str | None, units: int = 1, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Make sure Ray is up; True when this call initialised it (the caller then shuts it down).

    No address (and no RAY_ADDRESS in the environment, which Ray's own tools also honour) starts a
    local Ray sized to the machine (its real CPUs and GPUs, no GPU declared when there is none).
    Token auth, on by default for a new local Ray, needs nothing from us; an attached cluster's
    token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, with RAY_AUTH_MODE=token.
    `units` is how many seed units run at once: a local Ray keeps that many idle workers (Ray's
    default is one per CPU), so the next config's units reuse warm workers instead of paying a
    process start and the torch import each time. Attaching gives up after about `timeout` seconds.
    """
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        keep = max(units, os.cpu_count() or 1)
        try:
            start_local(_system_config={"num_workers_soft_limit": keep})
        except Exception as exc:  # e.g. no writable ~/.ray for the auth token, no room in /tmp
            raise NbglmError(f"could not start a local Ray: {_first_line(exc)}") from None
        return True
    if timeout <= 0:
        raise NbglmError(f"--connect-timeout must be a positive number of seconds, got {timeout:g}")
    check_address(address, timeout)
    # Ray would turn a loopback address into this machine's outward IP, where a loopback-only Ray
    # (ours) does not listen; its GCS attempts take ~6 s each (5 s connect + 1 s pause).
    host = address.removeprefix("ray://").rpartition(":")[0]
    local = _loopback() if host in ("127.0.0.1", "localhost", "::1", "[::1]") else contextlib.nullcontext()
    try:
        with _quiet_stderr(), local, environ(RAY_gcs_server_port_wait_time_s=str(max(1, int(timeout // 6)))):
            ray.init(address=address, runtime_env=package_runtime_env())
    except Exception as exc:  # ConnectionError, AuthenticationError, ...: one line for the user
        if _is_auth_error(exc):
            raise NbglmError(f"Ray at {address} refused this driver's token: provide the cluster's token in "
                             "RAY_AUTH_TOKEN or ~/.ray/auth_token (with RAY_AUTH_MODE=token)") from None
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
def ray_session(address: str | None, units: int = 1, timeout: float = CONNECT_TIMEOUT_S) -> Iterator[bool]:
    """`connect` for the duration of a block; shut down only a Ray this block initialised."""
    started = connect(address, units, timeout)
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
