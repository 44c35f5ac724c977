"""nbglm.atomic: the one way files and directories are written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbglm import atomic
from nbglm.errors import NbglmError


def test_a_failed_write_leaves_neither_the_file_nor_a_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        atomic.write_bytes(target, lambda f: (f.write(b"half"), (_ for _ in ()).throw(RuntimeError("disk"))))
    assert list(tmp_path.iterdir()) == []
    atomic.write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_files_and_directories_get_the_mode_the_umask_gives(tmp_path: Path) -> None:
    old = os.umask(0o022)
    atomic._umask.cache_clear()
    try:
        atomic.write_text(tmp_path / "f.txt", "x")
        with atomic.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "inner.txt").write_text("y")
    finally:
        os.umask(old)
        atomic._umask.cache_clear()
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "d" / "inner.txt").read_text() == "y"


def test_temp_files_of_a_killed_write_are_removed_by_the_next_write(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    stale = tmp_path / f".pred.h5ad.{atomic._host()}.{pid}.abcd1234.tmp.h5ad"
    stale.write_bytes(b"partial")
    live = tmp_path / f".other.{atomic._host()}.{os.getpid()}.abcd1234.tmp"  # a write in progress: kept
    live.write_bytes(b"in progress")
    atomic.write_text(tmp_path / "metrics.json", "{}")
    assert not stale.exists() and live.exists()


def test_an_output_directory_is_never_merged_into(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep")
    with pytest.raises(NbglmError, match="already exists"), atomic.atomic_dir(tmp_path / "out"):
        pass
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    (tmp_path / "empty").mkdir()
    with atomic.atomic_dir(tmp_path / "empty") as tmp:
        (tmp / "new.txt").write_text("x")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]
