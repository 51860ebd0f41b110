"""Shared helpers for the benchmarks: clustered embedding matrices written straight to .npy, resident memory,
measured training steps."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM from /proc, the high-water mark of this program's own address space. getrusage's ru_maxrss
    would be wrong in a child: it survives execve, so it starts at the parent's RSS at fork time.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def clock() -> np.ndarray:
    """[wall, user CPU, kernel CPU] seconds of this process so far: `clock() - start` times what ran since `start`."""
    times = os.times()
    return np.array([time.perf_counter(), times.user, times.system])


def first_touch_rate(nbytes: int = 1 << 29) -> tuple[float, float]:
    """GB/s at which this host gives the process fresh memory (`nbytes` written once: the kernel faults each page
    in and zeroes it), then rewrites it (the same pages, already resident): (first touch, rewrite). On bare metal
    the first touch runs at several GB/s; a VM whose host takes back the guest's free memory (free page reporting,
    ballooning) must back every fresh page again, and first touches there have measured 0.1-6 GB/s from minute to
    minute. A step that fills fresh memory (a pool read building its table) slows with it, in kernel time."""
    start = time.perf_counter()
    block = np.ones(nbytes, dtype=np.uint8)
    first = time.perf_counter() - start
    start = time.perf_counter()
    block.fill(2)
    again = time.perf_counter() - start
    del block
    return nbytes / first / 1e9, nbytes / again / 1e9


def printed_result(done: subprocess.CompletedProcess) -> dict | None:
    """What a benchmark's child process printed on its last `RESULT {json}` line; None when it failed or printed
    none."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[-1][len("RESULT ") :]) if done.returncode == 0 and lines else None


def child_result(command: list[str], variant: str, env: dict | None = None) -> dict:
    """Run one variant's child process (`command`) and return its `printed_result`; exit with the tail of its
    stderr when it has none."""
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    result = printed_result(done)
    if result is None:
        sys.exit(f"variant {variant} failed:\n{done.stderr[-4000:]}")
    return result


def training_children(script: str, args, dataset: str, folder, *extra: str) -> list[dict]:
    """Each of `args.variants` (comma-separated) trained by a child process of `script` in its `--variant` mode,
    with the options every training benchmark shares and `extra`: their results, in order."""
    results = []
    for variant in args.variants.split(","):
        command = [sys.executable, script, "--variant", variant, "--output-dir", str(Path(folder) / variant)]
        command += ["--model", args.model, "--dataset", dataset, "--steps", str(args.steps)]
        command += ["--batch", str(args.batch), "--max-length", str(args.max_length)]
        command += ["--bf16"] * args.bf16 + ["--gradient-checkpointing"] * args.gradient_checkpointing
        results.append(child_result([*command, *extra], variant))
    return results


def load_average() -> str:
    """The 1-, 5- and 15-minute load averages, for a benchmark's header."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def timed_training(make_trainer, *, variant: str, count_building: bool) -> tuple[object, dict]:
    """Train the trainer `make_trainer(callback)` builds (it must register `callback`) and measure it: real
    (non-pad) tokens per second over every step after the first (warm-up), and peak memory: the peak GPU
    allocation on a GPU; otherwise the growth of peak RSS from before the trainer is built (`count_building`:
    a DPO reference copy counts) or from before training. -> (trainer, the variant's result)."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    timings: dict[str, float] = {}
    built = {}

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            tokens = built["trainer"]._total_train_tokens
            if state.global_step == 1:
                timings["start"], timings["tokens_start"] = time.perf_counter(), tokens
            timings["end"], timings["tokens_end"] = time.perf_counter(), tokens

    rss_before = current_rss_bytes()
    trainer = built["trainer"] = make_trainer(Timer())
    if not count_building:
        rss_before = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = timings["end"] - timings["start"]
    tokens = timings["tokens_end"] - timings["tokens_start"]
    return trainer, {
        "variant": variant,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "peak_memory_bytes": (
            torch.cuda.max_memory_allocated() if cuda else max(0, peak_rss_bytes() - rss_before)
        ),
        "memory_kind": "cuda max_memory_allocated"
        if cuda
        else f"peak RSS growth from before {'the trainer' if count_building else 'training'}",
    }


def clustered_embeddings(
    path, rows: int, dim: int, clusters: int, noise: float, seed: int = 0, chunk: int = 16384, dtype="float32"
):
    """Rows = a random cluster centre + Gaussian noise, written chunk by chunk (never all in memory), as
    `dtype` (float32, or float16 as a 7B model's 4096-d embeddings are usually stored).

    Members of one cluster have cosine ~1/(1+noise^2) to each other: noise 0.3 -> ~0.92, so at max_similarity 0.9
    each cluster contributes one row, and fewer rows than a large budget survive (a full scan).
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(rows, dim))
    for start in range(0, rows, chunk):
        stop = min(rows, start + chunk)
        members = rng.integers(0, clusters, stop - start)
        noise_rows = rng.standard_normal(size=(stop - start, dim), dtype=np.float32) * np.float32(noise)
        out[start:stop] = centres[members] + noise_rows
        out.flush()  # write back as we go: dirty pages of an 8 GiB file must not pile up in memory
    out.flush()
    del out


def replay_gemms(products: list[tuple[int, int, int]]) -> float:
    """Seconds the walk's matrix products take as bare float32 GEMMs of the same shapes (`a @ b.T`, as the
    walk multiplies a block by the selected rows), on random data."""
    rng = np.random.default_rng(0)
    operands = {}  # one contiguous pair per inner dimension, as large as its largest product
    for inner in {d for _, _, d in products}:
        rows = max(m for m, _, d in products if d == inner)
        cols = max(n for _, n, d in products if d == inner)
        operands[inner] = (
            rng.standard_normal((max(rows, 1), inner), dtype=np.float32),
            rng.standard_normal((max(cols, 1), inner), dtype=np.float32),
        )
    start = time.perf_counter()
    for m, n, d in products:
        if m and n:
            a, b = operands[d]
            np.dot(a[:m], b[:n].T)
    return time.perf_counter() - start


def save_benchmark_llama(folder, hidden: int, layers: int, *, answers_digits: bool = False):
    """The random LLaMA the scoring and embedding benchmarks share: `hidden` wide (64-dim heads), `layers` deep,
    LLaMA's MLP ratio, the real Llama-2 tokenizer. `answers_digits`: the same size with the digits "1".."6" as
    its top next tokens (vLLM only returns the top 20 log-probs; a random model puts no digit there)."""
    from deita_hub.testing.tiny import save_digit_answering_model, save_tiny_model

    heads = max(hidden // 64, 1)
    size = {
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": heads,
        "intermediate_size": int(hidden * 2.6875),
    }
    if answers_digits:
        return save_digit_answering_model(folder, **size)
    return save_tiny_model(folder, "llama", **size)


def llm_benchmark_parser(doc: str):
    """The options score.py and embed.py share: rows, batching, the random LLaMA's size, device, backend."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block", type=int, default=64, help="rows per interleaved timing block")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    parser.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE")
    return parser


def vllm_options(pairs: list[str]) -> dict:
    """--vllm-option KEY=VALUE pairs, read as deita-hub's CLI reads them."""
    from deita_hub.vllm_engine import parse_options

    return parse_options(pairs)


WORDS = (
    "the model data selection score quality complexity answer question explain write code function list table "
    "history science river mountain city language music theory number proof example detail summary reason "
    "step first second because therefore however compare contrast analyse design build test measure improve "
    "short long simple careful clear polite helpful assistant user story poem email letter plan recipe travel"
).split()


def random_text(rng, low: int = 10, high: int = 200) -> str:
    """`low`..`high` random words: prompts of varied length, as the issue's benchmarks specify."""
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def print_ratio_table(results: list[dict], base_variant: str, label: str) -> None:
    """Tokens/s and peak memory of each variant, with their ratios to `base_variant` (train.py, dpo.py)."""
    base = next((r for r in results if r["variant"] == base_variant), results[0])
    head = f"x {label}"
    print(f"{'variant':<14}{'tokens':>10}{'tokens/s':>12}{head:>10}{'peak MiB':>11}{head:>10}")
    for r in results:
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        memory = (
            r["peak_memory_bytes"] / base["peak_memory_bytes"] if base["peak_memory_bytes"] else float("nan")
        )
        print(
            f"{r['variant']:<14}{r['tokens']:>10}{r['tokens_per_s']:>12.1f}{speed:>10.2f}"
            f"{r['peak_memory_bytes'] / 2**20:>11.1f}{memory:>10.2f}"
        )


def print_seconds_table(results: list[dict], base_variant: str, label: str) -> None:
    """Wall seconds and peak RSS of each variant, with the speed-up over `base_variant` (base seconds / seconds)."""
    base = next((r for r in results if r["variant"] == base_variant), results[0])
    head = f"x {label}"
    print(f"{'variant':<14}{'seconds':>10}{head:>12}{'peak MiB':>11}")
    for r in results:
        print(
            f"{r['variant']:<14}{r['seconds']:>10.2f}{base['seconds'] / r['seconds']:>12.2f}"
            f"{r['peak_memory_bytes'] / 2**20:>11.1f}"
        )
