"""Nothing a user feeds deita-hub breaks it: malformed input, interrupts, concurrent runs, full disks.

Each case ends cleanly: exit code 1 and one `error:` line naming the file (and row/field where there is one) for
bad input or a full disk, 130/143 and one line for Ctrl-C/SIGTERM, and no partial output either way. The lists
`MALFORMED`, `INTERRUPTS`, `CONCURRENT` and `DISK_FULL` are what the README's Reliability table counts
(`test_readme_reliability_table_matches_the_suite`), so table and suite cannot drift.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from test_build import make_pool, write_recipe  # the module pytest imported (tests/ is on sys.path)

from deita_hub.errors import DeitaHubError

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "tests" / "data" / "eval" / "held_out.jsonl"


def conversation(i: int) -> list[dict]:
    return [
        {"from": "human", "value": f"question {i}"},
        {"from": "gpt", "value": f"answer {i} " * (i % 7 + 1)},
    ]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- malformed input: one line, exit 1, nothing written --------------------------------------------------------

GOOD_ROWS = [{"id": f"r{i}", "conversations": conversation(i)} for i in range(6)]


def _bytes(name: str, data: bytes):
    return lambda folder: (folder / name).write_bytes(data)


def _rows(name: str, rows: list, jsonl: bool = True):
    def make(folder: Path) -> None:
        if jsonl:
            write_jsonl(folder / name, rows)
        else:
            (folder / name).write_text(json.dumps(rows))

    return make


def _npy(name: str, matrix: np.ndarray, sidecar: str | None = None):
    def make(folder: Path) -> None:
        write_jsonl(folder / "pool.jsonl", GOOD_ROWS)
        np.save(folder / name, matrix)
        if sidecar is not None:
            (folder / (name + ".json")).write_text(sidecar)

    return make


def _recipe(text: str | bytes):
    def make(folder: Path) -> None:
        write_jsonl(folder / "pool.jsonl", GOOD_ROWS)
        path = folder / "recipe.yaml"
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return make


SELECT = ["select", "pool.jsonl", "--method", "longest", "--budget", "2", "--out", "out.jsonl"]
SELECT_JSON = ["select", "pool.json", "--method", "longest", "--budget", "2", "--out", "out.jsonl"]
SELECT_DEITA = ["select", "pool.jsonl", "--budget", "2", "--out", "out.jsonl", "--embeddings", "emb.npy"]
BUILD = ["build", "recipe.yaml", "--out", "out"]
DEEP = b"[" * 100_000 + b"]" * 100_000

# (id, make the inputs in a folder, command, what the one line must say)
MALFORMED = [
    ("jsonl-not-utf8", _bytes("pool.jsonl", b'{"id": "a\xff\xfe"}\n'), SELECT, "pool.jsonl, row 0: line 1: not UTF-8"),
    ("json-not-utf8", _bytes("pool.json", b'[{"id": "\xc3("}]'), SELECT_JSON, "pool.json: line 1: not UTF-8"),
    ("json-nested-deeply", _bytes("pool.json", DEEP), SELECT_JSON, "pool.json: JSON nested too deeply"),
    ("jsonl-nested-deeply", _bytes("pool.jsonl", DEEP + b"\n"), SELECT, "row 0: line 1: JSON nested too deeply"),
    ("jsonl-invalid-json", _bytes("pool.jsonl", b'{"id": 1\n'), SELECT, "row 0: invalid JSON on line 1"),
    ("json-object-not-array", _bytes("pool.json", b'{"rows": []}'), SELECT_JSON, "expected a JSON array"),
    ("row-not-an-object", _rows("pool.jsonl", [[1, 2]]), SELECT, "row 0: expected an object, got list"),
    (
        "duplicate-ids",
        _rows("pool.jsonl", [*GOOD_ROWS, {"id": "r2", "conversations": conversation(9)}]),
        SELECT,
        "pool.jsonl, row 6, field 'id': duplicate id 'r2', also the id of row 2",
    ),
    ("parquet-garbage", _bytes("pool.parquet", b"PAR1 not really"), [*SELECT[:1], "pool.parquet", *SELECT[2:]], "not a readable parquet"),
    ("pool-missing", lambda folder: None, SELECT, "pool file not found"),
    ("npy-garbage", _npy("emb.npy", np.zeros(3)), SELECT_DEITA, "expected a 2-D matrix"),
    ("npy-int", _npy("emb.npy", np.ones((6, 4), dtype=np.int32)), SELECT_DEITA, "convert with np.save"),
    ("npy-wrong-rows", _npy("emb.npy", np.ones((5, 4), dtype=np.float16)), SELECT_DEITA, "5 embedding rows but the pool has 6"),
    ("npy-sidecar-garbage", _npy("emb.npy", np.ones((6, 4), dtype=np.float32), "{not json"), SELECT_DEITA, "emb.npy.json: not a readable JSON sidecar"),
    (
        "npy-sidecar-other-pool",
        _npy("emb.npy", np.ones((6, 4), dtype=np.float32), json.dumps({"conversations_fingerprint": "sha256:00"})),
        SELECT_DEITA,
        "holds the embeddings of other conversations",
    ),
    ("recipe-not-utf8", _recipe(b"name: \xff\n"), BUILD, "recipe.yaml: not UTF-8"),
    ("recipe-invalid-yaml", _recipe("name: [unclosed\n"), BUILD, "recipe.yaml: invalid YAML"),
    ("recipe-nested-deeply", _recipe("name: " + "[" * 5000 + "]" * 5000 + "\n"), BUILD, "recipe.yaml"),
    ("recipe-unknown-key", _recipe("name: x\npool: {sources: [pool.jsonl]}\nconfigz: []\n"), BUILD, "did you mean 'configs'"),
    ("recipe-wrong-type", _recipe("name: x\npool: {sources: [pool.jsonl]}\nconfigs: [{name: a, method: random, budget: many}]\n"), BUILD, "budget"),
    ("train-config-unknown-key", _bytes("t.yaml", b"modle: x\n"), ["train", "t.yaml"], "t.yaml: unknown key(s) 'modle'"),
    ("train-config-not-utf8", _bytes("t.yaml", b"model: \xfe\n"), ["train", "t.yaml"], "t.yaml: not UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "args", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_input_is_one_line_and_writes_nothing(tmp_path, cli_run, make, args, message):
    make(tmp_path)
    before = listing(tmp_path)
    result = cli_run(*args, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == before  # no output, no temp file


def test_duplicate_ids_skipped_are_kept_with_their_reason(tmp_path):
    """With invalid rows skipped, the first holder of an id stays and the later one is a rejected row the card
    counts (deita_build.json `invalid_rows`, invalid_rows.jsonl)."""
    from deita_hub.pool import read_pool

    rows = [*GOOD_ROWS, {"id": "r2", "conversations": conversation(9)}]
    pool = read_pool(write_jsonl(tmp_path / "pool.jsonl", rows), on_invalid="skip")
    assert len(pool) == 6 and pool.table.column("id").to_pylist() == [f"r{i}" for i in range(6)]
    [rejected] = pool.invalid
    assert rejected["row"] == 6 and rejected["field"] == "id" and "also the id of row 2" in rejected["reason"]


def test_duplicate_ids_across_sources_name_both_files(tmp_path):
    from deita_hub.pool import read_pool

    a = write_jsonl(tmp_path / "a.jsonl", GOOD_ROWS)
    b = write_jsonl(tmp_path / "b.jsonl", [{"id": "r4", "conversations": conversation(1)}])
    with pytest.raises(
        DeitaHubError,
        match=r"b\.jsonl, row 0, field 'id': duplicate id 'r4', also the id of row 4 of .*a\.jsonl",
    ):
        read_pool([a, b])


def test_float64_embeddings_are_cast_and_select_the_same_rows(tmp_path):
    """np.save of a float64 computation is accepted: cast to float32 block by block, the same selection."""
    from deita_hub.dataset import build

    _, emb = make_pool(tmp_path)
    build(write_recipe(tmp_path), tmp_path / "f32", cache_dir=tmp_path / "cache", progress=False)
    np.save(tmp_path / "emb.npy", emb.astype(np.float64))
    build(write_recipe(tmp_path), tmp_path / "f64", cache_dir=tmp_path / "cache", progress=False)
    for config in ("small", "big"):
        a, b = (tmp_path / out / config / "train-00000-of-00001.parquet" for out in ("f32", "f64"))
        assert a.read_bytes() == b.read_bytes()


def test_embeddings_without_sidecar_say_only_the_row_count_was_checked(tmp_path, caplog):
    from deita_hub.embedding import load_embeddings

    np.save(tmp_path / "emb.npy", np.ones((6, 4), dtype=np.float16))
    with caplog.at_level("WARNING", logger="deita_hub"):
        matrix, meta = load_embeddings(tmp_path / "emb.npy", num_rows=6, conversations_fingerprint="sha256:x")
    assert matrix.dtype == np.float16 and meta["dtype"] == "float16"
    assert "has no sidecar emb.npy.json: only its row count (6) was checked" in caplog.text
    with pytest.raises(DeitaHubError, match="6 embedding rows but the pool has 7"):
        load_embeddings(tmp_path / "emb.npy", num_rows=7)


@pytest.mark.parametrize("offline", ["0", "1"])
def test_import_chain_of_build_brings_no_bitsandbytes_warning(offline):
    """sentence-transformers -> transformers.trainer_utils -> peft -> bitsandbytes logs a warning about its
    `kernels` package on import, and with `kernels` installed (transformers >= 5.25 requires it) and the Hub
    offline, `kernels` warns too; the CLI keeps both loggers to errors, since no command but a 4-bit training
    uses them."""
    code = (
        "import logging, sys\n"
        "from deita_hub.cli import _quiet_unrelated_loggers\n"
        "logging.basicConfig()\n"
        "_quiet_unrelated_loggers()\n"
        "import sentence_transformers\n"
        "print('bitsandbytes' in sys.modules)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": offline}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    if done.stdout.strip() != "True":
        pytest.skip("bitsandbytes ([qlora]) is not installed: nothing to keep quiet")
    assert "kernels" not in done.stderr and "WARNING" not in done.stderr, done.stderr


# --- interrupts: 130/143, one line, nothing partial ------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "DEITA_HUB_"))}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def interrupt(args: list[str], cwd: Path, ready, sig: int, env: dict | None = None, deadline_s: float = 180):
    """Start `deita-hub ARGS`, send `sig` once `ready(stderr_so_far)` holds (the command has started its work),
    and return (exit code, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "deita_hub", *args],
        cwd=cwd,
        env=env or _env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: process.stderr.read1(1 << 16), b"")))
    reader.start()
    deadline = time.monotonic() + deadline_s
    try:
        while not ready(b"".join(chunks).decode(errors="replace")):
            assert process.poll() is None, "the command ended before it could be interrupted:\n" + b"".join(
                chunks
            ).decode(errors="replace")
            assert time.monotonic() < deadline, f"not ready within {deadline_s} s"
            time.sleep(0.02)
        process.send_signal(sig)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            reader.join()
            stderr = b"".join(chunks).decode(errors="replace")
            raise AssertionError(
                f"still running 120 s after signal {sig}; its stderr:\n{stderr[-3000:]}"
            ) from None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join()
    return process.returncode, b"".join(chunks).decode(errors="replace")


def _ends_cleanly(code: int, stderr: str, sig: int) -> None:
    expected = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}[sig]
    # Besides its progress lines and bars, the command ends with one line saying it was stopped: "interrupted" /
    # "terminated", or, where it kept its progress, the line that says so with the command that resumes it.
    # a progress bar is redrawn without a newline: a log line may follow it on the same line
    text = stderr.replace("\r", "\n").replace("warning: ", "\nwarning: ")
    lines = [line for line in text.splitlines() if line.strip() and "|" not in line]
    endings = [
        line for line in lines if line.removeprefix("warning: ").startswith(("interrupted", "terminated"))
    ]
    assert code == expected[0] and len(endings) == 1, stderr[-3000:]
    assert endings[0] == expected[1] or "resume with:" in endings[0], stderr[-3000:]
    assert "Traceback" not in stderr and not any(line.startswith("error") for line in lines), stderr[-3000:]


def _hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name]


def _select_inputs(folder: Path, rows: int = 40_000) -> None:
    rng = np.random.default_rng(0)
    pool = [
        {
            "id": str(i),
            "conversations": conversation(i),
            "complexity_scores": [1.0 + i % 5],
            "quality_scores": [2.0],
        }
        for i in range(rows)
    ]
    write_jsonl(folder / "pool.jsonl", pool)
    np.save(folder / "emb.npy", rng.normal(size=(rows, 64)).astype(np.float32))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_select_writes_nothing(tmp_path, sig):
    _select_inputs(tmp_path)
    args = ["select", "pool.jsonl", "--embeddings", "emb.npy", "--budget", "40000", "--max-similarity", "0.5"]
    code, stderr = interrupt([*args, "--out", "out.jsonl"], tmp_path, lambda err: "select:" in err, sig)
    _ends_cleanly(code, stderr, sig)
    assert not (tmp_path / "out.jsonl").exists() and _hidden_leftovers(tmp_path) == []


def test_ctrl_c_inside_exec_d_code_still_exits_130_under_python_m(tmp_path):
    """A Ctrl-C that lands in code `exec` runs from a string (a dataclass's generated methods, while a lazily
    imported module loads: threadpoolctl's, at the start of a `select` walk) made `python -m deita_hub` kill
    itself with SIGINT at exit (status -2) after printing "interrupted" (CI saw it; 3 of 59 interrupted
    selects in a stress loop). Reproduced every time here: a command whose exec'd code raises
    KeyboardInterrupt."""
    (tmp_path / "interrupt_in_exec.py").write_text(
        "import sys\n"
        "from deita_hub.cli import cli, main\n\n"
        "@cli.command('interrupt-in-exec')\n"
        "def interrupt_in_exec():\n"
        "    exec('raise KeyboardInterrupt')\n\n"
        "sys.exit(main(['interrupt-in-exec']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "interrupt_in_exec"], cwd=tmp_path, env=_env(), capture_output=True, text=True
    )
    _ends_cleanly(done.returncode, done.stderr, signal.SIGINT)


def _build_inputs(folder: Path, rows: int = 600) -> None:
    pool = [
        {
            "id": str(i),
            "conversations": conversation(i),
            "complexity_scores": [1.0 + i % 5],
            "quality_scores": [2.0],
        }
        for i in range(rows)
    ]
    write_jsonl(folder / "pool.jsonl", pool)
    recipe = {
        "name": "interrupted",
        "pool": {"sources": ["pool.jsonl"]},
        "embedding": {"method": "sentence", "max_length": 32, "batch_size": 4, "chunk_rows": 8},
        "configs": [{"name": "d", "method": "deita", "budget": 20, "max_similarity": 0.99, "default": True}],
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_build_leaves_no_dataset_and_resumes_its_embedding(tmp_path, sig):
    _build_inputs(tmp_path, rows=160)  # 40 batches: the signal lands mid-embedding, the resume stays short
    cache = tmp_path / "cache"
    partial = lambda err: any(cache.glob("embeddings/*.partial.json"))  # noqa: E731 - progress saved
    code, stderr = interrupt(
        ["build", "recipe.yaml", "--out", "out"], tmp_path, partial, sig, _env(DEITA_HUB_CACHE=str(cache))
    )
    _ends_cleanly(code, stderr, sig)
    assert not (tmp_path / "out").exists() and _hidden_leftovers(tmp_path) == []
    resumed = subprocess.run(
        [sys.executable, "-m", "deita_hub", "build", "recipe.yaml", "--out", "out"],
        cwd=tmp_path, env=_env(DEITA_HUB_CACHE=str(cache)), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    sidecar = json.loads(next(cache.glob("embeddings/*.npy.json")).read_text())
    assert sidecar["resumed_rows"] > 0  # the rerun continued the interrupted embedding


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_embed_keeps_progress_not_output(tmp_path, sig):
    write_jsonl(tmp_path / "pool.jsonl", [{"conversations": conversation(i)} for i in range(600)])
    args = [
        "embed",
        "pool.jsonl",
        "--out",
        "emb.npy",
        "--batch-size",
        "4",
        "--chunk-rows",
        "8",
        "--max-length",
        "32",
    ]
    progress = tmp_path / "emb.npy.partial.json"
    code, stderr = interrupt(args, tmp_path, lambda err: progress.exists(), sig)
    _ends_cleanly(code, stderr, sig)
    assert not (tmp_path / "emb.npy").exists() and not (tmp_path / "emb.npy.json").exists()
    assert json.loads(progress.read_text())["done_rows"] > 0


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory):
    from deita_hub.testing.tiny import save_digit_answering_model

    return save_digit_answering_model(tmp_path_factory.mktemp("scorer"))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_score_keeps_progress_not_output(tmp_path, scorer_dir, sig):
    write_jsonl(tmp_path / "pool.jsonl", [{"conversations": conversation(i)} for i in range(300)])
    args = ["score", "pool.jsonl", "--scorer", "quality", "--model", str(scorer_dir), "--out", "s.jsonl"]
    args += ["--batch-size", "1", "--chunk-rows", "4"]
    rows = tmp_path / "s.jsonl.partial" / "rows.jsonl"
    code, stderr = interrupt(args, tmp_path, lambda err: rows.exists() and rows.stat().st_size > 0, sig)
    _ends_cleanly(code, stderr, sig)
    assert not (tmp_path / "s.jsonl").exists() and not (tmp_path / "s.jsonl.json").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_push_commits_nothing(tmp_path, hub_server, hub_env, sig):
    from test_push import make_dataset_folder

    folder = make_dataset_folder(tmp_path / "ds", {"6k": [{"id": i, "text": "x" * 50} for i in range(50)]})
    # The upload stalls, so the signal lands between the repo's creation and its commit.
    hub_server.add_fault("preupload", delay=30, times=1)
    created = lambda err: hub_server.refs("org/interrupted") is not None  # noqa: E731
    args = ["push", str(folder), "org/interrupted", "--tag", "v1"]
    code, stderr = interrupt(args, tmp_path, created, sig, env=hub_env)
    _ends_cleanly(code, stderr, sig)
    assert hub_server.refs("org/interrupted")["tags"] == {}
    assert not any(name.startswith("6k/") for name in hub_server.files("org/interrupted"))  # no half release


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from deita_hub.testing.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_eval_writes_no_results(tmp_path, tiny_model_dir, sig):
    rows = [json.loads(line) for line in HELD_OUT.read_text().splitlines()]
    write_jsonl(
        tmp_path / "held.jsonl", [{**row, "id": f"{row['id']}-{i}"} for i in range(2000) for row in rows]
    )
    args = ["eval", str(tiny_model_dir), "--suite", "loss", "--dataset", "held.jsonl", "--out", "evals"]
    process_loaded_model = lambda err: "model" in err or _loaded(tiny_model_dir)  # noqa: E731
    code, stderr = interrupt(args, tmp_path, process_loaded_model, sig)
    _ends_cleanly(code, stderr, sig)
    assert not (tmp_path / "evals" / "results.json").exists() and _hidden_leftovers(tmp_path) == []


_LOADED: dict[str, bool] = {}


def _loaded(model_dir: Path) -> bool:
    """Whether a deita-hub process has the model's weights mapped (it has started evaluating)."""
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            if str(model_dir) in maps.read_text() and "deita_hub" in (maps.parent / "cmdline").read_text():
                return True
        except OSError:
            continue
    return False


# --- concurrency -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_builds_sharing_one_cache_agree_and_embed_once(tmp_path):
    _build_inputs(tmp_path, rows=200)
    cache = tmp_path / "cache"
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "deita_hub", "build", "recipe.yaml", "--out", out],
            cwd=tmp_path,
            env=_env(DEITA_HUB_CACHE=str(cache)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for out in ("a", "b")
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in processes]
    for process in processes:
        process.stdout.close()
        process.stderr.close()
    assert [code for code, _ in results] == [0, 0], results
    a, b = listing(tmp_path / "a"), listing(tmp_path / "b")
    assert a.keys() == b.keys() and all(a[name] == b[name] for name in a if name.endswith(".parquet"))
    embeddings = sorted(p.name for p in (cache / "embeddings").iterdir() if not p.name.endswith(".lock"))
    assert len(embeddings) == 2 and embeddings[0].endswith(".npy") and embeddings[1].endswith(".npy.json")
    # the second build waited and reused the first's matrix: it embedded nothing
    assert sum("embed:" in err for _, err in results) == 1, [err[-500:] for _, err in results]


def test_a_second_claim_on_a_folder_is_refused_while_the_first_holds_it(tmp_path):
    """What `train` does with its OUTPUT_DIR: the second process refuses with a clear message; when the first
    ends (however it ends) the folder is free again."""
    code = "import sys, time; from deita_hub.io import claim_folder; claim_folder(sys.argv[1], 'a training'); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        second = [
            sys.executable,
            "-c",
            "import sys; from deita_hub.io import claim_folder; claim_folder(sys.argv[1], 'a training')",
            str(tmp_path / "run"),
        ]
        refused = subprocess.run(second, cwd=ROOT, capture_output=True, text=True)
        assert (
            refused.returncode == 1
            and f"is in use: a training (pid {holder.pid}) is writing into it" in refused.stderr
        )
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert subprocess.run(second, cwd=ROOT, capture_output=True).returncode == 0  # a killed holder frees it


# fmt: skip


@pytest.mark.slow
def test_two_trainings_into_one_folder_the_second_refuses_then_sigterm_then_resume(tmp_path):
    from test_training import varied_conversations, write_pool

    pool = write_pool(tmp_path / "pool.jsonl", varied_conversations(12))
    out = tmp_path / "run"
    args = [
        "train", "tiny-cpu.yaml", "--dataset", str(pool), "--output-dir", str(out), "--method", "full",
        "--max-steps", "400", "--set", "save_steps=2", "--set", "per_device_train_batch_size=1",
        "--set", "total_train_batch_size=1",
    ]  # fmt: skip
    state = {}

    def first_checkpoint_then_second_training(err: str) -> bool:
        if not (out / "checkpoint-2" / "deita_run.json").exists():
            return False
        if "second" not in state:
            state["second"] = subprocess.run(
                [sys.executable, "-m", "deita_hub", *args],
                cwd=ROOT,
                env=_env(),
                capture_output=True,
                text=True,
            )
        return True

    code, stderr = interrupt(
        args, ROOT, first_checkpoint_then_second_training, signal.SIGTERM, deadline_s=300
    )
    second = state["second"]
    assert second.returncode == 1 and f"{out} is in use: a training" in second.stderr, second.stderr[-2000:]
    _ends_cleanly(code, stderr, signal.SIGTERM)
    assert not (out / "final").exists()
    resumed = subprocess.run(
        [sys.executable, "-m", "deita_hub", *args[:-8], "--max-steps", "4", *args[-6:], "--resume"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0 and "resumed from checkpoint-" in resumed.stdout, resumed.stderr[-3000:]


# --- full disk ---------------------------------------------------------------------------------------------------


@contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `folder` for the test (needs root and mount permission; skipped with the
    reason otherwise)."""
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs."""
    with tmpfs(tmp_path / "disk", "2m") as folder:
        yield folder


def fill(disk: Path, leave_bytes: int) -> None:
    """Fill the file system but `leave_bytes`."""
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))


def test_disk_full_build_keeps_the_previous_dataset(tmp_path, small_disk, cli_run):
    make_pool(tmp_path)
    recipe = write_recipe(tmp_path)
    out = small_disk / "out"
    assert cli_run("build", recipe, "--out", out, "--cache-dir", tmp_path / "cache", "-q").returncode == 0
    before = listing(out)
    fill(small_disk, 4096)
    result = cli_run("build", recipe, "--out", out, "--cache-dir", tmp_path / "cache", "--overwrite", "-q")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}: no space left on the device"), line
    assert listing(out) == before and _hidden_leftovers(small_disk) == []


def test_disk_full_writers_keep_the_previous_file(small_disk):
    from deita_hub.io import write_rows, write_text

    target = small_disk / "answers.jsonl"
    write_text(target, "previous\n")
    fill(small_disk, 4096)
    with pytest.raises(
        DeitaHubError, match=r"answers\.jsonl: no space left .*the previous answers\.jsonl is unchanged"
    ):
        write_rows([{"text": "x" * 1000} for _ in range(100)], target)
    assert target.read_text() == "previous\n" and sorted(p.name for p in small_disk.iterdir()) == [
        "answers.jsonl",
        "filler",
    ]


def test_disk_full_embedding_cache_is_one_line(tmp_path, small_disk, cli_run):
    """A build whose embedding cache lies on a full disk: one line, no dataset, no cache entry."""
    _build_inputs(tmp_path, rows=40)
    fill(small_disk, 2048)
    result = cli_run(
        "build",
        "recipe.yaml",
        "--out",
        tmp_path / "out",
        "-q",
        cwd=tmp_path,
        env={"DEITA_HUB_CACHE": str(small_disk / "cache")},
    )
    assert (
        result.returncode == 1
        and "no space left on the device" in result.stderr
        and "Traceback" not in result.stderr
    ), result.stderr
    assert _error_lines(result.stderr)[-1].startswith(f"error: {small_disk}/cache/embeddings/"), result.stderr
    assert not (tmp_path / "out").exists()
    # no finished cache entry; a `.partial` matrix is resumable progress, kept by design
    assert [p.name for p in small_disk.glob("cache/embeddings/*.npy") if ".partial" not in p.name] == []


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.startswith("error")]


def test_disk_full_embedding_matrix_is_reserved_before_a_row_is_written(tmp_path, small_disk):
    """`embed` reserves its matrix's blocks first: on a nearly full disk that is a one-line error, not a SIGBUS
    (exit -7, no message) from a sparse memmap whose pages find no room, and nothing is left on the disk."""
    rows = [{"conversations": conversation(i)} for i in range(600)]  # 600 x 384 float32: 0.9 MiB
    write_jsonl(tmp_path / "pool.jsonl", rows)
    fill(small_disk, 256 * 1024)
    out = small_disk / "emb.npy"
    result = subprocess.run(
        [sys.executable, "-m", "deita_hub", "embed", "pool.jsonl", "--out", str(out), "--max-length", "32"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = _error_lines(result.stderr)
    assert len(errors) == 1 and errors[0].startswith(f"error: {out}.partial.npy: no space left"), errors
    assert "MiB free" in errors[0] and "the matrix needs 0.9 MiB" in errors[0]
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.slow
def test_disk_full_checkpoint_is_removed_and_the_previous_one_kept(tmp_path):
    """A training whose next checkpoint finds no room: one line naming it and the space left, exit 1; that
    checkpoint's half-written folder is gone (it must not look resumable) and the previous one is as it was."""
    from test_training import varied_conversations, write_pool

    from deita_hub.training.trainer import is_complete

    pool = write_pool(tmp_path / "pool.jsonl", varied_conversations(12))
    # the tiny base model (~20 MiB) is built into the output folder; a checkpoint is ~4 MiB (its tokenizer.json)
    with tmpfs(tmp_path / "disk", "48m") as disk:
        out = disk / "run"
        args = [
            "train", "tiny-cpu.yaml", "--dataset", str(pool), "--output-dir", str(out), "--max-steps", "400",
            "--set", "save_steps=1", "--set", "per_device_train_batch_size=1", "--set", "total_train_batch_size=1",
        ]  # fmt: skip
        process = subprocess.Popen(
            [sys.executable, "-m", "deita_hub", *args],
            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 300
            while not (out / "checkpoint-2").exists():  # checkpoint-1 is complete, record and card written
                assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-3000:]
                time.sleep(0.02)
            process.send_signal(signal.SIGSTOP)  # fill the disk while the next save waits
            previous = listing(out / "checkpoint-1")
            fill(disk, 256 * 1024)
            process.send_signal(signal.SIGCONT)
            stderr = process.communicate(timeout=300)[1]
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        errors = _error_lines(stderr)
        assert len(errors) == 1 and errors[0].startswith(f"error: {out}/checkpoint-"), errors
        assert "no space left" in errors[0] and "MiB free" in errors[0], errors
        assert errors[0].endswith("with --resume (checkpoint-1 is complete and kept)"), errors
        failed = Path(errors[0].split()[1].rstrip(":"))
        assert not failed.exists() and all(is_complete(p) for p in out.glob("checkpoint-*"))
        assert listing(out / "checkpoint-1") == previous
        assert not (out / "final").exists() and _hidden_leftovers(disk) == []


def test_disk_full_eval_answers_keep_nothing_partial(tmp_path, small_disk, tiny_model_dir, cli_run):
    out = small_disk / "evals"
    fill(small_disk, 2048)
    result = cli_run("eval", tiny_model_dir, "--suite", "loss", "--dataset", HELD_OUT, "--out", out)
    assert (
        result.returncode == 1
        and "no space left on the device" in result.stderr
        and "Traceback" not in result.stderr
    ), result.stderr
    assert not (out / "results.json").exists()


def test_disk_full_in_a_library_that_names_no_file_is_one_line(cli_run):
    """torch and pyarrow may fail for lack of space without naming the file: one line, no made-up path."""
    import errno

    import click

    from deita_hub.cli import cli

    @cli.command("fill-the-disk")
    def fill_the_disk():
        raise OSError(errno.ENOSPC, "No space left on device")

    try:
        result = cli_run("fill-the-disk")
    finally:
        cli.commands.pop("fill-the-disk")
    assert isinstance(fill_the_disk, click.Command)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: a write ran out of space ([Errno 28] No space left on device); free some space or write "
        "elsewhere, then run the command again"
    ]


# --- the README's table --------------------------------------------------------------------------------------

CONCURRENT = [
    test_two_builds_sharing_one_cache_agree_and_embed_once,
    test_two_trainings_into_one_folder_the_second_refuses_then_sigterm_then_resume,
    "test_push.py::test_two_pushes_at_once_land_whole_or_fail_clearly",
]
DISK_FULL = [
    test_disk_full_build_keeps_the_previous_dataset,
    test_disk_full_writers_keep_the_previous_file,
    test_disk_full_embedding_cache_is_one_line,
    test_disk_full_embedding_matrix_is_reserved_before_a_row_is_written,
    test_disk_full_checkpoint_is_removed_and_the_previous_one_kept,
    test_disk_full_eval_answers_keep_nothing_partial,
    test_disk_full_in_a_library_that_names_no_file_is_one_line,
]


def _parametrized(test, name: str) -> int:
    return sum(
        len(mark.args[1]) for mark in getattr(test, "pytestmark", []) if mark.args and mark.args[0] == name
    )


def reliability_counts() -> dict[str, int]:
    """The README table's figures, counted from the tests' own parametrizations."""
    import test_properties as properties
    from test_push import PERMANENT, TRANSIENT, test_two_pushes_at_once_land_whole_or_fail_clearly

    interrupts = [test for name, test in globals().items() if name.startswith("test_interrupted_")]
    generated = [
        test for name, test in vars(properties).items() if name.startswith("test_") and callable(test)
    ]
    assert callable(test_two_pushes_at_once_land_whole_or_fail_clearly)  # the case CONCURRENT names exists
    return {
        "Malformed input": len(MALFORMED),
        "Generated input": sum(
            properties.EXAMPLES * max(1, _parametrized(test, "suffix")) for test in generated
        ),
        # each SIGINT/SIGTERM pair, plus the SIGTERM of the slow training test
        "Interrupts": sum(_parametrized(test, "sig") for test in interrupts) + 1,
        "Concurrent runs": len(CONCURRENT),
        "Full disk": len(DISK_FULL),
        "Hub faults": len(TRANSIENT) + len(PERMANENT),
    }


def test_readme_reliability_table_matches_the_suite():
    section = (ROOT / "README.md").read_text().split("## Reliability\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if len(cells) == 3 and cells[1].isdigit():
            table[cells[0].split(":")[0].split(",")[0]] = int(cells[1])
    assert table == reliability_counts()
