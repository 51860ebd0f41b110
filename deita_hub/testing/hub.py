"""A Hugging Face Hub–compatible HTTP server for tests and offline dry runs (standard library + PyYAML).

The real Hub cannot be reached from CI, so the project points the *real* clients (huggingface_hub, datasets,
transformers) at this server with `HF_ENDPOINT`. It speaks what those clients use (see
`docs/hub-api.md` in the shared notes): repo creation and info, validate-yaml, preupload, the Git LFS batch API
and its upload URLs, NDJSON commits (with `parentCommit` checks), tree and paths-info listings, file
resolution with ranges, branches, tags, refs, commit history and whoami.

Run it by hand::

    python -m deita_hub.testing.hub --port 8765 --root /tmp/hub --token hf_local_test_token
    HF_ENDPOINT=http://127.0.0.1:8765 HF_TOKEN=hf_local_test_token HF_HUB_DISABLE_XET=1 \\
        deita-hub push build/deita-6k org/deita-6k --tag v1.0

State lives under `--root`: a content-addressed object store (`objects/<sha256>`) and, per repo, JSON refs and
one JSON file per commit holding its full file table, so a restarted server serves the same repos.

Auth: every `Authorization: Bearer <token>` must name a configured token (401 otherwise, on every endpoint).
Without a token, public repos are readable and nothing is writable. A user may write to its own namespace and
to any namespace that is not another configured user's name (treated as a shared organisation); private repos
are readable only by users who may write to them.

Faults for reliability tests are injected per endpoint (`Fault`), programmatically (`HubServer.add_fault`) or
over HTTP (`POST /_admin/faults` with a JSON fault or list of faults; `DELETE /_admin/faults` clears them).
`GET /_admin/requests` returns the request log (method, path, endpoint name, status). The admin endpoints take
no token: this server is for tests and binds to 127.0.0.1 by default.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
# Endpoint names used in the request log and by `Fault.endpoint`.
ENDPOINTS = (
    "whoami",
    "repo_create",
    "repo_delete",
    "repo_info",
    "validate_yaml",
    "preupload",
    "lfs_batch",
    "lfs_upload",
    "commit",
    "tree",
    "paths_info",
    "resolve",
    "branch",
    "tag",
    "refs",
    "commits",
    "agent_harnesses",
)
# Files matching these patterns go through LFS, as the Hub's default `.gitattributes` says; so does anything
# over `LFS_THRESHOLD_BYTES`. Parquet must be LFS: `Dataset.push_to_hub` deletes its temporary shard after
# uploading it out of band and would then fail to inline it in the commit.
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lz4", "*.mlmodel",
        "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl",
        "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip",
        "*.zst", "*.png", "*.jpg", "*.jpeg", "*.webp", "*.gif", "*.mp3", "*.wav", "*tfevents*",
    )
)  # fmt: skip
LFS_THRESHOLD_BYTES = 10 * 1024 * 1024
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports as `oid`/ETag for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


# --------------------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """One injected failure rule, matched per request by endpoint name (and optionally method/repo)."""

    endpoint: str = field(metadata={"help": f"Endpoint name, one of {', '.join(ENDPOINTS)}, or '*'."})
    status: int | None = field(default=None, metadata={"help": "Answer with this HTTP status instead."})
    retry_after: float | None = field(
        default=None, metadata={"help": "Retry-After header (seconds) to send."}
    )
    delay: float = field(
        default=0.0, metadata={"help": "Seconds to stall before answering (client timeouts)."}
    )
    drop: bool = field(default=False, metadata={"help": "Close the connection without any response."})
    times: int | None = field(
        default=1, metadata={"help": "Fail this many matching requests; None = always."}
    )
    when: str = field(
        default="before",
        metadata={
            "help": "'before': fail without touching state; 'after': apply the request, then fail its response "
            "(the ambiguous case: a commit that landed although the client saw an error)."
        },
    )
    method: str | None = field(default=None, metadata={"help": "Only requests with this HTTP method."})
    repo_id: str | None = field(default=None, metadata={"help": "Only requests for this repo id."})
    hits: int = field(default=0, metadata={"help": "How many requests this fault has failed so far."})

    def __post_init__(self) -> None:
        if self.endpoint != "*" and self.endpoint not in ENDPOINTS:
            raise ValueError(
                f"unknown endpoint {self.endpoint!r}; expected one of {', '.join(ENDPOINTS)} or '*'"
            )
        if self.when not in ("before", "after"):
            raise ValueError("Fault.when must be 'before' or 'after'")
        if self.status is None and not self.drop and not self.delay:
            raise ValueError("a Fault needs a status, drop=True or a delay")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Fault:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def matches(self, endpoint: str, method: str, repo_id: str | None) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.endpoint not in ("*", endpoint):
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.repo_id is None or self.repo_id == repo_id


class HttpError(Exception):
    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: dict | None = None, extra=None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}  # more fields of the JSON error body


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    file: Path | None = None  # stream this file's [start, end) instead of `body`
    start: int = 0
    end: int = 0


def _json(data: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}
    )


# --------------------------------------------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class HubStore:
    """Repos, refs and commits as JSON files plus a sha256-addressed object store, all under `root`.

    A commit records its parent and its whole file table `{path: {sha256, size, oid, lfs}}`; `oid` is the git
    blob id the Hub reports (of the content, or of the LFS pointer for LFS files).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        secret_file = self.root / "lfs_secret"
        if not secret_file.exists():
            _write_atomic(secret_file, secrets.token_hex(32).encode())
        self.lfs_secret = secret_file.read_bytes()

    # objects ---------------------------------------------------------------------------------------------------
    def object_path(self, sha256: str) -> Path:
        return self.root / "objects" / sha256[:2] / sha256

    def has_object(self, sha256: str, size: int | None = None) -> bool:
        path = self.object_path(sha256)
        return path.exists() and (size is None or path.stat().st_size == size)

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.has_object(sha256, len(data)):
            _write_atomic(self.object_path(sha256), data)
        return sha256

    def put_stream(self, chunks, *, expected_sha256: str, expected_size: int) -> None:
        """Store an uploaded LFS object, verifying its hash and size before it becomes visible."""
        target = self.object_path(expected_sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        digest, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".upload.")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
            if digest.hexdigest() != expected_sha256 or size != expected_size:
                raise HttpError(
                    400,
                    f"uploaded content has sha256 {digest.hexdigest()} and size {size}, expected "
                    f"{expected_sha256} and {expected_size}",
                )
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)

    def read_object(self, sha256: str) -> bytes:
        return self.object_path(sha256).read_bytes()

    # repos -----------------------------------------------------------------------------------------------------
    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / "repos" / repo_type / repo_id

    def repo_meta(self, repo_type: str, repo_id: str) -> dict | None:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        return json.loads(path.read_text()) if path.exists() else None

    def create_repo(self, repo_type: str, repo_id: str, *, private: bool, owner: str, author: str) -> bool:
        """Create a repo with an initial commit holding `.gitattributes`, as the Hub does. False if it exists."""
        with self.lock:
            if self.repo_meta(repo_type, repo_id) is not None:
                return False
            gitattributes = DEFAULT_GITATTRIBUTES.encode()
            sha256 = self.put_bytes(gitattributes)
            files = {
                ".gitattributes": {
                    "sha256": sha256,
                    "size": len(gitattributes),
                    "oid": git_blob_sha1(gitattributes),
                    "lfs": False,
                }
            }
            commit = self._write_commit(repo_type, repo_id, None, files, "initial commit", "", author)
            self.write_refs(repo_type, repo_id, {"branches": {"main": commit}, "tags": {}})
            meta = {"private": private, "owner": owner, "createdAt": _now()}
            _write_atomic(self.repo_dir(repo_type, repo_id) / "repo.json", json.dumps(meta).encode())
            return True

    def delete_repo(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            path = self.repo_dir(repo_type, repo_id)
            if not (path / "repo.json").exists():
                return False
            shutil.rmtree(path)
            return True

    def refs(self, repo_type: str, repo_id: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "refs.json").read_text())

    def write_refs(self, repo_type: str, repo_id: str, refs: dict) -> None:
        _write_atomic(self.repo_dir(repo_type, repo_id) / "refs.json", json.dumps(refs, indent=1).encode())

    def commit(self, repo_type: str, repo_id: str, sha: str) -> dict:
        return json.loads((self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json").read_text())

    def commit_ids(self, repo_type: str, repo_id: str) -> list[str]:
        return [p.stem for p in (self.repo_dir(repo_type, repo_id) / "commits").glob("*.json")]

    def _write_commit(self, repo_type, repo_id, parent, files, title, message, author) -> str:
        record = {
            "parents": [parent] if parent else [],
            "title": title,
            "message": message,
            "author": author,
            "date": _now(),
            "files": files,
        }
        # Commit ids are 40 hex like git's; the nonce keeps two identical commits in the same second distinct.
        payload = json.dumps({**record, "nonce": secrets.token_hex(8)}, sort_keys=True).encode()
        sha = hashlib.sha1(payload).hexdigest()
        record["id"] = sha
        _write_atomic(
            self.repo_dir(repo_type, repo_id) / "commits" / f"{sha}.json", json.dumps(record).encode()
        )
        return sha

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str | None:
        """Branch, tag, `refs/heads/x`, `refs/tags/x`, a full commit id or a unique prefix (>= 7 hex)."""
        refs = self.refs(repo_type, repo_id)
        if revision.startswith("refs/heads/"):
            return refs["branches"].get(revision[len("refs/heads/") :])
        if revision.startswith("refs/tags/"):
            return refs["tags"].get(revision[len("refs/tags/") :])
        if revision in refs["branches"]:
            return refs["branches"][revision]
        if revision in refs["tags"]:
            return refs["tags"][revision]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [c for c in self.commit_ids(repo_type, repo_id) if c.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def history(self, repo_type: str, repo_id: str, sha: str) -> list[dict]:
        out = []
        while sha:
            commit = self.commit(repo_type, repo_id, sha)
            out.append(commit)
            sha = commit["parents"][0] if commit["parents"] else None
        return out

    def apply_commit(
        self, repo_type, repo_id, branch, *, operations, title, message, author, parent_commit
    ) -> str:
        """Apply NDJSON operations on top of `branch`'s head atomically (under the store lock)."""
        with self.lock:
            refs = self.refs(repo_type, repo_id)
            if branch not in refs["branches"]:
                if self.resolve(repo_type, repo_id, branch) is not None:
                    raise HttpError(
                        400, f"Invalid rev id: '{branch}' is not a branch", code="RevisionNotFound"
                    )
                raise HttpError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = refs["branches"][branch]
            if parent_commit is not None and not (len(parent_commit) >= 7 and head.startswith(parent_commit)):
                raise HttpError(
                    412, f"A commit has happened since. Please refresh and try again. (head is {head})"
                )
            files = dict(self.commit(repo_type, repo_id, head)["files"])
            for kind, value in operations:
                path = value["path"]
                if kind == "file":
                    data = base64.b64decode(value["content"])
                    sha256 = self.put_bytes(data)
                    files[path] = {
                        "sha256": sha256,
                        "size": len(data),
                        "oid": git_blob_sha1(data),
                        "lfs": False,
                    }
                elif kind == "lfsFile":
                    sha256, size = value["oid"], int(value["size"])
                    if not self.has_object(sha256, size):
                        raise HttpError(422, f"LFS object {sha256} for '{path}' was never uploaded")
                    pointer = lfs_pointer(sha256, size)
                    files[path] = {"sha256": sha256, "size": size, "oid": git_blob_sha1(pointer), "lfs": True}
                elif kind == "deletedFile":
                    if path not in files:
                        raise HttpError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del files[path]
                elif kind == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HttpError(
                            404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    for p in doomed:
                        del files[p]
            sha = self._write_commit(repo_type, repo_id, head, files, title, message, author)
            refs["branches"][branch] = sha
            self.write_refs(repo_type, repo_id, refs)
            return sha

    def wipe(self) -> None:
        with self.lock:
            for child in ("objects", "repos"):
                shutil.rmtree(self.root / child, ignore_errors=True)
                (self.root / child).mkdir(parents=True)


# --------------------------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Route:
    endpoint: str
    repo_type: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    path: str = ""
    extra: str | None = None


def _valid_path(path: str) -> str:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HttpError(400, f"invalid path in repo: {path!r}")
    return path


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect
    server_version = "deita-hub-test-hub/1"
    hub: HubServer  # set on the subclass built per server

    def log_message(self, format, *args):  # noqa: A002 - signature from BaseHTTPRequestHandler
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    # body ------------------------------------------------------------------------------------------------------
    def _body_chunks(self, chunk_size: int = 1 << 20):
        """Yield the request body, Content-Length or chunked, so large uploads never sit in memory."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(chunk_size, remaining))
                    if not chunk:
                        return
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(chunk_size, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk

    def _read_body(self) -> bytes:
        if self._body is None:
            self._body = b"".join(self._body_chunks())
        return self._body

    def _json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError as exc:
            raise HttpError(400, f"request body is not JSON: {exc}") from None

    # dispatch --------------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        with self.hub._lock:
            self.hub._in_flight += 1
        try:
            self._dispatch_request()
        finally:
            with self.hub._lock:
                self.hub._in_flight -= 1

    def _dispatch_request(self) -> None:
        self._body: bytes | None = None
        self._logged: dict | None = None
        self._log_as: tuple[str, str, str | None] | None = None  # (path, endpoint, repo id) once routed
        method = self.command
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        status, endpoint, route = 500, "unknown", None
        self._log_as = (split.path, endpoint, None)
        try:
            route = self._route(method, split.path)
            endpoint = route.endpoint
            self._log_as = (split.path, endpoint, route.repo_id)
            if endpoint == "admin":
                response = self._admin(method, route)
                self._send(response)
                return
            fault = self.hub._take_fault(endpoint, method, route.repo_id)
            if endpoint != "lfs_upload" or fault is not None:
                self._read_body()  # a fault or a normal handler: the body must be consumed (keep-alive)
            if fault is not None and fault.when == "before":
                status = self._fail(fault)
                if status is None:  # a pure delay: carry on normally afterwards
                    response = self._handle(method, route)
                    status = response.status
                    self._send(response)
                return
            response = self._handle(method, route)
            if fault is not None:  # when == "after": the request took effect; now fail its answer
                status = self._fail(fault, response)
                return
            status = response.status
            self._send(response)
        except HttpError as err:
            status = err.status
            self._read_body_quietly()
            headers = {"X-Error-Message": err.message.replace("\n", " ")[:500], **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_quietly(_json({"error": err.message, **err.extra}, err.status, headers))
        except (BrokenPipeError, ConnectionResetError):
            status = 499  # the client went away (e.g. it timed out during an injected delay)
            self.close_connection = True
        except Exception as exc:  # a server bug: answer 500 with the reason so tests show it
            logger.exception("test hub server error on %s %s", method, self.path)
            status = 500
            self._read_body_quietly()
            self._send_quietly(_json({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500))
        finally:
            self._log(status)  # a dropped connection, or the final status of an answer logged as it went out

    def _send_quietly(self, response: Response) -> None:
        """Send an error answer to a client that may have given up already (a late answer after a delay)."""
        try:
            self._send(response)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _read_body_quietly(self) -> None:
        try:
            self._read_body()
        except Exception:
            self.close_connection = True

    def _fail(self, fault: Fault, response: Response | None = None) -> int | None:
        """Apply `fault`; returns the status sent, 0 for a dropped connection, None if it was only a delay."""
        if fault.delay:
            self.hub._stopping.wait(fault.delay)
        if fault.drop:
            self.close_connection = True
            return 0
        if fault.status is not None:
            message = f"injected fault on {fault.endpoint} ({fault.status})"
            headers = {"X-Error-Message": message}
            if fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            self._send(_json({"error": message}, fault.status, headers))
            return fault.status
        if response is not None:  # delay after applying: answer late (the client may have given up)
            self._send(response)
            return response.status
        return None

    def _log(self, status: int) -> None:
        """Log this request, or correct the status of its entry (an answer the client did not take)."""
        path, endpoint, repo_id = self._log_as
        if endpoint == "admin":
            return
        if self._logged is None:
            self._logged = self.hub._log_request(self.command, path, endpoint, status, repo_id)
        else:
            self._logged["status"] = status

    def _send(self, response: Response) -> None:
        # Logged before the first byte goes out: a client that has its answer finds its request in the log.
        self._log(response.status)
        body_len = (response.end - response.start) if response.file is not None else len(response.body)
        self.send_response(response.status)
        for key, value in response.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(body_len))
        self.end_headers()
        if self.command == "HEAD" or body_len == 0:
            return
        if response.file is None:
            self.wfile.write(response.body)
            return
        with open(response.file, "rb") as handle:
            handle.seek(response.start)
            remaining = body_len
            while remaining:
                chunk = handle.read(min(1 << 20, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)

    def _route(self, method: str, raw_path: str) -> _Route:
        # Split before unquoting: revisions arrive quoted with "/" as %2F and must stay one segment.
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        if segs[:1] == ["_admin"]:
            return _Route("admin", extra="/".join(segs[1:]))
        if segs[:1] == ["_lfs"] and len(segs) == 2 and method == "PUT":
            return _Route("lfs_upload", extra=segs[1])
        if segs[:1] == ["api"]:
            if segs[1:] == ["whoami-v2"]:
                return _Route("whoami")
            if segs[1:] == ["repos", "create"]:
                return _Route("repo_create")
            if segs[1:] == ["repos", "delete"]:
                return _Route("repo_delete")
            if segs[1:] == ["validate-yaml"]:
                return _Route("validate_yaml")
            if segs[1:] == ["agent-harnesses"]:
                return _Route("agent_harnesses")
            if len(segs) >= 4 and segs[1] in ("models", "datasets", "spaces"):
                repo_type, repo_id, rest = segs[1][:-1], f"{segs[2]}/{segs[3]}", segs[4:]
                if not rest:
                    return _Route("repo_info", repo_type, repo_id)
                action, revision = rest[0], (rest[1] if len(rest) > 1 else None)
                path = "/".join(rest[2:])
                names = {
                    "revision": "repo_info",
                    "preupload": "preupload",
                    "commit": "commit",
                    "tree": "tree",
                    "paths-info": "paths_info",
                    "branch": "branch",
                    "tag": "tag",
                    "refs": "refs",
                    "commits": "commits",
                }
                if action in names:
                    return _Route(names[action], repo_type, repo_id, revision, path)
            raise HttpError(404, f"unknown API route {raw_path}")
        repo_type = "model"
        if segs[:1] in (["datasets"], ["spaces"]):
            repo_type, segs = segs[0][:-1], segs[1:]
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"]:
            return _Route("lfs_batch", repo_type, f"{segs[0]}/{segs[1][: -len('.git')]}")
        if len(segs) >= 5 and segs[2] == "resolve":
            return _Route("resolve", repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HttpError(404, f"unknown route {raw_path}")

    # auth ------------------------------------------------------------------------------------------------------
    def _user(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HttpError(401, "Invalid credentials in Authorization header")
        return user

    def _may_write(self, user: str | None, repo_id: str) -> bool:
        namespace = repo_id.split("/")[0]
        if user is None:
            return False
        return namespace == user or namespace not in set(self.hub.tokens.values())

    def _repo(self, route: _Route, *, write: bool = False) -> dict:
        """The repo's metadata after the auth checks; private repos look absent to those who may not read them."""
        user = self._user()
        meta = self.hub.store.repo_meta(route.repo_type, route.repo_id)
        readable = meta is not None and (not meta["private"] or self._may_write(user, route.repo_id))
        if not readable:
            if user is None and (write or meta is not None):
                raise HttpError(401, "Unauthorized: a token is required", code="RepoNotFound")
            raise HttpError(404, f"Repository not found: {route.repo_id}", code="RepoNotFound")
        if write and not self._may_write(user, route.repo_id):
            if user is None:
                raise HttpError(401, "Unauthorized: a write token is required")
            raise HttpError(403, f"You don't have the rights to write to {route.repo_id}")
        return meta

    def _commit_at(self, route: _Route, revision: str | None) -> tuple[str, dict]:
        revision = revision or "main"
        sha = self.hub.store.resolve(route.repo_type, route.repo_id, revision)
        if sha is None:
            raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return sha, self.hub.store.commit(route.repo_type, route.repo_id, sha)

    def _base(self) -> str:
        return self.hub.public_url or f"http://{self.headers.get('Host') or self.hub.address}"

    def _repo_url(self, repo_type: str, repo_id: str) -> str:
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        return f"{self._base()}/{prefix}{repo_id}"

    # endpoints -------------------------------------------------------------------------------------------------
    def _handle(self, method: str, route: _Route) -> Response:
        handler = getattr(self, f"_ep_{route.endpoint}")
        return handler(method, route)

    def _ep_whoami(self, method, route):
        user = self._user()
        if user is None:
            raise HttpError(401, "Unauthorized: no token in the Authorization header")
        return _json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "orgs": [],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "deita-test", "role": "write"},
                },
            }
        )

    def _ep_agent_harnesses(self, method, route):
        # huggingface_hub fetches this registry once a day; an empty one means "no agent detected".
        return _json({"standardEnvVars": [], "harnesses": {}})

    def _ep_repo_create(self, method, route):
        user = self._user()
        body = self._json_body()
        repo_type = body.get("type") or "model"
        name, namespace = body.get("name"), body.get("organization") or user
        if repo_type not in REPO_TYPES:
            raise HttpError(400, f"invalid repo type {repo_type!r}")
        if user is None:
            raise HttpError(401, "Unauthorized: a write token is required to create a repo")
        if not isinstance(name, str) or not _NAME.match(name) or not _NAME.match(namespace or ""):
            raise HttpError(400, f"invalid repo name {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        if not self._may_write(user, repo_id):
            raise HttpError(403, f"You don't have the rights to create a repo under {namespace}")
        private = bool(body.get("private")) or body.get("visibility") in ("private", "protected")
        url = self._repo_url(repo_type, repo_id)
        if not self.hub.store.create_repo(repo_type, repo_id, private=private, owner=namespace, author=user):
            raise HttpError(409, "You already created this repo", extra={"url": url})
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _ep_repo_delete(self, method, route):
        body = self._json_body()
        repo_type = body.get("type") or "model"
        namespace = body.get("organization") or self._user()
        route = _Route("repo_delete", repo_type, f"{namespace}/{body.get('name')}")
        self._repo(route, write=True)
        self.hub.store.delete_repo(route.repo_type, route.repo_id)
        return _json({})

    def _ep_repo_info(self, method, route):
        meta = self._repo(route)
        sha, commit = self._commit_at(route, route.revision)
        return _json(
            {
                "_id": hashlib.sha1(route.repo_id.encode()).hexdigest()[:24],
                "id": route.repo_id,
                "author": route.repo_id.split("/")[0],
                "sha": sha,
                "private": meta["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "createdAt": meta["createdAt"],
                "lastModified": commit["date"],
                "siblings": [{"rfilename": p} for p in sorted(commit["files"])],
                "usedStorage": sum(f["size"] for f in commit["files"].values()),
            }
        )

    def _ep_validate_yaml(self, method, route):
        import yaml

        self._user()
        body = self._json_body()
        content = body.get("content") or ""
        match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
        errors = []
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                errors.append({"message": f"Invalid YAML in README.md front matter: {exc}"})
            else:
                if metadata is not None and not isinstance(metadata, dict):
                    errors.append({"message": "README.md metadata must be a YAML mapping"})
                elif metadata:
                    errors.extend(_check_configs(metadata.get("configs")))
        if errors:
            return _json({"error": errors[0]["message"], "errors": errors, "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _lfs_patterns(self, commit: dict) -> list[str]:
        entry = commit["files"].get(".gitattributes")
        text = self.hub.store.read_object(entry["sha256"]).decode() if entry else DEFAULT_GITATTRIBUTES
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line and line.strip()]

    def _ep_preupload(self, method, route):
        self._repo(route, write=True)
        body = self._json_body()
        sha, commit = self._commit_at(route, route.revision)
        patterns = self._lfs_patterns(commit)
        ignore = [p.strip() for p in (body.get("gitIgnore") or "").splitlines() if p.strip() and p[0] != "#"]
        out = []
        for item in body.get("files", []):
            path, size = _valid_path(item["path"]), int(item["size"])
            name = path.rsplit("/", 1)[-1]
            lfs = size > LFS_THRESHOLD_BYTES or any(fnmatch(name, p) or fnmatch(path, p) for p in patterns)
            remote = commit["files"].get(path)
            oid = None if remote is None else (remote["sha256"] if remote["lfs"] else remote["oid"])
            out.append(
                {
                    "path": path,
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": any(fnmatch(path, p) or fnmatch(name, p) for p in ignore),
                    "oid": oid,
                }
            )
        return _json({"files": out, "commitOid": sha})

    def _lfs_signature(self, sha256: str, size: int) -> str:
        return hmac.new(self.hub.store.lfs_secret, f"{sha256}:{size}".encode(), "sha256").hexdigest()

    def _ep_lfs_batch(self, method, route):
        self._repo(route, write=True)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HttpError(400, "only the 'upload' operation is supported")
        objects = []
        for obj in body.get("objects", []):
            sha256, size = obj.get("oid", ""), int(obj.get("size", -1))
            if not _HEX64.match(sha256) or size < 0:
                objects.append(
                    {"oid": str(sha256), "size": max(size, 0), "error": {"code": 422, "message": "bad oid"}}
                )
                continue
            entry: dict[str, Any] = {"oid": sha256, "size": size, "authenticated": True}
            if not self.hub.store.has_object(sha256, size):
                # Like a pre-signed storage URL: no Authorization header comes with the PUT, the signature is the key.
                href = f"{self._base()}/_lfs/{sha256}?size={size}&sig={self._lfs_signature(sha256, size)}"
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            objects.append(entry)
        return Response(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            {"Content-Type": "application/vnd.git-lfs+json"},
        )

    def _ep_lfs_upload(self, method, route):
        sha256 = route.extra or ""
        size = int((self.query.get("size") or ["-1"])[0])
        sig = (self.query.get("sig") or [""])[0]
        if not _HEX64.match(sha256) or not hmac.compare_digest(sig, self._lfs_signature(sha256, size)):
            self._read_body_quietly()
            raise HttpError(403, "invalid or expired upload URL")
        chunks = iter([self._body]) if self._body is not None else self._body_chunks()
        self._body = b""  # put_stream consumes the whole body, even when the content turns out wrong
        self.hub.store.put_stream(chunks, expected_sha256=sha256, expected_size=size)
        return Response(200)

    def _ep_commit(self, method, route):
        user = self._user()
        self._repo(route, write=True)
        if self.query.get("create_pr"):
            raise HttpError(400, "pull requests are not supported by the deita-hub test server")
        header, operations = None, []
        for number, line in enumerate(self._read_body().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HttpError(
                    400, f"commit payload line {number} is not a {{key, value}} JSON object"
                ) from None
            if key == "header":
                header = value
            elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                _valid_path(
                    value.get("path", "").rstrip("/") if key == "deletedFolder" else value.get("path", "")
                )
                operations.append((key, value))
            else:
                raise HttpError(400, f"commit payload line {number}: unknown key {key!r}")
        if header is None or not header.get("summary"):
            raise HttpError(400, "commit payload needs a header with a summary")
        sha = self.hub.store.apply_commit(
            route.repo_type,
            route.repo_id,
            route.revision or "main",
            operations=operations,
            title=header["summary"],
            message=header.get("description") or "",
            author=user,
            parent_commit=header.get("parentCommit"),
        )
        return _json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self._repo_url(route.repo_type, route.repo_id)}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _entries(self, route: _Route, sha: str, files: dict, *, expand: bool) -> dict[str, dict]:
        """Every file and directory of a commit as the tree API shows them, keyed by path."""
        out: dict[str, dict] = {}
        for path, info in files.items():
            entry = {"type": "file", "oid": info["oid"], "size": info["size"], "path": path}
            if info["lfs"]:
                pointer_size = len(lfs_pointer(info["sha256"], info["size"]))
                entry["lfs"] = {"oid": info["sha256"], "size": info["size"], "pointerSize": pointer_size}
            out[path] = entry
            parts = path.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                out.setdefault(folder, {"type": "directory", "path": folder, "oid": None, "size": 0})
        for path, entry in out.items():
            if entry["type"] == "directory":
                inside = sorted(f"{p}:{files[p]['oid']}" for p in files if p.startswith(path + "/"))
                entry["oid"] = hashlib.sha1("\n".join(inside).encode()).hexdigest()
        if expand:
            history = self.hub.store.history(route.repo_type, route.repo_id, sha)
            for path, entry in out.items():
                entry["lastCommit"] = _last_commit(history, path, entry["type"] == "directory")
        return out

    def _ep_tree(self, method, route):
        self._repo(route)
        sha, commit = self._commit_at(route, route.revision)
        recursive = (self.query.get("recursive") or ["false"])[0].lower() in ("1", "true")
        expand = (self.query.get("expand") or ["false"])[0].lower() in ("1", "true")
        prefix = route.path.strip("/")
        entries = self._entries(route, sha, commit["files"], expand=expand)
        if prefix and entries.get(prefix, {}).get("type") != "directory":
            raise HttpError(404, f"Entry not found: {prefix}", code="EntryNotFound")
        under = {p: e for p, e in entries.items() if not prefix or p.startswith(prefix + "/")}
        if not recursive:
            depth = prefix.count("/") + 1 if prefix else 0
            under = {p: e for p, e in under.items() if p.count("/") == depth}
        ordered = sorted(under.values(), key=lambda e: (e["type"] != "directory", e["path"]))
        return _json(ordered)

    def _ep_paths_info(self, method, route):
        self._repo(route)
        sha, commit = self._commit_at(route, route.revision)
        raw = self._read_body()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(raw.decode())
            paths = form.get("paths", [])
            expand = (form.get("expand") or ["false"])[0].lower() in ("1", "true")
        entries = self._entries(route, sha, commit["files"], expand=expand)
        return _json([entries[p.strip("/")] for p in paths if p.strip("/") in entries])

    def _ep_resolve(self, method, route):
        self._repo(route)
        revision = route.revision or "main"
        sha = self.hub.store.resolve(route.repo_type, route.repo_id, revision)
        if sha is None:
            raise HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        info = self.hub.store.commit(route.repo_type, route.repo_id, sha)["files"].get(route.path)
        if info is None:
            raise HttpError(404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": sha})
        etag = info["sha256"] if info["lfs"] else info["oid"]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{route.path.rsplit("/", 1)[-1]}"',
        }
        if info["lfs"]:
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(info["size"])
        size, start, end, status = info["size"], 0, info["size"], 200
        range_header = self.headers.get("Range")
        if range_header:
            parsed = _parse_range(range_header, size)
            if parsed is None:
                raise HttpError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
                )
            start, end, status = parsed[0], parsed[1], 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        return Response(
            status, headers=headers, file=self.hub.store.object_path(info["sha256"]), start=start, end=end
        )

    def _ep_branch(self, method, route):
        self._repo(route, write=True)
        branch = route.revision or ""
        if not _NAME.match(branch.replace("/", "-")):
            raise HttpError(400, f"invalid branch name {branch!r}")
        store = self.hub.store
        with store.lock:
            refs = store.refs(route.repo_type, route.repo_id)
            if method == "DELETE":
                if branch == "main" or branch not in refs["branches"]:
                    raise HttpError(404 if branch != "main" else 403, f"cannot delete branch {branch!r}")
                del refs["branches"][branch]
            else:
                if branch in refs["branches"]:
                    raise HttpError(409, f"Reference already exists: refs/heads/{branch}")
                starting_point = self._json_body().get("startingPoint") or "main"
                sha, _ = self._commit_at(route, starting_point)
                refs["branches"][branch] = sha
            store.write_refs(route.repo_type, route.repo_id, refs)
        return _json({})

    def _ep_tag(self, method, route):
        self._repo(route, write=True)
        store = self.hub.store
        with store.lock:
            refs = store.refs(route.repo_type, route.repo_id)
            if method == "DELETE":
                tag = route.revision or ""
                if tag not in refs["tags"]:
                    raise HttpError(404, f"Tag {tag} not found", code="RevisionNotFound")
                del refs["tags"][tag]
            else:
                body = self._json_body()
                tag = body.get("tag") or ""
                if not _NAME.match(tag.replace("/", "-")):
                    raise HttpError(400, f"invalid tag name {tag!r}")
                if tag in refs["tags"]:
                    raise HttpError(409, f"Tag {tag} already exists")
                sha, _ = self._commit_at(route, route.revision)
                refs["tags"][tag] = sha
            store.write_refs(route.repo_type, route.repo_id, refs)
        return _json({})

    def _ep_refs(self, method, route):
        self._repo(route)
        refs = self.hub.store.refs(route.repo_type, route.repo_id)

        def listing(kind: str, refs_of_kind: dict) -> list[dict]:
            return [
                {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": s}
                for n, s in sorted(refs_of_kind.items())
            ]

        return _json(
            {
                "branches": listing("heads", refs["branches"]),
                "converts": [],
                "tags": listing("tags", refs["tags"]),
                "pullRequests": [],
            }
        )

    def _ep_commits(self, method, route):
        self._repo(route)
        sha, _ = self._commit_at(route, route.revision)
        return _json(
            [
                {
                    "id": c["id"],
                    "title": c["title"],
                    "message": c["message"],
                    "authors": [{"user": c["author"], "avatar": None}],
                    "date": c["date"],
                }
                for c in self.hub.store.history(route.repo_type, route.repo_id, sha)
            ]
        )

    def _admin(self, method: str, route: _Route) -> Response:
        what = route.extra
        if what == "faults":
            if method == "GET":
                return _json([asdict(f) for f in self.hub.faults])
            if method == "DELETE":
                self._read_body()
                self.hub.clear_faults()
                return _json([])
            if method == "POST":
                body = self._json_body()
                try:
                    added = [
                        self.hub.add_fault(**item) for item in (body if isinstance(body, list) else [body])
                    ]
                except (TypeError, ValueError) as exc:
                    raise HttpError(400, f"bad fault: {exc}") from None
                return _json([asdict(f) for f in added])
        if what == "requests":
            self._read_body()
            if method == "DELETE":
                self.hub.clear_requests()
                return _json([])
            return _json(self.hub.requests)
        if what == "reset" and method == "POST":
            self._read_body()
            self.hub.reset()
            return _json({})
        raise HttpError(404, f"unknown admin route {what!r}")


def _check_configs(configs: Any) -> list[dict]:
    """The parts of the Hub's `configs:` validation that a wrong card would trip."""
    if configs is None:
        return []
    if not isinstance(configs, list):
        return [{"message": "configs must be a list"}]
    errors = []
    for i, config in enumerate(configs):
        if not isinstance(config, dict) or not isinstance(config.get("config_name"), str):
            errors.append({"message": f"configs[{i}] needs a string config_name"})
        elif config.get("data_files") is not None and not isinstance(config["data_files"], (str, list, dict)):
            errors.append({"message": f"configs[{i}].data_files must be a string, a list or a mapping"})
    return errors


def _last_commit(history: list[dict], path: str, is_dir: bool) -> dict:
    """The oldest commit in the unbroken run (newest first) where `path`'s content is what it is now."""

    def state(commit: dict):
        if is_dir:
            return sorted((p, f["oid"]) for p, f in commit["files"].items() if p.startswith(path + "/"))
        info = commit["files"].get(path)
        return info and info["oid"]

    current, last = state(history[0]), history[0]
    for commit in history[1:]:
        if state(commit) != current:
            break
        last = commit
    return {"id": last["id"], "title": last["title"], "date": last["date"]}


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=a-b`, `bytes=a-` or `bytes=-n` as a half-open [start, end); None when unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        length = int(last)
        return (max(size - length, 0), size) if length > 0 and size > 0 else None
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    return (start, end) if start < size and start < end else None


class HubServer:
    """The server plus its faults and request log; `start()` serves from a background thread.

    >>> with HubServer(tmp_path, tokens={"hf_test": "alice"}) as hub:   # doctest: +SKIP
    ...     hub.add_fault("commit", status=500, times=2)
    ...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1"}
    """

    def __init__(
        self,
        root: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str] | None = None,
        public_url: str | None = None,
    ):
        self.store = HubStore(root)
        self.tokens: dict[str, str] = dict(tokens or {})  # token -> user name
        self.faults: list[Fault] = []
        self.requests: list[dict] = []
        self.public_url = public_url
        self._lock = threading.Lock()
        self._in_flight = 0
        self._stopping = threading.Event()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"{host}:{port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    def start(self) -> HubServer:
        # A short poll interval so stop() (one fixture teardown per test) returns in milliseconds.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="deita-test-hub",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._stopping.set()  # releases handlers stalled in an injected delay
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # faults and log --------------------------------------------------------------------------------------------
    def add_fault(self, endpoint: str, **kwargs) -> Fault:
        fault = Fault(endpoint=endpoint, **kwargs) if not isinstance(endpoint, Fault) else endpoint
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    def _take_fault(self, endpoint: str, method: str, repo_id: str | None) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(endpoint, method, repo_id):
                    fault.hits += 1
                    return fault
        return None

    def _log_request(self, method: str, path: str, endpoint: str, status: int, repo_id: str | None) -> dict:
        entry = {
            "method": method,
            "path": path,
            "endpoint": endpoint,
            "status": status,
            "repo_id": repo_id,
            "time": time.time(),  # when the answer went out (or the connection was dropped)
        }
        with self._lock:
            self.requests.append(entry)
        return entry

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being handled (e.g. one stalled by a delay fault after its client gave up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._in_flight == 0:
                    return True
            time.sleep(0.02)
        return False

    def clear_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def reset(self) -> None:
        """Forget faults, the request log and every repo and object (for session-scoped servers)."""
        self.clear_faults()
        self.clear_requests()
        self.store.wipe()

    # inspection helpers for tests ------------------------------------------------------------------------------
    def refs(self, repo_id: str, repo_type: str = "dataset") -> dict | None:
        """`{"branches": {name: sha}, "tags": {name: sha}}`, or None when the repo does not exist."""
        if self.store.repo_meta(repo_type, repo_id) is None:
            return None
        return self.store.refs(repo_type, repo_id)

    def history(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> list[dict]:
        """Commits reachable from `revision`, newest first (`id`, `title`, `files`, ...)."""
        sha = self.store.resolve(repo_type, repo_id, revision)
        return [] if sha is None else self.store.history(repo_type, repo_id, sha)

    def files(self, repo_id: str, repo_type: str = "dataset", revision: str = "main") -> dict[str, bytes]:
        """The content of every file at `revision`."""
        history = self.history(repo_id, repo_type, revision)
        if not history:
            return {}
        return {p: self.store.read_object(i["sha256"]) for p, i in history[0]["files"].items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deita_hub.testing.hub",
        description="A Hugging Face Hub-compatible server for tests and offline dry runs.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to bind (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8765, help="Port to listen on (0 picks a free one).")
    parser.add_argument("--root", required=True, help="Folder holding the repos; survives restarts.")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="TOKEN[=USER]",
        help="A token the server accepts (repeatable); USER defaults to 'deita-tester'. Without any, HF_TOKEN "
        "from the environment is accepted if set; otherwise the server is read-only.",
    )
    parser.add_argument("--public-url", default=None, help="Base URL to put in responses (behind a proxy).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log every request.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    tokens = {}
    for spec in args.token or ([os.environ["HF_TOKEN"]] if os.environ.get("HF_TOKEN") else []):
        token, _, user = spec.partition("=")
        tokens[token] = user or "deita-tester"
    server = HubServer(args.root, host=args.host, port=args.port, tokens=tokens, public_url=args.public_url)
    users = ", ".join(sorted(set(tokens.values()))) or "none: read-only"
    # The tokens themselves are never printed, only the users they stand for.
    print(
        f"deita-hub test Hub serving {Path(args.root).resolve()} at {server.url} (users: {users})", flush=True
    )
    # Ctrl-C and SIGTERM both stop the server cleanly. SIGINT's handler is set explicitly because a process started
    # in the background by a non-interactive shell inherits SIGINT as ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()


if __name__ == "__main__":
    main()
