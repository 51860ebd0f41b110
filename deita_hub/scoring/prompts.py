"""Deita's scorer prompts (byte-exact), the digit tokens they are answered with, and the score formula.

The templates are copied from Deita's `LlamaScorer` (hkust-nlp/deita, commit b279f2c). Whitespace is part of
what the scorer models were trained on: two spaces before `\\n##Complexity: `, a space before `\\n #Question#`,
and every prompt ends in a space, so the answer digit is the next token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from deita_hub.errors import DeitaHubError

COMPLEXITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n"
    "##Query: {instruction}  \n##Complexity: "
)
QUALITY_TEMPLATE = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the "
    "Question. \n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)
TEMPLATES = {"complexity": COMPLEXITY_TEMPLATE, "quality": QUALITY_TEMPLATE}
TEMPLATE_NAMES = {"complexity": "deita-complexity-v1", "quality": "deita-quality-v1"}
# The text slots each scorer fills, in prompt order (the truncation budget is shared among them).
SLOTS = {"complexity": ("instruction",), "quality": ("instruction", "output")}
DIGITS = ("1", "2", "3", "4", "5", "6")


def slot_values(scorer: str, instruction: str, response: str) -> dict[str, str]:
    """The template's fields for one (instruction, response) pair: complexity reads only the instruction."""
    if scorer == "complexity":
        return {"instruction": instruction}
    return {"instruction": instruction, "output": response}


def render(scorer: str, values: dict[str, str]) -> str:
    # str.format substitutes the template's own fields only; braces inside the values are left alone.
    return TEMPLATES[scorer].format(**values)


def digit_token_ids(tokenizer) -> list[int]:
    """Ids of the tokens "1".."6" in the scorer's own vocabulary, in that order.

    Deita's scorer reads the logits of the token that follows the prompt's trailing space. With SentencePiece
    vocabularies (LLaMA, Mistral) the text "1" encodes as ["▁", "1"] or ["▁1"], but after a prompt ending in
    "▁" the answer is the bare piece "1" (LLaMA id 29896): so the ids are looked up as vocabulary entries,
    never by encoding text, and each must round-trip to exactly its digit.
    """
    ids = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for digit in DIGITS:
        token_id = tokenizer.convert_tokens_to_ids(digit)
        if token_id is None or (token_id == unk and getattr(tokenizer, "unk_token", None) != digit):
            raise DeitaHubError(
                f"the scorer's tokenizer has no single token for the digit '{digit}'; Deita's score needs the "
                "digits 1..6 to be single vocabulary entries"
            )
        if (
            tokenizer.convert_ids_to_tokens(token_id) != digit
            or tokenizer.decode([token_id]).strip() != digit
        ):
            raise DeitaHubError(
                f"token id {token_id} for '{digit}' decodes as {tokenizer.decode([token_id])!r}; the scorer's "
                f"tokenizer does not have '{digit}' as a single token"
            )
        ids.append(int(token_id))
    if len(set(ids)) != len(ids):
        raise DeitaHubError(f"the digits 1..6 do not map to six distinct tokens: {ids}")
    return ids


def expected_score(digit_logits: Sequence[float]) -> float:
    """Σ_k k · softmax(z)_k over the six digit logits (or log-probs: softmax ignores a shared offset).

    Computed in float64 with the max subtracted, so large logits neither overflow nor lose precision.
    """
    values = [float(z) for z in digit_logits]
    if len(values) != len(DIGITS):
        raise ValueError(f"expected {len(DIGITS)} digit logits, got {len(values)}")
    if not all(math.isfinite(z) for z in values):
        raise ValueError(f"non-finite digit logits {values}")
    top = max(values)
    weights = [math.exp(z - top) for z in values]
    return sum((k + 1) * w for k, w in enumerate(weights)) / sum(weights)
