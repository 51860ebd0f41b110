"""The tokenized-data cache: a run's token ids, kept under `$DEITA_HUB_CACHE/tokenized/<key>/` and reused by the
next run on the same inputs, which then tokenizes nothing.

The key is a sha256 over everything the ids depend on (`cache_inputs`): the rows actually tokenized (their
canonical conversations, or preference pairs, in order), the tokenizer (its name, revision and a hash of its whole
serialization: vocabulary, merges, normalizer, added and special tokens), the chat template, `max_length`, the
batching mode, the stage, and the cache format and deita-hub versions. A different tokenizer or template never
finds another's entry: trainers that keyed such a cache by the dataset alone trained on ids of another vocabulary.

An entry is a `datasets` Arrow folder (`save_to_disk`) plus `deita_tokenized.json`: the key inputs (hashes and
numbers, no tokens, no paths) and what truncation did (the counts the run record needs). The json is written last
and the folder appears whole (`io.atomic_folder`); an entry without it, or one that does not load, is tokenized
again and replaced.

Processes that need one entry at once (the ranks of `accelerate launch`, two trainings) serialise on
`<key>.lock` (`io.file_lock`): the first tokenizes and writes, the others wait, then read. No rank logic is
involved, so it holds for any launcher; machines that do not share the cache folder each tokenize once.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deita_hub import __version__
from deita_hub.errors import DeitaHubError
from deita_hub.io import atomic_folder, default_cache_dir, file_lock, write_text

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the stored columns or their meaning change
ENTRY_RECORD = "deita_tokenized.json"  # written last: an entry without it is incomplete
DATASET_DIR = "dataset"


@dataclass
class Tokenized:
    """A run's rows as token ids and what truncation did to them: what an entry holds."""

    dataset: Any  # datasets.Dataset: input_ids + assistant_masks (sft), prompt/chosen/rejected_ids (dpo)
    num_tokens: int
    num_truncated: int
    num_dropped: int
    skipped: list[tuple[int, str]] = field(default_factory=list)  # dpo: (row, reason) of each pair left out


def cache_root() -> Path:
    return default_cache_dir() / "tokenized"


def _sha256(data: str | bytes) -> str:
    return "sha256:" + hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def tokenizer_identity(tokenizer, revision: str | None) -> dict[str, Any]:
    """Name, revision and vocabulary hash of a tokenizer. The hash covers the fast tokenizer's whole serialization
    (vocabulary, merges, normalizer, pre-tokenizer, post-processor, added tokens) plus the special-token roles."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = backend.to_str()
    else:  # a slow (Python) tokenizer: its vocabulary, added tokens included
        serialized = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    special = json.dumps(
        {
            "map": tokenizer.special_tokens_map,
            "added": {str(i): str(token) for i, token in sorted(tokenizer.added_tokens_decoder.items())},
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    name = str(tokenizer.name_or_path)
    if name and Path(name).exists():  # a local folder: its name only (the hash says what it holds)
        name = Path(name).resolve().name
    return {
        "name": name,
        "revision": revision,
        "class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "fingerprint": _sha256(serialized + "\n" + special),
    }


def pairs_fingerprint(pairs) -> str:
    """ "sha256:<hex>" over preference pairs in order: prompt, chosen and rejected (the pool's conversations
    fingerprint covers prompt + chosen only)."""
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(json.dumps([pair.prompt, pair.chosen, pair.rejected], ensure_ascii=False).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def batching_mode(config) -> str:
    """How batches are formed. Today's ids are the same in every mode (training.data truncates before any
    batching); it is in the key so that ids made for one batching are never handed to another."""
    if config.stage == "dpo":
        return "padded"  # TRL 1.16 pads DPO batches (see trainer.dpo_config)
    if config.packing:
        return "packed"
    return "padding_free" if config.uses_padding_free else "padded"


def cache_inputs(config, tokenizer, rows) -> dict[str, Any]:
    """Everything the token ids of `rows` depend on (the key is their sha256), with the template already set."""
    dpo = config.stage == "dpo"
    inputs: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "deita_hub": __version__,
        "stage": config.stage,
        "data": {
            "rows": len(rows),
            "fingerprint": pairs_fingerprint(rows.pairs) if dpo else rows.conversations_fingerprint,
        },
        "tokenizer": tokenizer_identity(tokenizer, config.model_revision),
        "chat_template": _sha256(tokenizer.chat_template or ""),
        "max_length": config.max_length,
        "batching": batching_mode(config),
    }
    if dpo:  # a pair the template cannot split stops the run (error) or is left out (skip)
        inputs["on_invalid"] = config.on_invalid
    return inputs


def cache_key(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@contextmanager
def quiet_datasets():
    """No `datasets` progress bars for saving or loading an entry, or for TRL's preparation of the tokenized rows
    (one log line says what happened)."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _read(folder: Path, key: str, *, warn: bool = True) -> Tokenized | None:
    """The entry at `folder`, or None when there is none or it is incomplete or damaged (a miss, with a warning)."""
    if not folder.exists():
        return None
    import pyarrow as pa
    from datasets import load_from_disk

    try:
        entry = json.loads((folder / ENTRY_RECORD).read_text(encoding="utf-8"))
        if entry.get("key") != key:
            raise ValueError(f"its {ENTRY_RECORD} is for key {str(entry.get('key'))[:12]}")
        stats = entry["stats"]
        # In memory: the Trainer's `map`s would otherwise write their cache files into the entry.
        with quiet_datasets():
            dataset = load_from_disk(str(folder / DATASET_DIR), keep_in_memory=True)
        if len(dataset) != stats["rows"]:
            raise ValueError(f"{len(dataset)} rows where {ENTRY_RECORD} says {stats['rows']}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pa.ArrowException) as exc:
        if warn:
            log.warning("tokenized data: ignoring the cache entry %s (%s); tokenizing again", folder, exc)
        return None
    return Tokenized(
        dataset=dataset,
        num_tokens=stats["tokens"],
        num_truncated=stats["truncated"],
        num_dropped=stats["dropped"],
        skipped=[(int(row), str(reason)) for row, reason in stats.get("skipped", [])],
    )


def _write(folder: Path, key: str, inputs: dict[str, Any], tokenized: Tokenized) -> bool:
    entry = {
        "key": key,
        "inputs": inputs,
        "stats": {
            "rows": len(tokenized.dataset),
            "tokens": tokenized.num_tokens,
            "truncated": tokenized.num_truncated,
            "dropped": tokenized.num_dropped,
            "skipped": tokenized.skipped,
        },
    }
    try:
        with atomic_folder(folder, overwrite=True) as tmp, quiet_datasets():
            tokenized.dataset.save_to_disk(str(tmp / DATASET_DIR))
            write_text(tmp / ENTRY_RECORD, json.dumps(entry, indent=1, ensure_ascii=False) + "\n")
    except (OSError, DeitaHubError) as exc:  # a cache that cannot be written costs time, not the run
        log.warning("tokenized data: could not write the cache (%s); training goes on without it", exc)
        return False
    return True


def load_or_tokenize(inputs: dict[str, Any], tokenize: Callable[[], Tokenized], *, unit: str) -> Tokenized:
    """The cached entry for `inputs`, else `tokenize()` stored as one. `unit` names the rows in the log line."""
    key = cache_key(inputs)
    root = cache_root()
    folder = root / key

    def reused(tokenized: Tokenized) -> Tokenized:
        log.info(
            "tokenized data: reused cache %s (%d %s, %d tokens)", key[:12], len(tokenized.dataset), unit,
            tokenized.num_tokens,
        )  # fmt: skip
        return tokenized

    if (folder / ENTRY_RECORD).is_file() and (cached := _read(folder, key, warn=False)) is not None:
        return reused(cached)  # entries appear whole: no lock needed to read a finished one
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("tokenized data: no cache (%s: %s); tokenizing", root, exc)
        return tokenize()
    with file_lock(root / f"{key}.lock"):
        cached = _read(folder, key)  # another process may have written it while this one waited
        if cached is not None:
            return reused(cached)
        tokenized = tokenize()
        if _write(folder, key, inputs, tokenized):
            log.info(
                "tokenized data: wrote cache %s (%d %s, %d tokens)", key[:12], len(tokenized.dataset), unit,
                tokenized.num_tokens,
            )  # fmt: skip
        return tokenized
