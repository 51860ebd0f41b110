"""`deita-hub merge`: a LoRA/QLoRA adapter folded into its base model, saved as plain transformers weights.

The base loads unquantized in `dtype` (bf16 by default), also for a QLoRA adapter: merging into 4-bit weights
would round the merged weights to NF4 again. (A QLoRA adapter was trained against the NF4-rounded base, so the
merged bf16 model differs slightly from the quantized model used in training; that is the usual trade-off.)

The output holds the merged weights, the tokenizer with the Vicuna template, `deita_run.json` (kind "merged",
the adapter's record otherwise) and the card. It is written to a temp folder and renamed into place.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from deita_hub.errors import DeitaHubError, require
from deita_hub.training import record as run_record

log = logging.getLogger(__name__)

MERGE_DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class MergeResult:
    out_dir: Path
    base_model: str
    pushed: str | None  # commit URL when pushed


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    base_model: str | None = None,
    push: str | None = None,
    private: bool = False,
) -> MergeResult:
    """Merge `adapter_dir` (a deita-hub adapter: final folder or checkpoint) into its base; save to `out_dir`."""
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    if dtype not in MERGE_DTYPES:
        raise DeitaHubError(f"--dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    adapter_config = adapter_dir / "adapter_config.json"
    if not adapter_config.is_file():
        raise DeitaHubError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json); nothing to merge")
    record = run_record.read_record(adapter_dir)
    if record is None:
        raise DeitaHubError(
            f"{adapter_dir}: no {run_record.RUN_RECORD}; merge needs a deita-hub training output"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise DeitaHubError(f"{out_dir} exists and is not empty; choose another --out or remove it")
    if push is not None and push.count("/") != 1:
        raise DeitaHubError(f"--push must be a Hub repo id 'org/name', got '{push}'")
    base = base_model or json.loads(adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not base:
        raise DeitaHubError(f"{adapter_config}: no base_model_name_or_path; pass --base")
    if base.startswith("/") and not Path(base).exists():
        raise DeitaHubError(
            f"the adapter's base model {base} no longer exists; pass --base (a Hub id or folder)"
        )
    if push:
        from deita_hub.hub import check_token

        check_token()

    torch = require("torch", "train", "Merging an adapter")
    peft = require("peft", "train", "Merging an adapter")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_hub.training.data import use_vicuna_template

    log.info("loading %s in %s and merging %s", base, dtype, adapter_dir)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = peft.PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    use_vicuna_template(tokenizer)

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        merged = dict(record)
        merged.update(
            kind="merged",
            model_name=push.split("/")[-1] if push else out_dir.resolve().name,
            hub_repo=push,
            versions=run_record.package_versions(),
            created_at=run_record.utc_now(),
        )
        run_record.write_record(tmp, merged)
        run_record.write_card(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pushed = None
    if push:
        from deita_hub.training.push import push_model_folder

        pushed = push_model_folder(
            out_dir, push, private=private, base_model=record["base_model"], message="deita-hub: merged model"
        )
    return MergeResult(out_dir=out_dir, base_model=record["base_model"], pushed=pushed)
