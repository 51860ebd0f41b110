"""Publish a folder to the Hugging Face Hub: one commit, then the tag; retried; the token kept secret.

This is the only module that talks to the Hub. `push_folder` runs, in order:

1. `whoami`: fail early, with what to do, when the token is missing or rejected;
2. create the repo if needed, and the branch (from `main`) if it is missing;
3. read the branch head and its file tree, and compare it with the folder (git blob sha1 for regular files,
   sha256 for LFS files): identical content means no commit ("unchanged");
4. upload: huggingface_hub asks the server which files go through LFS (`preupload`) and uploads those out of
   band; it retries these requests itself (5 tries on 408/429/5xx/timeouts, honouring Retry-After);
5. one commit holding every file, with `parent_commit` pinned to the head read in step 3, so it can never apply
   twice or on top of someone else's change;
6. the tag, on that exact commit.

huggingface_hub does not retry the commit, repo, branch and tag calls, so they are retried here (`RetryPolicy`)
on 429, 5xx, timeouts and dropped connections, honouring Retry-After. A commit whose answer was lost (timeout,
dropped connection, 5xx, or a 412 on a retry) may have landed: before sending it again the branch head is
re-read, and if it moved to a commit holding our content, that commit is the push's result. If the last retry
fails, the error says so and the branch is where it was. A tag that fails after the commit landed leaves the
release untagged, never half-written; the same push run again finds the content unchanged and adds the tag.

The token comes from `HF_TOKEN` or the `hf auth login` store only; it is never printed, logged, written or put
in an error message (every message passing through here is scrubbed of it).

For a local Hub-compatible server (`HF_ENDPOINT` on localhost/127.0.0.1, such as `deita_hub.testing.hub`)
Xet uploads are switched off (`HF_HUB_DISABLE_XET=1`) unless the environment says otherwise: such servers
speak the plain Git LFS protocol, and with `hf_xet` installed huggingface_hub would otherwise ask them for a Xet
write token (a 404).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

from deita_hub import __version__
from deita_hub.errors import DeitaHubError

logger = logging.getLogger(__name__)

REPO_TYPES = ("dataset", "model")
# Never uploaded: VCS metadata, huggingface_hub's local upload cache, Python caches.
_SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
_SKIPPED_FILES = {".DS_Store"}
# Created by the Hub with every repo; deleting it would turn LFS routing off for later uploads.
_KEPT_REMOTE = {".gitattributes"}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to retry the Hub calls that huggingface_hub does not retry itself."""

    attempts: int = field(
        default=5,
        metadata={"help": "Tries per call (the first one included) for commit, repo, branch and tag."},
    )
    base_delay: float = field(
        default=1.0, metadata={"help": "Seconds before the first retry; doubles each time."}
    )
    max_delay: float = field(
        default=30.0, metadata={"help": "Longest wait between tries (Retry-After excepted)."}
    )
    max_retry_after: float = field(
        default=300.0,
        metadata={"help": "Longest Retry-After (seconds) honoured; longer ones give up instead."},
    )
    timeout: float = field(
        default=120.0,
        metadata={
            "help": "Seconds an HTTP request may stall (connect, read or write) before it counts as failed."
        },
    )

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise DeitaHubError("RetryPolicy.attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0 or self.timeout <= 0:
            raise DeitaHubError("RetryPolicy delays must be >= 0 and its timeout > 0")

    @classmethod
    def from_env(cls) -> RetryPolicy:
        """Defaults, overridden by DEITA_HUB_RETRY_ATTEMPTS, DEITA_HUB_RETRY_BASE_DELAY, DEITA_HUB_RETRY_MAX_DELAY
        and DEITA_HUB_HTTP_TIMEOUT (tests use small values)."""
        names = {
            "attempts": ("DEITA_HUB_RETRY_ATTEMPTS", int),
            "base_delay": ("DEITA_HUB_RETRY_BASE_DELAY", float),
            "max_delay": ("DEITA_HUB_RETRY_MAX_DELAY", float),
            "timeout": ("DEITA_HUB_HTTP_TIMEOUT", float),
        }
        values = {}
        for key, (env, kind) in names.items():
            if os.environ.get(env):
                try:
                    values[key] = kind(os.environ[env])
                except ValueError:
                    raise DeitaHubError(f"{env}={os.environ[env]!r} is not a valid {kind.__name__}") from None
        return cls(**values)

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to sleep after failed try number `attempt` (1-based)."""
        if retry_after is not None:
            return retry_after
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return delay * (1 + 0.1 * random.random())  # a little jitter so parallel pushes do not retry in step


@dataclass(frozen=True)
class PushResult:
    """What a push did. `commit_oid` is None and `created_commit` False when the remote already held the folder."""

    repo_id: str
    repo_type: str
    url: str  # the repo's page, e.g. https://huggingface.co/datasets/org/deita-6k
    commit_oid: str | None
    created_commit: bool
    tag: str | None
    revision: str  # the branch pushed to
    head_oid: str = ""  # the commit the branch points at after the push (== commit_oid when one was made)

    @property
    def commit_url(self) -> str:
        return f"{self.url}/commit/{self.head_oid}"


# --------------------------------------------------------------------------------------------------------------
# huggingface_hub access
# --------------------------------------------------------------------------------------------------------------


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id 'namespace/name' rather than a local path (./x, /x, ~/x, x/)."""
    return name.count("/") == 1 and not name.startswith((".", "~")) and all(name.split("/"))


def _is_loopback(endpoint: str | None) -> bool:
    return bool(endpoint) and (urlsplit(endpoint).hostname or "") in _LOOPBACK


def _huggingface_hub():
    """Import huggingface_hub, switching Xet off first when the endpoint is a local test server."""
    local = _is_loopback(os.environ.get("HF_ENDPOINT"))
    if local and "HF_HUB_DISABLE_XET" not in os.environ:
        os.environ["HF_HUB_DISABLE_XET"] = "1"
    import huggingface_hub
    from huggingface_hub import constants

    # huggingface_hub reads the environment once at import; if something imported it before the line above ran,
    # its constant still says "Xet allowed".
    if local and os.environ.get("HF_HUB_DISABLE_XET") == "1":
        constants.HF_HUB_DISABLE_XET = True
    return huggingface_hub


_TIMEOUT_LOCK = threading.Lock()
_timeout_state = {"users": 0, "saved": None}


@contextmanager
def _http_timeout(seconds: float):
    """Give huggingface_hub's shared HTTP client a timeout (it has none) while pushes run.

    Without it a stalled commit request hangs forever instead of failing and being retried. The client factory is
    swapped when the first concurrent push starts and restored when the last one ends (pushes may run in
    background threads during training), so no push has its client closed under it; the first push's timeout
    applies to all of them.
    """
    from huggingface_hub.utils import _http as hf_http

    with _TIMEOUT_LOCK:
        if _timeout_state["users"] == 0:
            previous = getattr(hf_http, "_GLOBAL_CLIENT_FACTORY", hf_http.default_client_factory)

            def factory():
                client = previous()
                client.timeout = seconds  # httpx makes it Timeout(connect=read=write=pool=seconds)
                return client

            _timeout_state["saved"] = previous
            hf_http.set_client_factory(factory)
        _timeout_state["users"] += 1
    try:
        yield
    finally:
        with _TIMEOUT_LOCK:
            _timeout_state["users"] -= 1
            if _timeout_state["users"] == 0:
                hf_http.set_client_factory(_timeout_state["saved"])


def _api(hf):
    """An HfApi for the endpoint in the environment *now*: huggingface_hub reads HF_ENDPOINT once, at import."""
    endpoint = os.environ.get("HF_ENDPOINT") or hf.constants.ENDPOINT
    return hf.HfApi(endpoint=endpoint.rstrip("/"))


def _token() -> str:
    _huggingface_hub()
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise DeitaHubError(
            "no Hugging Face token found: set HF_TOKEN (a write token) or run `hf auth login`"
        )
    return token


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{20,}\b", "hf_***", text)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _is_transient(exc: BaseException) -> bool:
    """429/5xx/408 answers, timeouts and dropped or refused connections: worth another try."""
    status = _status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS or 500 <= status < 600
    try:
        import httpx2 as httpx  # what huggingface_hub 2.x uses
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def _retry_after(exc: BaseException) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _describe(exc: BaseException, token: str | None) -> str:
    """The error as one scrubbed line: its type and message, whitespace collapsed, at most ~400 characters."""
    text = re.sub(r"\s*For more information check: \S+", "", str(exc))  # httpx's generic MDN link
    text = " ".join(text.split()) or "(no message)"
    if len(text) > 400:
        text = text[:400] + "..."
    return _scrub(f"{type(exc).__name__}: {text}", token)


def _fail(
    exc: BaseException, what: str, token: str | None, *, after: str = "", hint: str = ""
) -> DeitaHubError:
    """A DeitaHubError for a failed Hub call, naming what to do for auth problems; `hint` goes last."""
    status = _status(exc)
    if status == 401:
        message = (
            f"{what}: the Hub rejected the token from HF_TOKEN / the `hf auth login` store (401). "
            "Set HF_TOKEN to a valid write token or run `hf auth login`."
        )
    elif status == 403:
        message = f"{what}: this token may not write there (403); use a write token for that namespace."
    else:
        message = f"{what}{after}: {_describe(exc, token)}"
    return DeitaHubError(_scrub(message + hint, token))


def _retrying(what: str, call, policy: RetryPolicy, token: str):
    """`call()` with retries on transient failures; DeitaHubError once it gives up."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except DeitaHubError:
            raise
        except Exception as exc:
            wait = policy.wait(attempt, _retry_after(exc))
            if not _is_transient(exc):
                raise _fail(exc, what, token) from exc
            if attempt == policy.attempts or wait > policy.max_retry_after:
                raise _fail(exc, what, token, after=f" (gave up after {attempt} tries)") from exc
            logger.warning(
                "%s failed (%s); retry %d/%d in %.1fs",
                what,
                _describe(exc, token),
                attempt,
                policy.attempts - 1,
                wait,
            )
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def check_token() -> str:
    """The user name the Hub knows the current token (HF_TOKEN or the login store) by.

    Raises DeitaHubError, saying to set HF_TOKEN or run `hf auth login`, when there is no token or it is rejected.
    """
    token = _token()
    policy = RetryPolicy.from_env()
    api = _api(_huggingface_hub())
    with _http_timeout(policy.timeout):
        info = _retrying("checking the Hugging Face token", lambda: api.whoami(token=token), policy, token)
    return info["name"]


# --------------------------------------------------------------------------------------------------------------
# Local folder
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    path_in_repo: str
    path: Path
    size: int
    git_sha1: str  # git blob id: what the Hub reports for regular files
    sha256: str  # what the Hub reports for LFS files


def _hash_file(path: Path) -> tuple[int, str, str]:
    size = path.stat().st_size
    blob, sha256 = hashlib.sha1(b"blob %d\0" % size), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            blob.update(chunk)
            sha256.update(chunk)
    return size, blob.hexdigest(), sha256.hexdigest()


def local_files(folder: str | Path, ignore_patterns: list[str] | None = None) -> list[LocalFile]:
    """Every file to push, with the hashes the Hub's tree reports, in path order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DeitaHubError(f"{folder}: not a folder")
    patterns = list(ignore_patterns or [])
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part in _SKIPPED_DIRS for part in rel.parts[:-1]):
            continue
        rel_posix = rel.as_posix()
        if rel.name in _SKIPPED_FILES or any(fnmatch(rel_posix, p) or fnmatch(rel.name, p) for p in patterns):
            continue
        out.append(LocalFile(rel_posix, path, *_hash_file(path)))
    if not out:
        raise DeitaHubError(f"{folder}: nothing to push (the folder is empty or every file is ignored)")
    return out


def _front_matter(readme: Path) -> dict | None:
    """The README's YAML metadata; DeitaHubError naming the file when it does not parse."""
    import yaml

    text = readme.read_text(encoding="utf-8")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.DOTALL)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise DeitaHubError(f"{readme}: the YAML front matter does not parse: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise DeitaHubError(f"{readme}: the YAML front matter must be a mapping")
    return data


def detect_repo_type(folder: str | Path) -> str:
    """'dataset' for a built dataset (deita_build.json, or a card with `configs:`), 'model' for config.json or
    adapter_config.json; DeitaHubError otherwise."""
    folder = Path(folder)
    readme = folder / "README.md"
    if (folder / "deita_build.json").exists() or (
        readme.exists() and "configs" in (_front_matter(readme) or {})
    ):
        return "dataset"
    if (folder / "config.json").exists() or (folder / "adapter_config.json").exists():
        return "model"
    raise DeitaHubError(
        f"{folder}: cannot tell whether this is a dataset or a model (no deita_build.json, README `configs:`, "
        "config.json or adapter_config.json); pass --type dataset|model"
    )


# --------------------------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------------------------


def _remote_files(api, repo_id: str, repo_type: str, commit: str) -> dict[str, object]:
    return {
        entry.path: entry
        for entry in api.list_repo_tree(repo_id, recursive=True, revision=commit, repo_type=repo_type)
        if hasattr(entry, "blob_id")  # files only
    }


def _same(local: LocalFile, remote) -> bool:
    if remote is None:
        return False
    if remote.lfs is not None:
        return remote.lfs.sha256 == local.sha256
    return remote.blob_id == local.git_sha1


def _holds(remote: dict, files: list[LocalFile], deletions: list[str]) -> bool:
    """Whether a remote tree holds exactly our content (every file equal, every deleted path gone)."""
    return all(_same(f, remote.get(f.path_in_repo)) for f in files) and not any(
        p in remote for p in deletions
    )


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    tag: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
    delete_missing: bool = False,
    retries: RetryPolicy | None = None,
    ignore_patterns: list[str] | None = None,
) -> PushResult:
    """Push every file of `folder` to `repo_id` as one commit on `revision` (default main), then tag it.

    repo_type: "dataset" or "model"; None detects it (`detect_repo_type`).
    revision: the branch to push to; created from main when missing.
    tag: a tag to put on the pushed commit (or on the unchanged head); an existing tag is never moved.
    private: visibility when the repo is created (an existing repo keeps its own).
    delete_missing: also delete remote files that are not in the folder (`.gitattributes` excepted); by
        default unrelated remote files are kept.
    retries: RetryPolicy for commit/repo/branch/tag calls; default `RetryPolicy.from_env()`.
    ignore_patterns: glob patterns (matched on the path in the repo and on the file name) not to push.
    """
    folder = Path(folder)
    files = local_files(folder, ignore_patterns)
    repo_type = repo_type or detect_repo_type(folder)
    if repo_type not in REPO_TYPES:
        raise DeitaHubError(f"repo type must be one of {', '.join(REPO_TYPES)}, not {repo_type!r}")
    if not is_repo_id(repo_id):
        raise DeitaHubError(f"repo id must look like 'namespace/name', got {repo_id!r}")
    branch = revision or "main"
    if branch.startswith("refs/") or re.fullmatch(r"[0-9a-f]{40}", branch):
        raise DeitaHubError(f"--revision must be a branch name, not {branch!r}")
    if (folder / "README.md").exists():
        _front_matter(folder / "README.md")  # fail before any upload on a card the Hub would reject
    policy = retries or RetryPolicy.from_env()
    token = _token()
    hf = _huggingface_hub()
    api = _api(hf)
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    url = f"{api.endpoint.rstrip('/')}/{prefix}{repo_id}"

    with _http_timeout(policy.timeout):
        whoami = _retrying("checking the Hugging Face token", lambda: api.whoami(token=token), policy, token)
        user = whoami["name"]
        logger.info("pushing %d files from %s to %s (%s) as %s", len(files), folder, repo_id, repo_type, user)
        _retrying(
            f"creating {repo_type} repo {repo_id}",
            lambda: api.create_repo(
                repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token
            ),
            policy,
            token,
        )
        if branch != "main":
            _ensure_branch(api, repo_id, repo_type, branch, policy, token)

        def read_head() -> str:
            info = api.repo_info(repo_id, repo_type=repo_type, revision=branch, token=token)
            return info.sha

        parent = _retrying(f"reading the head of {repo_id}@{branch}", read_head, policy, token)
        remote = _retrying(
            f"listing {repo_id}@{parent[:12]}",
            lambda: _remote_files(api, repo_id, repo_type, parent),
            policy,
            token,
        )
        local_paths = {f.path_in_repo for f in files}
        deletions = (
            sorted(p for p in remote if p not in local_paths and p not in _KEPT_REMOTE)
            if delete_missing
            else []
        )
        unchanged = _holds(remote, files, deletions)
        if tag:
            # Check before committing: a release whose tag cannot be created must not reach the branch either.
            tagged = _retrying(
                f"listing the tags of {repo_id}",
                lambda: _tag_target(api, repo_id, repo_type, tag, token),
                policy,
                token,
            )
            if tagged is not None and not (unchanged and tagged == parent):
                raise DeitaHubError(
                    f"{repo_id}: tag {tag} already exists (at {tagged[:12]}) and released tags are not moved; "
                    "choose a new tag. Nothing was pushed."
                )
        if unchanged:
            logger.info("unchanged: %s@%s already holds these %d files", repo_id, branch, len(files))
            commit_oid, head = None, parent
        else:
            changed = [f for f in files if not _same(f, remote.get(f.path_in_repo))]
            logger.info("%d changed or new files, %d deletions", len(changed), len(deletions))
            message = commit_message or (f"Release {tag}" if tag else f"Upload {repo_type} with deita-hub")
            commit_oid = _commit(
                api, hf, repo_id, repo_type, branch, parent, files, changed, deletions, message, policy, token
            )
            head = commit_oid or parent
        if tag:
            _ensure_tag(api, repo_id, repo_type, tag, head, policy, token, committed=commit_oid is not None)
    return PushResult(
        repo_id=repo_id,
        repo_type=repo_type,
        url=url,
        commit_oid=commit_oid,
        created_commit=commit_oid is not None,
        tag=tag,
        revision=branch,
        head_oid=head,
    )


def _ensure_branch(api, repo_id, repo_type, branch, policy, token) -> None:
    refs = _retrying(
        f"listing the refs of {repo_id}",
        lambda: api.list_repo_refs(repo_id, repo_type=repo_type, token=token),
        policy,
        token,
    )
    if any(ref.name == branch for ref in refs.branches):
        return
    if any(ref.name == branch for ref in refs.tags):
        raise DeitaHubError(f"{repo_id}: '{branch}' is a tag, not a branch; pass a branch name to --revision")
    logger.info("creating branch %s of %s from main", branch, repo_id)
    _retrying(
        f"creating branch {branch} of {repo_id}",
        lambda: api.create_branch(
            repo_id, branch=branch, revision="main", repo_type=repo_type, exist_ok=True, token=token
        ),
        policy,
        token,
    )


def _commit(
    api, hf, repo_id, repo_type, branch, parent, files, changed, deletions, message, policy, token
) -> str | None:
    """Upload, then one commit pinned on `parent`; the new commit id (None if the server found no change).

    The commit's tree holds every file of `files`: it adds the `changed` ones, and the others are already in
    `parent` with the same content (pinning the parent guarantees that), so they are neither re-hashed nor
    re-uploaded.
    """
    additions = [
        hf.CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.path)) for f in changed
    ]
    operations = additions + [hf.CommitOperationDelete(path_in_repo=p) for p in deletions]
    description = (
        f"{len(files)} files ({len(changed)} added or changed, {len(deletions)} deleted), "
        f"pushed by deita-hub {__version__}."
    )
    try:
        # Upload modes and LFS uploads; huggingface_hub retries each of these requests itself.
        api.preupload_lfs_files(
            repo_id, additions=additions, repo_type=repo_type, revision=branch, free_memory=False, token=token
        )
    except Exception as exc:
        raise _fail(exc, f"uploading files to {repo_id}", token, after=" (nothing was committed)") from exc

    def landed() -> str | None:
        """After a failed or ambiguous commit: the new head if it holds our content, None if unchanged."""
        head = _retrying(
            f"re-reading the head of {repo_id}@{branch}",
            lambda: api.repo_info(repo_id, repo_type=repo_type, revision=branch, token=token).sha,
            policy,
            token,
        )
        if head == parent:
            return None
        remote = _retrying(
            f"listing {repo_id}@{head[:12]}",
            lambda: _remote_files(api, repo_id, repo_type, head),
            policy,
            token,
        )
        if _holds(remote, files, deletions):
            logger.info("the commit landed although its answer was lost: %s", head)
            return head
        raise DeitaHubError(
            f"{repo_id}@{branch} moved from {parent[:12]} to {head[:12]} while pushing (another writer?); this "
            "push committed nothing. Run it again to push on top of the new head."
        )

    for attempt in range(1, policy.attempts + 1):
        try:
            info = api.create_commit(
                repo_id,
                operations=operations,
                commit_message=message,
                commit_description=description,
                repo_type=repo_type,
                revision=branch,
                parent_commit=parent,
                token=token,
            )
        except DeitaHubError:
            raise
        except Exception as exc:
            status = _status(exc)
            if not (_is_transient(exc) or status == 412):
                raise _fail(
                    exc, f"committing to {repo_id}@{branch}", token, after=" (nothing was committed)"
                ) from exc
            # A lost answer may hide a commit that landed; a 412 means the head moved, maybe to our own commit.
            head = landed()
            if head is not None:
                return head
            wait = policy.wait(attempt, _retry_after(exc))
            if status == 412 or attempt == policy.attempts or wait > policy.max_retry_after:
                raise _fail(
                    exc,
                    f"committing to {repo_id}@{branch}",
                    token,
                    after=f" (gave up after {attempt} tries; {branch} is unchanged at {parent[:12]})",
                ) from exc
            logger.warning(
                "commit to %s failed (%s); retry %d/%d in %.1fs",
                repo_id,
                _describe(exc, token),
                attempt,
                policy.attempts - 1,
                wait,
            )
            time.sleep(wait)
            continue
        if info.oid == parent:  # every file was already there (a concurrent identical push)
            return None
        logger.info("committed %s", info.oid)
        return info.oid
    raise AssertionError("unreachable")  # pragma: no cover


def _tag_target(api, repo_id, repo_type, tag, token) -> str | None:
    refs = api.list_repo_refs(repo_id, repo_type=repo_type, token=token)
    return next((ref.target_commit for ref in refs.tags if ref.name == tag), None)


def _ensure_tag(api, repo_id, repo_type, tag, commit, policy, token, *, committed: bool) -> None:
    """Tag `commit`; an existing tag on that commit is fine, on another commit an error (tags never move)."""

    def existing() -> str | None:
        return _tag_target(api, repo_id, repo_type, tag, token)

    note = (
        f". The commit {commit[:12]} is on the branch, untagged: run the same push again to add the tag."
        if committed
        else ""
    )
    for attempt in range(1, policy.attempts + 1):
        target = _retrying(f"listing the tags of {repo_id}", existing, policy, token)
        if target == commit:
            return
        if target is not None:
            raise DeitaHubError(
                f"{repo_id}: tag {tag} already points at {target[:12]}, not at the pushed commit {commit[:12]}; "
                "released tags are not moved: choose a new tag"
                + (" (the pushed commit is on the branch, untagged)." if committed else ".")
            )
        try:
            api.create_tag(repo_id, tag=tag, revision=commit, repo_type=repo_type, token=token)
            logger.info("tagged %s as %s", commit[:12], tag)
            return
        except Exception as exc:
            status = _status(exc)
            if status == 409:
                continue  # created by a lost earlier try, or by someone else: the next loop tells which
            wait = policy.wait(attempt, _retry_after(exc))
            if not _is_transient(exc):
                raise _fail(exc, f"tagging {repo_id} {tag}", token, hint=note) from exc
            if attempt == policy.attempts or wait > policy.max_retry_after:
                raise _fail(
                    exc,
                    f"tagging {repo_id} {tag}",
                    token,
                    after=f" (gave up after {attempt} tries)",
                    hint=note,
                ) from exc
            logger.warning("tagging %s failed (%s); retry in %.1fs", repo_id, _describe(exc, token), wait)
            time.sleep(wait)
    target = _retrying(f"listing the tags of {repo_id}", existing, policy, token)
    if target != commit:
        raise DeitaHubError(f"tagging {repo_id} {tag} failed after {policy.attempts} tries{note}")


def read_json_file(
    repo_id: str, filename: str, *, repo_type: str, revision: str | None = None
) -> dict | None:
    """A small JSON file of a repo (e.g. a dataset's `deita_build.json`), or None when it is absent or unreadable.

    For optional details only (card provenance): a failure is logged, never raised.
    """
    hf = _huggingface_hub()
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        local = hf.hf_hub_download(repo_id, filename, repo_type=repo_type, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
        return None
    except HfHubHTTPError as exc:
        logger.warning(
            "could not read %s from %s: %s", filename, repo_id, _scrub(str(exc), os.environ.get("HF_TOKEN"))
        )
        return None
    try:
        data = json.loads(Path(local).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s of %s is not valid JSON; ignored", filename, repo_id)
        return None
    return data if isinstance(data, dict) else None
