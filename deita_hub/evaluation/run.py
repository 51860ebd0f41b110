"""`run_eval(config)`: the library entry point of `deita-hub eval`.

    OUT/mt_bench/model_answer/<model>.jsonl      FastChat's answer format
    OUT/mt_bench/model_judgment/<judge>_single.jsonl   one line per (question, turn, judge run)
    OUT/alpaca_eval/model_outputs.json           alpaca_eval's input format (+ its annotations, leaderboard)
    OUT/open_llm/results.json                    lm-eval's scores per task
    OUT/results.json                             every score with its spread and provenance
    OUT/README.md                                a short summary

results.json is also an eval-results file of `deita-hub card` (its `mt_bench`, `alpaca_eval`, `open_llm_avg`,
`source` and `baselines` keys are the card's; `suites` and `provenance` hold the detail). A rerun with the same
OUT resumes: answers and judgments already written are kept, finished lm-eval and loss results are reused.
When MODEL is a training run (OUTPUT_DIR/final/deita_run.json) or a folder with its run record, the card there
is regenerated from results.json; `push` then uploads that card (README.md and its loss plot) in one commit.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError
from deita_hub.evaluation.config import OPEN_LLM_TASKS, EvalConfig
from deita_hub.io import write_text

log = logging.getLogger(__name__)

RESULTS = "results.json"
_VERSIONED = ("deita-hub", "torch", "transformers", "vllm", "lm_eval", "alpaca_eval", "openai", "datasets")


@dataclass
class EvalReport:
    out: Path
    results: dict[str, Any]
    card: Path | None = None
    pushed_commit: str | None = None
    suites: list[str] = field(default_factory=list)

    @property
    def results_file(self) -> Path:
        return self.out / RESULTS


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict[str, str | None]:
    found = {}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _display(name: str | None) -> str | None:
    """A model or endpoint as it may appear in results and cards: a local path by its folder name, no userinfo."""
    if name is None:
        return None
    if os.path.isabs(name) or os.path.exists(name):
        return Path(name).name
    return re.sub(r"//[^/@]+@", "//", name)


def resolve_model(model: str) -> tuple[str, Path | None]:
    """(the weights to load, the folder whose card to regenerate or None)."""
    path = Path(model)
    if (path / "final" / "deita_run.json").is_file():
        return str(path / "final"), path / "final"
    if (path / "deita_run.json").is_file():
        return str(path), path
    return model, None


def run_eval(config: EvalConfig) -> EvalReport:
    """Evaluate `config.model` on `config.suite`; with `judge_serve`, the judge runs on this machine meanwhile."""
    if not config.judge_serve or not {"mt-bench", "alpaca-eval"} & set(config.suite):
        return _run_eval(config)
    from dataclasses import replace

    from deita_hub.evaluation.local_judge import JudgeServer, resolve_judge_model

    folder = resolve_judge_model(config.judge_serve, Path(config.out))
    with JudgeServer(folder) as server:  # the server knows the model by the folder it serves
        return _run_eval(replace(config, judge_serve=None, judge_url=server.url, judge_model=folder))


def _run_eval(config: EvalConfig) -> EvalReport:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path, card_folder = resolve_model(config.model)
    model_id = _display(config.model.rstrip("/")).replace("/", "--")
    judge_url = _display(config.judge_url)
    started = _now()
    previous = _read_previous(out / RESULTS)
    suites: dict[str, Any] = {}
    generator = None

    def get_generator():
        nonlocal generator
        if generator is None:
            from deita_hub.evaluation.answers import load_generator

            generator = load_generator(
                model_path,
                revision=config.revision,
                backend=config.backend,
                dtype=config.dtype,
                device=config.device,
                batch_size=config.batch_size,
                max_new_tokens=config.max_new_tokens,
                seed=config.seed,
                vllm_options=config.vllm_options,
            )
        return generator

    def close_generator():
        nonlocal generator
        if generator is not None:
            generator.close()
            generator = None

    if "mt-bench" in config.suite:
        suites["mt-bench"] = _mt_bench(config, out, model_id, get_generator, judge_url)
    if "alpaca-eval" in config.suite:
        suites["alpaca-eval"] = _alpaca_eval(config, out, model_id, get_generator, judge_url)
    if "open-llm" in config.suite:
        # lm-eval loads the model itself: the answer engine gives its memory back first (a GPU holds one vLLM).
        close_generator()
        suites["open-llm"] = _open_llm(config, out, model_path, previous.get("suites", {}).get("open-llm"))
    if "loss" in config.suite:
        if config.backend == "vllm":  # the loss runs on transformers: vLLM gives its memory back first
            close_generator()
        suites["loss"] = _loss(config, model_path, get_generator)
    close_generator()

    for name, entry in suites.items():
        entry["headline"] = _headline(name, entry)
    results = _results(config, model_id, suites, started)
    write_text(out / RESULTS, json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    write_text(out / "README.md", summary_markdown(results))
    report = EvalReport(out=out, results=results, suites=list(suites))
    if card_folder is not None:
        from deita_hub.cards import write_model_card

        report.card = write_model_card(card_folder, eval_results=out / RESULTS)
    if config.push:
        report.pushed_commit = push_card(config.push, out / RESULTS, card_folder)
    return report


def _read_previous(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _judge_client(config: EvalConfig):
    from deita_hub.evaluation.judge import JudgeClient

    return JudgeClient(
        url=config.judge_url,
        model=config.judge_model,
        api_key_env=config.judge_api_key_env,
        retries=config.judge_retries,
        timeout=config.judge_timeout,
        base_delay=float(os.environ.get("DEITA_HUB_RETRY_BASE_DELAY", "1.0")),
        max_delay=float(os.environ.get("DEITA_HUB_RETRY_MAX_DELAY", "30.0")),
    )


def _mt_bench(config, out, model_id, get_generator, judge_url) -> dict:
    from deita_hub.evaluation import mt_bench

    started = _now()
    questions = mt_bench.load_questions(config.mt_bench_questions, limit=config.limit)
    folder = out / "mt_bench"
    answers = mt_bench.generate_answers(
        _Lazy(get_generator), questions, folder / "model_answer" / f"{model_id}.jsonl", model_id
    )
    client = _judge_client(config)
    judge_name = _display(config.judge_model).replace("/", "--")
    judgments = mt_bench.judge_answers(
        client,
        questions,
        answers,
        folder / "model_judgment" / f"{judge_name}_single.jsonl",
        runs=config.judge_runs,
        model_id=model_id,
        parallel=config.judge_parallel,
        max_tokens=config.judge_max_tokens,
    )
    summary = mt_bench.summarise(questions, judgments, config.judge_runs)
    return {
        **summary,
        "questions": len(questions),
        "question_source": _display(config.mt_bench_questions),
        "judge": {"model": _display(config.judge_model), "url": judge_url, "runs": config.judge_runs},
        "engine": f"deita-hub (FastChat llm_judge protocol, single-answer grading), answers by {config.backend}",
        "started": started,
        "finished": _now(),
    }


class _Lazy:
    """Loads the model only when answers are actually missing (a resumed eval may need none)."""

    def __init__(self, factory):
        self.factory = factory

    def answer(self, conversations, temperature=0.0):
        return self.factory().answer(conversations, temperature)


def _alpaca_eval(config, out, model_id, get_generator, judge_url) -> dict:
    from deita_hub.evaluation import alpaca_eval

    started = _now()
    folder = out / "alpaca_eval"
    reference = alpaca_eval.load_reference(config.alpaca_eval_data, limit=config.limit)
    outputs = alpaca_eval.generate_outputs(
        _Lazy(get_generator), reference, folder / "model_outputs.json", model_id
    )
    scores = alpaca_eval.annotate(
        outputs,
        reference,
        folder,
        annotator=config.alpaca_eval_annotator,
        judge_url=config.judge_url,
        judge_model=config.judge_model if config.judge_url else None,
        api_key_env=config.judge_api_key_env,
    )
    return {
        **scores,
        "annotator": _display(config.alpaca_eval_annotator),
        "judge": {"model": _display(config.judge_model) if config.judge_url else None, "url": judge_url},
        "reference_source": _display(config.alpaca_eval_data),
        "engine": "alpaca_eval",
        "started": started,
        "finished": _now(),
    }


def _open_llm(config, out, model_path, previous: dict | None) -> dict:
    from deita_hub.evaluation import open_llm

    wanted = {
        "tasks": list(config.open_llm_tasks),
        "limit": config.limit,
        "model": _display(config.model),
        "backend": config.open_llm_backend,
    }
    if previous and previous.get("request") == wanted:
        log.info("open-llm: reusing the finished lm-eval results in %s", RESULTS)
        return previous
    started = _now()
    scores = open_llm.run_tasks(
        model_path,
        config.open_llm_shots(),
        revision=config.revision,
        backend=config.open_llm_backend,
        dtype=config.dtype,
        device=config.device,
        batch_size=config.batch_size,
        include=config.lm_eval_include,
        limit=config.limit,
        seed=config.seed,
        vllm_options=config.vllm_options,
    )
    result = {**scores, "request": wanted, "started": started, "finished": _now()}
    write_text(out / "open_llm" / RESULTS, json.dumps(result, indent=2) + "\n")
    return result


def _loss(config, model_path, get_generator) -> dict:
    from deita_hub.evaluation.loss import held_out_loss

    started = _now()
    if config.backend == "vllm":  # the loss needs logits of every position: transformers on the same weights
        from deita_hub.evaluation.answers import load_generator

        generator = load_generator(
            model_path,
            revision=config.revision,
            backend="transformers",
            dtype=config.dtype,
            device=config.device,
            batch_size=config.batch_size,
            max_new_tokens=1,
        )
    else:
        generator = get_generator()
    scores = held_out_loss(
        generator.model,
        generator.tokenizer,
        config.dataset,
        split=config.dataset_split,
        max_length=config.max_length,
        batch_size=config.batch_size,
        limit=config.limit,
    )
    scores["dataset"]["source"] = _display(scores["dataset"]["source"])
    return {**scores, "engine": "transformers", "started": started, "finished": _now()}


def _results(config: EvalConfig, model_id: str, suites: dict, started: str) -> dict:
    from deita_hub.cards.model import PAPER_BASELINES

    mt = suites.get("mt-bench", {}).get("score", {}).get("median")
    alpaca = suites.get("alpaca-eval", {}).get("win_rate")
    open_llm = suites.get("open-llm")
    # The card's "OpenLLM (Avg.)" is the six leaderboard tasks at their shots; any other task set stays out of it.
    open_llm_avg = (
        open_llm["average"] if open_llm and tuple(config.open_llm_tasks) == OPEN_LLM_TASKS else None
    )
    parts = []
    if mt is not None:
        judge = suites["mt-bench"]["judge"]
        parts.append(f"MT-Bench judged by {judge['model']} (median of {judge['runs']} runs)")
    if alpaca is not None:
        parts.append(f"AlpacaEval by alpaca_eval ({suites['alpaca-eval']['annotator']})")
    if open_llm_avg is not None:
        parts.append("Open LLM tasks by lm-evaluation-harness")
    settings = config.public()
    for key in (
        "model",
        "out",
        "mt_bench_questions",
        "alpaca_eval_data",
        "alpaca_eval_annotator",
        "dataset",
        "judge_model",
        "judge_url",
    ):
        settings[key] = _display(settings[key])
    settings["lm_eval_include"] = [_display(p) for p in settings["lm_eval_include"]]
    return {
        "schema": 1,
        "model": _display(config.model),
        "revision": config.revision,
        "mt_bench": mt,
        "alpaca_eval": alpaca,
        "open_llm_avg": open_llm_avg,
        "source": f"deita-hub eval, {started[:10]}: " + "; ".join(parts) if parts else None,
        "baselines": [dict(row) for row in PAPER_BASELINES],
        "suites": suites,
        "provenance": {"started": started, "finished": _now(), "versions": _versions(), "settings": settings},
    }


def summary_markdown(results: dict) -> str:
    lines = [f"# Evaluation of {results['model']}", ""]
    suites = results["suites"]
    if "mt-bench" in suites:
        mt = suites["mt-bench"]
        s = mt["score"]
        lines.append(
            f"- MT-Bench: {_num(s['median'])} (median of {mt['judge']['runs']} judge runs, "
            f"min {_num(s['min'])}, max {_num(s['max'])}; judge {mt['judge']['model']}; "
            f"{mt['failures']} of {mt['judgments']} judgments without a rating)"
        )
        for name, cat in mt["categories"].items():
            lines.append(f"  - {name}: {_num(cat['median'])} ({_num(cat['min'])}–{_num(cat['max'])})")
    if "alpaca-eval" in suites:
        a = suites["alpaca-eval"]
        lines.append(
            f"- AlpacaEval win rate: {_num(a['win_rate'])}% ± {_num(a['standard_error'])} ({a['annotator']})"
        )
    if "open-llm" in suites:
        o = suites["open-llm"]
        lines.append(f"- Open LLM tasks ({o['engine']}): average {_num(o['average'])}")
        for name, task in o["tasks"].items():
            lines.append(
                f"  - {name} ({task['num_fewshot']}-shot {task['metric']}): {_num(task['score'])} ± {_num(task['stderr'])}"
            )
    if "loss" in suites:
        loss = suites["loss"]
        lines.append(
            f"- Held-out loss: {loss['loss']:.4f} (perplexity {loss['perplexity']:.2f}) over {loss['tokens']:,} "
            f"assistant tokens of {loss['conversations']:,} conversations"
        )
    lines += ["", f"Every number with its provenance: `{RESULTS}`. Generated by deita-hub eval.", ""]
    return "\n".join(lines)


def _headline(suite: str, entry: dict) -> str:
    """One line per suite for the CLI."""
    if suite == "mt-bench":
        s = entry["score"]
        return f"{_num(s['median'])} (median of {entry['judge']['runs']} runs, {_num(s['min'])}–{_num(s['max'])}; {entry['failures']} unrated)"
    if suite == "alpaca-eval":
        return f"win rate {_num(entry['win_rate'])}% ± {_num(entry['standard_error'])}"
    if suite == "open-llm":
        return f"average {_num(entry['average'])} over {len(entry['tasks'])} tasks"
    return f"loss {entry['loss']:.4f}, perplexity {entry['perplexity']:.2f}"


def _num(value) -> str:
    return "–" if value is None or value != value else f"{value:.2f}"


def push_card(repo_id: str, results_file: Path, card_folder: Path | None) -> str | None:
    """Upload the regenerated card (README.md + its loss plot) to `repo_id` in one commit; other files are kept."""
    import shutil
    import tempfile

    from deita_hub.hub import push_folder

    with tempfile.TemporaryDirectory(prefix="deita-eval-card-") as staging:
        staging = Path(staging)
        if card_folder is None:
            card_folder = _card_from_the_hub(repo_id, results_file, staging / "record")
        shutil.copy2(card_folder / "README.md", staging / "README.md")
        plot = card_folder / "assets" / "loss.png"
        if plot.exists():
            (staging / "assets").mkdir()
            shutil.copy2(plot, staging / "assets" / "loss.png")
        result = push_folder(
            staging, repo_id, repo_type="model", commit_message="deita-hub eval: update the model card"
        )
    return result.commit_oid


def _card_from_the_hub(repo_id: str, results_file: Path, folder: Path) -> Path:
    """The card of a deita-hub model already on the Hub, regenerated from its pushed run record and the results:
    the card is updated (Performance section, model-index), never replaced by a blank one."""
    import shutil

    from deita_hub.cards import write_model_card
    from deita_hub.hub import NotOnHubError, download
    from deita_hub.records import RUN_RECORD

    try:
        record = download(repo_id, filename=RUN_RECORD)
    except NotOnHubError as exc:
        if exc.missing != "file":
            raise
        raise DeitaHubError(
            f"--push {repo_id}: the repo has no {RUN_RECORD}, so its card was not made by deita-hub and is not "
            f"rewritten; add the results by hand, or render a card with `deita-hub card RUN_DIR --eval-results "
            f"{RESULTS}`"
        ) from None
    folder.mkdir(parents=True)
    shutil.copy2(record, folder / RUN_RECORD)
    write_model_card(folder, eval_results=results_file)
    return folder
