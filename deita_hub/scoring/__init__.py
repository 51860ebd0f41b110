"""Deita complexity and quality scores: exact, batched, resumable.

Each (user, assistant) pair of a conversation is scored on its own, without earlier turns, as Deita does:
complexity reads the instruction, quality reads (instruction, response). A pair's score is
`Σ_k k · softmax(z)_k` over the logits z of the digit tokens "1".."6" at the first generated position
(`prompts.expected_score`), the digit ids coming from the scorer's own tokenizer.

Backends (`ScoreConfig.backend`): `transformers` (default; length-sorted right-padded batches, one forward pass
each, LM head at the last token only) and `vllm` (extra `[vllm]`). `use_ray` maps rows over a Ray cluster
(`deita_hub.distributed`, extra `[ray]`).

Truncation is explicit: a prompt longer than `max_length` tokens is cut inside the instruction/response text
(`truncation_side` right keeps the beginning of the text, left its end), never in the template, so the prompt
still ends in "##Complexity: " / "##Quality: " and the scorer answers the question it was trained on. With
`truncation_side="none"` such a pair fails. A row that cannot be scored is recorded with its reason; it never
gets a default score (Deita returned 3.0 on any failure).

Resume: with `resume_dir`, every finished row is appended to `rows.jsonl` there as soon as its last pair is
scored; a rerun with the same rows and scoring settings skips rows that have scores and retries failed ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deita_hub.conversations import pairs, validate
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.scoring import prompts
from deita_hub.vllm_engine import check_options

log = logging.getLogger(__name__)

SCORERS = ("complexity", "quality")
BACKENDS = ("transformers", "vllm")
TRUNCATION_SIDES = ("right", "left", "none")
SCORE_FIELDS = {"complexity": "complexity_scores", "quality": "quality_scores"}
# Settings that change the numbers: a checkpoint made with other values is not resumed.
RESULT_SETTINGS = ("scorer", "model", "backend", "max_length", "truncation_side", "dtype")


@dataclass(frozen=True)
class ScoreConfig:
    """How to score. `deita-hub score` options and recipes' `scores:` section mirror these fields."""

    scorer: str = field(
        metadata={"help": "complexity (reads the instruction) | quality (instruction + response)"}
    )
    model: str = field(
        metadata={"help": "scorer model: Hub id or local folder, e.g. hkust-nlp/deita-complexity-scorer"}
    )
    backend: str = field(default="transformers", metadata={"help": "transformers | vllm (extra [vllm])"})
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass (transformers backend)"})
    max_length: int = field(
        default=2048,
        metadata={"help": "max prompt tokens incl. BOS (Deita's LLaMA-1 scorers have 2,048 positions)"},
    )
    truncation_side: str = field(
        default="right",
        metadata={
            "help": "longer prompts are cut inside the instruction/response text, never in the template: right keeps "
            "the text's beginning (where the task is stated), left its end, none fails the pair"
        },
    )
    dtype: str = field(
        default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16"}
    )
    device: str | None = field(
        default=None, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if available"}
    )
    use_ray: bool = field(default=False, metadata={"help": "map rows over a Ray cluster (extra [ray])"})
    ray_actors: int | None = field(
        default=None,
        metadata={"help": "Ray actors (one model each); default one per GPU in the cluster, else 1"},
    )
    chunk_rows: int = field(
        default=1024, metadata={"help": "rows tokenized and length-sorted together (and per Ray task)"}
    )
    vllm_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "vllm backend: extra vllm.EngineArgs, e.g. {tensor_parallel_size: 4, gpu_memory_utilization: 0.8}"
        },
    )

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise DeitaHubError(f"scorer must be one of {SCORERS}, got '{self.scorer}'")
        if not self.model:
            raise DeitaHubError("a scorer model is needed (Hub id or local folder)")
        if self.backend not in BACKENDS:
            raise DeitaHubError(f"scoring backend must be one of {BACKENDS}, got '{self.backend}'")
        if self.truncation_side not in TRUNCATION_SIDES:
            raise DeitaHubError(
                f"truncation_side must be one of {TRUNCATION_SIDES}, got '{self.truncation_side}'"
            )
        if self.batch_size < 1 or self.chunk_rows < 1 or self.max_length < 16:
            raise DeitaHubError("batch_size and chunk_rows must be positive and max_length at least 16")
        if self.ray_actors is not None and self.ray_actors < 1:
            raise DeitaHubError("ray_actors must be positive")
        check_options(self.vllm_options)

    @property
    def output_field(self) -> str:
        return SCORE_FIELDS[self.scorer]


@dataclass
class ScoreResult:
    scores: list[list[float] | None]  # per row, one float per (user, assistant) pair; None for a failed row
    failures: list[dict[str, Any]]  # {"row": i, "pair": j or None, "reason": "..."}, row = index in the input
    metadata: dict[str, Any]


def make_scorer(config: ScoreConfig):
    """Load the backend named by the config (the model is loaded here, once)."""
    if config.backend == "vllm":
        from deita_hub.scoring.vllm_backend import VllmScorer

        return VllmScorer(config)
    from deita_hub.scoring.transformers_backend import TransformersScorer

    return TransformersScorer(config)


# --- prompts -> token ids (with explicit truncation) ---------------------------------------------------------


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


def _row_pairs(turns: Any) -> list[tuple[str, str]]:
    try:
        return pairs(validate(list(turns), "conversation"))
    except (InvalidRecordError, KeyError, TypeError, AttributeError) as exc:
        raise PairFailure(f"not a scorable conversation: {exc}") from None


# --- the scoring loop (shared by the local path and the Ray actors) ------------------------------------------


def _reason(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 500 else text[:497] + "..."


def _digit_logits(scorer, batch: list[list[int]]) -> tuple[np.ndarray, list[str | None]]:
    """The backend's digit logits; a failing batch is retried one prompt at a time to isolate the bad rows."""
    try:
        return scorer.digit_logits(batch)
    except Exception as exc:  # any backend error (OOM, CUDA, tokenizer/model mismatch) becomes a row failure
        if len(batch) == 1:
            return np.full((1, len(prompts.DIGITS)), np.nan, dtype=np.float32), [_reason(exc)]
        log.warning(
            "a batch of %d prompts failed (%s); retrying them one at a time", len(batch), _reason(exc)
        )
        _release_accelerator_memory()
        parts = [_digit_logits(scorer, [ids]) for ids in batch]
        return np.concatenate([p[0] for p in parts]), [p[1][0] for p in parts]


def _release_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_rows(
    scorer,
    rows: Sequence[tuple[int, Any]],
    config: ScoreConfig,
    on_rows: Callable[[list[dict[str, Any]]], None],
) -> None:
    """Score `(row_id, turns)` items; call `on_rows(records)` as rows finish.

    A record is `{"row": id, "scores": [...]}` (plus `"truncated_pairs": k` when k pairs were cut) or
    `{"row": id, "pair": j, "reason": "..."}`.
    """
    tokenizer = scorer.tokenizer
    max_length = min(config.max_length, scorer.max_prompt_tokens or config.max_length)
    # Per row: its pair count, scores so far, first failure, truncated pairs.
    state: dict[int, dict[str, Any]] = {}
    texts, slots, owners = [], [], []
    finished: list[dict[str, Any]] = []
    for row, turns in rows:
        try:
            row_pairs = _row_pairs(turns)
        except PairFailure as exc:
            finished.append({"row": row, "pair": None, "reason": str(exc)})
            continue
        state[row] = {
            "left": len(row_pairs),
            "scores": [None] * len(row_pairs),
            "failure": None,
            "truncated": 0,
        }
        for j, (instruction, response) in enumerate(row_pairs):
            values = prompts.slot_values(config.scorer, instruction, response)
            texts.append(prompts.render(config.scorer, values))
            slots.append(values)
            owners.append((row, j))
    # Batch tokenization (the fast tokenizer runs it in parallel); BOS as the tokenizer adds it, like Deita.
    token_ids = [list(ids) for ids in tokenizer(texts)["input_ids"]] if texts else []
    items = []  # (row, pair, ids)
    for (row, j), values, ids in zip(owners, slots, token_ids, strict=True):
        if len(ids) > max_length:
            try:
                ids = truncate_prompt(
                    tokenizer, config.scorer, values, len(ids), max_length, config.truncation_side
                )
                state[row]["truncated"] += 1
            except PairFailure as exc:
                _settle(state, row, j, None, str(exc), finished)
                continue
        items.append((row, j, ids))
    if finished:
        on_rows(finished)
    # Longest first: similar lengths share a batch (little padding) and memory peaks on the first batch.
    items.sort(key=lambda item: -len(item[2]))
    step = len(items) if scorer.batches_itself else config.batch_size
    for start in range(0, len(items), max(step, 1)):
        batch = [item for item in items[start : start + step] if item[0] in state]  # skip rows already failed
        if not batch:
            continue
        logits, reasons = _digit_logits(scorer, [ids for _, _, ids in batch])
        finished = []
        for (row, j, _), z, reason in zip(batch, logits, reasons, strict=True):
            score = None
            if reason is None:
                try:
                    score = prompts.expected_score(z)
                except ValueError as exc:  # NaN/inf logits: a broken model or overflow, never a score
                    reason = str(exc)
            _settle(state, row, j, score, reason, finished)
        if finished:
            on_rows(finished)


def _settle(state, row: int, pair: int, score: float | None, reason: str | None, finished: list) -> None:
    """Record one pair's outcome; when the row is complete (or has failed), append its record to `finished`."""
    entry = state.get(row)
    if entry is None:  # the row already failed and was handed over
        return
    if reason is not None and entry["failure"] is None:
        entry["failure"] = {"row": row, "pair": pair, "reason": reason}
    entry["scores"][pair] = score
    entry["left"] -= 1
    if entry["failure"] is not None:
        del state[row]
        finished.append(entry["failure"])
    elif entry["left"] == 0:
        del state[row]
        record = {"row": row, "scores": entry["scores"]}
        if entry["truncated"]:
            record["truncated_pairs"] = entry["truncated"]
        finished.append(record)


# --- resume ----------------------------------------------------------------------------------------------------


def _run_key(conversations: Sequence[Any], config: ScoreConfig) -> dict[str, Any]:
    digest = hashlib.sha256()
    for turns in conversations:
        digest.update(json.dumps(turns, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    settings = {name: getattr(config, name) for name in RESULT_SETTINGS}
    return {"settings": settings, "num_rows": len(conversations), "rows_sha256": digest.hexdigest()}


class Checkpoint:
    """`run.json` (what is being scored) + `rows.jsonl` (one finished row per line) in a folder."""

    def __init__(self, folder: str | Path, key: dict[str, Any]):
        self.folder = Path(folder)
        self.key = json.loads(json.dumps(key))
        self.rows_file = self.folder / "rows.jsonl"
        self.run_file = self.folder / "run.json"

    def load(self) -> dict[int, dict[str, Any]]:
        """Finished rows of a matching earlier run; a non-matching checkpoint is discarded with a warning."""
        done: dict[int, dict[str, Any]] = {}
        if self.run_file.exists():
            state = json.loads(self.run_file.read_text())
            if state.get("key") == self.key and self.rows_file.exists():
                lines = self.rows_file.read_text(encoding="utf-8").splitlines()
                good = []
                for line in lines:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line torn by the interruption: that row is redone
                        break
                    done[int(record["row"])] = record
                    good.append(line)
                if len(good) != len(lines):
                    self.rows_file.write_text("".join(line + "\n" for line in good), encoding="utf-8")
                return done
            log.warning("%s holds a checkpoint of other rows or settings; starting over", self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.rows_file.write_text("")
        self.run_file.write_text(json.dumps({"key": self.key}, indent=1))
        return done

    def append(self, records: list[dict[str, Any]]) -> None:
        with open(self.rows_file, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(record) + "\n" for record in records))

    def save_backend(self, backend: dict[str, Any]) -> None:
        state = json.loads(self.run_file.read_text())
        self.run_file.write_text(json.dumps({**state, "backend": backend}, indent=1))

    def backend(self) -> dict[str, Any] | None:
        return json.loads(self.run_file.read_text()).get("backend")


# --- public entry points -----------------------------------------------------------------------------------------


def score_conversations(
    conversations: Sequence[list[dict[str, str]]],
    config: ScoreConfig,
    *,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    scorer=None,
) -> ScoreResult:
    """Score every conversation per (user, assistant) pair. `scorer`: an already loaded backend (optional)."""
    from tqdm.auto import tqdm

    started = time.perf_counter()
    n = len(conversations)
    checkpoint = Checkpoint(resume_dir, _run_key(conversations, config)) if resume_dir is not None else None
    previous = checkpoint.load() if checkpoint else {}
    # Rows with scores are never rescored; failed rows are retried (a reason such as out-of-memory may be gone).
    records = {row: record for row, record in previous.items() if record.get("scores") is not None}
    resumed = len(records)
    pending = [i for i in range(n) if i not in records]
    backend_meta = checkpoint.backend() if checkpoint else None
    load_seconds = 0.0  # model loading, kept out of rows_per_second
    with tqdm(
        total=n, initial=resumed, unit="row", desc=f"score {config.scorer}", disable=not progress
    ) as bar:

        def on_rows(finished: list[dict[str, Any]]) -> None:
            for record in finished:
                records[record["row"]] = record
            if checkpoint:
                checkpoint.append(finished)
            bar.update(len(finished))

        if pending and config.use_ray:
            from deita_hub.distributed import ray_score

            backend_meta = ray_score(
                conversations,
                pending,
                config,
                on_rows=on_rows,
                on_metadata=checkpoint.save_backend if checkpoint else None,
            )
            load_seconds = float((backend_meta or {}).get("actor_load_seconds", 0.0))
        elif pending:
            owned = scorer is None
            if owned:
                scorer = make_scorer(config)
                load_seconds = time.perf_counter() - started
            try:
                backend_meta = scorer.metadata()
                if checkpoint:
                    checkpoint.save_backend(backend_meta)
                for start in range(0, len(pending), config.chunk_rows):
                    chunk = pending[start : start + config.chunk_rows]
                    score_rows(scorer, [(i, conversations[i]) for i in chunk], config, on_rows)
            finally:
                if owned and hasattr(scorer, "close"):
                    scorer.close()  # a vLLM engine holds its memory until it is stopped
    seconds = time.perf_counter() - started
    scores: list[list[float] | None] = [None] * n
    failures = []
    for row in range(n):
        record = records[row]
        if record.get("scores") is not None:
            scores[row] = [float(s) for s in record["scores"]]
        else:
            failures.append({"row": row, "pair": record.get("pair"), "reason": record["reason"]})
    metadata = _metadata(
        config, backend_meta, records, scores, failures, seconds, load_seconds, resumed, len(pending)
    )
    if failures:
        log.warning(
            "%d of %d rows could not be scored (first: row %d: %s)",
            len(failures),
            n,
            failures[0]["row"],
            failures[0]["reason"],
        )
    return ScoreResult(scores=scores, failures=failures, metadata=metadata)


def _metadata(config, backend_meta, records, scores, failures, seconds, load_seconds, resumed, attempted):
    from deita_hub import __version__

    backend_meta = dict(backend_meta or {})
    versions = {**backend_meta.pop("versions", {}), "deita_hub": __version__}
    return {
        "scorer": config.scorer,
        "model": config.model,
        "output_field": config.output_field,
        "prompt_template": prompts.TEMPLATE_NAMES[config.scorer],
        "prompt_template_text": prompts.TEMPLATES[config.scorer],
        "score": 'sum_k k * softmax(logits of tokens "1".."6" at the first generated position)',
        "pairing": "each (user, assistant) pair by position, scored alone; a system turn is not part of any pair",
        "max_length": min(config.max_length, backend_meta.get("max_prompt_tokens") or config.max_length),
        "truncation_side": config.truncation_side,
        "truncation": "inside the instruction/response text only; the template is kept whole"
        if config.truncation_side != "none"
        else "none: longer prompts fail",
        "truncated_pairs": sum(int(r.get("truncated_pairs", 0)) for r in records.values()),
        "batch_size": config.batch_size,
        "use_ray": config.use_ray,
        **backend_meta,
        "num_rows": len(scores),
        "num_pairs": sum(len(s) for s in scores if s is not None),
        "num_failed_rows": len(failures),
        "resumed_rows": resumed,
        "rows_attempted": attempted,
        "seconds": round(seconds, 3),
        "model_load_seconds": round(load_seconds, 3),
        "rows_per_second": round(attempted / (seconds - load_seconds), 3)
        if attempted and seconds > load_seconds
        else None,
        "versions": versions,
    }


# Files next to the output are named by appending to its full name, as `deita-hub embed` does (`<out>.json`).
def failures_path(out: Path) -> Path:
    return out.with_name(out.name + ".failures.jsonl")


def metadata_path(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _write_jsonl(path: Path, records) -> None:
    """Write to a temp file and rename it into place, so `path` is either absent, old, or complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            for record in records:
                # default=str: parquet/HF pools may hold timestamps or decimals; they pass through as text.
                handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def score_pool(pool, config: ScoreConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Score a `deita_hub.pool.Pool` into `out` (.jsonl): every input field plus `complexity_scores`/`quality_scores`.

    Next to `out`: `<out>.failures.jsonl` (rows that could not be scored, with reasons), `<out>.json`
    (provenance) and, while running, the checkpoint folder `<out>.partial/` that lets an interrupted run resume.
    Failed rows keep every field, with a null score list. Returns the metadata.
    """
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DeitaHubError(f"{out}: scored pools are written as JSONL; name the output *.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    resume_dir = checkpoint_dir(out)
    result = score_conversations(pool.conversations, config, progress=progress, resume_dir=resume_dir)
    source_rows = [int(r) for r in pool.rows]
    failures = []
    ids = pool.table.column("id").to_pylist() if "id" in pool.table.column_names else None
    for item in result.failures:
        record = {"row": source_rows[item["row"]], "pair": item["pair"], "reason": item["reason"]}
        if ids is not None:
            record["id"] = ids[item["row"]]
        failures.append(record)
    if failures:
        _write_jsonl(failures_path(out), failures)
    else:
        failures_path(out).unlink(missing_ok=True)  # a stale file from an earlier run would mislead
    if result.failures and len(result.failures) == len(pool):
        first = failures[0]
        raise DeitaHubError(
            f"none of the {len(pool)} rows could be scored (first: row {first['row']}: {first['reason']}); "
            f"reasons in {failures_path(out)}"
        )
    field_name = config.output_field
    if field_name in pool.table.column_names:
        log.warning("%s already has '%s'; the new scores replace it", pool.source, field_name)

    def rows():
        position = 0
        for batch in pool.table.to_batches():
            for record in batch.to_pylist():
                record[field_name] = result.scores[position]
                position += 1
                yield record

    _write_jsonl(out, rows())
    metadata = {
        **result.metadata,
        "pool": pool.provenance(),
        "output": out.name,
        "failures_file": failures_path(out).name if failures else None,
    }
    tmp = metadata_path(out).with_name(metadata_path(out).name + ".tmp")
    tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False, default=str))
    os.replace(tmp, metadata_path(out))
    shutil.rmtree(resume_dir, ignore_errors=True)
    return metadata


__all__ = [
    "SCORERS",
    "SCORE_FIELDS",
    "ScoreConfig",
    "ScoreResult",
    "make_scorer",
    "score_conversations",
    "score_pool",
    "score_rows",
]
