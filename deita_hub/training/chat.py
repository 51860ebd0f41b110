"""`deita-hub chat`: generation with the Vicuna v1.1 template, one-shot (`--prompt`) or interactive (stdin).

The prompt is the conversation so far rendered by the tokenizer's chat template with the generation prompt
(`... ASSISTANT:`); generation stops at `</s>` (the tokenizer's EOS, the token every reply was trained to end
with) or after `max_new_tokens`. An adapter (folder or Hub repo) loads its base model, at the revision recorded in
adapter_config.json, and the adapter on top.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO

from deita_hub.errors import DeitaHubError
from deita_hub.models import is_adapter, load_causal_lm, load_tokenizer, resolve_device_dtype

log = logging.getLogger(__name__)

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0


def load_chat_model(path: str, *, dtype: str = "auto", revision: str | None = None):
    """(model, tokenizer) of a merged/full model or an adapter (base + adapter), from a folder or a Hub id."""
    from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE

    device, torch_dtype = resolve_device_dtype(None, dtype)
    try:
        adapter = is_adapter(path, revision)
    except OSError as exc:
        raise DeitaHubError(f"cannot load a model from '{path}': {exc}") from exc
    model = load_causal_lm(path, dtype=torch_dtype, revision=revision, adapter=adapter, what="a model from")
    tokenizer = load_tokenizer(path, revision=revision)
    if not tokenizer.chat_template:
        log.info("%s has no chat template; using Vicuna v1.1", path)
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    model.to(device).eval()
    return model, tokenizer


def generate_reply(model, tokenizer, messages: list[dict[str, str]], settings: GenerationSettings) -> str:
    """The assistant's next reply to `messages` (canonical turns ending with a user turn)."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    prompt_ids = {key: value.to(model.device) for key, value in prompt_ids.items()}
    sampling = settings.temperature > 0
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        output = model.generate(
            **prompt_ids,
            max_new_tokens=settings.max_new_tokens,
            do_sample=sampling,
            temperature=settings.temperature if sampling else None,
            top_p=settings.top_p if sampling else None,
            top_k=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        )
    new_tokens = output[0, prompt_ids["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def chat_once(
    model, tokenizer, prompt: str, settings: GenerationSettings, *, system: str | None = None
) -> str:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return generate_reply(model, tokenizer, messages, settings)


def chat_loop(
    model,
    tokenizer,
    settings: GenerationSettings,
    *,
    system: str | None = None,
    lines: Iterable[str] | None = None,
    out: TextIO | None = None,
) -> list[dict[str, str]]:
    """Read user turns line by line (stdin by default), print each reply; `/reset` forgets, `/exit` or EOF ends.

    Returns the conversation (without the system turn)."""
    out = out or sys.stdout
    interactive = lines is None and sys.stdin.isatty()
    source = iter(lines) if lines is not None else sys.stdin
    history: list[dict[str, str]] = []
    prefix = [{"role": "system", "content": system}] if system else []
    if interactive:
        print(
            f"(one message per line; {RESET_COMMAND} starts over, {EXIT_COMMANDS[0]} or Ctrl-D ends)",
            file=out,
        )
    while True:
        if interactive:
            print("USER: ", end="", file=out, flush=True)
        line = _next_line(source)
        if line is None or line.strip() in EXIT_COMMANDS:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == RESET_COMMAND:
            history = []
            print("(conversation reset)", file=out)
            continue
        history.append({"role": "user", "content": text})
        reply = generate_reply(model, tokenizer, prefix + history, settings)
        history.append({"role": "assistant", "content": reply})
        print(f"ASSISTANT: {reply}", file=out, flush=True)
    return history


def _next_line(source) -> str | None:
    """The next line of a file (stdin) or an iterator; None at the end."""
    if hasattr(source, "readline"):
        return source.readline() or None
    return next(source, None)
