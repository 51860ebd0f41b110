"""Filling in `deita_run.json` (a `deita_hub.records.RunRecord`) from a run: versions, results, names.

The record is written into every checkpoint, the final folder and merged folders. The schema is the contract with
`deita_hub.cards`: cards are rendered from this record only. It holds no absolute local path (models and
datasets are Hub ids or folder basenames) and no token.
"""

from __future__ import annotations

from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from deita_hub import __version__
from deita_hub.chat_template import TEMPLATE_NAME
from deita_hub.records import RunRecord

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
# DPOTrainer also logs the implicit rewards: their margin and accuracy are what a preference run is judged by.
_LOG_KEYS = (
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "eval_loss",
    "rewards/margins",
    "rewards/accuracies",
)


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


def write_record(folder: str | Path, record: RunRecord) -> Path:
    """Write `folder/deita_run.json` atomically, so a reader never sees half a record."""
    return record.write(folder)


def read_record(folder: str | Path) -> RunRecord | None:
    return RunRecord.read(folder)


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
    stage: str = "sft",
    dpo: dict[str, Any] | None = None,
) -> RunRecord:
    return RunRecord(
        kind=kind,
        method=method,
        base_model=base_model,
        base_model_revision=base_model_revision,
        model_name=model_name,
        hub_repo=hub_repo,
        template=TEMPLATE_NAME,
        language=list(language),
        license=license,
        dataset=dataset,
        hyperparameters=hyperparameters,
        lora=lora,
        quantization=quantization,
        results=results,
        versions=package_versions(),
        created_at=utc_now(),
        stage=stage,
        dpo=dpo,
    )


def sft_lineage(model: str, revision: str | None) -> dict[str, Any]:
    """What the SFT model a DPO run starts from was trained on, from its `deita_run.json` (a local folder or the
    Hub repo at `revision`); empty lists when the model was not trained by deita-hub."""
    from deita_hub.hub import is_repo_id, read_json_file
    from deita_hub.records import RUN_RECORD

    path = Path(model)
    data = None
    if path.is_dir():
        record = read_record(path)
        data = record.to_dict() if record is not None else None
    elif is_repo_id(model):
        data = read_json_file(model, RUN_RECORD, repo_type="model", revision=revision)
    datasets: list[str] = []
    if isinstance(data, dict):
        dataset = data.get("dataset") or {}
        earlier = (data.get("dpo") or {}).get("sft_datasets") or []
        datasets = [*earlier, *([dataset["id"]] if dataset.get("id") else [])]
    return {
        "sft_model": model_reference(model),
        "sft_model_revision": revision,
        "sft_base_model": data.get("base_model") if isinstance(data, dict) else None,
        "sft_datasets": list(dict.fromkeys(datasets)),
    }
