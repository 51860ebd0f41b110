"""AlpacaEval through the `alpaca_eval` package: deita-hub writes the model's outputs, alpaca_eval judges them.

Defaults are AlpacaEval 1, the version the Deita paper reports (80.78 for DEITA-7B-v1.0-sft): the 805 instructions
with text-davinci-003's reference outputs (`alpaca_eval.json` of the Hub dataset tatsu-lab/alpaca_eval) and the
`alpaca_eval_gpt4` annotator. Any annotator config of alpaca_eval (a name under its `evaluators_configs/`, or a
`configs.yaml` of one's own) can be chosen; with `--judge-url`/`--judge-model` its OpenAI calls go to that endpoint
through an alpaca_eval client config written beside the outputs, which names the endpoint but never the token
(the `openai` client reads it from the environment).

alpaca_eval 0.6.6 imports `pkg_resources`, which setuptools 81 removed: the `eval` extra keeps setuptools < 81.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from deita_hub.errors import DeitaHubError, require

log = logging.getLogger(__name__)

# AlpacaEval 1's reference outputs in the Hub dataset tatsu-lab/alpaca_eval: alpaca_eval's
# `ALPACAEVAL_REFERENCE_OUTPUTS_1` loads the dataset's config `alpaca_eval`, which its loading script reads from this
# file (AlpacaEval 2's config `alpaca_eval_gpt4_baseline` reads alpaca_eval_gpt4_baseline.json). The file is
# downloaded as it is: `datasets` 4 no longer runs loading scripts.
REFERENCE_FILE = "alpaca_eval.json"


def load_reference(source: str, *, limit: int | None = None) -> list[dict]:
    """Rows with `instruction`, `output` (the reference), `generator`, `dataset`: a local JSON/JSONL or a Hub id."""
    path = Path(source)
    if not path.exists():
        from deita_hub.hub import download

        path = download(source, repo_type="dataset", filename=REFERENCE_FILE)
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if text.lstrip().startswith("[")
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as exc:
        raise DeitaHubError(f"{path.name}: not JSON/JSONL (line {exc.lineno}): {exc.msg}") from exc
    for i, row in enumerate(rows):
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("instruction"), str)
            or not isinstance(row.get("output"), str)
        ):
            raise DeitaHubError(
                f"{path.name}: row {i + 1} needs 'instruction' and 'output' (the reference) strings"
            )
    return rows[:limit] if limit else rows


def generate_outputs(generator, reference: list[dict], path: Path, model_id: str) -> list[dict]:
    """alpaca_eval's `model_outputs.json` (instruction, output, generator, dataset), reused when complete."""
    if path.exists():
        outputs = json.loads(path.read_text(encoding="utf-8"))
        if [o["instruction"] for o in outputs] == [r["instruction"] for r in reference]:
            log.info("AlpacaEval: reusing the %d outputs in %s", len(outputs), path.name)
            return outputs
    answers = generator.answer([[{"role": "user", "content": r["instruction"]}] for r in reference], 0.0)
    outputs = [
        {"instruction": r["instruction"], "output": a, "generator": model_id, "dataset": r.get("dataset", "")}
        for r, a in zip(reference, answers, strict=True)
    ]
    from deita_hub.io import write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(outputs, indent=2, ensure_ascii=False))
    return outputs


def _annotator_config(annotator: str, folder: Path, judge_url: str | None, judge_model: str | None) -> str:
    """The annotator config alpaca_eval runs: as named, or a copy pointed at the chosen endpoint and model."""
    import yaml
    from alpaca_eval import constants

    given = Path(annotator)
    source = given if given.exists() else Path(constants.EVALUATORS_CONFIG_DIR) / annotator / "configs.yaml"
    if source.is_dir():
        source = source / "configs.yaml"
    if not source.is_file():
        raise DeitaHubError(f"alpaca_eval has no annotator config '{annotator}'")
    if judge_url is None and judge_model is None:
        return str(source.parent if given.exists() else annotator)
    configs = yaml.safe_load(source.read_text(encoding="utf-8"))
    client_config = folder / "client_config.yaml"
    if judge_url is not None:
        # No api_key key: openai.OpenAI() then reads OPENAI_API_KEY, set from --judge-api-key-env while judging.
        client_config.write_text(yaml.safe_dump({"default": [{"base_url": judge_url}]}), encoding="utf-8")
    for settings in configs.values():
        template = settings.get("prompt_template")
        if template and not Path(template).is_absolute():
            base = source.parent if given.exists() else Path(constants.EVALUATORS_CONFIG_DIR)
            settings["prompt_template"] = str((base / template).resolve())
        kwargs = settings.setdefault("completions_kwargs", {})
        if judge_model is not None:
            kwargs["model_name"] = judge_model
        if judge_url is not None:
            kwargs["client_config_path"] = str(client_config)
    target = folder / "annotator" / "configs.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(configs, sort_keys=False), encoding="utf-8")
    return str(target.parent)


@contextlib.contextmanager
def _api_key(env_name: str):
    """OPENAI_API_KEY set from the configured variable for alpaca_eval's clients, restored afterwards."""
    before = os.environ.get("OPENAI_API_KEY")
    os.environ["OPENAI_API_KEY"] = os.environ.get(env_name) or before or "EMPTY"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OPENAI_API_KEY", None)
        else:
            os.environ["OPENAI_API_KEY"] = before


def annotate(
    outputs: list[dict],
    reference: list[dict],
    folder: Path,
    *,
    annotator: str,
    judge_url: str | None,
    judge_model: str | None,
    api_key_env: str,
) -> dict[str, Any]:
    require("alpaca_eval", "eval", "AlpacaEval")
    try:
        from alpaca_eval.main import evaluate
    except ModuleNotFoundError as exc:  # pkg_resources (setuptools >= 81)
        raise DeitaHubError(f"alpaca_eval cannot be imported ({exc}); pip install 'setuptools<81'") from exc
    config = _annotator_config(annotator, folder, judge_url, judge_model)
    with _api_key(api_key_env):
        leaderboard, annotations = evaluate(
            model_outputs=outputs,
            reference_outputs=reference,
            annotators_config=config,
            output_path=str(folder),
            precomputed_leaderboard=None,
            is_return_instead_of_print=True,
            fn_metric="get_winrate",
            sort_by="win_rate",
            is_cache_leaderboard=False,
        )
    name = outputs[0]["generator"]
    row = leaderboard.loc[name].to_dict() if name in leaderboard.index else leaderboard.iloc[0].to_dict()
    preferences = [a.get("preference") for a in (annotations or [])]
    failures = sum(
        1 for p in preferences if p is None or p != p
    )  # None or NaN: the annotator gave no verdict
    return {
        "win_rate": float(row["win_rate"]),
        "standard_error": float(row.get("standard_error", float("nan"))),
        "n_total": int(row.get("n_total", len(outputs))),
        "failures": failures,
        "annotator": annotator,
    }
