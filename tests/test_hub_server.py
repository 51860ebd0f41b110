"""The Hub-compatible test server, over raw HTTP: auth, commits, LFS, tree/resolve, refs, persistence, faults.

The real clients are exercised against it in test_push.py; here each endpoint's contract is checked directly
(stdlib http.client, so nothing here depends on the environment huggingface_hub was imported with).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from deita_hub.testing.hub import HubServer, git_blob_sha1, lfs_pointer

TOKEN = "hf_servertest0123456789abcdef"
OTHER = "hf_otheruser0123456789abcdef"


@pytest.fixture
def server(tmp_path):
    with HubServer(tmp_path / "root", tokens={TOKEN: "alice", OTHER: "bob"}) as hub:
        yield hub


def call(hub, method, path, body=None, *, token=TOKEN, headers=None):
    """(status, headers, body bytes); `body` dict/list -> JSON, bytes -> raw."""
    conn = http.client.HTTPConnection("127.0.0.1", hub.port, timeout=10)
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.headers, data


def create(hub, name="org/ds", repo_type="dataset", private=False, token=TOKEN):
    ns, repo = name.split("/")
    return call(hub, "POST", "/api/repos/create", {"name": repo, "organization": ns, "type": repo_type,
                                                    "private": private}, token=token)  # fmt: skip


def commit(hub, repo="org/ds", ops=(), parent=None, branch="main", token=TOKEN):
    header = {"summary": "test commit", "description": ""}
    if parent:
        header["parentCommit"] = parent
    lines = [{"key": "header", "value": header}, *ops]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    return call(hub, "POST", f"/api/datasets/{repo}/commit/{quote(branch, safe='')}", body, token=token,
                headers={"Content-Type": "application/x-ndjson"})  # fmt: skip


def add(path, data: bytes):
    return {
        "key": "file",
        "value": {"path": path, "content": base64.b64encode(data).decode(), "encoding": "base64"},
    }


def head(hub, repo="org/ds", rev="main"):
    status, _, body = call(hub, "GET", f"/api/datasets/{repo}/revision/{quote(rev, safe='')}")
    assert status == 200, body
    return json.loads(body)["sha"]


def test_auth_private_repos_and_whoami(server):
    assert call(server, "GET", "/api/whoami-v2")[0] == 200
    assert json.loads(call(server, "GET", "/api/whoami-v2")[2])["name"] == "alice"
    assert call(server, "GET", "/api/whoami-v2", token=None)[0] == 401
    assert create(server, token=None)[0] == 401
    status, hdrs, _ = create(server, token="hf_wrong")
    assert status == 401 and hdrs["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert create(server, "bob/mine", token=TOKEN)[0] == 403  # another user's namespace
    assert create(server)[0] == 200
    status, _, body = create(server)
    assert status == 409 and json.loads(body)["url"].endswith("/datasets/org/ds")

    # public: readable without a token, but a wrong token is refused everywhere
    assert call(server, "GET", "/api/datasets/org/ds", token=None)[0] == 200
    assert call(server, "GET", "/api/datasets/org/ds", token="hf_wrong")[0] == 401
    assert commit(server, ops=[add("a.txt", b"a")], token=None)[0] == 401

    # private: looks absent without a token (401 RepoNotFound) and to a user who may not read it (404)
    assert create(server, "alice/secret", private=True)[0] == 200
    assert commit(server, "alice/secret", ops=[add("a.txt", b"secret")])[0] == 200
    for path in ("/api/datasets/alice/secret", "/datasets/alice/secret/resolve/main/a.txt",
                 "/api/datasets/alice/secret/tree/main"):  # fmt: skip
        status, hdrs, body = call(server, "GET", path, token=None)
        assert (
            status == 401
            and hdrs["X-Error-Code"] == "RepoNotFound"
            and b"secret" not in body.replace(b"alice/secret", b"")
        )
        status, hdrs, _ = call(server, "GET", path, token=OTHER)
        assert status == 404 and hdrs["X-Error-Code"] == "RepoNotFound"
        assert call(server, "GET", path)[0] == 200
    assert json.loads(call(server, "GET", "/api/datasets/alice/secret")[2])["private"] is True


def test_commit_tree_paths_info_and_resolve_ranges(server):
    assert create(server)[0] == 200
    initial = head(server)
    assert re.fullmatch(r"[0-9a-f]{40}", initial)
    readme = b"---\nconfigs:\n- config_name: a\n---\n# card\n"
    status, _, body = commit(server, ops=[add("README.md", readme), add("a/x.txt", b"0123456789"),
                                          add("a/b/y.txt", b"y")], parent=initial)  # fmt: skip
    assert status == 200, body
    first = json.loads(body)["commitOid"]
    assert head(server) == first and json.loads(body)["commitUrl"].endswith(
        f"/datasets/org/ds/commit/{first}"
    )

    # parentCommit must be the head: a stale parent is refused and changes nothing
    status, _, _ = commit(server, ops=[add("z.txt", b"z")], parent=initial)
    assert status == 412 and head(server) == first
    status, hdrs, _ = commit(server, ops=[{"key": "deletedFile", "value": {"path": "nope.txt"}}])
    assert status == 404 and hdrs["X-Error-Code"] == "EntryNotFound"

    status, _, body = call(server, "GET", "/api/datasets/org/ds/tree/main?recursive=true")
    entries = {e["path"]: e for e in json.loads(body)}
    assert set(entries) == {".gitattributes", "README.md", "a", "a/x.txt", "a/b", "a/b/y.txt"}
    assert entries["a"]["type"] == "directory" and entries["a/x.txt"]["oid"] == git_blob_sha1(b"0123456789")
    assert entries["a/x.txt"]["size"] == 10 and "lfs" not in entries["a/x.txt"]
    status, _, body = call(server, "GET", "/api/datasets/org/ds/tree/main/a")
    assert sorted(e["path"] for e in json.loads(body)) == ["a/b", "a/x.txt"]
    status, _, body = call(
        server, "GET", f"/api/datasets/org/ds/tree/main/{quote('a/b', safe='')}?expand=true"
    )
    [entry] = json.loads(body)
    assert entry["path"] == "a/b/y.txt" and entry["lastCommit"]["id"] == first
    status, hdrs, _ = call(server, "GET", "/api/datasets/org/ds/tree/main/missing")
    assert status == 404 and hdrs["X-Error-Code"] == "EntryNotFound"
    status, _, body = call(server, "POST", "/api/datasets/org/ds/paths-info/main", b"paths=a%2Fx.txt&paths=a&paths=no",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert [e["path"] for e in json.loads(body)] == ["a/x.txt", "a"]

    status, hdrs, body = call(server, "HEAD", "/datasets/org/ds/resolve/main/a/x.txt")
    assert status == 200 and body == b"" and hdrs["X-Repo-Commit"] == first
    assert hdrs["ETag"] == f'"{git_blob_sha1(b"0123456789")}"' and hdrs["Content-Length"] == "10"
    assert hdrs["Accept-Ranges"] == "bytes"
    status, hdrs, body = call(
        server, "GET", "/datasets/org/ds/resolve/main/a/x.txt", headers={"Range": "bytes=2-4"}
    )
    assert (status, body, hdrs["Content-Range"]) == (206, b"234", "bytes 2-4/10")
    assert (
        call(server, "GET", "/datasets/org/ds/resolve/main/a/x.txt", headers={"Range": "bytes=-3"})[2]
        == b"789"
    )
    assert (
        call(server, "GET", "/datasets/org/ds/resolve/main/a/x.txt", headers={"Range": "bytes=20-"})[0] == 416
    )
    status, hdrs, _ = call(server, "HEAD", "/datasets/org/ds/resolve/main/org.py")
    assert status == 404 and hdrs["X-Error-Code"] == "EntryNotFound" and hdrs["X-Repo-Commit"] == first
    status, hdrs, _ = call(server, "HEAD", "/datasets/org/ds/resolve/nobranch/a/x.txt")
    assert status == 404 and hdrs["X-Error-Code"] == "RevisionNotFound"
    status, hdrs, _ = call(server, "GET", "/api/datasets/org/nothere")
    assert status == 404 and hdrs["X-Error-Code"] == "RepoNotFound"

    # deletedFolder removes a whole folder; earlier commits keep their files
    status, _, body = commit(server, ops=[{"key": "deletedFolder", "value": {"path": "a/"}}])
    assert status == 200
    assert set(server.files("org/ds")) == {".gitattributes", "README.md"}
    assert call(server, "GET", f"/datasets/org/ds/resolve/{first}/a/b/y.txt")[2] == b"y"


def test_lfs_preupload_batch_upload_and_commit(server):
    assert create(server)[0] == 200
    data = os.urandom(3000)
    sha256 = hashlib.sha256(data).hexdigest()
    files = [{"path": "d/train-00000-of-00001.parquet", "sample": "", "size": len(data)},
             {"path": "deita_build.json", "sample": "", "size": 12},
             {"path": "assets/scores.png", "sample": "", "size": 10}]  # fmt: skip
    status, _, body = call(server, "POST", "/api/datasets/org/ds/preupload/main", {"files": files})
    modes = {f["path"]: (f["uploadMode"], f["shouldIgnore"], f["oid"]) for f in json.loads(body)["files"]}
    assert modes == {
        "d/train-00000-of-00001.parquet": ("lfs", False, None),
        "deita_build.json": ("regular", False, None),
        "assets/scores.png": ("lfs", False, None),
    }
    batch = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": sha256, "size": len(data)}]}
    status, hdrs, body = call(server, "POST", "/datasets/org/ds.git/info/lfs/objects/batch", batch)
    assert status == 200 and hdrs["Content-Type"] == "application/vnd.git-lfs+json"
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    upload_path = href.split(f"127.0.0.1:{server.port}", 1)[1]
    # the upload URL is pre-signed: no token needed, but a tampered signature or wrong content is refused
    assert call(server, "PUT", upload_path.replace("sig=", "sig=0"), data, token=None)[0] == 403
    assert call(server, "PUT", upload_path, data[:-1] + b"x", token=None)[0] == 400
    lfs_op = {"key": "lfsFile", "value": {"path": "d/train-00000-of-00001.parquet", "algo": "sha256",
                                          "oid": sha256, "size": len(data)}}  # fmt: skip
    assert commit(server, ops=[lfs_op])[0] == 422  # never uploaded
    assert call(server, "PUT", upload_path, data, token=None)[0] == 200
    status, _, body = call(server, "POST", "/datasets/org/ds.git/info/lfs/objects/batch", batch)
    assert "actions" not in json.loads(body)["objects"][0]  # already stored
    status, _, body = commit(server, ops=[lfs_op])
    assert status == 200, body

    status, _, body = call(server, "GET", "/api/datasets/org/ds/tree/main/d")
    [entry] = json.loads(body)
    assert entry["lfs"] == {
        "oid": sha256,
        "size": len(data),
        "pointerSize": len(lfs_pointer(sha256, len(data))),
    }
    assert entry["oid"] == git_blob_sha1(lfs_pointer(sha256, len(data)))
    status, hdrs, body = call(server, "GET", "/datasets/org/ds/resolve/main/d/train-00000-of-00001.parquet")
    assert body == data and hdrs["ETag"] == f'"{sha256}"'
    # preupload now reports the remote oid (sha256 for LFS), which is how clients skip unchanged files
    status, _, body = call(server, "POST", "/api/datasets/org/ds/preupload/main", {"files": files[:1]})
    assert json.loads(body)["files"][0]["oid"] == sha256


def test_branches_tags_refs_revisions_and_commits(server):
    assert create(server)[0] == 200
    status, _, body = commit(server, ops=[add("a.txt", b"1")])
    one = json.loads(body)["commitOid"]
    assert call(server, "POST", "/api/datasets/org/ds/branch/dev", {})[0] == 200
    assert call(server, "POST", "/api/datasets/org/ds/branch/dev", {})[0] == 409
    status, _, body = commit(server, ops=[add("a.txt", b"2")], branch="dev")
    two = json.loads(body)["commitOid"]
    assert call(server, "POST", f"/api/datasets/org/ds/tag/{two}", {"tag": "v1.0", "message": "r"})[0] == 200
    assert call(server, "POST", "/api/datasets/org/ds/tag/main", {"tag": "v1.0"})[0] == 409
    for rev in ("v1.0", "refs/tags/v1.0", "dev", "refs/heads/dev", two, two[:7]):
        assert head(server, rev=rev) == two, rev
    assert head(server) == one
    assert call(server, "GET", "/api/datasets/org/ds/revision/v9")[1]["X-Error-Code"] == "RevisionNotFound"
    refs = json.loads(call(server, "GET", "/api/datasets/org/ds/refs")[2])
    assert {b["name"]: b["targetCommit"] for b in refs["branches"]} == {"main": one, "dev": two}
    assert refs["tags"] == [{"name": "v1.0", "ref": "refs/tags/v1.0", "targetCommit": two}]
    history = json.loads(call(server, "GET", "/api/datasets/org/ds/commits/dev")[2])
    assert [c["id"] for c in history][:2] == [two, one] and history[0]["authors"] == [
        {"user": "alice", "avatar": None}
    ]
    assert call(server, "DELETE", "/api/datasets/org/ds/tag/v1.0")[0] == 200
    assert server.refs("org/ds")["tags"] == {}


def test_validate_yaml(server):
    good = {"content": "---\nconfigs:\n- config_name: a\n  data_files: a/*\n---\nbody", "repoType": "dataset"}
    status, _, body = call(server, "POST", "/api/validate-yaml", good)
    assert status == 200 and json.loads(body) == {"errors": [], "warnings": []}
    for content in ("---\nconfigs: [unclosed\n---\n", "---\nconfigs:\n- data_files: x\n---\n"):
        status, _, body = call(
            server, "POST", "/api/validate-yaml", {"content": content, "repoType": "dataset"}
        )
        assert status == 400 and json.loads(body)["errors"][0]["message"]


def test_state_survives_restart(tmp_path):
    root = tmp_path / "root"
    with HubServer(root, tokens={TOKEN: "alice"}) as hub:
        create(hub)
        sha = json.loads(commit(hub, ops=[add("a.txt", b"kept")])[2])["commitOid"]
        call(hub, "POST", f"/api/datasets/org/ds/tag/{sha}", {"tag": "v1"})
    with HubServer(root, tokens={TOKEN: "alice"}) as hub:
        assert head(hub, rev="v1") == sha
        assert call(hub, "GET", "/datasets/org/ds/resolve/v1/a.txt")[2] == b"kept"


def test_fault_injection(server):
    create(server)
    # N failures then success, with Retry-After
    server.add_fault("commit", status=429, retry_after=2, times=2)
    for _ in range(2):
        status, hdrs, _ = commit(server, ops=[add("a.txt", b"x")])
        assert status == 429 and hdrs["Retry-After"] == "2"
    assert commit(server, ops=[add("a.txt", b"x")])[0] == 200
    # permanent
    server.add_fault("tag", status=500, times=None)
    for _ in range(3):
        assert call(server, "POST", "/api/datasets/org/ds/tag/main", {"tag": "t"})[0] == 500
    server.clear_faults()
    assert call(server, "POST", "/api/datasets/org/ds/tag/main", {"tag": "t"})[0] == 200
    # dropped connection: no response at all, and nothing applied
    before = head(server)
    server.add_fault("commit", drop=True)
    with pytest.raises(http.client.RemoteDisconnected):
        commit(server, ops=[add("b.txt", b"b")])
    assert head(server) == before
    # 'after': the commit is applied, then the answer fails (the ambiguous case clients must handle)
    server.add_fault("commit", status=503, when="after")
    assert commit(server, ops=[add("b.txt", b"b")])[0] == 503
    assert head(server) != before and "b.txt" in server.files("org/ds")
    # delay: stalls past a client timeout
    server.add_fault("refs", delay=1.5)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=0.3)
    conn.request("GET", "/api/datasets/org/ds/refs")
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()

    # the same over the admin HTTP endpoint
    assert (
        call(server, "POST", "/_admin/faults", [{"endpoint": "resolve", "status": 502, "times": 1}])[0] == 200
    )
    assert call(server, "GET", "/datasets/org/ds/resolve/main/a.txt", token=None)[0] == 502
    assert call(server, "GET", "/datasets/org/ds/resolve/main/a.txt", token=None)[0] == 200
    faults = json.loads(call(server, "GET", "/_admin/faults")[2])
    assert faults[-1]["endpoint"] == "resolve" and faults[-1]["hits"] == 1
    assert call(server, "POST", "/_admin/faults", {"endpoint": "nope", "status": 500})[0] == 400
    assert call(server, "DELETE", "/_admin/faults")[0] == 200 and server.faults == []
    log = json.loads(call(server, "GET", "/_admin/requests")[2])
    assert [r["status"] for r in log if r["endpoint"] == "commit"] == [429, 429, 200, 0, 503]


def test_a_request_is_in_the_log_by_the_time_its_answer_arrives(server, monkeypatch):
    # A server thread preempted between answering and logging (a busy CI machine) is played by a slow log
    # write: a test that reads the log right after its client's answer must still find the request there.
    log_request = server._log_request

    def slow_log_request(*args):
        time.sleep(0.5)
        return log_request(*args)

    monkeypatch.setattr(server, "_log_request", slow_log_request)
    status, _, _ = call(server, "GET", "/api/datasets/org/no-such-repo")
    assert status == 404
    assert [(r["endpoint"], r["status"]) for r in server.requests] == [("repo_info", 404)]


def test_server_runs_as_a_module(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    env.pop("HF_TOKEN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deita_hub.testing.hub", "--port", "0", "--root", str(tmp_path / "r"),
         "--token", f"{TOKEN}=carol"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        assert "carol" in line and TOKEN not in line
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": f"Bearer {TOKEN}"})
        assert json.loads(conn.getresponse().read())["name"] == "carol"
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=10)[0]
    assert TOKEN not in out
    assert (tmp_path / "r" / "objects").is_dir()
    assert proc.returncode == 0  # exited cleanly on Ctrl-C
