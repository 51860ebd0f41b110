"""The model's answers to benchmark questions, batched: transformers on a CPU (or GPU), vLLM on a GPU.

Every prompt is the conversation so far rendered by the model's own chat template (the Vicuna v1.1 template a
deita-hub model is saved with) with the generation prompt, as token ids: the template writes BOS itself, so the
ids are the template's and nothing is added (encoding the rendered text with special tokens would give
`<s><s>`). Both engines get the same ids. Generation stops at the tokenizer's EOS or after `max_new_tokens`. A
temperature below 1e-4 is greedy decoding, as in FastChat's `gen_model_answer.py`.

Batched transformers generation pads on the left and sorts prompts by length, so a batch wastes little
padding; under greedy decoding it gives the answers one-at-a-time `generate` gives (benchmarks/eval.py checks
that on every run).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from deita_hub.errors import DeitaHubError, require

log = logging.getLogger(__name__)

GREEDY_BELOW = 1e-4  # FastChat: `do_sample = temperature >= 1e-4`


@dataclass
class Generator:
    """A loaded model ready to answer chat prompts; `engine` is "transformers" or "vllm"."""

    engine: str
    model: object
    tokenizer: object
    batch_size: int
    max_new_tokens: int
    seed: int = 0

    def answer(self, conversations: Sequence[list[dict[str, str]]], temperature: float = 0.0) -> list[str]:
        """The next assistant reply to each conversation (each ends with a user turn)."""
        if not conversations:
            return []
        prompts = [prompt_ids(self.tokenizer, turns) for turns in conversations]
        if self.engine == "vllm":
            return _answer_vllm(self, prompts, temperature)
        return _answer_transformers(self, prompts, temperature)

    def close(self) -> None:
        """Give the model's memory back now: lm-eval loads the model again, and would not find it on a GPU."""
        if self.engine == "vllm":
            from deita_hub.vllm_engine import release

            release(self.model)
        self.model = None
        gc.collect()
        torch = require("torch", "train", "Answer generation")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_generator(
    model_path: str,
    *,
    revision: str | None,
    backend: str,
    dtype: str,
    device: str | None,
    batch_size: int,
    max_new_tokens: int,
    seed: int = 0,
    vllm_options=None,
) -> Generator:
    """Load MODEL (folder, adapter folder or Hub id) with the chosen engine; the tokenizer keeps its template."""
    from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE
    from deita_hub.models import is_adapter, load_causal_lm, load_tokenizer, resolve_device_dtype

    tokenizer = load_tokenizer(model_path, revision=revision)
    if not tokenizer.chat_template:
        log.info("%s has no chat template; answering with Vicuna v1.1", model_path)
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    if backend == "vllm":
        from deita_hub.vllm_engine import load_llm

        if is_adapter(model_path, revision):
            raise DeitaHubError(
                f"{model_path}: vLLM answers need a merged model; run `deita-hub merge` first"
            )
        _, llm = load_llm(
            "Answer generation",
            options=dict(vllm_options or {}),
            model=model_path,
            revision=revision,
            dtype=dtype,
            seed=seed,
        )
        return Generator("vllm", llm, tokenizer, batch_size, max_new_tokens, seed)
    device, torch_dtype = resolve_device_dtype(device, dtype)
    model = load_causal_lm(
        model_path, dtype=torch_dtype, revision=revision, adapter=is_adapter(model_path, revision)
    )
    model.to(device).eval()
    return Generator("transformers", model, tokenizer, batch_size, max_new_tokens, seed)


def prompt_ids(tokenizer, conversation: Sequence[dict[str, str]]) -> list[int]:
    """The conversation in the chat template with the generation prompt, as the template's own token ids."""
    encoded = tokenizer.apply_chat_template(
        list(conversation), tokenize=True, add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _generate_kwargs(generator: Generator, temperature: float) -> dict:
    tokenizer = generator.tokenizer
    sampling = temperature >= GREEDY_BELOW
    return {
        "max_new_tokens": generator.max_new_tokens,
        "do_sample": sampling,
        "temperature": temperature if sampling else None,
        "top_p": None,
        "top_k": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else tokenizer.eos_token_id,
    }


def _answer_transformers(generator: Generator, encoded: list[list[int]], temperature: float) -> list[str]:
    torch = require("torch", "train", "Answer generation")
    tokenizer, model = generator.tokenizer, generator.model
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str | None] = [None] * len(encoded)
    kwargs = _generate_kwargs(generator, temperature)
    for start in range(0, len(order), generator.batch_size):
        batch = order[start : start + generator.batch_size]
        width = max(len(encoded[i]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            input_ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[row, width - len(encoded[i]) :] = 1
        torch.manual_seed(generator.seed + start)
        with torch.no_grad():
            output = model.generate(
                input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device), **kwargs
            )
        for row, i in enumerate(batch):
            answers[i] = tokenizer.decode(output[row, width:], skip_special_tokens=True).strip()
    return answers


def answer_one_at_a_time(generator: Generator, conversation: list[dict[str, str]], temperature: float) -> str:
    """FastChat's way (`gen_model_answer.py`): one prompt per `generate` call, no padding. The benchmark baseline."""
    import torch

    tokenizer, model = generator.tokenizer, generator.model
    input_ids = torch.tensor([prompt_ids(tokenizer, conversation)], device=model.device)
    torch.manual_seed(generator.seed)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **_generate_kwargs(generator, temperature),
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


def _answer_vllm(generator: Generator, encoded: list[list[int]], temperature: float) -> list[str]:
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=temperature if temperature >= GREEDY_BELOW else 0.0,
        max_tokens=generator.max_new_tokens,
        seed=generator.seed,
    )
    prompts = [{"prompt_token_ids": ids} for ids in encoded]  # vllm.TokensPrompt: the ids as they are
    outputs = generator.model.generate(prompts, params, use_tqdm=False)
    return [output.outputs[0].text.strip() for output in outputs]
