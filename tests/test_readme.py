"""The README's Quickstart is exactly two commands, and CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_quickstart_has_two_single_line_commands():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert "deita-hub build dataset_scripts/demo.yaml" in commands[0]
    assert commands[1].endswith("pytest -q -n auto --dist worksteal")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert quickstart_commands()[1] in ci
