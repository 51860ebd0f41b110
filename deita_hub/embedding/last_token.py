"""Deita's LLM embedder: the final-layer hidden state at the last non-pad token of the Vicuna-rendered conversation.

What Deita computes (and this reproduces): the conversation rendered with Vicuna v1.1 (FastChat's literal `</s>`
after each reply), tokenized with the tokenizer's own BOS, truncated to 2,048 tokens keeping the beginning, run
through the base causal LM; the embedding is the hidden state after the final norm at the last real token.
Not normalised here: selection normalises.

Deita ran this at batch size 1 in practice because its padding mixed left and right. Here rows are sorted by
length and batched (so batches carry little padding), and the position of each row's last real token is read
from the attention mask, with position ids counted over real tokens only, so the result does not depend on the
padding side nor on the batch size.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np

from deita_hub.chat_template import TEMPLATE_NAME, render_vicuna
from deita_hub.embedding import EmbedConfig
from deita_hub.errors import DeitaHubError, require
from deita_hub.models import load_causal_lm, load_tokenizer, resolve_device_dtype
from deita_hub.vllm_engine import load_llm, release

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # Deita's embedder truncates to 2,048 tokens
VICUNA_EOS = "</s>"  # FastChat's vicuna_v1.1 separator is this literal text, whatever the tokenizer


def render(turns: list[dict[str, str]]) -> str:
    """The text Deita's embedder reads (no BOS: the tokenizer adds it)."""
    return render_vicuna(turns, eos_token=VICUNA_EOS)


class LastTokenEmbedder:
    """`encode(conversations) -> float32 [n, hidden_size]`, not normalised; backends transformers and vllm."""

    def __init__(self, config: EmbedConfig, *, padding_side: str = "right"):
        if config.backend not in ("transformers", "vllm"):
            raise DeitaHubError(f"last-token backend must be transformers or vllm, got '{config.backend}'")
        if padding_side not in ("left", "right"):
            raise DeitaHubError(f"padding_side must be left or right, got '{padding_side}'")
        self.config = config
        self.padding_side = padding_side
        self.max_length = config.max_length or DEFAULT_MAX_LENGTH
        self.tokenizer = load_tokenizer(config.model)
        self.tokenizer.truncation_side = "right"  # keep the beginning, as Deita does
        if config.backend == "vllm":
            self._init_vllm()
        else:
            self._init_transformers()

    # --- transformers -------------------------------------------------------------------------------------
    def _init_transformers(self) -> None:
        import torch

        self.device, self.dtype = resolve_device_dtype(self.config.device, self.config.dtype)
        causal_lm = load_causal_lm(self.config.model, dtype=self.dtype, what="embedding model")
        # Keep only the base model (embeddings, layers, final norm): the LM head is never needed.
        self.model = causal_lm.get_decoder().to(self.device).eval()
        self.dim = int(causal_lm.config.hidden_size)
        positions = getattr(causal_lm.config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise DeitaHubError(
                f"max_length {self.max_length} exceeds the {positions} positions of '{self.config.model}'"
            )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.tokenizer.eos_token_id or 0))
        self._torch = torch

    def _forward(self, batch: list[list[int]]) -> np.ndarray:
        torch = self._torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            span = slice(0, len(ids)) if self.padding_side == "right" else slice(width - len(ids), width)
            input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, span] = 1
        # Positions count real tokens only, so a left-padded row sees the same positions as an unpadded one.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # The last real token: the highest index whose mask is 1 (n-1 under right padding, width-1 under left).
        last = (attention_mask * torch.arange(width)).argmax(-1)
        rows = torch.arange(len(batch))
        with torch.inference_mode():
            hidden = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
            ).last_hidden_state
            vectors = hidden[rows.to(self.device), last.to(self.device)].float()
        return vectors.cpu().numpy()

    # --- vllm ---------------------------------------------------------------------------------------------
    def _init_vllm(self) -> None:
        vllm = require("vllm", "vllm", "The vLLM last-token embedder")
        from transformers import AutoConfig
        from vllm.config import PoolerConfig

        model_config = AutoConfig.from_pretrained(self.config.model)
        self.dim = int(model_config.hidden_size)
        self.dtype = "bfloat16" if self.config.dtype == "auto" else self.config.dtype
        positions = getattr(model_config, "max_position_embeddings", None) or self.max_length
        engine_fields = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
        pooler_fields = {f.name for f in dataclasses.fields(PoolerConfig)}
        # LAST pooling without normalisation. The option names moved between vLLM releases (runner/convert
        # replaced task in 0.10.1; use_activation took over from normalize; pooler_config replaced
        # override_pooler_config), so the names this vLLM knows are used; encode() checks the result.
        pooler: dict[str, Any] = {"pooling_type": "LAST"}
        pooler.update({name: False for name in ("normalize", "use_activation") if name in pooler_fields})
        settings: dict[str, Any] = {
            "model": self.config.model,
            "dtype": self.dtype,
            "max_model_len": min(self.max_length, positions),
            "pooler_config" if "pooler_config" in engine_fields else "override_pooler_config": PoolerConfig(
                **pooler
            ),
        }
        if "runner" in engine_fields:
            settings.update(runner="pooling", convert="embed")
        else:
            settings["task"] = "embed"
        _, self.llm = load_llm("The vLLM last-token embedder", options=self.config.vllm_options, **settings)
        self.vllm_version = getattr(vllm, "__version__", "unknown")
        # The platform vLLM runs on (its CPU build runs there), recorded in the metadata.
        from vllm.platforms import current_platform

        self.device = str(getattr(current_platform, "device_type", "cuda") or "cuda")

    def _vllm_encode(self, token_ids: list[list[int]]) -> np.ndarray:
        outputs = self.llm.embed([{"prompt_token_ids": list(ids)} for ids in token_ids], use_tqdm=False)
        vectors = np.asarray([output.outputs.embedding for output in outputs], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        if len(vectors) > 1 and np.allclose(norms, 1.0, atol=1e-4):
            raise DeitaHubError(
                f"vLLM {self.vllm_version} returned L2-normalised vectors although normalisation was switched off; "
                "this vLLM release names the option differently: use --backend transformers for Deita's embeddings"
            )
        return vectors

    def close(self) -> None:
        """Free the model now: vLLM's engine is stopped; the transformers model is dropped."""
        if getattr(self, "llm", None) is not None:
            release(self.llm)
            self.llm = None
        self.model = None

    # --- shared -------------------------------------------------------------------------------------------
    def tokenize(self, conversations: list[list[dict[str, str]]]) -> list[list[int]]:
        """Token ids per conversation: BOS + Vicuna text, at most `max_length` tokens, the beginning kept."""
        texts = [render(turns) for turns in conversations]
        encoded = self.tokenizer(texts, add_special_tokens=True, truncation=True, max_length=self.max_length)
        return [list(ids) for ids in encoded["input_ids"]]

    def encode(self, conversations: list[list[dict[str, str]]]) -> np.ndarray:
        """float32 [n, dim] last-token hidden states, rows in input order."""
        token_ids = self.tokenize(conversations)
        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        if not token_ids:
            return out
        if self.config.backend == "vllm":
            out[:] = self._vllm_encode(token_ids)
            return out
        # Longest first: batches hold rows of similar length (little padding), and memory peaks at the start.
        order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
        for start in range(0, len(order), self.config.batch_size):
            rows = order[start : start + self.config.batch_size]
            out[rows] = self._forward([token_ids[i] for i in rows])
        return out

    def metadata(self) -> dict[str, Any]:
        import torch
        import transformers

        from deita_hub import __version__

        versions = {"torch": torch.__version__, "transformers": transformers.__version__}
        if self.config.backend == "vllm":
            versions["vllm"] = self.vllm_version
            extra = {"vllm_options": dict(self.config.vllm_options)}
        else:
            extra = {}
        return {
            "method": "last-token",
            "model": self.config.model,
            "dim": self.dim,
            "normalized": False,
            "max_length": self.max_length,
            "truncation_side": "right (beginning kept)",
            "text": TEMPLATE_NAME,
            "bos": "added by the tokenizer",
            "pooling": "last non-pad token",
            "layer": "final hidden state after the final norm",
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "backend": self.config.backend,
            "batching": "length-sorted batches"
            if self.config.backend == "transformers"
            else "vLLM scheduler",
            "batch_size": self.config.batch_size,
            **extra,
            "versions": {**versions, "deita_hub": __version__},
        }
