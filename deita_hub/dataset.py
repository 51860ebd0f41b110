"""Build a recipe into the Hub layout: `<config>/train-0000i-of-0000N.parquet` per subset + a README card.

`build()` reads the pool, takes or computes scores and embeddings, selects every subset (`deita_hub.subsets`),
and writes the folder into a temporary sibling that is renamed into place at the end (`io.atomic_folder`), so an
interrupted build leaves no half dataset. `deita_build.json` (a `records.BuildRecord`) records the resolved
recipe, the pool fingerprint, the embedder, the scores' origin, every subset's selection statistics and the
package versions; the dataset card (`cards.dataset`) is rendered from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_hub import __version__
from deita_hub.cards.dataset import dataset_card, describe, plot_scores
from deita_hub.embedding import embed_pool, load_embeddings
from deita_hub.errors import DeitaHubError
from deita_hub.io import atomic_file, atomic_folder, default_cache_dir, file_lock, refuse_existing, write_text
from deita_hub.pool import Pool, pick, read_pool
from deita_hub.preferences import is_preference_columns, is_preference_source, read_preferences
from deita_hub.recipes import Recipe, load_recipe
from deita_hub.records import CARD, INVALID_ROWS, SCORES_PLOT, BuildRecord
from deita_hub.selection import evol_scores
from deita_hub.subsets import select_subsets, subset_table

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out: Path
    record: dict[str, Any]  # the BuildRecord written to deita_build.json, as its JSON object


# --- inputs ------------------------------------------------------------------------------------------------


def load_recipe_pool(recipe: Recipe, cache_dir: Path) -> Pool:
    spec = recipe.pool
    place = dict(config=spec.config, split=spec.split, revision=spec.revision)
    if spec.sources and is_preference_source(list(spec.sources), **place):
        # `chosen` + `rejected` columns: a preference pool (DPO data), validated pair by pair.
        sources, layout = list(spec.sources), spec.format.format
        return read_preferences(sources, layout, on_invalid=spec.on_invalid, **place).pool
    if spec.generate == "demo":
        from deita_hub.demo import generate_pool

        path = cache_dir / "pools" / f"demo-{spec.rows}-seed{spec.seed}.jsonl"
        if not path.exists():
            with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
                for row in generate_pool(spec.rows, spec.seed):
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        return read_pool(path, spec.format, on_invalid=spec.on_invalid, cache_dir=cache_dir)
    return read_pool(
        list(spec.sources),
        spec.format,
        on_invalid=spec.on_invalid,
        config=spec.config,
        split=spec.split,
        revision=spec.revision,
        cache_dir=cache_dir,
    )


def pool_scores(
    pool: Pool, recipe: Recipe, cache_dir: Path | None = None, *, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Evol scores per valid row; scores missing rows with the recipe's scorer models when it names them (with a
    checkpoint under `cache_dir/scores/`, so an interrupted build resumes its scoring)."""
    spec = recipe.scores
    columns = {}
    meta: dict[str, Any] = {
        "complexity_field": spec.complexity_field,
        "quality_field": spec.quality_field,
        "synthetic": spec.synthetic,
        "scored_here": {},
    }
    for kind, name, config in (
        ("complexity", spec.complexity_field, spec.complexity),
        ("quality", spec.quality_field, spec.quality),
    ):
        column = pool.column(name) if name in pool.column_names else None
        if column is not None and column.null_count == 0:
            columns[kind] = column  # every row scored: evol_scores reads the Arrow column as it is
            continue
        values = column.to_pylist() if column is not None else [None] * len(pool)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing and config is not None:
            from deita_hub.pool import conversations_fingerprint
            from deita_hub.scoring import score_conversations

            todo = pick(pool.conversations, missing)
            resume_dir = None
            if cache_dir is not None:
                key = hashlib.sha256(
                    json.dumps(
                        [conversations_fingerprint(todo), dataclasses.asdict(config)], sort_keys=True
                    ).encode()
                ).hexdigest()[:16]
                resume_dir = cache_dir / "scores" / f"{kind}-{key}.partial"
            if resume_dir is None:
                result = score_conversations(todo, config, progress=progress)
            else:  # two builds of one pool at once: the second waits, then resumes from the first's checkpoint
                with file_lock(resume_dir.with_suffix(".lock")):
                    result = score_conversations(todo, config, progress=progress, resume_dir=resume_dir)
                    shutil.rmtree(resume_dir, ignore_errors=True)
            if result.failures:
                first = result.failures[0]
                raise DeitaHubError(
                    f"{len(result.failures)} row(s) could not be scored for {kind} (first: row "
                    f"{int(pool.rows[missing[first['row']]])}: {first['reason']}); fix or drop them "
                    "(deita-hub score writes them with reasons)"
                )
            for i, row_scores in zip(missing, result.scores, strict=True):
                values[i] = row_scores
            meta["scored_here"][kind] = {**result.metadata, "rows_scored_by_build": len(missing)}
            missing = []
        if missing:
            shown = ", ".join(str(int(pool.rows[i])) for i in missing[:10])
            raise DeitaHubError(
                f"{pool.source}: {len(missing)} row(s) have no '{name}' (rows {shown}"
                f"{', ...' if len(missing) > 10 else ''}); score them (deita-hub score, or name scorer models in the "
                "recipe's 'scores' section) or use a method that needs no scores (random, longest)"
            )
        columns[kind] = values
    scores = evol_scores(columns["complexity"], columns["quality"], source=pool.source, rows=pool.rows)
    return scores, meta


def pool_embeddings(
    pool: Pool, recipe: Recipe, cache_dir: Path, *, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    fingerprint = pool.conversations_fingerprint
    if recipe.embedding.path:
        return load_embeddings(
            recipe.embedding.path, num_rows=len(pool), conversations_fingerprint=fingerprint
        )
    config = recipe.embedding.config
    # Keyed by what is embedded (the conversations), so a pool that gains score columns keeps its embeddings.
    settings = {
        k: v for k, v in dataclasses.asdict(config).items() if k not in ("chunk_rows", "checkpoint_seconds")
    }
    key = hashlib.sha256(json.dumps([fingerprint, settings], sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / "embeddings" / f"{key}.npy"
    # Two builds of one pool at once: the second waits here for the first's embeddings, then reuses them.
    with file_lock(path.with_name(path.name + ".lock")):
        if path.exists():
            log.info("reusing cached embeddings %s", path)
        else:
            embed_pool(pool.conversations, path, config, pool_provenance=pool.provenance(), progress=progress)
    return load_embeddings(path, num_rows=len(pool), conversations_fingerprint=fingerprint)


def check_hub_models(pool: Pool, recipe: Recipe, *, needs_scores: bool, needs_embeddings: bool) -> None:
    """The Hub models this build will load, each checked with one quick request before any model is loaded: a
    typo or an unreachable Hub is a one-line error in seconds, not a minute of retries after the pool is read.
    Offline (HF_HUB_OFFLINE) the local cache is all there is, and loading the model says whether it is there."""
    from deita_hub import hub

    models = []
    if needs_scores:
        spec = recipe.scores
        for name, config in ((spec.complexity_field, spec.complexity), (spec.quality_field, spec.quality)):
            column = pool.column(name) if name in pool.column_names else None
            if config is not None and (column is None or column.null_count):
                models.append(config.model)
    if needs_embeddings and not recipe.embedding.path and recipe.embedding.config.model:
        models.append(recipe.embedding.config.model)
    hub_models = [m for m in dict.fromkeys(models) if hub.is_repo_id(m) and not Path(m).exists()]
    if hub_models and not hub.is_offline():
        for model in hub_models:
            hub.check_repo(model, repo_type="model")


# --- writing -----------------------------------------------------------------------------------------------


def _write_shards(table: pa.Table, folder: Path, max_rows: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, -(-table.num_rows // max_rows))
    names = []
    for i in range(count):
        name = f"train-{i:05d}-of-{count:05d}.parquet"
        pq.write_table(table.slice(i * max_rows, max_rows), folder / name)
        names.append(name)
    return names


def _versions() -> dict[str, str]:
    import datasets
    import huggingface_hub

    return {
        "deita_hub": __version__,
        "datasets": datasets.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
    }


def build(
    recipe_path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    overrides: tuple[str, ...] = (),
    repo_id: str | None = None,
) -> BuildResult:
    """Build `recipe_path` into the folder `out` (atomically). Returns the folder and its build record.

    `overrides` are `--set section.key=value` pairs applied to the recipe before it is validated; `repo_id` is
    the Hub repo the folder will be pushed to, named in the card's load snippet."""
    recipe = load_recipe(recipe_path, overrides)
    out = Path(out)
    refuse_existing(out, overwrite=overwrite)  # before minutes of scoring and embedding
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    pool = load_recipe_pool(recipe, cache)
    needs_scores = any(s.selection.needs_scores for s in recipe.subsets)
    needs_embeddings = any(s.selection.needs_embeddings for s in recipe.subsets)
    check_hub_models(pool, recipe, needs_scores=needs_scores, needs_embeddings=needs_embeddings)
    embeddings, embed_meta = None, None
    if needs_embeddings and recipe.embedding.path:  # a wrong file fails now, not after hours of scoring
        embeddings, embed_meta = pool_embeddings(pool, recipe, cache, progress=progress)
    scores, score_meta = pool_scores(pool, recipe, cache, progress=progress) if needs_scores else (None, None)
    if needs_embeddings and embeddings is None:
        embeddings, embed_meta = pool_embeddings(pool, recipe, cache, progress=progress)
    selections = select_subsets(recipe.subsets, pool, scores=scores, embeddings=embeddings, progress=progress)
    tables = {s.name: subset_table(pool, selections[s.name], scores) for s in recipe.subsets}
    if is_preference_columns(pool.column_names) and "conversations" not in pool.column_names:
        # A preference set trains from its own prompt/chosen/rejected columns: the ShareGPT column subset_table
        # adds for SFT pools would make it read as LLaMA-Factory's layout (conversations = the prompt).
        tables = {name: table.drop_columns(["conversations"]) for name, table in tables.items()}

    with atomic_folder(out, overwrite=overwrite) as tmp:
        subsets_record = []
        for subset in recipe.subsets:
            selection = selections[subset.name]
            shards = _write_shards(tables[subset.name], tmp / subset.name, recipe.max_rows_per_shard)
            chosen = scores[selection.positions] if scores is not None else None
            subsets_record.append(
                {
                    "name": subset.name,
                    "default": subset.default,
                    "selection": dataclasses.asdict(subset.selection),
                    "rows": len(selection),
                    "shards": [f"{subset.name}/{name}" for name in shards],
                    "stats": {k: v for k, v in selection.stats.items() if not isinstance(v, dict)},
                    "evol_score": describe(chosen) if chosen is not None else None,
                    "budget_met": len(selection) >= subset.selection.budget,
                }
            )
        if pool.invalid:
            with open(tmp / INVALID_ROWS, "w", encoding="utf-8") as handle:
                for item in pool.invalid:
                    handle.write(json.dumps({**item, "source": Path(item["source"]).name}) + "\n")
        has_plot = plot_scores(tmp / SCORES_PLOT, scores, pool, selections)
        provenance = pool.provenance()
        provenance["source"] = ", ".join(
            Path(s).name if Path(s).exists() else s
            for s in (recipe.pool.sources or [f"generated:{recipe.pool.generate}"])
        )
        resolved = recipe.to_dict()
        resolved["pool"]["sources"] = [Path(s).name if Path(s).exists() else s for s in recipe.pool.sources]
        if resolved["embedding"]["path"]:
            resolved["embedding"]["path"] = Path(resolved["embedding"]["path"]).name
        record = BuildRecord(
            name=recipe.name,
            recipe=resolved,
            pool=provenance,
            scores={**score_meta, "pool_evol_score": describe(scores)} if scores is not None else None,
            embedding={k: v for k, v in (embed_meta or {}).items() if k != "pool"} or None,
            subsets=subsets_record,
            invalid_rows=len(pool.invalid),
            plot=SCORES_PLOT if has_plot else None,
            versions=_versions(),
        )
        record.write(tmp)
        write_text(tmp / CARD, dataset_card(recipe, record.to_dict(), tables, repo_id=repo_id))
    return BuildResult(out, record.to_dict())
