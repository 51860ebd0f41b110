"""`dataset_scripts/*.yaml` -> frozen dataclasses, validated (unknown keys and bad values name the file and key).

A recipe is declarative because datasets >= 4 runs no loading scripts: it says which pool(s), how rows map to
conversations, where scores come from, how to embed, and which subsets (configs) to publish. Relative paths are
relative to the recipe file.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deita_hub.config import (
    apply_overrides,
    check_choices,
    coerce,
    describe,
    load,
    read_mapping,
    unknown_keys,
)
from deita_hub.conversations import FormatSpec
from deita_hub.embedding import EmbedConfig
from deita_hub.errors import DeitaHubError
from deita_hub.scoring.config import ScoreConfig
from deita_hub.selection import SelectionConfig

CONFIG_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PoolSpec:
    """Where a pool comes from and how its rows read: a recipe's `pool:` section and every pool command's flags."""

    sources: tuple[str, ...] = field(
        default=(), metadata={"help": "files, dataset folders or Hub ids (concatenated)", "cli": False}
    )
    generate: str | None = field(
        default=None,
        metadata={
            "help": "demo: the packaged synthetic pool instead of sources",
            "choices": ("demo",),
            "cli": False,
        },
    )
    rows: int = field(
        default=2400, metadata={"help": "generate: number of synthetic conversations", "cli": False}
    )
    seed: int = field(default=0, metadata={"help": "generate: seed", "cli": False})
    format: FormatSpec = field(default_factory=FormatSpec, metadata={"help": "format and field mapping"})
    on_invalid: str = field(
        default="error",
        metadata={
            "help": "skip rows that are not valid conversations (written with their reasons next to the output) "
            "instead of failing",
            "choices": ("error", "skip"),
            "flag": "--skip-invalid",
            "flag_value": "skip",
        },
    )
    config: str | None = field(
        default=None,
        metadata={"help": "HF dataset sources: config (subset) name", "flag": "--dataset-config"},
    )
    split: str = field(
        default="train", metadata={"help": "HF dataset sources: split", "flag": "--dataset-split"}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub sources: branch, tag or commit", "flag": "--dataset-revision"}
    )

    def __post_init__(self):
        check_choices(self).raise_if_any()


@dataclass(frozen=True)
class ScoresSpec:
    complexity_field: str = field(
        default="complexity_scores", metadata={"help": "the pool's per-turn complexity scores column"}
    )
    quality_field: str = field(
        default="quality_scores", metadata={"help": "the pool's per-turn quality scores column"}
    )
    complexity: ScoreConfig | None = field(
        default=None,
        metadata={
            "help": "score rows lacking complexity scores: a scorer model id, or a mapping of every "
            "`deita-hub score` setting (model, backend, batch_size, max_length, truncation_side, dtype, device, "
            "use_ray, ray_actors, chunk_rows, vllm_options)"
        },
    )
    quality: ScoreConfig | None = field(
        default=None, metadata={"help": "score rows lacking quality scores: as `complexity`"}
    )
    synthetic: bool = field(default=False, metadata={"help": "the scores are synthetic (said in the card)"})


@dataclass(frozen=True)
class SubsetSpec:
    name: str
    selection: SelectionConfig
    default: bool = False


@dataclass(frozen=True)
class CardSpec:
    pretty_name: str | None = field(default=None, metadata={"help": "the card's title (default: the name)"})
    license: str = field(default="other", metadata={"help": "license of the published data (Hub license id)"})
    language: tuple[str, ...] = field(default=("en",), metadata={"help": "languages (Hub metadata)"})
    tags: tuple[str, ...] = field(default=(), metadata={"help": "extra Hub tags"})
    description: str = field(default="", metadata={"help": "a paragraph at the top of the card"})
    pool_license: str | None = field(default=None, metadata={"help": "where the pool's license is stated"})


@dataclass(frozen=True)
class EmbeddingSpec:
    config: EmbedConfig = field(default_factory=EmbedConfig)
    path: str | None = field(default=None, metadata={"help": "precomputed .npy aligned with the pool's rows"})


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    pool: PoolSpec
    scores: ScoresSpec
    embedding: EmbeddingSpec
    subsets: tuple[SubsetSpec, ...]
    card: CardSpec
    max_rows_per_shard: int = 200_000

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe for provenance: no absolute paths."""
        data = dataclasses.asdict(self)
        data["path"] = self.path.name
        return data


TOP_LEVEL = ("name", "pool", "scores", "embedding", "selection", "configs", "card", "max_rows_per_shard")
# Keys of the flat `scores:` section of earlier releases: each scorer is now a nested ScoreConfig.
_MOVED_SCORE_KEYS = ("complexity_model", "quality_model", "backend", "batch_size", "use_ray", "vllm_options")


def load_recipe(path: str | Path, overrides: tuple[str, ...] = ()) -> Recipe:
    """Read and validate a recipe; `overrides` are `--set section.key=value` pairs applied before validation."""
    path = Path(path)
    if not path.exists():
        raise DeitaHubError(f"recipe {path} does not exist")
    data = read_mapping(path, "recipe")
    if overrides:
        data = apply_overrides(data, overrides)
    unknown_keys(data, TOP_LEVEL, f"{path}: ", hint=" at the top level; see `deita-hub build --help-config`")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise DeitaHubError(f"{path}: 'name' (the dataset's name) is required")

    pool_data = data.get("pool") or {}
    if not isinstance(pool_data, Mapping):
        raise DeitaHubError(f"{path}: pool: expected a mapping of keys, got {type(pool_data).__name__}")
    pool_data = dict(pool_data)
    sources = pool_data.get("sources", ())
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list | tuple):
        raise DeitaHubError(f"{path}: pool: 'sources' must be a list of files, folders or Hub ids")
    pool_data["sources"] = [_resolve_source(path, str(s)) for s in sources]
    pool = load(PoolSpec, pool_data, source=str(path), section="pool")
    if bool(pool.sources) == bool(pool.generate):
        raise DeitaHubError(f"{path}: pool needs either 'sources' or 'generate: demo'")

    scores = _load_scores(data.get("scores"), path)
    embedding_data = data.get("embedding") or {}
    if isinstance(embedding_data, Mapping) and embedding_data.get("path") is not None:
        embedding_data = {**embedding_data, "path": str(_resolve_source(path, embedding_data["path"]))}
    embedding = _load_embedding(embedding_data, path)

    defaults = data.get("selection") or {}
    if not isinstance(defaults, Mapping):
        raise DeitaHubError(f"{path}: selection: expected a mapping of keys, got {type(defaults).__name__}")
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise DeitaHubError(f"{path}: 'configs' must be a non-empty list of subsets (name, method, budget)")
    subsets, seen = [], set()
    for i, entry in enumerate(configs):
        where = f"configs[{i}]"
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise DeitaHubError(f"{path}: {where}: each config needs a 'name'")
        entry = dict(entry)
        name, is_default = str(entry.pop("name")), bool(entry.pop("default", False))
        if not CONFIG_NAME.match(name):
            raise DeitaHubError(
                f"{path}: {where}: config name '{name}' must be letters, digits, '.', '_' or '-'"
            )
        if name in seen:
            raise DeitaHubError(f"{path}: {where}: duplicate config name '{name}'")
        seen.add(name)
        selection = load(SelectionConfig, {**defaults, **entry}, source=str(path), section=where)
        subsets.append(SubsetSpec(name, selection, is_default))
    defaults_marked = [s.name for s in subsets if s.default]
    if len(defaults_marked) > 1:
        raise DeitaHubError(f"{path}: only one config may be the default, got {defaults_marked}")
    if not defaults_marked:
        subsets[0] = dataclasses.replace(subsets[0], default=True)
    card = load(CardSpec, data.get("card"), source=str(path), section="card")
    max_rows = coerce(data.get("max_rows_per_shard", 200_000), int, f"{path}: 'max_rows_per_shard'")
    if max_rows < 1:
        raise DeitaHubError(f"{path}: 'max_rows_per_shard' must be positive, got {max_rows}")
    return Recipe(
        name=data["name"],
        path=path,
        pool=pool,
        scores=scores,
        embedding=embedding,
        subsets=tuple(subsets),
        card=card,
        max_rows_per_shard=max_rows,
    )


def _load_scores(data: Any, path: Path) -> ScoresSpec:
    if not isinstance(data, Mapping):
        return load(ScoresSpec, data, source=str(path), section="scores")
    data = dict(data)
    moved = [key for key in _MOVED_SCORE_KEYS if key in data]
    if moved:
        raise DeitaHubError(
            f"{path}: scores: {', '.join(moved)} now sit in one section per scorer, e.g. "
            "scores: {complexity: {model: hkust-nlp/deita-complexity-scorer, backend: vllm}, quality: {...}}"
        )
    scorers = {}
    for kind in ("complexity", "quality"):
        value = data.pop(kind, None)
        if value is None:
            continue
        if isinstance(value, str):
            value = {"model": value}
        if isinstance(value, Mapping) and "scorer" in value:
            raise DeitaHubError(f"{path}: scores.{kind}: 'scorer' is set by the section's name; remove it")
        scorers[kind] = load(
            ScoreConfig, value, source=str(path), section=f"scores.{kind}", extra={"scorer": kind}
        )
    return load(ScoresSpec, data, source=str(path), section="scores", extra=scorers)


def _load_embedding(data: Any, path: Path) -> EmbeddingSpec:
    if not isinstance(data, Mapping):
        raise DeitaHubError(f"{path}: embedding: expected a mapping of keys, got {type(data).__name__}")
    data = dict(data)
    emb_path = data.pop("path", None)
    config = load(EmbedConfig, data, source=str(path), section="embedding")
    return EmbeddingSpec(config, coerce(emb_path, str | None, f"{path}: embedding: 'path'"))


def recipe_help() -> list[str]:
    """`deita-hub build --help-config`: every recipe key, from the same dataclasses the commands use."""
    lines = ["name (required)\n    the dataset's name", "pool:"]
    lines += describe(PoolSpec, prefix="pool.")
    lines.append("scores:")
    lines += describe(ScoresSpec, prefix="scores.")
    lines.append("scores.complexity / scores.quality (each a `deita-hub score` config):")
    lines += describe(ScoreConfig, prefix="scores.complexity.")
    lines.append("embedding:")
    lines += ["  embedding.path (default: none)\n      precomputed .npy aligned with the pool's rows"]
    lines += describe(EmbedConfig, prefix="embedding.")
    lines.append("selection: (defaults for every configs[] entry)")
    lines += describe(SelectionConfig, prefix="selection.")
    lines.append("configs: a list of subsets, each {name, default, and any selection key}")
    lines.append("card:")
    lines += describe(CardSpec, prefix="card.")
    lines.append("max_rows_per_shard (default: 200000)\n    rows per parquet file")
    return lines


def _resolve_source(recipe_path: Path, source: str) -> str:
    """Paths relative to the recipe; Hub ids ("org/name") that are not local paths pass through."""
    source = str(source)
    candidate = (recipe_path.parent / source).resolve()
    if candidate.exists() or source.startswith((".", "/")) or Path(source).suffix:
        return str(candidate)
    return source


# --- a recipe for one's own pool ------------------------------------------------------------------------------

DEITA_SCORERS = ("hkust-nlp/deita-complexity-scorer", "hkust-nlp/deita-quality-scorer")


def _budgets(rows: int) -> list[tuple[str, int]]:
    """Deita's release budgets when the pool is large enough for them, else a third and a half of the pool."""
    if rows >= 20_000:
        return [("6k", 6000), ("10k", 10000)]
    small, large = max(1, rows // 3), max(1, rows // 2)
    return [(f"deita-{small}", small), (f"deita-{large}", large)]


def _relative(target: str, recipe_dir: Path) -> str:
    path = Path(target)
    if not path.exists():
        return target  # a Hub id
    try:
        return Path(os.path.relpath(path.resolve(), recipe_dir.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return str(path.resolve())


def init_recipe(
    pool,
    source: str,
    out: str | Path,
    *,
    name: str | None = None,
    embeddings: str | None = None,
    complexity_model: str | None = None,
    quality_model: str | None = None,
    pool_spec: PoolSpec | None = None,
) -> str:
    """The text of a commented recipe for `pool` (read from `source`), meant to be edited, then built.

    It records the detected format, where scores come from (the pool's columns, or scorer models that `build`
    runs on the rows lacking them), where embeddings come from (a precomputed `.npy` or an embedder `build` runs),
    and the usual configs: two Deita budgets and the random / longest (/ score) baselines at the larger one.
    """
    import yaml

    out = Path(out)
    recipe_dir = out.parent
    name = (
        name or re.sub(r"[^A-Za-z0-9._-]+", "-", Path(str(source).rstrip("/")).stem).strip("-") or "my-pool"
    )
    columns = set(pool.column_names)
    spec = pool.spec
    default_spec = FormatSpec()
    fmt = {"format": spec.format}
    for key, value in spec.to_dict().items():
        if key != "format" and value != getattr(default_spec, key) and value not in ({}, None):
            fmt[key] = value
    pool_section: dict[str, Any] = {"sources": [_relative(str(source), recipe_dir)], "format": fmt}
    if pool_spec is not None:
        for key in ("config", "split", "revision"):
            value = getattr(pool_spec, key)
            if value != getattr(PoolSpec(), key):
                pool_section[key] = value
        if pool_spec.on_invalid != "error":
            pool_section["on_invalid"] = pool_spec.on_invalid

    has_scores = {"complexity_scores", "quality_scores"} <= columns
    lines = [
        f"# Recipe for {source}, written by `deita-hub recipe init`. Edit it, then build it:",
        f"#   deita-hub build {out.as_posix()} --out build/{name}",
        "# Every key, with its default and meaning: deita-hub build --help-config",
        f"# The pool: {len(pool)} valid rows of {pool.num_source_rows}; format {spec.format} "
        f"(detected from the columns {', '.join(sorted(columns)[:8])}{', ...' if len(columns) > 8 else ''}).",
        yaml.safe_dump({"name": name, "pool": pool_section}, sort_keys=False).rstrip(),
    ]
    if has_scores:
        lines += [
            "# The pool has complexity_scores and quality_scores columns: the Deita subsets use them.",
            "scores: {}",
        ]
    else:
        complexity = complexity_model or DEITA_SCORERS[0]
        quality = quality_model or DEITA_SCORERS[1]
        lines += [
            "# The pool has no Deita scores: `build` scores every row with these scorer models (Deita's own are",
            "# LLaMA-13B-sized: a GPU, hours for 100K rows; backend: vllm is faster). Or score first with",
            "# `deita-hub score` and point pool.sources at the scored file.",
            "scores:",
            "  complexity:",
            f"    model: {complexity}",
            "  quality:",
            f"    model: {quality}",
        ]
    if embeddings:
        lines += [
            "# Precomputed embeddings (rows aligned with the pool; `deita-hub embed` checks the pool's fingerprint).",
            "embedding:",
            f"  path: {_relative(embeddings, recipe_dir)}",
        ]
    else:
        lines += [
            "# `build` embeds the pool: the packaged all-MiniLM-L6-v2 runs offline on a CPU (~50 rows/s on 2 cores).",
            "# Deita's own embedder is Mistral-7B's last token (method: last-token, model: mistralai/Mistral-7B-v0.1,",
            "# a GPU), for which max_similarity 0.9 is calibrated; other embedders need their own threshold.",
            "embedding:",
            "  method: sentence",
        ]
    budgets = _budgets(len(pool))
    largest = budgets[-1][1]
    configs: list[dict[str, Any]] = [
        {"name": label, "method": "deita", "budget": budget, **({"default": True} if i == 0 else {})}
        for i, (label, budget) in enumerate(budgets)
    ]
    suffix = budgets[-1][0].removeprefix("deita-")
    if has_scores:
        configs.append({"name": f"score-{suffix}", "method": "score", "budget": largest})
    configs.append({"name": f"random-{suffix}", "method": "random", "budget": largest, "seed": 42})
    configs.append({"name": f"longest-{suffix}", "method": "longest", "budget": largest})
    lines += [
        "selection:",
        "  max_similarity: 0.9",
        "# The subsets to publish (one Hub config each): Deita's selection and the baselines to compare it with.",
        yaml.safe_dump({"configs": configs}, sort_keys=False).rstrip(),
        "card:",
        f"  pretty_name: {name}",
        "  license: other          # the license of your pool's data",
        "  language: [en]",
    ]
    return "\n".join(lines) + "\n"
