"""`deita-hub ablate`: arms trained and evaluated identically, steps cached by their inputs, a killed ablation
resumes where it stopped, a changed arm reruns alone, and the report's numbers are the per-arm results'."""

import base64
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


@pytest.mark.parametrize(
    ("name", "plan_line"),
    [
        ("tiny-cpu.yaml", "13 steps, 0 cached, 13 to run"),  # 1 build + 3 arms x 2 seeds x (train, eval)
        ("deita-6k.yaml", "19 steps, 0 cached, 19 to run"),  # 1 build + 3 arms x 3 seeds x (train, eval)
    ],
)
def test_shipped_ablations_load_and_plan(tmp_path, cli_run, name, plan_line):
    result = cli_run("ablate", name, "--out", tmp_path / "out", "--dry-run", cwd=tmp_path)
    assert result.returncode == 0 and plan_line in result.stdout, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_sequential_ablation_serves_one_judge_for_every_eval(tmp_path):
    """tiny-cpu.yaml judges with `judge_serve`: one server for all its evals, each eval pointed at it."""
    import urllib.request

    from deita_hub.ablation import _shared_judge, eval_args
    from deita_hub.resources import resolve_resource

    ablation = load_ablation(resolve_resource("tiny-cpu.yaml", "ablations"))
    steps = plan(ablation, tmp_path / "out")
    evals = [step for step in steps if step.kind == "eval"]
    assert "--judge-serve" in eval_args(evals[0], ablation)
    with _shared_judge(ablation, tmp_path / "out", [s for s in steps if s.kind == "train"]) as judge:
        assert judge is None  # nothing to judge: no server
    with _shared_judge(ablation, tmp_path / "out", steps) as judge:
        url, model = judge
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5) as response:
            assert response.status == 200
        for step in evals:
            args = eval_args(step, ablation, judge)
            assert "--judge-serve" not in args
            assert (
                args[args.index("--judge-url") + 1] == url and args[args.index("--judge-model") + 1] == model
            )
    assert model == str(tmp_path / "out" / "judge" / "tiny-rating-judge")
    with pytest.raises(OSError):
        urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=5)  # stopped with the ablation


def test_bootstrap_interval_brackets_the_mean():
    low, high = bootstrap_ci([0.1, 0.3, 0.2, 0.4], 2000)
    assert low <= 0.25 <= high and low >= 0.1 and high <= 0.4
    assert bootstrap_ci([0.5, 0.5], 100) == (0.5, 0.5)


# --- the report and --push, from an ablation whose steps are all done -----------------------------------------

# Per-arm, per-seed numbers the cached steps' eval results hold: (held-out loss, MT-Bench judge runs).
NUMBERS = {
    ("deita", 1): (1.0, [6.0, 6.5]),
    ("deita", 2): (1.2, [7.0, 7.0]),
    ("random", 1): (1.5, [5.0, 5.5]),
    ("random", 2): (1.4, [6.0, 6.0]),
}


def cached_ablation(tmp_path, numbers=NUMBERS):
    """An ablation over two configs of a built dataset folder whose every step is done: `ablate` runs nothing and
    writes the report from the eval results.json files holding `numbers` (so the report and --push are tested
    without training anything). Returns (ablation file, out folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (tmp_path / "data").exists():
        for config in ("deita", "random"):
            (tmp_path / "data" / config).mkdir(parents=True)
            rows = [{"conversations": [{"from": "human", "value": config}, {"from": "gpt", "value": "ok"}]}]
            pq.write_table(
                pa.Table.from_pylist(rows), tmp_path / "data" / config / "train-00000-of-00001.parquet"
            )
        (tmp_path / "held-out.jsonl").write_text("")
    path = write_ablation(
        tmp_path,
        arms=[
            {"name": "deita", "dataset": "data", "config": "deita"},
            {"name": "random", "dataset": "data", "config": "random"},
        ],
        eval={
            "suite": ["loss", "mt-bench"],
            "dataset": "held-out.jsonl",
            "judge_url": "http://127.0.0.1:9/v1",
        },
    )
    out = tmp_path / "out"
    for step in plan(load_ablation(path), out):
        step.folder.mkdir(parents=True, exist_ok=True)
        record = {"kind": step.kind, "arm": step.arm, "seed": step.seed, "key": step.key, "seconds": 60.0}
        if step.kind == "train":
            record |= {"train_runtime_s": 360.0, "devices": 2}
        else:
            loss, runs = numbers[(step.arm, step.seed)]
            results = {
                "suites": {"loss": {"loss": loss}, "mt-bench": {"score": {"runs": runs}}},
                "mt_bench": sorted(runs)[len(runs) // 2],
            }
            (step.folder / "eval").mkdir(exist_ok=True)
            (step.folder / "eval" / "results.json").write_text(json.dumps(results))
        (step.folder / "step.json").write_text(json.dumps(record))
    return path, out


def test_report_states_the_per_arm_numbers_their_spread_and_paired_differences(tmp_path, cli_run):
    path, out = cached_ablation(tmp_path)
    result = cli_run("ablate", path, "--out", out)
    assert result.returncode == 0 and "running:" not in result.stdout + result.stderr, result.stderr
    assert "cached: train deita seed 1" in result.stderr  # progress on stderr, results on stdout
    results = json.loads((out / "results.json").read_text())
    loss = results["benchmarks"]["held-out loss"]["arms"]
    assert loss["deita"]["per_seed"] == [1.0, 1.2] and loss["random"]["per_seed"] == [1.5, 1.4]
    assert loss["deita"]["mean"] == pytest.approx(1.1) and loss["deita"]["std"] == pytest.approx(0.02**0.5)
    diff = loss["deita"]["vs_baseline"]  # pairs by seed: -0.5 and -0.2
    assert diff["pairs"] == 2 and diff["mean_difference"] == pytest.approx(-0.35)
    assert diff["ci95"] == pytest.approx([-0.5, -0.2]) and "vs_baseline" not in loss["random"]
    mt_bench = results["benchmarks"]["MT-Bench"]["arms"]["deita"]
    assert mt_bench["per_seed"] == [6.5, 7.0] and mt_bench["judge_runs"] == [6.0, 6.5, 7.0, 7.0]
    for arm in ("deita", "random"):  # every number comes from the per-arm results.json the provenance names
        files = results["provenance"]["per_arm_results"][arm]
        assert [json.loads((out / f).read_text())["suites"]["loss"]["loss"] for f in files] == loss[arm][
            "per_seed"
        ]
    assert results["costs"]["deita"] == {
        "build_wall_clock_s": None,
        "training_device_hours": pytest.approx(0.4),  # 2 seeds x 360 s x 2 devices
        "eval_wall_clock_s": 120.0,
    }
    readme = (out / "README.md").read_text()
    assert "| deita | 1.100 | 0.141 | 1.000, 1.200 | -0.350 [-0.500, -0.200] |" in readme
    assert (
        "![small](assets/ablation.png)" in readme and (out / "assets" / "ablation.png").stat().st_size > 1000
    )


def push_report(hub_env, path, out, repo):
    done = subprocess.run(
        [sys.executable, "-m", "deita_hub", "ablate", str(path), "--out", str(out), "--push", repo],
        capture_output=True, text=True, env=hub_env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0 and "pushed report:" in done.stdout, done.stderr[-3000:]
    return done


BEGIN, END = "<!-- deita-hub ablation begin -->", "<!-- deita-hub ablation end -->"


def test_push_report_to_a_new_repo_is_its_card_in_one_commit(tmp_path, hub_server, hub_env):
    path, out = cached_ablation(tmp_path)
    push_report(hub_env, path, out, "org/ablation-small")
    history = hub_server.history("org/ablation-small")
    assert [c["title"] for c in history] == ["Ablation results: small", "initial commit"]
    files = hub_server.files("org/ablation-small")
    assert set(files) == {".gitattributes", "README.md", "ablation/results.json", "assets/ablation.png"}
    assert files["README.md"].decode() == f"{BEGIN}\n{(out / 'README.md').read_text()}\n{END}\n".replace(
        "Per-arm results: `results.json`", "Per-arm results: `ablation/results.json`"
    )
    assert files["assets/ablation.png"] == (out / "assets" / "ablation.png").read_bytes()
    assert files["ablation/results.json"] == (out / "results.json").read_bytes()


def test_push_report_into_a_dataset_card_keeps_the_card_and_replaces_its_results_section(
    tmp_path, hub_server, hub_env
):
    repo, card = "org/deita-6k", "---\nlicense: mit\n---\n# Deita 6K\n\nHow it was selected.\n"
    hub_server.store.create_repo("dataset", repo, private=False, owner="org", author="deita-tester")
    hub_server.store.apply_commit(
        "dataset", repo, "main", title="card", message="", author="deita-tester", parent_commit=None,
        operations=[("file", {"path": "README.md", "content": base64.b64encode(card.encode()).decode()})],
    )  # fmt: skip
    path, out = cached_ablation(tmp_path)
    push_report(hub_env, path, out, repo)
    first = hub_server.files(repo)["README.md"].decode()
    assert first.startswith(card + "\n" + BEGIN + "\n## Results: ablation small\n"), first
    assert first.endswith(END + "\n") and "### held-out loss (lower is better)" in first
    assert "| deita | 1.100 | 0.141 |" in first and "![small](assets/ablation.png)" in first

    changed = {**NUMBERS, ("deita", 1): (0.8, [8.0, 8.0])}
    path, out = cached_ablation(tmp_path, changed)  # a rerun's results: the report changes
    card_edit = first.replace("How it was selected.", "How it was selected (edited on the Hub).")
    hub_server.store.apply_commit(
        "dataset", repo, "main", title="edit", message="", author="deita-tester", parent_commit=None,
        operations=[("file", {"path": "README.md", "content": base64.b64encode(card_edit.encode()).decode()})],
    )  # fmt: skip
    push_report(hub_env, path, out, repo)
    second = hub_server.files(repo)["README.md"].decode()
    assert second.count(BEGIN) == 1 and second.count(END) == 1 and second.count("## Results: ablation") == 1
    assert second.startswith(card_edit.split(BEGIN)[0] + BEGIN) and "(edited on the Hub)" in second
    assert "| deita | 1.000 | 0.283 |" in second and "| deita | 1.100 |" not in second
    titles = [c["title"] for c in hub_server.history(repo)]
    assert titles == ["Ablation results: small", "edit", "Ablation results: small", "card", "initial commit"]

    # A card the Hub fails to show (an error, not a missing card) is never replaced by the report alone.
    hub_server.add_fault("repo_info", status=500, times=1, repo_id=repo)
    failed = subprocess.run(
        [sys.executable, "-m", "deita_hub", "ablate", str(path), "--out", str(out), "--push", repo],
        capture_output=True, text=True, env=hub_env, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert failed.returncode == 1 and failed.stderr.strip().splitlines()[-1].startswith("error: "), (
        failed.stderr
    )
    assert "Traceback" not in failed.stderr and hub_server.files(repo)["README.md"].decode() == second


@pytest.mark.slow
def test_tiny_ablation_end_to_end_resume_and_changed_arm(tmp_path, cli_run):
    """The real steps, as few as prove it (one seed: the report's statistics are tested from cached steps above;
    each train or eval process costs ~15 s of imports on 2 cores): a killed ablation resumes its training, the
    report holds the per-arm results, an unchanged rerun runs nothing, a changed arm reruns alone through Ray."""
    path = write_ablation(tmp_path, seeds=(1,))
    out = tmp_path / "out"
    dry = cli_run("ablate", path, "--out", out, "--dry-run")
    assert "5 steps, 0 cached, 5 to run" in dry.stdout and not (out / "results.json").exists(), dry.stderr

    # Kill the ablation once the first training has saved a complete checkpoint (its deita_run.json is written
    # last: a checkpoint without it is removed on resume, and the training starts again from step 0); the rerun
    # resumes that training. The poll is short: the training's second and last step takes about a second.
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
        out.glob("steps/train-deita-s1-*/run/checkpoint-1/deita_run.json")
    ):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train_folder = next(out.glob("steps/train-deita-s1-*"))
    assert not (train_folder / "step.json").exists()  # killed mid-training: not marked done

    result = ablate(path, out)
    assert "cached: build recipe" in result.stderr
    log = next(out.glob("logs/train-deita-s1-*.log")).read_text()
    assert "--resume" in log and "resumed from checkpoint-1" in log

    results = json.loads((out / "results.json").read_text())
    loss = results["benchmarks"]["held-out loss"]["arms"]
    assert set(loss) == {"deita", "random"}
    for arm in ("deita", "random"):
        files = results["provenance"]["per_arm_results"][arm]
        per_seed = [json.loads((out / f).read_text())["suites"]["loss"]["loss"] for f in files]
        assert loss[arm]["per_seed"] == per_seed  # the report's numbers are the per-arm results'
    difference = loss["deita"]["per_seed"][0] - loss["random"]["per_seed"][0]
    assert loss["deita"]["vs_baseline"]["mean_difference"] == pytest.approx(difference)
    readme = (out / "README.md").read_text()
    assert "held-out loss" in readme and (out / "assets" / "ablation.png").stat().st_size > 1000

    # Unchanged: every step cached. One arm changed: only its steps run ...
    again = ablate(path, out)
    assert "running:" not in again.stderr and "cached: eval random seed 1" in again.stderr
    changed = write_ablation(
        tmp_path,
        seeds=(1,),
        arms=[
            {"name": "deita", "recipe": "recipe.yaml", "config": "deita-40"},
            {"name": "random", "recipe": "recipe.yaml", "config": "longest-40"},
        ],
    )
    # ... through Ray with --workers 2: its chain (train, eval) runs as a Ray task (one GPU each on a GPU cluster,
    # one CPU each here).
    pytest.importorskip("ray", reason="the [ray] extra runs arms in parallel")
    rerun = ablate(changed, out, "--workers", "2")
    ran = [line for line in rerun.stderr.splitlines() if line.startswith("running:")]
    assert ran == ["running: random seed 1 (train, eval)"], rerun.stderr
    assert "cached: train deita seed 1" in rerun.stderr and "cached: eval deita seed 1" in rerun.stderr
    results = json.loads((out / "results.json").read_text())
    assert (
        results["arms"][1]["config"] == "longest-40"
        and len(results["benchmarks"]["held-out loss"]["arms"]) == 2
    )
