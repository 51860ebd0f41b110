"""`ScoreConfig`: how to score, one field per `deita-hub score` option and recipe `scores:` key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deita_hub.config import DEVICE_HELP, DTYPE_HELP, DTYPES, VLLM_OPTIONS_METADATA, check_choices
from deita_hub.vllm_engine import check_options

SCORERS = ("complexity", "quality")
BACKENDS = ("transformers", "vllm")
TRUNCATION_SIDES = ("right", "left", "none")
SCORE_FIELDS = {"complexity": "complexity_scores", "quality": "quality_scores"}


@dataclass(frozen=True)
class ScoreConfig:
    """How to score: `deita-hub score`'s options, and each scorer of a recipe's `scores:` section."""

    scorer: str = field(
        metadata={
            "help": "complexity reads each instruction; quality reads each (instruction, response) pair",
            "choices": SCORERS,
        }
    )
    model: str = field(
        metadata={"help": "scorer model: Hub id or local folder, e.g. hkust-nlp/deita-complexity-scorer"}
    )
    backend: str = field(
        default="transformers",
        metadata={"help": "inference engine (vllm: extra [vllm])", "choices": BACKENDS},
    )
    batch_size: int = field(default=16, metadata={"help": "prompts per forward pass (transformers backend)"})
    max_length: int = field(
        default=2048,
        metadata={"help": "max prompt tokens incl. BOS (Deita's LLaMA-1 scorers have 2,048 positions)"},
    )
    truncation_side: str = field(
        default="right",
        metadata={
            "help": "longer prompts are cut inside the instruction/response text, never in the template: right keeps "
            "the text's beginning (where the task is stated), left its end, none fails the pair",
            "choices": TRUNCATION_SIDES,
        },
    )
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    use_ray: bool = field(
        default=False, metadata={"help": "map rows over a Ray cluster (extra [ray])", "flag": "--ray"}
    )
    ray_actors: int | None = field(
        default=None,
        metadata={"help": "Ray actors (one model each); default one per GPU in the cluster, else 1"},
    )
    chunk_rows: int = field(
        default=1024, metadata={"help": "rows tokenized and length-sorted together (and per Ray task)"}
    )
    vllm_options: Mapping[str, Any] = field(default_factory=dict, metadata=VLLM_OPTIONS_METADATA)

    def __post_init__(self):
        problems = check_choices(self)
        if not self.model:
            problems.add("model", "is needed: a scorer model's Hub id or local folder")
        for name in ("batch_size", "chunk_rows"):
            problems.positive(name, getattr(self, name))
        if self.max_length < 16:
            problems.add("max_length", f"must be at least 16, got {self.max_length}")
        if self.ray_actors is not None:
            problems.positive("ray_actors", self.ray_actors)
        problems.raise_if_any()
        check_options(self.vllm_options)

    @property
    def output_field(self) -> str:
        return SCORE_FIELDS[self.scorer]
