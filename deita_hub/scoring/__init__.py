"""Deita complexity and quality scores: exact, batched, resumable.

Each (user, assistant) pair of a conversation is scored on its own, without earlier turns, as Deita does:
complexity reads the instruction, quality reads (instruction, response). A pair's score is
`Σ_k k · softmax(z)_k` over the logits z of the digit tokens "1".."6" at the first generated position
(`prompts.expected_score`), the digit ids coming from the scorer's own tokenizer.

Backends (`ScoreConfig.backend`): `transformers` (default; length-sorted right-padded batches, one forward pass
each, LM head at the last token only) and `vllm` (extra `[vllm]`). `use_ray` maps rows over a Ray cluster
(`deita_hub.distributed`, extra `[ray]`).

Truncation is explicit (`truncation`): a prompt longer than `max_length` tokens is cut inside the
instruction/response text, never in the template. A row that cannot be scored is recorded with its reason; it
never gets a default score (Deita returned 3.0 on any failure). Resume (`checkpoint`): every finished row is kept
in `<out>.partial/` as soon as its last pair is scored.

Modules: `config` (ScoreConfig), `prompts`, `truncation`, `run` (the scoring loop, `score_pool`),
`checkpoint` (resume and the files beside an output), `transformers_backend`, `vllm_backend`.
"""

from deita_hub.scoring import prompts
from deita_hub.scoring.checkpoint import Checkpoint, checkpoint_dir, failures_path, metadata_path
from deita_hub.scoring.config import BACKENDS, SCORE_FIELDS, SCORERS, TRUNCATION_SIDES, ScoreConfig
from deita_hub.scoring.run import ScoreResult, make_scorer, score_conversations, score_pool, score_rows
from deita_hub.scoring.truncation import PairFailure, truncate_prompt

__all__ = [
    "BACKENDS",
    "SCORERS",
    "SCORE_FIELDS",
    "TRUNCATION_SIDES",
    "Checkpoint",
    "PairFailure",
    "ScoreConfig",
    "ScoreResult",
    "checkpoint_dir",
    "failures_path",
    "make_scorer",
    "metadata_path",
    "prompts",
    "score_conversations",
    "score_pool",
    "score_rows",
    "truncate_prompt",
]
