pytest_plugins = ["deita_hub.testing.pytest_plugin"]
