"""Read instruction pools (JSON, JSONL, parquet, saved or Hub HF datasets) into Arrow + canonical conversations.

A `Pool` keeps the original columns as an Arrow table (every field passes through to the built dataset), one
canonical conversation per valid row, the original row index of each valid row, the resolved format, two
fingerprints, and (with `on_invalid="skip"`) the rejected rows with their reasons. A large JSONL source of turns is
streamed: its turns stay in the file until asked for (`Pool.take`, `PoolFile`), the other columns are held:
- `fingerprint`: the source bytes and the format as resolved (not as typed), for provenance: any change to the
  file, a score column included, changes it;
- `conversations_fingerprint`: the canonical conversations in order, i.e. exactly what the embedders and scorers
  read. Embeddings and scoring checkpoints are checked against it, so adding score columns to a pool, or spelling
  its detected format out (`--format alpaca --field output=response`), keeps its embeddings valid.

Row numbers in messages are 0-based positions in the source (JSONL errors also give the 1-based line).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deita_hub import __version__
from deita_hub.conversations import (
    CANONICAL_ROLES,
    SHAREGPT_ROLES,
    FormatSpec,
    response_length,
    to_conversation,
)
from deita_hub.cpu import ordered_map
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.hub import is_repo_id
from deita_hub.io import atomic_file, default_cache_dir

log = logging.getLogger(__name__)

ON_INVALID = ("error", "skip")
_ITERATION_ROWS = 8192  # conversations made into Python objects at a time when iterating
_ROLE_NAMES = np.array(CANONICAL_ROLES, dtype=object)


class _Conversations(Sequence):
    """Conversations that compare equal to any sequence of the same conversations (a list of them included)."""

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None


class ArrowConversations(_Conversations):
    """Canonical conversations held column-wise: every turn's content in one Arrow string array, its role as a code
    into CANONICAL_ROLES, each conversation a range of turns. A conversation becomes Python dicts only when it is
    read (`conversations[i]`, iteration), so a million-row pool costs Arrow memory, not a million lists of dicts;
    the `longest` baseline's response lengths are computed on the columns."""

    def __init__(self, contents: pa.Array | pa.ChunkedArray, codes: np.ndarray, offsets: np.ndarray):
        self.contents = contents  # string, one per turn
        self.codes = codes  # int8 per turn: CANONICAL_ROLES index
        self.offsets = offsets  # int64 (rows + 1): conversation i is turns offsets[i]:offsets[i + 1]

    @classmethod
    def concat(cls, parts: Sequence[ArrowConversations]) -> ArrowConversations:
        starts = np.cumsum([0] + [len(part.codes) for part in parts[:-1]])
        return cls(
            pa.chunked_array([c for part in parts for c in _chunks(part.contents)], pa.string()),
            np.concatenate([part.codes for part in parts]),
            np.concatenate(
                [parts[0].offsets[:1]]
                + [part.offsets[1:] + start for part, start in zip(parts, starts, strict=True)]
            ),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _rows(self, first: int, stop: int) -> list[list[dict[str, str]]]:
        a, b = int(self.offsets[first]), int(self.offsets[stop])
        texts = self.contents.slice(a, b - a).to_pylist()
        roles = _ROLE_NAMES[self.codes[a:b]].tolist()
        turns = [{"role": r, "content": c} for r, c in zip(roles, texts, strict=True)]
        bounds = (self.offsets[first : stop + 1] - a).tolist()
        return [turns[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]

    def __getitem__(self, index):
        if isinstance(index, slice):
            first, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(first, stop, step)]
            return self._rows(first, stop) if first < stop else []
        i = int(index)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"conversation {index} of {len(self)}")
        return self._rows(i, i + 1)[0]

    def __iter__(self):
        for first in range(0, len(self), _ITERATION_ROWS):
            yield from self._rows(first, min(first + _ITERATION_ROWS, len(self)))

    def __repr__(self) -> str:
        return f"ArrowConversations({len(self)} conversations, {len(self.codes)} turns)"

    def response_lengths(self) -> np.ndarray:
        """Assistant characters per conversation (`response_length` of each), int64."""
        per_turn = pc.utf8_length(self.contents).to_numpy().astype(np.int64)
        per_turn[self.codes != CANONICAL_ROLES.index("assistant")] = 0
        totals = np.concatenate(([0], np.cumsum(per_turn)))
        return totals[self.offsets[1:]] - totals[self.offsets[:-1]]


def _chunks(array: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return array.chunks if isinstance(array, pa.ChunkedArray) else [array]


def _joined(parts: list[Sequence]) -> Sequence:
    """Per-source items as one sequence: column-wise conversations stay column-wise, a streamed source streamed."""
    if len(parts) == 1:
        return parts[0]
    if parts and all(isinstance(part, ArrowConversations) for part in parts):
        return ArrowConversations.concat(parts)
    return [item for part in parts for item in part]


@dataclass
class Pool:
    """Valid rows of one or more sources, in source order."""

    source: str
    # The original columns of the valid rows in memory: all of them, or all but a streamed source's turns.
    held: pa.Table
    conversations: Sequence[list[dict[str, str]]]  # a list, ArrowConversations (read in bulk) or streamed
    rows: np.ndarray  # int64: position of each valid row in the (concatenated) source
    spec: FormatSpec  # resolved format of the (first) source
    fingerprint: str  # "sha256:<hex>" over the source bytes and each source's resolved format
    num_source_rows: int
    invalid: list[dict[str, Any]] = field(default_factory=list)  # {"row","field","reason","source"}

    def __len__(self) -> int:
        return len(self.conversations)

    @property
    def file(self) -> PoolFile | None:
        """Where a streamed pool's turns column stays (None when every column is held)."""
        return self.conversations.file if isinstance(self.conversations, StreamedConversations) else None

    @property
    def column_names(self) -> list[str]:
        return self.held.column_names if self.file is None else self.file.columns.names

    def column(self, name: str) -> pa.ChunkedArray:
        """One original column of the valid rows (a streamed pool's turns column read from its file)."""
        return self.table.column(name) if name not in self.held.column_names else self.held.column(name)

    @cached_property
    def table(self) -> pa.Table:
        """Every original column of the valid rows: a streamed pool reads its turns column from the file again
        (seconds per GB); what needs some rows only takes them (`take`)."""
        file = self.file
        if file is None:
            return self.held
        at = file.columns.get_field_index(file.deferred)
        return self.held.add_column(at, file.columns.field(at), file.column())

    def take(self, positions: np.ndarray) -> pa.Table:
        """Every original column of the rows at `positions` (in that order): a streamed pool reads only those rows'
        turns from its file."""
        file = self.file
        if file is None:
            return take_rows(self.held, positions)
        at = file.columns.get_field_index(file.deferred)
        return take_rows(self.held, positions).add_column(at, file.columns.field(at), file.column(positions))

    @cached_property
    def response_lengths(self) -> np.ndarray:
        """Assistant characters per valid row (what the `longest` baseline ranks by), int64 (rows,)."""
        if isinstance(self.conversations, ArrowConversations | StreamedConversations):
            return self.conversations.response_lengths()
        return np.fromiter(map(response_length, self.conversations), dtype=np.int64, count=len(self))

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


def take_rows(table: pa.Table, positions: np.ndarray) -> pa.Table:
    """`table.take(positions)`, a record batch at a time: Arrow's take on a many-chunk column (a pool read in
    bulk) first joins its chunks, a transient copy of the whole pool (1.6 GB at a million rows)."""
    batches = table.to_batches()
    if len(batches) <= 1:
        return table.take(pa.array(positions, type=pa.int64()))
    bounds = np.cumsum([0] + [batch.num_rows for batch in batches])
    which = np.searchsorted(bounds, positions, side="right") - 1
    order = np.argsort(which, kind="stable")
    parts = [
        batches[b].take(pa.array(positions[order][which[order] == b] - bounds[b], type=pa.int64()))
        for b in np.unique(which)
    ]
    gathered = pa.Table.from_batches(parts, schema=table.schema)  # rows grouped by batch
    back = np.empty(len(order), dtype=np.int64)
    back[order] = np.arange(len(order))
    return gathered.take(pa.array(back))


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
    """Rows -> Arrow. A column Arrow cannot hold (rows that disagree in type, an integer beyond 64 bits) is named,
    with the first row that breaks it."""
    # Every key of every row becomes a column (from_pylist would take the first row's keys only).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return pa.Table.from_pydict({name: [row.get(name) for row in rows] for name in columns})
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        for name in columns:
            values = [row.get(name) for row in rows]
            found = _first_unconvertible(values)
            if found is None:
                continue
            bad, arrow_says = found
            first = next(i for i, v in enumerate(values) if v is not None)
            if _beyond_64_bits(values[bad]):
                reason = "an integer beyond the 64-bit range an Arrow table holds (write it as a string)"
            elif bad != first and _json_kind(values[bad]) != _json_kind(values[first]):
                reason = (
                    f"a {_json_kind(values[bad])} where row {first} has a {_json_kind(values[first])}; a column "
                    "must hold one type"
                )
            else:
                reason = f"an Arrow table cannot hold it: {arrow_says}"
            raise DeitaHubError(f"{source}: row {bad}, field '{name}': {reason}") from exc
        raise DeitaHubError(f"{source}: cannot convert rows to a table: {exc}") from exc


def _conversion_error(values: list) -> str | None:
    """Why `values` make no Arrow array (Arrow's words, one line), or None when they do."""
    try:
        pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
        return " ".join(str(exc).split())
    return None


def _first_unconvertible(values: list) -> tuple[int, str] | None:
    """The first row from which `values` no longer make one Arrow array, and why (bisected: a prefix converts or
    not); None when they do."""
    why = _conversion_error(values)
    if why is None:
        return None
    lo, hi = 0, len(values)  # values[:lo] converts, values[:hi] does not (`why`)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        error = _conversion_error(values[:mid])
        if error is None:
            lo = mid
        else:
            hi, why = mid, error
    return hi - 1, why


def _beyond_64_bits(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return not -(2**63) <= value < 2**63
    if isinstance(value, list):
        return any(_beyond_64_bits(v) for v in value)
    if isinstance(value, dict):
        return any(_beyond_64_bits(v) for v in value.values())
    return False


def _json_kind(value) -> str:
    """How JSON names a value's type, one level into lists (`list of numbers`)."""
    names = {
        bool: "boolean",
        int: "number",
        float: "number",
        str: "string",
        dict: "object",
        type(None): "null",
    }
    if isinstance(value, list):
        kinds = sorted({_json_kind(v) for v in value if v is not None})
        return "list of " + (" and ".join(k + "s" for k in kinds) if kinds else "nulls")
    return names.get(type(value), type(value).__name__)


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


# --- the bulk JSONL path --------------------------------------------------------------------------------------
#
# A large JSONL pool is read by Arrow's JSON reader (C++, no Python object per value) and its conversations are
# checked column-wise. It only takes inputs it reads exactly as the row-by-row path does: every line one JSON
# object, every row valid, ids unique. Anything else (a bad line, a bad row, a blank line, a type Arrow would read
# differently) goes through the row-by-row path, which names the file, line, row and field as before.

# Arrow's JSON reader crashes on a document nested ~10,000 levels deep, and on a first line that is `null`: lines
# are handed to it only when each opens with "{" and holds at most this many "{" and "[" (≥ its nesting depth).
_BULK_MAX_OPENERS = 1000
_EMPTY_SHA256 = hashlib.sha256().hexdigest()
_SCAN_BYTES = 1 << 24  # read at a time by the scan
_JSON_BLOCK_BYTES = 1 << 24  # Arrow's JSON reader parses blocks of this size in parallel
_SCHEMA_PREFIX_BYTES = 1 << 20  # the first lines whose inferred schema the whole file is parsed against
_CHECK_ROWS = 8192  # the most rows of a turns column checked (and spelled) at a time
_CANONICAL = {"system": 0, "user": 1, "assistant": 2}
# What str.strip() removes: a turn of only these characters is empty (validate()'s rule), spelled for Arrow's RE2.
_BLANK = "^[" + "".join(f"\\x{{{c:x}}}" for c in range(0x3001) if chr(c).isspace()) + "]*$"


class _HashInBackground:
    """A hashlib digest fed on another thread, one update pending at a time: hashlib releases the GIL for large
    buffers, so hashing a large pool's bytes (~1 GB/s) overlaps the scan and the column checks instead of
    adding to them. The caller must not change a buffer it has handed over."""

    def __init__(self, digest):
        self.digest = digest
        self.thread: threading.Thread | None = None

    def update(self, data) -> None:
        self._wait()
        self.thread = threading.Thread(target=self.digest.update, args=(data,), daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def hexdigest(self) -> str:
        self._wait()
        return self.digest.hexdigest()


class _LineScan:
    """Whether a JSONL file's lines may be handed to Arrow's reader, fed the file a chunk at a time, in order; counts
    the lines. Every line must open with "{" (Arrow's reader crashes on a first line `null`, and reads other lines
    differently: a `null` line as a row of nulls, a blank line as none) and fit in one of its blocks (Arrow's reader
    fails on a line across three blocks, and pyarrow 21 can abort on it). With `nesting`, a line also holds at most
    `_BULK_MAX_OPENERS` "{"/"[" bytes (≥ its nesting depth): Arrow's reader crashes on a document nested ~10,000 levels
    deep when it infers the types. Parsing against a schema needs no such count: the reader stops at the first value the
    schema does not hold, never deeper than the schema (pyarrow 21 and 26)."""

    def __init__(self, *, nesting: bool):
        self.nesting, self.plain, self.newlines = nesting, True, 0
        self.fed, self.line_start = 0, 0  # bytes fed so far; where the open line starts
        self.openers = 0  # carried across chunks: the open line's "{"/"[" count
        self.ends: list[np.ndarray] = []  # per chunk, where each line ending in it ends in the file
        self.longest = 0  # bytes of the longest line so far

    def feed(self, data: bytes) -> bool:
        """Scan the next chunk; False once any line so far may not be handed to Arrow."""
        if not self.plain or not data:
            return self.plain
        chunk = np.frombuffer(data, dtype=np.uint8)
        newlines = np.flatnonzero(chunk == 10)
        starts = newlines + 1
        starts = starts[starts < len(chunk)]
        at_line_start = self.line_start == self.fed
        if (at_line_start and chunk[0] != 0x7B) or (chunk[starts] != 0x7B).any():
            self.plain = False
            return False
        ends = newlines + (self.fed + 1)  # where each line ending in this chunk ends, in the file
        last_start = int(ends[-1]) if len(ends) else self.line_start
        longest = max(
            int(np.diff(ends, prepend=self.line_start).max()) if len(ends) else 0,
            self.fed + len(chunk) - last_start,  # the open line, so far
        )
        if longest > _JSON_BLOCK_BYTES:
            self.plain = False
            return False
        self.longest = max(self.longest, longest)
        if self.nesting:
            openings = np.flatnonzero((chunk == 0x7B) | (chunk == 0x5B))
            per_line = np.diff(np.searchsorted(openings, newlines), prepend=0)  # lines ending in this chunk
            if len(per_line):
                per_line[0] += self.openers
            self.openers = (
                (0 if len(newlines) else self.openers)
                + len(openings)
                - (int(np.searchsorted(openings, newlines[-1])) if len(newlines) else 0)
            )
            if (len(per_line) and per_line.max() > _BULK_MAX_OPENERS) or self.openers > _BULK_MAX_OPENERS:
                self.plain = False
        self.newlines += len(newlines)
        self.fed += len(chunk)
        self.line_start = last_start
        self.ends.append(ends)
        return self.plain

    @property
    def lines(self) -> int | None:
        """The lines fed (a last one without a newline counts), or None when they may not be handed to Arrow."""
        return (self.newlines + (self.line_start < self.fed)) if self.plain else None

    def bounds(self) -> np.ndarray:
        """int64 (lines + 1): line i is bytes bounds[i]:bounds[i + 1] of the file (its newline included)."""
        last = [np.array([self.fed])] if self.line_start < self.fed else []
        return np.concatenate([np.zeros(1, dtype=np.int64), *self.ends, *last]).astype(np.int64)


def _scanned(path: Path, digest) -> _LineScan | None:
    """Feed the file to `digest` (as `_hash_path` feeds it) and to a `_LineScan`, a chunk at a time: the scan (its
    line count and bounds), or None as soon as a line may not be handed to Arrow's reader. It runs before Arrow
    reads the file, and Arrow then reads the file itself: a reader that pulls the file through Python (`pa.PythonFile`) can abort the
    process when its parse fails while blocks are in flight (`terminate called without an active exception`,
    pyarrow 21-26), and a parse against a schema fails on any field or type the schema lacks."""
    scan = _LineScan(nesting=False)
    digest.update(path.name.encode())
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_SCAN_BYTES), b""):
            digest.update(chunk)
            if not scan.feed(chunk):
                return None
    return scan


def _read_differently(kind: pa.DataType) -> bool:
    """Types Arrow's JSON reader infers where the row-by-row path keeps strings (timestamps) or errs."""
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_time(kind):
        return True
    return any(_read_differently(kind.field(i).type) for i in range(kind.num_fields))


def _huge_floats(column: pa.ChunkedArray) -> bool:
    """A float of 2**53 or more: it may be an integer Arrow read as a float, rounded (an integer too large for 64
    bits, or one in a column of floats); the row-by-row path keeps it exact or says why it cannot."""
    kind = column.type
    while pa.types.is_list(kind) or pa.types.is_large_list(kind):
        column = pc.list_flatten(column)
        kind = kind.value_type
    if pa.types.is_struct(kind):
        return any(_huge_floats(pc.struct_field(column, [i])) for i in range(kind.num_fields))
    if pa.types.is_floating(kind) and len(column):
        largest = pc.max(pc.abs(column)).as_py()
        return largest is not None and largest >= 2.0**53
    return False


def _structurally_valid(table: pa.Table) -> bool:
    """Whether Arrow's JSON reader made valid arrays (cheap checks: buffer sizes and end offsets). It does not
    always: a list of nulls after a row without the field comes out with offsets past its values (pyarrow 21
    and 26)."""
    try:
        table.validate()
    except pa.lib.ArrowInvalid:
        return False
    return True


@functools.cache
def _inference_sorts_struct_fields() -> bool:
    """Whether pyarrow gives a struct inferred from Python dicts its fields in sorted order (pyarrow 21 does; 26
    keeps the keys' order, as its JSON reader does): the bulk read then takes the order the row-by-row read gets."""
    return pa.array([{"b": 0, "a": 0}]).type.field(0).name == "a"


def _sorted_struct_fields(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_struct(kind):
        fields = sorted((kind.field(i) for i in range(kind.num_fields)), key=lambda f: f.name)
        return pa.struct([f.with_type(_sorted_struct_fields(f.type)) for f in fields])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_sorted_struct_fields(kind.value_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_sorted_struct_fields(kind.value_type)))
    return kind


# How json.dumps spells, inside a string's quotes, each byte it escapes (ensure_ascii=False): the control
# characters (those without a short form as \u00XX), the quote and the backslash. `_ESCAPE_INDEX` maps a byte to
# its spelling's place in `_ESCAPED`.
_ESCAPED_BYTES = [*range(0x20), ord('"'), ord("\\")]
_ESCAPED = pa.array([json.dumps(chr(b))[1:-1] for b in _ESCAPED_BYTES], pa.string())
_ESCAPE_INDEX = np.zeros(256, dtype=np.int32)
_ESCAPE_INDEX[_ESCAPED_BYTES] = np.arange(len(_ESCAPED_BYTES))
_ESCAPE_SCAN_BYTES = 1 << 18  # tested a slice at a time, so the masks stay in the CPU's cache
# The constant pieces of a canonical line: `_fingerprint_lines` takes them, the spellings and the contents' pieces.
_PIECES = ["", ", ", "[", "]\n", '{"content": "'] + [f'", "role": "{role}"}}' for role in CANONICAL_ROLES]


def _string_bytes(array: pa.Array) -> np.ndarray:
    """The UTF-8 bytes of a string array's values, in order (a view)."""
    _, offsets, data = array.buffers()
    if data is None or not len(array):
        return np.empty(0, dtype=np.uint8)
    ends = np.frombuffer(offsets, dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    return np.frombuffer(data, dtype=np.uint8)[ends[0] : ends[-1]]


def _bytes_to_escape(data: np.ndarray) -> np.ndarray:
    """Positions in `data` of the bytes json escapes (a byte below 0x80 is never part of a longer character)."""
    found = []
    below, equal = np.empty(_ESCAPE_SCAN_BYTES, dtype=bool), np.empty(_ESCAPE_SCAN_BYTES, dtype=bool)
    for first in range(0, len(data), _ESCAPE_SCAN_BYTES):
        part = data[first : first + _ESCAPE_SCAN_BYTES]
        mask, other = below[: len(part)], equal[: len(part)]
        np.less(part, 0x20, out=mask)
        for byte in (ord('"'), ord("\\")):
            np.equal(part, byte, out=other)
            mask |= other
        at = np.flatnonzero(mask)
        if len(at):
            found.append(at + first)
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def _fingerprint_lines(contents: pa.Array, codes: np.ndarray, lengths: np.ndarray):
    """The bytes `conversations_fingerprint` hashes for these conversations (`lengths[i]` turns each, contents
    `contents`, roles `CANONICAL_ROLES[codes]`): one `json.dumps(turns, ensure_ascii=False, sort_keys=True)` line
    per conversation, assembled by Arrow in one gather. Each content is cut before and after each byte json
    escapes, and the line taken in order: "[", then per turn [", " but before the first] '{"content": "', the
    content's pieces (each byte to escape as json spells it), '", "role": "..."}', then "]\n". (Arrow's
    replace_substring per character to escape took 4x longer on text with newlines, quotes and backslashes.)"""
    data = _string_bytes(contents)
    special = _bytes_to_escape(data)
    _, offsets_buffer, data_buffer = contents.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[
        contents.offset : contents.offset + len(contents) + 1
    ]
    base = int(offsets[0])
    bounds = offsets - base  # turn i's content is data[bounds[i]:bounds[i + 1]]
    # The cuts, in order: each content's bounds, and each special byte's start and end. Where cuts coincide, a
    # content's bound comes first and a byte's start last, so each special byte is the piece after its start.
    turn_of = np.searchsorted(bounds, special, side="right") - 1  # the turn each special byte is in
    earlier = np.concatenate(([0], np.cumsum(np.bincount(turn_of, minlength=len(bounds) - 1))))
    last = special + 1 == bounds[turn_of + 1]  # the last byte of its content
    follows_last = np.zeros(len(bounds), dtype=np.int64)
    follows_last[turn_of[last] + 1] = 1
    bound_cut = np.arange(len(bounds)) + 2 * earlier - follows_last  # turn i's pieces: bound_cut[i]:[i + 1]
    start_cut = turn_of + 1 + 2 * np.arange(len(special))  # the piece that is each special byte
    cuts = np.empty(len(bounds) + 2 * len(special), dtype=np.int32)
    cuts[bound_cut], cuts[start_cut], cuts[start_cut + 1 + last] = bounds, special, special + 1
    pieces = pa.StringArray.from_buffers(len(cuts) - 1, pa.py_buffer(cuts + np.int32(base)), data_buffer)

    # Where each turn's block (separator, opening, pieces, closing) starts in the line bytes, each row's own
    # "[" and the earlier rows' "[" and "]\n" before it.
    turns, rows = len(codes), len(lengths)
    per_turn = np.diff(bound_cut)
    row_of_turn = np.repeat(np.arange(rows), lengths)
    first_turn = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    block = np.concatenate(([0], np.cumsum(3 + per_turn)[:-1])) + 2 * row_of_turn + 1
    used = int(bound_cut[-1])  # the pieces in contents (after a last special byte, one more is empty)
    order = np.empty(2 * rows + 3 * turns + used, dtype=np.int64)
    order[block[first_turn] - 1] = 2  # "["
    order[block[first_turn + lengths - 1] + 3 + per_turn[first_turn + lengths - 1]] = 3  # "]\n"
    separator = np.ones(turns, dtype=np.int64)
    separator[first_turn] = 0
    order[block], order[block + 1] = separator, 4
    order[block + 2 + per_turn] = 5 + codes.astype(np.int64)
    constants = len(_PIECES) + len(_ESCAPED)
    at = np.repeat(block + 2 - bound_cut[:-1], per_turn) + np.arange(used)  # each piece's place
    order[at] = constants + np.arange(used)
    order[at[start_cut]] = len(_PIECES) + _ESCAPE_INDEX[data[special]]
    source = pa.concat_arrays([pa.array(_PIECES, pa.string()), _ESCAPED, pieces])
    return _string_bytes(source.take(pa.array(order)))


def _turn_keys(kind: pa.DataType, spec: FormatSpec) -> tuple | None:
    """(role key, content key, known roles) of a ShareGPT/OpenAI turns column of this type; None when it is not a
    list of turns with role and content strings (the row-by-row path then names the row and field)."""
    role_key, content_key, known = (
        ("from", "value", SHAREGPT_ROLES)
        if spec.format == "sharegpt"
        else ("role", "content", {r: r for r in CANONICAL_ROLES})
    )
    if not pa.types.is_list(kind) or not pa.types.is_struct(kind.value_type):
        return None
    fields = {
        kind.value_type.field(i).name: kind.value_type.field(i).type
        for i in range(kind.value_type.num_fields)
    }
    if not all(key in fields and pa.types.is_string(fields[key]) for key in (role_key, content_key)):
        return None
    return role_key, content_key, known


def _chunk_turns(
    chunk: pa.Array, spec: FormatSpec, keys: tuple, fingerprint: bool
) -> tuple[ArrowConversations, np.ndarray | None] | None:
    """One chunk of a turns column (keys: `_turn_keys`) as conversations, with its fingerprint lines (when
    `fingerprint`), or None when a row breaks a rule."""
    role_key, content_key, known = keys
    if chunk.null_count:
        return None
    offsets = chunk.offsets.to_numpy()
    lengths = np.diff(offsets)
    if (lengths == 0).any():
        return None
    turns = pc.list_flatten(chunk)
    if turns.null_count:
        return None
    roles, contents = pc.struct_field(turns, role_key), pc.struct_field(turns, content_key)
    if roles.null_count or contents.null_count:
        return None
    raw = pc.unique(roles).to_pylist()
    mapped = [spec.role_map.get(r) or known.get(r) for r in raw]
    if None in mapped:
        return None
    codes = np.array([_CANONICAL[m] for m in mapped], dtype=np.int8)[
        pc.index_in(roles, value_set=pa.array(raw, pa.string())).to_numpy()
    ]
    row = np.repeat(np.arange(len(lengths)), lengths)
    j = np.arange(len(codes)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    system = codes == 0
    if (system & (j > 0)).any():
        return None  # a system turn after the first
    first_system = system[offsets[:-1] - offsets[0]]
    body_lengths = lengths - first_system
    if (body_lengths == 0).any() or (body_lengths % 2).any():
        return None  # no user/assistant turn, or a question without its answer
    body_index = j - first_system[row]
    body = body_index >= 0
    if (codes[body] != 1 + body_index[body] % 2).any():
        return None  # not user/assistant alternating from a user turn
    blank = pc.match_substring_regex(contents, _BLANK).to_numpy(zero_copy_only=False)
    if (blank & body).any():
        return None
    lines = _fingerprint_lines(contents, codes, lengths) if fingerprint else None
    return ArrowConversations(contents, codes, (offsets - offsets[0]).astype(np.int64)), lines


def _turns_in_bulk(column: pa.ChunkedArray, spec: FormatSpec, digest=None) -> Sequence | None:
    """ShareGPT/OpenAI turns -> canonical conversations, checked column-wise with `validate()`'s rules; None when
    any row breaks one (or the column is not a list of role/content strings): the row-by-row path then says which.
    `digest` is fed what `conversations_fingerprint` hashes for them."""
    keys = _turn_keys(column.type, spec)
    if keys is None:
        return None
    checked = functools.partial(_chunk_turns, spec=spec, keys=keys, fingerprint=digest is not None)
    # The chunks on all cores (Arrow and numpy let go of the GIL), fed to `digest` in order.
    conversations: list[ArrowConversations] = []
    # Slices of at most `_CHECK_ROWS` rows (views, no copy): each one's checks and fingerprint lines are transient
    # copies of its text, so a chunk as large as a parquet row group (a million rows in pyarrow's default) would
    # hold its text several times over. A table's chunks may be empty (a sliced or concatenated dataset).
    slices = (
        chunk.slice(first, _CHECK_ROWS)
        for chunk in column.chunks
        for first in range(0, len(chunk), _CHECK_ROWS)
    )
    for result in ordered_map(checked, slices):
        if result is None:
            return None
        chunk_conversations, lines = result
        if digest is not None:
            digest.update(lines)
        conversations.append(chunk_conversations)
    return _joined(conversations) if conversations else []


def _conversations_in_bulk(table: pa.Table, spec: FormatSpec, digest) -> Sequence | None:
    if spec.format in ("sharegpt", "openai") and spec.system_field is None:
        field_name = spec.conversations_field if spec.format == "sharegpt" else spec.messages_field
        return _turns_in_bulk(table.column(field_name), spec, digest)
    # Alpaca, or a system prompt column: to_conversation per row, on the columns it reads only.
    needed = [spec.system_field, spec.instruction_field, spec.input_field, spec.output_field]
    needed += [spec.conversations_field, spec.messages_field]
    records = table.select([n for n in dict.fromkeys(needed) if n in table.column_names]).to_pylist()
    try:
        return [to_conversation(record, spec) for record in records]
    except InvalidRecordError:
        return None


def _ids_unique(table: pa.Table, name: str, seen: dict, *, only_source: bool) -> bool:
    """Whether the rows' ids are unique (and unlike those of earlier sources); records them in `seen`."""
    if "id" not in table.column_names:
        return True
    column = table.column("id")
    kind = column.type
    if only_source and (pa.types.is_string(kind) or pa.types.is_integer(kind)):
        return pc.count_distinct(column).as_py() == len(column) - column.null_count
    keys: dict[str, tuple[int, str]] = {}
    for row, identity in enumerate(column.to_pylist()):
        if identity is not None:
            key = json.dumps(identity, sort_keys=True, default=str)
            if key in keys or key in seen:
                return False
            keys[key] = (row, name)
    seen.update(keys)
    return True


def _parse_options(schema: pa.Schema | None, *, other_fields: str = "error"):
    """Arrow's JSON parse options: against `schema` when given, any field it lacks `other_fields` ("error", or
    "ignore" to read some columns only)."""
    import pyarrow.json as pa_json

    return (
        pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior=other_fields)
        if schema
        else None
    )


def _parse_json(source, schema: pa.Schema | None = None, *, other_fields: str = "error") -> pa.Table | None:
    """`source` (a path, or lines in a buffer) read by Arrow's JSON reader, against `schema` when given; None when
    Arrow cannot read it."""
    import pyarrow.json as pa_json

    options = _parse_options(schema, other_fields=other_fields)
    try:
        return pa_json.read_json(
            source, read_options=pa_json.ReadOptions(block_size=_JSON_BLOCK_BYTES), parse_options=options
        )
    except pa.lib.ArrowException:
        return None


def _nesting_fine(path: Path) -> bool:
    """Whether every line of the file passes `_LineScan`'s nesting count (what a parse that infers types needs)."""
    scan = _LineScan(nesting=True)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_SCAN_BYTES), b""):
            if not scan.feed(chunk):
                return False
    return True


def _head_schema(path: Path) -> pa.Schema | None:
    """The schema Arrow infers from the file's first lines (`_SCHEMA_PREFIX_BYTES`); None when it cannot read
    them or they hold no field."""
    with open(path, "rb") as handle:
        head = handle.read(_SCHEMA_PREFIX_BYTES)
    head = head[: head.rfind(b"\n") + 1]
    if not head or not _LineScan(nesting=True).feed(head):
        return None
    first = _parse_json(pa.BufferReader(head))
    return first.schema if first is not None and first.num_columns else None


def _read_json(path: Path, digest, scan: _LineScan | None = None) -> tuple[pa.Table, _LineScan] | None:
    """The JSONL file as Arrow's JSON reader reads it against a schema, with its scan (`_scanned`: its bytes fed to
    `digest`; or `scan`, when a streamed read has taken it); None when it cannot read it or may not be given it
    (`_LineScan` says).

    Arrow infers types well but misreads values while inferring: a list whose first item is null comes out
    wrong (`[null, false]` as `[false, false]` in pyarrow 26 and `[false]` in 21; `[null, "a"]` as a corrupt
    string), while the same line parsed against a schema reads right. So the values always come from a parse
    against a schema: the one inferred from the file's first lines (measured on a 1.5 GB pool: 3.0 s, against
    3.7 s for inferring throughout), with any field or type it does not hold an error; on which the schema is
    inferred from the whole file and the file parsed against that. The file is scanned and hashed first; Arrow
    then reads it from its path."""
    first = _head_schema(path)
    scan = scan if scan is not None else _scanned(path, digest)
    if scan is None:
        return None
    table = _parse_json(path, first) if first is not None else None
    if table is None:  # new fields or types further on (or a first line Arrow cannot read)
        schema = _whole_file_schema(path)
        table = _parse_json(path, schema) if schema is not None else None
    return None if table is None else (table, scan)


def _whole_file_schema(path: Path) -> pa.Schema | None:
    """The types Arrow infers from every line of the file, once its lines pass the nesting count too (the table
    that inference parses is dropped at once: its values are not to be trusted, see `_read_json`); None when it
    cannot infer them."""
    inferred = _parse_json(path) if _nesting_fine(path) else None
    return inferred.schema if inferred is not None and inferred.num_columns else None


def fast_jsonl(
    source, name: str, resolve, seen_ids: dict, *, only_source: bool, memo_dir: Path | None = None
):
    """A `.jsonl` source of valid rows, read in bulk -> (table, conversations, fingerprint part, layout, tag,
    conversations fingerprint or None); None for any other source, or as soon as anything is off (the
    row-by-row path then reads it). What the read learns is kept under `memo_dir` (`_ReadMemo`) for the next
    read of the same, unchanged file."""
    path = Path(source)
    if path.suffix.lower() != ".jsonl" or not path.is_file():
        return None
    started, before = time.time_ns(), _file_identity(path)
    memo = _ReadMemo.load(memo_dir, path, before)
    digest, scan = (
        None,
        None,
    )  # a first read's: taken once, for the stream and for the whole-file read after it
    if only_source and before["size"] >= _STREAM_MIN_BYTES:
        if memo is None:
            digest = _HashInBackground(hashlib.sha256())
            scan = _scanned(path, digest)
            if scan is None:
                return None  # a line Arrow may not be given: the row-by-row path reads the file
        streamed = _streamed_jsonl(
            path, name, resolve, seen_ids, memo, scan, digest, memo_dir, started, before
        )
        if streamed is not None:
            return streamed
    table = _parse_json(str(path), memo.schema) if memo is not None else None
    if table is None or _file_identity(path) != before:  # no memo, or the file changed while it was parsed
        if scan is None:
            digest = _HashInBackground(hashlib.sha256())
        read = _read_json(path, digest, scan)
        if read is None or _file_identity(path) != before:
            return (
                None  # or the file changed while it was read: the hash and the table may be of two versions
            )
        table, scan = read
        lines = scan.lines
        memo = _ReadMemo(before, digest.hexdigest(), lines, scan.longest, table.schema, {})
        learned = True
    else:
        lines, learned = memo.lines, False
    if table.num_rows != lines or any(_read_differently(f.type) for f in table.schema):
        return None  # two objects on a line, or a string Arrow reads as a date
    if any(_huge_floats(table.column(i)) for i in range(table.num_columns)) or not _structurally_valid(table):
        return None
    if _inference_sorts_struct_fields():
        sorted_schema = pa.schema([f.with_type(_sorted_struct_fields(f.type)) for f in table.schema])
        if sorted_schema != table.schema:
            try:
                table = table.cast(sorted_schema)
            except pa.lib.ArrowException:
                return None  # pyarrow 21 cannot cast some inferred types (a list of nulls): read row by row
    try:
        layout, tag = resolve(table.column_names, name)
    except DeitaHubError:
        return None  # the row-by-row path says it, after any bad line
    spelled = None if memo.spelled.get(tag) else _HashInBackground(hashlib.sha256())
    conversations = _conversations_in_bulk(table, layout, spelled)
    if conversations is None or not _ids_unique(table, name, seen_ids, only_source=only_source):
        return None
    fingerprint = memo.settle(tag, spelled, learned=learned, memo_dir=memo_dir, path=path, started_ns=started)
    return table, conversations, memo.digest, layout, tag, fingerprint


def table_in_bulk(table: pa.Table, name: str, resolve, seen_ids: dict, *, only_source: bool):
    """A source read as an Arrow table (a parquet file, a saved or Hub dataset), checked column-wise as a JSONL
    source read in bulk is -> (conversations, layout, tag, conversations fingerprint or None); None when a row
    breaks a rule or a column is of a type the checks do not read (the row-by-row path then names the row). The
    table is the one the row-by-row path reads, so only the conversations and ids are taken differently: no
    `to_pylist` of every column, no Python dicts per row (200K rows: 3x faster at about half the peak memory,
    `benchmarks/pool.py`)."""
    try:
        layout, tag = resolve(table.column_names, name)
    except DeitaHubError:
        return None  # the row-by-row path says it
    spelled = _HashInBackground(hashlib.sha256())
    conversations = _conversations_in_bulk(table, layout, spelled)
    if conversations is None or not _ids_unique(table, name, seen_ids, only_source=only_source):
        return None
    digest = spelled.hexdigest()
    return conversations, layout, tag, None if digest == _EMPTY_SHA256 else "sha256:" + digest


# --- a large pool streamed: its turns stay in the file -------------------------------------------------------------
#
# Read whole, a pool of a million conversations is a 1.5 GB Arrow table, nearly all of it the turns' text, which
# most commands never look at again: a selection needs the scores, the response lengths and the fingerprint, then
# the turns of the rows it keeps. And the memory such a table fills is fresh to the process: in a VM whose host
# takes back free memory, faulting it in has cost more kernel time than the parse (7-18 s per 1.6 GB read,
# 2026-12-03). So a large single JSONL source of ShareGPT/OpenAI turns is streamed: Arrow parses it a block at a
# time against the schema; each block is checked as the whole table would be, its response lengths and
# fingerprint lines taken, and its turns column dropped, while the other columns (ids, scores, metadata) are kept.
# The turns are read again from the file when asked for: the rows a subset keeps (`Pool.take`), or all of them
# once (`Pool.table`, iterating the conversations). The file must be as it was read (git's index test, as for the
# read memo); a changed file is an error, never two versions in one dataset.
_STREAM_MIN_BYTES = 1 << 26  # smaller sources are read whole
# Arrow's streaming reader parses some 40 blocks ahead of its reader, so its blocks are kept small: at 16 MiB they
# held 0.65 GB, at 4 MiB 0.16 GB (1M rows, 1.6 GB, 2 cores; memory freed and faulted in again as it streams).
_STREAM_BLOCK_BYTES = 1 << 22
# What `_stream` returns when Arrow cannot parse a block against the schema: a line with a field or type the schema
# lacks (the stream then tries the whole file's schema), or no JSON Arrow reads.
_MISFIT = "misfit"


@dataclass
class PoolFile:
    """Where a streamed source's turns column stays: the JSONL file, as it was read (`identity`); the schema Arrow
    parses it against and the pool's columns (the same, or with struct fields cast into sorted order); the
    column left in the file; the resolved format; and each row's line (found on first use when the read memo
    spared the scan)."""

    path: Path
    identity: dict[str, Any]
    parsed: pa.Schema  # what Arrow parses the file against
    columns: pa.Schema  # the pool's columns, in order
    deferred: str  # the column left in the file
    spec: FormatSpec
    rows: int
    bounds: np.ndarray | None = None  # int64 (rows + 1): row i is bytes bounds[i]:bounds[i + 1]
    whole: pa.ChunkedArray | None = field(default=None, repr=False)  # the column of every row, once read

    def _unchanged(self) -> None:
        try:
            same = _file_identity(self.path) == self.identity
        except OSError:
            same = False
        if not same:
            raise DeitaHubError(
                f"{self.path} changed or was removed after the pool was read from it; run the command again to "
                "read the file as it is now"
            )

    def _line_bounds(self) -> np.ndarray:
        if self.bounds is None:
            scan = _LineScan(nesting=False)
            with open(self.path, "rb") as handle:
                for chunk in iter(lambda: handle.read(_SCAN_BYTES), b""):
                    scan.feed(chunk)
            self._unchanged()
            if scan.lines != self.rows:
                raise DeitaHubError(f"{self.path}: could not find its {self.rows} lines again")
            self.bounds = scan.bounds()
        return self.bounds

    def column(self, positions: np.ndarray | None = None) -> pa.ChunkedArray:
        """The deferred column of the rows at `positions` (in that order, repeats allowed), or of every row (read
        once, then kept: the table and the conversations of a pool share it, as they do when it is read whole)."""
        schema = pa.schema([self.parsed.field(self.deferred)])
        kind = self.columns.field(self.deferred).type
        if positions is not None:
            positions = np.asarray(positions, dtype=np.int64)
        if self.whole is not None:
            return (
                self.whole
                if positions is None
                else take_rows(pa.table({"c": self.whole}), positions).column(0)
            )
        if positions is not None and not len(positions):
            return pa.chunked_array([], kind)
        self._unchanged()
        if positions is None:
            table, rows = _parse_json(str(self.path), schema, other_fields="ignore"), self.rows
        else:
            wanted, back = np.unique(positions, return_inverse=True)
            table = _parse_json(pa.BufferReader(self._lines(wanted)), schema, other_fields="ignore")
            rows = len(wanted)
        self._unchanged()
        if table is None or table.num_rows != rows:
            raise DeitaHubError(f"{self.path}: could not read its {self.deferred!r} column again")
        column = table.column(0).cast(kind)
        if positions is None:
            self.whole = column
            return column
        return column.take(pa.array(back.reshape(-1), type=pa.int64()))

    def _lines(self, wanted: np.ndarray) -> bytes:
        """The lines of the rows `wanted` (sorted, unique), each ending in a newline; runs of neighbours in one read."""
        bounds = self._line_bounds()
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        firsts, lasts = wanted[np.r_[0, breaks]], wanted[np.r_[breaks - 1, len(wanted) - 1]]
        parts = []
        with open(self.path, "rb") as handle:
            descriptor = handle.fileno()
            for first, last in zip(firsts.tolist(), lasts.tolist(), strict=True):
                start, stop = int(bounds[first]), int(bounds[last + 1])
                data = os.pread(descriptor, stop - start, start)
                parts.append(data if data.endswith(b"\n") else data + b"\n")
        return b"".join(parts)


class StreamedConversations(_Conversations):
    """A streamed pool's conversations (see above): their response lengths, taken while streaming; `take` reads
    only the rows asked for; anything else (an index, a slice, iterating, as the embedders, scorers and trainers
    do) reads them all from the file once and keeps them, as a pool read whole does."""

    def __init__(self, file: PoolFile, lengths: np.ndarray):
        self.file, self.lengths = file, lengths

    @cached_property
    def _held(self) -> Sequence:
        conversations = _turns_in_bulk(self.file.column(), self.file.spec)
        if conversations is None or len(conversations) != len(self):
            raise DeitaHubError(f"{self.file.path}: could not read its conversations again")
        return conversations

    def take(self, positions: np.ndarray) -> list[list[dict[str, str]]]:
        conversations = _turns_in_bulk(self.file.column(positions), self.file.spec)
        if conversations is None:
            raise DeitaHubError(f"{self.file.path}: could not read its conversations again")
        return list(conversations)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index):
        return self._held[index]

    def __iter__(self):
        return iter(self._held)

    def __repr__(self) -> str:
        return f"StreamedConversations({len(self)} conversations in {self.file.path})"

    def response_lengths(self) -> np.ndarray:
        return self.lengths


def pick(conversations: Sequence, positions: np.ndarray) -> list[list[dict[str, str]]]:
    """The conversations at `positions`, in that order: a streamed pool reads only those rows from its file."""
    if isinstance(conversations, StreamedConversations):
        return conversations.take(positions)
    return [conversations[int(p)] for p in positions]


def _stream(path: Path, file: PoolFile, spelled, *, block_bytes: int) -> tuple[pa.Table, np.ndarray] | None:
    """Stream `file`'s source through Arrow's JSON reader, in blocks of `block_bytes` (no line longer: Arrow's
    reader may abort on a line across three blocks): per block, the bulk read's checks (`fast_jsonl`), its
    fingerprint lines fed to `spelled` (when given), its response lengths; its columns but the deferred one kept.
    None when a block fails a check (the whole-file path then reads the file), `_MISFIT` when Arrow cannot parse
    one against the schema."""
    import pyarrow.json as pa_json

    keys = _turn_keys(file.columns.field(file.deferred).type, file.spec)
    if keys is None:
        return None

    def checked(batch: pa.RecordBatch):
        table = pa.Table.from_batches([batch])
        if not _structurally_valid(table) or any(_huge_floats(column) for column in table.columns):
            return None
        if file.columns != file.parsed:
            try:
                table = table.cast(file.columns)
            except pa.lib.ArrowException:
                return None
        turns = table.column(file.deferred).combine_chunks()
        result = _chunk_turns(turns, file.spec, keys, fingerprint=spelled is not None)
        if result is None:
            return None
        conversations, lines = result
        return table.drop_columns([file.deferred]), conversations.response_lengths(), lines

    held, lengths = [], []
    try:
        reader = pa_json.open_json(
            str(path),
            read_options=pa_json.ReadOptions(block_size=block_bytes),
            parse_options=_parse_options(file.parsed),
        )
        for result in ordered_map(checked, reader):
            if result is None:
                return None
            table, block_lengths, lines = result
            if spelled is not None:
                spelled.update(lines)
            held.append(table)
            lengths.append(block_lengths)
    except pa.lib.ArrowException:
        return _MISFIT
    if not held:
        return None
    return pa.concat_tables(held), np.concatenate(lengths)


def _streamed_jsonl(
    path: Path, name: str, resolve, seen_ids: dict, memo, scan, digest, memo_dir, started: int, before: dict
):
    """`fast_jsonl`'s result for a large single source of turns, streamed (see above); None when it is not one,
    or when anything is off (the whole-file path then reads it, and the row-by-row path if that fails too).
    Without a `memo`, `scan` is the file's scan, its bytes fed to `digest` (by `fast_jsonl`, which hands both to
    the whole-file read if the stream fails: the file is scanned and hashed once)."""
    bounds, learned = None, False
    if memo is None:
        schema = _head_schema(path)
        if schema is None:
            return None
        memo = _ReadMemo(before, digest.hexdigest(), scan.lines, scan.longest, schema, {})
        bounds, learned = scan.bounds(), True

    def stream(schema: pa.Schema):
        if any(_read_differently(f.type) for f in schema):
            return None
        try:
            layout, tag = resolve(schema.names, name)
        except DeitaHubError:
            return None
        if layout.format not in ("sharegpt", "openai") or layout.system_field is not None:
            return None
        deferred = layout.conversations_field if layout.format == "sharegpt" else layout.messages_field
        if deferred not in schema.names or len(schema) < 2:
            return None  # (a table of no columns keeps no row count through every pyarrow version: read it whole)
        columns = schema
        if _inference_sorts_struct_fields():
            columns = pa.schema([f.with_type(_sorted_struct_fields(f.type)) for f in schema])
        file = PoolFile(path, before, schema, columns, deferred, layout, memo.lines, bounds)
        spelled = None if memo.spelled.get(tag) else _HashInBackground(hashlib.sha256())
        streamed = _stream(path, file, spelled, block_bytes=max(_STREAM_BLOCK_BYTES, memo.longest))
        return (
            streamed if streamed is None or streamed is _MISFIT else (*streamed, file, layout, tag, spelled)
        )

    streamed = stream(memo.schema)
    if streamed is _MISFIT and learned:
        # Later lines hold fields or types the first lines' schema lacks: the whole file's schema, as the whole-file
        # read infers it, and the stream again against that. The memo keeps it: the next read streams at once.
        memo.schema = _whole_file_schema(path)
        streamed = stream(memo.schema) if memo.schema is not None else None
    if streamed is None or streamed is _MISFIT or _file_identity(path) != before:
        return None
    held, lengths, file, layout, tag, spelled = streamed
    if held.num_rows != file.rows or not _ids_unique(held, name, seen_ids, only_source=True):
        return None
    fingerprint = memo.settle(tag, spelled, learned=learned, memo_dir=memo_dir, path=path, started_ns=started)
    return held, StreamedConversations(file, lengths), memo.digest, layout, tag, fingerprint


# --- what a bulk read learned, kept for the next read of the same file --------------------------------------------
#
# A large JSONL pool's first read costs about twice Arrow's parse: the scan that guards the parse, the hash of the
# file's bytes, and the spelling and hash of its canonical conversations (1M rows, 1.6 GB, 2 cores: 9-10 s; read
# again with its memo 4.4-5.7 s). Each command reads the pool again (score, embed, select, every build of a recipe being
# tuned), and an unchanged file needs none of that work again: its next read parses it against the schema it had and
# takes both fingerprints from the memo. "Unchanged" is git's test for its index: the same device, inode, size, mtime
# and ctime. A write changes the ctime, which no user call can set back, so a memo is only kept for a file whose ctime
# was settled before the read began (a write in the same clock tick would go unseen) and whose identity did not move
# during it.
_MEMO_FORMAT = 2  # bump when what a read checks, or how it spells a fingerprint, changes
_MEMO_MIN_BYTES = 1 << 26  # smaller files are read in under a second: no memo
# File systems with 1-2 s timestamps (FAT, some network mounts) round a write's time down by up to that much.
_MEMO_SETTLED_NS = 2 * 10**9


def _file_identity(path: Path) -> dict[str, Any]:
    stat = path.stat()
    return {
        "path": str(path.resolve()),
        "device": stat.st_dev,
        "inode": stat.st_ino,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "format": _MEMO_FORMAT,
        "deita_hub": __version__,
        "pyarrow": pa.__version__,
    }


@dataclass
class _ReadMemo:
    """What a bulk read of one JSONL file learned: the file's identity when read, its fingerprint part (sha256
    of its bytes), its line count, the schema Arrow parsed it against, and its conversations' fingerprint per
    resolved layout (a `--format` or role map that reads it differently is checked and spelled afresh), and its
    longest line's length (what a streamed read's blocks must hold)."""

    identity: dict[str, Any]
    digest: str
    lines: int
    longest: int
    schema: pa.Schema
    spelled: dict[str, str]

    @staticmethod
    def _path(memo_dir: Path, identity: dict[str, Any]) -> Path:
        # One memo per file (by its resolved path): a later read's memo replaces it.
        key = hashlib.sha256(identity["path"].encode()).hexdigest()[:24]
        return Path(memo_dir) / "pool-reads" / f"{key}.json"

    @classmethod
    def load(cls, memo_dir: Path | None, path: Path, identity: dict[str, Any]) -> _ReadMemo | None:
        """The memo of `path` if one was kept and the file is unchanged since; None otherwise (or unreadable)."""
        if memo_dir is None or identity["size"] < _MEMO_MIN_BYTES:
            return None
        try:
            kept = json.loads(cls._path(memo_dir, identity).read_text(encoding="utf-8"))
            if kept["identity"] != identity:
                return None
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(kept["schema"])))
            lines, longest = int(kept["lines"]), int(kept["longest"])
            return cls(identity, kept["digest"], lines, longest, schema, dict(kept["spelled"]))
        except (OSError, ValueError, KeyError, TypeError, pa.lib.ArrowException):
            return None

    def settle(
        self, tag: str, spelled, *, learned: bool, memo_dir, path: Path, started_ns: int
    ) -> str | None:
        """The read's conversations fingerprint: the one `spelled` hashed (ShareGPT/OpenAI turns spelled by Arrow,
        of this source alone), kept for the layout `tag`, or the one kept before; the memo saved when the read
        learned anything."""
        fingerprint = self.spelled.get(tag)
        if spelled is not None and spelled.hexdigest() != _EMPTY_SHA256:
            fingerprint = self.spelled[tag] = "sha256:" + spelled.hexdigest()
            learned = True
        if learned:
            self.save(memo_dir, path, started_ns)
        return fingerprint

    def save(self, memo_dir: Path | None, path: Path, started_ns: int) -> None:
        """Keep this memo for the next read, when the file qualifies (see above); a cache that cannot be written
        costs the next read its time, never this one its result."""
        if memo_dir is None or self.identity["size"] < _MEMO_MIN_BYTES:
            return
        if self.identity["ctime_ns"] > started_ns - _MEMO_SETTLED_NS:
            return
        try:
            if _file_identity(path) != self.identity:
                return
            kept = {
                "identity": self.identity,
                "digest": self.digest,
                "lines": self.lines,
                "longest": self.longest,
                "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
                "spelled": self.spelled,
            }
            target = self._path(memo_dir, self.identity)
            with atomic_file(target) as tmp:
                tmp.write_text(json.dumps(kept), encoding="utf-8")
        except (OSError, DeitaHubError) as exc:
            log.debug("could not keep the read memo of %s: %s", path, exc)


@dataclass
class SourceRows:
    """What `read_rows` gathers from a pool's sources: the valid rows, in source order."""

    tables: list[pa.Table]  # per source, its valid rows' original columns
    items: Sequence[Any]  # per valid row, what `convert` made of it
    rows: list[int]  # per valid row, its position in the concatenated sources
    invalid: list[dict[str, Any]]  # {"row","field","reason","source"} of each skipped row
    fingerprint: Any  # sha256 over each source's content and its resolved layout
    resolved: Any  # the first source's layout
    num_source_rows: int


def read_rows(
    sources,
    *,
    resolve,
    convert,
    on_invalid: str,
    config,
    split: str,
    revision,
    check=None,
    fast=None,
    bulk=None,
) -> SourceRows:
    """The one loop over a pool's sources, for SFT pools (`read_pool`) and preference pools alike: read each source,
    resolve its layout from its columns (`resolve(columns, name) -> (layout, fingerprint tag)`), convert every row
    (`convert(record, layout, row, name)`; an InvalidRecordError names the field), keep the valid rows. A bad row
    fails with file, row and field, or with `on_invalid="skip"` is kept in `invalid` with its reason. `check(record)`
    runs on every row before the layout is resolved (a row that is no record at all says so, not "no columns").
    `fast(source, name, resolve) -> (table, items, fingerprint part, layout, tag) | None` may read a source whose
    rows are all valid in bulk, and `bulk(table, name, resolve) -> (items, layout, tag) | None` check a source
    read as an Arrow table (parquet, a dataset) in bulk; None sends it through the row-by-row path, which names
    any bad row."""

    def reject(exc: InvalidRecordError, i: int, name: str, source_invalid: list) -> None:
        if on_invalid == "error":
            raise exc.located(row=i, source=name) from None
        source_invalid.append({"row": i, "field": exc.field, "reason": exc.reason, "source": name})

    seen_sources: set[str] = set()
    for source in sources:  # ids name rows by (row, source): a source given twice would hold every row twice
        where = str(Path(source).resolve()) if Path(source).exists() else str(source)
        if where in seen_sources:
            raise DeitaHubError(
                f"pool source {source} is given twice: each source is read once (its rows would be in the pool "
                "twice); list it once"
            )
        seen_sources.add(where)
    tables, parts, rows, invalid = [], [], [], []  # parts: per source, its valid rows' items
    fingerprint = hashlib.sha256()
    resolved = None
    offset = 0
    for source in sources:
        name = str(source)
        quick = fast(source, name, resolve) if fast is not None else None
        if quick is None:
            source_invalid: list[dict] = []
            table, records, part = read_source(
                source,
                config=config,
                split=split,
                revision=revision,
                on_invalid=on_invalid,
                invalid=source_invalid,
            )
            checked = bulk(table, name, resolve) if bulk is not None and table is not None else None
            if checked is not None:
                items, layout, tag = checked
                quick = table, items, part, layout, tag
        if quick is not None:  # every row valid, all of them kept
            table, source_items, part, layout, tag = quick
            resolved = resolved if resolved is not None else layout
            fingerprint.update(part.encode())
            fingerprint.update(tag.encode())
            parts.append(source_items)
            rows.extend(range(offset, offset + table.num_rows))
            tables.append(table)
            offset += table.num_rows
            continue
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
        keep, source_items = [], []
        for i, record in enumerate(records):
            if i in bad_rows:
                continue
            try:
                item = convert(record, layout, i, name)
            except InvalidRecordError as exc:
                reject(exc, i, name, source_invalid)
                continue
            source_items.append(item)
            keep.append(i)
            rows.append(offset + i)
        parts.append(source_items)
        if table is None:
            table = table_from_rows([records[i] for i in keep], name)
        elif len(keep) != len(records):
            table = table.take(pa.array(keep, type=pa.int64()))
        tables.append(table)
        invalid.extend(sorted(source_invalid, key=lambda item: item["row"]))
        offset += len(records)
    return SourceRows(tables, _joined(parts), rows, invalid, fingerprint, resolved, offset)


def read_pool(
    sources: str | Path | Sequence[str | Path],
    spec: FormatSpec | None = None,
    *,
    on_invalid: str = "error",
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Pool:
    """Read one or more sources (concatenated in order) into a Pool.

    `on_invalid="error"` raises on the first bad row (file, row, field, reason); `"skip"` drops bad rows and
    records them in `Pool.invalid`. A large JSONL source's read is remembered under `cache_dir` (default
    `$DEITA_HUB_CACHE`), so the next read of the unchanged file skips its checksums (`_ReadMemo`).
    """
    if on_invalid not in ON_INVALID:
        raise DeitaHubError(f"on_invalid must be one of {ON_INVALID}, got '{on_invalid}'")
    spec = spec or FormatSpec()
    if isinstance(sources, str | Path):
        sources = [sources]
    if not sources:
        raise DeitaHubError("no pool given")
    seen_ids: dict[str, tuple[int, str]] = {}  # each valid row's `id` -> (row, source) of its first holder
    memo_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()

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

    spelled = {}  # per source read in bulk, its conversations' fingerprint (or None)

    def fast(source, name: str, resolve):
        result = fast_jsonl(source, name, resolve, seen_ids, only_source=len(sources) == 1, memo_dir=memo_dir)
        spelled[name] = result[-1] if result is not None else None
        return result[:-1] if result is not None else None

    def bulk(table: pa.Table, name: str, resolve):
        result = table_in_bulk(table, name, resolve, seen_ids, only_source=len(sources) == 1)
        spelled[name] = result[-1] if result is not None else None
        return result[:-1] if result is not None else None

    read = read_rows(
        sources,
        resolve=resolve,
        convert=convert,
        check=check,
        fast=fast,
        bulk=bulk,
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
    pool = Pool(
        source=", ".join(map(str, sources)),
        held=table,
        conversations=conversations,
        rows=np.asarray(rows, dtype=np.int64),
        spec=resolved,
        fingerprint="sha256:" + fingerprint.hexdigest(),
        num_source_rows=offset,
        invalid=invalid,
    )
    if len(sources) == 1 and spelled.get(str(sources[0])) is not None:
        # the cached_property, computed while reading
        pool.__dict__["conversations_fingerprint"] = spelled[str(sources[0])]
    return pool
