import pytest

pytest_plugins = ["deita_hub.testing.pytest_plugin"]


@pytest.fixture(scope="session")
def demo_cache_dir(tmp_path_factory):
    """One deita-hub cache (pool + embeddings) shared by the slow tests that build the demo recipe, so only the
    first of them pays for embedding its pool."""
    return tmp_path_factory.mktemp("deita-hub-cache")
