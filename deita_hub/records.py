"""The records deita-hub writes beside its outputs, and the one home of their file names.

A training run writes `deita_run.json` (a `RunRecord`) into every checkpoint, its final folder and merged
folders; a dataset build writes `deita_build.json` (a `BuildRecord`) into the dataset folder. Cards are rendered
from these records only, so they hold no absolute local path and no token. Both are schema 1: the JSON keys and
their order are the contract with the cards and with published repos, and `to_dict()` writes them in that order.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError
from deita_hub.io import write_text

SCHEMA = 1

# File names shared by the stages that write them and the ones that read them back.
RUN_RECORD = "deita_run.json"  # training: in every checkpoint, OUTPUT_DIR/final and merged folders
BUILD_RECORD = "deita_build.json"  # dataset build: at the dataset folder's root
TRAIN_CONFIG = "deita_train_config.yaml"  # training: the resolved config, in OUTPUT_DIR
INVALID_ROWS = "invalid_rows.jsonl"  # dataset build: pool rows skipped, each with its reason
CARD = "README.md"  # the Hub renders a repo's README.md as its card
SCORES_PLOT = "assets/scores.png"  # dataset card's score histogram, relative to the card
LOSS_PLOT = "assets/loss.png"  # model card's loss curve, relative to the card
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's marker of an adapter folder
MODEL_CONFIG = "config.json"  # transformers' marker of a model folder
TRAINER_STATE = "trainer_state.json"  # transformers' Trainer state in every checkpoint

# Files named after an output file `out` (`scores.jsonl` -> `scores.jsonl.json`).
METADATA_SUFFIX = ".json"  # scoring metadata / embedding sidecar: provenance of `out`
FAILURES_SUFFIX = ".failures.jsonl"  # scoring: rows that could not be scored, each with its reason
PARTIAL_SUFFIX = ".partial"  # scoring's checkpoint folder / embedding's partial matrix, until `out` is done


def _from_dict(cls, data: Any, source: str):
    """`cls(**data)` that names the file and the field when the JSON is not a record of this schema."""
    if not isinstance(data, dict):
        raise DeitaHubError(f"{source}: expected a JSON object")
    if data.get("schema") != SCHEMA:
        raise DeitaHubError(
            f"{source}: field 'schema' is {data.get('schema')!r}; this deita-hub reads schema {SCHEMA}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise DeitaHubError(f"{source}: unknown field(s) {unknown}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise DeitaHubError(f"{source}: field '{missing[0]}' is missing")
    return cls(**data)


def _to_dict(record) -> dict[str, Any]:
    # Shallow on purpose: the nested sections are plain JSON already, and the keys keep the fields' order.
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


@dataclass(kw_only=True)
class RunRecord:
    """`deita_run.json`: what a training run (or a merge) did; the model card is rendered from it."""

    schema: int = SCHEMA
    kind: str  # "full" (all weights), "adapter" (LoRA/QLoRA) or "merged" (an adapter folded into its base)
    method: str  # "full", "lora" or "qlora"
    base_model: str  # a Hub id, or a local folder's basename
    base_model_revision: str | None = None  # the pinned base revision; absent in records that predate it
    model_name: str
    hub_repo: str | None  # the repo the run pushes to, if any
    template: str  # the chat template's name (Vicuna v1.1)
    language: list[str]
    license: str
    dataset: dict[
        str, Any
    ]  # id, config, split, revision, num_rows, fingerprint, build (the dataset's record)
    hyperparameters: dict[str, Any]  # in the vocabulary of transformers' Trainer cards
    lora: dict[str, Any] | None
    quantization: dict[str, Any] | None
    results: dict[str, Any]  # global_step, epoch, train_loss, train_runtime_s, log_history, eval_loss
    versions: dict[str, str | None]  # package versions, None for a package not installed
    created_at: str  # UTC, ISO 8601 to the second
    stage: str = "sft"  # "sft" or "dpo"; absent in records that predate DPO
    # stage dpo: beta, loss_type, reference_model, precompute_ref_log_probs, and the lineage: sft_model (the
    # starting model = base_model, with its revision) and sft_datasets (what that model was trained on)
    dpo: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> RunRecord:
        return _from_dict(cls, data, RUN_RECORD)

    def write(self, folder: str | Path) -> Path:
        """`folder/deita_run.json`, atomically: a checkpoint is complete once its record exists."""
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        return write_text(Path(folder) / RUN_RECORD, text)

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord | None:
        """The record in `folder`, or None when it has none."""
        path = Path(folder) / RUN_RECORD
        if not path.is_file():
            return None
        return cls.from_dict(_read_json(path))


@dataclass(kw_only=True)
class BuildRecord:
    """`deita_build.json`: how a dataset was built (recipe, pool, scores, embedder, every subset's selection)."""

    schema: int = SCHEMA
    name: str  # the recipe's name
    recipe: dict[str, Any]  # the resolved recipe; local paths reduced to basenames
    pool: dict[str, Any]  # the pool's provenance: source, fingerprint, rows
    scores: dict[str, Any] | None  # where the scores came from and their distribution; None when unused
    embedding: dict[str, Any] | None  # the embedder's provenance; None when no subset needed embeddings
    subsets: list[dict[str, Any]]  # per subset: name, selection config, rows, shards, stats
    invalid_rows: int  # pool rows skipped (written to invalid_rows.jsonl with their reasons)
    plot: str | None  # the score histogram, relative to the dataset folder
    versions: dict[str, str]

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, data: Any) -> BuildRecord:
        return _from_dict(cls, data, BUILD_RECORD)

    def write(self, folder: str | Path) -> Path:
        # default=str: recipe values such as paths are recorded as text
        text = json.dumps(self.to_dict(), indent=2, default=str) + "\n"
        return write_text(Path(folder) / BUILD_RECORD, text)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeitaHubError(
            f"{path.name}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
