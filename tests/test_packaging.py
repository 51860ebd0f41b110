"""Packaging: `python -m build` makes an sdist and a wheel that carry the recipes, card templates and configs;
the wheel installs into a fresh venv (no download) where `deita-hub --help`, the demo build and a model card
work; the version has one source."""

from __future__ import annotations

import email.parser
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest
from test_cards import tiny_record  # tests/ is on sys.path (pytest's default import mode)

import deita_hub

ROOT = Path(__file__).resolve().parents[1]
RESOURCE_DIRS = ("dataset_scripts", "model_cards", "configs")


def _resource_files() -> list[str]:
    """Every file the checkout has in the resource folders (caches aside)."""
    files = []
    for folder in RESOURCE_DIRS:
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path.relative_to(ROOT).as_posix())
    return sorted(files)


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    # Without isolation the installed hatchling builds (offline); otherwise build fetches it from the index.
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-isolation"]
    # No --sdist/--wheel: build makes the sdist, then the wheel *from the sdist*, so a file missing from the
    # sdist breaks the wheel too.
    result = subprocess.run(
        [sys.executable, "-m", "build", *isolation, "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def test_one_version_source():
    init = (ROOT / "deita_hub" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, flags=re.M) == [deita_hub.__version__]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and not re.search(r"^version\s*=", pyproject, flags=re.M)
    assert re.search(r'\[tool\.hatch\.version\]\npath = "deita_hub/__init__.py"', pyproject)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{deita_hub.__version__}]" in changelog, "CHANGELOG.md has no section for this version"


@pytest.mark.slow
def test_wheel_metadata_and_contents(dists):
    wheel = dists["wheel"]
    version = deita_hub.__version__
    assert wheel.name == f"deita_hub-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.parser.Parser().parsestr(zf.read(f"deita_hub-{version}.dist-info/METADATA").decode())
        entry_points = zf.read(f"deita_hub-{version}.dist-info/entry_points.txt").decode()
    assert meta["Name"] == "deita-hub"
    assert meta["Version"] == version
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Requires-Python"] == ">=3.10"
    assert "deita-hub = deita_hub.cli:main" in entry_points
    assert f"deita_hub-{version}.dist-info/licenses/LICENSE" in names
    # Recipes, card templates and configs travel as package data under deita_hub/_data/.
    for file in _resource_files():
        assert f"deita_hub/_data/{file}" in names, f"{file} is missing from the wheel"
    assert "deita_hub/_data/model_cards/model_card.md.j2" in names
    assert "deita_hub/_data/dataset_scripts/demo.yaml" in names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    assert not [n for n in names if n.startswith(("tests/", ".github/", "benchmarks/"))]


@pytest.mark.slow
def test_sdist_contents(dists):
    version = deita_hub.__version__
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for required in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "deita_hub/__init__.py"):
        assert required in names, required
    for file in _resource_files():
        assert file in names, f"{file} is missing from the sdist"
    assert "tests/test_cards.py" in names
    assert dists["sdist"].name == f"deita_hub-{version}.tar.gz"


@pytest.mark.slow
def test_twine_check_passes(dists):
    if importlib.util.find_spec("twine") is None:
        pytest.skip("twine is not installed (in the [test] extra)")
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(dists["sdist"]), str(dists["wheel"])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel; its dependencies are seen from this environment (no download)."""
    venv = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line (not a site dir): this environment's packages come *after* the venv's own, and their
    # .pth files (an editable deita-hub, say) are not processed, so `deita_hub` can only come from the wheel.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_deps_from_test_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    result = subprocess.run(
        [str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(dists["wheel"])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return venv


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "DEITA_HUB_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"), TOKENIZERS_PARALLELISM="false")
    return env


@pytest.mark.slow
def test_installed_wheel_runs_help_and_finds_its_resources(installed, tmp_path):
    env = _env(tmp_path)
    helped = subprocess.run(
        [str(installed / "bin" / "deita-hub"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0, helped.stderr
    for command in ("build", "card", "push", "train"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, flags=re.M), command
    version = subprocess.run(
        [str(installed / "bin" / "deita-hub"), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert version.stdout.strip().endswith(deita_hub.__version__)
    probe = (
        "import json, deita_hub\n"
        "from deita_hub.resources import resource_dir\n"
        "print(json.dumps({'module': deita_hub.__file__,"
        " 'dirs': [str(resource_dir(n)) for n in ('dataset_scripts', 'model_cards', 'configs')]}))\n"
    )
    found = subprocess.run(
        [str(installed / "bin" / "python"), "-c", probe],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    info = json.loads(found.stdout)
    assert Path(info["module"]).is_relative_to(installed), info["module"]
    for folder in info["dirs"]:
        assert Path(folder).is_relative_to(installed) and "/_data/" in folder, folder


@pytest.mark.slow
def test_installed_wheel_builds_the_demo_and_writes_a_card(installed, tmp_path, demo_cache_dir):
    env = {**_env(tmp_path), "DEITA_HUB_CACHE": str(demo_cache_dir)}
    cli = str(installed / "bin" / "deita-hub")
    # No checkout here: `demo.yaml` is found among the packaged recipes.
    built = subprocess.run(
        [cli, "build", "demo.yaml", "--out", "demo"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    assert "6k: 600 rows (deita)" in built.stdout
    assert (tmp_path / "demo" / "README.md").exists()
    assert list((tmp_path / "demo" / "6k").glob("train-*.parquet"))

    # The model card template comes from the wheel too.
    run = tmp_path / "run"
    run.mkdir()
    (run / "deita_run.json").write_text(json.dumps(tiny_record()))
    carded = subprocess.run([cli, "card", str(run)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert carded.returncode == 0, carded.stderr
    text = (run / "README.md").read_text()
    assert text.startswith("---\n") and "# Model Card for deita-tiny-qlora" in text
