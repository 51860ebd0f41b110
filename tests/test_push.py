"""`deita-hub push` and `deita_hub.hub` against the local Hub server, with the real clients in subprocesses.

Client code (the CLI, datasets, transformers) runs in a fresh process with `hub_env`, because those libraries
read HF_ENDPOINT / HF_TOKEN / HF_HOME at import (see deita_hub/testing/pytest_plugin.py).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deita_hub.hub import local_files

REPO = "org/deita-6k"


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _png(width: int = 4, height: int = 3) -> bytes:
    """A small valid PNG (grey gradient), built by hand so no imaging library is needed."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes((x * 40 + y * 20) % 256 for x in range(width)) for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "id": f"row-{offset + i}",
            "conversations": [
                {"from": "human", "value": f"question {offset + i}?"},
                {"from": "gpt", "value": f"answer {offset + i}."},
            ],
            "complexity": float(i) / 3,
        }
        for i in range(n)
    ]


def make_dataset_folder(path: Path, subsets: dict[str, list[dict]]) -> Path:
    """The layout `deita-hub build` writes: card with `configs:`, one parquet per subset, build record, plot."""
    configs = "".join(
        f"- config_name: {name}\n{'  default: true' + chr(10) if i == 0 else ''}"
        f"  data_files:\n  - split: train\n    path: {name}/train-*\n"
        for i, name in enumerate(subsets)
    )
    path.mkdir(parents=True)
    (path / "README.md").write_text(f"---\nlicense: mit\nconfigs:\n{configs}---\n# Deita test release\n")
    for name, rows in subsets.items():
        (path / name).mkdir()
        pq.write_table(pa.Table.from_pylist(rows), path / name / "train-00000-of-00001.parquet")
    (path / "deita_build.json").write_text(json.dumps({"subsets": {k: len(v) for k, v in subsets.items()}}))
    (path / "assets").mkdir()
    (path / "assets" / "scores.png").write_bytes(_png())
    return path


def deita_hub(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deita_hub", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def python(env: dict, code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def commits(hub_server, repo_id=REPO, repo_type="dataset", revision="main") -> list[str]:
    return [c["id"] for c in hub_server.history(repo_id, repo_type, revision)]


def scan_for(secret: str, outputs: list[str], folders: list[Path]) -> list[str]:
    """Where `secret` shows up: in process outputs or in any file under `folders`."""
    found = [f"output #{i}" for i, out in enumerate(outputs) if secret in out]
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file() and secret.encode() in path.read_bytes():
                found.append(str(path))
    return found


@pytest.fixture
def dataset_dir(tmp_path) -> tuple[Path, dict[str, list[dict]]]:
    subsets = {"6k": _rows(30), "10k": _rows(50, offset=100)}
    return make_dataset_folder(tmp_path / "build" / "deita-6k", subsets), subsets


# --------------------------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------------------------


def test_push_dataset_then_load_every_config_at_the_tag(hub_server, hub_env, hub_token, dataset_dir):
    folder, subsets = dataset_dir
    outputs = []
    # from a plain shell: HF_ENDPOINT + HF_TOKEN only; deita-hub turns Xet off itself for a local endpoint
    plain_env = {k: v for k, v in hub_env.items() if k != "HF_HUB_DISABLE_XET"}
    pushed = deita_hub(plain_env, "push", str(folder), REPO, "--tag", "v1.0")
    outputs += [pushed.stdout, pushed.stderr]
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed dataset org/deita-6k@main" in pushed.stdout and "tag v1.0" in pushed.stdout

    # one commit on top of the repo's initial one, holding every file; the tag points at it
    history = hub_server.history(REPO)
    assert len(history) == 2
    release = history[0]
    assert set(release["files"]) == {
        ".gitattributes", "README.md", "6k/train-00000-of-00001.parquet", "10k/train-00000-of-00001.parquet",
        "deita_build.json", "assets/scores.png",
    }  # fmt: skip
    assert hub_server.refs(REPO)["tags"] == {"v1.0": release["id"]}
    assert release["id"] in pushed.stdout
    assert [r["status"] for r in hub_server.requests if r["endpoint"] == "commit"] == [200]
    # large/binary files took the LFS route, small text files were inlined
    lfs = {p for p, info in release["files"].items() if info["lfs"]}
    assert lfs == {"6k/train-00000-of-00001.parquet", "10k/train-00000-of-00001.parquet", "assets/scores.png"}
    assert hub_server.files(REPO)["assets/scores.png"] == (folder / "assets" / "scores.png").read_bytes()

    loaded = python(
        hub_env,
        f"""
        import json
        from datasets import get_dataset_config_names, load_dataset
        out = {{"configs": sorted(get_dataset_config_names("{REPO}", revision="v1.0"))}}
        for name in out["configs"]:
            out[name] = load_dataset("{REPO}", name, revision="v1.0")["train"].to_list()
        print(json.dumps(out))
        """,
    )
    outputs += [loaded.stdout, loaded.stderr]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["configs"] == sorted(subsets)
    for name, rows in subsets.items():
        assert result[name] == rows

    # pushing the same folder again: no new commit, says so, the tag stays where it is
    again = deita_hub(hub_env, "push", str(folder), REPO, "--tag", "v1.0")
    outputs += [again.stdout, again.stderr]
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("unchanged:")
    assert commits(hub_server) == [c["id"] for c in history]
    assert hub_server.refs(REPO)["tags"] == {"v1.0": release["id"]}
    assert [r["status"] for r in hub_server.requests if r["endpoint"] == "commit"] == [200]

    # the token is in no output and no file: build folder, client cache, server store
    assert scan_for(hub_token, outputs, [folder, Path(hub_env["HF_HOME"]), hub_server.store.root]) == []


def test_dataset_push_to_hub_works_against_the_server(hub_server, hub_env):
    out = python(
        hub_env,
        """
        import json
        from datasets import Dataset, get_dataset_config_names, load_dataset
        Dataset.from_dict({"x": [1, 2, 3]}).push_to_hub("org/compat", config_name="small")
        Dataset.from_dict({"x": [4, 5, 6, 7]}).push_to_hub("org/compat", config_name="big")
        print(json.dumps({
            "configs": sorted(get_dataset_config_names("org/compat")),
            "small": list(load_dataset("org/compat", "small")["train"]["x"]),
            "big": list(load_dataset("org/compat", "big")["train"]["x"]),
        }))
        """,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {
        "configs": ["big", "small"],
        "small": [1, 2, 3],
        "big": [4, 5, 6, 7],
    }
    assert len(commits(hub_server, "org/compat")) == 3  # initial + one per push_to_hub call


def test_private_repo_is_unreadable_without_the_token(hub_server, hub_env, dataset_dir):
    folder, _ = dataset_dir
    pushed = deita_hub(hub_env, "push", str(folder), "org/secret", "--private")
    assert pushed.returncode == 0, pushed.stderr
    code = """
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError
        try:
            hf_hub_download("org/secret", "deita_build.json", repo_type="dataset")
        except RepositoryNotFoundError:
            print("not found")
        else:
            print("read")
        """
    anonymous = {k: v for k, v in hub_env.items() if k != "HF_TOKEN"}
    assert python(anonymous, code).stdout.strip() == "not found"
    assert python(hub_env, code).stdout.strip() == "read"


# --------------------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------------------


def test_push_tiny_model_then_from_pretrained_with_chat_template(hub_server, hub_env, tmp_path):
    # One process builds the model, pushes it with the CLI (in-process, same environment) and loads it back,
    # so torch and transformers are imported once.
    out = python(
        hub_env,
        f"""
        import json, torch
        from click.testing import CliRunner
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from deita_hub.cli import cli
        from deita_hub.testing.tiny import save_tiny_model

        folder = str(save_tiny_model("{tmp_path / "final"}"))
        pushed = CliRunner().invoke(cli, ["push", folder, "org/deita-tiny"])  # type detected from config.json
        assert pushed.exit_code == 0, pushed.output
        remote = AutoModelForCausalLM.from_pretrained("org/deita-tiny")
        local = AutoModelForCausalLM.from_pretrained(folder)
        messages = [{{"role": "user", "content": "Hello?"}}, {{"role": "assistant", "content": "Hi."}}]
        local_sd, remote_sd = local.state_dict(), remote.state_dict()
        print(json.dumps({{
            "output": pushed.output,
            "same": local_sd.keys() == remote_sd.keys() and all(torch.equal(local_sd[k], remote_sd[k]) for k in local_sd),
            "text": AutoTokenizer.from_pretrained("org/deita-tiny").apply_chat_template(messages, tokenize=False),
            "local": AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False),
        }}))
        """,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "pushed model org/deita-tiny@main" in result["output"]
    assert result["same"] is True
    assert "USER: Hello? ASSISTANT: Hi.</s>" in result["text"]
    assert result["text"] == result["local"]
    files = hub_server.history("org/deita-tiny", "model")[0]["files"]
    assert files["model.safetensors"]["lfs"] and not files["config.json"]["lfs"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(files)


# --------------------------------------------------------------------------------------------------------------
# reliability: faults at each endpoint
# --------------------------------------------------------------------------------------------------------------

# One push per kind of failure, with that failure at every endpoint at once: repo creation, preupload, LFS batch,
# LFS PUT, validate-yaml, commit, tag. "after" faults apply the request, then lose its answer: the ambiguous
# case where a retry must not create a second commit or trip over its own repo/tag.
TRANSIENT = {
    "http-500": [
        dict(endpoint="repo_create", status=500, times=2),
        dict(endpoint="preupload", status=500, retry_after=0),
        dict(endpoint="lfs_batch", status=500, retry_after=0),
        dict(endpoint="lfs_upload", status=500, retry_after=0),
        dict(endpoint="validate_yaml", status=502),
        dict(endpoint="commit", status=500, times=2),
        dict(endpoint="commit", status=503, when="after"),
        dict(endpoint="tag", status=500),
    ],
    "429-retry-after": [
        dict(endpoint="repo_create", status=429, retry_after=0.2),
        dict(endpoint="preupload", status=429, retry_after=0),
        dict(endpoint="lfs_batch", status=429, retry_after=0),
        dict(endpoint="lfs_upload", status=429, retry_after=0),
        dict(endpoint="commit", status=429, retry_after=1),
        dict(endpoint="tag", status=429, retry_after=0.2),
    ],
    "timeout": [
        dict(endpoint="repo_create", delay=3, when="after"),
        dict(endpoint="preupload", delay=3),
        dict(endpoint="lfs_batch", delay=3),
        dict(endpoint="lfs_upload", delay=3),
        # a stalled first try is applied late, after the retry landed: its pinned parent makes it a 412
        dict(endpoint="commit", delay=2),
        dict(endpoint="commit", delay=3, when="after"),
        dict(endpoint="tag", delay=3, when="after"),
    ],
    "dropped-connection": [
        dict(endpoint="repo_create", drop=True, when="after"),
        dict(endpoint="preupload", drop=True),
        dict(endpoint="lfs_batch", drop=True),
        dict(endpoint="lfs_upload", drop=True),
        dict(endpoint="commit", drop=True),
        dict(endpoint="commit", drop=True, when="after"),
        dict(endpoint="tag", drop=True, when="after"),
    ],
}


@pytest.mark.parametrize("faults", list(TRANSIENT.values()), ids=list(TRANSIENT))
def test_transient_faults_push_completes_with_one_commit(hub_server, hub_env, dataset_dir, faults):
    folder, _ = dataset_dir
    env = {**hub_env, "DEITA_HUB_HTTP_TIMEOUT": "1"}
    injected = [hub_server.add_fault(**fault) for fault in faults]
    result = deita_hub(env, "push", str(folder), REPO, "--tag", "v1")
    assert result.returncode == 0, result.stderr
    assert [f.endpoint for f in injected if f.hits == 0] == []  # every fault really fired
    assert hub_server.wait_idle()  # stalled requests have been handled too, so nothing lands after the checks
    history = hub_server.history(REPO)
    assert len(history) == 2, "exactly one commit on top of the initial one"
    assert hub_server.refs(REPO) == {"branches": {"main": history[0]["id"]}, "tags": {"v1": history[0]["id"]}}
    assert hub_server.files(REPO)["assets/scores.png"] == (folder / "assets" / "scores.png").read_bytes()
    commit_statuses = [r["status"] for r in hub_server.requests if r["endpoint"] == "commit"]
    if any(f["endpoint"] == "commit" and f.get("delay") and f.get("when") != "after" for f in faults):
        assert 412 in commit_statuses  # the late first try was refused, not applied a second time
    for fault in faults:
        if fault["endpoint"] == "commit" and fault.get("retry_after"):
            times = [r["time"] for r in hub_server.requests if r["endpoint"] == "commit"]
            assert times[1] - times[0] >= fault["retry_after"] * 0.9  # Retry-After was honoured


# The push before the fault made release v1; the failing push (new files, tag v2) must leave refs as they were.
PERMANENT = {
    "commit-500": dict(endpoint="commit", status=500, times=None),
    "commit-dropped": dict(endpoint="commit", drop=True, times=None),
    "commit-timeout": dict(endpoint="commit", delay=3, drop=True, times=None),  # stalls, never applies
    "commit-403": dict(endpoint="commit", status=403, times=None),
    # huggingface_hub retries these itself, 5 times; Retry-After: 0 keeps its waits at 1 s (dropped connections
    # would back off exponentially, 23 s in all).
    "preupload-500": dict(endpoint="preupload", status=500, retry_after=0, times=None),
    "lfs-put-500": dict(endpoint="lfs_upload", status=500, retry_after=0, times=None),
}


@pytest.mark.parametrize("fault", list(PERMANENT.values()), ids=list(PERMANENT))
def test_permanent_fault_fails_clearly_and_leaves_refs_unchanged(hub_server, hub_env, dataset_dir, fault):
    folder, _ = dataset_dir
    env = {**hub_env, "DEITA_HUB_HTTP_TIMEOUT": "1", "DEITA_HUB_RETRY_ATTEMPTS": "3"}
    first = deita_hub(env, "push", str(folder), REPO, "--tag", "v1")
    assert first.returncode == 0, first.stderr
    refs_before = hub_server.refs(REPO)
    # a new release for a v2 tag, with a new LFS file as well as a new regular one
    (folder / "deita_build.json").write_text('{"changed": true}')
    (folder / "assets" / "scores.png").write_bytes(_png(5, 5))

    injected = hub_server.add_fault(**fault)
    result = deita_hub(env, "push", str(folder), REPO, "--tag", "v2")
    assert result.returncode == 1
    assert injected.hits >= 1
    [error] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert REPO in error and "Traceback" not in result.stderr
    assert hub_server.refs(REPO) == refs_before
    if fault["endpoint"] == "commit" and fault.get("status") != 403:
        assert "gave up after 3 tries" in error and "unchanged" in error
        assert injected.hits == 3  # each try reached the server once: no extra, unguarded re-sends


def test_permanent_fault_on_repo_creation_leaves_no_repo(hub_server, hub_env, dataset_dir):
    folder, _ = dataset_dir
    hub_server.add_fault("repo_create", status=500, times=None)
    result = deita_hub({**hub_env, "DEITA_HUB_RETRY_ATTEMPTS": "3"}, "push", str(folder), REPO)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: creating dataset repo org/deita-6k (gave up after 3 tries)" in result.stderr
    assert hub_server.refs(REPO) is None


def test_permanent_tag_fault_leaves_the_release_untagged_and_a_rerun_tags_it(
    hub_server, hub_env, dataset_dir
):
    folder, _ = dataset_dir
    hub_server.add_fault("tag", status=500, times=None)
    result = deita_hub({**hub_env, "DEITA_HUB_RETRY_ATTEMPTS": "2"}, "push", str(folder), REPO, "--tag", "v1")
    assert result.returncode == 1
    assert "run the same push again to add the tag" in result.stderr
    assert hub_server.refs(REPO)["tags"] == {}
    hub_server.clear_faults()
    rerun = deita_hub(hub_env, "push", str(folder), REPO, "--tag", "v1")
    assert rerun.returncode == 0 and rerun.stdout.startswith("unchanged:")
    history = commits(hub_server)
    assert len(history) == 2 and hub_server.refs(REPO)["tags"] == {"v1": history[0]}


def test_existing_tag_is_never_moved(hub_server, hub_env, dataset_dir):
    folder, _ = dataset_dir
    assert deita_hub(hub_env, "push", str(folder), REPO, "--tag", "v1").returncode == 0
    refs = hub_server.refs(REPO)
    (folder / "deita_build.json").write_text("{}")
    result = deita_hub(hub_env, "push", str(folder), REPO, "--tag", "v1")
    assert result.returncode == 1 and "tag v1 already exists" in result.stderr
    assert hub_server.refs(REPO) == refs  # nothing pushed either


# --------------------------------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_a_clear_auth_error(hub_server, hub_env, hub_token, dataset_dir):
    folder, _ = dataset_dir
    wrong_token = "hf_wrong" + hub_token[8:][::-1]
    wrong = deita_hub({**hub_env, "HF_TOKEN": wrong_token}, "push", str(folder), REPO)
    assert wrong.returncode == 1
    assert (
        "rejected the token" in wrong.stderr
        and "HF_TOKEN" in wrong.stderr
        and "hf auth login" in wrong.stderr
    )
    assert wrong_token not in wrong.stdout + wrong.stderr and "Traceback" not in wrong.stderr

    missing = deita_hub({k: v for k, v in hub_env.items() if k != "HF_TOKEN"}, "push", str(folder), REPO)
    assert missing.returncode == 1
    assert "no Hugging Face token found" in missing.stderr and "hf auth login" in missing.stderr
    assert hub_server.refs(REPO) is None

    check = python(hub_env, "from deita_hub.hub import check_token; print(check_token())")
    assert check.stdout.strip() == "deita-tester" and hub_token not in check.stdout + check.stderr


# --------------------------------------------------------------------------------------------------------------
# existing repos: unrelated files, --delete-missing, branches
# --------------------------------------------------------------------------------------------------------------


def test_unrelated_remote_files_are_kept_unless_delete_missing(hub_server, hub_env, tmp_path):
    first = tmp_path / "first"
    (first / "data").mkdir(parents=True)
    (first / "data" / "a.txt").write_text("a1")
    (first / "notes.txt").write_text("unrelated")
    assert deita_hub(hub_env, "push", str(first), "org/mixed", "--type", "dataset").returncode == 0

    second = tmp_path / "second"
    (second / "data").mkdir(parents=True)
    (second / "data" / "a.txt").write_text("a2")
    (second / "new.txt").write_text("new")
    assert deita_hub(hub_env, "push", str(second), "org/mixed", "--type", "dataset").returncode == 0
    files = hub_server.files("org/mixed")
    assert files["data/a.txt"] == b"a2" and files["notes.txt"] == b"unrelated" and files["new.txt"] == b"new"

    result = deita_hub(hub_env, "push", str(second), "org/mixed", "--type", "dataset", "--delete-missing")
    assert result.returncode == 0, result.stderr
    assert set(hub_server.files("org/mixed")) == {".gitattributes", "data/a.txt", "new.txt"}
    assert len(commits(hub_server, "org/mixed")) == 4  # initial + one per push


def test_push_to_a_new_branch_leaves_main_alone(hub_server, hub_env, dataset_dir):
    folder, _ = dataset_dir
    assert deita_hub(hub_env, "push", str(folder), REPO).returncode == 0
    main = hub_server.refs(REPO)["branches"]["main"]
    (folder / "deita_build.json").write_text('{"draft": true}')
    result = deita_hub(hub_env, "push", str(folder), REPO, "--branch", "dev", "--message", "draft")
    assert result.returncode == 0, result.stderr
    refs = hub_server.refs(REPO)
    assert refs["branches"]["main"] == main
    dev = hub_server.history(REPO, revision="dev")
    assert dev[0]["title"] == "draft" and dev[1]["id"] == main
    assert hub_server.files(REPO, revision="dev")["deita_build.json"] == b'{"draft": true}'


def test_a_push_derived_from_an_older_head_is_refused(hub_server, hub_env, tmp_path):
    """A card read at one commit and pushed back after someone else committed: nothing is pushed."""
    first = tmp_path / "first"
    first.mkdir()
    (first / "README.md").write_text("# card v1\n")
    assert deita_hub(hub_env, "push", str(first), "org/card", "--type", "dataset").returncode == 0
    read_at = hub_server.refs("org/card", "dataset")["branches"]["main"]
    (first / "README.md").write_text("# card edited on the Hub\n")
    assert deita_hub(hub_env, "push", str(first), "org/card", "--type", "dataset").returncode == 0
    before = commits(hub_server, "org/card")

    result = python(
        hub_env,
        f"""
        from deita_hub.errors import DeitaHubError
        from deita_hub.hub import push_folder
        import pathlib
        folder = pathlib.Path({str(tmp_path / "mine")!r})
        folder.mkdir()
        (folder / "README.md").write_text("# card from v1 plus my section\\n")
        try:
            push_folder(folder, "org/card", repo_type="dataset", expected_head={read_at!r})
        except DeitaHubError as exc:
            print("refused:", exc)
        """,
    )
    assert "refused: org/card@main changed on the Hub" in result.stdout, result.stdout
    assert commits(hub_server, "org/card") == before
    assert hub_server.files("org/card")["README.md"] == b"# card edited on the Hub\n"


def test_push_folder_api_and_type_detection(tmp_path):
    from deita_hub.errors import DeitaHubError
    from deita_hub.hub import detect_repo_type, local_files

    folder = make_dataset_folder(tmp_path / "ds", {"a": _rows(2)})
    assert detect_repo_type(folder) == "dataset"
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.lock").write_text("")
    paths = [f.path_in_repo for f in local_files(folder, ignore_patterns=["*.png"])]
    assert paths == ["README.md", "a/train-00000-of-00001.parquet", "deita_build.json"]
    model = tmp_path / "model"
    model.mkdir()
    (model / "adapter_config.json").write_text("{}")
    assert detect_repo_type(model) == "model"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(DeitaHubError, match="--type"):
        detect_repo_type(tmp_path / "other")
    (folder / "deita_build.json").unlink()
    (folder / "README.md").write_text("---\nconfigs: [\n---\n")
    with pytest.raises(DeitaHubError, match="README.md"):
        detect_repo_type(folder)


# --------------------------------------------------------------------------------------------------------------
# concurrent pushes: whole commits only
# --------------------------------------------------------------------------------------------------------------


def test_two_pushes_at_once_land_whole_or_fail_clearly(hub_server, hub_env, tmp_path):
    """Two releases of different folders pushed to one repo at the same moment: one lands as one whole commit
    with its tag, the other fails with a one-line error and commits nothing; run again, it lands whole too."""
    folders = {
        "a": make_dataset_folder(tmp_path / "a", {"6k": _rows(20)}),
        "b": make_dataset_folder(tmp_path / "b", {"6k": _rows(30, offset=50), "10k": _rows(40)}),
    }
    (folders["a"] / "only-in-a.txt").write_text("a")
    # Each push's upload stalls 1.5 s, so both read the same head before either commits: a real race every time.
    hub_server.add_fault("preupload", delay=1.5, times=2)
    out = python(
        hub_env,
        f"""
        import json, threading
        from deita_hub.errors import DeitaHubError
        from deita_hub.hub import push_folder

        folders = {json.dumps({k: str(v) for k, v in folders.items()})}
        start, results = threading.Barrier(2), {{}}

        def push(name):
            start.wait()
            try:
                result = push_folder(folders[name], "{REPO}", tag="release-" + name, delete_missing=True)
                results[name] = {{"ok": True, "commit": result.commit_oid}}
            except DeitaHubError as exc:
                results[name] = {{"ok": False, "error": str(exc)}}

        threads = [threading.Thread(target=push, args=(name,)) for name in folders]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(json.dumps(results))
        """,
    )
    results = json.loads(out.stdout.strip().splitlines()[-1])
    [winner] = [name for name, result in results.items() if result["ok"]]
    [loser] = [name for name, result in results.items() if not result["ok"]]
    error = results[loser]["error"]
    assert "\n" not in error and REPO in error and "another writer" in error and "committed nothing" in error
    assert 412 in [r["status"] for r in hub_server.requests if r["endpoint"] == "commit"]

    def tree(commit: dict) -> dict[str, str]:
        return {p: info["sha256"] for p, info in commit["files"].items() if p != ".gitattributes"}

    def content(folder: Path) -> dict[str, str]:
        return {f.path_in_repo: f.sha256 for f in local_files(folder)}

    history = hub_server.history(REPO)
    assert [c["id"] for c in history[:1]] == [results[winner]["commit"]] and len(history) == 2
    assert tree(history[0]) == content(folders[winner])
    assert hub_server.refs(REPO)["tags"] == {
        f"release-{winner}": history[0]["id"]
    }  # no tag for the failed one

    # the failed release, run again, lands whole on top of the other one
    again = deita_hub(
        hub_env, "push", str(folders[loser]), REPO, "--tag", f"release-{loser}", "--delete-missing"
    )
    assert again.returncode == 0, again.stderr
    history = hub_server.history(REPO)
    assert len(history) == 3 and [tree(c) for c in history[:2]] == [
        content(folders[loser]),
        content(folders[winner]),
    ]
    assert hub_server.refs(REPO)["tags"] == {
        f"release-{winner}": history[1]["id"],
        f"release-{loser}": history[0]["id"],
    }


# --------------------------------------------------------------------------------------------------------------
# downloads
# --------------------------------------------------------------------------------------------------------------


def test_download_through_the_hub_module(hub_server, hub_env, hub_token, dataset_dir):
    folder, _ = dataset_dir
    assert deita_hub(hub_env, "push", str(folder), REPO, "--tag", "v1").returncode == 0
    hub_server.clear_requests()
    out = python(
        hub_env,
        f"""
        import json
        from deita_hub.errors import DeitaHubError
        from deita_hub.hub import NotOnHubError, download, read_json_file

        def attempt(repo_id, **kwargs):
            try:
                path = download(repo_id, repo_type="dataset", **kwargs)
            except NotOnHubError as exc:
                return {{"missing": exc.missing, "error": str(exc)}}
            except DeitaHubError as exc:
                return {{"error": str(exc)}}
            return {{"files": sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
                     if path.is_dir() else path.read_text()}}

        print(json.dumps({{
            "file": attempt("{REPO}", revision="v1", filename="deita_build.json"),
            "snapshot": attempt("{REPO}", allow_patterns=["*.json", "*.md"]),
            "no-file": attempt("{REPO}", filename="nope.json"),
            "no-repo": attempt("org/nope"),
            "no-revision": attempt("{REPO}", revision="v9"),
            "json": read_json_file("{REPO}", "deita_build.json", repo_type="dataset"),
            "json-absent": read_json_file("{REPO}", "nope.json", repo_type="dataset"),
        }}))
        """,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads(result["file"]["files"]) == json.loads((folder / "deita_build.json").read_text())
    assert result["snapshot"] == {"files": ["README.md", "deita_build.json"]}
    assert result["no-file"]["missing"] == "file" and result["no-file"]["error"].startswith(f"{REPO}: ")
    assert result["no-repo"] == {
        "missing": "repo",
        "error": "org/nope: no Hub repo of that name (or it is private: check HF_TOKEN)",
    }
    assert result["no-revision"] == {"missing": "revision", "error": f"{REPO} has no revision 'v9'"}
    assert result["json"] == json.loads((folder / "deita_build.json").read_text())
    assert result["json-absent"] is None
    assert hub_token not in out.stdout + out.stderr
    # a missing repo or revision is one request, never retried
    for missing in ("/api/datasets/org/nope", f"/api/datasets/{REPO}/revision/v9"):
        assert [r["status"] for r in hub_server.requests if r["path"].startswith(missing)] == [404]


@pytest.mark.timeout(60)
def test_download_fails_at_once_when_the_hub_is_unreachable_or_offline(hub_env, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"  # closed once the block ends: refused
    code = """
        import json
        from deita_hub.errors import DeitaHubError
        from deita_hub.training.merge import download_adapter
        try:
            download_adapter("org/adapter", "v1")
        except DeitaHubError as exc:
            print(json.dumps(str(exc)))
        """
    unreachable = json.loads(
        python({**hub_env, "HF_ENDPOINT": endpoint}, code).stdout.strip().splitlines()[-1]
    )
    assert unreachable.startswith(f"org/adapter@v1: cannot reach the Hub at {endpoint} (ConnectError")
    offline = json.loads(python({**hub_env, "HF_HUB_OFFLINE": "1"}, code).stdout.strip().splitlines()[-1])
    assert offline.startswith("org/adapter@v1: the Hub is offline (HF_HUB_OFFLINE is set)")
