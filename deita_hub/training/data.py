"""Training data: a pool or built dataset -> Vicuna-rendered token ids with the assistant-only loss mask.

Conversations are rendered with the tokenizer's chat template (the Vicuna v1.1 Jinja template, whose
`{% generation %}` markers make `assistant_masks`: 1 on each assistant reply and its `</s>`, 0 elsewhere), then
truncated to `max_length` keeping the beginning. We tokenize here rather than inside TRL because TRL refuses
`max_length` with padding-free batching without packing: truncating first keeps padding-free exact and lets us
count what truncation did. A conversation whose supervised tokens are all cut off is dropped (it has no loss).

DPO (`stage: dpo`) reads preference pairs (`deita_hub.preferences`) and renders `prompt + chosen` and
`prompt + rejected` with the same template: the prompt's ids are everything before the final reply (up to and
including `ASSISTANT:`), the completion ids are the reply and its `</s>` (the template's generation mask), so
TRL's DPOTrainer gets `prompt_ids` / `chosen_ids` / `rejected_ids` and puts the loss on the replies only.

The token ids are kept in the tokenized-data cache (`training.token_cache`, under `$DEITA_HUB_CACHE`): a second run
on the same rows, tokenizer, template, `max_length` and batching reads them instead of tokenizing again.

`read_training_rows` reads and validates the data without a tokenizer, so a bad dataset fails before any model
is built or loaded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE
from deita_hub.errors import DeitaHubError
from deita_hub.hub import is_repo_id
from deita_hub.records import BUILD_RECORD
from deita_hub.training import token_cache

log = logging.getLogger(__name__)


@dataclass
class TrainData:
    train: Any  # datasets.Dataset with input_ids, assistant_masks
    eval: Any | None
    record: dict[str, Any]  # the run record's "dataset" section
    num_conversations: int
    num_truncated: int
    num_dropped: int
    num_tokens: int


def use_vicuna_template(tokenizer) -> None:
    """Every deita-hub model trains and chats with Vicuna v1.1; replace another template loudly."""
    if tokenizer.chat_template and tokenizer.chat_template != VICUNA_CHAT_TEMPLATE:
        log.info(
            "replacing the tokenizer's own chat template with Vicuna v1.1 (the template Deita trains with)"
        )
    tokenizer.chat_template = VICUNA_CHAT_TEMPLATE
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise DeitaHubError("the tokenizer has no bos_token/eos_token; Vicuna v1.1 needs both (<s>, </s>)")


def tokenize_conversation(
    tokenizer, turns: list[dict[str, str]], max_length: int | None
) -> tuple[list[int], list[int]]:
    """Token ids and assistant mask of one canonical conversation, truncated to `max_length` (start kept)."""
    encoded = tokenizer.apply_chat_template(
        turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(encoded["input_ids"]), list(encoded["assistant_masks"])
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def _dataset_id(source: str) -> str:
    """Hub ids are kept; local paths are reduced to their basename (no local paths in published records)."""
    path = Path(source)
    if path.exists():
        return path.resolve().name
    return source


def _build_summary(config) -> dict[str, Any] | None:
    """What selected the training subset, from the `deita_build.json` of a dataset built by deita-hub."""
    path = Path(config.dataset)
    build = None
    if path.is_dir() and (path / BUILD_RECORD).is_file():
        try:
            build = json.loads((path / BUILD_RECORD).read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DeitaHubError(f"{path / BUILD_RECORD}: invalid JSON: {exc.msg}") from exc
    elif not path.exists() and is_repo_id(config.dataset):
        build = _hub_build_record(config)
    return summarise_build(build, config.dataset_config) if isinstance(build, dict) else None


def summarise_build(build: dict[str, Any], subset_name: str | None) -> dict[str, Any] | None:
    """The trained subset's entry of a build record: its selection parameters and statistics, the pool's
    fingerprint, and how the pool was scored and embedded. The subset is `subset_name`, else the default one."""
    subsets = [s for s in build.get("subsets") or [] if isinstance(s, dict)]
    chosen = next((s for s in subsets if s.get("name") == subset_name), None)
    if chosen is None and subset_name is None:
        chosen = next((s for s in subsets if s.get("default")), subsets[0] if subsets else None)
    if chosen is None:
        return None
    pool = build.get("pool") if isinstance(build.get("pool"), dict) else {}
    return {
        "name": build.get("name"),
        "subset": chosen.get("name"),
        "selection": chosen.get("selection"),
        "rows": chosen.get("rows"),
        "stats": chosen.get("stats"),
        "evol_score": chosen.get("evol_score"),
        "pool_fingerprint": pool.get("fingerprint"),
        "scores": build.get("scores"),
        "embedding": build.get("embedding"),
    }


def _hub_build_record(config) -> dict[str, Any] | None:
    """A Hub dataset built by deita-hub carries `deita_build.json`; others simply do not (None, not an error)."""
    from deita_hub.hub import read_json_file

    return read_json_file(config.dataset, BUILD_RECORD, repo_type="dataset", revision=config.dataset_revision)


def read_training_rows(config):
    """The run's rows, read and validated (no tokenizer, no model): a `Pool` for SFT, `Preferences` for DPO."""
    from deita_hub.conversations import FormatSpec
    from deita_hub.pool import read_pool
    from deita_hub.preferences import read_preferences

    if not config.dataset:
        raise DeitaHubError("no training data: set 'dataset' in the config or pass --dataset")
    where = dict(
        on_invalid=config.on_invalid,
        config=config.dataset_config,
        split=config.dataset_split,
        revision=config.dataset_revision,
    )
    if config.stage == "dpo":
        return read_preferences(config.dataset, config.dataset_format, **where)
    return read_pool(config.dataset, FormatSpec(format=config.dataset_format), **where)


def load_train_data(config, tokenizer, rows=None) -> TrainData:
    """Render + tokenize every conversation (or preference pair) of `rows` (read here when not given), or reuse
    the tokenized-data cache (`training.token_cache`, unless `tokenized_cache` is off); split off the eval rows."""
    if rows is None:
        rows = read_training_rows(config)
    dpo = config.stage == "dpo"
    unit = "preference pairs" if dpo else "conversations"
    use_vicuna_template(tokenizer)
    tokenize = partial(_tokenize_pairs if dpo else _tokenize_conversations, config, tokenizer, rows)
    if config.tokenized_cache:
        inputs = token_cache.cache_inputs(config, tokenizer, rows)
        tokenized = token_cache.load_or_tokenize(inputs, tokenize, unit=unit)
    else:
        tokenized = tokenize()
    for row, reason in tokenized.skipped:  # logged here, so that a cache hit says it too
        log.warning("%s: row %d skipped: %s", config.dataset, row, reason)
    if tokenized.num_truncated:
        log.warning(
            "%d of %d %s are longer than max_length %d and were truncated (%d dropped: %s)",
            tokenized.num_truncated,
            len(rows),
            unit,
            config.max_length,
            tokenized.num_dropped - len(tokenized.skipped),
            "the prompt alone fills it" if dpo else "nothing left to learn from",
        )
    dataset, eval_dataset = _split_eval(config, tokenized.dataset)
    pool = rows.pool if dpo else rows
    record = _dataset_record(config, pool)
    if dpo:
        record["kind"] = "preferences"
    return TrainData(
        train=dataset,
        eval=eval_dataset,
        record=record,
        num_conversations=len(rows),
        num_truncated=tokenized.num_truncated,
        num_dropped=tokenized.num_dropped,
        num_tokens=tokenized.num_tokens,
    )


def _tokenize_conversations(config, tokenizer, pool):
    """Conversations -> input_ids + assistant_masks, truncated to `max_length` (start kept)."""
    from datasets import Dataset

    input_ids, masks = [], []
    truncated = dropped = tokens = 0
    for turns in pool.conversations:
        ids, mask = tokenize_conversation(tokenizer, turns, None)
        if len(ids) > config.max_length:
            truncated += 1
            ids, mask = ids[: config.max_length], mask[: config.max_length]
            if 1 not in mask:  # the replies all lie beyond max_length: no loss to learn from
                dropped += 1
                continue
        input_ids.append(ids)
        masks.append(mask)
        tokens += len(ids)
    if not input_ids:
        raise DeitaHubError(
            f"{config.dataset}: every conversation lost its assistant replies to max_length {config.max_length}"
        )
    dataset = Dataset.from_dict({"input_ids": input_ids, "assistant_masks": masks})
    return token_cache.Tokenized(dataset, num_tokens=tokens, num_truncated=truncated, num_dropped=dropped)


def _dataset_record(config, pool) -> dict[str, Any]:
    record = {
        "id": _dataset_id(config.dataset),
        "config": config.dataset_config,
        "split": config.dataset_split,
        "revision": config.dataset_revision,
        "fingerprint": pool.fingerprint,
        "num_rows": len(pool),
        "build": _build_summary(config),
    }
    if pool.invalid:  # only present when rows were skipped (on_invalid: skip), so SFT records keep their keys
        record["num_invalid_rows"] = len(pool.invalid)
    return record


def _split_eval(config, dataset):
    if config.eval_ratio <= 0:
        return dataset, None
    if len(dataset) < 2:
        raise DeitaHubError(f"eval_ratio {config.eval_ratio} needs at least 2 rows, got {len(dataset)}")
    split = dataset.train_test_split(test_size=config.eval_ratio, seed=config.seed, shuffle=True)
    return split["train"], split["test"]


def tokenize_pair(tokenizer, pair) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) of one preference pair, untruncated.

    Each side is rendered whole (`prompt + reply`) with the Vicuna template; its completion starts at the final
    reply's first supervised token, so the prompt ids end with `ASSISTANT:` exactly as the generation prompt does.
    Raises ValueError when the two renderings disagree on the prompt's tokens (a reply merging into `:`).
    """
    sides = []
    for turns in (pair.chosen_conversation(), pair.rejected_conversation()):
        ids, mask = tokenize_conversation(tokenizer, turns, None)
        starts = [i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1])]
        if not starts or not all(mask[starts[-1] :]):
            raise ValueError("the template's assistant mask does not end with the final reply")
        sides.append((ids[: starts[-1]], ids[starts[-1] :]))
    (prompt, chosen), (other_prompt, rejected) = sides
    if prompt != other_prompt:
        raise ValueError("the prompt tokenizes differently before 'chosen' and before 'rejected'")
    return prompt, chosen, rejected


def _tokenize_pairs(config, tokenizer, preferences):
    """Preference pairs -> prompt/chosen/rejected ids, truncated to `max_length` per side (start kept)."""
    from datasets import Dataset

    columns: dict[str, list] = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    truncated = dropped = tokens = 0
    skipped = []
    for position, pair in enumerate(preferences.pairs):
        try:
            prompt, chosen, rejected = tokenize_pair(tokenizer, pair)
        except ValueError as exc:
            # Never trained on silently: the row is named; skipping it is the user's call (on_invalid: skip).
            row = int(preferences.pool.rows[position])
            if config.on_invalid == "error":
                raise DeitaHubError(f"{config.dataset}: row {row}: {exc}") from None
            skipped.append((row, str(exc)))
            dropped += 1
            continue
        room = config.max_length - len(prompt)
        if len(prompt) + max(len(chosen), len(rejected)) > config.max_length:
            truncated += 1
            if room <= 0:  # the prompt alone fills max_length: no reply token left to learn from
                dropped += 1
                continue
            chosen, rejected = chosen[:room], rejected[:room]
        columns["prompt_ids"].append(prompt)
        columns["chosen_ids"].append(chosen)
        columns["rejected_ids"].append(rejected)
        tokens += 2 * len(prompt) + len(chosen) + len(rejected)
    if not columns["prompt_ids"]:
        raise DeitaHubError(
            f"{config.dataset}: every preference pair lost its replies to max_length {config.max_length}"
        )
    return token_cache.Tokenized(
        Dataset.from_dict(columns),
        num_tokens=tokens,
        num_truncated=truncated,
        num_dropped=dropped,
        skipped=skipped,
    )
