"""Answer generation for `deita-hub eval`: batched (deita-hub) vs one question at a time (FastChat's way).

FastChat's gen_model_answer.py calls `model.generate` once per question turn. deita-hub batches prompts
(left-padded, sorted by length). Both run here on the same tiny random LLaMA with greedy decoding, the answers
must be identical, and the speed ratio is printed with the machine's load average (CPU goal: >= 3x).

    python benchmarks/eval.py [--questions 48] [--batch-size 16] [--max-new-tokens 48]
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
    parser.add_argument("--questions", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    import torch

    from deita_hub.evaluation.answers import answer_one_at_a_time, load_generator
    from deita_hub.evaluation.mt_bench import load_questions
    from deita_hub.testing.tiny import save_tiny_model

    torch.set_num_threads(os.cpu_count() or 1)
    questions = load_questions(
        str(Path(__file__).parents[1] / "tests" / "data" / "eval" / "mt_bench_question.jsonl")
    )
    prompts = [
        q.turns[i % len(q.turns)] + f" (variant {i})" for i, q in enumerate(questions * args.questions)
    ]
    prompts = prompts[: args.questions]
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_tiny_model(
            Path(tmp) / "model", "llama", hidden_size=256, num_layers=4, intermediate_size=512
        )
        generator = load_generator(
            str(folder),
            revision=None,
            backend="transformers",
            dtype="float32",
            device="cpu",
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
        )
        answer_one_at_a_time(generator, conversations[0], 0.0)  # warm-up, outside both timings
        start = time.perf_counter()
        baseline = [answer_one_at_a_time(generator, c, 0.0) for c in conversations]
        one_at_a_time_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = generator.answer(conversations, 0.0)
        batched_s = time.perf_counter() - start
    same = sum(a == b for a, b in zip(baseline, batched, strict=True))
    load = os.getloadavg()
    print(f"questions: {len(prompts)}, max_new_tokens: {args.max_new_tokens}, batch size: {args.batch_size}")
    print(f"one at a time (FastChat): {one_at_a_time_s:.2f} s   batched (deita-hub): {batched_s:.2f} s")
    print(f"speed-up: {one_at_a_time_s / batched_s:.2f}x   identical greedy answers: {same}/{len(prompts)}")
    print(f"load average (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    return 0 if same == len(prompts) else 1


if __name__ == "__main__":
    sys.exit(main())
