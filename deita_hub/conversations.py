"""The one record contract: ShareGPT, OpenAI messages and Alpaca rows -> canonical turns.

A canonical conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}` dicts: an optional
system turn first, then user/assistant turns alternating, starting with a user turn and ending with an assistant
turn. Deita scores a conversation per (user, assistant) pair taken by position, so anything that would make that
pairing ambiguous (two user turns in a row, a trailing question without an answer, an unknown role) is an error,
never a silent re-pairing. Unknown roles can be mapped explicitly with `role_map` (e.g. LLaMA-Factory's
`function_call` -> assistant, `observation` -> user).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from deita_hub.config import Problems
from deita_hub.errors import DeitaHubError, InvalidRecordError

Format = Literal["auto", "sharegpt", "openai", "alpaca"]
FORMATS: tuple[str, ...] = ("auto", "sharegpt", "openai", "alpaca")
CANONICAL_ROLES = ("system", "user", "assistant")

# ShareGPT's own role names (Deita's pools use human/gpt); the canonical names are accepted too.
SHAREGPT_ROLES = {
    "human": "user",
    "gpt": "assistant",
    "system": "system",
    "user": "user",
    "assistant": "assistant",
}
TO_SHAREGPT = {"user": "human", "assistant": "gpt", "system": "system"}


@dataclass(frozen=True)
class FormatSpec:
    """How pool rows map to conversations. YAML recipes and CLI flags mirror these fields."""

    format: str = field(
        default="auto",
        metadata={
            "help": "pool format; auto detects it from the columns",
            "choices": FORMATS,
            "flag": "--format",
        },
    )
    conversations_field: str = field(default="conversations", metadata={"help": "ShareGPT turns column"})
    messages_field: str = field(default="messages", metadata={"help": "OpenAI messages column"})
    instruction_field: str = field(default="instruction", metadata={"help": "Alpaca instruction column"})
    input_field: str = field(default="input", metadata={"help": "Alpaca input column (optional per row)"})
    output_field: str = field(
        default="output", metadata={"help": "Alpaca response column (GPTeacher calls it 'response')"}
    )
    system_field: str | None = field(
        default=None, metadata={"help": "Alpaca/ShareGPT column holding a system prompt"}
    )
    role_map: Mapping[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "map an extra role name to system, user or assistant, e.g. function_call=assistant",
            "flag": "--role-map",
            "metavar": "ROLE=CANONICAL",
        },
    )

    def __post_init__(self):
        problems = Problems()
        if self.format not in FORMATS:
            problems.add(
                "format", f"unknown pool format '{self.format}'; expected one of {', '.join(FORMATS)}"
            )
        for name, role in self.role_map.items():
            if role not in CANONICAL_ROLES:
                problems.add(
                    "role_map",
                    f"maps '{name}' to '{role}'; targets must be one of {', '.join(CANONICAL_ROLES)}",
                )
        problems.raise_if_any()

    def resolve(self, columns: Iterable[str]) -> FormatSpec:
        """Pick the format from the columns when `auto`; fail naming what was expected."""
        columns = set(columns)
        fmt = self.format
        if fmt == "auto":
            if self.conversations_field in columns:
                fmt = "sharegpt"
            elif self.messages_field in columns:
                fmt = "openai"
            elif self.instruction_field in columns:
                fmt = "alpaca"
            else:
                raise DeitaHubError(
                    f"cannot tell the pool format from its columns {sorted(columns)}: expected "
                    f"'{self.conversations_field}' (ShareGPT), '{self.messages_field}' (OpenAI) or "
                    f"'{self.instruction_field}' (Alpaca); set the format and field names explicitly"
                )
        spec = FormatSpec(**{**self.__dict__, "format": fmt})
        required = {
            "sharegpt": [spec.conversations_field],
            "openai": [spec.messages_field],
            "alpaca": [spec.instruction_field, spec.output_field],
        }[fmt]
        if (
            fmt == "alpaca"
            and spec.output_field not in columns
            and self.format == "auto"
            and "response" in columns
        ):
            # GPTeacher and others call the answer 'response'; auto-detection records the choice in provenance.
            spec = FormatSpec(**{**spec.__dict__, "output_field": "response"})
            required = [spec.instruction_field, "response"]
        missing = [name for name in required if name not in columns]
        if missing:
            raise DeitaHubError(
                f"{fmt} pool is missing column(s) {missing}; columns are {sorted(columns)} "
                "(map field names in the recipe's pool.format section or with --output-field/--instruction-field ... options)"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "role_map": dict(self.role_map)}


def _text(value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecordError(f"expected a string, got {type(value).__name__}", field=field_name)
    return value


def _turns_from_list(
    turns: Any,
    field_name: str,
    role_key: str,
    content_key: str,
    known: Mapping[str, str],
    role_map: Mapping[str, str],
) -> list[dict[str, str]]:
    if turns is None:
        raise InvalidRecordError("missing (null)", field=field_name)
    if not isinstance(turns, list | tuple):
        raise InvalidRecordError(f"expected a list of turns, got {type(turns).__name__}", field=field_name)
    if not turns:
        raise InvalidRecordError("empty conversation", field=field_name)
    out = []
    for i, turn in enumerate(turns):
        where = f"{field_name}[{i}]"
        if not isinstance(turn, Mapping):
            raise InvalidRecordError(f"expected an object, got {type(turn).__name__}", field=where)
        if role_key not in turn or turn[role_key] is None:
            raise InvalidRecordError(f"missing '{role_key}'", field=where)
        if content_key not in turn:
            raise InvalidRecordError(f"missing '{content_key}'", field=where)
        raw_role = turn[role_key]
        if not isinstance(raw_role, str):
            raise InvalidRecordError(
                f"'{role_key}' must be a string, got {type(raw_role).__name__}", field=where
            )
        role = role_map.get(raw_role) or known.get(raw_role)
        if role is None:
            raise InvalidRecordError(
                f"unknown role '{raw_role}' (known: {', '.join(sorted(known))}); map it explicitly with "
                f"role_map (e.g. --role-map {raw_role}=assistant) or drop such rows with --skip-invalid",
                field=f"{where}.{role_key}",
            )
        out.append({"role": role, "content": _text(turn[content_key], f"{where}.{content_key}")})
    return out


def validate(turns: list[dict[str, str]], field_name: str) -> list[dict[str, str]]:
    """Check the canonical shape that Deita's per-position pairing needs; return the turns."""
    body = turns
    if turns and turns[0]["role"] == "system":
        body = turns[1:]
    for i, turn in enumerate(turns):
        if turn["role"] == "system" and i != 0:
            raise InvalidRecordError("a system turn may only come first", field=f"{field_name}[{i}]")
    if not body:
        raise InvalidRecordError("no user/assistant turns", field=field_name)
    offset = len(turns) - len(body)
    for j, turn in enumerate(body):
        expected = "user" if j % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise InvalidRecordError(
                f"turn is '{turn['role']}' where '{expected}' was expected (turns must alternate user/assistant, "
                "starting with user)",
                field=f"{field_name}[{j + offset}]",
            )
        if not turn["content"].strip():
            raise InvalidRecordError(f"empty {turn['role']} turn", field=f"{field_name}[{j + offset}]")
    if body[-1]["role"] != "assistant":
        raise InvalidRecordError(
            "the last user turn has no assistant reply (Deita pairs turns by position)",
            field=f"{field_name}[{len(turns) - 1}]",
        )
    return turns


def to_conversation(record: Mapping[str, Any], spec: FormatSpec) -> list[dict[str, str]]:
    """One pool row -> canonical turns. `spec` must be resolved. Raises InvalidRecordError naming the field."""
    if not isinstance(record, Mapping):
        raise InvalidRecordError(f"expected an object, got {type(record).__name__}")
    system = None
    if spec.system_field is not None and record.get(spec.system_field) not in (None, ""):
        system = _text(record[spec.system_field], spec.system_field)
    if spec.format == "sharegpt":
        name = spec.conversations_field
        turns = _turns_from_list(record.get(name), name, "from", "value", SHAREGPT_ROLES, spec.role_map)
    elif spec.format == "openai":
        name = spec.messages_field
        known = {role: role for role in CANONICAL_ROLES}
        turns = _turns_from_list(record.get(name), name, "role", "content", known, spec.role_map)
    elif spec.format == "alpaca":
        name = spec.instruction_field
        if record.get(name) is None:
            raise InvalidRecordError("missing (null)", field=name)
        instruction = _text(record[name], name)
        extra = record.get(spec.input_field)
        if extra not in (None, ""):
            instruction = f"{instruction}\n{_text(extra, spec.input_field)}"
        if record.get(spec.output_field) is None:
            raise InvalidRecordError("missing (null)", field=spec.output_field)
        output = _text(record[spec.output_field], spec.output_field)
        turns = [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]
    else:  # pragma: no cover - resolve() guarantees a concrete format
        raise DeitaHubError(f"unresolved format '{spec.format}'")
    if system is not None:
        if turns[0]["role"] == "system":
            raise InvalidRecordError(
                "system prompt given twice (column and first turn)", field=spec.system_field
            )
        turns = [{"role": "system", "content": system}, *turns]
    return validate(turns, name)


def pairs(turns: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(instruction, response) pairs by position, as Deita scores them; the system turn is not part of any pair."""
    body = [t for t in turns if t["role"] != "system"]
    return [(body[i]["content"], body[i + 1]["content"]) for i in range(0, len(body), 2)]


def to_sharegpt(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """Canonical turns -> Deita's ShareGPT turns (`from`: system/human/gpt, `value`)."""
    return [{"from": TO_SHAREGPT[t["role"]], "value": t["content"]} for t in turns]


def response_length(turns: list[dict[str, str]]) -> int:
    """Characters of assistant text: the 'longest response' baseline's key."""
    return sum(len(t["content"]) for t in turns if t["role"] == "assistant")
