"""Vicuna v1.1, the template Deita trains and embeds with, as a Jinja chat template and as plain Python.

FastChat's vicuna_v1.1: `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`, generation prompt
ending in `ASSISTANT:` (no trailing space). The Jinja template starts with `bos_token` because
`apply_chat_template(tokenize=True)` adds no special tokens of its own; the Python renderer returns the text
without BOS (callers tokenize it with `add_special_tokens=True`, which prepends BOS once).

`{% generation %}` markers surround each assistant reply and its EOS so that TRL/transformers can build the
assistant-only loss mask (`return_assistant_tokens_mask`).
"""

from __future__ import annotations

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TEMPLATE_NAME = "vicuna_v1.1"

# Whitespace is controlled with `-` so that the rendered text is byte-exact FastChat output.
VICUNA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '"
    + VICUNA_SYSTEM.replace("'", "\\'")
    + "' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{{- system_message + ' ' -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- 'USER: ' + message['content'] + ' ' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'ASSISTANT: ' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}"
    "{{- raise_exception('Vicuna v1.1 has no role ' + message['role'] + ' here: use system (first), user, assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def render_vicuna(
    turns: list[dict[str, str]], *, eos_token: str = "</s>", add_generation_prompt: bool = False
) -> str:
    """Reference renderer (no BOS): the text the Jinja template produces after its `bos_token`."""
    system = VICUNA_SYSTEM
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    parts = [system + " "]
    for turn in turns:
        if turn["role"] == "user":
            parts.append(f"USER: {turn['content']} ")
        elif turn["role"] == "assistant":
            parts.append(f"ASSISTANT: {turn['content']}{eos_token}")
        else:
            raise ValueError(f"Vicuna v1.1 has no role '{turn['role']}' after the first turn")
    if add_generation_prompt:
        parts.append("ASSISTANT:")
    return "".join(parts)


def assistant_spans(turns: list[dict[str, str]], *, eos_token: str = "</s>") -> list[tuple[int, int]]:
    """Character spans (start, end) of each assistant reply + EOS in `render_vicuna(turns)`: the supervised text."""
    spans, text = [], ""
    system = VICUNA_SYSTEM
    if turns and turns[0]["role"] == "system":
        system, turns = turns[0]["content"], turns[1:]
    text = system + " "
    for turn in turns:
        if turn["role"] == "user":
            text += f"USER: {turn['content']} "
        else:
            text += "ASSISTANT: "
            start = len(text)
            text += turn["content"] + eos_token
            spans.append((start, len(text)))
    return spans
