"""One place that starts a vLLM engine for the scorers and the last-token embedder (extra `[vllm]`).

Users tune the engine for their hardware with `vllm_options` (`--vllm-option KEY=VALUE`, or a recipe's
`vllm_options:` mapping): any `vllm.EngineArgs` field, e.g. `tensor_parallel_size=4`,
`gpu_memory_utilization=0.5`, `enforce_eager=true`. On vLLM's CPU build `gpu_memory_utilization` is the share of
host memory vLLM reserves (its own documentation says so), which is why the option exists even for tests.
Settings that decide the numbers (model, dtype, context length) stay with deita-hub's own options, so an
output's metadata keeps describing how it was made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import yaml

from deita_hub.errors import DeitaHubError, require

# deita-hub sets these itself; letting an option override them would make the recorded metadata wrong.
RESERVED = frozenset({"model", "tokenizer", "dtype", "max_model_len", "runner", "convert", "task"})


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings from the command line -> a mapping; values read as YAML scalars (0.5, true, 4)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise DeitaHubError(f"--vllm-option expects KEY=VALUE, got '{pair}'")
        try:
            options[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise DeitaHubError(f"--vllm-option {key}: cannot read value '{value}': {exc}") from None
    return options


def check_options(options: Any) -> None:
    """Shape checks that need no vLLM (configs call this when they are built)."""
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise DeitaHubError(f"vllm_options must be a mapping of engine argument names, got {options!r}")
    if "hf_token" in options:  # options are recorded in the outputs' metadata: a token must never be one
        raise DeitaHubError(
            "vllm_options cannot carry hf_token: the Hub token comes from HF_TOKEN or `hf auth login`, never "
            "from options (they are written into the output's metadata)"
        )
    reserved = sorted(RESERVED & set(options))
    if reserved:
        raise DeitaHubError(
            f"vllm_options cannot set {reserved}: deita-hub sets the model, dtype and context length from its "
            "own options (--model, --dtype, --max-length) and records them"
        )


def check_engine_options(vllm, options: Mapping[str, Any]) -> None:
    """`check_options`, and every name an argument of the installed vLLM's engine (`vllm.EngineArgs`)."""
    check_options(options)
    known = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DeitaHubError(
            f"vllm_options: {unknown} are not engine arguments of vLLM {getattr(vllm, '__version__', '?')} "
            "(see vllm.EngineArgs)"
        )


def load_llm(purpose: str, *, options: Mapping[str, Any], **settings: Any):
    """`vllm.LLM(**settings, **options)` with unknown option names rejected before anything loads."""
    vllm = require("vllm", "vllm", purpose)
    check_engine_options(vllm, options)
    try:
        return vllm, vllm.LLM(**settings, **dict(options))
    except Exception as exc:
        raise DeitaHubError(f"{purpose}: vLLM cannot load '{settings.get('model')}': {exc}") from exc


def release(llm) -> None:
    """Stop an engine and free its memory now, not whenever the garbage collector reaches it.

    `build` scores with two models one after the other; on a GPU the second engine would not find the memory the
    first still holds, and with the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) a late collection of the
    first tears down the parallel groups the second has just set up.
    """
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is not None:
        client.shutdown()
    try:
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
    except ImportError:  # older vLLM: the groups go with the process
        return
    cleanup_dist_env_and_memory()
