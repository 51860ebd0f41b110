"""Selected rows as tables: every subset of a recipe, or one `deita-hub select` run, with audit columns.

`select_subsets` runs the selections a recipe asks for (Deita subsets that differ only in budget share one
walk); `subset_table` turns a selection into its rows in selection order, each with the audit columns that say
where it came from and why it was chosen; `run_select` is the `deita-hub select` command's library function.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from deita_hub.conversations import to_sharegpt
from deita_hub.embedding import load_embeddings
from deita_hub.errors import DeitaHubError
from deita_hub.io import SUFFIXES, write_rows
from deita_hub.pool import Pool, pick
from deita_hub.recipes import SubsetSpec
from deita_hub.selection import Selection, SelectionConfig, evol_scores, select

log = logging.getLogger(__name__)

# Columns deita-hub adds to every selected row; rebuilt when a built dataset is used as a pool.
AUDIT_COLUMNS = (
    "pool_row",
    "selection_rank",
    "evol_score",
    "nearest_selected_row",
    "nearest_selected_similarity",
)


def select_subsets(
    subsets: tuple[SubsetSpec, ...],
    pool: Pool,
    *,
    scores: np.ndarray | None,
    embeddings: np.ndarray | None,
    progress: bool = True,
) -> dict[str, Selection]:
    """Every subset's selection. Deita subsets that differ only in budget share one walk (budget prefixes)."""
    lengths = pool.response_lengths
    results: dict[str, Selection] = {}
    walks: dict[tuple, Selection] = {}
    for subset in sorted(subsets, key=lambda s: -s.selection.budget):
        config = subset.selection
        key = (
            (config.method, config.max_similarity, config.seed, config.sampler)
            if config.method != "deita"
            else (
                "deita",
                config.max_similarity,
            )
        )
        if key in walks:
            results[subset.name] = walks[key].prefix(config.budget)
            continue
        walks[key] = select(
            config,
            num_rows=len(pool),
            scores=scores,
            embeddings=embeddings,
            response_lengths=lengths,
            progress=progress,
        )
        results[subset.name] = walks[key]
    return {subset.name: results[subset.name] for subset in subsets}  # the recipe's order


def subset_table(pool: Pool, selection: Selection, scores: np.ndarray | None) -> pa.Table:
    """Selected rows in selection order: every input field, ShareGPT `conversations`, and the audit columns."""
    table = pool.take(selection.positions)
    for name in AUDIT_COLUMNS:
        if name in table.column_names:
            table = table.drop_columns([name])
    if "conversations" not in table.column_names:
        # Non-ShareGPT pools gain Deita's ShareGPT column so every deita-hub dataset trains the same way.
        sharegpt = [to_sharegpt(turns) for turns in pick(pool.conversations, selection.positions)]
        table = table.append_column("conversations", pa.array(sharegpt))
    nearest = np.where(selection.nearest >= 0, pool.rows[np.maximum(selection.nearest, 0)], -1)
    similarity = selection.nearest_similarity
    audit = {
        "pool_row": pa.array(pool.rows[selection.positions], type=pa.int64()),
        "selection_rank": pa.array(np.arange(len(selection), dtype=np.int64)),
        "evol_score": pa.array(
            scores[selection.positions] if scores is not None else [None] * len(selection), type=pa.float64()
        ),
        "nearest_selected_row": pa.array(nearest, type=pa.int64(), mask=nearest < 0),
        "nearest_selected_similarity": pa.array(similarity, type=pa.float64(), mask=np.isnan(similarity)),
    }
    for name, column in audit.items():
        table = table.append_column(name, column)
    return table


def run_select(
    pool: Pool,
    config: SelectionConfig,
    out: Path,
    *,
    embeddings: str | Path | None = None,
    baselines: bool = False,
    complexity_field: str = "complexity_scores",
    quality_field: str = "quality_scores",
    progress: bool = True,
) -> list[tuple[Path, Selection]]:
    """`deita-hub select`: one selection of a pool (and, with `baselines`, the random / score / longest ones of
    the same budget that the pool supports; a skipped one is logged with its reason), written as rows. Returns
    (file, selection) pairs, the requested one first. Every input is checked before anything is written."""
    if out.suffix not in SUFFIXES:
        raise DeitaHubError(f"{out}: output must end in {', '.join(SUFFIXES)}")
    if config.needs_embeddings and embeddings is None:
        raise DeitaHubError("--embeddings is required for method deita (make one with deita-hub embed)")
    matrix = None
    if config.needs_embeddings:
        matrix, _ = load_embeddings(
            embeddings, num_rows=len(pool), conversations_fingerprint=pool.conversations_fingerprint
        )
    columns = pool.column_names
    missing = [name for name in (complexity_field, quality_field) if name not in columns]
    if config.needs_scores and missing:
        raise DeitaHubError(
            f"{pool.source}: no '{missing[0]}' column, which method {config.method} needs; score the pool first "
            "(deita-hub score, once per scorer) or use --method random or longest"
        )
    configs, skipped = [config], []
    if baselines:
        for method in ("random", "score", "longest"):
            if method == config.method:
                continue
            if method == "score" and missing:
                skipped.append(f"score (the pool has no '{missing[0]}' column)")
                continue
            configs.append(dataclasses.replace(config, method=method))
    scores = None
    if any(c.needs_scores for c in configs):
        scores = evol_scores(
            pool.column(complexity_field),
            pool.column(quality_field),
            source=pool.source,
            rows=pool.rows,
        )
    lengths = pool.response_lengths
    selections = [
        (
            out if c is config else out.with_name(f"{out.stem}.{c.method}{out.suffix}"),
            select(
                c,
                num_rows=len(pool),
                scores=scores,
                embeddings=matrix,
                response_lengths=lengths,
                progress=progress,
            ),
        )
        for c in configs
    ]
    for path, selection in selections:  # written once every selection succeeded
        write_rows(subset_table(pool, selection, scores), path)
    if skipped:
        log.warning("--baselines: skipped %s", "; ".join(skipped))
    return selections
