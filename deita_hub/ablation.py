"""`deita-hub ablate`: a Deita subset against its baselines, trained and evaluated the same way, compared.

An ablation file names the arms (each a built dataset folder or Hub dataset + config, or a recipe to build
first + config), one training config, one eval suite and the seeds. Every arm is trained and evaluated
identically (only the data differs), once per seed.

Steps are cached by their inputs: a build by its recipe (and its local sources' sizes and times), a training by
the fingerprint of the arm's data (the bytes of the config's parquet files, or a Hub id and revision), the
training config, the seed and the package version, an evaluation by its training and its eval settings. Each
step runs in its own folder `ABL_DIR/steps/<kind>-<arm>-<key>` and is done when its `step.json` exists (written
last, atomically), so a killed ablation resumes at the step it stopped (a training from its last checkpoint, an
eval without regenerating answers) and changing one arm reruns only that arm's steps.

Training and evaluation run as `deita-hub train` / `deita-hub eval` processes: the same code path a user runs,
one model in memory at a time. With `--workers N` (N > 1) the arm-and-seed chains run through Ray, one GPU each
when the cluster has GPUs; otherwise one after another.

The comparison: per benchmark, the mean and spread over seeds (and judge runs, which `eval` reports), and the
paired difference of each arm against the baseline arm (paired by seed) with a bootstrap confidence interval.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deita_hub import __version__
from deita_hub.config import check_choices, coerce, load, read_mapping, unknown_keys
from deita_hub.errors import DeitaHubError
from deita_hub.io import write_text

log = logging.getLogger(__name__)

STEP_RECORD = "step.json"
RESULTS = "results.json"
PLOT = "assets/ablation.png"
# Benchmarks read from each eval's results.json: (name, where, higher is better).
METRICS = (
    ("held-out loss", ("suites", "loss", "loss"), False),
    ("MT-Bench", ("mt_bench",), True),
    ("AlpacaEval (%)", ("alpaca_eval",), True),
    ("Open LLM avg", ("open_llm_avg",), True),
)


@dataclass(frozen=True)
class ArmSpec:
    """One arm: the data it trains on."""

    name: str = field(metadata={"help": "the arm's name in the report, e.g. deita-6k, random-10k"})
    dataset: str | None = field(
        default=None, metadata={"help": "a built deita-hub dataset folder or a Hub dataset id"}
    )
    recipe: str | None = field(
        default=None,
        metadata={"help": "a recipe to build first: a path, or a packaged recipe's name (demo.yaml)"},
    )
    config: str | None = field(default=None, metadata={"help": "the dataset config (subset), e.g. 6k"})
    revision: str | None = field(default=None, metadata={"help": "Hub dataset: branch, tag or commit"})

    def __post_init__(self):
        problems = check_choices(self)
        if bool(self.dataset) == bool(self.recipe):
            problems.add("dataset", "or 'recipe': exactly one of them names the arm's data")
        if not self.name or "/" in self.name:
            problems.add("name", f"must be a plain name, got {self.name!r}")
        problems.raise_if_any()


@dataclass(frozen=True)
class Ablation:
    name: str
    path: Path
    arms: tuple[ArmSpec, ...]
    baseline: str
    train_config: str  # resolved path of the training YAML
    train_set: Mapping[str, Any]
    eval_settings: Mapping[str, Any]
    seeds: tuple[int, ...]
    bootstrap: int
    expected_device_hours: float | None


# --- reading the file -----------------------------------------------------------------------------------------

TOP_LEVEL = ("name", "arms", "baseline", "train", "eval", "seeds", "bootstrap", "expected_device_hours")


def _find(ablation_file: Path, value: str, folder: str) -> Path:
    """A recipe or training config: beside the ablation file, else as given, else a packaged one's name."""
    from deita_hub.resources import resolve_resource

    beside = (ablation_file.parent / value).resolve()
    if beside.is_file() and beside != ablation_file.resolve():
        return beside
    return resolve_resource(value, folder)


def _resolve(base: Path, value: str) -> str:
    candidate = (base / value).resolve()
    return str(candidate) if candidate.exists() or value.startswith((".", "/")) else value


def load_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file: every error is found here, before anything runs."""
    from deita_hub.evaluation.config import EvalConfig
    from deita_hub.hub import is_repo_id
    from deita_hub.training.config import load_config

    path = Path(path)
    source = str(path)
    data = read_mapping(path, "ablation file")
    unknown_keys(data, TOP_LEVEL, f"{source}: ")
    name = coerce(data.get("name", path.stem), str, f"{source}: 'name'")
    raw_arms = data.get("arms")
    if not isinstance(raw_arms, list) or len(raw_arms) < 2:
        raise DeitaHubError(f"{source}: 'arms' must list at least two arms (the selection and a baseline)")
    arms = []
    for i, entry in enumerate(raw_arms):
        where = f"arms[{i}]"
        if isinstance(entry, Mapping) and "eval" in entry:
            raise DeitaHubError(
                f"{source}: {where}: every arm is evaluated identically: set 'eval' once, at the top"
            )
        if isinstance(entry, Mapping) and "train" in entry:
            raise DeitaHubError(
                f"{source}: {where}: every arm is trained identically: set 'train' once, at the top"
            )
        arm = load(ArmSpec, entry, source=source, section=where)
        if arm.recipe:
            recipe = _find(path, arm.recipe, "dataset_scripts")
            if not recipe.is_file():
                raise DeitaHubError(f"{source}: {where}: recipe '{arm.recipe}' not found")
            arm = ArmSpec(arm.name, None, str(recipe), arm.config, arm.revision)
            _check_recipe_config(recipe, arm.config, f"{source}: {where}")
        else:
            dataset = _resolve(path.parent, arm.dataset)
            local = Path(dataset)
            if local.exists():
                _check_built_config(local, arm.config, f"{source}: {where}")
            elif not is_repo_id(arm.dataset):
                raise DeitaHubError(
                    f"{source}: {where}: dataset '{arm.dataset}' is neither a folder here nor a Hub dataset id"
                )
            arm = ArmSpec(arm.name, dataset, None, arm.config, arm.revision)
        arms.append(arm)
    names = [arm.name for arm in arms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DeitaHubError(f"{source}: arm names must differ, got {duplicates} twice")
    baseline = coerce(data.get("baseline", names[-1]), str, f"{source}: 'baseline'")
    if baseline not in names:
        raise DeitaHubError(f"{source}: 'baseline' {baseline!r} is not an arm ({', '.join(names)})")

    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        raise DeitaHubError(f"{source}: 'seeds' must be a non-empty list of integers, e.g. [1, 2, 3]")
    seeds = tuple(coerce(s, int, f"{source}: 'seeds[{i}]'") for i, s in enumerate(seeds))
    if len(set(seeds)) != len(seeds):
        raise DeitaHubError(f"{source}: 'seeds' repeats a seed: {list(seeds)}")

    train = data.get("train")
    if not isinstance(train, Mapping) or "config" not in train:
        raise DeitaHubError(
            f"{source}: 'train' needs 'config' (a training YAML) and optionally 'set' (overrides)"
        )
    unknown_keys(train, ("config", "set"), f"{source}: train: ")
    train_set = dict(train.get("set") or {})
    for key in ("dataset", "dataset_config", "dataset_revision", "seed", "output_dir", "push"):
        if key in train_set:
            raise DeitaHubError(f"{source}: train.set: '{key}' is set per arm and seed by the ablation")
    config_path = _find(path, str(train["config"]), "configs")
    try:  # the training config is checked now, with a stand-in dataset
        load_config(config_path, {**train_set, "dataset": "arm.jsonl"})
    except DeitaHubError as exc:
        raise DeitaHubError(f"{source}: train: {exc}") from None

    eval_settings = data.get("eval")
    if not isinstance(eval_settings, Mapping) or not eval_settings.get("suite"):
        raise DeitaHubError(f"{source}: 'eval' needs a 'suite' (e.g. [loss, mt-bench]) and its settings")
    eval_settings = dict(eval_settings)
    for key in ("model", "out", "push", "revision"):
        if key in eval_settings:
            raise DeitaHubError(f"{source}: eval: '{key}' is set per arm and seed by the ablation")
    for key in (
        "dataset",
        "mt_bench_questions",
        "alpaca_eval_data",
        "judge_serve",
    ):  # files beside the ablation
        if isinstance(eval_settings.get(key), str):
            eval_settings[key] = _resolve(path.parent, eval_settings[key])
    load(
        EvalConfig, {**eval_settings, "model": "m", "out": "o"}, source=source, section="eval"
    )  # checks it all
    bootstrap = coerce(data.get("bootstrap", 10000), int, f"{source}: 'bootstrap'")
    hours = data.get("expected_device_hours")
    return Ablation(
        name=name,
        path=path,
        arms=tuple(arms),
        baseline=baseline,
        train_config=str(config_path),
        train_set=train_set,
        eval_settings=eval_settings,
        seeds=seeds,
        bootstrap=max(100, bootstrap),
        expected_device_hours=None
        if hours is None
        else coerce(hours, float, f"{source}: 'expected_device_hours'"),
    )


def _check_recipe_config(recipe: Path, config: str | None, where: str) -> None:
    from deita_hub.recipes import load_recipe

    names = [subset.name for subset in load_recipe(recipe).subsets]
    if config is None or config not in names:
        raise DeitaHubError(f"{where}: 'config' must name one of the recipe's configs ({', '.join(names)})")


def _check_built_config(folder: Path, config: str | None, where: str) -> None:
    if not folder.is_dir():
        raise DeitaHubError(f"{where}: dataset {folder} is not a folder")
    configs = sorted(p.name for p in folder.iterdir() if p.is_dir() and list(p.glob("*.parquet")))
    if configs and (config is None or config not in configs):
        raise DeitaHubError(
            f"{where}: 'config' must name one of the dataset's configs ({', '.join(configs)})"
        )


# --- the plan ---------------------------------------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Step:
    kind: str  # build | train | eval
    arm: str
    seed: int | None
    key: str
    folder: Path
    inputs: dict[str, Any]
    after: list[Step] = field(default_factory=list)
    recipe_path: str | None = None  # build steps: the recipe (absolute; not recorded)

    @property
    def label(self) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{self.kind} {self.arm}{seed}"

    @property
    def done(self) -> bool:
        return (self.folder / STEP_RECORD).is_file()

    def record(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.folder / STEP_RECORD).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


def _recipe_key(recipe: str) -> str:
    from deita_hub.recipes import load_recipe

    loaded = load_recipe(recipe)
    sources = []
    for src in loaded.pool.sources:
        p = Path(src)
        if p.exists():
            files = [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
            sources.append([(str(q.name), q.stat().st_size, q.stat().st_mtime_ns) for q in files])
        else:
            sources.append(src)
    return _digest(loaded.to_dict(), Path(recipe).read_bytes().hex(), sources, __version__)


def _data_fingerprint(dataset: str, config: str | None, revision: str | None) -> str:
    """The bytes of the config's parquet files for a local folder, or the Hub id and revision."""
    folder = Path(dataset)
    if not folder.exists():
        return f"hub:{dataset}@{revision or 'main'}:{config}"
    digest = hashlib.sha256()
    files = sorted((folder / config).glob("*.parquet")) if config else sorted(folder.rglob("*.parquet"))
    if not files and folder.is_file():
        files = [folder]
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def plan(ablation: Ablation, out: Path) -> list[Step]:
    """Every step in order (builds, then each arm's train and eval per seed), with its cache key and folder."""
    steps: list[Step] = []
    builds: dict[str, Step] = {}
    train_file = Path(ablation.train_config).read_text(encoding="utf-8")
    for arm in ablation.arms:
        build = None
        if arm.recipe:
            key = _recipe_key(arm.recipe)
            build = builds.get(key)
            if build is None:
                stem = Path(arm.recipe).stem
                folder = out / "steps" / f"build-{stem}-{key}"
                build = Step("build", stem, None, key, folder, {"recipe": Path(arm.recipe).name})
                build.recipe_path = arm.recipe
                builds[key] = build
                steps.append(build)
        for seed in ablation.seeds:
            if build is not None:
                data_key = f"build:{build.key}:{arm.config}"  # the build's fingerprint, known before it runs
                dataset = str(build.folder / "dataset")
            else:
                data_key = _data_fingerprint(arm.dataset, arm.config, arm.revision)
                dataset = arm.dataset
            train_inputs = {
                "data": data_key,
                "train_config": train_file,
                "set": dict(ablation.train_set),
                "seed": seed,
                "version": __version__,
            }
            train_key = _digest(train_inputs)
            train = Step(
                "train",
                arm.name,
                seed,
                train_key,
                out / "steps" / f"train-{arm.name}-s{seed}-{train_key}",
                {"dataset": dataset, "config": arm.config, "revision": arm.revision, **train_inputs},
                [build] if build else [],
            )
            eval_key = _digest(train_key, dict(ablation.eval_settings), __version__)
            evaluation = Step(
                "eval",
                arm.name,
                seed,
                eval_key,
                out / "steps" / f"eval-{arm.name}-s{seed}-{eval_key}",
                {"train": train_key, "eval": dict(ablation.eval_settings)},
                [train],
            )
            steps += [train, evaluation]
    return steps


# --- running steps ----------------------------------------------------------------------------------------------


def _command() -> list[str]:
    return [sys.executable, "-m", "deita_hub"]


def _run(args: list[str], log_file: Path) -> None:
    """A deita-hub command in its own process; its output goes to the step's log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"$ deita-hub {' '.join(args)}\n")
        handle.flush()
        result = subprocess.run(
            [*_command(), *args], stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
    if result.returncode:
        tail = log_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        raise DeitaHubError(
            f"`deita-hub {args[0]}` failed (exit {result.returncode}): {tail[0] if tail else ''} (log: {log_file})"
        )


def _yaml_value(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def run_step(step: Step, ablation: Ablation, judge: tuple[str, str] | None = None) -> dict[str, Any]:
    """Run one step (resuming what an earlier run left) and mark it done.

    judge: (url, model) of a judge already served for the whole ablation, used instead of `judge_serve`."""
    started = time.time()
    folder = step.folder
    logs = folder.parent.parent / "logs" / f"{folder.name}.log"
    if step.kind == "build":
        from deita_hub.dataset import build

        result = build(step.recipe_path, folder / "dataset", overwrite=True, progress=False)
        extra = {"subsets": {s["name"]: s["rows"] for s in result.record["subsets"]}}
    elif step.kind == "train":
        folder.mkdir(parents=True, exist_ok=True)
        run_dir = folder / "run"
        args = ["train", ablation.train_config, "--dataset", step.inputs["dataset"], "--out", str(run_dir)]
        if step.inputs.get("config"):
            args += ["--dataset-config", step.inputs["config"]]
        if step.inputs.get("revision"):
            args += ["--dataset-revision", step.inputs["revision"]]
        args += ["--seed", str(step.seed)]
        for key, value in ablation.train_set.items():
            args += ["--set", f"{key}={_yaml_value(value)}"]
        if run_dir.exists() and any(run_dir.glob("checkpoint-*")):
            args.append("--resume")  # a killed ablation continues the training from its last checkpoint
        elif run_dir.exists():
            shutil.rmtree(run_dir)
        _run(args, logs)
        extra = _train_cost(run_dir)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        args = eval_args(step, ablation, judge)
        _run(args, logs)
        extra = {}
    record = {
        "kind": step.kind,
        "arm": step.arm,
        "seed": step.seed,
        "key": step.key,
        "inputs": {k: v for k, v in step.inputs.items() if k != "train_config"},
        "seconds": round(time.time() - started, 3),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    write_text(folder / STEP_RECORD, json.dumps(record, indent=2, default=str) + "\n")
    return record


def eval_args(step: Step, ablation: Ablation, judge: tuple[str, str] | None = None) -> list[str]:
    """The `deita-hub eval` command line of an eval step: the same settings for every arm."""
    run_dir = step.after[0].folder / "run"
    args = ["eval", str(run_dir), "--out", str(step.folder / "eval")]
    settings = dict(ablation.eval_settings)
    if judge is not None and settings.pop("judge_serve", None):
        settings.update(judge_url=judge[0], judge_model=judge[1])
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list | tuple):
            args += [flag, ",".join(map(str, value))]
        elif isinstance(value, Mapping):
            for k, v in value.items():
                args += [flag, f"{k}={_yaml_value(v)}"]
        elif isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif value is not None:
            args += [flag, str(value)]
    return args


def _train_cost(run_dir: Path) -> dict[str, Any]:
    from deita_hub.records import RUN_RECORD

    try:
        record = json.loads((run_dir / "final" / RUN_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    results = record.get("results", {})
    runtime = results.get("train_runtime_s") or results.get("runtime_s")
    devices = record.get("world_size") or record.get("environment", {}).get("world_size") or 1
    return {"train_runtime_s": runtime, "devices": devices}


def _claim(out: Path) -> None:
    """One ablation per folder at a time."""
    from deita_hub.io import claim_folder

    claim_folder(out, "an ablation")


def run(
    ablation: Ablation,
    out: str | Path,
    *,
    dry_run: bool = False,
    workers: int = 1,
    echo=print,
) -> dict[str, Any] | None:
    out = Path(out)
    steps = plan(ablation, out)
    if dry_run:
        for step in steps:
            echo(f"{'cached ' if step.done else 'to run  '} {step.label:<32} {step.folder.relative_to(out)}")
        todo = sum(not s.done for s in steps)
        echo(f"{len(steps)} steps, {len(steps) - todo} cached, {todo} to run")
        if ablation.expected_device_hours:
            echo(
                f"expected: about {ablation.expected_device_hours:g} device-hours (the ablation file's estimate)"
            )
        return None
    out.mkdir(parents=True, exist_ok=True)
    _claim(out)
    todo = [s for s in steps if not s.done]
    # Progress on the logger (stderr, hidden by -q); `echo` prints results only.
    for step in steps:
        if step.done:
            log.info("cached: %s", step.label)
    if workers > 1:
        _run_parallel(todo, ablation, workers)
    else:
        with _shared_judge(ablation, out, todo) as judge:
            for step in todo:
                log.info("running: %s", step.label)
                record = run_step(step, ablation, judge)
                log.info("done: %s (%.0f s)", step.label, record["seconds"])
    return report(ablation, out, steps)


@contextmanager
def _shared_judge(ablation: Ablation, out: Path, todo: list[Step]) -> Iterator[tuple[str, str] | None]:
    """One local judge (`judge_serve`) for every eval of a sequential ablation, started when the first eval
    needs it, instead of one server start per eval (about 20 s each on 2 CPU cores). Parallel chains, possibly on
    other machines, keep serving their own."""
    name = ablation.eval_settings.get("judge_serve")
    suite = ablation.eval_settings.get("suite") or []
    judged = {"mt-bench", "alpaca-eval"} & set(suite.split(",") if isinstance(suite, str) else suite)
    if not name or not judged or not any(step.kind == "eval" for step in todo):
        yield None
        return
    from deita_hub.evaluation.local_judge import JudgeServer, resolve_judge_model

    folder = resolve_judge_model(name, out / "judge")
    with JudgeServer(folder) as server:
        yield server.url, folder


def _run_parallel(todo: list[Step], ablation: Ablation, workers: int) -> None:
    """Builds first, then each arm-and-seed chain (train, eval) as a Ray task: one GPU each when there are GPUs."""
    from deita_hub.errors import require

    ray = require("ray", "ray", "Running ablation arms in parallel (--workers)")
    for step in [s for s in todo if s.kind == "build"]:
        log.info("running: %s", step.label)
        run_step(step, ablation)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    gpus = ray.cluster_resources().get("GPU", 0)
    remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(_chain)
    chains: dict[tuple[str, int], list[Step]] = {}
    for step in todo:
        if step.kind != "build":
            chains.setdefault((step.arm, step.seed), []).append(step)
    pending = {}
    queue = list(chains.items())
    while queue or pending:
        while queue and len(pending) < workers:
            (arm, seed), chain = queue.pop(0)
            log.info("running: %s seed %d (%s)", arm, seed, ", ".join(s.kind for s in chain))
            pending[remote.remote(chain, ablation)] = (arm, seed)
        ready, _ = ray.wait(list(pending), num_returns=1)
        arm, seed = pending.pop(ready[0])
        ray.get(ready[0])
        log.info("done: %s seed %d", arm, seed)


def _chain(chain: list[Step], ablation: Ablation) -> None:
    for step in chain:
        run_step(step, ablation)


# --- the comparison ---------------------------------------------------------------------------------------------


def _get(data: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return float(data) if isinstance(data, int | float) else None


def _judge_runs(results: dict) -> list[float]:
    runs = results.get("suites", {}).get("mt-bench", {}).get("score", {}).get("runs") or []
    return [float(v) for v in runs if isinstance(v, int | float)]


def bootstrap_ci(diffs: list[float], resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean paired difference, resampling the pairs."""
    import numpy as np

    values = np.asarray(diffs, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def report(ablation: Ablation, out: Path, steps: list[Step]) -> dict[str, Any]:
    """results.json, README.md and the plot from the steps' records and the per-arm eval results."""
    import statistics

    evals = {(s.arm, s.seed): s for s in steps if s.kind == "eval"}
    per_arm: dict[str, dict[str, Any]] = {}
    for arm in ablation.arms:
        runs = []
        for seed in ablation.seeds:
            step = evals[(arm.name, seed)]
            results = json.loads((step.folder / "eval" / RESULTS).read_text(encoding="utf-8"))
            runs.append(
                {
                    "seed": seed,
                    "results": results,
                    "results_file": str((step.folder / "eval" / RESULTS).relative_to(out)),
                }
            )
        per_arm[arm.name] = {"runs": runs}
    benchmarks: dict[str, Any] = {}
    for name, where, higher in METRICS:
        table = {}
        for arm in ablation.arms:
            values = [_get(r["results"], where) for r in per_arm[arm.name]["runs"]]
            if any(v is None for v in values):
                continue
            judge = (
                [v for r in per_arm[arm.name]["runs"] for v in _judge_runs(r["results"])]
                if name == "MT-Bench"
                else []
            )
            table[arm.name] = {
                "per_seed": values,
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                **(
                    {"judge_runs": judge, "judge_std": statistics.stdev(judge) if len(judge) > 1 else 0.0}
                    if judge
                    else {}
                ),
            }
        if not table or ablation.baseline not in table:
            continue
        base = table[ablation.baseline]["per_seed"]
        for arm_name, row in table.items():
            if arm_name == ablation.baseline:
                continue
            diffs = [a - b for a, b in zip(row["per_seed"], base, strict=True)]
            low, high = bootstrap_ci(diffs, ablation.bootstrap)
            row["vs_baseline"] = {
                "mean_difference": statistics.fmean(diffs),
                "ci95": [low, high],
                "pairs": len(diffs),
            }
        benchmarks[name] = {"higher_is_better": higher, "arms": table}
    costs = {}
    for arm in ablation.arms:
        train = [s.record() or {} for s in steps if s.kind == "train" and s.arm == arm.name]
        evals_ = [s.record() or {} for s in steps if s.kind == "eval" and s.arm == arm.name]
        build = next(
            (
                s.record() or {}
                for s in steps
                if s.kind == "build" and arm.recipe and Path(arm.recipe).stem == s.arm
            ),
            {},
        )
        train_hours = (
            sum((r.get("train_runtime_s") or r.get("seconds") or 0) * (r.get("devices") or 1) for r in train)
            / 3600
        )
        costs[arm.name] = {
            "build_wall_clock_s": build.get("seconds"),  # scoring, embedding and selection; shared per recipe
            "training_device_hours": round(train_hours, 4),
            "eval_wall_clock_s": round(sum(r.get("seconds") or 0 for r in evals_), 3),
        }
    results = {
        "schema": 1,
        "ablation": ablation.name,
        "baseline": ablation.baseline,
        "seeds": list(ablation.seeds),
        "arms": [asdict(a) | {"recipe": a.recipe and Path(a.recipe).name} for a in ablation.arms],
        "benchmarks": benchmarks,
        "costs": costs,
        "provenance": {
            "deita_hub": __version__,
            "ablation_file": ablation.path.name,
            "training_config": Path(ablation.train_config).name,
            "train_overrides": dict(ablation.train_set),
            "eval_settings": {key: _shown(value) for key, value in ablation.eval_settings.items()},
            "steps": [{"kind": s.kind, "arm": s.arm, "seed": s.seed, "key": s.key} for s in steps],
            "per_arm_results": {
                name: [r["results_file"] for r in arm["runs"]] for name, arm in per_arm.items()
            },
            "generated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }
    write_text(out / RESULTS, json.dumps(results, indent=2) + "\n")
    plotted = _plot(results, out / PLOT)
    write_text(out / "README.md", report_markdown(results, plot=plotted))
    return results


def _shown(value: Any) -> Any:
    """A setting as the report shows it: a local file by its name, never an absolute path."""
    if isinstance(value, str) and os.path.isabs(value):
        return Path(value).name
    return value


def _plot(results: dict, path: Path) -> bool:
    benchmarks = results["benchmarks"]
    if not benchmarks:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4 * len(benchmarks), 3.2), squeeze=False)
    for ax, (name, bench) in zip(axes[0], benchmarks.items(), strict=True):
        arms = list(bench["arms"])
        means = [bench["arms"][a]["mean"] for a in arms]
        stds = [bench["arms"][a]["std"] for a in arms]
        ax.bar(arms, means, yerr=stds, capsize=4, color="#4878a8")
        ax.set_title(f"{name} ({'higher' if bench['higher_is_better'] else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.suptitle(f"{results['ablation']}: mean ± std over seeds {results['seeds']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from deita_hub.io import atomic_file

    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return True


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}" if abs(value) < 10 else f"{value:.2f}"


def report_markdown(results: dict, *, plot: bool, results_file: str = RESULTS) -> str:
    lines = [
        f"# Ablation: {results['ablation']}",
        "",
        f"Every arm trained and evaluated identically (seeds {results['seeds']}); only the data differs. "
        f"Differences are paired by seed against **{results['baseline']}**, with a 95% bootstrap interval.",
        "",
    ]
    for name, bench in results["benchmarks"].items():
        lines += [
            f"## {name} ({'higher' if bench['higher_is_better'] else 'lower'} is better)",
            "",
            f"| arm | mean | std | per seed | vs {results['baseline']} (95% CI) |",
            "|---|---|---|---|---|",
        ]
        for arm, row in bench["arms"].items():
            diff = row.get("vs_baseline")
            diff_text = (
                f"{diff['mean_difference']:+.3f} [{diff['ci95'][0]:+.3f}, {diff['ci95'][1]:+.3f}]"
                if diff
                else "baseline"
            )
            per_seed = ", ".join(_fmt(v) for v in row["per_seed"])
            lines.append(f"| {arm} | {_fmt(row['mean'])} | {_fmt(row['std'])} | {per_seed} | {diff_text} |")
        lines.append("")
    if plot:
        lines += [f"![{results['ablation']}]({PLOT})", ""]
    lines += [
        "## Cost",
        "",
        "Build: the wall-clock of scoring, embedding and selecting (arms built from one recipe share one build); "
        "training: device-hours summed over seeds; eval: wall-clock summed over seeds.",
        "",
        "| arm | build (s) | training (device-hours) | eval (s) |",
        "|---|---|---|---|",
    ]
    for arm, cost in results["costs"].items():
        lines.append(
            f"| {arm} | {_fmt(cost['build_wall_clock_s'])} | {cost['training_device_hours']:.4f} | "
            f"{_fmt(cost['eval_wall_clock_s'])} |"
        )
    prov = results["provenance"]
    lines += [
        "",
        "## Provenance",
        "",
        f"deita-hub {prov['deita_hub']}; ablation file `{prov['ablation_file']}`; training config "
        f"`{prov['training_config']}` with overrides `{json.dumps(prov['train_overrides'])}`; eval settings "
        f"`{json.dumps(prov['eval_settings'])}`. Per-arm results: `{results_file}` lists each eval's results.json.",
        "",
    ]
    return "\n".join(lines)


REPORT_BEGIN, REPORT_END = "<!-- deita-hub ablation begin -->", "<!-- deita-hub ablation end -->"
PUSHED_RESULTS = "ablation/" + RESULTS  # where --push puts results.json in the repo


def report_card(existing: str | None, results: dict, *, plot: bool) -> str:
    """The repo card with the report in it, between markers so the next push replaces it: the whole card when the
    repo has none (or only an earlier report), else a Results section of the existing card, the rest kept."""
    if existing is not None and existing.count(REPORT_BEGIN) != existing.count(REPORT_END):
        raise DeitaHubError(
            f"the repo card holds {REPORT_BEGIN!r} and {REPORT_END!r} unpaired: mend the card so the report's "
            "section can be replaced, then push again"
        )
    before, after = existing or "", ""
    if REPORT_BEGIN in before:
        before, rest = before.split(REPORT_BEGIN, 1)
        after = rest.split(REPORT_END, 1)[1].removeprefix("\n")
    section = report_markdown(results, plot=plot, results_file=PUSHED_RESULTS)
    if not (before + after).strip():
        return f"{REPORT_BEGIN}\n{section}\n{REPORT_END}\n"
    body = section.replace("# Ablation:", "## Results: ablation", 1).replace("\n## ", "\n### ")
    block = f"{REPORT_BEGIN}\n{body}\n{REPORT_END}\n"
    if existing is not None and REPORT_BEGIN in existing:
        return before + block + after
    return before.rstrip("\n") + "\n\n" + block


def push_report(out: Path, repo_id: str, *, repo_type: str = "dataset") -> str:
    """Publish the report in one commit: the card (`report_card`), results.json and the plot."""
    import tempfile

    from deita_hub.hub import NotOnHubError, check_repo, download, push_folder

    results = json.loads((out / RESULTS).read_text(encoding="utf-8"))
    head = None
    try:
        # The card at the head commit, by its hash: never a cached older card when the Hub fails to answer.
        head = check_repo(repo_id, repo_type=repo_type)
        card_file = download(repo_id, repo_type=repo_type, revision=head, filename="README.md")
        existing = Path(card_file).read_text(encoding="utf-8")
    except NotOnHubError:  # no repo or no card yet; any other failure (offline, unreachable) stops the push
        existing = None
    card = report_card(existing, results, plot=(out / PLOT).exists())
    with tempfile.TemporaryDirectory() as tmp:
        stage = Path(tmp)
        (stage / "README.md").write_text(card, encoding="utf-8")
        (stage / PUSHED_RESULTS).parent.mkdir()
        shutil.copy(out / RESULTS, stage / PUSHED_RESULTS)
        if (out / PLOT).exists():
            (stage / PLOT).parent.mkdir()
            shutil.copy(out / PLOT, stage / PLOT)
        result = push_folder(
            stage,
            repo_id,
            repo_type=repo_type,
            commit_message=f"Ablation results: {results['ablation']}",
            expected_head=head,  # a card edited on the Hub since it was read is never overwritten
        )
    return result.commit_url
