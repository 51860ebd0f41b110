"""The tokenized-data cache (`deita_hub.training.token_cache`), one test per rule: a second run on the same inputs
tokenizes nothing and gets the same ids and counts; a change of tokenizer vocabulary, chat template, max_length,
batching or data never reuses an entry; two processes at once tokenize once; an incomplete or damaged entry is
tokenized again. The tokenizer is the offline Llama-2 one; no model is built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE
from deita_hub.tiny import llama2_tokenizer
from deita_hub.training import data as training_data
from deita_hub.training.config import TrainConfig
from deita_hub.training.data import load_train_data
from deita_hub.training.token_cache import ENTRY_RECORD

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 80  # a short exchange is ~50 tokens: the long reply is truncated, the long question dropped


def conversations() -> list[list[dict]]:
    rows = [
        [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": f"{2 * i}."}]
        for i in range(4)
    ]
    rows.append(
        [{"from": "human", "value": "Tell me a story."}, {"from": "gpt", "value": "Once upon a time " * 10}]
    )
    rows.append([{"from": "human", "value": "Repeat: " + "yes " * 40}, {"from": "gpt", "value": "No."}])
    return rows


def write_pool(path: Path, rows: list[list[dict]]) -> Path:
    path.write_text("".join(json.dumps({"conversations": turns}) + "\n" for turns in rows), encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DEITA_HUB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokenized"


@pytest.fixture
def config(tmp_path) -> TrainConfig:
    return TrainConfig(
        dataset=str(write_pool(tmp_path / "pool.jsonl", conversations())),
        max_length=MAX_LENGTH,
        per_device_train_batch_size=2,
        total_train_batch_size=2,
        eval_ratio=0.25,
        bf16=False,
    )


def counting_tokenizer():
    """The Llama-2 tokenizer with its `apply_chat_template` calls counted."""
    tokenizer = llama2_tokenizer()
    real = tokenizer.apply_chat_template
    calls = []

    def apply_chat_template(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    tokenizer.apply_chat_template = apply_chat_template
    return tokenizer, calls


def refusing_tokenizer():
    tokenizer = llama2_tokenizer()

    def apply_chat_template(*args, **kwargs):
        raise AssertionError("tokenized although the cache holds these ids")

    tokenizer.apply_chat_template = apply_chat_template
    return tokenizer


def entries(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if path.is_dir()) if cache.is_dir() else []


def same_data(a, b) -> None:
    assert a.train.features == b.train.features
    assert a.train[:] == b.train[:]
    assert (a.eval is None) == (b.eval is None) and (a.eval is None or a.eval[:] == b.eval[:])
    counts = ("num_conversations", "num_truncated", "num_dropped", "num_tokens")
    assert [getattr(a, name) for name in counts] == [getattr(b, name) for name in counts]


def test_second_run_reads_the_cache_tokenizes_nothing_and_keeps_the_counts(config, cache, caplog, tmp_path):
    caplog.set_level("INFO", logger="deita_hub")
    first = load_train_data(config, llama2_tokenizer())
    assert (first.num_truncated, first.num_dropped) == (2, 1) and len(first.train) + len(first.eval) == 5
    (entry,) = entries(cache)
    assert f"tokenized data: wrote cache {entry.name[:12]} (5 conversations, " in caplog.text
    caplog.clear()

    second = load_train_data(config, refusing_tokenizer())
    same_data(first, second)
    reused = [r.getMessage() for r in caplog.records if "reused cache" in r.getMessage()]
    assert reused == [
        f"tokenized data: reused cache {entry.name[:12]} (5 conversations, {first.num_tokens} tokens)"
    ]
    assert "2 of 6 conversations are longer than max_length 80 and were truncated (1 dropped" in caplog.text
    written = (entry / ENTRY_RECORD).read_text()
    assert str(tmp_path) not in written and json.loads(written)["inputs"]["max_length"] == MAX_LENGTH

    off = replace(config, tokenized_cache=False)
    tokenizer, calls = counting_tokenizer()
    same_data(first, load_train_data(off, tokenizer))
    assert len(calls) == 6 and len(entries(cache)) == 1


def _new_vocabulary(config, tokenizer, monkeypatch):
    tokenizer.add_tokens(["<deita-extra>"])
    return config


def _new_template(config, tokenizer, monkeypatch):
    monkeypatch.setattr(
        training_data, "VICUNA_CHAT_TEMPLATE", VICUNA_CHAT_TEMPLATE.replace("'USER: '", "'User: '")
    )
    return config


def _new_max_length(config, tokenizer, monkeypatch):
    return replace(config, max_length=MAX_LENGTH + 1)


def _new_batching(config, tokenizer, monkeypatch):
    return replace(config, padding_free=False)  # padding-free -> padded


def _new_data(config, tokenizer, monkeypatch):
    rows = conversations()
    rows[0][1]["value"] = "Zero."
    return replace(config, dataset=str(write_pool(Path(config.dataset).with_name("changed.jsonl"), rows)))


@pytest.mark.parametrize(
    "change",
    [_new_vocabulary, _new_template, _new_max_length, _new_batching, _new_data],
    ids=lambda f: f.__name__[5:],
)
def test_a_changed_input_never_reuses_an_entry(config, cache, monkeypatch, change):
    first = load_train_data(config, llama2_tokenizer())
    tokenizer, calls = counting_tokenizer()
    changed = change(config, tokenizer, monkeypatch)
    second = load_train_data(changed, tokenizer)
    assert len(calls) == 6 and len(entries(cache)) == 2
    if change in (_new_template, _new_data):
        assert second.train[:] != first.train[:]


@pytest.mark.parametrize("damage", ["no completion record", "truncated arrow file"])
def test_an_incomplete_or_damaged_entry_is_tokenized_again(config, cache, caplog, damage):
    first = load_train_data(config, llama2_tokenizer())
    (entry,) = entries(cache)
    if damage == "no completion record":
        (entry / ENTRY_RECORD).unlink()
    else:
        (arrow,) = (entry / "dataset").glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[:100])
    tokenizer, calls = counting_tokenizer()
    again = load_train_data(config, tokenizer)
    assert len(calls) == 6 and "ignoring the cache entry" in caplog.text
    same_data(first, again)
    assert (entry / ENTRY_RECORD).is_file()  # replaced by a whole entry
    same_data(first, load_train_data(config, refusing_tokenizer()))


def test_dpo_pairs_are_cached_with_their_counts(tmp_path, cache):
    def turns(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    rows = [
        {
            "prompt": f"Say {w}.",
            "chosen": turns(f"Say {w}.", f"{w}!"),
            "rejected": turns(f"Say {w}.", "No. " * n),
        }
        for w, n in (("yes", 1), ("hello", 1), ("blue", 30))
    ]
    pool = tmp_path / "prefs.jsonl"
    pool.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = TrainConfig(stage="dpo", dataset=str(pool), max_length=60, bf16=False)
    first = load_train_data(config, llama2_tokenizer())
    assert (
        first.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"] and first.num_truncated == 1
    )
    same_data(first, load_train_data(config, refusing_tokenizer()))


def contend(dataset: str, meeting: Path) -> dict:
    """Load `dataset` as one of two processes: each marks its arrival at the cache in `meeting`, and whichever
    tokenizes waits until the other has arrived too, so that without the lock both would tokenize."""
    import datasets  # noqa: F401  (its first import takes longer than a tokenization: made before the race)

    from deita_hub.training import token_cache

    config = TrainConfig(dataset=dataset, max_length=MAX_LENGTH, bf16=False)
    tokenizer, calls = counting_tokenizer()
    counted, cache_key = tokenizer.apply_chat_template, token_cache.cache_key

    def arrive(inputs):
        (meeting / str(os.getpid())).touch()
        return cache_key(inputs)

    def tokenize_once_both_arrived(*args, **kwargs):
        deadline = time.monotonic() + 120
        while len(list(meeting.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        return counted(*args, **kwargs)

    tokenizer.apply_chat_template = tokenize_once_both_arrived
    token_cache.cache_key = arrive
    try:
        data = load_train_data(config, tokenizer)
    finally:
        token_cache.cache_key = cache_key
    return {"calls": len(calls), "input_ids": data.train[:]["input_ids"]}


def test_two_processes_at_once_tokenize_once(cache, tmp_path):
    """A child process and this one load the same data at once: one tokenizes, the other waits on the lock and
    reads what the first wrote."""
    dataset = str(write_pool(tmp_path / "pool.jsonl", conversations()))
    meeting = tmp_path / "meeting"
    meeting.mkdir()
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); from test_token_cache import contend; "
        f"from pathlib import Path; print(json.dumps(contend({dataset!r}, Path({str(meeting)!r}))))"
    )
    env = {**os.environ, "DEITA_HUB_CACHE": str(cache.parent), "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    here = contend(dataset, meeting)
    out, err = child.communicate(timeout=180)
    assert child.returncode == 0, err
    there = json.loads(out.splitlines()[-1])
    assert sorted([here["calls"], there["calls"]]) == [0, 6]
    assert here["input_ids"] == there["input_ids"]
    assert len(entries(cache)) == 1
