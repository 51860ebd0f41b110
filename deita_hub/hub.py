"""Everything deita-hub sends to or fetches from the Hugging Face Hub: pushes (one commit, then the tag; retried)
and downloads (one-line errors, fast failure when the Hub is unreachable); the token kept secret.

This is the only module that talks to the Hub. `push_folder` runs, in order:

1. `whoami`: fail early, with what to do, when the token is missing or rejected;
2. create the repo if needed, and the branch (from `main`) if it is missing;
3. read the branch head and its file tree, and compare it with the folder (git blob sha1 for regular files,
   sha256 for LFS files): identical content means no commit ("unchanged");
4. upload: huggingface_hub asks the server which files go through LFS (`preupload`) and uploads those out of
   band; it retries these requests itself (5 tries on 408/429/5xx/timeouts, honouring Retry-After);
5. one commit holding every file, with `parent_commit` pinned to the head read in step 3, so it can never apply
   twice or on top of someone else's change (two pushes at once: one lands whole, the other fails and says so);
6. the tag, on that exact commit.

huggingface_hub does not retry the commit, repo, branch and tag calls, so they are retried here, in one loop
(`_retrying`, as `RetryPolicy` says) on 429, 5xx, timeouts and dropped connections, honouring Retry-After. A
commit whose answer was lost (timeout, dropped connection, 5xx, or a 412 on a retry) may have landed: before
sending it again the branch head is re-read, and if it moved to a commit holding our content, that commit is the
push's result. If the last retry fails, the error says so and the branch is where it was. A tag that fails after
the commit landed leaves the release untagged, never half-written; the same push run again finds the content
unchanged and adds the tag.

`download` and `check_repo` first ask for the repo's head in one unretried request with a short timeout, so a
typo, a missing revision or an unreachable Hub is a one-line error in about a second instead of huggingface_hub's
~23 s of retries; with `HF_HUB_OFFLINE` set they read the local cache only.

The token comes from `HF_TOKEN` or the `hf auth login` store only; it is never printed, logged, written or put
in an error message (every message passing through here is scrubbed of it).

HTTP timeouts: huggingface_hub's shared client has none, so a stalled request would hang forever. The first Hub
call installs, through huggingface_hub's public `set_client_factory`, a factory building huggingface_hub's default
client with `RetryPolicy.timeout`; a later call with another timeout sets it on the live client. (A factory set
by other code before deita-hub's first Hub call is replaced; httpx still honours HTTP(S)_PROXY.)

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
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from deita_hub import __version__
from deita_hub.errors import DeitaHubError

logger = logging.getLogger(__name__)

T = TypeVar("T")

REPO_TYPES = ("dataset", "model")
# Never uploaded: VCS metadata, huggingface_hub's local upload cache, Python caches.
_SKIPPED_DIRS = {".git", ".cache", "__pycache__", ".ipynb_checkpoints"}
_SKIPPED_FILES = {".DS_Store"}
# Created by the Hub with every repo; deleting it would turn LFS routing off for later uploads.
_KEPT_REMOTE = {".gitattributes"}
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_LOOPBACK = {"localhost", "127.0.0.1", "::1", "[::1]"}
# A name ending like a data file is a local path, never a repo id: `data/pool.jsonl` must not go to the Hub.
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".gz", ".zst")
# The one request that tells whether a repo is there: the Hub answers it in well under a second, and an
# unreachable Hub should fail in seconds, not after huggingface_hub's download retries (~23 s).
_PROBE_TIMEOUT = 10.0


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


class NotOnHubError(DeitaHubError):
    """The Hub has no such repo, revision or file (or does not show it to this token).

    `missing` says which ("repo", "revision" or "file"), so a caller can say what it means for its command.
    """

    def __init__(self, message: str, *, missing: str):
        super().__init__(message)
        self.missing = missing


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id 'namespace/name' rather than a local path: not ./x, ../x, /x, ~/x,
    x/ or a/b/c, and not ending in a data-file extension (x/pool.jsonl)."""
    return (
        name.count("/") == 1
        and not name.startswith((".", "~"))
        and "\\" not in name
        and all(name.split("/"))
        and not name.lower().endswith(_FILE_SUFFIXES)
    )


# --------------------------------------------------------------------------------------------------------------
# huggingface_hub access
# --------------------------------------------------------------------------------------------------------------


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


_CLIENT_LOCK = threading.Lock()
_client_timeout: dict[str, float | None] = {"seconds": None}  # what the installed client factory uses


def _client_with_timeout():
    """huggingface_hub's default client (its request hook blocks requests in offline mode and tags downloads), with
    our timeout; httpx makes a number Timeout(connect=read=write=pool=seconds)."""
    from huggingface_hub.utils._http import default_client_factory

    client = default_client_factory()
    client.timeout = _client_timeout["seconds"]
    return client


def _use_timeout(hf, seconds: float) -> None:
    """Give huggingface_hub's shared HTTP client a timeout (it has none), so a stalled request fails and is retried.

    The factory is installed once per process, with the public `set_client_factory` (which closes the current
    client: doing it once, on the first Hub call, closes nobody's request in flight). Pushes may run in background
    threads during training; a later, different timeout is set on the live client, and the last one set applies.
    """
    with _CLIENT_LOCK:
        if _client_timeout["seconds"] == seconds:
            return
        first = _client_timeout["seconds"] is None
        _client_timeout["seconds"] = seconds
        if first:
            hf.set_client_factory(_client_with_timeout)
        else:
            hf.get_session().timeout = seconds


def _endpoint(hf) -> str:
    """The endpoint in the environment *now*: huggingface_hub reads HF_ENDPOINT once, at import."""
    return (os.environ.get("HF_ENDPOINT") or hf.constants.ENDPOINT).rstrip("/")


def _connect(policy: RetryPolicy):
    """(huggingface_hub, an HfApi for the current endpoint) with the HTTP timeout of `policy` in force."""
    hf = _huggingface_hub()
    _use_timeout(hf, policy.timeout)
    return hf, hf.HfApi(endpoint=_endpoint(hf))


def _token(*, required: bool = True) -> str | None:
    """The token from HF_TOKEN or the `hf auth login` store; DeitaHubError when `required` and there is none."""
    _huggingface_hub()
    from huggingface_hub import get_token

    token = get_token()
    if not token and required:
        raise DeitaHubError(
            "no Hugging Face token found: set HF_TOKEN (a write token) or run `hf auth login`"
        )
    return token


def is_offline() -> bool:
    """Whether the Hub is switched off (HF_HUB_OFFLINE, now or when huggingface_hub was imported): only the local
    cache can be read."""
    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or _huggingface_hub().is_offline_mode()


# --------------------------------------------------------------------------------------------------------------
# Errors and the one retry loop
# --------------------------------------------------------------------------------------------------------------


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bhf_[A-Za-z0-9]{20,}\b", "hf_***", text)


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None) if response is not None else None


def _is_unreachable(exc: BaseException) -> bool:
    """Timeouts and dropped, refused or unroutable connections: no HTTP answer at all."""
    try:
        import httpx2 as httpx  # what huggingface_hub 2.x uses
    except ImportError:  # pragma: no cover - huggingface_hub 1.x
        import httpx
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def _is_transient(exc: BaseException) -> bool:
    """429/5xx/408 answers, timeouts and dropped or refused connections: worth another try."""
    status = _status(exc)
    if status is not None:
        return status in _TRANSIENT_STATUS or 500 <= status < 600
    return _is_unreachable(exc)


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
    exc: BaseException, what: str, token: str | None, *, note: str = "", hint: str = "", writing: bool = True
) -> DeitaHubError:
    """A one-line DeitaHubError for a failed Hub call: "<what> (<note>): <error>", naming what to do for auth
    problems; `hint` goes last."""
    status = _status(exc)
    if status == 401:
        message = (
            f"{what}: the Hub rejected the token from HF_TOKEN / the `hf auth login` store (401). "
            "Set HF_TOKEN to a valid " + ("write token" if writing else "token") + " or run `hf auth login`."
        )
    elif status == 403 and writing:
        message = f"{what}: this token may not write there (403); use a write token for that namespace."
    else:
        message = f"{what}{f' ({note})' if note else ''}: {_describe(exc, token)}"
    return DeitaHubError(_scrub(message + hint, token))


def _retrying(
    what: str,
    call: Callable[[], T],
    policy: RetryPolicy,
    token: str | None,
    *,
    also_retry: tuple[int, ...] = (),
    recover: Callable[[BaseException], T | None] | None = None,
    note: str = "",
    hint: str = "",
) -> T:
    """`call()`, tried again on transient failures (and on the statuses in `also_retry`) as `policy` says.

    After each retryable failure `recover(exc)`, if given, may find the call's result another way (a commit whose
    answer was lost but which landed) and end the loop; None means "try again". A DeitaHubError from `call` or
    `recover` passes through. A failure that is not retried, or the last one, becomes a one-line DeitaHubError
    naming `what` and `note` ("gave up after N tries" when it retried); `hint` goes last.
    """
    for attempt in range(1, policy.attempts + 1):
        try:
            return call()
        except DeitaHubError:
            raise
        except Exception as exc:
            if not (_is_transient(exc) or _status(exc) in also_retry):
                raise _fail(exc, what, token, note=note, hint=hint) from exc
            if recover is not None and (found := recover(exc)) is not None:
                return found
            wait = policy.wait(attempt, _retry_after(exc))
            if attempt == policy.attempts or wait > policy.max_retry_after:
                gave_up = f"gave up after {attempt} tries" + (f"; {note}" if note else "")
                raise _fail(exc, what, token, note=gave_up, hint=hint) from exc
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


@dataclass(frozen=True)
class HubRepo:
    """One repo on the Hub and how to talk to it: what every push step needs, in one value."""

    repo_id: str
    repo_type: str  # "dataset" or "model"
    token: str | None  # sent with every call; scrubbed from every message
    policy: RetryPolicy
    api: Any  # huggingface_hub.HfApi for the endpoint in the environment

    @property
    def url(self) -> str:
        """The repo's page, e.g. https://huggingface.co/datasets/org/deita-6k."""
        prefix = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{self.api.endpoint.rstrip('/')}/{prefix}{self.repo_id}"

    def call(self, what: str, call: Callable[[], T], **options) -> T:
        """`call()` through the retry loop (`_retrying`) with this repo's policy and token."""
        return _retrying(what, call, self.policy, self.token, **options)

    def head(self, revision: str) -> str:
        """The commit `revision` points at (one try: callers retry)."""
        return self.api.repo_info(
            self.repo_id, repo_type=self.repo_type, revision=revision, token=self.token
        ).sha

    def files(self, commit: str) -> dict[str, Any]:
        """Path -> tree entry of every file at `commit` (one try: callers retry)."""
        return {
            entry.path: entry
            for entry in self.api.list_repo_tree(
                self.repo_id, recursive=True, revision=commit, repo_type=self.repo_type, token=self.token
            )
            if hasattr(entry, "blob_id")  # files only
        }

    def tag_target(self, tag: str) -> str | None:
        """The commit `tag` points at, None when there is no such tag (one try: callers retry)."""
        refs = self.api.list_repo_refs(self.repo_id, repo_type=self.repo_type, token=self.token)
        return next((ref.target_commit for ref in refs.tags if ref.name == tag), None)


def check_token() -> str:
    """The user name the Hub knows the current token (HF_TOKEN or the login store) by.

    Raises DeitaHubError, saying to set HF_TOKEN or run `hf auth login`, when there is no token or it is rejected.
    """
    token = _token()
    policy = RetryPolicy.from_env()
    _, api = _connect(policy)
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
    expected_head: str | None = None,
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
    expected_head: the commit a file being pushed was derived from (a card read, edited and pushed back); when
        the branch has moved since, nothing is pushed, so an edit made on the Hub meanwhile is never lost.
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
        raise DeitaHubError(f"the branch to push to (--branch) must be a branch name, not {branch!r}")
    if (folder / "README.md").exists():
        _front_matter(folder / "README.md")  # fail before any upload on a card the Hub would reject
    policy = retries or RetryPolicy.from_env()
    token = _token()
    _, api = _connect(policy)
    repo = HubRepo(repo_id, repo_type, token, policy, api)

    user = repo.call("checking the Hugging Face token", lambda: api.whoami(token=token))["name"]
    logger.info("pushing %d files from %s to %s (%s) as %s", len(files), folder, repo_id, repo_type, user)
    repo.call(
        f"creating {repo_type} repo {repo_id}",
        lambda: api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, token=token),
    )
    if branch != "main":
        _ensure_branch(repo, branch)
    parent = repo.call(f"reading the head of {repo_id}@{branch}", lambda: repo.head(branch))
    if expected_head is not None and parent != expected_head:
        raise DeitaHubError(
            f"{repo_id}@{branch} changed on the Hub (now at {parent[:12]}) after its card was read at "
            f"{expected_head[:12]}; nothing was pushed, run the command again"
        )
    remote = repo.call(f"listing {repo_id}@{parent[:12]}", lambda: repo.files(parent))
    local_paths = {f.path_in_repo for f in files}
    deletions = (
        sorted(p for p in remote if p not in local_paths and p not in _KEPT_REMOTE) if delete_missing else []
    )
    unchanged = _holds(remote, files, deletions)
    if tag:
        # Check before committing: a release whose tag cannot be created must not reach the branch either.
        tagged = repo.call(f"listing the tags of {repo_id}", lambda: repo.tag_target(tag))
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
            repo, branch, parent, files=files, changed=changed, deletions=deletions, message=message
        )
        head = commit_oid or parent
    if tag:
        _ensure_tag(repo, tag, head, committed=commit_oid is not None)
    return PushResult(
        repo_id=repo_id,
        repo_type=repo_type,
        url=repo.url,
        commit_oid=commit_oid,
        created_commit=commit_oid is not None,
        tag=tag,
        revision=branch,
        head_oid=head,
    )


def _ensure_branch(repo: HubRepo, branch: str) -> None:
    refs = repo.call(
        f"listing the refs of {repo.repo_id}",
        lambda: repo.api.list_repo_refs(repo.repo_id, repo_type=repo.repo_type, token=repo.token),
    )
    if any(ref.name == branch for ref in refs.branches):
        return
    if any(ref.name == branch for ref in refs.tags):
        raise DeitaHubError(
            f"{repo.repo_id}: '{branch}' is a tag, not a branch; pass a branch name to --branch"
        )
    logger.info("creating branch %s of %s from main", branch, repo.repo_id)
    repo.call(
        f"creating branch {branch} of {repo.repo_id}",
        lambda: repo.api.create_branch(
            repo.repo_id,
            branch=branch,
            revision="main",
            repo_type=repo.repo_type,
            exist_ok=True,
            token=repo.token,
        ),
    )


def _commit(
    repo: HubRepo,
    branch: str,
    parent: str,
    *,
    files: list[LocalFile],
    changed: list[LocalFile],
    deletions: list[str],
    message: str,
) -> str | None:
    """Upload, then one commit pinned on `parent`; the new commit id (None if the server found no change).

    The commit's tree holds every file of `files`: it adds the `changed` ones, and the others are already in
    `parent` with the same content (pinning the parent guarantees that), so they are neither re-hashed nor
    re-uploaded.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    additions = [
        CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.path)) for f in changed
    ]
    operations = additions + [CommitOperationDelete(path_in_repo=p) for p in deletions]
    description = (
        f"{len(files)} files ({len(changed)} added or changed, {len(deletions)} deleted), "
        f"pushed by deita-hub {__version__}."
    )
    where = f"{repo.repo_id}@{branch}"
    try:
        # Upload modes and LFS uploads; huggingface_hub retries each of these requests itself.
        repo.api.preupload_lfs_files(
            repo.repo_id,
            additions=additions,
            repo_type=repo.repo_type,
            revision=branch,
            free_memory=False,
            token=repo.token,
        )
    except Exception as exc:
        raise _fail(
            exc, f"uploading files to {repo.repo_id}", repo.token, note="nothing was committed"
        ) from exc

    def create() -> str:
        return repo.api.create_commit(
            repo.repo_id,
            operations=operations,
            commit_message=message,
            commit_description=description,
            repo_type=repo.repo_type,
            revision=branch,
            parent_commit=parent,
            token=repo.token,
        ).oid

    def landed(exc: BaseException) -> str | None:
        """After a lost answer or a 412: the new head if it holds our content, None if the branch is unchanged."""
        head = repo.call(f"re-reading the head of {where}", lambda: repo.head(branch))
        if head == parent:
            return None
        remote = repo.call(f"listing {repo.repo_id}@{head[:12]}", lambda: repo.files(head))
        if _holds(remote, files, deletions):
            logger.info("the commit landed although its answer was lost: %s", head)
            return head
        raise DeitaHubError(
            f"{where} moved from {parent[:12]} to {head[:12]} while pushing (another writer?); this push "
            "committed nothing. Run it again to push on top of the new head."
        )

    # 412: the pinned parent is no longer the head, maybe because an earlier try of ours landed (`landed` tells).
    oid = repo.call(
        f"committing to {where}",
        create,
        also_retry=(412,),
        recover=landed,
        note=f"{branch} is unchanged at {parent[:12]}",
    )
    if oid == parent:  # every file was already there (a concurrent identical push)
        return None
    logger.info("committed %s", oid)
    return oid


def _ensure_tag(repo: HubRepo, tag: str, commit: str, *, committed: bool) -> None:
    """Tag `commit`; an existing tag on that commit is fine, on another commit an error (tags never move)."""

    def tag_once() -> str:
        # Read first: an earlier try whose answer was lost (or a 409) may have created the tag already.
        target = repo.tag_target(tag)
        if target == commit:
            return commit
        if target is not None:
            raise DeitaHubError(
                f"{repo.repo_id}: tag {tag} already points at {target[:12]}, not at the pushed commit "
                f"{commit[:12]}; released tags are not moved: choose a new tag"
                + (" (the pushed commit is on the branch, untagged)." if committed else ".")
            )
        repo.api.create_tag(
            repo.repo_id, tag=tag, revision=commit, repo_type=repo.repo_type, token=repo.token
        )
        logger.info("tagged %s as %s", commit[:12], tag)
        return commit

    repo.call(
        f"tagging {repo.repo_id} {tag}",
        tag_once,
        also_retry=(409,),  # created meanwhile, by a lost earlier try or by someone else: the next try tells
        hint=(
            f". The commit {commit[:12]} is on the branch, untagged: run the same push again to add the tag."
            if committed
            else ""
        ),
    )


# --------------------------------------------------------------------------------------------------------------
# Downloads
# --------------------------------------------------------------------------------------------------------------


def _download_error(
    exc: BaseException, repo_id: str, revision: str | None, endpoint: str, token: str | None
) -> DeitaHubError:
    """The one-line DeitaHubError for a failed probe or download."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = repo_id + (f"@{revision}" if revision else "")
    if isinstance(exc, GatedRepoError):
        return DeitaHubError(
            f"{repo_id} is gated: accept its conditions on the Hub, then use a token of that account (HF_TOKEN)"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return NotOnHubError(
            f"{repo_id}: no Hub repo of that name (or it is private: check HF_TOKEN)", missing="repo"
        )
    if isinstance(exc, RevisionNotFoundError):
        return NotOnHubError(f"{repo_id} has no revision '{revision}'", missing="revision")
    offline = is_offline()
    if isinstance(exc, OfflineModeIsEnabled) or (offline and isinstance(exc, EntryNotFoundError)):
        return DeitaHubError(
            f"{where}: the Hub is offline (HF_HUB_OFFLINE is set) and this is not in the local cache; "
            "unset HF_HUB_OFFLINE, or give a local path instead"
        )
    if isinstance(exc, EntryNotFoundError) and _status(exc) == 404:
        return NotOnHubError(f"{where}: {_describe(exc, token)}", missing="file")
    if _is_unreachable(exc) or isinstance(exc, EntryNotFoundError):
        # huggingface_hub says LocalEntryNotFoundError when the Hub did not answer and nothing is cached.
        return DeitaHubError(
            _scrub(
                f"{where}: cannot reach the Hub at {endpoint} ({_describe(exc, token)}); check the network and "
                "HF_ENDPOINT, or give a local path instead",
                token,
            )
        )
    return _fail(exc, f"downloading {where}", token, writing=False)


def check_repo(repo_id: str, *, repo_type: str, revision: str | None = None) -> str:
    """The commit `revision` (default main) of `repo_id` points at, from one quick unretried request.

    Raises a one-line DeitaHubError at once when the Hub is unreachable (naming the endpoint) or offline, and
    NotOnHubError when the repo or the revision does not exist.
    """
    hf = _huggingface_hub()
    endpoint = _endpoint(hf)
    if is_offline():
        raise DeitaHubError(
            f"{repo_id}: the Hub is offline (HF_HUB_OFFLINE is set); unset it, or give a local path instead"
        )
    token = _token(required=False)
    api = hf.HfApi(endpoint=endpoint)
    try:
        info = api.repo_info(
            repo_id, repo_type=repo_type, revision=revision, token=token, timeout=_PROBE_TIMEOUT
        )
    except Exception as exc:
        raise _download_error(exc, repo_id, revision, endpoint, token) from exc
    return info.sha


def download(
    repo_id: str,
    *,
    repo_type: str = "model",
    revision: str | None = None,
    filename: str | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """Files of a Hub repo in the Hugging Face cache: the local path of `filename`, or else the snapshot folder
    holding the files that match `allow_patterns` (every file when None).

    The repo and revision are checked first (`check_repo`), so a typo or an unreachable Hub fails in about a
    second. With HF_HUB_OFFLINE set only the cache is read. Errors are one line and never hold the token; a missing
    repo, revision or file is a NotOnHubError.
    """
    hf = _huggingface_hub()
    endpoint = _endpoint(hf)
    token = _token(required=False)
    _use_timeout(hf, RetryPolicy.from_env().timeout)
    try:
        if not is_offline():
            check_repo(repo_id, repo_type=repo_type, revision=revision)
        if filename is not None:
            path = hf.hf_hub_download(
                repo_id, filename, repo_type=repo_type, revision=revision, token=token, endpoint=endpoint
            )
        else:
            path = hf.snapshot_download(
                repo_id,
                repo_type=repo_type,
                revision=revision,
                allow_patterns=allow_patterns,
                token=token,
                endpoint=endpoint,
            )
    except DeitaHubError:
        raise
    except Exception as exc:
        raise _download_error(exc, repo_id, revision, endpoint, token) from exc
    return Path(path)


def read_json_file(
    repo_id: str, filename: str, *, repo_type: str, revision: str | None = None
) -> dict | None:
    """A small JSON file of a repo (e.g. a dataset's `deita_build.json`), or None when it is absent or unreadable.

    For optional details only (card provenance): a failure is logged, never raised.
    """
    try:
        local = download(repo_id, repo_type=repo_type, revision=revision, filename=filename)
    except NotOnHubError as exc:
        if exc.missing != "file":
            logger.warning("could not read %s from %s: %s", filename, repo_id, exc)
        return None
    except DeitaHubError as exc:
        logger.warning("could not read %s from %s: %s", filename, repo_id, exc)
        return None
    try:
        data = json.loads(local.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        logger.warning("%s of %s is not valid JSON; ignored", filename, repo_id)
        return None
    return data if isinstance(data, dict) else None
