"""Held-out loss: the model's mean negative log-likelihood of the assistant tokens of held-out conversations.

The same tokens training supervises (the Vicuna template's `{% generation %}` spans: each reply and its `</s>`),
averaged per token over the whole set (not per conversation), and its exponential, the perplexity. Offline, CPU.
`evaluate`'s "perplexity" metric is not used: it loads its own model by name, scores raw text without the chat
template's assistant mask, and is fetched from the Hub at run time.
"""

from __future__ import annotations

import math
from typing import Any

from deita_hub.errors import DeitaHubError


def held_out_loss(
    model, tokenizer, source: str, *, split: str, max_length: int, batch_size: int, limit=None
) -> dict[str, Any]:
    import torch

    from deita_hub.pool import read_pool
    from deita_hub.training.data import tokenize_conversation, use_vicuna_template

    pool = read_pool(source, split=split)
    conversations = pool.conversations[:limit] if limit else pool.conversations
    use_vicuna_template(tokenizer)
    encoded = [tokenize_conversation(tokenizer, turns, max_length) for turns in conversations]
    encoded = [(ids, mask) for ids, mask in encoded if any(mask)]
    if not encoded:
        raise DeitaHubError(f"{source}: no held-out conversation has an assistant token to score")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(batch):  # right padding: positions start at 0 for every row
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.tensor([t if m else -100 for t, m in zip(ids, mask, strict=True)])
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits
        # Token t is predicted at position t-1; summed (not averaged) so the set's mean weighs every token once.
        shifted = labels[:, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((shifted != -100).sum())
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "tokens": total_tokens,
        "conversations": len(encoded),
        "dataset": pool.provenance(),
    }
