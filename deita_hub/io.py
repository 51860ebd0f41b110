"""Every file and folder deita-hub writes appears whole or not at all.

`atomic_file(path)` hands out a temp path beside `path`; when the block ends it is flushed to disk and renamed
over `path` (`os.replace` is atomic within one filesystem), and on any error it is removed. `atomic_folder(path)`
does the same for a folder built in a hidden sibling. `write_rows` writes rows as JSONL, JSON or parquet (by
extension) through `atomic_file`.
"""

from __future__ import annotations

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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
