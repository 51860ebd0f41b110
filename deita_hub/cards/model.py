"""Model cards rendered from what a run recorded, never typed by hand.

Training writes `deita_run.json` (schema 1, see the run-record contract) into every checkpoint, the final output
and the merged folder; `write_model_card(folder)` turns it into `README.md` (YAML metadata built with
huggingface_hub's `ModelCardData`, body rendered from `model_cards/model_card.md.j2`) plus a loss curve
`assets/loss.png` next to the card. The card's sections follow the hand-written DEITA-7B-v1.0-sft card; its
training hyperparameter list uses that card's vocabulary (the one transformers' Trainer writes), so a run with
the seed's configuration lists exactly the seed's values.

Eval-results file (`deita-hub card RUN_DIR --eval-results results.json`), JSON, every key optional:

    {
      "mt_bench": 7.22,          # MT-Bench average score, 1-10 (GPT-4 judge)
      "alpaca_eval": 80.78,      # AlpacaEval win rate, percent
      "open_llm_avg": 64.94,     # Open LLM Leaderboard average, percent
      "source": "https://...",   # where the numbers come from: a URL (goes into the model-index) or one line
      "baselines": [             # other models' published rows, shown under this model's row, as given
        {"model": "Random 6K", "align": "SFT", "data_size": "6K SFT",
         "mt_bench": 5.89, "alpaca_eval": 56.90, "open_llm_avg": 61.72}
      ]
    }

The columns are the seed card's (MT-Bench, AlpacaEval(%), OpenLLM (Avg.)). A missing or null value is shown as
"–" (not evaluated) and left out of the model-index; nothing is filled in. Unknown keys are refused so that a
typo (`"mtbench"`) cannot silently drop a number.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from deita_hub import __version__
from deita_hub.cards.templates import render_template
from deita_hub.chat_template import TEMPLATE_NAME, render_vicuna
from deita_hub.errors import DeitaHubError
from deita_hub.io import atomic_file, write_text
from deita_hub.records import CARD, LOSS_PLOT, RUN_RECORD

CARD_TEMPLATE = "model_card.md.j2"

HUB_URL = "https://huggingface.co"
DEITA_URL = "https://github.com/hkust-nlp/deita"
DEITA_PAPER_URL = "https://arxiv.org/abs/2312.15685"
DEITA_HUB_URL = "https://github.com/deita-hub/deita-hub"
VICUNA_TEMPLATE_URL = "https://github.com/lm-sys/FastChat/blob/main/fastchat/conversation.py"
# The ICLR 2024 version of the paper (OpenReview entry), the venue the paper was published at.
DEITA_BIBTEX = """@inproceedings{
liu2024what,
title={What Makes Good Data for Alignment? A Comprehensive Study of Automatic Data Selection in Instruction Tuning},
author={Wei Liu and Weihao Zeng and Keqing He and Yong Jiang and Junxian He},
booktitle={The Twelfth International Conference on Learning Representations},
year={2024},
url={https://openreview.net/forum?id=BTKAeLqLMw}
}"""

# Eval-results keys -> (table column, model-index dataset type, dataset name, metric type, metric name).
BENCHMARKS = {
    "mt_bench": (
        "MT-Bench",
        "HuggingFaceH4/mt_bench_prompts",
        "MT-Bench",
        "mt_bench_score",
        "MT-Bench (1-10)",
    ),
    "alpaca_eval": (
        "AlpacaEval(%)",
        "tatsu-lab/alpaca_eval",
        "AlpacaEval",
        "win_rate",
        "AlpacaEval win rate (%)",
    ),
    "open_llm_avg": (
        "OpenLLM (Avg.)",
        "open-llm-leaderboard",
        "Open LLM Leaderboard",
        "average",
        "OpenLLM (Avg.)",
    ),
}
NOT_EVALUATED = "–"
_BASELINE_KEYS = {"model", "align", "data_size", "reported_by", *BENCHMARKS}
# `deita-hub eval`'s results.json is an eval-results file too: its detail keys are accepted (and not shown here).
_EVAL_DETAIL_KEYS = {"model", "revision", "suites", "provenance"}
_EVAL_KEYS = {"schema", "source", "baselines", *BENCHMARKS, *_EVAL_DETAIL_KEYS}
# The published rows the seed card compares against, as the Deita paper (arXiv 2312.15685, Table 4) reports them.
PAPER_BASELINES = (
    {
        "model": "Deita 7B v1.0 SFT",
        "align": "SFT",
        "data_size": "6K SFT",
        "reported_by": "the Deita paper",
        "mt_bench": 7.22,
        "alpaca_eval": 80.78,
        "open_llm_avg": 64.94,
    },
    {
        "model": "Random 10K SFT",
        "align": "SFT",
        "data_size": "10K SFT",
        "reported_by": "the Deita paper",
        "mt_bench": 5.89,
        "alpaca_eval": 56.90,
        "open_llm_avg": 61.72,
    },
    {
        "model": "DEITA-7B-v1.0",
        "align": "SFT + DPO",
        "data_size": "6K SFT + 10K DPO",
        "reported_by": "the Deita paper",
        "mt_bench": 7.55,
        "alpaca_eval": 90.06,
        "open_llm_avg": 69.86,
    },
)

# Adapter repos load with PEFT; full and merged weights with transformers. A LoRA merged back into its base is,
# to the Hub's model tree, a fine-tune of that base: the Hub's `merge` relation means a merge of several models.
_LIBRARY = {"adapter": "peft", "full": "transformers", "merged": "transformers"}
_RELATION = {"adapter": "adapter", "full": "finetune", "merged": "finetune"}

_VERSION_NAMES = {
    "transformers": "Transformers",
    "torch": "PyTorch",
    "datasets": "Datasets",
    "tokenizers": "Tokenizers",
    "peft": "PEFT",
    "trl": "TRL",
    "bitsandbytes": "bitsandbytes",
    "accelerate": "Accelerate",
    "deita_hub": "deita-hub",
}
# Optimizers that are plain Adam(W) in full precision; transformers' Trainer cards call them "Adam". With zero
# weight decay (the Trainer's default) AdamW is Adam, so the seed's "Adam with betas=..." line stays exact.
_PLAIN_ADAM = {"adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adam", "adamw"}
_MAX_LOSS_ROWS = 200

_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_ABS_PATH_RE = re.compile(
    r"(?<![\w.:/~\-])(?:/(?:home|Users|root|tmp|work|mnt|data|scratch|var|opt|srv|private|media|run|nfs|gpfs"
    r"|lustre)/[^\s)\]\"'`|]*|[A-Za-z]:\\[^\s)\]\"'`|]+|file://\S+)"
)


# --- eval results ------------------------------------------------------------------------------------------


def read_eval_results(path: str | Path) -> dict:
    """Read and validate an eval-results JSON file (format in the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DeitaHubError(f"{path.name}: eval-results file not found") from exc
    except json.JSONDecodeError as exc:
        raise DeitaHubError(
            f"{path.name}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    return validate_eval_results(data, source=path.name)


def validate_eval_results(data: Any, *, source: str = "eval results") -> dict:
    if not isinstance(data, dict):
        raise DeitaHubError(f"{source}: expected a JSON object with mt_bench / alpaca_eval / open_llm_avg")
    unknown = sorted(set(data) - _EVAL_KEYS)
    if unknown:
        raise DeitaHubError(f"{source}: unknown key(s) {unknown}; known: {sorted(_EVAL_KEYS)}")
    if data.get("schema", 1) != 1:
        raise DeitaHubError(f"{source}: field 'schema' is {data['schema']!r}; this deita-hub reads schema 1")
    for key in BENCHMARKS:
        _check_number(data.get(key), f"{source}: field '{key}'")
    if data.get("source") is not None and not isinstance(data["source"], str):
        raise DeitaHubError(f"{source}: field 'source' must be a string (a URL or one line)")
    baselines = data.get("baselines") or []
    if not isinstance(baselines, list):
        raise DeitaHubError(f"{source}: field 'baselines' must be a list of rows")
    for i, row in enumerate(baselines):
        where = f"{source}: baselines[{i}]"
        if not isinstance(row, dict) or not isinstance(row.get("model"), str) or not row["model"]:
            raise DeitaHubError(f"{where}: each row needs a 'model' name")
        unknown = sorted(set(row) - _BASELINE_KEYS)
        if unknown:
            raise DeitaHubError(f"{where}: unknown key(s) {unknown}; known: {sorted(_BASELINE_KEYS)}")
        for key in BENCHMARKS:
            _check_number(row.get(key), f"{where}, field '{key}'")
        if row.get("reported_by") is not None and not isinstance(row["reported_by"], str):
            raise DeitaHubError(f"{where}, field 'reported_by' must be a string (who published the numbers)")
    for key in ("suites", "provenance"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise DeitaHubError(f"{source}: field '{key}' must be an object")
    return data


def _check_number(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DeitaHubError(f"{where} must be a finite number or null, got {value!r}")


def _eval_result_objects(eval_results: dict) -> list:
    from huggingface_hub import EvalResult

    source = eval_results.get("source")
    source_url = source if isinstance(source, str) and source.startswith(("https://", "http://")) else None
    objects = []
    for key, (_, dataset_type, dataset_name, metric_type, metric_name) in BENCHMARKS.items():
        value = eval_results.get(key)
        if value is None:
            continue
        objects.append(
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                metric_type=metric_type,
                metric_value=value,
                metric_name=metric_name,
                source_url=source_url,
            )
        )
    return objects


def _score(value: Any) -> str:
    return NOT_EVALUATED if value is None else f"{value:.2f}"


def _performance_notes(eval_results: dict) -> list[str]:
    """Footnotes under the table: who reported the † rows, and the spread of deita-hub eval's MT-Bench."""
    notes = []
    reporters = dict.fromkeys(
        r["reported_by"] for r in eval_results.get("baselines") or [] if r.get("reported_by")
    )
    for reporter in reporters:
        paper = f" ([arXiv 2312.15685]({DEITA_PAPER_URL}))" if reporter == "the Deita paper" else ""
        notes.append(f"†: as reported by {reporter}{paper}, not measured by deita-hub.")
    mt = ((eval_results.get("suites") or {}).get("mt-bench") or {}).get("score") or {}
    if mt.get("median") is not None and eval_results.get("mt_bench") is not None:
        runs = [f"{v:.2f}" for v in mt.get("runs") or [] if v is not None]
        notes.append(
            f"MT-Bench of this model: median of {len(mt.get('runs') or [])} judge runs "
            f"({', '.join(runs)}; min {mt['min']:.2f}, max {mt['max']:.2f})."
        )
    return notes


def _performance_rows(eval_results: dict, model_name: str, data_size: str) -> list[list[str]]:
    rows = [
        [f"**{model_name}** (this model)", "SFT", data_size]
        + [_score(eval_results.get(k)) for k in BENCHMARKS]
    ]
    for row in eval_results.get("baselines") or []:
        rows.append(
            [
                row["model"] + ("†" if row.get("reported_by") else ""),
                row.get("align") or NOT_EVALUATED,
                row.get("data_size") or NOT_EVALUATED,
            ]
            + [_score(row.get(k)) for k in BENCHMARKS]
        )
    return rows


# --- record ------------------------------------------------------------------------------------------------


def read_run_record(folder: str | Path) -> dict:
    path = Path(folder) / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DeitaHubError(
            f"{Path(folder).name}: no {RUN_RECORD} (is this a deita-hub training output?)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise DeitaHubError(
            f"{RUN_RECORD}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}"
        ) from exc
    if not isinstance(record, dict):
        raise DeitaHubError(f"{RUN_RECORD}: expected a JSON object")
    return record


def _field(record: dict, dotted: str, *, optional: bool = False) -> Any:
    """`record["a"]["b"]` for "a.b"; a missing required field names itself."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            if optional:
                return None
            raise DeitaHubError(f"{RUN_RECORD}: field '{dotted}' is missing")
        value = value[part]
    if value is None and not optional:
        raise DeitaHubError(f"{RUN_RECORD}: field '{dotted}' is null")
    return value


def _hub_link(repo_id: str, kind: str = "model") -> str | None:
    """A Hub URL for `org/name` ids; local folder basenames have no page."""
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", repo_id):
        return None
    return f"{HUB_URL}/{'datasets/' if kind == 'dataset' else ''}{repo_id}"


def _data_size(num_rows: int) -> str:
    return f"{num_rows // 1000}K SFT" if num_rows >= 1000 and num_rows % 1000 == 0 else f"{num_rows:,} SFT"


def _fmt(value: Any) -> str:
    """Numbers as Python prints them (2e-05, 0.1, 6.0: the Trainer card's formatting), lists comma-joined."""
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _optimizer(opt: dict) -> str:
    name = str(opt.get("name", "")).lower()
    weight_decay = opt.get("weight_decay") or 0.0
    if name in _PLAIN_ADAM:
        text = "AdamW" if weight_decay else "Adam"
    elif "adam" in name:
        text = f"{'AdamW' if weight_decay else 'Adam'} ({name})"
    else:
        text = name or "unknown"
    betas, epsilon = opt.get("betas"), opt.get("epsilon")
    if betas is not None:
        text += f" with betas=({betas[0]},{betas[1]})"
    if epsilon is not None:
        text += f" and epsilon={epsilon}" if betas is not None else f" with epsilon={epsilon}"
    if weight_decay:
        text += f" and weight_decay={weight_decay}"
    return text


def hyperparameter_list(record: dict) -> list[tuple[str, str]]:
    """The seed card's "Training hyperparameters" list, names and formatting, from the run record."""
    hp = _field(record, "hyperparameters")
    get = lambda key: _field(record, f"hyperparameters.{key}")  # noqa: E731
    items = [
        ("learning_rate", _fmt(get("learning_rate"))),
        ("train_batch_size", _fmt(get("train_batch_size"))),
        ("eval_batch_size", _fmt(get("eval_batch_size"))),
        ("seed", _fmt(get("seed"))),
        ("distributed_type", _fmt(get("distributed_type"))),
        ("num_devices", _fmt(get("num_devices"))),
        ("gradient_accumulation_steps", _fmt(get("gradient_accumulation_steps"))),
        ("total_train_batch_size", _fmt(get("total_train_batch_size"))),
        ("total_eval_batch_size", _fmt(get("total_eval_batch_size"))),
        ("optimizer", _optimizer(get("optimizer"))),
        ("lr_scheduler_type", _fmt(get("lr_scheduler_type"))),
        ("lr_scheduler_warmup_ratio", _fmt(get("lr_scheduler_warmup_ratio"))),
    ]
    # Like the Trainer's card: a step budget replaces the epoch count when one was set.
    max_steps = hp.get("max_steps", -1)
    if max_steps is not None and max_steps > 0:
        items.append(("training_steps", _fmt(max_steps)))
    else:
        items.append(("num_epochs", _fmt(float(get("num_epochs")))))
    return items


def _extra_settings(record: dict) -> list[tuple[str, str]]:
    hp = _field(record, "hyperparameters")
    keys = ("max_length", "bf16", "packing", "padding_free", "assistant_only_loss")
    return [("method", record["method"])] + [(k, _fmt(hp[k])) for k in keys if hp.get(k) is not None]


def _lora_settings(record: dict) -> list[tuple[str, str]]:
    lora = record.get("lora")
    if not lora:
        return []
    names = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}
    items = [(names.get(k, k), _fmt(v)) for k, v in lora.items() if v is not None]
    quant = record.get("quantization") or {}
    items += [(k, _fmt(v)) for k, v in quant.items() if v is not None]
    return items


def _dpo_settings(dpo: dict) -> list[tuple[str, str]]:
    """DPO's hyperparameters and lineage: the SFT model it started from and what that model was trained on."""
    names = ("beta", "loss_type", "reference_model", "sft_model", "sft_model_revision", "sft_base_model")
    items = [(name, _fmt(dpo[name])) for name in names if dpo.get(name) is not None]
    if dpo.get("sft_datasets"):
        items.append(("sft_datasets", ", ".join(dpo["sft_datasets"])))
    return items


def _loss_rows(record: dict) -> tuple[list[dict], int]:
    """Logged training/eval losses merged per step, thinned to at most _MAX_LOSS_ROWS (the last step kept)."""
    history = _field(record, "results.log_history", optional=True) or []
    by_step: dict[int, dict] = {}
    for entry in history:
        if "step" not in entry or ("loss" not in entry and "eval_loss" not in entry):
            continue
        row = by_step.setdefault(int(entry["step"]), {"step": int(entry["step"])})
        for key in ("epoch", "loss", "eval_loss", "learning_rate", "grad_norm"):
            if entry.get(key) is not None:
                row[key] = entry[key]
    rows = [by_step[s] for s in sorted(by_step)]
    every = max(1, math.ceil(len(rows) / _MAX_LOSS_ROWS))
    shown = rows[::every]
    if rows and shown[-1] is not rows[-1]:
        shown.append(rows[-1])
    table = [
        {
            "step": str(r["step"]),
            "epoch": f"{r['epoch']:.2f}" if "epoch" in r else NOT_EVALUATED,
            "loss": f"{r['loss']:.4f}" if "loss" in r else NOT_EVALUATED,
            "eval_loss": f"{r['eval_loss']:.4f}" if "eval_loss" in r else NOT_EVALUATED,
            "learning_rate": f"{r['learning_rate']:.3g}" if "learning_rate" in r else NOT_EVALUATED,
        }
        for r in shown
    ]
    return table, every


def _summarise_build(build: dict) -> list[tuple[str, str]]:
    """deita_build.json (or its "selection" part) as "key: value" lines, the selection parameters first."""
    selection = build.get("selection") if isinstance(build.get("selection"), dict) else build
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any, depth: int) -> None:
        if isinstance(value, dict) and depth < 3:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v, depth + 1)
        elif value is not None:
            flat[prefix] = _strip_path(_fmt(value) if not isinstance(value, dict) else json.dumps(value))

    walk("", selection, 0)
    if selection is not build:  # the pool's fingerprint lives beside the selection in the full file
        for key in ("pool", "pool_fingerprint"):
            if key in build:
                walk(key, build[key], 1)
    first = (
        "method",
        "budget",
        "max_similarity",
        "embedder",
        "scorers",
        "pool_fingerprint",
        "pool.fingerprint",
    )
    ordered = [k for f in first for k in flat if k == f or k.startswith(f + ".")]
    ordered += [k for k in flat if k not in ordered]
    return [(k, flat[k]) for k in dict.fromkeys(ordered)]


def _strip_path(text: str) -> str:
    """Local paths in provenance reduce to their basename, as the run record's own paths are."""
    if _ABS_PATH_RE.fullmatch(text) or (os.path.isabs(text) and " " not in text):
        return Path(text.replace("\\", "/")).name
    return text


def scan_for_secrets(text: str) -> list[str]:
    """Tokens and absolute local paths in `text` (what a published card must never contain)."""
    found = [f"token-like string {m.group()[:5]}…" for m in _TOKEN_RE.finditer(text)]
    env_token = os.environ.get("HF_TOKEN") or ""
    if len(env_token) >= 8 and env_token in text:
        found.append("the HF_TOKEN value")
    found += [f"absolute path {m.group()!r}" for m in _ABS_PATH_RE.finditer(text)]
    home = str(Path.home())
    if len(home) > 1 and home in text:
        found.append(f"the home folder {home!r}")
    return found


# --- the card ----------------------------------------------------------------------------------------------


def card_context(
    record: dict,
    *,
    eval_results: dict | None = None,
    dataset_build: dict | None = None,
    loss_plot: str | None = None,
) -> dict:
    """Everything the template shows, computed from the record (and the optional eval results/provenance)."""
    if _field(record, "schema") != 1:
        raise DeitaHubError(
            f"{RUN_RECORD}: field 'schema' is {record['schema']!r}; this deita-hub reads schema 1"
        )
    kind = _field(record, "kind")
    if kind not in _LIBRARY:
        raise DeitaHubError(f"{RUN_RECORD}: field 'kind' is {kind!r}; expected one of {sorted(_LIBRARY)}")
    method = _field(record, "method")
    base_model = _field(record, "base_model")
    model_name = _field(record, "model_name")
    dataset_id = _field(record, "dataset.id")
    num_rows = int(_field(record, "dataset.num_rows"))
    template = _field(record, "template")
    if eval_results is not None:
        eval_results = validate_eval_results(eval_results)
    if dataset_build is None:
        dataset_build = _field(record, "dataset.build", optional=True)

    eos = record.get("eos_token") or "</s>"  # Llama/Mistral EOS, the one render_vicuna and the seed card use
    example = None
    if template == TEMPLATE_NAME:
        example = render_vicuna(
            [
                {"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "How are you?"},
            ],
            eos_token=eos,
            add_generation_prompt=True,
        )
    results = _field(record, "results")
    loss_rows, loss_every = _loss_rows(record)
    versions = {k: v for k, v in _field(record, "versions").items() if v is not None}
    version_items = [(name, versions[k]) for k, name in _VERSION_NAMES.items() if k in versions]
    version_items += [(k, v) for k, v in versions.items() if k not in _VERSION_NAMES]
    method_text = {"qlora": "QLoRA", "lora": "LoRA", "full": "full fine-tuning"}.get(method, method)
    base_url = _hub_link(base_model)
    base_md = f"[{base_model}]({base_url})" if base_url else f"`{base_model}`"
    base_revision = record.get("base_model_revision")  # absent in records written before it was recorded
    if base_revision:
        base_md += (
            f" (revision [`{base_revision}`]({base_url}/tree/{base_revision}))"
            if base_url
            else f" (revision `{base_revision}`)"
        )
    dataset_url = _hub_link(dataset_id, "dataset")
    dataset_link = f"[{dataset_id}]({dataset_url})" if dataset_url else f"`{dataset_id}`"
    config = _field(record, "dataset.config", optional=True)
    split = _field(record, "dataset.split", optional=True)
    revision = _field(record, "dataset.revision", optional=True)
    fingerprint = _field(record, "dataset.fingerprint", optional=True)
    details = [
        "a local dataset" if not dataset_url else None,
        f"config `{config}`" if config else None,
        f"split `{split}`" if split else None,
        f"revision `{revision}`" if revision else None,
        f"{num_rows:,} rows",
        f"fingerprint `{fingerprint}`" if fingerprint else None,
    ]
    dataset_md = f"{dataset_link} ({', '.join(d for d in details if d)})"
    trained_on = f"trained on {num_rows:,} conversations from {dataset_link}"
    dpo = record.get("dpo") if record.get("stage") == "dpo" else None
    if dpo:
        trained_on = f"trained with DPO on {num_rows:,} preference pairs from {dataset_link}"
    if dataset_build:
        trained_on += " selected by deita-hub (see Data selection)"
    summary, model_type = {
        "adapter": (
            f"{model_name} is a {method_text} adapter for {base_md}, {trained_on}.",
            f"{method_text} adapter (PEFT) for a causal language model, supervised fine-tuning",
        ),
        "full": (
            f"{model_name} is a fine-tuned version of {base_md}, {trained_on}.",
            "Causal language model, supervised fine-tuning of all weights",
        ),
        "merged": (
            f"{model_name} is {base_md} with a {method_text} adapter merged into its weights, {trained_on}.",
            f"Causal language model, supervised fine-tuning with a {method_text} adapter merged into the base weights",
        ),
    }[kind]
    if dpo:
        model_type = model_type.replace("supervised fine-tuning", "direct preference optimization (DPO)")
    results_items = [
        ("global_step", results.get("global_step")),
        ("epoch", None if results.get("epoch") is None else f"{results['epoch']:.2f}"),
        ("train_loss", None if results.get("train_loss") is None else f"{results['train_loss']:.4f}"),
        ("eval_loss", None if results.get("eval_loss") is None else f"{results['eval_loss']:.4f}"),
        (
            "train_runtime",
            None if results.get("train_runtime_s") is None else f"{results['train_runtime_s']:.1f} s",
        ),
    ]
    results_items = [(k, NOT_EVALUATED if v is None else v) for k, v in results_items]
    return {
        "summary": summary,
        "model_type": model_type,
        "base_model_md": base_md,
        "dataset_md": dataset_md,
        "results_items": results_items,
        "model_name": model_name,
        "kind": kind,
        "method": method,
        "method_text": method_text,
        "repo_id": record.get("hub_repo") or model_name,
        "base_model": base_model,
        "language": ", ".join(_field(record, "language")),
        "license": _field(record, "license"),
        "dataset": {
            "id": dataset_id,
            "url": dataset_url,
            "config": config,
            "split": split,
            "revision": revision,
            "fingerprint": fingerprint,
            "num_rows": f"{num_rows:,}",
        },
        "selection": _summarise_build(dataset_build) if dataset_build else [],
        "template": template,
        "template_url": VICUNA_TEMPLATE_URL,
        "vicuna_example": example,
        "assistant_only_loss": bool(_field(record, "hyperparameters").get("assistant_only_loss")),
        "performance_columns": [column for column, *_ in BENCHMARKS.values()],
        "performance_rows": _performance_rows(eval_results, model_name, _data_size(num_rows))
        if eval_results
        else [],
        "eval_source": (eval_results or {}).get("source"),
        "performance_notes": _performance_notes(eval_results) if eval_results else [],
        "not_evaluated": NOT_EVALUATED,
        "hyperparameters": hyperparameter_list(record),
        "settings": _extra_settings(record),
        "lora_settings": _lora_settings(record),
        "dpo_settings": _dpo_settings(dpo) if dpo else [],
        "loss_rows": loss_rows,
        "loss_every": loss_every,
        "loss_plot": loss_plot,
        "versions": version_items,
        "created_at": _field(record, "created_at"),
        "deita_hub_version": versions.get("deita_hub", __version__),
        "deita_url": DEITA_URL,
        "deita_paper_url": DEITA_PAPER_URL,
        "deita_hub_url": DEITA_HUB_URL,
        "bibtex": DEITA_BIBTEX,
    }


def card_data(record: dict, *, eval_results: dict | None = None):
    """The YAML metadata: huggingface_hub's ModelCardData (+ a model-index when there are eval results)."""
    from huggingface_hub import ModelCardData

    kind = _field(record, "kind")
    model_name = _field(record, "model_name")
    dataset_id = _field(record, "dataset.id")
    dpo = record.get("dpo") if record.get("stage") == "dpo" else None
    # Lineage: a DPO model's datasets are its SFT model's and its preference set, in training order.
    lineage = [*((dpo or {}).get("sft_datasets") or []), dataset_id]
    tags = ["deita", "deita-hub", "trl", "dpo" if dpo else "sft"] + (
        [record["method"]] if record.get("method") in ("lora", "qlora") else []
    )
    # A local base model is recorded by folder basename; the Hub's model tree only knows `namespace/name` ids.
    base_model = _field(record, "base_model")
    on_hub = _hub_link(base_model) is not None
    return ModelCardData(
        license=_field(record, "license"),
        language=list(_field(record, "language")),
        base_model=base_model if on_hub else None,
        base_model_relation=_RELATION[kind] if on_hub else None,
        library_name=_LIBRARY[kind],
        datasets=[d for d in lineage if _hub_link(d, "dataset")] or None,
        tags=tags,
        pipeline_tag="text-generation",
        model_name=model_name,
        eval_results=(_eval_result_objects(eval_results) or None) if eval_results else None,
    )


def model_card(
    record: dict,
    *,
    eval_results: dict | None = None,
    dataset_build: dict | None = None,
    loss_plot: str | None = None,
):
    """A huggingface_hub ModelCard for the run. `loss_plot`: the card-relative path of the loss PNG, if written."""
    from huggingface_hub import ModelCard

    context = card_context(
        record, eval_results=eval_results, dataset_build=dataset_build, loss_plot=loss_plot
    )
    data = card_data(record, eval_results=eval_results)
    text = render_template(CARD_TEMPLATE, {"card_data": data.to_yaml(), **context})
    found = scan_for_secrets(text)
    if found:
        raise DeitaHubError(f"refusing to write a model card containing {'; '.join(found)}")
    return ModelCard(text)


def plot_loss(record: dict, out: Path) -> Path | None:
    """Training (and eval) loss against step as a PNG (matplotlib, headless); None when nothing was logged."""
    history = _field(record, "results.log_history", optional=True) or []
    train = [(e["step"], e["loss"]) for e in history if e.get("loss") is not None and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in history if e.get("eval_loss") is not None and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines or CI
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train, strict=True), label="training loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(str(record.get("model_name", "")))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", metadata={"Software": None})
    return out


def write_model_card(folder: Path, *, eval_results: Path | None = None, out: Path | None = None) -> Path:
    """Render `folder/deita_run.json` into `out` (default `folder/README.md`) and `assets/loss.png` beside it."""
    folder = Path(folder)
    record = read_run_record(folder)
    results = read_eval_results(eval_results) if eval_results is not None else None
    out = Path(out) if out is not None else folder / CARD
    out.parent.mkdir(parents=True, exist_ok=True)
    # Render first (it validates the record), so a bad record leaves neither a card nor a plot behind.
    model_card(record, eval_results=results, loss_plot=LOSS_PLOT)
    plot = plot_loss(record, out.parent / LOSS_PLOT)
    card = model_card(record, eval_results=results, loss_plot=LOSS_PLOT if plot else None)
    return write_text(out, str(card))
