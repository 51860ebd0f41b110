"""Test support shipped with the package: a Hub-compatible server and tiny offline models."""
