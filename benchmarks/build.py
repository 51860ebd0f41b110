"""Build speed and memory at pool scale: a JSONL pool with precomputed embeddings, read, selected and built.

    python benchmarks/build.py                                          # 300K rows x 4096 float32 (~4.6 GiB)
    python benchmarks/build.py --rows 1000000 --dim 4096 --dtype fp16   # issue 16: 1M rows, an 8 GiB matrix
    python benchmarks/build.py --rows 50000                             # quicker

The pool (JSONL, ~1.5 KB a row, Deita-like 1-2 turns with scores) and the clustered embedding matrix (fewer
distinct directions than the largest budget, so the selection scans every row) are generated first, into
--workdir (kept, so a rerun skips generation) or a temporary folder. Then three processes, each with its own
peak RSS:

  pool    `read_pool` of the JSONL + the evol scores (what every command starts with);
  select  the Deita walk over the memory-mapped matrix for the largest budget, then the same float32 matrix
          products replayed as plain GEMMs: the floor a blockwise exact filter can approach;
  build   `deita_hub.dataset.build` of a four-subset recipe, with the time of each of its steps.

Goals (issue 16, 2 cores, 24 GB): each process's peak RSS <= 1x the embedding matrix (the pool streamed, the
matrix memory-mapped); the selection within 1.5x of its GEMM time; everything in the build but the selection
(pool read, scores, tables, parquet, card) <= 25% of the build's total.
"""

from __future__ import annotations

import argparse
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
from _util import clustered_embeddings, peak_rss_bytes  # noqa: E402

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
    rng = np.random.default_rng(0)
    with open(folder / "pool.jsonl.partial", "w") as handle:
        for i in range(rows):
            turns = 1 + int(rng.random() < 0.3)
            conv, c, q = [], [], []
            for t in range(turns):
                conv += [
                    {"from": "human", "value": f"Question {i}.{t}: " + "word " * int(rng.integers(5, 60))},
                    {"from": "gpt", "value": f"Answer {i}.{t}: " + "token " * int(rng.integers(20, 300))},
                ]
                c.append(round(float(rng.uniform(1, 6)), 3))
                q.append(round(float(rng.uniform(1, 6)), 3))
            handle.write(
                json.dumps(
                    {"id": f"r{i}", "conversations": conv, "complexity_scores": c, "quality_scores": q}
                )
                + "\n"
            )
    clustered_embeddings(
        folder / "emb.partial.npy", rows, dim, clusters=clusters, noise=0.3, seed=5, dtype=dtype
    )
    (folder / "recipe.yaml").write_text(RECIPE)
    # Renamed last: a workdir whose generation was interrupted is generated again, never half used.
    os.replace(folder / "emb.partial.npy", folder / "emb.npy")
    os.replace(folder / "pool.jsonl.partial", folder / "pool.jsonl")


# --- the three measured processes ---------------------------------------------------------------------------


def stage_pool(folder: Path) -> dict:
    from deita_hub.pool import read_pool
    from deita_hub.selection import evol_scores

    start = time.perf_counter()
    pool = read_pool(folder / "pool.jsonl")
    read_seconds = time.perf_counter() - start
    scores = evol_scores(
        pool.table.column("complexity_scores").to_pylist(),
        pool.table.column("quality_scores").to_pylist(),
        rows=pool.rows,
    )
    np.save(folder / "scores.npy", scores)  # the select process starts from the scores, as `select` would
    return {
        "seconds": time.perf_counter() - start,
        "read_seconds": read_seconds,
        "rows": len(pool),
        "peak_rss": peak_rss_bytes(),
    }


def replay_gemms(products: list[tuple[int, int, int]]) -> float:
    """Seconds the walk's matrix products take as bare float32 GEMMs of the same shapes (`a @ b.T`, as the
    walk multiplies a block by the selected rows), on random data."""
    rng = np.random.default_rng(0)
    rows = max(m for m, _, _ in products)
    cols = max(n for _, n, _ in products)
    inner = max(d for _, _, d in products)
    a = rng.standard_normal((rows, inner), dtype=np.float32)
    b = rng.standard_normal((cols, inner), dtype=np.float32)
    start = time.perf_counter()
    for m, n, d in products:
        if m and n:
            np.dot(a[:m, :d], b[:n, :d].T)
    return time.perf_counter() - start


def stage_select(folder: Path) -> dict:
    from deita_hub.selection import SelectionConfig, deita_select

    embeddings = np.load(folder / "emb.npy", mmap_mode="r")
    scores = np.load(folder / "scores.npy")
    start = time.perf_counter()
    result = deita_select(embeddings, scores, SelectionConfig(budget=LARGEST_BUDGET, max_similarity=0.9))
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes()  # before the replay, which holds its own operands
    return {
        "seconds": seconds,
        "peak_rss": peak,
        "selected": len(result),
        "scanned": result.scanned,
        "rows": int(embeddings.shape[0]),
        "gemm_seconds": replay_gemms(result.products),
        "gemm_flop": sum(2 * m * n * d for m, n, d in result.products),
        "rejected_via_sketch": result.stats["rejected_via_sketch"],
    }


def stage_build(folder: Path) -> dict:
    """`build()` with a stopwatch around each step it calls (the real functions, timed where they are looked up)."""
    import deita_hub.dataset as dataset

    steps: dict[str, float] = {}

    def timed(step: str, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                steps[step] = steps.get(step, 0.0) + time.perf_counter() - start

        return wrapper

    for step, name in (
        ("read pool", "load_recipe_pool"),
        ("scores", "pool_scores"),
        ("embeddings (memory map)", "pool_embeddings"),
        ("select (4 subsets, 2 walks)", "select_subsets"),
        ("subset tables", "subset_table"),
        ("parquet", "_write_shards"),
        ("score plot", "plot_scores"),
        ("dataset card", "dataset_card"),
    ):
        setattr(dataset, name, timed(step, getattr(dataset, name)))
    out = folder / "out"
    start = time.perf_counter()
    result = dataset.build(
        folder / "recipe.yaml", out, cache_dir=folder / "cache", progress=False, overwrite=True
    )
    seconds = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": seconds,
        "peak_rss": peak_rss_bytes(),
        "steps": steps,
        "rows": {s["name"]: s["rows"] for s in result.record["subsets"]},
    }


STAGES = {"pool": stage_pool, "select": stage_select, "build": stage_build}


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
    pool, select, build = (run_stage(stage, folder) for stage in ("pool", "select", "build"))

    def rss(stats):
        return f"{stats['peak_rss'] / 2**30:6.2f} GiB {stats['peak_rss'] / matrix_bytes:5.2f}x"

    print(f"\n{'process / step':34} {'wall s':>8}   {'peak RSS':>9} {'x matrix':>8}")
    print(f"{'pool: read_pool + evol scores':34} {pool['seconds']:8.1f}   {rss(pool)}")
    print(f"{'  of which read_pool':34} {pool['read_seconds']:8.1f}")
    print(f"{'select: one walk, budget 10K':34} {select['seconds']:8.1f}   {rss(select)}")
    print(
        f"{'  its products as fp32 GEMMs':34} {select['gemm_seconds']:8.1f}   "
        f"({select['gemm_flop'] / 1e12:.2f} TFLOP, {select['gemm_flop'] / 1e9 / select['gemm_seconds']:.0f} GFLOP/s)"
    )
    print(f"{'build: the whole recipe':34} {build['seconds']:8.1f}   {rss(build)}")
    for step, seconds in build["steps"].items():
        print(f"{'  ' + step:34} {seconds:8.1f}")
    selecting = build["steps"].get("select (4 subsets, 2 walks)", 0.0)
    rest = build["seconds"] - selecting
    worst = max(pool["peak_rss"], select["peak_rss"], build["peak_rss"])
    print(
        f"\nselected {select['selected']:,} after scanning {select['scanned']:,} of {select['rows']:,} rows "
        f"({select['rejected_via_sketch']:,} rejected through the sketch); rows per subset {build['rows']}"
    )
    print(
        f"goals: peak RSS <= 1x the matrix: worst {worst / matrix_bytes:.2f}x | selection <= 1.5x its GEMM time: "
        f"{select['seconds'] / select['gemm_seconds']:.2f}x | build minus selection <= 25% of the build: "
        f"{rest:.1f} s = {rest / build['seconds']:.0%}"
    )


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
        wanted = {"rows": args.rows, "dim": args.dim, "dtype": args.dtype, "clusters": args.clusters}
        generated = None
        if not (spec.exists() and json.loads(spec.read_text()) == wanted and (folder / "emb.npy").exists()):
            check_room(folder, args.rows, args.dim, np.dtype(DTYPES[args.dtype]).itemsize)
            start = time.perf_counter()
            write_pool(folder, args.rows, args.dim, args.clusters, DTYPES[args.dtype])
            spec.write_text(json.dumps(wanted))
            generated = time.perf_counter() - start
        report(args, folder, generated)


if __name__ == "__main__":
    main()
