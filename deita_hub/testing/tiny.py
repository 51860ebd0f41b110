"""Test support on top of `deita_hub.tiny`: the tiny models, and a tiny model built to answer with a digit."""

from __future__ import annotations

from pathlib import Path

from deita_hub.tiny import llama2_tokenizer, llama2_tokenizer_file, save_tiny_model, tiny_causal_lm

__all__ = [
    "llama2_tokenizer",
    "llama2_tokenizer_file",
    "save_digit_answering_model",
    "save_tiny_model",
    "tiny_causal_lm",
]


def save_digit_answering_model(out_dir: str | Path, **model_kwargs) -> Path:
    """A tiny random LLaMA (+ Llama-2 tokenizer) whose next token is always one of the six digits "1".."6".

    A Deita scorer puts the digits on top; vLLM returns at most the top-20 log-probs, so its backend needs a
    model that does the same. A large bias on the last MLP pushes every hidden state towards one direction e0;
    only the digit rows of the LM head read e0, so the digits lead by a wide margin while their logits still
    vary with the prompt. `model_kwargs` size the model as `tiny_causal_lm`'s do (the benchmarks use larger ones).
    """
    import torch

    from deita_hub.scoring.prompts import digit_token_ids

    out_dir = Path(out_dir)
    tokenizer = llama2_tokenizer()
    model_kwargs = {"seed": 3, **model_kwargs}
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), mlp_bias=True, **model_kwargs)
    digits = digit_token_ids(tokenizer)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.bias.zero_()[0] = 20.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[digits, 0] = torch.linspace(1.0, 1.5, 6)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
