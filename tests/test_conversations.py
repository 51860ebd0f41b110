"""The record contract: formats in -> canonical turns, and every malformed row named precisely."""

import json

import pytest

from deita_hub.conversations import FormatSpec, pairs, to_conversation, to_sharegpt
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.pool import read_pool

SHAREGPT = {
    "id": "a",
    "conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}],
}


def convert(record, **spec):
    return to_conversation(record, FormatSpec(**spec).resolve(record.keys()))


def test_sharegpt_round_trip_with_system_and_turns():
    record = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Q1"},
            {"from": "gpt", "value": "A1"},
            {"from": "human", "value": "Q2"},
            {"from": "gpt", "value": "A2"},
        ]
    }
    turns = convert(record)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user", "assistant"]
    assert to_sharegpt(turns) == record["conversations"]
    assert pairs(turns) == [("Q1", "A1"), ("Q2", "A2")]


def test_openai_messages():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    assert convert(record) == record["messages"]


def test_alpaca_with_input_and_response_mapping():
    record = {"instruction": "Add", "input": "1 and 2", "response": "3"}
    turns = convert(record)  # auto-detects GPTeacher's `response`
    assert turns == [{"role": "user", "content": "Add\n1 and 2"}, {"role": "assistant", "content": "3"}]
    assert convert({"instruction": "Hi", "input": "", "output": "Yo"})[0]["content"] == "Hi"
    assert (
        convert({"instruction": "Hi", "out": "Yo"}, format="alpaca", output_field="out")[1]["content"] == "Yo"
    )


def test_role_map_maps_tool_roles_explicitly():
    record = {
        "conversations": [
            {"from": "human", "value": "Q"},
            {"from": "function_call", "value": "{}"},
            {"from": "observation", "value": "42"},
            {"from": "gpt", "value": "A"},
        ]
    }
    with pytest.raises(InvalidRecordError, match="unknown role 'function_call'"):
        convert(record)
    turns = convert(record, role_map={"function_call": "assistant", "observation": "user"})
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]


def _turns(*roles):
    return {"conversations": [{"from": r, "value": f"text {i}"} for i, r in enumerate(roles)]}


MALFORMED = [
    ({"conversations": None}, "conversations", "missing"),
    ({"conversations": "hello"}, "conversations", "list of turns"),
    ({"conversations": []}, "conversations", "empty conversation"),
    ({"conversations": ["hi"]}, "conversations[0]", "expected an object"),
    ({"conversations": [{"value": "x"}]}, "conversations[0]", "missing 'from'"),
    ({"conversations": [{"from": "human"}]}, "conversations[0]", "missing 'value'"),
    ({"conversations": [{"from": 3, "value": "x"}]}, "conversations[0]", "must be a string"),
    (
        {"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "x"}]},
        "conversations[0].value",
        "expected a string",
    ),
    (_turns("bot", "gpt"), "conversations[0].from", "unknown role 'bot'"),
    (_turns("human"), "conversations[0]", "no assistant reply"),
    (_turns("gpt", "human"), "conversations[0]", "'user' was expected"),
    (_turns("human", "human", "gpt"), "conversations[1]", "'assistant' was expected"),
    (_turns("human", "gpt", "gpt"), "conversations[2]", "'user' was expected"),
    (_turns("human", "gpt", "human"), "conversations[2]", "no assistant reply"),
    (_turns("human", "system", "gpt"), "conversations[1]", "system turn may only come first"),
    (_turns("system"), "conversations", "no user/assistant turns"),
    (
        {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]},
        "conversations[0]",
        "empty user turn",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
        "conversations[1]",
        "empty assistant turn",
    ),
    ({"messages": [{"role": "human", "content": "q"}]}, "messages[0].role", "unknown role 'human'"),
    (
        {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "a"}]},
        "messages[0].content",
        "expected a string",
    ),
    ({"instruction": None, "output": "x"}, "instruction", "missing"),
    ({"instruction": "q", "output": None}, "output", "missing"),
    ({"instruction": ["q"], "output": "x"}, "instruction", "expected a string"),
    ({"instruction": "q", "input": 7, "output": "x"}, "input", "expected a string"),
]


@pytest.mark.parametrize(("record", "field", "reason"), MALFORMED)
def test_malformed_rows_name_field_and_reason(record, field, reason):
    with pytest.raises(InvalidRecordError) as info:
        convert(record)
    assert info.value.field == field
    assert reason in info.value.reason


def test_unknown_columns_and_missing_mapped_column():
    with pytest.raises(DeitaHubError, match="cannot tell the pool format"):
        FormatSpec().resolve(["text"])
    with pytest.raises(DeitaHubError, match="missing column"):
        FormatSpec(format="alpaca").resolve(["instruction"])
    with pytest.raises(DeitaHubError, match="unknown pool format"):
        FormatSpec(format="csv")
    with pytest.raises(DeitaHubError, match="'role_map' maps"):
        FormatSpec(role_map={"tool": "robot"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"conversations": [', "invalid JSON at line 1"),
        ('{"data": []}', "expected a JSON array"),
        ('"just a string"', "expected a JSON array"),
        ("[1, 2]", "row 0: expected an object"),
        (
            '[{"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},'
            ' {"id": "x", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]',
            "row 1, field 'id': a string where row 0 has a number; a column must hold one type",
        ),
        (
            '[{"n": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},'
            ' {"n": 9223372036854775808, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", '
            '"value": "a"}]}]',
            r"row 1, field 'n': an integer beyond the 64-bit range an Arrow table holds \(write it as a string\)",
        ),
    ],
)
def test_bad_json_files(tmp_path, content, message):
    path = tmp_path / "pool.json"
    path.write_text(content)
    with pytest.raises(DeitaHubError, match=message) as info:
        read_pool(path)
    assert str(path) in str(info.value)


def test_bad_jsonl_line_names_line_and_row(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n{not json}\n")
    with pytest.raises(InvalidRecordError, match="row 1: invalid JSON on line 2"):
        read_pool(path)
    pool = read_pool(path, on_invalid="skip")
    assert len(pool) == 1 and pool.invalid[0]["row"] == 1


def test_unsupported_and_missing_paths(tmp_path):
    (tmp_path / "pool.csv").write_text("a,b\n")
    with pytest.raises(DeitaHubError, match="unsupported pool file type"):
        read_pool(tmp_path / "pool.csv")
    with pytest.raises(DeitaHubError, match="does not exist"):
        read_pool(tmp_path / "nope.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DeitaHubError, match="not a readable parquet"):
        read_pool(tmp_path / "bad.parquet")
