"""benchmarks/gpu_suite.py --tiny: the GPU suite's every row, with tiny shapes on the CPU, so it cannot rot while no
GPU is at hand. Speed is not asserted (style: measured, not asserted); that every row ran and gave numbers is."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
# Rows that need an optional package this environment may lack; without it, the row says so instead of measuring.
NEEDS = {"score-vllm": "vllm"}


@pytest.mark.timeout(900)
def test_the_tiny_suite_measures_every_row(tmp_path):
    pytest.importorskip("trl", reason="the training rows need the [train] extra")
    out = tmp_path / "suite.json"
    done = subprocess.run(
        [sys.executable, str(SUITE), "--tiny", "--workdir", str(tmp_path / "work"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"].startswith("CPU")
    sys.path.insert(0, str(SUITE.parent))
    from gpu_suite import ROWS

    assert list(result["rows"]) == list(ROWS)
    for name, row in result["rows"].items():
        package = NEEDS.get(name)
        if package and importlib.util.find_spec(package) is None:
            assert f"'{package}' package" in row["error"], (name, row)
            continue
        assert "error" not in row, (name, row)
        baseline = row.get("baseline") or result["rows"][row["baseline_from"]]["baseline"]
        for value in (row["ours"], baseline):
            assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, row)
    # The printed table has one line per row, with the device's name.
    lines = done.stdout.splitlines()
    assert any(line.startswith("deita-hub GPU suite on CPU") for line in lines)
    for name in ROWS:
        assert sum(line.startswith(f"{name} ") for line in lines) == 1, name
    # The selection row checked identical ids between bfloat16 and float32 (it fails otherwise).
    assert "identical ids" in result["rows"]["select"]["what"]
