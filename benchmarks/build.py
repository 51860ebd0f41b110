"""Build speed and memory at pool scale: a JSONL pool with precomputed embeddings, read, selected and built.

    python benchmarks/build.py                                          # 300K rows x 4096 float32 (~4.6 GiB)
    python benchmarks/build.py --rows 1000000 --dim 4096 --dtype fp16   # issue 16: 1M rows, an 8 GiB matrix
    python benchmarks/build.py --rows 50000                             # quicker

The pool (JSONL, ~1.5 KB a row, Deita-like 1-2 turns with scores) and the clustered embedding matrix (fewer
distinct directions than the largest budget, so the selection scans every row) are generated first, into
--workdir (kept, so a rerun skips generation) or a temporary folder. Then processes, each with its own peak RSS
and its CPU time split into user and kernel seconds (per step in a build):

  pool    `read_pool` of the JSONL + the evol scores (what every command starts with), then `read_pool` of the
          unchanged file again (the read memo the first read kept: the baseline is the first read); in a process
          of its own, the first read with the table held whole, as before large pools were streamed (the
          baseline of the streamed read: its turns stay in the file until a subset takes its rows);
  build   `deita_hub.dataset.build` of a four-subset recipe, with the time and resident memory after each of its
          steps; then the Deita walk's matrix products (`Selection.products`) replayed as bare float32 GEMMs of
          the same shapes: the floor a blockwise exact filter can approach. Twice: a build of a file read for the
          first time (its read memo removed), then a build of the unchanged file;
  select  (--select-process) the walk alone over the memory-mapped matrix, replayed the same way.

Before and after them, the rate at which the host gives the process fresh memory (`first_touch_rate`): a pool
read whole fills ~1.5 GiB of it, and in a VM whose host takes back free memory the kernel's faults on it can take
longer than the parse (2026-12-03 on a 2-core EPYC VM: 0.1-4 GB/s, against 8-27 GB/s for memory already
touched; 7-18 kernel seconds per first read). The streamed read holds ~0.45 GiB, mostly the same blocks reused.

Goals (issue 16, 2 cores, 24 GB): each process's peak RSS <= 1x the embedding matrix (the pool streamed, the
matrix memory-mapped); the selection within 1.5x of its GEMM time; everything in the build but the selection
(pool read, scores, tables, parquet, card) <= 25% of the build's total.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import (  # noqa: E402
    clock,
    clustered_embeddings,
    current_rss_bytes,
    first_touch_rate,
    peak_rss_bytes,
    replay_gemms,
)

RECIPE = """
name: bench
pool:
  sources: [pool.jsonl]
embedding:
  path: emb.npy
selection:
  max_similarity: 0.9
configs:
  - {name: 6k, method: deita, budget: 6000, default: true}
  - {name: 10k, method: deita, budget: 10000}
  - {name: random-10k, method: random, budget: 10000}
  - {name: longest-10k, method: longest, budget: 10000}
"""
LARGEST_BUDGET = 10_000
DTYPES = {"fp32": "float32", "fp16": "float16"}
POOL_BYTES_PER_ROW = 1600  # measured: the generated rows average ~1.5 KB of JSON


def write_pool(folder: Path, rows: int, dim: int, clusters: int, dtype: str) -> None:
    """The pool (`write_pool_jsonl`), its clustered embedding matrix and the recipe, into `folder`."""
    write_pool_jsonl(folder / "pool.jsonl.partial", rows)
    clustered_embeddings(
        folder / "emb.partial.npy", rows, dim, clusters=clusters, noise=0.3, seed=5, dtype=dtype
    )
    (folder / "recipe.yaml").write_text(RECIPE)
    # Renamed last: a workdir whose generation was interrupted is generated again, never half used.
    os.replace(folder / "emb.partial.npy", folder / "emb.npy")
    os.replace(folder / "pool.jsonl.partial", folder / "pool.jsonl")


def write_pool_jsonl(path: Path, rows: int) -> None:
    """Deita-like ShareGPT rows (1-2 turns, 5-60-word questions, 20-300-word answers in paragraphs with a quote
    and a list, so with the newlines and quotes JSON escapes; per-turn scores), written a chunk at a time from
    vectorised draws with the JSON spelled out (the values need no escaping): a million rows in about a minute,
    not the many minutes json.dumps per row takes on two busy cores."""
    rng = np.random.default_rng(0)
    chunk = 65536
    with open(path, "w") as handle:
        for first in range(0, rows, chunk):
            n = min(chunk, rows - first)
            turns = 1 + (rng.random(n) < 0.3)
            words = rng.integers([5, 20, 5, 20], [60, 300, 60, 300], size=(n, 4))
            scores = np.round(rng.uniform(1, 6, size=(n, 4)), 3).tolist()
            lines = []
            for j in range(n):
                i, conv = first + j, []
                for t in range(turns[j]):
                    asked, said = words[j, 2 * t], words[j, 2 * t + 1]
                    conv.append(
                        f'{{"from": "human", "value": "Question {i}.{t}:\\n{"word " * asked}"}}, '
                        f'{{"from": "gpt", "value": "Answer {i}.{t}:\\n\\n{"token " * (said // 2)}\\n\\n'
                        f'\\"{"quoted " * 3}\\" {"token " * (said - said // 2)}\\n- a list\\n- of items"}}'
                    )
                c = ", ".join(map(repr, scores[j][: turns[j]]))
                q = ", ".join(map(repr, scores[j][2 : 2 + turns[j]]))
                lines.append(
                    f'{{"id": "r{i}", "conversations": [{", ".join(conv)}], "complexity_scores": [{c}], '
                    f'"quality_scores": [{q}]}}\n'
                )
            handle.write("".join(lines))


# --- the three measured processes ---------------------------------------------------------------------------


def stage_pool(folder: Path) -> dict:
    """`read_pool` as each command starts, twice: the first read of the file (its memo removed), then a read of
    the unchanged file (the memo the first read kept spares it the scan and the checksums)."""
    from deita_hub.pool import read_pool
    from deita_hub.selection import evol_scores

    shutil.rmtree(folder / "cache" / "pool-reads", ignore_errors=True)
    start = clock()
    pool = read_pool(folder / "pool.jsonl", cache_dir=folder / "cache")
    read = (clock() - start).tolist()
    read_peak = peak_rss_bytes()
    scores = evol_scores(
        pool.column("complexity_scores"),
        pool.column("quality_scores"),
        rows=pool.rows,
    )
    np.save(folder / "scores.npy", scores)  # the select process starts from the scores, as `select` would
    seconds, rows, fingerprint = (clock() - start)[0], len(pool), pool.conversations_fingerprint
    del pool, scores
    again = time.perf_counter()
    repeat = read_pool(folder / "pool.jsonl", cache_dir=folder / "cache")
    again = time.perf_counter() - again
    assert repeat.conversations_fingerprint == fingerprint
    return {
        "memo": any((folder / "cache" / "pool-reads").glob("*.json")),
        "seconds": seconds,
        "read": read,
        "read_peak_rss": read_peak,
        "reread_seconds": again,
        "rows": rows,
        "peak_rss": peak_rss_bytes(),
    }


def stage_pool_whole(folder: Path) -> dict:
    """The baseline of the first read: `read_pool` of the same file with its table held whole, as every pool was
    read before large ones were streamed (`deita_hub.pool._STREAM_MIN_BYTES`)."""
    import deita_hub.pool as pool_module

    pool_module._STREAM_MIN_BYTES = sys.maxsize
    shutil.rmtree(folder / "cache" / "pool-reads", ignore_errors=True)
    start = clock()
    pool = pool_module.read_pool(folder / "pool.jsonl", cache_dir=folder / "cache")
    read = (clock() - start).tolist()
    assert pool.file is None
    return {"read": read, "peak_rss": peak_rss_bytes()}


def stage_select(folder: Path) -> dict:
    from deita_hub.selection import SelectionConfig, deita_select

    embeddings = np.load(folder / "emb.npy", mmap_mode="r")
    scores = np.load(folder / "scores.npy")
    start = clock()
    result = deita_select(embeddings, scores, SelectionConfig(budget=LARGEST_BUDGET, max_similarity=0.9))
    walk = (clock() - start).tolist()
    peak = peak_rss_bytes()  # before the replay, which holds its own operands
    return {"walk": walk, "peak_rss": peak, **walk_stats(result)}


def stage_build(folder: Path, *, first_read: bool) -> dict:
    """`build()` with a stopwatch around each step it calls (the real functions, timed where they are looked up);
    with `first_read`, the pool's read memo is removed first (a build of a file no command has read yet)."""
    import deita_hub.dataset as dataset

    if first_read:
        shutil.rmtree(folder / "cache" / "pool-reads", ignore_errors=True)

    steps: dict[str, list[float]] = {}  # [wall, user, kernel] seconds in each step
    resident: dict[str, int] = {}  # RSS right after each step: what the build still holds
    selections = {}

    def timed(step: str, name: str, function):
        def wrapper(*args, **kwargs):
            start = clock()
            try:
                result = function(*args, **kwargs)
                if name == "select_subsets":
                    selections.update(result)
                return result
            finally:
                steps[step] = (clock() - start + steps.get(step, 0.0)).tolist()
                resident[step] = current_rss_bytes()

        return wrapper

    for step, name in (
        ("read pool", "load_recipe_pool"),
        ("scores", "pool_scores"),
        ("embeddings (memory map)", "pool_embeddings"),
        ("select (4 subsets, 1 walk)", "select_subsets"),
        ("subset tables", "subset_table"),
        ("parquet", "_write_shards"),
        ("score plot", "plot_scores"),
        ("dataset card", "dataset_card"),
    ):
        setattr(dataset, name, timed(step, name, getattr(dataset, name)))
    out = folder / "out"
    start = clock()
    result = dataset.build(
        folder / "recipe.yaml", out, cache_dir=folder / "cache", progress=False, overwrite=True
    )
    total = (clock() - start).tolist()
    peak = peak_rss_bytes()  # before the replay, which holds its own operands
    shutil.rmtree(out, ignore_errors=True)
    walk = selections["10k"]  # the one Deita walk (6k is its prefix); random and longest multiply nothing
    return {
        "total": total,
        "peak_rss": peak,
        "steps": steps,
        "resident": resident,
        "rows": {s["name"]: s["rows"] for s in result.record["subsets"]},
        **walk_stats(walk),
    }


def walk_stats(walk) -> dict:
    return {
        "selected": len(walk),
        "scanned": walk.scanned,
        "pool_rows": walk.stats["pool_rows"],
        "rejected_via_sketch": walk.stats["rejected_via_sketch"],
        "sketch_dtype": walk.stats["sketch_dtype"],
        "gemm_seconds": replay_gemms(walk.products),
        "gemm_flop": sum(2 * m * n * d for m, n, d in walk.products),
    }


STAGES = {
    "pool": stage_pool,
    "select": stage_select,
    "pool-whole": stage_pool_whole,
    "build": functools.partial(stage_build, first_read=True),
    "build-again": functools.partial(stage_build, first_read=False),
}


# --- the driver --------------------------------------------------------------------------------------------


def check_room(folder: Path, rows: int, dim: int, itemsize: int) -> None:
    """Refuse to start when the disk cannot hold the pool and the matrix (a shared machine: say so early)."""
    needed = rows * dim * itemsize + rows * POOL_BYTES_PER_ROW
    free = shutil.disk_usage(folder).free
    if needed > 0.9 * free:
        raise SystemExit(
            f"{folder}: needs ~{needed / 2**30:.1f} GiB for the pool and matrix, {free / 2**30:.1f} GiB free; "
            "use fewer --rows or another --workdir"
        )


def warm_page_cache(folder: Path) -> float:
    """Read the pool and the matrix once, so every stage finds them in the page cache: a cold matrix measures the
    disk, not the walk (1M rows: a 71 s selection cold, 40 s warm, on the same machine)."""
    start = time.perf_counter()
    for name in ("pool.jsonl", "emb.npy"):
        with open(folder / name, "rb", buffering=0) as handle:
            buffer = bytearray(1 << 26)
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - start


def run_stage(stage: str, folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--stage", stage, str(folder)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"stage {stage} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(args, folder: Path, generated_seconds: float | None) -> None:
    matrix_bytes = args.rows * args.dim * np.dtype(DTYPES[args.dtype]).itemsize
    pool_bytes = (folder / "pool.jsonl").stat().st_size
    if generated_seconds is not None:
        print(f"generated in {generated_seconds:.0f} s (not measured below)")
    print(
        f"pool {args.rows:,} rows ({pool_bytes / 2**30:.2f} GiB JSONL); embeddings {args.rows:,} x {args.dim} "
        f"{DTYPES[args.dtype]} ({matrix_bytes / 2**30:.2f} GiB, memory-mapped)"
    )
    print("load average:", " ".join(f"{x:.2f}" for x in os.getloadavg()), f"({os.cpu_count()} CPUs)")
    print(fresh_memory_line("before"))
    print(
        f"page cache warmed with the pool and the matrix in {warm_page_cache(folder):.0f} s (not measured below)"
    )
    pool = run_stage("pool", folder)
    whole = run_stage("pool-whole", folder)
    select = run_stage("select", folder) if args.select_process else None
    build = run_stage("build", folder)
    again = run_stage("build-again", folder)

    def rss(stats):
        return f"{stats['peak_rss'] / 2**30:6.2f} GiB {stats['peak_rss'] / matrix_bytes:5.2f}x"

    def row(label: str, seconds: list[float], *rest: str) -> None:
        """`seconds`: [wall] or [wall, user, kernel]."""
        columns = "".join(f" {s:8.1f}" for s in seconds).ljust(27)
        print(f"{label:34}{columns}   {' '.join(rest)}".rstrip())

    print(
        f"\n{'process / step':34} {'wall s':>8} {'user s':>8} {'kernel s':>8}   {'peak RSS':>9} {'x matrix':>8}"
    )
    row("pool: read_pool + evol scores", [pool["seconds"]], rss(pool))
    row("  of which read_pool", pool["read"], rss({"peak_rss": pool["read_peak_rss"]}), "(streamed)")
    row(
        "  baseline: the table held whole",
        whole["read"],
        rss(whole),
        f"(streamed: {whole['read'][0] / pool['read'][0]:.2f}x faster, "
        f"{pool['read_peak_rss'] / whole['peak_rss']:.2f}x the peak RSS)",
    )
    row(
        "  read_pool again, file unchanged",
        [pool["reread_seconds"]],
        f"({pool['read'][0] / pool['reread_seconds']:.2f}x faster: the read memo spares the scan and checksums)"
        if pool["memo"]
        else "(no read memo: the file is under 64 MiB)",
    )
    if select:
        row("select: the walk alone", select["walk"], rss(select))
        row("  its products as fp32 GEMMs", [select["gemm_seconds"]])
    row("build: the whole recipe, pool new", build["total"], rss(build))
    for step, seconds in build["steps"].items():
        row("  " + step, seconds, f"{build['resident'][step] / 2**30:6.2f} GiB resident after it")
    row(
        "  its walk: products as fp32 GEMMs",
        [build["gemm_seconds"]],
        f"({build['gemm_flop'] / 1e12:.2f} TFLOP at {build['gemm_flop'] / 1e9 / build['gemm_seconds']:.0f} GFLOP/s, "
        "replayed after the build)",
    )
    row("build again, pool file unchanged", again["total"], rss(again))
    for step in ("read pool", "select (4 subsets, 1 walk)"):
        row("  " + step, again["steps"][step])
    row("  its walk: products as fp32 GEMMs", [again["gemm_seconds"]])
    worst = max(s["peak_rss"] for s in (pool, select, build, again) if s)  # deita-hub's, not the baseline
    print(
        f"\nthe walk selected {build['selected']:,} after scanning {build['scanned']:,} of {build['pool_rows']:,} "
        f"rows ({build['rejected_via_sketch']:,} rejected through the sketch); rows per subset {build['rows']}"
    )
    if build["sketch_dtype"] == "bfloat16":
        print(
            "the sketch's guesses were multiplied in bfloat16 (this CPU has bfloat16 units: AMX or AVX-512 BF16); "
            "the replay multiplies every product in float32, as the goal is defined"
        )
    print(f"goals: peak RSS <= 1x the matrix: worst {worst / matrix_bytes:.2f}x")
    for name, stats in (("pool new", build), ("pool unchanged", again)):
        selecting, seconds = stats["steps"]["select (4 subsets, 1 walk)"][0], stats["total"][0]
        rest = seconds - selecting
        print(
            f"  build, {name + ':':15} selection <= 1.5x its GEMM time: {selecting / stats['gemm_seconds']:.2f}x | "
            f"build minus selection <= 25% of the build: {rest:.1f} s = {rest / seconds:.0%}"
        )
    print("load average after:", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(fresh_memory_line("after"))
    print(
        "kernel s: in a pool read held whole, mostly faulting in the fresh memory its table fills (slow where the "
        "host gives fresh memory slowly: see the lines above); in the walk, largely its preads (rows copied out of "
        "the page cache)"
    )


def fresh_memory_line(when: str) -> str:
    first, again = first_touch_rate()
    return f"fresh memory {when} the stages: 512 MiB first touched at {first:.2f} GB/s, rewritten at {again:.1f} GB/s"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="embedding matrix dtype")
    parser.add_argument(
        "--clusters", type=int, default=8000, help="distinct directions: fewer than 10K forces a full scan"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated data here (reused)")
    parser.add_argument(
        "--select-process", action="store_true", help="also time the walk alone, in a process of its own"
    )
    parser.add_argument(
        "--generate-only", action="store_true", help="write the data into --workdir and stop (measure later)"
    )
    parser.add_argument("--stage", default=None, choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("folder", nargs="?", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(STAGES[args.stage](args.folder)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "spec.json"
        wanted = {
            "rows": args.rows,
            "dim": args.dim,
            "dtype": args.dtype,
            "clusters": args.clusters,
            "text": 2,
        }
        generated = None
        if not (spec.exists() and json.loads(spec.read_text()) == wanted and (folder / "emb.npy").exists()):
            check_room(folder, args.rows, args.dim, np.dtype(DTYPES[args.dtype]).itemsize)
            start = time.perf_counter()
            write_pool(folder, args.rows, args.dim, args.clusters, DTYPES[args.dtype])
            spec.write_text(json.dumps(wanted))
            generated = time.perf_counter() - start
        if args.generate_only:
            print(f"generated {folder} in {generated:.0f} s")
            return
        report(args, folder, generated)


if __name__ == "__main__":
    main()
