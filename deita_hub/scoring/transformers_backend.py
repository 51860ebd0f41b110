"""Transformers scoring backend: one forward pass per batch, the LM head applied only at each row's last token.

Deita calls `generate(max_new_tokens=2)` once per prompt. All the score needs is the logits of the first
generated position, i.e. the LM head at the prompt's last token: the caller hands over length-sorted batches,
they are right-padded (so positions 0..n-1 are the same as unpadded and the last token sits at n-1), the base
model runs once, and the head runs on one hidden state per row instead of on every position (for a 32k
vocabulary the head costs more than a small model's layers).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from deita_hub.errors import DeitaHubError
from deita_hub.models import load_causal_lm, load_tokenizer, resolve_device_dtype
from deita_hub.scoring.prompts import DIGITS, digit_token_ids, render

log = logging.getLogger(__name__)


class TransformersScorer:
    """Digit logits for tokenized scorer prompts with a Hugging Face causal LM."""

    name = "transformers"
    batches_itself = False  # the caller makes length-sorted batches of `batch_size`

    def __init__(self, config):
        import torch

        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.digit_ids = digit_token_ids(self.tokenizer)
        self.device, self.dtype = resolve_device_dtype(config.device, config.dtype)
        model = load_causal_lm(config.model, dtype=self.dtype, what="scorer model")
        self.model = model.to(self.device).eval()
        head = model.get_output_embeddings()
        vocab = getattr(head, "out_features", None) or model.config.vocab_size
        if max(self.digit_ids) >= vocab:
            raise DeitaHubError(
                f"digit token ids {self.digit_ids} do not fit the model's {vocab}-token head: tokenizer and model "
                f"of '{config.model}' disagree"
            )
        self.max_prompt_tokens = getattr(model.config, "max_position_embeddings", None)
        # The padding id is never attended to nor read (right padding, gather at n-1); any valid id works.
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self._torch = torch
        self._decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self._head = head
        # Post-processing some architectures apply after the head (Gemma 2/3 soft-capping, Cohere's scale).
        self._softcap = getattr(model.config, "final_logit_softcapping", None)
        self._logit_scale = getattr(model.config, "logit_scale", None)
        self.head_at_last_token_only = self._decoder is not None and self._probe()

    def _forward(self, token_ids: list[list[int]], *, last_token_head: bool):
        torch = self._torch
        lengths = [len(ids) for ids in token_ids]
        width = max(lengths)
        input_ids = torch.full((len(token_ids), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
        for i, ids in enumerate(token_ids):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        rows = torch.arange(len(token_ids), device=self.device)
        last = torch.tensor(lengths, device=self.device) - 1
        with torch.inference_mode():
            if last_token_head:
                hidden = self._decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                logits = self._head(hidden[rows, last])  # [batch, vocab]: one position per row
                if self._logit_scale is not None:
                    logits = logits * self._logit_scale
                if self._softcap:
                    logits = torch.tanh(logits / self._softcap) * self._softcap
            else:
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[rows, last]
            digits = logits[:, self.digit_ids].float()
        return digits.cpu().numpy()

    def _probe(self) -> bool:
        """Check the head-at-last-token path against the model's own forward on one prompt; fall back if not equal."""
        ids = self.tokenizer(render("complexity", {"instruction": "Name three primary colours."})).input_ids
        fast = self._forward([ids], last_token_head=True)
        full = self._forward([ids], last_token_head=False)
        tolerance = 1e-4 if self.dtype == self._torch.float32 else 3e-2
        if np.allclose(fast, full, atol=tolerance, rtol=tolerance):
            return True
        log.warning(
            "%s: applying the LM head at the last token differs from the model's forward (max |diff| %.3g); "
            "scoring with the full forward instead (slower, same scores)",
            self.config.model,
            float(np.abs(fast - full).max()),
        )
        return False

    def digit_logits(self, token_ids: list[list[int]]) -> tuple[np.ndarray, list[str | None]]:
        """float32 [n, 6] logits of the digits "1".."6" after each prompt (one forward pass) and no failures."""
        logits = self._forward(token_ids, last_token_head=self.head_at_last_token_only)
        return logits, [None] * len(token_ids)

    def metadata(self) -> dict[str, Any]:
        import torch
        import transformers

        return {
            "backend": self.name,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "attn_implementation": getattr(self.model.config, "_attn_implementation", None),
            "lm_head": "last token only" if self.head_at_last_token_only else "full forward",
            "digit_token_ids": dict(zip(DIGITS, self.digit_ids, strict=True)),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
