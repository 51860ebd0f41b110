"""Build speed and memory at Deita's pool scale: a 300K-row pool with precomputed 4096-d embeddings.

    python benchmarks/build.py                 # 300K rows x 4096 (writes ~5 GiB of embeddings to a temp dir)
    python benchmarks/build.py --rows 50000    # quicker

The build runs in a child process so its peak RSS is its own. The baseline printed beside it is what holding
the matrix in RAM costs (np.load without a memory map, as Deita's pickled lists need far more): the build must
stay within 1.5x of the matrix (issue 2 target: <= 60 s, peak RSS <= 1.5x the matrix, on 2 cores).
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
  - {{name: 6k, method: deita, budget: 6000, default: true}}
  - {{name: 10k, method: deita, budget: 10000}}
  - {{name: random-10k, method: random, budget: 10000}}
  - {{name: longest-10k, method: longest, budget: 10000}}
"""


def write_pool(folder: Path, rows: int, dim: int, clusters: int) -> None:
    rng = np.random.default_rng(0)
    with open(folder / "pool.jsonl", "w") as handle:
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
    clustered_embeddings(folder / "emb.npy", rows, dim, clusters=clusters, noise=0.3, seed=5)
    (folder / "recipe.yaml").write_text(RECIPE.format())


def child(folder: str) -> None:
    from deita_hub.dataset import build

    start = time.perf_counter()
    result = build(
        Path(folder) / "recipe.yaml", Path(folder) / "out", cache_dir=Path(folder) / "cache", progress=False
    )
    seconds = time.perf_counter() - start
    rows = {s["name"]: s["rows"] for s in result.record["subsets"]}
    print(json.dumps({"seconds": seconds, "peak_rss": peak_rss_bytes(), "rows": rows}))


def baseline(folder: str) -> None:
    start = time.perf_counter()
    matrix = np.load(Path(folder) / "emb.npy")
    print(
        json.dumps(
            {
                "seconds": time.perf_counter() - start,
                "peak_rss": peak_rss_bytes(),
                "matrix_bytes": int(matrix.nbytes),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument(
        "--clusters", type=int, default=8000, help="distinct directions: fewer than 10K forces a full scan"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.baseline:
        return baseline(args.baseline)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        write_pool(Path(tmp), args.rows, args.dim, args.clusters)
        print(
            f"wrote a {args.rows:,}-row pool and {args.rows:,} x {args.dim} float32 embeddings in "
            f"{time.perf_counter() - start:.1f} s"
        )

        def run(flag):
            out = subprocess.run(
                [sys.executable, __file__, flag, tmp], capture_output=True, text=True, check=True
            )
            return json.loads(out.stdout.strip().splitlines()[-1])

        base = run("--baseline")
        ours = run("--child")
    matrix = base["matrix_bytes"]
    print(
        f"[baseline] np.load of the matrix into RAM: peak RSS {base['peak_rss'] / 2**30:.2f} GiB "
        f"({base['peak_rss'] / matrix:.2f}x the matrix)"
    )
    print(f"[build]    {ours['seconds']:.1f} s (target <= 60 s); rows per config {ours['rows']}")
    print(
        f"           peak RSS {ours['peak_rss'] / 2**30:.2f} GiB = {ours['peak_rss'] / matrix:.2f}x the matrix "
        f"(target <= 1.5x); vs in-RAM baseline {ours['peak_rss'] / base['peak_rss']:.2f}x"
    )


if __name__ == "__main__":
    main()
