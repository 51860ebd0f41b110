"""Training throughput and memory: deita-hub's batching vs TRL's padded default, same model, data and steps.

    python benchmarks/train.py                      # CPU: tiny random Mistral, synthetic ShareGPT pool
    python benchmarks/train.py --model mistralai/Mistral-7B-v0.1 --method qlora --max-length 2048 \\
        --batch 4 --bf16 --gradient-checkpointing --dataset hkust-nlp/deita-6k-v0      # GPU

Variants (all through `deita_hub.training.trainer.build_trainer`, i.e. TRL's SFTTrainer):
- `padded`: TRL's default collator: every micro-batch padded to its longest conversation (the baseline);
- `padding_free` (deita-hub's default): the micro-batch concatenated without pad tokens, per-conversation
  position_ids: the same loss and gradients, less compute;
- `packed`: conversations packed into rows of max_length (BFD): a different batch semantics (see TrainConfig).

`--startup` compares the start-up instead (reading the pool and tokenizing it: the data work `build_trainer` does
before the model; the tokenizer is loaded before the clock starts), each in a fresh child process: `no_cache` (`tokenized_cache: false`,
the baseline), `cache_cold` (tokenizes and writes the tokenized-data cache) and `cache_warm` (reads it).
The default run prints both tables.

Each variant runs in its own child process so that its peak memory is its own: peak GPU memory
(`torch.cuda.max_memory_allocated`) on a GPU, otherwise the growth of peak RSS during training. Throughput is
real (non-pad) tokens per second over the timed steps (the first step, warm-up, is not timed). Ratios are
printed against `padded`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    child_result,
    load_average,
    peak_rss_bytes,
    print_ratio_table,
    print_seconds_table,
    timed_training,
    training_children,
)

VARIANTS = {
    "padded": {"padding_free": False, "packing": False},
    "padding_free": {"padding_free": True, "packing": False},
    "packed": {"padding_free": True, "packing": True},
}
WORDS = "the a model data answer question token select score quality diverse sample train loss step".split()


def synthetic_pool(path: Path, rows: int, seed: int) -> Path:
    """ShareGPT rows with a long-tailed length mix (lognormal replies, 1-3 turns), like instruction data."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            turns = []
            for _ in range(rng.choice([1, 1, 2, 3])):
                question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))
                reply = " ".join(
                    rng.choice(WORDS) for _ in range(min(1500, int(rng.lognormvariate(4.2, 0.9))))
                )
                turns += [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]
            handle.write(json.dumps({"id": str(i), "conversations": turns}) + "\n")
    return path


def _config(args: argparse.Namespace, **settings):
    """The TrainConfig of a measured child: the model, data, length and batch every variant shares."""
    from deita_hub.training.config import TrainConfig

    return TrainConfig(
        model=args.model,
        dataset=args.dataset,
        dataset_config=args.dataset_config,
        max_length=args.max_length,
        per_device_train_batch_size=args.batch,
        total_train_batch_size=args.batch,
        **settings,
    )


def run_variant(args: argparse.Namespace) -> dict:
    """Child process: train `args.steps` steps of one variant, report tokens/s and peak memory."""
    from deita_hub.training.trainer import build_trainer

    config = _config(
        args,
        method=args.method,
        output_dir=args.output_dir,
        max_steps=args.steps,
        save_steps=10**9,
        logging_steps=1,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        attn_implementation=args.attn,
        learning_rate=1e-4,
        **VARIANTS[args.variant],
    )
    trainer, result = timed_training(
        lambda timer: build_trainer(config, extra_callbacks=[timer])[0],
        variant=args.variant,
        count_building=False,
    )
    return {**result, "final_loss": trainer.state.log_history[-2].get("loss")}


STARTUP_VARIANTS = {"no_cache": False, "cache_cold": True, "cache_warm": True}  # -> tokenized_cache


def run_startup(args: argparse.Namespace) -> dict:
    """Child process: read the pool and tokenize it (or read the cache), timed."""
    import datasets  # noqa: F401  (imports are not start-up work: done before the clock starts)

    from deita_hub.models import load_tokenizer
    from deita_hub.training.data import load_train_data, read_training_rows

    config = _config(args, tokenized_cache=STARTUP_VARIANTS[args.startup_variant])
    tokenizer = load_tokenizer(args.tokenizer)  # the same with or without the cache: not timed
    start = time.perf_counter()
    rows = read_training_rows(config)
    data = load_train_data(config, tokenizer, rows)
    return {
        "variant": args.startup_variant,
        "seconds": time.perf_counter() - start,
        "conversations": data.num_conversations,
        "tokens": data.num_tokens,
        "peak_memory_bytes": peak_rss_bytes(),
    }


def compare_startup(args: argparse.Namespace, tmp: Path) -> None:
    """The start-up table: without the tokenized-data cache, writing it, reading it (a fresh cache folder)."""
    tokenizer = args.model
    if args.model.startswith("tiny:"):  # the tokenizer build_trainer would load from OUTPUT_DIR/tiny-<kind>
        from deita_hub.tiny import llama2_tokenizer

        tokenizer = str(Path(tmp) / "tokenizer")
        llama2_tokenizer().save_pretrained(tokenizer)
    dataset = args.dataset or str(synthetic_pool(Path(tmp) / "startup.jsonl", args.startup_rows, seed=1))
    env = {**os.environ, "DEITA_HUB_CACHE": str(Path(tmp) / "cache")}
    results = []
    for variant in STARTUP_VARIANTS:
        command = [sys.executable, __file__, "--startup-variant", variant, "--tokenizer", tokenizer]
        command += ["--model", args.model, "--dataset", dataset, "--max-length", str(args.max_length)]
        command += ["--batch", str(args.batch)]
        if args.dataset_config:
            command += ["--dataset-config", args.dataset_config]
        results.append(child_result(command, variant, env=env))
    print(
        f"start-up (read pool + tokenize or read the cache), {results[0]['conversations']} conversations, "
        f"{results[0]['tokens']} tokens, max_length {args.max_length}, tokenizer {args.model}; "
        f"load average {load_average()}"
    )
    print_seconds_table(results, "no_cache", "no_cache")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny:mistral")
    parser.add_argument("--method", default="full", choices=["full", "lora", "qlora"])
    parser.add_argument("--dataset", default=None, help="default: a synthetic pool of --rows conversations")
    parser.add_argument("--dataset-config", default=None)
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument(
        "--steps", type=int, default=6, help="optimizer steps per variant (the first is warm-up)"
    )
    parser.add_argument("--batch", type=int, default=8, help="per-device batch (TRL's default: 8)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--variants", default="padded,padding_free,packed")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--startup", action="store_true", help="only the start-up comparison")
    parser.add_argument(
        "--startup-rows", type=int, default=2000, help="conversations of the start-up comparison's pool"
    )
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--startup-variant", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return
    if args.startup_variant:  # child
        print("RESULT " + json.dumps(run_startup(args)), flush=True)
        return
    if args.startup:
        with tempfile.TemporaryDirectory() as tmp:
            compare_startup(args, Path(tmp))
        return

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        dataset = args.dataset or str(synthetic_pool(Path(tmp) / "pool.jsonl", args.rows, seed=0))
        extra = ["--method", args.method, "--attn", args.attn]
        extra += ["--dataset-config", args.dataset_config] if args.dataset_config else []
        results = training_children(__file__, args, dataset, tmp, *extra)

    print(
        f"model {args.model} ({args.method}), per-device batch {args.batch}, max_length {args.max_length}, "
        f"{args.steps - 1} timed steps, device {results[0]['device']}; memory = {results[0]['memory_kind']}"
    )
    print(f"load average before {load_before}, after {load_average()}; {os.cpu_count()} CPUs")
    print_ratio_table(results, "padded", "padded")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print()
    with tempfile.TemporaryDirectory() as tmp:
        compare_startup(args, Path(tmp))


if __name__ == "__main__":
    main()
