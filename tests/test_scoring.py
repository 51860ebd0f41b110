"""Deita scoring: byte-exact prompts, digit ids from the scorer's tokenizer, scores equal to a hand computation
from the model's own logits, batching invariance, pairing, failures recorded (never defaulted), resume, CLI."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from click.testing import CliRunner

from deita_hub.cli import cli
from deita_hub.conversations import FormatSpec
from deita_hub.errors import DeitaHubError
from deita_hub.pool import read_pool
from deita_hub.scoring import (
    ScoreConfig,
    checkpoint_dir,
    make_scorer,
    prompts,
    score_conversations,
    truncate_prompt,
)
from deita_hub.testing.tiny import (
    llama2_tokenizer,
    save_digit_answering_model,
    save_tiny_model,
    tiny_causal_lm,
)

LLAMA_DIGITS = [29896, 29906, 29941, 29946, 29945, 29953]

# The templates as Deita's LlamaScorer writes them (hkust-nlp/deita b279f2c), spelled out here independently.
DEITA_COMPLEXITY = (
    "You are a helpful assistant. Please identify the complexity score of the following user query. \n##Query: "
    "{instruction}  \n##Complexity: "
)
DEITA_QUALITY = (
    "You are a helpful assistant. Please identify the quality score of the Response corresponding to the Question. "
    "\n #Question#:\n{instruction}\n#Response#:\n{output} \n##Quality: "
)


def conv(*pairs, system=None):
    turns = [{"role": "system", "content": system}] if system else []
    for question, answer in pairs:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return turns


ROWS = [
    conv(("What is 2 + 2?", "4.")),
    conv(("Write a haiku about the sea " + "and the waves " * 12, "Blue water rolls in.")),
    conv(
        ("Explain recursion.", "A function calling itself."),
        ("Give an example.", "factorial(n)."),
        system="Be brief.",
    ),
    conv(("Translate 'bonjour' into English, then explain the word's origin in " + "detail " * 30, "Hello.")),
    conv(("Hi", "Hello! How can I help?")),
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("mistral"), "mistral", seed=1)


@pytest.fixture(scope="module")
def wordlevel_dir(tmp_path_factory):
    """A tiny Mistral with a WordLevel vocabulary of its own: the digits get ids unlike LLaMA's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    text = (
        DEITA_COMPLEXITY + DEITA_QUALITY + " ".join(q + " " + a for turns in ROWS for q, a in _pairs(turns))
    )
    words = ["[UNK]", "[PAD]", "<s>", "</s>", *sorted(set(text.split()))]
    words += ["6", "zebra", "4", "1", "3", "5", "2"]  # digits deliberately out of order, at the end
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]"
    )
    folder = tmp_path_factory.mktemp("wordlevel")
    tiny_causal_lm("mistral", vocab_size=len(vocab), seed=2).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pairs(turns):
    from deita_hub.conversations import pairs

    return pairs(turns)


@functools.cache
def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def hand_scores(model_dir, scorer: str, turns, digit_ids) -> list[float]:
    """Deita's formula from the model's full logits, one unpadded prompt at a time."""
    tokenizer, model = _reference_model(str(model_dir))
    out = []
    for question, answer in _pairs(turns):
        text = (DEITA_COMPLEXITY if scorer == "complexity" else DEITA_QUALITY).format(
            instruction=question, output=answer
        )
        ids = torch.tensor([tokenizer(text).input_ids])
        with torch.no_grad():
            z = model(ids).logits[0, -1, digit_ids].double()
        out.append(float((torch.softmax(z, 0) * torch.arange(1, 7, dtype=torch.float64)).sum()))
    return out


def test_templates_are_byte_exact():
    assert prompts.COMPLEXITY_TEMPLATE == DEITA_COMPLEXITY
    assert prompts.QUALITY_TEMPLATE == DEITA_QUALITY
    assert prompts.render("complexity", {"instruction": "Q {x}"}).endswith("##Query: Q {x}  \n##Complexity: ")
    assert prompts.render("quality", {"instruction": "Q", "output": "A"}).endswith(
        "\n #Question#:\nQ\n#Response#:\nA \n##Quality: "
    )


def test_digit_ids_come_from_the_tokenizer():
    assert prompts.digit_token_ids(llama2_tokenizer()) == LLAMA_DIGITS
    # After the prompt's trailing space the LLaMA tokenizer ends in "▁", and the answer is the bare digit piece.
    tokenizer = llama2_tokenizer()
    ids = tokenizer(DEITA_COMPLEXITY.format(instruction="x") + "3").input_ids
    assert ids[-1] == LLAMA_DIGITS[2] and tokenizer.convert_ids_to_tokens(ids[-2]) == "▁"


def test_digit_ids_of_another_vocabulary(wordlevel_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(wordlevel_dir)
    ids = prompts.digit_token_ids(tokenizer)
    assert ids == [tokenizer.convert_tokens_to_ids(d) for d in "123456"]
    assert ids != LLAMA_DIGITS and len(set(ids)) == 6


def test_missing_digit_token_is_an_error():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "1": 1, "2": 2, "3": 3, "4": 4, "5": 5, "▁6": 6}  # "6" only as a merged piece
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]")), unk_token="[UNK]"
    )
    with pytest.raises(DeitaHubError, match="digit '6'"):
        prompts.digit_token_ids(tokenizer)


def test_expected_score_formula():
    assert prompts.expected_score([0, 0, 0, 0, 0, 0]) == pytest.approx(3.5)
    assert prompts.expected_score([0, 0, 1000, 0, 0, 0]) == pytest.approx(3.0)  # no overflow
    with pytest.raises(ValueError):
        prompts.expected_score([0, 0, float("nan"), 0, 0, 0])


@pytest.mark.parametrize("scorer", ["complexity", "quality"])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_scores_equal_hand_computation(kind, scorer, llama_dir, mistral_dir):
    model_dir = llama_dir if kind == "llama" else mistral_dir
    result = score_conversations(
        ROWS, ScoreConfig(scorer=scorer, model=str(model_dir), batch_size=3), progress=False
    )
    assert result.failures == []
    assert result.metadata["digit_token_ids"] == dict(zip("123456", LLAMA_DIGITS, strict=True))
    assert result.metadata["lm_head"] == "last token only"
    for turns, got in zip(ROWS, result.scores, strict=True):
        assert got == pytest.approx(hand_scores(model_dir, scorer, turns, LLAMA_DIGITS), abs=1e-5)
        assert all(1.0 <= s <= 6.0 for s in got)


def test_scores_with_another_vocabulary(wordlevel_dir):
    from transformers import AutoTokenizer

    digit_ids = [AutoTokenizer.from_pretrained(wordlevel_dir).convert_tokens_to_ids(d) for d in "123456"]
    result = score_conversations(
        ROWS, ScoreConfig(scorer="quality", model=str(wordlevel_dir)), progress=False
    )
    assert list(result.metadata["digit_token_ids"].values()) == digit_ids
    for turns, got in zip(ROWS, result.scores, strict=True):
        assert got == pytest.approx(hand_scores(wordlevel_dir, "quality", turns, digit_ids), abs=1e-5)


def test_batched_equals_one_at_a_time(llama_dir):
    rows = ROWS * 3
    one = score_conversations(
        rows, ScoreConfig(scorer="quality", model=str(llama_dir), batch_size=1), progress=False
    )
    many = score_conversations(
        rows, ScoreConfig(scorer="quality", model=str(llama_dir), batch_size=7), progress=False
    )
    for a, b in zip(one.scores, many.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_pairs_are_scored_independently(llama_dir):
    config = ScoreConfig(scorer="complexity", model=str(llama_dir))
    multi = conv(("First question?", "First answer."), ("Second question?", "Second answer."), system="Sys")
    alone = [conv(("First question?", "First answer.")), conv(("Second question?", "Other answer."))]
    result = score_conversations([multi, *alone], config, progress=False)
    assert len(result.scores[0]) == 2
    # Complexity reads only the instruction, without earlier turns or the system prompt.
    assert result.scores[0] == pytest.approx([result.scores[1][0], result.scores[2][0]], abs=1e-6)
    quality = score_conversations(
        [multi, *alone], ScoreConfig(scorer="quality", model=str(llama_dir)), progress=False
    )
    assert quality.scores[0][0] == pytest.approx(quality.scores[1][0], abs=1e-6)
    assert quality.scores[0][1] != pytest.approx(quality.scores[2][0], abs=1e-6)  # the response differs


def test_too_long_prompt_fails_without_truncation(llama_dir):
    config = ScoreConfig(scorer="complexity", model=str(llama_dir), max_length=60, truncation_side="none")
    rows = [conv(("short", "a")), conv(("long " * 80, "b")), conv(("fine", "c"), ("long " * 80, "d"))]
    result = score_conversations(rows, config, progress=False)
    assert result.scores[0] is not None and result.scores[1] is None and result.scores[2] is None
    assert [(f["row"], f["pair"]) for f in result.failures] == [(1, 0), (2, 1)]
    assert (
        "max_length 60" in result.failures[0]["reason"]
        and "truncation is off" in result.failures[0]["reason"]
    )
    assert result.metadata["num_failed_rows"] == 2


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_cuts_the_text_not_the_template(llama_dir, side):
    tokenizer = llama2_tokenizer()
    words = " ".join(f"w{i}" for i in range(200))
    values = {"instruction": "Q " + words, "output": "A " + words}
    full = tokenizer(prompts.render("quality", values)).input_ids
    ids = truncate_prompt(tokenizer, "quality", values, len(full), 120, side)
    assert len(ids) <= 120 and len(ids) >= 110
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert text.startswith("You are a helpful assistant.") and text.endswith(" \n##Quality: ")
    assert "#Question#:\n" in text and "#Response#:\n" in text
    kept = "w0 w1" if side == "right" else "w198 w199"
    assert text.count(kept) == 2  # both slots keep their beginning (right) or end (left)

    config = ScoreConfig(scorer="quality", model=str(llama_dir), max_length=120, truncation_side=side)
    result = score_conversations([conv((values["instruction"], values["output"]))], config, progress=False)
    assert result.metadata["truncated_pairs"] == 1 and result.metadata["truncation_side"] == side
    _, model = _reference_model(str(llama_dir))
    with torch.no_grad():
        z = model(torch.tensor([ids])).logits[0, -1, LLAMA_DIGITS].double()
    assert result.scores[0][0] == pytest.approx(
        float((torch.softmax(z, 0) * torch.arange(1, 7)).sum()), abs=1e-5
    )


class FlakyScorer:
    """The real backend, made to raise on prompts containing a marker token, to test failure isolation."""

    def __init__(self, inner, bad_token: int):
        self.inner, self.bad_token, self.calls = inner, bad_token, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def digit_logits(self, batch):
        self.calls.append(len(batch))
        if any(self.bad_token in ids for ids in batch):
            raise RuntimeError("injected device error")
        return self.inner.digit_logits(batch)


def test_backend_exception_fails_only_its_row(llama_dir):
    config = ScoreConfig(scorer="complexity", model=str(llama_dir), batch_size=8)
    inner = make_scorer(config)
    bad = llama2_tokenizer()("zebra", add_special_tokens=False).input_ids[-1]
    rows = [*ROWS, conv(("a zebra question", "x"))]
    flaky = FlakyScorer(inner, bad)
    result = score_conversations(rows, config, progress=False, scorer=flaky)
    clean = score_conversations(ROWS, config, progress=False, scorer=inner)
    assert result.scores[-1] is None
    for got, want in zip(result.scores[:-1], clean.scores, strict=True):
        assert got == pytest.approx(want, abs=1e-6)  # retried one at a time: same up to float rounding
    assert result.failures == [{"row": 5, "pair": 0, "reason": "RuntimeError: injected device error"}]
    assert flaky.calls[0] == 7 and flaky.calls[1:] == [1] * 7  # the failing batch was retried one by one


class CountingScorer(FlakyScorer):
    def __init__(self, inner, interrupt_after: int | None = None):
        super().__init__(inner, bad_token=-1)
        self.interrupt_after = interrupt_after

    def digit_logits(self, batch):
        if self.interrupt_after is not None and len(self.calls) == self.interrupt_after:
            raise KeyboardInterrupt
        return super().digit_logits(batch)


def test_resume_does_not_rescore_finished_rows(llama_dir, tmp_path):
    config = ScoreConfig(scorer="quality", model=str(llama_dir), batch_size=2)
    inner = make_scorer(config)
    rows = [conv((f"question {i} " + "word " * i, "answer")) for i in range(10)]
    reference = score_conversations(rows, config, progress=False, scorer=inner)
    first = CountingScorer(inner, interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        score_conversations(rows, config, progress=False, scorer=first, resume_dir=tmp_path / "ckpt")
    saved = (tmp_path / "ckpt" / "rows.jsonl").read_text().splitlines()
    assert len(saved) == 4
    with open(tmp_path / "ckpt" / "rows.jsonl", "a") as handle:
        handle.write('{"row": 9, "sco')  # a line torn by the interruption is ignored
    second = CountingScorer(inner)
    result = score_conversations(rows, config, progress=False, scorer=second, resume_dir=tmp_path / "ckpt")
    assert sum(second.calls) == 6  # only the 6 unfinished prompts
    assert result.metadata["resumed_rows"] == 4
    for a, b in zip(result.scores, reference.scores, strict=True):
        assert a == pytest.approx(b, abs=1e-6)
    # Other settings: the checkpoint is not reused.
    third = CountingScorer(inner)
    other = ScoreConfig(scorer="quality", model=str(llama_dir), batch_size=2, max_length=1024)
    score_conversations(rows, other, progress=False, scorer=third, resume_dir=tmp_path / "ckpt")
    assert sum(third.calls) == 10


def test_failed_rows_are_retried_on_resume(llama_dir, tmp_path):
    config = ScoreConfig(scorer="complexity", model=str(llama_dir))
    inner = make_scorer(config)
    bad = llama2_tokenizer()("zebra", add_special_tokens=False).input_ids[-1]
    rows = [conv(("a zebra question", "x")), conv(("plain", "y"))]
    failed = score_conversations(
        rows, config, progress=False, scorer=FlakyScorer(inner, bad), resume_dir=tmp_path
    )
    assert failed.scores[0] is None
    again = CountingScorer(inner)
    result = score_conversations(rows, config, progress=False, scorer=again, resume_dir=tmp_path)
    assert sum(again.calls) == 1 and result.scores[0] is not None and result.failures == []


def test_invalid_conversation_is_a_recorded_failure(llama_dir):
    rows = [conv(("ok", "fine")), [{"role": "user", "content": "no answer"}]]
    result = score_conversations(rows, ScoreConfig(scorer="complexity", model=str(llama_dir)), progress=False)
    assert result.scores[1] is None and "no assistant reply" in result.failures[0]["reason"]


def test_config_validation():
    with pytest.raises(DeitaHubError, match="scorer"):
        ScoreConfig(scorer="helpfulness", model="m")
    with pytest.raises(DeitaHubError, match="truncation_side"):
        ScoreConfig(scorer="quality", model="m", truncation_side="middle")
    with pytest.raises(DeitaHubError, match="backend"):
        ScoreConfig(scorer="quality", model="m", backend="tgi")


def _write_pool(path, rows):
    with open(path, "w") as handle:
        for i, turns in enumerate(rows):
            sharegpt = [
                {
                    "from": {"user": "human", "assistant": "gpt", "system": "system"}[t["role"]],
                    "value": t["content"],
                }
                for t in turns
            ]
            handle.write(json.dumps({"id": f"r{i}", "source": "test", "conversations": sharegpt}) + "\n")


def test_cli_score_then_score_again(llama_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    _write_pool(pool, ROWS)
    runner = CliRunner()
    first = runner.invoke(
        cli,
        [
            "score",
            str(pool),
            "--scorer",
            "complexity",
            "--model",
            str(llama_dir),
            "--out",
            str(tmp_path / "scored.jsonl"),
            "--batch-size",
            "2",
        ],
    )
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        cli,
        [
            "score",
            str(tmp_path / "scored.jsonl"),
            "--scorer",
            "quality",
            "--model",
            str(llama_dir),
            "--out",
            str(tmp_path / "scored2.jsonl"),
        ],
    )
    assert second.exit_code == 0, second.output
    rows = [json.loads(line) for line in (tmp_path / "scored2.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(ROWS))]
    assert all(r["source"] == "test" and "conversations" in r for r in rows)
    expected = score_conversations(ROWS, ScoreConfig(scorer="quality", model=str(llama_dir)), progress=False)
    for row, want in zip(rows, expected.scores, strict=True):
        assert len(row["complexity_scores"]) == len(row["quality_scores"]) == len(want)
        assert row["quality_scores"] == pytest.approx(want, abs=1e-6)
    meta = json.loads((tmp_path / "scored2.jsonl.json").read_text())
    assert meta["scorer"] == "quality" and meta["pool"]["num_valid_rows"] == len(ROWS)
    assert meta["truncation_side"] == "right" and meta["max_length"] == 2048
    assert not (tmp_path / "scored2.jsonl.partial").exists()
    assert not (tmp_path / "scored2.jsonl.failures.jsonl").exists()


def test_cli_records_failures(llama_dir, tmp_path):
    pool = tmp_path / "pool.jsonl"
    _write_pool(pool, [conv(("short", "a")), conv(("long " * 80, "b"))])
    out = tmp_path / "scored.jsonl"
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(pool),
            "--scorer",
            "complexity",
            "--model",
            str(llama_dir),
            "--out",
            str(out),
            "--max-length",
            "60",
            "--truncation-side",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 row(s) could not be scored" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["complexity_scores"] is not None and rows[1]["complexity_scores"] is None
    failures = [
        json.loads(line) for line in (tmp_path / "scored.jsonl.failures.jsonl").read_text().splitlines()
    ]
    assert failures == [{"row": 1, "pair": 0, "reason": failures[0]["reason"], "id": "r1"}]
    assert "truncation is off" in failures[0]["reason"]

    all_bad = tmp_path / "bad.jsonl"
    _write_pool(all_bad, [conv(("long " * 80, "b"))])
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(all_bad),
            "--scorer",
            "complexity",
            "--model",
            str(llama_dir),
            "--out",
            str(tmp_path / "bad_out.jsonl"),
            "--max-length",
            "60",
            "--truncation-side",
            "none",
        ],
    )
    assert result.exit_code == 1 and "none of the 1 rows could be scored" in result.output
    assert not (tmp_path / "bad_out.jsonl").exists()


def test_digit_answering_model_answers_with_digits(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = save_digit_answering_model(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for turns in ROWS:
        ids = llama2_tokenizer()(DEITA_COMPLEXITY.format(instruction=_pairs(turns)[0][0])).input_ids
        with torch.no_grad():
            top = model(torch.tensor([ids])).logits[0, -1].topk(20).indices.tolist()
        assert set(LLAMA_DIGITS) <= set(top)


def test_cli_resumes_an_interrupted_run(llama_dir, tmp_path):
    pool, out = tmp_path / "pool.jsonl", tmp_path / "scored.jsonl"
    _write_pool(pool, ROWS)
    config = ScoreConfig(scorer="complexity", model=str(llama_dir), batch_size=2)
    conversations = read_pool(pool, FormatSpec()).conversations
    with pytest.raises(KeyboardInterrupt):
        score_conversations(
            conversations,
            config,
            progress=False,
            scorer=CountingScorer(make_scorer(config), interrupt_after=1),
            resume_dir=checkpoint_dir(out),
        )
    assert not out.exists() and checkpoint_dir(out).exists()
    args = ["score", str(pool), "--scorer", "complexity", "--model", str(llama_dir), "--out", str(out)]
    result = CliRunner().invoke(cli, [*args, "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "2 resumed" in result.output and not checkpoint_dir(out).exists()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    expected = score_conversations(ROWS, config, progress=False)
    for row, want in zip(rows, expected.scores, strict=True):
        assert row["complexity_scores"] == pytest.approx(want, abs=1e-6)


def test_cli_unknown_model_is_a_clean_error(tmp_path):
    pool = tmp_path / "pool.jsonl"
    _write_pool(pool, ROWS[:1])
    result = CliRunner().invoke(
        cli,
        [
            "score",
            str(pool),
            "--scorer",
            "quality",
            "--model",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o.jsonl"),
        ],
    )
    assert result.exit_code == 1 and "cannot load the tokenizer" in result.output


def test_vllm_options_parse_and_reserved_names_are_refused():
    from deita_hub.recipes import ScoresSpec
    from deita_hub.vllm_engine import parse_options

    options = parse_options(["tensor_parallel_size=4", "enforce-eager=true", "gpu_memory_utilization=0.5"])
    assert options == {"tensor_parallel_size": 4, "enforce_eager": True, "gpu_memory_utilization": 0.5}
    with pytest.raises(DeitaHubError, match="KEY=VALUE"):
        parse_options(["tensor_parallel_size"])
    with pytest.raises(DeitaHubError, match=r"cannot set \['dtype', 'max_model_len'\]"):
        ScoreConfig(scorer="quality", model="m", vllm_options={"dtype": "half", "max_model_len": 9})
    secret = "hf_" + "abcdefghijklmnop"  # built here: no token-like literal in the sources
    with pytest.raises(DeitaHubError, match="cannot carry hf_token") as refused:
        ScoreConfig(scorer="quality", model="m", vllm_options={"hf_token": secret})
    assert secret not in str(refused.value)
    with pytest.raises(DeitaHubError, match="mapping"):
        ScoreConfig(scorer="quality", model="m", vllm_options=["enforce_eager"])
    scorer = ScoreConfig(scorer="complexity", model="m", vllm_options={"enforce_eager": True})
    assert ScoresSpec(complexity=scorer).complexity.vllm_options == {"enforce_eager": True}


def test_vllm_backend_without_vllm_names_the_extra(llama_dir, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here; tests/test_vllm.py covers the backend")
    except ImportError:
        pass
    pool = tmp_path / "pool.jsonl"
    _write_pool(pool, ROWS[:1])
    args = [
        "score",
        str(pool),
        "--scorer",
        "quality",
        "--model",
        str(llama_dir),
        "--out",
        str(tmp_path / "o.jsonl"),
    ]
    result = CliRunner().invoke(cli, [*args, "--backend", "vllm", "--vllm-option", "enforce_eager=true"])
    assert result.exit_code == 1 and "deita-hub[vllm]" in result.output
    assert not (tmp_path / "o.jsonl").exists()
