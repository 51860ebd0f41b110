"""Recipe -> Hub-layout folder -> datasets.load_dataset, for every config; atomic writes; bad recipes."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from deita_hub.conversations import FormatSpec
from deita_hub.dataset import build
from deita_hub.embedding import EmbedConfig, embed_pool, load_embeddings
from deita_hub.errors import DeitaHubError
from deita_hub.pool import read_pool
from deita_hub.recipes import load_recipe
from tests.test_selection import reference_select

ROOT = Path(__file__).resolve().parents[1]


def make_pool(tmp_path, n=120, seed=0, dim=24):
    """A ShareGPT pool with per-turn scores and aligned random clustered embeddings."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        turns = int(rng.integers(1, 3))
        conv = []
        for t in range(turns):
            conv += [
                {"from": "human", "value": f"q{i}.{t} " + "x" * int(rng.integers(1, 40))},
                {"from": "gpt", "value": f"a{i}.{t} " + "y" * int(rng.integers(1, 200))},
            ]
        rows.append(
            {
                "id": f"row-{i}",
                "conversations": conv,
                "source": "test",
                "complexity_scores": [float(rng.integers(1, 6)) for _ in range(turns)],
                "quality_scores": [float(rng.integers(1, 6)) for _ in range(turns)],
            }
        )
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    centers = rng.normal(size=(5, dim))
    emb = (centers[rng.integers(0, 5, n)] + rng.normal(scale=0.6, size=(n, dim))).astype(np.float32)
    np.save(tmp_path / "emb.npy", emb)
    return rows, emb


def write_recipe(tmp_path, **overrides):
    recipe = {
        "name": "test-set",
        "pool": {"sources": ["pool.jsonl"]},
        "embedding": {"path": "emb.npy"},
        "selection": {"max_similarity": 0.9},
        "configs": [
            {"name": "small", "method": "deita", "budget": 20},
            {"name": "big", "method": "deita", "budget": 50, "default": True},
            {"name": "random-50", "method": "random", "budget": 50, "seed": 3},
            {"name": "score-50", "method": "score", "budget": 50},
            {"name": "longest-50", "method": "longest", "budget": 50},
        ],
        "card": {"license": "mit", "pretty_name": "Test set"},
        **overrides,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def load_in_fresh_process(folder, config):
    code = (
        "import datasets, json, sys; ds = datasets.load_dataset(sys.argv[1], sys.argv[2], split='train'); "
        "print(json.dumps({'names': datasets.get_dataset_config_names(sys.argv[1]), 'rows': ds.to_list()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), config],
        capture_output=True,
        text=True,
        check=True,
        env={
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PATH": "/usr/bin:/bin",
            "HOME": str(folder.parent),
        },
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_build_round_trips_every_config(tmp_path):
    rows, emb = make_pool(tmp_path)
    out = tmp_path / "built"
    result = build(write_recipe(tmp_path), out, cache_dir=tmp_path / "cache", progress=False)
    scores = np.array([np.dot(r["complexity_scores"], r["quality_scores"]) for r in rows])
    expected = {
        "small": reference_select(emb, scores, 20, 0.9),
        "big": reference_select(emb, scores, 50, 0.9),
        "score-50": sorted(range(len(rows)), key=lambda i: (-scores[i], i))[:50],
        "random-50": np.random.default_rng(3).permutation(len(rows))[:50].tolist(),
    }
    lengths = [sum(len(t["value"]) for t in r["conversations"] if t["from"] == "gpt") for r in rows]
    expected["longest-50"] = sorted(range(len(rows)), key=lambda i: (-lengths[i], i))[:50]
    for config, positions in expected.items():
        loaded = load_in_fresh_process(out, config)
        assert loaded["names"] == ["small", "big", "random-50", "score-50", "longest-50"]
        got = loaded["rows"]
        assert [r["id"] for r in got] == [rows[i]["id"] for i in positions], config
        assert [r["pool_row"] for r in got] == positions
        assert [r["selection_rank"] for r in got] == list(range(len(positions)))
        assert got[0]["conversations"] == rows[positions[0]]["conversations"]
        assert got[0]["complexity_scores"] == rows[positions[0]]["complexity_scores"]
        if config != "random-50" and config != "longest-50":
            assert [r["evol_score"] for r in got] == pytest.approx([scores[i] for i in positions])
    big = load_in_fresh_process(out, "big")["rows"]
    assert big[0]["nearest_selected_row"] is None and big[0]["nearest_selected_similarity"] is None
    assert all(r["nearest_selected_similarity"] <= 0.9 for r in big[1:])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet")) == sorted(
        f"{c}/train-00000-of-00001.parquet" for c in expected
    )
    record = json.loads((out / "deita_build.json").read_text())
    assert record == result.record | {"recipe": record["recipe"]} and record["pool"]["num_valid_rows"] == 120
    assert str(tmp_path) not in (out / "deita_build.json").read_text()  # no absolute paths in provenance
    card = (out / "README.md").read_text()
    assert "config_name: big\n  default: true" in card and "num_examples: 50" in card
    assert "![Score distributions" in card and (out / "assets" / "scores.png").stat().st_size > 1000
    assert record["pool"]["fingerprint"] in card


def test_rebuild_is_byte_identical_and_needs_overwrite(tmp_path):
    make_pool(tmp_path)
    recipe = write_recipe(tmp_path)
    build(recipe, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    build(recipe, tmp_path / "b", cache_dir=tmp_path / "cache", progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with pytest.raises(DeitaHubError, match="exists and is not empty"):
        build(recipe, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    build(recipe, tmp_path / "a", overwrite=True, cache_dir=tmp_path / "cache", progress=False)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("layout", ["sharegpt", "openai"])
def test_a_streamed_pool_builds_the_same_bytes_reading_only_the_rows_it_keeps(tmp_path, monkeypatch, layout):
    """A large pool's turns stay in its file (`deita_hub.pool`): the build reads the kept rows' turns from it and
    writes what a build of the pool held whole writes, byte for byte."""
    import deita_hub.pool as pool_module

    rows, _ = make_pool(tmp_path)
    if layout == "openai":  # subsets of a non-ShareGPT pool gain a ShareGPT column made from the turns read
        roles = {"human": "user", "gpt": "assistant"}
        for row in rows:
            row["messages"] = [
                {"role": roles[t["from"]], "content": t["value"]} for t in row.pop("conversations")
            ]
        (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(tmp_path)
    build(recipe, tmp_path / "whole", cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(pool_module, "_STREAM_MIN_BYTES", 0)
    monkeypatch.setattr(pool_module, "_STREAM_BLOCK_BYTES", 4096)
    asked = []
    real = pool_module.PoolFile.column
    monkeypatch.setattr(
        pool_module.PoolFile,
        "column",
        lambda file, positions=None: asked.append(positions) or real(file, positions),
    )
    build(recipe, tmp_path / "streamed", cache_dir=tmp_path / "cache", progress=False)
    assert asked and all(positions is not None and len(positions) <= 50 for positions in asked)
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "streamed") for p in (tmp_path / "streamed").rglob("*") if p.is_file()
    )
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import deita_hub.dataset as dataset

    make_pool(tmp_path)
    recipe = write_recipe(tmp_path)

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dataset, "dataset_card", boom)  # dies after the parquet files are written
    with pytest.raises(KeyboardInterrupt):
        build(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_skipped_invalid_rows_are_written_and_counted(tmp_path):
    rows, _ = make_pool(tmp_path)
    broken = list(rows)
    broken[7] = {**rows[7], "conversations": [{"from": "human", "value": "unanswered"}]}
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in broken))
    np.save(tmp_path / "emb.npy", np.load(tmp_path / "emb.npy")[np.arange(120) != 7])
    recipe = write_recipe(tmp_path, pool={"sources": ["pool.jsonl"], "on_invalid": "skip"})
    out = tmp_path / "out"
    build(recipe, out, cache_dir=tmp_path / "cache", progress=False)
    invalid = [json.loads(line) for line in (out / "invalid_rows.jsonl").read_text().splitlines()]
    assert invalid == [
        {"row": 7, "field": "conversations[0]", "reason": invalid[0]["reason"], "source": "pool.jsonl"}
    ]
    assert "1 invalid rows skipped" in (out / "README.md").read_text()
    pool_rows = load_in_fresh_process(out, "score-50")["rows"]
    assert 7 not in [r["pool_row"] for r in pool_rows]


def test_alpaca_pool_gains_sharegpt_conversations(tmp_path):
    rows = [{"instruction": f"do {i}", "input": "", "response": "done " * (i + 1)} for i in range(30)]
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    recipe = {
        "name": "a",
        "pool": {"sources": ["alpaca.json"]},
        "configs": [{"name": "longest-5", "method": "longest", "budget": 5}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    build(tmp_path / "r.yaml", tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    got = load_in_fresh_process(tmp_path / "out", "longest-5")["rows"]
    assert [r["instruction"] for r in got] == [f"do {i}" for i in (29, 28, 27, 26, 25)]
    assert got[0]["conversations"] == [
        {"from": "human", "value": "do 29"},
        {"from": "gpt", "value": rows[29]["response"]},
    ]
    assert got[0]["evol_score"] is None


def test_missing_scores_are_an_error_naming_rows(tmp_path):
    rows, _ = make_pool(tmp_path)
    for r in rows[3:6]:
        del r["quality_scores"]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DeitaHubError, match=r"3 row\(s\) have no 'quality_scores' \(rows 3, 4, 5\)"):
        build(write_recipe(tmp_path), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()


def test_misaligned_embeddings_are_an_error(tmp_path):
    make_pool(tmp_path)
    np.save(tmp_path / "emb.npy", np.ones((10, 4), dtype=np.float32))
    with pytest.raises(DeitaHubError, match="10 embedding rows but the pool has 120"):
        build(write_recipe(tmp_path), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    np.save(tmp_path / "emb.npy", np.ones((120, 4), dtype=np.int32))
    with pytest.raises(DeitaHubError, match="expected float32 or float16"):
        build(write_recipe(tmp_path), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "red"}, "unknown key\\(s\\) 'colour'"),
        ({"name": ""}, "'name'"),
        ({"configs": []}, "'configs' must be a non-empty list"),
        ({"configs": [{"name": "a b", "budget": 5}]}, "config name 'a b'"),
        ({"configs": [{"name": "a", "budget": 5}, {"name": "a", "budget": 6}]}, "duplicate config name"),
        (
            {
                "configs": [
                    {"name": "a", "budget": 5, "default": True},
                    {"name": "b", "budget": 6, "default": True},
                ]
            },
            "only one config may be the default",
        ),
        ({"configs": [{"name": "a", "budget": -1}]}, "configs\\[0\\]: 'budget'"),
        ({"configs": [{"name": "a", "budget": 5, "topk": 3}]}, "configs\\[0\\]: unknown key"),
        ({"pool": {"sources": ["pool.jsonl"], "format": {"format": "xml"}}}, "unknown pool format"),
        ({"pool": {"sources": ["pool.jsonl"], "shuffle": True}}, "pool: unknown key"),
        ({"pool": {}}, "either 'sources' or 'generate: demo'"),
        ({"embedding": {"method": "tfidf"}}, "embedding: 'method' must be one of"),
    ],
)
def test_bad_recipes_name_the_key(tmp_path, change, message):
    make_pool(tmp_path)
    with pytest.raises(DeitaHubError, match=message):
        load_recipe(write_recipe(tmp_path, **change))


def test_packaged_recipes_parse():
    for path in sorted((ROOT / "dataset_scripts").glob("*.yaml")):
        recipe = load_recipe(path)
        assert recipe.subsets and sum(s.default for s in recipe.subsets) == 1


def test_build_push_then_load_by_tag_in_a_fresh_process(tmp_path, hub_env, hub_server, hub_token):
    """`deita-hub build RECIPE --push REPO --tag v1.0`, then load_dataset(repo, config, revision=tag) elsewhere."""
    rows, _ = make_pool(tmp_path)
    recipe = write_recipe(tmp_path)
    env = {**hub_env, "DEITA_HUB_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "deita_hub", "build", str(recipe), "--out", str(tmp_path / "out")]
    pushed = subprocess.run(
        [*command, "--push", "org/test-set", "--tag", "v1.0"], capture_output=True, text=True, env=env
    )
    assert pushed.returncode == 0, pushed.stderr
    assert "tag v1.0" in pushed.stdout and hub_token not in pushed.stdout + pushed.stderr
    code = (
        "import datasets, json, sys; print(json.dumps({c: [r['id'] for r in datasets.load_dataset('org/test-set', c, "
        "split='train', revision='v1.0')] for c in datasets.get_dataset_config_names('org/test-set', revision='v1.0')}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=hub_env)
    assert loaded.returncode == 0, loaded.stderr
    remote = json.loads(loaded.stdout.strip().splitlines()[-1])
    local = {c: [r["id"] for r in load_in_fresh_process(tmp_path / "out", c)["rows"]] for c in remote}
    assert remote == local and set(remote) == {"small", "big", "random-50", "score-50", "longest-50"}
    history = hub_server.history("org/test-set")
    assert len(history) == 2  # the repo's initial commit, then the whole release in one commit
    probe = (
        "from deita_hub.hub import read_json_file as r; "
        "print(r('org/test-set', 'deita_build.json', repo_type='dataset', revision='v1.0')['name'], "
        "r('org/test-set', 'absent.json', repo_type='dataset'), r('org/nope', 'deita_build.json', repo_type='dataset'))"
    )
    read = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=hub_env)
    assert read.stdout.split() == ["test-set", "None", "None"], read.stderr


def test_build_scores_and_embeds_what_is_missing_with_deita_models(tmp_path):
    """A recipe naming scorer models and Deita's last-token embedder: build scores the unscored rows and embeds."""
    from deita_hub.testing.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama", "llama", seed=1)
    rows, _ = make_pool(tmp_path, n=24)
    for row in rows[:10]:  # the first ten rows lack scores: build scores them with the models
        del row["complexity_scores"], row["quality_scores"]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_recipe(
        tmp_path,
        scores={
            "complexity": {"model": str(model), "batch_size": 4},
            "quality": {"model": str(model), "batch_size": 4},
        },
        embedding={"method": "last-token", "model": str(model), "batch_size": 4, "max_length": 128},
        selection={"max_similarity": 0.999},
        configs=[{"name": "deita-8", "method": "deita", "budget": 8}],
    )
    result = build(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    record = result.record
    assert set(record["scores"]["scored_here"]) == {"complexity", "quality"}
    assert record["scores"]["scored_here"]["complexity"]["rows_scored_by_build"] == 10
    assert (
        record["embedding"]["method"] == "last-token"
        and record["embedding"]["pooling"] == "last non-pad token"
    )
    got = load_in_fresh_process(tmp_path / "out", "deita-8")["rows"]
    assert len(got) == 8
    evol = [r["evol_score"] for r in got]
    assert evol == sorted(evol, reverse=True) and all(1.0 <= e for e in evol)


def test_build_push_with_a_bad_token_fails_before_building(tmp_path, hub_env):
    make_pool(tmp_path)
    env = {**hub_env, "HF_TOKEN": "hf_wrong_token_for_this_test", "DEITA_HUB_CACHE": str(tmp_path / "cache")}
    command = [
        sys.executable,
        "-m",
        "deita_hub",
        "build",
        str(write_recipe(tmp_path)),
        "--out",
        str(tmp_path / "out"),
    ]
    result = subprocess.run([*command, "--push", "org/x"], capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "error:" in result.stderr and "HF_TOKEN" in result.stderr
    assert "hf_wrong_token_for_this_test" not in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_card_of_a_baseline_only_build_says_what_was_done(tmp_path):
    make_pool(tmp_path)
    recipe = write_recipe(
        tmp_path,
        configs=[
            {"name": "random-50", "method": "random", "budget": 50, "seed": 3},
            {"name": "longest-50", "method": "longest", "budget": 50},
        ],
    )
    build(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False, repo_id="org/baselines")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "selected with **Deita**" not in card and "baseline methods only (random, longest)" in card
    assert "Selected evol scores" not in card  # built without scores: no empty table
    assert "![Response length distributions" in card and "Score distributions" not in card
    assert "- `random`: a seeded random sample;" in card and "`deita`: the combined" not in card
    assert 'load_dataset("org/baselines", "random-50", split="train")' in card


def test_card_of_a_deita_build_names_its_baselines_and_shows_scores(tmp_path):
    make_pool(tmp_path)
    build(write_recipe(tmp_path), tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    card = (tmp_path / "out" / "README.md").read_text()
    assert (
        "selected with **Deita**" in card
        and "Baseline subsets (random, score, longest) ship beside it" in card
    )
    assert "### Selected evol scores" in card and "| `big` |" in card
    assert 'load_dataset("<this repo or folder>", "big", split="train")' in card  # not pushed: no repo id


def test_embeddings_survive_added_score_columns_and_a_typed_format(tmp_path):
    """The bug of issue 17: an .npy of `embed POOL` must be accepted for the same conversations, whatever columns
    the pool gained or however its format is spelled; other conversations are refused."""
    rows = [{"instruction": f"task {i}", "input": "", "response": "done " * i} for i in range(1, 9)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = read_pool(tmp_path / "pool.jsonl")

    class Lengths:  # a deterministic embedder: what is checked here is the sidecar, not the vectors
        def encode(self, conversations):
            return np.array([[len(c[-1]["content"]), 1.0] for c in conversations], dtype=np.float32)

        def metadata(self):
            return {"method": "test", "model": "lengths", "max_length": 0, "truncation_side": "none"}

    path, _ = embed_pool(
        pool.conversations,
        tmp_path / "emb.npy",
        EmbedConfig(),
        pool_provenance=pool.provenance(),
        embedder=Lengths(),
    )
    scored = [{**r, "complexity_scores": [2.0], "quality_scores": [3.0]} for r in rows]
    (tmp_path / "scored.jsonl").write_text("".join(json.dumps(r) + "\n" for r in scored))
    typed = read_pool(tmp_path / "scored.jsonl", FormatSpec(format="alpaca", output_field="response"))
    load_embeddings(path, num_rows=len(typed), conversations_fingerprint=typed.conversations_fingerprint)
    recipe = write_recipe(
        tmp_path,
        pool={"sources": ["scored.jsonl"], "format": {"format": "alpaca", "output_field": "response"}},
        configs=[{"name": "d", "method": "deita", "budget": 4}],
    )
    result = build(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert result.record["subsets"][0]["rows"] >= 1
    other = [{**r, "response": r["response"] + "!"} for r in rows]
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    changed = read_pool(tmp_path / "other.jsonl")
    with pytest.raises(DeitaHubError, match="other conversations"):
        load_embeddings(
            path, num_rows=len(changed), conversations_fingerprint=changed.conversations_fingerprint
        )


def test_subset_rows_are_taken_a_batch_at_a_time():
    import pyarrow as pa

    from deita_hub.pool import take_rows

    table = pa.Table.from_batches(
        [pa.record_batch({"id": list(range(i, i + 5)), "x": [[i]] * 5}) for i in range(0, 20, 5)]
    )
    positions = np.random.default_rng(0).permutation(20)[:12]
    assert take_rows(table, positions).equals(table.take(pa.array(positions)))
    assert take_rows(table, np.array([], dtype=np.int64)).num_rows == 0
