"""Selection speed and memory (named selection.py, not select.py, which would shadow the stdlib `select`): deita-hub's exact blockwise filter vs Deita's one-at-a-time loop.

    python benchmarks/selection.py                       # 10K x 4096 side by side, then the 300K x 4096 full scan
    python benchmarks/selection.py --rows 4000 --skip-scan  # quicker

Part 1 (same process, same data): Deita's loop re-gathers the selected matrix for every candidate (as its
`combined_filter` does with batch size 1); ours multiplies blocks. Both must pick identical ids; the ratio is
printed. Part 2 runs in a child process so its peak RSS is its own: a memory-mapped 300K x 4096 float32 pool in
which fewer rows than the budget survive (clustered), so every row is scanned. Targets (issue 2): >= 100x, and
<= 30 s with peak RSS <= 1.5x the matrix on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import clustered_embeddings, peak_rss_bytes, replay_gemms  # noqa: E402

from deita_hub.selection import SelectionConfig, deita_select  # noqa: E402


def deita_loop(embeddings: np.ndarray, scores: np.ndarray, budget: int, max_similarity: float) -> list[int]:
    """Deita's batch-size-1 filter: for each candidate, stack every selected vector again, then compare."""
    order = np.argsort(-scores, kind="stable")
    selected: list[np.ndarray] = []
    ids: list[int] = []
    for i in order:
        vector = embeddings[i].astype(np.float32)
        vector = vector / np.linalg.norm(vector)
        if selected:
            matrix = np.stack(selected)  # the re-gather Deita does per candidate
            if (matrix @ vector).max() > max_similarity:
                continue
        selected.append(vector)
        ids.append(int(i))
        if len(ids) == budget:
            break
    return ids


def side_by_side(rows: int, dim: int, budget: int, max_similarity: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.npy"
        clustered_embeddings(path, rows, dim, clusters=rows // 2, noise=0.3, seed=1)
        embeddings = np.load(path)
        scores = np.random.default_rng(2).integers(0, 50, rows).astype(np.float64)
        start = time.perf_counter()
        ours = deita_select(embeddings, scores, SelectionConfig(budget=budget, max_similarity=max_similarity))
        t_ours = time.perf_counter() - start
        start = time.perf_counter()
        theirs = deita_loop(embeddings, scores, budget, max_similarity)
        t_theirs = time.perf_counter() - start
    same = ours.positions.tolist() == theirs
    print(
        f"[side by side] {rows:,} x {dim}, budget {budget:,}, max_similarity {max_similarity}: "
        f"selected {len(ours):,} after scanning {ours.scanned:,}"
    )
    print(f"  one-at-a-time (Deita): {t_theirs:8.2f} s")
    print(f"  blockwise (deita-hub): {t_ours:8.2f} s   identical ids: {same}")
    print(f"  speed-up: {t_theirs / t_ours:.1f}x")
    if not same:
        raise SystemExit("selections differ")


def full_scan_child(path: str, budget: int, max_similarity: float) -> None:
    embeddings = np.load(path, mmap_mode="r")
    scores = np.random.default_rng(3).random(embeddings.shape[0])
    start = time.perf_counter()
    result = deita_select(embeddings, scores, SelectionConfig(budget=budget, max_similarity=max_similarity))
    seconds = time.perf_counter() - start
    peak_rss = peak_rss_bytes()  # before the replay, which holds its own operands
    print(
        json.dumps(
            {
                "seconds": seconds,
                "selected": len(result),
                "scanned": result.scanned,
                "peak_rss": peak_rss,
                "matrix_bytes": int(embeddings.nbytes),
                "gemm_seconds": replay_gemms(result.products),
            }
        )
    )


def full_scan(rows: int, dim: int, clusters: int, budget: int, max_similarity: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "emb.npy"
        start = time.perf_counter()
        clustered_embeddings(path, rows, dim, clusters=clusters, noise=0.3, seed=4)
        print(
            f"[full scan] wrote {rows:,} x {dim} float32 ({rows * dim * 4 / 2**30:.2f} GiB) in "
            f"{time.perf_counter() - start:.1f} s"
        )
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(path),
                "--budget",
                str(budget),
                "--max-similarity",
                str(max_similarity),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        stats = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"  selected {stats['selected']:,} of budget {budget:,} (every row scanned: {stats['scanned'] == rows})"
    )
    print(
        f"  time: {stats['seconds']:.2f} s (target <= 30 s); its matrix products as bare float32 GEMMs: "
        f"{stats['gemm_seconds']:.2f} s ({stats['seconds'] / stats['gemm_seconds']:.2f}x, goal <= 1.5x)"
    )
    print(
        f"  peak RSS: {stats['peak_rss'] / 2**30:.2f} GiB = {stats['peak_rss'] / stats['matrix_bytes']:.2f}x the "
        "matrix (target <= 1.5x)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--budget", type=int, default=6000)
    parser.add_argument("--max-similarity", type=float, default=0.9)
    parser.add_argument("--scan-rows", type=int, default=300_000)
    parser.add_argument("--scan-clusters", type=int, default=3000)
    parser.add_argument("--skip-scan", action="store_true")
    parser.add_argument("--skip-side-by-side", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        full_scan_child(args.child, args.budget, args.max_similarity)
        return
    if not args.skip_side_by_side:
        side_by_side(args.rows, args.dim, args.budget, args.max_similarity)
    if not args.skip_scan:
        full_scan(args.scan_rows, args.dim, args.scan_clusters, args.budget, args.max_similarity)


if __name__ == "__main__":
    main()
