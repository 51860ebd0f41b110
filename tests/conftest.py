from dataclasses import dataclass

import pytest

pytest_plugins = ["deita_hub.testing.pytest_plugin"]


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory):
    """deita-hub's cache (the tokenized-data cache every training writes) in a temp folder, never the user's
    ~/.cache/deita-hub; a test that sets DEITA_HUB_CACHE itself still wins."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DEITA_HUB_CACHE", str(tmp_path_factory.mktemp("session-cache")))
        yield


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One deita-hub cache (pool + embeddings) shared by the slow tests that build the demo recipe, so only the
    first of them pays for embedding its pool."""
    return tmp_path_factory.mktemp("deita-hub-cache")


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_run(monkeypatch, capsys):
    """`deita-hub ARGS` in this process (`deita_hub.cli.main`), in `cwd` with extra environment variables: the
    same exit code, stdout and stderr as the console script, without a new interpreter per call."""

    def run(*args, cwd=None, env=None) -> CliResult:
        from deita_hub.cli import main

        with monkeypatch.context() as patch:
            if cwd is not None:
                patch.chdir(cwd)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            capsys.readouterr()
            code = main([str(arg) for arg in args])
            out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
