"""Model cards rendered from a run record: snapshot, metadata round-trip, seed vocabulary, eval table, scans."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard

from deita_hub import cards
from deita_hub.cli import cli
from deita_hub.errors import DeitaHubError

SNAPSHOT = Path(__file__).parent / "snapshots" / "model_card_tiny.md"
ROOT = Path(__file__).resolve().parents[1]

# The "Training hyperparameters" list of the hand-written DEITA-7B-v1.0-sft card, verbatim.
SEED_HYPERPARAMETERS = """\
- learning_rate: 2e-05
- train_batch_size: 1
- eval_batch_size: 1
- seed: 42
- distributed_type: multi-GPU
- num_devices: 4
- gradient_accumulation_steps: 128
- total_train_batch_size: 512
- total_eval_batch_size: 4
- optimizer: Adam with betas=(0.9,0.999) and epsilon=1e-08
- lr_scheduler_type: cosine
- lr_scheduler_warmup_ratio: 0.1
- num_epochs: 6.0
"""
SEED_INPUT_EXAMPLE = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Hello! ASSISTANT: Hi!</s>USER: How are you? "
    "ASSISTANT:"
)


def tiny_record(**overrides) -> dict:
    """A run record as training writes it for a tiny CPU QLoRA run (times and versions frozen)."""
    record = {
        "schema": 1,
        "kind": "adapter",
        "method": "qlora",
        "base_model": "mistralai/Mistral-7B-v0.1",
        "model_name": "deita-tiny-qlora",
        "hub_repo": "deita-hub/deita-tiny-qlora",
        "template": "vicuna_v1.1",
        "language": ["en"],
        "license": "apache-2.0",
        "dataset": {
            "id": "deita-hub/deita-demo",
            "config": "demo",
            "split": "train",
            "revision": "v1.0",
            "fingerprint": "sha256:1f2e3d",
            "num_rows": 24,
            "build": {
                "method": "deita",
                "budget": 24,
                "max_similarity": 0.9,
                "embedder": "all-MiniLM-L6-v2",
                "scorers": {"complexity": "synthetic", "quality": "synthetic"},
                "pool_fingerprint": "sha256:aa11",
            },
        },
        "hyperparameters": {
            "learning_rate": 0.0002,
            "train_batch_size": 2,
            "eval_batch_size": 2,
            "seed": 42,
            "distributed_type": "cpu",
            "num_devices": 1,
            "gradient_accumulation_steps": 2,
            "total_train_batch_size": 4,
            "total_eval_batch_size": 2,
            "optimizer": {"name": "paged_adamw_8bit", "betas": [0.9, 0.999], "epsilon": 1e-08},
            "lr_scheduler_type": "cosine",
            "lr_scheduler_warmup_ratio": 0.1,
            "num_epochs": 2.0,
            "max_length": 512,
            "bf16": False,
            "packing": True,
            "assistant_only_loss": True,
            "max_steps": -1,
        },
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear"},
        "quantization": {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": "bfloat16",
        },
        "results": {
            "global_step": 12,
            "epoch": 2.0,
            "train_loss": 2.1234,
            "train_runtime_s": 9.87,
            "log_history": [
                {"step": s, "epoch": s / 6, "loss": 3.0 - 0.1 * s, "learning_rate": 2e-4 * (1 - s / 12)}
                for s in range(1, 13)
            ]
            + [{"step": 12, "epoch": 2.0, "eval_loss": 2.05}],
            "eval_loss": 2.05,
        },
        "versions": {
            "transformers": "5.24.0",
            "torch": "2.13.0",
            "datasets": "5.2.0",
            "tokenizers": "0.23.1",
            "peft": "0.21.2",
            "trl": "1.16.0",
            "bitsandbytes": "0.50.2",
            "accelerate": "1.15.0",
            "deita_hub": "0.1.0",
        },
        "created_at": "2026-11-25T22:00:00Z",
    }
    for dotted, value in overrides.items():
        node = record
        *parents, last = dotted.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    return record


def seed_record() -> dict:
    """The seed model's configuration: 4 devices x accumulation 128 x batch 1, lr 2e-5, cosine, 6 epochs."""
    record = tiny_record(kind="full", method="full", lora=None, quantization=None)
    record["hyperparameters"] = {
        "learning_rate": 2e-05,
        "train_batch_size": 1,
        "eval_batch_size": 1,
        "seed": 42,
        "distributed_type": "multi-GPU",
        "num_devices": 4,
        "gradient_accumulation_steps": 128,
        "total_train_batch_size": 512,
        "total_eval_batch_size": 4,
        "optimizer": {"name": "adamw_torch", "betas": [0.9, 0.999], "epsilon": 1e-08},
        "lr_scheduler_type": "cosine",
        "lr_scheduler_warmup_ratio": 0.1,
        "num_epochs": 6.0,
        "max_length": 2048,
        "bf16": True,
        "packing": False,
        "assistant_only_loss": True,
        "max_steps": -1,
    }
    return record


EVAL_RESULTS = {
    "mt_bench": 6.5,
    "alpaca_eval": None,
    "source": "https://example.org/deita-tiny-eval",
    "baselines": [{"model": "Random (demo)", "align": "SFT", "data_size": "24 SFT", "mt_bench": 5.0}],
}


def write_run(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deita_run.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


def section(text: str, heading: str) -> str:
    """The body under a Markdown heading, up to the next heading of any level."""
    match = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, flags=re.S | re.M)
    assert match, f"no section {heading!r}"
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_snapshot_of_a_tiny_run(tmp_path):
    run = write_run(tmp_path / "run", tiny_record())
    (tmp_path / "eval.json").write_text(json.dumps(EVAL_RESULTS))
    card_path = cards.write_model_card(run, eval_results=tmp_path / "eval.json")
    text = card_path.read_text(encoding="utf-8")
    if os.environ.get("DEITA_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text, encoding="utf-8")
    assert text == SNAPSHOT.read_text(encoding="utf-8"), (
        "rerun with DEITA_UPDATE_SNAPSHOTS=1 after a deliberate change"
    )
    # The plot the card links to exists, is a PNG, and no temp file is left behind.
    assert "![Training loss](assets/loss.png)" in text
    assert (run / "assets" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in run.rglob("*")) == ["README.md", "assets", "deita_run.json", "loss.png"]


def test_metadata_round_trips_through_huggingface_hub(tmp_path):
    record = tiny_record()
    run = write_run(tmp_path / "run", record)
    (tmp_path / "eval.json").write_text(json.dumps(EVAL_RESULTS))
    path = cards.write_model_card(run, eval_results=tmp_path / "eval.json")

    loaded = ModelCard.load(path)
    expected = cards.model_card(record, eval_results=EVAL_RESULTS, loss_plot=cards.LOSS_PLOT)
    assert loaded.data.to_dict() == expected.data.to_dict()
    data = loaded.data
    assert data.license == "apache-2.0"
    assert data.language == ["en"]
    assert data.base_model == "mistralai/Mistral-7B-v0.1"
    assert data.base_model_relation == "adapter"
    assert data.library_name == "peft"
    assert data.datasets == ["deita-hub/deita-demo"]
    assert data.pipeline_tag == "text-generation"
    assert {"deita", "deita-hub", "qlora"} <= set(data.tags)
    # Only the benchmark that was evaluated reaches the model-index; the null AlpacaEval is not invented.
    assert [(r.dataset_name, r.metric_value) for r in data.eval_results] == [("MT-Bench", 6.5)]
    assert data.eval_results[0].source_url == "https://example.org/deita-tiny-eval"


def test_seed_configuration_renders_the_seed_hyperparameter_list():
    text = str(cards.model_card(seed_record()))
    listed = section(text, "Training hyperparameters").split(
        "The following hyperparameters were used during training:\n"
    )[1]
    assert listed.split("\n\n")[0] + "\n" == SEED_HYPERPARAMETERS


def test_seed_list_follows_the_record_not_constants():
    record = seed_record()
    record["hyperparameters"].update(
        num_devices=8, total_train_batch_size=1024, learning_rate=1e-05, max_steps=300
    )
    record["hyperparameters"]["optimizer"] = {
        "name": "adamw_torch",
        "betas": [0.9, 0.95],
        "epsilon": 1e-08,
        "weight_decay": 0.1,
    }
    items = dict(cards.hyperparameter_list(record))
    assert items["num_devices"] == "8"
    assert items["total_train_batch_size"] == "1024"
    assert items["learning_rate"] == "1e-05"
    assert items["optimizer"] == "AdamW with betas=(0.9,0.95) and epsilon=1e-08 and weight_decay=0.1"
    assert items["training_steps"] == "300" and "num_epochs" not in items


@pytest.mark.parametrize(
    ("kind", "method", "library", "relation"),
    [
        ("adapter", "qlora", "peft", "adapter"),
        ("adapter", "lora", "peft", "adapter"),
        ("merged", "qlora", "transformers", "finetune"),
        ("full", "full", "transformers", "finetune"),
    ],
)
def test_library_and_base_model_relation_per_kind(kind, method, library, relation):
    record = tiny_record(kind=kind, method=method)
    if method == "full":
        record.update(lora=None, quantization=None)
    card = cards.model_card(record)
    assert (card.data.library_name, card.data.base_model_relation) == (library, relation)
    usage = section(card.text, "How to use")
    if kind == "adapter":
        assert "AutoPeftModelForCausalLM" in usage
    else:
        assert "AutoPeftModelForCausalLM" not in usage and "AutoModelForCausalLM" in usage
    assert ("QLoRA settings:" in card.text) == (method == "qlora")


def test_a_pinned_base_revision_is_linked():
    text = str(cards.model_card(tiny_record(base_model_revision="v1")))
    assert "**Finetuned from model:** [mistralai/Mistral-7B-v0.1](" in text
    assert "(revision [`v1`](" in text and "/mistralai/Mistral-7B-v0.1/tree/v1)" in text
    assert "Mistral-7B-v0.1/tree/" not in str(cards.model_card(tiny_record()))


def test_local_base_model_is_named_but_not_in_the_model_tree():
    card = cards.model_card(tiny_record(base_model="tiny-mistral"))
    metadata = card.data.to_dict()
    assert "base_model" not in metadata and "base_model_relation" not in metadata
    assert card.data.library_name == "peft"
    assert "**Finetuned from model:** `tiny-mistral`" in card.text


def test_eval_results_table_from_a_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"mt_bench": 7.22, "alpaca_eval": 80.78, "baselines": EVAL_RESULTS["baselines"]})
    )
    card = cards.model_card(tiny_record(), eval_results=cards.read_eval_results(path))
    performance = section(card.text, "Performance")
    header = next(line for line in performance.splitlines() if line.startswith("|"))
    assert header == "| Model | Align | Data Size | MT-Bench | AlpacaEval(%) | OpenLLM (Avg.) |"
    assert table_rows(performance) == [
        ["**deita-tiny-qlora** (this model)", "SFT", "24 SFT", "7.22", "80.78", "–"],
        ["Random (demo)", "SFT", "24 SFT", "5.00", "–", "–"],
    ]
    assert "–: not evaluated." in performance
    assert sorted(r.metric_value for r in card.data.eval_results) == [7.22, 80.78]


def test_without_eval_results_nothing_is_claimed():
    card = cards.model_card(tiny_record())
    performance = section(card.text, "Performance")
    assert "Not evaluated" in performance and "|" not in performance
    assert card.data.eval_results is None


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"mtbench": 7.0}', "unknown key(s) ['mtbench']"),
        ('{"mt_bench": "7.0"}', "field 'mt_bench' must be a finite number"),
        ('{"mt_bench": 7.0,}', "not valid JSON (line 1"),
        ('{"baselines": [{"mt_bench": 5}]}', "baselines[0]: each row needs a 'model'"),
        ("[7.0]", "expected a JSON object"),
    ],
)
def test_bad_eval_results_fail_and_write_nothing(tmp_path, content, message):
    run = write_run(tmp_path / "run", tiny_record())
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    with pytest.raises(DeitaHubError) as err:
        cards.write_model_card(run, eval_results=bad)
    assert "bad.json" in str(err.value) and message in str(err.value)
    assert sorted(p.name for p in run.iterdir()) == ["deita_run.json"]


def test_input_format_is_the_seed_example_and_what_the_tokenizer_renders():
    from deita_hub.testing.tiny import llama2_tokenizer

    card = cards.model_card(tiny_record())
    block = re.search(r"```\n(.*?)\n```", section(card.text, "Input Format"), flags=re.S).group(1)
    assert block == SEED_INPUT_EXAMPLE
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "How are you?"},
    ]
    rendered = llama2_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "<s>" + block


def test_dataset_link_revision_and_selection_summary():
    text = cards.model_card(tiny_record()).text
    sources = section(text, "Model Sources")
    assert "[deita-hub/deita-demo](https://huggingface.co/datasets/deita-hub/deita-demo)" in sources
    assert "https://huggingface.co/datasets/deita-hub/deita-demo/tree/v1.0" in sources
    assert "https://github.com/hkust-nlp/deita" in sources and cards.DEITA_HUB_URL in sources
    selection = section(text, "Data selection")
    for line in (
        "- method: deita",
        "- budget: 24",
        "- max_similarity: 0.9",
        "- embedder: all-MiniLM-L6-v2",
        "- scorers.complexity: synthetic",
        "- pool_fingerprint: sha256:aa11",
    ):
        assert line in selection
    # A local dataset has no Hub link and no `datasets:` metadata; no build, no selection section.
    local = tiny_record(dataset__id="pool.jsonl", dataset__build=None)
    card = cards.model_card(local)
    assert card.data.datasets is None and "`pool.jsonl` (a local dataset" in card.text
    assert "### Data selection" not in card.text


def test_explicit_dataset_build_is_summarised_and_paths_are_reduced():
    build = {
        "selection": {"method": "random", "budget": 10},
        "pool": {"fingerprint": "sha256:ff", "path": "/home/u/pool.jsonl"},
    }
    text = cards.model_card(tiny_record(dataset__build=None), dataset_build=build).text
    selection = section(text, "Data selection")
    assert "- method: random" in selection and "- pool.fingerprint: sha256:ff" in selection
    assert "- pool.path: pool.jsonl" in selection and "/home/u" not in text


def test_scan_refuses_tokens_and_absolute_paths(monkeypatch):
    text = str(cards.model_card(tiny_record()))
    assert cards.scan_for_secrets(text) == []
    assert not re.search(r"hf_[A-Za-z0-9]{20,}", text)
    assert str(Path.home()) not in text and str(ROOT) not in text

    with pytest.raises(DeitaHubError, match="token-like string"):
        cards.model_card(
            tiny_record(model_name="run-hf_" + "abcdefghijklmnopqrstuvwxyz123456")
        )  # built, not a literal
    with pytest.raises(DeitaHubError, match="absolute path"):
        cards.model_card(tiny_record(base_model="/home/someone/models/mistral"))
    monkeypatch.setenv("HF_TOKEN", "secret-test-token-value")
    with pytest.raises(DeitaHubError, match="HF_TOKEN value"):
        cards.model_card(tiny_record(hub_repo="secret-test-token-value"))


def test_missing_record_field_names_it(tmp_path):
    record = tiny_record()
    del record["hyperparameters"]["total_train_batch_size"]
    with pytest.raises(
        DeitaHubError, match=r"deita_run.json: field 'hyperparameters.total_train_batch_size' is missing"
    ):
        cards.model_card(record)
    with pytest.raises(DeitaHubError, match="field 'kind'"):
        cards.model_card(tiny_record(kind="lora"))


def test_long_runs_thin_the_loss_table_but_keep_the_last_step(tmp_path):
    record = tiny_record()
    record["results"]["log_history"] = [
        {"step": s, "epoch": s / 500, "loss": 1 + 1 / s} for s in range(1, 1001)
    ]
    rows = table_rows(section(cards.model_card(record).text, "Training results"))
    assert len(rows) <= 201 and rows[0][0] == "1" and rows[-1][0] == "1000"
    assert "Every 5th logged step is shown" in cards.model_card(record).text
    # Nothing logged: no plot, no table, and the card says so.
    record["results"]["log_history"] = []
    run = write_run(tmp_path / "run", record)
    text = cards.write_model_card(run).read_text()
    assert "No loss was logged" in text and "assets/loss.png" not in text
    assert not (run / "assets").exists()


def test_cli_card_writes_and_fails_cleanly(tmp_path):
    run = write_run(tmp_path / "run", tiny_record())
    out = tmp_path / "cards" / "README.md"
    result = CliRunner().invoke(cli, ["card", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists() and (out.parent / "assets" / "loss.png").exists()
    assert ModelCard.load(out).data.model_name == "deita-tiny-qlora"

    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cli, ["card", str(empty)])
    assert result.exit_code == 1 and "no deita_run.json" in result.output
    assert list(empty.iterdir()) == []


def test_render_template_is_strict():
    import jinja2

    with pytest.raises(jinja2.UndefinedError):
        cards.render_template(cards.CARD_TEMPLATE, {"card_data": "license: mit"})
    with pytest.raises(DeitaHubError, match="no_such.md.j2"):
        cards.render_template("no_such.md.j2", {})


def test_project_links_match_pyproject():
    # tomllib is Python 3.11+; the two lines are simple enough to read directly.
    text = (ROOT / "pyproject.toml").read_text()
    urls = dict(re.findall(r'^(Homepage|Deita) = "([^"]+)"$', text, flags=re.M))
    assert cards.DEITA_HUB_URL == urls["Homepage"]
    assert cards.DEITA_URL == urls["Deita"]


def _usage_snippet(card_text: str) -> str:
    return re.search(r"```python\n(.*?)```", section(card_text, "How to use"), flags=re.S).group(1)


def test_how_to_use_snippet_runs_on_a_tiny_model(tmp_path):
    """The card's code, with the repo id swapped for a local tiny model, loads it and generates."""
    from deita_hub.testing.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    record = copy.deepcopy(seed_record())
    code = _usage_snippet(cards.model_card(record).text)
    assert f'model_id = "{record["hub_repo"]}"' in code
    code = code.replace(f'model_id = "{record["hub_repo"]}"', f"model_id = {str(folder)!r}")
    code = code.replace("max_new_tokens=256", "max_new_tokens=3")
    namespace: dict = {}
    exec(compile(code, "model_card_snippet", "exec"), namespace)
    assert type(namespace["model"]).__name__ == "MistralForCausalLM"
    assert namespace["output"].shape[1] == namespace["inputs"]["input_ids"].shape[1] + 3


def test_adapter_snippet_runs_on_a_tiny_adapter(tmp_path):
    """The adapter card's PEFT code loads a LoRA adapter saved beside its tokenizer."""
    from peft import LoraConfig, get_peft_model

    from deita_hub.testing.tiny import llama2_tokenizer, save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    adapter = tmp_path / "adapter"
    model.save_pretrained(adapter)
    llama2_tokenizer().save_pretrained(adapter)

    record = tiny_record()
    code = _usage_snippet(cards.model_card(record).text)
    code = code.replace(f'model_id = "{record["hub_repo"]}"', f"model_id = {str(adapter)!r}")
    code = code.replace("max_new_tokens=256", "max_new_tokens=3")
    namespace: dict = {}
    exec(compile(code, "adapter_card_snippet", "exec"), namespace)
    assert type(namespace["model"]).__name__.startswith("Peft")
    assert namespace["output"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
