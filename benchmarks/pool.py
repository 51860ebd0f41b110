"""Reading a pool from each kind of source: deita-hub's bulk read against the row-by-row read it falls back to.

    python benchmarks/pool.py                     # 200K rows (~0.33 GiB of JSONL)
    python benchmarks/pool.py --rows 1000000      # a million (the row-by-row reads hold ~6 GiB each)

The same generated ShareGPT rows (`build.py`'s: 1-2 turns with quotes, newlines and lists, per-turn scores) are
written as JSONL, as parquet (row groups of 64K rows), as a saved `datasets` folder, and as JSONL with one more
line that has a field no earlier line has (`late-field`: the stream meets it in its last block, after the first
lines' schema). Each source is read by `read_pool` in a process of its own, twice: as deita-hub reads it (JSONL:
parsed by Arrow and checked column-wise, streamed from 64 MiB; parquet and datasets: the Arrow table checked
column-wise), then row by row, the baseline: every row a Python dict through `to_conversation`, as every source
but JSONL was read before. Each first read finds no read memo. Printed per read: wall, user and kernel CPU
seconds, peak RSS, and the speed-up and memory ratio against the row-by-row read of the same source; then the
seconds the pool's conversations fingerprint takes after the read (the bulk reads spell it while reading; the
row-by-row read spells it row by row in Python), and whether each source gave the same pool both ways (both
fingerprints and the table's columns), the first three the same pool.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import clock, first_touch_rate, load_average, peak_rss_bytes  # noqa: E402
from build import write_pool_jsonl  # noqa: E402

SOURCES = {
    "jsonl": "pool.jsonl",
    "parquet": "pool.parquet",
    "dataset": "pool-dataset",
    "late-field": "late.jsonl",
}
LATE_ROW = {  # the last line of late.jsonl: a field no earlier line has
    "id": "late",
    "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
    "complexity_scores": [1.0],
    "quality_scores": [2.0],
    "source": "added later",
}
ROW_GROUP = 65536


def write_sources(folder: Path, rows: int) -> None:
    """The pool as JSONL, then the same rows as parquet and as a saved dataset, and as JSONL with one more line that
    has a new field (each written and renamed last, so an interrupted run writes it again)."""
    import datasets
    import pyarrow.json as pa_json
    import pyarrow.parquet as pq

    datasets.disable_progress_bars()
    jsonl = folder / SOURCES["jsonl"]
    if not jsonl.exists():
        write_pool_jsonl(folder / "pool.jsonl.partial", rows)
        os.replace(folder / "pool.jsonl.partial", jsonl)
    table = pa_json.read_json(jsonl)
    if not (folder / SOURCES["parquet"]).exists():
        pq.write_table(table, folder / "pool.partial.parquet", row_group_size=ROW_GROUP)
        os.replace(folder / "pool.partial.parquet", folder / SOURCES["parquet"])
    if not (folder / SOURCES["dataset"]).exists():
        shutil.rmtree(folder / "dataset.partial", ignore_errors=True)
        datasets.Dataset(table).save_to_disk(str(folder / "dataset.partial"))
        os.replace(folder / "dataset.partial", folder / SOURCES["dataset"])
    if not (folder / SOURCES["late-field"]).exists():
        shutil.copyfile(jsonl, folder / "late.partial")
        with open(folder / "late.partial", "a") as handle:
            handle.write(json.dumps(LATE_ROW) + "\n")
        os.replace(folder / "late.partial", folder / SOURCES["late-field"])


def read(folder: Path, source: str, how: str) -> dict:
    """One read, in this (child) process: `how` is "bulk" (as deita-hub reads it) or "row-by-row"."""
    import deita_hub.pool as pool_module

    if how == "row-by-row":
        pool_module.fast_jsonl = lambda *args, **kwargs: None
        pool_module.table_in_bulk = lambda *args, **kwargs: None
    cache = folder / f"cache-{source}-{how}"
    shutil.rmtree(cache, ignore_errors=True)
    start = clock()
    pool = pool_module.read_pool(folder / SOURCES[source], cache_dir=cache)
    seconds = (clock() - start).tolist()
    peak = peak_rss_bytes()
    start = clock()
    spelled = pool.conversations_fingerprint
    fingerprint_seconds = float((clock() - start)[0])
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "read": seconds,
        "peak_rss": peak,
        "fingerprint_seconds": fingerprint_seconds,
        "rows": len(pool),
        "conversations_fingerprint": spelled,
        "columns": pool.column_names,
        "kind": type(pool.conversations).__name__,
    }


def child(folder: Path, source: str, how: str) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--read", source, how, str(folder)], capture_output=True, text=True
    )
    if done.returncode:
        raise SystemExit(f"{source} {how} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fresh_memory(when: str) -> str:
    first, again = first_touch_rate()
    return f"fresh memory {when}: 512 MiB first touched at {first:.2f} GB/s, rewritten at {again:.1f} GB/s"


def report(folder: Path, rows: int) -> None:
    sizes = {
        source: sum(p.stat().st_size for p in (folder / name).rglob("*") if p.is_file())
        if (folder / name).is_dir()
        else (folder / name).stat().st_size
        for source, name in SOURCES.items()
    }
    print(f"pool {rows:,} ShareGPT rows: " + ", ".join(f"{s} {b / 2**20:,.0f} MiB" for s, b in sizes.items()))
    print(f"load average {load_average()} ({os.cpu_count()} CPUs); {fresh_memory('before')}")
    head = f"{'source':<11}{'read':<12}{'wall s':>8}{'user s':>8}{'kernel s':>9}{'peak MiB':>10}"
    print(head + f"{'x faster':>10}{'x memory':>10}{'fingerprint s':>15}  conversations")
    results = {}
    for source in SOURCES:
        for how in ("row-by-row", "bulk"):
            results[source, how] = got = child(folder, source, how)
            base = results[source, "row-by-row"]
            wall, user, kernel = got["read"]
            print(
                f"{source:<11}{how:<12}{wall:>8.2f}{user:>8.2f}{kernel:>9.2f}{got['peak_rss'] / 2**20:>10,.0f}"
                f"{base['read'][0] / wall:>10.2f}{got['peak_rss'] / base['peak_rss']:>10.2f}"
                f"{got['fingerprint_seconds']:>15.2f}  {got['kind']}"
            )

    def pool(source: str, how: str) -> str:
        r = results[source, how]
        return json.dumps([r["rows"], r["conversations_fingerprint"], r["columns"]])

    same = len({pool(source, how) for source, how in results if source != "late-field"}) == 1
    same &= pool("late-field", "bulk") == pool("late-field", "row-by-row")
    print(f"load average {load_average()}; {fresh_memory('after')}")
    print(f"each source read the same pool both ways, and the first three the same pool: {same}")
    if not same:
        raise SystemExit("the reads differ")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated sources here (reused)")
    parser.add_argument("--read", nargs=3, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        source, how, folder = args.read
        print(json.dumps(read(Path(folder), source, how)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / "spec.json"
        if not spec.exists() or json.loads(spec.read_text()) != {"rows": args.rows}:
            for name in SOURCES.values():
                target = folder / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        start = time.perf_counter()
        write_sources(folder, args.rows)
        spec.write_text(json.dumps({"rows": args.rows}))
        print(f"sources ready in {time.perf_counter() - start:.0f} s (not measured below)")
        report(folder, args.rows)


if __name__ == "__main__":
    main()
