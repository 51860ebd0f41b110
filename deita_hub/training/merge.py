"""`deita-hub merge`: a LoRA/QLoRA adapter folded into its base model, saved as plain transformers weights.

The base loads unquantized in `dtype` (bf16 by default), also for a QLoRA adapter: merging into 4-bit weights
would round the merged weights to NF4 again. (A QLoRA adapter was trained against the NF4-rounded base, so the
merged bf16 model differs slightly from the quantized model used in training; that is the usual trade-off.)

The adapter is a local folder (OUTPUT_DIR/final, a checkpoint) or a Hub repo id (a pushed adapter, at `revision`).
The base is the adapter config's `base_model_name_or_path` at its `revision` (both recorded at training time), or
`base_model`. The output holds the merged weights, the tokenizer with the Vicuna template, `deita_run.json` (kind
"merged", the adapter's record otherwise) and the card. It is written to a temp folder and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from deita_hub.errors import DeitaHubError, require
from deita_hub.hub import is_repo_id
from deita_hub.io import atomic_folder
from deita_hub.models import load_causal_lm, load_tokenizer
from deita_hub.records import ADAPTER_CONFIG, RUN_RECORD
from deita_hub.training import record as run_record

log = logging.getLogger(__name__)

MERGE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class MergeResult:
    out_dir: Path
    base_model: str
    pushed: str | None  # commit URL when pushed


# What a merge needs from a Hub adapter repo: configs, tokenizer, template, record and the adapter weights; never
# the weights of a full model that a mistaken repo id would point at.
_ADAPTER_PATTERNS = ["*.json", "*.jinja", "*.model", "*.txt", "adapter_model.*"]


def download_adapter(repo_id: str, revision: str | None = None) -> Path:
    """The files of a pushed adapter (`repo_id` at `revision`) in the Hugging Face cache; its folder."""
    from deita_hub import hub

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        # adapter_config.json first: a repo that is not an adapter fails before any weights are fetched
        hub.download(repo_id, revision=revision, filename="adapter_config.json")
        return hub.download(repo_id, revision=revision, allow_patterns=_ADAPTER_PATTERNS)
    except hub.NotOnHubError as exc:
        if exc.missing == "repo":
            raise DeitaHubError(
                f"adapter '{repo_id}': no such folder, and no Hub repo of that name (or it is private: "
                "check HF_TOKEN)"
            ) from exc
        if exc.missing == "file":
            raise DeitaHubError(
                f"{where}: not a LoRA adapter (no adapter_config.json); nothing to merge"
            ) from exc
        raise


def merge_adapter(
    adapter: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    base_model: str | None = None,
    revision: str | None = None,
    push: str | None = None,
    private: bool = False,
) -> MergeResult:
    """Merge `adapter` (a deita-hub adapter: final folder, checkpoint, or Hub repo id at `revision`) into its base;
    save to `out_dir`."""
    out_dir = Path(out_dir)
    if dtype not in MERGE_DTYPES:
        raise DeitaHubError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DeitaHubError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    if push is not None and not is_repo_id(push):
        raise DeitaHubError(f"--push must be a Hub repo id 'org/name', got '{push}'")
    if Path(adapter).is_dir():
        if revision is not None:
            raise DeitaHubError(f"--revision is for a Hub adapter repo; {adapter} is a local folder")
        adapter_dir = Path(adapter)
    elif is_repo_id(str(adapter)):
        adapter_dir = download_adapter(str(adapter), revision)
    else:
        raise DeitaHubError(f"adapter '{adapter}' is neither a folder nor a Hub repo id (org/name)")
    adapter_config = adapter_dir / ADAPTER_CONFIG
    if not adapter_config.is_file():
        raise DeitaHubError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json); nothing to merge")
    record = run_record.read_record(adapter_dir)
    if record is None:
        raise DeitaHubError(f"{adapter_dir}: no {RUN_RECORD}; merge needs a deita-hub training output")
    settings = json.loads(adapter_config.read_text(encoding="utf-8"))
    base = base_model or settings.get("base_model_name_or_path")
    # the base revision the adapter was trained on (recorded by `deita-hub train`); --base means its main branch
    base_revision = None if base_model else settings.get("revision")
    if not base:
        raise DeitaHubError(f"{adapter_config}: no base_model_name_or_path; pass --base")
    if base.startswith("/") and not Path(base).exists():
        raise DeitaHubError(
            f"the adapter's base model {base} no longer exists; pass --base (a Hub id or folder)"
        )
    if push:
        from deita_hub.hub import check_token

        check_token()

    import torch

    peft = require("peft", "train", "Merging an adapter")

    from deita_hub.training.data import use_vicuna_template

    log.info(
        "loading %s%s in %s and merging %s",
        base,
        f"@{base_revision}" if base_revision else "",
        dtype,
        adapter,
    )
    model = load_causal_lm(
        base,
        dtype=getattr(torch, dtype),
        revision=base_revision,
        what="the adapter's base model",
        hint="; pass --base (a Hub id or folder)",
    )
    model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer = load_tokenizer(str(adapter_dir))
    use_vicuna_template(tokenizer)

    # out_dir is absent or empty (checked above): the finished folder replaces it.
    with atomic_folder(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        merged = dataclasses.replace(
            record,
            kind="merged",
            model_name=push.split("/")[-1] if push else out_dir.resolve().name,
            hub_repo=push,
            versions=run_record.package_versions(),
            created_at=run_record.utc_now(),
        )
        run_record.write_record(tmp, merged)
        run_record.write_card(tmp)
    pushed = None
    if push:
        from deita_hub.training.push import push_model_folder

        pushed = push_model_folder(
            out_dir, push, private=private, base_model=record.base_model, message="deita-hub: merged model"
        )
    return MergeResult(out_dir=out_dir, base_model=record.base_model, pushed=pushed)
