"""DPO throughput and memory: deita-hub's `stage: dpo` against TRL's default DPO configuration, same model, data
and steps.

    python benchmarks/dpo.py                        # CPU: tiny random Mistral, synthetic preference pairs
    python benchmarks/dpo.py --model org/deita-7b-sft --max-length 2048 --batch 4 --bf16 \\
        --gradient-checkpointing --dataset org/ultrafeedback-10k                               # GPU

Variants (full fine-tuning, the same tokenizer with the Vicuna template):
- `trl_default`: TRL's DPOTrainer as its docs use it: the conversational pairs given as they are, DPOConfig's
  defaults (its own tokenization and prompt split, padded batches, a frozen reference copy) (the baseline);
- `deita_hub`: `deita_hub.training.trainer.build_trainer` with `stage: dpo`: pairs rendered and tokenized by
  deita-hub (byte-exact Vicuna), padded batches, a frozen reference copy;
- `precomputed`: as `deita_hub` with `precompute_ref_log_probs`: no reference model during training (the
  one-off reference pass before step 1 is not timed).

Each variant runs in its own child process so that its peak memory is its own: peak GPU memory on a GPU,
otherwise the growth of peak RSS from before the trainer is built (the reference copy counts). Throughput is real
(non-pad) tokens per second over the timed steps (the first step, warm-up, is not timed). Ratios are printed
against `trl_default`, with the load average (the CPUs here are shared: a busy machine slows every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import load_average, print_ratio_table, timed_training, training_children  # noqa: E402

VARIANTS = ("trl_default", "deita_hub", "precomputed")
WORDS = "the a model data answer question token select score quality diverse sample train loss step".split()


def synthetic_pairs(path: Path, rows: int, seed: int) -> Path:
    """UltraFeedback-layout rows: one question, two replies of long-tailed (lognormal) lengths."""
    rng = random.Random(seed)

    def text(mu):
        return " ".join(rng.choice(WORDS) for _ in range(max(1, min(1200, int(rng.lognormvariate(mu, 0.8))))))

    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(rows):
            question = text(3.0)
            chosen, rejected = text(4.2), text(4.0)
            handle.write(
                json.dumps(
                    {
                        "prompt": question,
                        "chosen": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": chosen},
                        ],
                        "rejected": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": rejected},
                        ],
                    }
                )
                + "\n"
            )
    return path


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: train `args.steps` steps of one variant, report tokens/s and peak memory."""
    import torch

    from deita_hub.training.config import TrainConfig
    from deita_hub.training.trainer import _resolve_model, build_trainer

    config = TrainConfig(
        stage="dpo",
        method="full",
        model=args.model,
        dataset=args.dataset,
        output_dir=args.output_dir,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch,
        total_train_batch_size=args.batch,
        max_steps=args.steps,
        save_steps=10**9,
        logging_steps=1,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        learning_rate=1e-5,
        precompute_ref_log_probs=args.variant == "precomputed",
    )
    cuda = torch.cuda.is_available()

    def make_trainer(timer):
        if args.variant != "trl_default":
            return build_trainer(config, extra_callbacks=[timer])[0]
        from datasets import load_dataset
        from trl import DPOConfig, DPOTrainer

        from deita_hub.models import load_tokenizer
        from deita_hub.training.data import use_vicuna_template

        model_path, _ = _resolve_model(config)
        tokenizer = load_tokenizer(model_path)
        use_vicuna_template(tokenizer)
        dataset = load_dataset("json", data_files=args.dataset, split="train").remove_columns(["prompt"])
        return DPOTrainer(
            model=model_path,
            args=DPOConfig(
                output_dir=args.output_dir,
                per_device_train_batch_size=args.batch,
                max_steps=args.steps,
                max_length=args.max_length,
                learning_rate=1e-5,
                bf16=args.bf16,
                gradient_checkpointing=args.gradient_checkpointing,
                use_cpu=not cuda,
                save_strategy="no",
                logging_steps=1,
                report_to=[],
                disable_tqdm=True,
            ),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )

    _, result = timed_training(make_trainer, variant=args.variant, count_building=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny:mistral")
    parser.add_argument(
        "--dataset", default=None, help="default: --rows synthetic pairs (UltraFeedback layout)"
    )
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument(
        "--steps", type=int, default=5, help="optimizer steps per variant (the first is warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (TRL's default: 8)")
    parser.add_argument("--max-length", type=int, default=1024, help="TRL's default: 1024")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or str(synthetic_pairs(Path(tmp) / "pairs.jsonl", args.rows, seed=0))
        results = training_children(__file__, args, dataset, tmp)

    print(
        f"model {args.model} (full DPO), per-device batch {args.batch}, max_length {args.max_length}, "
        f"{args.steps - 1} timed steps, device {results[0]['device']}; memory = {results[0]['memory_kind']}"
    )
    print(f"load average before {load_before}, after {load_average()}; {os.cpu_count()} CPUs")
    print_ratio_table(results, "trl_default", "trl")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
