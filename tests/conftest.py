import os
from dataclasses import dataclass

import pytest

pytest_plugins = ["deita_hub.testing.pytest_plugin"]

# Each test process in a parallel run (`pytest -n auto`, pytest-xdist) gets an equal share of the cores for
# torch's and BLAS's thread pools, unless the caller chose a count: two workers on two cores that each start two
# threads fight over the cores (on 2 cores the suite took 653 s so, 572 s with one thread each; one run each).
# Set before any test imports torch, and inherited by the processes the tests start.
if (workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT")) and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // int(workers)))

# huggingface_hub and datasets read HF_HUB_OFFLINE once, when first imported: imported here, they take the
# session's setting, not that of the test that happens to import them first. (An in-process CLI test runs with
# HF_HUB_OFFLINE=1; a Hub test after it in the same process found the Hub switched off.)
import datasets  # noqa: E402, F401
import huggingface_hub  # noqa: E402, F401


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per usable core, but no more than one per 3 GiB of memory (the largest worker peaks
    near 2 GB while it trains and evaluates tiny models). `PYTEST_XDIST_AUTO_NUM_WORKERS` still overrides it."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, memory // (3 << 30)))


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
    first of them pays for embedding its pool. Under pytest-xdist the workers share it too (each worker's base
    temp sits in one run folder): deita-hub locks its cache entries, so a second build waits for the first's
    matrix instead of embedding the pool again."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    cache = base / "deita-hub-demo-cache"
    cache.mkdir(exist_ok=True)
    return cache


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
            # -q/-v set these for the run (and its children); restored after it, as `env` is
            patch.setenv("DEITA_HUB_QUIET", "0")
            patch.delenv("TQDM_DISABLE", raising=False)
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            capsys.readouterr()
            code = main([str(arg) for arg in args])
            out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run
