"""Every file and folder deita-hub writes appears whole or not at all.

`atomic_file(path)` hands out a temp path beside `path`; when the block ends it is flushed to disk and renamed
over `path` (`os.replace` is atomic within one filesystem), and on any error it is removed. `atomic_folder(path)`
does the same for a folder built in a hidden sibling. `write_rows` writes rows as JSONL, JSON or parquet (by
extension) through `atomic_file`.

A write that runs out of space (ENOSPC, or a quota: EDQUOT) is a one-line `DeitaHubError` naming the file and the
free space left, and the previous file or folder stays as it was. `file_lock(path)` serialises processes that
fill one cache entry; `claim_folder(path, what)` keeps a second process from writing into a folder one already
writes (two trainings into one output folder).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from deita_hub.errors import DeitaHubError

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".jsonl", ".json", ".parquet")


def default_cache_dir() -> Path:
    """Where deita-hub keeps what it can compute again: `$DEITA_HUB_CACHE`, else ~/.cache/deita-hub."""
    return Path(os.environ.get("DEITA_HUB_CACHE", Path.home() / ".cache" / "deita-hub"))


def _sibling(path: Path, kind: str) -> Path:
    # Hidden, unique per process and call, and ending in the target's suffix: numpy's save appends ".npy" and
    # matplotlib picks the image format from a name that does not end in theirs.
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """An error that says the file system (or the user's quota) has no room left, whoever raised it.

    pyarrow and torch re-raise the C library's error with its text but not always its errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, OSError | RuntimeError) and "No space left on device" in str(exc)


def disk_full_error(path: str | Path, *, kept: bool = True) -> DeitaHubError:
    """The one-line message for a write that ran out of space at `path`."""
    path = Path(path)
    folder = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    kept_text = f"; the previous {path.name} is unchanged" if kept and path.exists() else ""
    return DeitaHubError(
        f"{path}: no space left on the device holding {folder} ({free}){kept_text}; free some space or write "
        "elsewhere, then run the command again"
    )


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path` to write; on success it replaces `path`, on error it is removed.

    The temp file is a plain new file (not mkstemp's 0600), so the result keeps the umask's permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if is_disk_full(exc):
            raise disk_full_error(path) from exc
        raise


def write_text(path: str | Path, text: str) -> Path:
    """`path.write_text(text)` (UTF-8) through `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def refuse_existing(path: str | Path, *, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder unless told to (checked before work that takes minutes)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise DeitaHubError(f"{path} exists and is not empty; pass --overwrite to replace it")
    if path.exists() and not path.is_dir():
        raise DeitaHubError(f"{path} exists and is not a folder")


def replace_folder(tmp: Path, path: Path) -> None:
    """Move the finished folder `tmp` to `path`, replacing a folder already there.

    Two renames with the old folder set aside in between: a reader sees the old folder or the new one, and
    a crash between them leaves the old one in a hidden sibling rather than half a folder at `path`.
    """
    if path.exists():
        old = _sibling(path, "old")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty hidden sibling of `path` to fill; on success it becomes `path`, on error it is removed.

    A non-empty folder at `path` is refused unless `overwrite`.
    """
    path = Path(path)
    refuse_existing(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        replace_folder(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc) and not isinstance(exc, DeitaHubError):
            raise disk_full_error(path) from exc
        raise


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block; other holders wait.

    `fcntl.flock` locks are released by the kernel when the process ends, however it ends, so a killed run never
    leaves a stale lock behind (a lock file's mere existence would)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


_CLAIMS: dict[Path, int] = {}  # folder -> open descriptor holding its lock until this process ends

CLAIM_FILE = "deita-hub.lock"  # not hidden: it is no temp file, and it says who holds the folder


def claim_folder(path: str | Path, what: str) -> None:
    """Mark the folder `path` as written by this process until it ends; refuse if another process holds it.

    `what` names the work in the message ("a training"). The lock file holds the owner's pid for the message;
    the lock itself is the kernel's (`flock`), so it goes away with its process."""
    path = Path(path).resolve()
    if path in _CLAIMS:
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / CLAIM_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.read(fd, 32).decode(errors="replace").strip()
        os.close(fd)
        who = f"{what} (pid {owner})" if owner.isdigit() else what
        raise DeitaHubError(
            f"{path} is in use: {who} is writing into it; wait for it to end or choose another output folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _CLAIMS[path] = fd


def write_rows(rows: list[dict] | pa.Table, path: str | Path) -> Path:
    """Rows (dicts or an Arrow table) as JSONL, JSON or parquet, chosen by the file's extension."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DeitaHubError(f"{path}: output must end in {', '.join(SUFFIXES)}")
    with atomic_file(path) as tmp:
        if path.suffix == ".parquet":
            table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
            pq.write_table(table, tmp)
        else:
            records = rows.to_pylist() if isinstance(rows, pa.Table) else rows
            with open(tmp, "w", encoding="utf-8") as handle:
                if path.suffix == ".json":
                    json.dump(records, handle, ensure_ascii=False, indent=1)
                else:
                    for record in records:
                        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
