"""`deita-hub train`: TRL's SFTTrainer (stage sft) or DPOTrainer (stage dpo) with the Vicuna template, for
qlora / lora / full, with pushes and resume.

DPO starts from an SFT model (`model`: a folder or a Hub id at `model_revision`). Its reference model is that
same starting model: with an adapter (lora/qlora) it is the model with the adapter disabled, so no second copy
is loaded; full fine-tuning loads a frozen copy, or none with `precompute_ref_log_probs`.

Every input (config, extras, dataset rows, model path) is checked before a model is built, loaded or written.

Output layout (OUTPUT_DIR = `output_dir`):

    OUTPUT_DIR/deita_train_config.yaml   the resolved config (a resume must match it)
    OUTPUT_DIR/checkpoint-N/             Trainer checkpoint + deita_run.json + README.md (deita-hub's card)
    OUTPUT_DIR/final/                    the trained model or adapter + tokenizer + template + record + card
    OUTPUT_DIR/tiny-<kind>/              the base model, when `model: tiny:<kind>`

A checkpoint is complete once its `deita_run.json` exists: it is written (atomically) after everything the
Trainer saves. `resume` continues from the newest complete checkpoint, with the Trainer's own restore of the
optimizer, scheduler, RNG state and position in the (seeded) data order; an incomplete newer checkpoint, left by
a kill in the middle of a save, is removed first. A save that runs out of disk space removes its incomplete
checkpoint itself and ends with one line naming it and the space left.

The HF token is never given to the Trainer (`TrainingArguments.hub_token` is pickled into `training_args.bin`)
and TRL's own push is never used: uploads go through `deita_hub.hub` with the token from the environment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError
from deita_hub.io import claim_folder, disk_full_error, is_disk_full, replace_folder, write_text
from deita_hub.models import load_tokenizer
from deita_hub.records import MODEL_CONFIG, RUN_RECORD, TRAIN_CONFIG, TRAINER_STATE
from deita_hub.training import record as run_record
from deita_hub.training.config import (
    TINY_PREFIX,
    TrainConfig,
    check_environment,
    check_extras,
    config_from_dict,
    world_size,
)
from deita_hub.training.push import CheckpointUploader, PushAttempt

log = logging.getLogger(__name__)

CONFIG_FILE = TRAIN_CONFIG
FINAL_DIR = "final"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Keys a resumed run may change: they do not touch the model, the data or its order.
RESUMABLE_CHANGES = {
    "push",
    "push_private",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "max_steps",
    "num_train_epochs",
    "license",
    "language",
    "output_dir",
    "tokenized_cache",
}


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    train_loss: float | None
    resumed_from: int | None  # the checkpoint step the run continued from
    pushes: list[PushAttempt] = field(default_factory=list)

    @property
    def push_failures(self) -> list[PushAttempt]:
        return [attempt for attempt in self.pushes if not attempt.ok]

    @property
    def final_pushed(self) -> bool:
        return any(attempt.ok and attempt.step is None for attempt in self.pushes)


# --- checkpoints --------------------------------------------------------------------------------------------------


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_complete(checkpoint: Path) -> bool:
    return (checkpoint / RUN_RECORD).is_file() and (checkpoint / TRAINER_STATE).is_file()


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete(path):
            return path
    return None


def rotate_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; delete the older ones, and the incomplete ones older than the
    newest complete one (nothing resumes from those). Called once a checkpoint's record is written."""
    if keep is None:
        return
    found = checkpoints(output_dir)
    complete = [(step, path) for step, path in found if is_complete(path)]
    if not complete:
        return
    newest = complete[-1][0]
    stale = [path for step, path in found if step < newest and not is_complete(path)]
    for path in [path for _, path in complete[:-keep]] + stale:
        shutil.rmtree(path, ignore_errors=True)


def _ran_out_of_space(exc: BaseException, folder: Path) -> bool:
    """Whether `exc`, raised while `folder` was being saved, says the disk is full. The libraries that save a
    checkpoint each say it their own way: an OSError (ENOSPC), safetensors' and tokenizers' "No space left on device
    (os error 28)", deita-hub's own one-line error for its record; torch.save only "unexpected pos N vs M", so there
    the space left decides: a save that failed with under 1 MiB free ran out of it."""
    if is_disk_full(exc) or "no space left" in str(exc).lower():
        return True
    try:
        return shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free < 1 << 20
    except (OSError, StopIteration):
        return False


def _failed_save(out: Path, exc: BaseException) -> DeitaHubError | None:
    """After the Trainer raised: when a checkpoint save ran out of space, the one-line error, with the incomplete
    checkpoint removed (nothing half-written may look resumable) and the last complete one untouched; None when
    `exc` is something else."""
    last = last_complete_checkpoint(out)
    last_step = int(_CHECKPOINT_RE.match(last.name).group(1)) if last else -1
    incomplete = [path for step, path in checkpoints(out) if step > last_step]
    if not incomplete or not _ran_out_of_space(exc, incomplete[-1]):
        return None
    for path in incomplete:
        shutil.rmtree(path, ignore_errors=True)
    resume = f" with --resume ({last.name} is complete and kept)" if last else ""
    return DeitaHubError(f"{disk_full_error(incomplete[-1], kept=False)}{resume}")


def _prepare_output_dir(config: TrainConfig, resume: bool) -> Path | None:
    """Check OUTPUT_DIR against `resume`; return the checkpoint to resume from (None: start at step 0)."""
    import yaml

    out = Path(config.output_dir)
    saved_config = out / CONFIG_FILE
    existing = checkpoints(out)
    if not resume:
        if existing or (out / FINAL_DIR).exists():
            raise DeitaHubError(
                f"{out} already holds a run ({(existing[-1][1] if existing else out / FINAL_DIR).name}): pass "
                "--resume to continue it, or choose another --output-dir"
            )
        return None
    if saved_config.is_file():
        previous = config_from_dict(
            yaml.safe_load(saved_config.read_text(encoding="utf-8")) or {}, source=str(saved_config)
        )
        changed = sorted(
            key
            for key, value in config.to_dict().items()
            if key not in RESUMABLE_CHANGES and previous.to_dict().get(key) != value
        )
        if changed:
            raise DeitaHubError(
                f"--resume: the config differs from the run in {out} in {', '.join(changed)}; a resumed run must "
                "train the same model on the same data in the same order (use a new --output-dir instead)"
            )
    checkpoint = last_complete_checkpoint(out)
    for step, path in existing:
        if checkpoint is None or step > int(_CHECKPOINT_RE.match(checkpoint.name).group(1)):
            log.warning("removing %s: the save was interrupted (no %s)", path, RUN_RECORD)
            shutil.rmtree(path)
    if checkpoint is None:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", out)
    else:
        log.info("resuming from %s", checkpoint)
    return checkpoint


def _process_state():
    """accelerate's PartialState as the Trainer sets it up (`use_cpu` when there is no CUDA).

    On a machine without CUDA a bare `PartialState()` in a multi-process launch reports every process as the main
    one (distributed type NO): only `cpu=True` makes it the multi-CPU (gloo) state the Trainer will use, so
    `main_process_first()` really orders the processes.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


# --- model --------------------------------------------------------------------------------------------------------


def _resolve_model(config: TrainConfig) -> tuple[str, str]:
    """(what from_pretrained loads, what the record names). `tiny:<kind>` is built into OUTPUT_DIR once."""
    if config.is_tiny:
        from deita_hub.tiny import save_tiny_model

        kind = config.model[len(TINY_PREFIX) :]
        folder = Path(config.output_dir) / f"tiny-{kind}"
        # Under a multi-process launch every rank gets here: the first process of each machine builds the model
        # while the others wait. The temp folder is per process and losing the rename to a finished folder is
        # fine (machines sharing one filesystem build the same seeded model).
        with _process_state().local_main_process_first():
            if not (folder / MODEL_CONFIG).is_file():
                tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                save_tiny_model(tmp, kind)
                try:
                    tmp.rename(folder)
                except OSError:
                    if not (folder / MODEL_CONFIG).is_file():
                        raise
                    shutil.rmtree(tmp, ignore_errors=True)
        return str(folder.resolve()), f"tiny-{kind}"
    return config.model, run_record.model_reference(config.model)


def _peft_config(config: TrainConfig):
    if config.method == "full":
        return None
    from peft import LoraConfig

    # `revision` is saved in adapter_config.json: PEFT's AutoPeftModel (and `deita-hub merge`) load the base at
    # that revision. Without it they would load the base's main branch, which need not be what was trained on.
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules,
        task_type="CAUSAL_LM",
        revision=config.model_revision,
    )


def _quantization_config(config: TrainConfig):
    if config.method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.bnb_4bit_compute_dtype),
    )


def _lora_record(config: TrainConfig) -> dict[str, Any] | None:
    if config.method == "full":
        return None
    return {
        "r": config.lora_r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": config.lora_target_modules,
    }


def _quantization_record(config: TrainConfig) -> dict[str, Any] | None:
    if config.method != "qlora":
        return None
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": config.bnb_4bit_quant_type,
        "bnb_4bit_use_double_quant": config.bnb_4bit_use_double_quant,
        "bnb_4bit_compute_dtype": config.bnb_4bit_compute_dtype,
    }


# --- trainer ------------------------------------------------------------------------------------------------------


def _model_init_kwargs(config: TrainConfig, cuda: bool) -> dict[str, Any]:
    model_init_kwargs: dict[str, Any] = {
        "dtype": config.resolved_model_dtype(),
        "attn_implementation": config.attn_implementation,
    }
    if config.model_revision:
        model_init_kwargs["revision"] = config.model_revision
    if config.method == "qlora" and cuda:
        from accelerate import PartialState

        # A 4-bit model cannot be moved after loading: place it on this process's GPU (also under DDP).
        model_init_kwargs["device_map"] = {"": PartialState().local_process_index}
    return model_init_kwargs


def _checkpointing(config: TrainConfig, cuda: bool) -> bool:
    checkpointing = config.gradient_checkpointing
    if checkpointing and cuda and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "").lower() == "true":
        # FSDP's own activation checkpointing (configs/accelerate/fsdp.yaml) replaces the Trainer's; transformers
        # refuses both at once. (Without a GPU accelerate runs no FSDP, so the Trainer's stays on.)
        log.info("FSDP activation checkpointing is on: the Trainer's gradient_checkpointing is turned off")
        checkpointing = False
    return checkpointing


def _training_arguments(
    config: TrainConfig, *, gradient_accumulation_steps: int, has_eval: bool, cuda: bool
) -> dict[str, Any]:
    """The TrainingArguments both stages share."""
    return dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a value below 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        optim=config.optim,
        adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2,
        adam_epsilon=config.adam_epsilon,
        max_grad_norm=config.max_grad_norm,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        use_cpu=not cuda,
        # transformers 5's name for gradient checkpointing
        activation_checkpointing=_checkpointing(config, cuda),
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        # deita-hub deletes old checkpoints itself, once the new one is complete (`rotate_checkpoints`): the
        # Trainer deletes them before the callback writes the new one's record, so a save that fails there
        # could leave no checkpoint to resume from.
        save_total_limit=None,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.save_steps if has_eval else None,
        report_to=[],
        model_init_kwargs=_model_init_kwargs(config, cuda),
        push_to_hub=False,
        hub_token=None,
        disable_tqdm=True,
    )


def sft_config(config: TrainConfig, *, gradient_accumulation_steps: int, has_eval: bool, cuda: bool):
    """The TRL SFTConfig of a run. The data arrives tokenized and truncated (see training.data), so TRL gets
    `max_length` only to size packs, and no `assistant_only_loss` (the mask column already carries it)."""
    from trl import SFTConfig

    return SFTConfig(
        **_training_arguments(
            config, gradient_accumulation_steps=gradient_accumulation_steps, has_eval=has_eval, cuda=cuda
        ),
        max_length=config.max_length if config.packing else None,
        packing=config.packing,
        packing_strategy="bfd",
        padding_free=config.uses_padding_free,
        assistant_only_loss=False,
    )


def dpo_config(config: TrainConfig, *, gradient_accumulation_steps: int, has_eval: bool, cuda: bool):
    """The TRL DPOConfig of a run. The pairs arrive tokenized and truncated (training.data), so TRL gets no
    `max_length` (its collator would cut again) and pads each batch to its longest sequence."""
    from trl import DPOConfig

    return DPOConfig(
        **_training_arguments(
            config, gradient_accumulation_steps=gradient_accumulation_steps, has_eval=has_eval, cuda=cuda
        ),
        max_length=None,
        beta=config.beta,
        loss_type=[config.loss_type],
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        padding_free=False,  # TRL 1.16: "temporarily unavailable" for DPO, it would warn and pad anyway
    )


@contextmanager
def _config_mixed_precision(config: TrainConfig):
    """While the trainer is built, the config's `bf16` is the run's mixed precision, whatever `accelerate launch`
    was told.

    The launcher exports its config's `mixed_precision` (configs/accelerate/fsdp.yaml says bf16) as
    ACCELERATE_MIXED_PRECISION, and transformers takes it when `bf16` is false: a `bf16: false` run would then
    train in bf16 autocast while its record says fp32. The training config is the one source of truth.
    """
    wanted = "bf16" if config.bf16 else "no"
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched is not None and launched != wanted and _process_state().is_main_process:
        log.warning(
            "accelerate launch asked for mixed precision '%s'; the training config (bf16: %s) decides: '%s'",
            launched,
            str(config.bf16).lower(),
            wanted,
        )
    os.environ["ACCELERATE_MIXED_PRECISION"] = wanted
    try:
        yield
    finally:
        if launched is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION", None)
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = launched


def _warn_if_not_sharded(distributed_type: str) -> None:
    """accelerate 1.x turns a launch into FSDP only on accelerators (state.py promotes MULTI_GPU/XPU/... to FSDP,
    never MULTI_CPU): on CPU the FSDP config silently becomes plain DDP over gloo. Say so."""
    if not _process_state().is_main_process:
        return
    for variable, wanted in (("ACCELERATE_USE_FSDP", "fsdp"), ("ACCELERATE_USE_DEEPSPEED", "deepspeed")):
        if os.environ.get(variable, "").lower() == "true" and distributed_type != wanted:
            log.warning(
                "the launch asked for %s but accelerate runs %s: weights, gradients and optimizer state are "
                "not sharded but replicated in every process",
                wanted,
                distributed_type,
            )


def _distributed_type(trainer, cuda: bool) -> str:
    kind = str(trainer.accelerator.state.distributed_type).split(".")[-1].upper()
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp", "MULTI_GPU": "multi-GPU", "MULTI_CPU": "multi-CPU"}.get(
        kind, "single-GPU" if cuda else "cpu"
    )


def _hyperparameters(config: TrainConfig, args, *, distributed_type: str, devices: int) -> dict[str, Any]:
    return {
        "learning_rate": config.learning_rate,
        "train_batch_size": config.per_device_train_batch_size,
        "eval_batch_size": config.per_device_eval_batch_size,
        "seed": config.seed,
        "distributed_type": distributed_type,
        "num_devices": devices,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "total_train_batch_size": config.total_train_batch_size,
        "total_eval_batch_size": config.per_device_eval_batch_size * devices,
        "optimizer": {
            "name": config.optim,
            "betas": [config.adam_beta1, config.adam_beta2],
            "epsilon": config.adam_epsilon,
            "weight_decay": config.weight_decay,
        },
        "lr_scheduler_type": config.lr_scheduler_type,
        "lr_scheduler_warmup_ratio": config.warmup_ratio,
        "num_epochs": float(config.num_train_epochs),
        "max_length": config.max_length,
        "bf16": config.bf16,
        "packing": config.packing,
        "padding_free": config.uses_padding_free and config.stage == "sft",
        "assistant_only_loss": True,
        "max_steps": config.max_steps,
    }


def _dpo_record(config: TrainConfig, base_model: str) -> dict[str, Any] | None:
    """The DPO settings and lineage of a stage-dpo run (None for SFT)."""
    if config.stage != "dpo":
        return None
    if config.method != "full":
        reference = f"{base_model} with the adapter disabled (no second copy in memory)"
    elif config.precompute_ref_log_probs:
        reference = f"{base_model} (log-probabilities computed once before training)"
    else:
        reference = f"{base_model} (a frozen copy)"
    if config.is_tiny:  # a random tiny model, not an SFT model: no lineage to read
        lineage = {
            "sft_model": base_model,
            "sft_model_revision": None,
            "sft_base_model": None,
            "sft_datasets": [],
        }
    else:
        lineage = run_record.sft_lineage(config.model, config.model_revision)
    return {
        "beta": config.beta,
        "loss_type": config.loss_type,
        "reference_model": reference,
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        **lineage,
    }


class _RunRecorder:
    """Builds the record for a checkpoint or the final folder from the trainer's live state."""

    def __init__(self, config: TrainConfig, *, base_model: str, dataset: dict, hyperparameters: dict):
        self.config = config
        self.base_model = base_model
        self.dataset = dataset
        self.hyperparameters = hyperparameters
        self.dpo = _dpo_record(config, base_model)

    def build(
        self, state, *, train_loss: float | None = None, runtime_s: float | None = None
    ) -> dict[str, Any]:
        config = self.config
        name = config.push.split("/")[-1] if config.push else Path(config.output_dir).resolve().name
        return run_record.new_record(
            kind="full" if config.method == "full" else "adapter",
            method=config.method,
            base_model=self.base_model,
            base_model_revision=self.config.model_revision,
            model_name=name,
            hub_repo=config.push,
            dataset=self.dataset,
            hyperparameters=self.hyperparameters,
            lora=_lora_record(config),
            quantization=_quantization_record(config),
            results=run_record.results(state, train_loss=train_loss, runtime_s=runtime_s),
            license=config.license,
            language=config.language,
            stage=config.stage,
            dpo=self.dpo,
        )

    def write(self, folder: Path, state, **results) -> None:
        # The record marks a checkpoint complete (it comes after every Trainer file); the card is rendered from it
        # and overwrites the README that PEFT/TRL wrote.
        run_record.write_record(folder, self.build(state, **results))
        run_record.write_card(folder)


def _callback(recorder: _RunRecorder, uploader: CheckpointUploader | None, keep: int | None):
    from transformers import TrainerCallback

    class DeitaHubCallback(TrainerCallback):
        """After each Trainer save: the record + card into the checkpoint, then its upload in the background."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            recorder.write(folder, state)
            if uploader is not None:
                uploader.submit(state.global_step, folder)  # staged (copied) before it returns
            rotate_checkpoints(Path(args.output_dir), keep)

    return DeitaHubCallback()


def _log_value(value) -> str:
    """A logged number as a person reads it: whole numbers whole (tokens, a learning rate of 0), others to 4
    significant digits, as the Trainer's own printer gives them."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
    return str(value)


def _log_lines():
    from transformers import TrainerCallback

    class LogLines(TrainerCallback):
        """Each Trainer log (loss, learning rate, eval metrics, the run's totals) as one line through deita-hub's
        logger, on stderr with its other progress lines (and hidden with them by -q)."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            values = ", ".join(
                f"{key} {_log_value(value)}"
                for key, value in logs.items()
                if key not in ("epoch", "total_flos")
            )
            log.info(
                "step %d/%d (epoch %.3g): %s", state.global_step, state.max_steps, state.epoch or 0, values
            )

    return LogLines()


def _trainer_class(stage: str = "sft"):
    if stage == "dpo":
        from trl import DPOTrainer

        class DeitaDPOTrainer(DPOTrainer):
            """TRL's DPOTrainer on pairs deita-hub has already rendered and tokenized (training.data), without
            TRL's model card (see DeitaSFTTrainer)."""

            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                # TRL would re-render the pairs with its own prompt/completion split; ours are byte-exact Vicuna.
                return dataset

            def create_model_card(self, *args, **kwargs) -> None:
                return None

        return DeitaDPOTrainer

    from trl import SFTTrainer

    class DeitaSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer without TRL's own model card: TRL writes one into OUTPUT_DIR at every save, with
        `base_model` dropped for local paths; deita-hub renders its card from deita_run.json instead."""

        def create_model_card(self, *args, **kwargs) -> None:
            return None

    return DeitaSFTTrainer


def check_model(config: TrainConfig) -> None:
    """The model to start from exists (a folder, or what looks like a Hub id) and, for DPO, is a whole model."""
    from deita_hub.hub import is_repo_id
    from deita_hub.records import ADAPTER_CONFIG

    if config.is_tiny:
        return
    path = Path(config.model)
    if not path.exists() and not is_repo_id(config.model):
        raise DeitaHubError(f"model '{config.model}': no such folder, and not a Hub model id 'org/name'")
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / MODEL_CONFIG).is_file():
        raise DeitaHubError(
            f"model '{config.model}' is a LoRA adapter: {config.stage} starts from a whole model; fold it into its "
            f"base first (deita-hub merge {config.model} --out MERGED) and train from MERGED"
        )


def build_trainer(config: TrainConfig, *, extra_callbacks=(), uploader_factory=None, rows=None):
    """Everything up to `trainer.train()`; returns (trainer, recorder, uploader, data). Used by `train` and tests.

    `rows`: the dataset as `training.data.read_training_rows` read it (read here when not given)."""
    import torch
    from transformers import PrinterCallback

    from deita_hub.training.data import load_train_data, read_training_rows
    from deita_hub.training.token_cache import quiet_datasets

    cuda = torch.cuda.is_available()
    devices = world_size()
    accumulation = config.gradient_accumulation_steps(devices)
    if rows is None:
        check_model(config)
        rows = read_training_rows(config)  # a bad dataset fails before a model is built or loaded
    model_path, base_model = _resolve_model(config)
    tokenizer = load_tokenizer(model_path, revision=config.model_revision)
    data = load_train_data(config, tokenizer, rows)
    log.info(
        "training data: %d %s, %d tokens (%d truncated to %d, %d dropped)",
        data.num_conversations,
        "preference pairs" if config.stage == "dpo" else "conversations",
        data.num_tokens,
        data.num_truncated,
        config.max_length,
        data.num_dropped,
    )
    if config.method == "qlora" and not cuda:
        log.info(
            "qlora on CPU: bitsandbytes' CPU 4-bit kernels train, slowly (fine for tiny models and tests)"
        )
    with (
        _config_mixed_precision(config),
        quiet_datasets(),
    ):  # TRL's "Building labels" bar: rows already tokenized
        make_args = dpo_config if config.stage == "dpo" else sft_config
        args = make_args(
            config, gradient_accumulation_steps=accumulation, has_eval=data.eval is not None, cuda=cuda
        )
        trainer = _trainer_class(config.stage)(
            model=model_path,
            args=args,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=_peft_config(config),
            quantization_config=_quantization_config(config),
        )
    distributed_type = _distributed_type(trainer, cuda)
    _warn_if_not_sharded(distributed_type)
    recorder = _RunRecorder(
        config,
        base_model=base_model,
        dataset=data.record,
        hyperparameters=_hyperparameters(
            config, trainer.args, distributed_type=distributed_type, devices=devices
        ),
    )
    uploader = None
    if config.push and trainer.is_world_process_zero():
        uploader = (uploader_factory or CheckpointUploader)(
            config.push,
            private=config.push_private,
            staging_root=Path(config.output_dir) / ".push-staging",
            base_model=base_model,
        )
    trainer.add_callback(_callback(recorder, uploader, config.save_total_limit))
    trainer.remove_callback(
        PrinterCallback
    )  # a dict per log on stdout (the Trainer's bars are off): one line instead
    trainer.add_callback(_log_lines())
    for callback in extra_callbacks:
        trainer.add_callback(callback)
    return trainer, recorder, uploader, data


def _finished(checkpoint: Path, config: TrainConfig) -> bool:
    """Whether `checkpoint` already ends the planned run (the Trainer, resumed there, would run one more step)."""
    state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    if config.max_steps > 0:
        return state["global_step"] >= config.max_steps
    return (
        state.get("num_train_epochs") == config.num_train_epochs
        and state["global_step"] >= state["max_steps"]
    )


def _final_from_checkpoint(config: TrainConfig, checkpoint: Path) -> TrainResult:
    """A run whose last checkpoint is its last step: OUTPUT_DIR/final is that checkpoint's model (and is pushed)."""
    from deita_hub.training.push import push_model_folder, stage

    out = Path(config.output_dir)
    step = int(_CHECKPOINT_RE.match(checkpoint.name).group(1))
    log.info("%s is the last step of this run: making it the final model", checkpoint.name)
    record = run_record.read_record(checkpoint)
    tmp = out / f".{FINAL_DIR}.tmp"
    stage(checkpoint, tmp, base_model=None)  # the model files only, as pushed; adapter_config kept as is
    if record is not None:
        record = dataclasses.replace(
            record,
            hub_repo=config.push,
            model_name=config.push.split("/")[-1] if config.push else out.resolve().name,
        )
        run_record.write_record(tmp, record)
        run_record.write_card(tmp)
    final = out / FINAL_DIR
    replace_folder(tmp, final)
    result = TrainResult(
        output_dir=out,
        final_dir=final,
        global_step=step,
        train_loss=record.results.get("train_loss") if record is not None else None,
        resumed_from=step,
    )
    if config.push:
        try:
            detail = push_model_folder(
                final, config.push, private=config.push_private, base_model=record.base_model,
                message="deita-hub: final model",
            )  # fmt: skip
            result.pushes = [PushAttempt(None, True, detail)]
        except DeitaHubError as exc:
            result.pushes = [PushAttempt(None, False, str(exc))]
    return result


def train(config: TrainConfig, *, resume: bool = False, extra_callbacks=()) -> TrainResult:
    """Train, checkpoint (and push) every `save_steps`, save OUTPUT_DIR/final (and push it)."""
    import yaml

    # Cheap checks first: nothing heavy has loaded when these fail.
    if not config.dataset:
        raise DeitaHubError("no training data: set 'dataset' in the config or pass --dataset")
    config.gradient_accumulation_steps(world_size())
    check_extras(config)
    check_environment(config)
    check_model(config)
    from deita_hub.training.data import read_training_rows

    rows = read_training_rows(config)  # every row validated before a model is built, loaded or written
    if config.push:
        from deita_hub.hub import check_token

        check_token()  # a missing or rejected token fails now, not after the first checkpoint
    # Under a multi-process launch the main process cleans OUTPUT_DIR (interrupted saves) before the others look.
    with _process_state().main_process_first():
        if _process_state().is_main_process:  # a second training into OUTPUT_DIR refuses while this runs
            claim_folder(config.output_dir, "a training")
        checkpoint = _prepare_output_dir(config, resume)

    out = Path(config.output_dir)
    if checkpoint is not None and _finished(checkpoint, config):
        # One process writes (and pushes) OUTPUT_DIR/final; under a multi-process launch the others wait for it.
        state = _process_state()
        result = _final_from_checkpoint(config, checkpoint) if state.is_main_process else None
        state.wait_for_everyone()
        if result is None:
            step = int(_CHECKPOINT_RE.match(checkpoint.name).group(1))
            result = TrainResult(
                output_dir=out,
                final_dir=out / FINAL_DIR,
                global_step=step,
                train_loss=None,
                resumed_from=step,
            )
        return result
    out.mkdir(parents=True, exist_ok=True)
    trainer, recorder, uploader, _ = build_trainer(config, extra_callbacks=extra_callbacks, rows=rows)
    if trainer.is_world_process_zero():
        write_text(out / CONFIG_FILE, yaml.safe_dump(config.to_dict(), sort_keys=False))
    try:
        output = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    except Exception as exc:
        failed = _failed_save(out, exc) if trainer.is_world_process_zero() else None
        if failed is None:
            raise
        raise failed from None
    finally:
        if uploader is not None:
            uploader.wait()

    final = out / FINAL_DIR
    tmp = out / f".{FINAL_DIR}.tmp"
    if trainer.is_world_process_zero():
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        trainer.save_model(str(tmp))  # every rank: FSDP/DeepSpeed gather the weights
    except Exception as exc:
        if not (trainer.is_world_process_zero() and _ran_out_of_space(exc, tmp)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise DeitaHubError(f"{disk_full_error(final, kept=False)}; the checkpoints are kept") from None
    trainer.accelerator.wait_for_everyone()
    result = TrainResult(
        output_dir=out,
        final_dir=final,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        resumed_from=int(_CHECKPOINT_RE.match(checkpoint.name).group(1)) if checkpoint else None,
    )
    if not trainer.is_world_process_zero():
        return result
    recorder.write(
        tmp, trainer.state, train_loss=output.training_loss, runtime_s=output.metrics.get("train_runtime")
    )
    replace_folder(tmp, final)
    if uploader is not None:
        uploader.push_final(final)
        result.pushes = list(uploader.attempts)
    return result
