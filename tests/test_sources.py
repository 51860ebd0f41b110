"""Where a pool source is looked for: a local path never goes to the Hub, a Hub id is checked with one quick
request, and an offline or unreachable Hub is a one-line error at once (no retries).

Messages are asserted, not timings; `pytest.mark.timeout` only guards against the old ~23 s of retries coming
back as a hang. Reads that need datasets to talk to the local Hub server run in a subprocess (datasets reads
HF_ENDPOINT at import, see deita_hub/testing/pytest_plugin.py).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deita_hub.errors import DeitaHubError
from deita_hub.hub import is_repo_id
from deita_hub.pool import read_pool

ROWS = [
    {"id": f"r{i}", "conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
    for i in range(4)
]


def closed_port() -> int:
    """A local port nothing listens on: connecting to it is refused at once (the "no route" case)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python(env: dict, code: str, timeout: float = 120) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def error_of(source, **kwargs) -> str:
    with pytest.raises(DeitaHubError) as caught:
        read_pool(source, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_names_that_read_as_paths_are_never_repo_ids():
    for path in ("data/nope.jsonl", "org/pool.parquet", "org/POOL.JSON", "./org", "../org/x", "~/x", "/org",
                 "a/b/c", "org/", "org\\x", "nope"):  # fmt: skip
        assert not is_repo_id(path), path
    for repo_id in ("org/deita-6k", "hkust-nlp/deita-10k-v0", "org/model.v2"):
        assert is_repo_id(repo_id), repo_id


@pytest.mark.timeout(30)
def test_a_missing_local_path_is_file_not_found_without_asking_the_hub(hub_server, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    for source in ("data/nope.jsonl", "nope.parquet", "./pools/x", "../x/y", "~/nope.json", "a/b/c",
                   str(tmp_path / "nope.json")):  # fmt: skip
        message = error_of(source)
        assert message.startswith("pool file not found: ") and source in message, message
    assert hub_server.requests == []  # not one request: a typo is not a Hub lookup


@pytest.mark.timeout(30)
def test_unreachable_hub_fails_at_once_naming_the_source(monkeypatch):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    message = error_of("org/typo-pool")
    assert message.startswith("org/typo-pool: cannot reach the Hub at " + endpoint), message
    assert "HF_ENDPOINT" in message and "local path" in message


@pytest.mark.timeout(30)
def test_missing_repo_or_revision_is_one_line(hub_server, hub_token, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub_server.url)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    message = error_of("org/no-such-pool")
    assert message == "org/no-such-pool: no Hub repo of that name (or it is private: check HF_TOKEN)"
    assert [r["endpoint"] for r in hub_server.requests] == ["repo_info"]  # one request, no retries


@pytest.mark.timeout(120)
def test_hub_pool_reads_then_reads_from_the_cache_offline(hub_server, hub_env, tmp_path):
    pool = tmp_path / "pool"
    (pool / "data").mkdir(parents=True)
    (pool / "data" / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    read = """
        import json, sys
        from deita_hub.errors import DeitaHubError
        from deita_hub.pool import read_pool

        def read(source, **kwargs):
            try:
                return read_pool(source, **kwargs).table.column("id").to_pylist()
            except DeitaHubError as exc:
                return str(exc)
        """
    online = python(
        hub_env,
        read
        + f"""
        from deita_hub.hub import push_folder
        push_folder("{pool}", "org/pool", repo_type="dataset", tag="v1")
        print(json.dumps({{"main": read("org/pool"), "v1": read("org/pool", revision="v1"),
                           "v9": read("org/pool", revision="v9")}}))
        """,
    )
    ids = [row["id"] for row in ROWS]
    assert online == {"main": ids, "v1": ids, "v9": "org/pool has no revision 'v9'"}

    hub_server.clear_requests()
    offline = python(
        {**hub_env, "HF_HUB_OFFLINE": "1"},
        read + 'print(json.dumps({"cached": read("org/pool"), "other": read("org/other")}))',
    )
    assert offline["cached"] == ids  # offline still reads what the cache holds
    assert offline["other"] == (
        "pool 'org/other': the Hub is offline (HF_HUB_OFFLINE is set) and this dataset is not in the local "
        "cache; give a local .json/.jsonl/.parquet file or a saved dataset folder instead"
    )
    assert hub_server.requests == []


def test_local_files_still_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("data").mkdir()
    Path("data/pool.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert read_pool("data/pool.jsonl").table.column("id").to_pylist() == [row["id"] for row in ROWS]
