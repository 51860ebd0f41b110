"""Write rows atomically as JSONL, JSON or parquet (by extension): a temp file renamed into place."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from deita_hub.errors import DeitaHubError

SUFFIXES = (".jsonl", ".json", ".parquet")


def write_rows(rows: list[dict] | pa.Table, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise DeitaHubError(f"{path}: output must end in {', '.join(SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
