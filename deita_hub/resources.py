"""Where recipes, card templates and configs live: inside the wheel, or at the root of a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """`dataset_scripts`, `model_cards`, `configs` or `ablations`: the installed copy, else the checkout's folder."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"deita-hub resource folder '{name}' is missing from this installation")


def resolve_resource(path: str | Path, folder: str) -> Path:
    """A user path as given, else the same name inside the packaged resource folder (`demo.yaml`)."""
    path = Path(path)
    if path.exists():
        return path
    packaged = resource_dir(folder) / path.name
    if packaged.exists():
        return packaged
    return path
