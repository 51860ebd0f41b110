"""Loading causal LMs and their tokenizers, and choosing device and dtype: one place for every stage.

Scoring, the last-token embedder, training, chat and merge load models and tokenizers here, so a model that cannot
be loaded fails the same way everywhere: a one-line `DeitaHubError` naming the model and the reason. Models load
with transformers' `from_pretrained` (a Hub id at `revision`, or a local folder); adapters with PEFT.
"""

from __future__ import annotations

from typing import Any

from deita_hub.config import DTYPES
from deita_hub.errors import DeitaHubError, require


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_dtype(device: str | None, dtype: str):
    """`None` device -> cuda when available; `auto` dtype -> bfloat16 on GPU, float32 on CPU. (device, torch dtype)"""
    import torch

    if dtype not in DTYPES:
        raise DeitaHubError(f"dtype must be one of {DTYPES}, got '{dtype}'")
    device = device or default_device()
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def load_tokenizer(model: str, *, revision: str | None = None):
    """The tokenizer of `model` (Hub id or folder) at `revision`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, revision=revision)
    except Exception as exc:  # OSError, ValueError, HTTP errors: the user needs the model name and the reason
        raise DeitaHubError(f"cannot load the tokenizer of '{model}': {exc}") from exc


def load_causal_lm(
    model: str,
    *,
    dtype: Any,
    revision: str | None = None,
    adapter: bool = False,
    what: str = "model",
    hint: str = "",
):
    """`model` (Hub id or folder) at `revision` as a causal LM in `dtype` (a torch dtype), on the CPU.

    `adapter`: `model` is a PEFT adapter, loaded on its base; PEFT takes the base and its revision from
    adapter_config.json (transformers' own adapter loading would take the base's main branch, or look for the
    adapter's `revision` in the base repo). A failure reads "cannot load {what} '{model}': {reason}{hint}".
    """
    peft = require("peft", "train", "Loading a LoRA adapter") if adapter else None
    from transformers import AutoModelForCausalLM

    try:
        if peft is not None:
            return peft.AutoPeftModelForCausalLM.from_pretrained(model, dtype=dtype, revision=revision)
        return AutoModelForCausalLM.from_pretrained(model, dtype=dtype, revision=revision)
    except Exception as exc:  # not a folder, not on the Hub, the revision is gone, an unknown architecture
        raise DeitaHubError(f"cannot load {what} '{model}': {exc}{hint}") from exc


def is_adapter(path: str, revision: str | None = None) -> bool:
    """Whether `path` (a folder or a Hub id) holds a PEFT adapter (adapter_config.json) rather than a whole model.

    A Hub id is asked through the Hub module: one quick check, one-line errors that never hold the token."""
    from pathlib import Path

    from deita_hub import hub
    from deita_hub.records import ADAPTER_CONFIG

    if Path(path).is_dir():
        return (Path(path) / ADAPTER_CONFIG).is_file()
    try:
        hub.download(path, revision=revision, filename=ADAPTER_CONFIG)
        return True
    except hub.NotOnHubError as exc:
        if exc.missing == "file":
            return False
        raise
