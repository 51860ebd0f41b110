"""The README's "Your own pool, step by step", walked as written on a real pool, and what the walk relies on:
interrupted `embed` / `score` runs resume without recomputing rows, commands check their inputs before writing,
and a build prints its own lines only.

The commands are read from the README's block, so README and test cannot drift; the test swaps in only what a
test must (the real pool for `my-pool.json`, a tiny digit-answering model for Deita's 13B scorers, the local
Hub server for the Hub).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
POOLS = ROOT.parent / "shared" / "data" / "pools"
CODEGEN = POOLS / "gpteacher-codegen.json"
needs_pools = pytest.mark.skipif(
    not CODEGEN.is_file(), reason=f"the shared real pools are not in this clone: {CODEGEN} is missing"
)


def own_pool_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    section = text.split("### Your own pool, step by step", 1)[1].split("\n### ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def real_pool(path: Path, rows: int) -> Path:
    """The first `rows` rows of GPTeacher's codegen pool (Alpaca-like, answers in `response`)."""
    path.write_text(json.dumps(json.loads(CODEGEN.read_text())[:rows]))
    return path


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    from deita_hub.testing.tiny import save_digit_answering_model

    return save_digit_answering_model(tmp_path_factory.mktemp("scorer"))


def test_the_readme_lists_the_steps_in_the_order_that_works():
    steps = [command[1] if command[1] != "recipe" else "recipe init" for command in own_pool_commands()]
    assert steps == ["score", "score", "embed", "select", "recipe init", "build", "push"]
    assert all(command[0] == "deita-hub" for command in own_pool_commands())


@needs_pools
def test_walk_the_readme_from_a_real_pool_to_the_hub(tmp_path, scorer_dir, cli_run, hub_env, hub_server):
    real_pool(tmp_path / "my-pool.json", 48)
    swaps = {
        "hkust-nlp/deita-complexity-scorer": str(scorer_dir),
        "hkust-nlp/deita-quality-scorer": str(scorer_dir),
    }
    for command in own_pool_commands():
        args = [swaps.get(arg, arg) for arg in command[1:]]
        if command[1] == "push":  # Hub clients read HF_ENDPOINT at import: a process of its own
            done = subprocess.run(
                [sys.executable, "-m", "deita_hub", *args],
                cwd=tmp_path,
                env=hub_env,
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
            assert "tag v1.0" in done.stdout
            continue
        result = cli_run(*args, cwd=tmp_path)
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr}"
        if command[1] == "select":
            # The pool has scores by now: every baseline is written, none skipped.
            assert "skipped" not in result.stderr
            for method in ("random", "score", "longest"):
                assert (tmp_path / f"selected.{method}.jsonl").is_file()
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == 48 and all(
        len(r["complexity_scores"]) == len(r["quality_scores"]) == 1 for r in scored
    )
    assert all(1.0 <= r["quality_scores"][0] <= 6.0 for r in scored)
    recipe = yaml.safe_load((tmp_path / "my-recipe.yaml").read_text())
    assert recipe["pool"]["format"] == {"format": "alpaca", "output_field": "response"}
    assert recipe["embedding"] == {"path": "my-pool.npy"}
    # The embeddings of the unscored pool were accepted for the scored one: same conversations.
    build = json.loads((tmp_path / "build" / "my-pool" / "deita_build.json").read_text())
    methods = {s["name"]: s["selection"]["method"] for s in build["subsets"]}
    assert sorted(set(methods.values())) == ["deita", "longest", "random", "score"]
    selected = [
        json.loads(line)["pool_row"] for line in (tmp_path / "selected.jsonl").read_text().splitlines()
    ]
    deita = next(s for s in build["subsets"] if s["selection"]["method"] == "deita" and s["default"])
    import datasets

    built = datasets.load_dataset(str(tmp_path / "build" / "my-pool"), deita["name"], split="train")
    assert built["pool_row"] == selected[: deita["rows"]]  # same walk: a smaller budget is a prefix
    assert "v1.0" in hub_server.refs("my-org/my-pool")["tags"]


@needs_pools
def test_baselines_skip_what_the_pool_cannot_support(tmp_path, cli_run):
    pool = real_pool(tmp_path / "pool.json", 30)
    result = cli_run(
        "select", pool, "--method", "random", "--budget", "10", "--out", tmp_path / "s.jsonl", "--baselines"
    )
    assert result.returncode == 0, result.stderr
    assert "skipped score (the pool has no 'complexity_scores' column)" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("s*.jsonl")) == ["s.jsonl", "s.longest.jsonl"]


def _run_until_saved(args: list[str], progress: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Start `deita-hub ARGS`, wait until `progress(...)` shows saved rows, then Ctrl-C it (SIGINT)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "deita_hub", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (progress.exists() and progress.stat().st_size) and process.poll() is None:
        assert time.monotonic() < deadline, "no progress saved in 120 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    return subprocess.CompletedProcess(process.args, process.returncode, out.decode(), err.decode())


@needs_pools
def test_interrupted_embed_resumes_without_recomputing(tmp_path, cli_run):
    pool = real_pool(tmp_path / "pool.json", 24)
    args = [
        "embed",
        "pool.json",
        "--out",
        "emb.npy",
        "--batch-size",
        "4",
        "--chunk-rows",
        "4",
        "--max-length",
        "64",
    ]
    stopped = _run_until_saved(args, tmp_path / "emb.npy.partial.json", tmp_path)
    assert stopped.returncode == 130, stopped.stderr
    kept = json.loads((tmp_path / "emb.npy.partial.json").read_text())["done_rows"]
    assert 0 < kept < 24, "the run finished before it could be interrupted"
    line = next(line for line in stopped.stderr.splitlines() if "interrupted:" in line)
    assert f"{kept} of 24 rows embedded" in line and line.endswith(
        "resume with: deita-hub " + shlex.join(args)
    )
    assert not (tmp_path / "emb.npy").exists()
    assert cli_run(*args, cwd=tmp_path).returncode == 0
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert meta["resumed_rows"] == kept and not (tmp_path / "emb.npy.partial.json").exists()
    assert cli_run("embed", pool, "--out", tmp_path / "whole.npy", *args[4:], cwd=tmp_path).returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "emb.npy"), np.load(tmp_path / "whole.npy"), atol=1e-6)


@needs_pools
def test_interrupted_score_resumes_without_recomputing(tmp_path, scorer_dir, cli_run):
    real_pool(tmp_path / "pool.json", 40)
    args = ["score", "pool.json", "--scorer", "quality", "--model", str(scorer_dir), "--out", "s.jsonl"]
    args += ["--batch-size", "1", "--chunk-rows", "8"]
    stopped = _run_until_saved(args, tmp_path / "s.jsonl.partial" / "rows.jsonl", tmp_path)
    assert stopped.returncode == 130, stopped.stderr
    kept = len((tmp_path / "s.jsonl.partial" / "rows.jsonl").read_text().splitlines())
    assert 0 < kept < 40, "the run finished before it could be interrupted"
    line = next(line for line in stopped.stderr.splitlines() if "interrupted:" in line)
    assert "rows scored, kept in" in line and line.endswith("resume with: deita-hub " + shlex.join(args))
    resumed = cli_run(*args, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    meta = json.loads((tmp_path / "s.jsonl.json").read_text())
    assert meta["resumed_rows"] >= kept and meta["rows_attempted"] == 40 - meta["resumed_rows"]
    whole = cli_run(*[tmp_path / "whole.jsonl" if a == "s.jsonl" else a for a in args], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    got = [json.loads(line)["quality_scores"] for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    want = [
        json.loads(line)["quality_scores"] for line in (tmp_path / "whole.jsonl").read_text().splitlines()
    ]
    assert len(got) == len(want) == 40
    for a, b in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["embed", "good.jsonl", "--out", "emb"], "name the output *.npy"),
        (["embed", "good.jsonl", "--out", "afile/emb.npy"], "is a file, not a folder"),
        (
            ["embed", "good.jsonl", "--out", "new/emb.npy", "--method", "last-token", "--model", "{missing}"],
            "nope",
        ),
        (
            ["score", "bad.jsonl", "--scorer", "quality", "--model", "m", "--out", "s.jsonl"],
            "bad.jsonl, row 1",
        ),
        (
            ["score", "good.jsonl", "--scorer", "quality", "--model", "{missing}", "--out", "new/s.jsonl"],
            "nope",
        ),
        (["select", "good.jsonl", "--embeddings", "new/missing.npy", "--out", "o.jsonl"], "does not exist"),
    ],
)
def test_bad_input_stops_before_writing_anything(tmp_path, args, message, cli_run):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "good.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    (tmp_path / "bad.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"conversations": []}) + "\n")
    (tmp_path / "afile").write_text("")
    before = sorted(tmp_path.rglob("*"))
    args = [str(tmp_path / "nope") if arg == "{missing}" else arg for arg in args]  # a model folder not there
    result = cli_run(*args, cwd=tmp_path)
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_build_prints_its_own_lines_only(tmp_path):
    """stdout: one line per subset and the result; stderr: the command's progress bars and nothing else (no
    library INFO lines, weight-loading bars or warnings), with embedding included."""
    rows = [
        {
            "conversations": [
                {"from": "human", "value": f"question {i}"},
                {"from": "gpt", "value": "answer " * i},
            ],
            "complexity_scores": [float(i % 5 + 1)],
            "quality_scores": [float(i % 3 + 1)],
        }
        for i in range(1, 41)
    ]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "name": "quiet",
        "pool": {"sources": ["pool.jsonl"]},
        "embedding": {"method": "sentence", "max_length": 32},
        "scores": {},
        "configs": [
            {"name": "deita-10", "method": "deita", "budget": 10, "max_similarity": 0.99},
            {"name": "longest-10", "method": "longest", "budget": 10},
            {"name": "random-10", "method": "random", "budget": 10},
        ],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "DEITA_HUB_CACHE": str(tmp_path / "c"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "deita_hub", "build", "recipe.yaml", "--out", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "deita-10: 10 rows (deita)",
        "longest-10: 10 rows (longest)",
        "random-10: 10 rows (random)",
        "built out",
    ]
    others = [line for line in re.split(r"[\r\n]+", done.stderr) if line.strip()]
    assert [line for line in others if not line.startswith(("embed: ", "select: "))] == []


@needs_pools
def test_a_recipe_naming_unreachable_scorers_fails_before_reading_models(tmp_path, cli_run):
    """`recipe init` on an unscored pool names Deita's scorers; without the Hub, `build` says so in one line at once
    (one quick request per model), instead of retrying each download for a minute, and writes nothing."""
    real_pool(tmp_path / "pool.json", 20)
    assert cli_run("recipe", "init", "pool.json", "--out", "r.yaml", cwd=tmp_path).returncode == 0
    recipe = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert recipe["scores"]["complexity"] == {"model": "hkust-nlp/deita-complexity-scorer"}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_ENDPOINT": "http://127.0.0.1:9", "DEITA_HUB_CACHE": "c"}
    env.pop("HF_HUB_OFFLINE", None)
    done = subprocess.run(
        [sys.executable, "-m", "deita_hub", "build", "r.yaml", "--out", "out"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    lines = done.stderr.splitlines()  # one line: no retry messages
    assert len(lines) == 1 and lines[0].startswith(
        "error: hkust-nlp/deita-complexity-scorer: cannot reach the Hub at http://127.0.0.1:9"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.json", "r.yaml"]
