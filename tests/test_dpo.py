"""DPO (`stage: dpo`) for real, on CPU: preference pools, the Vicuna rendering of pairs, TRL's DPOTrainer from a
tiny SFT model, the record and card, the Hub round trip, resume after a kill, and the 10K UltraFeedback sampler.

The SFT model every DPO test starts from is built once per module: a tiny random Mistral fine-tuned for two steps
(`tiny-cpu`-style settings), exactly what `deita-hub train` writes to OUTPUT_DIR/final.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest

from deita_hub.chat_template import VICUNA_CHAT_TEMPLATE, VICUNA_SYSTEM
from deita_hub.errors import DeitaHubError, InvalidRecordError
from deita_hub.preferences import read_preferences
from deita_hub.training.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SFT_ROW = {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi!"}]}
WORDS = ["yes", "hello", "fine", "blue"]


def uf_row(question: str, good: str, bad: str, **changes) -> dict:
    """A row in HuggingFaceH4/ultrafeedback_binarized's layout: the prompt string and two whole conversations."""
    row = {
        "prompt": question,
        "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": bad}],
    }
    row.update(changes)
    return row


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def preference_pool(path: Path) -> Path:
    return write_jsonl(path, [uf_row(f"Say {w}.", f"{w.capitalize()}!", "No.") for w in WORDS])


def dpo_config(tmp_path: Path, model: str, dataset: Path, **changes) -> TrainConfig:
    """A fixed batch of all four pairs per step, constant lr, no warmup: the margin must move from step 1."""
    values = dict(
        stage="dpo",
        method="full",
        model=model,
        dataset=str(dataset),
        output_dir=str(tmp_path / "dpo"),
        bf16=False,
        gradient_checkpointing=False,
        max_length=128,
        per_device_train_batch_size=4,
        total_train_batch_size=4,
        max_steps=3,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_ratio=0.0,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        save_steps=3,
        logging_steps=1,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory) -> Path:
    """OUTPUT_DIR/final of a tiny full SFT run (2 steps on one conversation)."""
    from deita_hub.training.trainer import train

    folder = tmp_path_factory.mktemp("sft")
    pool = write_jsonl(folder / "sft-pool.jsonl", [SFT_ROW])
    config = TrainConfig(
        method="full", model="tiny:mistral", dataset=str(pool), output_dir=str(folder / "run"), bf16=False,
        gradient_checkpointing=False, max_length=128, per_device_train_batch_size=1, total_train_batch_size=1,
        max_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", warmup_ratio=0.0, save_steps=2,
    )  # fmt: skip
    return train(config).final_dir


# --- preference pools ------------------------------------------------------------------------------------------


def test_three_layouts_read_to_the_same_pair(tmp_path):
    expected = ([{"role": "user", "content": "Q?"}], "Good.", "Bad.")
    sharegpt = {
        "conversations": [{"from": "human", "value": "Q?"}],
        "chosen": {"from": "gpt", "value": "Good."},
        "rejected": {"from": "gpt", "value": "Bad."},
    }
    openai_whole = {k: v for k, v in uf_row("Q?", "Good.", "Bad.").items() if k != "prompt"}
    openai_reply = {
        "prompt": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "Good."}],
        "rejected": [{"role": "assistant", "content": "Bad."}],
    }
    for name, row in [
        ("uf", uf_row("Q?", "Good.", "Bad.")),
        ("sharegpt", sharegpt),
        ("whole", openai_whole),
        ("reply", openai_reply),
    ]:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([row]))
        prefs = read_preferences(path)
        pair = prefs.pairs[0]
        assert (pair.prompt, pair.chosen, pair.rejected) == expected, name
        assert prefs.pool.conversations == [[*expected[0], {"role": "assistant", "content": "Good."}]]


MALFORMED = [
    (uf_row("Q?", "Same.", "Same."), "rejected", "identical to 'chosen'"),
    (
        uf_row("Q?", "A.", "B.", rejected=[{"role": "user", "content": "Other?"}, {"role": "assistant", "content": "B."}]),
        "rejected",
        "prompt inside 'rejected' differs",
    ),
    (uf_row("Q?", "A.", "B.", prompt="Something else?"), "prompt", "differs from the prompt inside"),
    (uf_row("Q?", "  ", "B."), "chosen[1]", "empty assistant reply"),
    (uf_row("   ", "A.", "B."), "chosen[0]", "empty user turn"),
    (uf_row("Q?", "A.", "B.", chosen=None), "chosen", "missing (null)"),
    (uf_row("Q?", "A.", "B.", chosen=[{"role": "user", "content": "Q?"}]), "chosen", "one assistant reply"),
]  # fmt: skip


def test_malformed_rows_name_file_row_and_field_or_are_skipped_with_reasons(tmp_path):
    good = uf_row("Fine?", "Yes.", "No.")
    rows = [good] + [row for row, _, _ in MALFORMED]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    with pytest.raises(InvalidRecordError) as caught:
        read_preferences(path)
    assert str(caught.value).startswith(f"{path}, row 1, field 'rejected': identical to 'chosen'")
    prefs = read_preferences(path, on_invalid="skip")
    assert len(prefs) == 1 and prefs.pool.rows.tolist() == [0] and prefs.pool.table.num_rows == 1
    assert [(item["row"], item["field"]) for item in prefs.pool.invalid] == [
        (i + 1, field) for i, (_, field, _) in enumerate(MALFORMED)
    ]
    for item, (_, _, reason) in zip(prefs.pool.invalid, MALFORMED, strict=True):
        assert reason in item["reason"] and item["source"] == str(path)
    with pytest.raises(DeitaHubError, match="not a preference pool"):
        read_preferences(write_jsonl(tmp_path / "sft.jsonl", [SFT_ROW]))


def test_python_random_sampler_draws_deitas_ultrafeedback_sample():
    from deita_hub.recipes import load_recipe
    from deita_hub.selection import select

    recipe = load_recipe(REPO_ROOT / "dataset_scripts" / "ultrafeedback-10k.yaml")
    (subset,) = recipe.subsets
    assert (subset.selection.method, subset.selection.sampler, subset.selection.budget) == (
        "random",
        "python-random",
        10_000,
    )
    rows = 61_135  # len(train_prefs)
    random.seed(42)
    deita = random.sample(range(rows), 10_000)  # Deita's sample_ultrafeedback.py, line for line
    assert select(subset.selection, num_rows=rows).positions.tolist() == deita
    permutation = select(replace(subset.selection, sampler="permutation"), num_rows=rows).positions.tolist()
    assert permutation != deita


def test_preference_pool_builds_to_a_hub_dataset_that_dpo_reads(tmp_path):
    import datasets

    from deita_hub.dataset import build
    from deita_hub.training.data import read_training_rows

    write_jsonl(tmp_path / "pool.jsonl", [uf_row(f"Q{i}?", f"A{i}.", f"B{i}.") for i in range(20)])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "name: prefs\npool:\n  sources: [pool.jsonl]\nconfigs:\n"
        "  - {name: 5, method: random, sampler: python-random, seed: 42, budget: 5}\n"
    )
    result = build(recipe, tmp_path / "built", progress=False)
    (subset,) = result.record["subsets"]
    assert subset["selection"]["sampler"] == "python-random"
    built = json.loads((tmp_path / "built" / "deita_build.json").read_text())
    assert built["subsets"][0]["selection"]["sampler"] == "python-random"  # the card is rendered from this
    loaded = datasets.load_dataset(str(tmp_path / "built"), "5", split="train")
    random.seed(42)
    order = random.sample(range(20), 5)
    assert loaded["prompt"] == [f"Q{i}?" for i in order]
    assert "conversations" not in loaded.column_names  # no ShareGPT column that would read as LLaMA-Factory's
    config = TrainConfig(stage="dpo", dataset=str(tmp_path / "built"), dataset_config="5")
    prefs = read_training_rows(config)
    assert [pair.chosen for pair in prefs.pairs] == [f"A{i}." for i in order]


# --- rendering -------------------------------------------------------------------------------------------------


def test_pair_ids_and_masks_are_byte_exact_vicuna(tmp_path):
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from deita_hub.preferences import PreferencePair
    from deita_hub.testing.tiny import llama2_tokenizer
    from deita_hub.training.data import tokenize_pair, use_vicuna_template

    tokenizer = llama2_tokenizer(chat_template=False)
    use_vicuna_template(tokenizer)
    pair = PreferencePair(
        prompt=[
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi!"},
            {"role": "user", "content": "Name a colour."},
        ],
        chosen="Blue.",
        rejected="I will not.",
    )
    prompt_ids, chosen_ids, rejected_ids = tokenize_pair(tokenizer, pair)
    # Written out by hand (FastChat vicuna_v1.1), not by the project's renderer.
    prompt_text = f"{VICUNA_SYSTEM} USER: Hello! ASSISTANT: Hi!</s>USER: Name a colour. ASSISTANT:"

    def encode(text):
        return tokenizer(text, add_special_tokens=True)["input_ids"]  # BOS once, as the template's bos_token

    assert prompt_ids + chosen_ids == encode(prompt_text + " Blue.</s>")
    assert prompt_ids + rejected_ids == encode(prompt_text + " I will not.</s>")
    assert prompt_ids == encode(prompt_text)  # the prompt ends exactly where generation starts
    assert tokenizer.decode(chosen_ids) == "Blue.</s>" and chosen_ids[-1] == tokenizer.eos_token_id
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(
        [{"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}]
    )
    mask = batch["completion_mask"].tolist()
    # loss only on the replies (and their </s>): the prompt, the earlier reply "Hi!" and the padding are 0
    assert mask[0] == [0] * len(prompt_ids) + [1] * len(chosen_ids) + [0] * (
        len(rejected_ids) - len(chosen_ids)
    )
    assert mask[1] == [0] * len(prompt_ids) + [1] * len(rejected_ids)


# --- inputs are checked before anything is loaded or written ---------------------------------------------------


def test_every_input_is_checked_before_a_model_is_built(tmp_path):
    from deita_hub.training.trainer import train

    out = tmp_path / "run"
    base = dict(model="tiny:mistral", output_dir=str(out), bf16=False, total_train_batch_size=1, max_steps=1)
    with pytest.raises(DeitaHubError, match="pool file not found"):
        train(TrainConfig(dataset=str(tmp_path / "missing.jsonl"), **base))
    bad = write_jsonl(tmp_path / "bad.jsonl", [uf_row("Q?", "A.", "A.")])
    with pytest.raises(DeitaHubError, match="row 0, field 'rejected'"):
        train(TrainConfig(stage="dpo", dataset=str(bad), **base))
    with pytest.raises(DeitaHubError, match="no such folder"):
        train(TrainConfig(stage="dpo", dataset=str(bad), **{**base, "model": str(tmp_path / "no-model")}))
    assert not out.exists()  # no 20 MB tiny model, no config file, nothing
    with pytest.raises(DeitaHubError, match="'beta' must be positive"):
        TrainConfig(stage="dpo", beta=0.0)
    with pytest.raises(DeitaHubError, match="'packing' is for stage sft"):
        TrainConfig(stage="dpo", packing=True)


# --- training --------------------------------------------------------------------------------------------------


def sequence_logps(model, tokenizer, prefs) -> list[float]:
    """chosen minus rejected summed reply log-probability per pair, computed here (not by TRL)."""
    import torch

    from deita_hub.training.data import tokenize_pair

    margins = []
    with torch.no_grad():
        for pair in prefs.pairs:
            prompt, chosen, rejected = tokenize_pair(tokenizer, pair)
            totals = []
            for reply in (chosen, rejected):
                ids = torch.tensor([prompt + reply])
                logps = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
                targets = ids[0, 1:]
                token_logps = logps[torch.arange(len(targets)), targets][len(prompt) - 1 :]
                totals.append(float(token_logps.sum()))
            margins.append(totals[0] - totals[1])
    return margins


def test_tiny_sft_then_dpo_grows_the_margin_and_records_the_lineage(sft_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from deita_hub.models import load_tokenizer
    from deita_hub.training.chat import GenerationSettings, chat_once, load_chat_model
    from deita_hub.training.data import use_vicuna_template
    from deita_hub.training.trainer import train

    pool = preference_pool(tmp_path / "prefs.jsonl")
    result = train(dpo_config(tmp_path, str(sft_model), pool))
    record = json.loads((result.final_dir / "deita_run.json").read_text())
    history = [entry for entry in record["results"]["log_history"] if "loss" in entry]
    margins = [entry["rewards/margins"] for entry in history]
    assert len(margins) == 3 and margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert margins[0] < margins[1] < margins[2], margins
    assert history[-1]["loss"] < history[0]["loss"]

    tokenizer = load_tokenizer(str(sft_model))
    use_vicuna_template(tokenizer)
    prefs = read_preferences(pool)
    before = sequence_logps(AutoModelForCausalLM.from_pretrained(sft_model), tokenizer, prefs)
    after = sequence_logps(AutoModelForCausalLM.from_pretrained(result.final_dir), tokenizer, prefs)
    assert all(b > a for a, b in zip(before, after, strict=True)), (before, after)

    assert (record["stage"], record["kind"], record["base_model"]) == ("dpo", "full", sft_model.name)
    dpo = record["dpo"]
    assert (dpo["beta"], dpo["loss_type"], dpo["sft_datasets"]) == (0.1, "sigmoid", ["sft-pool.jsonl"])
    assert dpo["reference_model"] == f"{sft_model.name} (a frozen copy)"
    assert record["dataset"]["kind"] == "preferences" and record["dataset"]["num_rows"] == 4
    card = (result.final_dir / "README.md").read_text()
    assert "trained with DPO on 4 preference pairs" in card and "direct preference optimization" in card
    assert "- beta: 0.1" in card and "- sft_datasets: sft-pool.jsonl" in card and "- dpo\n" in card
    model, chat_tokenizer = load_chat_model(str(result.final_dir))
    assert chat_tokenizer.chat_template == VICUNA_CHAT_TEMPLATE
    assert isinstance(chat_once(model, chat_tokenizer, "Say yes.", GenerationSettings(max_new_tokens=4)), str)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_dpo_uses_the_disabled_adapter_as_reference_and_merges(sft_model, tmp_path, method):
    from deita_hub.training.merge import merge_adapter
    from deita_hub.training.trainer import build_trainer, train

    pool = preference_pool(tmp_path / "prefs.jsonl")
    config = dpo_config(tmp_path, str(sft_model), pool, method=method, max_steps=2, save_steps=2)
    trainer, *_ = build_trainer(replace(config, output_dir=str(tmp_path / "probe")))
    assert trainer.ref_model is None  # no second copy: the reference is the model with the adapter disabled
    del trainer
    result = train(config)
    record = json.loads((result.final_dir / "deita_run.json").read_text())
    assert (record["stage"], record["kind"], record["method"]) == ("dpo", "adapter", method)
    assert "adapter disabled" in record["dpo"]["reference_model"]
    assert (result.final_dir / "adapter_model.safetensors").is_file()
    if method == "lora":
        merged = merge_adapter(str(result.final_dir), tmp_path / "merged")
        merged_dir = merged.out_dir
        merged_record = json.loads((merged_dir / "deita_run.json").read_text())
        assert (merged_record["kind"], merged_record["stage"]) == ("merged", "dpo")
        assert "direct preference optimization" in (merged_dir / "README.md").read_text()


# --- Hub round trip ---------------------------------------------------------------------------------------------

CLIENT = """
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

repo, revision = sys.argv[1], sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(repo)
model = AutoPeftModelForCausalLM.from_pretrained(repo)
sft = AutoModelForCausalLM.from_pretrained("deita-tester/tiny-sft", revision=revision)
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes."}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    tuned, base = model(ids).logits, sft(ids).logits
    with model.disable_adapter():
        reference = model(ids).logits
print(json.dumps({"template": tokenizer.chat_template, "reference_is_sft": bool(torch.allclose(reference, base)),
                  "moved": float((tuned - base).abs().max())}))
"""


def test_push_round_trip_loads_the_dpo_adapter_on_its_sft_base(sft_model, tmp_path, hub_env, hub_server):
    pool = preference_pool(tmp_path / "prefs.jsonl")

    def run(args, **kwargs):
        result = subprocess.run(
            [sys.executable, *args], env=hub_env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])
        return result

    push = f"from deita_hub.hub import push_folder; push_folder({str(sft_model)!r}, 'deita-tester/tiny-sft', repo_type='model', tag='v1')"
    run(["-c", push])
    out = tmp_path / "dpo"
    result = run(
        [
            "-m", "deita_hub", "train", "tiny-dpo-cpu.yaml", "--dataset", str(pool), "--model", "deita-tester/tiny-sft",
            "--revision", "v1", "--out", str(out), "--max-steps", "2", "--push", "deita-tester/tiny-dpo",
            "--set", "save_steps=1", "--set", "total_train_batch_size=4", "--set", "per_device_train_batch_size=4",
            "--set", "lr_scheduler_type=constant", "--set", "learning_rate=0.01",
        ]
    )  # fmt: skip
    assert "push checkpoint-1: ok" in result.stdout and "push final model: ok" in result.stdout
    files = hub_server.files("deita-tester/tiny-dpo", "model")
    pushed = json.loads(files["deita_run.json"])
    assert (pushed["stage"], pushed["base_model"], pushed["base_model_revision"]) == (
        "dpo",
        "deita-tester/tiny-sft",
        "v1",
    )
    assert pushed["dpo"]["sft_datasets"] == ["sft-pool.jsonl"]
    card = files["README.md"].decode()
    assert "base_model: deita-tester/tiny-sft" in card and "- dpo" in card
    client = run(["-c", textwrap.dedent(CLIENT), "deita-tester/tiny-dpo", "v1"])
    loaded = json.loads(client.stdout.strip().splitlines()[-1])
    assert loaded["template"] == VICUNA_CHAT_TEMPLATE
    assert loaded["reference_is_sft"] and loaded["moved"] > 0


# --- resume ------------------------------------------------------------------------------------------------------


def test_kill_9_mid_dpo_run_then_resume(tmp_path):
    pool = preference_pool(tmp_path / "prefs.jsonl")
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    args = [
        sys.executable, "-m", "deita_hub", "train", "tiny-dpo-cpu.yaml", "--dataset", str(pool), "--out", str(out),
        "--max-steps", "4", "--set", "save_steps=2",
    ]  # fmt: skip
    process = subprocess.Popen(
        args, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 240
    try:
        while not (out / "checkpoint-2" / "deita_run.json").exists():
            assert process.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL and not (out / "final").exists()
    resumed = subprocess.run(
        [*args, "--resume"], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from checkpoint-" in resumed.stdout and "trained 4 steps" in resumed.stdout
    record = json.loads((out / "final" / "deita_run.json").read_text())
    steps = [entry["step"] for entry in record["results"]["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4] and record["stage"] == "dpo"
