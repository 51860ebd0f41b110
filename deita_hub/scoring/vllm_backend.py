"""vLLM scoring backend (extra `[vllm]`): one `generate` call per chunk, batched by vLLM's scheduler.

Each prompt generates one token and asks for the log-probabilities of the six digit tokens at that first
generated position. vLLM >= 0.20 takes them by id (`SamplingParams.logprob_token_ids`, vllm-project/vllm#34539),
so every row is scored whatever the model ranks first. Older vLLM only returns the top-k (`max_logprobs`
defaults to 20; Deita's own vLLM path asks for 1,000, which current vLLM refuses): there, a row whose digits are
not all among the top 20 fails with that reason (a trained Deita scorer puts them on top); it is never filled
in. Either way the values are raw log-probabilities (`logprobs_mode` raw_logprobs, the default): log-softmax of
the logits over the whole vocabulary, so a softmax over the six digits' log-probs equals the softmax over their
logits. Prompts are passed as token ids, tokenized and truncated exactly as the transformers backend does, so
both backends read the same tokens.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deita_hub.errors import DeitaHubError, require
from deita_hub.models import load_tokenizer
from deita_hub.scoring.prompts import DIGITS, digit_token_ids
from deita_hub.vllm_engine import load_llm, release

TOP_LOGPROBS = 20  # vLLM's default --max-logprobs: the most a version without requested ids can return


def _logprob_value(entry) -> float:
    # Logprob objects (vLLM >= 0.4) carry .logprob; some versions/flat modes hand back plain floats.
    return float(getattr(entry, "logprob", entry))


def _requested_ids_params(vllm, digit_ids: list[int]):
    """Sampling parameters that return the digits' log-probs by id, or None where this vLLM cannot."""
    try:
        # logprobs = the number of requested ids: vLLM 0.20-0.25 require the two to agree, later ones accept it.
        params = vllm.SamplingParams(
            max_tokens=1,
            temperature=0.0,
            logprobs=len(digit_ids),
            logprob_token_ids=list(digit_ids),
            detokenize=False,
        )
    except TypeError:  # an unknown keyword: a vLLM before logprob_token_ids
        return None
    return params if getattr(params, "logprob_token_ids", None) == list(digit_ids) else None


class VllmScorer:
    """Digit log-probs for tokenized scorer prompts with vLLM (bf16 by default)."""

    name = "vllm"
    batches_itself = True  # the caller passes a whole chunk; vLLM's scheduler batches it

    def __init__(self, config, *, requested_ids: bool | None = None):
        """`requested_ids`: read the digits' log-probs by id (True), from the top 20 (False), or by id when the
        installed vLLM can (None, the default)."""
        require("vllm", "vllm", "The vLLM scoring backend")  # a missing extra fails before anything loads
        if config.device and config.device.startswith("cuda:"):
            raise DeitaHubError("the vLLM backend picks GPUs with CUDA_VISIBLE_DEVICES, not --device cuda:N")
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.digit_ids = digit_token_ids(self.tokenizer)
        self.dtype = "bfloat16" if config.dtype == "auto" else config.dtype
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(config.model)
        positions = getattr(model_config, "max_position_embeddings", None) or config.max_length + 1
        # One generated token needs one position after the prompt: prompts get at most positions - 1 tokens.
        max_model_len = min(config.max_length + 1, positions)
        self.max_prompt_tokens = max_model_len - 1
        vllm, self.llm = load_llm(
            "The vLLM scoring backend",
            options=config.vllm_options,
            model=config.model,
            dtype=self.dtype,
            max_model_len=max_model_len,
        )
        self.vllm_version = getattr(vllm, "__version__", "unknown")
        self.params = None
        if requested_ids is not False:
            self.params = _requested_ids_params(vllm, self.digit_ids)
            if self.params is None and requested_ids:
                raise DeitaHubError(
                    f"vLLM {self.vllm_version} cannot return the log-probabilities of requested token ids "
                    "(SamplingParams.logprob_token_ids, vLLM >= 0.20)"
                )
        self.requested_ids = self.params is not None
        if self.params is None:
            # temperature 0: greedy, so the (ignored) generated token is deterministic; logprobs are raw anyway.
            self.params = vllm.SamplingParams(
                max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS, detokenize=False
            )

    def digit_logits(self, token_ids: list[list[int]]) -> tuple[np.ndarray, list[str | None]]:
        """float32 [n, 6] digit log-probs and per-row reasons (NaN rows: without requested ids, a digit outside the
        top 20)."""
        prompts = [{"prompt_token_ids": list(ids)} for ids in token_ids]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        values = np.full((len(token_ids), len(DIGITS)), np.nan, dtype=np.float32)
        reasons: list[str | None] = [None] * len(token_ids)
        for i, output in enumerate(outputs):  # vLLM returns outputs in prompt order
            top = output.outputs[0].logprobs[0]  # {token_id: Logprob} at the first generated position
            missing = [
                digit for digit, token_id in zip(DIGITS, self.digit_ids, strict=True) if token_id not in top
            ]
            if missing and self.requested_ids:
                reasons[i] = (
                    f"vLLM returned no log-probability for the requested digit token(s) {', '.join(missing)}"
                )
                continue
            if missing:
                reasons[i] = (
                    f"digit token(s) {', '.join(missing)} not among the top-{TOP_LOGPROBS} next tokens that vLLM "
                    f"{self.vllm_version} returns (it cannot return requested token ids; vLLM >= 0.20 can); the "
                    "model does not answer this prompt with a digit (score it with the transformers backend to "
                    "read all six logits)"
                )
                continue
            values[i] = [_logprob_value(top[token_id]) for token_id in self.digit_ids]
        return values, reasons

    def close(self) -> None:
        """Stop vLLM's engine and free its memory (the caller that made the scorer calls this)."""
        if getattr(self, "llm", None) is not None:
            release(self.llm)
            self.llm = None

    def metadata(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "dtype": self.dtype,
            # "requested token ids": the digits' own log-probs; otherwise the top-k a row's digits must be in.
            "logprobs": "requested token ids" if self.requested_ids else f"top-{TOP_LOGPROBS}",
            "max_prompt_tokens": self.max_prompt_tokens,
            "digit_token_ids": dict(zip(DIGITS, self.digit_ids, strict=True)),
            "vllm_options": dict(self.config.vllm_options),
            "versions": {"vllm": self.vllm_version},
        }
