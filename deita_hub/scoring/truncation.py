"""Explicit truncation: a prompt longer than `max_length` tokens is cut inside its text slots, never in the template.

`truncation_side` right keeps the beginning of the instruction/response text, left its end, so the prompt still
ends in "##Complexity: " / "##Quality: " and the scorer answers the question it was trained on. With
`truncation_side="none"` such a pair fails (`PairFailure`, recorded with its reason).
"""

from __future__ import annotations

from deita_hub.scoring import prompts


class PairFailure(Exception):
    """One pair cannot be scored; the message is the reason recorded for its row."""


def _allocate(lengths: dict[str, int], budget: int) -> dict[str, int]:
    """Tokens each slot keeps so that they sum to `budget`: the longest slots are cut first, to equal lengths."""
    keep: dict[str, int] = {}
    remaining = dict(lengths)
    budget = max(budget, 0)
    while remaining:
        share = budget // len(remaining)
        fits = {name: n for name, n in remaining.items() if n <= share}
        if not fits:
            extra = budget - share * len(remaining)
            for i, name in enumerate(remaining):  # prompt order: an odd token goes to the earlier slot
                keep[name] = share + (1 if i < extra else 0)
            return keep
        for name, n in fits.items():
            keep[name] = n
            budget -= n
            del remaining[name]
    return keep


def _cut(tokenizer, text: str, keep: int, side: str) -> str:
    """The longest prefix (side right) or suffix (side left) of `text` covering `keep` of its tokens."""
    if keep <= 0:
        return ""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if keep >= len(offsets):
            return text
        return text[: offsets[keep - 1][1]] if side == "right" else text[offsets[len(offsets) - keep][0] :]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if keep >= len(ids):
        return text
    kept = ids[:keep] if side == "right" else ids[len(ids) - keep :]
    return tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def truncate_prompt(tokenizer, scorer: str, values: dict[str, str], length: int, max_length: int, side: str):
    """Token ids of the prompt with its text slots cut so that the whole fits `max_length` tokens.

    Slot lengths are measured alone; joined to the template a boundary token may merge or split, so the
    fit is re-checked and the budget tightened until the prompt fits.
    """
    if side == "none":
        raise PairFailure(
            f"prompt has {length} tokens, more than max_length {max_length}, and truncation is off "
            "(truncation_side none)"
        )
    lengths = {
        name: len(tokenizer(text, add_special_tokens=False)["input_ids"]) for name, text in values.items()
    }
    budget = sum(lengths.values()) - (length - max_length)
    for _ in range(8):
        keep = _allocate(lengths, budget)
        cut = {name: _cut(tokenizer, values[name], keep[name], side) for name in values}
        ids = tokenizer(prompts.render(scorer, cut))["input_ids"]
        if len(ids) <= max_length:
            return list(ids)
        budget -= len(ids) - max_length
        if budget < 0:
            break
    raise PairFailure(
        f"prompt cannot be cut to max_length {max_length} tokens: the template alone needs about "
        f"{length - sum(lengths.values())} tokens"
    )
