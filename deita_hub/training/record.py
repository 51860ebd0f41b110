"""`deita_run.json`: what a run did, written into every checkpoint, the final folder and merged folders.

The schema is the contract with `deita_hub.cards` (see the run-record notes): cards are rendered from this record
only. It holds no absolute local path (models and datasets are Hub ids or folder basenames) and no token.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from deita_hub import __version__
from deita_hub.chat_template import TEMPLATE_NAME

RUN_RECORD = "deita_run.json"
SCHEMA = 1
_DISTRIBUTIONS = (
    "transformers",
    "torch",
    "datasets",
    "tokenizers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
)
_LOG_KEYS = ("step", "epoch", "loss", "learning_rate", "grad_norm", "eval_loss")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["deita_hub"] = __version__
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def model_reference(model: str) -> str:
    """A Hub id stays; a local folder becomes its basename."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def training_log(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Trainer's log entries that carry a loss, reduced to the record's keys."""
    entries = []
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue
        entries.append({key: entry[key] for key in _LOG_KEYS if key in entry})
    return entries


def results(state, *, train_loss: float | None = None, runtime_s: float | None = None) -> dict[str, Any]:
    """The `results` section from a `transformers.TrainerState`.

    Mid-run (checkpoints) `train_loss` is the mean of the logged losses so far, which is what the Trainer reports
    at the end when every step is logged.
    """
    history = training_log(state.log_history)
    losses = [entry["loss"] for entry in history if "loss" in entry]
    eval_losses = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    if train_loss is None and losses:
        train_loss = sum(losses) / len(losses)
    return {
        "global_step": state.global_step,
        "epoch": state.epoch,
        "train_loss": train_loss,
        "train_runtime_s": runtime_s,
        "log_history": history,
        "eval_loss": eval_losses[-1] if eval_losses else None,
    }


def write_record(folder: str | Path, record: dict[str, Any]) -> Path:
    """Write `folder/deita_run.json` through a temp file, so a reader never sees half a record."""
    path = Path(folder) / RUN_RECORD
    tmp = path.with_name(f".{RUN_RECORD}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_record(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_card(folder: str | Path) -> Path:
    """deita-hub's model card from the record. Called after every save: TRL and PEFT write their own README."""
    from deita_hub.cards import write_model_card

    return write_model_card(Path(folder))


def new_record(
    *,
    kind: str,
    method: str,
    base_model: str,
    model_name: str,
    hub_repo: str | None,
    dataset: dict[str, Any],
    hyperparameters: dict[str, Any],
    lora: dict[str, Any] | None,
    quantization: dict[str, Any] | None,
    results: dict[str, Any],
    license: str,
    language: list[str],
    base_model_revision: str | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "method": method,
        "base_model": base_model,
        "base_model_revision": base_model_revision,
        "model_name": model_name,
        "hub_repo": hub_repo,
        "template": TEMPLATE_NAME,
        "language": list(language),
        "license": license,
        "dataset": dataset,
        "hyperparameters": hyperparameters,
        "lora": lora,
        "quantization": quantization,
        "results": results,
        "versions": package_versions(),
        "created_at": utc_now(),
    }
