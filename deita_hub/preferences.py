"""Preference pools (DPO data): rows of a prompt, a chosen reply and a rejected reply, read and validated.

A canonical preference pair is `prompt` (canonical turns, as in `deita_hub.conversations`: an optional system
turn, then user/assistant turns alternating, ending with a user turn), `chosen` and `rejected` (the two assistant
replies to that prompt). Three layouts are read, detected from the columns:

- `openai`: `chosen` and `rejected` are OpenAI message lists, either whole conversations (the prompt inside
  each, as in `HuggingFaceH4/ultrafeedback_binarized`, which also has a `prompt` string column) or the reply
  alone with the prompt in a `prompt` column (a string or a message list);
- `sharegpt`: LLaMA-Factory's DPO layout, `conversations` (ShareGPT turns ending with the human turn) with
  `chosen` and `rejected` each one `{"from": "gpt", "value": ...}` message.

A row is never trained on when its two replies are identical (nothing to prefer), when the prompt inside
`chosen` differs from the one inside `rejected` (or from the `prompt` column), or when a turn is empty: each is
an `InvalidRecordError` naming the file, the row and the field, or, with `on_invalid="skip"`, a skipped row
recorded with its reason in `Pool.invalid`, exactly as for SFT pools (`deita_hub.pool`).

The result is a `Pool` whose conversations are the prompt plus the chosen reply (what random selection,
response lengths and the dataset build see) and whose table keeps the original columns, plus the pairs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from deita_hub.conversations import (
    CANONICAL_ROLES,
    SHAREGPT_ROLES,
    FormatSpec,
    _turns_from_list,
    validate,
)
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.hub import is_repo_id
from deita_hub.pool import ON_INVALID, Pool, load_hf, read_rows

log = logging.getLogger(__name__)

PREFERENCE_COLUMNS = ("chosen", "rejected")
LAYOUTS = ("sharegpt", "openai")


@dataclass(frozen=True)
class PreferencePair:
    prompt: list[dict[str, str]]  # canonical turns ending with the user turn
    chosen: str  # the preferred assistant reply
    rejected: str  # the other assistant reply

    def chosen_conversation(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.chosen}]

    def rejected_conversation(self) -> list[dict[str, str]]:
        return [*self.prompt, {"role": "assistant", "content": self.rejected}]


@dataclass
class Preferences:
    pool: Pool  # conversations: prompt + chosen reply; table: the original columns of the valid rows
    pairs: list[PreferencePair]  # aligned with pool.conversations

    def __len__(self) -> int:
        return len(self.pairs)


def is_preference_columns(columns) -> bool:
    return all(name in columns for name in PREFERENCE_COLUMNS)


def resolve_layout(columns, format: str = "auto") -> str:
    """The layout of a preference pool from its columns (`format` as TrainConfig.dataset_format spells it)."""
    columns = set(columns)
    missing = [name for name in PREFERENCE_COLUMNS if name not in columns]
    if missing:
        raise DeitaHubError(
            f"not a preference pool: no column(s) {missing} (columns are {sorted(columns)}); DPO data needs "
            "'chosen' and 'rejected' (with 'prompt' or 'conversations' for the prompt, or whole conversations)"
        )
    if format == "auto":
        return "sharegpt" if "conversations" in columns else "openai"
    if format not in LAYOUTS:
        raise DeitaHubError(
            f"format '{format}' has no preference layout; use one of auto, {', '.join(LAYOUTS)}"
        )
    if format == "sharegpt" and "conversations" not in columns:
        raise DeitaHubError("sharegpt preference pool (LLaMA-Factory) is missing column 'conversations'")
    return format


def source_columns(source: str | Path, *, config: str | None, split: str, revision: str | None) -> list[str]:
    """The column names of one pool source, reading as little as the format allows (a schema, a first row).

    Used to tell a preference pool from an SFT pool before reading it; a JSON array must be parsed whole.
    """
    import pyarrow.parquet as pq

    local = Path(source)
    if local.is_file():
        suffix = local.suffix.lower()
        if suffix == ".parquet":
            return pq.read_schema(local).names
        if suffix == ".jsonl":
            with open(local, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        try:
                            row = json.loads(line)
                        except json.JSONDecodeError:
                            return []  # the reader reports it with its line number
                        return list(row) if isinstance(row, dict) else []
            return []
        if suffix == ".json":
            try:
                rows = json.loads(local.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                return []
            return (
                list(dict.fromkeys(k for r in rows if isinstance(r, dict) for k in r))
                if isinstance(rows, list)
                else []
            )
        return []
    if local.is_dir() or is_repo_id(str(source)):
        dataset = load_hf(str(source), config=config, split=split, revision=revision, local=local.is_dir())
        return list(dataset.column_names)
    return []


def is_preference_source(sources, *, config: str | None = None, split: str = "train", revision=None) -> bool:
    if isinstance(sources, str | Path):
        sources = [sources]
    return bool(sources) and is_preference_columns(
        source_columns(sources[0], config=config, split=split, revision=revision)
    )


# --- one row ---------------------------------------------------------------------------------------------------


def _messages(value: Any, field_name: str, layout: str) -> list[dict[str, str]]:
    """A message list (or one message object) in the layout's keys -> canonical turns."""
    if isinstance(value, Mapping):
        value = [value]
    if layout == "sharegpt":
        return _turns_from_list(value, field_name, "from", "value", SHAREGPT_ROLES, {})
    known = {role: role for role in CANONICAL_ROLES}
    return _turns_from_list(value, field_name, "role", "content", known, {})


def _split_side(turns: list[dict[str, str]], field_name: str) -> tuple[list[dict[str, str]] | None, str]:
    """(prompt inside the side or None, the reply) of a `chosen`/`rejected` value."""
    users = [i for i, turn in enumerate(turns) if turn["role"] == "user"]
    prompt = turns[: users[-1] + 1] if users else None
    reply = turns[users[-1] + 1 :] if users else turns
    if len(reply) != 1 or reply[0]["role"] != "assistant":
        roles = [turn["role"] for turn in reply]
        raise InvalidRecordError(
            f"expected one assistant reply after the prompt, got {roles or 'none'}", field=field_name
        )
    if not reply[0]["content"].strip():
        raise InvalidRecordError("empty assistant reply", field=f"{field_name}[{len(turns) - 1}]")
    return prompt, reply[0]["content"]


def to_pair(record: Mapping[str, Any], layout: str) -> PreferencePair:
    """One preference row -> a validated pair; raises InvalidRecordError naming the field."""
    if not isinstance(record, Mapping):
        raise InvalidRecordError(f"expected an object, got {type(record).__name__}")
    for name in PREFERENCE_COLUMNS:
        if record.get(name) is None:
            raise InvalidRecordError("missing (null)", field=name)
    chosen_prompt, chosen = _split_side(_messages(record["chosen"], "chosen", layout), "chosen")
    rejected_prompt, rejected = _split_side(_messages(record["rejected"], "rejected", layout), "rejected")
    prompt_field = "conversations" if layout == "sharegpt" else "prompt"
    given = record.get(prompt_field)
    if isinstance(given, str):
        given = [{"role": "user", "content": given}]
    elif given is not None:
        given = _messages(given, prompt_field, layout)
    if chosen_prompt is not None and rejected_prompt is not None and chosen_prompt != rejected_prompt:
        raise InvalidRecordError(
            f"the prompt inside 'rejected' differs from the one inside 'chosen' (turn {_first_difference(chosen_prompt, rejected_prompt)})",
            field="rejected",
        )
    inside = chosen_prompt or rejected_prompt
    if given is not None and inside is not None:
        # UltraFeedback's `prompt` is the last user message only; a message-list prompt must match in full.
        same = given == inside if len(given) > 1 or given[0]["role"] != "user" else given[-1] == inside[-1]
        if not same:
            raise InvalidRecordError(
                f"differs from the prompt inside 'chosen'/'rejected' (turn {_first_difference(given, inside)})",
                field=prompt_field,
            )
    prompt = inside if inside is not None else given
    if prompt is None:
        raise InvalidRecordError(
            "no prompt: give a 'prompt' column or whole conversations in 'chosen' and 'rejected'",
            field=prompt_field,
        )
    if (
        chosen_prompt is None
        and rejected_prompt is not None
        or chosen_prompt is not None
        and rejected_prompt is None
    ):
        raise InvalidRecordError(
            "one side holds the whole conversation and the other only the reply; give both the same way",
            field="rejected",
        )
    if chosen == rejected:
        raise InvalidRecordError("identical to 'chosen': no preference to learn from", field="rejected")
    # The canonical shape (alternation, empty turns) of the prompt, checked with the chosen reply after it.
    source_field = prompt_field if given is not None and inside is None else "chosen"
    validate([*prompt, {"role": "assistant", "content": chosen}], source_field)
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def _first_difference(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


# --- a pool ----------------------------------------------------------------------------------------------------


def read_preferences(
    sources: str | Path | Sequence[str | Path],
    format: str = "auto",
    *,
    on_invalid: str = "error",
    config: str | None = None,
    split: str = "train",
    revision: str | None = None,
) -> Preferences:
    """Read one or more preference sources (concatenated) with the pool reader; validate every row.

    `on_invalid="error"` raises on the first bad row (file, row, field, reason); `"skip"` drops bad rows and
    records them in `pool.invalid`, as `deita_hub.pool.read_pool` does.
    """
    if on_invalid not in ON_INVALID:
        raise DeitaHubError(f"on_invalid must be one of {ON_INVALID}, got '{on_invalid}'")
    if isinstance(sources, str | Path):
        sources = [sources]
    if not sources:
        raise DeitaHubError("no preference pool given")

    def resolve(columns, name: str):
        try:
            source_layout = resolve_layout(columns, format)
        except DeitaHubError as exc:
            raise DeitaHubError(f"{name}: {exc}") from None
        return source_layout, f"preferences:{source_layout}"

    read = read_rows(
        sources,
        resolve=resolve,
        convert=lambda record, source_layout, row, name: to_pair(record, source_layout),
        on_invalid=on_invalid,
        config=config,
        split=split,
        revision=revision,
    )
    tables, pairs, rows, invalid = read.tables, read.items, read.rows, read.invalid
    layout, offset, fingerprint = read.resolved, read.num_source_rows, read.fingerprint
    if not pairs:
        raise DeitaHubError(
            f"preference pool {', '.join(map(str, sources))} has no valid rows ({len(invalid)} invalid)"
        )
    if invalid:
        log.warning("skipped %d invalid preference row(s) of %d", len(invalid), offset)
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="permissive")
    pool = Pool(
        source=", ".join(map(str, sources)),
        held=table,
        conversations=[pair.chosen_conversation() for pair in pairs],
        rows=np.asarray(rows, dtype=np.int64),
        spec=FormatSpec(format=layout),
        fingerprint="sha256:" + fingerprint.hexdigest(),
        num_source_rows=offset,
        invalid=invalid,
    )
    return Preferences(pool=pool, pairs=pairs)
