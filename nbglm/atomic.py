"""The one way nbglm writes a file or a directory: a crash or a power loss never leaves a
half-written or empty file under its final name.

Each write goes to a temp name beside the target (`.<name>.<host>.<pid>.<random>.tmp<suffix>`),
is flushed to disk (fsync), gets the mode the process umask gives a new file, is renamed over the
target, and the directory entry is flushed too. Temp files that a killed process left behind are
removed by the next write into the same directory from the same host. A full disk is one
NbglmError naming the file (and the bytes needed where the writer knows them), never a traceback.
A directory whose run failed after it was created carries a `FAILED` file that every reader refuses.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any

from nbglm.errors import NbglmError

_TMP = ".tmp"
FAILED = "FAILED"


def disk_full(exc: BaseException) -> bool:
    """An OSError of a full disk or quota, also as h5py words it (its errno is not always set)."""
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left on device" in str(exc))


def disk_full_error(path: str | Path | None, need: int | None = None) -> NbglmError:
    """The one line for a full disk: where, and how much was needed when known."""
    where = f" writing {path}" if path else ""
    free = ""
    if path:
        try:
            free = f", {shutil.disk_usage(Path(path).parent).free / 1e6:.1f} MB free"
        except OSError:
            pass
    size = f" (needs about {need / 1e6:.1f} MB{free})" if need else f" ({free.lstrip(', ')})" if free else ""
    return NbglmError(f"disk full{where}{size}: free some space or write elsewhere; nothing partial was kept")


def check_space(path: str | Path, need: int) -> None:
    """Refuse a write of about `need` bytes before it starts when the filesystem has less free."""
    path = Path(path)
    directory = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("/"))
    if shutil.disk_usage(directory).free < need:
        raise disk_full_error(path, need)


def mark_failed(directory: str | Path, reason: str) -> None:
    """Mark a directory whose run failed after it was created, so no reader takes it for a result."""
    write_text(Path(directory) / FAILED, reason.strip() + "\n")


def refuse_failed(path: str | Path) -> None:
    """Refuse a file from a directory marked FAILED (a bundle, or a sub-folder of one)."""
    path = Path(path).resolve()
    for directory in (path, *list(path.parents)[:2]):
        if (directory / FAILED).is_file():
            reason = (directory / FAILED).read_text().strip().splitlines() or [""]
            raise NbglmError(f"{path} belongs to a failed run ({directory / FAILED}: {reason[0][:200]}); "
                             "rerun it instead")


@cache
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return os.uname().nodename.replace(".", "_") or "host"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(directory: Path) -> None:
    """Remove temp files and dirs of killed writes in `directory` (this host's dead processes only)."""
    host = _host()
    for entry in directory.glob(f".*.{host}.*{_TMP}*"):
        parts = entry.name.split(".")
        try:
            pid = int(parts[parts.index(host) + 1])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}{_TMP}{path.suffix}")


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """Flush `tmp` (every file in it, for a directory), give it `mode`, rename it to `path`,
    and flush the directory entry."""
    for file in (tmp.rglob("*") if tmp.is_dir() else [tmp]):
        if file.is_file():
            _fsync(file)
    tmp.chmod(mode & ~_umask())
    os.replace(tmp, path)
    _fsync(path.parent)


@contextmanager
def atomic_path(path: str | Path, need: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` for a writer to create; on success it replaces `path`.
    `need`: the bytes the writer will write, checked against the free space first."""
    path = Path(path)
    if need:
        check_space(path, need)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = _temp_name(path)
    try:
        yield tmp
        _publish(tmp, path, 0o666)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if disk_full(exc):
            raise disk_full_error(path, need) from None
        raise


def write_bytes(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """`write(f)` into a binary file that replaces `path` once complete."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        write(f)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, lambda f: f.write(text.encode()))


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def check_writable_dir(path: Path, key: str) -> None:
    """`path` must be a directory, or creatable in one this process can write: checked before any
    work, not when the first file is written. `key` names the setting in the message."""
    existing = next(p for p in [path, *path.parents] if p.exists())
    if not existing.is_dir():
        raise NbglmError(f"{key}: {existing} is a file, not a directory, so {path} cannot be created; set {key} to a "
                         "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NbglmError(f"{key}: {existing} is not writable, so {path} cannot be written; set {key} to a "
                         "directory you can write")


def check_new_output(out: str | Path) -> Path:
    """Refuse an existing `out` unless it is an empty directory: never merge into or overwrite results."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NbglmError(f"output {out} already exists and is not an empty directory; choose a new one or remove it")
    existing = next(p for p in [out.resolve(), *out.resolve().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NbglmError(f"output {out} cannot be created ({existing} is not a writable directory); choose "
                         "another path")
    return out


def check_new_file(out: str | Path) -> Path:
    """Refuse an existing `out`, or one whose directory cannot be written: before the work, not after."""
    out = Path(out)
    if out.exists():
        raise NbglmError(f"output {out} already exists; choose a new name or remove it")
    existing = next(p for p in [out.parent.resolve(), *out.parent.resolve().parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NbglmError(f"output {out} cannot be written ({existing} is not a writable directory); choose "
                         "another path")
    return out


@contextmanager
def atomic_dir(out: str | Path, *, new: bool = True) -> Iterator[Path]:
    """Yield a temp directory beside `out` to fill; on success it becomes `out` (an empty `out` is
    replaced). With `new`, an existing non-empty `out` is refused before anything is written."""
    out = check_new_output(out) if new else Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = _temp_name(out)
    tmp.mkdir()
    try:
        yield tmp
        _publish(tmp, out, 0o777)  # a rename replaces an empty directory
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(exc):
            raise disk_full_error(exc.filename or out) from None
        raise
