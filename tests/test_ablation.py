"""`deita-hub ablate`: arms trained and evaluated identically, steps cached by their inputs, a killed ablation
resumes where it stopped, a changed arm reruns alone, and the report's numbers are the per-arm results'."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from deita_hub.ablation import bootstrap_ci, load_ablation, plan
from deita_hub.demo import generate_pool

ROOT = Path(__file__).resolve().parents[1]


def write_ablation(tmp_path, *, arms=None, seeds=(1, 2), **changes):
    """A small ablation over a 120-row demo pool: Deita's subset against a random one, tiny model, held-out loss."""
    if not (tmp_path / "pool.jsonl").exists():
        rows = generate_pool(120, seed=0)
        (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        held = generate_pool(12, seed=9)
        (tmp_path / "held-out.jsonl").write_text(
            "".join(json.dumps({"conversations": r["conversations"]}) + "\n" for r in held)
        )
        recipe = {
            "name": "small",
            "pool": {"sources": ["pool.jsonl"]},
            "scores": {"synthetic": True},
            "embedding": {"method": "sentence", "max_length": 64},
            "selection": {"max_similarity": 0.9},
            "configs": [
                {"name": "deita-40", "method": "deita", "budget": 40},
                {"name": "random-40", "method": "random", "budget": 40, "seed": 3},
                {"name": "longest-40", "method": "longest", "budget": 40},
            ],
        }
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    data = {
        "name": "small",
        "arms": arms
        or [
            {"name": "deita", "recipe": "recipe.yaml", "config": "deita-40"},
            {"name": "random", "recipe": "recipe.yaml", "config": "random-40"},
        ],
        "baseline": "random",
        "train": {
            "config": "tiny-cpu.yaml",
            "set": {
                "max_steps": 2,
                "save_steps": 1,
                "per_device_train_batch_size": 2,
                "total_train_batch_size": 2,
            },
        },
        "eval": {"suite": ["loss"], "dataset": "held-out.jsonl", "max_length": 256, "batch_size": 4},
        "seeds": list(seeds),
        "bootstrap": 500,
    }
    data.update(changes)
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ablate(path, out, *extra, env_extra=None, check=True):
    env = {
        **os.environ,
        "DEITA_HUB_CACHE": str(Path(out).parent / "cache"),
        "HF_HUB_OFFLINE": "1",
        **(env_extra or {}),
    }
    result = subprocess.run(
        [sys.executable, "-m", "deita_hub", "ablate", str(path), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    if check:
        assert result.returncode == 0, result.stderr + result.stdout
    return result


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seeds": []}, "'seeds' must be a non-empty list"),
        (
            {"arms": [{"name": "a", "dataset": "nope/missing-folder/x"}, {"name": "b", "dataset": "x"}]},
            "neither a folder",
        ),
        (
            {
                "arms": [
                    {"name": "a", "recipe": "recipe.yaml", "config": "9k"},
                    {"name": "random", "recipe": "recipe.yaml", "config": "random-40"},
                ]
            },
            "'config' must name one of the recipe's configs",
        ),
        (
            {
                "arms": [
                    {
                        "name": "a",
                        "recipe": "recipe.yaml",
                        "config": "deita-40",
                        "eval": {"suite": ["mt-bench"]},
                    },
                    {"name": "random", "recipe": "recipe.yaml", "config": "random-40"},
                ]
            },
            "every arm is evaluated identically",
        ),
        ({"eval": {"suite": ["loss"]}}, "eval: 'dataset' is needed by the loss suite"),
        ({"eval": {"suite": ["loss", "bleu"], "dataset": "held-out.jsonl"}}, "'suite' must be among"),
        ({"baseline": "uniform"}, "'baseline' 'uniform' is not an arm"),
        (
            {"train": {"config": "tiny-cpu.yaml", "set": {"learning_rat": 1.0}}},
            "did you mean 'learning_rate'",
        ),
        ({"train": {"config": "tiny-cpu.yaml", "set": {"seed": 3}}}, "'seed' is set per arm and seed"),
        ({"colour": "red"}, "unknown key(s) 'colour'"),
    ],
)
def test_bad_ablation_files_fail_before_anything_runs(tmp_path, change, message, cli_run):
    path = write_ablation(tmp_path, **change)
    result = cli_run("ablate", path, "--out", tmp_path / "out")
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_plan_keys_follow_the_inputs(tmp_path):
    base = plan(load_ablation(write_ablation(tmp_path)), tmp_path / "out")
    assert [s.label for s in base][:3] == ["build recipe", "train deita seed 1", "eval deita seed 1"]
    again = plan(load_ablation(write_ablation(tmp_path)), tmp_path / "out")
    assert [s.key for s in again] == [s.key for s in base]
    other = write_ablation(
        tmp_path,
        arms=[
            {"name": "deita", "recipe": "recipe.yaml", "config": "deita-40"},
            {"name": "random", "recipe": "recipe.yaml", "config": "longest-40"},
        ],
    )
    changed = {s.label: s.key for s in plan(load_ablation(other), tmp_path / "out")}
    for step in base:
        same = changed[step.label] == step.key
        assert same == (step.arm != "random"), step.label  # only the changed arm's steps get new keys


def test_bootstrap_interval_brackets_the_mean():
    low, high = bootstrap_ci([0.1, 0.3, 0.2, 0.4], 2000)
    assert low <= 0.25 <= high and low >= 0.1 and high <= 0.4
    assert bootstrap_ci([0.5, 0.5], 100) == (0.5, 0.5)


@pytest.mark.slow
def test_tiny_ablation_end_to_end_resume_and_changed_arm(tmp_path):
    path = write_ablation(tmp_path)
    out = tmp_path / "out"
    dry = ablate(path, out, "--dry-run")
    assert "9 steps, 0 cached, 9 to run" in dry.stdout and not (out / "results.json").exists()

    # Kill the ablation once the first training has saved a checkpoint; the rerun resumes that training.
    env = {**os.environ, "DEITA_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "deita_hub", "ablate", str(path), "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not list(
        out.glob("steps/train-deita-s1-*/run/checkpoint-1/trainer_state.json")
    ):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train_folder = next(out.glob("steps/train-deita-s1-*"))
    assert not (train_folder / "step.json").exists()  # killed mid-training: not marked done

    result = ablate(path, out)
    assert "cached: build recipe" in result.stdout
    log = next(out.glob("logs/train-deita-s1-*.log")).read_text()
    assert "--resume" in log and "resumed from checkpoint-1" in log

    results = json.loads((out / "results.json").read_text())
    loss = results["benchmarks"]["held-out loss"]
    assert set(loss["arms"]) == {"deita", "random"}
    for arm in ("deita", "random"):
        files = results["provenance"]["per_arm_results"][arm]
        per_seed = [json.loads((out / f).read_text())["suites"]["loss"]["loss"] for f in files]
        assert loss["arms"][arm]["per_seed"] == per_seed  # the report's numbers are the per-arm results'
    diff = loss["arms"]["deita"]["vs_baseline"]
    expected = [
        a - b
        for a, b in zip(loss["arms"]["deita"]["per_seed"], loss["arms"]["random"]["per_seed"], strict=True)
    ]
    assert diff["mean_difference"] == pytest.approx(sum(expected) / 2)
    assert diff["ci95"][0] <= diff["mean_difference"] <= diff["ci95"][1]
    readme = (out / "README.md").read_text()
    assert (
        "held-out loss" in readme
        and "assets/ablation.png" in readme
        and (out / "assets" / "ablation.png").stat().st_size > 1000
    )
    assert "training (device-hours)" in readme

    # Unchanged: every step cached. One arm changed: only its steps run.
    again = ablate(path, out)
    assert "running:" not in again.stdout
    changed = write_ablation(
        tmp_path,
        arms=[
            {"name": "deita", "recipe": "recipe.yaml", "config": "deita-40"},
            {"name": "random", "recipe": "recipe.yaml", "config": "longest-40"},
        ],
    )
    # ... through Ray with --workers 2: its two seeds' chains (train, eval) run as parallel tasks (one GPU each on
    # a GPU cluster, one CPU each here).
    pytest.importorskip("ray", reason="the [ray] extra runs arms in parallel")
    rerun = ablate(changed, out, "--workers", "2")
    ran = [line for line in rerun.stdout.splitlines() if line.startswith("running:")]
    assert sorted(ran) == ["running: random seed 1 (train, eval)", "running: random seed 2 (train, eval)"], (
        rerun.stdout
    )
    results = json.loads((out / "results.json").read_text())
    assert (
        results["arms"][1]["config"] == "longest-40"
        and len(results["benchmarks"]["held-out loss"]["arms"]) == 2
    )
