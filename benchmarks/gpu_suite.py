"""One offline suite of deita-hub's speed and memory on a GPU, each row against its baseline, as one table.

    python benchmarks/gpu_suite.py            # one 80-140 GB GPU: 7B/13B shapes (budget: 8 minutes)
    python benchmarks/gpu_suite.py --tiny     # the same rows with tiny shapes on a CPU (CI runs this)
    python benchmarks/gpu_suite.py --only score,select --json suite.json

Nothing is downloaded. The models are built from the architecture files in benchmarks/shapes/ (Mistral-7B,
LLaMA-13B) with random weights and the Llama-2 tokenizer `wordllama` bundles; vLLM loads the same shapes with
`load_format="dummy"` (random weights, no file). --tiny shrinks every shape to 2 layers x 128 wide and the
workloads to a few rows. Each row runs in a child process (its own peak memory, nothing left on the device by
the previous row) and prints one line of JSON; a failed row is reported with its error, and the others still run.

Rows (ours vs baseline):
- sft-{qlora,lora,full}: padding-free batching vs TRL's padded default, the Mistral-7B shape at 2048 tokens on a
  Deita-6K-like length mix (benchmarks/train.py's pool); tokens/s and peak memory (goals: QLoRA <= 10 GB,
  padding-free >= 1.5x tokens/s);
- dpo-full: `stage: dpo` with `precompute_ref_log_probs` (no reference copy in memory) vs TRL's default (a frozen
  reference model); preference pairs/s (the precomputation is included) and peak memory;
- score-transformers / score-vllm: the LLaMA-13B-shaped scorer, deita-hub's batched transformers backend (bf16)
  and its vLLM backend vs Deita's one-`generate`-per-row (goals >= 5x, >= 20x);
- embed: last-token embeddings of the Mistral-7B shape, batched vs batch 1 (goal >= 5x);
- eval-answers: `deita-hub eval` answer generation (vLLM; --tiny without vLLM: batched transformers) vs one
  question at a time (FastChat's way);
- select: a 1M x 4096 pool (--tiny: 20K x 256) selected with dtype bfloat16 on the GPU vs float32 on the CPU,
  exact either way (the float64 recheck): the ids must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _util import clustered_embeddings, printed_result, random_text  # noqa: E402

SHAPES = HERE / "shapes"
TINY_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,  # vLLM's CPU attention needs >= 32
}
ROWS = (
    "sft-qlora",
    "sft-lora",
    "sft-full",
    "dpo-full",
    "score-transformers",
    "score-vllm",
    "embed",
    "eval-answers",
    "select",
)
# The workload of each size: GPU numbers chosen to fit the 8-minute budget on one H200-class GPU.
SIZES = {
    "gpu": {
        "max_length": 2048,
        "train_rows": 64,
        "train_batch": 4,
        "train_steps": 4,
        "score_rows": 256,
        "baseline_rows": 32,
        "embed_rows": 256,
        "questions": 64,
        "max_new_tokens": 256,
        "select_rows": 1_000_000,
        "select_dim": 4096,
        "select_clusters": 8000,
        "budget": 10_000,
    },
    "tiny": {
        "max_length": 128,
        "train_rows": 8,
        "train_batch": 4,
        "train_steps": 2,
        "score_rows": 16,
        "baseline_rows": 4,
        "embed_rows": 16,
        "questions": 4,
        "max_new_tokens": 4,
        "select_rows": 20_000,
        "select_dim": 256,
        "select_clusters": 800,
        "budget": 1000,
    },
}


# --- models and data ---------------------------------------------------------------------------------------


def build_model(shape: str, out: Path, *, tiny: bool) -> Path:
    """A folder with `shape`'s architecture, random weights (bf16 on a GPU) and the Llama-2 tokenizer."""
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deita_hub.tiny import llama2_tokenizer

    spec = {k: v for k, v in json.loads((SHAPES / f"{shape}.json").read_text()).items() if k != "_comment"}
    tokenizer = llama2_tokenizer()
    spec.update(TINY_SHAPE if tiny else {}, vocab_size=len(tokenizer), pad_token_id=len(tokenizer) - 1)
    config = AutoConfig.for_model(**spec)
    cuda = torch.cuda.is_available() and not tiny
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):  # initialising 13B parameters on a CPU takes minutes
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if cuda else torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if cuda:  # the row that built it measures its own peak memory next
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    return out


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    import random

    rng = random.Random(seed)
    return [
        [{"role": "user", "content": random_text(rng)}, {"role": "assistant", "content": random_text(rng)}]
        for _ in range(n)
    ]


def device_memory() -> tuple[str, callable]:
    """'cuda' with its peak allocation, or 'cpu' with peak RSS (the --tiny stand-in)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return "cuda", torch.cuda.max_memory_allocated
    from _util import peak_rss_bytes

    return "cpu", peak_rss_bytes


def training_row(ours: dict, base: dict, what: str) -> dict:
    """A table row from two training variants' results (benchmarks/train.py's or dpo.py's `run_variant`)."""
    return {
        "unit": "tokens/s",
        "ours": ours["tokens_per_s"],
        "baseline": base["tokens_per_s"],
        "ours_memory": ours["peak_memory_bytes"],
        "baseline_memory": base["peak_memory_bytes"],
        "what": what,
    }


def variant_args(size: dict, tiny: bool, options: dict, output_dir: Path, **extra) -> Namespace:
    """The arguments of a training benchmark's `run_variant` for one variant at this suite's size."""
    return Namespace(
        variant=options["variant"],
        model=options["model"],
        dataset=options["dataset"],
        output_dir=str(output_dir),
        max_length=size["max_length"],
        batch=size["train_batch"],
        steps=size["train_steps"],
        bf16=options["bf16"],
        gradient_checkpointing=not tiny,
        **extra,
    )


# --- the rows (each runs in its own process) ---------------------------------------------------------------


def row_sft(work: Path, size: dict, tiny: bool, method: str) -> dict:
    """benchmarks/train.py's variants, padded (TRL's default) then padding-free, each in a child of its own."""
    import torch

    model = build_model("mistral-7b", work / "mistral-7b", tiny=tiny)
    from train import synthetic_pool

    pool = work / "sft.jsonl"
    if not pool.exists():
        synthetic_pool(pool, size["train_rows"], seed=0)
    results = {}
    for variant in ("padded", "padding_free"):
        results[variant] = child(
            "train-variant",
            work,
            tiny,
            variant=variant,
            method=method,
            model=str(model),
            dataset=str(pool),
            bf16=torch.cuda.is_available() and not tiny,
        )
    return training_row(
        results["padding_free"],
        results["padded"],
        f"{method} {size['max_length']} tokens: padding-free vs TRL's padded default",
    )


def row_train_variant(work: Path, size: dict, tiny: bool, **options) -> dict:
    from train import run_variant

    output_dir = work / f"out-{options['method']}-{options['variant']}"
    return run_variant(
        variant_args(
            size, tiny, options, output_dir, method=options["method"], dataset_config=None, attn="sdpa"
        )
    )


def row_dpo(work: Path, size: dict, tiny: bool) -> dict:
    """benchmarks/dpo.py's variants: deita-hub's `stage: dpo` vs TRL's DPOTrainer with its defaults."""
    import torch
    from dpo import synthetic_pairs

    model = build_model("mistral-7b", work / "mistral-7b", tiny=tiny)
    pool = work / "pairs.jsonl"
    if not pool.exists():
        synthetic_pairs(pool, size["train_rows"], seed=0)
    results = {
        variant: child(
            "dpo-variant",
            work,
            tiny,
            variant=variant,
            model=str(model),
            dataset=str(pool),
            bf16=torch.cuda.is_available() and not tiny,
        )
        for variant in ("trl_default", "deita_hub")
    }
    return training_row(
        results["deita_hub"],
        results["trl_default"],
        f"full DPO {size['max_length']} tokens: `stage: dpo` vs TRL's DPOTrainer defaults",
    )


def row_dpo_variant(work: Path, size: dict, tiny: bool, **options) -> dict:
    from dpo import run_variant

    return run_variant(variant_args(size, tiny, options, work / f"dpo-{options['variant']}"))


def row_score(work: Path, size: dict, tiny: bool) -> dict:
    """deita-hub's transformers backend (bf16 on a GPU) vs Deita's generate-per-row, the same 13B-shaped model."""
    import torch
    from score import deita_way
    from transformers import AutoModelForCausalLM

    from deita_hub.scoring import ScoreConfig, make_scorer, prompts, score_conversations

    folder = build_model("llama-13b", work / "llama-13b", tiny=tiny)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    rows = conversations(size["score_rows"])
    config = ScoreConfig(scorer="quality", model=str(folder), device=device, dtype=dtype, batch_size=16)
    kind, peak = device_memory()
    scorer = make_scorer(config)
    score_conversations(rows[:8], config, progress=False, scorer=scorer)  # warm-up
    start = time.perf_counter()
    score_conversations(rows, config, progress=False, scorer=scorer)
    ours = len(rows) / (time.perf_counter() - start)
    ours_memory = peak()
    del scorer
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    from deita_hub.models import load_tokenizer

    tokenizer = load_tokenizer(str(folder))
    texts = [
        prompts.render("quality", prompts.slot_values("quality", r[0]["content"], r[1]["content"]))
        for r in rows[: size["baseline_rows"]]
    ]
    digits = prompts.digit_token_ids(tokenizer)
    deita_way(model, tokenizer, texts[:2], digits, device)  # warm-up
    start = time.perf_counter()
    deita_way(model, tokenizer, texts, digits, device)
    baseline = len(texts) / (time.perf_counter() - start)
    return {
        "unit": "rows/s",
        "ours": ours,
        "baseline": baseline,
        "ours_memory": ours_memory,
        "what": f"13B-shaped scorer, transformers {dtype} batched vs Deita's generate per row",
    }


def vllm_engine_options(tiny: bool) -> dict:
    # Eager: CUDA graph capture and compilation would cost a minute per engine of the suite's 8.
    options = {"load_format": "dummy", "enforce_eager": True}
    if tiny:
        options["kv_cache_memory_bytes"] = (
            1 << 28
        )  # vLLM's CPU build would otherwise take a share of the host
    else:
        options["gpu_memory_utilization"] = 0.85
    return options


def row_score_vllm(work: Path, size: dict, tiny: bool) -> dict:
    """deita-hub's vLLM backend on the 13B shape with dummy weights; the baseline is the score row's Deita way."""
    from deita_hub.errors import require

    require("vllm", "vllm", "The vLLM rows")
    from deita_hub.scoring import ScoreConfig, score_conversations

    folder = build_model("llama-13b", work / "llama-13b", tiny=tiny)  # config + tokenizer; weights ignored
    rows = conversations(size["score_rows"])
    config = ScoreConfig(
        scorer="quality",
        model=str(folder),
        backend="vllm",
        dtype="bfloat16",
        vllm_options=vllm_engine_options(tiny),
    )
    from deita_hub.scoring.run import make_scorer

    scorer = make_scorer(config)
    score_conversations(rows[:8], config, progress=False, scorer=scorer)
    start = time.perf_counter()
    result = score_conversations(rows, config, progress=False, scorer=scorer)
    seconds = time.perf_counter() - start
    scorer.close()
    return {
        "unit": "rows/s",
        "ours": len(rows) / seconds,
        "baseline_from": "score-transformers",
        "scored": sum(s is not None for s in result.scores),
        "what": "13B-shaped scorer, vLLM (dummy weights, digits read by id) vs Deita's generate per row",
    }


def row_embed(work: Path, size: dict, tiny: bool) -> dict:
    import torch

    from deita_hub.embedding import EmbedConfig
    from deita_hub.embedding.last_token import LastTokenEmbedder

    folder = build_model("mistral-7b", work / "mistral-7b", tiny=tiny)
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = "bfloat16" if device == "cuda" else "float32"
    rows = conversations(size["embed_rows"], seed=1)
    kind, peak = device_memory()

    def rate(batch_size: int, n: int) -> float:
        embedder = LastTokenEmbedder(
            EmbedConfig(
                method="last-token", model=str(folder), batch_size=batch_size, device=device, dtype=dtype
            )
        )
        embedder.encode(rows[:4])  # warm-up
        start = time.perf_counter()
        embedder.encode(rows[:n])
        return n / (time.perf_counter() - start)

    ours = rate(16, len(rows))
    ours_memory = peak()
    return {
        "unit": "rows/s",
        "ours": ours,
        "baseline": rate(1, size["baseline_rows"]),
        "ours_memory": ours_memory,
        "what": f"Mistral-7B-shaped last-token embeddings ({dtype}), batches of 16 vs batch 1",
    }


def row_eval(work: Path, size: dict, tiny: bool) -> dict:
    import importlib.util

    import torch

    from deita_hub.evaluation.answers import answer_one_at_a_time, load_generator

    folder = build_model("mistral-7b", work / "mistral-7b", tiny=tiny)
    cuda = torch.cuda.is_available() and not tiny
    questions = [[{"role": "user", "content": c[0]["content"]}] for c in conversations(size["questions"], 2)]
    common = {
        "revision": None,
        "batch_size": 16,
        "max_new_tokens": size["max_new_tokens"],
    }
    vllm = importlib.util.find_spec("vllm") is not None
    if vllm:
        ours_generator = load_generator(
            str(folder),
            backend="vllm",
            dtype="bfloat16",
            device=None,
            vllm_options=vllm_engine_options(tiny),
            **common,
        )
    else:
        ours_generator = load_generator(
            str(folder), backend="transformers", dtype="float32", device="cpu", **common
        )
    start = time.perf_counter()
    ours_generator.answer(questions, 0.0)
    ours = len(questions) / (time.perf_counter() - start)
    if ours_generator.engine == "vllm":  # free the engine's memory before the baseline loads its model
        from deita_hub.vllm_engine import release

        release(ours_generator.model)
    del ours_generator
    baseline_generator = load_generator(
        str(folder),
        backend="transformers",
        dtype="bfloat16" if cuda else "float32",
        device="cuda" if cuda else "cpu",
        **common,
    )
    n = max(2, len(questions) // 16)  # one at a time is slow: a few questions give its rate
    start = time.perf_counter()
    for question in questions[:n]:
        answer_one_at_a_time(baseline_generator, question, 0.0)
    baseline = n / (time.perf_counter() - start)
    return {
        "unit": "questions/s",
        "ours": ours,
        "baseline": baseline,
        "what": f"eval answers ({'vLLM, dummy weights' if vllm else 'batched transformers'}) vs one question at a "
        f"time, {size['max_new_tokens']} new tokens",
    }


def row_select(work: Path, size: dict, tiny: bool) -> dict:
    import torch

    from deita_hub.selection import SelectionConfig, deita_select

    path = work / "select.npy"
    if not path.exists():
        clustered_embeddings(
            path,
            size["select_rows"],
            size["select_dim"],
            size["select_clusters"],
            0.3,
            seed=4,
            dtype="float16",
        )
    embeddings = np.load(path, mmap_mode="r")
    scores = np.random.default_rng(3).random(len(embeddings))
    cuda = torch.cuda.is_available() and not tiny
    fast = SelectionConfig(budget=size["budget"], dtype="bfloat16", device="cuda" if cuda else "cpu")
    start = time.perf_counter()
    ours = deita_select(embeddings, scores, fast)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    cpu = deita_select(embeddings, scores, SelectionConfig(budget=size["budget"]))
    cpu_s = time.perf_counter() - start
    same = ours.positions.tolist() == cpu.positions.tolist()
    if not same:
        raise SystemExit("bfloat16 and float32 selections differ")
    return {
        "unit": "s",
        "ours": ours_s,
        "baseline": cpu_s,
        "lower_is_better": True,
        "what": f"{len(embeddings):,} x {embeddings.shape[1]} selection, bfloat16 on "
        f"{'the GPU' if cuda else 'the CPU (--tiny)'} vs float32 on the CPU: identical ids, {len(ours):,} selected",
    }


ROW_FUNCTIONS = {
    "sft-qlora": lambda w, s, t: row_sft(w, s, t, "qlora"),
    "sft-lora": lambda w, s, t: row_sft(w, s, t, "lora"),
    "sft-full": lambda w, s, t: row_sft(w, s, t, "full"),
    "dpo-full": row_dpo,
    "score-transformers": row_score,
    "score-vllm": row_score_vllm,
    "embed": row_embed,
    "eval-answers": row_eval,
    "select": row_select,
}
HELPERS = {"train-variant": row_train_variant, "dpo-variant": row_dpo_variant}


# --- the driver --------------------------------------------------------------------------------------------


def child(name: str, work: Path, tiny: bool, **options) -> dict:
    """Run one row (or a row's variant) in a new process; its last stdout line is its JSON result. --tiny runs
    it in this process instead: the imports (torch, transformers, TRL) would cost more than the rows."""
    if tiny:
        function = ROW_FUNCTIONS.get(name) or HELPERS[name]
        try:
            return function(work, SIZES["tiny"], tiny, **options)
        except Exception as exc:  # a failed row is reported in the table, as a failed child is
            raise RuntimeError(f"{name} failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    command = [
        sys.executable,
        __file__,
        "--child",
        name,
        "--workdir",
        str(work),
        "--options",
        json.dumps(options),
    ]
    done = subprocess.run(command + ["--tiny"] * tiny, capture_output=True, text=True)
    result = printed_result(done)
    if result is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"{name} failed: {tail[0][:300]}")
    return result


def gpu_name(tiny: bool) -> str:
    import torch

    if torch.cuda.is_available() and not tiny:
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, --tiny shapes)"


def table(results: dict[str, dict], device: str) -> str:
    lines = [f"deita-hub GPU suite on {device}"]
    if "--tiny" in device:
        lines.append("(--tiny: every row in one process; its peak memory is that process's, not comparable)")
    lines.append("")
    lines.append(
        f"{'row':<20}{'ours':>12}{'baseline':>12}{'unit':>13}{'ratio':>8}{'peak GiB ours/base':>22}  what"
    )
    for name in ROWS:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"{name:<20}{'-':>12}{'-':>12}{'':>13}{'-':>8}{'':>22}  not measured: {r['error']}")
            continue
        base = r.get("baseline")
        if base is None and r.get("baseline_from") in results:
            base = results[r["baseline_from"]].get("baseline")
        ratio = (base / r["ours"] if r.get("lower_is_better") else r["ours"] / base) if base else float("nan")
        memory = ""
        if r.get("ours_memory"):
            memory = f"{r['ours_memory'] / 2**30:.2f}"
            if r.get("baseline_memory"):
                memory += f" / {r['baseline_memory'] / 2**30:.2f}"
        base_text = f"{base:12.3f}" if base else f"{'-':>12}"
        lines.append(
            f"{name:<20}{r['ours']:12.3f}{base_text}{r['unit']:>13}{ratio:7.2f}x{memory:>22}  {r['what']}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on a CPU (what CI runs)")
    parser.add_argument("--only", default=",".join(ROWS), help=f"comma-separated rows of {', '.join(ROWS)}")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built models and data here")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "gpu"]
    if args.child:
        function = ROW_FUNCTIONS.get(args.child) or HELPERS[args.child]
        print("RESULT " + json.dumps(function(args.workdir, size, args.tiny, **json.loads(args.options))))
        return 0
    unknown = set(args.only.split(",")) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict] = {}
        started = time.perf_counter()
        for name in (r for r in ROWS if r in args.only.split(",")):
            begin = time.perf_counter()
            try:
                results[name] = child(name, work, args.tiny)
            except RuntimeError as exc:
                results[name] = {"error": str(exc)}
            results[name]["seconds"] = time.perf_counter() - begin
            print(
                f"[{time.perf_counter() - started:6.0f} s] {name}: {time.perf_counter() - begin:.0f} s",
                flush=True,
            )
    print()
    print(table(results, gpu_name(args.tiny)))
    print(f"\ntotal {time.perf_counter() - started:.0f} s; load average {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"device": gpu_name(args.tiny), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
