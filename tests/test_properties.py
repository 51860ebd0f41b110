"""Property-based tests: whatever bytes or JSON a user feeds the pool reader or the config loaders, the answer is
a value or a `DeitaHubError` (one line at the CLI), never another exception, and nothing is written.

Example counts stay small (2 CI cores): each property runs in a few seconds. The README's Reliability table
counts `EXAMPLES` per property and parametrization (`tests/test_reliability.py` checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deita_hub.config import load, read_mapping
from deita_hub.errors import DeitaHubError
from deita_hub.pool import read_pool
from deita_hub.recipes import load_recipe
from deita_hub.selection import SelectionConfig
from deita_hub.training.config import load_config

# Per property, the examples hypothesis draws: the README's Reliability table counts them.
EXAMPLES = 60
# Function-scoped tmp_path is reused across a property's examples: each example writes into a fresh folder of
# its own below it, so "nothing written" is checked per example.
SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
# Rows that look like what pools hold, so the reader gets past "not an object" and into the fields.
conversation_keys = st.sampled_from(
    ["conversations", "messages", "instruction", "input", "output", "id", "from", "value", "role", "content"]
)
row_like = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(conversation_keys, children, max_size=4)
    ),
    max_leaves=16,
)


class Folder:
    """A fresh folder per example, and what it held before the call, to check that nothing was written."""

    def __init__(self, root: Path):
        self.path = root / f"ex-{os.urandom(6).hex()}"
        self.path.mkdir()

    def files(self) -> set[str]:
        return {str(p.relative_to(self.path)) for p in self.path.rglob("*")}


def _call_is_clean(folder: Folder, call) -> None:
    before = folder.files()
    try:
        call()
    except DeitaHubError as exc:
        assert "\n" not in str(exc).strip(), f"a multi-line error: {exc}"
    assert folder.files() == before, "the reader wrote something"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@SETTINGS
@given(data=st.binary(max_size=300))
def test_pool_reader_on_arbitrary_bytes(tmp_path, suffix, data):
    folder = Folder(tmp_path)
    path = folder.path / f"pool{suffix}"
    path.write_bytes(data)
    _call_is_clean(folder, lambda: read_pool(path))
    _call_is_clean(folder, lambda: read_pool(path, on_invalid="skip"))


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@SETTINGS
@given(rows=st.lists(row_like, max_size=5) | json_values)
# Found at the floors: pyarrow 21 could not cast the list of nulls Arrow's JSON reader inferred.
@example(rows={"": [None, None]})
# Found in CI: turns with no field at all (the bulk read looked a missing role/content type up as None).
@example(rows=[{"conversations": [{}]}])
# Found with more examples: Arrow's JSON reader reads a list of nulls after a row without it into an invalid array.
@example(rows=[{"output": None}, {"instruction": [None, None]}])
def test_pool_reader_on_arbitrary_json(tmp_path, suffix, rows):
    folder = Folder(tmp_path)
    path = folder.path / f"pool{suffix}"
    if suffix == ".jsonl" and isinstance(rows, list):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        path.write_text(json.dumps(rows))
    _call_is_clean(folder, lambda: read_pool(path))
    _call_is_clean(folder, lambda: read_pool(path, on_invalid="skip"))


TURNS = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
pool_rows = st.lists(
    st.fixed_dictionaries(
        {"conversations": st.just(TURNS)},
        optional={key: json_values for key in ("score", "meta", "note", "tags")},
    ),
    min_size=2,
    max_size=5,
)


def _read_or_error(path, **kwargs):
    try:
        pool = read_pool(path, **kwargs)
    except DeitaHubError as exc:
        return str(exc)
    return pool.table, pool.table.schema, pool.conversations, pool.conversations_fingerprint, pool.invalid


def _after_a_plain_row(**fields) -> list[dict]:
    return [{"conversations": TURNS}, {"conversations": TURNS, **fields}]


@SETTINGS
@given(rows=pool_rows)
# Found by this property: Arrow's inference misread [null, false] as [false, false]; 2**63 raised OverflowError
# from the row-by-row read; Arrow read 2**53 + 1 beside a float as a rounded float where Python keeps it exact.
@example(rows=_after_a_plain_row(score=[None, False]))
@example(rows=_after_a_plain_row(score=2**63))
@example(rows=_after_a_plain_row(score=[2**53 + 1, 0.0]))
def test_bulk_read_against_the_first_lines_schema_equals_the_row_by_row_read(tmp_path, rows):
    """Whatever the later rows do to the first row's types, the bulk JSONL read parsed against the first line's
    schema gives the pool (or the error) the row-by-row read gives: read whole, and streamed a line or two a block
    (the turns then read again from the file)."""
    import deita_hub.pool as pool_module

    folder = Folder(tmp_path)
    path = folder.path / "pool.jsonl"
    lines = [json.dumps(row) + "\n" for row in rows]
    path.write_text("".join(lines))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pool_module, "fast_jsonl", lambda *a, **k: None)
        expected = _read_or_error(path)
    for stream_from in (None, 0):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pool_module, "_SCHEMA_PREFIX_BYTES", len(lines[0].encode()))
            if stream_from is not None:
                patch.setattr(pool_module, "_STREAM_MIN_BYTES", stream_from)
                patch.setattr(pool_module, "_STREAM_BLOCK_BYTES", 64)
            got = _read_or_error(path)
        if isinstance(expected, str):
            assert got == expected
        else:
            assert got[0].equals(expected[0]) and got[1] == expected[1] and got[2] == expected[2]


# Pools as datasets hold them: valid rows (user/assistant pairs, a system prompt or not, text that json escapes,
# ids or not), and at most one defect in one row, so that a defect the bulk checks missed would be read as valid.
DEFECTS = [
    "role swapped",
    "role unknown",
    "role null",
    "text blank",
    "text null",
    "no answer",
    "no turns",
    "id taken",
]


@st.composite
def arrow_rows(draw) -> list[dict]:
    text = st.text(min_size=1, max_size=6).filter(str.strip)
    rows = []
    for i in range(draw(st.integers(1, 5))):
        turns = [{"from": "system", "value": draw(text | st.just(" "))}] if draw(st.booleans()) else []
        for _ in range(draw(st.integers(1, 2))):
            turns.append({"from": draw(st.sampled_from(["human", "user"])), "value": draw(text)})
            turns.append({"from": draw(st.sampled_from(["gpt", "assistant"])), "value": draw(text)})
        row = {"conversations": turns, **({"id": f"r{i}"} if draw(st.booleans()) else {})}
        rows.append(
            {**row, "score": draw(st.floats(allow_nan=False) | st.none())} if draw(st.booleans()) else row
        )
    defect = draw(st.sampled_from([None, *DEFECTS]))
    row = rows[draw(st.integers(0, len(rows) - 1))]
    turns = row["conversations"]
    turn = turns[draw(st.integers(0, len(turns) - 1))]
    if defect and defect.startswith("role"):
        turn["from"] = {"role swapped": "gpt" if turn["from"] in ("human", "user") else "human"}.get(
            defect, "bot" if defect == "role unknown" else None
        )
    elif defect and defect.startswith("text"):
        turn["value"] = " \u3000" if defect == "text blank" else None
    elif defect == "no answer":
        turns.pop()
    elif defect == "no turns":
        turns.clear()
    elif defect == "id taken":
        row["id"] = rows[0].get("id", "r0")
        rows[0]["id"] = row["id"]
    return rows


@SETTINGS
@given(rows=arrow_rows(), row_group=st.integers(1, 4))
def test_an_arrow_source_read_in_bulk_equals_the_row_by_row_read(tmp_path, rows, row_group):
    """Whatever conversations a parquet file holds (and however its row groups cut them), checking its table in
    bulk gives the pool (or the error) the row-by-row read gives: the same table, conversations, fingerprints
    and skipped rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import deita_hub.pool as pool_module

    folder = Folder(tmp_path)
    path = folder.path / "pool.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group)
    for on_invalid in ("error", "skip"):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(pool_module, "table_in_bulk", lambda *a, **k: None)
            expected = _read_or_error(path, on_invalid=on_invalid)
        got = _read_or_error(path, on_invalid=on_invalid)
        if isinstance(expected, str):
            assert got == expected
        else:
            assert got[0].equals(expected[0]) and got[1] == expected[1] and got[2] == expected[2]
            assert got[3:] == expected[3:]


@SETTINGS
@given(text=st.text(max_size=200) | st.binary(max_size=200))
def test_read_mapping_on_arbitrary_text(tmp_path, text):
    folder = Folder(tmp_path)
    path = folder.path / "config.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    _call_is_clean(folder, lambda: read_mapping(path, "config"))


recipe_sections = st.fixed_dictionaries(
    {},
    optional={
        "name": json_values,
        "pool": st.dictionaries(
            st.sampled_from(["sources", "format", "on_invalid", "generate", "rows"]), json_values
        ),
        "embedding": st.dictionaries(
            st.sampled_from(["path", "method", "batch_size", "max_length"]), json_values
        ),
        "selection": st.dictionaries(st.sampled_from(["max_similarity", "method", "budget"]), json_values),
        "configs": st.lists(
            st.dictionaries(st.sampled_from(["name", "method", "budget", "default", "seed"]), json_values),
            max_size=3,
        ),
        "scores": json_values,
        "card": json_values,
    },
)


@SETTINGS
@given(data=recipe_sections | json_values)
def test_recipe_loader_on_arbitrary_yaml(tmp_path, data):
    folder = Folder(tmp_path)
    path = folder.path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    _call_is_clean(folder, lambda: load_recipe(path))


train_keys = st.sampled_from(
    [
        "model",
        "method",
        "dataset",
        "output_dir",
        "learning_rate",
        "max_steps",
        "lora",
        "push",
        "max_seq_length",
    ]
)


@SETTINGS
@given(data=st.dictionaries(train_keys | st.text(max_size=8), json_values, max_size=5) | json_values)
def test_training_config_loader_on_arbitrary_yaml(tmp_path, data):
    folder = Folder(tmp_path)
    path = folder.path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    _call_is_clean(folder, lambda: load_config(path))


@SETTINGS
@given(
    data=st.dictionaries(
        st.sampled_from([f.name for f in SelectionConfig.__dataclass_fields__.values()])
        | st.text(max_size=6),
        json_values,
        max_size=5,
    )
    | json_values
)
def test_config_load_on_arbitrary_mappings(tmp_path, data):
    folder = Folder(tmp_path)
    _call_is_clean(folder, lambda: load(SelectionConfig, data, source="recipe.yaml", section="selection"))
