"""MT-Bench by FastChat's LLM-judge protocol: answers, single-answer grading, median and spread of judge runs.

Why not FastChat's own package: `fschat` 0.2.36 (the last release, 2024) calls the judge through the pre-1.0
`openai` API (`openai.ChatCompletion.create`, `openai.error`), which `openai` >= 1 removed, and its wheel ships
neither the questions nor the judge prompts. lighteval's MT-Bench task brings its own judge stack (and pins older
nltk/termcolor). So deita-hub follows the protocol directly, with its data kept byte-exact:

- questions: FastChat's `question.jsonl` format (`question_id`, `category`, `turns`, optional `reference`) from a
  path, or the Hub dataset `HuggingFaceH4/mt_bench_prompts` (`prompt_id`, `category`, `prompt`, `reference`);
- answers: FastChat's `gen_model_answer.py` rules: two turns, the second sees the first answer, temperature by
  category (`temperature_config` in fastchat/llm_judge/common.py; a question's `required_temperature` wins),
  written as FastChat's answer JSONL (`question_id`, `answer_id`, `model_id`, `choices[0].turns`, `tstamp`);
- judging: `fastchat_judge_prompts.jsonl` beside this module is the four single-answer lines of FastChat's
  `fastchat/llm_judge/data/judge_prompts.jsonl` (lm-sys/FastChat, commit 0e6e7fd) copied verbatim: `single-v1`,
  `single-v1-multi-turn`, and the reference-answer variants `single-math-v1(-multi-turn)` used for math,
  reasoning and coding (`NEED_REF_CATS`). The judge gets the system prompt and the filled template, temperature 0,
  2048 max tokens; the rating is `[[x]]` (else `[x]`) as FastChat's `one_score_pattern(_backup)` reads it.

A judgment without a rating is recorded with `score: null` and its text, counted as a failure and left out of
the averages (FastChat writes -1 and drops it too); it is never given a default. The judge is run `judge_runs`
times; each run's average is FastChat's (mean over every rated turn), and the result is the median of the runs
with their min and max, overall, per turn and per category.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError

log = logging.getLogger(__name__)

PROMPTS_FILE = Path(__file__).with_name("fastchat_judge_prompts.jsonl")
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")
TEMPERATURE = {  # fastchat/llm_judge/common.py `temperature_config`
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
    "arena-hard-200": 0.0,
}
DEFAULT_TEMPERATURE = 0.7  # gen_model_answer.py, for a category the table lacks
JUDGE_MAX_TOKENS = 2048
ONE_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
ONE_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def judge_prompts() -> dict[str, dict[str, str]]:
    return {p["name"]: p for p in map(json.loads, PROMPTS_FILE.read_text(encoding="utf-8").splitlines())}


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None
    temperature: float | None = None  # FastChat's `required_temperature`

    @property
    def answer_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return TEMPERATURE.get(self.category, DEFAULT_TEMPERATURE)


def load_questions(source: str, *, limit: int | None = None) -> list[Question]:
    """FastChat's question.jsonl (a path) or the Hub dataset HuggingFaceH4/mt_bench_prompts (an id)."""
    path = Path(source)
    if path.exists():
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DeitaHubError(f"{path.name}: line {number} is not JSON: {exc.msg}") from exc
    else:
        from datasets import load_dataset

        try:
            rows = list(load_dataset(source, split="train"))
        except Exception as exc:
            raise DeitaHubError(f"cannot load MT-Bench questions '{source}': {exc}") from exc
    questions = [
        _question(row, f"{path.name if path.exists() else source}: row {i + 1}") for i, row in enumerate(rows)
    ]
    return questions[:limit] if limit else questions


def _question(row: dict, where: str) -> Question:
    turns = row.get("turns", row.get("prompt"))
    qid = row.get("question_id", row.get("prompt_id"))
    if qid is None or not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise DeitaHubError(
            f"{where}: an MT-Bench question needs 'question_id' and 'turns' (a list of strings)"
        )
    reference = row.get("reference") or None
    return Question(
        question_id=qid,
        category=str(row.get("category", "")),
        turns=tuple(turns),
        reference=tuple(reference) if reference else None,
        temperature=row.get("required_temperature"),
    )


# --- answers -----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict]:
    """Lines of a JSONL file that this eval appended; a last line cut by a kill is ignored."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    if text and not text.endswith("\n"):
        # A kill mid-write leaves a partial last line: cut it so the next append starts on a line of its own.
        log.warning("%s: dropping a truncated last line (an interrupted run)", path.name)
        text = text[: text.rfind("\n") + 1]
        path.write_text(text, encoding="utf-8")
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: ignoring a truncated line (an interrupted run)", path.name)
    return rows


def _append(path: Path, row: dict) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()


def generate_answers(generator, questions: list[Question], path: Path, model_id: str) -> dict[Any, dict]:
    """FastChat-format answers for every question, resumed from `path` (answers already there are kept)."""
    done = {row["question_id"]: row for row in read_jsonl(path)}
    todo = [q for q in questions if q.question_id not in done]
    if done:
        log.info(
            "MT-Bench: %d answers found in %s, %d to generate",
            len(questions) - len(todo),
            path.name,
            len(todo),
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Questions with the same temperature are answered together, turn after turn (turn 2 sees turn 1's answer).
    for temperature in sorted({q.answer_temperature for q in todo}):
        group = [q for q in todo if q.answer_temperature == temperature]
        conversations: list[list[dict[str, str]]] = [[] for _ in group]
        replies: list[list[str]] = [[] for _ in group]
        for turn in range(max(len(q.turns) for q in group)):
            active = [i for i, q in enumerate(group) if turn < len(q.turns)]
            for i in active:
                conversations[i].append({"role": "user", "content": group[i].turns[turn]})
            answers = generator.answer([conversations[i] for i in active], temperature)
            for i, answer in zip(active, answers, strict=True):
                conversations[i].append({"role": "assistant", "content": answer})
                replies[i].append(answer)
        for question, turns in zip(group, replies, strict=True):
            row = {
                "question_id": question.question_id,
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time(),
            }
            _append(path, row)
            done[question.question_id] = row
    return done


# --- judging -----------------------------------------------------------------------------------------------


def judge_request(question: Question, answer: dict, turn: int, prompts: dict) -> tuple[str, list[dict]]:
    """(prompt name, chat messages) of FastChat's single-answer judgment of `turn` (1 or 2)."""
    ref_based = question.category in NEED_REF_CATS
    if ref_based and not question.reference:
        raise DeitaHubError(
            f"MT-Bench question {question.question_id} ({question.category}) has no reference answer; "
            "FastChat judges math/reasoning/coding against one"
        )
    name = ("single-math-v1" if ref_based else "single-v1") + ("-multi-turn" if turn == 2 else "")
    prompt = prompts[name]
    answers = answer["choices"][0]["turns"]
    kwargs = {}
    if ref_based:
        kwargs["ref_answer_1"] = question.reference[0]
        if turn == 2:
            kwargs["ref_answer_2"] = question.reference[1]
    if turn == 2:
        user = prompt["prompt_template"].format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_1=answers[0],
            answer_2=answers[1],
            **kwargs,
        )
    else:
        user = prompt["prompt_template"].format(question=question.turns[0], answer=answers[0], **kwargs)
    return name, [{"role": "system", "content": prompt["system_prompt"]}, {"role": "user", "content": user}]


def parse_rating(judgment: str) -> float | None:
    """FastChat's rating: `[[x]]`, else `[x]`; None when there is none (never a default)."""
    match = ONE_SCORE.search(judgment) or ONE_SCORE_BACKUP.search(judgment)
    return float(match.group(1)) if match else None


def judge_answers(
    client,
    questions: list[Question],
    answers: dict,
    path: Path,
    *,
    runs: int,
    model_id: str,
    parallel: int = 8,
    max_tokens: int = JUDGE_MAX_TOKENS,
) -> list[dict]:
    """Every (question, turn, run) judgment, resumed from `path`: judgments already there are not redone."""
    prompts = judge_prompts()
    done = {(row["question_id"], row["turn"], row["run"]): row for row in read_jsonl(path)}
    todo = [
        (question, turn, run)
        for run in range(1, runs + 1)
        for question in questions
        for turn in range(1, min(2, len(question.turns)) + 1)
        if (question.question_id, turn, run) not in done
    ]
    if done:
        log.info("MT-Bench: %d judgments found in %s, %d to do", len(done), path.name, len(todo))
    path.parent.mkdir(parents=True, exist_ok=True)

    def judge(item):
        question, turn, run = item
        name, messages = judge_request(question, answers[question.question_id], turn, prompts)
        judgment = client.complete(messages, temperature=0.0, max_tokens=max_tokens)
        score = parse_rating(judgment)
        return {
            "question_id": question.question_id,
            "model": model_id,
            "judge": [client.model, name],
            "user_prompt": messages[1]["content"],
            "judgment": judgment,
            "score": score,
            "error": None if score is not None else "no [[rating]] in the judgment",
            "turn": turn,
            "run": run,
            "tstamp": time.time(),
        }

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for row in pool.map(
            judge, todo
        ):  # written in order as each finishes: a kill loses only unfinished ones
            _append(path, row)
            done[(row["question_id"], row["turn"], row["run"])] = row
    return list(done.values())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _spread(per_run: list[float | None]) -> dict[str, Any]:
    values = [v for v in per_run if v is not None]
    return {
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "runs": per_run,
    }


def summarise(questions: list[Question], judgments: list[dict], runs: int) -> dict[str, Any]:
    """Median and spread over judge runs of the average score, per turn and per category; failures counted."""
    category = {q.question_id: q.category for q in questions}
    wanted = {q.question_id for q in questions}
    rows = [r for r in judgments if r["question_id"] in wanted and r["run"] <= runs]

    def per_run(select) -> list[float | None]:
        return [
            _mean([r["score"] for r in rows if r["run"] == run and r["score"] is not None and select(r)])
            for run in range(1, runs + 1)
        ]

    failures = [r for r in rows if r["score"] is None]
    return {
        "score": _spread(per_run(lambda r: True)),
        "turn_1": _spread(per_run(lambda r: r["turn"] == 1)),
        "turn_2": _spread(per_run(lambda r: r["turn"] == 2)),
        "categories": {
            name: _spread(per_run(lambda r, name=name: category[r["question_id"]] == name))
            for name in sorted(set(category.values()))
        },
        "judgments": len(rows),
        "failures": len(failures),
        "failed": [{"question_id": r["question_id"], "turn": r["turn"], "run": r["run"]} for r in failures],
    }
