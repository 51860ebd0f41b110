"""`EvalConfig`: every option of `deita-hub eval`, declared once (the CLI is generated from these fields)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deita_hub.config import DEVICE_HELP, DTYPE_HELP, DTYPES, VLLM_OPTIONS_METADATA, check_choices
from deita_hub.vllm_engine import check_options

SUITES = ("mt-bench", "alpaca-eval", "open-llm", "loss")
BACKENDS = ("transformers", "vllm")
OPEN_LLM_BACKENDS = ("hf", "vllm")
# The six tasks (and shots) behind the Open LLM Leaderboard (v1) average the Deita paper reports.
OPEN_LLM_TASKS = (
    "arc_challenge:25",
    "hellaswag:10",
    "mmlu:5",
    "truthfulqa_mc2:0",
    "winogrande:5",
    "gsm8k:5",
)


@dataclass(frozen=True)
class EvalConfig:
    """How to evaluate a model: `deita-hub eval`'s options."""

    model: str = field(
        default="",
        metadata={
            "help": "a training run's folder (holding final/), a model or adapter folder, or a Hub id",
            "argument": True,
        },
    )
    out: str = field(
        default="",
        metadata={
            "help": "folder for answers, judgments, results.json and README.md (an interrupted eval resumes there)",
            "required": True,
        },
    )
    suite: tuple[str, ...] = field(
        default=("mt-bench", "alpaca-eval", "open-llm"),
        # No "choices" key: check_choices compares whole values, and this one is a tuple (checked below).
        metadata={"help": f"benchmarks to run, comma-separated: {', '.join(SUITES)}"},
    )
    revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of a Hub MODEL"})
    push: str | None = field(
        default=None,
        metadata={"help": "Hub model repo whose card gets the results (one commit; other files kept)"},
    )
    # --- the judge (mt-bench, alpaca-eval) ---
    judge_url: str | None = field(
        default=None,
        metadata={
            "help": "OpenAI-compatible judge endpoint (…/v1): OpenAI, `vllm serve`, TGI; default OpenAI's"
        },
    )
    judge_model: str = field(default="gpt-4", metadata={"help": "judge model name as the endpoint knows it"})
    judge_serve: str | None = field(
        default=None,
        metadata={
            "help": "serve this local model folder as the judge for the eval's duration (transformers serve on "
            "127.0.0.1; extra [eval]); tiny:rating-judge is a tiny offline demo judge. Instead of --judge-url"
        },
    )
    judge_api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata={
            "help": "environment variable holding the judge's API token (the token is never written out)"
        },
    )
    judge_runs: int = field(
        default=3,
        metadata={
            "help": "MT-Bench judge runs (the judge varies by about ±0.16): the median and spread are reported"
        },
    )
    judge_retries: int = field(default=5, metadata={"help": "tries per judge request before the eval fails"})
    judge_timeout: float = field(default=120.0, metadata={"help": "seconds per judge request"})
    judge_max_tokens: int = field(
        default=2048, metadata={"help": "max tokens of a judgment (FastChat's judge setting: 2048)"}
    )
    judge_parallel: int = field(default=8, metadata={"help": "judge requests in flight at once"})
    # --- data ---
    mt_bench_questions: str = field(
        default="HuggingFaceH4/mt_bench_prompts",
        metadata={"help": "MT-Bench questions: FastChat's question.jsonl (a path) or the Hub dataset"},
    )
    alpaca_eval_data: str = field(
        default="tatsu-lab/alpaca_eval",
        metadata={
            "help": "AlpacaEval instructions + reference outputs: a JSON/JSONL file or the Hub dataset"
        },
    )
    alpaca_eval_annotator: str = field(
        default="alpaca_eval_gpt4",
        metadata={
            "help": "alpaca_eval annotator: a name from alpaca_eval's evaluators_configs or a configs.yaml"
        },
    )
    open_llm_tasks: tuple[str, ...] = field(
        default=OPEN_LLM_TASKS,
        metadata={"help": "lm-evaluation-harness tasks as TASK:SHOTS (comma-separated)"},
    )
    open_llm_backend: str = field(
        default="hf", metadata={"help": "lm-evaluation-harness model backend", "choices": OPEN_LLM_BACKENDS}
    )
    lm_eval_include: tuple[str, ...] = field(
        default=(), metadata={"help": "extra folders of lm-evaluation-harness task YAMLs (local tasks)"}
    )
    dataset: str | None = field(
        default=None,
        metadata={"help": "held-out conversations for the loss suite: a pool file or Hub dataset"},
    )
    dataset_split: str = field(default="test", metadata={"help": "split of a Hub --dataset"})
    limit: int | None = field(
        default=None,
        metadata={"help": "evaluate only the first N questions/examples of each benchmark (smoke test)"},
    )
    # --- answer generation ---
    backend: str = field(
        default="transformers",
        metadata={"help": "answer generation engine (vllm: extra [vllm])", "choices": BACKENDS},
    )
    batch_size: int = field(default=16, metadata={"help": "prompts generated (or scored) together"})
    max_new_tokens: int = field(
        default=1024, metadata={"help": "tokens per answer (FastChat's MT-Bench default: 1024)"}
    )
    max_length: int = field(default=2048, metadata={"help": "max tokens per held-out conversation (loss)"})
    dtype: str = field(default="auto", metadata={"help": DTYPE_HELP, "choices": DTYPES})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    seed: int = field(default=0, metadata={"help": "seed of sampled answers (MT-Bench's writing/roleplay/…)"})
    vllm_options: Mapping[str, Any] = field(default_factory=dict, metadata=VLLM_OPTIONS_METADATA)

    def __post_init__(self):
        problems = check_choices(self)
        if not self.model:
            problems.add("model", "is needed: a run folder, a model folder or a Hub id")
        if not self.out:
            problems.add("out", "is needed: the folder the results go to")
        if not self.suite:
            problems.add("suite", f"needs at least one of {', '.join(SUITES)}")
        for suite in self.suite:
            if suite not in SUITES:
                problems.add("suite", f"must be among {', '.join(SUITES)}, got {suite!r}")
        for name in (
            "judge_runs",
            "judge_retries",
            "judge_timeout",
            "judge_parallel",
            "batch_size",
            "max_new_tokens",
            "max_length",
        ):
            problems.positive(name, getattr(self, name))
        if self.limit is not None:
            problems.positive("limit", self.limit)
        for task in self.open_llm_tasks:
            name, _, shots = task.partition(":")
            if not name or not shots.isdigit():
                problems.add("open_llm_tasks", f"entries are TASK:SHOTS, e.g. arc_challenge:25; got {task!r}")
        if "loss" in self.suite and not self.dataset:
            problems.add(
                "dataset", "is needed by the loss suite: held-out conversations (a file or Hub dataset)"
            )
        if self.judge_serve and self.judge_url:
            problems.add("judge_serve", "and --judge-url both name a judge: give one")
        if self.push is not None and "/" not in self.push:
            problems.add("push", f"must be a Hub repo id 'namespace/name', got {self.push!r}")
        problems.raise_if_any()
        check_options(self.vllm_options)

    def open_llm_shots(self) -> list[tuple[str, int]]:
        return [(task.partition(":")[0], int(task.partition(":")[2])) for task in self.open_llm_tasks]

    def public(self) -> dict[str, Any]:
        """The settings as recorded in results.json: the token's variable name, never its value."""
        from dataclasses import asdict

        return {
            key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
        }
