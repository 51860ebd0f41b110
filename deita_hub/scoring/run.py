"""The scoring loop: conversations -> per-pair Deita scores, batched, resumable, failures kept with reasons.

`score_rows` is shared by the local path and the Ray actors; `score_conversations` adds progress, resume and
Ray; `score_pool` writes a pool's rows with their scores plus the failures and provenance files beside them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deita_hub.conversations import pairs, validate
from deita_hub.embedding import rerun_command, terminate_as_interrupt
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.io import atomic_file, write_text
from deita_hub.progress import progress_bar
from deita_hub.scoring import prompts
from deita_hub.scoring.checkpoint import Checkpoint, checkpoint_dir, failures_path, metadata_path, run_key
from deita_hub.scoring.config import ScoreConfig
from deita_hub.scoring.truncation import PairFailure, truncate_prompt

log = logging.getLogger(__name__)


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


def _row_pairs(turns: Any) -> list[tuple[str, str]]:
    try:
        return pairs(validate(list(turns), "conversation"))
    except (InvalidRecordError, KeyError, TypeError, AttributeError) as exc:
        raise PairFailure(f"not a scorable conversation: {exc}") from None


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


class ScoreActor:
    """One scorer model per Ray actor (`deita_hub.distributed.ray_score`); a call scores a batch of rows."""

    def __init__(self, config: ScoreConfig):
        started = time.perf_counter()
        self.config = config
        self.scorer = make_scorer(config)
        # Kept out of rows/s like a local run's model load (Ray's own start-up is not: it is the cluster's).
        self.metadata = {
            **self.scorer.metadata(),
            "actor_load_seconds": round(time.perf_counter() - started, 3),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from deita_hub.distributed import with_metadata

        rows = [int(r) for r in batch["row"]]
        items = [(row, json.loads(text)) for row, text in zip(rows, batch["conversation"], strict=True)]
        finished: dict[int, dict] = {}
        score_rows(
            self.scorer, items, self.config, lambda records: finished.update((r["row"], r) for r in records)
        )
        records = np.array([json.dumps(finished[row]) for row in rows], dtype=object)
        return with_metadata(rows, "record", records, self.metadata)


def score_conversations(
    conversations: Sequence[list[dict[str, str]]],
    config: ScoreConfig,
    *,
    progress: bool = True,
    resume_dir: str | Path | None = None,
    scorer=None,
) -> ScoreResult:
    """Score every conversation per (user, assistant) pair. `scorer`: an already loaded backend (optional)."""
    started = time.perf_counter()
    n = len(conversations)
    checkpoint = Checkpoint(resume_dir, run_key(conversations, config)) if resume_dir is not None else None
    previous = checkpoint.load() if checkpoint else {}
    # Rows with scores are never rescored; failed rows are retried (a reason such as out-of-memory may be gone).
    records = {row: record for row, record in previous.items() if record.get("scores") is not None}
    resumed = len(records)
    pending = [i for i in range(n) if i not in records]
    backend_meta = checkpoint.backend() if checkpoint else None
    load_seconds = 0.0  # model loading, kept out of rows_per_second
    with progress_bar(
        total=n, initial=resumed, unit="row", desc=f"score {config.scorer}", show=progress
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
                actor=ScoreActor,
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
                with terminate_as_interrupt():
                    for start in range(0, len(pending), config.chunk_rows):
                        chunk = pending[start : start + config.chunk_rows]
                        score_rows(scorer, [(i, conversations[i]) for i in chunk], config, on_rows)
            except KeyboardInterrupt as exc:
                kept = sum(1 for record in records.values() if record.get("scores") is not None)
                if checkpoint and kept > resumed:
                    log.warning(
                        "interrupted: %d of %d rows scored, kept in %s; resume with: %s",
                        kept,
                        n,
                        checkpoint.folder,
                        rerun_command(),
                    )
                elif checkpoint is None:
                    log.warning(
                        "interrupted: this run keeps no checkpoint, so its %d scored rows are lost", kept
                    )
                else:
                    log.warning("interrupted before a row was scored: nothing to keep")
                exc.progress_reported = True  # the CLI prints no second "interrupted" line
                raise
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


def _write_jsonl(path: Path, records) -> None:
    """Write atomically, so `path` is either absent, old, or complete."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            # default=str: parquet/HF pools may hold timestamps or decimals; they pass through as text.
            handle.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")


def check_output(out: str | Path) -> Path:
    """The output path, checked before a model is loaded: a `.jsonl` name in a folder that can hold it."""
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DeitaHubError(f"{out}: scored pools are written as JSONL; name the output *.jsonl")
    if out.is_dir():
        raise DeitaHubError(f"{out}: is a folder; give the .jsonl file to write")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise DeitaHubError(f"{out}: {parent} is a file, not a folder")
    return out


def score_pool(pool, config: ScoreConfig, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Score a `deita_hub.pool.Pool` into `out` (.jsonl): every input field plus `complexity_scores`/`quality_scores`.

    Next to `out`: `<out>.failures.jsonl` (rows that could not be scored, with reasons), `<out>.json`
    (provenance) and, while running, the checkpoint folder `<out>.partial/` that lets an interrupted run resume.
    Failed rows keep every field, with a null score list. Returns the metadata.
    """
    out = check_output(out)
    resume_dir = checkpoint_dir(out)
    result = score_conversations(pool.conversations, config, progress=progress, resume_dir=resume_dir)
    source_rows = [int(r) for r in pool.rows]
    failures = []
    ids = pool.column("id").to_pylist() if "id" in pool.column_names else None
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
    if field_name in pool.column_names:
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
    write_text(metadata_path(out), json.dumps(metadata, indent=2, ensure_ascii=False, default=str))
    shutil.rmtree(resume_dir, ignore_errors=True)
    return metadata
