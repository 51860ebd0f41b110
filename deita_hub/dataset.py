"""Build a recipe into the Hub layout: `<config>/train-0000i-of-0000N.parquet` per subset + a README card.

`build()` reads the pool, takes or computes scores and embeddings, selects every subset, and writes the folder
into a temporary sibling that is renamed into place at the end, so an interrupted build leaves no half dataset.
The card's YAML (`configs:` with a default, `dataset_info` with exact row counts) lets
`datasets.load_dataset(DIR_or_repo, "6k")` read each subset with no remote code. `deita_build.json` records the
resolved recipe, the pool fingerprint, the embedder, the scores' origin, every subset's selection statistics and
the package versions; the card is rendered from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deita_hub import __version__
from deita_hub.conversations import response_length, to_sharegpt
from deita_hub.embedding import embed_pool, load_embeddings
from deita_hub.errors import DeitaHubError
from deita_hub.pool import Pool, read_pool
from deita_hub.recipes import Recipe, SubsetSpec, load_recipe
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
BUILD_RECORD = "deita_build.json"
PLOT = "assets/scores.png"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DEITA_HUB_CACHE", Path.home() / ".cache" / "deita-hub"))


@dataclass
class BuildResult:
    out: Path
    record: dict[str, Any]


# --- inputs ------------------------------------------------------------------------------------------------


def load_recipe_pool(recipe: Recipe, cache_dir: Path) -> Pool:
    spec = recipe.pool
    if spec.generate == "demo":
        from deita_hub.demo import generate_pool

        path = cache_dir / "pools" / f"demo-{spec.rows}-seed{spec.seed}.jsonl"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as handle:
                for row in generate_pool(spec.rows, spec.seed):
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        return read_pool(path, spec.format, on_invalid=spec.on_invalid)
    return read_pool(
        list(spec.sources),
        spec.format,
        on_invalid=spec.on_invalid,
        config=spec.config,
        split=spec.split,
        revision=spec.revision,
    )


def pool_scores(pool: Pool, recipe: Recipe, *, progress: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    """Evol scores per valid row; scores missing rows with the recipe's scorer models when it names them."""
    spec = recipe.scores
    columns = {}
    meta: dict[str, Any] = {
        "complexity_field": spec.complexity_field,
        "quality_field": spec.quality_field,
        "synthetic": spec.synthetic,
        "scored_here": {},
    }
    for kind, name, model in (
        ("complexity", spec.complexity_field, spec.complexity_model),
        ("quality", spec.quality_field, spec.quality_model),
    ):
        values = (
            pool.table.column(name).to_pylist() if name in pool.table.column_names else [None] * len(pool)
        )
        missing = [i for i, v in enumerate(values) if v is None]
        if missing and model:
            from deita_hub.scoring import ScoreConfig, score_conversations

            config = ScoreConfig(
                scorer=kind,
                model=model,
                backend=spec.backend,
                batch_size=spec.batch_size,
                use_ray=spec.use_ray,
                vllm_options=spec.vllm_options,
            )
            result = score_conversations([pool.conversations[i] for i in missing], config, progress=progress)
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
    if recipe.embedding.path:
        return load_embeddings(recipe.embedding.path, num_rows=len(pool), pool_fingerprint=pool.fingerprint)
    config = recipe.embedding.config
    key = hashlib.sha256(
        json.dumps([pool.fingerprint, dataclasses.asdict(config)], sort_keys=True).encode()
    ).hexdigest()[:16]
    path = cache_dir / "embeddings" / f"{key}.npy"
    if path.exists():
        log.info("reusing cached embeddings %s", path)
        return load_embeddings(path, num_rows=len(pool), pool_fingerprint=pool.fingerprint)
    embed_pool(pool.conversations, path, config, pool_provenance=pool.provenance(), progress=progress)
    return load_embeddings(path, num_rows=len(pool), pool_fingerprint=pool.fingerprint)


# --- selection ---------------------------------------------------------------------------------------------


def select_subsets(
    subsets: tuple[SubsetSpec, ...],
    pool: Pool,
    *,
    scores: np.ndarray | None,
    embeddings: np.ndarray | None,
    progress: bool = True,
) -> dict[str, Selection]:
    """Every subset's selection. Deita subsets that differ only in budget share one walk (budget prefixes)."""
    lengths = np.fromiter((response_length(c) for c in pool.conversations), dtype=np.int64, count=len(pool))
    results: dict[str, Selection] = {}
    walks: dict[tuple, Selection] = {}
    for subset in sorted(subsets, key=lambda s: -s.selection.budget):
        config = subset.selection
        key = (
            (config.method, config.max_similarity, config.seed)
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
    positions = pa.array(selection.positions, type=pa.int64())
    table = pool.table.take(positions)
    for name in AUDIT_COLUMNS:
        if name in table.column_names:
            table = table.drop_columns([name])
    if "conversations" not in table.column_names:
        # Non-ShareGPT pools gain Deita's ShareGPT column so every deita-hub dataset trains the same way.
        sharegpt = [to_sharegpt(pool.conversations[p]) for p in selection.positions]
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


def _size_category(rows: int) -> str:
    for limit, label in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if rows < limit:
            return label
    return "1M<n<10M"


def _plot(path: Path, scores: np.ndarray | None, pool: Pool, selections: dict[str, Selection]) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    if scores is not None:
        values, label = scores, "evol score (Σ complexity × quality)"
    else:
        values = np.array([response_length(c) for c in pool.conversations], dtype=np.float64)
        label = "assistant characters"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.histogram_bin_edges(values, bins=40)
    ax.hist(values, bins=bins, density=True, alpha=0.45, label=f"pool ({len(values):,})", color="grey")
    for name, selection in selections.items():
        ax.hist(
            values[selection.positions],
            bins=bins,
            density=True,
            histtype="step",
            lw=1.6,
            label=f"{name} ({len(selection):,})",
        )
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title("Score distribution: pool vs selected subsets")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(
        path, metadata={"Software": None}
    )  # no timestamps/versions: identical builds give identical bytes
    plt.close(fig)
    return True


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


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    return {
        "mean": round(float(np.mean(values)), 4),
        "median": round(float(np.median(values)), 4),
        "min": round(float(np.min(values)), 4),
        "max": round(float(np.max(values)), 4),
    }


def _render_card(recipe: Recipe, record: dict[str, Any], tables: dict[str, pa.Table]) -> str:
    import datasets
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from huggingface_hub import DatasetCardData

    from deita_hub.cards import render_template

    infos = {}
    for name, table in tables.items():
        size = int(table.nbytes)
        infos[name] = DatasetInfo(
            features=datasets.Features.from_arrow_schema(table.schema),
            splits=SplitDict({"train": SplitInfo(name="train", num_bytes=size, num_examples=table.num_rows)}),
            config_name=name,
            dataset_size=size,
        )
    card_data = DatasetCardData(
        pretty_name=recipe.card.pretty_name or recipe.name,
        license=recipe.card.license,
        language=list(recipe.card.language),
        task_categories=["text-generation"],
        size_categories=[_size_category(max(t.num_rows for t in tables.values()))],
        tags=sorted({"deita", "instruction-tuning", "data-selection", *recipe.card.tags}),
        configs=[
            {
                "config_name": subset.name,
                **({"default": True} if subset.default else {}),
                "data_files": [{"split": "train", "path": f"{subset.name}/train-*"}],
            }
            for subset in recipe.subsets
        ],
    )
    DatasetInfosDict(infos).to_dataset_card_data(card_data)
    body = render_template("dataset_card.md.j2", {"recipe": recipe, "record": record, "card": recipe.card})
    return f"---\n{card_data.to_yaml()}\n---\n\n{body}"


def build(
    recipe_path: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> BuildResult:
    """Build `recipe_path` into the folder `out` (atomically). Returns the folder and its build record."""
    recipe = load_recipe(recipe_path)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise DeitaHubError(f"{out} exists and is not empty; pass --overwrite to replace it")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    pool = load_recipe_pool(recipe, cache)
    needs_scores = any(s.selection.needs_scores for s in recipe.subsets)
    needs_embeddings = any(s.selection.needs_embeddings for s in recipe.subsets)
    scores, score_meta = pool_scores(pool, recipe, progress=progress) if needs_scores else (None, None)
    embeddings, embed_meta = (
        pool_embeddings(pool, recipe, cache, progress=progress) if needs_embeddings else (None, None)
    )
    selections = select_subsets(recipe.subsets, pool, scores=scores, embeddings=embeddings, progress=progress)
    tables = {s.name: subset_table(pool, selections[s.name], scores) for s in recipe.subsets}

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
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
                    "evol_score": _describe(chosen) if chosen is not None else None,
                    "budget_met": len(selection) >= subset.selection.budget,
                }
            )
        if pool.invalid:
            with open(tmp / "invalid_rows.jsonl", "w", encoding="utf-8") as handle:
                for item in pool.invalid:
                    handle.write(json.dumps({**item, "source": Path(item["source"]).name}) + "\n")
        has_plot = _plot(tmp / PLOT, scores, pool, selections)
        provenance = pool.provenance()
        provenance["source"] = ", ".join(
            Path(s).name if Path(s).exists() else s
            for s in (recipe.pool.sources or [f"generated:{recipe.pool.generate}"])
        )
        record = {
            "schema": 1,
            "name": recipe.name,
            "recipe": recipe.to_dict(),
            "pool": provenance,
            "scores": {**score_meta, "pool_evol_score": _describe(scores)} if scores is not None else None,
            "embedding": {k: v for k, v in (embed_meta or {}).items() if k != "pool"} or None,
            "subsets": subsets_record,
            "invalid_rows": len(pool.invalid),
            "plot": PLOT if has_plot else None,
            "versions": _versions(),
        }
        record["recipe"]["pool"]["sources"] = [
            Path(s).name if Path(s).exists() else s for s in recipe.pool.sources
        ]
        if record["recipe"]["embedding"]["path"]:
            record["recipe"]["embedding"]["path"] = Path(record["recipe"]["embedding"]["path"]).name
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(_render_card(recipe, record, tables), encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return BuildResult(out, record)


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
    """`deita-hub select`: one selection (and optionally the three baselines) of a pool, written as rows."""
    from deita_hub.io import SUFFIXES, write_rows

    if out.suffix not in SUFFIXES:
        raise DeitaHubError(f"{out}: output must end in {', '.join(SUFFIXES)}")
    configs = [config]
    if baselines:
        configs += [
            dataclasses.replace(config, method=m)
            for m in ("random", "score", "longest")
            if m != config.method
        ]
    matrix = None
    if config.needs_embeddings:
        if embeddings is None:
            raise DeitaHubError("--embeddings is required for method deita (make one with deita-hub embed)")
        matrix, _ = load_embeddings(embeddings, num_rows=len(pool), pool_fingerprint=pool.fingerprint)
    scores = None
    if any(c.needs_scores for c in configs):
        columns = pool.table.column_names
        for name in (complexity_field, quality_field):
            if name not in columns:
                raise DeitaHubError(
                    f"{pool.source}: no '{name}' column; score the pool first (deita-hub score) or use "
                    "--method random/longest"
                )
        scores = evol_scores(
            pool.table.column(complexity_field).to_pylist(),
            pool.table.column(quality_field).to_pylist(),
            source=pool.source,
            rows=pool.rows,
        )
    lengths = np.fromiter((response_length(c) for c in pool.conversations), dtype=np.int64, count=len(pool))
    written = []
    for c in configs:
        selection = select(
            c,
            num_rows=len(pool),
            scores=scores,
            embeddings=matrix,
            response_lengths=lengths,
            progress=progress,
        )
        path = out if c is config else out.with_name(f"{out.stem}.{c.method}{out.suffix}")
        write_rows(subset_table(pool, selection, scores), path)
        written.append((path, selection))
    return written
