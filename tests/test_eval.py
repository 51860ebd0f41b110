"""`deita-hub eval` through `run_eval`: real engines (lm-eval, alpaca_eval), a real judge server, tiny models."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from deita_hub.errors import DeitaHubError
from deita_hub.evaluation import EvalConfig, run_eval
from deita_hub.evaluation import mt_bench as mtb

DATA = Path(__file__).parent / "data" / "eval"
QUESTIONS = DATA / "mt_bench_question.jsonl"
HELD_OUT = DATA / "held_out.jsonl"
SECRET = "sk-deita-test-secret-0123456789"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from deita_hub.testing.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model", "llama")


@pytest.fixture(scope="module")
def rating_judge(tmp_path_factory):
    """`transformers serve` running a tiny model that answers "[[d]]"."""
    from deita_hub.testing.judge import JudgeServer, save_rating_judge_model

    folder = save_rating_judge_model(tmp_path_factory.mktemp("judge") / "rating-judge")
    with JudgeServer(folder) as server:
        yield server


def make_run(tmp_path: Path, model_dir: Path) -> Path:
    """A training run folder (OUTPUT_DIR/final with weights, tokenizer and run record) around a tiny model."""
    import shutil

    from test_cards import tiny_record, write_run

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    write_run(run / "final", tiny_record(kind="full", method="full", lora=None, quantization=None))
    return run


def config(tmp_path, model, **overrides) -> EvalConfig:
    settings = dict(
        model=str(model),
        out=str(tmp_path / "evals"),
        suite=("mt-bench",),
        mt_bench_questions=str(QUESTIONS),
        judge_runs=2,
        judge_retries=2,
        judge_parallel=2,
        judge_max_tokens=16,  # the digit judge never stops on its own
        max_new_tokens=6,
        batch_size=4,
        judge_api_key_env="DEITA_TEST_JUDGE_TOKEN",
    )
    settings.update(overrides)
    return EvalConfig(**settings)


def test_config_names_the_field():
    with pytest.raises(DeitaHubError, match="dataset"):
        EvalConfig(model="m", out="o", suite=("loss",))
    with pytest.raises(DeitaHubError, match="suite"):
        EvalConfig(model="m", out="o", suite=("mt-bench", "mmlu"))
    with pytest.raises(DeitaHubError, match="open_llm_tasks"):
        EvalConfig(model="m", out="o", open_llm_tasks=("arc_challenge",))
    with pytest.raises(DeitaHubError, match="judge_runs"):
        EvalConfig(model="m", out="o", judge_runs=0)


def test_fastchat_rating_and_prompt_choice():
    assert mtb.parse_rating("The answer is fine. Rating: [[7]]") == 7.0
    assert mtb.parse_rating("Rating: [8.5]") == 8.5  # FastChat's backup pattern
    assert mtb.parse_rating("I would give it a seven.") is None
    prompts = mtb.judge_prompts()
    assert set(prompts) == {
        "single-v1",
        "single-v1-multi-turn",
        "single-math-v1",
        "single-math-v1-multi-turn",
    }
    questions = {q.question_id: q for q in mtb.load_questions(str(QUESTIONS))}
    answer = {"choices": [{"turns": ["A1", "A2"]}]}
    name, messages = mtb.judge_request(questions[111], answer, 2, prompts)
    assert name == "single-math-v1-multi-turn"
    assert (
        "### Reference answer:\n5pi" in messages[1]["content"]
        and "### Assistant A:\nA2" in messages[1]["content"]
    )
    name, messages = mtb.judge_request(questions[81], answer, 1, prompts)
    assert name == "single-v1" and messages[0]["content"] == "You are a helpful assistant."
    assert messages[1]["content"].endswith(
        "[The Start of Assistant's Answer]\nA1\n[The End of Assistant's Answer]"
    )
    assert [questions[q].answer_temperature for q in (81, 111, 131)] == [0.7, 0.0, 0.1]


def test_answer_prompts_are_fastchats_vicuna_prompt_with_one_bos():
    """Both answer engines get FastChat's prompt (its vicuna_v1.1 text, BOS once): the template writes BOS, so
    encoding its text with special tokens again would start the prompt with <s><s>."""
    from deita_hub.chat_template import render_vicuna
    from deita_hub.evaluation.answers import prompt_ids
    from deita_hub.tiny import llama2_tokenizer

    tokenizer = llama2_tokenizer()
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    turns.append({"role": "user", "content": "What is 2+2?"})
    ids = prompt_ids(tokenizer, turns)
    assert ids == tokenizer(render_vicuna(turns, add_generation_prompt=True)).input_ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id


def test_shipped_judge_prompts_are_fastchats_bytes():
    """fastchat_judge_prompts.jsonl is the tail of lm-sys/FastChat fastchat/llm_judge/data/judge_prompts.jsonl at
    commit 0e6e7fdc78bf64aceea1508694ce4e6472810b8b (its last four lines, the single-answer prompts: bytes
    6272-10457 of the 10457), compared byte for byte; a change here is a change of MT-Bench's judge."""
    import hashlib

    data = mtb.PROMPTS_FILE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == (
        "c0ed25a9c5a9cb1092346543d8e16b1b40b37b57f1c30d53ad57a97dfd94d9fc"
    )


def test_alpaca_eval_defaults_are_alpaca_eval_1s():
    """The defaults are AlpacaEval 1 (what the Deita paper reports) as the alpaca_eval package defines it: its
    AlpacaEval 1 annotator, and reference outputs from the dataset config `alpaca_eval`, whose loading script
    (tatsu-lab/alpaca_eval on the Hub) reads `alpaca_eval.json` (AlpacaEval 2's is alpaca_eval_gpt4_baseline)."""
    constants = pytest.importorskip("alpaca_eval.constants", reason="alpaca_eval needs setuptools < 81")
    from deita_hub.evaluation.alpaca_eval import REFERENCE_FILE

    assert EvalConfig.alpaca_eval_annotator == constants.ANNOTATOR_CONFIG_AE1 == "alpaca_eval_gpt4"
    assert EvalConfig.alpaca_eval_data == "tatsu-lab/alpaca_eval"
    assert constants.ALPACAEVAL_REFERENCE_OUTPUTS_1.keywords == {"dataset": "alpaca_eval"}
    assert REFERENCE_FILE == "alpaca_eval.json"


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_mt_bench_and_loss_with_a_real_judge_then_resume(tmp_path, tiny_model_dir, rating_judge, monkeypatch):
    monkeypatch.setenv("DEITA_TEST_JUDGE_TOKEN", SECRET)
    run = make_run(tmp_path, tiny_model_dir)
    cfg = config(
        tmp_path,
        run,
        suite=("mt-bench", "loss"),
        dataset=str(HELD_OUT),
        judge_url=rating_judge.url,
        judge_model=rating_judge.model_dir,
    )
    report = run_eval(cfg)
    out = Path(cfg.out)

    answers = _lines(out / "mt_bench" / "model_answer" / "run.jsonl")
    assert [a["question_id"] for a in answers] == [111, 131, 81]  # grouped by temperature 0.0, 0.1, 0.7
    assert all(a["model_id"] == "run" and len(a["choices"][0]["turns"]) == 2 for a in answers)
    judgments = _lines(out / "mt_bench" / "model_judgment" / "rating-judge_single.jsonl")
    assert len(judgments) == 3 * 2 * 2  # questions x turns x judge runs
    for row in judgments:  # every score is what the served model wrote, read by FastChat's pattern
        assert row["score"] == mtb.parse_rating(row["judgment"]) is not None
    results = json.loads((out / "results.json").read_text())
    mt = results["suites"]["mt-bench"]
    run_means = [sum(r["score"] for r in judgments if r["run"] == k) / 6 for k in (1, 2)]
    assert mt["score"]["runs"] == run_means and results["mt_bench"] == statistics.median(run_means)
    assert set(mt["categories"]) == {"writing", "math", "stem"} and mt["failures"] == 0
    assert results["baselines"][0]["mt_bench"] == 7.22 and results["open_llm_avg"] is None

    # Held-out loss: the batched value equals a plain one-conversation-at-a-time computation.
    loss = results["suites"]["loss"]
    assert loss["conversations"] == 3 and math.isfinite(loss["loss"])
    assert loss["loss"] == pytest.approx(_loss_one_at_a_time(run / "final"), rel=1e-4)

    # The card: Performance table and model-index from results.json; the token appears nowhere.
    from huggingface_hub import ModelCard

    card_text = report.card.read_text()
    card = ModelCard(card_text)
    values = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert values == {"MT-Bench": results["mt_bench"]}
    assert "Deita 7B v1.0 SFT†" in card_text and "as reported by the Deita paper" in card_text
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="ignore"), path

    # Resume after a kill: answers are not regenerated (the model cannot even load), only missing judgments redone.
    judgment_file = out / "mt_bench" / "model_judgment" / "rating-judge_single.jsonl"
    kept = judgment_file.read_text().splitlines()[:7]
    judgment_file.write_text("\n".join(kept) + '\n{"question_id": 13')  # a line cut mid-write
    answers_before = (out / "mt_bench" / "model_answer" / "run.jsonl").read_bytes()

    def no_model(*args, **kwargs):
        raise AssertionError("answers were regenerated")

    monkeypatch.setattr("deita_hub.evaluation.answers.load_generator", no_model)
    run_eval(config(tmp_path, run, judge_url=rating_judge.url, judge_model=rating_judge.model_dir))
    assert (out / "mt_bench" / "model_answer" / "run.jsonl").read_bytes() == answers_before
    rows = [json.loads(line) for line in judgment_file.read_text().splitlines() if line.endswith("}")]
    assert len({(r["question_id"], r["turn"], r["run"]) for r in rows}) == 12
    assert judgment_file.read_text().splitlines()[:7] == kept


def _loss_one_at_a_time(model_dir: Path) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deita_hub.pool import read_pool
    from deita_hub.training.data import tokenize_conversation

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    nll, tokens = 0.0, 0
    for turns in read_pool(str(HELD_OUT)).conversations:
        ids, mask = tokenize_conversation(tokenizer, turns, 2048)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        for t in range(1, len(ids)):
            if mask[t]:
                nll -= float(logprobs[t - 1, ids[t]])
                tokens += 1
    return nll / tokens


def test_a_judgment_without_rating_is_a_failure_not_a_score(tmp_path, tiny_model_dir):
    from deita_hub.testing.judge import JudgeServer
    from deita_hub.testing.tiny import save_digit_answering_model

    digit_judge = save_digit_answering_model(tmp_path / "digit-judge")  # answers "5", not "[[5]]"
    with JudgeServer(digit_judge) as server:
        report = run_eval(
            config(tmp_path, tiny_model_dir, judge_url=server.url, judge_model=str(digit_judge), judge_runs=1)
        )
    mt = report.results["suites"]["mt-bench"]
    assert mt["failures"] == mt["judgments"] == 6
    assert mt["score"]["median"] is None and report.results["mt_bench"] is None
    rows = _lines(Path(report.out) / "mt_bench" / "model_judgment" / "digit-judge_single.jsonl")
    assert all(r["score"] is None and r["error"] == "no [[rating]] in the judgment" for r in rows)
    assert all(
        r["judgment"].strip().isdigit() for r in rows
    )  # the served model's own reply, kept for reading


def test_an_unreachable_judge_is_retried_then_one_line(tmp_path, tiny_model_dir, monkeypatch):
    import socket

    monkeypatch.setenv("DEITA_TEST_JUDGE_TOKEN", SECRET)
    monkeypatch.setenv("DEITA_HUB_RETRY_BASE_DELAY", "0.01")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    with pytest.raises(DeitaHubError) as failure:
        run_eval(config(tmp_path, tiny_model_dir, judge_url=url, judge_model="judge", judge_runs=1))
    message = str(failure.value)
    assert "\n" not in message and url in message and "after 2 tries" in message and SECRET not in message
    # The answers were kept: the next run judges them without generating again.
    assert len(_lines(tmp_path / "evals" / "mt_bench" / "model_answer" / f"{tiny_model_dir.name}.jsonl")) == 3


def write_local_task(tasks: Path, data: Path = DATA / "tiny_mc.jsonl") -> Path:
    """An lm-evaluation-harness task folder: `deita_tiny_mc`, multiple choice over `data` (tiny_mc.jsonl: 4
    questions with `question`, `choices`, `answer`)."""
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / "deita_tiny_mc.yaml").write_text(
        "task: deita_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "fewshot_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return tasks


def test_open_llm_tasks_run_through_lm_eval_on_a_local_task(tmp_path, tiny_model_dir):
    tasks = write_local_task(tmp_path / "tasks")
    cfg = config(
        tmp_path,
        tiny_model_dir,
        suite=("open-llm",),
        open_llm_tasks=("deita_tiny_mc:1",),
        lm_eval_include=(str(tasks),),
    )
    report = run_eval(cfg)
    task = report.results["suites"]["open-llm"]["tasks"]["deita_tiny_mc"]
    assert task["metric"] == "acc_norm" and task["num_fewshot"] == 1
    assert task["score"] in (0.0, 25.0, 50.0, 75.0, 100.0)  # 4 questions
    assert report.results["open_llm_avg"] is None  # not the leaderboard's six tasks: not the card's column
    assert "lm-evaluation-harness" in report.results["suites"]["open-llm"]["engine"]


def test_alpaca_eval_with_its_package_and_a_real_judge(tmp_path, tiny_model_dir, rating_judge):
    pytest.importorskip("alpaca_eval.main", reason="alpaca_eval needs pkg_resources (setuptools < 81)")
    cfg = config(
        tmp_path,
        tiny_model_dir,
        suite=("alpaca-eval",),
        alpaca_eval_data=str(DATA / "alpaca_eval.json"),
        alpaca_eval_annotator=str(DATA / "alpaca_annotator"),
        judge_url=rating_judge.url,
        judge_model=rating_judge.model_dir,
    )
    report = run_eval(cfg)
    outputs = json.loads((Path(cfg.out) / "alpaca_eval" / "model_outputs.json").read_text())
    assert [o["instruction"] for o in outputs] == [
        r["instruction"] for r in json.loads((DATA / "alpaca_eval.json").read_text())
    ]
    assert {o["generator"] for o in outputs} == {tiny_model_dir.name}
    alpaca = report.results["suites"]["alpaca-eval"]
    assert alpaca["n_total"] == 3 and alpaca["failures"] == 0
    # The served judge always rates "[[6]]" or another fixed digit: every pair goes the same way.
    assert report.results["alpaca_eval"] in (0.0, 100.0)


def test_results_card_push_to_the_hub_and_model_index_round_trip(
    tmp_path, tiny_model_dir, rating_judge, hub_env
):
    run = make_run(tmp_path, tiny_model_dir)
    out = tmp_path / "evals"
    script = (
        "import json, sys\n"
        "from deita_hub.evaluation import EvalConfig, run_eval\n"
        "from huggingface_hub import hf_hub_download\n"
        f"report = run_eval(EvalConfig(model={str(run)!r}, out={str(out)!r}, suite=('mt-bench',), "
        f"mt_bench_questions={str(QUESTIONS)!r}, judge_runs=1, max_new_tokens=4, judge_url={rating_judge.url!r}, "
        f"judge_model={rating_judge.model_dir!r}, push='deita-tester/tiny-eval'))\n"
        "print(open(hf_hub_download('deita-tester/tiny-eval', 'README.md')).read())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=hub_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from huggingface_hub import ModelCard

    card = ModelCard(done.stdout)
    results = json.loads((out / "results.json").read_text())
    values = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    assert values == {"MT-Bench": results["mt_bench"]}
    assert results["mt_bench"] is not None and "## Performance" in done.stdout
    assert hub_env["HF_TOKEN"] not in done.stdout + (out / "results.json").read_text()
    assert os.environ.get("HF_TOKEN") != hub_env["HF_TOKEN"]


def test_eval_of_a_hub_model_updates_its_card_on_the_hub(tmp_path, tiny_model_dir, rating_judge, hub_env):
    """`deita-hub eval org/model --push org/model`: the pushed card is regenerated from the repo's run record with
    the results (never replaced by a blank one); a repo without a run record is refused, its card untouched."""
    run = make_run(tmp_path, tiny_model_dir)
    out = tmp_path / "evals"
    script = (
        "import json, sys\n"
        "from deita_hub.cli import main\n"
        "from deita_hub.hub import push_folder\n"
        "from huggingface_hub import hf_hub_download\n"
        f"push_folder({str(run / 'final')!r}, 'deita-tester/hub-eval', repo_type='model')\n"
        "code = main(['eval', 'deita-tester/hub-eval', '--suite', 'mt-bench', '--mt-bench-questions', "
        f"{str(QUESTIONS)!r}, '--judge-runs', '1', '--max-new-tokens', '4', '--judge-url', {rating_judge.url!r}, "
        f"'--judge-model', {rating_judge.model_dir!r}, '--out', {str(out)!r}, '--push', 'deita-tester/hub-eval'])\n"
        "assert code == 0, code\n"
        "print('=== card ===')\n"
        "print(open(hf_hub_download('deita-tester/hub-eval', 'README.md')).read())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=hub_env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    from huggingface_hub import ModelCard

    text = done.stdout.split("=== card ===\n", 1)[1]
    card = ModelCard(text)
    results = json.loads((out / "results.json").read_text())
    assert {r.dataset_name: r.metric_value for r in card.data.eval_results} == {
        "MT-Bench": results["mt_bench"]
    }
    assert "## Performance" in text and "## Input Format" in text  # the whole card, regenerated
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("config.json", "model.safetensors"):
        (plain / name).write_bytes((run / "final" / name).read_bytes())
    (plain / "README.md").write_text("# someone else's card\n")
    script = (
        "from deita_hub.cli import main\n"
        "from deita_hub.hub import push_folder\n"
        f"push_folder({str(plain)!r}, 'deita-tester/plain', repo_type='model')\n"
        "raise SystemExit(main(['eval', 'deita-tester/hub-eval', '--suite', 'loss', '--dataset', "
        f"{str(HELD_OUT)!r}, '--out', {str(tmp_path / 'e2')!r}, '--push', 'deita-tester/plain']))\n"
    )
    refused = subprocess.run(
        [sys.executable, "-c", script], env=hub_env, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode == 1 and "has no deita_run.json" in refused.stderr, refused.stderr[-3000:]


def test_cli_eval_loss_offline(tmp_path, tiny_model_dir, capsys):
    from deita_hub.cli import main

    out = tmp_path / "evals"
    code = main(
        ["eval", str(tiny_model_dir), "--suite", "loss", "--dataset", str(HELD_OUT), "--out", str(out)]
    )
    assert code in (0, None)
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert f"loss {results['suites']['loss']['loss']:.4f}" in printed
    assert "Held-out loss" in (out / "README.md").read_text()


def test_cli_eval_refuses_a_loss_suite_without_data(tmp_path, tiny_model_dir, capsys):
    from deita_hub.cli import main

    try:
        code = main(["eval", str(tiny_model_dir), "--suite", "loss", "--out", str(tmp_path / "evals")])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 1
    assert "--dataset" in capsys.readouterr().err


def test_cli_eval_serves_a_local_judge_for_mt_bench(tmp_path, tiny_model_dir, capsys):
    """`--judge-serve tiny:rating-judge`: the eval starts transformers' server itself, judges, then stops it."""
    from deita_hub.cli import main

    out = tmp_path / "evals"
    args = ["eval", str(tiny_model_dir), "--suite", "mt-bench", "--mt-bench-questions", str(QUESTIONS)]
    args += [
        "--judge-serve",
        "tiny:rating-judge",
        "--judge-runs",
        "1",
        "--limit",
        "1",
        "--max-new-tokens",
        "8",
    ]
    assert main([*args, "--judge-max-tokens", "16", "--out", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    mt = results["suites"]["mt-bench"]
    assert mt["failures"] == 0 and 1 <= mt["score"]["median"] <= 6  # the tiny judge rates with a digit 1..6
    assert mt["judge"]["model"] == "tiny-rating-judge" and mt["judge"]["url"].startswith("http://127.0.0.1:")
    assert main([*args, "--judge-url", "http://x/v1", "--out", str(tmp_path / "e2")]) == 1
    assert "--judge-serve and --judge-url both name a judge" in capsys.readouterr().err
