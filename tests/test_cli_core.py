"""The CLI's step-by-step forms on a real (small) pool, exit codes, one-line errors, nothing partial on disk."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(cli_run):
    """The CLI in-process (tests/conftest.py `cli_run`), with a private cache and the Hub switched off."""

    def call(*args, cwd, check=True, env_extra=None):
        env = {"DEITA_HUB_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1", **(env_extra or {})}
        result = cli_run(*args, cwd=cwd, env=env)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return call


def test_help_lists_the_pipeline():
    out = subprocess.run(
        [sys.executable, "-m", "deita_hub", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("embed", "select", "build", "demo-pool"):
        assert command in out.stdout


def test_embed_then_select_with_baselines(tmp_path, run):
    run("demo-pool", "--out", "pool.jsonl", "--rows", "60", cwd=tmp_path)
    run("embed", "pool.jsonl", "--out", "emb.npy", "--max-length", "32", cwd=tmp_path)
    emb = np.load(tmp_path / "emb.npy")
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert emb.shape == (60, 384) and emb.dtype == np.float32
    assert meta["dim"] == 384 and meta["normalized"] and meta["max_length"] == 32
    assert meta["pool"]["fingerprint"].startswith("sha256:") and "all-MiniLM-L6-v2" in meta["model"]
    assert not list(tmp_path.glob("*.partial*"))
    result = run(
        "select",
        "pool.jsonl",
        "--embeddings",
        "emb.npy",
        "--budget",
        "20",
        "--max-similarity",
        "0.8",
        "--out",
        "sel.jsonl",
        "--baselines",
        cwd=tmp_path,
    )
    assert "sel.random.jsonl" in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "sel.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and [r["selection_rank"] for r in rows] == list(range(20))
    assert {
        "id",
        "conversations",
        "complexity_scores",
        "pool_row",
        "evol_score",
        "nearest_selected_row",
    } <= set(rows[0])
    assert all(r["nearest_selected_similarity"] <= 0.8 for r in rows[1:])
    for method in ("random", "score", "longest"):
        assert len((tmp_path / f"sel.{method}.jsonl").read_text().splitlines()) == 20
    # float16 embeddings are accepted too, and give the same selection here
    np.save(tmp_path / "emb16.npy", emb.astype(np.float16))
    run(
        "select",
        "pool.jsonl",
        "--embeddings",
        "emb16.npy",
        "--budget",
        "20",
        "--max-similarity",
        "0.8",
        "--out",
        "sel16.parquet",
        cwd=tmp_path,
    )
    import pyarrow.parquet as pq

    ids16 = pq.read_table(tmp_path / "sel16.parquet").column("id").to_pylist()
    assert len(ids16) == 20


def test_quiet_prints_results_only(tmp_path, run):
    """-q hides deita-hub's own progress bars too (tqdm lets an explicit `disable=False` win over TQDM_DISABLE),
    before or after the command's name; without it they show. (In-process, a library imported by an earlier test
    keeps its own bars: `test_kill_9_mid_run_then_resume` checks a whole `-q` process prints results only.)"""
    run("demo-pool", "--out", "pool.jsonl", "--rows", "40", cwd=tmp_path)
    embed = ["embed", "pool.jsonl", "--max-length", "16", "--out"]
    loud, quiet = run(*embed, "a.npy", cwd=tmp_path), run("-q", *embed, "b.npy", cwd=tmp_path)
    assert "embed:" in loud.stderr and "embed:" not in quiet.stderr and "wrote b.npy" in quiet.stdout
    select = ["select", "pool.jsonl", "--embeddings", "a.npy", "--budget", "10", "--out"]
    loud, quiet = run(*select, "a.jsonl", cwd=tmp_path), run(*select, "b.jsonl", "-q", cwd=tmp_path)
    assert "select:" in loud.stderr and "select:" not in quiet.stderr and "wrote b.jsonl" in quiet.stdout
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["select", "missing.jsonl", "--out", "o.jsonl", "--method", "random"], "does not exist"),
        (
            ["select", "bad.jsonl", "--out", "o.jsonl", "--method", "random"],
            "bad.jsonl, row 1, field 'conversations",
        ),
        (["select", "good.jsonl", "--out", "o.jsonl"], "--embeddings is required"),
        (
            ["select", "good.jsonl", "--out", "o.jsonl", "--embeddings", "short.npy"],
            "1 embedding rows but the pool has 2",
        ),
        (["select", "good.jsonl", "--out", "o.csv", "--method", "random"], "output must end in"),
        (["select", "good.jsonl", "--out", "o.jsonl", "--method", "score"], "no 'complexity_scores' column"),
        (["build", "nope.yaml", "--out", "built"], "recipe nope.yaml does not exist"),
        (["select", "good.jsonl", "--out", "o.jsonl", "--field", "color"], "--field takes KEY=VALUE"),
        (
            ["select", "good.jsonl", "--out", "o.jsonl", "--field", "colour=x"],
            "--field: unknown field 'colour'",
        ),
    ],
)
def test_bad_input_exits_1_with_one_line_and_writes_nothing(tmp_path, args, message, run):
    good = {"id": 1, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    # Two valid rows; ids must differ (a duplicate id is itself a bad row).
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": 2}) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"conversations": []}) + "\n")
    np.save(tmp_path / "short.npy", np.ones((1, 4), dtype=np.float32))
    before = set(tmp_path.iterdir())
    result = run(*args, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
    assert set(tmp_path.iterdir()) - before <= {tmp_path / "cache"}


def test_skip_invalid_writes_reasons(tmp_path, run):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    lines = [good, {"conversations": [{"from": "human", "value": "q"}]}, good]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = run(
        "select",
        "p.jsonl",
        "--method",
        "longest",
        "--budget",
        "5",
        "--out",
        "o.jsonl",
        "--skip-invalid",
        cwd=tmp_path,
    )
    assert "skipped 1 invalid row" in result.stderr
    reasons = [json.loads(line) for line in (tmp_path / "o.jsonl.invalid.jsonl").read_text().splitlines()]
    assert reasons[0]["row"] == 1 and "no assistant reply" in reasons[0]["reason"]
    assert [json.loads(line)["pool_row"] for line in (tmp_path / "o.jsonl").read_text().splitlines()] == [
        0,
        2,
    ]


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path, demo_cache_dir, run):
    """The README's main job: build the packaged demo recipe and load a config with datasets."""
    run(
        "build",
        "dataset_scripts/demo.yaml",
        "--out",
        tmp_path / "deita-demo",
        cwd=ROOT,
        env_extra={"DEITA_HUB_CACHE": str(demo_cache_dir)},
    )
    code = (
        "import datasets, sys; d = datasets.load_dataset(sys.argv[1], '6k', split='train'); "
        "print(len(d), d[0]['selection_rank'], sorted(datasets.get_dataset_config_names(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "deita-demo")], capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[:2] == ["600", "0"]
    assert "'10k'" in out.stdout and "'random-10k'" in out.stdout
    card = (tmp_path / "deita-demo" / "README.md").read_text()
    assert "**synthetic**" in card and "Synthetic data" in card
