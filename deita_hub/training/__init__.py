"""Supervised fine-tuning with the Vicuna v1.1 template (TRL + PEFT + bitsandbytes + accelerate).

- `config`: the `TrainConfig` dataclass that `configs/*.yaml` mirror, and every check made before loading.
- `data`: pool or built dataset -> token ids + assistant-only loss mask.
- `trainer`: `train()`: checkpoints, run records, model cards, pushes, resume.
- `merge`: a LoRA/QLoRA adapter merged into its base.
- `chat`: generation with the template, one-shot or interactive.

Heavy libraries (torch, transformers, trl, peft) load inside the functions, so importing this is cheap.
"""

from deita_hub.training.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config"]
