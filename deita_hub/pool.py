"""Read instruction pools (JSON, JSONL, parquet, saved or Hub HF datasets) into Arrow + canonical conversations.

A `Pool` keeps the original columns as an Arrow table (every field passes through to the built dataset), one
canonical conversation per valid row, the original row index of each valid row, the resolved format, two
fingerprints, and (with `on_invalid="skip"`) the rejected rows with their reasons:
- `fingerprint`: the source bytes and the format as resolved (not as typed), for provenance: any change to the
  file, a score column included, changes it;
- `conversations_fingerprint`: the canonical conversations in order, i.e. exactly what the embedders and scorers
  read. Embeddings and scoring checkpoints are checked against it, so adding score columns to a pool, or spelling
  its detected format out (`--format alpaca --field output=response`), keeps its embeddings valid.

Row numbers in messages are 0-based positions in the source (JSONL errors also give the 1-based line).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_hub.conversations import FormatSpec, to_conversation
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.hub import is_repo_id

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")


@dataclass
class Pool:
    """Valid rows of one or more sources, in source order."""

    source: str
    table: pa.Table  # original columns of the valid rows
    conversations: list[list[dict[str, str]]]
    rows: np.ndarray  # int64: position of each valid row in the (concatenated) source
    spec: FormatSpec  # resolved format of the (first) source
    fingerprint: str  # "sha256:<hex>" over the source bytes and each source's resolved format
    num_source_rows: int
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"row","field","reason","source"}

    def __len__(self) -> int:
        return len(self.conversations)

    @cached_property
    def conversations_fingerprint(self) -> str:
        """What an embedding or a score was computed from: the canonical conversations, in order."""
        return conversations_fingerprint(self.conversations)

    def provenance(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "conversations_fingerprint": self.conversations_fingerprint,
            "format": self.spec.to_dict(),
            "num_source_rows": self.num_source_rows,
            "num_valid_rows": len(self),
            "num_invalid_rows": len(self.invalid),
        }


def conversations_fingerprint(conversations: Sequence[list[dict[str, str]]]) -> str:
    """ "sha256:<hex>" over canonical conversations in order (one JSON line each, keys sorted)."""
    digest = hashlib.sha256()
    for turns in conversations:
        digest.update(json.dumps(turns, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def _hash_path(path: Path, digest) -> None:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)


def _not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (re-save the file as UTF-8)"


def _read_json_rows(path: Path) -> list[Any]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # a leading byte-order mark (Windows editors) is not part of the JSON
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DeitaHubError(f"{path}: line {line}: {_not_utf8(data, exc)}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeitaHubError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from exc
    except RecursionError:
        raise DeitaHubError(
            f"{path}: JSON nested too deeply to read (lists or objects nested hundreds of levels deep)"
        ) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        raise DeitaHubError(
            f"{path}: expected a JSON array of records at the top level, got an object"
            + (f" (its list field(s) {lists} may hold the rows: extract them or use JSONL)" if lists else "")
        )
    if not isinstance(data, list):
        raise DeitaHubError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return data


def _read_jsonl_rows(path: Path, on_invalid: str, invalid: list) -> list[Any]:
    rows: list[Any] = []
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            reason = None
            try:
                # a byte-order mark opens the first line only; elsewhere it is an error like any other
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                if not line.strip():
                    continue
                rows.append(json.loads(line))
            except UnicodeDecodeError as exc:
                reason = f"line {line_no}: {_not_utf8(raw, exc)}"
            except json.JSONDecodeError as exc:
                reason = f"invalid JSON on line {line_no}: {exc.msg} (column {exc.colno})"
            except RecursionError:
                reason = f"line {line_no}: JSON nested too deeply to read"
            if reason is None:
                continue
            error = InvalidRecordError(reason, row=len(rows), source=str(path))
            if on_invalid == "error":
                raise error from None
            invalid.append({"row": len(rows), "field": None, "reason": error.reason, "source": str(path)})
            rows.append(None)  # keep positions aligned with the file's records
    return rows


def table_from_rows(rows: list[dict], source: str) -> pa.Table:
    """Rows -> Arrow. A column whose rows disagree in type is named, with the first disagreeing row."""
    # Every key of every row becomes a column (from_pylist would take the first row's keys only).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return pa.Table.from_pydict({name: [row.get(name) for row in rows] for name in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        for name in columns:
            values = [row.get(name) for row in rows]
            try:
                pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                first = next((i for i, v in enumerate(values) if v is not None), 0)
                kind = type(values[first]).__name__
                bad = next(
                    (i for i, v in enumerate(values) if v is not None and type(v).__name__ != kind), first
                )
                raise DeitaHubError(
                    f"{source}: row {bad}, field '{name}': type {type(values[bad]).__name__} differs from "
                    f"{kind} in row {first}; a column must hold one type"
                ) from exc
        raise DeitaHubError(f"{source}: cannot convert rows to a table: {exc}") from exc


def load_hf(path: str, *, config: str | None, split: str, revision: str | None, local: bool):
    import datasets

    from deita_hub import hub

    offline = not local and hub.is_offline()
    if not local and not offline:
        # One quick request: a missing repo or revision, or an unreachable Hub, is a one-line error in about a
        # second (datasets alone would retry for ~23 s). Offline, datasets reads its cache: nothing to ask.
        hub.check_repo(path, repo_type="dataset", revision=revision)
    try:
        if local and (Path(path) / "state.json").exists():
            return datasets.load_from_disk(path)
        if local and (Path(path) / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(path)
            if split not in loaded:
                raise DeitaHubError(f"{path}: no split '{split}' (splits: {list(loaded)})")
            return loaded[split]
        return datasets.load_dataset(path, config, split=split, revision=revision)
    except DeitaHubError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the path and the reason
        if offline:
            raise DeitaHubError(
                f"pool '{path}': the Hub is offline (HF_HUB_OFFLINE is set) and this dataset is not in the local "
                "cache; give a local .json/.jsonl/.parquet file or a saved dataset folder instead"
            ) from exc
        raise DeitaHubError(
            f"cannot load dataset '{path}' (config {config!r}, split {split!r}): {exc}"
        ) from exc


def read_source(
    path: str | Path, *, config: str | None, split: str, revision: str | None, on_invalid: str, invalid: list
) -> tuple[pa.Table | None, list | None, str]:
    """One source -> (table or python rows, fingerprint part). Exactly one of table/rows is set."""
    local = Path(path)
    if local.is_file():
        digest = hashlib.sha256()
        _hash_path(local, digest)
        suffix = local.suffix.lower()
        if suffix == ".jsonl":
            return None, _read_jsonl_rows(local, on_invalid, invalid), digest.hexdigest()
        if suffix == ".json":
            return None, _read_json_rows(local), digest.hexdigest()
        if suffix == ".parquet":
            try:
                return pq.read_table(local), None, digest.hexdigest()
            except Exception as exc:
                raise DeitaHubError(f"{local}: not a readable parquet file: {exc}") from exc
        raise DeitaHubError(f"{local}: unsupported pool file type '{suffix}' (use .json, .jsonl or .parquet)")
    if local.is_dir():
        digest = hashlib.sha256()
        _hash_path(local, digest)
        dataset = load_hf(str(local), config=config, split=split, revision=revision, local=True)
        return dataset.data.table, None, digest.hexdigest()
    if is_repo_id(str(path)):
        dataset = load_hf(str(path), config=config, split=split, revision=revision, local=False)
        return (
            dataset.data.table,
            None,
            hashlib.sha256(f"hf:{path}:{config}:{dataset._fingerprint}".encode()).hexdigest(),
        )
    # A path (extension, separators, ./ or ~) that is not here is never looked up on the Hub.
    raise DeitaHubError(
        f"pool file not found: {path} does not exist (give a .json/.jsonl/.parquet file, a dataset folder "
        "or a Hub dataset id 'org/name')"
    )


def _check_unique_id(record: dict, seen: dict[str, tuple[int, str]], *, row: int, source: str) -> None:
    """Rows' `id`s are unique across the pool: outputs and cards name rows by them, so a second row with an id
    is invalid (an error, or with `on_invalid="skip"` a rejected row with its reason; the first one is kept)."""
    identity = record.get("id")
    if identity is None:
        return
    key = json.dumps(identity, sort_keys=True, default=str)  # hashable whatever the id's type
    first_row, first_source = seen.setdefault(key, (row, source))
    if (first_row, first_source) != (row, source):
        where = f"row {first_row}" + (f" of {first_source}" if first_source != source else "")
        raise InvalidRecordError(
            f"duplicate id {identity!r}, also the id of {where}; ids name rows in the outputs and the card "
            "(give each row its own id, or skip invalid rows: --skip-invalid, a recipe's pool.on_invalid: skip)",
            field="id",
        )


@dataclass
class SourceRows:
    """What `read_rows` gathers from a pool's sources: the valid rows, in source order."""

    tables: list[pa.Table]  # per source, its valid rows' original columns
    items: list[Any]  # per valid row, what `convert` made of it
    rows: list[int]  # per valid row, its position in the concatenated sources
    invalid: list[dict[str, Any]]  # {"row","field","reason","source"} of each skipped row
    fingerprint: Any  # sha256 over each source's content and its resolved layout
    resolved: Any  # the first source's layout
    num_source_rows: int


def read_rows(
    sources, *, resolve, convert, on_invalid: str, config, split: str, revision, check=None
) -> SourceRows:
    """The one loop over a pool's sources, for SFT pools (`read_pool`) and preference pools alike: read each source,
    resolve its layout from its columns (`resolve(columns, name) -> (layout, fingerprint tag)`), convert every row
    (`convert(record, layout, row, name)`; an InvalidRecordError names the field), keep the valid rows. A bad row
    fails with file, row and field, or with `on_invalid="skip"` is kept in `invalid` with its reason. `check(record)`
    runs on every row before the layout is resolved (a row that is no record at all says so, not "no columns")."""

    def reject(exc: InvalidRecordError, i: int, name: str, source_invalid: list) -> None:
        if on_invalid == "error":
            raise exc.located(row=i, source=name) from None
        source_invalid.append({"row": i, "field": exc.field, "reason": exc.reason, "source": name})

    tables, items, rows, invalid = [], [], [], []
    fingerprint = hashlib.sha256()
    resolved = None
    offset = 0
    for source in sources:
        name = str(source)
        source_invalid: list[dict] = []
        table, records, part = read_source(
            source,
            config=config,
            split=split,
            revision=revision,
            on_invalid=on_invalid,
            invalid=source_invalid,
        )
        if records is None:
            records = table.to_pylist()
        for i, record in enumerate(records if check is not None else ()):
            try:
                check(record)
            except InvalidRecordError as exc:
                reject(exc, i, name, source_invalid)
        if table is not None:
            columns = dict.fromkeys(table.column_names)
        else:
            columns = dict.fromkeys(k for r in records if isinstance(r, dict) for k in r)
        layout, tag = resolve(columns, name)
        resolved = resolved if resolved is not None else layout
        fingerprint.update(part.encode())
        fingerprint.update(tag.encode())
        bad_rows = {item["row"] for item in source_invalid}
        keep = []
        for i, record in enumerate(records):
            if i in bad_rows:
                continue
            try:
                item = convert(record, layout, i, name)
            except InvalidRecordError as exc:
                reject(exc, i, name, source_invalid)
                continue
            items.append(item)
            keep.append(i)
            rows.append(offset + i)
        if table is None:
            table = table_from_rows([records[i] for i in keep], name)
        elif len(keep) != len(records):
            table = table.take(pa.array(keep, type=pa.int64()))
        tables.append(table)
        invalid.extend(sorted(source_invalid, key=lambda item: item["row"]))
        offset += len(records)
    return SourceRows(tables, items, rows, invalid, fingerprint, resolved, offset)


def read_pool(
    sources: str | Path | Sequence[str | Path],
    spec: FormatSpec | None = None,
    *,
    on_invalid: str = "error",
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
) -> Pool:
    """Read one or more sources (concatenated in order) into a Pool.

    `on_invalid="error"` raises on the first bad row (file, row, field, reason); `"skip"` drops bad rows and
    records them in `Pool.invalid`.
    """
    if on_invalid not in ON_INVALID:
        raise DeitaHubError(f"on_invalid must be one of {ON_INVALID}, got '{on_invalid}'")
    spec = spec or FormatSpec()
    if isinstance(sources, str | Path):
        sources = [sources]
    if not sources:
        raise DeitaHubError("no pool given")
    seen_ids: dict[str, tuple[int, str]] = {}  # each valid row's `id` -> (row, source) of its first holder

    def resolve(columns, name: str):
        source_spec = spec.resolve(columns)
        # The format as detected, not as typed: `--format alpaca` on a pool detected as alpaca is the same pool.
        return source_spec, json.dumps(source_spec.to_dict(), sort_keys=True)

    def check(record) -> None:
        if record is not None and not isinstance(record, dict):
            raise InvalidRecordError(f"expected an object, got {type(record).__name__}")

    def convert(record, source_spec: FormatSpec, row: int, name: str):
        conversation = to_conversation(record, source_spec)
        _check_unique_id(record, seen_ids, row=row, source=name)
        return conversation

    read = read_rows(
        sources,
        resolve=resolve,
        convert=convert,
        check=check,
        on_invalid=on_invalid,
        config=config,
        split=split,
        revision=revision,
    )
    tables, conversations, rows, invalid = read.tables, read.items, read.rows, read.invalid
    resolved, offset, fingerprint = read.resolved, read.num_source_rows, read.fingerprint
    if not conversations:
        raise DeitaHubError(f"pool {', '.join(map(str, sources))} has no valid rows ({len(invalid)} invalid)")
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    if invalid:
        log.warning("skipped %d invalid row(s) of %d", len(invalid), offset)
    return Pool(
        source=", ".join(map(str, sources)),
        table=table,
        conversations=conversations,
        rows=np.asarray(rows, dtype=np.int64),
        spec=resolved,
        fingerprint="sha256:" + fingerprint.hexdigest(),
        num_source_rows=offset,
        invalid=invalid,
    )
