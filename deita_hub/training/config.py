"""The training config: one frozen dataclass, mirrored key for key by `configs/*.yaml`, overridden by CLI flags.

Everything is checked here, before a model or a dataset is loaded: unknown keys (with the closest known key),
value types and ranges, the batch arithmetic (`total_train_batch_size` must split evenly over the devices and
the per-device batch: the gradient accumulation is derived, never configured), options that need a GPU, and the
optional extras the method needs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from deita_hub.config import check_choices, load, read_mapping, unknown_keys
from deita_hub.conversations import FORMATS
from deita_hub.errors import DeitaHubError, MissingExtraError
from deita_hub.hub import is_repo_id

METHODS = ("qlora", "lora", "full")
DTYPES = ("auto", "bfloat16", "float16", "float32")
TINY_PREFIX = "tiny:"  # `model: tiny:mistral` builds deita_hub.tiny's random model into the output dir
TINY_KINDS = ("mistral", "llama")
GPU_ATTENTION = ("flash_attention_2", "flash_attention_3")
ATTENTION = ("sdpa", "eager", *GPU_ATTENTION)
STAGES = ("sft", "dpo")
# TRL 1.16 DPOConfig.loss_type values (one at a time here); `sigmoid` is the DPO paper's loss, Deita's.
DPO_LOSSES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
)


@dataclass(frozen=True)
class TrainConfig:
    """One training run: SFT (defaults: the seed model DEITA-7B-v1.0-sft's hyperparameters) or DPO (`stage: dpo`,
    DEITA-7B-v1.0's second stage: configs/mistral-7b-dpo.yaml)."""

    # --- what to train ---
    stage: str = field(
        default="sft",
        metadata={
            "help": "sft (TRL's SFTTrainer on conversations) or dpo (TRL's DPOTrainer on preference pairs: "
            "prompt, chosen, rejected; `model` is then the SFT model to start from)",
            "choices": STAGES,
        },
    )
    method: str = field(
        default="qlora",
        metadata={
            "help": "qlora (4-bit NF4 base + LoRA), lora (LoRA on a bf16/fp32 base) or full (all weights)",
            "choices": METHODS,
        },
    )
    model: str = field(
        default="mistralai/Mistral-7B-v0.1",
        metadata={
            "help": "base model: Hub id, local folder, or 'tiny:mistral' / 'tiny:llama' (a tiny random model with "
            "the offline Llama-2 tokenizer, built into OUTPUT_DIR/tiny-<kind>; for CPU demos and tests)"
        },
    )
    model_revision: str | None = field(
        default=None, metadata={"help": "branch, tag or commit of a Hub model", "flag": "--revision"}
    )
    model_dtype: str = field(
        default="auto",
        metadata={
            "help": "dtype the base weights load in: auto (full: float32 master weights with bf16 autocast; "
            "lora/qlora: bfloat16 when bf16 else float32), bfloat16, float16, float32",
            "choices": DTYPES,
            "flag": "--dtype",
        },
    )
    attn_implementation: str = field(
        default="sdpa",
        metadata={
            "help": "attention kernel (the flash kernels need a CUDA GPU)",
            "choices": ATTENTION,
        },
    )
    # --- data ---
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "training data: a built deita-hub dataset folder, a Hub dataset id, or a JSON/JSONL/parquet "
            "pool in any format the pool reader takes (ShareGPT, OpenAI messages, Alpaca)"
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "dataset subset, e.g. 6k or 10k"})
    dataset_split: str = field(default="train", metadata={"help": "dataset split"})
    dataset_revision: str | None = field(
        default=None, metadata={"help": "branch, tag or commit of a Hub dataset"}
    )
    dataset_format: str = field(
        default="auto",
        metadata={"help": "pool format of the dataset", "choices": FORMATS, "flag": "--format"},
    )
    on_invalid: str = field(
        default="error",
        metadata={
            "help": "rows that are not valid conversations or preference pairs: error (name the first) or skip "
            "(train without them; each is logged with its reason and counted in the run record)",
            "choices": ("error", "skip"),
            "flag": "--skip-invalid",
            "flag_value": "skip",
        },
    )
    eval_ratio: float = field(
        default=0.0,
        metadata={"help": "fraction of rows held out (seeded) for eval loss at every save; 0 disables eval"},
    )
    max_length: int = field(
        default=2048,
        metadata={
            "help": "tokens per conversation; longer ones keep their beginning (TRL's default is 1024)"
        },
    )
    padding_free: bool = field(
        default=True,
        metadata={
            "help": "concatenate each micro-batch without pad tokens, with per-conversation position_ids: the same "
            "loss and gradients as padding (exact), less compute"
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "pack conversations into rows of max_length tokens (TRL's BFD). Per-token losses stay exact, "
            "but a batch element becomes a pack, so total_train_batch_size counts packs, not conversations, and "
            "the step count differs from the seed recipe"
        },
    )
    tokenized_cache: bool = field(
        default=True,
        metadata={
            "help": "keep the token ids under $DEITA_HUB_CACHE/tokenized and reuse them when the data, tokenizer, "
            "chat template, max_length and batching are the same; off: tokenize afresh and write nothing"
        },
    )
    # --- DPO (stage: dpo) ---
    beta: float = field(
        default=0.1,
        metadata={"help": "dpo: strength of the pull towards the reference model (Deita: 0.1)"},
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "dpo: TRL's preference loss (sigmoid is the DPO paper's)", "choices": DPO_LOSSES},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "dpo: compute the reference model's log-probabilities once before training, so that full "
            "fine-tuning keeps no second model in memory (lora/qlora never do: their reference is the model "
            "with the adapter disabled)"
        },
    )
    # --- optimisation ---
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of the steps spent warming up"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    optim: str = field(default="adamw_torch", metadata={"help": "transformers optimizer name"})
    adam_beta1: float = field(default=0.9, metadata={"help": "Adam beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "Adam beta2"})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "Adam epsilon"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    num_train_epochs: float = field(default=6.0, metadata={"help": "epochs over the dataset"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; > 0 overrides num_train_epochs"})
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "conversations (or packs) per device per micro-step"}
    )
    per_device_eval_batch_size: int = field(default=1, metadata={"help": "eval batch per device"})
    total_train_batch_size: int = field(
        default=512,
        metadata={
            "help": "conversations (or packs) per optimizer step over all devices; gradient accumulation = "
            "total / (devices x per_device_train_batch_size), which must be a whole number"
        },
    )
    seed: int = field(default=42, metadata={"help": "seed for weights init, data order and dropout"})
    bf16: bool = field(
        default=True,
        metadata={
            "help": "bf16 mixed precision (autocast; fp32 master weights for full). Also runs on CPU, where it is "
            "slower than fp32 unless the CPU has native bf16 instructions (AVX512-BF16, AMX)"
        },
    )
    gradient_checkpointing: bool = field(
        default=True, metadata={"help": "recompute activations to save memory"}
    )
    # --- LoRA / QLoRA ---
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale = alpha / r)"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_target_modules: str | list[str] = field(
        default="all-linear",
        metadata={"help": "modules to adapt: 'all-linear' (every linear layer but lm_head) or a list"},
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "qlora: 4-bit quantization type", "choices": ("nf4", "fp4")}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "qlora: quantize the quantization constants"}
    )
    bnb_4bit_compute_dtype: str = field(
        default="bfloat16", metadata={"help": "qlora: dtype of the 4-bit matmuls", "choices": DTYPES[1:]}
    )
    # --- checkpoints, logging, publishing ---
    output_dir: str = field(
        default="runs/deita-7b",
        metadata={
            "help": "the run folder: checkpoints go to OUT/checkpoint-N, the model to OUT/final",
            "flag": "--out",
            "aliases": ("--output-dir",),
        },
    )
    save_steps: int = field(
        default=50, metadata={"help": "save (and push) a checkpoint every N optimizer steps"}
    )
    save_total_limit: int | None = field(
        default=None, metadata={"help": "keep only the newest N checkpoints"}
    )
    logging_steps: int = field(default=1, metadata={"help": "log the loss every N steps"})
    push: str | None = field(
        default=None,
        metadata={
            "help": "Hub repo (org/name) to push every checkpoint and the final model to; null: no push"
        },
    )
    push_private: bool = field(
        default=False, metadata={"help": "create the Hub repo private", "flag": "--private"}
    )
    license: str = field(default="apache-2.0", metadata={"help": "license recorded in the model card"})
    language: list[str] = field(
        default_factory=lambda: ["en"], metadata={"help": "languages recorded in the card"}
    )

    def __post_init__(self):
        if self.lora_target_modules == ["all-linear"]:  # `--lora-target-modules all-linear` from the CLI
            object.__setattr__(self, "lora_target_modules", "all-linear")
        check = check_choices(self)
        if self.model.startswith(TINY_PREFIX):
            check.choice("model", self.model, tuple(TINY_PREFIX + kind for kind in TINY_KINDS))
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "total_train_batch_size",
            "save_steps",
            "logging_steps",
            "lora_r",
            "lora_alpha",
            "learning_rate",
            "adam_epsilon",
            "num_train_epochs",
        ):
            check.positive(name, getattr(self, name))
        for name in ("warmup_ratio", "lora_dropout", "eval_ratio", "adam_beta1", "adam_beta2"):
            check.fraction(name, getattr(self, name))
        if self.max_steps == 0 or self.max_steps < -1:
            check.add("max_steps", f"must be -1 (use num_train_epochs) or positive, got {self.max_steps}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            check.add("save_total_limit", f"must be null or positive, got {self.save_total_limit}")
        if self.push is not None and not is_repo_id(self.push):
            check.add("push", f"must be a Hub repo id 'org/name', got '{self.push}'")
        if self.stage == "dpo":
            check.positive("beta", self.beta)
            if self.packing:
                check.add("packing", "is for stage sft; DPO batches pairs (set packing: false)")
            if self.dataset_format == "alpaca":
                check.add("dataset_format", "alpaca has no preference layout; use auto, sharegpt or openai")
        check.raise_if_any()

    # --- derived values ---

    @property
    def is_tiny(self) -> bool:
        return self.model.startswith(TINY_PREFIX)

    @property
    def uses_padding_free(self) -> bool:
        """Padding-free collation in effect: packing needs it; a micro-batch of one has no padding to remove."""
        return self.packing or (self.padding_free and self.per_device_train_batch_size > 1)

    def resolved_model_dtype(self) -> str:
        if self.model_dtype != "auto":
            return self.model_dtype
        if self.method == "full":
            return "float32"  # fp32 master weights; bf16 only in the autocast forward
        return "bfloat16" if self.bf16 else "float32"

    def gradient_accumulation_steps(self, world_size: int) -> int:
        per_step = world_size * self.per_device_train_batch_size
        if self.total_train_batch_size % per_step:
            raise DeitaHubError(
                f"total_train_batch_size {self.total_train_batch_size} is not a multiple of devices ({world_size}) x "
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) = {per_step}: gradient "
                "accumulation must be a whole number of micro-steps; change one of them"
            )
        return self.total_train_batch_size // per_step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- reading configs -------------------------------------------------------------------------------------------


def config_fields() -> dict[str, Any]:
    """Field name -> dataclasses.Field, in declaration order."""
    return {f.name: f for f in fields(TrainConfig)}


def config_from_dict(data: dict[str, Any], *, source: str = "config") -> TrainConfig:
    return load(TrainConfig, data, source=source)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (packaged names like `tiny-cpu.yaml` work too), then apply overrides.

    Overrides are the command's flags and `--set KEY=VALUE` pairs: keys of the file, typed the same way.
    """
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        from deita_hub.resources import resolve_resource

        resolved = resolve_resource(path, "configs")
        if not resolved.is_file():
            raise DeitaHubError(f"training config '{path}' not found")
        source = str(path)
        data = read_mapping(resolved, "training config")
    if overrides:
        unknown_keys(overrides, config_fields(), "override: ")
        data = {**data, **overrides}
    return load(TrainConfig, data, source=source)


# --- checks against the machine (cheap: no model, no data) ------------------------------------------------------


def world_size() -> int:
    """Processes in this launch (`accelerate launch` / `torchrun` set WORLD_SIZE)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError as exc:
        raise DeitaHubError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from exc


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def check_extras(config: TrainConfig) -> None:
    needed = [("trl", "train"), ("accelerate", "train")]
    if config.method in ("lora", "qlora"):
        needed.append(("peft", "train"))
    if config.method == "qlora":
        needed.append(("bitsandbytes", "qlora"))
    for module, extra in needed:
        if not _has_module(module):
            raise MissingExtraError(module, extra, f"Training with method '{config.method}'")
    if config.attn_implementation == "flash_attention_2" and not _has_module("flash_attn"):
        raise DeitaHubError(
            "attn_implementation flash_attention_2 needs the 'flash-attn' package: pip install flash-attn"
        )


def check_environment(config: TrainConfig, *, cuda_available: bool | None = None) -> None:
    """Options that need hardware this machine lacks fail here, with what to change.

    QLoRA is allowed on CPU: bitsandbytes >= 0.45 ships CPU 4-bit kernels (slow, but it trains), which is what the
    tests use. So is bf16: transformers runs torch's CPU autocast (`use_cpu` with `bf16`); without native bf16
    instructions it is slower than fp32 (x1.3 for the tiny model on an AVX2 CPU), not wrong.
    """
    import torch

    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available:
        # Pre-Ampere GPUs (V100, T4) have no bf16: say what to change instead of failing inside transformers.
        if config.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise DeitaHubError(
                f"bf16: true, but this GPU ({torch.cuda.get_device_name()}) does not support bfloat16; "
                "set bf16: false (--set bf16=false) to train in fp32"
            )
        return
    problems = []
    if config.attn_implementation in GPU_ATTENTION:
        problems.append(f"attn_implementation {config.attn_implementation} needs a CUDA GPU (use sdpa)")
    if problems:
        raise DeitaHubError("no CUDA GPU on this machine: " + "; ".join(problems))
