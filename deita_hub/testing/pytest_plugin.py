"""Pytest fixtures for the local Hub server: `hub_token`, `hub_server`, `hub_env`.

Enable with `pytest_plugins = ["deita_hub.testing.pytest_plugin"]` in a conftest.

huggingface_hub, datasets and transformers read `HF_ENDPOINT`, `HF_TOKEN`, `HF_HOME`, ... once, at import, and
the pytest process may already have imported them with other settings. So tests run client code (the
`deita-hub` CLI, `load_dataset`, `from_pretrained`) in a **subprocess** with `env=hub_env`; the server itself runs
in a background thread of the pytest process, where tests inspect it (`hub_server.refs(...)`,
`hub_server.history(...)`) and inject faults (`hub_server.add_fault("commit", status=500)`).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from deita_hub.testing.hub import HubServer

_REPO_ROOT = str(Path(__file__).resolve().parents[2])  # so `python -m deita_hub` works without an install
TEST_USER = "deita-tester"


@pytest.fixture
def hub_token() -> str:
    """A fresh random token, so a scan for it in outputs and files means something."""
    return f"hf_test{secrets.token_hex(16)}"


@pytest.fixture
def hub_server(tmp_path_factory, hub_token):
    """A Hub-compatible server on 127.0.0.1 (free port) accepting `hub_token` as user `deita-tester`."""
    root = tmp_path_factory.mktemp("hub-root")
    with HubServer(root, tokens={hub_token: TEST_USER}) as server:
        yield server


@pytest.fixture
def hub_env(hub_server, hub_token, tmp_path_factory) -> dict[str, str]:
    """The environment for a client subprocess: the server's endpoint and token, a fresh HF_HOME, no Xet, no
    telemetry, short timeouts and retry delays. Inherited HF_* variables are dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "DEITA_HUB_"))}
    env.update(
        HF_ENDPOINT=hub_server.url,
        HF_TOKEN=hub_token,
        HF_HOME=str(tmp_path_factory.mktemp("hf-home")),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="10",
        DEITA_HUB_RETRY_BASE_DELAY="0.05",
        DEITA_HUB_RETRY_MAX_DELAY="0.5",
        DEITA_HUB_HTTP_TIMEOUT="10",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(p for p in (_REPO_ROOT, os.environ.get("PYTHONPATH")) if p),
    )
    return env
