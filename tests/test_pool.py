"""Pool reading: every file type and the real shared pools, fingerprints, skipped rows."""

import hashlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest

from deita_hub import pool as pool_module
from deita_hub.conversations import CANONICAL_ROLES, FormatSpec
from deita_hub.errors import DeitaHubError
from deita_hub.pool import read_pool

POOLS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pools"
needs_pools = pytest.mark.skipif(not POOLS.is_dir(), reason=f"shared pools not found at {POOLS}")

ROWS = [
    {
        "id": f"r{i}",
        "conversations": [
            {"from": "human", "value": f"question {i}"},
            {"from": "gpt", "value": f"answer {i}"},
        ],
    }
    for i in range(5)
]
ROWS_LINE = json.dumps(ROWS[0]) + "\n"


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_same_rows_from_every_file_type(tmp_path):
    import datasets

    write_jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "p.json").write_text(json.dumps(ROWS))
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "p.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    pools = [read_pool(tmp_path / name) for name in ("p.jsonl", "p.json", "p.parquet", "saved", "saved_dict")]
    for pool in pools:
        assert pool.conversations == pools[0].conversations
        assert pool.table.column("id").to_pylist() == [r["id"] for r in ROWS]
        assert pool.rows.tolist() == list(range(5))
        assert pool.spec.format == "sharegpt"


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    a = read_pool(write_jsonl(tmp_path / "a.jsonl", ROWS)).fingerprint
    assert a == read_pool(tmp_path / "a.jsonl").fingerprint
    assert a.startswith("sha256:")
    changed = [dict(r) for r in ROWS]
    changed[2] = {**changed[2], "id": "other"}
    assert read_pool(write_jsonl(tmp_path / "b.jsonl", changed)).fingerprint != a
    # The format as resolved is part of it, not its spelling: naming the detected format changes nothing,
    # another mapping does.
    assert read_pool(tmp_path / "a.jsonl", FormatSpec(format="sharegpt")).fingerprint == a
    assert read_pool(tmp_path / "a.jsonl", FormatSpec(role_map={"human": "user"})).fingerprint != a


def test_conversations_fingerprint_covers_what_is_embedded_only(tmp_path):
    """Score columns change the file (provenance) but not the conversations (what embeddings are checked on)."""
    plain = read_pool(write_jsonl(tmp_path / "plain.jsonl", ROWS))
    scored = read_pool(write_jsonl(tmp_path / "scored.jsonl", [{**r, "quality_scores": [3.0]} for r in ROWS]))
    assert scored.fingerprint != plain.fingerprint
    assert scored.conversations_fingerprint == plain.conversations_fingerprint
    assert scored.provenance()["conversations_fingerprint"] == plain.conversations_fingerprint
    reordered = read_pool(write_jsonl(tmp_path / "reordered.jsonl", ROWS[::-1]))
    assert reordered.conversations_fingerprint != plain.conversations_fingerprint  # order is part of it


def test_skip_invalid_keeps_positions_and_reasons(tmp_path):
    rows = [ROWS[0], {"id": "bad", "conversations": [{"from": "human", "value": "q"}]}, ROWS[2]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(
        DeitaHubError, match=r"p.jsonl, row 1, field 'conversations\[0\]': the last user turn"
    ):
        read_pool(path)
    pool = read_pool(path, on_invalid="skip")
    assert pool.rows.tolist() == [0, 2]
    assert pool.table.column("id").to_pylist() == ["r0", "r2"]
    assert pool.invalid == [
        {"row": 1, "field": "conversations[0]", "reason": pool.invalid[0]["reason"], "source": str(path)}
    ]
    assert pool.provenance()["num_invalid_rows"] == 1


def test_multiple_sources_concatenate(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", ROWS[:2])
    b = write_jsonl(tmp_path / "b.jsonl", ROWS[2:])
    pool = read_pool([a, b])
    assert pool.table.column("id").to_pylist() == [r["id"] for r in ROWS]
    assert pool.rows.tolist() == list(range(5))


@needs_pools
def test_typed_and_detected_format_give_one_fingerprint():
    detected = read_pool(POOLS / "gpteacher-roleplay.json")
    typed = read_pool(POOLS / "gpteacher-roleplay.json", FormatSpec(format="alpaca", output_field="response"))
    assert typed.fingerprint == detected.fingerprint
    assert typed.conversations_fingerprint == detected.conversations_fingerprint


@needs_pools
def test_reads_gpteacher_alpaca_with_response_field():
    pool = read_pool(POOLS / "gpteacher-codegen.json")
    assert len(pool) == 4535 and pool.spec.format == "alpaca" and pool.spec.output_field == "response"
    assert all(c[-1]["role"] == "assistant" for c in pool.conversations)
    roleplay = read_pool(
        POOLS / "gpteacher-roleplay.json", FormatSpec(format="alpaca", output_field="response")
    )
    assert len(roleplay) == 1923


@needs_pools
def test_reads_fastchat_dummy_sharegpt():
    pool = read_pool(POOLS / "fastchat-dummy-conversation.json")
    assert len(pool) == 500 and pool.spec.format == "sharegpt"


@needs_pools
def test_glaive_toolcall_needs_an_explicit_role_map():
    path = POOLS / "llamafactory-glaive-toolcall-en-demo.json"
    with pytest.raises(DeitaHubError, match="unknown role 'function_call'"):
        read_pool(path)
    pool = read_pool(
        path, FormatSpec(role_map={"function_call": "assistant", "observation": "user"}), on_invalid="skip"
    )
    assert len(pool) + len(pool.invalid) == 300
    assert "tools" in pool.table.column_names  # passthrough field kept
    assert len(pool) > 250


def test_a_source_given_twice_is_an_error(tmp_path, monkeypatch):
    """Ids name rows by (row, source): a source listed twice, however spelled, would put each row in the pool
    twice, ids and all."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    for twice in ([path, path], ["p.jsonl", "./p.jsonl"], [path, "b.jsonl", str(path)]):
        write_jsonl(tmp_path / "b.jsonl", [{"conversations": ROWS[0]["conversations"]}])
        with pytest.raises(DeitaHubError, match="is given twice"):
            read_pool(twice)
    assert len(read_pool([path, "b.jsonl"])) == 6


def test_columns_missing_from_the_first_rows_are_kept(tmp_path):
    rows = [dict(ROWS[0]), {**ROWS[1], "quality_scores": [4.5]}]
    pool = read_pool(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pool.table.column("quality_scores").to_pylist() == [None, [4.5]]


# --- the bulk JSONL path: the same Pool as row by row, or a hand-off to it ------------------------------------


def _row_by_row(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(pool_module, "fast_jsonl", lambda *a, **k: None)
        patch.setattr(pool_module, "table_in_bulk", lambda *a, **k: None)
        return read_pool(*args, **kwargs)


def _bulk_used(monkeypatch, reader: str = "fast_jsonl") -> list:
    """Whether each source went through `reader` (`fast_jsonl`, or `table_in_bulk` for Arrow sources)."""
    used = []
    real = getattr(pool_module, reader)

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        used.append(result is not None)
        return result

    monkeypatch.setattr(pool_module, reader, spy)
    return used


def _same_pool(got, expected) -> bool:
    """`got` is the pool `expected` is: columns, schema, conversations, fingerprints, rows, skipped rows (asserted
    here, so a failure names the part; True, so `assert _same_pool(...) and ...` reads too)."""
    assert got.table.equals(expected.table) and got.table.schema == expected.table.schema
    assert got.conversations == expected.conversations
    assert (got.fingerprint, got.conversations_fingerprint) == (
        expected.fingerprint,
        expected.conversations_fingerprint,
    )
    assert got.rows.tolist() == expected.rows.tolist() and got.spec == expected.spec
    assert got.invalid == expected.invalid and got.num_source_rows == expected.num_source_rows
    assert got.response_lengths.tolist() == expected.response_lengths.tolist()
    return True


def _read_row_by_row(monkeypatch, path, reader: str = "fast_jsonl") -> None:
    """`path` is declined by the bulk `reader` and read as the row-by-row read reads it: the same pool, or the same
    error, with bad rows raised and with them skipped."""
    for on_invalid in ("error", "skip"):
        try:
            expected = _row_by_row(monkeypatch, path, on_invalid=on_invalid)
        except Exception as exc:  # noqa: BLE001 - whatever the row-by-row path raises, the read raises too
            expected = exc
        used = _bulk_used(monkeypatch, reader)
        try:
            got = read_pool(path, on_invalid=on_invalid)
        except Exception as exc:  # noqa: BLE001
            got = exc
        monkeypatch.undo()
        assert used == [False]
        if isinstance(expected, Exception):
            assert type(got) is type(expected) and str(got) == str(expected)
        else:
            _same_pool(got, expected)


SYSTEM_TURN = {"from": "system", "value": " "}  # a system prompt may be blank; a user or assistant turn not
BULK_POOLS = {
    "sharegpt": (
        [
            {**ROWS[0], "score": 1, "meta": {"b": [1.5, 2]}},
            {"conversations": [SYSTEM_TURN, *ROWS[1]["conversations"] * 2], "score": 2.5, "id": "x"},
            {**ROWS[2], "meta": None, "tags": []},
            {**ROWS[3], "date": "2020-01-01"},  # a string Arrow would read as a timestamp: handed off
        ],
        FormatSpec(role_map={"bot": "assistant"}),
    ),
    "openai": (
        [
            {"messages": [{"role": "user", "content": "q\u00e9"}, {"role": "bot", "content": "a", "x": 1}]},
            {
                "messages": [
                    {"role": "system", "content": "s"},
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": 'a\n"\\\x01\x7f\u2028 \U0001f600'},
                ],
                "id": 7,
            },
        ],
        FormatSpec(role_map={"bot": "assistant"}),
    ),
    "alpaca": (
        [
            {"instruction": "i", "input": "", "response": "r", "sys": "s"},
            {"instruction": "i2", "input": "x", "response": "r2"},
        ],
        FormatSpec(system_field="sys"),
    ),
}


@pytest.mark.parametrize("layout", sorted(BULK_POOLS))
def test_bulk_jsonl_read_equals_the_row_by_row_read(tmp_path, monkeypatch, layout):
    rows, spec = BULK_POOLS[layout]
    path = write_jsonl(tmp_path / "p.jsonl", rows[:-1] if layout == "sharegpt" else rows)
    exact = _row_by_row(monkeypatch, path, spec)
    used = _bulk_used(monkeypatch)
    bulk = read_pool(path, spec)
    assert used == [True]
    _same_pool(bulk, exact)
    if layout == "sharegpt":  # with a date-like string the bulk reader hands the file over; same pool
        path = write_jsonl(tmp_path / "dated.jsonl", rows)
        assert read_pool(path, spec).table.equals(_row_by_row(monkeypatch, path, spec).table)
        assert used[-1] is False


SCHEMA_CHANGES = {
    # the first line's schema holds for the whole file: one parse against it
    "uniform": ([{"score": 1.5, "meta": {"a": 1}}, {"score": 2.5, "meta": {"a": 2}}], 1),
    # after the first line: a null turned string, a new nested key, a new column; an integer turned float. The
    # parse against the first line's schema fails, the whole file's is inferred and the file parsed against it.
    "typed further on": (
        [{"note": None, "meta": {"a": 1}}, {"note": "n", "meta": {"a": 2, "b": "x"}, "new": [1]}],
        3,
    ),
    "type changed": ([{"score": 1, "meta": {"a": 1}}, {"score": 2.5, "meta": {"a": 2}}], 3),
    # Arrow's inference misreads a list that opens with null ([null, true] as [true, false]): values are only
    # ever taken from a parse against a schema, the first line's or the whole file's
    "list opening with null": ([{"flags": [None, True]}, {"flags": [None, False]}], 1),
    "list opening with null further on": ([{}, {"flags": [None, True]}], 3),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_CHANGES))
def test_bulk_jsonl_parsed_against_a_schema_reads_what_the_row_by_row_read_reads(tmp_path, monkeypatch, case):
    import pyarrow.json as pa_json

    extras, parses = SCHEMA_CHANGES[case]
    rows = [{**ROWS[i], **extra} for i, extra in enumerate(extras)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path)
    monkeypatch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", len(json.dumps(rows[0])) + 1)  # the first line
    calls, read_json = [], pa_json.read_json

    def counted(source, **kwargs):
        calls.append(kwargs.get("parse_options"))
        return read_json(source, **kwargs)

    monkeypatch.setattr(pa_json, "read_json", counted)
    used = _bulk_used(monkeypatch)
    bulk = read_pool(path)
    assert len(calls) == 1 + parses  # the first line's schema, then the file
    assert used == [True] and calls[-1].explicit_schema is not None
    assert bulk.table.equals(exact.table) and bulk.table.schema == exact.table.schema
    assert bulk.table.column_names == exact.table.column_names == list(rows[1])


HANDED_OFF = {  # each after a valid line
    "unknown role": '{"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}\n',
    "blank answer": '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": " \\u3000"}]}\n',
    "no answer": '{"conversations": [{"from": "human", "value": "q"}]}\n',
    "no value": '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]}\n',
    "deep": '{"conversations": [], "x": ' + "[" * 20000 + "]" * 20000 + "}\n",  # nested too deep for Arrow
    "two on a line": json.dumps(ROWS[1]) + json.dumps(ROWS[2]) + "\n",
    "blank line": "\n",
    "big integer": '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], '
    '"n": 18446744073709551616}\n',
    "duplicate id": ROWS_LINE,
    "list of nulls": json.dumps({**ROWS[1], "x": [None, None]})
    + "\n",  # Arrow reads it into an invalid array
}
HANDED_OFF_FIRST = {  # files that open with it
    "null line": "null\n" + ROWS_LINE,  # Arrow's reader crashes on a first line `null`: never handed one
    "byte-order mark": "\ufeff" + ROWS_LINE,
    "no turn has a value": '{"conversations": [{"from": "human", "content": "q"}, {"from": "gpt", "content": "a"}]}\n',
    "turns with no field": '{"conversations": [{}]}\n',
}


@pytest.mark.parametrize("case", sorted(HANDED_OFF | HANDED_OFF_FIRST))
def test_bulk_jsonl_hands_anything_unusual_to_the_row_by_row_path(tmp_path, monkeypatch, case):
    path = tmp_path / "p.jsonl"
    path.write_text(HANDED_OFF_FIRST.get(case) or ROWS_LINE + HANDED_OFF[case], encoding="utf-8")
    _read_row_by_row(monkeypatch, path)


def test_bulk_scan_carries_lines_across_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "_SCAN_BYTES", 7)

    def scanned(text: str) -> int | None:
        path.write_text(text, encoding="utf-8")
        scan = pool_module._scanned(path, hashlib.sha256())
        return None if scan is None else scan.lines

    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    assert pool_module._scanned(path, hashlib.sha256()).lines == len(ROWS)
    # 1,200 openers on one line, read 7 at a time: a parse against a schema may have it, an inferring one not
    assert (
        scanned(ROWS_LINE + '{"x": ' + "[" * 600 + "]" * 600 + ', "y": ' + "[" * 600 + "]" * 600 + "}\n") == 2
    )
    assert not pool_module._nesting_fine(path)
    assert pool_module._nesting_fine(write_jsonl(tmp_path / "q.jsonl", ROWS))
    # every line opens with "{": not a blank line, a `null`, a space
    for text in (
        ROWS_LINE + "\n" + ROWS_LINE,
        ROWS_LINE + "null\n",
        " " + ROWS_LINE,
        ROWS_LINE + " " + ROWS_LINE,
    ):
        assert scanned(text) is None
    # and fits in one of Arrow's blocks (newline included), the last line too
    monkeypatch.setattr(pool_module, "_JSON_BLOCK_BYTES", len(ROWS_LINE))
    assert scanned(ROWS_LINE * 3 + ROWS_LINE.strip() + " ") == 4
    assert scanned(ROWS_LINE + ROWS_LINE.strip() + " \n" + ROWS_LINE) is None
    assert scanned(ROWS_LINE * 3 + ROWS_LINE.strip() + "  ") is None
    monkeypatch.undo()
    assert scanned(ROWS_LINE * 3 + ROWS_LINE.strip()) == 4  # no newline at the end
    digest = hashlib.sha256()
    scan = pool_module._scanned(path, digest)
    # each line's bytes, read 7 at a time: where the streamed read finds a row again
    width = len(ROWS_LINE)
    assert scan.lines == 4 and scan.longest == width
    assert scan.bounds().tolist() == [0, width, 2 * width, 3 * width, 4 * width - 1]
    reference = hashlib.sha256()
    pool_module._hash_path(path, reference)
    assert digest.hexdigest() == reference.hexdigest()


def test_bulk_read_scans_and_hashes_the_file_before_arrow_reads_it(tmp_path, monkeypatch):
    """The file is scanned and hashed a chunk at a time, in order (the fingerprint is the row-by-row read's), and
    only then read by Arrow, from its path: never pulled through Python, where a failing parse can abort the
    process. A line Arrow must not be given (here a blank one) keeps the file from Arrow altogether."""
    rows = [{**ROWS[i % len(ROWS)], "id": f"r{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path)
    monkeypatch.setattr(pool_module, "_SCAN_BYTES", 7)
    monkeypatch.setattr(pool_module, "_JSON_BLOCK_BYTES", 256)  # two or three lines a block
    monkeypatch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", 256)
    given = []
    real_read_json = pa_json.read_json
    monkeypatch.setattr(
        pa_json, "read_json", lambda source, **k: given.append(source) or real_read_json(source, **k)
    )
    used = _bulk_used(monkeypatch)
    bulk = read_pool(path)
    assert used == [True]
    assert isinstance(given[0], pa.BufferReader) and [Path(source) for source in given[1:]] == [path]
    assert bulk.table.equals(exact.table)
    assert (bulk.fingerprint, bulk.conversations_fingerprint) == (
        exact.fingerprint,
        exact.conversations_fingerprint,
    )
    path.write_text(path.read_text() + "\n" + json.dumps({**ROWS[0], "id": "after a blank line"}) + "\n")
    given.clear()
    assert len(read_pool(path)) == 41
    assert (
        used[-1] is False and len(given) == 1 and isinstance(given[0], pa.BufferReader)
    )  # the first lines only


def test_a_file_changed_between_its_scan_and_its_parse_is_read_row_by_row(tmp_path, monkeypatch):
    """The scan (and hash) and Arrow's parse read the file one after the other: when another program writes it
    in between, the hash and the table could be of two versions, so the row-by-row read reads it instead."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    real, changed = pool_module._parse_json, []

    def write_then_parse(source, schema=None):
        if isinstance(source, (str, Path)) and not changed:  # after the scan, before Arrow reads the file
            time.sleep(0.05)
            changed.append(write_jsonl(path, [*ROWS[:4], {**ROWS[4], "id": "new"}]))
        return real(source, schema)

    monkeypatch.setattr(pool_module, "_parse_json", write_then_parse)
    used = _bulk_used(monkeypatch)
    pool = read_pool(path)
    assert changed and used == [False] and pool.table.column("id").to_pylist()[-1] == "new"
    assert _same_pool(pool, _row_by_row(monkeypatch, path))


def test_bulk_read_never_gives_arrow_a_line_longer_than_its_block(tmp_path, monkeypatch):
    """A line Arrow's reader would read across three of its blocks can make pyarrow 21 abort the process (it
    raises "straddling object straddles two block boundaries", then `terminate` is called when other blocks were
    in flight): the scan stops the read before Arrow gets it, and the row-by-row path reads the file."""
    monkeypatch.setattr(pool_module, "_JSON_BLOCK_BYTES", 512)
    monkeypatch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", 512)
    rows = [{**ROWS[i % len(ROWS)], "id": f"r{i}", "x": [[1]]} for i in range(300)]
    rows[200]["conversations"] = [{"from": "human", "value": "long " * 400}, {"from": "gpt", "value": "a"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path)
    used = _bulk_used(monkeypatch)
    assert _same_pool(read_pool(path), exact) and used == [False]


def test_bulk_read_parses_deep_nesting_only_against_a_schema(tmp_path, monkeypatch):
    """Arrow's reader crashes on a line nested ~10,000 levels deep when it infers types. Against a schema it
    stops at the first value the schema does not hold (here a list where the schema has a number), so the scan
    that guards that parse needs no bracket count; the count keeps the line from the inferring parse that follows,
    and the row-by-row path says why the line cannot be read."""
    monkeypatch.setattr(pool_module, "_JSON_BLOCK_BYTES", 1 << 16)
    monkeypatch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", 512)
    lines = [json.dumps({**ROWS[i % len(ROWS)], "id": f"r{i}", "x": [[1]]}) + "\n" for i in range(300)]
    lines[200] = '{"id": "deep", "x": ' + "[" * 20_000 + "]" * 20_000 + "}\n"
    path = tmp_path / "p.jsonl"
    path.write_text("".join(lines))
    given = []
    real_read_json = pa_json.read_json
    with monkeypatch.context() as patch:
        patch.setattr(
            pa_json, "read_json", lambda source, **k: given.append(k) or real_read_json(source, **k)
        )
        with pytest.raises(DeitaHubError) as bulk:
            read_pool(path)
    assert [k.get("parse_options") is not None for k in given] == [
        False,
        True,
    ]  # the first lines', then a schema
    with pytest.raises(DeitaHubError) as exact:
        _row_by_row(monkeypatch, path)
    assert str(bulk.value) == str(exact.value)


def test_bulk_conversations_act_as_the_list_the_row_by_row_read_gives(tmp_path, monkeypatch):
    """A bulk read keeps conversations as Arrow columns (no Python dicts per turn until one is read): indexing,
    slices, iteration, response lengths, pickling and several sources must give what the list gives."""
    import pickle

    from deita_hub.conversations import response_length

    # Non-ASCII and an emoji (lengths are characters, not bytes); ids dropped, as rows repeat.
    rows = [{k: v for k, v in row.items() if k != "id"} for row in BULK_POOLS["openai"][0]] * 3
    spec = BULK_POOLS["openai"][1]
    paths = [write_jsonl(tmp_path / "a.jsonl", rows), write_jsonl(tmp_path / "b.jsonl", rows[:2])]
    exact = _row_by_row(monkeypatch, paths, spec)
    monkeypatch.undo()
    monkeypatch.setattr(pool_module, "_ITERATION_ROWS", 4)  # iteration crosses batch boundaries
    bulk = read_pool(paths, spec)
    conversations, expected = bulk.conversations, exact.conversations
    assert isinstance(conversations, pool_module.ArrowConversations) and isinstance(expected, list)
    assert len(conversations) == len(expected) == 8
    assert list(conversations) == expected and conversations == expected
    assert [conversations[i] for i in (0, 5, -1, -8)] == [expected[i] for i in (0, 5, -1, -8)]
    for part in (slice(2, 7), slice(None, None, 3), slice(6, 2), slice(-3, None)):
        assert conversations[part] == expected[part]
    with pytest.raises(IndexError):
        conversations[8]
    assert bulk.response_lengths.tolist() == [response_length(c) for c in expected]
    assert bulk.response_lengths.tolist() == exact.response_lengths.tolist()
    assert pickle.loads(pickle.dumps(conversations)) == expected
    # A source the row-by-row path reads (JSON, not JSONL) joins as a plain list, in order.
    mixed = [paths[0], tmp_path / "c.json"]
    mixed[1].write_text(json.dumps(rows[:1]))
    joined = read_pool(mixed, spec).conversations
    assert isinstance(joined, list) and joined == expected[:6] + expected[:1]


def _spelled(conversations) -> bytes:
    return b"".join(
        json.dumps(turns, ensure_ascii=False, sort_keys=True).encode() + b"\n" for turns in conversations
    )


def _arrow_spelled(conversations, *, sliced: bool = False) -> bytes:
    """`_fingerprint_lines` of conversations (optionally of contents that are a slice of a longer array)."""
    texts = [turn["content"] for turns in conversations for turn in turns]
    contents = (
        pa.array(['\n"x'] + texts + ["\\"], pa.string()).slice(1, len(texts))
        if sliced
        else pa.array(texts, pa.string())
    )
    codes = np.array(
        [CANONICAL_ROLES.index(turn["role"]) for turns in conversations for turn in turns], dtype=np.int8
    )
    lengths = np.array([len(turns) for turns in conversations])
    return bytes(pool_module._fingerprint_lines(contents, codes, lengths))


def test_arrow_spells_fingerprint_lines_as_json_dumps(monkeypatch):
    """The bulk read's conversations fingerprint spells each conversation as json.dumps does (ensure_ascii=False,
    keys sorted): every ASCII character, alone and next to others, characters json leaves as they are, one turn
    or several, in a slice of an array."""

    def one_turn(texts):
        return [[{"content": text, "role": "user"}] for text in texts]

    texts = [chr(c) for c in range(128)] + [
        "".join(map(chr, range(128))),
        'a\\"b\\\\n\n',
        "\u2028\U0001f600é\x7f",
        "",
    ]
    assert _arrow_spelled(one_turn(texts)) == _spelled(one_turn(texts))
    assert _arrow_spelled(one_turn(['"q"\n']), sliced=True) == _spelled(one_turn(['"q"\n']))
    assert _arrow_spelled(one_turn(["plain"])) == _spelled(one_turn(["plain"]))
    # Characters to escape at a content's ends, side by side, alone, in empty neighbours, beside multi-byte
    # ones, across the scan's slices; conversations of one to five turns and every role.
    monkeypatch.setattr(pool_module, "_ESCAPE_SCAN_BYTES", 7)
    rng = random.Random(0)
    alphabet = ["a", "\n", '"', "\\", "\x00", "\x1f", "\x7f", "é", "\U0001f600", "\t"]
    conversations = [
        [
            {
                "content": "".join(rng.choices(alphabet, k=rng.randrange(0, 9))),
                "role": rng.choice(CANONICAL_ROLES),
            }
            for _ in range(rng.randrange(1, 6))
        ]
        for _ in range(300)
    ] + one_turn(["\n", "", '"'])
    for sliced in (False, True):
        assert _arrow_spelled(conversations, sliced=sliced) == _spelled(conversations)


# --- Arrow sources (parquet, datasets) checked in bulk: the same Pool as row by row, or a hand-off to it ------


def _as_source(tmp_path, table: pa.Table, kind: str, name: str = "p") -> Path:
    """`table` written as a parquet file (several row groups) or a saved dataset (several record batches)."""
    import datasets

    if kind == "parquet":
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=2)
        return path
    path = tmp_path / name
    datasets.Dataset(table).save_to_disk(str(path), max_shard_size=1 << 30)
    return path


@pytest.mark.parametrize("kind", ["parquet", "dataset"])
@pytest.mark.parametrize("layout", sorted(BULK_POOLS))
def test_an_arrow_source_checked_in_bulk_equals_the_row_by_row_read(tmp_path, monkeypatch, kind, layout):
    """The table of a parquet file or a saved dataset is the same either way; the bulk checks take its
    conversations column-wise (and spell their fingerprint while reading) where the row-by-row read makes a dict
    per row."""
    rows, spec = BULK_POOLS[layout]
    table = _row_by_row(
        monkeypatch, write_jsonl(tmp_path / "p.jsonl", rows[:-1] if layout == "sharegpt" else rows), spec
    ).table
    path = _as_source(tmp_path, table, kind)
    exact = _row_by_row(monkeypatch, path, spec)
    used = _bulk_used(monkeypatch, "table_in_bulk")
    bulk = read_pool(path, spec)
    assert used == [True]
    _same_pool(bulk, exact)
    if layout != "alpaca":  # turns are kept as Arrow columns, their fingerprint taken as they are checked
        assert isinstance(bulk.conversations, pool_module.ArrowConversations)
        assert "conversations_fingerprint" in bulk.__dict__
    # Several sources: each checked in bulk, ids unique across them (row-by-row's message when not)
    both = [
        path,
        _as_source(tmp_path, table.drop_columns(["id"]) if "id" in table.column_names else table, kind, "q"),
    ]
    _same_pool(read_pool(both, spec), _row_by_row(monkeypatch, both, spec))
    assert used[-2:] == [True, True]
    if "id" in table.column_names:
        twice = [path, _as_source(tmp_path, table, kind, "again")]
        with pytest.raises(DeitaHubError) as exact_error:
            _row_by_row(monkeypatch, twice, spec)
        with pytest.raises(DeitaHubError) as bulk_error:
            read_pool(twice, spec)
        assert str(bulk_error.value) == str(exact_error.value) and "id" in str(bulk_error.value)


ARROW_HANDED_OFF = {  # a table the bulk checks do not take: the row-by-row read names the row, or reads it
    "unknown role": pa.table(
        {"conversations": [[{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]]}
    ),
    "blank answer": pa.table(
        {"conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": " "}]]}
    ),
    "null value": pa.table(
        {"conversations": [[{"from": "human", "value": "q"}, {"from": "gpt", "value": None}]]}
    ),
    "no turns": pa.table(
        {
            "conversations": pa.array(
                [[]], pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
            )
        }
    ),
    "duplicate id": pa.table({"id": ["a", "a"], "conversations": [ROWS[0]["conversations"]] * 2}),
    "user twice": pa.table(
        {"conversations": [[{"from": "human", "value": "q"}, {"from": "user", "value": "a"}]]}
    ),
    "large strings": pa.table(
        {
            "conversations": pa.array(
                [ROWS[0]["conversations"]],
                pa.list_(pa.struct([("from", pa.large_string()), ("value", pa.large_string())])),
            )
        }
    ),
    "large list": pa.table(
        {
            "conversations": pa.array(
                [ROWS[0]["conversations"]],
                pa.large_list(pa.struct([("from", pa.string()), ("value", pa.string())])),
            )
        }
    ),
    "content parts": pa.table(
        {
            "messages": [
                [
                    {"role": "user", "content": [{"type": "text", "text": "q"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a"}]},
                ]
            ]
        }
    ),
    "no layout": pa.table({"text": ["q"]}),
}


@pytest.mark.parametrize("case", sorted(ARROW_HANDED_OFF))
def test_an_arrow_source_the_bulk_checks_do_not_take_is_read_row_by_row(tmp_path, monkeypatch, case):
    path = tmp_path / "p.parquet"
    table = defect = ARROW_HANDED_OFF[case]
    if "conversations" in defect.column_names:  # after a valid row of the same types
        valid = pa.Table.from_pylist([ROWS[1]]).select(defect.column_names).cast(defect.schema)
        table = pa.concat_tables([valid, defect])
    pq.write_table(table, path)
    _read_row_by_row(monkeypatch, path, "table_in_bulk")


def test_an_arrow_table_of_sliced_chunks_is_checked_as_its_rows(monkeypatch):
    """A dataset's table may be chunks that are slices of longer arrays (a `select`ed or sharded dataset, batches
    of a memory-mapped file): the bulk checks read each chunk from its own offset."""
    from deita_hub.conversations import to_conversation

    spec = FormatSpec()
    whole = pa.Table.from_pylist(
        ROWS + [{"id": "r5", "conversations": [SYSTEM_TURN, *ROWS[1]["conversations"]]}]
    )
    table = pa.concat_tables([whole.slice(1, 3), whole.slice(4, 0), whole.slice(4)])
    assert [len(c) for c in table.column("conversations").chunks] == [3, 0, 2]

    def resolve(columns, name):
        return spec.resolve(columns), "tag"

    conversations, layout, tag, spelled = pool_module.table_in_bulk(table, "t", resolve, {}, only_source=True)
    expected = [to_conversation(row, spec.resolve(table.column_names)) for row in table.to_pylist()]
    assert conversations == expected and list(conversations) == expected
    assert spelled == pool_module.conversations_fingerprint(expected)
    assert conversations.response_lengths().tolist() == [
        sum(len(t["content"]) for t in c if t["role"] == "assistant") for c in expected
    ]


# --- the read memo: an unchanged large JSONL file is read again without its scan and checksums -----------------


@pytest.fixture
def memo_dir(monkeypatch, tmp_path):
    """A cache folder that keeps memos of any file, however small or recently written (by default: 64 MiB and
    more, written 2 s or more before the read)."""
    monkeypatch.setattr(pool_module, "_MEMO_MIN_BYTES", 0)
    monkeypatch.setattr(pool_module, "_MEMO_SETTLED_NS", 0)
    return tmp_path / "cache"


def _full_reads(monkeypatch) -> list:
    """The files read in full: scanned and hashed before Arrow parses them (what a memo spares)."""
    scanned = []
    real = pool_module._scanned
    monkeypatch.setattr(
        pool_module, "_scanned", lambda path, digest: scanned.append(path) or real(path, digest)
    )
    return scanned


def test_an_unchanged_file_is_read_again_from_its_memo(tmp_path, monkeypatch, memo_dir):
    rows, spec = BULK_POOLS["openai"]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path, spec)
    scanned = _full_reads(monkeypatch)
    first = read_pool(path, spec, cache_dir=memo_dir)
    again = read_pool(path, spec, cache_dir=memo_dir)
    assert scanned == [path] and len(list((memo_dir / "pool-reads").iterdir())) == 1
    assert _same_pool(first, exact) and _same_pool(again, exact)
    assert "conversations_fingerprint" in again.__dict__  # from the memo, not spelled again on first use
    # The same file read as another layout (a role map): its rows are checked and spelled afresh, not scanned.
    other = FormatSpec(role_map={"bot": "assistant", "system": "user"})
    with pytest.raises(DeitaHubError):
        _row_by_row(monkeypatch, path, other)  # a system turn read as a user turn breaks the alternation
    assert pytest.raises(DeitaHubError, read_pool, path, other, cache_dir=memo_dir)
    sharegpt = write_jsonl(tmp_path / "s.jsonl", ROWS)
    read_pool(sharegpt, cache_dir=memo_dir)
    typed = FormatSpec(role_map={"human": "user"})  # another layout tag, the same conversations
    assert _same_pool(
        read_pool(sharegpt, typed, cache_dir=memo_dir), _row_by_row(monkeypatch, sharegpt, typed)
    )
    assert scanned == [path, sharegpt]


def test_a_changed_file_is_never_read_from_its_memo(tmp_path, monkeypatch, memo_dir):
    """Same size, same mtime, other bytes: the ctime, which a write always moves, tells."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    before = read_pool(path, cache_dir=memo_dir)
    stat = path.stat()
    time.sleep(0.05)  # past the clock tick that stamped the first write
    path.write_text(path.read_text().replace("answer 3", "ANSWER 3"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    scanned = _full_reads(monkeypatch)
    after = read_pool(path, cache_dir=memo_dir)
    assert scanned == [path] and after.conversations[3][1]["content"] == "ANSWER 3"
    assert _same_pool(after, _row_by_row(monkeypatch, path))
    assert after.fingerprint != before.fingerprint


def test_a_file_written_moments_before_its_read_keeps_no_memo(tmp_path, monkeypatch):
    """A write in the clock tick of the read could go unseen by the ctime: such a file is read in full next time."""
    monkeypatch.setattr(pool_module, "_MEMO_MIN_BYTES", 0)
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    read_pool(path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_damaged_or_unwritable_memo_costs_time_not_results(tmp_path, monkeypatch, memo_dir):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    exact = read_pool(path, cache_dir=memo_dir)
    (kept,) = (memo_dir / "pool-reads").iterdir()
    kept.write_text('{"identity": ')
    scanned = _full_reads(monkeypatch)
    assert _same_pool(read_pool(path, cache_dir=memo_dir), exact) and scanned == [path]
    assert json.loads(kept.read_text())["lines"] == len(ROWS)  # kept again
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert _same_pool(read_pool(path, cache_dir=not_a_folder), exact)


def test_a_build_keeps_its_read_memo_in_its_cache(tmp_path, monkeypatch, memo_dir):
    from deita_hub.dataset import load_recipe_pool
    from deita_hub.recipes import load_recipe

    write_jsonl(tmp_path / "p.jsonl", ROWS)
    (tmp_path / "r.yaml").write_text(
        "name: t\npool: {sources: [p.jsonl]}\nconfigs: [{name: r, method: random, budget: 2}]\n"
    )
    monkeypatch.setenv("DEITA_HUB_CACHE", str(tmp_path / "elsewhere"))
    pool = load_recipe_pool(load_recipe(tmp_path / "r.yaml"), memo_dir)
    assert len(pool) == len(ROWS) and len(list((memo_dir / "pool-reads").iterdir())) == 1
    assert not (tmp_path / "elsewhere").exists()


def test_a_file_changed_while_its_memo_read_parses_it_is_read_in_full(tmp_path, monkeypatch, memo_dir):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    read_pool(path, cache_dir=memo_dir)
    real, changed = pool_module._parse_json, []

    def parse_then_write(source, schema=None):
        table = real(source, schema)
        if not changed:  # the memo's parse, then another program rewrites the file
            time.sleep(0.05)
            changed.append(write_jsonl(path, [*ROWS[:4], {**ROWS[4], "id": "new"}]))
        return table

    monkeypatch.setattr(pool_module, "_parse_json", parse_then_write)
    scanned = _full_reads(monkeypatch)
    pool = read_pool(path, cache_dir=memo_dir)
    assert changed and scanned == [path] and pool.table.column("id").to_pylist()[-1] == "new"
    assert _same_pool(pool, _row_by_row(monkeypatch, path))


# --- a large single source streamed: its turns stay in the file ----------------------------------------------------


@pytest.fixture
def streamed(monkeypatch):
    """Every single JSONL source streamed, in blocks of a line or two (a block grows to hold the longest line)."""
    monkeypatch.setattr(pool_module, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(pool_module, "_STREAM_BLOCK_BYTES", 64)


def _streams(pool) -> bool:
    return isinstance(pool.conversations, pool_module.StreamedConversations)


def _same_rows_taken(pool, exact, positions) -> bool:
    positions = np.asarray(positions, dtype=np.int64)
    expected = exact.table.take(pa.array(positions, type=pa.int64()))
    return pool.take(positions).equals(expected) and pool_module.pick(pool.conversations, positions) == [
        exact.conversations[int(p)] for p in positions
    ]


@pytest.mark.parametrize("layout", ["sharegpt", "openai"])
def test_a_streamed_read_equals_the_row_by_row_read(tmp_path, monkeypatch, streamed, layout):
    """Its columns but the turns held, the turns taken from the file for the rows asked for (in any order, repeats
    too) or all at once; the same fingerprints, response lengths and schema as the row-by-row read."""
    rows, spec = BULK_POOLS[layout]
    rows = rows[:-1] if layout == "sharegpt" else rows
    rows = [{**row, "id": f"r{k}-{i}"} for k in range(4) for i, row in enumerate(rows)]  # across many blocks
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path, spec)
    pool = read_pool(path, spec)
    assert _streams(pool)
    turns = "conversations" if layout == "sharegpt" else "messages"
    assert turns not in pool.held.column_names and pool.column_names == exact.table.column_names
    assert pool.column("id").equals(exact.table.column("id"))
    assert (pool.fingerprint, pool.conversations_fingerprint) == (
        exact.fingerprint,
        exact.conversations_fingerprint,
    )
    assert pool.response_lengths.tolist() == exact.response_lengths.tolist()
    last = len(rows) - 1
    for positions in ([], [3], [last, 0, 5, 5, 1], list(range(len(rows)))[::-1]):
        assert _same_rows_taken(pool, exact, positions)
    assert "_held" not in pool.conversations.__dict__  # nothing so far read every row's turns
    assert pool.table.equals(exact.table) and pool.table.schema == exact.table.schema
    assert pool.conversations == exact.conversations and pool.conversations[last] == exact.conversations[last]
    assert pool.conversations[1:3] == exact.conversations[1:3] and _same_rows_taken(pool, exact, [2, 0])


@pytest.mark.parametrize("case", sorted(SCHEMA_CHANGES))
def test_a_streamed_read_meeting_new_fields_streams_against_the_whole_files_schema(
    tmp_path, monkeypatch, streamed, memo_dir, case
):
    """A block Arrow cannot parse against the first lines' schema ends the stream: the whole file's schema is
    inferred (as the whole-file read infers it) and the file streamed again against it, which gives the row-by-row
    read's pool. The file is scanned and hashed once, and its memo keeps that schema: the next read streams once."""
    extras, parses = SCHEMA_CHANGES[case]
    rows = [{**ROWS[i], **extra} for i, extra in enumerate(extras)]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path)
    monkeypatch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", len(json.dumps(rows[0])) + 1)  # the first line
    scanned, streams, real_stream = _full_reads(monkeypatch), [], pool_module._stream
    monkeypatch.setattr(
        pool_module, "_stream", lambda *a, **k: streams.append(a[1].parsed) or real_stream(*a, **k)
    )
    pool = read_pool(path, cache_dir=memo_dir)
    assert scanned == [path] and _streams(pool) and len(streams) == (1 if parses == 1 else 2)
    assert _same_pool(pool, exact) and pool.table.schema == exact.table.schema
    assert _same_rows_taken(pool, exact, [1, 0])
    again = read_pool(path, cache_dir=memo_dir)
    # one stream, against the schema the first read ended with (not scanned: its memo has the lines)
    assert scanned == [path] and _streams(again) and len(streams) == (2 if parses == 1 else 3)
    assert streams[-1] == streams[-2] and _same_pool(again, exact)


@pytest.mark.parametrize("case", sorted(HANDED_OFF | HANDED_OFF_FIRST))
def test_a_streamed_read_hands_anything_unusual_to_the_row_by_row_path(tmp_path, monkeypatch, streamed, case):
    path = tmp_path / "p.jsonl"
    path.write_text(HANDED_OFF_FIRST.get(case) or ROWS_LINE + HANDED_OFF[case], encoding="utf-8")
    try:
        expected = _row_by_row(monkeypatch, path, on_invalid="skip")
    except Exception as exc:  # noqa: BLE001 - whatever the row-by-row path raises, the read raises too
        expected = exc
    try:
        got = read_pool(path, on_invalid="skip")
    except Exception as exc:  # noqa: BLE001
        got = exc
    if isinstance(expected, Exception):
        assert type(got) is type(expected) and str(got) == str(expected)
    else:
        assert not _streams(got) and got.table.equals(expected.table) and got.invalid == expected.invalid


def test_a_streamed_pool_whose_file_changes_says_so(tmp_path, monkeypatch, streamed):
    """The turns are read again from the file as it was read, or not at all: never rows of two versions."""
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    pool = read_pool(path)
    assert _streams(pool) and pool.take(np.array([1])).column("id").to_pylist() == ["r1"]
    time.sleep(0.05)
    write_jsonl(path, [*ROWS[:4], {**ROWS[4], "id": "new"}])
    for read in (lambda: pool.take(np.array([0])), lambda: pool.table, lambda: list(pool.conversations)):
        with pytest.raises(DeitaHubError, match=f"{path}.*changed.*run the command again"):
            read()
    path.unlink()
    with pytest.raises(DeitaHubError, match="changed or was removed"):
        pool.conversations.take(np.array([0]))


def test_a_streamed_read_from_its_memo_finds_its_lines_when_asked(tmp_path, monkeypatch, streamed, memo_dir):
    """Read again from its memo, a file is not scanned: its lines are found when rows are first taken. A line
    longer than a block makes the blocks longer (Arrow's reader may abort on a line across three blocks)."""
    rows = [*ROWS[:2], {**ROWS[2], "note": "x" * 500}, *ROWS[3:]]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    exact = _row_by_row(monkeypatch, path)
    blocks = []
    real_options = pa_json.ReadOptions
    monkeypatch.setattr(
        pa_json, "ReadOptions", lambda **k: blocks.append(k["block_size"]) or real_options(**k)
    )
    scanned = _full_reads(monkeypatch)
    first = read_pool(path, cache_dir=memo_dir)
    again = read_pool(path, cache_dir=memo_dir)
    assert scanned == [path] and _streams(first) and _streams(again)
    assert again.conversations.file.bounds is None and _same_rows_taken(again, exact, [4, 2, 0])
    assert again.conversations.file.bounds.tolist() == first.conversations.file.bounds.tolist()
    assert min(blocks) > len(json.dumps(rows[2]))
    assert _same_pool(first, exact) and _same_pool(again, exact)


def test_several_sources_or_a_small_file_are_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(pool_module, "_STREAM_MIN_BYTES", 2 * len(ROWS_LINE))
    small, large = write_jsonl(tmp_path / "a.jsonl", ROWS[:1]), write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    assert not _streams(read_pool(small)) and _streams(read_pool(large))
    both = read_pool([small, large])
    assert not _streams(both)
    assert list(both.conversations) == [*read_pool(small).conversations, *read_pool(large).conversations]
