"""A real two-node Ray cluster on loopback: attach with --address, run on both nodes, survive a node's death.

Run alone with `pytest -m cluster`. Nothing here uses the session's in-process Ray (`ray_local`): the
cluster is two `ray start` processes with their own temp dirs and ports, the sweep driver is a
subprocess, and every process the test started carries a marker in its environment by which it is
killed at the end, pass or fail, leaving any other Ray on the machine alone.

The worker node runs a Python that cannot import `nbglm`: a throwaway venv whose only extra path is
this venv's site-packages, added as a plain path entry so the editable install's `.pth` hook there is
not run. The driver runs a copy of `launch.py` from the test's directory, so the script directory Ray
adds to every worker's `sys.path` holds no package either. Seed units that succeed on that node
therefore ran the copy of `nbglm` the driver shipped in its `runtime_env` (`py_modules`), which the
test also finds unpacked under the worker node's `runtime_resources`.
"""

from __future__ import annotations

import csv
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
RAY_CLI = "from ray.scripts.scripts import main; main()"
MARKER = "NBGLM_CLUSTER_TEST"  # value: <run id>-head or <run id>-worker, in every process of that node
# Tiny but not instant: each unit trains long enough for the node death to land mid-config. One seed
# x the smoke spec's 2 folds: two units per config.
SETS = ["seeds=[1]", "resources.cpu=0.5", "resources.gpu=0.5", "max_concurrent=2", "max_failures=1",
        "overrides.train.epochs=4", "overrides.train.steps_per_epoch=10"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_with_env(value: str) -> list[int]:
    needle = f"{MARKER}={value}".encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if needle in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # token auth settings for the driver
    run_id: str
    worker_tmp: Path

    def worker_node_id(self) -> str:
        log = (self.worker_tmp / "session_latest" / "logs" / "raylet.out").read_text()
        return re.search(r"Setting node ID node_id=([0-9a-f]+)", log).group(1)

    def worker_seed_dirs(self) -> set[Path]:
        """Seed bundles the worker node is training now: a running unit holds its logs/run.log open."""
        running = set()
        for pid in _pids_with_env(f"{self.run_id}-worker"):
            try:
                targets = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
            except OSError:
                continue
            running.update(Path(t).parents[1] for t in targets if t.endswith("/logs/run.log"))
        return running

    def kill_worker_node(self) -> None:
        """SIGKILL every process of the worker node at once (raylet, agents, workers): a lost machine.
        Killing the raylet alone lets its workers finish a few more moments of work before they notice."""
        pids = _pids_with_env(f"{self.run_id}-worker")
        assert any("/raylet/raylet " in _cmdline(p) for p in pids), "the worker node's raylet is not running"
        _kill(pids)


def _bare_python(where: Path) -> Path:
    """A venv that sees this venv's packages (ray, torch, ...) but not the editable `nbglm`."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    site = next(where.glob("lib/python*/site-packages"))
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = where / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import nbglm"], cwd=where, capture_output=True)
    assert probe.returncode != 0, "the worker node's Python must not see nbglm"
    return python


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Head (1 CPU, 1 logical GPU) plus one worker node (same), token auth on; always torn down.

    Every port a head would otherwise take at a fixed default (client server, dashboard, agent) is a
    free one, so another Ray on the machine (a test session's, a colleague's) cannot collide with it.
    """
    run_id = secrets.token_hex(6)
    token = secrets.token_hex(32)
    head_tmp = Path(tempfile.mkdtemp(prefix="nbh", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    worker_tmp = Path(tempfile.mkdtemp(prefix="nbw", dir="/tmp"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    port = _free_port()
    node = ["--num-cpus", "1", "--num-gpus", "1", "--object-store-memory", str(150 * 1024**2),
            "--disable-usage-stats"]
    try:
        subprocess.run([sys.executable, "-c", RAY_CLI, "start", "--head", "--port", str(port), *node,
                        "--temp-dir", str(head_tmp), "--include-dashboard", "false", "--dashboard-port", str(_free_port()),
                        "--ray-client-server-port", str(_free_port()),
                        "--dashboard-agent-listen-port", str(_free_port())],
                       env={**base, MARKER: f"{run_id}-head"}, cwd=head_tmp, check=True, capture_output=True, timeout=120)
        python = _bare_python(worker_tmp / "venv")
        subprocess.run([str(python), "-c", RAY_CLI, "start", "--address", f"127.0.0.1:{port}", *node,
                        "--temp-dir", str(worker_tmp), "--dashboard-agent-listen-port", str(_free_port())],
                       env={**base, MARKER: f"{run_id}-worker"}, cwd=worker_tmp, check=True, capture_output=True,
                       timeout=120)
        yield Cluster(f"127.0.0.1:{port}", base, run_id, worker_tmp)
    finally:
        _kill(_pids_with_env(f"{run_id}-worker") + _pids_with_env(f"{run_id}-head"))
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(worker_tmp, ignore_errors=True)


def _driver(cluster: Cluster, tmp_path: Path, log: Path, *sets: str, via_env: bool = False) -> subprocess.Popen:
    """`python launch.py smoke.yaml --address ...` (or RAY_ADDRESS) from a copy of launch.py outside the repo."""
    script = tmp_path / "launch.py"
    shutil.copy(ROOT / "launch.py", script)
    args = [sys.executable, str(script), str(SMOKE), *([] if via_env else ["--address", cluster.address]),
            *(f"--set={s}" for s in [f"storage_path={tmp_path / 'results'}", *SETS, *sets])]
    env = {**cluster.env, MARKER: f"{cluster.run_id}-head"}  # killed with the head if it outlives the test
    if via_env:
        env["RAY_ADDRESS"] = cluster.address
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def _csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _records(sweep_dir: Path) -> list[Path]:
    return list(sweep_dir.glob("config_*/units/fold_*_seed_*.json"))


def _unfinished(unit_dirs: set[Path]) -> list[Path]:
    """Unit bundles (`config_x/fold_f/seed_n`) whose record (`config_x/units/fold_f_seed_n.json`) is not
    written yet."""
    return [d for d in unit_dirs if d.parent.name.startswith("fold_")  # not the refit's final/config_x/seed_n
            and not (d.parents[1] / "units" / f"{d.parent.name}_{d.name}.json").exists()]


def test_sweep_runs_on_both_nodes_and_survives_a_worker_node_death(cluster: Cluster, tmp_path: Path) -> None:
    # 1. Attach: two configs at once, one per node (each config's two units fill a node's GPU).
    log = tmp_path / "both_nodes.log"
    driver = _driver(cluster, tmp_path, log, "name=both_nodes")
    assert driver.wait(timeout=240) == 0, log.read_text()[-4000:]
    trials = _csv(tmp_path / "results" / "both_nodes" / "results" / "trials.csv")
    assert len(trials) == 4 and all(t["status"] == "ok" for t in trials)
    worker = cluster.worker_node_id()
    nodes = {t["node_id"] for t in trials}
    assert len(nodes) == 2 and worker in nodes  # ran on both, including the node without nbglm
    shipped = cluster.worker_tmp / "session_latest" / "runtime_resources"
    assert list(shipped.rglob("nbglm/sweep/units.py")), "the package was not shipped to the worker node"

    # 2. Node death: once the first seed records of this sweep have landed and the worker node is
    # training a seed that has no record yet, kill the worker node. A node holds two units, so with
    # four configs two at a time the worker is sure to train one after the first records. The lost
    # units run again on the head (Ray retries a task whose node died; Tune retries a trial whose
    # coordinator died), the searcher goes on, and every seed is counted once.
    # This driver finds the cluster through RAY_ADDRESS instead of --address.
    log = tmp_path / "node_death.log"
    sweep_dir = tmp_path / "results" / "node_death"
    driver = _driver(cluster, tmp_path, log, "name=node_death", "search.num_samples=4", via_env=True)
    try:
        deadline = time.monotonic() + 180
        while not (_records(sweep_dir) and (lost := _unfinished(cluster.worker_seed_dirs()))):
            assert driver.poll() is None, "the sweep ended before the worker node could be killed:\n" + log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no unfinished seed ran on the worker node after the first records"
            time.sleep(0.1)
        killed_at = time.time()
        cluster.kill_worker_node()
        assert driver.wait(timeout=300) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
    configs = _csv(sweep_dir / "results" / "configs.csv")
    trials = _csv(sweep_dir / "results" / "trials.csv")
    assert len(configs) == 4 and all(c["status"] == "ok" and c["n_units_ok"] == "2" for c in configs)
    assert len(trials) == 8 and len({(t["trial_id"], t["fold"]) for t in trials}) == 8  # no unit counted twice
    assert all(t["status"] == "ok" for t in trials)
    by_unit = {(t["trial_id"], f"fold_{t['fold']}"): t for t in trials}
    rerun = [by_unit[(u.parents[1].name.removeprefix("config_"), u.parent.name)] for u in lost]
    rerun = [t for t in rerun if float(t["end"]) > killed_at]  # not one that finished as the kill came
    assert rerun, "no unit lost with the worker node ran again"
    assert all(t["node_id"] != worker for t in rerun), "a lost unit's record names the dead node"
