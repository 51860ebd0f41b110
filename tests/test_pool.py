"""Pool reading: every file type and the real shared pools, fingerprints, skipped rows."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_hub.conversations import FormatSpec
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


def test_columns_missing_from_the_first_rows_are_kept(tmp_path):
    rows = [dict(ROWS[0]), {**ROWS[1], "quality_scores": [4.5]}]
    pool = read_pool(write_jsonl(tmp_path / "p.jsonl", rows))
    assert pool.table.column("quality_scores").to_pylist() == [None, [4.5]]
