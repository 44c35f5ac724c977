"""Hostile and careless input (issue 19): every bad input is one stderr line with exit 2, nothing
written, no hang, no path outside its root; a full disk is one line; the local Ray is on loopback."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from nbglm.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "sweeps" / "smoke.yaml"
# Tiny synthetic data: the cases that must read data before they can fail read this.
TINY = ["data.synthetic.n_genes=60", "data.synthetic.n_train_perts=8", "data.synthetic.n_test_perts=3",
        "data.synthetic.cells_per_pert=10", "data.synthetic.n_control=40", "data.derived_embedding_dim=8",
        "data.effect_pcs=2", "train.epochs=2", "train.steps_per_epoch=2"]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _adata(n_genes: int = 12, values: np.ndarray | None = None, pert_col: str = "target_gene"):
    import anndata as ad

    labels = ["non-targeting"] * 8 + ["G01"] * 4 + ["G02"] * 4
    x = np.random.default_rng(0).poisson(2.0, (len(labels), n_genes)).astype(np.float32) if values is None else values
    return ad.AnnData(X=x, obs=pd.DataFrame({pert_col: labels}, index=[f"c{i}" for i in range(len(labels))]),
                      var=pd.DataFrame(index=[f"G{i:02d}" for i in range(n_genes)]))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bad input files, made once: h5ad, held-out lists, embeddings, checkpoints, specs."""
    d = tmp_path_factory.mktemp("bad_inputs")
    _adata().write_h5ad(d / "train.h5ad")
    _adata().write_h5ad(d / "test.h5ad")
    _adata(n_genes=0, values=np.zeros((16, 0), np.float32)).write_h5ad(d / "no_genes.h5ad")
    neg = _adata().X.copy()
    neg[0, 0] = -3
    _adata(values=neg).write_h5ad(d / "negative.h5ad")
    nan = _adata().X.copy()
    nan[1, 1] = np.nan
    _adata(values=nan).write_h5ad(d / "nan.h5ad")
    _adata(pert_col="gene").write_h5ad(d / "no_pert_col.h5ad")
    (d / "not.h5ad").write_text("this is not HDF5\n")
    (d / "binary.yaml").write_bytes(bytes(range(128, 256)) * 4)
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "val_no_col.csv").write_text("gene,n_cells\nG03,10\n")
    (d / "val_overlap.csv").write_text("target_gene,n_cells,median_umi_per_cell\nG01,10,100\n")
    (d / "val_zero.csv").write_text("target_gene,n_cells,median_umi_per_cell\nG05,0,100\n")
    (d / "val_huge.csv").write_text("target_gene,n_cells,median_umi_per_cell\nG05,1000000000000,100\n")
    (d / "emb_text.csv").write_text("gene,d0\nG00,abc\nG01,def\n")
    (d / "emb.xlsx").write_text("x")
    (d / "garbage.pt").write_bytes(os.urandom(256))
    failed = d / "failed_bundle"
    (failed / "ckpt").mkdir(parents=True)
    (failed / "preds").mkdir()
    (failed / "FAILED").write_text("RuntimeError: planted\n")
    (failed / "ckpt" / "model.pt").write_bytes(b"x")
    _adata().write_h5ad(failed / "preds" / "pred.h5ad")
    (d / "a_file").write_text("x")
    (d / "full_dir").mkdir()
    (d / "full_dir" / "x").write_text("x")
    spec = yaml.safe_load(SMOKE.read_text())
    spec["base_config"] = str(ROOT / "configs" / "default.yaml")
    (d / "smoke.yaml").write_text(yaml.safe_dump(spec))
    resume = d / "resume_root" / "smoke"
    resume.mkdir(parents=True)
    (resume / "tuner.pkl").write_bytes(b"planted")  # what Tune.can_restore looks for
    resume.chmod(0o777)
    return d


@pytest.fixture(scope="module")
def not_ray() -> Iterator[int]:
    """A plain TCP server on 127.0.0.1 that is not Ray: it accepts and answers HTTP/1 garbage."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            try:
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def _tree(*roots: Path) -> set[str]:
    return {str(p) for root in roots for p in root.rglob("*")}


Case = tuple[str, Callable[[Path, int], list[str]], int, str]


def _run(*argv: str) -> Callable[[Path, int], list[str]]:
    """A case's argv; `{d}` is the bad-input directory, `{port}` the not-Ray server's port."""
    return lambda d, port: ["run", *(a.format(d=d, port=port) for a in argv)]


def _cmd(*argv: str) -> Callable[[Path, int], list[str]]:
    return lambda d, port: [a.format(d=d, port=port) for a in argv]


SPEC = "{d}/smoke.yaml"
CASES: list[Case] = [
    # config files
    ("config-missing", _run("--config", "{d}/nope.yaml"), 2, "config file not found"),
    ("config-binary", _run("--config", "{d}/binary.yaml"), 2, "is not text"),
    ("config-not-mapping", _run("--config", "{d}/list.yaml"), 2, "must hold a mapping"),
    ("config-unknown-key", _run(*_sets("train.epoch=3")), 2, "did you mean 'train.epochs'"),
    ("config-wrong-type", _run(*_sets("train.epochs=ten")), 2, "'train.epochs' = 'ten' is invalid"),
    # non-finite floats
    ("lr-inf", _run(*_sets("train.lr=.inf")), 2, "'train.lr' = inf is invalid: expected a finite number"),
    ("lr-nan", _run(*_sets("train.lr=.nan")), 2, "'train.lr' = nan is invalid"),
    ("alpha-minus-inf", _run(*_sets("model.alpha_init=-.inf")), 2, "'model.alpha_init' = -inf"),
    ("library-cv-inf", _run(*_sets("sampling.library_size_cv=.inf")), 2, "'sampling.library_size_cv'"),
    ("median-umi-nan", _run(*_sets("sampling.median_umi_default=.nan")), 2, "'sampling.median_umi_default'"),
    ("theta-max-inf-string", _run(*_sets("model.theta_max=inf")), 2, "'model.theta_max'"),
    # bounds that disagree
    ("min-lr-above-lr", _run(*_sets("train.lr_schedule.min_lr=0.1")), 2, "min_lr = 0.1 is above train.lr"),
    ("theta-min-above-max", _run(*_sets("model.theta_min=5", "model.theta_max=1")), 2, "theta_min = 5 must be below"),
    ("synthetic-perts-above-genes", _run(*_sets("data.synthetic.n_genes=10", "data.synthetic.n_train_perts=20")),
     2, "<= data.synthetic.n_genes"),
    # names that become paths
    ("name-dotdot", _run(*_sets("experiment.name=../../x")), 2, "'experiment.name' = '../../x' is invalid"),
    ("name-absolute", _run(*_sets("experiment.name=/tmp/evil")), 2, "'experiment.name' = '/tmp/evil'"),
    ("name-empty", _run(*_sets("experiment.name=''")), 2, "a plain directory name"),
    ("name-dot-dot-only", _run(*_sets("experiment.name=..")), 2, "'experiment.name' = '..'"),
    # --set syntax
    ("set-no-equals", _run("--set", "train.lr"), 2, "expected KEY=VALUE"),
    ("set-bad-yaml", _run("--set", "model.g_mlp_hidden=[1"), 2, "not valid YAML"),
    ("set-into-a-value", _run("--set", "train.lr.x=1"), 2, "'train.lr' = {{'x': 1}} is invalid"),
    ("argparse-unknown", _run("--bogus"), 2, "unrecognized arguments: --bogus"),
    # sizes against the machine
    ("rank-huge", _run(*_sets(*TINY, "model.rank=1000000000000")), 2, "lower model.rank"),
    ("mlp-huge", _run(*_sets(*TINY, "model.g_mlp_hidden=[100000000000]")), 2, "model.g_mlp_hidden"),
    ("heldout-cells-huge", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.val_list_csv={d}/val_huge.csv",
                                       "pipeline.mode=train_sample", "data.effect_pcs=2",
                                       "data.derived_embedding_dim=4")), 2, "the held-out list's n_cells"),
    # h5ad
    ("h5ad-missing", _run(*_sets("paths.train_h5ad={d}/nope.h5ad", "pipeline.mode=train_sample",
                                 "paths.val_list_csv={d}/val_zero.csv")), 2, "file not found"),
    ("h5ad-not-hdf5", _run(*_sets("paths.train_h5ad={d}/not.h5ad", "paths.test_h5ad={d}/test.h5ad")), 2,
     "as h5ad"),
    ("h5ad-no-genes", _run(*_sets("paths.train_h5ad={d}/no_genes.h5ad", "paths.test_h5ad={d}/test.h5ad")), 2,
     "16 cells x 0 genes"),
    ("h5ad-negative", _run(*_sets("paths.train_h5ad={d}/negative.h5ad", "paths.test_h5ad={d}/test.h5ad")), 2,
     "negative values"),
    ("h5ad-nan", _run(*_sets("paths.train_h5ad={d}/nan.h5ad", "paths.test_h5ad={d}/test.h5ad")), 2,
     "NaN/inf values"),
    ("h5ad-no-pert-col", _run(*_sets("paths.train_h5ad={d}/no_pert_col.h5ad", "paths.test_h5ad={d}/test.h5ad")),
     2, "no obs column 'target_gene'"),
    ("eval-mode-without-test", _run(*_sets("paths.train_h5ad={d}/train.h5ad")), 2, "set paths.test_h5ad"),
    # held-out lists
    ("val-missing", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.val_list_csv={d}/nope.csv",
                                "pipeline.mode=train_sample")), 2, "validation list not found"),
    ("val-no-column", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.val_list_csv={d}/val_no_col.csv",
                                  "pipeline.mode=train_sample")), 2, "lacks column(s) target_gene"),
    ("val-zero-cells", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.val_list_csv={d}/val_zero.csv",
                                   "pipeline.mode=train_sample")), 2, "n_cells must be a positive number"),
    ("val-overlaps-train", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.val_list_csv={d}/val_overlap.csv",
                                       "pipeline.mode=train_sample")), 2, "G01 also have training cells"),
    # embeddings
    ("emb-missing", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.test_h5ad={d}/test.h5ad",
                                "paths.gene_embedding={d}/nope.csv")), 2, "embedding file not found"),
    ("emb-text", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.test_h5ad={d}/test.h5ad",
                             "paths.gene_embedding={d}/emb_text.csv")), 2, "non-numeric columns"),
    ("emb-extension", _run(*_sets("paths.train_h5ad={d}/train.h5ad", "paths.test_h5ad={d}/test.h5ad",
                                  "paths.gene_embedding={d}/emb.xlsx")), 2, "unsupported extension"),
    # checkpoints
    ("ckpt-unset", _run(*_sets("pipeline.mode=sample_eval")), 2, "needs pipeline.pretrained_ckpt"),
    ("ckpt-missing", _run(*_sets("pipeline.mode=sample_eval", "pipeline.pretrained_ckpt={d}/nope.pt")), 2,
     "checkpoint not found"),
    ("ckpt-garbage", _run(*_sets(*TINY, "pipeline.mode=sample_eval", "pipeline.pretrained_ckpt={d}/garbage.pt")),
     2, "cannot read checkpoint"),
    ("ckpt-of-failed-run", _run(*_sets(*TINY, "pipeline.mode=sample_eval",
                                       "pipeline.pretrained_ckpt={d}/failed_bundle/ckpt/model.pt")),
     2, "belongs to a failed run"),
    # eval and outputs
    ("eval-pred-missing", _cmd("eval", "--pred", "{d}/nope.h5ad", "--real", "{d}/test.h5ad"), 2,
     "pred file not found"),
    ("eval-pred-not-h5ad", _cmd("eval", "--pred", "{d}/not.h5ad", "--real", "{d}/test.h5ad"), 2,
     "cannot read pred file"),
    ("eval-pred-of-failed-run", _cmd("eval", "--pred", "{d}/failed_bundle/preds/pred.h5ad", "--real",
                                     "{d}/test.h5ad"), 2, "belongs to a failed run"),
    ("eval-output-exists", _cmd("eval", "--pred", "{d}/test.h5ad", "--real", "{d}/test.h5ad", "--output",
                                "{d}/a_file"), 2, "already exists"),
    ("eval-output-under-a-file", _cmd("eval", "--pred", "{d}/test.h5ad", "--real", "{d}/test.h5ad", "--output",
                                      "{d}/a_file/m.json"), 2, "cannot be written"),
    ("outputs-root-is-a-file", _run(*_sets("paths.outputs_root={d}/a_file")), 2, "is a file, not a directory"),
    ("outputs-root-under-a-file", _run(*_sets("paths.outputs_root={d}/a_file/out")), 2, "is a file"),
    ("split-output-not-empty", _cmd("split", "--input", "{d}/train.h5ad", "--test-fraction", "0.5", "--output",
                                    "{d}/full_dir"), 2, "already exists and is not an empty directory"),
    ("synth-output-is-a-file", _cmd("synth", "--output", "{d}/a_file"), 2, "already exists"),
    ("de-cache-output-under-a-file", _cmd("build-de-cache", "--real", "{d}/test.h5ad", "--output",
                                          "{d}/a_file/cache"), 2, "cannot be created"),
    # sweep specs, storage paths, resume
    ("spec-missing", _cmd("sweep", "{d}/nope.yaml"), 2, "config file not found"),
    ("spec-name-dotdot", _cmd("sweep", SPEC, "--set", "name=../x"), 2, "'name' must be a plain directory name"),
    ("spec-name-absolute", _cmd("sweep", SPEC, "--set", "name=/tmp/x"), 2, "'name' must be a plain directory name"),
    ("spec-experiment-name", _cmd("sweep", SPEC, "--set", "overrides.experiment.name=../x"), 2,
     "'experiment.name' = '../x'"),
    ("spec-storage-is-a-file", _cmd("sweep", SPEC, "--set", "storage_path={d}/a_file"), 2,
     "storage_path: {d}/a_file is a file"),
    ("spec-storage-under-a-file", _cmd("sweep", SPEC, "--set", "storage_path={d}/a_file/deeper"), 2, "is a file"),
    ("spec-negative-gpu", _cmd("sweep", SPEC, "--set", "resources.gpu=-0.5"), 2, "a GPU share must be >= 0"),
    ("spec-low-above-high", _cmd("sweep", SPEC, "--set", "search.space.model.rank.low=9"), 2, "needs low < high"),
    ("spec-high-inf", _cmd("sweep", SPEC, "--set", "search.space.train.lr.high=.inf"), 2, "finite number"),
    ("spec-inf-override", _cmd("sweep", SPEC, "--set", "overrides.train.grad_clip=.inf"), 2, "finite number"),
    ("resume-group-writable", _cmd("sweep", SPEC, "--resume", "--set", "storage_path={d}/resume_root"), 2,
     "writable by group or others"),
    # --address
    ("address-no-port", _cmd("sweep", SPEC, "--address", "localhost"), 2, "bad Ray address"),
    ("address-nothing-listens", _cmd("sweep", SPEC, "--address", "127.0.0.1:1"), 2, "cannot reach Ray"),
    ("address-not-ray", _cmd("sweep", SPEC, "--address", "127.0.0.1:{port}", "--connect-timeout", "3"), 2,
     "does not answer as Ray"),
    ("address-not-ray-multi-seed", _run(*_sets("pipeline.mode=multi_seed"), "--address", "127.0.0.1:{port}",
                                        "--connect-timeout", "3"), 2, "does not answer as Ray"),
    ("connect-timeout-negative", _cmd("sweep", SPEC, "--connect-timeout", "-1"), 2,
     "expected a positive number of seconds"),
]


def test_the_catalogue_covers_at_least_40_bad_inputs() -> None:
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("argv, code, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(argv: Callable[[Path, int], list[str]], code: int, needle: str,
                                                  bad: Path, not_ray: int, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # default outputs/ and sweep_results/ land here
    monkeypatch.setenv("NBGLM_CACHE_DIR", str(tmp_path.parent / "nbglm_cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = _tree(tmp_path, bad)
    t0 = time.monotonic()
    try:
        rc = main(argv(bad, not_ray))
    except SystemExit as exc:  # argparse rejects a bad argument by exiting
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert needle.format(d=bad) in err, err
    assert _tree(tmp_path, bad) == before
    assert time.monotonic() - t0 < 60


def test_launch_py_has_the_same_guard(bad: Path, tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), str(bad / "smoke.yaml"), "--set", "name=../x"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "plain directory name" in out.stderr
    assert not list(tmp_path.iterdir())


def test_experiment_name_never_leaves_outputs_root(tmp_path: Path) -> None:
    from nbglm.config import load_config
    from nbglm.errors import NbglmError
    from nbglm.pipeline import new_bundle_dir

    for name in ("../escape", "/tmp/escape", "a/../../b", "..", ""):
        with pytest.raises(NbglmError, match="experiment.name"):
            load_config(None, [f"experiment.name={name!r}", f"paths.outputs_root={tmp_path}"])
    bundle = new_bundle_dir(load_config(None, ["experiment.name=fine", f"paths.outputs_root={tmp_path}"]))
    assert bundle.parent == tmp_path.resolve()


def test_disk_full_while_writing_pred_is_one_line_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import anndata as ad

    def full(self: ad.AnnData, path: Path, *args: object, **kwargs: object) -> None:
        Path(path).write_bytes(b"\x89HDF half a file")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setenv("NBGLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    out = tmp_path / "outputs"
    rc = main(["run", *_sets(*TINY, f"paths.outputs_root={out}", "model.name=cell_mean", "pipeline.mode=train_sample")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("error: disk full writing ") and "pred.h5ad" in err and "needs about" in err
    assert not out.exists() or not any(out.rglob("*"))  # no bundle, no partial or temp file


def test_disk_full_outside_nbglm_atomic_is_one_line_too(monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    import nbglm.cli.config as command

    def full(args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/events.out")

    monkeypatch.setattr(command, "run", full)
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: disk full writing /somewhere/events.out") and err.count("\n") == 1


def test_a_divergence_removes_the_bundle_and_blames_lr_only_when_it_is_the_cause(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NBGLM_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "outputs"
    common = [*TINY, f"paths.outputs_root={out}", "train.grad_clip=0"]
    assert main(["run", *_sets(*common, "train.lr=1e30")]) == 2
    err = capsys.readouterr().err
    assert "after a finite start: lower train.lr (now 1e+30)" in err and err.count("\n") == 1
    assert main(["run", *_sets(*common, "model.alpha_init=1e39")]) == 2  # inf in float32: bad from the start
    err = capsys.readouterr().err
    assert "the learning rate is not the cause" in err and "model.alpha_init" in err and "lower train.lr" not in err
    assert not out.exists() or not any(out.rglob("*"))


def test_a_unit_bundle_that_failed_is_marked_and_refused(small_data, tmp_path: Path) -> None:
    from small import small_cfg

    from nbglm.errors import NbglmError
    from nbglm.pipeline import run_experiment
    from nbglm.checkpoint import load_checkpoint

    cfg = small_cfg("train.epochs=1", "sampling.sampler=nb", "train.lr=1e30", "train.grad_clip=0")
    with pytest.raises(NbglmError, match="diverged"):
        run_experiment(cfg, small_data, bundle_dir=tmp_path / "unit")
    assert (tmp_path / "unit" / "FAILED").read_text().startswith("NbglmError: training diverged")
    (tmp_path / "unit" / "ckpt").mkdir()
    (tmp_path / "unit" / "ckpt" / "model.pt").write_bytes(b"x")
    with pytest.raises(NbglmError, match="belongs to a failed run"):
        load_checkpoint(tmp_path / "unit" / "ckpt" / "model.pt")


def test_resume_from_a_private_sweep_dir_passes_the_trust_check(bad: Path, tmp_path: Path) -> None:
    from nbglm.errors import NbglmError
    from nbglm.sweep.runner import _check_directory
    from nbglm.sweep.space import load_spec

    spec = load_spec(bad / "smoke.yaml", [f"storage_path={tmp_path}"])
    spec.sweep_dir.mkdir()
    (spec.sweep_dir / "tuner.pkl").write_bytes(b"planted")
    spec.sweep_dir.chmod(0o755)
    _check_directory(spec, {}, resume=True)  # no sweep.yaml to compare: only the trust check applies
    spec.sweep_dir.chmod(0o775)
    with pytest.raises(NbglmError, match="writable by group or others"):
        _check_directory(spec, {}, resume=True)


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket (IPv4 and IPv6) that one of `pids` holds,
    from /proc/net/tcp{,6} and the processes' fd tables."""
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:  # a process that ended meanwhile
            continue
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # host-order words
                addr = socket.inet_ntop(socket.AF_INET if width == 8 else socket.AF_INET6, words)
                found.add((addr.removeprefix("::ffff:"), int(port_hex, 16)))
    return found


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def test_the_local_ray_listens_on_loopback_only(ray_local) -> None:
    @ray_local.remote
    def ping() -> int:  # start a worker too: it serves gRPC as well
        return os.getpid()

    worker = ray_local.get(ping.remote())
    pids = _descendants(os.getpid())
    assert worker in pids
    sockets = _listening(pids)
    assert len(sockets) >= 3  # GCS, raylet (node manager + object manager), workers
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets


def test_wrong_token_is_one_line(ray_local, tmp_path: Path) -> None:
    gcs = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_TOKEN": "0" * 64, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "nbglm", "run", *_sets(*TINY, "pipeline.mode=multi_seed"),
                          "--address", gcs, "--connect-timeout", "5"], capture_output=True, text=True, cwd=tmp_path,
                         env={**env, "NBGLM_CACHE_DIR": str(tmp_path / "cache")}, timeout=180)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.count("\n") == 1 and "refused this driver's token" in out.stderr, out.stderr[-2000:]
    assert time.monotonic() - t0 < 120
    assert not (tmp_path / "outputs").exists()
