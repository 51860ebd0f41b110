"""`dataset_scripts/*.yaml` -> frozen dataclasses, validated (unknown keys and bad values name the file and key).

A recipe is declarative because datasets >= 4 runs no loading scripts: it says which pool(s), how rows map to
conversations, where scores come from, how to embed, and which subsets (configs) to publish. Relative paths are
relative to the recipe file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from deita_hub.conversations import FormatSpec
from deita_hub.embedding import EmbedConfig
from deita_hub.errors import DeitaHubError
from deita_hub.selection import SelectionConfig

CONFIG_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class PoolSpec:
    sources: tuple[str, ...] = field(
        default=(), metadata={"help": "files, dataset folders or Hub ids (concatenated)"}
    )
    generate: str | None = field(
        default=None, metadata={"help": "'demo': the packaged synthetic pool instead of sources"}
    )
    rows: int = field(default=2400, metadata={"help": "generate: number of synthetic conversations"})
    seed: int = field(default=0, metadata={"help": "generate: seed"})
    format: FormatSpec = field(default_factory=FormatSpec, metadata={"help": "format and field mapping"})
    on_invalid: str = field(
        default="error", metadata={"help": "error | skip (skipped rows are written with reasons)"}
    )
    config: str | None = field(default=None, metadata={"help": "HF dataset sources: config name"})
    split: str = field(default="train", metadata={"help": "HF dataset sources: split"})
    revision: str | None = field(default=None, metadata={"help": "Hub sources: revision"})


@dataclass(frozen=True)
class ScoresSpec:
    complexity_field: str = field(
        default="complexity_scores", metadata={"help": "per-turn complexity scores column"}
    )
    quality_field: str = field(default="quality_scores", metadata={"help": "per-turn quality scores column"})
    complexity_model: str | None = field(
        default=None, metadata={"help": "score rows lacking complexity with this model"}
    )
    quality_model: str | None = field(
        default=None, metadata={"help": "score rows lacking quality with this model"}
    )
    backend: str = field(default="transformers", metadata={"help": "scoring backend: transformers | vllm"})
    batch_size: int = field(default=16, metadata={"help": "scoring batch size"})
    use_ray: bool = field(default=False, metadata={"help": "score on a Ray cluster (extra [ray])"})
    vllm_options: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "vllm backend: extra vllm.EngineArgs (a mapping)"}
    )
    synthetic: bool = field(default=False, metadata={"help": "scores are synthetic (said in the card)"})


@dataclass(frozen=True)
class SubsetSpec:
    name: str
    selection: SelectionConfig
    default: bool = False


@dataclass(frozen=True)
class CardSpec:
    pretty_name: str | None = None
    license: str = "other"
    language: tuple[str, ...] = ("en",)
    tags: tuple[str, ...] = ()
    description: str = ""
    pool_license: str | None = None


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


def _build(cls, data: Any, where: str):
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise DeitaHubError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise DeitaHubError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except DeitaHubError as exc:
        raise DeitaHubError(f"{where}: {exc}") from None
    except TypeError as exc:
        raise DeitaHubError(f"{where}: {exc}") from None


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise DeitaHubError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise DeitaHubError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise DeitaHubError(f"{path}: a recipe is a YAML mapping")
    allowed = {"name", "pool", "scores", "embedding", "selection", "configs", "card", "max_rows_per_shard"}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise DeitaHubError(f"{path}: unknown top-level key(s) {unknown}; allowed: {sorted(allowed)}")
    if not isinstance(data.get("name"), str) or not data["name"]:
        raise DeitaHubError(f"{path}: 'name' (the dataset's name) is required")

    pool_data = dict(data.get("pool") or {})
    format_spec = _build(FormatSpec, pool_data.pop("format", None), f"{path}: pool.format")
    sources = pool_data.get("sources", ())
    if isinstance(sources, str):
        sources = [sources]
    pool_data["sources"] = [_resolve_source(path, s) for s in sources]
    pool = _build(PoolSpec, {**pool_data, "format": format_spec}, f"{path}: pool")
    if bool(pool.sources) == bool(pool.generate):
        raise DeitaHubError(f"{path}: pool needs either 'sources' or 'generate: demo'")
    if pool.generate not in (None, "demo"):
        raise DeitaHubError(f"{path}: pool.generate must be 'demo', got '{pool.generate}'")
    if pool.on_invalid not in ("error", "skip"):
        raise DeitaHubError(f"{path}: pool.on_invalid must be 'error' or 'skip'")

    scores = _build(ScoresSpec, data.get("scores"), f"{path}: scores")
    embedding_data = dict(data.get("embedding") or {})
    emb_path = embedding_data.pop("path", None)
    if emb_path is not None:
        emb_path = str(_resolve_source(path, emb_path))
    embedding = EmbeddingSpec(_build(EmbedConfig, embedding_data, f"{path}: embedding"), emb_path)

    defaults = dict(data.get("selection") or {})
    configs = data.get("configs")
    if not isinstance(configs, list) or not configs:
        raise DeitaHubError(f"{path}: 'configs' must be a non-empty list of subsets (name, method, budget)")
    subsets, seen = [], set()
    for i, entry in enumerate(configs):
        where = f"{path}: configs[{i}]"
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise DeitaHubError(f"{where}: each config needs a 'name'")
        entry = dict(entry)
        name, is_default = str(entry.pop("name")), bool(entry.pop("default", False))
        if not CONFIG_NAME.match(name):
            raise DeitaHubError(f"{where}: config name '{name}' must be letters, digits, '.', '_' or '-'")
        if name in seen:
            raise DeitaHubError(f"{where}: duplicate config name '{name}'")
        seen.add(name)
        subsets.append(SubsetSpec(name, _build(SelectionConfig, {**defaults, **entry}, where), is_default))
    defaults_marked = [s.name for s in subsets if s.default]
    if len(defaults_marked) > 1:
        raise DeitaHubError(f"{path}: only one config may be the default, got {defaults_marked}")
    if not defaults_marked:
        subsets[0] = dataclasses.replace(subsets[0], default=True)
    card = _build(CardSpec, data.get("card"), f"{path}: card")
    recipe = Recipe(
        name=data["name"],
        path=path,
        pool=pool,
        scores=scores,
        embedding=embedding,
        subsets=tuple(subsets),
        card=card,
        max_rows_per_shard=int(data.get("max_rows_per_shard", 200_000)),
    )
    return recipe


def _resolve_source(recipe_path: Path, source: str) -> str:
    """Paths relative to the recipe; Hub ids ("org/name") that are not local paths pass through."""
    source = str(source)
    candidate = (recipe_path.parent / source).resolve()
    if candidate.exists() or source.startswith((".", "/")) or Path(source).suffix:
        return str(candidate)
    return source
